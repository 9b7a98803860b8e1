//! Training images: decoding (PNG, JPEG, WebP; the EXIF orientation applied, as photo viewers
//! show the picture), resizing so the shorter side equals the training resolution (Lanczos-3,
//! widened when downscaling so that it averages like an area filter), and cropping / flipping
//! to the square tensor the VAE encodes: f32 `[3, res, res]` in [-1, 1].
//!
//! Alpha is dropped (the stored colour of transparent pixels is kept), as kohya sd-scripts'
//! `load_image` does with PIL's `convert("RGB")`.

use crate::error::{Error, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// The most pixels an image may have: decoding holds it whole (a 16-bit RGBA PNG of this size
/// takes 400 MB, a sizeable part of a browser tab's memory).
pub const MAX_PIXELS: u64 = 50_000_000;

/// The most times an image's long side may exceed its short side. Training resizes the short
/// side to the resolution and keeps the aspect ratio, so a thin strip would become enormous
/// (a 1×50,000 PNG at resolution 512: 512×25,600,000 pixels, 39 GB) while the square cut
/// from it shows a sliver of the picture.
pub const MAX_ASPECT: u32 = 16;

/// A decoded image, upright.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub rgb: RgbImage,
    pub format: ImageFormat,
    /// Whether the file's EXIF orientation turned or mirrored the stored pixels.
    pub reoriented: bool,
}

fn format_err(file: &str, message: String) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Avif => "AVIF",
        ImageFormat::Ico => "ICO",
        ImageFormat::Hdr => "HDR",
        ImageFormat::OpenExr => "OpenEXR",
        ImageFormat::Qoi => "QOI",
        _ => "an unsupported",
    }
}

/// "a GIF", "an AVIF".
fn with_article(name: &str) -> String {
    if name.starts_with("an ") {
        name.to_string()
    } else if name.starts_with(['A', 'E', 'I', 'O', 'U']) {
        format!("an {name}")
    } else {
        format!("a {name}")
    }
}

/// Decodes `bytes` (named `file` in errors) by their contents, whatever the extension says.
/// Images over [`MAX_PIXELS`] or more elongated than [`MAX_ASPECT`] are refused from their
/// header, before any pixel is decoded.
pub fn decode_image(file: &str, bytes: &[u8]) -> Result<DecodedImage> {
    decode_image_limited(file, bytes, MAX_PIXELS)
}

/// [`decode_image`] with a pixel limit of `max_pixels` (checked against the dimensions the
/// header declares, before the pixel buffer is allocated).
pub fn decode_image_limited(file: &str, bytes: &[u8], max_pixels: u64) -> Result<DecodedImage> {
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(format_err(
                file,
                format!(
                    "is {} image; training images must be PNG, JPEG or WebP: convert it (any image editor can) or remove it",
                    with_article(format_name(other))
                ),
            ))
        }
        Err(_) if bytes.is_empty() => return Err(format_err(file, "is empty (0 bytes); remove it or copy it again".into())),
        Err(_) => {
            return Err(format_err(
                file,
                "is not a PNG, JPEG or WebP image (its contents are not recognised); remove it from the dataset or re-save it as PNG or JPEG".into(),
            ))
        }
    };
    if is_animated(format, bytes) {
        return Err(format_err(
            file,
            format!(
                "is an animated {}; training uses still images: save the frame you want as a PNG or JPEG and add that instead",
                format_name(format)
            ),
        ));
    }
    let damaged = |e: image::ImageError| {
        let message = match e {
            image::ImageError::Limits(_) => format!(
                "is too large to decode here ({e}); scale it down (a few megapixels are plenty for training) and add it again"
            ),
            e => format!(
                "could not be decoded as {} ({e}); the file may be truncated or damaged: re-save it from an image editor or remove it",
                format_name(format)
            ),
        };
        format_err(file, message)
    };
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let mut decoder = reader.into_decoder().map_err(damaged)?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > max_pixels {
        let limit = if max_pixels >= 1_000_000 {
            format!("the {} megapixels", max_pixels / 1_000_000)
        } else {
            format!("the {max_pixels} pixels")
        };
        return Err(format_err(
            file,
            format!(
                "is {w}×{h} pixels, more than {limit} an image may have here; scale it down (a few megapixels are plenty for training) and add it again"
            ),
        ));
    }
    if w.min(h) > 0 && w.max(h) as u64 > MAX_ASPECT as u64 * w.min(h) as u64 {
        return Err(format_err(
            file,
            format!(
                "is {w}×{h} pixels, its long side more than {MAX_ASPECT} times its short side; training cuts a square from it, which would show a sliver of the picture: crop it to the part you want and add that instead"
            ),
        ));
    }
    // A broken EXIF block is not worth refusing the picture for: it is shown as stored.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(damaged)?;
    let reoriented = orientation != image::metadata::Orientation::NoTransforms;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    if rgb.width() == 0 || rgb.height() == 0 {
        return Err(format_err(file, "has no pixels (0 width or height)".into()));
    }
    Ok(DecodedImage { rgb, format, reoriented })
}

