//! On-device LoRA training, the data and export sides.
//!
//! - [`data`]: a training dataset from image files and captions in kohya sd-scripts' folder
//!   layout (`N_trigger class/name.png` + `name.txt`): decoded (PNG, JPEG, WebP, EXIF
//!   orientation applied), resized and cropped to the training resolution, seeded flips, as
//!   f32 NCHW in [-1, 1]; repeats and tag frequency for the export metadata.
//! - [`export`]: the trained low-rank layers written as a kohya-format `.safetensors`
//!   (`lora_unet_…` / `lora_te_…`, `lora_down` / `lora_up` / `alpha`, kohya's `ss_*` training
//!   metadata, `sshs_*` hashes and `modelspec.*`), which this engine, kohya, diffusers, A1111
//!   and ComfyUI read.
//! - [`handoff`]: a zip with the dataset in kohya's layout and a kohya `train_network.py`
//!   configuration for the same settings, for training on a bigger machine.
//! - [`zip`]: the small zip writer the hand-off uses.
//!
//! Nothing here touches the file system except the native-only directory readers, so the
//! browser build uses the same code with (name, bytes) pairs.

pub mod data;
pub mod export;
pub mod handoff;
pub mod trainer;
pub mod zip;
