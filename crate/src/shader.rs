//! WGSL sources (loaded from `shaders/` with `include_str!`) and the small preprocessor that
//! turns one source into the variant a device needs.
//!
//! Directives, each on a line of its own:
//! - `#include "common/file.wgsl"` pastes another registered source (once per shader).
//! - `#ifdef NAME` / `#ifndef NAME` / `#else` / `#endif` keep or drop lines by flag defines.
//!
//! Valued defines become WGSL constants prepended to the source (`const NAME = value;`), so
//! tile sizes can size workgroup arrays and `@workgroup_size`. The flag `F16` adds
//! `enable f16;`; the flag `SUBGROUPS` adds `enable subgroups;` on the web, where Chrome needs it
//! (naga, used natively, enables subgroup operations through the device feature instead).

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// One registered WGSL source and the define axes its variants are built from.
pub struct ShaderSource {
    /// Path under `shaders/`, also the shader's name in the pipeline cache.
    pub name: &'static str,
    pub source: &'static str,
    /// Each inner slice is one axis of mutually exclusive flag sets; a variant picks one entry
    /// per axis (the empty string means "none of them").
    pub flag_axes: &'static [&'static [&'static str]],
    /// Valued defines every variant must set, with a representative value used for validation.
    pub values: &'static [(&'static str, &'static str)],
    /// Entry points.
    pub entries: &'static [&'static str],
    /// `false` for files only meant to be included.
    pub top_level: bool,
}

/// `include_str!` of a file under `shaders/`.
#[macro_export]
macro_rules! wgsl {
    ($name:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../shaders/", $name))
    };
}

/// Shared WGSL pieces that kernels `#include`.
pub static COMMON: &[ShaderSource] = &[
    ShaderSource {
        name: "common/weights.wgsl",
        source: wgsl!("common/weights.wgsl"),
        flag_axes: &[],
        values: &[],
        entries: &[],
        top_level: false,
    },
    ShaderSource {
        name: "common/gemm.wgsl",
        source: wgsl!("common/gemm.wgsl"),
        flag_axes: &[],
        values: &[],
        entries: &[],
        top_level: false,
    },
    ShaderSource {
        name: "common/adapter.wgsl",
        source: wgsl!("common/adapter.wgsl"),
        flag_axes: &[],
        values: &[],
        entries: &[],
        top_level: false,
    },
];

/// The weight storage axis of kernels that read weights through `common/weights.wgsl`.
pub const WEIGHT_AXIS: &[&str] = &["W_F32", "W_F16", "W_Q8_0+W_QUANT", "W_Q4_0+W_QUANT"];

/// The defines selecting weight storage `dtype` in `common/weights.wgsl`.
pub fn weight_defines(defines: Defines, dtype: crate::quant::DType) -> Defines {
    use crate::quant::DType;
    match dtype {
        DType::F32 => defines.flag("W_F32"),
        DType::F16 => defines.flag("W_F16"),
        DType::Q8_0 => defines.flag("W_Q8_0").flag("W_QUANT"),
        DType::Q4_0 => defines.flag("W_Q4_0").flag("W_QUANT"),
    }
}

/// Every shader family; each op module registers its own sources.
static FAMILIES: &[&[ShaderSource]] = &[
    COMMON,
    crate::ops::elementwise::SHADERS,
    crate::ops::matmul::SHADERS,
    crate::ops::conv::SHADERS,
    crate::ops::quantize::SHADERS,
    crate::ops::norm::SHADERS,
    crate::ops::layout::SHADERS,
    crate::ops::attention::SHADERS,
    crate::ops::grad::attention::SHADERS,
    crate::ops::grad::norm::SHADERS,
    crate::ops::grad::activation::SHADERS,
    crate::ops::grad::conv::SHADERS,
    crate::ops::grad::optim::SHADERS,
];

/// Every registered WGSL source.
pub fn all() -> impl Iterator<Item = &'static ShaderSource> {
    FAMILIES.iter().flat_map(|f| f.iter())
}

/// Looks a registered source up by name.
pub fn find(name: &str) -> Result<&'static ShaderSource> {
    all()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::UnknownShader(format!("no shader named `{name}` is registered")))
}

/// The defines of one shader variant: flags (`#ifdef`) and valued constants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Defines(BTreeMap<String, Option<String>>);

