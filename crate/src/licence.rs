//! Which licence a model or adapter comes with, and what it allows in one plain line.
//!
//! Sources, first found wins: a model card's front matter (`README.md` / `MODEL_CARD.md`,
//! `license:`; `license: other` with `license_name:`, as Hugging Face writes it), a `license`
//! entry of `model_index.json`, then a safetensors file's `__metadata__` (`modelspec.license`,
//! `license`). An adapter that names none inherits the use restrictions of the model it was
//! trained on when its kohya metadata says which (`ss_base_model_version`, `ss_sd_model_name`):
//! that is reported as inferred, with its reason.
//!
//! Recognised: CreativeML Open RAIL-M, CreativeML Open RAIL++-M, Apache-2.0, MIT, the FLUX.1
//! [dev] Non-Commercial License, SPDX-style `A OR B` / `A AND B` of these; anything else is
//! shown as written, and no licence at all as "unknown".

use crate::model::checkpoint::ModelFiles;
use serde::Serialize;
use std::collections::BTreeMap;

/// A licence loralab can summarise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Known {
    CreativemlOpenRailM,
    CreativemlOpenRailPlusPlusM,
    Apache2,
    Mit,
    Flux1DevNonCommercial,
}

impl Known {
    /// The licence's name.
    pub fn name(self) -> &'static str {
        match self {
            Known::CreativemlOpenRailM => "CreativeML Open RAIL-M",
            Known::CreativemlOpenRailPlusPlusM => "CreativeML Open RAIL++-M",
            Known::Apache2 => "Apache-2.0",
            Known::Mit => "MIT",
            Known::Flux1DevNonCommercial => "FLUX.1 [dev] Non-Commercial License",
        }
    }

    /// What it allows, in one line.
    pub fn summary(self) -> &'static str {
        match self {
            Known::CreativemlOpenRailM => {
                "use, change and share it, commercially too, but not for the harmful uses its Attachment A \
                 lists; models you share that are made from it (fine-tunes, merges, adapters) must carry the \
                 same restrictions"
            }
            Known::CreativemlOpenRailPlusPlusM => {
                "as CreativeML Open RAIL-M (Stable Diffusion 2.x, SDXL): use, change and share it, commercially \
                 too, except for the harmful uses it lists, which models made from it must keep"
            }
            Known::Apache2 => {
                "use, change and share it for any purpose, commercial included; keep the licence and notices \
                 and mark your changes; includes a patent grant"
            }
            Known::Mit => "use, change and share it for any purpose, commercial included; keep the copyright and licence notice",
            Known::Flux1DevNonCommercial => {
                "non-commercial use only of the model and of models made from it (fine-tunes, adapters): \
                 research, personal projects; read the licence before using its images commercially or to \
                 train other models"
            }
        }
    }

    /// Where the licence text is.
    pub fn url(self) -> &'static str {
        match self {
            Known::CreativemlOpenRailM => "https://huggingface.co/spaces/CompVis/stable-diffusion-license",
            Known::CreativemlOpenRailPlusPlusM => {
                "https://huggingface.co/stabilityai/stable-diffusion-2/blob/main/LICENSE-MODEL"
            }
            Known::Apache2 => "https://www.apache.org/licenses/LICENSE-2.0",
            Known::Mit => "https://opensource.org/license/mit",
            Known::Flux1DevNonCommercial => "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
        }
    }

    /// Whether it allows any use, commercial included, with notices only.
    fn permissive(self) -> bool {
        matches!(self, Known::Apache2 | Known::Mit)
    }
}

