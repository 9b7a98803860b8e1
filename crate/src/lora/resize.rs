//! Reducing an adapter's rank by SVD (as kohya sd-scripts' `networks/resize_lora.py`): each
//! layer's ΔW (any algorithm with one: LoRA, LoCon, LoHa, LoKr, full) is decomposed
//! ([`super::spectrum::layer_svd`]) and its best rank-k approximation written as a kohya LoRA
//! layer.
//!
//! - The new rank is fixed, or chosen per layer: the smallest k keeping a fraction of the
//!   energy Σσ² ([`ResizeMethod::Energy`]), of the Frobenius norm (kohya `sv_fro`), of Σσ
//!   (`sv_cumulative`), or every σ ≥ σ₁ / ratio (`sv_ratio`); optionally capped.
//! - Scale: the output's `alpha` equals its rank (scale alpha / r = 1) and the factors carry
//!   √σ each, `lora_up = U_k·diag(√σ)`, `lora_down = diag(√σ)·V_kᵀ`, so ΔW_k = up · down. (kohya
//!   instead keeps the input's alpha / r and puts σ in `lora_up`; both give the same ΔW, the
//!   balanced split keeps both factors in f16's range.)
//! - Convolutions are flattened as kohya does (`[out, in·k·k]`); a 3×3 layer becomes LoCon
//!   (`lora_down [k, in, 3, 3]`, `lora_up [out, k, 1, 1]`).
//! - Per layer the report gives the old and new rank, the energy kept and the Frobenius error
//!   ‖ΔW − ΔW_k‖_F = √(Σ_{i>k} σᵢ²).
//! - IA³, norm diffs, DoRA magnitudes and full `diff_b` have no low-rank form; they are left
//!   out with a warning.
//! - Metadata: the input's, with `ss_network_dim` / `ss_network_alpha` set (`Dynamic` for the
//!   per-layer methods, as kohya writes), `ss_network_module = networks.lora`, LyCORIS's
//!   `ss_network_args`, PEFT's `lora_adapter_metadata` and the stale hashes removed, and a note
//!   of the resize in `ss_training_comment` and `loralab_resize`.

use super::spectrum::{layer_shape, layer_svd};
use super::{LayerShape, LoraFile, ModelLayers, Target};
use crate::error::{Error, Result};
use crate::io::safetensors_write::{SafetensorsWriter, WriteEntry};
use safetensors::Dtype;
use serde::Serialize;
use std::collections::BTreeMap;

/// How each layer's new rank is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResizeMethod {
    /// Exactly this rank (less where ΔW's rank is lower).
    Rank(usize),
    /// The smallest k with Σ_{i≤k} σᵢ² ≥ f · Σσᵢ² (0 < f ≤ 1).
    Energy(f64),
    /// kohya `sv_fro`: the smallest k with ‖ΔW_k‖_F ≥ f · ‖ΔW‖_F.
    Fro(f64),
    /// kohya `sv_cumulative`: the smallest k with Σ_{i≤k} σᵢ ≥ f · Σσᵢ.
    Cumulative(f64),
    /// kohya `sv_ratio`: every σᵢ ≥ σ₁ / r (r ≥ 1).
    Ratio(f64),
}

