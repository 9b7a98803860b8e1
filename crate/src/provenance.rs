//! What an image was made with, for the XMP packet of its PNG (`io::xmp`): the model's and the
//! adapters' files with their SHA-256 hashes and licences.
//!
//! Files are hashed by streaming through [`RangeRead`] in 4 MiB pieces, so memory stays bounded
//! whatever their size (a local file natively, a Blob read by ranges in the browser). A model's
//! files are hashed once, when it loads; an adapter's when it is added.

use crate::error::Result;
use crate::io::xmp::{AdapterRecord, FileRecord, ModelRecord};
use crate::io::RangeRead;
use crate::licence::Licence;
use crate::lora::LoraFile;
use crate::model::checkpoint::{Checkpoint, Component, Layout, ModelFiles};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// How much of a file is read at a time while hashing.
const PIECE: usize = 4 << 20;

/// SHA-256 (lowercase hex) of everything `reader` holds, read piece by piece.
pub fn sha256_hex<R: RangeRead + ?Sized>(reader: &R) -> Result<String> {
    let len = reader.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; PIECE.min(len as usize)];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(PIECE as u64) as usize;
        let piece = &mut buf[..n];
        reader.read_at(offset, piece)?;
        hasher.update(&*piece);
        offset += n as u64;
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The last part of a path or URL (`C:\m\x.safetensors`, `/a/b/x.safetensors` → `x.safetensors`):
/// records never carry a local folder.
pub fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// `reader`'s record: `path`, size and hash.
pub fn file_record<R: RangeRead + ?Sized>(reader: &R, path: &str) -> Result<FileRecord> {
    Ok(FileRecord { path: path.to_string(), bytes: reader.len(), sha256: sha256_hex(reader)? })
}

/// The model's weight files: each component's file in a diffusers folder (as
/// `unet/diffusion_pytorch_model.safetensors`), or the one file of a single-file checkpoint.
pub fn weight_files<R: RangeRead>(ck: &Checkpoint<R>) -> Vec<(String, &crate::io::safetensors::SafetensorsFile<R>)> {
    match ck.layout {
        Layout::SingleFile => vec![(file_name(ck.unet.file().name()).to_string(), ck.unet.file())],
        Layout::Folder => Component::ALL
            .iter()
            .map(|&c| {
                let f = ck.weights(c).file();
                (format!("{}/{}", c.folder(), file_name(f.name())), f)
            })
            .collect(),
    }
}

/// The licence of a loaded model: the folder's card and `model_index.json` (when `files` is the
/// folder), else its weight files' metadata.
pub fn model_licence<R: RangeRead, F: ModelFiles>(ck: &Checkpoint<R>, files: Option<&F>) -> Licence {
    let weights = weight_files(ck);
    let metas: Vec<(&str, &BTreeMap<String, String>)> = weights.iter().map(|(p, f)| (p.as_str(), f.metadata())).collect();
    match files {
        Some(files) if ck.layout == Layout::Folder => crate::licence::for_folder(files, &metas),
        _ => crate::licence::for_weights(&metas),
    }
}

/// The model's record with every weight file hashed.
pub fn model_record<R: RangeRead>(ck: &Checkpoint<R>, name: &str, licence: &Licence) -> Result<ModelRecord> {
    let files = weight_files(ck).into_iter().map(|(path, f)| file_record(f.reader(), &path)).collect::<Result<_>>()?;
    Ok(ModelRecord { name: name.to_string(), licence: licence_id(licence), files })
}

/// The licence as the record keeps it: what the file states; none when unknown or inferred.
pub fn licence_id(l: &Licence) -> Option<String> {
    (l.id != "unknown" && !l.inferred).then(|| l.id.clone())
}

/// An adapter's record; `file` is its hashed file when known.
pub fn adapter_record(lora: &LoraFile, file: Option<FileRecord>, strengths: Option<(f32, f32)>) -> AdapterRecord {
    let licence = crate::licence::for_adapter(&lora.metadata.raw);
    AdapterRecord {
        name: lora.display_name(),
        file,
        strengths,
        licence: licence_id(&licence),
        trained_on: lora.metadata.sd_model_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that counts the largest read, to show hashing is bounded.
    struct Counting(Vec<u8>, std::cell::Cell<usize>);

    impl RangeRead for Counting {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.1.set(self.1.get().max(buf.len()));
            self.0.read_at(offset, buf)
        }
    }

    #[test]
    fn sha256_matches_the_standard_vectors_and_reads_in_pieces() {
        assert_eq!(sha256_hex(&Vec::<u8>::new()).unwrap(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(&b"abc".to_vec()).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        // 9 MiB of 'a': three pieces, none larger than PIECE; same digest as one update.
        let big = vec![b'a'; 9 << 20];
        let r = Counting(big.clone(), Default::default());
        let streamed = sha256_hex(&r).unwrap();
        assert_eq!(streamed, hex(&Sha256::digest(&big)));
        assert_eq!(r.1.get(), PIECE);
    }

    #[test]
    fn the_demo_models_licence_and_hashed_files() {
        use crate::licence::Known;
        use crate::model::checkpoint::{open_path, LocalDir};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("www/models/demo");
        let ck = open_path(&dir, None).unwrap();
        let licence = model_licence(&ck, Some(&LocalDir(dir.clone())));
        assert_eq!(licence.known, vec![Known::Mit, Known::Apache2]);
        assert_eq!(licence.source, "MODEL_CARD.md front matter");
        let r = model_record(&ck, "demo", &licence).unwrap();
        assert_eq!(r.licence.as_deref(), Some("MIT OR Apache-2.0"));
        let paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
        );
        for f in &r.files {
            let bytes = std::fs::read(dir.join(&f.path)).unwrap();
            assert_eq!((f.bytes, f.sha256.clone()), (bytes.len() as u64, hex(&Sha256::digest(&bytes))), "{}", f.path);
        }
        // A single-file checkpoint: one file, its name only; no card, so no stated licence.
        let single = root.join("tests/fixtures/models/tiny-sd15-a.safetensors");
        let ck = open_path(&single, None).unwrap();
        let licence = model_licence::<_, LocalDir>(&ck, None);
        assert_eq!(licence.id, "unknown");
        let r = model_record(&ck, "tiny-sd15-a", &licence).unwrap();
        assert_eq!((r.files.len(), r.files[0].path.as_str(), r.licence.clone()), (1, "tiny-sd15-a.safetensors", None));
        assert_eq!(r.files[0].sha256, hex(&Sha256::digest(std::fs::read(&single).unwrap())));
    }

    #[test]
    fn file_names_drop_folders() {
        assert_eq!(file_name("/home/me/models/x.safetensors"), "x.safetensors");
        assert_eq!(file_name(r"C:\m\y.safetensors"), "y.safetensors");
        assert_eq!(file_name("z"), "z");
    }
}
