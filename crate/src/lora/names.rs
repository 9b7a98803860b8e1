//! Adapter key names → (target, engine module path, tensor part).
//!
//! Key layouts understood (module paths are the diffusers ones the engine loads under):
//! - kohya / LyCORIS: `lora_unet_<module with '_' for '.'>.<part>`, `lora_te_…` (SD1/2 text
//!   encoder), `lora_te1_…` / `lora_te2_…` (SDXL's two text encoders). The UNet module may use
//!   diffusers names (`down_blocks_0_attentions_0_…`) or the original CompVis ones
//!   (`input_blocks_4_1_…`), which go through the single-file checkpoint mapping
//!   ([`compvis_to_diffusers`]) with the model's block numbering.
//! - ComfyUI: `diffusion_model.<CompVis dotted path>.<part>`.
//! - diffusers / PEFT: `unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`,
//!   `….lora_magnitude_vector`, `….alpha`; PEFT's own `base_model.model.<module>.…`; no prefix.
//! - legacy diffusers attention processors: `….attn1.processor.to_q_lora.down.weight`,
//!   `….self_attn.to_q_lora.up.weight`, `….mlp.fc1.lora_linear_layer.down.weight`,
//!   `….lora.down.weight`.
//!
//! Text encoder modules are given the `text_model.` prefix when a file omits it (files written
//! with transformers 5 do).

use super::Target;
use crate::model::checkpoint::{compvis_to_diffusers, Component, Mapped};
use crate::model::config::PipelineConfig;
use serde::Serialize;

/// One tensor's role in an adapter layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Part {
    Down,
    Up,
    Mid,
    Alpha,
    DoraScale,
    Magnitude,
    HadaW1a,
    HadaW1b,
    HadaW2a,
    HadaW2b,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1a,
    LokrW1b,
    LokrW2,
    LokrW2a,
    LokrW2b,
    LokrT1,
    LokrT2,
    Ia3Weight,
    OnInput,
    Diff,
    DiffB,
    WNorm,
    BNorm,
    /// PEFT `lora_bias`: a bias on `lora_B` (not applied by this engine).
    UpBias,
}

/// Parts written after a kohya module name (`lora_unet_x.<part>`) or at the end of a dotted key.
const PARTS: [(&str, Part); 30] = [
    ("lora_down.weight", Part::Down),
    ("lora_up.weight", Part::Up),
    ("lora_mid.weight", Part::Mid),
    ("lora_A.weight", Part::Down),
    ("lora_B.weight", Part::Up),
    ("lora_B.bias", Part::UpBias),
    ("lora_magnitude_vector.weight", Part::Magnitude),
    ("lora_magnitude_vector", Part::Magnitude),
    ("alpha", Part::Alpha),
    ("dora_scale", Part::DoraScale),
    ("hada_w1_a", Part::HadaW1a),
    ("hada_w1_b", Part::HadaW1b),
    ("hada_w2_a", Part::HadaW2a),
    ("hada_w2_b", Part::HadaW2b),
    ("hada_t1", Part::HadaT1),
    ("hada_t2", Part::HadaT2),
    ("lokr_w1", Part::LokrW1),
    ("lokr_w1_a", Part::LokrW1a),
    ("lokr_w1_b", Part::LokrW1b),
    ("lokr_w2", Part::LokrW2),
    ("lokr_w2_a", Part::LokrW2a),
    ("lokr_w2_b", Part::LokrW2b),
    ("lokr_t1", Part::LokrT1),
    ("lokr_t2", Part::LokrT2),
    ("on_input", Part::OnInput),
    ("diff", Part::Diff),
    ("diff_b", Part::DiffB),
    ("w_norm", Part::WNorm),
    ("b_norm", Part::BNorm),
    ("weight", Part::Ia3Weight),
];

/// Which component a key prefix names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyTarget {
    Engine(Target),
    /// A component the engine does not have (SDXL's second text encoder).
    Other,
}

/// How a key was written, for format detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum KeyStyle {
    Kohya,
    Dotted,
    Legacy,
}

/// A key split into its module and part.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParsedKey {
    pub target: KeyTarget,
    /// Engine module path (or, when the name cannot be mapped, the file's path with dots).
    pub module: String,
    /// The key without its part, as written: identifies the layer in the file.
    pub prefix: String,
    /// The module path as the file writes it, without a component prefix (what PEFT's
    /// `rank_pattern` keys are matched against).
    pub file_module: String,
    pub part: Part,
    pub style: KeyStyle,
}

