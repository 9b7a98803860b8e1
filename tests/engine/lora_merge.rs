//! ΔW of every algorithm against direct sums, the merged-weight semantics (strength 0, IA³,
//! both DoRA variants, stacking, biases), and `loralab merge` exports re-read and compared
//! with `merged_weight`.

use super::common::randn;
use super::lora_parse::{bytes, fixture, kohya_tensors, parse, scalar, t, tiny_layers, KOHYA_META};
use loralab::io::safetensors::SafetensorsFile;
use loralab::lora::fuse::{fuse_to_path, OutputDType, Weighted};
use loralab::lora::{
    merged_weight, Delta, Dora, DoraKind, Factor, HostTensor, LayerAdapter, LayerShape, LoraFile, Target,
};
use loralab::model::checkpoint::{open_path, Component};
use std::path::Path;

fn ht(shape: &[usize], seed: u64) -> HostTensor {
    HostTensor::new(shape.to_vec(), randn(shape.iter().product(), seed)).expect("tensor")
}

fn adapter(delta: Delta, dora: Option<Dora>) -> LayerAdapter {
    LayerAdapter { target: Target::Unet, module: "m".into(), key: "k".into(), delta, dora, alpha: None }
}

/// Largest |a − b| relative to max |b|.
fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max) / scale
}

fn v(t: &HostTensor, idx: &[usize]) -> f64 {
    let mut flat = 0;
    for (d, i) in t.shape.iter().zip(idx) {
        flat = flat * d + i;
    }
    t.data[flat] as f64
}

