//! Dataset file names, folders and captions in kohya sd-scripts' DreamBooth layout:
//! `<train dir>/<N>_<words>/<name>.<png|jpg|jpeg|webp>` with an optional `<name>.txt` (or
//! `<name>.caption`) beside it. `N` is how often each image is repeated per epoch and
//! `<words>` the caption of images without a caption file (kohya's "class tokens").
//!
//! Tag frequency follows kohya's `set_tag_frequency`: per folder, every caption split at
//! commas, each tag trimmed and lower-cased, counted once per image (repeats do not count).

use std::collections::BTreeMap;

/// What a file of a dropped dataset is, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// PNG, JPEG or WebP.
    Image,
    /// An image format this loader does not decode (BMP, GIF, AVIF, TIFF, HEIC, JPEG XL).
    OtherImage,
    /// `.txt`, or `.caption` (kohya's default caption extension).
    Caption { txt: bool },
    /// Operating-system litter (`.DS_Store`, `Thumbs.db`, `desktop.ini`, dot files, `__MACOSX/`)
    /// and kohya's own caches (`.npz` latents, `metadata_cache.json`).
    Ignored,
    Other,
}

/// A file name split into its folder, stem and extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SplitName {
    /// The innermost folder (`10_sks dog`); empty for a file without one.
    pub folder: String,
    /// Every folder above the file, joined with `/`; identifies the folder.
    pub dir: String,
    pub stem: String,
    /// Lower-case, without the dot.
    pub ext: String,
}

/// Splits `name` at `/` or `\`.
pub(crate) fn split_name(name: &str) -> SplitName {
    let parts: Vec<&str> = name.split(['/', '\\']).filter(|p| !p.is_empty() && *p != ".").collect();
    let file = parts.last().copied().unwrap_or("");
    let dirs = if parts.is_empty() { &parts[..] } else { &parts[..parts.len() - 1] };
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), e.to_ascii_lowercase()),
        _ => (file.to_string(), String::new()),
    };
    SplitName {
        folder: dirs.last().map(|s| s.to_string()).unwrap_or_default(),
        dir: dirs.join("/"),
        stem,
        ext,
    }
}

/// What kind of file `name` is.
pub(crate) fn file_kind(name: &str) -> FileKind {
    let split = split_name(name);
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let litter = ["thumbs.db", "desktop.ini", "metadata_cache.json"];
    if base.starts_with('.')
        || litter.contains(&base.to_ascii_lowercase().as_str())
        || name.split(['/', '\\']).any(|p| p == "__MACOSX")
        || split.ext == "npz"
    {
        return FileKind::Ignored;
    }
    match split.ext.as_str() {
        "png" | "jpg" | "jpeg" | "jpe" | "jfif" | "webp" => FileKind::Image,
        "bmp" | "gif" | "avif" | "tif" | "tiff" | "heic" | "heif" | "jxl" => FileKind::OtherImage,
        "txt" => FileKind::Caption { txt: true },
        "caption" => FileKind::Caption { txt: false },
        _ => FileKind::Other,
    }
}

/// kohya's folder name `N_words` → (N, words). `None` when the part before the first `_` is
/// not a number (kohya skips such folders; here they take the default repeats).
pub fn parse_kohya_folder(folder: &str) -> Option<(u32, String)> {
    let (n, words) = folder.split_once('_').unwrap_or((folder, ""));
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().map(|n| (n, words.to_string()))
}

/// A folder name usable on every file system: characters Windows forbids become `_`, outer
/// spaces and dots are trimmed.
pub fn safe_folder_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|') || c.is_control() { '_' } else { c })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| c == ' ' || c == '.');
    if trimmed.is_empty() {
        "_".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Reads a caption file: UTF-8 (a byte-order mark is skipped), the first line, trimmed
/// (kohya reads `lines[0].strip()`). `Ok(None)` for a file without text.
pub(crate) fn read_caption(bytes: &[u8]) -> Result<Option<String>, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "is not UTF-8 text (invalid byte at offset {}); save it as UTF-8 in a text editor",
            e.valid_up_to()
        )
    })?;
    let first = text.lines().next().unwrap_or("").trim();
    Ok(if first.is_empty() { None } else { Some(first.to_string()) })
}

