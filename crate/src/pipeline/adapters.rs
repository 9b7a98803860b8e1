//! Unmerged adapters on the pipeline: any number of adapter files, each with a text-encoder
//! and a UNet strength, installed into the loaded models without touching their weights
//! (`crate::adapter`). Strength changes rewrite a few words per adapted layer; a component
//! released under the low-memory options gets the same adapters back when it reloads.
//!
//! Also here: A1111's `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>` prompt tags
//! ([`StableDiffusionPipeline::apply_prompt_tags`]) and textual-inversion embeddings
//! ([`StableDiffusionPipeline::add_embedding`]).

use super::{invalid, Slot, StableDiffusionPipeline};
use crate::adapter::fuse::{FuseReport, Originals};
use crate::adapter::{self, InstallReport, Installed};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lora::blocks::{BlockLayout, BlockWeights};
use crate::lora::{LoraFile, Target};
use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::weights::WeightSource;
use crate::model::textual_inversion::{self, TextualInversion};
use crate::nn::VisitLayers;
use crate::prompt::{match_adapter, parse_prompt};
use std::sync::Arc;

/// The adapters set on a pipeline.
#[derive(Default)]
pub(super) struct AdapterState {
    /// Rows of the tokens added by embeddings (re-applied when the text encoder reloads).
    pub(super) embedding_rows: Vec<f32>,
    /// Trigger words of the embeddings bundled in the adapter files, added with them.
    bundled: Vec<String>,
    files: Vec<Arc<LoraFile>>,
    /// (text encoder, UNet) strength per file.
    strengths: Vec<(f32, f32)>,
    /// Per-block multipliers per file (empty: all 1).
    blocks: Vec<BlockWeights>,
    te: Installed,
    unet: Installed,
    /// After [`StableDiffusionPipeline::fuse_adapters`]: the original weights (text encoder, UNet).
    fused: Option<(Originals, Originals)>,
}

/// What [`StableDiffusionPipeline::set_adapters`] installed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdapterReport {
    pub text_encoder: InstallReport,
    pub unet: InstallReport,
    /// Per file: partial matches (how many of its layers matched).
    pub warnings: Vec<String>,
}

/// Takes the model out of its slot (loading it when released), runs `f`, puts it back.
async fn with_model<T: VisitLayers, R>(
    slot: &Slot<T>,
    what: &str,
    load: impl FnOnce(&dyn WeightSource) -> Result<T>,
    f: impl AsyncFnOnce(&mut T) -> Result<R>,
) -> Result<R> {
    let arc = slot.get(what, load)?;
    let taken = slot.lock().take();
    drop(taken);
    let mut model = Arc::try_unwrap(arc).map_err(|_| invalid(format!("the {what} is in use")))?;
    let r = f(&mut model).await;
    *slot.lock() = Some(Arc::new(model));
    r
}

/// Applies `f` to the model when it is on the GPU (a released model picks up the state when
/// it reloads).
fn if_resident<T>(slot: &Slot<T>, what: &str, f: impl FnOnce(&mut T)) -> Result<()> {
    let mut guard = slot.lock();
    if let Some(arc) = guard.as_mut() {
        let m = Arc::get_mut(arc).ok_or_else(|| invalid(format!("the {what} is in use")))?;
        f(m);
    }
    Ok(())
}

impl StableDiffusionPipeline {
    /// Loads the text encoder from `src` (after a release) with the current adapters.
    pub(super) fn reload_text_encoder(&self, gpu: &Gpu, src: &dyn WeightSource) -> Result<ClipTextModel> {
        let c = &self.text_encoder_config;
        let mut m = ClipTextModel::load_with_table(gpu, c, src, self.plan.text_encoder, self.token_table)?;
        adapter::attach(&mut m, &self.adapters.te);
        if !self.adapters.embedding_rows.is_empty() {
            m.set_added_token_rows(gpu, &self.adapters.embedding_rows)?;
        }
        Ok(m)
    }

    /// Loads the UNet from `src` (after a release) with the current adapters.
    pub(super) fn reload_unet(&self, gpu: &Gpu, src: &dyn WeightSource) -> Result<UNet2DConditionModel> {
        let mut m = UNet2DConditionModel::load(gpu, &self.unet_config, src, self.plan.unet)?;
        adapter::attach(&mut m, &self.adapters.unet);
        Ok(m)
    }

