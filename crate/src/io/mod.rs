//! File input without holding whole files: a byte-range reader trait that a local file, an
//! in-memory buffer, or (in the browser Worker) `FileReaderSync` over `Blob.slice` / a
//! synchronous HTTP `Range` request can implement, and the safetensors reader built on it.

pub mod png;
pub mod safetensors;
pub mod safetensors_write;
pub mod xmp;

use crate::error::{Error, Result};
use std::sync::Arc;

/// Random-access reads of a byte source whose length is known up front.
///
/// `read_at` fills all of `buf` or fails; reads never move a shared cursor, so one source can
/// serve several readers.
pub trait RangeRead {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Reads exactly `buf.len()` bytes starting at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// True when the source has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn out_of_range(offset: u64, want: usize, len: u64) -> Error {
    Error::Io {
        file: String::new(),
        message: format!("read of {want} bytes at offset {offset} is past the end ({len} bytes)"),
    }
}

/// Reads from a byte slice (used by the in-memory impls).
fn slice_read_at(data: &[u8], offset: u64, buf: &mut [u8]) -> Result<()> {
    let len = data.len() as u64;
    let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= len);
    match end {
        Some(end) => {
            buf.copy_from_slice(&data[offset as usize..end as usize]);
            Ok(())
        }
        None => Err(out_of_range(offset, buf.len(), len)),
    }
}

impl RangeRead for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        slice_read_at(self, offset, buf)
    }
}

impl RangeRead for Vec<u8> {
    fn len(&self) -> u64 {
        Vec::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        slice_read_at(self, offset, buf)
    }
}

impl<R: RangeRead + ?Sized> RangeRead for &R {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
}

impl<R: RangeRead + ?Sized> RangeRead for Box<R> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
}

impl<R: RangeRead + ?Sized> RangeRead for Arc<R> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
}

/// A local file read by positioned reads (native only: the browser has no file system).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct LocalFile {
    file: std::fs::File,
    len: u64,
    path: String,
}

#[cfg(not(target_arch = "wasm32"))]
impl LocalFile {
    /// Opens `path`; errors name the path.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |e: std::io::Error| Error::Io { file: name.clone(), message: e.to_string() };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(LocalFile { file, len, path: name })
    }

    /// The path as given to `open`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl RangeRead for LocalFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        file_read_at(&self.file, offset, buf).map_err(|e| Error::Io {
            file: self.path.clone(),
            message: format!("reading {} bytes at offset {offset}: {e}", buf.len()),
        })
    }
}

/// A plain `std::fs::File` (errors carry no path; prefer `LocalFile`).
#[cfg(not(target_arch = "wasm32"))]
impl RangeRead for std::fs::File {
    fn len(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        file_read_at(self, offset, buf).map_err(|e| Error::Io {
            file: String::new(),
            message: format!("reading {} bytes at offset {offset}: {e}", buf.len()),
        })
    }
}

#[cfg(all(not(target_arch = "wasm32"), unix))]
fn file_read_at(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(all(not(target_arch = "wasm32"), not(unix)))]
fn file_read_at(file: &std::fs::File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}
