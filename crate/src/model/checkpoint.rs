//! Opening a Stable Diffusion 1.x/2.x model in either layout and handing each component's
//! parameters out under diffusers names:
//!
//! - a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`, `tokenizer/`,
//!   `scheduler/`), weights in `diffusion_pytorch_model[.fp16].safetensors` /
//!   `model[.fp16].safetensors`;
//! - a single-file CompVis checkpoint (`model.diffusion_model.*`,
//!   `cond_stage_model.transformer[.text_model].*`, `first_stage_model.*`), which carries no
//!   configuration: the caller supplies one (SD1.5's by default, or a folder's, like diffusers'
//!   `from_single_file(config=...)`).
//!
//! The CompVis → diffusers key mapping follows diffusers' `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint`
//! (diffusers/loaders/single_file_utils.py) and lives in one function, [`compvis_to_diffusers`]
//! (checkpoint/compvis.rs), with the UNet's `input_blocks` / `output_blocks` numbering derived
//! from the configuration.
//! Everything here is generic over [`RangeRead`] / [`ModelFiles`] so the browser can use it;
//! only [`LocalDir`] and [`open_path`] touch the file system.

use super::config::{ClipTextConfig, ModelIndex, PipelineConfig, SamplerConfig, UNetConfig, VaeConfig};
use super::tokenizer::ClipTokenizer;
use super::weights::{check_shape, WeightSource};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::safetensors::SafetensorsFile;
use crate::io::RangeRead;
use crate::quant::DType;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::Arc;

mod compvis;

use compvis::folder_key_to_diffusers;
pub use compvis::{compvis_to_diffusers, Mapped};

/// The weight-carrying components of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    Vae,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::Vae];

    /// The diffusers folder name.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
        }
    }

    /// Weight file names tried in a diffusers folder, in order.
    pub fn weight_files(self) -> [&'static str; 2] {
        match self {
            Component::TextEncoder => ["model.safetensors", "model.fp16.safetensors"],
            _ => ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"],
        }
    }

    /// Pickled weight files diffusers also accepts (refused here).
    fn pickled_files(self) -> [&'static str; 2] {
        match self {
            Component::TextEncoder => ["pytorch_model.bin", "pytorch_model.fp16.bin"],
            _ => ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"],
        }
    }
}

/// Which layout a model was opened from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Folder,
    SingleFile,
}

// ---------------------------------------------------------------------------------------------
// Component weights

#[derive(Clone, Debug)]
struct Entry {
    key: String,
    squeeze: bool,
}

/// One component's parameters under diffusers names, read from a safetensors file in either
/// layout (the single-file layout shares one file among the three components).
pub struct ComponentWeights<R: RangeRead> {
    component: Component,
    file: Arc<SafetensorsFile<R>>,
    names: BTreeMap<String, Entry>,
}

impl<R: RangeRead> ComponentWeights<R> {
    /// A component stored in a diffusers folder's file.
    pub fn from_folder_file(component: Component, file: Arc<SafetensorsFile<R>>) -> Self {
        let names = file
            .tensors()
            .iter()
            .filter(|t| !t.name.ends_with("position_ids"))
            .map(|t| (folder_key_to_diffusers(component, &t.name), Entry { key: t.name.clone(), squeeze: false }))
            .collect();
        ComponentWeights { component, file, names }
    }

