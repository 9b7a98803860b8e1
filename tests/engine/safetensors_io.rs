//! Streaming safetensors reader: round trips of files written by the `safetensors` crate's
//! serializer, every dtype conversion against known values, the malformed cases (each a
//! specific error naming the file and tensor), and tensor-by-tensor upload to the GPU.

use crate::common::{gpu, read};
use half::{bf16, f16};
use loralab::io::safetensors::{Dtype, SafetensorsFile};
use loralab::io::RangeRead;
use loralab::{DType, Error};
use safetensors::tensor::TensorView;

fn le<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// Serializes `(name, dtype, shape, bytes)` with the reference writer.
fn write(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).expect("view"))).collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// A file with a hand-written header (for malformed cases) and `data_len` zero bytes of data.
fn handmade(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

fn open(bytes: Vec<u8>) -> SafetensorsFile<Vec<u8>> {
    SafetensorsFile::open(bytes, "test.safetensors").expect("open")
}

/// The error message of a rejected file; asserts it names the file (and the tensor, if given).
fn rejected(bytes: Vec<u8>, tensor: Option<&str>) -> String {
    match SafetensorsFile::open(bytes, "bad.safetensors") {
        Ok(_) => panic!("malformed file accepted"),
        Err(e @ Error::Format { .. }) => {
            let Error::Format { file, tensor: t, .. } = &e else { unreachable!() };
            assert_eq!(file, "bad.safetensors");
            assert_eq!(t.as_deref(), tensor, "{e}");
            e.to_string()
        }
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn safetensors_round_trip_every_dtype() {
    let f32s = [1.5f32, -0.0, 3.4e38, f32::MIN_POSITIVE, -1e-45, 7.0];
    let tensors = vec![
        ("w.f32", Dtype::F32, vec![2, 3], le(&f32s, f32::to_le_bytes)),
        (
            "w.f16",
            Dtype::F16,
            vec![3],
            le(&[f16::from_f32(0.5), f16::MAX, f16::MIN_POSITIVE_SUBNORMAL], |v| v.to_le_bytes()),
        ),
        ("w.bf16", Dtype::BF16, vec![1, 2], le(&[bf16::from_f32(-2.0), bf16::from_f32(1e30)], |v| v.to_le_bytes())),
        ("w.f64", Dtype::F64, vec![2], le(&[0.1f64, 1e300], f64::to_le_bytes)),
        ("ids.i64", Dtype::I64, vec![4], le(&[0i64, -1, 76, (1 << 53) + 1], i64::to_le_bytes)),
        ("mask.bool", Dtype::BOOL, vec![3], vec![1, 0, 1]),
        ("u8", Dtype::U8, vec![2], vec![0, 255]),
        ("scalar", Dtype::F32, vec![], le(&[42.0f32], f32::to_le_bytes)),
        ("empty", Dtype::F16, vec![0, 4], vec![]),
    ];
    let bytes = write(&tensors);
    // The reference reader's view of the same bytes, for the byte ranges.
    let (n, reference) = safetensors::SafeTensors::read_metadata(&bytes).expect("reference parse");
    let st = open(bytes.clone());
    assert_eq!(st.data_start(), 8 + n as u64);
    assert_eq!(st.tensors().len(), tensors.len());
    assert!(st.metadata().is_empty());
    assert!(st.tensors().windows(2).all(|w| w[0].start <= w[1].start), "file order");
    for (name, dtype, shape, data) in &tensors {
        let e = st.entry(name).expect("entry");
        let info = reference.info(name).expect("reference entry");
        assert_eq!((e.dtype, &e.shape), (*dtype, shape), "{name}");
        assert_eq!(
            (e.start, e.end),
            (st.data_start() + info.data_offsets.0 as u64, st.data_start() + info.data_offsets.1 as u64),
            "{name}"
        );
        assert_eq!(&st.read_bytes(name).unwrap(), data, "{name}");
    }
    let v = |name: &str| st.read_f32(name).unwrap();
    assert_eq!(v("w.f32"), f32s);
    assert!(v("w.f32")[1].is_sign_negative());
    assert_eq!(v("w.f16"), [0.5, 65504.0, 5.9604645e-8]);
    assert_eq!(v("w.bf16"), [-2.0, bf16::from_f32(1e30).to_f32()]);
    assert_eq!(v("w.f64"), [0.1f32, f32::INFINITY]);
    assert_eq!(v("ids.i64"), [0.0, -1.0, 76.0, 9007199254740992.0]);
    assert_eq!(v("mask.bool"), [1.0, 0.0, 1.0]);
    assert_eq!(v("u8"), [0.0, 255.0]);
    assert_eq!(v("scalar"), [42.0]);
    assert!(v("empty").is_empty());
}

#[test]
fn safetensors_half_precision_edge_cases() {
    // (bits, value): normal, max, min normal, smallest subnormal, infinities, signed zero.
    let f16_cases: [(u16, f32); 9] = [
        (0x3C00, 1.0),
        (0xC000, -2.0),
        (0x7BFF, 65504.0),
        (0x0400, 6.1035156e-5),
        (0x0001, 5.9604645e-8),
        (0x03FF, 6.097555e-5),
        (0x7C00, f32::INFINITY),
        (0xFC00, f32::NEG_INFINITY),
        (0x8000, -0.0),
    ];
    let bf16_cases: [(u16, f32); 9] = [
        (0x3F80, 1.0),
        (0xC040, -3.0),
        (0x7F7F, 3.3895314e38),
        (0x0080, 1.1754944e-38),
        (0x0001, 9.18355e-41),
        (0x3E2A, 0.16601562),
        (0x7F80, f32::INFINITY),
        (0xFF80, f32::NEG_INFINITY),
        (0x8000, -0.0),
    ];
    let nan = |bits: u16| le(&[bits], u16::to_le_bytes);
    for (dtype, cases) in [(Dtype::F16, f16_cases), (Dtype::BF16, bf16_cases)] {
        let bits: Vec<u16> = cases.iter().map(|c| c.0).collect();
        let st = open(write(&[
            ("x", dtype, vec![cases.len()], le(&bits, u16::to_le_bytes)),
            ("nan", dtype, vec![1], nan(if dtype == Dtype::F16 { 0x7E00 } else { 0x7FC0 })),
        ]));
        let got = st.read_f32("x").unwrap();
        for ((b, want), g) in cases.iter().zip(&got) {
            assert_eq!(g.to_bits(), want.to_bits(), "{dtype} 0x{b:04X}: got {g:e}, want {want:e}");
        }
        assert!(st.read_f32("nan").unwrap()[0].is_nan(), "{dtype} NaN");
    }
    // Integer extremes.
    let st = open(write(&[
        ("i8", Dtype::I8, vec![2], vec![0x80, 0x7F]),
        ("i16", Dtype::I16, vec![2], le(&[i16::MIN, i16::MAX], i16::to_le_bytes)),
        ("u16", Dtype::U16, vec![1], le(&[u16::MAX], u16::to_le_bytes)),
        ("i32", Dtype::I32, vec![2], le(&[i32::MIN, 16_777_217], i32::to_le_bytes)),
        ("u32", Dtype::U32, vec![1], le(&[u32::MAX], u32::to_le_bytes)),
        ("u64", Dtype::U64, vec![1], le(&[u64::MAX], u64::to_le_bytes)),
    ]));
    assert_eq!(st.read_f32("i8").unwrap(), [-128.0, 127.0]);
    assert_eq!(st.read_f32("i16").unwrap(), [-32768.0, 32767.0]);
    assert_eq!(st.read_f32("u16").unwrap(), [65535.0]);
    assert_eq!(st.read_f32("i32").unwrap(), [-2147483648.0, 16777216.0]);
    assert_eq!(st.read_f32("u32").unwrap(), [4294967296.0]);
    assert_eq!(st.read_f32("u64").unwrap(), [1.8446744e19]);
}

#[test]
fn safetensors_large_tensor_reads_in_chunks_from_a_file() {
    // 3M f16 values = 6 MB: crosses the reader's 4 MB chunk boundary.
    let n = 3_000_000usize;
    let values: Vec<f16> = (0..n).map(|i| f16::from_f32((i % 2048) as f32 - 1024.0)).collect();
    let bytes = write(&[
        ("a", Dtype::F32, vec![1], le(&[1.0f32], f32::to_le_bytes)),
        ("big", Dtype::F16, vec![n / 1000, 1000], le(&values, |v| v.to_le_bytes())),
    ]);
    let path = std::env::temp_dir().join(format!("loralab-st-{}.safetensors", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let st = SafetensorsFile::open_path(&path).expect("open_path");
    assert_eq!(st.name(), path.display().to_string());
    let got = st.read_f32("big").unwrap();
    assert_eq!(got.len(), n);
    assert!(got.iter().zip(&values).all(|(g, v)| *g == v.to_f32()));
    let missing = st.read_f32("nope").unwrap_err().to_string();
    assert!(missing.contains(&path.display().to_string()) && missing.contains("`nope`"), "{missing}");
    std::fs::remove_file(&path).ok();
    let absent = SafetensorsFile::open_path(&path).unwrap_err();
    assert!(matches!(&absent, Error::Io { file, .. } if file.contains("loralab-st-")), "{absent}");
}

#[test]
fn safetensors_metadata_and_header_order() {
    let header = r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"__metadata__":{"format":"pt","ss_network_dim":"16","n":3},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = handmade(header, 0);
    bytes.extend_from_slice(&le(&[1.0f32, 2.0], f32::to_le_bytes));
    let st = open(bytes);
    let names: Vec<&str> = st.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "file order, not header order");
    assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(st.metadata().get("ss_network_dim").map(String::as_str), Some("16"));
    assert_eq!(st.metadata().get("n").map(String::as_str), Some("3"), "non-string kept as JSON text");
    assert_eq!((st.read_f32("a").unwrap(), st.read_f32("b").unwrap()), (vec![1.0], vec![2.0]));
}

/// Claims a huge length and serves zeros: nothing may allocate by the claim.
struct Huge(u64, u64);
impl RangeRead for Huge {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> loralab::Result<()> {
        buf.fill(0);
        if offset == 0 {
            buf[..8].copy_from_slice(&self.1.to_le_bytes());
        }
        Ok(())
    }
}

#[test]
fn safetensors_malformed_headers_are_specific_errors() {
    let m = rejected(vec![1, 2, 3], None);
    assert!(m.contains("bad.safetensors") && m.contains("shorter than the 8-byte header"), "{m}");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let m = rejected(b, None);
    assert!(m.contains("larger than the file"), "{m}");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    assert!(rejected(b, None).contains("header length 1000 bytes is larger than the file (10 bytes)"));
    match SafetensorsFile::open(Huge(1 << 40, 500_000_000), "huge.safetensors") {
        Err(Error::Format { message, .. }) => {
            assert!(message.contains("exceeds the 100000000-byte limit"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let mut b = 2u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[0xFF, 0xFE]);
    assert!(rejected(b, None).contains("not valid UTF-8"));
    assert!(rejected(handmade("{\"a\": ", 0), None).contains("not valid JSON"));
    assert!(rejected(handmade("[1, 2]", 0), None).contains("not a JSON object"));
    assert!(rejected(handmade(r#"{"__metadata__": [1]}"#, 0), None).contains("`__metadata__` is not a JSON object"));

    let cases: [(&str, usize, &str, &str); 7] = [
        (r#"{"w":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}}"#, 4, "w", "unknown dtype `F7`"),
        (r#"{"w":{"dtype":"F32","shape":[1]}}"#, 4, "w", "malformed header entry"),
        (
            r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
            24,
            "w",
            "dtype F32 with shape [2, 3] needs 24 bytes but data_offsets [0, 20] span 20",
        ),
        (r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[4,0]}}"#, 4, "w", "data_offsets [4, 0] run backwards"),
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
            "w",
            "end past the end of the file (8 data bytes",
        ),
        (r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#, 4, "w", "overflows"),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            "b",
            "overlap tensor `a` [0, 8]",
        ),
    ];
    for (header, data, tensor, want) in cases {
        let m = rejected(handmade(header, data), Some(tensor));
        assert!(
            m.contains(want) && m.contains("bad.safetensors") && m.contains(&format!("`{tensor}`")),
            "{m}\n want: {want}"
        );
    }
    // Offsets near u64::MAX must not wrap.
    let m = rejected(
        handmade(r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[18446744073709551614,18446744073709551615]}}"#, 4),
        Some("w"),
    );
    assert!(m.contains("needs 2 bytes") || m.contains("past the end"), "{m}");
    let m = rejected(
        handmade(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#, 4),
        Some("w"),
    );
    assert!(m.contains("past the end"), "{m}");
    // Readable headers with an unconvertible dtype: found at read time, naming the tensor.
    let st = open(handmade(r#"{"q":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#, 2));
    let m = st.read_f32("q").unwrap_err().to_string();
    assert!(m.contains("`q`") && m.contains("F8_E4M3 cannot be converted"), "{m}");
    assert_eq!(st.read_bytes("q").unwrap(), [0, 0]);
    // Zero-size tensors at one offset, gaps and trailing bytes are accepted.
    let st = open(handmade(
        r#"{"z1":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"z2":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        20,
    ));
    assert_eq!(st.tensors()[2].name, "x");
}

/// A source whose reads fail: the I/O error names the file.
struct Failing;
impl RangeRead for Failing {
    fn len(&self) -> u64 {
        64
    }
    fn read_at(&self, offset: u64, _: &mut [u8]) -> loralab::Result<()> {
        Err(Error::Io { file: String::new(), message: format!("network error at {offset}") })
    }
}

#[test]
fn safetensors_read_errors_name_the_source() {
    let e = SafetensorsFile::open(Failing, "https://example.org/m.safetensors").unwrap_err();
    assert_eq!(e, Error::Io { file: "https://example.org/m.safetensors".into(), message: "network error at 0".into() });
}

#[test]
fn safetensors_load_uploads_one_tensor_as_the_chosen_type() {
    let g = gpu();
    let (rows, cols) = (4, 64);
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let st = open(write(&[("layer.weight", Dtype::F16, vec![rows, cols], le(&halves, |v| v.to_le_bytes()))]));
    let want: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
    for dtype in [DType::F32, DType::F16, DType::Q8_0] {
        let t = st.load(g, "layer.weight", dtype).expect("load");
        assert_eq!((t.shape(), t.dtype()), (&[rows, cols][..], dtype));
        let got = read(g, &t);
        let bound = if dtype == DType::Q8_0 { 1e-4 } else { 0.0 };
        let e = loralab::quant::nmse(&got, &want);
        assert!(e <= bound, "{dtype:?}: nmse {e:e} > {bound:e}");
    }
    let m = st.load(g, "missing", DType::F32).unwrap_err().to_string();
    assert!(m.contains("test.safetensors") && m.contains("`missing`"), "{m}");
}
