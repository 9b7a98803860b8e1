//! A1111 extra-network tags in prompts: `<lora:NAME>`, `<lora:NAME:W>`,
//! `<lora:NAME:TE_W:UNET_W>` (and `<lyco:…>`, the same), which select loaded adapters and
//! their strengths and are removed from the text before tokenizing.
//!
//! The rules follow A1111's `modules/extra_networks.py` (`parse_prompt`, regex
//! `<(\w+):([^>]+)>`) and its Lora extension (`extra_networks_lora.py`):
//! - a tag is `<`, a kind (letters, digits, `_`), `:`, then anything up to the next `>`; the
//!   part after the kind is split at every `:` into items. Items `key=value` are named, the
//!   others positional: NAME, then TE_W, then UNET_W. Named `te=` / `unet=` override them.
//!   TE_W defaults to 1, UNET_W to TE_W. Weights are decimal numbers, negative allowed.
//!   NAME is kept as written (spaces, dots, dashes, parentheses included).
//! - the tag is replaced by nothing, exactly as A1111 does: the text around it is not joined
//!   or tidied. Whitespace left behind changes no token (CLIP drops whitespace); a comma left
//!   behind (`a cat, <lora:x:1>` → `a cat, `) stays a token, as it does in A1111.
//! - tags of other kinds (`<hypernet:…>`) are removed as A1111 removes them and returned in
//!   [`ParsedPrompt::other`] so the caller can say they were not applied.
//!
//! Beyond A1111, which skips what it cannot read: a `lora`/`lyco` tag without a name
//! (`<lora:>`, `<lora::1>`), without its closing `>`, with a weight that is not a finite number,
//! with a fourth positional item (A1111's `dyn` rank, not supported) or an unknown named item is
//! an error quoting the tag.

use crate::error::{Error, Result};

/// One `<lora:…>` / `<lyco:…>` tag.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    /// The adapter name as written.
    pub name: String,
    /// Text-encoder strength.
    pub te_weight: f32,
    /// UNet strength.
    pub unet_weight: f32,
    /// The tag as written, for messages.
    pub tag: String,
}

/// A prompt with its extra-network tags taken out.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedPrompt {
    /// The text with every tag removed.
    pub text: String,
    /// The adapter tags in prompt order (a name given twice appears twice; A1111 applies both).
    pub loras: Vec<LoraTag>,
    /// Tags of other kinds, removed but not applied (e.g. `<hypernet:name:1>`).
    pub other: Vec<String>,
}

/// Tag kinds that select adapters.
pub const LORA_KINDS: [&str; 2] = ["lora", "lyco"];

/// Python's `\w` for the tag kind.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn tag_err(tag: &str, message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("prompt tag `{tag}`: {message}"))
}

/// Splits extra-network tags out of `prompt` (rules in the module docs).
pub fn parse_prompt(prompt: &str) -> Result<ParsedPrompt> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut other = Vec::new();
    let mut rest = prompt;
    while let Some(lt) = rest.find('<') {
        text.push_str(&rest[..lt]);
        let after = &rest[lt + 1..];
        let kind_len = after.find(|c: char| !is_word(c)).unwrap_or(after.len());
        let kind = &after[..kind_len];
        let is_lora = LORA_KINDS.contains(&kind);
        let body = after[kind_len..].strip_prefix(':');
        let (Some(body), false) = (body, kind.is_empty()) else {
            // Not a tag: keep the `<` and look again after it.
            text.push('<');
            rest = after;
            continue;
        };
        let Some(gt) = body.find('>') else {
            if is_lora {
                let start: String = rest[lt..].chars().take(60).collect();
                return Err(tag_err(&start, "has no closing `>`"));
            }
            text.push('<');
            rest = after;
            continue;
        };
        let args = &body[..gt];
        let tag = &rest[lt..lt + 1 + kind_len + 1 + gt + 1];
        if is_lora {
            loras.push(parse_lora(tag, args)?);
        } else if args.is_empty() {
            // `<kind:>` is not a tag in A1111 either.
            text.push_str(tag);
        } else {
            other.push(tag.to_string());
        }
        rest = &body[gt + 1..];
    }
    text.push_str(rest);
    Ok(ParsedPrompt { text, loras, other })
}

