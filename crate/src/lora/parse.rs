//! Reading an adapter file: keys grouped into layers, each layer's tensors into a [`Delta`]
//! (plus DoRA), with the scale the writer's library gives it, and checks that the tensors of a
//! layer agree with each other (ranks, factor shapes). Shapes against a model are checked by
//! [`super::match_model`].

use super::names::{parse_key, KeyStyle, KeyTarget, ParsedKey, Part};
use super::{Algorithm, BaseModel, Delta, Dora, DoraKind, Factor, Format, HostTensor, LayerAdapter, LoraFile};
use super::{Metadata, Target};
use crate::error::{Error, Result};
use crate::io::safetensors::{SafetensorsFile, TensorEntry};
use crate::io::RangeRead;
use crate::model::checkpoint::{is_pickle_name, refuse_pickle};
use crate::model::config::PipelineConfig;
use crate::model::textual_inversion::{read_vectors, EmbeddingLayout, TextualInversion};
use std::collections::{BTreeMap, BTreeSet};

/// Reads an adapter file, mapping CompVis UNet names with Stable Diffusion 1.x's block
/// numbering (use [`read_lora_for`] with the model's configuration when it differs).
pub fn read_lora<R: RangeRead>(file: &SafetensorsFile<R>) -> Result<LoraFile> {
    read_lora_for(file, &PipelineConfig::sd15())
}

/// Opens `reader` as an adapter file: pickled checkpoints (by name or by their zip / pickle
/// magic bytes) are refused with the message checkpoint loading gives.
pub fn open_lora<R: RangeRead>(reader: R, name: &str, cfg: &PipelineConfig) -> Result<LoraFile> {
    if is_pickle_name(name) {
        return Err(refuse_pickle(name));
    }
    let mut magic = [0u8; 4];
    if reader.len() >= 4 && reader.read_at(0, &mut magic).is_ok() {
        if magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
            return Err(refuse_pickle(name));
        }
        if magic == *b"PK\x03\x04" {
            // PyTorch's zip checkpoints hold `<name>/data.pkl`; any other zip is an archive
            // the adapter has to be taken out of.
            let mut head = vec![0u8; reader.len().min(1 << 16) as usize];
            let pickled = reader.read_at(0, &mut head).is_ok() && head.windows(4).any(|w| w == b".pkl");
            if pickled {
                return Err(refuse_pickle(name));
            }
            return Err(Error::Format {
                file: name.to_string(),
                tensor: None,
                message: "is a zip archive, not a .safetensors file: extract it and choose the .safetensors adapter inside"
                    .into(),
            });
        }
    }
    let file = SafetensorsFile::open(reader, name)?;
    read_lora_for(&file, cfg)
}

