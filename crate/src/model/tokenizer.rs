//! CLIP byte-level BPE tokenizer, producing the ids diffusers' `StableDiffusionPipeline` gets
//! from transformers' `CLIPTokenizer` (`tokenizer(prompt, padding="max_length",
//! max_length=77, truncation=True)`), which runs the `tokenizers` pipeline below — no ftfy,
//! no HTML unescaping:
//!
//! 1. `<|startoftext|>` / `<|endoftext|>` written in the text are special tokens, matched
//!    case-sensitively in the raw text before anything else.
//! 2. Each remaining span is lowercased character by character (`char::to_lowercase`, so a
//!    final `Σ` becomes `σ`, as in `tokenizers`, not `ς` as in Python's `str.lower`).
//! 3. Pre-tokenization by CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace dropped), implemented by hand: letters are `char::is_alphabetic` minus
//!    numbers (`Nl`) minus the marks and symbols that Unicode counts as alphabetic but not as
//!    letters (`NOT_LETTERS` below, made from Unicode 14 categories); numbers are
//!    `char::is_numeric` (exactly `\p{N}`); whitespace is `char::is_whitespace`.
//! 4. Each piece's UTF-8 bytes map to printable characters (GPT-2's `bytes_to_unicode`), the
//!    last one marked with `</w>`, and byte-pair merges apply by rank.
//! 5. `<|startoftext|>` + ids (truncated to `max_length - 2`) + `<|endoftext|>`, then padding
//!    with the pad token (SD1.x: `<|endoftext|>`; SD2.x's config says `!`, id 0).
//!
//! Text is NFC-normalised before lowercasing, as transformers does, so decomposed input (e.g.
//! `e` + U+0301) gives the same ids as its composed form. Known difference: characters
//! assigned after Unicode 14 may be classified differently from the `tokenizers` regex engine.
//!
//! Tokens can be added after loading ([`ClipTokenizer::add_tokens`], used by textual
//! inversion): they take the ids after the vocabulary and are matched between steps 1 and 3,
//! as `tokenizers` matches added tokens (see [`added`]).
//!
//! The standard table (the vocabulary of SD1.x/SD2.x's `tokenizer/vocab.json`) is embedded:
//! `crate/data/bpe_simple_vocab_16e6.first48894.txt.gz` (see `crate/data/README.md`).

pub mod added;

use crate::error::{Error, Result};
use added::{AddedTokens, Part};
use std::collections::HashMap;
use std::sync::Mutex;

/// Sequence length of SD's text encoders.
pub const MAX_LENGTH: usize = 77;
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The first 48894 merges of OpenAI CLIP's `bpe_simple_vocab_16e6.txt` (gzip).
static STANDARD_TABLE: &[u8] = include_bytes!("../../data/bpe_simple_vocab_16e6.first48894.txt.gz");
/// Number of merges CLIP uses: 49408 ids = 256 bytes + 256 bytes with `</w>` + merges + 2.
pub const STANDARD_MERGES: usize = 48894;

const CACHE_LIMIT: usize = 20_000;

/// A CLIP BPE tokenizer (vocabulary, merge ranks, special ids and a word cache).
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, without and with `</w>`.
    byte_ids: [[u32; 256]; 2],
    start: u32,
    end: u32,
    pad: u32,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
    /// Tokens added after loading, with ids from the one after the vocabulary's largest.
    added: AddedTokens,
}

/// A copy with the same vocabulary, merges, settings and added tokens, and an empty word cache.
impl Clone for ClipTokenizer {
    fn clone(&self) -> Self {
        ClipTokenizer {
            vocab: self.vocab.clone(),
            merges: self.merges.clone(),
            byte_ids: self.byte_ids,
            start: self.start,
            end: self.end,
            pad: self.pad,
            max_length: self.max_length,
            cache: Mutex::new(HashMap::new()),
            added: self.added.clone(),
        }
    }
}