    /// The adapter files set, in order, with their (text encoder, UNet) strengths.
    pub fn adapters(&self) -> Vec<(Arc<LoraFile>, (f32, f32))> {
        self.adapters.files.iter().cloned().zip(self.adapters.strengths.iter().copied()).collect()
    }

    /// Replaces the pipeline's adapters with `files` at `strengths` ((text encoder, UNet) per
    /// file). A file none of whose layers exist in this model is refused with counts and
    /// examples; a partial match is installed with a warning. The base weights are untouched.
    pub async fn set_adapters(
        &mut self,
        gpu: &Gpu,
        files: Vec<Arc<LoraFile>>,
        strengths: Vec<(f32, f32)>,
    ) -> Result<AdapterReport> {
        if files.len() != strengths.len() {
            return Err(invalid(format!("{} adapter files but {} strengths", files.len(), strengths.len())));
        }
        self.not_fused()?;
        let refs: Vec<&LoraFile> = files.iter().map(|f| f.as_ref()).collect();
        let te_s: Vec<f32> = strengths.iter().map(|s| s.0).collect();
        let unet_s: Vec<f32> = strengths.iter().map(|s| s.1).collect();
        // Clear what was installed first, so a reload during installation sees no stale data.
        self.adapters = AdapterState {
            embedding_rows: std::mem::take(&mut self.adapters.embedding_rows),
            bundled: std::mem::take(&mut self.adapters.bundled),
            ..Default::default()
        };
        let this = &*self;
        let (te_report, te) = with_model(
            &this.text_encoder,
            "text encoder",
            |src| this.reload_text_encoder(gpu, src),
            async |m: &mut ClipTextModel| {
                let r = adapter::install(gpu, m, Target::TextEncoder, &refs, &te_s).await?;
                Ok((r, adapter::snapshot(m)))
            },
        )
        .await?;
        let (unet_report, unet) = with_model(
            &this.unet,
            "UNet",
            |src| this.reload_unet(gpu, src),
            async |m: &mut UNet2DConditionModel| {
                let r = adapter::install(gpu, m, Target::Unet, &refs, &unet_s).await?;
                Ok((r, adapter::snapshot(m)))
            },
        )
        .await?;
        let mut report = AdapterReport { text_encoder: te_report, unet: unet_report, warnings: vec![] };
        for f in &files {
            let total = f.layers.len();
            let missing: Vec<&(String, usize, Vec<String>)> = report
                .text_encoder
                .unmatched
                .iter()
                .chain(&report.unet.unmatched)
                .filter(|(name, _, _)| *name == f.file)
                .collect();
            let missed: usize = missing.iter().map(|m| m.1).sum();
            if total > 0 && missed == total {
                self.clear_adapters(gpu)?;
                let examples: Vec<&String> = missing.iter().flat_map(|m| m.2.iter()).take(5).collect();
                return Err(Error::Format {
                    file: f.file.clone(),
                    tensor: None,
                    message: format!(
                        "none of its {total} adapter layers exists in this model (e.g. {}); it was made for another \
                         base model (its metadata says {:?})",
                        examples.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
                        f.base
                    ),
                });
            }
            if missed > 0 {
                report.warnings.push(format!(
                    "{}: {} of {total} adapter layers matched this model; {missed} were skipped (e.g. `{}`)",
                    f.file,
                    total - missed,
                    missing.iter().flat_map(|m| m.2.iter()).next().map_or("", |s| s.as_str())
                ));
            }
        }
        self.sync_bundled_embeddings(gpu, &files, &mut report.warnings)?;
        self.adapters = AdapterState {
            embedding_rows: std::mem::take(&mut self.adapters.embedding_rows),
            bundled: std::mem::take(&mut self.adapters.bundled),
            files,
            strengths,
            blocks: vec![],
            te,
            unet,
            fused: None,
        };
        Ok(report)
    }