/// Reads an adapter file; CompVis UNet names (`lora_unet_input_blocks_4_1_…`) are mapped with
/// `cfg`'s block numbering.
pub fn read_lora_for<R: RangeRead>(file: &SafetensorsFile<R>, cfg: &PipelineConfig) -> Result<LoraFile> {
    if is_pickle_name(file.name()) {
        return Err(refuse_pickle(file.name()));
    }
    let metadata = Metadata::parse(file.metadata());
    let names: BTreeSet<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    let has = |k: &str| names.contains(k);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut unrecognised = Vec::new();
    let mut bundled: BTreeMap<&str, Vec<&TensorEntry>> = BTreeMap::new();
    for t in file.tensors() {
        if let Some(rest) = t.name.strip_prefix("bundle_emb.") {
            bundled.entry(rest.split('.').next().unwrap_or_default()).or_default().push(t);
            continue;
        }
        match parse_key(&t.name, cfg, &has) {
            Some(p) => {
                let g = groups.entry(p.prefix.clone()).or_insert_with(|| Group::new(&p));
                if g.parts.insert(p.part, t.clone()).is_some() {
                    return Err(fmt_err(file.name(), &t.name, "appears twice in the same layer under different spellings"));
                }
            }
            None => unrecognised.push(t.name.clone()),
        }
    }
    let mut warnings = metadata.problems.clone();
    let embeddings = bundled_embeddings(file, &bundled, &mut warnings)?;
    if groups.is_empty() && embeddings.is_empty() {
        return Err(not_an_adapter(file));
    }
    let mut layers = Vec::new();
    let mut other_components = Vec::new();
    let mut styles: BTreeMap<Format, usize> = BTreeMap::new();
    for (prefix, g) in &groups {
        let target = match g.target {
            KeyTarget::Engine(t) => t,
            KeyTarget::Other => {
                other_components.push(prefix.clone());
                continue;
            }
        };
        let Some(layer) = build_layer(file, prefix, g, target, &metadata, &mut warnings, &mut unrecognised)? else {
            continue;
        };
        *styles.entry(g.format(&layer)).or_default() += 1;
        layers.push(layer);
    }
    if layers.is_empty() && other_components.is_empty() && embeddings.is_empty() {
        return Err(not_an_adapter(file));
    }
    layers.sort_by(|a, b| (a.target, &a.module, &a.key).cmp(&(b.target, &b.module, &b.key)));
    for pair in layers.windows(2) {
        if pair[0].target == pair[1].target && pair[0].module == pair[1].module {
            warnings.push(format!(
                "layers `{}` and `{}` both adapt {} `{}`; both are applied",
                pair[0].key,
                pair[1].key,
                pair[0].target.name(),
                pair[0].module
            ));
        }
    }
    let lycoris_meta = metadata.network_module.as_deref().is_some_and(|m| m.contains("lycoris"));
    let mut format = styles.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f).unwrap_or(Format::Kohya);
    if format == Format::Kohya && lycoris_meta {
        format = Format::Lycoris;
    }
    let mut algorithms: Vec<Algorithm> = layers
        .iter()
        .flat_map(|l| [Some(l.delta.algorithm()), l.dora.as_ref().map(|_| Algorithm::Dora)])
        .flatten()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    algorithms.dedup();
    let dtypes = file.tensors().iter().map(|t| t.dtype.to_string()).collect::<BTreeSet<_>>().into_iter().collect();
    let (base, base_reason) = guess_base(&groups, &layers, &other_components, &metadata);
    if !unrecognised.is_empty() {
        warnings.push(format!(
            "{} tensor(s) are not part of any adapter this engine understands and are ignored (e.g. `{}`)",
            unrecognised.len(),
            unrecognised[0]
        ));
    }
    if !other_components.is_empty() {
        warnings.push(format!(
            "{} layer(s) adapt a component this engine does not have (e.g. `{}`, SDXL's second text encoder) and are ignored",
            other_components.len(),
            other_components[0]
        ));
    }
    Ok(LoraFile {
        file: file.name().to_string(),
        format,
        algorithms,
        layers,
        metadata,
        unrecognised,
        other_components,
        base,
        base_reason,
        bytes: file.reader().len(),
        dtypes,
        warnings,
        embeddings,
    })
}

/// The embeddings bundled in an adapter file (A1111: `bundle_emb.<token>.string_to_param.*`,
/// or `bundle_emb.<token>.emb_params`; one tensor per token). SDXL's two-part embeddings
/// (`clip_l` / `clip_g`) are skipped with a warning, as are names that cannot be a trigger.
fn bundled_embeddings<R: RangeRead>(
    file: &SafetensorsFile<R>,
    bundled: &BTreeMap<&str, Vec<&TensorEntry>>,
    warnings: &mut Vec<String>,
) -> Result<Vec<TextualInversion>> {
    let mut out = Vec::new();
    for (&token, entries) in bundled {
        let sdxl = entries.iter().any(|e| e.name.ends_with(".clip_g") || e.name.ends_with(".clip_l"));
        if token.trim().is_empty() || sdxl {
            let why = if sdxl { "an SDXL embedding (clip_l / clip_g)" } else { "no token name" };
            warnings.push(format!("the bundled embedding `{}` is ignored: {why}", entries[0].name));
            continue;
        }
        let [entry] = entries.as_slice() else {
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            return Err(fmt_err(
                file.name(),
                entries[0].name.as_str(),
                &format!("the bundled embedding `{token}` has {} tensors ({}); it must have one", names.len(), names.join(", ")),
            ));
        };
        out.push(read_vectors(file, entry, token.to_string(), EmbeddingLayout::A1111)?);
    }
    Ok(out)
}

/// The tensors of one layer of the file.
struct Group {
    target: KeyTarget,
    module: String,
    file_module: String,
    style: KeyStyle,
    parts: BTreeMap<Part, TensorEntry>,
}

