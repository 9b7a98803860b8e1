//! The trainable adapters of a UNet or a CLIP text encoder: one LoRA (linear layers) or LoCon
//! (convolutions) per target layer, their gradient buffers, and the named tensors the optimizer
//! and exporters use.
//!
//! The text encoder's targets are kohya's: every linear layer of each `CLIPAttention`
//! (`q_proj`, `k_proj`, `v_proj`, `out_proj`) and `CLIPMLP` (`fc1`, `fc2`) of the layers the
//! prompt embedding is taken from, named `lora_te_text_model_encoder_layers_<i>_…`.
//!
//! Layout per layer, as kohya sd-scripts' `LoRAModule` holds it: `down` (`lora_down`, A) and
//! `up` (`lora_up`, B) f32 GPU tensors, `alpha`, and the scale `alpha / rank`; a linear layer
//! has `down: [R, K]`, `up: [N, R]`, a convolution `down: [R, Cin, k, k]` (the base's kernel,
//! stride and padding), `up: [Cout, R, 1, 1]`. The adapted layer computes
//! `y = W₀·x + b + (alpha / R)·B·(A·x)`.
//!
//! Initialisation is kohya's: A as torch's default `nn.Linear` / `nn.Conv2d` weight init
//! (`kaiming_uniform_(a = √5)`, i.e. uniform in `±1/√fan_in`, `fan_in = K` or `Cin·k·k`),
//! drawn from [`crate::rng::Rng`] seeded with the config's seed, layers in the model's order;
//! B = 0, so training starts from the base model's output.

use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::lora::{BaseModel, Delta, Format, HostTensor, LayerAdapter, LoraFile, Metadata, Target};
use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::nn::{LayerMut, VisitLayers};
use crate::ops::conv::Conv2dParams;
use crate::ops::grad::activation::accumulate;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Which layers get an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// `to_q`, `to_k`, `to_v` and `to_out.0` of every transformer block's `attn1` and `attn2`.
    Attn,
    /// [`Targets::Attn`] plus the feed-forward (`ff.net.0.proj`, `ff.net.2`) and each
    /// transformer's `proj_in` / `proj_out`: every linear and 1×1 layer of the
    /// `Transformer2DModel`s, kohya's default UNet target set.
    AttnFf,
    /// [`Targets::AttnFf`] plus what kohya's `conv_dim` adds (its `ResnetBlock2D`,
    /// `Downsample2D` and `Upsample2D` targets): LoCon on every resnet's 3×3 `conv1` / `conv2`
    /// and the down/upsamplers' `conv` (rank [`LoraConfig::conv_rank`]), and LoRA of the
    /// linear rank on the resnets' `time_emb_proj` and 1×1 `conv_shortcut`.
    AttnFfConv,
}

impl Targets {
    /// `attn`, `attn+ff` or `attn+ff+conv`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "attn" => Ok(Targets::Attn),
            "attn+ff" => Ok(Targets::AttnFf),
            "attn+ff+conv" => Ok(Targets::AttnFfConv),
            other => Err(Error::Invalid(format!(
                "unknown LoRA target set `{other}`; use attn, attn+ff or attn+ff+conv"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Targets::Attn => "attn",
            Targets::AttnFf => "attn+ff",
            Targets::AttnFfConv => "attn+ff+conv",
        }
    }

    /// Whether the UNet module `module` (a diffusers module path) is a target.
    pub fn selects(self, module: &str) -> bool {
        const ATTN: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
        let in_block = module.contains(".transformer_blocks.");
        let attn = in_block
            && ["attn1", "attn2"]
                .iter()
                .any(|a| ATTN.iter().any(|p| module.ends_with(&format!(".{a}.{p}"))));
        let ff = in_block && (module.ends_with(".ff.net.0.proj") || module.ends_with(".ff.net.2"));
        let proj = module.contains(".attentions.")
            && !in_block
            && (module.ends_with(".proj_in") || module.ends_with(".proj_out"));
        let resnet = module.contains(".resnets.")
            && ["conv1", "conv2", "time_emb_proj", "conv_shortcut"].iter().any(|p| module.ends_with(&format!(".{p}")));
        let sampler = module.ends_with(".downsamplers.0.conv") || module.ends_with(".upsamplers.0.conv");
        match self {
            Targets::Attn => attn,
            Targets::AttnFf => attn || ff || proj,
            Targets::AttnFfConv => attn || ff || proj || resnet || sampler,
        }
    }
}

/// Settings of a new set of adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub targets: Targets,
    /// Rank of linear and 1×1 layers (kohya `network_dim`).
    pub rank: usize,
    /// kohya `network_alpha`.
    pub alpha: f32,
    /// Rank of 3×3 convolutions (kohya `conv_dim`).
    pub conv_rank: usize,
    /// kohya `conv_alpha`.
    pub conv_alpha: f32,
    /// Seed of A's initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// kohya's defaults: rank 4, alpha 1, attention layers only.
    fn default() -> Self {
        Self { targets: Targets::Attn, rank: 4, alpha: 1.0, conv_rank: 4, conv_alpha: 1.0, seed: 0 }
    }
}