/// The words and identifiers each licence is written as (compared lowercase, with spaces,
/// `_` and `-` removed).
const NAMES: [(&str, Known); 16] = [
    ("creativemlopenrailm", Known::CreativemlOpenRailM),
    ("creativemlopenrail", Known::CreativemlOpenRailM),
    ("openrailm", Known::CreativemlOpenRailM),
    ("creativemlopenrail++m", Known::CreativemlOpenRailPlusPlusM),
    ("creativemlopenrail++", Known::CreativemlOpenRailPlusPlusM),
    ("openrail++m", Known::CreativemlOpenRailPlusPlusM),
    ("openrail++", Known::CreativemlOpenRailPlusPlusM),
    ("apache2.0", Known::Apache2),
    ("apache2", Known::Apache2),
    ("apachelicense2.0", Known::Apache2),
    ("apachelicense,version2.0", Known::Apache2),
    ("mit", Known::Mit),
    ("mitlicense", Known::Mit),
    ("flux1devnoncommerciallicense", Known::Flux1DevNonCommercial),
    ("flux.1devnoncommerciallicense", Known::Flux1DevNonCommercial),
    ("flux.1[dev]noncommerciallicense", Known::Flux1DevNonCommercial),
];

fn squash(s: &str) -> String {
    s.chars().filter(|c| !matches!(c, ' ' | '_' | '-')).flat_map(char::to_lowercase).collect()
}

/// The licence a single identifier or name means.
pub fn recognise_one(id: &str) -> Option<Known> {
    let s = squash(id.trim().trim_matches(['"', '\'', '(', ')']));
    NAMES.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
}

/// How the parts of an expression combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// One licence, or a choice (`A OR B`).
    Or,
    /// Every part applies (`A AND B`).
    And,
}

/// A model's or adapter's licence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Licence {
    /// As written (`creativeml-openrail-m`, `MIT OR Apache-2.0`); `unknown` when none was found.
    pub id: String,
    /// The recognised licences of the expression, in order; empty when unknown or not recognised.
    pub known: Vec<Known>,
    pub combine: Combine,
    /// A display name (`MIT or Apache-2.0`).
    pub name: String,
    /// What it allows, in one line.
    pub summary: String,
    /// Where it was found (`MODEL_CARD.md front matter`, `__metadata__ modelspec.license`,
    /// or the reason it was inferred).
    pub source: String,
    /// True when the file names no licence and this one follows from what it was trained on.
    pub inferred: bool,
    /// Where to read it.
    pub url: Option<String>,
}

/// The summary of a licence nobody stated.
pub const UNKNOWN_SUMMARY: &str = "no licence found: you may have no right to use or share it, or what it makes, \
                                   beyond what the law allows; ask its author or check where you got it";

impl Licence {
    /// No licence found.
    pub fn unknown() -> Self {
        Licence {
            id: "unknown".into(),
            known: vec![],
            combine: Combine::Or,
            name: "unknown".into(),
            summary: UNKNOWN_SUMMARY.into(),
            source: "no licence in the model card, model_index.json or file metadata".into(),
            inferred: false,
            url: None,
        }
    }

    /// Reads an identifier or expression (`MIT OR Apache-2.0`) found at `source`.
    pub fn parse(id: &str, source: &str) -> Self {
        let id = id.trim().trim_matches(['"', '\'']).trim();
        if id.is_empty() || id.eq_ignore_ascii_case("unknown") || id.eq_ignore_ascii_case("none") {
            return Licence { source: source.into(), ..Licence::unknown() };
        }
        let (combine, parts) = split_expression(id);
        let known: Vec<Known> = parts.iter().filter_map(|p| recognise_one(p)).collect();
        if known.is_empty() || known.len() != parts.len() {
            return Licence {
                id: id.into(),
                known: vec![],
                combine,
                name: id.into(),
                summary: format!("a licence loralab does not recognise (`{id}`): read its text before you use or share the model or what it makes"),
                source: source.into(),
                inferred: false,
                url: None,
            };
        }
        let (name, summary) = describe(&known, combine);
        let url = (known.len() == 1).then(|| known[0].url().to_string());
        Licence { id: id.into(), known, combine, name, summary, source: source.into(), inferred: false, url }
    }

    /// `name: summary (source)`, for command-line output.
    pub fn line(&self) -> String {
        let how = if self.inferred { "inferred: " } else { "from " };
        format!("{}: {} ({how}{})", self.name, self.summary, self.source)
    }
}