impl Group {
    fn new(p: &ParsedKey) -> Self {
        Group {
            target: p.target,
            module: p.module.clone(),
            file_module: p.file_module.clone(),
            style: p.style,
            parts: BTreeMap::new(),
        }
    }

    fn format(&self, layer: &LayerAdapter) -> Format {
        let lycoris = !matches!(layer.delta, Delta::LowRank { .. })
            || matches!(layer.dora, Some(Dora { kind: DoraKind::Lycoris { .. }, .. }));
        match self.style {
            KeyStyle::Legacy => Format::DiffusersLegacy,
            _ if lycoris => Format::Lycoris,
            KeyStyle::Kohya => Format::Kohya,
            KeyStyle::Dotted if self.parts.contains_key(&Part::Down) && self.has_peft_names() => Format::Peft,
            KeyStyle::Dotted if self.parts.contains_key(&Part::Down) => Format::Kohya,
            KeyStyle::Dotted => Format::Peft,
        }
    }

    fn has_peft_names(&self) -> bool {
        self.parts.get(&Part::Down).is_some_and(|t| t.name.ends_with(".lora_A.weight"))
    }
}

fn fmt_err(file: &str, key: &str, message: impl Into<String>) -> Error {
    Error::Format { file: file.to_string(), tensor: Some(key.to_string()), message: message.into() }
}

/// Reads one tensor; NaN or infinite values are refused (they would turn every image that
/// uses the adapter into noise or black).
fn read<R: RangeRead>(file: &SafetensorsFile<R>, t: &TensorEntry) -> Result<HostTensor> {
    let data = file.read_f32(&t.name)?;
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let first = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(fmt_err(
            file.name(),
            &t.name,
            format!(
                "holds {bad} NaN or infinite value{} (the first at index {first}, {}); the adapter is damaged or its \
                 training diverged: use an earlier checkpoint of it or train it again",
                if bad == 1 { "" } else { "s" },
                data.get(first).copied().unwrap_or(f32::NAN)
            ),
        ));
    }
    HostTensor::new(t.shape.clone(), data).map_err(|e| fmt_err(file.name(), &t.name, e.to_string()))
}

fn scalar<R: RangeRead>(file: &SafetensorsFile<R>, t: &TensorEntry) -> Result<f32> {
    let v = file.read_f32(&t.name)?;
    match v.as_slice() {
        [x] if x.is_finite() => Ok(*x),
        [x] => Err(fmt_err(file.name(), &t.name, format!("is {x}; expected a finite number"))),
        _ => Err(fmt_err(file.name(), &t.name, format!("has shape {:?}; expected a single value", t.shape))),
    }
}

