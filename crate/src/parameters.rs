//! The A1111 `parameters` text that generated PNGs carry (and that A1111, ComfyUI, Civitai and
//! loralab read back):
//!
//! ```text
//! a photo of a dog <lora:style:0.7>
//! Negative prompt: blurry
//! Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5
//! ```
//!
//! The prompt may span lines; the negative prompt starts with `Negative prompt: `; the last
//! line is `key: value` pairs separated by `, ` (values containing commas are quoted).

use crate::error::{Error, Result};
use crate::sampler::SamplerKind;

/// Generation settings as written in a PNG.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative: String,
    pub steps: Option<usize>,
    pub sampler: Option<SamplerKind>,
    pub cfg: Option<f32>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Every `key: value` of the settings line, in order (including the ones above).
    pub settings: Vec<(String, String)>,
}

/// A1111's name of a sampler.
pub fn a1111_sampler(kind: SamplerKind) -> &'static str {
    match kind {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::Euler => "Euler",
        SamplerKind::EulerAncestral => "Euler a",
        SamplerKind::DpmPp2M => "DPM++ 2M",
        SamplerKind::DpmPp2MKarras => "DPM++ 2M Karras",
        SamplerKind::Lcm => "LCM",
    }
}

/// The sampler an A1111 name means (A1111 ≥ 1.9 writes the schedule separately:
/// `Sampler: DPM++ 2M, Schedule type: Karras`).
pub fn sampler_from_a1111(name: &str, schedule: Option<&str>) -> Option<SamplerKind> {
    let karras = schedule.is_some_and(|s| s.eq_ignore_ascii_case("karras"));
    match name.trim() {
        "DDIM" => Some(SamplerKind::Ddim),
        "Euler" => Some(SamplerKind::Euler),
        "Euler a" => Some(SamplerKind::EulerAncestral),
        "DPM++ 2M" if karras => Some(SamplerKind::DpmPp2MKarras),
        "DPM++ 2M" => Some(SamplerKind::DpmPp2M),
        "DPM++ 2M Karras" => Some(SamplerKind::DpmPp2MKarras),
        "LCM" => Some(SamplerKind::Lcm),
        _ => None,
    }
}

fn quote(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
    } else {
        v.to_string()
    }
}

/// The prompt as A1111 records it: adapters the prompt's `<lora:…>` tags do not name are
/// appended as tags (`<lora:NAME:W>`, or `<lora:NAME:TE_W:UNET_W>` when the strengths differ);
/// adapters at strength 0 are left out.
pub fn prompt_with_adapters(prompt: &str, adapters: &[(String, (f32, f32))]) -> String {
    let mut out = prompt.to_string();
    let tagged: Vec<String> =
        crate::prompt::parse_prompt(prompt).map(|p| p.loras.into_iter().map(|t| t.name).collect()).unwrap_or_default();
    for (name, (te, unet)) in adapters {
        if (*te != 0.0 || *unet != 0.0) && crate::prompt::match_adapter(name, &tagged).is_err() {
            if te == unet {
                out.push_str(&format!(" <lora:{name}:{te}>"));
            } else {
                out.push_str(&format!(" <lora:{name}:{te}:{unet}>"));
            }
        }
    }
    out
}

/// Writes the text: prompt, negative prompt (when not empty) and the settings line built from
/// `settings` (`key`, `value` pairs, quoted when needed).
pub fn format(prompt: &str, negative: &str, settings: &[(&str, String)]) -> String {
    let mut s = prompt.to_string();
    if !negative.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(negative);
    }
    let line: Vec<String> = settings.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
    s.push('\n');
    s.push_str(&line.join(", "));
    s
}

/// Splits the settings line into pairs, honouring quoted values.
fn settings_line(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = vec![];
    let mut rest = line.trim();
    while !rest.is_empty() {
        let colon = rest.find(": ")?;
        let key = rest[..colon].trim().to_string();
        if key.is_empty() || key.contains(',') {
            return None;
        }
        rest = &rest[colon + 2..];
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, e)) => v.push(e),
                        None => return None,
                    },
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = q[end?..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        } else {
            let end = rest.find(", ").unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = rest[end..].strip_prefix(", ").unwrap_or("");
        }
        out.push((key, value));
    }
    Some(out)
}