/// How an adapted layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraKind {
    /// A linear layer: `down: [R, K]`, `up: [N, R]`.
    Linear,
    /// A 1×1 convolution the engine runs as a linear layer on the token layout (a transformer's
    /// `proj_in` / `proj_out` without `use_linear_projection`): trained as [`LoraKind::Linear`],
    /// written to files as `[R, K, 1, 1]` / `[N, R, 1, 1]`.
    Pointwise,
    /// A convolution: `down: [R, Cin, k, k]`, `up: [Cout, R, 1, 1]`.
    Conv { kernel: usize, params: Conv2dParams },
}

/// One layer's adapter and its gradients.
pub struct LoraLayer {
    /// The model it adapts.
    pub target: Target,
    /// diffusers (UNet) or transformers (text encoder) module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub module: String,
    pub kind: LoraKind,
    pub rank: usize,
    pub alpha: f32,
    /// A (`lora_down`).
    pub down: Tensor,
    /// B (`lora_up`).
    pub up: Tensor,
    /// dLoss/dA, accumulated by each backward pass until [`LoraParams::zero_grads`].
    pub d_down: Tensor,
    /// dLoss/dB.
    pub d_up: Tensor,
}

impl LoraLayer {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The kohya key prefix: `lora_unet_` or `lora_te_` and the module path with `_` for `.`.
    pub fn kohya_prefix(&self) -> String {
        let model = match self.target {
            Target::Unet => "unet",
            Target::TextEncoder => "te",
        };
        format!("lora_{model}_{}", self.module.replace('.', "_"))
    }

    /// Shapes of `down` and `up` as adapter files store them.
    pub fn file_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let (d, u) = (self.down.shape().to_vec(), self.up.shape().to_vec());
        match self.kind {
            LoraKind::Pointwise => ([d, vec![1, 1]].concat(), [u, vec![1, 1]].concat()),
            _ => (d, u),
        }
    }

    /// Adds one backward pass's gradients to `d_down` / `d_up`.
    pub(super) fn accumulate(&self, gpu: &Gpu, d_down: &Tensor, d_up: &Tensor) -> Result<()> {
        accumulate(gpu, &self.d_down, &d_down.reshape(self.d_down.shape())?, 1.0)?;
        accumulate(gpu, &self.d_up, &d_up.reshape(self.d_up.shape())?, 1.0)
    }
}

/// A trainable tensor with its gradient, named by its kohya key.
pub struct Trainable<'a> {
    /// `lora_unet_<module>.lora_down.weight` (`lora_te_…` on the text encoder) or
    /// `….lora_up.weight`.
    pub name: String,
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
}

/// Every adapter of a UNet or a text encoder, in the model's layer order.
pub struct LoraParams {
    layers: Vec<LoraLayer>,
    config: LoraConfig,
}