/// Builds one layer; `Ok(None)` when its tensors form no adapter (they go to `unrecognised`).
fn build_layer<R: RangeRead>(
    file: &SafetensorsFile<R>,
    prefix: &str,
    g: &Group,
    target: Target,
    metadata: &Metadata,
    warnings: &mut Vec<String>,
    unrecognised: &mut Vec<String>,
) -> Result<Option<LayerAdapter>> {
    let name = file.name();
    let get = |p: Part| g.parts.get(&p);
    let load = |p: Part| get(p).map(|t| read(file, t)).transpose();
    let missing = |have: Part, want: &str| {
        let k = get(have).map(|t| t.name.as_str()).unwrap_or(prefix);
        fmt_err(name, k, format!("has no matching `{want}`: the layer is incomplete"))
    };
    let file_alpha = match get(Part::Alpha) {
        Some(t) => Some(scalar(file, t)?).filter(|a| *a != 0.0),
        None => None,
    };
    // PEFT keeps alpha in the metadata (rank/alpha patterns per module) or implies alpha = r.
    let mut problems = Vec::new();
    let peft = match g.style {
        KeyStyle::Kohya => None,
        _ => metadata.peft_for(target),
    };
    let (peft_rank, peft_alpha) =
        peft.map(|c| c.rank_alpha_for(&g.file_module, &mut problems)).unwrap_or((None, None));
    for p in problems {
        if !warnings.contains(&p) {
            warnings.push(p);
        }
    }
    let alpha = file_alpha.or(peft_alpha.map(|a| a as f32));
    let rslora = peft.is_some_and(|c| c.use_rslora) && file_alpha.is_none();
    let scale_for = |r: usize, alpha: Option<f32>| -> f32 {
        let a = alpha.unwrap_or(r as f32);
        if rslora {
            (a as f64 / (r as f64).sqrt()) as f32
        } else {
            (a as f64 / r as f64) as f32
        }
    };
    let key_of = |p: Part| get(p).map(|t| t.name.clone()).unwrap_or_else(|| prefix.to_string());
    let delta = if get(Part::Down).is_some() || get(Part::Up).is_some() {
        let down = load(Part::Down)?.ok_or_else(|| missing(Part::Up, "lora_down / lora_A"))?;
        let up = load(Part::Up)?.ok_or_else(|| missing(Part::Down, "lora_up / lora_B"))?;
        let mid = load(Part::Mid)?;
        check_low_rank(name, &key_of(Part::Up), &down, &up, mid.as_ref())?;
        let r = down.dim(0);
        if let Some(pr) = peft_rank.filter(|&pr| pr != r) {
            warnings.push(format!(
                "`{prefix}`: the PEFT metadata gives rank {pr} but the tensors have rank {r}; rank {r} is used"
            ));
        }
        Delta::LowRank { scale: scale_for(r, alpha), down, up, mid }
    } else if get(Part::HadaW1a).is_some() {
        let want = |p: Part, n: &str| load(p).and_then(|t| t.ok_or_else(|| missing(Part::HadaW1a, n)));
        let (w1a, w1b) = (want(Part::HadaW1a, "hada_w1_a")?, want(Part::HadaW1b, "hada_w1_b")?);
        let (w2a, w2b) = (want(Part::HadaW2a, "hada_w2_a")?, want(Part::HadaW2b, "hada_w2_b")?);
        let (t1, t2) = (load(Part::HadaT1)?, load(Part::HadaT2)?);
        check_loha(name, &key_of(Part::HadaW1a), [&w1a, &w1b, &w2a, &w2b], t1.as_ref(), t2.as_ref())?;
        let r = w1b.dim(0);
        Delta::LoHa { scale: scale_for(r, alpha), w1a, w1b, w2a, w2b, t1, t2 }
    } else if get(Part::LokrW1).is_some() || get(Part::LokrW1a).is_some() {
        let factor = |full: Part, a: Part, b: Part, n: &str| -> Result<Factor> {
            if let Some(w) = load(full)? {
                return Ok(Factor::Full(w));
            }
            let a_t = load(a)?.ok_or_else(|| missing(Part::LokrW1, &format!("{n} or {n}_a")))?;
            let b_t = load(b)?.ok_or_else(|| missing(a, &format!("{n}_b")))?;
            Ok(Factor::LowRank { a: a_t, b: b_t })
        };
        let w1 = factor(Part::LokrW1, Part::LokrW1a, Part::LokrW1b, "lokr_w1")?;
        let w2 = factor(Part::LokrW2, Part::LokrW2a, Part::LokrW2b, "lokr_w2")?;
        if let Some(t) = get(Part::LokrT1) {
            warnings.push(format!("`{}`: lokr_t1 is not used by LyCORIS and is ignored", t.name));
        }
        let t2 = load(Part::LokrT2)?;
        check_lokr(name, &key_of(Part::LokrW1), &w1, &w2, t2.as_ref())?;
        let scale = match w1.rank().or_else(|| w2.rank()) {
            None => 1.0,
            Some(r) => scale_for(r, alpha),
        };
        Delta::LoKr { w1, w2, t2, scale }
    } else if let Some(t) = get(Part::Ia3Weight) {
        let w = read(file, t)?;
        let on_input = match get(Part::OnInput) {
            Some(o) => scalar(file, o)? != 0.0,
            None => false,
        };
        let c = w.numel();
        if w.shape.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(fmt_err(name, &t.name, format!("IA³ weight has shape {:?}; expected one value per channel", w.shape)));
        }
        Delta::Ia3 { weight: HostTensor { shape: vec![c], data: w.data }, on_input }
    } else if get(Part::Diff).is_some() {
        let diff = load(Part::Diff)?.ok_or_else(|| missing(Part::DiffB, "diff"))?;
        let diff_b = load(Part::DiffB)?;
        if let Some(b) = &diff_b {
            if b.numel() != diff.dim(0) {
                return Err(fmt_err(name, &key_of(Part::DiffB), format!("has {} values but diff has {} output channels", b.numel(), diff.dim(0))));
            }
        }
        Delta::Full { diff, diff_b }
    } else if get(Part::WNorm).is_some() || get(Part::BNorm).is_some() {
        let flat = |t: Option<HostTensor>| t.map(|t| HostTensor { shape: vec![t.numel()], data: t.data });
        let (weight, bias) = (flat(load(Part::WNorm)?), flat(load(Part::BNorm)?));
        if let (Some(w), Some(b)) = (&weight, &bias) {
            if w.numel() != b.numel() {
                return Err(fmt_err(name, &key_of(Part::BNorm), format!("has {} values but w_norm has {}", b.numel(), w.numel())));
            }
        }
        Delta::Norm { weight, bias }
    } else {
        unrecognised.extend(g.parts.values().map(|t| t.name.clone()));
        return Ok(None);
    };
    if let Some(t) = get(Part::UpBias) {
        unrecognised.push(t.name.clone());
        warnings.push(format!("`{}`: PEFT lora_bias (a bias on lora_B) is not applied", t.name));
    }
    let dora = match (get(Part::DoraScale), get(Part::Magnitude)) {
        (Some(t), _) => Some(lycoris_dora(name, t, read(file, t)?)?),
        (None, Some(t)) => {
            let m = read(file, t)?;
            Some(Dora { magnitude: HostTensor { shape: vec![m.numel()], data: m.data }, kind: DoraKind::Peft })
        }
        (None, None) => None,
    };
    if dora.is_some() && !matches!(delta, Delta::LowRank { .. } | Delta::LoHa { .. } | Delta::LoKr { .. }) {
        return Err(fmt_err(name, prefix, "DoRA magnitude on a layer that is not low-rank, LoHa or LoKr"));
    }
    let alpha = match &delta {
        Delta::LowRank { .. } | Delta::LoHa { .. } => alpha,
        Delta::LoKr { w1, w2, .. } => alpha.filter(|_| w1.rank().or_else(|| w2.rank()).is_some()),
        _ => None,
    };
    Ok(Some(LayerAdapter { target, module: g.module.clone(), key: prefix.to_string(), delta, dora, alpha }))
}

