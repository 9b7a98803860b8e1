//! The GPU runtime: device and limits, pipeline cache, buffer pool, command recording and
//! asynchronous readback.
//!
//! Ops record compute passes into one pending command encoder; it is submitted when a result
//! is read, when `flush` is called, or every few hundred passes.

mod device;
mod pipeline;
pub mod pool;
pub mod readback;

pub use device::{AdapterSummary, Caps, GpuOptions};
#[cfg(not(target_arch = "wasm32"))]
pub use device::ensure_xdg_runtime_dir;
pub use pipeline::PipelineKey;
pub use pool::{GpuBuffer, PoolStats};

use crate::error::{Error, Result};
use crate::shader::Defines;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// Fresh buffers of at least this many bytes are created inside an out-of-memory error scope
/// (smaller ones cannot plausibly fail alone, and every scope costs a round trip in browsers).
const OOM_SCOPE_BYTES: u64 = 16 << 20;

/// An out-of-memory scope around a buffer's creation that the browser resolves later:
/// (what it was for, bytes, the buffer, the scope's result).
#[cfg(target_arch = "wasm32")]
type AllocScope = (String, u64, wgpu::Buffer, std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>);

/// Passes recorded before the encoder is submitted on its own.
const PASSES_PER_SUBMIT: u32 = 128;

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    passes: u32,
    /// Uniform parameters of the recorded dispatches, one `UNIFORM_SLOT`-byte slot each,
    /// written to `Gpu::uniforms` right before the submit.
    params: Vec<u8>,
}

/// Bytes per dispatch in the shared uniform buffer (WebGPU's largest
/// `minUniformBufferOffsetAlignment`, 256, so every slot offset is valid everywhere).
const UNIFORM_SLOT: usize = 256;

/// One bound storage buffer of a dispatch: (binding index, buffer).
pub type Bind<'a> = (u32, &'a GpuBuffer);