impl ClipTokenizer {
    /// The standard CLIP tokenizer (SD1.x settings: pads with `<|endoftext|>`).
    pub fn standard() -> Result<Self> {
        let file = "embedded CLIP BPE table";
        let text = gunzip(STANDARD_TABLE).map_err(|m| format_err(file, m))?;
        let text = String::from_utf8(text).map_err(|e| format_err(file, e.to_string()))?;
        Self::from_open_clip_table(&text, file)
    }

    /// Builds from the text of OpenAI/open_clip's `bpe_simple_vocab_16e6.txt` (a header line
    /// then merges; only the first 48894 merges are used). `file` names it in errors.
    pub fn from_open_clip_table(text: &str, file: &str) -> Result<Self> {
        let merges = text
            .lines()
            .skip(1)
            .take(STANDARD_MERGES)
            .map(|l| parse_merge(l).ok_or_else(|| format_err(file, format!("malformed merge line `{l}`"))))
            .collect::<Result<Vec<_>>>()?;
        if merges.len() != STANDARD_MERGES {
            return Err(format_err(
                file,
                format!("has {} merges; the CLIP vocabulary needs {STANDARD_MERGES}", merges.len()),
            ));
        }
        let chars: Vec<char> = byte_order().into_iter().map(|(_, c)| c).collect();
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.extend(chars.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(START_OF_TEXT.into());
        tokens.push(END_OF_TEXT.into());
        // Later duplicates win, as in a Python dict.
        let vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        Self::from_parts(vocab, &merges, file)
    }

    /// Builds from the contents of a model's `tokenizer/vocab.json` and `tokenizer/merges.txt`.
    pub fn from_vocab_merges(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| format_err("vocab.json", format!("not a JSON map of token to id: {e}")))?;
        let mut merges = Vec::new();
        for (i, line) in merges_txt.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let m = parse_merge(line)
                .ok_or_else(|| format_err("merges.txt", format!("line {}: malformed merge `{line}`", i + 1)))?;
            merges.push(m);
        }
        Self::from_parts(vocab, &merges, "merges.txt")
    }

    /// Loads `dir/vocab.json` + `dir/merges.txt` when both exist (else the standard table),
    /// then applies `special_tokens_map.json` and `tokenizer_config.json` if present.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let read = |name: &str| -> Result<Option<String>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p)
                .map(Some)
                .map_err(|e| Error::Io { file: p.display().to_string(), message: e.to_string() })
        };
        let named = |r: Result<Self>, file: &str| {
            r.map_err(|e| match e {
                Error::Format { tensor, message, .. } => {
                    Error::Format { file: dir.join(file).display().to_string(), tensor, message }
                }
                other => other,
            })
        };
        let mut tok = match (read("vocab.json")?, read("merges.txt")?) {
            (Some(v), Some(m)) => named(Self::from_vocab_merges(&v, &m), "merges.txt")?,
            _ => Self::standard()?,
        };
        for cfg in ["special_tokens_map.json", "tokenizer_config.json"] {
            if let Some(text) = read(cfg)? {
                tok = named(tok.with_config_json(&text), cfg)?;
            }
        }
        Ok(tok)
    }

    fn from_parts(vocab: HashMap<String, u32>, merges: &[(String, String)], file: &str) -> Result<Self> {
        let id = |t: &str| vocab.get(t).copied();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(ia), Some(ib), Some(im)) = (id(a), id(b), id(&format!("{a}{b}"))) else {
                return Err(format_err(file, format!("merge `{a} {b}` uses a token missing from the vocabulary")));
            };
            merge_map.insert((ia, ib), (rank as u32, im));
        }
        let special = |t: &str| id(t).ok_or_else(|| format_err(file, format!("vocabulary lacks `{t}`")));
        let (start, end) = (special(START_OF_TEXT)?, special(END_OF_TEXT)?);
        let mut byte_ids = [[end; 256]; 2];
        for (b, c) in bytes_to_unicode().iter().enumerate() {
            // A byte missing from a custom vocabulary becomes the unknown token (`<|endoftext|>`).
            byte_ids[0][b] = id(&c.to_string()).unwrap_or(end);
            byte_ids[1][b] = id(&format!("{c}</w>")).unwrap_or(end);
        }
        let first_added = vocab.values().max().map_or(0, |&m| m.saturating_add(1));
        Ok(ClipTokenizer {
            vocab,
            merges: merge_map,
            byte_ids,
            start,
            end,
            pad: end,
            max_length: MAX_LENGTH,
            cache: Mutex::new(HashMap::new()),
            added: AddedTokens::new(first_added),
        })
    }

    /// Sets the padding token (must be in the vocabulary).
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        self.pad = self
            .token_id(token)
            .ok_or_else(|| format_err("tokenizer config", format!("pad token `{token}` is not in the vocabulary")))?;
        Ok(self)
    }

    /// Applies `pad_token` and `model_max_length` from a `tokenizer_config.json` or
    /// `special_tokens_map.json` (string or `{"content": ...}` form); other keys are ignored.
    pub fn with_config_json(mut self, json: &str) -> Result<Self> {
        let cfg: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format_err("tokenizer config", format!("not JSON: {e}")))?;
        let pad = match cfg.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(v) => v.get("content").and_then(|c| c.as_str()),
            None => None,
        };
        if let Some(pad) = pad {
            self = self.with_pad_token(pad)?;
        }
        if let Some(n) = cfg.get("model_max_length").and_then(|v| v.as_u64()) {
            // Unset configs store a huge sentinel (1e30); only take sensible lengths.
            if (2..=4096).contains(&n) {
                self.max_length = n as usize;
            }
        }
        Ok(self)
    }

    /// Id of a vocabulary token or an added token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied().or_else(|| self.added.id(token))
    }

    /// Adds tokens matched whole before BPE (see [`added`]); returns their ids, which follow
    /// the vocabulary and any tokens added before. Fails, adding none, when a token is empty,
    /// is in the vocabulary (as diffusers' `load_textual_inversion` refuses it), or equals an
    /// added token once normalized.
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        let refuse = |message: String| Err(Error::Invalid(message));
        // Each token normalized once (comparing every pair would normalize each n times).
        let patterns: Vec<String> = tokens.iter().map(|t| added::normalize(t)).collect();
        for (i, (&t, pattern)) in tokens.iter().zip(&patterns).enumerate() {
            if pattern.trim().is_empty() {
                return refuse(format!("cannot add the token {t:?}: it has no visible characters"));
            }
            if self.vocab.contains_key(t) {
                return refuse(format!(
                    "cannot add the token `{t}`: it is already in the tokenizer's vocabulary; choose another trigger word"
                ));
            }
            let earlier = tokens[..i].iter().zip(&patterns).find(|(_, p)| *p == pattern).map(|(&e, _)| e);
            if let Some(other) = self.added.clash_normalized(t, pattern).or(earlier) {
                return refuse(format!(
                    "cannot add the token `{t}`: the token `{other}` is already added and prompts cannot tell them apart; remove it first or choose another trigger word"
                ));
            }
        }
        Ok(tokens.iter().map(|t| self.added.push(t)).collect())
    }

    /// Removes added tokens; the tokens added after them move down to fill their ids. Fails,
    /// removing none, when one of them was not added.
    pub fn remove_added_tokens(&mut self, tokens: &[&str]) -> Result<()> {
        if let Some(t) = tokens.iter().find(|t| self.added.id(t).is_none()) {
            let have: Vec<String> = self.added.list().into_iter().map(|(c, _)| c).collect();
            return Err(Error::Invalid(format!("no added token `{t}` to remove (added tokens: {have:?})")));
        }
        for t in tokens {
            self.added.remove(t);
        }
        Ok(())
    }

    /// The added tokens with their ids, in id order.
    pub fn added_tokens(&self) -> Vec<(String, u32)> {
        self.added.list()
    }

    /// The id the first added token gets: one past the vocabulary's largest id.
    pub fn first_added_id(&self) -> u32 {
        self.added.first_id()
    }
    /// Size of the vocabulary, added tokens not counted.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn start_id(&self) -> u32 {
        self.start
    }
    pub fn end_id(&self) -> u32 {
        self.end
    }
    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `text` without start/end tokens, truncation or padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for span in split_special(text) {
            match span {
                Span::Special(true) => ids.push(self.start),
                Span::Special(false) => ids.push(self.end),
                Span::Text(t) => {
                    // transformers' CLIP normalizer (NFC, whitespace runs as one space,
                    // lowercase), then added tokens, then pre-tokenization of the rest.
                    let norm = added::normalize(t);
                    for part in self.added.split(&norm) {
                        match part {
                            Part::Ids(x) => ids.extend_from_slice(x),
                            Part::Text(text) => {
                                for piece in pre_tokenize(text) {
                                    self.bpe_piece(piece, &mut ids);
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// The `max_length` ids a diffusers pipeline feeds its text encoder: start, the text's ids
    /// truncated to `max_length - 2`, end, then padding.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let body = self.encode(text);
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.start);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.end);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// BPE of one pre-tokenized piece, appended to `out` (cached per piece).
    fn bpe_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ids) = cache.get(piece) {
            out.extend_from_slice(ids);
            return;
        }
        let bytes = piece.as_bytes();
        let mut syms: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[0][b as usize]).collect();
        if let (Some(last), Some(&b)) = (syms.last_mut(), bytes.last()) {
            *last = self.byte_ids[1][b as usize];
        }
        while syms.len() > 1 {
            // The lowest-ranked adjacent pair; merge all its (non-overlapping) occurrences.
            let best = syms
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&(rank, m)| (rank, w[0], w[1], m)))
                .min_by_key(|t| t.0);
            let Some((_, a, b, m)) = best else { break };
            let mut next = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    next.push(m);
                    i += 2;
                } else {
                    next.push(syms[i]);
                    i += 1;
                }
            }
            syms = next;
        }
        out.extend_from_slice(&syms);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(piece.to_string(), syms);
    }
}

