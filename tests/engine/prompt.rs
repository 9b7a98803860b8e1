//! A1111 prompt tags (`<lora:NAME:W>`, `<lora:NAME:TE_W:UNET_W>`, `<lyco:…>`): removed before
//! tokenizing, they leave the ids transformers gives the prompt without them (checked on every
//! SD1.5 prompt of tests/fixtures/tokenizer_ids_extra.json with tags put at its start, between
//! its first two words and at its end), and their names select loaded adapters.

use loralab::model::ClipTokenizer;
use loralab::prompt::{match_adapter, parse_prompt, LoraTag};
use std::path::Path;

const TAGS: [(&str, (&str, f32, f32)); 3] = [
    ("<lora:Detail Tweaker (v1.5):0.7>", ("Detail Tweaker (v1.5)", 0.7, 0.7)),
    ("<lyco:x-y.z:-1:0.25>", ("x-y.z", -1.0, 0.25)),
    ("<lora:plain>", ("plain", 1.0, 1.0)),
];

fn summary(tags: &[LoraTag]) -> Vec<(&str, f32, f32)> {
    tags.iter().map(|t| (t.name.as_str(), t.te_weight, t.unet_weight)).collect()
}

#[test]
fn prompt_tags_removed_leave_transformers_ids() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer_ids_extra.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("JSON");
    let tok = ClipTokenizer::standard().expect("tokenizer");
    let mut checked = 0;
    for case in doc["sd15"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want: Vec<u32> = case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let own = parse_prompt(prompt).expect("fixture prompt parses");
        if !own.loras.is_empty() || !own.other.is_empty() {
            // Prompts written with tags were tokenized with them; their tags are checked below.
            continue;
        }
        let [(t0, w0), (t1, w1), (t2, w2)] = TAGS;
        let tagged = match prompt.split_once(' ') {
            Some((first, rest)) => format!("{t0}{first} {t1} {rest}{t2}"),
            None => format!("{t0}{prompt}{t1}{t2}"),
        };
        let parsed = parse_prompt(&tagged).unwrap_or_else(|e| panic!("{tagged:?}: {e}"));
        assert_eq!(summary(&parsed.loras), [w0, w1, w2], "{tagged:?}");
        assert_eq!(tok.encode_padded(&parsed.text), want, "{tagged:?} -> {:?}", parsed.text);
        checked += 1;
    }
    assert!(checked >= 50, "{checked} prompts checked");
}

#[test]
fn prompt_tags_of_fixture_prompts() {
    let p = parse_prompt("a lora <lora:my_style_v2:0.85> and <lyco:thing:1>").expect("parse");
    assert_eq!(p.text, "a lora  and ");
    assert_eq!(summary(&p.loras), [("my_style_v2", 0.85, 0.85), ("thing", 1.0, 1.0)]);
    let tok = ClipTokenizer::standard().expect("tokenizer");
    assert_eq!(tok.encode(&p.text), tok.encode("a lora and"));
    // A comma before a tag stays, as in A1111 (which replaces the tag by nothing).
    let p = parse_prompt("a photo of sks dog, <lora:style:0.7>").expect("parse");
    assert_eq!(p.text, "a photo of sks dog, ");
    assert_eq!(tok.encode(&p.text).last(), tok.encode(",").last());
}

#[test]
fn prompt_tag_names_select_loaded_adapters() {
    let loaded = ["loras/Detail Tweaker (v1.5).safetensors", "x-y.z", "Plain", "plain.safetensors"];
    let p = parse_prompt(&TAGS.map(|(t, _)| t).concat()).expect("parse");
    let picked: Vec<usize> = p.loras.iter().map(|t| match_adapter(&t.name, &loaded).expect("match")).collect();
    assert_eq!(picked, [0, 1, 2], "by stem; exact; ignoring case before stems");
    let p = parse_prompt("<lora:unknown:0.5>").expect("parse");
    let e = match_adapter(&p.loras[0].name, &loaded).expect_err("not loaded").to_string();
    for name in loaded {
        assert!(e.contains(&format!("`{name}`")), "{e}");
    }
}