impl LoraParams {
    /// New adapters on the target layers of `model` (A initialised, B = 0, gradients 0).
    pub fn new(gpu: &Gpu, model: &mut UNet2DConditionModel, config: &LoraConfig) -> Result<Self> {
        if config.rank == 0 || (config.targets == Targets::AttnFfConv && config.conv_rank == 0) {
            return Err(Error::Invalid(format!(
                "LoRA rank {} / conv rank {} must be at least 1",
                config.rank, config.conv_rank
            )));
        }
        let pointwise_proj = !model.config().use_linear_projection;
        let mut found: Vec<(String, LoraKind, Vec<usize>)> = vec![];
        model.visit_layers(&mut |layer| match layer {
            LayerMut::Linear(l) if config.targets.selects(&l.name) => {
                let is_proj = l.name.ends_with(".proj_in") || l.name.ends_with(".proj_out");
                let kind = if is_proj && pointwise_proj { LoraKind::Pointwise } else { LoraKind::Linear };
                found.push((l.name.clone(), kind, l.weight.shape().to_vec()));
            }
            LayerMut::Conv2d(c) if config.targets.selects(&c.name) => {
                let kind = LoraKind::Conv { kernel: c.weight.shape().get(2).copied().unwrap_or(1), params: c.params };
                found.push((c.name.clone(), kind, c.weight.shape().to_vec()));
            }
            _ => {}
        });
        Self::create(gpu, found, config, Target::Unet, Rng::new(config.seed))
    }

    /// New adapters on the text encoder's attention and MLP projections of its first `layers`
    /// encoder layers (those the prompt embedding is computed from); rank and alpha as the
    /// config's linear ones, A seeded from the config's seed (another stream than the UNet's).
    pub fn new_text_encoder(gpu: &Gpu, model: &mut ClipTextModel, config: &LoraConfig, layers: usize) -> Result<Self> {
        if config.rank == 0 {
            return Err(Error::Invalid("LoRA rank 0 must be at least 1".into()));
        }
        const PROJECTIONS: [&str; 6] =
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"];
        let selects = |name: &str| {
            let Some(rest) = name.strip_prefix("text_model.encoder.layers.") else { return false };
            let Some((i, module)) = rest.split_once('.') else { return false };
            i.parse::<usize>().is_ok_and(|i| i < layers) && PROJECTIONS.contains(&module)
        };
        let mut found: Vec<(String, LoraKind, Vec<usize>)> = vec![];
        model.visit_layers(&mut |layer| {
            if let LayerMut::Linear(l) = layer {
                if selects(&l.name) {
                    found.push((l.name.clone(), LoraKind::Linear, l.weight.shape().to_vec()));
                }
            }
        });
        let config = LoraConfig { targets: Targets::Attn, ..config.clone() };
        Self::create(gpu, found, &config, Target::TextEncoder, Rng::new(config.seed ^ 0x7465_7874_656e_636f))
    }

    /// No adapters: a structure that trains nothing of the model's own layers, for a
    /// backward that only carries gradients through (e.g. to a learned token embedding).
    pub fn none(config: &LoraConfig) -> Self {
        Self { layers: Vec::new(), config: config.clone() }
    }

    fn create(
        gpu: &Gpu,
        found: Vec<(String, LoraKind, Vec<usize>)>,
        config: &LoraConfig,
        target: Target,
        mut rng: Rng,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(found.len());
        for (module, kind, w) in found {
            let (rank, alpha) = match kind {
                LoraKind::Conv { kernel, .. } if kernel > 1 => (config.conv_rank, config.conv_alpha),
                _ => (config.rank, config.alpha),
            };
            let (down_shape, up_shape) = match (kind, w.as_slice()) {
                (LoraKind::Conv { .. }, [cout, cin, kh, kw]) => (vec![rank, *cin, *kh, *kw], vec![*cout, rank, 1, 1]),
                (LoraKind::Linear | LoraKind::Pointwise, [n, k]) => (vec![rank, *k], vec![*n, rank]),
                _ => return Err(shape_err("LoraParams", format!("{module}: unexpected weight shape {w:?}"))),
            };
            let fan_in: usize = down_shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a = rng.uniform_vec(down_shape.iter().product(), -bound, bound);
            layers.push(LoraLayer {
                target,
                module,
                kind,
                rank,
                alpha,
                down: Tensor::from_f32(gpu, &down_shape, &a)?,
                up: Tensor::zeros(gpu, &up_shape)?,
                d_down: Tensor::zeros(gpu, &down_shape)?,
                d_up: Tensor::zeros(gpu, &up_shape)?,
            });
        }
        if layers.is_empty() {
            return Err(Error::Invalid(match target {
                Target::Unet => format!("the UNet has no `{}` layers to adapt", config.targets.name()),
                Target::TextEncoder => "the text encoder has no attention or MLP layers to adapt".into(),
            }));
        }
        Ok(Self { layers, config: config.clone() })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn layers(&self) -> &[LoraLayer] {
        &self.layers
    }

    /// Index of the adapter on `module`.
    pub fn find(&self, module: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.module == module)
    }