fn format_err(file: &str, message: String) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message }
}

fn parse_merge(line: &str) -> Option<(String, String)> {
    let mut it = line.split(' ');
    let (a, b) = (it.next()?, it.next()?);
    (!a.is_empty() && !b.is_empty() && it.next().is_none()).then(|| (a.to_string(), b.to_string()))
}

enum Span<'a> {
    Text(&'a str),
    /// true: `<|startoftext|>`, false: `<|endoftext|>`.
    Special(bool),
}

/// Splits out the special tokens written in the raw text.
fn split_special(mut text: &str) -> Vec<Span<'_>> {
    let mut spans = Vec::new();
    loop {
        let s = text.find(START_OF_TEXT).map(|i| (i, true));
        let e = text.find(END_OF_TEXT).map(|i| (i, false));
        let first = match (s, e) {
            (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let Some((i, is_start)) = first else { break };
        if i > 0 {
            spans.push(Span::Text(&text[..i]));
        }
        spans.push(Span::Special(is_start));
        text = &text[i + if is_start { START_OF_TEXT.len() } else { END_OF_TEXT.len() }..];
    }
    if !text.is_empty() {
        spans.push(Span::Text(text));
    }
    spans
}

/// `\p{L}`: see the module docs.
pub fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric() && !in_ranges(c, NOT_LETTERS)
}

