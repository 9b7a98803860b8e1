//! Values written the way Python's `str()` and `json.dumps()` write them, since kohya
//! sd-scripts stores every `ss_*` metadata entry as `str(value)` and its JSON entries with
//! `json.dumps` (separators `", "` / `": "`, non-ASCII escaped). Readers parse either way;
//! writing the same text keeps files from both writers alike for tools that compare them.

use serde_json::Value;

/// Python's `repr(float)` from Rust's shortest round-trip digits (`{:e}`): fixed notation for
/// exponents −4 … 15 (`8.0`, `0.0001`), else `1e-05`, `1.5e+16`.
fn from_exp_form(e: &str) -> String {
    let Some((mant, exp)) = e.split_once('e') else { return e.to_string() };
    let Ok(exp) = exp.parse::<i32>() else { return e.to_string() };
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let body = if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

fn special(v: f64) -> Option<String> {
    if v.is_nan() {
        Some("nan".into())
    } else if v.is_infinite() {
        Some(if v > 0.0 { "inf" } else { "-inf" }.into())
    } else if v == 0.0 {
        Some(if v.is_sign_negative() { "-0.0" } else { "0.0" }.into())
    } else {
        None
    }
}

/// `str(float)` of a double.
pub fn py_f64(v: f64) -> String {
    special(v).unwrap_or_else(|| from_exp_form(&format!("{v:e}")))
}

/// `str(float)` of the number a user typed that was kept as `f32` (its shortest `f32` digits,
/// so 0.1 is `0.1`, not the f64 expansion of the f32).
pub fn py_f32(v: f32) -> String {
    special(v as f64).unwrap_or_else(|| from_exp_form(&format!("{v:e}")))
}

/// `str(bool)`.
pub fn py_bool(v: bool) -> &'static str {
    if v {
        "True"
    } else {
        "False"
    }
}

/// `str(x)` of an optional value (`None` when absent).
pub fn py_opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "None".to_string())
}

fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn dumps_into(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_f64(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => escape_into(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                dumps_into(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                escape_into(out, k);
                out.push_str(": ");
                dumps_into(out, x);
            }
            out.push('}');
        }
    }
}

/// `json.dumps(v)` with Python's defaults (keys in the map's order: sorted here).
pub fn py_json(v: &Value) -> String {
    let mut out = String::new();
    dumps_into(&mut out, v);
    out
}

/// A Unix time as ISO-8601 `YYYY-MM-DDTHH:MM:SS` (UTC; what `datetime.isoformat()` writes
/// for a whole-second time).
pub fn iso_date(unix_seconds: f64) -> String {
    let secs = if unix_seconds.is_finite() { unix_seconds.floor() as i64 } else { 0 };
    let (y, m, d, rem) = crate::train::zip::civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_as_python_writes_them() {
        for (v, want) in [
            (8.0, "8.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (5e-5, "5e-05"),
            (1.5e-7, "1.5e-07"),
            (123.25, "123.25"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5, "-2.5"),
            (0.0, "0.0"),
            (1718000000.123456, "1718000000.123456"),
        ] {
            assert_eq!(py_f64(v), want, "{v:e}");
        }
        assert_eq!(py_f32(0.1), "0.1");
        assert_eq!(py_f32(16.0), "16.0");
    }

    #[test]
    fn json_like_python() {
        let v = serde_json::json!({"10_sks dog": {"café": 2, "a\"b": 1}, "x": [1.0, true, null]});
        assert_eq!(py_json(&v), r#"{"10_sks dog": {"a\"b": 1, "caf\u00e9": 2}, "x": [1.0, true, null]}"#);
        let emoji = serde_json::json!("🐶");
        assert_eq!(py_json(&emoji), r#""\ud83d\udc36""#);
    }

    #[test]
    fn dates() {
        assert_eq!(iso_date(0.0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(1_709_251_199.9), "2024-02-29T23:59:59");
        assert_eq!(iso_date(951_782_400.0), "2000-02-29T00:00:00");
    }
}
