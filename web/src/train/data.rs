//! A training dataset from Blobs: each file is read once; images are decoded, turned upright
//! and resized to the training resolution right away (their originals are dropped before the
//! next file is read), and [`Dataset::from_files`] gets the resized pixels as lossless PNGs, so
//! memory holds one original at a time. The dataset's hash is taken from the original bytes.

use crate::files::BlobReader;
use loralab::io::png::encode_rgb8;
use loralab::provenance::sha256_hex;
use loralab::train::data::{decode_image, resize_short_side, Dataset, DatasetOptions};
use loralab::{Error, Result};
use std::collections::HashMap;
use web_sys::Blob;

/// A dataset read from Blobs.
pub struct ReadDataset {
    pub dataset: Dataset,
    /// SHA-256 of the listing `"<sha256>  <name>\n"` of every image and caption file in name
    /// order (what `sha256sum` prints for the files, sorted by name).
    pub sha256: String,
    /// Caption files (`.txt`, `.caption`) among the files.
    pub caption_files: usize,
}

/// What a file is, by its name (as the dataset reader sorts them).
#[derive(PartialEq)]
enum Kind {
    Image,
    Caption,
    /// Operating-system litter and everything else: passed on as it is (the dataset reader
    /// ignores it or warns).
    Other,
}

fn kind(name: &str) -> Kind {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    if base.starts_with('.') || name.split(['/', '\\']).any(|p| p == "__MACOSX") {
        return Kind::Other;
    }
    let ext = base.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" | "jpg" | "jpeg" | "jpe" | "jfif" | "webp" => Kind::Image,
        "txt" | "caption" => Kind::Caption,
        _ => Kind::Other,
    }
}

/// Reads `entries` (name, Blob) into a dataset with `options`. `progress(done, total, name)` is
/// called before each file.
pub fn read_dataset(entries: Vec<(String, Blob)>, options: DatasetOptions, progress: &dyn Fn(usize, usize, &str)) -> Result<ReadDataset> {
    let res = options.resolution;
    let total = entries.len();
    let mut files = Vec::with_capacity(total);
    let mut listing = Vec::with_capacity(total);
    // Upright size before resizing and whether EXIF turned the picture, by name.
    let mut originals: HashMap<String, (u32, u32, bool)> = HashMap::new();
    let mut caption_files = 0;
    for (i, (name, blob)) in entries.into_iter().enumerate() {
        progress(i, total, &name);
        let bytes = BlobReader::new(blob, name.clone()).read_all()?;
        let k = kind(&name);
        if k != Kind::Other {
            listing.push((name.clone(), sha256_hex(&bytes[..])?));
        }
        match k {
            Kind::Image => {
                let decoded = decode_image(&name, &bytes)?;
                drop(bytes);
                let (w, h) = decoded.rgb.dimensions();
                let resized = resize_short_side(&decoded.rgb, res);
                drop(decoded.rgb);
                let png = encode_rgb8(resized.width() as usize, resized.height() as usize, resized.as_raw(), &[])
                    .map_err(|e| Error::Format { file: name.clone(), tensor: None, message: e.to_string() })?;
                originals.insert(name.clone(), (w, h, decoded.reoriented));
                files.push((name, png));
            }
            Kind::Caption => {
                caption_files += 1;
                files.push((name, bytes));
            }
            Kind::Other => files.push((name, bytes)),
        }
    }
    progress(total, total, "");
    let mut dataset = Dataset::from_files(files, options)?;
    let mut small = vec![];
    for item in &mut dataset.items {
        if let Some(&(w, h, reoriented)) = originals.get(&item.file) {
            (item.width, item.height, item.reoriented) = (w, h, reoriented);
            if w.min(h) < res {
                small.push(format!(
                    "{}: {w}×{h} is smaller than the training resolution {res}; it is upscaled and may look soft",
                    item.file
                ));
            }
        }
    }
    dataset.warnings.extend(small);
    listing.sort();
    let text: String = listing.iter().map(|(name, sha)| format!("{sha}  {name}\n")).collect();
    Ok(ReadDataset { dataset, sha256: sha256_hex(text.as_bytes())?, caption_files })
}
