//! Textual-inversion embeddings: both file layouts read through `loralab::io`, their tokens in
//! the tokenizer (ids after the vocabulary, multi-vector expansion, transformers' matching of
//! added tokens), the text encoder's lookup of added ids, adding and removing, and the errors.
//!
//! The text encoder is checked against itself with the vectors written into its vocabulary
//! table instead (a model loaded from a source whose token table has the embedding's vectors
//! in rows nothing else uses, fed those rows' ids): the outputs must be identical, for an f32
//! and an f16 table. The ids and prompt embeddings diffusers produced for the two fixture files
//! (tests/fixtures/lora, cases `ti_a1111` and `ti_diffusers`) are compared as well.

use crate::common::*;
use loralab::io::safetensors::{Dtype, SafetensorsFile};
use loralab::io::LocalFile;
use loralab::model::clip::{ClipTextConfig, ClipTextModel, EncodeOpts};
use loralab::model::textual_inversion::{
    add_embedding, embeddings, open_textual_inversion, remove_embedding, EmbeddingLayout, TextualInversion,
};
use loralab::model::{ClipTokenizer, SafetensorsSource, WeightPolicy, WeightSource};
use loralab::quant::nmse;
use loralab::{DType, Error, Gpu, Tensor};
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

const MODEL: &str = "tiny-sd15-a";
const TABLE: &str = "text_model.embeddings.token_embedding.weight";
/// Hidden size of the fixture text encoders.
const D: usize = 8;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(fixtures().join("models").join(MODEL).join("tokenizer")).expect("tokenizer")
}

fn config() -> ClipTextConfig {
    let path = fixtures().join("models").join(MODEL).join("text_encoder/config.json");
    let text = std::fs::read_to_string(&path).expect("text encoder config");
    ClipTextConfig::from_json(&text, &path.display().to_string()).expect("config")
}

fn source() -> SafetensorsSource<LocalFile> {
    let path = fixtures().join("models").join(MODEL).join("text_encoder/model.safetensors");
    SafetensorsSource::new(SafetensorsFile::open_path(path).expect("text encoder weights"), "")
}

fn load(gpu: &Gpu, table: DType) -> ClipTextModel {
    ClipTextModel::load_with_table(gpu, &config(), &source(), WeightPolicy::default(), table).expect("text encoder")
}

/// The fixture text encoder with some rows of its token table replaced.
struct Substituted {
    inner: SafetensorsSource<LocalFile>,
    table: Vec<f32>,
}

impl Substituted {
    fn new(rows: &[(u32, &[f32])]) -> Self {
        let inner = source();
        let mut table = inner.file().read_f32(TABLE).expect("token table");
        for &(id, r) in rows {
            let at = id as usize * D;
            table[at..at + D].copy_from_slice(r);
        }
        Self { inner, table }
    }
}

impl WeightSource for Substituted {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> loralab::Result<Tensor> {
        if name == TABLE {
            return Tensor::from_f32_as(gpu, shape, &self.table, dtype);
        }
        self.inner.load(gpu, name, shape, dtype)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A safetensors file written by the reference writer: `(name, dtype, shape, bytes)`.
fn write(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).expect("view"))).collect();
    safetensors::serialize(views, None).expect("serialize")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

/// `n` vectors of size `D` whose values are exact in f16 (multiples of 1/64 in [-1, 1]).
fn vectors(n: usize, seed: u64) -> Vec<f32> {
    randu(n * D, -1.0, 1.0, seed).iter().map(|v| (v * 64.0).round() / 64.0).collect()
}

/// An embedding file in memory, opened as `name`.
fn embedding(name: &str, tensor: &str, shape: Vec<usize>, values: &[f32]) -> TextualInversion {
    open_textual_inversion(write(&[(tensor, Dtype::F32, shape, f32_bytes(values))]), name).expect("embedding")
}

