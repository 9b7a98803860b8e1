//! A training dataset: images with captions, in kohya sd-scripts' folder layout, ready for the
//! VAE.
//!
//! [`Dataset::from_files`] takes (name, bytes) pairs (files dropped on the page, a zip's
//! entries, a directory read by [`Dataset::from_dir`]); names may carry folders
//! (`10_sks dog/a.png`). Captions are matched to images by folder and file stem (`a.txt`, else
//! `a.caption`); an image without one gets its kohya folder's words (`sks dog` for
//! `10_sks dog/`) or, outside such a folder, `TRIGGER CLASS`. A `N_` folder prefix gives the
//! image N repeats per epoch. Regularization images are a second `Dataset` (see
//! [`DatasetOptions::regularization`]).
//!
//! Each image is decoded once and kept resized (shorter side = the resolution, RGB8);
//! [`Dataset::image`] cuts the square the training step encodes, centred or at a seeded
//! random place, optionally mirrored (also seeded): the same (seed, epoch, image) always gives
//! the same pixels, whatever order the images are asked for in.

mod caption;
mod image;

pub use self::caption::{contains_word, count_tags, parse_kohya_folder, safe_folder_name, with_trigger};
pub use self::image::{decode_image, decode_image_limited, resize_short_side, short_side_size, square_to_chw, Augment, DecodedImage};

use self::caption::{file_kind, read_caption, split_name, FileKind};
use crate::error::{Error, Result};
use crate::rng::Rng;
use ::image::RgbImage;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Where the square is cut from an image whose resized size is not square.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// The middle (kohya's default).
    Centre,
    /// A seeded random place per (seed, epoch, image) (kohya's `random_crop`).
    Random,
}

/// How a dataset is read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatasetOptions {
    /// Side of the square training images, a multiple of 8 (8 … 4096).
    pub resolution: u32,
    /// The trigger word (`sks`); empty for regularization images.
    pub trigger: String,
    /// The class word (`dog`).
    pub class: String,
    /// Put `trigger, ` before captions that lack the trigger word.
    pub prepend_trigger: bool,
    /// Repeats of images outside a `N_` folder.
    pub default_repeats: u32,
    pub crop: CropMode,
    /// Mirror left-right with probability ½ (seeded per image and epoch).
    pub flip: bool,
}

impl DatasetOptions {
    /// Training images for `trigger` `class` at `resolution`: centre crop, no flip, 1 repeat,
    /// the trigger prepended to captions that lack it.
    pub fn new(resolution: u32, trigger: &str, class: &str) -> Self {
        DatasetOptions {
            resolution,
            trigger: trigger.trim().to_string(),
            class: class.trim().to_string(),
            prepend_trigger: true,
            default_repeats: 1,
            crop: CropMode::Centre,
            flip: false,
        }
    }

    /// Regularization (class) images: no trigger word, default caption `class`.
    pub fn regularization(resolution: u32, class: &str) -> Self {
        DatasetOptions { prepend_trigger: false, ..DatasetOptions::new(resolution, "", class) }
    }

    /// The caption of an image without caption file outside a kohya folder: `TRIGGER CLASS`.
    pub fn default_caption(&self) -> String {
        format!("{} {}", self.trigger, self.class).trim().to_string()
    }

    /// The kohya folder images outside a `N_` folder are counted under (and exported to):
    /// `<repeats>_<trigger> <class>`.
    pub fn default_folder(&self) -> String {
        safe_folder_name(&format!("{}_{}", self.default_repeats, self.default_caption()))
    }

    fn check(&self) -> Result<()> {
        if !self.resolution.is_multiple_of(8) || !(8..=4096).contains(&self.resolution) {
            return Err(Error::Invalid(format!(
                "training resolution {} must be a multiple of 8 between 8 and 4096 (512 for Stable Diffusion 1.x)",
                self.resolution
            )));
        }
        if self.default_repeats == 0 {
            return Err(Error::Invalid("default repeats must be at least 1".into()));
        }
        Ok(())
    }
}

/// Where an image's caption came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionSource {
    /// A `.txt` / `.caption` file.
    File,
    /// The words of its `N_words` folder.
    Folder,
    /// `TRIGGER CLASS`.
    Default,
}

/// One image of a dataset.
#[derive(Clone, Debug)]
pub struct ImageItem {
    /// The name it was given under.
    pub file: String,
    /// The caption file's name, when it had one.
    pub caption_file: Option<String>,
    /// The kohya folder it counts under (`10_sks dog`), see [`DatasetOptions::default_folder`].
    pub folder: String,
    pub repeats: u32,
    /// The caption trained with (after the trigger word was prepended).
    pub caption: String,
    pub caption_source: CaptionSource,
    /// Upright size before resizing.
    pub width: u32,
    pub height: u32,
    /// Whether the EXIF orientation turned or mirrored the stored pixels.
    pub reoriented: bool,
    resized: RgbImage,
}

