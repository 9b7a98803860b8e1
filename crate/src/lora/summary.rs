//! What `loralab lora inspect` shows: a serialisable summary of an adapter file (format,
//! algorithms, ranks, alphas, layer counts per target and block, size, storage types,
//! metadata, trigger words) and, with a model, the match report.

use super::{Algorithm, BaseModel, Format, LoraFile, MatchReport, Metadata, Target};
use serde::Serialize;
use std::collections::BTreeMap;

/// How many layers have a value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValueCount {
    pub value: String,
    pub layers: usize,
}

/// Layers per block of a target.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockCount {
    pub target: Target,
    pub block: String,
    pub layers: usize,
}

/// An embedding bundled in an adapter file.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BundledToken {
    pub token: String,
    pub vectors: usize,
}

/// A summary of an adapter file.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub file: String,
    pub format: Format,
    pub algorithms: Vec<Algorithm>,
    pub base: BaseModel,
    pub base_reason: Option<String>,
    /// The licence its metadata names, or the one inherited from its base model.
    pub licence: crate::licence::Licence,
    pub bytes: u64,
    pub dtypes: Vec<String>,
    pub layers: usize,
    /// Layers per target (`text_encoder`, `unet`).
    pub targets: Vec<ValueCount>,
    pub blocks: Vec<BlockCount>,
    /// Ranks (`full` for LoKr with two full factors; `-` for algorithms without one).
    pub ranks: Vec<ValueCount>,
    /// Alphas as the file gives them (`-` where it gives none: alpha = rank).
    pub alphas: Vec<ValueCount>,
    /// The scales they imply (alpha / rank, the LoKr rule).
    pub scales: Vec<ValueCount>,
    pub dora_layers: usize,
    /// Bundled embeddings: (trigger word, vectors).
    pub embeddings: Vec<BundledToken>,
    pub metadata: Metadata,
    pub unrecognised: Vec<String>,
    pub other_components: usize,
    pub warnings: Vec<String>,
    #[serde(rename = "match")]
    pub match_report: Option<MatchReport>,
}

fn counts(values: impl Iterator<Item = String>) -> Vec<ValueCount> {
    let mut m: BTreeMap<String, usize> = BTreeMap::new();
    for v in values {
        *m.entry(v).or_default() += 1;
    }
    let mut out: Vec<ValueCount> = m.into_iter().map(|(value, layers)| ValueCount { value, layers }).collect();
    // Numbers in numeric order, words after.
    out.sort_by(|a, b| match (a.value.parse::<f64>(), b.value.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.total_cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.value.cmp(&b.value),
    });
    out
}

/// A number as short as it reads (`8`, `0.5`, `0.0625`).
fn num(v: f32) -> String {
    format!("{v}")
}

impl LoraFile {
    /// The summary `loralab lora inspect` prints, with the match report when a model was given.
    pub fn summary(&self, match_report: Option<MatchReport>) -> Summary {
        let has_rank = |l: &super::LayerAdapter| {
            matches!(l.delta, super::Delta::LowRank { .. } | super::Delta::LoHa { .. } | super::Delta::LoKr { .. })
        };
        let ranks = counts(self.layers.iter().map(|l| match (l.delta.rank(), has_rank(l)) {
            (Some(r), _) => r.to_string(),
            (None, true) => "full".to_string(),
            (None, false) => "-".to_string(),
        }));
        let alphas = counts(self.layers.iter().map(|l| l.alpha.map_or("-".to_string(), num)));
        let scales = counts(self.layers.iter().filter(|l| has_rank(l)).map(|l| num(l.delta.scale())));
        let targets = counts(self.layers.iter().map(|l| l.target.name().to_string()));
        let mut blocks: BTreeMap<(Target, String), usize> = BTreeMap::new();
        for l in &self.layers {
            *blocks.entry((l.target, l.block())).or_default() += 1;
        }
        Summary {
            file: self.file.clone(),
            format: self.format,
            algorithms: self.algorithms.clone(),
            base: self.base,
            base_reason: self.base_reason.clone(),
            licence: crate::licence::for_adapter(&self.metadata.raw),
            bytes: self.bytes,
            dtypes: self.dtypes.clone(),
            layers: self.layers.len(),
            targets,
            blocks: blocks.into_iter().map(|((target, block), layers)| BlockCount { target, block, layers }).collect(),
            ranks,
            alphas,
            scales,
            dora_layers: self.layers.iter().filter(|l| l.dora.is_some()).count(),
            embeddings: self.embeddings.iter().map(|e| BundledToken { token: e.token.clone(), vectors: e.n_vectors() }).collect(),
            metadata: self.metadata.clone(),
            unrecognised: self.unrecognised.clone(),
            other_components: self.other_components.len(),
            warnings: self.warnings.clone(),
            match_report,
        }
    }
}

