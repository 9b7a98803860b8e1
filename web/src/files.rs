//! Reading files in the engine's Worker without holding them in wasm memory: a
//! [`RangeRead`] over a `Blob` (a dropped `File`, a fetched response, a file in the Origin
//! Private File System) through `FileReaderSync`, which Workers have; and a diffusers folder
//! given as a map of relative paths to Blobs; and writing to an OPFS file through its sync
//! access handle.

use loralab::io::RangeRead;
use loralab::model::checkpoint::ModelFiles;
use loralab::{Error, Result};
use std::collections::HashMap;
use wasm_bindgen::JsCast;
use web_sys::{Blob, FileReaderSync, FileSystemReadWriteOptions, FileSystemSyncAccessHandle};

/// A Blob read by byte ranges.
#[derive(Clone)]
pub struct BlobReader {
    blob: Blob,
    name: String,
}

impl BlobReader {
    pub fn new(blob: Blob, name: impl Into<String>) -> Self {
        Self { blob, name: name.into() }
    }

    /// The whole Blob (for small files: configs, PNGs).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len() as usize];
        self.read_at(0, &mut v)?;
        Ok(v)
    }
}

fn io_err(file: &str, what: &str, e: wasm_bindgen::JsValue) -> Error {
    let msg = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"));
    Error::Io { file: file.to_string(), message: format!("{what}: {msg}") }
}

impl RangeRead for BlobReader {
    fn len(&self) -> u64 {
        self.blob.size() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len() {
            return Err(Error::Io {
                file: self.name.clone(),
                message: format!("read of {} bytes at offset {offset} is past the end ({} bytes)", buf.len(), self.len()),
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        let slice = self
            .blob
            .slice_with_f64_and_f64(offset as f64, end as f64)
            .map_err(|e| io_err(&self.name, "slicing the file failed", e))?;
        let reader = FileReaderSync::new().map_err(|e| io_err(&self.name, "FileReaderSync is unavailable", e))?;
        let ab = reader
            .read_as_array_buffer(&slice)
            .map_err(|e| io_err(&self.name, "reading the file failed (was it moved or deleted?)", e))?;
        let arr = js_sys::Uint8Array::new(&ab);
        if arr.length() as usize != buf.len() {
            return Err(Error::Io { file: self.name.clone(), message: "the file changed while it was read".into() });
        }
        arr.copy_to(buf);
        Ok(())
    }
}

/// A diffusers folder as `relative path → Blob` (paths below the folder, `unet/config.json`).
pub struct BlobFiles {
    root: String,
    files: HashMap<String, Blob>,
}

impl BlobFiles {
    /// `entries`: (path as given, Blob). A common leading folder (a picked directory's name,
    /// `webkitRelativePath`) is removed.
    pub fn new(root: &str, entries: Vec<(String, Blob)>) -> Self {
        let strip = common_folder(entries.iter().map(|(p, _)| p.as_str()));
        let files = entries
            .into_iter()
            .map(|(p, b)| {
                let rel = p.strip_prefix(&strip).unwrap_or(&p).trim_start_matches('/').to_string();
                (rel, b)
            })
            .collect();
        Self { root: root.to_string(), files }
    }
}

/// The folder every path starts with (`"v1-5/"` for `v1-5/unet/…`, `v1-5/model_index.json`),
/// when the model's files are below one; `""` otherwise.
fn common_folder<'a>(paths: impl Iterator<Item = &'a str>) -> String {
    let paths: Vec<&str> = paths.collect();
    if paths.iter().any(|p| *p == "model_index.json") {
        return String::new();
    }
    let Some(idx) = paths.iter().find(|p| p.ends_with("/model_index.json")) else { return String::new() };
    idx.strip_suffix("model_index.json").unwrap_or("").to_string()
}

impl ModelFiles for BlobFiles {
    type Reader = BlobReader;

    fn open(&self, path: &str) -> Result<Option<BlobReader>> {
        Ok(self.files.get(path).map(|b| BlobReader::new(b.clone(), self.display(path))))
    }

    fn exists(&self, path: &str) -> bool {
        self.files.contains_key(path) || self.files.keys().any(|k| k.starts_with(&format!("{path}/")))
    }

    fn display(&self, path: &str) -> String {
        if self.root.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.root)
        }
    }
}

/// `std::io::Write` over an OPFS sync access handle.
pub struct HandleWriter {
    handle: FileSystemSyncAccessHandle,
    at: f64,
}

impl HandleWriter {
    /// Writes from the start of the file.
    pub fn new(handle: FileSystemSyncAccessHandle) -> Self {
        HandleWriter { handle, at: 0.0 }
    }

    /// Bytes written so far (the file's length).
    pub fn written(&self) -> f64 {
        self.at
    }
}

impl std::io::Write for HandleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let opts = FileSystemReadWriteOptions::new();
        opts.set_at(self.at);
        let n = self
            .handle
            .write_with_u8_array_and_options(buf, &opts)
            .map_err(|e| std::io::Error::other(format!("writing to the browser's file storage failed: {e:?}")))?;
        self.at += n;
        Ok(n as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.handle.flush().map_err(|e| std::io::Error::other(format!("{e:?}")))
    }
}