/// The base model family a file is for, as far as its keys, shapes and metadata say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseModel {
    Sd1,
    Sd2,
    Sdxl,
    Unknown,
}

impl BaseModel {
    /// A human name.
    pub fn describe(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "Stable Diffusion 1.x",
            BaseModel::Sd2 => "Stable Diffusion 2.x",
            BaseModel::Sdxl => "SDXL",
            BaseModel::Unknown => "an unknown base model",
        }
    }
}

/// Names that contain `_` themselves, as their `_`-separated words (the longest one that
/// matches at a position is taken, so `conv_norm_out` wins over shorter names).
const COMPOUNDS: [&[&str]; 42] = [
    &["final", "layer", "norm"],
    &["conv", "norm", "out"],
    &["time", "emb", "proj"],
    &["down", "blocks"],
    &["up", "blocks"],
    &["mid", "block"],
    &["transformer", "blocks"],
    &["to", "q"],
    &["to", "k"],
    &["to", "v"],
    &["to", "out"],
    &["proj", "in"],
    &["proj", "out"],
    &["conv", "shortcut"],
    &["time", "embedding"],
    &["linear", "1"],
    &["linear", "2"],
    &["conv", "in"],
    &["conv", "out"],
    &["add", "embedding"],
    &["add", "k", "proj"],
    &["add", "v", "proj"],
    &["input", "blocks"],
    &["output", "blocks"],
    &["middle", "block"],
    &["in", "layers"],
    &["out", "layers"],
    &["emb", "layers"],
    &["skip", "connection"],
    &["time", "embed"],
    &["label", "emb"],
    &["text", "model"],
    &["self", "attn"],
    &["q", "proj"],
    &["k", "proj"],
    &["v", "proj"],
    &["out", "proj"],
    &["layer", "norm1"],
    &["layer", "norm2"],
    &["token", "embedding"],
    &["position", "embedding"],
    &["text", "projection"],
];

