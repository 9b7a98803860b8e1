//! A pipeline component that stays on the GPU or is released between uses.

use super::invalid;
use crate::error::Result;
use crate::model::weights::WeightSource;
use std::sync::{Arc, Mutex};

/// A component held on the GPU, or released between uses and loaded again from its weights.
/// Users hold an `Arc` while they run it, so releasing never pulls a model from under a call.
pub(super) struct Slot<T> {
    pub(super) model: Mutex<Option<Arc<T>>>,
    /// Where the model reloads from once released (`None`: it is never released).
    pub(super) source: Option<Box<dyn WeightSource>>,
}

impl<T> Slot<T> {
    pub(super) fn resident(model: T) -> Self {
        Self { model: Mutex::new(Some(Arc::new(model))), source: None }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<T>>> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_resident(&self) -> bool {
        self.lock().is_some()
    }

    /// The model, loaded from the source first when it was released.
    pub(super) fn get(&self, what: &str, load: impl FnOnce(&dyn WeightSource) -> Result<T>) -> Result<Arc<T>> {
        let mut slot = self.lock();
        if let Some(m) = slot.as_ref() {
            return Ok(Arc::clone(m));
        }
        let src = self.source.as_deref().ok_or_else(|| invalid(format!("the {what} is not loaded")))?;
        let m = Arc::new(load(src)?);
        *slot = Some(Arc::clone(&m));
        Ok(m)
    }

    /// Drops the pipeline's reference when the model can be reloaded; the GPU memory is freed
    /// once the caller's `Arc` goes too.
    pub(super) fn release(&self) {
        if self.source.is_some() {
            *self.lock() = None;
        }
    }
}

