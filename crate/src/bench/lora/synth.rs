//! Synthetic kohya-style LoRA adapters on the layers real Stable Diffusion 1.x LoRAs adapt:
//! every attention projection (`to_q`, `to_k`, `to_v`, `to_out.0` of `attn1` and `attn2`), the
//! feed-forward `ff.net.0.proj` / `ff.net.2` and the transformers' `proj_in` / `proj_out` in the
//! UNet; `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` of every text-encoder layer.
//! The layers are taken from a loaded model ([`VisitLayers`]), so names and shapes are the
//! model's own.
//!
//! Factors are seeded normal values: `down` with standard deviation `1/√in`, `up` with 0.01
//! (trained LoRAs end up with a small `up`), so outputs stay finite and close to the base's.

use crate::error::Result;
use crate::io::safetensors_write::{SafetensorsWriter, WriteEntry};
use crate::lora::{Algorithm, BaseModel, Delta, Format, HostTensor, LayerAdapter, LoraFile, Target};
use crate::nn::{LayerMut, VisitLayers};
use crate::rng::Rng;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Write;

/// Module-path endings of the UNet layers a typical SD1.x LoRA adapts.
pub const UNET_TARGETS: &[&str] = &[".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"];

/// Module-path endings of the text-encoder layers a kohya LoRA adapts (inside `encoder.layers.N`).
pub const TEXT_ENCODER_TARGETS: &[&str] = &[".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"];

/// Standard deviation of the `up` factor.
const UP_STD: f32 = 0.01;

/// One adapted layer: module path and weight shape `[n (out), k (in)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetLayer {
    pub target: Target,
    pub module: String,
    pub n: usize,
    pub k: usize,
}

impl TargetLayer {
    /// The kohya key prefix (`lora_unet_down_blocks_0_…_to_q`, `lora_te_text_model_…_q_proj`).
    pub fn kohya_key(&self) -> String {
        let prefix = match self.target {
            Target::Unet => "lora_unet_",
            Target::TextEncoder => "lora_te_",
        };
        format!("{prefix}{}", self.module.replace('.', "_"))
    }

    /// Low-rank parameters at rank `r`.
    pub fn params(&self, r: usize) -> usize {
        r * (self.n + self.k)
    }
}

/// The linear layers of `model` whose module path ends with one of `endings` (and, for the text
/// encoder, lies inside an encoder layer), in the model's order.
pub fn target_layers(model: &mut dyn VisitLayers, target: Target) -> Vec<TargetLayer> {
    let endings = match target {
        Target::Unet => UNET_TARGETS,
        Target::TextEncoder => TEXT_ENCODER_TARGETS,
    };
    let mut out = vec![];
    model.visit_layers(&mut |layer| {
        if let LayerMut::Linear(l) = layer {
            let inside = target == Target::Unet || l.name.contains(".encoder.layers.");
            if inside && endings.iter().any(|e| l.name.ends_with(e)) {
                out.push(TargetLayer { target, module: l.name.clone(), n: l.out_features(), k: l.in_features() });
            }
        }
    });
    out
}

/// The two factors of one layer: `down [r, k]` and `up [n, r]`.
fn factors(rng: &mut Rng, layer: &TargetLayer, r: usize) -> (Vec<f32>, Vec<f32>) {
    let down_std = 1.0 / (layer.k.max(1) as f32).sqrt();
    let down = rng.normal_vec(r * layer.k).into_iter().map(|v| v * down_std).collect();
    let up = rng.normal_vec(layer.n * r).into_iter().map(|v| v * UP_STD).collect();
    (down, up)
}

/// An in-memory kohya LoRA (rank `r`, `alpha`) on `layers`, factors seeded by `seed`.
pub fn lora_file(name: &str, layers: &[TargetLayer], r: usize, alpha: f32, seed: u64) -> Result<LoraFile> {
    let mut rng = Rng::new(seed);
    let mut adapters = Vec::with_capacity(layers.len());
    for l in layers {
        let (down, up) = factors(&mut rng, l, r);
        adapters.push(LayerAdapter {
            target: l.target,
            module: l.module.clone(),
            key: l.kohya_key(),
            delta: Delta::LowRank {
                down: HostTensor::new(vec![r, l.k], down)?,
                up: HostTensor::new(vec![l.n, r], up)?,
                mid: None,
                scale: alpha / r as f32,
            },
            dora: None,
            alpha: Some(alpha),
        });
    }
    Ok(LoraFile {
        file: name.to_string(),
        format: Format::Kohya,
        algorithms: vec![Algorithm::Lora],
        layers: adapters,
        metadata: Default::default(),
        unrecognised: vec![],
        other_components: vec![],
        base: BaseModel::Sd1,
        base_reason: None,
        bytes: 0,
        dtypes: vec!["F32".into()],
        warnings: vec![],
        embeddings: vec![],
    })
}

/// Writes a kohya-format LoRA file (f16 tensors, `networks.lora` metadata) on `layers` to
/// `out`, one tensor at a time. Layers in `conv_1x1` are written as 1×1 convolutions
/// (`[r, in, 1, 1]` / `[out, r, 1, 1]`), as kohya writes SD1.x's `proj_in` / `proj_out`.
/// Returns the bytes written.
pub fn write_kohya<W: Write>(
    out: W,
    name: &str,
    layers: &[TargetLayer],
    conv_1x1: &dyn Fn(&TargetLayer) -> bool,
    r: usize,
    alpha: f32,
    seed: u64,
) -> Result<W> {
    let mut entries = Vec::with_capacity(3 * layers.len());
    for l in layers {
        let key = l.kohya_key();
        let (down, up): (Vec<usize>, Vec<usize>) =
            if conv_1x1(l) { (vec![r, l.k, 1, 1], vec![l.n, r, 1, 1]) } else { (vec![r, l.k], vec![l.n, r]) };
        entries.push(WriteEntry::new(format!("{key}.alpha"), Dtype::F16, &[]));
        entries.push(WriteEntry::new(format!("{key}.lora_down.weight"), Dtype::F16, &down));
        entries.push(WriteEntry::new(format!("{key}.lora_up.weight"), Dtype::F16, &up));
    }
    let metadata: BTreeMap<String, String> = [
        ("ss_network_module", "networks.lora".to_string()),
        ("ss_network_dim", r.to_string()),
        ("ss_network_alpha", alpha.to_string()),
        ("ss_base_model_version", "sd_v1".to_string()),
        ("ss_output_name", "loralab-bench".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut w = SafetensorsWriter::new(out, name, entries, &metadata)?;
    let mut rng = Rng::new(seed);
    for l in layers {
        let key = l.kohya_key();
        let (down, up) = factors(&mut rng, l, r);
        w.write_f32(&format!("{key}.alpha"), &[alpha])?;
        w.write_f32(&format!("{key}.lora_down.weight"), &down)?;
        w.write_f32(&format!("{key}.lora_up.weight"), &up)?;
    }
    w.finish()
}

/// The size in bytes of [`write_kohya`]'s tensor data (f16) for `layers` at rank `r`.
pub fn kohya_data_bytes(layers: &[TargetLayer], r: usize) -> u64 {
    layers.iter().map(|l| 2 * (l.params(r) as u64 + 1)).sum()
}