/// The error of a refused embedding file; asserts it is a format error naming the file (and
/// the tensor when given).
fn refused(bytes: Vec<u8>, name: &str, tensor: Option<&str>) -> String {
    match open_textual_inversion(bytes, name) {
        Ok(ti) => panic!("{name}: accepted as {ti:?}"),
        Err(e @ Error::Format { .. }) => {
            let Error::Format { file, tensor: t, .. } = &e else { unreachable!() };
            assert_eq!(file, name, "{e}");
            assert_eq!(t.as_deref(), tensor, "{e}");
            e.to_string()
        }
        Err(e) => panic!("{name}: wrong error kind: {e}"),
    }
}

#[test]
fn ti_reads_both_layouts() {
    let v3 = vectors(3, 1);
    let a = open_textual_inversion(write(&[("emb_params", Dtype::F16, vec![3, D], f16_bytes(&v3))]), "dir/LxStyle.v2.safetensors")
        .expect("A1111 file");
    assert_eq!((a.token.as_str(), a.layout, a.tensor.as_str(), a.dim, a.n_vectors()), ("LxStyle.v2", EmbeddingLayout::A1111, "emb_params", D, 3));
    assert_eq!(a.vectors, v3, "f16 values are read exactly");
    assert_eq!(a.tokens(), ["LxStyle.v2", "LxStyle.v2_1", "LxStyle.v2_2"]);

    let b = embedding("C:\\emb\\old.safetensors", "string_to_param.*", vec![2, D], &vectors(2, 2));
    assert_eq!((b.token.as_str(), b.layout, b.n_vectors()), ("old", EmbeddingLayout::A1111, 2));

    let v1 = vectors(1, 3);
    let c = embedding("learned_embeds.safetensors", "<cat-toy>", vec![D], &v1);
    assert_eq!((c.token.as_str(), c.layout, c.n_vectors(), &c.vectors), ("<cat-toy>", EmbeddingLayout::Diffusers, 1, &v1));
    let c2 = embedding("learned_embeds.safetensors", "<two>", vec![2, D], &vectors(2, 4));
    assert_eq!((c2.token.as_str(), c2.n_vectors()), ("<two>", 2));
    assert_eq!(c2.clone().with_token("mine").tokens(), ["mine", "mine_1"]);
}

#[test]
fn ti_bad_files_are_refused_with_the_file_and_tensor() {
    let v = f32_bytes(&vectors(1, 5));
    let pickle_hint = |e: &str| e.contains("pickled") && e.contains(".safetensors");
    // Pickles: by name, and by the zip (torch.save) or protocol-2+ pickle magic.
    let e = refused(write(&[("emb_params", Dtype::F32, vec![1, D], v.clone())]), "EasyNegative.pt", None);
    assert!(pickle_hint(&e), "{e}");
    for magic in [b"PK\x03\x04".to_vec(), vec![0x80, 0x02, b'}', b'q']] {
        let mut bytes = magic;
        bytes.resize(64, 0);
        let e = refused(bytes, "renamed.safetensors", None);
        assert!(pickle_hint(&e), "{e}");
    }
    let e = refused(write(&[]), "empty.safetensors", None);
    assert!(e.contains("no tensors"), "{e}");
    let two = write(&[("emb_params", Dtype::F32, vec![1, D], v.clone()), ("lora_up.weight", Dtype::F32, vec![1, D], v.clone())]);
    let e = refused(two, "lora.safetensors", None);
    assert!(e.contains("2 tensors") && e.contains("`lora_up.weight`"), "{e}");
    let sdxl = write(&[("clip_g", Dtype::F32, vec![1, D], v.clone()), ("clip_l", Dtype::F32, vec![1, D], v.clone())]);
    assert!(refused(sdxl, "xl.safetensors", None).contains("SDXL"));
    let e = refused(write(&[("emb_params", Dtype::F32, vec![1, 1, D], v.clone())]), "r3.safetensors", Some("emb_params"));
    assert!(e.contains("[1, 1, 8]"), "{e}");
    let e = refused(write(&[("<t>", Dtype::I32, vec![D], v.clone())]), "int.safetensors", Some("<t>"));
    assert!(e.contains("I32"), "{e}");
    let e = refused(write(&[("<t>", Dtype::F32, vec![0, D], vec![])]), "none.safetensors", Some("<t>"));
    assert!(e.contains("no vectors"), "{e}");
    let nan = f32_bytes(&[f32::NAN; D]);
    let e = refused(write(&[("<t>", Dtype::F32, vec![D], nan)]), "nan.safetensors", Some("<t>"));
    assert!(e.contains("NaN"), "{e}");
    let e = refused(b"not a safetensors file".to_vec(), "junk.safetensors", None);
    assert!(e.contains("junk.safetensors"), "{e}");
}