impl ResizeMethod {
    /// Checks the parameter's range.
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            ResizeMethod::Rank(r) => r >= 1,
            ResizeMethod::Energy(f) | ResizeMethod::Fro(f) | ResizeMethod::Cumulative(f) => f > 0.0 && f <= 1.0,
            ResizeMethod::Ratio(r) => r >= 1.0 && r.is_finite(),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "resize {}: a rank must be ≥ 1, an energy / Frobenius / cumulative fraction in (0, 1], a ratio ≥ 1",
                self.describe()
            )))
        }
    }

    /// `rank 16`, `energy 0.9`, …
    pub fn describe(&self) -> String {
        match *self {
            ResizeMethod::Rank(r) => format!("rank {r}"),
            ResizeMethod::Energy(f) => format!("energy {f}"),
            ResizeMethod::Fro(f) => format!("sv_fro {f}"),
            ResizeMethod::Cumulative(f) => format!("sv_cumulative {f}"),
            ResizeMethod::Ratio(r) => format!("sv_ratio {r}"),
        }
    }

    /// The new rank for singular values `s` (sorted, largest first), at least 1.
    pub fn choose(&self, s: &[f64]) -> usize {
        let n = s.len();
        let first = |pred: &dyn Fn(usize) -> bool| (1..=n).find(|&k| pred(k)).unwrap_or(n);
        let sq: f64 = s.iter().map(|x| x * x).sum();
        let sum: f64 = s.iter().sum();
        let prefix_sq = |k: usize| s[..k].iter().map(|x| x * x).sum::<f64>();
        let k = match *self {
            ResizeMethod::Rank(r) => r.min(n),
            ResizeMethod::Energy(f) => first(&|k| prefix_sq(k) >= f * sq * (1.0 - 1e-12)),
            ResizeMethod::Fro(f) => first(&|k| prefix_sq(k) >= f * f * sq * (1.0 - 1e-12)),
            ResizeMethod::Cumulative(f) => first(&|k| s[..k].iter().sum::<f64>() >= f * sum * (1.0 - 1e-12)),
            ResizeMethod::Ratio(r) => s.iter().filter(|&&x| x > 0.0 && x * r >= s[0]).count(),
        };
        k.max(1)
    }

    fn dynamic(&self) -> bool {
        !matches!(self, ResizeMethod::Rank(_))
    }
}

/// Options of [`resize`].
#[derive(Clone, Debug)]
pub struct ResizeOptions {
    pub method: ResizeMethod,
    /// An upper bound on every layer's new rank (kohya `--new_rank` with a dynamic method).
    pub max_rank: Option<usize>,
    /// Storage of the written factors: F16 (default), BF16 or F32.
    pub dtype: Dtype,
}

impl ResizeOptions {
    pub fn new(method: ResizeMethod) -> Self {
        ResizeOptions { method, max_rank: None, dtype: Dtype::F16 }
    }

    /// Sets the storage by name: `f16`, `bf16` or `f32`.
    pub fn set_dtype(&mut self, name: &str) -> Result<()> {
        self.dtype = match name {
            "f16" => Dtype::F16,
            "bf16" => Dtype::BF16,
            "f32" => Dtype::F32,
            other => return Err(Error::Invalid(format!("storage `{other}`: expected f16, bf16 or f32"))),
        };
        Ok(())
    }
}

/// One resized layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerResize {
    /// The kohya key prefix written (`lora_unet_down_blocks_0_…`).
    pub name: String,
    /// Our module path.
    pub module: String,
    pub algorithm: &'static str,
    /// `[out, in]` or `[out, in, k, k]`.
    pub shape: Vec<usize>,
    /// The input's rank (`None` for full diffs).
    pub old_rank: Option<usize>,
    pub new_rank: usize,
    /// Fraction of Σσ² kept.
    pub energy: f64,
    /// ‖ΔW − ΔW_k‖_F.
    pub error: f64,
    /// ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F.
    pub relative_error: f64,
}

/// The outcome of [`resize`]: the new tensors (written by [`Resized::write`]) and the report.
#[derive(Clone, Debug, Serialize)]
pub struct Resized {
    pub layers: Vec<LayerResize>,
    /// Layers or parts left out (IA³, norm diffs, DoRA magnitudes, bias diffs).
    pub warnings: Vec<String>,
    /// Trained values before (every tensor of the resized layers) and after.
    pub old_params: usize,
    pub new_params: usize,
    #[serde(skip)]
    pub metadata: BTreeMap<String, String>,
    /// `(name, shape, values)` in writing order.
    #[serde(skip)]
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    #[serde(skip)]
    pub dtype: Dtype,
}

impl Resized {
    /// Writes the kohya safetensors file.
    pub fn write<W: std::io::Write>(&self, out: W, name: &str) -> Result<W> {
        let entries = self.tensors.iter().map(|(n, s, _)| WriteEntry::new(n.clone(), self.dtype, s)).collect();
        let mut w = SafetensorsWriter::new(out, name, entries, &self.metadata)?;
        for (n, _, v) in &self.tensors {
            w.write_f32(n, v)?;
        }
        w.finish()
    }