fn lycoris_dora(file: &str, t: &TensorEntry, m: HostTensor) -> Result<Dora> {
    let n = m.numel();
    let on_output = if m.dim(0) == n {
        true
    } else if m.dim(0) == 1 && m.dim(1) == n {
        false
    } else {
        return Err(fmt_err(file, &t.name, format!("dora_scale has shape {:?}; expected [out, 1, …] or [1, in, …]", m.shape)));
    };
    Ok(Dora { magnitude: HostTensor { shape: vec![n], data: m.data }, kind: DoraKind::Lycoris { on_output } })
}

fn check_low_rank(file: &str, key: &str, down: &HostTensor, up: &HostTensor, mid: Option<&HostTensor>) -> Result<()> {
    let err = |m: String| Err(fmt_err(file, key, m));
    if !matches!(down.ndim(), 2 | 4) || !matches!(up.ndim(), 2 | 4) {
        return err(format!("lora_down {:?} / lora_up {:?}: expected 2-D (linear) or 4-D (convolution) tensors", down.shape, up.shape));
    }
    if up.shape.iter().skip(2).any(|&d| d != 1) {
        return err(format!("lora_up has shape {:?}; its kernel must be 1×1", up.shape));
    }
    let (r_down, r_up) = match mid {
        None => (down.dim(0), up.dim(1)),
        Some(m) => {
            if m.ndim() != 4 || down.shape.iter().skip(2).any(|&d| d != 1) {
                return err(format!(
                    "Tucker LoCon needs lora_down [r, in, 1, 1] and lora_mid [r, r, k, k]; got {:?} and {:?}",
                    down.shape, m.shape
                ));
            }
            if m.dim(1) != down.dim(0) {
                return err(format!("lora_mid {:?} does not take lora_down's rank {}", m.shape, down.dim(0)));
            }
            (m.dim(0), up.dim(1))
        }
    };
    if r_down != r_up {
        return err(format!(
            "lora_up has rank {r_up} (shape {:?}) but lora_down has rank {r_down} (shape {:?}); the file is corrupt or mixes two adapters",
            up.shape, down.shape
        ));
    }
    if r_down == 0 {
        return err("rank 0".into());
    }
    Ok(())
}

