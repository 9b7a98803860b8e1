//! Elementwise activations and arithmetic (`shaders/elementwise.wgsl`).

use super::{groups, Params};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "elementwise.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("elementwise.wgsl"),
    flag_axes: &[],
    values: &[],
    entries: &["unary", "binary", "geglu"],
    top_level: true,
}];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Copy,
    Scale(f32),
    Silu,
    /// Exact GELU (erf), as `torch.nn.functional.gelu(x)`.
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    AddScalar(f32),
}

impl Unary {
    fn code(self) -> (u32, f32) {
        match self {
            Unary::Copy => (0, 0.0),
            Unary::Scale(a) => (1, a),
            Unary::Silu => (2, 0.0),
            Unary::Gelu => (3, 0.0),
            Unary::GeluTanh => (4, 0.0),
            Unary::QuickGelu => (5, 0.0),
            Unary::AddScalar(a) => (6, a),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Binary {
    Add,
    Mul,
    Sub,
    /// `a + alpha·b`
    AddScaled(f32),
}

impl Binary {
    fn code(self) -> (u32, f32) {
        match self {
            Binary::Add => (0, 0.0),
            Binary::Mul => (1, 0.0),
            Binary::Sub => (2, 0.0),
            Binary::AddScaled(a) => (3, a),
        }
    }
}

/// `y = f(x)`, elementwise.
pub fn unary(gpu: &Gpu, x: &Tensor, op: Unary) -> Result<Tensor> {
    x.expect_f32("unary")?;
    let y = Tensor::empty(gpu, x.shape())?;
    let (code, alpha) = op.code();
    let n = x.numel();
    gpu.dispatch(
        SHADER,
        "unary",
        &Defines::new(),
        &Params::new().u(n).u(1).u(1).u(code as usize).f(alpha).0,
        &[(1, x.buffer()), (3, y.buffer())],
        gpu.grid(groups(n, 256)),
    )?;
    Ok(y)
}

/// How `b` repeats over `a`: (inner, m). `b`'s shape, right-aligned to `a`'s, must equal `a`
/// on one contiguous run of dimensions and be 1 elsewhere.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<(usize, usize)> {
    if b.len() > a.len() {
        return None;
    }
    let off = a.len() - b.len();
    let mut bb = vec![1usize; off];
    bb.extend_from_slice(b);
    let m: usize = bb.iter().product();
    if m == 0 {
        return None;
    }
    let matching: Vec<usize> = (0..a.len()).filter(|&i| bb[i] != 1).collect();
    if matching.iter().any(|&i| bb[i] != a[i]) {
        return None;
    }
    let (first, last) = match (matching.first(), matching.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Some((a.iter().product::<usize>().max(1), 1)), // scalar b
    };
    // Dims of size 1 in `a` inside the run are fine; dims where b is 1 but a is not are gaps.
    if (first..=last).any(|i| bb[i] == 1 && a[i] != 1) {
        return None;
    }
    Some((a[last + 1..].iter().product(), m))
}

/// `y = a (op) b` with `b` broadcast as described in [`broadcast`].
pub fn binary(gpu: &Gpu, a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
    a.expect_f32("binary")?;
    b.expect_f32("binary")?;
    let (inner, m) = broadcast(a.shape(), b.shape()).ok_or_else(|| {
        shape_err("binary", format!("{:?} does not broadcast over {:?}", b.shape(), a.shape()))
    })?;
    let y = Tensor::empty(gpu, a.shape())?;
    let (code, alpha) = op.code();
    let n = a.numel();
    gpu.dispatch(
        SHADER,
        "binary",
        &Defines::new(),
        &Params::new().u(n).u(inner).u(m).u(code as usize).f(alpha).0,
        &[(1, a.buffer()), (2, b.buffer()), (3, y.buffer())],
        gpu.grid(groups(n, 256)),
    )?;
    Ok(y)
}

pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, Binary::Add)
}

pub fn mul(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, Binary::Mul)
}

pub fn scale(gpu: &Gpu, x: &Tensor, s: f32) -> Result<Tensor> {
    unary(gpu, x, Unary::Scale(s))
}

pub fn silu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    unary(gpu, x, Unary::Silu)
}

/// diffusers' GEGLU activation on `x: [..., 2D]`: `hidden, gate = x.chunk(2, -1)`,
/// `hidden · gelu(gate)` (exact erf GELU), giving `[..., D]`.
pub fn geglu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    x.expect_f32("geglu")?;
    let s = x.shape();
    let d2 = s.last().copied().unwrap_or(0);
    if d2 == 0 || !d2.is_multiple_of(2) {
        return Err(shape_err("geglu", format!("x {s:?} needs an even, non-empty last dim")));
    }
    let mut out = s.to_vec();
    *out.last_mut().unwrap() = d2 / 2;
    let y = Tensor::empty(gpu, &out)?;
    let n = y.numel();
    gpu.dispatch(
        SHADER,
        "geglu",
        &Defines::new(),
        &Params::new().u(n).u(d2 / 2).u(1).u(0).f(0.0).0,
        &[(1, x.buffer()), (3, y.buffer())],
        gpu.grid(groups(n, 256)),
    )?;
    Ok(y)
}

/// CPU references (f64 arithmetic where it matters).
pub mod reference {
    use super::{Binary, Unary};

    pub fn erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.28-quality is not enough for a reference: use a series /
        // continued fraction with ~1e-15 accuracy.
        let z = x.abs();
        let r = if z < 3.0 {
            let mut sum = z;
            let mut term = z;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -z * z / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz) for large z.
            let mut f = z;
            for k in (1..60).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            1.0 - (-z * z).exp() / (f * std::f64::consts::PI.sqrt())
        };
        r.copysign(x)
    }

    pub fn unary(x: f32, op: Unary) -> f32 {
        let x64 = x as f64;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        (match op {
            Unary::Copy => x64,
            Unary::Scale(a) => x64 * a as f64,
            Unary::Silu => x64 * sig(x64),
            Unary::Gelu => 0.5 * x64 * (1.0 + erf(x64 / std::f64::consts::SQRT_2)),
            Unary::GeluTanh => {
                0.5 * x64
                    * (1.0 + (0.7978845608028654 * (x64 + 0.044715 * x64.powi(3))).tanh())
            }
            Unary::QuickGelu => x64 * sig(1.702 * x64),
            Unary::AddScalar(a) => x64 + a as f64,
        }) as f32
    }

    /// GEGLU over rows of `2·d` values.
    pub fn geglu(x: &[f32], d: usize) -> Vec<f32> {
        x.chunks(2 * d)
            .flat_map(|r| (0..d).map(move |j| r[j] * unary(r[d + j], Unary::Gelu)))
            .collect()
    }

    pub fn binary(a: &[f32], b: &[f32], inner: usize, m: usize, op: Binary) -> Vec<f32> {
        a.iter()
            .enumerate()
            .map(|(i, &x)| {
                let v = b[(i / inner) % m];
                match op {
                    Binary::Add => x + v,
                    Binary::Mul => x * v,
                    Binary::Sub => x - v,
                    Binary::AddScaled(al) => x + al * v,
                }
            })
            .collect()
    }
}
