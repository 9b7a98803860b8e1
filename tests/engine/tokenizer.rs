//! CLIP tokenizer against transformers' `CLIPTokenizer` (ids in
//! tests/fixtures/tokenizer_ids_extra.json, made by tools/fixtures/tokenizer_ids.py), through
//! both loading paths: the embedded table and vocab.json + merges.txt.

use loralab::model::tokenizer::{bytes_to_unicode, is_letter, pre_tokenize, ClipTokenizer, STANDARD_MERGES};
use loralab::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn standard() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| ClipTokenizer::standard().expect("embedded table"))
}

struct Case {
    prompt: String,
    ids: Vec<u32>,
}

fn cases(set: &str) -> Vec<Case> {
    let path = fixtures().join("tokenizer_ids_extra.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    doc[set]
        .as_array()
        .expect("case list")
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().expect("prompt").to_string(),
            ids: c["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect(),
        })
        .collect()
}

/// Prompts not in NFC form, with their composed form: both must give transformers' ids.
const NOT_NFC: &[(&str, &str)] = &[("e\u{301} combining acute (decomposed)", "\u{e9} combining acute (decomposed)")];

/// Compares every case, reporting all mismatches at once.
fn check_all(tok: &ClipTokenizer, cases: &[Case], what: &str) {
    let bad: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let got = tok.encode_padded(&c.prompt);
            (got != c.ids).then(|| format!("{:?}\n   got  {got:?}\n   want {:?}", c.prompt, c.ids))
        })
        .collect();
    assert!(bad.is_empty(), "{what}: {} of {} prompts differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

#[test]
fn tokenizer_notes_example() {
    let ids = standard().encode_padded("a photo of sks dog, <lora:style:0.7>");
    let want = [49406, 320, 1125, 539, 48136, 1929, 267, 283, 2179, 320, 281, 1844, 281, 271, 269, 278, 285, 49407];
    assert_eq!(&ids[..want.len()], &want);
    assert!(ids[want.len()..].iter().all(|&i| i == 49407), "SD1.5 pads with <|endoftext|>");
    assert_eq!(ids.len(), 77);
}

#[test]
fn tokenizer_standard_table_shape() {
    let t = standard();
    assert_eq!(t.vocab_size(), 49408);
    assert_eq!((t.start_id(), t.end_id(), t.pad_id(), t.max_length()), (49406, 49407, 49407, 77));
    assert_eq!(t.token_id("!"), Some(0));
    assert_eq!(t.token_id("a</w>"), Some(320));
    assert_eq!(t.token_id("Ā"), Some(188), "first non-printable byte");
    assert_eq!(STANDARD_MERGES, 49408 - 512 - 2);
    let b2u = bytes_to_unicode();
    assert_eq!((b2u[b'a' as usize], b2u[0], b2u[b' ' as usize], b2u[255]), ('a', 'Ā', 'Ġ', 'ÿ'));
}

#[test]
fn tokenizer_matches_transformers_sd15() {
    let cases = cases("sd15");
    assert!(cases.len() >= 50, "{} cases", cases.len());
    check_all(standard(), &cases, "embedded table");
}

#[test]
fn tokenizer_decomposed_text_is_nfc_normalised() {
    let cases = cases("sd15");
    for (decomposed, nfc) in NOT_NFC {
        let case = cases.iter().find(|c| c.prompt == *decomposed).expect("fixture has the NFC case");
        assert_eq!(standard().encode_padded(nfc), case.ids, "{nfc:?}");
        assert_eq!(standard().encode_padded(decomposed), case.ids, "{decomposed:?}");
    }
}

#[test]
fn tokenizer_sd2_pad_from_config() {
    let cases = cases("sd2");
    let by_pad = ClipTokenizer::standard().unwrap().with_pad_token("!").unwrap();
    check_all(&by_pad, &cases, "pad `!`");
    let cfg = r#"{"pad_token": {"content": "!", "lstrip": false}, "model_max_length": 77, "do_lower_case": true}"#;
    let by_cfg = ClipTokenizer::standard().unwrap().with_config_json(cfg).unwrap();
    assert_eq!(by_cfg.pad_id(), 0);
    check_all(&by_cfg, &cases, "tokenizer_config.json pad");
}

/// The vocab.json + merges.txt that transformers writes for CLIP, built independently here
/// from the same open_clip table (256 bytes, the same with `</w>`, merges joined, specials).
fn hf_files_from_table() -> (String, String) {
    let gz = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/bpe_simple_vocab_16e6.first48894.txt.gz"))
        .expect("table");
    // Skip the 10-byte gzip header written by `gzip -n`.
    assert_eq!(gz[3], 0, "no optional gzip header fields");
    let text = String::from_utf8(miniz_oxide::inflate::decompress_to_vec(&gz[10..]).expect("inflate")).unwrap();
    let merges: Vec<&str> = text.lines().skip(1).take(STANDARD_MERGES).collect();
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<char> = bytes.iter().map(|&b| char::from_u32(b).unwrap()).collect();
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(char::from_u32(256 + chars.len() as u32 - 188).unwrap());
        }
    }
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let map: serde_json::Map<String, serde_json::Value> =
        vocab.into_iter().enumerate().map(|(i, t)| (t, serde_json::Value::from(i))).collect();
    (serde_json::to_string(&map).unwrap(), format!("#version: 0.2\n{}\n", merges.join("\n")))
}

