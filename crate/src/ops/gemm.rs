//! Tiles of the register-blocked GEMM core (`shaders/common/gemm.wgsl`) that matmul and conv2d
//! share: a workgroup computes a `bm × bn` output tile, stepping over the reduction in slices
//! of `kt`, and each invocation accumulates an 8×8 block.

use crate::gpu::Caps;
use crate::shader::Defines;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub bm: usize,
    pub bn: usize,
    pub kt: usize,
}

impl Tiles {
    pub fn invocations(&self) -> usize {
        (self.bm / 8) * (self.bn / 8)
    }

    /// Bytes of workgroup memory (both staged tiles, f32).
    pub fn workgroup_bytes(&self) -> usize {
        self.kt * (self.bm + self.bn) * 4
    }

    /// The conditions the shader relies on.
    pub fn is_valid(&self) -> bool {
        self.bm > 0
            && self.bn > 0
            && self.kt > 0
            && self.bm.is_multiple_of(8)
            && self.bn.is_multiple_of(8)
            && self.kt.is_multiple_of(4)
            && self.invocations() <= 256
    }

    /// Valid, and within the device's invocation and workgroup-memory limits.
    pub fn fits(&self, caps: &Caps) -> bool {
        self.is_valid()
            && self.invocations() <= caps.max_invocations_per_workgroup as usize
            && self.workgroup_bytes() <= caps.max_workgroup_storage as usize
    }

    /// `bm × bn` with the deepest slice (<= 32) the device's workgroup memory allows.
    fn with_deepest_slice(bm: usize, bn: usize, caps: &Caps) -> Tiles {
        let mut t = Tiles { bm, bn, kt: 32 };
        while t.kt > 4 && t.workgroup_bytes() > caps.max_workgroup_storage as usize {
            t.kt /= 2;
        }
        t
    }

    /// The general choice: 64×64 (64 invocations, which every WebGPU device has; 32×32 below).
    pub fn for_caps(caps: &Caps) -> Tiles {
        let (bm, bn) = if caps.max_invocations_per_workgroup >= 64 { (64, 64) } else { (32, 32) };
        Self::with_deepest_slice(bm, bn, caps)
    }

    /// For `rows` output rows (a convolution's output channels): a narrow row tile when there
    /// are few rows (conv_out, the VAE's last conv), otherwise [`Tiles::for_caps`].
    pub fn choose(caps: &Caps, rows: usize) -> Tiles {
        let (bm, bn) = if caps.max_invocations_per_workgroup < 64 {
            (32, 32)
        } else if rows <= 8 {
            (8, 256)
        } else if rows <= 16 {
            (16, 128)
        } else if rows <= 32 {
            (32, 128)
        } else {
            (64, 64)
        };
        Self::with_deepest_slice(bm, bn, caps)
    }

    /// For a GEMM with `n` output columns (a matmul's N): a narrow column tile when there are
    /// few columns (an adapter's stacked down projection, N = its rank), so no invocation
    /// computes padding; otherwise [`Tiles::for_caps`].
    pub fn for_columns(caps: &Caps, n: usize) -> Tiles {
        let (bm, bn) = if caps.max_invocations_per_workgroup < 64 {
            (32, 32)
        } else if n <= 8 {
            (256, 8)
        } else if n <= 16 {
            (128, 16)
        } else if n <= 32 {
            (128, 32)
        } else {
            (64, 64)
        };
        Self::with_deepest_slice(bm, bn, caps)
    }

    /// The valued defines (`BM`, `BN`, `KT`) of the shader variant.
    pub fn defines(&self) -> Defines {
        Defines::new()
            .value("BM", format!("{}u", self.bm))
            .value("BN", format!("{}u", self.bn))
            .value("KT", format!("{}u", self.kt))
    }
}