/// A kohya module name with `_` for every `.` back to its dotted path:
/// `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` →
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`. Words of names that
/// contain `_` themselves (`to_q`, `proj_in`, `time_emb_proj`, `layer_norm1`, …) stay joined.
pub fn kohya_to_dotted(name: &str) -> String {
    let words: Vec<&str> = name.split('_').collect();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < words.len() {
        let rest = &words[i..];
        let n = COMPOUNDS.iter().filter(|c| rest.starts_with(c)).map(|c| c.len()).max().unwrap_or(1);
        for (k, w) in rest[..n].iter().enumerate() {
            out.push_str(match (i, k) {
                (0, 0) => "",
                (_, 0) => ".",
                _ => "_",
            });
            out.push_str(w);
        }
        i += n;
    }
    out
}

/// Maps a dotted UNet path in CompVis names (`input_blocks.4.1.proj_in`) to the diffusers
/// module with the configuration's block numbering; `None` when the mapping has no such module.
fn compvis_unet_module(dotted: &str, cfg: &PipelineConfig) -> Option<String> {
    let key = format!("model.diffusion_model.{dotted}.weight");
    match compvis_to_diffusers(&key, cfg) {
        Ok(Some(Mapped::Param { component: Component::Unet, name, .. })) => {
            name.strip_suffix(".weight").map(str::to_string)
        }
        _ => None,
    }
}

const COMPVIS_ROOTS: [&str; 5] = ["input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."];

/// A UNet path in either naming → the engine's (diffusers) module path.
fn unet_module(dotted: &str, cfg: &PipelineConfig) -> String {
    if COMPVIS_ROOTS.iter().any(|r| dotted.starts_with(r)) {
        if let Some(m) = compvis_unet_module(dotted, cfg) {
            return m;
        }
    }
    dotted.to_string()
}

/// A text encoder path with the `text_model.` prefix the engine uses.
fn text_module(dotted: &str) -> String {
    if dotted.starts_with("text_model.") {
        dotted.to_string()
    } else {
        format!("text_model.{dotted}")
    }
}

fn part_of(s: &str) -> Option<Part> {
    PARTS.iter().find(|(name, _)| *name == s).map(|&(_, p)| p)
}

/// Splits `key` into module and part. `has_key` tells whether another key exists (an IA³
/// `weight` is recognised by its `on_input` sibling). `None`: not an adapter key.
pub(crate) fn parse_key(key: &str, cfg: &PipelineConfig, has_key: &dyn Fn(&str) -> bool) -> Option<ParsedKey> {
    const KOHYA: [(&str, KeyTarget); 4] = [
        ("lora_unet_", KeyTarget::Engine(Target::Unet)),
        ("lora_te_", KeyTarget::Engine(Target::TextEncoder)),
        ("lora_te1_", KeyTarget::Engine(Target::TextEncoder)),
        ("lora_te2_", KeyTarget::Other),
    ];
    for (prefix, target) in KOHYA {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        let (name, part) = rest.split_once('.')?;
        let part = part_of(part)?;
        let dotted = kohya_to_dotted(name);
        let module = match target {
            KeyTarget::Engine(Target::Unet) => unet_module(&dotted, cfg),
            KeyTarget::Engine(Target::TextEncoder) => text_module(&dotted),
            KeyTarget::Other => dotted.clone(),
        };
        let file_module = dotted;
        let prefix = format!("{prefix}{name}");
        return Some(ParsedKey { target, module, prefix, file_module, part, style: KeyStyle::Kohya });
    }
    parse_dotted(key, cfg, has_key)
}

fn parse_dotted(key: &str, cfg: &PipelineConfig, has_key: &dyn Fn(&str) -> bool) -> Option<ParsedKey> {
    // Legacy diffusers parts first: their module part carries the marker. An IA³ vector is
    // `x.weight` next to `x.on_input`.
    let ia3 = key.strip_suffix(".weight").filter(|l| has_key(&format!("{l}.on_input")));
    let (layer, prefix, part, style) = if let Some((layer, prefix, part)) = legacy_split(key) {
        (layer, prefix, part, KeyStyle::Legacy)
    } else if let Some(l) = ia3 {
        (l.to_string(), l.to_string(), Part::Ia3Weight, KeyStyle::Dotted)
    } else {
        let (layer, part) = PARTS.iter().filter(|(_, p)| *p != Part::Ia3Weight).find_map(|&(name, p)| {
            key.strip_suffix(name).and_then(|l| l.strip_suffix('.')).map(|l| (l.to_string(), p))
        })?;
        (layer.clone(), layer, part, KeyStyle::Dotted)
    };
    let prefix_of_module = |l: &str| -> Option<(KeyTarget, String)> {
        const ROOTS: [(&str, Option<Target>); 6] = [
            ("unet.", Some(Target::Unet)),
            ("text_encoder.", Some(Target::TextEncoder)),
            ("text_encoder_2.", None),
            ("diffusion_model.", Some(Target::Unet)),
            ("text_encoders.clip_l.transformer.", Some(Target::TextEncoder)),
            ("base_model.model.", None),
        ];
        for (root, t) in ROOTS {
            if let Some(m) = l.strip_prefix(root) {
                let target = match (root, t) {
                    ("text_encoder_2.", _) => return Some((KeyTarget::Other, m.to_string())),
                    (_, Some(t)) => t,
                    (_, None) => guess_target(m)?,
                };
                return Some((KeyTarget::Engine(target), m.to_string()));
            }
        }
        guess_target(l).map(|t| (KeyTarget::Engine(t), l.to_string()))
    };
    let (target, file_module) = prefix_of_module(&layer)?;
    let module = match target {
        KeyTarget::Engine(Target::Unet) => unet_module(&file_module, cfg),
        KeyTarget::Engine(Target::TextEncoder) => text_module(&file_module),
        KeyTarget::Other => file_module.clone(),
    };
    Some(ParsedKey { target, module, prefix, file_module, part, style })
}

/// Which component an unprefixed module path belongs to.
fn guess_target(m: &str) -> Option<Target> {
    const TEXT: [&str; 4] = ["text_model.", "encoder.layers.", "embeddings.", "final_layer_norm"];
    const UNET: [&str; 13] = [
        "down_blocks.",
        "up_blocks.",
        "mid_block.",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding.",
        "add_embedding.",
        "input_blocks.",
        "middle_block.",
        "output_blocks.",
        "time_embed.",
        "out.",
    ];
    if TEXT.iter().any(|p| m.starts_with(p)) {
        Some(Target::TextEncoder)
    } else if UNET.iter().any(|p| m.starts_with(p)) {
        Some(Target::Unet)
    } else {
        None
    }
}

/// Legacy diffusers LoRA keys → (layer path with the module's real name, the key's layer
/// prefix as written, part).
fn legacy_split(key: &str) -> Option<(String, String, Part)> {
    let (rest, part) = if let Some(r) = key.strip_suffix(".down.weight") {
        (r, Part::Down)
    } else if let Some(r) = key.strip_suffix(".up.weight") {
        (r, Part::Up)
    } else if let Some(r) = key.strip_suffix(".alpha") {
        (r, Part::Alpha)
    } else {
        return None;
    };
    if let Some(m) = rest.strip_suffix(".lora_linear_layer").or_else(|| rest.strip_suffix(".lora")) {
        return Some((m.to_string(), rest.to_string(), part));
    }
    // `<attn>.processor.to_q_lora` (UNet) or `<self_attn>.to_q_lora` (text encoder).
    let (parent, proc) = rest.rsplit_once('.')?;
    let base = proc.strip_suffix("_lora")?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let text = parent.contains("self_attn");
    let name = match (base, text) {
        ("to_q", false) | ("to_k", false) | ("to_v", false) => base.to_string(),
        ("to_out", false) => "to_out.0".to_string(),
        ("to_q", true) => "q_proj".to_string(),
        ("to_k", true) => "k_proj".to_string(),
        ("to_v", true) => "v_proj".to_string(),
        ("to_out", true) => "out_proj".to_string(),
        _ => return None,
    };
    Some((format!("{parent}.{name}"), rest.to_string(), part))
}

/// The block a module belongs to, for summaries.
pub(crate) fn block_of(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.as_slice() {
        ["down_blocks" | "up_blocks", i, ..] => format!("{}.{i}", parts[0]),
        ["text_model", "encoder", "layers", i, ..] => format!("encoder.layers.{i}"),
        ["text_model", second, ..] => second.to_string(),
        [first, ..] => first.to_string(),
        [] => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names_round_trip() {
        for m in [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.1.resnets.0.conv_shortcut",
            "up_blocks.1.resnets.2.time_emb_proj",
            "mid_block.attentions.0.proj_in",
            "time_embedding.linear_1",
            "conv_norm_out",
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
            "text_model.encoder.layers.11.self_attn.out_proj",
            "text_model.encoder.layers.0.layer_norm1",
            "text_model.final_layer_norm",
            "input_blocks.4.1.proj_in",
            "output_blocks.2.1.conv",
        ] {
            assert_eq!(kohya_to_dotted(&m.replace('.', "_")), m);
        }
    }

    #[test]
    fn compvis_kohya_names_map_to_diffusers() {
        let cfg = PipelineConfig::sd15();
        let none = |_: &str| false;
        let k = parse_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight", &cfg, &none)
            .expect("parsed");
        assert_eq!(k.module, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k");
        let k = parse_key("lora_unet_output_blocks_2_1_conv.alpha", &cfg, &none).expect("parsed");
        assert_eq!(k.module, "up_blocks.0.upsamplers.0.conv");
        let k = parse_key("lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight", &cfg, &none).expect("parsed");
        assert_eq!(k.module, "down_blocks.0.resnets.0.conv1");
    }

    #[test]
    fn legacy_and_peft_keys() {
        let cfg = PipelineConfig::sd15();
        let none = |_: &str| false;
        let k = parse_key(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight",
            &cfg,
            &none,
        )
        .expect("parsed");
        assert_eq!(k.module, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0");
        assert_eq!((k.part, k.style), (Part::Down, KeyStyle::Legacy));
        let k = parse_key("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight", &cfg, &none)
            .expect("parsed");
        assert_eq!(k.module, "text_model.encoder.layers.0.self_attn.k_proj");
        let k = parse_key("text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight", &cfg, &none).expect("parsed");
        assert_eq!((k.module.as_str(), k.target), ("text_model.encoder.layers.1.mlp.fc2", KeyTarget::Engine(Target::TextEncoder)));
        assert!(parse_key("down_blocks.0.resnets.0.conv1.weight", &cfg, &none).is_none());
    }
}
