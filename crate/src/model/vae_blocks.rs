//! The building blocks of diffusers' AutoencoderKL, following
//! `diffusers/models/resnet.py` (`ResnetBlock2D` without a time embedding),
//! `diffusers/models/downsampling.py` / `upsampling.py` (`Downsample2D`, `Upsample2D` with
//! convolutions), `diffusers/models/unets/unet_2d_blocks.py` (`DownEncoderBlock2D`,
//! `UpDecoderBlock2D`, `UNetMidBlock2D`) and `diffusers/models/attention_processor.py`
//! (`Attention` built with `_from_deprecated_attn_block`, run by `AttnProcessor2_0`: one head of
//! size C over the H·W positions, residual, `rescale_output_factor`).
//!
//! Every block takes and returns `[B, C, H, W]` f32 activations.

use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::model::weights::{WeightPolicy, WeightSource};
use crate::ops::attention::{self, AttentionOpts};
use crate::ops::conv::{conv2d, Conv2dParams};
use crate::ops::elementwise::{add, scale};
use crate::ops::layout::{pad2d, transpose_last2, upsample_nearest2x};
use crate::ops::matmul::{linear, matmul, MatmulOpts};
use crate::ops::norm::{group_norm, softmax};
use crate::tensor::Tensor;

/// The epsilon diffusers' VAE passes to every resnet, attention and output group norm.
pub const VAE_NORM_EPS: f32 = 1e-6;

/// Where a block finds its parameters and how they are stored.
pub struct Loader<'a> {
    pub gpu: &'a Gpu,
    pub src: &'a dyn WeightSource,
    pub policy: WeightPolicy,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.load(self.gpu, name, shape, self.policy.matrix())
    }
    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.src.load(self.gpu, name, &[len], self.policy.vector())
    }
}

/// `nn.Conv2d(cin, cout, k, stride, padding)` with bias.
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    params: Conv2dParams,
}

impl Conv {
    pub fn load(l: &Loader, prefix: &str, cin: usize, cout: usize, k: usize, p: Conv2dParams) -> Result<Self> {
        Ok(Self {
            weight: l.matrix(&format!("{prefix}.weight"), &[cout, cin, k, k])?,
            bias: l.vector(&format!("{prefix}.bias"), cout)?,
            params: p,
        })
    }
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        conv2d(gpu, x, &self.weight, Some(&self.bias), self.params)
    }
}

const SAME3: Conv2dParams = Conv2dParams { stride: 1, padding: 1 };
const POINTWISE: Conv2dParams = Conv2dParams { stride: 1, padding: 0 };

/// `nn.GroupNorm(groups, C, eps)` with affine parameters, optionally fused with SiLU.
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl GroupNorm {
    pub fn load(l: &Loader, prefix: &str, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            gamma: l.vector(&format!("{prefix}.weight"), channels)?,
            beta: l.vector(&format!("{prefix}.bias"), channels)?,
            groups,
        })
    }
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(gpu, x, self.groups, Some(&self.gamma), Some(&self.beta), VAE_NORM_EPS, silu)
    }
}

/// `nn.Linear(c, c)` with bias.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(l: &Loader, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            weight: l.matrix(&format!("{prefix}.weight"), &[cout, cin])?,
            bias: l.vector(&format!("{prefix}.bias"), cout)?,
        })
    }
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        linear(gpu, x, &self.weight, Some(&self.bias))
    }
}

/// `ResnetBlock2D` with `temb_channels=None`, SiLU, `output_scale_factor=1`:
/// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shortcut a 1×1 convolution
/// when the channel count changes.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    pub fn load(l: &Loader, prefix: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(l, &format!("{prefix}.norm1"), cin, groups)?,
            conv1: Conv::load(l, &format!("{prefix}.conv1"), cin, cout, 3, SAME3)?,
            norm2: GroupNorm::load(l, &format!("{prefix}.norm2"), cout, groups)?,
            conv2: Conv::load(l, &format!("{prefix}.conv2"), cout, cout, 3, SAME3)?,
            shortcut: if cin != cout {
                Some(Conv::load(l, &format!("{prefix}.conv_shortcut"), cin, cout, 1, POINTWISE)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?;
        let h = self.conv1.forward(gpu, &h)?;
        let h = self.norm2.forward(gpu, &h, true)?;
        let h = self.conv2.forward(gpu, &h)?;
        match &self.shortcut {
            Some(s) => add(gpu, &s.forward(gpu, x)?, &h),
            None => add(gpu, x, &h),
        }
    }
}

