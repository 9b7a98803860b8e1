//! `loralab eval` through the built binary: a run on the tiny random model (it reports and
//! saves; its accuracy means nothing), and the errors for bad prompt files and options.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loralab-eval-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loralab")).arg("eval").args(args).output().expect("run loralab")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TWO_PROMPTS: &str = r#"{"prompt": "a red circle on a blue background", "shape": "circle", "color": "red", "background": "blue", "count": 1}
{"prompt": "two yellow stars, black background", "shape": "star", "color": "yellow", "background": "black", "count": 2}
"#;

#[test]
fn eval_runs_on_the_tiny_model() {
    let dir = temp_dir("run");
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, TWO_PROMPTS).expect("write");
    let save = dir.join("images");
    let model = fixtures().join("models/tiny-sd15-a");
    let (m, p, s) = (model.to_str().unwrap(), prompts.to_str().unwrap(), save.to_str().unwrap());
    let out = eval(&["--model", m, "--prompts", p, "--weights", "f32,q4_0", "--steps", "2", "--seed", "5", "--json", "--save-dir", s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    // tiny-sd15-a's scheduler is PNDM, which the engine does not run: Euler a.
    assert_eq!((v["sampler"].as_str(), v["sampler_from"].as_str()), (Some("euler_a"), Some("default")));
    assert_eq!((v["steps"].as_u64(), v["images_per_weight_type"].as_u64()), (Some(2), Some(2)));
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(64), Some(64)));
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.iter().map(|r| r["weights"].as_str().unwrap_or("?")).collect::<Vec<_>>(), ["f32", "q4_0"]);
    let mut files = vec![];
    for r in results {
        for key in ["color", "background", "shape"] {
            assert_eq!(r["score"][key]["total"], 2, "{key}: {r}");
            let pct = r["percent"][key].as_f64().expect("percent");
            let correct = r["score"][key]["correct"].as_f64().expect("correct");
            assert!((pct - 50.0 * correct).abs() < 1e-9, "{key}: {r}");
        }
        assert_eq!(r["score"]["count"]["total"], 2);
        assert!(r["seconds_per_image"].as_f64().is_some_and(|t| t > 0.0), "{r}");
        let images = r["images"].as_array().expect("images");
        assert_eq!(images.iter().map(|i| i["seed"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(images[1]["expected"]["color"], "yellow");
        assert_eq!(images[1]["line"], 2);
        for img in images {
            let f = img["file"].as_str().expect("file");
            let g = &img["guess"];
            let color = g["color"].as_str().unwrap_or("none");
            let guess = format!("{color}-{}-on-{}", g["shape"].as_str().unwrap_or("?"), g["background"].as_str().unwrap_or("?"));
            assert!(f.ends_with(&format!("{guess}.png")), "{f} does not name the guess {guess}");
            files.push(PathBuf::from(f));
        }
    }
    assert_eq!(files.len(), 4);
    for f in &files {
        let png = loralab::io::png::decode(&std::fs::read(f).expect("saved image")).expect("PNG");
        assert_eq!((png.width, png.height, png.channels), (64, 64, 3));
        let params = png.text("parameters").expect("parameters text");
        assert!(params.contains("Expected: "), "{params}");
    }
    assert_eq!(std::fs::read_dir(&save).expect("save dir").count(), 4);

    // Text report, one prompt, a named sampler.
    let out = eval(&["--model", m, "--prompts", p, "--weights", "f32", "--steps", "1", "--limit", "1", "--sampler", "ddim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("shape colour") && report.contains("1 ddim steps (option)"), "{report}");
    let row = report.lines().find(|l| l.starts_with("f32 ")).unwrap_or_else(|| panic!("no f32 row: {report}"));
    assert!(row.contains("/1)"), "{row}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_refuses_bad_prompt_files_and_options() {
    let dir = temp_dir("errors");
    let model = fixtures().join("models/tiny-sd15-a");
    let m = model.to_str().unwrap();
    let first = TWO_PROMPTS.lines().next().unwrap_or_default();
    let cases = [
        ("malformed.jsonl", format!("{first}\n{{\"prompt\": \"a\", \"shape\"\n"), vec!["malformed.jsonl: line 2: malformed JSON"]),
        (
            "colour.jsonl",
            format!("{first}\n\n{}\n", first.replace("\"blue\"", "\"teal\"")),
            vec!["colour.jsonl: line 3", "`background`", "unknown colour `teal`"],
        ),
        ("empty.jsonl", String::new(), vec!["empty.jsonl", "no records"]),
    ];
    for (name, body, needles) in cases {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        // The prompt file is read before the model: a missing model is not reached.
        for model in [m, "/nonexistent/model"] {
            let out = eval(&["--model", model, "--prompts", p.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out.stderr));
            let err = text(&out.stderr);
            for n in &needles {
                assert!(err.contains(n), "{name}: `{err}` lacks `{n}`");
            }
        }
    }
    let good = dir.join("good.jsonl");
    std::fs::write(&good, TWO_PROMPTS).expect("write");
    let g = good.to_str().unwrap();
    let out = eval(&["--model", "/nonexistent/model", "--prompts", g]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/model: no such file"), "{}", text(&out.stderr));
    let out = eval(&["--model", m, "--prompts", "/nonexistent/prompts.jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--prompts /nonexistent/prompts.jsonl: cannot read"), "{}", text(&out.stderr));
    for (args, needle) in [
        (vec!["--model", m], "--prompts FILE"),
        (vec!["--prompts", g], "--model PATH"),
        (vec!["--model", m, "--prompts", g, "--weights", "f32,q5"], "unknown weight type `q5`"),
        (vec!["--model", m, "--prompts", g, "--steps", "0"], "--steps 0"),
        (vec!["--model", m, "--prompts", g, "--limit", "x"], "--limit x"),
        (vec!["--model", m, "--prompts", g, "--sampler", "heun"], "unknown sampler"),
        (vec!["--model", m, "--prompts", g, "--cfg", "-1"], "--cfg -1"),
        (vec!["--model", m, "--prompts", g, "--fast"], "unknown option `--fast`"),
    ] {
        let out = eval(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(needle), "{args:?}: {}", text(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