    /// The file's bytes.
    pub fn to_bytes(&self, name: &str) -> Result<Vec<u8>> {
        self.write(Vec::new(), name)
    }
}

/// The kohya key prefix of a module: `lora_unet_` / `lora_te_` and the path with `_` for `.`.
pub fn kohya_key(target: Target, module: &str) -> String {
    let prefix = match target {
        Target::Unet => "lora_unet_",
        Target::TextEncoder => "lora_te_",
    };
    format!("{prefix}{}", module.replace('.', "_"))
}

/// Resizes every layer of `file` that has a ΔW. `model` (optional) gives exact layer shapes
/// where the file alone leaves a kernel size open (a flattened LoHa / LoKr convolution).
pub fn resize(file: &LoraFile, opts: &ResizeOptions, model: Option<&ModelLayers>) -> Result<Resized> {
    opts.method.validate()?;
    if !matches!(opts.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(Error::Invalid(format!("resize: storage {} (expected F16, BF16 or F32)", opts.dtype)));
    }
    let with_file = |e: Error| match e {
        Error::Format { tensor, message, .. } => Error::Format { file: file.file.clone(), tensor, message },
        other => other,
    };
    let mut out = Resized {
        layers: vec![],
        warnings: vec![],
        old_params: 0,
        new_params: 0,
        metadata: BTreeMap::new(),
        tensors: vec![],
        dtype: opts.dtype,
    };
    let mut skipped: Vec<&str> = vec![];
    for l in &file.layers {
        let Some(shape) = layer_shape(l, model) else {
            skipped.push(&l.key);
            continue;
        };
        // The new rank from the singular values; vectors are formed for those kept only.
        let choose = |s: &[f64]| {
            let k = opts.method.choose(s);
            opts.max_rank.map_or(k, |m| k.min(m.max(1)))
        };
        let svd = layer_svd(l, &choose).map_err(with_file)?;
        let all = &svd.s;
        let k = choose(all).min(svd.u.cols).max(1);
        let total: f64 = all.iter().map(|s| s * s).sum();
        let kept: f64 = all.iter().take(k).map(|s| s * s).sum();
        let error = (total - kept).max(0.0).sqrt();
        let (rows, cols) = (shape.out_dim(), shape.cols());
        let q = svd.u.cols;
        let mut up = vec![0f32; rows * k];
        let mut down = vec![0f32; k * cols];
        for r in 0..k.min(q) {
            let root = svd.s[r].sqrt();
            for i in 0..rows {
                up[i * k + r] = (svd.u.data[i * q + r] * root) as f32;
            }
            for j in 0..cols {
                down[r * cols + j] = (svd.v.data[j * q + r] * root) as f32;
            }
        }
        let name = kohya_key(l.target, &l.module);
        let four_d = matches!(shape, LayerShape::Conv { .. });
        let (down_shape, up_shape) = match shape {
            LayerShape::Conv { in_channels, kernel, .. } => (vec![k, in_channels, kernel, kernel], vec![rows, k, 1, 1]),
            _ => (vec![k, cols], vec![rows, k]),
        };
        debug_assert!(four_d == (down_shape.len() == 4));
        out.tensors.push((format!("{name}.alpha"), vec![], vec![k as f32]));
        out.tensors.push((format!("{name}.lora_down.weight"), down_shape, down));
        out.tensors.push((format!("{name}.lora_up.weight"), up_shape, up));
        out.old_params += super::params::adapter_values(&l.delta);
        out.new_params += k * (rows + cols);
        if l.dora.is_some() {
            out.warnings.push(format!("{}: its DoRA magnitude has no LoRA form and was left out (ΔW kept)", l.key));
        }
        if l.delta.delta_bias().is_some() {
            out.warnings.push(format!("{}: its bias diff has no LoRA form and was left out", l.key));
        }
        out.layers.push(LayerResize {
            name,
            module: l.module.clone(),
            algorithm: l.delta.algorithm().name(),
            shape: shape.weight_shape(),
            old_rank: l.delta.rank(),
            new_rank: k,
            energy: if total > 0.0 { kept / total } else { 1.0 },
            error,
            relative_error: if total > 0.0 { error / total.sqrt() } else { 0.0 },
        });
    }
    if out.layers.is_empty() {
        return Err(Error::Format {
            file: file.file.clone(),
            tensor: None,
            message: "has no layer with a weight delta to resize (IA³ and norm diffs have no low-rank form)".into(),
        });
    }
    if !skipped.is_empty() {
        out.warnings.push(format!(
            "{} layers without a ΔW (IA³ / norm diffs) were left out, e.g. `{}`",
            skipped.len(),
            skipped[0]
        ));
    }
    out.metadata = metadata(file, opts, &out);
    Ok(out)
}