/// Whether `caption` contains `word` as a whole word (ASCII case-insensitive; a word boundary
/// is any character that is not alphanumeric or `_`).
pub fn contains_word(caption: &str, word: &str) -> bool {
    let word = word.trim();
    if word.is_empty() {
        return true;
    }
    let hay = caption.to_lowercase();
    let needle = word.to_lowercase();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut start = 0;
    while let Some(pos) = hay[start..].find(&needle) {
        let at = start + pos;
        let end = at + needle.len();
        let before_ok = hay[..at].chars().next_back().is_none_or(|c| !is_word(c));
        let after_ok = hay[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return true;
        }
        start = at + hay[at..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// `trigger, caption` when `caption` lacks the trigger word; the caption unchanged otherwise.
pub fn with_trigger(caption: &str, trigger: &str) -> String {
    let trigger = trigger.trim();
    if trigger.is_empty() || contains_word(caption, trigger) {
        caption.to_string()
    } else if caption.trim().is_empty() {
        trigger.to_string()
    } else {
        format!("{trigger}, {caption}")
    }
}

/// Adds one caption's tags to a folder's counts (kohya's `set_tag_frequency`).
pub fn count_tags(counts: &mut BTreeMap<String, u64>, caption: &str) {
    for tag in caption.split(',') {
        let tag = tag.trim();
        if !tag.is_empty() {
            *counts.entry(tag.to_lowercase()).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        let s = split_name("data\\10_sks dog/IMG_1.JPG");
        assert_eq!((s.folder.as_str(), s.dir.as_str(), s.stem.as_str(), s.ext.as_str()), ("10_sks dog", "data/10_sks dog", "IMG_1", "jpg"));
        assert_eq!(split_name("a.b.png").stem, "a.b");
        assert_eq!(file_kind("x/.DS_Store"), FileKind::Ignored);
        assert_eq!(file_kind("__MACOSX/x/a.png"), FileKind::Ignored);
        assert_eq!(file_kind("a.webp"), FileKind::Image);
        assert_eq!(file_kind("a.gif"), FileKind::OtherImage);
        assert_eq!(file_kind("a.caption"), FileKind::Caption { txt: false });
        assert_eq!(parse_kohya_folder("10_sks dog"), Some((10, "sks dog".into())));
        assert_eq!(parse_kohya_folder("3_a_b"), Some((3, "a_b".into())));
        assert_eq!(parse_kohya_folder("5"), Some((5, String::new())));
        assert_eq!(parse_kohya_folder("photos"), None);
        assert_eq!(parse_kohya_folder("x_1"), None);
        assert_eq!(safe_folder_name(" 10_a/b:c. "), "10_a_b_c");
    }

    #[test]
    fn captions_and_trigger_words() {
        assert_eq!(read_caption(b"\xEF\xBB\xBF a dog , grass \nsecond").unwrap().as_deref(), Some("a dog , grass"));
        assert_eq!(read_caption(b"  \n").unwrap(), None);
        assert!(read_caption(b"\xff\xfe").unwrap_err().contains("UTF-8"));
        assert!(contains_word("photo of SKS dog", "sks"));
        assert!(!contains_word("photo of sksdog", "sks"));
        assert!(contains_word("sks, dog", "sks"));
        assert_eq!(with_trigger("a dog", "sks"), "sks, a dog");
        assert_eq!(with_trigger("an sks dog", "sks"), "an sks dog");
        let mut c = BTreeMap::new();
        count_tags(&mut c, "Sks dog, grass,, grass ");
        assert_eq!(c.get("sks dog"), Some(&1));
        assert_eq!(c.get("grass"), Some(&2));
    }
}