    /// The three components of a single-file checkpoint, mapped with `cfg`'s block numbering.
    pub fn from_single_file(file: Arc<SafetensorsFile<R>>, cfg: &PipelineConfig) -> Result<[Self; 3]> {
        let first = |p: &str| file.tensors().iter().any(|t| t.name.starts_with(p));
        if first("cond_stage_model.model.") {
            return Err(Error::Format {
                file: file.name().to_string(),
                tensor: None,
                message: "has an OpenCLIP text encoder (`cond_stage_model.model.*`, Stable Diffusion 2.x): \
                          single-file loading supports SD1.x checkpoints; use the diffusers folder layout"
                    .into(),
            });
        }
        if first("conditioner.embedders.") {
            return Err(Error::Format {
                file: file.name().to_string(),
                tensor: None,
                message: "is an SDXL checkpoint (`conditioner.embedders.*`), which is not supported".into(),
            });
        }
        let mut maps: [BTreeMap<String, Entry>; 3] = Default::default();
        for t in file.tensors() {
            let mapped = compvis_to_diffusers(&t.name, cfg).map_err(|e| match e {
                Error::Format { file: f, tensor, message } if f.is_empty() => {
                    Error::Format { file: file.name().to_string(), tensor, message }
                }
                other => other,
            })?;
            if let Some(Mapped::Param { component, name, squeeze }) = mapped {
                let slot = Component::ALL.iter().position(|&c| c == component).expect("component");
                maps[slot].insert(name, Entry { key: t.name.clone(), squeeze });
            }
        }
        for (c, m) in Component::ALL.iter().zip(&maps) {
            if m.is_empty() {
                let prefix = match c {
                    Component::Unet => "model.diffusion_model.",
                    Component::TextEncoder => "cond_stage_model.transformer.",
                    Component::Vae => "first_stage_model.",
                };
                return Err(Error::Format {
                    file: file.name().to_string(),
                    tensor: None,
                    message: format!(
                        "has no {} tensors (`{prefix}*`); not a Stable Diffusion 1.x single-file checkpoint",
                        c.folder()
                    ),
                });
            }
        }
        let [u, t, v] = maps;
        let make = |component, names| ComponentWeights { component, file: file.clone(), names };
        Ok([make(Component::Unet, u), make(Component::TextEncoder, t), make(Component::Vae, v)])
    }

    pub fn component(&self) -> Component {
        self.component
    }

    /// Every parameter name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The key in the file that holds diffusers parameter `name`.
    pub fn file_key(&self, name: &str) -> Option<&str> {
        self.names.get(name).map(|e| e.key.as_str())
    }

    pub fn file(&self) -> &SafetensorsFile<R> {
        &self.file
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.names.get(name).ok_or_else(|| Error::Format {
            file: self.file.name().to_string(),
            tensor: Some(name.to_string()),
            message: format!(
                "{} parameter is missing; the file is incomplete or made for another model configuration",
                self.component.folder()
            ),
        })
    }

    /// Parameter `name`'s shape as diffusers stores it (1×1 convolution attention weights of
    /// single files squeezed to `[C, C]`).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let e = self.entry(name)?;
        let shape = &self.file.entry(&e.key)?.shape;
        Ok(if e.squeeze { shape.iter().copied().take(2).collect() } else { shape.clone() })
    }

    /// Parameter `name`'s values as f32 with its diffusers shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let e = self.entry(name)?;
        Ok((self.shape(name)?, self.file.read_f32(&e.key)?))
    }
}

impl<R: RangeRead> WeightSource for ComponentWeights<R> {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let e = self.entry(name)?;
        let found = self.file.entry(&e.key)?.shape.clone();
        check_shape(self.file.name(), &e.key, &found, shape)?;
        let values = self.file.read_f32(&e.key)?;
        Tensor::from_f32_as(gpu, shape, &values, dtype).map_err(|err| match err {
            Error::Invalid(m) | Error::Shape { message: m, .. } | Error::DType { message: m, .. } => {
                Error::Format { file: self.file.name().to_string(), tensor: Some(e.key.clone()), message: m }
            }
            other => other,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.file.name(), self.component.folder())
    }
}

// ---------------------------------------------------------------------------------------------
// Files of a model folder

/// Read access to the files of a diffusers folder by relative path (`unet/config.json`):
/// a local directory natively, a picked directory or an HTTP base URL in the browser.
pub trait ModelFiles {
    type Reader: RangeRead;
    /// Opens `path` for range reads, `Ok(None)` when it does not exist.
    fn open(&self, path: &str) -> Result<Option<Self::Reader>>;
    /// Whether `path` exists.
    fn exists(&self, path: &str) -> bool;
    /// `path` as shown in messages.
    fn display(&self, path: &str) -> String;