#[test]
fn tokenizer_vocab_json_and_merges_give_identical_ids() {
    let cases = cases("sd15");
    let (vocab, merges) = hf_files_from_table();
    let from_files = ClipTokenizer::from_vocab_merges(&vocab, &merges).expect("vocab.json + merges.txt");
    assert_eq!(from_files.vocab_size(), 49408);
    check_all(&from_files, &cases, "vocab.json + merges.txt");
    // A model's own tokenizer folder (real SD files when the fixtures provide them).
    let real = fixtures().join("tokenizer");
    if real.join("vocab.json").exists() && real.join("merges.txt").exists() {
        let t = ClipTokenizer::from_dir(&real).expect("fixture tokenizer folder");
        let set = if t.pad_id() == 0 { "sd2" } else { "sd15" };
        check_all(&t, &self::cases(set), "tests/fixtures/tokenizer");
    }
}

#[test]
fn tokenizer_from_dir_reads_files_and_config() {
    let dir = std::env::temp_dir().join(format!("loralab-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (vocab, merges) = hf_files_from_table();
    std::fs::write(dir.join("vocab.json"), vocab).unwrap();
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"pad_token": "!", "model_max_length": 77}"#).unwrap();
    let t = ClipTokenizer::from_dir(&dir).expect("from_dir");
    check_all(&t, &cases("sd2"), "from_dir with SD2 config");
    std::fs::remove_dir_all(&dir).ok();
    // A folder without vocab.json / merges.txt falls back to the embedded table.
    let empty = std::env::temp_dir().join(format!("loralab-tok-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(ClipTokenizer::from_dir(&empty).unwrap().encode("dog"), vec![1929]);
    std::fs::remove_dir_all(&empty).ok();
}

#[test]
fn tokenizer_truncates_keeping_the_end_token() {
    let t = standard();
    let long = "dog ".repeat(200);
    let ids = t.encode_padded(&long);
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (49406, 49407));
    assert!(ids[1..76].iter().all(|&i| i == 1929));
    assert_eq!(t.encode(&long).len(), 200);
    // Exactly 75 body tokens: no padding, end token last.
    let ids = t.encode_padded(&"dog ".repeat(75));
    assert_eq!((ids[75], ids[76]), (1929, 49407));
}

#[test]
fn tokenizer_clone_keeps_settings_and_added_tokens() {
    let mut tok = standard().clone();
    assert_eq!(tok.add_tokens(&["<cat-toy>"]).unwrap(), vec![49408]);
    let tok = tok.with_config_json(r#"{"pad_token": "!", "model_max_length": 12}"#).unwrap();
    let copy = tok.clone();
    let text = "a photo of <cat-toy> on the beach";
    assert!(copy.encode(text).contains(&49408));
    assert_eq!(copy.encode_padded(text), tok.encode_padded(text));
    assert_eq!(copy.added_tokens(), tok.added_tokens());
    assert_eq!((copy.pad_id(), copy.max_length()), (0, 12));
    // The original is unchanged by the copy's additions.
    let mut more = copy.clone();
    more.add_tokens(&["<dog-toy>"]).unwrap();
    assert_eq!((tok.added_tokens().len(), more.added_tokens().len()), (1, 2));
}

#[test]
fn tokenizer_pre_tokenization_and_letters() {
    assert_eq!(pre_tokenize("it's  (a:1.2) x²"), ["it", "'s", "(", "a", ":", "1", ".", "2", ")", "x", "²"]);
    assert_eq!(pre_tokenize("''s!'s"), ["''", "s", "!'", "s"]);
    assert_eq!(pre_tokenize(" \t\n "), Vec::<&str>::new());
    assert_eq!(pre_tokenize("东京123"), ["东京", "1", "2", "3"]);
    assert!(is_letter('é') && is_letter('ß') && is_letter('東') && is_letter('ǅ') && is_letter('ª'));
    // Alphabetic but not letters: a Thai vowel sign (Mn), a Devanagari vowel sign (Mc),
    // a circled letter (So), a Roman numeral (Nl).
    for c in ['\u{0E34}', '\u{093F}', 'Ⓐ', 'Ⅷ', '7', '_', ' '] {
        assert!(!is_letter(c), "{c:?} is not \\p{{L}}");
    }
}

#[test]
fn tokenizer_bad_files_are_clear_errors() {
    let (vocab, merges) = hf_files_from_table();
    let msg = |r: loralab::Result<ClipTokenizer>| match r {
        Err(e @ Error::Format { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("accepted a bad tokenizer"),
    };
    let m = msg(ClipTokenizer::from_vocab_merges("[1, 2]", &merges));
    assert!(m.contains("vocab.json") && m.contains("not a JSON map"), "{m}");
    let m = msg(ClipTokenizer::from_vocab_merges(&vocab, "#version: 0.2\ni n\nthree part line\n"));
    assert!(m.contains("merges.txt") && m.contains("line 3"), "{m}");
    let m = msg(ClipTokenizer::from_vocab_merges(&vocab, "#version: 0.2\nqq zz\n"));
    assert!(m.contains("`qq zz`") && m.contains("missing from the vocabulary"), "{m}");
    let m = msg(ClipTokenizer::from_vocab_merges(r#"{"a": 0, "<|endoftext|>": 1}"#, ""));
    assert!(m.contains("<|startoftext|>"), "{m}");
    let m = msg(ClipTokenizer::standard().unwrap().with_pad_token("<pad>"));
    assert!(m.contains("`<pad>`"), "{m}");
    let m = msg(ClipTokenizer::standard().unwrap().with_config_json("{not json"));
    assert!(m.contains("not JSON"), "{m}");
}
