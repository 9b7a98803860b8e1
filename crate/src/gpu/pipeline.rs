//! Compute pipelines cached by (shader, entry point, defines). Each is built inside a
//! validation error scope, so a shader that fails to compile is an `Error::Shader` naming the
//! variant, never a pipeline that silently produces stale data.

use crate::error::{Error, Result};
use crate::shader::{self, Defines, Target};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Defines,
}

pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

#[derive(Default)]
pub struct PipelineCache {
    map: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
}

/// An error scope that the browser resolves later; awaited before results are read.
#[cfg(target_arch = "wasm32")]
pub type PendingScope =
    (String, std::pin::Pin<Box<dyn std::future::Future<Output = Option<wgpu::Error>>>>);

impl PipelineCache {
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Returns the cached pipeline for `key`, building it on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
        #[cfg(target_arch = "wasm32")] pending: &std::cell::RefCell<Vec<PendingScope>>,
    ) -> Result<Arc<Pipeline>> {
        if let Some(p) = self.map.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(p);
        }
        let src = shader::find(key.shader)?;
        if !src.entries.contains(&key.entry) {
            return Err(Error::UnknownShader(format!(
                "`{}` has no entry point `{}`",
                key.shader, key.entry
            )));
        }
        let code = shader::preprocess(key.shader, &key.defines, Target::current())?;
        let label = format!("{}:{} [{}]", key.shader, key.entry, key.defines);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(code.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        let popped = scope.pop();
        #[cfg(not(target_arch = "wasm32"))]
        {
            // wgpu-core reports errors synchronously: the future is already complete.
            if let Some(Some(e)) = super::readback::poll_now(popped) {
                return Err(Error::Shader {
                    shader: key.shader.to_string(),
                    entry: key.entry.to_string(),
                    defines: key.defines.to_string(),
                    message: e.to_string(),
                });
            }
        }
        #[cfg(target_arch = "wasm32")]
        pending.borrow_mut().push((label, Box::pin(popped)));
        let p = Arc::new(Pipeline { pipeline, layout });
        if let Ok(mut m) = self.map.lock() {
            m.insert(key.clone(), Arc::clone(&p));
        }
        Ok(p)
    }
}