    /// The text of `path`, `Ok(None)` when it does not exist.
    fn read_text(&self, path: &str) -> Result<Option<String>> {
        let Some(r) = self.open(path)? else { return Ok(None) };
        let mut buf = vec![0u8; r.len() as usize];
        r.read_at(0, &mut buf)?;
        String::from_utf8(buf).map(Some).map_err(|e| Error::Format {
            file: self.display(path),
            tensor: None,
            message: format!("is not UTF-8 text: {e}"),
        })
    }

    /// The text of a file the model needs.
    fn require_text(&self, path: &str, why: &str) -> Result<String> {
        self.read_text(path)?.ok_or_else(|| Error::Io { file: self.display(path), message: format!("missing; {why}") })
    }
}

/// A diffusers folder on the local file system.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Clone, Debug)]
pub struct LocalDir(pub std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl ModelFiles for LocalDir {
    type Reader = crate::io::LocalFile;
    fn open(&self, path: &str) -> Result<Option<Self::Reader>> {
        let p = self.0.join(path);
        if !p.is_file() {
            return Ok(None);
        }
        crate::io::LocalFile::open(p).map(Some)
    }
    fn exists(&self, path: &str) -> bool {
        self.0.join(path).exists()
    }
    fn display(&self, path: &str) -> String {
        self.0.join(path).display().to_string()
    }
}

/// Reads a pipeline's configurations from a diffusers folder (`model_index.json` and each
/// component's config file), checking each.
pub fn read_folder_config<F: ModelFiles>(files: &F) -> Result<(ModelIndex, PipelineConfig)> {
    let why = "a diffusers model folder needs model_index.json, unet/, text_encoder/, vae/ and scheduler/";
    let text = |p: &str| files.require_text(p, why);
    let index = ModelIndex::from_json(&text("model_index.json")?, &files.display("model_index.json"))?;
    let unet = UNetConfig::from_json(&text("unet/config.json")?, &files.display("unet/config.json"))?;
    let text_encoder =
        ClipTextConfig::from_json(&text("text_encoder/config.json")?, &files.display("text_encoder/config.json"))?;
    let vae = VaeConfig::from_json(&text("vae/config.json")?, &files.display("vae/config.json"))?;
    let sched = "scheduler/scheduler_config.json";
    let scheduler = SamplerConfig::from_json(&text(sched)?, &files.display(sched))?;
    Ok((index, PipelineConfig { unet, text_encoder, vae, scheduler }))
}

/// The tokenizer of a diffusers folder (`tokenizer/vocab.json` + `merges.txt` and its
/// configuration files; the standard CLIP table when the folder has none).
pub fn read_folder_tokenizer<F: ModelFiles>(files: &F) -> Result<ClipTokenizer> {
    let named = |r: Result<ClipTokenizer>, path: &str| {
        r.map_err(|e| match e {
            Error::Format { tensor, message, .. } => Error::Format { file: files.display(path), tensor, message },
            other => other,
        })
    };
    let mut tok = match (files.read_text("tokenizer/vocab.json")?, files.read_text("tokenizer/merges.txt")?) {
        (Some(v), Some(m)) => named(ClipTokenizer::from_vocab_merges(&v, &m), "tokenizer/merges.txt")?,
        _ => ClipTokenizer::standard()?,
    };
    for cfg in ["tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json"] {
        if let Some(text) = files.read_text(cfg)? {
            tok = named(tok.with_config_json(&text), cfg)?;
        }
    }
    Ok(tok)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// An opened model: configurations, tokenizer and each component's weights (nothing read yet
/// beyond headers).
pub struct Checkpoint<R: RangeRead> {
    pub layout: Layout,
    pub config: PipelineConfig,
    /// Present for folders.
    pub model_index: Option<ModelIndex>,
    pub tokenizer: ClipTokenizer,
    pub unet: ComponentWeights<R>,
    pub text_encoder: ComponentWeights<R>,
    pub vae: ComponentWeights<R>,
}

/// Errors for pickled checkpoints, which this engine never unpickles.
pub fn refuse_pickle(name: &str) -> Error {
    Error::Format {
        file: name.to_string(),
        tensor: None,
        message: "pickled PyTorch checkpoints (.ckpt/.pt/.pth/.bin) are not loaded (unpickling can run \
                  arbitrary code); convert it to .safetensors first, e.g. with diffusers or the \
                  safetensors converter"
            .into(),
    }
}

/// Whether `name` looks like a pickled checkpoint.
pub fn is_pickle_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".ckpt", ".pt", ".pth", ".bin", ".pkl"].iter().any(|ext| lower.ends_with(ext))
}

