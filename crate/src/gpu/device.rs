//! Adapter and device acquisition, natively (Vulkan / Metal / DX12 / GL) and in the browser
//! (WebGPU). The device gets the adapter's real limits, not wgpu's conservative defaults.

use crate::error::{Error, Result};

/// Choices made when opening the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Do not use `shader-f16` even where the adapter has it (tests the fallback kernels).
    pub disable_f16: bool,
    /// Do not use subgroup operations even where the adapter has them.
    pub disable_subgroups: bool,
    /// Prefer a low-power adapter (integrated GPU) over a discrete one.
    pub low_power: bool,
    /// A ceiling on the GPU bytes held by tensors (live plus kept for reuse): an allocation
    /// that would pass it fails with `Error::OutOfMemory` before any buffer is created. WebGPU
    /// does not tell how much memory an adapter has; this lets a caller stay inside a known
    /// budget (and tests exercise the out-of-memory path). `None`: only the device's own
    /// out-of-memory errors stop an allocation.
    pub memory_limit: Option<u64>,
}

/// What the device can do, as the kernels need to know it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Caps {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub timestamp_query: bool,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_storage_buffers_per_stage: u32,
    pub max_workgroup_storage: u32,
    pub max_invocations_per_workgroup: u32,
    pub max_workgroup_size_x: u32,
    pub max_workgroups_per_dimension: u32,
    pub min_storage_offset_alignment: u32,
}

/// Plain facts about the adapter, for `loralab info` and the web page.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub vendor: u32,
    pub device: u32,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub backend: String,
}

pub(crate) struct Opened {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Caps,
    pub adapter_features: wgpu::Features,
}

/// Mesa's drivers (lavapipe) warn on every start without a valid `XDG_RUNTIME_DIR`: points it at
/// a private 0700 directory when it is unset.
///
/// # Safety
/// Sets an environment variable: call it before other threads read the environment (first
/// thing in `main`, or once inside a test's one-time set-up).
#[cfg(not(target_arch = "wasm32"))]
pub unsafe fn ensure_xdg_runtime_dir() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join("loralab-xdg");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    // SAFETY: the caller guarantees no other thread reads the environment now.
    unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
}

fn instance() -> wgpu::Instance {
    #[cfg(target_arch = "wasm32")]
    {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::BROWSER_WEBGPU;
        wgpu::Instance::new(desc)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        // Honours WGPU_BACKEND (e.g. `gl`) and WGPU_ADAPTER_NAME.
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
    }
}

fn no_adapter_hint() -> &'static str {
    if cfg!(target_arch = "wasm32") {
        "this browser exposes no WebGPU adapter. Use a current Chrome, Edge or Firefox with WebGPU \
         enabled; on Linux Chrome may need chrome://flags/#enable-unsafe-webgpu, and a GPU \
         blocklisted by the browser also gives no adapter"
    } else {
        "no Vulkan, Metal, DX12 or GL driver was found. On Debian/Ubuntu without a GPU install \
         the software driver: `apt-get install mesa-vulkan-drivers libvulkan1`"
    }
}

pub(crate) async fn open(opts: &GpuOptions) -> Result<Opened> {
    let instance = instance();
    let power_preference = if opts.low_power {
        wgpu::PowerPreference::LowPower
    } else {
        wgpu::PowerPreference::HighPerformance
    };
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })
        .await
        .map_err(|e| Error::NoAdapter(format!("{e}: {}", no_adapter_hint())))?;

    let adapter_features = adapter.features();
    let mut features = wgpu::Features::empty();
    let shader_f16 = adapter_features.contains(wgpu::Features::SHADER_F16) && !opts.disable_f16;
    let subgroups = adapter_features.contains(wgpu::Features::SUBGROUP) && !opts.disable_subgroups;
    let timestamp_query = adapter_features.contains(wgpu::Features::TIMESTAMP_QUERY);
    if shader_f16 {
        features |= wgpu::Features::SHADER_F16;
    }
    if subgroups {
        features |= wgpu::Features::SUBGROUP;
    }
    if timestamp_query {
        features |= wgpu::Features::TIMESTAMP_QUERY;
    }

    let limits = requested_limits(&adapter.limits());
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("loralab"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        })
        .await
        .map_err(|e| Error::RequestDevice(e.to_string()))?;

    let info = adapter.get_info();
    let l = device.limits();
    let caps = Caps {
        shader_f16,
        subgroups,
        subgroup_min_size: if subgroups { info.subgroup_min_size } else { 0 },
        subgroup_max_size: if subgroups { info.subgroup_max_size } else { 0 },
        timestamp_query,
        max_buffer_size: l.max_buffer_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
        max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_workgroup_size_x: l.max_compute_workgroup_size_x,
        max_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        min_storage_offset_alignment: l.min_storage_buffer_offset_alignment,
    };
    Ok(Opened { device, queue, info, caps, adapter_features })
}

/// The adapter's own limits for everything compute work depends on; the rest at WebGPU's
/// defaults (so no limit tied to an unrequested feature is asked for).
fn requested_limits(a: &wgpu::Limits) -> wgpu::Limits {
    let d = wgpu::Limits::downlevel_defaults();
    wgpu::Limits {
        max_bind_groups: a.max_bind_groups,
        max_bindings_per_bind_group: a.max_bindings_per_bind_group,
        max_storage_buffers_per_shader_stage: a.max_storage_buffers_per_shader_stage,
        max_uniform_buffers_per_shader_stage: a.max_uniform_buffers_per_shader_stage,
        max_dynamic_storage_buffers_per_pipeline_layout: a
            .max_dynamic_storage_buffers_per_pipeline_layout,
        max_dynamic_uniform_buffers_per_pipeline_layout: a
            .max_dynamic_uniform_buffers_per_pipeline_layout,
        max_uniform_buffer_binding_size: a.max_uniform_buffer_binding_size,
        max_storage_buffer_binding_size: a.max_storage_buffer_binding_size,
        max_buffer_size: a.max_buffer_size,
        max_compute_workgroup_storage_size: a.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: a.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size_x: a.max_compute_workgroup_size_x,
        max_compute_workgroup_size_y: a.max_compute_workgroup_size_y,
        max_compute_workgroup_size_z: a.max_compute_workgroup_size_z,
        max_compute_workgroups_per_dimension: a.max_compute_workgroups_per_dimension,
        min_storage_buffer_offset_alignment: a.min_storage_buffer_offset_alignment,
        min_uniform_buffer_offset_alignment: a.min_uniform_buffer_offset_alignment,
        max_texture_dimension_1d: a.max_texture_dimension_1d.min(d.max_texture_dimension_1d.max(8192)),
        max_texture_dimension_2d: a.max_texture_dimension_2d.min(d.max_texture_dimension_2d.max(8192)),
        ..d
    }
}

impl AdapterSummary {
    pub(crate) fn from_info(info: &wgpu::AdapterInfo) -> Self {
        Self {
            name: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            backend: format!("{:?}", info.backend),
        }
    }
}