/// Reads the text back. `source` names the file for messages.
pub fn parse(text: &str, source: &str) -> Result<Parameters> {
    let text = text.trim_end_matches(['\n', '\r']);
    let (body, last) = match text.rfind('\n') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => ("", text),
    };
    let settings = settings_line(last).filter(|s| s.iter().any(|(k, _)| k == "Steps")).ok_or_else(|| Error::Format {
        file: source.to_string(),
        tensor: None,
        message: "the `parameters` text has no settings line (`Steps: …, Sampler: …`); it was not written by \
                  A1111-compatible software"
            .into(),
    })?;
    let (prompt, negative) = match body.find("Negative prompt: ") {
        Some(i) if i == 0 || body[..i].ends_with('\n') => {
            (body[..i].trim_end_matches('\n').to_string(), body[i + "Negative prompt: ".len()..].to_string())
        }
        _ => (body.to_string(), String::new()),
    };
    let get = |k: &str| settings.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let bad = |k: &str, v: &str| Error::Format {
        file: source.to_string(),
        tensor: None,
        message: format!("the `parameters` value `{k}: {v}` is not valid"),
    };
    let num = |k: &str| -> Result<Option<f64>> {
        match get(k) {
            Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| bad(k, v)),
            None => Ok(None),
        }
    };
    let (width, height) = match get("Size") {
        Some(v) => {
            let (w, h) = v.split_once('x').ok_or_else(|| bad("Size", v))?;
            let p = |s: &str| s.trim().parse::<usize>().map_err(|_| bad("Size", v));
            (Some(p(w)?), Some(p(h)?))
        }
        None => (None, None),
    };
    let whole = |x: Option<f64>, k: &str| -> Result<Option<u64>> {
        match x {
            Some(v) if v >= 0.0 && v.fract() == 0.0 && v < 1.8e19 => Ok(Some(v as u64)),
            Some(v) => Err(bad(k, &v.to_string())),
            None => Ok(None),
        }
    };
    Ok(Parameters {
        prompt,
        negative,
        steps: whole(num("Steps")?, "Steps")?.map(|v| v as usize),
        sampler: get("Sampler").and_then(|s| sampler_from_a1111(s, get("Schedule type"))),
        cfg: num("CFG scale")?.map(|v| v as f32),
        seed: whole(num("Seed")?, "Seed")?,
        width,
        height,
        settings,
    })
}

/// Reads the A1111 `parameters` of a PNG named `file` (a dropped or picked file): the parsed
/// settings and the raw text. Errors name the file and say what is wrong with it.
pub fn read_png(bytes: &[u8], file: &str) -> Result<(Parameters, String)> {
    let png = crate::io::png::decode_file(bytes, file)?;
    let text = png.text("parameters").ok_or_else(|| Error::Format {
        file: file.to_string(),
        tensor: None,
        message: "this PNG carries no generation parameters (no `parameters` text chunk); choose an image saved by \
                  loralab, A1111 or a compatible program"
            .into(),
    })?;
    Ok((parse(text, file)?, text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a1111_text() {
        let t = format(
            "a dog, <lora:style:0.7>\nsecond line",
            "blurry, bad",
            &[
                ("Steps", "20".into()),
                ("Sampler", "DPM++ 2M Karras".into()),
                ("CFG scale", "7.5".into()),
                ("Seed", "42".into()),
                ("Size", "512x768".into()),
                ("Model", "my, model".into()),
            ],
        );
        assert!(t.ends_with("Size: 512x768, Model: \"my, model\""), "{t}");
        let p = parse(&t, "x.png").unwrap();
        assert_eq!(p.prompt, "a dog, <lora:style:0.7>\nsecond line");
        assert_eq!(p.negative, "blurry, bad");
        assert_eq!((p.steps, p.cfg, p.seed, p.width, p.height), (Some(20), Some(7.5), Some(42), Some(512), Some(768)));
        assert_eq!(p.sampler, Some(SamplerKind::DpmPp2MKarras));
        assert_eq!(p.settings.last().unwrap(), &("Model".to_string(), "my, model".to_string()));
        // A1111 1.9+ schedule field, no negative prompt.
        let p = parse("cat\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64", "y").unwrap();
        assert_eq!((p.prompt.as_str(), p.negative.as_str(), p.sampler), ("cat", "", Some(SamplerKind::DpmPp2MKarras)));
    }

    #[test]
    fn adapters_become_tags_unless_the_prompt_names_them() {
        let a = vec![("style".to_string(), (0.7, 0.7)), ("subject".to_string(), (0.5, 1.0)), ("off".to_string(), (0.0, 0.0))];
        assert_eq!(prompt_with_adapters("a dog <lora:Style:0.7>", &a), "a dog <lora:Style:0.7> <lora:subject:0.5:1>");
    }

    #[test]
    fn errors_name_the_file_and_value() {
        let e = parse("just a caption", "a.png").unwrap_err().to_string();
        assert!(e.contains("a.png") && e.contains("settings line"), "{e}");
        let e = parse("x\nSteps: many, Seed: 1", "b.png").unwrap_err().to_string();
        assert!(e.contains("Steps: many"), "{e}");
        let e = parse("x\nSteps: 2, Size: 64", "c.png").unwrap_err().to_string();
        assert!(e.contains("Size: 64"), "{e}");
    }
}
