//! Tokens added to a loaded tokenizer (textual-inversion triggers), matched as transformers'
//! `CLIPTokenizer.add_tokens(token)` makes them match (a `tokenizers` `AddedToken` with
//! `normalized=True`, `single_word=False`, no strip):
//!
//! - ids run from the first id after the vocabulary upwards, in the order of addition;
//!   removing a token moves the later ones down, as diffusers' `unload_textual_inversion` does;
//! - matching happens on the normalized text (NFC, whitespace runs as one space, lowercase;
//!   the token's own text normalized the same way) before pre-tokenization and BPE, leftmost
//!   first and, among tokens starting at the same place, longest first. Matches are not limited
//!   to whole words (`sks` is found inside `asksy`); the text on either side is tokenized on its
//!   own, so a word cut by a token ends there (`a<tok>b` gives `a</w>`, the token, `b</w>`);
//! - multi-vector embeddings: a match of `T` emits `T`, then `T_1`, `T_2`, … while those are
//!   added tokens, which is the id sequence diffusers' `maybe_convert_prompt` produces by
//!   rewriting `T` as `T T_1 T_2 …`. (diffusers only rewrites when the prompt spells the token
//!   with the same case as the token; here every match expands.) A match of `T_1` itself emits
//!   only `T_1`.

use unicode_normalization::UnicodeNormalization;

/// The normalization CLIP's `tokenizers` pipeline applies before matching added tokens: NFC,
/// each run of whitespace replaced by one space, then lowercase.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    /// `normalize(content)`, what is searched for.
    pattern: String,
    /// Ids a match emits: this token's, then those of `content_1`, `content_2`, ….
    expansion: Vec<u32>,
}

/// Added tokens with consecutive ids from `first_id`.
#[derive(Debug, Clone)]
pub struct AddedTokens {
    first_id: u32,
    tokens: Vec<AddedToken>,
}

/// A part of normalized text: text to pre-tokenize, or the ids of a matched added token.
#[derive(Debug, PartialEq)]
pub enum Part<'a> {
    Text(&'a str),
    Ids(&'a [u32]),
}

impl AddedTokens {
    pub fn new(first_id: u32) -> Self {
        Self { first_id, tokens: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn first_id(&self) -> u32 {
        self.first_id
    }

    /// Id of an added token (exact text).
    pub fn id(&self, content: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t.content == content).map(|i| self.first_id + i as u32)
    }

    /// Added tokens with their ids, in id order.
    pub fn list(&self) -> Vec<(String, u32)> {
        self.tokens.iter().enumerate().map(|(i, t)| (t.content.clone(), self.first_id + i as u32)).collect()
    }

    /// Which added token `content` would clash with: the same text, or the same normalized
    /// text (the two could not be told apart in a prompt).
    pub fn clash(&self, content: &str) -> Option<&str> {
        self.clash_normalized(content, &normalize(content))
    }

    /// [`AddedTokens::clash`] with `pattern` = `normalize(content)` already computed.
    pub fn clash_normalized(&self, content: &str, pattern: &str) -> Option<&str> {
        self.tokens.iter().find(|t| t.content == content || t.pattern == pattern).map(|t| t.content.as_str())
    }

    /// Appends a token (the caller has checked it is new and non-empty); returns its id.
    pub fn push(&mut self, content: &str) -> u32 {
        self.tokens.push(AddedToken { content: content.to_string(), pattern: normalize(content), expansion: Vec::new() });
        self.rebuild();
        self.first_id + self.tokens.len() as u32 - 1
    }

    /// Removes a token; later tokens move down one id. False when it was not added.
    pub fn remove(&mut self, content: &str) -> bool {
        let Some(i) = self.tokens.iter().position(|t| t.content == content) else { return false };
        self.tokens.remove(i);
        self.rebuild();
        true
    }

    fn rebuild(&mut self) {
        let ids: Vec<(String, u32)> = self.list();
        let find = |c: &str| ids.iter().find(|(t, _)| t == c).map(|&(_, id)| id);
        for (i, t) in self.tokens.iter_mut().enumerate() {
            let mut expansion = vec![self.first_id + i as u32];
            for k in 1.. {
                match find(&format!("{}_{k}", t.content)) {
                    Some(id) => expansion.push(id),
                    None => break,
                }
            }
            t.expansion = expansion;
        }
    }

    /// Splits normalized text at matches of the added tokens (see the module docs).
    pub fn split<'a>(&'a self, text: &'a str) -> Vec<Part<'a>> {
        let mut parts = Vec::new();
        let mut start = 0; // start of the pending text
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let best = self
                .tokens
                .iter()
                .filter(|t| !t.pattern.is_empty() && rest.starts_with(t.pattern.as_str()))
                .max_by_key(|t| t.pattern.len());
            match best {
                Some(t) => {
                    if start < pos {
                        parts.push(Part::Text(&text[start..pos]));
                    }
                    parts.push(Part::Ids(&t.expansion));
                    pos += t.pattern.len();
                    start = pos;
                }
                None => pos += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            parts.push(Part::Text(&text[start..]));
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(list: &[&str]) -> AddedTokens {
        let mut a = AddedTokens::new(100);
        for t in list {
            a.push(t);
        }
        a
    }

    #[test]
    fn normalize_collapses_whitespace_and_lowercases() {
        assert_eq!(normalize("A  <Cat-Toy>\t\nB"), "a <cat-toy> b");
        assert_eq!(normalize("e\u{301}"), "\u{e9}");
    }

    #[test]
    fn split_is_leftmost_then_longest() {
        let a = tokens(&["ab", "abc", "bcd"]);
        assert_eq!(a.split("xabcd"), vec![Part::Text("x"), Part::Ids(&[101]), Part::Text("d")]);
        assert_eq!(a.split("bcd"), vec![Part::Ids(&[102])]);
        assert_eq!(a.split("none here"), vec![Part::Text("none here")]);
    }

    #[test]
    fn multi_vector_expansion_and_removal() {
        let mut a = tokens(&["emb", "emb_1", "emb_2", "x"]);
        assert_eq!(a.split("emb"), vec![Part::Ids(&[100, 101, 102])]);
        assert_eq!(a.split("emb_1"), vec![Part::Ids(&[101])]);
        assert!(a.remove("emb_2"));
        assert!(!a.remove("emb_2"));
        assert_eq!(a.split("emb x"), vec![Part::Ids(&[100, 101]), Part::Text(" "), Part::Ids(&[102])]);
        assert_eq!(a.id("x"), Some(102));
    }

    #[test]
    fn clash_by_normalized_text() {
        let a = tokens(&["MyEmb"]);
        assert_eq!(a.clash("myemb"), Some("MyEmb"));
        assert_eq!(a.clash("other"), None);
    }
}
