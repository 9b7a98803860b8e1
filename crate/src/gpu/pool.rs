//! Storage buffers recycled by size class. A buffer returns to the pool when its last tensor is
//! dropped; reuse is safe without waiting for the GPU because WebGPU executes passes in queue
//! order, so a later write to a recycled buffer always follows every earlier read of it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Usage of every pooled buffer: bound as storage, copied from (readback) and to (upload).
pub const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Rounds a request up to its size class: at most 1/8 wasted, 256-byte minimum, multiple of 16.
pub fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let top = 63 - (b - 1).leading_zeros() as u64; // floor(log2(b - 1))
    let step = 1u64 << top.saturating_sub(3);
    b.div_ceil(step) * step
}

#[derive(Default)]
struct Inner {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    free_bytes: u64,
    live_bytes: u64,
    peak_live_bytes: u64,
    /// Buffers the device failed to create (out of memory): released, never reused.
    poisoned: HashSet<wgpu::Buffer>,
}

/// Counters for memory reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Bytes held by tensors now.
    pub live_bytes: u64,
    /// Largest `live_bytes` seen.
    pub peak_live_bytes: u64,
    /// Bytes kept for reuse.
    pub free_bytes: u64,
}

pub struct Pool {
    device: wgpu::Device,
    inner: Mutex<Inner>,
    /// Free buffers beyond this many bytes are released instead of kept.
    keep_bytes: u64,
}

impl Pool {
    pub fn new(device: wgpu::Device, keep_bytes: u64) -> Arc<Self> {
        Arc::new(Self { device, inner: Mutex::new(Inner::default()), keep_bytes })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of at least `bytes` bytes; its contents are unspecified.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> GpuBuffer {
        let class = size_class(bytes);
        let mut inner = self.lock();
        let reused = inner.free.get_mut(&class).and_then(|v| v.pop());
        let buffer = match reused {
            Some(b) => {
                inner.free_bytes -= class;
                b
            }
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: class,
                usage: STORAGE_USAGE,
                mapped_at_creation: false,
            }),
        };
        inner.live_bytes += class;
        inner.peak_live_bytes = inner.peak_live_bytes.max(inner.live_bytes);
        GpuBuffer { buffer: Some(buffer), size: bytes, pool: Arc::clone(self) }
    }

    /// Whether a freed buffer of size class `class` is kept for reuse.
    pub fn has_free(&self, class: u64) -> bool {
        self.lock().free.get(&class).is_some_and(|v| !v.is_empty())
    }

    /// Marks `buffer` as failed (the device could not create it): when its tensor lets it go it
    /// is released instead of kept for reuse.
    pub fn poison(&self, buffer: &wgpu::Buffer) {
        self.lock().poisoned.insert(buffer.clone());
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        let class = buffer.size();
        let mut inner = self.lock();
        inner.live_bytes -= class;
        if inner.poisoned.remove(&buffer) {
            drop(buffer);
        } else if inner.free_bytes + class <= self.keep_bytes {
            inner.free_bytes += class;
            inner.free.entry(class).or_default().push(buffer);
        } else {
            // Dropped, not destroyed: commands recorded but not yet submitted may still use
            // it, and wgpu frees it once they no longer need it.
            drop(buffer);
        }
    }

    /// Releases every buffer kept for reuse (dropped, not destroyed: pending commands may
    /// still use them).
    pub fn trim(&self) {
        let mut inner = self.lock();
        inner.free.clear();
        inner.free_bytes = 0;
    }

    /// Restarts peak tracking from the bytes live now (for measuring one phase's peak).
    pub fn reset_peak(&self) {
        let mut inner = self.lock();
        inner.peak_live_bytes = inner.live_bytes;
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            live_bytes: inner.live_bytes,
            peak_live_bytes: inner.peak_live_bytes,
            free_bytes: inner.free_bytes,
        }
    }
}

/// A pooled storage buffer; `size` is what was asked for (the buffer may be larger).
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    size: u64,
    pool: Arc<Pool>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer is present until drop")
    }
    /// Bytes requested for this buffer.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The whole requested range as a binding.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: self.raw(),
            offset: 0,
            size: wgpu::BufferSize::new(self.size.max(4).next_multiple_of(4)),
        })
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(b);
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes)", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;
    #[test]
    fn size_classes_waste_at_most_an_eighth() {
        for b in [1u64, 255, 256, 257, 1000, 4096, 4097, 123_456_789] {
            let c = size_class(b);
            assert!(c >= b && c.is_multiple_of(16), "{b} -> {c}");
            assert!(c <= (b.max(256) * 9) / 8 + 16, "{b} -> {c}");
        }
    }
}
