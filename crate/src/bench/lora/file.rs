//! Parse and install throughput: a kohya-format file written with the safetensors writer to a
//! temporary file (to memory on wasm32), read back with [`read_lora`], installed into the UNet
//! and a text encoder.

use super::{check_install, synth, FileBench, LoraBenchOptions, FILE_RANK, QUICK_FILE_RANK};
use crate::adapter;
use crate::bench::unet::BenchShapes;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::lora::{read_lora, Target};
use crate::model::clip::ClipTextModel;
use crate::model::random_weights::RandomWeights;
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::WeightPlan;
use crate::quant::DType;
use synth::TargetLayer;

/// Removes a file when dropped.
#[cfg(not(target_arch = "wasm32"))]
struct TempFile(std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the kohya file, reads it back, installs it into `unet` and a text encoder.
pub(super) async fn run_file(
    gpu: &Gpu,
    s: &BenchShapes,
    unet: &mut UNet2DConditionModel,
    dt: DType,
    opts: &LoraBenchOptions,
    clock: &dyn Fn() -> f64,
) -> Result<FileBench> {
    let r = opts.file_rank.unwrap_or(if opts.quick { QUICK_FILE_RANK } else { FILE_RANK });
    let alpha = (r as f32 / 2.0).max(1.0);
    let plan = WeightPlan::new(dt);
    let table = crate::pipeline::token_table_dtype(&s.text_encoder, gpu.caps().max_storage_buffer_binding_size);
    let mut te = ClipTextModel::load_with_table(
        gpu,
        &s.text_encoder,
        &RandomWeights::new(opts.seed, "text_encoder"),
        plan.text_encoder,
        table,
    )?;
    let unet_layers = synth::target_layers(unet, Target::Unet);
    let te_layers = synth::target_layers(&mut te, Target::TextEncoder);
    let all: Vec<TargetLayer> = unet_layers.iter().chain(&te_layers).cloned().collect();
    let linear_proj = s.unet.use_linear_projection;
    let conv_1x1 = move |l: &TargetLayer| {
        !linear_proj && l.target == Target::Unet && (l.module.ends_with(".proj_in") || l.module.ends_with(".proj_out"))
    };
    let seed = opts.seed.wrapping_add(0x5eed);

    #[cfg(not(target_arch = "wasm32"))]
    let (t_write, t_parse, lora, file_bytes, source) = {
        let path = std::env::temp_dir().join(format!("loralab-bench-lora-{}.safetensors", std::process::id()));
        let name = path.display().to_string();
        let guard = TempFile(path.clone());
        let t0 = clock();
        let f = std::fs::File::create(&path).map_err(|e| Error::Io { file: name.clone(), message: e.to_string() })?;
        let w = synth::write_kohya(std::io::BufWriter::new(f), &name, &all, &conv_1x1, r, alpha, seed)?;
        let f = w.into_inner().map_err(|e| Error::Io { file: name.clone(), message: e.to_string() })?;
        f.sync_all().map_err(|e| Error::Io { file: name.clone(), message: e.to_string() })?;
        drop(f);
        let t_write = clock() - t0;
        let t0 = clock();
        let file = crate::io::safetensors::SafetensorsFile::open_path(&path)?;
        let lora = read_lora(&file)?;
        let t_parse = clock() - t0;
        let bytes = std::fs::metadata(&path).map_err(|e| Error::Io { file: name.clone(), message: e.to_string() })?.len();
        drop((file, guard));
        (t_write, t_parse, lora, bytes, "temporary file".to_string())
    };
    #[cfg(target_arch = "wasm32")]
    let (t_write, t_parse, lora, file_bytes, source) = {
        let name = "loralab-bench-lora.safetensors";
        let t0 = clock();
        let buf = synth::write_kohya(Vec::new(), name, &all, &conv_1x1, r, alpha, seed)?;
        let t_write = clock() - t0;
        let bytes = buf.len() as u64;
        let t0 = clock();
        let file = crate::io::safetensors::SafetensorsFile::open(buf, name)?;
        let lora = read_lora(&file)?;
        let t_parse = clock() - t0;
        (t_write, t_parse, lora, bytes, "memory".to_string())
    };
    if lora.layers.len() != all.len() {
        return Err(Error::Invalid(format!(
            "bench lora: the written file has {} layers, {} were read back",
            all.len(),
            lora.layers.len()
        )));
    }

    adapter::clear(unet);
    let t0 = clock();
    let ru = adapter::install(gpu, unet, Target::Unet, &[&lora], &[1.0]).await?;
    let rt = adapter::install(gpu, &mut te, Target::TextEncoder, &[&lora], &[1.0]).await?;
    gpu.sync().await?;
    let t_install = clock() - t0;
    check_install(&ru, "UNet", unet_layers.len(), 1)?;
    check_install(&rt, "text encoder", te_layers.len(), 1)?;
    adapter::clear(unet);
    drop(te);
    gpu.sync().await?;
    let mb_s = |ms: f64| if ms > 0.0 { file_bytes as f64 / 1e6 / (ms / 1e3) } else { 0.0 };
    Ok(FileBench {
        format: "kohya (lora_unet_* / lora_te_*, lora_down / lora_up / alpha, f16)".into(),
        rank: r,
        alpha,
        unet_layers: unet_layers.len(),
        text_encoder_layers: te_layers.len(),
        file_bytes,
        source,
        write_ms: t_write,
        parse_ms: t_parse,
        parse_mb_s: mb_s(t_parse),
        install_ms: t_install,
        install_mb_s: mb_s(t_install),
        adapter_gpu_bytes: ru.bytes + rt.bytes,
        weights: dt.name().into(),
    })
}
