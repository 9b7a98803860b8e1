//! Evaluation prompt files and ground-truth files: JSON Lines, one object per line,
//! `{"prompt": "...", "shape": "circle", "color": "red", "background": "blue", "count": 1}`.
//! Blank lines are skipped; other keys (`size`, `position`, an image name) are kept in
//! [`EvalRecord::extra`]. Errors name the file, the line and the field.

use super::{Color, ShapeKind};
use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::{Map, Value};

/// What an image should show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Expected {
    pub shape: ShapeKind,
    pub color: Color,
    pub background: Color,
    /// Number of shapes, when stated.
    pub count: Option<usize>,
}

/// One line of a prompt or ground-truth file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalRecord {
    /// 1-based line number in the file.
    pub line: usize,
    pub prompt: Option<String>,
    pub expected: Expected,
    /// The line's other keys, as written.
    pub extra: Map<String, Value>,
}

fn line_err(file: &str, line: usize, message: impl std::fmt::Display) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message: format!("line {line}: {message}") }
}

fn names(list: impl IntoIterator<Item = &'static str>) -> String {
    list.into_iter().collect::<Vec<_>>().join(", ")
}

fn string_field<'a>(obj: &'a Map<String, Value>, key: &str, file: &str, line: usize) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(line_err(file, line, format!("field `{key}` must be a string, found `{other}`"))),
        None => Err(line_err(file, line, format!("field `{key}` is missing"))),
    }
}

fn color_field(obj: &Map<String, Value>, key: &str, file: &str, line: usize) -> Result<Color> {
    let s = string_field(obj, key, file, line)?;
    Color::parse(s).ok_or_else(|| {
        line_err(
            file,
            line,
            format!("field `{key}`: unknown colour `{s}` (the palette: {})", names(Color::ALL.map(Color::name))),
        )
    })
}

fn parse_line(text: &str, file: &str, line: usize, need_prompt: bool) -> Result<EvalRecord> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| line_err(file, line, format!("malformed JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(line_err(file, line, "each line must be a JSON object `{\"prompt\": ..., \"shape\": ..., ...}`"));
    };
    let prompt = match obj.get("prompt") {
        None if !need_prompt => None,
        _ => Some(string_field(&obj, "prompt", file, line)?.to_string()),
    };
    let shape_name = string_field(&obj, "shape", file, line)?;
    let shape = ShapeKind::parse(shape_name).ok_or_else(|| {
        line_err(
            file,
            line,
            format!("field `shape`: unknown shape `{shape_name}` (one of {})", names(ShapeKind::NAMED.map(ShapeKind::name))),
        )
    })?;
    let color = color_field(&obj, "color", file, line)?;
    let background = color_field(&obj, "background", file, line)?;
    if color == background {
        return Err(line_err(
            file,
            line,
            format!("`color` and `background` are both {color}; a shape must differ from its background"),
        ));
    }
    let count = match obj.get("count") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().filter(|n| *n >= 1) {
            Some(n) => Some(usize::try_from(n).map_err(|_| line_err(file, line, "field `count` is too large"))?),
            None => return Err(line_err(file, line, format!("field `count` must be a whole number >= 1, found `{v}`"))),
        },
    };
    for key in ["prompt", "shape", "color", "background", "count"] {
        obj.remove(key);
    }
    Ok(EvalRecord { line, prompt, expected: Expected { shape, color, background, count }, extra: obj })
}

/// Reads the records of a JSON Lines file; `need_prompt` makes `prompt` required. `file`
/// names the file in errors. A file without records is an error.
pub fn parse_records(text: &str, file: &str, need_prompt: bool) -> Result<Vec<EvalRecord>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() {
            continue;
        }
        out.push(parse_line(t, file, i + 1, need_prompt)?);
    }
    if out.is_empty() {
        return Err(Error::Format {
            file: file.to_string(),
            tensor: None,
            message: "no records: expected one JSON object per line".into(),
        });
    }
    Ok(out)
}

/// Reads an evaluation prompt file: every line needs `prompt`, `shape`, `color` and
/// `background`; `count` is optional.
pub fn parse_prompts(text: &str, file: &str) -> Result<Vec<EvalRecord>> {
    parse_records(text, file, true)
}
