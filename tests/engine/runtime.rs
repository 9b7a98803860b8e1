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
