//! A small zip writer (PKWARE APPNOTE 6.3: local headers, data, central directory, end
//! record; no zip64): each entry stored or raw-deflated (miniz_oxide) — whichever is smaller —
//! with its CRC-32 and UTF-8 name (flag bit 11). Entries are held in memory until written,
//! so the sizes go into the local headers and no data descriptors are needed.

use crate::error::{Error, Result};
use std::io::Write;

/// Compression method numbers.
const STORED: u16 = 0;
const DEFLATED: u16 = 8;
/// Bit 11: names and comments are UTF-8.
const UTF8: u16 = 1 << 11;

struct Central {
    name: String,
    method: u16,
    crc: u32,
    compressed: u32,
    size: u32,
    offset: u32,
}

/// Writes a zip archive to `out`, one entry at a time.
pub struct ZipWriter<W: Write> {
    out: W,
    written: u64,
    entries: Vec<Central>,
    /// MS-DOS time and date of every entry.
    dos_time: u16,
    dos_date: u16,
}

fn too_big(what: &str) -> Error {
    Error::Invalid(format!("zip: {what} exceeds what a zip file without zip64 holds (4 GiB, 65535 entries)"))
}

/// A Unix time (UTC) as (year, month, day, seconds into the day) (Howard Hinnant's
/// `civil_from_days`).
pub(crate) fn civil(unix_seconds: i64) -> (i64, i64, i64, i64) {
    let (days, rem) = (unix_seconds.div_euclid(86_400), unix_seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d, rem)
}

/// (time, date) in MS-DOS format for a Unix time (UTC); 1980-01-01 for earlier times.
pub fn dos_time_date(unix_seconds: i64) -> (u16, u16) {
    let secs = unix_seconds.max(315_532_800); // 1980-01-01
    let (y, m, d, rem) = civil(secs);
    let y = y.min(2107);
    let time = (((rem / 3600) << 11) | ((rem % 3600 / 60) << 5) | ((rem % 60) / 2)) as u16;
    let date = (((y - 1980) << 9) | (m << 5) | d) as u16;
    (time, date)
}

impl<W: Write> ZipWriter<W> {
    /// A new archive whose entries carry `unix_seconds` as their modification time.
    pub fn new(out: W, unix_seconds: i64) -> Self {
        let (dos_time, dos_date) = dos_time_date(unix_seconds);
        ZipWriter { out, written: 0, entries: Vec::new(), dos_time, dos_date }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::Io { file: "(zip)".into(), message: format!("writing failed: {e}") })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Adds a file. `compress`: try deflate (kept only when smaller); already-compressed data
    /// (JPEG, PNG, WebP) is better stored.
    pub fn add(&mut self, name: &str, data: &[u8], compress: bool) -> Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\\') || name.split('/').any(|p| p == "..") {
            return Err(Error::Invalid(format!("zip: entry name `{name}` must be a relative path with `/` separators")));
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(Error::Invalid(format!("zip: entry `{name}` is added twice")));
        }
        if self.entries.len() >= 0xFFFF {
            return Err(too_big("the number of entries"));
        }
        let deflated = if compress { Some(miniz_oxide::deflate::compress_to_vec(data, 6)) } else { None };
        let (method, body) = match &deflated {
            Some(d) if d.len() < data.len() => (DEFLATED, d.as_slice()),
            _ => (STORED, data),
        };
        let size = u32::try_from(data.len()).map_err(|_| too_big(name))?;
        let compressed = u32::try_from(body.len()).map_err(|_| too_big(name))?;
        let offset = u32::try_from(self.written).map_err(|_| too_big("the archive"))?;
        let crc = crc32fast::hash(data);
        let name_len = u16::try_from(name.len()).map_err(|_| Error::Invalid(format!("zip: entry name `{name}` is too long")))?;
        let mut h = Vec::with_capacity(30 + name.len());
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0
        h.extend_from_slice(&UTF8.to_le_bytes());
        h.extend_from_slice(&method.to_le_bytes());
        h.extend_from_slice(&self.dos_time.to_le_bytes());
        h.extend_from_slice(&self.dos_date.to_le_bytes());
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&compressed.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&name_len.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // extra field length
        h.extend_from_slice(name.as_bytes());
        self.put(&h)?;
        self.put(body)?;
        self.entries.push(Central { name: name.to_string(), method, crc, compressed, size, offset });
        Ok(())
    }

    /// Writes the central directory and the end record; returns the sink.
    pub fn finish(mut self) -> Result<W> {
        let start = u32::try_from(self.written).map_err(|_| too_big("the archive"))?;
        let entries = std::mem::take(&mut self.entries);
        for e in &entries {
            let mut h = Vec::with_capacity(46 + e.name.len());
            h.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            h.extend_from_slice(&(3u16 << 8 | 20).to_le_bytes()); // made by: Unix, 2.0
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&UTF8.to_le_bytes());
            h.extend_from_slice(&e.method.to_le_bytes());
            h.extend_from_slice(&self.dos_time.to_le_bytes());
            h.extend_from_slice(&self.dos_date.to_le_bytes());
            h.extend_from_slice(&e.crc.to_le_bytes());
            h.extend_from_slice(&e.compressed.to_le_bytes());
            h.extend_from_slice(&e.size.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&[0; 8]); // extra, comment, disk number, internal attributes
            h.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // external: -rw-r--r--
            h.extend_from_slice(&e.offset.to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            self.put(&h)?;
        }
        let size = u32::try_from(self.written - start as u64).map_err(|_| too_big("the central directory"))?;
        let n = entries.len() as u16;
        let mut end = Vec::with_capacity(22);
        end.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        end.extend_from_slice(&[0; 4]); // disk numbers
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&n.to_le_bytes());
        end.extend_from_slice(&size.to_le_bytes());
        end.extend_from_slice(&start.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes()); // comment length
        self.put(&end)?;
        self.out.flush().map_err(|e| Error::Io { file: "(zip)".into(), message: format!("writing failed: {e}") })?;
        Ok(self.out)
    }
}