impl ImageItem {
    /// The size after resizing (shorter side = resolution).
    pub fn resized_size(&self) -> (u32, u32) {
        self.resized.dimensions()
    }
}

/// A folder's entry in kohya's `ss_dataset_dirs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DirInfo {
    pub n_repeats: u32,
    pub img_count: usize,
}

/// Images and captions, decoded and resized.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub options: DatasetOptions,
    /// In name order.
    pub items: Vec<ImageItem>,
    /// Things the user may want to fix (captions without image, small images, ignored files).
    pub warnings: Vec<String>,
}

fn file_err(file: &str, message: impl Into<String>) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message: message.into() }
}

impl Dataset {
    /// Reads a dataset from (name, bytes) pairs. Errors name the file at fault and say what to
    /// do; files that are neither images nor captions are skipped with a warning.
    pub fn from_files(files: Vec<(String, Vec<u8>)>, options: DatasetOptions) -> Result<Dataset> {
        options.check()?;
        let mut warnings = Vec::new();
        // Captions by (folder path, stem); `.txt` wins over `.caption`.
        let mut captions: HashMap<(String, String), (String, bool, Option<String>)> = HashMap::new();
        let mut images: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, bytes) in files {
            match file_kind(&name) {
                FileKind::Image => images.push((name, bytes)),
                FileKind::Caption { txt } => {
                    let s = split_name(&name);
                    let text = read_caption(&bytes).map_err(|m| file_err(&name, m))?;
                    let key = (s.dir, s.stem);
                    let keep = match captions.get(&key) {
                        Some((_, had_txt, _)) => txt && !had_txt,
                        None => true,
                    };
                    if keep {
                        captions.insert(key, (name, txt, text));
                    }
                }
                FileKind::OtherImage => {
                    let ext = split_name(&name).ext.to_ascii_uppercase();
                    return Err(file_err(
                        &name,
                        format!("is a {ext} image; training images must be PNG, JPEG or WebP: convert it or remove it"),
                    ));
                }
                FileKind::Ignored => {}
                FileKind::Other => warnings.push(format!("{name}: not an image or caption file; ignored")),
            }
        }
        if images.is_empty() {
            return Err(Error::Invalid(
                "the dataset has no PNG, JPEG or WebP images; add some (with .txt captions beside them, if you have captions)"
                    .into(),
            ));
        }
        images.sort_by(|a, b| a.0.cmp(&b.0));
        let mut used = std::collections::HashSet::new();
        let mut items = Vec::with_capacity(images.len());
        for (name, bytes) in images {
            let s = split_name(&name);
            let key = (s.dir.clone(), s.stem.clone());
            let (folder, repeats, folder_words) = match parse_kohya_folder(&s.folder) {
                Some((0, _)) => {
                    return Err(file_err(
                        &name,
                        format!("is in folder `{}` whose repeat count is 0; name the folder `1_…` or more", s.folder),
                    ))
                }
                Some((n, words)) => (s.folder.clone(), n, Some(words.trim().to_string()).filter(|w| !w.is_empty())),
                None => (options.default_folder(), options.default_repeats, None),
            };
            let (caption, caption_file, source) = match captions.get(&key) {
                Some((cap_name, _, Some(text))) => {
                    used.insert(key.clone());
                    (text.clone(), Some(cap_name.clone()), CaptionSource::File)
                }
                found => {
                    if let Some((cap_name, _, None)) = found {
                        used.insert(key.clone());
                        warnings.push(format!("{cap_name}: the caption file is empty; the image gets the default caption"));
                    }
                    match folder_words {
                        Some(w) => (w, None, CaptionSource::Folder),
                        None => (options.default_caption(), None, CaptionSource::Default),
                    }
                }
            };
            let caption = if options.prepend_trigger { with_trigger(&caption, &options.trigger) } else { caption };
            let decoded = decode_image(&name, &bytes)?;
            drop(bytes);
            let (width, height) = decoded.rgb.dimensions();
            if width.min(height) < options.resolution {
                warnings.push(format!(
                    "{name}: {width}×{height} is smaller than the training resolution {}; it is upscaled and may look soft",
                    options.resolution
                ));
            }
            let resized = resize_short_side(&decoded.rgb, options.resolution);
            items.push(ImageItem {
                file: name,
                caption_file,
                folder,
                repeats,
                caption,
                caption_source: source,
                width,
                height,
                reoriented: decoded.reoriented,
                resized,
            });
        }
        let mut orphans: Vec<&String> =
            captions.iter().filter(|(k, _)| !used.contains(*k)).map(|(_, (name, _, _))| name).collect();
        orphans.sort();
        for name in orphans {
            warnings.push(format!("{name}: no image with this name beside it; the caption is not used"));
        }
        Ok(Dataset { options, items, warnings })
    }

    /// Reads every file under `dir` (one level of sub-folders, as kohya's layout has) with
    /// names relative to `dir`. Native only: the browser passes its files to
    /// [`Dataset::from_files`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: impl AsRef<std::path::Path>, options: DatasetOptions) -> Result<Dataset> {
        Dataset::from_files(read_dir_files(dir.as_ref())?, options)
    }

    /// Number of distinct images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Images per epoch: every image times its repeats (kohya's `num_train_images`).
    pub fn num_train_images(&self) -> usize {
        self.items.iter().map(|i| i.repeats as usize).sum()
    }

    /// Tag counts per kohya folder (kohya's `ss_tag_frequency`).
    pub fn tag_frequency(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for item in &self.items {
            count_tags(out.entry(item.folder.clone()).or_default(), &item.caption);
        }
        out
    }

    /// Repeats and image count per kohya folder (kohya's `ss_dataset_dirs`).
    pub fn dataset_dirs(&self) -> BTreeMap<String, DirInfo> {
        let mut out: BTreeMap<String, DirInfo> = BTreeMap::new();
        for item in &self.items {
            let e = out.entry(item.folder.clone()).or_insert(DirInfo { n_repeats: item.repeats, img_count: 0 });
            e.img_count += 1;
        }
        out
    }

    /// The crop and flip of image `index` in `epoch` of a run seeded with `seed`.
    pub fn augment(&self, index: usize, seed: u64, epoch: u64) -> Augment {
        let res = self.options.resolution;
        let Some(item) = self.items.get(index) else {
            return Augment { x: 0, y: 0, flip: false };
        };
        let (w, h) = item.resized.dimensions();
        let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let (x, y) = match self.options.crop {
            CropMode::Centre => ((w - res) / 2, (h - res) / 2),
            CropMode::Random => (rng.range(0, (w - res) as usize) as u32, rng.range(0, (h - res) as usize) as u32),
        };
        let flip = self.options.flip && rng.uniform() < 0.5;
        Augment { x, y, flip }
    }

    /// Image `index` as `[3, res, res]` values in [-1, 1], cut and mirrored as `aug` says.
    pub fn image(&self, index: usize, aug: Augment) -> Result<Vec<f32>> {
        let item = self.items.get(index).ok_or_else(|| {
            Error::Invalid(format!("image {index} asked for, but the dataset has {} images", self.items.len()))
        })?;
        let r = self.options.resolution as usize;
        let mut out = vec![0.0; 3 * r * r];
        square_to_chw(&item.resized, self.options.resolution, aug, &mut out)?;
        Ok(out)
    }

    /// A batch `[N, 3, res, res]` of images `indices` with their augmentation for (seed, epoch).
    pub fn batch(&self, indices: &[usize], seed: u64, epoch: u64) -> Result<Vec<f32>> {
        let r = self.options.resolution as usize;
        let mut out = vec![0.0; indices.len() * 3 * r * r];
        for (chunk, &i) in out.chunks_mut(3 * r * r).zip(indices) {
            let item = self.items.get(i).ok_or_else(|| {
                Error::Invalid(format!("image {i} asked for, but the dataset has {} images", self.items.len()))
            })?;
            square_to_chw(&item.resized, self.options.resolution, self.augment(i, seed, epoch), chunk)?;
        }
        Ok(out)
    }

    /// The images of one epoch: each index as often as its repeats, in a seeded shuffled order.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> =
            self.items.iter().enumerate().flat_map(|(i, it)| std::iter::repeat_n(i, it.repeats as usize)).collect();
        let mut rng = Rng::new(seed.wrapping_add(epoch.wrapping_mul(0xA076_1D64_78BD_642F)));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.range(0, i));
        }
        order
    }
}

/// Every file under `dir` and its sub-folders (one level), as (relative name, bytes).
#[cfg(not(target_arch = "wasm32"))]
pub fn read_dir_files(dir: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for (sub, prefix) in read_level(dir, "", true, &mut out)? {
        read_level(&sub, &prefix, false, &mut out)?;
    }
    Ok(out)
}

/// The files of one folder into `out`; its sub-folders (with their name prefixes) when
/// `subdirs`, else they are skipped.
#[cfg(not(target_arch = "wasm32"))]
fn read_level(
    dir: &std::path::Path,
    prefix: &str,
    subdirs: bool,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<Vec<(std::path::PathBuf, String)>> {
    let io = |p: &std::path::Path, e: std::io::Error| Error::Io { file: p.display().to_string(), message: e.to_string() };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if path.is_dir() {
            if subdirs {
                dirs.push((path, format!("{name}/")));
            }
        } else {
            out.push((name, std::fs::read(&path).map_err(|e| io(&path, e))?));
        }
    }
    Ok(dirs)
}