impl Defines {
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets a flag define.
    pub fn flag(mut self, name: &str) -> Self {
        self.0.insert(name.to_string(), None);
        self
    }
    /// Sets a flag define when `on` is true.
    pub fn flag_if(self, name: &str, on: bool) -> Self {
        if on {
            self.flag(name)
        } else {
            self
        }
    }
    /// Sets a valued define, `value` being a WGSL literal such as `64u` or `1.0`.
    pub fn value(mut self, name: &str, value: impl ToString) -> Self {
        self.0.insert(name.to_string(), Some(value.to_string()));
        self
    }
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Option<String>)> {
        self.0.iter()
    }
}

impl std::fmt::Display for Defines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// Which target the WGSL is produced for (only the `enable` lines differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// wgpu-core with naga (native backends, tests).
    Naga,
    /// A browser's WebGPU implementation.
    Browser,
}

impl Target {
    pub fn current() -> Self {
        if cfg!(target_arch = "wasm32") {
            Target::Browser
        } else {
            Target::Naga
        }
    }
}

/// Produces the final WGSL of `name` for `defines`.
pub fn preprocess(name: &str, defines: &Defines, target: Target) -> Result<String> {
    let src = find(name)?;
    for (value_name, _) in src.values {
        if !matches!(defines.0.get(*value_name), Some(Some(_))) {
            return Err(Error::UnknownShader(format!(
                "`{name}` needs a value for `{value_name}` (defines: [{defines}])"
            )));
        }
    }
    let mut out = String::new();
    if defines.has("F16") {
        out.push_str("enable f16;\n");
    }
    if defines.has("SUBGROUPS") && target == Target::Browser {
        out.push_str("enable subgroups;\n");
    }
    for (k, v) in defines.iter() {
        if let Some(v) = v {
            out.push_str(&format!("const {k} = {v};\n"));
        }
    }
    let mut included = Vec::new();
    expand(name, src.source, defines, &mut included, &mut out)?;
    Ok(out)
}

fn expand(
    name: &str,
    source: &str,
    defines: &Defines,
    included: &mut Vec<&'static str>,
    out: &mut String,
) -> Result<()> {
    // Stack of (this branch active, some enclosing branch inactive).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|(on, _)| *on);
    for (lineno, line) in source.lines().enumerate() {
        let t = line.trim_start();
        let err = |m: &str| Error::UnknownShader(format!("{name}:{}: {m}", lineno + 1));
        if let Some(rest) = t.strip_prefix("#ifdef ") {
            stack.push((defines.has(rest.trim()), false));
        } else if let Some(rest) = t.strip_prefix("#ifndef ") {
            stack.push((!defines.has(rest.trim()), false));
        } else if t.starts_with("#else") {
            let top = stack.last_mut().ok_or_else(|| err("#else without #ifdef"))?;
            if top.1 {
                return Err(err("two #else in one #ifdef"));
            }
            *top = (!top.0, true);
        } else if t.starts_with("#endif") {
            stack.pop().ok_or_else(|| err("#endif without #ifdef"))?;
        } else if let Some(rest) = t.strip_prefix("#include ") {
            if active(&stack) {
                let inc = rest.trim().trim_matches('"');
                let src = find(inc).map_err(|_| err(&format!("cannot include `{inc}`")))?;
                if !included.contains(&src.name) {
                    included.push(src.name);
                    expand(src.name, src.source, defines, included, out)?;
                }
            }
        } else if t.starts_with('#') {
            return Err(err(&format!("unknown directive `{t}`")));
        } else if active(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(Error::UnknownShader(format!("{name}: unterminated #ifdef")));
    }
    Ok(())
}

/// Every define combination of a registered top-level shader (for validation tests).
pub fn all_variants(src: &ShaderSource) -> Vec<Defines> {
    let mut base = Defines::new();
    for (k, v) in src.values {
        base = base.value(k, v);
    }
    let mut variants = vec![base];
    for axis in src.flag_axes {
        let mut next = Vec::new();
        for v in &variants {
            for choice in axis.iter() {
                let mut d = v.clone();
                for flag in choice.split('+').filter(|f| !f.is_empty()) {
                    d = d.flag(flag);
                }
                next.push(d);
            }
        }
        variants = next;
    }
    variants
}
