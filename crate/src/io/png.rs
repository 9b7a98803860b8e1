//! PNG files with text metadata, through the `png` crate (pure Rust, no file system: bytes in,
//! bytes out, so the browser uses it too).
//!
//! Text chunks follow what A1111 / PIL write: a `tEXt` chunk when the text is Latin-1, an
//! uncompressed `iTXt` (UTF-8) chunk otherwise. An XMP packet (`super::xmp`) always goes in an
//! uncompressed `iTXt` chunk with keyword `XML:com.adobe.xmp`, before the image data.

use crate::error::{Error, Result};

fn err(message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("png: {message}"))
}

/// Encodes 8-bit RGB pixels (`[H, W, 3]` row-major) as a PNG with the given text chunks
/// (keyword, text).
pub fn encode_rgb8(width: usize, height: usize, rgb: &[u8], text: &[(&str, &str)]) -> Result<Vec<u8>> {
    encode(width, height, rgb, text, None)
}

/// [`encode_rgb8`] with an XMP packet (`super::xmp::Provenance::to_xmp`) in an `iTXt` chunk.
pub fn encode_rgb8_xmp(width: usize, height: usize, rgb: &[u8], text: &[(&str, &str)], xmp: &str) -> Result<Vec<u8>> {
    encode(width, height, rgb, text, Some(xmp))
}

fn encode(width: usize, height: usize, rgb: &[u8], text: &[(&str, &str)], xmp: Option<&str>) -> Result<Vec<u8>> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        return Err(err(format!("{} bytes for a {width}x{height} RGB image", rgb.len())));
    }
    let (w, h) = (u32::try_from(width).map_err(err)?, u32::try_from(height).map_err(err)?);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (keyword, value) in text {
            if value.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(keyword.to_string(), value.to_string()).map_err(err)?;
            } else {
                enc.add_itxt_chunk(keyword.to_string(), value.to_string()).map_err(err)?;
            }
        }
        if let Some(x) = xmp {
            enc.add_itxt_chunk(super::xmp::KEYWORD.to_string(), x.to_string()).map_err(err)?;
        }
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(rgb).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

/// A decoded PNG: size, channel count (after expanding palettes / 16-bit to 8-bit), pixels and
/// text chunks (`tEXt`, `zTXt`, `iTXt`) in file order by kind.
#[derive(Clone, Debug)]
pub struct DecodedPng {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
    pub text: Vec<(String, String)>,
}

impl DecodedPng {
    /// The text of chunk `keyword`, if present.
    pub fn text(&self, keyword: &str) -> Option<&str> {
        self.text.iter().find(|(k, _)| k == keyword).map(|(_, v)| v.as_str())
    }
}

/// The most pixels a PNG may have to be decoded (as for training images): the header's size
/// is checked before the pixel buffer is allocated.
pub const MAX_PIXELS: u64 = 50_000_000;

/// Decodes a PNG with its text chunks.
pub fn decode(bytes: &[u8]) -> Result<DecodedPng> {
    decode_with(bytes, MAX_PIXELS)
}

/// Decodes a PNG named `file` (a dropped or picked file): errors are [`Error::Format`] naming
/// it and saying what is wrong with it.
pub fn decode_file(bytes: &[u8], file: &str) -> Result<DecodedPng> {
    let bad = |message: String| Error::Format { file: file.to_string(), tensor: None, message };
    if bytes.is_empty() {
        return Err(bad("is empty (0 bytes); choose the PNG again".into()));
    }
    if bytes.get(..8) != Some(&SIGNATURE[..]) {
        return Err(bad("is not a PNG image (the PNG signature is missing); choose a PNG written by an image generator".into()));
    }
    if let (Some(b"IHDR"), Some(w), Some(h)) = (bytes.get(12..16), bytes.get(16..20), bytes.get(20..24)) {
        let (w, h) = (u32::from_be_bytes([w[0], w[1], w[2], w[3]]), u32::from_be_bytes([h[0], h[1], h[2], h[3]]));
        if w as u64 * h as u64 > MAX_PIXELS {
            return Err(bad(format!(
                "is {w}×{h} pixels, more than the {} megapixels read here; scale it down",
                MAX_PIXELS / 1_000_000
            )));
        }
    }
    decode_with(bytes, MAX_PIXELS).map_err(|e| match e {
        Error::Invalid(m) => {
            let m = m.strip_prefix("png: ").unwrap_or(&m).to_string();
            bad(format!("could not be read as a PNG ({m}); the file may be truncated or damaged"))
        }
        other => other,
    })
}