/// `A OR B` / `A AND B` (SPDX operators, any case; `/` as OR), with surrounding parentheses.
fn split_expression(id: &str) -> (Combine, Vec<String>) {
    let inner = id.strip_prefix('(').and_then(|s| s.strip_suffix(')')).unwrap_or(id);
    let words: Vec<&str> = inner.split_whitespace().collect();
    for (op, combine) in [("or", Combine::Or), ("and", Combine::And)] {
        if words.iter().any(|w| w.eq_ignore_ascii_case(op)) {
            let parts = words
                .split(|w| w.eq_ignore_ascii_case(op))
                .map(|p| p.join(" "))
                .filter(|p| !p.is_empty())
                .collect();
            return (combine, parts);
        }
    }
    if inner.contains('/') && !inner.contains("://") {
        return (Combine::Or, inner.split('/').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect());
    }
    (Combine::Or, vec![inner.to_string()])
}

fn describe(known: &[Known], combine: Combine) -> (String, String) {
    if let [one] = known {
        return (one.name().to_string(), capitalise(one.summary()));
    }
    let names: Vec<&str> = known.iter().map(|k| k.name()).collect();
    let joiner = if combine == Combine::Or { " or " } else { " and " };
    let name = names.join(joiner);
    let summary = if known.iter().all(|k| k.permissive()) {
        let how = if combine == Combine::Or { "Either licence, your choice" } else { "All of them apply" };
        format!("{how}: use, change and share it for any purpose, commercial included, keeping the licence notices")
    } else if combine == Combine::Or {
        let each: Vec<String> = known.iter().map(|k| format!("{}: {}", k.name(), k.summary())).collect();
        format!("Either licence, your choice — {}", each.join("; "))
    } else {
        let each: Vec<String> = known.iter().map(|k| format!("{}: {}", k.name(), k.summary())).collect();
        format!("All of them apply — {}", each.join("; "))
    };
    (name, summary)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The `license` of a Markdown file's YAML front matter (`---` … `---` at the top):
/// `license_name` when `license` is `other`, and `license_link` when given.
pub fn from_front_matter(markdown: &str) -> Option<(String, Option<String>)> {
    let text = markdown.trim_start_matches('\u{feff}');
    let mut lines = text.lines();
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    for line in lines {
        if line.trim_end() == "---" || line.trim_end() == "..." {
            break;
        }
        // Top-level `key: value` only (nested YAML is indented).
        if line.starts_with([' ', '\t', '-', '#']) {
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim().trim_matches(['"', '\'']).trim();
            if !v.is_empty() {
                fields.insert(k.trim(), v.to_string());
            }
        }
    }
    let licence = fields.get("license").or_else(|| fields.get("licence"))?.clone();
    let link = fields.get("license_link").cloned();
    if licence.eq_ignore_ascii_case("other") {
        if let Some(name) = fields.get("license_name") {
            return Some((name.clone(), link));
        }
    }
    Some((licence, link))
}

/// The licence of a safetensors `__metadata__` table: `modelspec.license`, else `license`.
pub fn from_metadata(meta: &BTreeMap<String, String>) -> Option<(String, &'static str)> {
    for key in ["modelspec.license", "license", "licence"] {
        if let Some(v) = meta.get(key).map(|v| v.trim()).filter(|v| !v.is_empty() && *v != "None") {
            return Some((v.to_string(), key));
        }
    }
    None
}

/// The `license` (or `_license`) string of a `model_index.json`.
pub fn from_model_index(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    ["license", "_license"].iter().find_map(|k| v.get(k).and_then(|l| l.as_str()).map(str::to_string))
}

/// How much of a model card is read: front matter sits at the top.
const CARD_BYTES: u64 = 64 * 1024;

fn read_prefix<F: ModelFiles>(files: &F, path: &str) -> Option<String> {
    use crate::io::RangeRead;
    let r = files.open(path).ok()??;
    let n = r.len().min(CARD_BYTES) as usize;
    let mut buf = vec![0u8; n];
    r.read_at(0, &mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The licence of a diffusers folder: its card's front matter (`README.md`, `MODEL_CARD.md`),
/// `model_index.json`, then the weight files' metadata (`weights`: (path, `__metadata__`)).
pub fn for_folder<F: ModelFiles>(files: &F, weights: &[(&str, &BTreeMap<String, String>)]) -> Licence {
    for card in ["README.md", "MODEL_CARD.md"] {
        if let Some((id, link)) = read_prefix(files, card).and_then(|t| from_front_matter(&t)) {
            let mut l = Licence::parse(&id, &format!("{card} front matter"));
            if let Some(u) = link.filter(|u| u.starts_with("https://")) {
                l.url = Some(u);
            }
            return l;
        }
    }
    if let Some(id) = read_prefix(files, "model_index.json").and_then(|t| from_model_index(&t)) {
        return Licence::parse(&id, "model_index.json");
    }
    for_weights(weights)
}

/// The licence the weight files' metadata names, else unknown.
pub fn for_weights(weights: &[(&str, &BTreeMap<String, String>)]) -> Licence {
    for (path, meta) in weights {
        if let Some((id, key)) = from_metadata(meta) {
            return Licence::parse(&id, &format!("{path} __metadata__ {key}"));
        }
    }
    Licence::unknown()
}

/// An adapter's licence: its metadata's, else the use restrictions of the base it was trained
/// on (`ss_base_model_version`, `ss_sd_model_name`), else unknown.
pub fn for_adapter(raw: &BTreeMap<String, String>) -> Licence {
    if let Some((id, key)) = from_metadata(raw) {
        return Licence::parse(&id, &format!("__metadata__ {key}"));
    }
    let get = |k: &str| raw.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty() && v != "None");
    let version = get("ss_base_model_version").unwrap_or_default().to_ascii_lowercase();
    let model = get("ss_sd_model_name").unwrap_or_default();
    let m = model.to_ascii_lowercase();
    let base = if version.contains("flux") || m.contains("flux") {
        if m.contains("schnell") {
            Some(Known::Apache2)
        } else if m.contains("dev") {
            Some(Known::Flux1DevNonCommercial)
        } else {
            None
        }
    } else if version.starts_with("sd_v1") {
        Some(Known::CreativemlOpenRailM)
    } else if version.starts_with("sd_v2") || version.starts_with("sdxl") {
        Some(Known::CreativemlOpenRailPlusPlusM)
    } else {
        None
    };
    match base {
        Some(k) => {
            let what: Vec<String> = [("ss_base_model_version", &version), ("ss_sd_model_name", &model)]
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let mut l = Licence::parse(k.name(), "");
            l.inferred = true;
            l.source = format!("the file names no licence; it was trained on a {} model ({})", k.name(), what.join(", "));
            l
        }
        None => Licence { source: "the adapter's metadata names no licence and no known base model".into(), ..Licence::unknown() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_usual_spellings() {
        for (id, k) in [
            ("creativeml-openrail-m", Known::CreativemlOpenRailM),
            ("CreativeML Open RAIL-M", Known::CreativemlOpenRailM),
            ("openrail++", Known::CreativemlOpenRailPlusPlusM),
            ("CreativeML Open RAIL++-M", Known::CreativemlOpenRailPlusPlusM),
            ("apache-2.0", Known::Apache2),
            ("Apache License 2.0", Known::Apache2),
            ("MIT", Known::Mit),
            ("flux-1-dev-non-commercial-license", Known::Flux1DevNonCommercial),
            ("FLUX.1 [dev] Non-Commercial License", Known::Flux1DevNonCommercial),
        ] {
            assert_eq!(recognise_one(id), Some(k), "{id}");
            let l = Licence::parse(id, "test");
            assert_eq!((l.known.as_slice(), l.name.as_str()), (&[k][..], k.name()), "{id}");
            assert!(l.url.is_some() && !l.summary.is_empty());
        }
        assert_eq!(recognise_one("bigscience-openrail-m"), None);
        assert_eq!(recognise_one("cc-by-nc-4.0"), None);
    }

    #[test]
    fn expressions_unknown_and_unrecognised() {
        let l = Licence::parse("MIT OR Apache-2.0", "MODEL_CARD.md front matter");
        assert_eq!(l.known, vec![Known::Mit, Known::Apache2]);
        assert_eq!(l.name, "MIT or Apache-2.0");
        assert!(l.summary.starts_with("Either licence, your choice: use"), "{}", l.summary);
        let l = Licence::parse("(creativeml-openrail-m AND mit)", "x");
        assert_eq!((l.combine, l.known.len()), (Combine::And, 2));
        assert!(l.summary.contains("Attachment A"), "{}", l.summary);
        let u = Licence::parse("unknown", "x");
        assert_eq!((u.name.as_str(), u.summary.as_str()), ("unknown", UNKNOWN_SUMMARY));
        let o = Licence::parse("cc-by-nc-4.0", "x");
        assert!(o.known.is_empty() && o.name == "cc-by-nc-4.0" && o.summary.contains("does not recognise"));
        // A partly recognised expression is not summarised as if it were the known part.
        assert!(Licence::parse("MIT OR cc-by-4.0", "x").known.is_empty());
    }

    #[test]
    fn front_matter_as_hugging_face_writes_it() {
        let card = "---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# Model\nlicense: mit\n";
        assert_eq!(from_front_matter(card), Some(("creativeml-openrail-m".into(), None)));
        let flux = "---\nlanguage:\n  - en\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n\
                    license_link: https://example.org/LICENSE.md\n---\n";
        assert_eq!(
            from_front_matter(flux),
            Some(("flux-1-dev-non-commercial-license".into(), Some("https://example.org/LICENSE.md".into())))
        );
        assert_eq!(from_front_matter("# No front matter\nlicense: mit\n"), None);
        assert_eq!(from_front_matter("---\ntitle: x\n---\nlicense: mit"), None);
    }

    #[test]
    fn metadata_and_model_index() {
        let mut m = BTreeMap::new();
        m.insert("modelspec.license".to_string(), "CreativeML Open RAIL++-M".to_string());
        assert_eq!(from_metadata(&m), Some(("CreativeML Open RAIL++-M".into(), "modelspec.license")));
        assert_eq!(from_model_index(r#"{"_class_name": "X", "_license": "apache-2.0"}"#), Some("apache-2.0".into()));
        assert_eq!(from_model_index(r#"{"_class_name": "X"}"#), None);
        let l = for_weights(&[("unet/x.safetensors", &BTreeMap::new()), ("model.safetensors", &m)]);
        assert_eq!(l.known, vec![Known::CreativemlOpenRailPlusPlusM]);
        assert_eq!(l.source, "model.safetensors __metadata__ modelspec.license");
        assert_eq!(for_weights(&[]).id, "unknown");
    }

    #[test]
    fn adapters_inherit_the_base_models_restrictions() {
        let mut raw = BTreeMap::new();
        raw.insert("ss_base_model_version".to_string(), "sd_v1".to_string());
        raw.insert("ss_sd_model_name".to_string(), "v1-5-pruned-emaonly.safetensors".to_string());
        let l = for_adapter(&raw);
        assert!(l.inferred);
        assert_eq!(l.known, vec![Known::CreativemlOpenRailM]);
        assert!(l.source.contains("sd_v1") && l.source.contains("v1-5-pruned-emaonly"), "{}", l.source);
        raw.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
        assert_eq!(for_adapter(&raw).known, vec![Known::CreativemlOpenRailPlusPlusM]);
        raw.insert("ss_base_model_version".into(), "flux1".into());
        raw.insert("ss_sd_model_name".into(), "flux1-dev.safetensors".into());
        assert_eq!(for_adapter(&raw).known, vec![Known::Flux1DevNonCommercial]);
        raw.insert("modelspec.license".into(), "MIT".into());
        let stated = for_adapter(&raw);
        assert!(!stated.inferred && stated.known == vec![Known::Mit]);
        assert_eq!(for_adapter(&BTreeMap::new()).id, "unknown");
    }
}