fn parse_lora(tag: &str, args: &str) -> Result<LoraTag> {
    let mut positional = Vec::new();
    let (mut te, mut unet) = (None, None);
    for item in args.split(':') {
        match item.split_once('=') {
            Some((key, value)) => match key.trim() {
                "te" => te = Some(weight(tag, value)?),
                "unet" => unet = Some(weight(tag, value)?),
                "dyn" => return Err(tag_err(tag, "dynamic rank (`dyn`) is not supported")),
                other => return Err(tag_err(tag, format!("unknown option `{other}=` (known: te=, unet=)"))),
            },
            None => positional.push(item),
        }
    }
    let name = match positional.first() {
        Some(n) if !n.trim().is_empty() => n.to_string(),
        _ => return Err(tag_err(tag, "no adapter name (write `<lora:NAME:WEIGHT>`)")),
    };
    if positional.len() > 3 {
        return Err(tag_err(
            tag,
            "too many items: `<lora:NAME:W>` or `<lora:NAME:TE_W:UNET_W>` (a fourth, A1111's dynamic rank, is not supported)",
        ));
    }
    let te_pos = positional.get(1).map(|w| weight(tag, w)).transpose()?;
    let unet_pos = positional.get(2).map(|w| weight(tag, w)).transpose()?;
    let te_weight = te.or(te_pos).unwrap_or(1.0);
    let unet_weight = unet.or(unet_pos).unwrap_or(te_weight);
    Ok(LoraTag { name, te_weight, unet_weight, tag: tag.to_string() })
}

fn weight(tag: &str, text: &str) -> Result<f32> {
    match text.trim().parse::<f32>() {
        Ok(w) if w.is_finite() => Ok(w),
        _ => Err(tag_err(tag, format!("weight `{text}` is not a number (e.g. 0.8, -0.5)"))),
    }
}

/// A name without its directory and adapter-file extension (`loras/Style v2.safetensors` →
/// `Style v2`). Only the known extensions are removed, since names may contain dots.
pub fn adapter_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    for ext in [".safetensors", ".ckpt", ".pt", ".pth", ".bin"] {
        let cut = base.len().saturating_sub(ext.len());
        if base.len() > ext.len() && base.is_char_boundary(cut) && base[cut..].eq_ignore_ascii_case(ext) {
            return &base[..cut];
        }
    }
    base
}

