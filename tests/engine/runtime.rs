//! The runtime itself: limits, pool, pipeline cache, errors, readback.

use crate::common::*;
use loralab::quant::{self, DType};
use loralab::{Error, Tensor};

#[test]
fn device_gets_the_adapters_real_limits() {
    let gpu = gpu();
    let caps = gpu.caps();
    // wgpu's defaults are 128 MiB binding / 256 MiB buffer; the adapter's own are used.
    assert!(caps.max_storage_buffer_binding_size >= 128 << 20, "{caps:?}");
    assert!(caps.max_invocations_per_workgroup >= 256);
    assert!(caps.max_storage_buffers_per_stage >= 8);
    let plain = gpu_plain().caps();
    assert!(!plain.shader_f16 && !plain.subgroups);
}

#[test]
fn round_trip_every_dtype() {
    let gpu = gpu();
    for dt in DType::ALL {
        for (r, c) in [(1, 1), (3, 37), (16, 64)] {
            let x = randn(r * c, 3);
            let t = Tensor::from_f32_as(gpu, &[r, c], &x, dt).unwrap();
            let y = read(gpu, &t);
            assert_eq!(y, quant::round_trip(&x, r, c, dt), "{dt} {r}x{c}");
        }
    }
}

#[test]
fn zeros_are_zero_even_from_a_recycled_buffer() {
    let gpu = gpu();
    {
        let _junk = Tensor::from_f32(gpu, &[1000], &vec![7.0; 1000]).unwrap();
    }
    let z = Tensor::zeros(gpu, &[1000]).unwrap();
    assert!(read(gpu, &z).iter().all(|v| *v == 0.0));
}

#[test]
fn pool_reuses_buffers() {
    let gpu = gpu_plain();
    let before = gpu.memory();
    for _ in 0..10 {
        let t = Tensor::zeros(gpu, &[12345]).unwrap();
        drop(t);
    }
    let after = gpu.memory();
    // Every iteration after the first takes the buffer the previous one returned.
    assert!(after.peak_live_bytes <= before.peak_live_bytes.max(before.live_bytes) + 2 * 12345 * 4 + 4096);
}