#[test]
fn delta_weight_matches_direct_sums() {
    let conv = LayerShape::Conv { in_channels: 6, out_channels: 6, kernel: 3 };
    let (o, i, r) = (6, 6, 2);
    // LoRA / LoCon: ΔW[o,i,h,w] = s Σ_a up[o,a] down[a,i,h,w].
    let (down, up) = (ht(&[r, i, 3, 3], 1), ht(&[o, r, 1, 1], 2));
    let d = Delta::LowRank { down: down.clone(), up: up.clone(), mid: None, scale: 0.75 };
    let mut want = vec![];
    for oo in 0..o {
        for ii in 0..i {
            for s in 0..9 {
                want.push(0.75 * (0..r).map(|a| v(&up, &[oo, a, 0, 0]) * v(&down, &[a, ii, s / 3, s % 3])).sum::<f64>());
            }
        }
    }
    assert!(max_rel(&d.delta_weight(&conv).expect("locon").data, &want) < 1e-6);
    // Tucker LoCon: Σ_ab up[o,a] mid[a,b,h,w] down[b,i].
    let (down, mid, up) = (ht(&[r, i, 1, 1], 3), ht(&[3, r, 3, 3], 4), ht(&[o, 3, 1, 1], 5));
    let d = Delta::LowRank { down: down.clone(), up: up.clone(), mid: Some(mid.clone()), scale: 2.0 };
    let mut want = vec![];
    for oo in 0..o {
        for ii in 0..i {
            for s in 0..9 {
                let mut acc = 0.0;
                for a in 0..3 {
                    for b in 0..r {
                        acc += v(&up, &[oo, a, 0, 0]) * v(&mid, &[a, b, s / 3, s % 3]) * v(&down, &[b, ii, 0, 0]);
                    }
                }
                want.push(2.0 * acc);
            }
        }
    }
    assert!(max_rel(&d.delta_weight(&conv).expect("tucker locon").data, &want) < 1e-6);
    // LoHa with Tucker halves: (Σ t1[i,j,s] w1a[i,o] w1b[j,q]) ⊙ (same for 2) · scale.
    let (w1a, w1b, t1) = (ht(&[r, o], 6), ht(&[r, i], 7), ht(&[r, r, 3, 3], 8));
    let (w2a, w2b, t2) = (ht(&[r, o], 9), ht(&[r, i], 10), ht(&[r, r, 3, 3], 11));
    let d = Delta::LoHa {
        w1a: w1a.clone(),
        w1b: w1b.clone(),
        w2a: w2a.clone(),
        w2b: w2b.clone(),
        t1: Some(t1.clone()),
        t2: Some(t2.clone()),
        scale: 0.5,
    };
    let half = |t: &HostTensor, a: &HostTensor, b: &HostTensor, oo: usize, q: usize, s: usize| {
        let mut acc = 0.0;
        for x in 0..r {
            for y in 0..r {
                acc += v(t, &[x, y, s / 3, s % 3]) * v(a, &[x, oo]) * v(b, &[y, q]);
            }
        }
        acc
    };
    let mut want = vec![];
    for oo in 0..o {
        for q in 0..i {
            for s in 0..9 {
                want.push(0.5 * half(&t1, &w1a, &w1b, oo, q, s) * half(&t2, &w2a, &w2b, oo, q, s));
            }
        }
    }
    assert!(max_rel(&d.delta_weight(&conv).expect("loha tucker").data, &want) < 1e-6);
    // LoKr: kron(w1 [2,3], w2a [3,r] · w2b [r, 2·9]) · scale on a 6→6 3×3 convolution.
    let (w1, a2, b2) = (ht(&[2, 3], 12), ht(&[3, r], 13), ht(&[r, 18], 14));
    let d = Delta::LoKr {
        w1: Factor::Full(w1.clone()),
        w2: Factor::LowRank { a: a2.clone(), b: b2.clone() },
        t2: None,
        scale: 1.5,
    };
    let mut want = vec![];
    for oo in 0..o {
        for ii in 0..i {
            for s in 0..9 {
                let (x, p, y, q) = (oo / 3, oo % 3, ii / 2, ii % 2);
                let w2 = (0..r).map(|k| v(&a2, &[p, k]) * v(&b2, &[k, q * 9 + s])).sum::<f64>();
                want.push(1.5 * v(&w1, &[x, y]) * w2);
            }
        }
    }
    assert!(max_rel(&d.delta_weight(&conv).expect("lokr").data, &want) < 1e-6);
    // LoHa without Tucker on a linear layer.
    let lin = LayerShape::Linear { in_features: 5, out_features: 4 };
    let (a1, b1, a2, b2) = (ht(&[4, 2], 15), ht(&[2, 5], 16), ht(&[4, 3], 17), ht(&[3, 5], 18));
    let d = Delta::LoHa { w1a: a1.clone(), w1b: b1.clone(), w2a: a2.clone(), w2b: b2.clone(), t1: None, t2: None, scale: 3.0 };
    let mut want = vec![];
    for oo in 0..4 {
        for ii in 0..5 {
            let h1: f64 = (0..2).map(|k| v(&a1, &[oo, k]) * v(&b1, &[k, ii])).sum();
            let h2: f64 = (0..3).map(|k| v(&a2, &[oo, k]) * v(&b2, &[k, ii])).sum();
            want.push(3.0 * h1 * h2);
        }
    }
    assert!(max_rel(&d.delta_weight(&lin).expect("loha").data, &want) < 1e-6);
    // Shapes that do not fit are errors, not panics.
    let d = Delta::LowRank { down: ht(&[2, 7], 19), up: ht(&[4, 2], 20), mid: None, scale: 1.0 };
    assert!(d.delta_weight(&lin).is_err());
}