    /// Makes the embeddings bundled in `files` (A1111's `bundle_emb`, e.g. a learned trigger
    /// word) the loaded bundled embeddings: those of earlier files go, these are added. A
    /// token already taken (by an embedding loaded on its own, or by an earlier file) is
    /// skipped with a warning.
    fn sync_bundled_embeddings(&mut self, gpu: &Gpu, files: &[Arc<LoraFile>], warnings: &mut Vec<String>) -> Result<()> {
        self.remove_bundled_embeddings(gpu)?;
        for f in files {
            for e in &f.embeddings {
                match self.add_embedding(gpu, e) {
                    Ok(_) => self.adapters.bundled.push(e.token.clone()),
                    Err(err) => warnings.push(format!("{}: its bundled embedding `{}` is not loaded: {err}", f.file, e.token)),
                }
            }
        }
        Ok(())
    }

    /// Removes the embeddings the adapter files brought.
    fn remove_bundled_embeddings(&mut self, gpu: &Gpu) -> Result<()> {
        for token in std::mem::take(&mut self.adapters.bundled) {
            self.remove_embedding(gpu, &token)?;
        }
        Ok(())
    }

    /// Removes every adapter (embeddings stay, except those bundled in the adapter files).
    pub fn clear_adapters(&mut self, gpu: &Gpu) -> Result<()> {
        self.not_fused()?;
        self.remove_bundled_embeddings(gpu)?;
        self.adapters = AdapterState {
            embedding_rows: std::mem::take(&mut self.adapters.embedding_rows),
            bundled: std::mem::take(&mut self.adapters.bundled),
            ..Default::default()
        };
        if_resident(&self.text_encoder, "text encoder", |m| adapter::clear(m))?;
        if_resident(&self.unet, "UNet", |m| adapter::clear(m))
    }

    /// Changes the strengths ((text encoder, UNet) per file, in the order of
    /// [`set_adapters`](Self::set_adapters)): a few words per adapted layer are rewritten.
    pub fn set_adapter_strengths(&mut self, gpu: &Gpu, strengths: &[(f32, f32)]) -> Result<()> {
        self.not_fused()?;
        if strengths.len() != self.adapters.files.len() {
            return Err(invalid(format!(
                "{} strengths for {} adapter files",
                strengths.len(),
                self.adapters.files.len()
            )));
        }
        let te_s: Vec<f32> = strengths.iter().map(|s| s.0).collect();
        let unet_s: Vec<f32> = strengths.iter().map(|s| s.1).collect();
        let blocks = &self.adapters.blocks;
        let layout = BlockLayout::new(&self.unet_config);
        let weight = |target: Target, name: &str, i: usize| blocks.get(i).map_or(1.0, |b| b.weight(&layout, target, name));
        self.adapters.te.set_strengths_by_layer(gpu, &te_s, &|name, i| weight(Target::TextEncoder, name, i))?;
        self.adapters.unet.set_strengths_by_layer(gpu, &unet_s, &|name, i| weight(Target::Unet, name, i))?;
        self.adapters.strengths = strengths.to_vec();
        let (te, unet) = (&self.adapters.te, &self.adapters.unet);
        if_resident(&self.text_encoder, "text encoder", |m| adapter::attach(m, te))?;
        if_resident(&self.unet, "UNet", |m| adapter::attach(m, unet))
    }

    /// Sets per-block strength multipliers (A1111's LoRA Block Weight), one [`BlockWeights`]
    /// per file in the order of [`set_adapters`](Self::set_adapters): each layer's strength is
    /// the file's (text encoder or UNet) strength times its block's weight, written as a strength
    /// change (no upload). [`set_adapters`](Self::set_adapters) resets them to 1.
    pub fn set_block_weights(&mut self, gpu: &Gpu, blocks: Vec<BlockWeights>) -> Result<()> {
        if blocks.len() != self.adapters.files.len() {
            return Err(invalid(format!("{} block weight sets for {} adapter files", blocks.len(), self.adapters.files.len())));
        }
        self.adapters.blocks = blocks;
        let strengths = self.adapters.strengths.clone();
        self.set_adapter_strengths(gpu, &strengths)
    }