fn decode_with(bytes: &[u8], max_pixels: u64) -> Result<DecodedPng> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(err)?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w as u64 * h as u64 > max_pixels {
        return Err(err(format!(
            "the image is {w}×{h} pixels, more than the {} megapixels read here",
            max_pixels / 1_000_000
        )));
    }
    let size = reader.output_buffer_size().ok_or_else(|| err("image too large"))?;
    let mut pixels = vec![0u8; size];
    let frame = reader.next_frame(&mut pixels).map_err(err)?;
    pixels.truncate(frame.buffer_size());
    reader.finish().map_err(err)?;
    let info = reader.info();
    let mut text: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.compressed_latin1_text {
        text.push((c.keyword.clone(), c.get_text().map_err(err)?));
    }
    for c in &info.utf8_text {
        text.push((c.keyword.clone(), c.get_text().map_err(err)?));
    }
    Ok(DecodedPng {
        width: frame.width as usize,
        height: frame.height as usize,
        channels: frame.color_type.samples(),
        pixels,
        text,
    })
}

/// Puts an XMP packet into an existing PNG (one drawn elsewhere, e.g. a canvas): an `iTXt` chunk
/// `XML:com.adobe.xmp` right after `IHDR`, replacing any XMP chunk the file had; every other
/// chunk is copied as it is. `source` names the file for messages.
pub fn add_xmp(png: &[u8], xmp: &str, source: &str) -> Result<Vec<u8>> {
    use png::text_metadata::{EncodableTextChunk, ITXtChunk};
    let bad = |message: String| Error::Format { file: source.to_string(), tensor: None, message };
    if png.get(..8) != Some(&SIGNATURE[..]) {
        return Err(bad("is not a PNG (the signature is missing)".into()));
    }
    let mut out = Vec::with_capacity(png.len() + xmp.len() + 64);
    out.extend_from_slice(&SIGNATURE);
    let mut pos = 8usize;
    let mut seen_ihdr = false;
    let mut seen_iend = false;
    while pos < png.len() && !seen_iend {
        let header = png.get(pos..pos + 8).ok_or_else(|| bad(format!("chunk header at byte {pos} is cut off")))?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = [header[4], header[5], header[6], header[7]];
        let end = pos.checked_add(12).and_then(|e| e.checked_add(len)).filter(|&e| e <= png.len());
        let end = end.ok_or_else(|| bad(format!("chunk `{}` at byte {pos} runs past the end", String::from_utf8_lossy(&kind))))?;
        if !seen_ihdr && &kind != b"IHDR" {
            return Err(bad("the first chunk is not IHDR".into()));
        }
        let data = &png[pos + 8..end - 4];
        let is_xmp = &kind == b"iTXt" && data.split(|&b| b == 0).next() == Some(super::xmp::KEYWORD.as_bytes());
        if !is_xmp {
            out.extend_from_slice(&png[pos..end]);
        }
        if &kind == b"IHDR" && !seen_ihdr {
            seen_ihdr = true;
            ITXtChunk::new(super::xmp::KEYWORD, xmp).encode(&mut out).map_err(err)?;
        }
        seen_iend = &kind == b"IEND";
        pos = end;
    }
    if !seen_iend {
        return Err(bad("has no IEND chunk (the file is cut off)".into()));
    }
    Ok(out)
}

const SIGNATURE: [u8; 8] = [137, 80, 78, 71, 13, 10, 26, 10];