fn check_loha(file: &str, key: &str, w: [&HostTensor; 4], t1: Option<&HostTensor>, t2: Option<&HostTensor>) -> Result<()> {
    let [w1a, w1b, w2a, w2b] = w;
    let err = |m: String| Err(fmt_err(file, key, m));
    if w.iter().any(|t| t.ndim() != 2) {
        return err(format!(
            "LoHa factors must be 2-D; got {:?}, {:?}, {:?}, {:?}",
            w1a.shape, w1b.shape, w2a.shape, w2b.shape
        ));
    }
    match (t1, t2) {
        (None, None) => {
            if w1a.dim(1) != w1b.dim(0) || w2a.dim(1) != w2b.dim(0) {
                return err(format!(
                    "ranks disagree: hada_w1_a {:?} · hada_w1_b {:?}, hada_w2_a {:?} · hada_w2_b {:?}",
                    w1a.shape, w1b.shape, w2a.shape, w2b.shape
                ));
            }
            if w1a.dim(0) != w2a.dim(0) || w1b.dim(1) != w2b.dim(1) {
                return err(format!(
                    "the two halves have different shapes: {}×{} and {}×{}",
                    w1a.dim(0),
                    w1b.dim(1),
                    w2a.dim(0),
                    w2b.dim(1)
                ));
            }
        }
        (Some(t1), Some(t2)) => {
            for (t, a, b) in [(t1, w1a, w1b), (t2, w2a, w2b)] {
                if t.ndim() != 4 || t.dim(0) != a.dim(0) || t.dim(1) != b.dim(0) {
                    return err(format!("Tucker core {:?} does not fit factors {:?} and {:?}", t.shape, a.shape, b.shape));
                }
            }
            if w1a.dim(1) != w2a.dim(1) || w1b.dim(1) != w2b.dim(1) || t1.shape[2..] != t2.shape[2..] {
                return err("the two Tucker halves have different shapes".into());
            }
        }
        _ => return err("has only one of hada_t1 / hada_t2".into()),
    }
    Ok(())
}

fn check_lokr(file: &str, key: &str, w1: &Factor, w2: &Factor, t2: Option<&HostTensor>) -> Result<()> {
    let err = |m: String| Err(fmt_err(file, key, m));
    match w1 {
        Factor::Full(w) if w.ndim() != 2 => return err(format!("lokr_w1 must be 2-D; got {:?}", w.shape)),
        Factor::LowRank { a, b } if a.ndim() != 2 || b.ndim() != 2 || a.dim(1) != b.dim(0) => {
            return err(format!("lokr_w1_a {:?} · lokr_w1_b {:?}: ranks disagree", a.shape, b.shape))
        }
        _ => {}
    }
    match (w2, t2) {
        (Factor::Full(w), _) if !matches!(w.ndim(), 2 | 4) => err(format!("lokr_w2 must be 2-D or 4-D; got {:?}", w.shape)),
        (Factor::LowRank { a, b }, None) if a.ndim() != 2 || a.dim(1) != b.dim(0) => {
            err(format!("lokr_w2_a {:?} · lokr_w2_b {:?}: ranks disagree", a.shape, b.shape))
        }
        (Factor::LowRank { a, b }, Some(t)) if t.ndim() != 4 || t.dim(0) != a.dim(0) || t.dim(1) != b.dim(0) || a.ndim() != 2 || b.ndim() != 2 => {
            err(format!("Tucker core lokr_t2 {:?} does not fit lokr_w2_a {:?} and lokr_w2_b {:?}", t.shape, a.shape, b.shape))
        }
        (Factor::Full(_), Some(_)) => err("lokr_t2 without lokr_w2_a / lokr_w2_b".into()),
        _ => Ok(()),
    }
}