/// The engine's handle on one GPU device.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    caps: Caps,
    adapter_features: wgpu::Features,
    pipelines: pipeline::PipelineCache,
    pool: Arc<pool::Pool>,
    pending: Mutex<Pending>,
    /// One uniform buffer for the parameters of every dispatch of a submit (slots of
    /// `UNIFORM_SLOT` bytes). Reusing it across submits is safe: a queue write is ordered after
    /// the work submitted before it.
    uniforms: wgpu::Buffer,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    /// Futures completed with the reason when the device is lost.
    lost_waiters: Arc<Mutex<Vec<readback::Sender<String>>>>,
    /// `GpuOptions::memory_limit` in bytes; 0: none.
    memory_limit: std::sync::atomic::AtomicU64,
    #[cfg(target_arch = "wasm32")]
    scopes: std::cell::RefCell<Vec<pipeline::PendingScope>>,
    #[cfg(target_arch = "wasm32")]
    alloc_scopes: std::cell::RefCell<Vec<AllocScope>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gpu {
    /// Opens the best adapter with its real limits and the optional features it has.
    pub async fn new(opts: GpuOptions) -> Result<Self> {
        let o = device::open(&opts).await?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        {
            let errors = Arc::clone(&errors);
            o.device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                lock(&errors).push(e.to_string());
            }));
        }
        let lost_waiters: Arc<Mutex<Vec<readback::Sender<String>>>> = Arc::default();
        {
            let lost = Arc::clone(&lost);
            let waiters = Arc::clone(&lost_waiters);
            o.device.set_device_lost_callback(move |reason, msg| {
                let why = format!("{reason:?}: {msg}");
                *lock(&lost) = Some(why.clone());
                for w in std::mem::take(&mut *lock(&waiters)) {
                    w.send(why.clone());
                }
            });
        }
        // Keep at most a quarter of the largest buffer (min 256 MiB) of freed buffers for reuse.
        let keep = (o.caps.max_buffer_size / 4).max(256 << 20);
        let uniforms = o.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dispatch parameters"),
            size: (PASSES_PER_SUBMIT as usize * UNIFORM_SLOT) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Self {
            pool: pool::Pool::new(o.device.clone(), keep),
            device: o.device,
            queue: o.queue,
            info: o.info,
            caps: o.caps,
            adapter_features: o.adapter_features,
            pipelines: Default::default(),
            pending: Mutex::new(Pending { encoder: None, passes: 0, params: Vec::new() }),
            uniforms,
            errors,
            lost,
            lost_waiters,
            memory_limit: opts.memory_limit.unwrap_or(0).into(),
            #[cfg(target_arch = "wasm32")]
            scopes: Default::default(),
            #[cfg(target_arch = "wasm32")]
            alloc_scopes: Default::default(),
        })
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    pub fn adapter(&self) -> AdapterSummary {
        AdapterSummary::from_info(&self.info)
    }

    /// Feature names the adapter offers (whether or not they were enabled).
    pub fn adapter_features(&self) -> Vec<String> {
        self.adapter_features.iter_names().map(|(n, _)| n.to_string()).collect()
    }

    pub fn memory(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Restarts `memory().peak_live_bytes` from the bytes live now.
    pub fn reset_peak_memory(&self) {
        self.pool.reset_peak();
    }

    /// Number of compiled pipelines.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// Frees buffers kept for reuse.
    pub fn trim(&self) {
        self.pool.trim();
    }

    /// `Err(DeviceLost)` once the device is gone.
    pub fn check_lost(&self) -> Result<()> {
        match lock(&self.lost).as_ref() {
            Some(m) => Err(Error::DeviceLost(m.clone())),
            None => Ok(()),
        }
    }

    /// Takes the errors the device reported outside error scopes since the last call.
    pub fn take_errors(&self) -> Result<()> {
        let errs: Vec<String> = std::mem::take(&mut *lock(&self.errors));
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Gpu(errs.join("; ")))
        }
    }

    /// Destroys the device (used to test device-loss handling).
    pub fn destroy(&self) {
        self.device.destroy();
    }

    /// Changes `GpuOptions::memory_limit` (`None`: no limit); buffers held now stay.
    pub fn set_memory_limit(&self, bytes: Option<u64>) {
        self.memory_limit.store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes with the reason once the device is lost (at once when it already is): a
    /// driver reset, `destroy`, or the browser reclaiming the GPU.
    pub fn lost(&self) -> readback::OneShot<String> {
        let (tx, rx) = readback::oneshot();
        let mut waiters = lock(&self.lost_waiters);
        match lock(&self.lost).clone() {
            Some(why) => tx.send(why),
            None => waiters.push(tx),
        }
        rx
    }

    /// A storage buffer of `bytes` bytes from the pool. Refuses sizes the device cannot bind
    /// (`TooLarge`) and, before creating anything, allocations past `GpuOptions::memory_limit`
    /// (`OutOfMemory`); a fresh large buffer is created inside an out-of-memory error scope, so
    /// the device running out of memory is an `OutOfMemory` error (natively at once, in the
    /// browser at the next `sync` / `read`), never a broken buffer used later.
    pub fn alloc(&self, bytes: u64, what: &str) -> Result<GpuBuffer> {
        self.check_lost()?;
        let limit = self.caps.max_storage_buffer_binding_size.min(self.caps.max_buffer_size);
        if bytes > limit {
            return Err(Error::TooLarge { what: what.to_string(), bytes, limit });
        }
        let class = pool::size_class(bytes);
        if self.pool.has_free(class) {
            return Ok(self.pool.alloc(bytes));
        }
        let cap = self.memory_limit.load(std::sync::atomic::Ordering::Relaxed);
        if cap > 0 {
            let s = self.pool.stats();
            if s.live_bytes + s.free_bytes + class > cap {
                self.pool.trim();
            }
            let live = self.pool.stats().live_bytes;
            if live + class > cap {
                return Err(Error::OutOfMemory {
                    what: what.to_string(),
                    bytes,
                    message: format!("{live} bytes are in use of the {cap}-byte memory limit"),
                });
            }
        }
        if class < OOM_SCOPE_BYTES {
            return Ok(self.pool.alloc(bytes));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.pool.alloc(bytes);
        let popped = scope.pop();
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(Some(e)) = readback::poll_now(popped) {
            self.pool.poison(buf.raw());
            return Err(Error::OutOfMemory { what: what.to_string(), bytes, message: e.to_string() });
        }
        #[cfg(target_arch = "wasm32")]
        self.alloc_scopes.borrow_mut().push((what.to_string(), bytes, buf.raw().clone(), Box::pin(popped)));
        Ok(buf)
    }

    /// Uploads bytes into a new pooled buffer.
    pub fn upload(&self, data: &[u8], what: &str) -> Result<GpuBuffer> {
        let padded = data.len().next_multiple_of(4);
        let buf = self.alloc(padded as u64, what)?;
        // Commands recorded so far may still read this recycled buffer: submit them first, so
        // the write lands after them in queue order.
        self.flush();
        if data.len() == padded {
            self.queue.write_buffer(buf.raw(), 0, data);
        } else {
            let mut v = data.to_vec();
            v.resize(padded, 0);
            self.queue.write_buffer(buf.raw(), 0, &v);
        }
        Ok(buf)
    }

    /// Overwrites bytes of `buf` from `offset` (a multiple of 4; `data.len()` a multiple of 4),
    /// after every command recorded so far (so dispatches already recorded see the old bytes).
    pub fn write(&self, buf: &GpuBuffer, offset: u64, data: &[u8]) -> Result<()> {
        self.check_lost()?;
        if !offset.is_multiple_of(4) || !data.len().is_multiple_of(4) || offset + data.len() as u64 > buf.size() {
            return Err(Error::Invalid(format!(
                "write of {} bytes at {offset} into a buffer of {} bytes",
                data.len(),
                buf.size()
            )));
        }
        self.flush();
        self.queue.write_buffer(buf.raw(), offset, data);
        Ok(())
    }

    /// Records a compute dispatch. `params` go to a uniform at binding 0 (when non-empty);
    /// `binds` are storage buffers at the given binding indices.
    pub fn dispatch(
        &self,
        shader: &'static str,
        entry: &'static str,
        defines: &Defines,
        params: &[u32],
        binds: &[Bind<'_>],
        workgroups: [u32; 3],
    ) -> Result<()> {
        self.check_lost()?;
        if workgroups.contains(&0) {
            return Ok(());
        }
        let maxd = self.caps.max_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > maxd) {
            return Err(Error::TooLarge {
                what: format!("dispatch of {workgroups:?} workgroups ({shader})"),
                bytes: *workgroups.iter().max().unwrap_or(&0) as u64,
                limit: maxd as u64,
            });
        }
        let key = PipelineKey { shader, entry, defines: defines.clone() };
        let p = self.pipelines.get(
            &self.device,
            &key,
            #[cfg(target_arch = "wasm32")]
            &self.scopes,
        )?;
        let mut words = params.to_vec();
        words.resize(params.len().next_multiple_of(4), 0);
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let mut pending = lock(&self.pending);
        // Parameters go to this dispatch's slot of the shared uniform buffer (a buffer of its
        // own only when they do not fit a slot).
        let own = (bytes.len() > UNIFORM_SLOT).then(|| {
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
        });
        let mut slot = None;
        if !bytes.is_empty() && own.is_none() {
            if pending.params.len() + UNIFORM_SLOT > PASSES_PER_SUBMIT as usize * UNIFORM_SLOT {
                self.submit_locked(&mut pending);
            }
            let offset = pending.params.len();
            pending.params.extend_from_slice(bytes);
            pending.params.resize(offset + UNIFORM_SLOT, 0);
            slot = Some(offset as u64);
        }
        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = Vec::with_capacity(binds.len() + 1);
        if let Some(u) = &own {
            entries.push(wgpu::BindGroupEntry { binding: 0, resource: u.as_entire_binding() });
        } else if let Some(offset) = slot {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.uniforms,
                    offset,
                    size: std::num::NonZeroU64::new(bytes.len() as u64),
                }),
            });
        }
        for (binding, buf) in binds {
            entries.push(wgpu::BindGroupEntry { binding: *binding, resource: buf.binding() });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(shader),
            layout: &p.layout,
            entries: &entries,
        });
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(shader),
                timestamp_writes: None,
            });
            pass.set_pipeline(&p.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        pending.passes += 1;
        if pending.passes >= PASSES_PER_SUBMIT {
            self.submit_locked(&mut pending);
        }
        Ok(())
    }

    /// Splits `groups` workgroups over x and y so neither exceeds the per-dimension limit.
    /// Shaders recover the linear index as `wg.x + wg.y * num_workgroups.x`.
    pub fn grid(&self, groups: u32) -> [u32; 3] {
        let maxd = self.caps.max_workgroups_per_dimension.max(1);
        if groups <= maxd {
            [groups, 1, 1]
        } else {
            let y = groups.div_ceil(maxd);
            [groups.div_ceil(y), y, 1]
        }
    }

    /// Records a buffer-to-buffer copy.
    pub fn copy(&self, src: &GpuBuffer, src_offset: u64, dst: &GpuBuffer, dst_offset: u64, bytes: u64) {
        self.copy_raw(src.raw(), src_offset, dst.raw(), dst_offset, bytes);
    }

    fn copy_raw(&self, src: &wgpu::Buffer, src_offset: u64, dst: &wgpu::Buffer, dst_offset: u64, bytes: u64) {
        let mut pending = lock(&self.pending);
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
    }

    /// Records zero-filling of a buffer's requested range.
    pub fn zero(&self, buf: &GpuBuffer) {
        let mut pending = lock(&self.pending);
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        encoder.clear_buffer(buf.raw(), 0, Some(buf.size().next_multiple_of(4)));
    }

    fn submit_locked(&self, pending: &mut Pending) {
        if !pending.params.is_empty() {
            self.queue.write_buffer(&self.uniforms, 0, &pending.params);
            pending.params.clear();
        }
        if let Some(enc) = pending.encoder.take() {
            self.queue.submit(Some(enc.finish()));
        }
        pending.passes = 0;
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) {
        let mut pending = lock(&self.pending);
        self.submit_locked(&mut pending);
    }

    /// Surfaces shader build errors the browser reports asynchronously, then errors the device
    /// reported outside scopes, then device loss.
    async fn settle_errors(&self) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let allocs: Vec<_> = self.alloc_scopes.borrow_mut().drain(..).collect();
            let mut failed = None;
            for (what, bytes, buffer, fut) in allocs {
                if let Some(e) = fut.await {
                    self.pool.poison(&buffer);
                    failed.get_or_insert(Error::OutOfMemory { what, bytes, message: e.to_string() });
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            let scopes: Vec<_> = self.scopes.borrow_mut().drain(..).collect();
            for (label, fut) in scopes {
                if let Some(e) = fut.await {
                    return Err(Error::Shader {
                        shader: label,
                        entry: String::new(),
                        defines: String::new(),
                        message: e.to_string(),
                    });
                }
            }
        }
        self.check_lost()?;
        self.take_errors()
    }

    /// Submits pending work and waits until the GPU has finished it.
    pub async fn sync(&self) -> Result<()> {
        self.flush();
        let (tx, rx) = readback::oneshot::<()>();
        self.queue.on_submitted_work_done(move || tx.send(()));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        rx.await;
        self.settle_errors().await
    }

    /// Copies `bytes` bytes of `buf` (from offset 0) to the host.
    pub async fn read(&self, buf: &GpuBuffer, bytes: u64) -> Result<Vec<u8>> {
        self.check_lost()?;
        let size = bytes.next_multiple_of(4).max(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.copy_raw(buf.raw(), 0, &staging, 0, size);
        self.flush();
        let (tx, rx) = readback::oneshot();
        staging.map_async(wgpu::MapMode::Read, .., move |r| tx.send(r));
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Readback(e.to_string()))?;
        let mapped = rx.await;
        self.settle_errors().await?;
        mapped.map_err(|e| Error::Readback(e.to_string()))?;
        let data = {
            let view = staging.get_mapped_range(..).map_err(|e| Error::Readback(e.to_string()))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        staging.destroy();
        Ok(data)
    }
}
