//! Every WGSL file, in every define combination it is used with, must pass naga's parser and
//! validator (a plain CPU test: no device needed).

use loralab::shader::{all, all_variants, preprocess, Target};

/// Validates with only the capabilities the variant's flags ask for, so a fallback variant that
/// accidentally uses f16 or subgroup operations fails here.
fn validate(name: &str, code: &str, defines: &loralab::shader::Defines) -> Result<(), String> {
    use naga::valid::Capabilities;
    // unpack2x16float and friends are core WGSL (wgpu's SHADER_F16_IN_F32 downlevel flag).
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if defines.has("F16") {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if defines.has("SUBGROUPS") {
        caps |= Capabilities::SUBGROUP;
    }
    let module = naga::front::wgsl::parse_str(code).map_err(|e| e.emit_to_string(code))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| format!("{name}: {}", e.emit_to_string(code)))?;
    Ok(())
}

#[test]
fn every_shader_variant_validates_with_naga() {
    let mut checked = 0;
    for src in all().filter(|s| s.top_level) {
        for defines in all_variants(src) {
            let code = preprocess(src.name, &defines, Target::Naga)
                .unwrap_or_else(|e| panic!("{}: preprocess [{defines}]: {e}", src.name));
            if let Err(e) = validate(src.name, &code, &defines) {
                panic!("{} [{defines}] does not validate:\n{e}", src.name);
            }
            for entry in src.entries {
                let module = naga::front::wgsl::parse_str(&code).unwrap();
                assert!(
                    module.entry_points.iter().any(|ep| ep.name == *entry),
                    "{} [{defines}] lacks entry point {entry}",
                    src.name
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= all().filter(|s| s.top_level).count());
    eprintln!("validated {checked} shader variants");
}

#[test]
fn every_wgsl_file_on_disk_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "wgsl") {
                files.push(p.strip_prefix(&dir).unwrap().to_string_lossy().replace('\\', "/"));
            }
        }
    }
    for f in &files {
        assert!(all().any(|s| s.name == f), "shaders/{f} is not registered in shader.rs");
    }
}

#[test]
fn browser_target_adds_enables() {
    let src = all().find(|s| s.top_level).unwrap();
    let mut d = all_variants(src).remove(0);
    d = d.flag("SUBGROUPS").flag("F16");
    let web = preprocess(src.name, &d, Target::Browser).unwrap();
    assert!(web.starts_with("enable f16;\nenable subgroups;\n"));
    let native = preprocess(src.name, &d, Target::Naga).unwrap();
    assert!(!native.contains("enable subgroups"));
}