/// Explains what a safetensors file without adapter tensors is.
fn not_an_adapter<R: RangeRead>(file: &SafetensorsFile<R>) -> Error {
    let any = |p: &str| file.tensors().iter().any(|t| t.name.starts_with(p));
    let any_has = |p: &str| file.tensors().iter().any(|t| t.name.contains(p));
    let what = if any("model.diffusion_model.") {
        "is a Stable Diffusion model checkpoint (`model.diffusion_model.*`), not an adapter: use it as the model (--model)"
            .to_string()
    } else if any("conditioner.embedders.") {
        "is an SDXL model checkpoint (`conditioner.embedders.*`), not an adapter".to_string()
    } else if any("down_blocks.") && any("conv_in.") {
        "holds UNet model weights (a diffusers `unet/` file), not an adapter".to_string()
    } else if any("text_model.") || any("encoder.layers.0.") {
        "holds text encoder model weights, not an adapter".to_string()
    } else if any("encoder.down_blocks.") || any("decoder.up_blocks.") || any("first_stage_model.") {
        "holds VAE weights, not an adapter".to_string()
    } else if any("emb_params") || any("string_to_param") || any("clip_l") || any("clip_g") {
        "is a textual-inversion embedding, not a LoRA".to_string()
    } else if any_has("lora") || any_has("lokr") || any_has("hada") {
        let ex: Vec<&str> = file.tensors().iter().take(3).map(|t| t.name.as_str()).collect();
        format!("has adapter-like keys in a layout this engine does not recognise (e.g. `{}`)", ex.join("`, `"))
    } else {
        let ex: Vec<&str> = file.tensors().iter().take(3).map(|t| t.name.as_str()).collect();
        format!(
            "has no LoRA / LyCORIS / PEFT adapter tensors ({} tensors, e.g. `{}`)",
            file.tensors().len(),
            ex.join("`, `")
        )
    };
    Error::Format { file: file.name().to_string(), tensor: None, message: what }
}

/// The base model the file is for: key names first (SDXL's second text encoder `lora_te2_`, its
/// deeper transformer stacks and added embeddings), then layer widths (the UNet's cross-attention
/// input: 768 SD1, 1024 SD2, 2048 SDXL; else the text encoder's), then the training metadata.
/// `lora_te1_` alone decides nothing: diffusers' kohya converter writes SD1 text encoders so.
fn guess_base(
    groups: &BTreeMap<String, Group>,
    layers: &[LayerAdapter],
    other: &[String],
    metadata: &Metadata,
) -> (BaseModel, Option<String>) {
    if let Some(p) = other.first() {
        return (BaseModel::Sdxl, Some(format!("a second text encoder (`{p}`)")));
    }
    let sdxl_unet = groups.keys().find(|p| {
        let dotted = p.replace('_', ".");
        dotted.contains("transformer.blocks.") && !dotted.contains("transformer.blocks.0.")
            || dotted.contains("label.emb")
            || dotted.contains("add.embedding")
    });
    if let Some(p) = sdxl_unet {
        return (BaseModel::Sdxl, Some(format!("SDXL UNet blocks (`{p}`)")));
    }
    let width_of = |l: &LayerAdapter| match (&l.target, &l.delta) {
        (Target::Unet, Delta::LowRank { down, .. }) if l.module.ends_with("attn2.to_k") || l.module.ends_with("attn2.to_v") => {
            Some(down.dim(1))
        }
        (Target::TextEncoder, Delta::LowRank { down, .. }) if l.module.ends_with("self_attn.q_proj") => Some(down.dim(1)),
        _ => None,
    };
    let unet_first = layers.iter().filter(|l| l.target == Target::Unet).chain(layers.iter().filter(|l| l.target != Target::Unet));
    for l in unet_first {
        let Some(width) = width_of(l) else { continue };
        let base = match width {
            768 => BaseModel::Sd1,
            1024 => BaseModel::Sd2,
            2048 if l.target == Target::Unet => BaseModel::Sdxl,
            _ => continue,
        };
        return (base, Some(format!("layer widths (`{}` takes {width} inputs)", l.key)));
    }
    let meta = [metadata.base_model_version.as_deref(), metadata.architecture.as_deref()];
    for m in meta.into_iter().flatten() {
        let lower = m.to_ascii_lowercase();
        let base = if lower.contains("xl") {
            BaseModel::Sdxl
        } else if lower.contains("v2") || lower.contains("sd_2") || lower.contains("-2") {
            BaseModel::Sd2
        } else if lower.contains("v1") || lower.contains("sd_1") {
            BaseModel::Sd1
        } else {
            continue;
        };
        return (base, Some(format!("training metadata (`{m}`)")));
    }
    if let Some(p) = groups.keys().find(|p| p.starts_with("lora_te1_")) {
        return (BaseModel::Unknown, Some(format!("`lora_te1_` keys (`{p}`) are SDXL's or diffusers' SD1 conversion")));
    }
    (BaseModel::Unknown, None)
}