fn layers(n: usize) -> String {
    if n == 1 {
        "1 layer".to_string()
    } else {
        format!("{n} layers")
    }
}

fn list(v: &[ValueCount]) -> String {
    v.iter().map(|c| format!("{} ({})", c.value, layers(c.layers))).collect::<Vec<_>>().join(", ")
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

impl Summary {
    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let mut line = |k: &str, v: String| o.push_str(&format!("{k:<14}{v}\n"));
        line("file", self.file.clone());
        line("format", self.format.name().to_string());
        let algos: Vec<&str> = self.algorithms.iter().map(|a| a.name()).collect();
        line("algorithms", algos.join(", "));
        let base = match (&self.base, &self.base_reason) {
            (BaseModel::Unknown, Some(r)) => format!("unknown ({r})"),
            (BaseModel::Unknown, None) => "unknown".to_string(),
            (b, Some(r)) => format!("{} (from {r})", b.describe()),
            (b, None) => b.describe().to_string(),
        };
        line("base model", base);
        line("licence", self.licence.line());
        line("size", format!("{} ({} bytes), {}", size(self.bytes), self.bytes, self.dtypes.join(", ")));
        let per_target: Vec<String> = self.targets.iter().map(|c| format!("{} {}", c.value, c.layers)).collect();
        line("layers", format!("{} ({})", self.layers, per_target.join(", ")));
        line("ranks", list(&self.ranks));
        line("alphas", list(&self.alphas));
        if !self.scales.is_empty() {
            line("scales", list(&self.scales));
        }
        if self.dora_layers > 0 {
            line("DoRA", format!("{} layers", self.dora_layers));
        }
        if !self.embeddings.is_empty() {
            let e: Vec<String> = self.embeddings.iter().map(|e| format!("`{}` ({} vectors)", e.token, e.vectors)).collect();
            line("embeddings", format!("{} (bundled; the trigger works in prompts once the adapter is loaded)", e.join(", ")));
        }
        let m = &self.metadata;
        let fields: [(&str, Option<String>); 10] = [
            ("network", m.network_module.clone()),
            ("algo", m.network_algo.clone()),
            ("dim", m.network_dim.map(|d| d.to_string())),
            ("alpha", m.network_alpha.map(num)),
            ("trained for", m.base_model_version.clone().or(m.architecture.clone())),
            ("trained on", m.sd_model_name.clone()),
            ("name", m.output_name.clone().or(m.title.clone())),
            ("comment", m.training_comment.clone()),
            ("trigger words", (!m.trigger_words.is_empty()).then(|| m.trigger_words.join(", "))),
            ("peft", (!m.peft.is_empty()).then(|| peft_line(m))),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                line(k, v);
            }
        }
        o.push_str("blocks\n");
        for b in &self.blocks {
            o.push_str(&format!("  {:<13} {:<22} {}\n", b.target.name(), b.block, b.layers));
        }
        if let Some(r) = &self.match_report {
            o.push_str(&format!("match         {} of {} layers fit the model", r.matched, r.total));
            for (t, m, n) in &r.by_target {
                o.push_str(&format!("; {} {m}/{n}", t.name()));
            }
            o.push('\n');
            for k in r.unmatched.iter().take(5) {
                o.push_str(&format!("  unmatched   {k}\n"));
            }
            if r.unmatched.len() > 5 {
                o.push_str(&format!("  … and {} more unmatched\n", r.unmatched.len() - 5));
            }
        }
        for w in &self.warnings {
            o.push_str(&format!("warning: {w}\n"));
        }
        if let Some(w) = self.match_report.as_ref().and_then(|r| r.warning.as_ref()) {
            o.push_str(&format!("warning: {w}\n"));
        }
        o
    }
}

fn peft_line(m: &Metadata) -> String {
    m.peft
        .iter()
        .map(|c| {
            let who = c.target.map(|t| t.name().to_string()).or(c.other_prefix.clone()).unwrap_or_else(|| "all".into());
            let mut s = format!("{who}: r {}, lora_alpha {}", opt(c.r.map(|r| r as f64)), opt(c.lora_alpha));
            if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
                s += &format!(", {} rank / {} alpha patterns", c.rank_pattern.len(), c.alpha_pattern.len());
            }
            if c.use_dora {
                s += ", DoRA";
            }
            if c.use_rslora {
                s += ", rsLoRA";
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v}"))
}
