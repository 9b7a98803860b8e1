//! The shipped demo model (www/models/demo) against the quality bar, through `loralab eval` on
//! the CI prompt subset (tools/demo/eval_prompts_ci.jsonl: triples and phrasings never seen in
//! training), with each weight type, the model's own sampler and guidance, 20 steps. The full
//! 100 prompts are `loralab eval --prompts tools/demo/eval_prompts.jsonl` (docs/demo-model.md).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file of a folder, recursively, with its size.
fn files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.expect("dir entry");
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push((p.clone(), e.metadata().expect("metadata").len()));
        }
    }
}

#[test]
fn the_demo_model_ships_within_its_budget() {
    let dir = repo().join("www/models/demo");
    let mut all = vec![];
    files(&dir, &mut all);
    let total: u64 = all.iter().map(|(_, n)| n).sum();
    assert!(total <= 10_000_000, "www/models/demo holds {total} bytes, over the 10 MB budget");
    for need in ["model_index.json", "MODEL_CARD.md", "unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"] {
        assert!(dir.join(need).is_file(), "www/models/demo/{need} is missing");
    }
    let index = std::fs::read_to_string(dir.join("model_index.json")).expect("model_index.json");
    let index = loralab::model::config::ModelIndex::from_json(&index, "www/models/demo/model_index.json").expect("parses");
    assert_eq!(index.defaults.guidance_scale, Some(5.0));
    assert_eq!(index.defaults.num_inference_steps, Some(20));
}

#[test]
fn the_demo_model_meets_the_quality_bar() {
    let root = repo();
    let model = root.join("www/models/demo");
    let prompts = root.join("tools/demo/eval_prompts_ci.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(["eval", "--model", model.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()])
        .args(["--weights", "f32,q8_0,q4_0", "--json", "--check"])
        .output()
        .expect("run loralab");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    // The model's recommendations: Euler a from its scheduler config, guidance 5.
    assert_eq!((v["sampler"].as_str(), v["sampler_from"].as_str()), (Some("euler_a"), Some("scheduler config")));
    assert_eq!((v["cfg"].as_f64(), v["cfg_from"].as_str(), v["steps"].as_u64()), (Some(5.0), Some("model"), Some(20)));
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    let mut summary = vec![];
    for r in results {
        let pct = |k: &str| r["percent"][k].as_f64().unwrap_or(0.0);
        summary.push(format!(
            "{}: shape colour {:.1} %, background {:.1} %, shape kind {:.1} %",
            r["weights"].as_str().unwrap_or("?"),
            pct("color"),
            pct("background"),
            pct("shape")
        ));
    }
    eprintln!("{}", summary.join("\n"));
    assert!(out.status.success(), "the bar (shape colour >= 90 %, background >= 90 %, shape kind >= 80 %) is missed:\n{}\n{stderr}", summary.join("\n"));
    for r in results {
        let pct = |k: &str| r["percent"][k].as_f64().unwrap_or(0.0);
        assert!(pct("color") >= 90.0 && pct("background") >= 90.0 && pct("shape") >= 80.0, "{}", summary.join("\n"));
    }
}
