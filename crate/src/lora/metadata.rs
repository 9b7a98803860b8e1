//! An adapter file's `__metadata__`: kohya sd-scripts' `ss_*` training record (network module,
//! dim, alpha, base model, trigger words from `ss_tag_frequency`), Stability's `modelspec.*`,
//! and the PEFT configuration diffusers stores as `lora_adapter_metadata`
//! (`{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {…}, …}`), whose
//! `rank_pattern` / `alpha_pattern` apply per module with PEFT's matching rule.

use super::pattern::peft_key_matches;
use super::Target;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// How many trigger-word suggestions to keep.
const TRIGGER_WORDS: usize = 5;

/// Parsed metadata; `raw` keeps every entry as written.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metadata {
    #[serde(skip)]
    pub raw: BTreeMap<String, String>,
    /// `ss_network_module` (`networks.lora`, `lycoris.kohya`, …).
    pub network_module: Option<String>,
    /// `ss_network_dim`.
    pub network_dim: Option<u32>,
    /// `ss_network_alpha`.
    pub network_alpha: Option<f32>,
    /// `algo` from `ss_network_args` (LyCORIS: `locon`, `loha`, `lokr`, `ia3`, `full`, …).
    pub network_algo: Option<String>,
    /// `ss_base_model_version` (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`, …).
    pub base_model_version: Option<String>,
    /// `ss_sd_model_name`: the checkpoint it was trained on.
    pub sd_model_name: Option<String>,
    /// `ss_output_name`.
    pub output_name: Option<String>,
    /// `ss_training_comment`.
    pub training_comment: Option<String>,
    /// `modelspec.title`.
    pub title: Option<String>,
    /// `modelspec.architecture` (`stable-diffusion-v1/lora`, …).
    pub architecture: Option<String>,
    /// Most frequent training tags first (summed over `ss_tag_frequency`'s datasets).
    pub trigger_words: Vec<String>,
    /// The PEFT configurations, one per component prefix (`unet`, `text_encoder`) or one
    /// for all.
    pub peft: Vec<PeftConfig>,
    /// Entries that could not be read as documented.
    pub problems: Vec<String>,
}

/// A PEFT `LoraConfig` as diffusers stores it in the file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeftConfig {
    /// The component the entries were prefixed with; `None` when unprefixed (all components).
    pub target: Option<Target>,
    /// A prefix this engine has no component for (`text_encoder_2`).
    pub other_prefix: Option<String>,
    pub r: Option<usize>,
    pub lora_alpha: Option<f64>,
    /// Sorted by key (diffusers writes this JSON with sorted keys, so that is the order PEFT
    /// reads); the first matching pattern applies.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub use_dora: bool,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
}

impl PeftConfig {
    /// The (rank, alpha) PEFT assigns to `module` (the module name as the file writes it):
    /// the first `rank_pattern` / `alpha_pattern` key that matches, else `r` / `lora_alpha`.
    /// Patterns that are not understood are reported and skipped.
    pub fn rank_alpha_for(&self, module: &str, problems: &mut Vec<String>) -> (Option<usize>, Option<f64>) {
        let mut find = |patterns: Vec<(&str, f64)>| -> Option<f64> {
            for (key, v) in patterns {
                match peft_key_matches(key, module) {
                    Ok(true) => return Some(v),
                    Ok(false) => {}
                    Err(e) => {
                        if !problems.contains(&e) {
                            problems.push(e);
                        }
                    }
                }
            }
            None
        };
        let rank = find(self.rank_pattern.iter().map(|(k, v)| (k.as_str(), *v as f64)).collect())
            .map(|v| v as usize)
            .or(self.r);
        let alpha = find(self.alpha_pattern.iter().map(|(k, v)| (k.as_str(), *v)).collect()).or(self.lora_alpha);
        (rank, alpha)
    }
}

fn non_empty(raw: &BTreeMap<String, String>, key: &str) -> Option<String> {
    raw.get(key).map(|s| s.trim().to_string()).filter(|s| !s.is_empty() && s != "None")
}

impl Metadata {
    /// Parses the `__metadata__` table.
    pub fn parse(raw: &BTreeMap<String, String>) -> Metadata {
        let mut m = Metadata { raw: raw.clone(), ..Default::default() };
        m.network_module = non_empty(raw, "ss_network_module");
        m.network_dim = non_empty(raw, "ss_network_dim").and_then(|s| s.parse::<f64>().ok()).map(|v| v as u32);
        m.network_alpha = non_empty(raw, "ss_network_alpha").and_then(|s| s.parse().ok());
        m.base_model_version = non_empty(raw, "ss_base_model_version");
        m.sd_model_name = non_empty(raw, "ss_sd_model_name");
        m.output_name = non_empty(raw, "ss_output_name");
        m.training_comment = non_empty(raw, "ss_training_comment");
        m.title = non_empty(raw, "modelspec.title");
        m.architecture = non_empty(raw, "modelspec.architecture");
        if let Some(args) = non_empty(raw, "ss_network_args") {
            match serde_json::from_str::<serde_json::Value>(&args) {
                Ok(v) => m.network_algo = v.get("algo").and_then(|a| a.as_str()).map(str::to_string),
                Err(e) => m.problems.push(format!("ss_network_args is not JSON: {e}")),
            }
        }
        if let Some(tags) = non_empty(raw, "ss_tag_frequency") {
            match trigger_words(&tags) {
                Ok(words) => m.trigger_words = words,
                Err(e) => m.problems.push(format!("ss_tag_frequency is not a JSON table of tag counts: {e}")),
            }
        }
        if let Some(text) = non_empty(raw, "lora_adapter_metadata") {
            match parse_peft(&text) {
                Ok(cfgs) => m.peft = cfgs,
                Err(e) => m.problems.push(format!("lora_adapter_metadata: {e}")),
            }
        }
        m
    }