    pub fn get(&self, module: &str) -> Option<&LoraLayer> {
        self.layers.iter().find(|l| l.module == module)
    }

    pub(super) fn layer(&self, i: usize) -> Result<&LoraLayer> {
        self.layers.get(i).ok_or_else(|| Error::Invalid(format!("no adapter number {i} ({} adapters)", self.layers.len())))
    }

    /// Overwrites the adapter on `module` with `down` and `up` values (row-major, in the
    /// layer's `down` / `up` shapes; resuming training, tests).
    pub fn set(&self, gpu: &Gpu, module: &str, down: &[f32], up: &[f32]) -> Result<()> {
        let l = self
            .get(module)
            .ok_or_else(|| Error::Invalid(format!("no adapter on `{module}` (targets {})", self.config.targets.name())))?;
        for (what, t, v) in [("down", &l.down, down), ("up", &l.up, up)] {
            if v.len() != t.numel() {
                return Err(shape_err(
                    "LoraParams::set",
                    format!("{module}: {} {what} values for shape {:?}", v.len(), t.shape()),
                ));
            }
            gpu.write(t.buffer(), 0, bytemuck::cast_slice(v))?;
        }
        Ok(())
    }

    /// Sets every gradient to 0 (before accumulating the next step's).
    pub fn zero_grads(&self, gpu: &Gpu) {
        for l in &self.layers {
            gpu.zero(l.d_down.buffer());
            gpu.zero(l.d_up.buffer());
        }
    }

    /// Every trainable tensor with its gradient (for the optimizer, gradient clipping and
    /// exporters), down before up, layers in order.
    pub fn trainable(&self) -> Vec<Trainable<'_>> {
        let mut out = Vec::with_capacity(2 * self.layers.len());
        for l in &self.layers {
            let p = l.kohya_prefix();
            out.push(Trainable { name: format!("{p}.lora_down.weight"), param: &l.down, grad: &l.d_down });
            out.push(Trainable { name: format!("{p}.lora_up.weight"), param: &l.up, grad: &l.d_up });
        }
        out
    }

    /// Number of trainable values.
    pub fn param_count(&self) -> usize {
        self.layers.iter().map(|l| l.down.numel() + l.up.numel()).sum()
    }

    /// GPU bytes of the parameters and their gradients.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.down.bytes() + l.up.bytes() + l.d_down.bytes() + l.d_up.bytes()).sum()
    }

    /// The current adapters as an in-memory kohya-layout adapter file, for installing into an
    /// inference model ([`crate::adapter::install`]) or writing.
    pub async fn to_lora_file(&self, gpu: &Gpu, name: &str) -> Result<LoraFile> {
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut algorithms = vec![];
        for l in &self.layers {
            let (ds, us) = l.file_shapes();
            let down = HostTensor::new(ds, l.down.to_f32(gpu).await?)?;
            let up = HostTensor::new(us, l.up.to_f32(gpu).await?)?;
            let delta = Delta::LowRank { down, up, mid: None, scale: l.scale() };
            algorithms.push(delta.algorithm());
            layers.push(LayerAdapter {
                target: l.target,
                module: l.module.clone(),
                key: l.kohya_prefix(),
                delta,
                dora: None,
                alpha: Some(l.alpha),
            });
        }
        algorithms.sort();
        algorithms.dedup();
        let bytes = 4 * self.param_count() as u64;
        Ok(LoraFile {
            file: name.to_string(),
            format: Format::Kohya,
            algorithms,
            layers,
            metadata: Metadata::default(),
            unrecognised: vec![],
            other_components: vec![],
            base: BaseModel::Unknown,
            base_reason: None,
            bytes,
            dtypes: vec!["F32".into()],
            warnings: vec![],
            embeddings: vec![],
        })
    }
}