impl<R: RangeRead> Checkpoint<R> {
    /// Opens a diffusers folder.
    pub fn open_folder<F: ModelFiles<Reader = R>>(files: &F) -> Result<Self> {
        let (index, config) = read_folder_config(files)?;
        let open = |c: Component| -> Result<ComponentWeights<R>> {
            for f in c.weight_files() {
                let path = format!("{}/{f}", c.folder());
                if let Some(reader) = files.open(&path)? {
                    let file = SafetensorsFile::open(reader, files.display(&path))?;
                    return Ok(ComponentWeights::from_folder_file(c, Arc::new(file)));
                }
            }
            for f in c.pickled_files() {
                let path = format!("{}/{f}", c.folder());
                if files.exists(&path) {
                    return Err(refuse_pickle(&files.display(&path)));
                }
            }
            if files.exists(&format!("{}/{}.index.json", c.folder(), c.weight_files()[0])) {
                return Err(Error::Format {
                    file: files.display(c.folder()),
                    tensor: None,
                    message: "sharded weights (*.safetensors.index.json) are not supported".into(),
                });
            }
            Err(Error::Io {
                file: files.display(&format!("{}/{}", c.folder(), c.weight_files()[0])),
                message: format!("missing (also looked for {})", c.weight_files()[1]),
            })
        };
        let unet = open(Component::Unet)?;
        let text_encoder = open(Component::TextEncoder)?;
        let vae = open(Component::Vae)?;
        let tokenizer = read_folder_tokenizer(files)?;
        Ok(Checkpoint { layout: Layout::Folder, config, model_index: Some(index), tokenizer, unet, text_encoder, vae })
    }

    /// Opens a single-file CompVis checkpoint read through `reader`, with the configuration it
    /// was made for (`PipelineConfig::sd15()` for Stable Diffusion 1.x) and the standard CLIP
    /// tokenizer. `name` (a path or URL) is used in messages.
    pub fn open_single_file(reader: R, name: &str, config: PipelineConfig) -> Result<Self> {
        if is_pickle_name(name) {
            return Err(refuse_pickle(name));
        }
        let file = Arc::new(SafetensorsFile::open(reader, name)?);
        let [unet, text_encoder, vae] = ComponentWeights::from_single_file(file, &config)?;
        Ok(Checkpoint {
            layout: Layout::SingleFile,
            config,
            model_index: None,
            tokenizer: ClipTokenizer::standard()?,
            unet,
            text_encoder,
            vae,
        })
    }

    /// The weights of `component`.
    pub fn weights(&self, component: Component) -> &ComponentWeights<R> {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
            Component::Vae => &self.vae,
        }
    }
}

/// Opens a local model: a diffusers folder, or a single `.safetensors` checkpoint whose
/// configuration comes from `config_dir` (a diffusers folder whose configs and tokenizer
/// describe it, like diffusers' `from_single_file(config=...)`) or else SD1.5's.
#[cfg(not(target_arch = "wasm32"))]
pub fn open_path(
    path: impl AsRef<std::path::Path>,
    config_dir: Option<&std::path::Path>,
) -> Result<Checkpoint<crate::io::LocalFile>> {
    let path = path.as_ref();
    let name = path.display().to_string();
    if path.is_dir() {
        return Checkpoint::open_folder(&LocalDir(path.to_path_buf()));
    }
    if is_pickle_name(&name) {
        return Err(refuse_pickle(&name));
    }
    let reader = crate::io::LocalFile::open(path)?;
    match config_dir {
        Some(dir) => {
            let files = LocalDir(dir.to_path_buf());
            let (_, config) = read_folder_config(&files)?;
            let mut ck = Checkpoint::open_single_file(reader, &name, config)?;
            ck.tokenizer = read_folder_tokenizer(&files)?;
            Ok(ck)
        }
        None => Checkpoint::open_single_file(reader, &name, PipelineConfig::sd15()),
    }
}
