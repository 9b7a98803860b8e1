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

/// Device limits the tile choosers see in practice: a browser's WebGPU defaults (SwiftShader),
/// lavapipe, and a discrete GPU.
fn caps_presets() -> Vec<loralab::gpu::Caps> {
    let base = loralab::gpu::Caps {
        shader_f16: false,
        subgroups: false,
        subgroup_min_size: 0,
        subgroup_max_size: 0,
        timestamp_query: false,
        max_buffer_size: 1 << 30,
        max_storage_buffer_binding_size: 1 << 30,
        max_storage_buffers_per_stage: 8,
        max_workgroup_storage: 16 << 10,
        max_invocations_per_workgroup: 256,
        max_workgroup_size_x: 256,
        max_workgroups_per_dimension: 65535,
        min_storage_offset_alignment: 256,
    };
    [(16 << 10, 256), (32 << 10, 1024), (48 << 10, 1024), (16 << 10, 64)]
        .into_iter()
        .map(|(ws, inv)| loralab::gpu::Caps {
            max_workgroup_storage: ws,
            max_invocations_per_workgroup: inv,
            ..base.clone()
        })
        .collect()
}

/// Validates `shader` with every flag combination and each of the valued-define sets.
fn validate_value_sets(shader: &str, sets: &[loralab::shader::Defines]) -> usize {
    let src = all().find(|s| s.name == shader).unwrap();
    let mut n = 0;
    for flags in all_variants(src) {
        for set in sets {
            let mut d = flags.clone();
            for (k, v) in set.iter() {
                d = d.value(k, v.clone().unwrap());
            }
            let code = preprocess(shader, &d, Target::Naga).unwrap();
            if let Err(e) = validate(shader, &code, &d) {
                panic!("{shader} [{d}] does not validate:\n{e}");
            }
            n += 1;
        }
    }
    n
}

#[test]
fn tile_choices_the_runtime_makes_validate_with_naga() {
    use loralab::ops::{attention, gemm::Tiles};
    let mut gemm = Vec::new();
    let mut att = Vec::new();
    for caps in caps_presets() {
        gemm.push(Tiles::for_caps(&caps).defines());
        for rows in [1, 8, 16, 32, 320] {
            gemm.push(Tiles::choose(&caps, rows).defines());
            gemm.push(Tiles::for_columns(&caps, rows).defines());
        }
        for d in [1, 7, 40, 64, 80, 128, 160, 256] {
            if let Some(t) = attention::tiles_for(d, caps.max_workgroup_storage, caps.max_invocations_per_workgroup) {
                att.push(t.defines(d));
            }
        }
    }
    gemm.sort();
    gemm.dedup();
    att.sort();
    att.dedup();
    let mut n = validate_value_sets("matmul.wgsl", &gemm);
    // conv2d adds the kernel size.
    let conv: Vec<_> = gemm
        .iter()
        .flat_map(|d| [(1, 1), (3, 3)].map(|(kh, kw)| d.clone().value("KH", format!("{kh}u")).value("KW", format!("{kw}u"))))
        .collect();
    n += validate_value_sets("conv2d.wgsl", &conv);
    n += validate_value_sets("attention.wgsl", &att);
    eprintln!("validated {n} runtime tile variants");
}