#[test]
fn pipelines_are_cached_per_variant() {
    let gpu = gpu();
    let x = Tensor::from_f32(gpu, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let _ = loralab::ops::elementwise::silu(gpu, &x).unwrap();
    let n = gpu.pipeline_count();
    for _ in 0..5 {
        let _ = loralab::ops::elementwise::silu(gpu, &x).unwrap();
    }
    assert_eq!(gpu.pipeline_count(), n);
}

#[test]
fn oversized_buffers_are_refused_with_a_clear_error() {
    let gpu = gpu();
    let n = (gpu.caps().max_storage_buffer_binding_size / 4 + 1) as usize;
    match Tensor::empty(gpu, &[n]) {
        Err(Error::TooLarge { bytes, limit, .. }) => assert!(bytes > limit),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn wrong_data_length_is_an_error() {
    let e = Tensor::from_f32(gpu(), &[2, 3], &[1.0; 5]).unwrap_err();
    assert!(e.to_string().contains("5 values"), "{e}");
}

#[test]
fn a_broken_shader_is_an_error_not_stale_data() {
    // Compile a deliberately invalid variant through the real pipeline path.
    let gpu = gpu();
    let r = gpu.dispatch(
        "elementwise.wgsl",
        "no_such_entry",
        &loralab::shader::Defines::new(),
        &[0],
        &[],
        [1, 1, 1],
    );
    assert!(matches!(r, Err(Error::UnknownShader(_))), "{r:?}");
}

#[test]
fn a_shader_that_fails_to_compile_is_a_shader_error() {
    // A real kernel with an impossible tile (zero-sized workgroup): WGSL validation fails
    // inside the pipeline build's error scope and comes back as Error::Shader naming the
    // variant, and the device stays usable.
    let gpu = block(loralab::Gpu::new(Default::default())).unwrap();
    let defines = loralab::shader::Defines::new()
        .value("HEAD_DIM", "40u")
        .value("BQ", "0u")
        .value("BK", "48u");
    let x = Tensor::zeros(&gpu, &[4]).unwrap();
    let r = gpu.dispatch("attention.wgsl", "attention", &defines, &[0, 0, 0, 0], &[(1, x.buffer())], [1, 1, 1]);
    match r {
        Err(Error::Shader { shader, defines, message, .. }) => {
            assert_eq!(shader, "attention.wgsl");
            assert!(defines.contains("BQ=0u"), "{defines}");
            assert!(!message.is_empty());
        }
        other => panic!("expected a shader error, got {other:?}"),
    }
    let y = loralab::ops::elementwise::silu(&gpu, &x).unwrap();
    assert_eq!(read(&gpu, &y), vec![0.0; 4]);
}

#[test]
fn device_loss_is_reported() {
    // A private device, destroyed: every later call is an error, not a hang.
    let gpu = block(loralab::Gpu::new(Default::default())).unwrap();
    let x = Tensor::from_f32(&gpu, &[4], &[1.0; 4]).unwrap();
    gpu.destroy();
    let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
    let r = loralab::ops::elementwise::silu(&gpu, &x).and_then(|y| block(y.to_f32(&gpu)));
    assert!(matches!(r, Err(Error::DeviceLost(_))), "{r:?}");
}

#[test]
fn device_loss_completes_the_lost_future_and_a_new_device_works() {
    let gpu = block(loralab::Gpu::new(Default::default())).unwrap();
    let waiting = gpu.lost();
    gpu.destroy();
    let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
    let why = block(waiting);
    assert!(why.contains("Destroyed"), "{why}");
    // Asked after the loss, it completes at once with the same reason.
    assert_eq!(block(gpu.lost()), why);
    assert!(matches!(gpu.check_lost(), Err(Error::DeviceLost(_))));
    // A device opened afterwards computes as before.
    let fresh = block(loralab::Gpu::new(Default::default())).unwrap();
    let x = Tensor::from_f32(&fresh, &[3], &[-1.0, 0.0, 2.0]).unwrap();
    let y = block(loralab::ops::elementwise::silu(&fresh, &x).unwrap().to_f32(&fresh)).unwrap();
    let want: Vec<f32> = [-1.0f32, 0.0, 2.0].iter().map(|v| v / (1.0 + (-v).exp())).collect();
    assert_nmse("silu after a device loss", &y, &want, F32_BOUND);
}

#[test]
fn memory_limit_is_an_out_of_memory_error_before_allocating() {
    const MIB: usize = 1 << 20;
    let gpu = block(loralab::Gpu::new(loralab::GpuOptions { memory_limit: Some(32 << 20), ..Default::default() })).unwrap();
    let a = Tensor::empty(&gpu, &[5 * MIB]).unwrap(); // 20 MiB
    let before = gpu.memory().live_bytes;
    let e = Tensor::empty(&gpu, &[4 * MIB]).unwrap_err(); // 16 MiB more
    match &e {
        Error::OutOfMemory { bytes, message, .. } => {
            assert_eq!(*bytes, 16 << 20);
            assert!(message.contains("33554432-byte memory limit"), "{message}");
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let text = e.to_string();
    assert!(text.contains("smaller image size") && text.contains("q4_0"), "{text}");
    assert_eq!(gpu.memory().live_bytes, before, "nothing was allocated");
    // Once the first tensor is gone (its buffer kept for reuse), the pool makes room.
    drop(a);
    let b = Tensor::from_f32(&gpu, &[4 * MIB], &vec![0.5; 4 * MIB]).unwrap();
    let y = block(loralab::ops::elementwise::silu(&gpu, &b).unwrap().to_f32(&gpu)).unwrap();
    assert!((y[4 * MIB - 1] - 0.5 / (1.0 + (-0.5f32).exp())).abs() < 1e-6);
    // 16 MiB live and 16 MiB kept: 20 MiB more do not fit; without the limit they do.
    let e = Tensor::empty(&gpu, &[5 * MIB]).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    gpu.set_memory_limit(None);
    Tensor::empty(&gpu, &[5 * MIB]).unwrap();
}

#[test]
fn a_generation_past_the_memory_limit_fails_and_the_next_one_works() {
    use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, StepProgress, WeightPlan};
    let gpu = block(loralab::Gpu::new(Default::default())).unwrap();
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-sd15-a");
    let ck = loralab::model::checkpoint::open_path(&folder, None).unwrap();
    let pipe = StableDiffusionPipeline::load(&gpu, ck, WeightPlan::new(DType::F16)).unwrap();
    let opts = GenerateOptions { prompt: "a red cube".into(), steps: 2, seed: 5, ..Default::default() };
    let run = |o: &GenerateOptions| block(pipe.generate(&gpu, o, &mut |_: &StepProgress<'_>| {}));
    let first = run(&opts).unwrap();
    // An image whose first UNet activation exceeds the adapter's largest buffer is refused
    // before any work (no prompt encoded, no noise drawn: it returns at once).
    let side = 8 * 2048;
    let huge = GenerateOptions { width: Some(side), height: Some(side), ..opts.clone() };
    let t = std::time::Instant::now();
    match run(&huge) {
        Err(e @ Error::TooLarge { .. }) => {
            let text = e.to_string();
            assert!(text.contains("a 16384x16384 image") && text.contains("use a smaller image"), "{text}");
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|o| o.image_shape)),
    }
    assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
    // Room for the weights and twice the 64x64 generation's activations; 16 times the pixels
    // need far more.
    gpu.trim();
    let m = gpu.memory();
    gpu.set_memory_limit(Some(m.live_bytes + 2 * (m.peak_live_bytes - m.live_bytes)));
    let big = GenerateOptions { width: Some(256), height: Some(256), ..opts.clone() };
    match run(&big) {
        Err(e @ Error::OutOfMemory { .. }) => assert!(e.to_string().contains("smaller image size"), "{e}"),
        other => panic!("expected OutOfMemory, got {:?}", other.map(|o| o.image_shape)),
    }
    gpu.trim();
    let again = run(&opts).unwrap();
    assert_eq!(first.image, again.image, "the same image after the failed generation");
}