    /// The per-block multipliers of each file (all 1 unless set).
    pub fn block_weights(&self) -> Vec<BlockWeights> {
        (0..self.adapters.files.len()).map(|i| self.adapters.blocks.get(i).cloned().unwrap_or_default()).collect()
    }

    /// The adapters' display names (file stems), which prompt tags refer to.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.files.iter().map(|f| f.display_name()).collect()
    }

    /// A1111 prompt tags: removes `<lora:NAME:W>` / `<lora:NAME:TE_W:UNET_W>` (and `<lyco:…>`)
    /// from the prompt and the negative prompt and sets each named adapter's strengths to the
    /// tag's (adapters not named keep theirs). Names match the loaded adapters' file stems
    /// (exactly, then ignoring case). Returns notes about tags of other kinds, which are
    /// removed and ignored.
    pub fn apply_prompt_tags(&mut self, gpu: &Gpu, opts: &mut super::GenerateOptions) -> Result<Vec<String>> {
        let pos = parse_prompt(&opts.prompt)?;
        let neg = parse_prompt(&opts.negative)?;
        let names = self.adapter_names();
        let mut strengths = self.adapters.strengths.clone();
        for tag in pos.loras.iter().chain(&neg.loras) {
            let i = match_adapter(&tag.name, &names).map_err(|e| invalid(format!("prompt tag `{}`: {e}", tag.tag)))?;
            strengths[i] = (tag.te_weight, tag.unet_weight);
        }
        let notes: Vec<String> = pos
            .other
            .iter()
            .chain(&neg.other)
            .map(|t| format!("prompt tag `{t}` is not a LoRA tag and was ignored"))
            .collect();
        if strengths != self.adapters.strengths {
            self.set_adapter_strengths(gpu, &strengths)?;
        }
        opts.prompt = pos.text;
        opts.negative = neg.text;
        Ok(notes)
    }

    /// The prompt text without tags; tags must agree with the adapters' strengths (set by
    /// [`apply_prompt_tags`](Self::apply_prompt_tags)), so a tag is never silently ignored.
    pub(super) fn untagged(&self, text: &str) -> Result<String> {
        let p = parse_prompt(text)?;
        let names = self.adapter_names();
        for tag in &p.loras {
            let i = match_adapter(&tag.name, &names).map_err(|e| invalid(format!("prompt tag `{}`: {e}", tag.tag)))?;
            if self.adapters.strengths[i] != (tag.te_weight, tag.unet_weight) {
                return Err(invalid(format!(
                    "prompt tag `{}` asks for other strengths than the adapter has; apply the prompt's tags first \
                     (StableDiffusionPipeline::apply_prompt_tags)",
                    tag.tag
                )));
            }
        }
        Ok(p.text)
    }

    /// Loads a textual-inversion embedding: its trigger word (and `word_1`, … for more
    /// vectors) becomes usable in prompts. Returns the token ids.
    pub fn add_embedding(&mut self, gpu: &Gpu, embedding: &TextualInversion) -> Result<Vec<u32>> {
        // Load the text encoder when it was released.
        drop(self.text_encoder.get("text encoder", |src| self.reload_text_encoder(gpu, src))?);
        let tokenizer = &mut self.tokenizer;
        let rows = &mut self.adapters.embedding_rows;
        let mut guard = self.text_encoder.lock();
        let m = guard
            .as_mut()
            .and_then(Arc::get_mut)
            .ok_or_else(|| invalid("the text encoder is in use or not loaded"))?;
        let ids = textual_inversion::add_embedding(gpu, tokenizer, m, embedding)?;
        *rows = m.added_token_rows().to_vec();
        Ok(ids)
    }

    /// Removes the embedding with this trigger word.
    pub fn remove_embedding(&mut self, gpu: &Gpu, token: &str) -> Result<()> {
        drop(self.text_encoder.get("text encoder", |src| self.reload_text_encoder(gpu, src))?);
        let mut guard = self.text_encoder.lock();
        let m = guard
            .as_mut()
            .and_then(Arc::get_mut)
            .ok_or_else(|| invalid("the text encoder is in use or not loaded"))?;
        textual_inversion::remove_embedding(gpu, &mut self.tokenizer, m, token)?;
        self.adapters.embedding_rows = m.added_token_rows().to_vec();
        Ok(())
    }

    /// The loaded embeddings: (trigger word, vectors).
    pub fn embeddings(&self) -> Vec<(String, usize)> {
        textual_inversion::embeddings(&self.tokenizer)
    }

    fn not_fused(&self) -> Result<()> {
        if self.adapters.fused.is_some() {
            return Err(invalid("the adapters are fused into the weights; unfuse them first"));
        }
        Ok(())
    }

    /// Whether the adapters are fused into the weights.
    pub fn adapters_fused(&self) -> bool {
        self.adapters.fused.is_some()
    }

    /// Merges the adapters, at their current strengths, into the loaded weights (diffusers'
    /// `fuse_lora`): the same images, without the adapters' per-step cost. On quantized
    /// weights the merge is requantized; the report's [`FuseReport::warning`] says when that
    /// lost a noticeable part of an adapter. The original weights are kept for
    /// [`unfuse_adapters`](Self::unfuse_adapters). Not available with the low-memory options
    /// (a released component would reload without the merge); `loralab merge` writes a merged
    /// model file instead.
    pub async fn fuse_adapters(&mut self, gpu: &Gpu) -> Result<(FuseReport, FuseReport)> {
        self.not_fused()?;
        if self.text_encoder.source.is_some() || self.unet.source.is_some() {
            return Err(invalid(
                "fusing needs the text encoder and UNet resident; it is not available with the low-memory options",
            ));
        }
        if self.adapters.blocks.iter().any(|b| !b.is_uniform()) {
            return Err(invalid("per-block weights are set; fusing applies whole-file strengths only, so reset them first"));
        }
        let files = self.adapters.files.clone();
        let refs: Vec<&LoraFile> = files.iter().map(|f| f.as_ref()).collect();
        let te_s: Vec<f32> = self.adapters.strengths.iter().map(|s| s.0).collect();
        let unet_s: Vec<f32> = self.adapters.strengths.iter().map(|s| s.1).collect();
        let this = &*self;
        let (te_orig, te_rep) = with_model(
            &this.text_encoder,
            "text encoder",
            |src| this.reload_text_encoder(gpu, src),
            async |m: &mut ClipTextModel| adapter::fuse::fuse(gpu, m, Target::TextEncoder, &refs, &te_s).await,
        )
        .await?;
        let unet = with_model(
            &this.unet,
            "UNet",
            |src| this.reload_unet(gpu, src),
            async |m: &mut UNet2DConditionModel| adapter::fuse::fuse(gpu, m, Target::Unet, &refs, &unet_s).await,
        )
        .await;
        let (unet_orig, unet_rep) = match unet {
            Ok(r) => r,
            Err(e) => {
                // Leave nothing half-fused.
                if_resident(&self.text_encoder, "text encoder", |m| adapter::fuse::unfuse(m, &te_orig))?;
                self.reattach()?;
                return Err(e);
            }
        };
        self.adapters.te = Installed::default();
        self.adapters.unet = Installed::default();
        self.adapters.fused = Some((te_orig, unet_orig));
        Ok((te_rep, unet_rep))
    }

    /// Restores the weights from before [`fuse_adapters`](Self::fuse_adapters) and applies the
    /// adapters unmerged again, at the same strengths.
    pub async fn unfuse_adapters(&mut self, gpu: &Gpu) -> Result<()> {
        let Some((te, unet)) = self.adapters.fused.take() else {
            return Err(invalid("no adapters are fused"));
        };
        if_resident(&self.text_encoder, "text encoder", |m| adapter::fuse::unfuse(m, &te))?;
        if_resident(&self.unet, "UNet", |m| adapter::fuse::unfuse(m, &unet))?;
        let (files, strengths) = (self.adapters.files.clone(), self.adapters.strengths.clone());
        self.set_adapters(gpu, files, strengths).await?;
        Ok(())
    }

    fn reattach(&mut self) -> Result<()> {
        let (te, unet) = (&self.adapters.te, &self.adapters.unet);
        if_resident(&self.text_encoder, "text encoder", |m| adapter::attach(m, te))?;
        if_resident(&self.unet, "UNet", |m| adapter::attach(m, unet))
    }
}