#[test]
fn merged_weight_semantics() {
    let lin = LayerShape::Linear { in_features: 5, out_features: 4 };
    let w = ht(&[4, 5], 30);
    let b = ht(&[4], 31);
    let low = Delta::LowRank { down: ht(&[2, 5], 32), up: ht(&[4, 2], 33), mid: None, scale: 0.5 };
    let dw: Vec<f64> = low.delta_weight(&lin).expect("dw").data.iter().map(|&x| x as f64).collect();
    let mag = HostTensor::new(vec![4], vec![1.0, 2.0, 0.5, 3.0]).expect("m");
    let peft = adapter(low.clone(), Some(Dora { magnitude: mag.clone(), kind: DoraKind::Peft }));
    let lyco = adapter(low.clone(), Some(Dora { magnitude: mag.clone(), kind: DoraKind::Lycoris { on_output: true } }));
    let ia3_out = adapter(Delta::Ia3 { weight: ht(&[4], 34), on_input: false }, None);
    let ia3_in = adapter(Delta::Ia3 { weight: ht(&[5], 35), on_input: true }, None);
    let full = adapter(Delta::Full { diff: ht(&[4, 5], 36), diff_b: Some(ht(&[4], 37)) }, None);
    let plain = adapter(low.clone(), None);
    // Strength 0 gives the base exactly, whatever the algorithm.
    for a in [&peft, &lyco, &ia3_out, &ia3_in, &full, &plain] {
        let (mw, mb) = merged_weight(&[(a, 0.0)], &w, Some(&b), &lin).expect("merge");
        assert_eq!((mw.data, mb.expect("bias").data), (w.data.clone(), b.data.clone()), "{:?}", a.delta.algorithm());
    }
    let s = 0.6f64;
    let wd: Vec<f64> = w.data.iter().map(|&x| x as f64).collect();
    let check = |a: &LayerAdapter, want: Vec<f64>, what: &str| {
        let (mw, _) = merged_weight(&[(a, s as f32)], &w, Some(&b), &lin).expect("merge");
        let e = max_rel(&mw.data, &want);
        assert!(e < 1e-6, "{what}: {e}");
    };
    check(&plain, wd.iter().zip(&dw).map(|(w, d)| w + s * d).collect(), "lora");
    let iw = |a: &LayerAdapter| match &a.delta {
        Delta::Ia3 { weight, .. } => weight.data.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        _ => unreachable!(),
    };
    let (wo, wi) = (iw(&ia3_out), iw(&ia3_in));
    check(&ia3_out, (0..20).map(|k| wd[k] * (1.0 + s * wo[k / 5])).collect(), "ia3 on outputs");
    check(&ia3_in, (0..20).map(|k| wd[k] * (1.0 + s * wi[k % 5])).collect(), "ia3 on inputs");
    // PEFT DoRA: m ⊙ (W + sΔW) / ‖W + sΔW‖ per row.
    let mut want = vec![];
    for r in 0..4 {
        let row: Vec<f64> = (0..5).map(|c| wd[r * 5 + c] + s * dw[r * 5 + c]).collect();
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        want.extend(row.iter().map(|x| x * mag.data[r] as f64 / n));
    }
    check(&peft, want, "peft dora");
    // LyCORIS DoRA: (W + ΔW) ⊙ (s (m / (‖W + ΔW‖ + ε) − 1) + 1).
    let mut want = vec![];
    for r in 0..4 {
        let row: Vec<f64> = (0..5).map(|c| wd[r * 5 + c] + dw[r * 5 + c]).collect();
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt() + f32::EPSILON as f64;
        let f = s * (mag.data[r] as f64 / n - 1.0) + 1.0;
        want.extend(row.iter().map(|x| x * f));
    }
    check(&lyco, want, "lycoris dora");
    // full: weight and bias move by s·diff; without a base bias the bias diff is dropped.
    let (mw, mb) = merged_weight(&[(&full, 0.6)], &w, Some(&b), &lin).expect("full");
    let Delta::Full { diff, diff_b: Some(db) } = &full.delta else { unreachable!() };
    assert!(max_rel(&mw.data, &wd.iter().zip(&diff.data).map(|(w, d)| w + s * *d as f64).collect::<Vec<_>>()) < 1e-6);
    let want_b: Vec<f64> = b.data.iter().zip(&db.data).map(|(b, d)| *b as f64 + s * *d as f64).collect();
    assert!(max_rel(&mb.expect("bias").data, &want_b) < 1e-6);
    assert!(merged_weight(&[(&full, 0.6)], &w, None, &lin).expect("full").1.is_none());
    // Adapters stack additively, each relative to the base.
    let all = [(&peft, 0.6f32), (&ia3_out, 0.6), (&full, 0.6), (&lyco, 0.6)];
    let (stacked, _) = merged_weight(&all, &w, Some(&b), &lin).expect("stack");
    let mut want = wd.clone();
    for one in &all {
        let (mw, _) = merged_weight(&[*one], &w, Some(&b), &lin).expect("one");
        for ((o, m), w) in want.iter_mut().zip(&mw.data).zip(&wd) {
            *o += *m as f64 - w;
        }
    }
    assert!(max_rel(&stacked.data, &want) < 1e-6);
    // Norm layers: w + s·w_norm, b + s·b_norm.
    let norm = LayerShape::Norm { channels: 4 };
    let na = adapter(Delta::Norm { weight: Some(ht(&[4], 38)), bias: Some(ht(&[4], 39)) }, None);
    let (nw, nb) = merged_weight(&[(&na, 2.0)], &b, Some(&b), &norm).expect("norm");
    let Delta::Norm { weight: Some(wn), bias: Some(bn) } = &na.delta else { unreachable!() };
    assert!(max_rel(&nw.data, &b.data.iter().zip(&wn.data).map(|(x, d)| *x as f64 + 2.0 * *d as f64).collect::<Vec<_>>()) < 1e-6);
    assert!(max_rel(&nb.expect("b").data, &b.data.iter().zip(&bn.data).map(|(x, d)| *x as f64 + 2.0 * *d as f64).collect::<Vec<_>>()) < 1e-6);
}