/// `Downsample2D(use_conv=True, padding=0)` as the VAE encoder builds it: `F.pad(x, (0, 1, 0, 1))`
/// (one zero column on the right, one zero row at the bottom) then a 3×3 convolution with
/// stride 2 and no padding. The asymmetric padding is a separate `ops::layout::pad2d` pass.
pub struct Downsample {
    conv: Conv,
}

impl Downsample {
    pub fn load(l: &Loader, prefix: &str, channels: usize) -> Result<Self> {
        let params = Conv2dParams { stride: 2, padding: 0 };
        Ok(Self { conv: Conv::load(l, &format!("{prefix}.conv"), channels, channels, 3, params)? })
    }
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(gpu, &pad2d(gpu, x, [0, 1, 0, 1])?)
    }
}

/// `Upsample2D(use_conv=True)`: nearest 2× then a 3×3 convolution with padding 1.
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn load(l: &Loader, prefix: &str, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv::load(l, &format!("{prefix}.conv"), channels, channels, 3, SAME3)? })
    }
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(gpu, &upsample_nearest2x(gpu, x)?)
    }
}

/// Sizes of one encoder / decoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDims {
    /// Resnets in the block.
    pub layers: usize,
    /// Channels entering the block (its first resnet's input).
    pub cin: usize,
    /// Channels of every resnet output and of the resampler.
    pub cout: usize,
    /// Group-norm groups.
    pub groups: usize,
}

/// A VAE encoder / decoder block: resnets, then an optional 2× down- or upsampler.
pub struct ResampleBlock {
    resnets: Vec<ResnetBlock>,
    down: Option<Downsample>,
    up: Option<Upsample>,
}

impl ResampleBlock {
    fn resnets(l: &Loader, prefix: &str, dims: BlockDims) -> Result<Vec<ResnetBlock>> {
        let BlockDims { layers, cin, cout, groups } = dims;
        (0..layers)
            .map(|i| {
                let cin = if i == 0 { cin } else { cout };
                ResnetBlock::load(l, &format!("{prefix}.resnets.{i}"), cin, cout, groups)
            })
            .collect()
    }

    /// `DownEncoderBlock2D(num_layers, cin, cout, add_downsample)` at `prefix`.
    pub fn load_down(l: &Loader, prefix: &str, dims: BlockDims, downsample: bool) -> Result<Self> {
        Ok(Self {
            resnets: Self::resnets(l, prefix, dims)?,
            down: downsample.then(|| Downsample::load(l, &format!("{prefix}.downsamplers.0"), dims.cout)).transpose()?,
            up: None,
        })
    }

    /// `UpDecoderBlock2D(num_layers, cin, cout, add_upsample)` at `prefix`.
    pub fn load_up(l: &Loader, prefix: &str, dims: BlockDims, upsample: bool) -> Result<Self> {
        Ok(Self {
            resnets: Self::resnets(l, prefix, dims)?,
            down: None,
            up: upsample.then(|| Upsample::load(l, &format!("{prefix}.upsamplers.0"), dims.cout)).transpose()?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(gpu, &h)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(gpu, &h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(gpu, &h)?;
        }
        Ok(h)
    }
}

/// The mid-block attention: group norm, `to_q` / `to_k` / `to_v` over `[B, H·W, C]`, one head
/// of size C (scale `1/sqrt(C)`), `to_out.0`, back to `[B, C, H, W]`, plus the input, divided
/// by `rescale_output_factor` (1 in the VAE).
pub struct SpatialAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    rescale_output_factor: f32,
}

impl SpatialAttention {
    pub fn load(l: &Loader, prefix: &str, channels: usize, groups: usize) -> Result<Self> {
        let lin = |name: &str| Linear::load(l, &format!("{prefix}.{name}"), channels, channels);
        Ok(Self {
            norm: GroupNorm::load(l, &format!("{prefix}.group_norm"), channels, groups)?,
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: lin("to_out.0")?,
            rescale_output_factor: 1.0,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, c, n) = (s[0], s[1], s[2] * s[3]);
        let h = self.norm.forward(gpu, x, false)?;
        let h = transpose_last2(gpu, &h.reshape(&[b, c, n])?)?; // [B, N, C]
        let q = self.to_q.forward(gpu, &h)?;
        let k = self.to_k.forward(gpu, &h)?;
        let v = self.to_v.forward(gpu, &h)?;
        let o = single_head_attention(gpu, &q, &k, &v, 1.0 / (c as f32).sqrt())?;
        let o = self.to_out.forward(gpu, &o)?;
        let o = transpose_last2(gpu, &o)?.reshape(&s)?; // [B, C, H, W]
        let y = add(gpu, &o, x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(y)
        } else {
            scale(gpu, &y, 1.0 / self.rescale_output_factor)
        }
    }
}

/// `UNetMidBlock2D(num_layers=1)`: resnet, attention (unless `add_attention` is off), resnet.
pub struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    pub fn load(l: &Loader, prefix: &str, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::load(l, &format!("{prefix}.resnets.0"), channels, channels, groups)?,
            attention: if add_attention {
                Some(SpatialAttention::load(l, &format!("{prefix}.attentions.0"), channels, groups)?)
            } else {
                None
            },
            resnet1: ResnetBlock::load(l, &format!("{prefix}.resnets.1"), channels, channels, groups)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(gpu, x)?;
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?;
        }
        self.resnet1.forward(gpu, &h)
    }
}