/// Ids from transformers 5.24 `CLIPTokenizer` (tests/fixtures/tokenizer) after
/// `add_tokens(["sks", "<Cat-Toy>", "lxemb", "lxemb_1", "lxemb_2"])`, each prompt passed through
/// diffusers 0.42's `_maybe_convert_prompt` first:
/// `t(TextualInversionLoaderMixin._maybe_convert_prompt(None, p, t)).input_ids`.
const TRANSFORMERS_IDS: &[(&str, &[u32])] = &[
    ("asksy sks", &[49406, 320, 49408, 344, 49408, 49407]),
    ("a <cat-toy> b", &[49406, 320, 49409, 321, 49407]),
    ("a<CAT-TOY>b", &[49406, 320, 49409, 321, 49407]),
    ("sks,sks", &[49406, 49408, 267, 49408, 49407]),
    ("photo of sksdog", &[49406, 1125, 539, 49408, 1929, 49407]),
    ("it<cat-toy>'s", &[49406, 585, 49409, 568, 49407]),
    ("an lxemb photo", &[49406, 550, 49410, 49411, 49412, 1125, 49407]),
    ("lxemb_1 only", &[49406, 49411, 1033, 49407]),
    ("lxembroidery", &[49406, 49410, 49411, 49412, 532, 72, 17172, 49407]),
    ("a  <cat-toy>\tsks", &[49406, 320, 49409, 49408, 49407]),
    ("lxemb, <cat-toy> lxemb", &[49406, 49410, 49411, 49412, 267, 49409, 49410, 49411, 49412, 49407]),
];