/// A LyCORIS file for the tiny model: LoHa on a convolution, full (with bias) on a linear layer,
/// IA³ on the text encoder.
fn lycoris_file(cfg: &loralab::model::config::PipelineConfig) -> LoraFile {
    let c2 = "lora_unet_down_blocks_0_resnets_0_conv2";
    let ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2";
    let tensors = vec![
        t(&format!("{c2}.hada_w1_a"), &[16, 2], 41),
        t(&format!("{c2}.hada_w1_b"), &[2, 144], 42),
        t(&format!("{c2}.hada_w2_a"), &[16, 2], 43),
        t(&format!("{c2}.hada_w2_b"), &[2, 144], 44),
        scalar(&format!("{c2}.alpha"), 1.0),
        t(&format!("{ff}.diff"), &[16, 64], 45),
        t(&format!("{ff}.diff_b"), &[16], 46),
        t("lora_te_text_model_encoder_layers_0_self_attn_k_proj.weight", &[8], 47),
        scalar("lora_te_text_model_encoder_layers_0_self_attn_k_proj.on_input", 0.0),
    ];
    parse("lyco.safetensors", &tensors, &[("ss_network_module", "lycoris.kohya")], cfg).expect("lycoris file")
}

/// Checks every parameter of the merged model at `out` against `merged_weight` on the base
/// model at `model` (values rounded as `round` stores them).
fn check_export(model: &Path, out: &Path, adapters: &[Weighted<'_>], round: fn(f32) -> f32) -> usize {
    let base = open_path(model, None).expect("base");
    let merged = open_path(out, None).expect("merged output opens");
    let (_, layers) = tiny_layers();
    let mut changed = 0;
    for (c, target) in [(Component::Unet, Some(Target::Unet)), (Component::TextEncoder, Some(Target::TextEncoder)), (Component::Vae, None)] {
        let (bw, mw) = (base.weights(c), merged.weights(c));
        assert_eq!(bw.names().collect::<Vec<_>>(), mw.names().collect::<Vec<_>>(), "{c:?} names");
        for name in bw.names() {
            let (shape, base_v) = bw.read_f32(name).expect("base tensor");
            let (mshape, got) = mw.read_f32(name).expect("merged tensor");
            assert_eq!(shape, mshape, "{name}");
            let module = name.strip_suffix(".weight").or(name.strip_suffix(".bias")).unwrap_or(name);
            let ads: Vec<(&LayerAdapter, f32)> = adapters
                .iter()
                .flat_map(|w| w.file.layers.iter().filter(|l| Some(l.target) == target && l.module == module).map(move |l| (l, w.strength)))
                .collect();
            let want: Vec<f32> = if ads.is_empty() {
                base_v.clone()
            } else {
                let info = layers.get(target.expect("adapted"), module).expect("layer");
                let bt = HostTensor::new(shape.clone(), base_v.clone()).expect("base");
                let (w, b) = if name.ends_with(".bias") {
                    let wname = format!("{module}.weight");
                    let (ws, wv) = bw.read_f32(&wname).expect("weight");
                    merged_weight(&ads, &HostTensor::new(ws, wv).expect("w"), Some(&bt), &info.shape).expect("merge")
                } else {
                    merged_weight(&ads, &bt, None, &info.shape).expect("merge")
                };
                if name.ends_with(".bias") { b.expect("bias").data } else { w.data }
            };
            let want: Vec<f32> = want.into_iter().map(round).collect();
            if want != base_v {
                changed += 1;
            }
            assert_eq!(got, want, "{c:?} {name}");
        }
    }
    changed
}

#[test]
fn merged_folder_export_matches_merged_weight() {
    let (cfg, _) = tiny_layers();
    let kohya = parse("kohya.safetensors", &kohya_tensors(), &KOHYA_META, &cfg).expect("kohya");
    let lyco = lycoris_file(&cfg);
    let adapters = [Weighted { file: &kohya, strength: 0.7 }, Weighted { file: &lyco, strength: -0.5 }];
    let out = std::env::temp_dir().join(format!("loralab-merge-folder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let model = fixture("models/tiny-sd15-a");
    let report = fuse_to_path(&model, None, &adapters, &out, OutputDType::Keep).expect("merge");
    assert_eq!(report.skipped_layers, 0);
    // 5 kohya layers + LoHa + full (weight and bias) + IA³.
    assert_eq!(report.merged, 9);
    let changed = check_export(&model, &out, &adapters, |x| x);
    assert_eq!(changed, 9);
    for f in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json"] {
        assert!(out.join(f).is_file(), "{f} copied");
    }
    let unet = SafetensorsFile::open_path(out.join("unet/diffusion_pytorch_model.safetensors")).expect("unet");
    let meta = &unet.metadata()["loralab_merged_loras"];
    let list: serde_json::Value = serde_json::from_str(meta).expect("JSON");
    assert_eq!(list[0]["name"], "kohya");
    assert_eq!(list[1]["strength"], -0.5);
    assert_eq!(unet.metadata()["format"], "pt");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn merged_single_file_keeps_compvis_names() {
    let (cfg, _) = tiny_layers();
    let kohya = parse("kohya.safetensors", &kohya_tensors(), &KOHYA_META, &cfg).expect("kohya");
    let adapters = [Weighted { file: &kohya, strength: 1.0 }];
    let dir = std::env::temp_dir().join(format!("loralab-merge-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = dir.join("merged.safetensors");
    // The single-file fixture is float16 and uses SD1.5's block numbering only through its
    // own configuration: give the folder's.
    let model = fixture("models/tiny-sd15-a.safetensors");
    let config = fixture("models/tiny-sd15-a");
    let report = fuse_to_path(&model, Some(&config), &adapters, &out, OutputDType::Keep).expect("merge");
    assert_eq!(report.merged, 5);
    let src = SafetensorsFile::open_path(&model).expect("src");
    let got = SafetensorsFile::open_path(&out).expect("out");
    let names = |f: &SafetensorsFile<_>| f.tensors().iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect::<Vec<_>>();
    assert_eq!(names(&src), names(&got), "same keys, dtypes and shapes");
    let q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    assert_ne!(src.read_f32(q).expect("q"), got.read_f32(q).expect("q"));
    let round = |x: f32| half::f16::from_f32(x).to_f32();
    // Compare through a re-open with the same configuration.
    let base = open_path(&model, Some(&config)).expect("base");
    let merged = open_path(&out, Some(&config)).expect("merged");
    let layers = loralab::lora::ModelLayers::from_checkpoint(&base).expect("layers");
    for l in &kohya.layers {
        let c = if l.target == Target::Unet { Component::Unet } else { Component::TextEncoder };
        let name = format!("{}.weight", l.module);
        let (shape, bv) = base.weights(c).read_f32(&name).expect("base");
        let info = layers.get(l.target, &l.module).expect("layer");
        let (w, _) = merged_weight(&[(l, 1.0)], &HostTensor::new(shape, bv).expect("t"), None, &info.shape).expect("merge");
        let want: Vec<f32> = w.data.into_iter().map(round).collect();
        assert_eq!(merged.weights(c).read_f32(&name).expect("merged").1, want, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn single_file_merged_into_a_folder_with_its_configs() {
    let (cfg, _) = tiny_layers();
    let kohya = parse("kohya.safetensors", &kohya_tensors(), &KOHYA_META, &cfg).expect("kohya");
    let adapters = [Weighted { file: &kohya, strength: 0.5 }];
    let out = std::env::temp_dir().join(format!("loralab-merge-s2f-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let single = fixture("models/tiny-sd15-a.safetensors");
    let folder = fixture("models/tiny-sd15-a");
    let err = fuse_to_path(&single, None, &adapters, &out, OutputDType::F32).expect_err("needs --config").to_string();
    assert!(err.contains("--config"), "{err}");
    fuse_to_path(&single, Some(&folder), &adapters, &out, OutputDType::F32).expect("merge");
    // The single file holds the folder's numbers (float16-exact), so the folder is the base.
    assert_eq!(check_export(&folder, &out, &adapters, |x| x), 5);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn merge_command_writes_a_loadable_folder() {
    let dir = std::env::temp_dir().join(format!("loralab-merge-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let lora = dir.join("style.safetensors");
    std::fs::write(&lora, bytes(&kohya_tensors(), &KOHYA_META)).expect("write");
    let out = dir.join("merged");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_loralab"))
        .arg("merge")
        .arg("--model")
        .arg(fixture("models/tiny-sd15-a"))
        .arg("--lora")
        .arg(format!("{}:0.8", lora.display()))
        .arg("--out")
        .arg(&out)
        .args(["--weights", "f16"])
        .output()
        .expect("runs");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let (cfg, _) = tiny_layers();
    let f = parse("style.safetensors", &kohya_tensors(), &KOHYA_META, &cfg).expect("lora");
    let changed = check_export(&fixture("models/tiny-sd15-a"), &out, &[Weighted { file: &f, strength: 0.8 }], |x| {
        half::f16::from_f32(x).to_f32()
    });
    assert!(changed >= 5);
    let te = SafetensorsFile::open_path(out.join("text_encoder/model.safetensors")).expect("te");
    assert!(te.tensors().iter().all(|t| t.dtype == loralab::io::safetensors::Dtype::F16 || !t.name.ends_with("weight")));
    assert!(te.metadata()["loralab_merged_loras"].contains("\"strength\":0.8"));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Against the libraries that wrote the fixture files (tests/fixtures/lora): merged_weight must
// give the weights their forward passes use, at strength 1 and 0.5. Bound 1e-4 relative (the
// fixtures' stated tolerance; measured on lavapipe: worst 2.2e-6 over 86 text-encoder and UNet
// outputs, while a wrong rule moves them by several percent).

#[test]
fn fused_weights_of_diffusers_match_delta_weight() {
    let (cfg, layers) = tiny_layers();
    let peft = open_fixture("peft.safetensors", &cfg);
    let refs = SafetensorsFile::open_path(fixture("lora/refs/fused.safetensors")).expect("refs");
    let base = open_path(fixture("models/tiny-sd15-a"), None).expect("model");
    let mut checked = 0;
    for t in refs.tensors() {
        let Some(module) = t.name.strip_prefix("fused_weight.") else { continue };
        let l = peft.layers.iter().find(|l| l.module == module).expect("adapted module");
        let info = layers.get(l.target, module).expect("layer");
        let (shape, w) = base.weights(Component::Unet).read_f32(&format!("{module}.weight")).expect("base");
        let dw = l.delta.delta_weight(&info.shape).expect("delta");
        let want = refs.read_f32(&t.name).expect("fused");
        let got: Vec<f32> = w.iter().zip(&dw.data).map(|(w, d)| w + 0.8 * d).collect();
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        assert!(max_rel(&got, &want64) < 1e-6, "{module}: {}", max_rel(&got, &want64));
        let (merged, _) = merged_weight(&[(l, 0.8)], &HostTensor::new(shape, w).expect("w"), None, &info.shape).expect("merge");
        assert!(max_rel(&merged.data, &want64) < 1e-6, "{module}");
        checked += 1;
    }
    assert_eq!(checked, 2);
}

fn open_fixture(file: &str, cfg: &loralab::model::config::PipelineConfig) -> LoraFile {
    let reader = loralab::io::LocalFile::open(fixture(&format!("lora/{file}"))).expect("fixture");
    loralab::lora::open_lora(reader, file, cfg).expect("adapter")
}

/// The tiny model's component weights with adapters merged by `merged_weight` as they load.
struct Merged<'a> {
    inner: &'a loralab::model::checkpoint::ComponentWeights<loralab::io::LocalFile>,
    plan: &'a loralab::lora::fuse::Plan<'a>,
    layers: &'a loralab::lora::ModelLayers,
}

impl loralab::model::WeightSource for Merged<'_> {
    fn load(&self, gpu: &loralab::Gpu, name: &str, shape: &[usize], dtype: loralab::DType) -> loralab::Result<loralab::Tensor> {
        let (stored, values) = self.inner.read_f32(name)?;
        let merged = self.plan.apply(self.inner.component(), name, &stored, &values, self.layers)?;
        loralab::Tensor::from_f32_as(gpu, shape, merged.as_deref().unwrap_or(&values), dtype)
    }
    fn contains(&self, name: &str) -> bool {
        loralab::model::WeightSource::contains(self.inner, name)
    }
    fn describe(&self) -> String {
        format!("merged {}", self.inner.describe())
    }
}

#[test]
fn merged_weights_reproduce_the_writing_libraries() {
    use loralab::model::clip::{ClipTextModel, EncodeOpts};
    use loralab::model::unet::UNet2DConditionModel;
    use loralab::model::WeightPolicy;
    let g = super::common::gpu();
    let (cfg, layers) = tiny_layers();
    let ck = open_path(fixture("models/tiny-sd15-a"), None).expect("model");
    let inputs = SafetensorsFile::open_path(fixture("lora/refs/inputs.safetensors")).expect("inputs");
    let ids: Vec<u32> = inputs.read_f32("input_ids").expect("ids").iter().map(|&x| x as u32).collect();
    let sample = loralab::Tensor::from_f32(g, &[1, 4, 8, 8], &inputs.read_f32("sample").expect("sample")).expect("upload");
    let ctx = loralab::Tensor::from_f32(g, &[1, 77, 8], &inputs.read_f32("encoder_hidden_states").expect("ctx")).expect("upload");
    let manifest = super::lora_parse::manifest();
    let mut worst = 0f64;
    let mut runs = 0;
    for (case, c) in manifest["cases"].as_object().expect("cases") {
        // (file, weight) pairs of the case.
        let files: Vec<(String, f32)> = match (c["file"].as_str(), c["adapter_weights"].as_object()) {
            (Some(f), _) if !case.starts_with("ti_") => vec![(f.to_string(), 1.0)],
            (None, Some(w)) if case == "stack" => c["files"]
                .as_array()
                .expect("files")
                .iter()
                .map(|f| {
                    let f = f.as_str().expect("file");
                    (f.to_string(), w[f.trim_end_matches(".safetensors")].as_f64().expect("weight") as f32)
                })
                .collect(),
            _ => continue,
        };
        let adapters: Vec<(LoraFile, f32)> = files.iter().map(|(f, w)| (open_fixture(f, &cfg), *w)).collect();
        let refs = SafetensorsFile::open_path(fixture(&format!("lora/{}", c["refs"].as_str().expect("refs")))).expect("refs");
        for s in c["strengths"].as_array().expect("strengths").iter().map(|s| s.as_f64().expect("s") as f32) {
            let weighted: Vec<Weighted> = adapters.iter().map(|(f, w)| Weighted { file: f, strength: w * s }).collect();
            let plan = loralab::lora::fuse::Plan::new(&weighted, &layers).expect("plan");
            let sfx = if s == 1.0 { String::new() } else { format!("_s{s}") };
            if let Some(want) = refs.get(&format!("prompt_embeds{sfx}")).map(|t| refs.read_f32(&t.name).expect("ref")) {
                let src = Merged { inner: &ck.text_encoder, plan: &plan, layers: &layers };
                let te = ClipTextModel::load(g, &ck.config.text_encoder, &src, WeightPolicy::default()).expect("te");
                let got = super::common::read(g, &te.encode(g, &[&ids], EncodeOpts::default()).expect("encode"));
                let e = max_rel(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
                assert!(e < 1e-4, "{case} s={s}: prompt_embeds relative error {e:.2e}");
                worst = worst.max(e);
                runs += 1;
            }
            let want = refs.read_f32(&format!("unet_out{sfx}")).expect("unet ref");
            let src = Merged { inner: &ck.unet, plan: &plan, layers: &layers };
            let unet = UNet2DConditionModel::load(g, &ck.config.unet, &src, WeightPolicy::default()).expect("unet");
            let got = super::common::read(g, &unet.forward(g, &sample, &[500.0], &ctx).expect("forward"));
            let e = max_rel(&got, &want.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(e < 1e-4, "{case} s={s}: unet_out relative error {e:.2e}");
            worst = worst.max(e);
            runs += 1;
        }
    }
    eprintln!("{runs} forward passes with merged adapters, worst relative error {worst:.2e}");
    assert!(runs >= 80, "only {runs} references compared");
}