/// `softmax(scale·q·kᵀ)·v` with one head for `q: [B, Nq, D]`, `k, v: [B, Nk, D]`: the fused
/// flash kernel when it supports D (at most `ops::attention::MAX_HEAD_DIM` and fitting the
/// device's workgroup memory), else [`attention_by_matmul`] (SD's VAE has D = C = 512).
pub fn single_head_attention(gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let d = q.shape().last().copied().unwrap_or(0);
    let caps = gpu.caps();
    if attention::tiles_for(d, caps.max_workgroup_storage, caps.max_invocations_per_workgroup).is_some() {
        attention::attention(gpu, q, k, v, AttentionOpts { heads: 1, scale: Some(scale), causal: false })
    } else {
        let limit = caps.max_storage_buffer_binding_size.min(caps.max_buffer_size);
        attention_by_matmul(gpu, q, k, v, scale, limit.min(MAX_SCORE_BYTES))
    }
}

/// The largest score block [`single_head_attention`] materialises at once.
pub const MAX_SCORE_BYTES: u64 = 256 << 20;

/// Exact single-head attention from `ops::matmul` and `ops::norm::softmax`, for any head size:
/// per chunk of queries, `S = q_c·kᵀ` (`[B, rows, Nk]`), `P = softmax(scale·S)`, `O_c = P·v`.
/// Chunks hold as many query rows as keep `S` within `max_score_bytes` (at least one row), so
/// the score block stays inside the device's storage-binding limit.
pub fn attention_by_matmul(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    max_score_bytes: u64,
) -> Result<Tensor> {
    const OP: &str = "attention_by_matmul";
    for t in [q, k, v] {
        t.expect_f32(OP)?;
    }
    let shapes = || format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape());
    if q.rank() != 3 || k.rank() != 3 || v.shape() != k.shape() || k.dim(0) != q.dim(0) || k.dim(2) != q.dim(2) {
        return Err(shape_err(OP, format!("needs q [B, Nq, D] and k, v [B, Nk, D]; got {}", shapes())));
    }
    let (b, nq, d) = (q.dim(0), q.dim(1), q.dim(2));
    let nk = k.dim(1);
    if b * nq * nk * d == 0 {
        return Err(shape_err(OP, format!("empty operand; got {}", shapes())));
    }
    let row_bytes = (b * nk * 4) as u64;
    let rows = ((max_score_bytes / row_bytes) as usize).clamp(1, nq);
    let block = |qc: &Tensor| -> Result<Tensor> {
        let s = matmul(gpu, qc, k, MatmulOpts { trans_b: true, bias: None, alpha: 1.0 })?;
        let p = softmax(gpu, &s, scale)?;
        matmul(gpu, &p, v, MatmulOpts::default())
    };
    if rows == nq {
        return block(q);
    }
    let out = Tensor::empty(gpu, &[b, nq, d])?;
    let f = 4u64;
    let mut start = 0;
    while start < nq {
        let len = rows.min(nq - start);
        let qc = Tensor::empty(gpu, &[b, len, d])?;
        for bi in 0..b {
            let src = ((bi * nq + start) * d) as u64 * f;
            gpu.copy(q.buffer(), src, qc.buffer(), (bi * len * d) as u64 * f, (len * d) as u64 * f);
        }
        let oc = block(&qc)?;
        for bi in 0..b {
            let dst = ((bi * nq + start) * d) as u64 * f;
            gpu.copy(oc.buffer(), (bi * len * d) as u64 * f, out.buffer(), dst, (len * d) as u64 * f);
        }
        start += len;
    }
    Ok(out)
}