    /// The PEFT configuration for `target`: its own prefix's, else the unprefixed one.
    pub fn peft_for(&self, target: Target) -> Option<&PeftConfig> {
        self.peft
            .iter()
            .find(|c| c.target == Some(target))
            .or_else(|| self.peft.iter().find(|c| c.target.is_none() && c.other_prefix.is_none()))
    }
}

/// Tags of `ss_tag_frequency` (`{"<dataset dir>": {"<tag>": count}}`) by total count, ties by
/// name, the first few.
fn trigger_words(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let datasets = v.as_object().ok_or("not an object")?;
    let mut counts: HashMap<String, u64> = HashMap::new();
    for tags in datasets.values() {
        let tags = tags.as_object().ok_or("a dataset entry is not an object")?;
        for (tag, n) in tags {
            let tag = tag.trim();
            if tag.is_empty() {
                continue;
            }
            let n = n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)).unwrap_or(0);
            *counts.entry(tag.to_string()).or_default() += n;
        }
    }
    let mut sorted: Vec<(String, u64)> = counts.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(sorted.into_iter().take(TRIGGER_WORDS).map(|(t, _)| t).collect())
}

fn parse_peft(text: &str) -> Result<Vec<PeftConfig>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let mut groups: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    const PREFIXES: [&str; 3] = ["unet", "text_encoder", "text_encoder_2"];
    for (k, v) in obj {
        let (prefix, field) = match k.split_once('.') {
            Some((p, f)) if PREFIXES.contains(&p) => (p.to_string(), f.to_string()),
            _ => (String::new(), k.clone()),
        };
        groups.entry(prefix).or_default().insert(field, v.clone());
    }
    groups.into_iter().map(|(prefix, fields)| peft_config(&prefix, &fields)).collect()
}

fn peft_config(prefix: &str, f: &serde_json::Map<String, serde_json::Value>) -> Result<PeftConfig, String> {
    let mut c = PeftConfig::default();
    match prefix {
        "unet" => c.target = Some(Target::Unet),
        "text_encoder" => c.target = Some(Target::TextEncoder),
        "" => {}
        other => c.other_prefix = Some(other.to_string()),
    }
    let field = |name: &str| f.get(name).filter(|v| !v.is_null());
    let label = |name: &str| if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
    let number = |name: &str, v: &serde_json::Value| v.as_f64().ok_or_else(|| format!("`{}` is not a number", label(name)));
    if let Some(v) = field("r") {
        c.r = Some(number("r", v)? as usize);
    }
    if let Some(v) = field("lora_alpha") {
        c.lora_alpha = Some(number("lora_alpha", v)?);
    }
    for (name, out) in [("rank_pattern", true), ("alpha_pattern", false)] {
        let Some(v) = field(name) else { continue };
        let map = v.as_object().ok_or_else(|| format!("`{}` is not an object", label(name)))?;
        for (k, v) in map {
            let n = number(name, v)?;
            if out {
                c.rank_pattern.push((k.clone(), n as usize));
            } else {
                c.alpha_pattern.push((k.clone(), n));
            }
        }
    }
    c.use_dora = field("use_dora").and_then(|v| v.as_bool()).unwrap_or(false);
    c.use_rslora = field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
    match field("target_modules") {
        Some(serde_json::Value::Array(a)) => {
            c.target_modules = a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect();
        }
        Some(serde_json::Value::String(s)) => c.target_modules = vec![s.clone()],
        _ => {}
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_fields_and_trigger_words() {
        let mut raw = BTreeMap::new();
        raw.insert("ss_network_module".into(), "networks.lora".into());
        raw.insert("ss_network_dim".into(), "16".into());
        raw.insert("ss_network_alpha".into(), "8.0".into());
        raw.insert(
            "ss_tag_frequency".into(),
            r#"{"10_sks dog": {"sks dog": 12, " solo": 3, "grass": 3}, "5_b": {"solo": 4}}"#.into(),
        );
        let m = Metadata::parse(&raw);
        assert_eq!(m.network_dim, Some(16));
        assert_eq!(m.network_alpha, Some(8.0));
        assert_eq!(m.trigger_words, vec!["sks dog", "solo", "grass"]);
    }

    #[test]
    fn peft_patterns_per_module() {
        let mut raw = BTreeMap::new();
        raw.insert(
            "lora_adapter_metadata".into(),
            r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"attn2.to_k": 2},
                "unet.alpha_pattern": {"down_blocks.0.attentions.0.proj_in": 3}, "text_encoder.r": 2}"#
                .into(),
        );
        let m = Metadata::parse(&raw);
        let unet = m.peft_for(Target::Unet).expect("unet config");
        let mut p = Vec::new();
        let to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
        assert_eq!(unet.rank_alpha_for(to_k, &mut p), (Some(2), Some(8.0)));
        assert_eq!(unet.rank_alpha_for("down_blocks.0.attentions.0.proj_in", &mut p), (Some(4), Some(3.0)));
        assert_eq!(m.peft_for(Target::TextEncoder).and_then(|c| c.r), Some(2));
        assert!(p.is_empty());
    }
}