fn in_ranges(c: char, ranges: &[(u32, u32)]) -> bool {
    let u = c as u32;
    let i = ranges.partition_point(|&(_, hi)| hi < u);
    i < ranges.len() && ranges[i].0 <= u
}

/// CLIP's pre-tokenization pattern (see the module docs), whitespace removed.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let len = if let Some(k) = CONTRACTIONS.iter().find(|k| rest.starts_with(**k)) {
            k.len()
        } else if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        } else if is_letter(c) {
            rest.find(|x: char| !is_letter(x)).unwrap_or(rest.len())
        } else if c.is_numeric() {
            c.len_utf8()
        } else {
            rest.find(|x: char| x.is_whitespace() || is_letter(x) || x.is_numeric()).unwrap_or(rest.len())
        };
        pieces.push(&rest[..len]);
        rest = &rest[len..];
    }
    pieces
}

/// GPT-2's reversible byte → printable character map, indexed by byte.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    for (b, c) in byte_order() {
        map[b as usize] = c;
    }
    map
}

/// (byte, character) pairs in vocabulary order: the printable bytes as themselves (`!`..`~`,
/// `¡`..`¬`, `®`..`ÿ`), then the other bytes as U+0100 onwards; ids 0..256 of the vocabulary.
fn byte_order() -> Vec<(u8, char)> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut order: Vec<(u8, char)> =
        (0..256u32).filter(|&b| printable(b)).map(|b| (b as u8, char::from_u32(b).unwrap_or('?'))).collect();
    for (n, b) in (0..256u32).filter(|&b| !printable(b)).enumerate() {
        order.push((b as u8, char::from_u32(256 + n as u32).unwrap_or('?')));
    }
    order
}