/// Whether the file is an animation: an APNG (an `acTL` chunk before the first `IDAT`) or an
/// animated WebP (a `VP8X` header with its animation flag).
fn is_animated(format: ImageFormat, bytes: &[u8]) -> bool {
    match format {
        ImageFormat::Png => {
            let mut pos = 8usize;
            while let Some(header) = bytes.get(pos..pos + 8) {
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
                match &header[4..8] {
                    b"acTL" => return true,
                    b"IDAT" | b"IEND" => return false,
                    _ => {}
                }
                let Some(next) = pos.checked_add(12).and_then(|p| p.checked_add(len)) else { return false };
                pos = next;
            }
            false
        }
        ImageFormat::WebP => bytes.get(12..16) == Some(&b"VP8X"[..]) && bytes.get(20).is_some_and(|f| f & 0x02 != 0),
        _ => false,
    }
}

/// The size with the shorter side `res` and the aspect ratio kept (the longer side rounded to
/// the nearest pixel, at least `res`).
pub fn short_side_size(width: u32, height: u32, res: u32) -> (u32, u32) {
    let scaled = |long: u32, short: u32| -> u32 {
        let v = (long as u64 * res as u64 + short as u64 / 2) / short.max(1) as u64;
        (v.min(u32::MAX as u64) as u32).max(res)
    };
    if width <= height {
        (res, scaled(height, width))
    } else {
        (scaled(width, height), res)
    }
}

/// Resizes so that the shorter side is `res` (Lanczos-3; unchanged when it already is).
pub fn resize_short_side(img: &RgbImage, res: u32) -> RgbImage {
    let (w, h) = short_side_size(img.width(), img.height(), res);
    if (w, h) == img.dimensions() {
        return img.clone();
    }
    image::imageops::resize(img, w, h, FilterType::Lanczos3)
}

/// Where the `res`×`res` square is cut from a resized image, and whether it is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Augment {
    pub x: u32,
    pub y: u32,
    pub flip: bool,
}

/// Writes the square at (`aug.x`, `aug.y`) of `img` (mirrored left-right when `aug.flip`) into
/// `out` as `[3, res, res]` values `v / 127.5 − 1`.
pub fn square_to_chw(img: &RgbImage, res: u32, aug: Augment, out: &mut [f32]) -> Result<()> {
    let (w, h) = img.dimensions();
    let r = res as usize;
    if aug.x.checked_add(res).is_none_or(|e| e > w) || aug.y.checked_add(res).is_none_or(|e| e > h) {
        return Err(Error::Invalid(format!(
            "a {res}×{res} crop at ({}, {}) does not fit a {w}×{h} image",
            aug.x, aug.y
        )));
    }
    if out.len() != 3 * r * r {
        return Err(Error::Invalid(format!("{} values given for a [3, {res}, {res}] image", out.len())));
    }
    let plane = r * r;
    for row in 0..r {
        for col in 0..r {
            let sx = if aug.flip { r - 1 - col } else { col };
            let p = img.get_pixel(aug.x + sx as u32, aug.y + row as u32).0;
            let i = row * r + col;
            for (c, v) in p.iter().enumerate() {
                out[c * plane + i] = *v as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(())
}