#[test]
fn ti_added_tokens_match_transformers() {
    let mut tok = tokenizer();
    let ids = tok.add_tokens(&["sks", "<Cat-Toy>", "lxemb", "lxemb_1", "lxemb_2"]).expect("add");
    assert_eq!(ids, [49408, 49409, 49410, 49411, 49412]);
    assert_eq!(tok.vocab_size(), 49408, "added tokens are not vocabulary");
    assert_eq!(tok.token_id("<Cat-Toy>"), Some(49409));
    for (prompt, want) in TRANSFORMERS_IDS {
        let got = tok.encode_padded(prompt);
        assert_eq!(&got[..want.len()], *want, "{prompt:?}");
        assert!(got[want.len()..].iter().all(|&i| i == tok.pad_id()), "{prompt:?}: padding");
    }
    // Refusals change nothing.
    for bad in [&["a"][..], &["lxnew", "SKS"], &["x y", " "], &["<cat-toy>"]] {
        let e = tok.add_tokens(bad).expect_err("refused");
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
    assert_eq!(tok.added_tokens().len(), 5);
    tok.remove_added_tokens(&["sks"]).expect("remove");
    assert_eq!(tok.token_id("<Cat-Toy>"), Some(49408), "later tokens move down");
    assert!(tok.remove_added_tokens(&["<Cat-Toy>", "sks"]).is_err(), "one of them is not added");
    assert_eq!(tok.token_id("<Cat-Toy>"), Some(49408), "a failed removal removes none");
}

/// Token ids with every added id replaced by the vocabulary id its vectors were copied to.
fn substitute_ids(ids: &[u32], first_added: u32, rows_at: u32) -> Vec<u32> {
    ids.iter().map(|&i| if i >= first_added { rows_at + (i - first_added) } else { i }).collect()
}

#[test]
fn ti_text_encoder_reads_added_rows_like_vocabulary_rows() {
    for gpu in gpus() {
        encoder_rows_on(gpu);
    }
}

fn encoder_rows_on(gpu: &Gpu) {
    let style = open_textual_inversion(
        write(&[("emb_params", Dtype::F32, vec![3, D], f32_bytes(&vectors(3, 11)))]),
        "loras/lxstyle.safetensors",
    )
    .expect("A1111 file");
    let toy = embedding("learned_embeds.safetensors", "<lx-toy>", vec![D], &vectors(1, 12));
    let prompt = "a photo of lxstyle with a <lx-toy>, lxstyle";
    // Vocabulary rows that nothing in the prompt uses.
    let rows_at = 49000;
    let all: Vec<f32> = style.vectors.iter().chain(&toy.vectors).copied().collect();
    let rows: Vec<(u32, &[f32])> = all.chunks(D).enumerate().map(|(i, r)| (rows_at + i as u32, r)).collect();
    for table in [DType::F32, DType::F16] {
        let mut tok = tokenizer();
        let mut model = load(gpu, table);
        let plain_ids = tok.encode_padded(prompt);
        let all_opts = [EncodeOpts::default(), EncodeOpts::penultimate()];
        let plain: Vec<Vec<f32>> = all_opts
            .iter()
            .map(|&o| read(gpu, &model.encode(gpu, &[&plain_ids], o).expect("encode")))
            .collect();

        assert_eq!(add_embedding(gpu, &mut tok, &mut model, &style).expect("add style"), [49408, 49409, 49410]);
        assert_eq!(add_embedding(gpu, &mut tok, &mut model, &toy).expect("add toy"), [49411]);
        assert_eq!(model.num_added_tokens(), 4);
        assert_eq!(embeddings(&tok), [("lxstyle".to_string(), 3), ("<lx-toy>".to_string(), 1)]);
        let ids = tok.encode_padded(prompt);
        let words = |t: &str| tok.encode(t);
        let mut want = vec![tok.start_id()];
        want.extend(words("a photo of"));
        want.extend([49408, 49409, 49410]);
        want.extend(words("with a"));
        want.push(49411);
        want.extend(words(","));
        want.extend([49408, 49409, 49410, tok.end_id()]);
        assert_eq!(&ids[..want.len()], &want[..]);

        let reference =
            ClipTextModel::load_with_table(gpu, &config(), &Substituted::new(&rows), WeightPolicy::default(), table)
                .expect("reference model");
        let ref_ids = substitute_ids(&ids, 49408, rows_at);
        for (opts, plain) in all_opts.iter().zip(&plain) {
            let got = read(gpu, &model.encode(gpu, &[&ids, &plain_ids], *opts).expect("encode with added ids"));
            let want = read(gpu, &reference.encode(gpu, &[&ref_ids, &plain_ids], *opts).expect("reference encode"));
            let what = format!("table {table} {opts:?}");
            assert!(got == want, "{what}: added rows read differently from vocabulary rows (nmse {:e})", nmse(&got, &want));
            let (with, without) = got.split_at(got.len() / 2);
            assert!(without == &plain[..], "{what}: a row without added ids changed (nmse {:e})", nmse(without, plain));
            assert!(nmse(with, plain) > 1e-3, "{what}: the embedding changes the prompt embedding");
        }
        let emb = read(gpu, &model.embeddings(gpu, &[&ids]).expect("embeddings"));
        let pos = tok.encode(prompt).iter().position(|&i| i == 49411).expect("toy token") + 1;
        let position = source().file().read_f32("text_model.embeddings.position_embedding.weight").expect("positions");
        let want: Vec<f32> = (0..D).map(|k| toy.vectors[k] + position[pos * D + k]).collect();
        assert_eq!(&emb[pos * D..(pos + 1) * D], &want[..], "token row + position row");
    }
}

#[test]
fn ti_add_and_remove_keep_the_other_embeddings() {
    let gpu = gpu();
    let mut tok = tokenizer();
    let mut model = load(gpu, DType::F32);
    let a = embedding("learned_embeds.safetensors", "<lx-a>", vec![D], &vectors(1, 21));
    let b = embedding("lxb.safetensors", "emb_params", vec![2, D], &vectors(2, 22));
    let prompt = "lxb photo";
    let before_any = tok.encode_padded(prompt);
    add_embedding(gpu, &mut tok, &mut model, &a).expect("add a");
    add_embedding(gpu, &mut tok, &mut model, &b).expect("add b");
    let ids = tok.encode_padded(prompt);
    assert_eq!(&ids[1..3], &[49409, 49410]);
    let with_both = read(gpu, &model.encode(gpu, &[&ids], EncodeOpts::default()).expect("encode"));

    remove_embedding(gpu, &mut tok, &mut model, "<lx-a>").expect("remove a");
    assert_eq!(embeddings(&tok), [("lxb".to_string(), 2)]);
    assert_eq!(model.added_token_rows(), &b.vectors[..]);
    let ids = tok.encode_padded(prompt);
    assert_eq!(&ids[1..3], &[49408, 49409], "b moved down");
    let after = read(gpu, &model.encode(gpu, &[&ids], EncodeOpts::default()).expect("encode"));
    assert_eq!(after, with_both, "b's vectors moved with its ids");

    let e = remove_embedding(gpu, &mut tok, &mut model, "<lx-a>").expect_err("already removed").to_string();
    assert!(e.contains("`<lx-a>`") && e.contains("lxb"), "{e}");
    remove_embedding(gpu, &mut tok, &mut model, "lxb").expect("remove b");
    assert_eq!((model.num_added_tokens(), tok.added_tokens().len()), (0, 0));
    assert_eq!(tok.encode_padded(prompt), before_any, "the word is ordinary text again");
    let e = model.encode(gpu, &[&ids], EncodeOpts::default()).expect_err("id 49408 has no row now").to_string();
    assert!(e.contains("49408"), "{e}");
}

#[test]
fn ti_refusals_name_the_file_and_change_nothing() {
    let gpu = gpu();
    let mut tok = tokenizer();
    let mut model = load(gpu, DType::F32);
    let check = |e: Error, file: &str, tensor: &str, says: &str| {
        let text = e.to_string();
        match e {
            Error::Format { file: f, tensor: Some(t), .. } => assert_eq!((f.as_str(), t.as_str()), (file, tensor), "{text}"),
            _ => panic!("wrong error kind: {text}"),
        }
        assert!(text.contains(says), "{text}");
    };
    let wide = embedding("sd2/wide.safetensors", "emb_params", vec![1, 1024], &vec![0.5; 1024]);
    let e = add_embedding(gpu, &mut tok, &mut model, &wide).expect_err("wrong size");
    check(e, "sd2/wide.safetensors", "emb_params", "hidden size is 8");
    let taken = embedding("a.safetensors", "emb_params", vec![1, D], &vectors(1, 31));
    let e = add_embedding(gpu, &mut tok, &mut model, &taken).expect_err("`a` is a vocabulary token");
    check(e, "a.safetensors", "emb_params", "already in the tokenizer's vocabulary");

    let multi = embedding("lxm.safetensors", "emb_params", vec![2, D], &vectors(2, 32));
    add_embedding(gpu, &mut tok, &mut model, &multi).expect("add");
    let again = embedding("other/LXM.safetensors", "emb_params", vec![1, D], &vectors(1, 33));
    let e = add_embedding(gpu, &mut tok, &mut model, &again).expect_err("same word");
    check(e, "other/LXM.safetensors", "emb_params", "`lxm` is already added");
    let part = embedding("lxm_1.safetensors", "emb_params", vec![1, D], &vectors(1, 34));
    let e = add_embedding(gpu, &mut tok, &mut model, &part).expect_err("would be lxm's second vector");
    check(e, "lxm_1.safetensors", "emb_params", "a vector of the loaded embedding `lxm`");
    let part = embedding("lxm_7.safetensors", "emb_params", vec![1, D], &vectors(1, 35));
    let e = add_embedding(gpu, &mut tok, &mut model, &part).expect_err("would join lxm's vectors");
    check(e, "lxm_7.safetensors", "emb_params", "a vector of the loaded embedding `lxm`");
    assert_eq!((model.num_added_tokens(), embeddings(&tok)), (2, vec![("lxm".to_string(), 2)]));

    // A tokenizer and text encoder that were not loaded together.
    let mut fresh = load(gpu, DType::F32);
    let e = add_embedding(gpu, &mut tok, &mut fresh, &again.with_token("lxz")).expect_err("mismatched pair");
    assert!(matches!(e, Error::Invalid(ref m) if m.contains("disagree")), "{e}");
}

/// diffusers' references (tests/fixtures/lora, cases `ti_*`, made by tools/fixtures/lora.py):
/// the files loaded with `pipe.load_textual_inversion`, the ids diffusers fed for the case
/// prompt (after `maybe_convert_prompt`) and the resulting `prompt_embeds`. Measured on
/// lavapipe: max relative error 7.5e-7 / nmse 1.2e-13 (ti_a1111), 4.6e-7 / 1.2e-13
/// (ti_diffusers); the ids are equal.
#[test]
fn ti_fixture_cases_match_diffusers() {
    let dir = fixtures().join("lora");
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("tests/fixtures/lora/manifest.json");
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest JSON");
    let cases = manifest["cases"].as_object().expect("cases");
    let names: Vec<&String> = cases.keys().filter(|k| k.starts_with("ti_")).collect();
    assert_eq!(names, ["ti_a1111", "ti_diffusers"], "textual-inversion cases in the manifest");
    let gpu = gpu();
    for name in names {
        let case = &cases[name.as_str()];
        let path = dir.join(case["file"].as_str().expect("file"));
        let ti = loralab::model::textual_inversion::open_path(&path).expect("embedding file");
        let mut tok = tokenizer();
        let mut model = load(gpu, DType::F32);
        let ids = add_embedding(gpu, &mut tok, &mut model, &ti).expect("add");
        let mut want_added: Vec<(String, u32)> = case["added_tokens"]
            .as_object()
            .expect("added_tokens")
            .iter()
            .map(|(t, id)| (t.clone(), id.as_u64().expect("id") as u32))
            .collect();
        want_added.sort_by_key(|&(_, id)| id);
        assert_eq!(tok.added_tokens(), want_added, "{name}: added tokens");
        assert_eq!(ids, want_added.iter().map(|&(_, i)| i).collect::<Vec<_>>(), "{name}");

        let refs = SafetensorsFile::open_path(dir.join(case["refs"].as_str().expect("refs"))).expect("references");
        let want_ids: Vec<u32> = refs.read_f32("input_ids").expect("input_ids").iter().map(|&v| v as u32).collect();
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(tok.encode_padded(prompt), want_ids, "{name}: ids fed for {prompt:?}");

        let got = read(gpu, &model.encode(gpu, &[&want_ids], EncodeOpts::default()).expect("encode"));
        let want = refs.read_f32("prompt_embeds").expect("prompt_embeds");
        let diff = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|w| w.abs()).fold(0.0f32, f32::max);
        assert!(diff <= 2e-5 * scale, "{name}: max |diff| {diff:e}, max |want| {scale:e}");
        assert_nmse(&format!("{name} prompt_embeds"), &got, &want, 1e-10);
    }
}