/// Decompresses a gzip member (header fields skipped, CRC not checked: the input is embedded).
fn gunzip(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let bad = || "not a gzip stream".to_string();
    if data.len() < 18 || data[0] != 0x1f || data[1] != 0x8b || data[2] != 8 {
        return Err(bad());
    }
    let flags = data[3];
    let mut p = 10usize;
    if flags & 4 != 0 {
        let n = u16::from_le_bytes([*data.get(p).ok_or_else(bad)?, *data.get(p + 1).ok_or_else(bad)?]);
        p += 2 + n as usize;
    }
    for flag in [8u8, 16] {
        if flags & flag != 0 {
            p += data.get(p..).ok_or_else(bad)?.iter().position(|&b| b == 0).ok_or_else(bad)? + 1;
        }
    }
    if flags & 2 != 0 {
        p += 2;
    }
    let body = data.get(p..).ok_or_else(bad)?;
    miniz_oxide::inflate::decompress_to_vec_with_limit(body, 64 << 20).map_err(|e| format!("inflate failed: {e}"))
}

/// Characters that `char::is_alphabetic` accepts but that are not letters (`\p{L}`): the
/// combining marks and symbols with the Other_Alphabetic property (e.g. Indic and Thai vowel
/// signs, Hebrew and Arabic points, circled letters), from Unicode 14 categories Mn, Mc, Me and
/// So. Ranges may span non-alphabetic characters, which never reach this table.
#[rustfmt::skip]
const NOT_LETTERS: &[(u32, u32)] = &[
    (0x0345, 0x036F), (0x05B0, 0x05C7), (0x0610, 0x061A), (0x064B, 0x065F), (0x0670, 0x0670),
    (0x06D6, 0x06E4), (0x06E7, 0x06ED), (0x0711, 0x0711), (0x0730, 0x073F), (0x07A6, 0x07B0),
    (0x0816, 0x0817), (0x081B, 0x0823), (0x0825, 0x0827), (0x0829, 0x082C), (0x08D4, 0x0903),
    (0x093A, 0x093B), (0x093E, 0x094F), (0x0955, 0x0957), (0x0962, 0x0963), (0x0981, 0x0983),
    (0x09BE, 0x09CC), (0x09D7, 0x09D7), (0x09E2, 0x09E3), (0x0A01, 0x0A03), (0x0A3E, 0x0A51),
    (0x0A70, 0x0A71), (0x0A75, 0x0A83), (0x0ABE, 0x0ACC), (0x0AE2, 0x0AE3), (0x0AFA, 0x0B03),
    (0x0B3E, 0x0B57), (0x0B62, 0x0B63), (0x0B82, 0x0B82), (0x0BBE, 0x0BCC), (0x0BD7, 0x0C04),
    (0x0C3E, 0x0C56), (0x0C62, 0x0C63), (0x0C81, 0x0C83), (0x0CBE, 0x0CD6), (0x0CE2, 0x0CE3),
    (0x0D00, 0x0D03), (0x0D3E, 0x0D4C), (0x0D57, 0x0D57), (0x0D62, 0x0D63), (0x0D81, 0x0D83),
    (0x0DCF, 0x0DF3), (0x0E31, 0x0E31), (0x0E34, 0x0E3A), (0x0E4D, 0x0E4D), (0x0EB1, 0x0EB1),
    (0x0EB4, 0x0EBC), (0x0ECD, 0x0ECD), (0x0F71, 0x0F83), (0x0F8D, 0x0FBC), (0x102B, 0x103E),
    (0x1056, 0x1059), (0x105E, 0x1060), (0x1062, 0x1064), (0x1067, 0x106D), (0x1071, 0x1074),
    (0x1082, 0x108D), (0x108F, 0x109D), (0x1712, 0x1713), (0x1732, 0x1733), (0x1752, 0x1753),
    (0x1772, 0x1773), (0x17B6, 0x17C8), (0x1885, 0x1886), (0x18A9, 0x18A9), (0x1920, 0x1938),
    (0x1A17, 0x1A1B), (0x1A55, 0x1A74), (0x1ABF, 0x1B04), (0x1B35, 0x1B43), (0x1B80, 0x1B82),
    (0x1BA1, 0x1BAD), (0x1BE7, 0x1BF1), (0x1C24, 0x1C36), (0x1DD3, 0x1DF4), (0x24B6, 0x24E9),
    (0x2DE0, 0x2DFF), (0xA674, 0xA67B), (0xA69E, 0xA69F), (0xA802, 0xA802), (0xA80B, 0xA80B),
    (0xA823, 0xA827), (0xA880, 0xA881), (0xA8B4, 0xA8C5), (0xA8FF, 0xA8FF), (0xA926, 0xA92A),
    (0xA947, 0xA952), (0xA980, 0xA983), (0xA9B4, 0xA9BF), (0xA9E5, 0xA9E5), (0xAA29, 0xAA36),
    (0xAA43, 0xAA43), (0xAA4C, 0xAA4D), (0xAA7B, 0xAA7D), (0xAAB0, 0xAAB0), (0xAAB2, 0xAAB4),
    (0xAAB7, 0xAAB8), (0xAABE, 0xAABE), (0xAAEB, 0xAAEF), (0xAAF5, 0xAAF5), (0xABE3, 0xABEA),
    (0xFB1E, 0xFB1E), (0x10376, 0x1037A), (0x10A01, 0x10A0F), (0x10D24, 0x10D27), (0x10EAB, 0x10EAC),
    (0x11000, 0x11002), (0x11038, 0x11045), (0x11073, 0x11074), (0x11080, 0x11082), (0x110B0, 0x110C2),
    (0x11100, 0x11102), (0x11127, 0x11132), (0x11145, 0x11146), (0x11180, 0x11182), (0x111B3, 0x111BF),
    (0x111CE, 0x111CF), (0x1122C, 0x1123E), (0x112DF, 0x11303), (0x1133E, 0x1134C), (0x11357, 0x11357),
    (0x11362, 0x11363), (0x11435, 0x11445), (0x114B0, 0x114C1), (0x115AF, 0x115BE), (0x115DC, 0x115DD),
    (0x11630, 0x11640), (0x116AB, 0x116B5), (0x1171D, 0x1172A), (0x1182C, 0x11838), (0x11930, 0x1193C),
    (0x11940, 0x11940), (0x11942, 0x11942), (0x119D1, 0x119DF), (0x119E4, 0x119E4), (0x11A01, 0x11A0A),
    (0x11A35, 0x11A39), (0x11A3B, 0x11A3E), (0x11A51, 0x11A5B), (0x11A8A, 0x11A97), (0x11C2F, 0x11C3E),
    (0x11C92, 0x11CB6), (0x11D31, 0x11D43), (0x11D47, 0x11D47), (0x11D8A, 0x11D96), (0x11EF3, 0x11EF6),
    (0x16F4F, 0x16F4F), (0x16F51, 0x16F92), (0x16FF0, 0x16FF1), (0x1BC9E, 0x1BC9E), (0x1E000, 0x1E02A),
    (0x1E947, 0x1E947), (0x1F130, 0x1F189),
];