fn metadata(file: &LoraFile, opts: &ResizeOptions, r: &Resized) -> BTreeMap<String, String> {
    let mut m = file.metadata.raw.clone();
    for k in ["ss_network_args", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"] {
        m.remove(k);
    }
    let max = r.layers.iter().map(|l| l.new_rank).max().unwrap_or(0);
    let (dim, alpha) = if opts.method.dynamic() {
        ("Dynamic".to_string(), "Dynamic".to_string())
    } else {
        (max.to_string(), max.to_string())
    };
    m.insert("ss_network_dim".into(), dim);
    m.insert("ss_network_alpha".into(), alpha);
    m.insert("ss_network_module".into(), "networks.lora".into());
    let old: Vec<String> = {
        let mut ranks: Vec<usize> = r.layers.iter().filter_map(|l| l.old_rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks.iter().map(|r| r.to_string()).collect()
    };
    let cap = opts.max_rank.map(|c| format!(", at most rank {c}")).unwrap_or_default();
    let note = format!(
        "resized by SVD to {}{cap} from {} (ranks {}); alpha = rank",
        opts.method.describe(),
        file.format.name(),
        if old.is_empty() { "full".to_string() } else { old.join(", ") }
    );
    let comment = match file.metadata.raw.get("ss_training_comment").filter(|c| !c.trim().is_empty() && c.as_str() != "None") {
        Some(c) => format!("{note}; {c}"),
        None => note.clone(),
    };
    m.insert("ss_training_comment".into(), comment);
    m.insert("loralab_resize".into(), note);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_choice() {
        let s = [4.0, 2.0, 1.0, 1.0];
        // Σσ² = 22: 16/22 = .727, 20/22 = .909, 21/22 = .955.
        assert_eq!(ResizeMethod::Rank(2).choose(&s), 2);
        assert_eq!(ResizeMethod::Rank(9).choose(&s), 4);
        assert_eq!(ResizeMethod::Energy(0.9).choose(&s), 2);
        assert_eq!(ResizeMethod::Energy(0.95).choose(&s), 3);
        assert_eq!(ResizeMethod::Energy(1.0).choose(&s), 4);
        // Frobenius: √(16/22) = .853.
        assert_eq!(ResizeMethod::Fro(0.85).choose(&s), 1);
        assert_eq!(ResizeMethod::Fro(0.9).choose(&s), 2);
        // Σσ = 8: 4/8, 6/8, 7/8.
        assert_eq!(ResizeMethod::Cumulative(0.75).choose(&s), 2);
        assert_eq!(ResizeMethod::Cumulative(0.8).choose(&s), 3);
        assert_eq!(ResizeMethod::Ratio(2.0).choose(&s), 2);
        assert_eq!(ResizeMethod::Ratio(4.0).choose(&s), 4);
        assert_eq!(ResizeMethod::Energy(0.5).choose(&[0.0, 0.0]), 1);
        assert!(ResizeMethod::Energy(1.5).validate().is_err());
        assert!(ResizeMethod::Rank(0).validate().is_err());
        assert!(ResizeMethod::Ratio(0.5).validate().is_err());
    }
}