/// An adapter file with an embedding bundled in (A1111's `bundle_emb.<token>.string_to_param.*`,
/// as `loralab train --trigger-lr` writes): reading it finds the embedding; installing it on a
/// pipeline adds the token, and prompts with it encode as with the same vectors loaded as an
/// embedding of their own; clearing the adapters removes it; a token already taken is skipped
/// with a warning, leaving the loaded one.
#[test]
fn ti_bundled_in_an_adapter_loads_with_it() {
    use loralab::model::checkpoint::open_path;
    use loralab::pipeline::{StableDiffusionPipeline, WeightPlan};
    use std::sync::Arc;
    let g = gpu();
    let base = SafetensorsFile::open_path(fixtures().join("lora/kohya.safetensors")).expect("kohya fixture");
    let dim = config().hidden_size;
    let mut named: Vec<(String, Vec<usize>, Vec<f32>)> =
        base.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), base.read_f32(&t.name).expect("read"))).collect();
    let vectors = loralab::rng::Rng::new(8).uniform_vec(2 * dim, -0.5, 0.5);
    named.push(("bundle_emb.lxtok.string_to_param.*".into(), vec![2, dim], vectors.clone()));
    let refs: Vec<(&str, Dtype, &[usize], &[f32])> = named.iter().map(|(n, s, v)| (n.as_str(), Dtype::F32, s.as_slice(), v.as_slice())).collect();
    let bytes = loralab::io::safetensors_write::to_bytes(&refs, &Default::default()).expect("write");
    let lora = loralab::lora::read_lora(&SafetensorsFile::open(&bytes[..], "bundled.safetensors").expect("file")).expect("adapter");
    assert_eq!(lora.embeddings.len(), 1);
    assert_eq!((lora.embeddings[0].token.as_str(), lora.embeddings[0].n_vectors(), &lora.embeddings[0].vectors), ("lxtok", 2, &vectors));
    assert!(lora.unrecognised.is_empty(), "{:?}", lora.unrecognised);
    let lora = Arc::new(lora);

    let load = || {
        let ck = open_path(fixtures().join("models").join(MODEL), None).expect("model");
        StableDiffusionPipeline::load(g, ck, WeightPlan::new(DType::F32)).expect("pipeline")
    };
    let prompt = ["a lxtok on a hill"];
    let mut pipe = load();
    let before = block(pipe.encode_prompts(g, &prompt, 0)).expect("encode");
    // Strength 0: the adapter's layers change nothing; the embedding is not scaled.
    let report = block(pipe.set_adapters(g, vec![lora.clone()], vec![(0.0, 0.0)])).expect("install");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(pipe.embeddings(), vec![("lxtok".to_string(), 2)]);
    let with = block(pipe.encode_prompts(g, &prompt, 0)).expect("encode");
    let mut alone = load();
    alone.add_embedding(g, &lora.embeddings[0]).expect("embedding alone");
    assert_eq!(with, block(alone.encode_prompts(g, &prompt, 0)).expect("encode"), "bundled vs loaded alone");
    assert_ne!(with, before);
    // Installing it again (a strength change through set_adapters) keeps one copy.
    block(pipe.set_adapters(g, vec![lora.clone()], vec![(1.0, 1.0)])).expect("again");
    assert_eq!(pipe.embeddings(), vec![("lxtok".to_string(), 2)]);
    pipe.clear_adapters(g).expect("clear");
    assert!(pipe.embeddings().is_empty());
    assert_eq!(block(pipe.encode_prompts(g, &prompt, 0)).expect("encode"), before);
    // A token already taken by an embedding of its own.
    let own = TextualInversion { token: "lxtok".into(), file: "lxtok.safetensors".into(), tensor: "emb_params".into(), layout: EmbeddingLayout::A1111, dim, vectors: vec![0.25; dim] };
    pipe.add_embedding(g, &own).expect("own embedding");
    let report = block(pipe.set_adapters(g, vec![lora.clone()], vec![(1.0, 1.0)])).expect("install");
    assert!(report.warnings.iter().any(|w| w.contains("bundled.safetensors") && w.contains("lxtok")), "{:?}", report.warnings);
    assert_eq!(pipe.embeddings(), vec![("lxtok".to_string(), 1)], "the loaded embedding stays");
    pipe.clear_adapters(g).expect("clear");
    assert_eq!(pipe.embeddings(), vec![("lxtok".to_string(), 1)], "clearing adapters keeps embeddings loaded on their own");
}