/// Finds the loaded adapter a tag names: the first rule that matches any name decides —
/// the exact name, then the name ignoring case, then the file stems ([`adapter_stem`]) equal,
/// then the stems equal ignoring case. Returns the index into `loaded`. Several adapters
/// matching by the deciding rule, or none by any, is an error listing the candidates / the
/// loaded names.
pub fn match_adapter<S: AsRef<str>>(name: &str, loaded: &[S]) -> Result<usize> {
    let lower = |s: &str| s.to_lowercase();
    let rules: [&dyn Fn(&str) -> bool; 4] = [
        &|l| l == name,
        &|l| lower(l) == lower(name),
        &|l| adapter_stem(l) == adapter_stem(name),
        &|l| lower(adapter_stem(l)) == lower(adapter_stem(name)),
    ];
    for rule in rules {
        let hits: Vec<usize> = (0..loaded.len()).filter(|&i| rule(loaded[i].as_ref())).collect();
        match hits[..] {
            [] => continue,
            [one] => return Ok(one),
            _ => {
                let names: Vec<&str> = hits.iter().map(|&i| loaded[i].as_ref()).collect();
                return Err(Error::Invalid(format!(
                    "adapter name `{name}` matches several loaded adapters ({}); write the full name",
                    quoted(&names)
                )));
            }
        }
    }
    let names: Vec<&str> = loaded.iter().map(AsRef::as_ref).collect();
    Err(Error::Invalid(if names.is_empty() {
        format!("the prompt names adapter `{name}` but no adapter is loaded; load it first")
    } else {
        format!("the prompt names adapter `{name}`, which is not loaded; loaded adapters: {}", quoted(&names))
    }))
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, te: f32, unet: f32) -> (String, f32, f32) {
        (name.to_string(), te, unet)
    }

    fn tags(p: &ParsedPrompt) -> Vec<(String, f32, f32)> {
        p.loras.iter().map(|t| (t.name.clone(), t.te_weight, t.unet_weight)).collect()
    }

    #[test]
    fn weights_default_and_split() {
        let p = parse_prompt("a <lora:one> b <lora:two:0.7> c <lyco:three:-0.5:1.25> d").unwrap();
        assert_eq!(p.text, "a  b  c  d");
        assert_eq!(tags(&p), [lora("one", 1.0, 1.0), lora("two", 0.7, 0.7), lora("three", -0.5, 1.25)]);
        assert_eq!(p.loras[2].tag, "<lyco:three:-0.5:1.25>");
        assert!(p.other.is_empty());
    }

    #[test]
    fn names_keep_spaces_dots_and_brackets() {
        let p = parse_prompt("x, <lora:My Style (v1.5)-final.x:.5>, y").unwrap();
        assert_eq!(p.text, "x, , y");
        assert_eq!(tags(&p), [lora("My Style (v1.5)-final.x", 0.5, 0.5)]);
    }

    #[test]
    fn named_items_override() {
        let p = parse_prompt("<lora:a:0.3:unet=0.9><lora:b:te=0.2>").unwrap();
        assert_eq!(p.text, "");
        assert_eq!(tags(&p), [lora("a", 0.3, 0.9), lora("b", 0.2, 0.2)]);
    }

    #[test]
    fn other_text_and_kinds() {
        let e = parse_prompt("a <lora:x").unwrap_err();
        assert!(e.to_string().contains("`<lora:x`"), "{e}");
        let p = parse_prompt("1 < 2, <cat-toy> <hypernet:h:1> a<b <:x> <x:> <lora").unwrap();
        assert_eq!(p.text, "1 < 2, <cat-toy>  a<b <:x> <x:> <lora");
        assert_eq!(p.other, ["<hypernet:h:1>"]);
        assert!(p.loras.is_empty());
    }

    #[test]
    fn malformed_tags_are_errors_quoting_the_tag() {
        for (prompt, tag, says) in [
            ("a <lora:> b", "<lora:>", "no adapter name"),
            ("<lora::1>", "<lora::1>", "no adapter name"),
            ("<lora:x:abc>", "<lora:x:abc>", "weight `abc`"),
            ("<lora:x:1:nan>", "<lora:x:1:nan>", "weight `nan`"),
            ("<lyco:x:1:1:8>", "<lyco:x:1:1:8>", "too many"),
            ("<lora:x:dyn=8>", "<lora:x:dyn=8>", "dyn"),
            ("<lora:x:scale=2>", "<lora:x:scale=2>", "unknown option `scale=`"),
            ("a <lora:x:0.5", "<lora:x:0.5", "closing"),
        ] {
            let e = parse_prompt(prompt).unwrap_err().to_string();
            assert!(e.contains(&format!("`{tag}`")) && e.contains(says), "{prompt}: {e}");
        }
    }

    #[test]
    fn stems() {
        assert_eq!(adapter_stem("dir/Style v2.safetensors"), "Style v2");
        assert_eq!(adapter_stem("C:\\l\\x.SAFETENSORS"), "x");
        assert_eq!(adapter_stem("style.v2"), "style.v2");
        assert_eq!(adapter_stem(".pt"), ".pt");
    }

    #[test]
    fn matching_order() {
        let loaded = ["Style", "style.safetensors", "loras/Other v1.safetensors", "other v1"];
        assert_eq!(match_adapter("Style", &loaded).unwrap(), 0);
        assert_eq!(match_adapter("style.safetensors", &loaded).unwrap(), 1);
        assert_eq!(match_adapter("STYLE", &loaded).unwrap(), 0, "case-insensitive");
        assert_eq!(match_adapter("OTHER V1", &loaded).unwrap(), 3, "case-insensitive before stems");
        assert_eq!(match_adapter("Other v1.safetensors", &loaded).unwrap(), 2, "stem before case-insensitive stem");
        assert_eq!(match_adapter("more/Other v1.pt", &loaded).unwrap(), 2, "stems drop directories");
        let e = match_adapter("STYLE.pt", &loaded).unwrap_err().to_string();
        assert!(e.contains("several") && e.contains("`style.safetensors`") && e.contains("`Style`"), "{e}");
        let e = match_adapter("missing", &loaded).unwrap_err().to_string();
        assert!(e.contains("`missing`") && e.contains("`loras/Other v1.safetensors`"), "{e}");
        let none: [&str; 0] = [];
        assert!(match_adapter("x", &none).unwrap_err().to_string().contains("no adapter is loaded"));
    }
}
