// Quantization of an f32 matrix (rows, cols) into the packed weight layouts of
// crate/src/quant.rs, with ggml's block math:
//   to_f16:  one invocation per output word (two values, element 2i in the low half).
//   to_q8_0: d = amax / 127, q = round(x / d) (half away from zero).
//   to_q4_0: d = max / -8 (max: the value of largest magnitude), q = min(15, trunc(x / d + 8.5)).
// For q8_0 / q4_0 one invocation quantizes two consecutive blocks (32 values of a row padded
// to a multiple of 32 with zeros), so it writes whole words of quants and one whole word of
// f16 scales. f16 conversion is done in integer arithmetic (round to nearest even), so the
// result does not depend on how a driver converts floats.

struct Params {
    rows: u32,
    cols: u32,
    items: u32,  // invocations with work: output words (f16) or block pairs (q8_0, q4_0)
    blocks: u32, // rows · padded_cols / 32
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;                // (rows, cols)
@group(0) @binding(2) var<storage, read_write> q: array<u32>;          // packed values
@group(0) @binding(3) var<storage, read_write> scales: array<u32>;     // (blocks) f16 pairs

const WG: u32 = 64u;
const BLOCK: u32 = 32u;

// IEEE binary16 bits of `v`, rounded to nearest even (overflow gives infinity).
fn f16_bits(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let sign = (b >> 16u) & 0x8000u;
    let biased = (b >> 23u) & 0xffu;
    let man = b & 0x7fffffu;
    if (biased == 0xffu) {
        return sign | 0x7c00u | select(0u, 0x200u | (man >> 13u), man != 0u);
    }
    let e = i32(biased) - 112; // f16 biased exponent
    if (e >= 31) {
        return sign | 0x7c00u;
    }
    if (e <= 0) {
        if (e < -10) {
            return sign;
        }
        // Subnormal: value = h · 2^-24.
        let m = man | 0x800000u;
        let shift = u32(14 - e);
        let r = m >> shift;
        let rem = m & ((1u << shift) - 1u);
        let half = 1u << (shift - 1u);
        let up = rem > half || (rem == half && (r & 1u) == 1u);
        return sign | (r + select(0u, 1u, up));
    }
    let h = (u32(e) << 10u) | (man >> 13u);
    let rem = man & 0x1fffu;
    let up = rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u);
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    return sign | (h + select(0u, 1u, up));
}

// a / b rounded to nearest: one residual correction over the division, whose WGSL precision
// is only 2.5 ULP.
fn div_rn(a: f32, b: f32) -> f32 {
    let d = a / b;
    let r = fma(-d, b, a);
    return fma(r, 1.0 / b, d);
}

// Rounds half away from zero (as C's roundf), exactly.
fn round_away(v: f32) -> f32 {
    let t = trunc(v);
    return select(t, t + sign(v), abs(v - t) >= 0.5);
}

fn item(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

// The 32 values of block `blk` (rows padded with zeros).
fn load_block(blk: u32) -> array<f32, 32> {
    let per_row = (p.cols + BLOCK - 1u) / BLOCK;
    let row = blk / per_row;
    let c0 = (blk % per_row) * BLOCK;
    var v: array<f32, 32>;
    for (var j = 0u; j < BLOCK; j++) {
        v[j] = 0.0;
        if (c0 + j < p.cols) {
            v[j] = x[row * p.cols + c0 + j];
        }
    }
    return v;
}

// Quantizes block `blk` to q8_0; returns the f16 bits of its scale.
fn q8_0_block(blk: u32) -> u32 {
    var v = load_block(blk);
    var amax = 0.0;
    for (var j = 0u; j < BLOCK; j++) {
        amax = max(amax, abs(v[j]));
    }
    let d = div_rn(amax, 127.0);
    let id = select(0.0, div_rn(1.0, d), d != 0.0);
    for (var wi = 0u; wi < BLOCK / 4u; wi++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let qv = i32(clamp(round_away(v[wi * 4u + j] * id), -128.0, 127.0));
            word |= (bitcast<u32>(qv) & 0xffu) << (8u * j);
        }
        q[blk * 8u + wi] = word;
    }
    return f16_bits(d);
}

// Quantizes block `blk` to q4_0; returns the f16 bits of its scale.
fn q4_0_block(blk: u32) -> u32 {
    var v = load_block(blk);
    var amax = 0.0;
    var mx = 0.0;
    for (var j = 0u; j < BLOCK; j++) {
        if (abs(v[j]) > amax) {
            amax = abs(v[j]);
            mx = v[j];
        }
    }
    let d = mx * -0.125; // exact: max / -8
    let id = select(0.0, div_rn(1.0, d), d != 0.0);
    for (var wi = 0u; wi < BLOCK / 8u; wi++) {
        var word = 0u;
        for (var j = 0u; j < 8u; j++) {
            let qv = u32(clamp(trunc(v[wi * 8u + j] * id + 8.5), 0.0, 15.0));
            word |= qv << (4u * j);
        }
        q[blk * 4u + wi] = word;
    }
    return f16_bits(d);
}

@compute @workgroup_size(WG)
fn to_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, nwg, lid);
    if (i >= p.items) {
        return;
    }
    let n = p.rows * p.cols;
    let lo = f16_bits(x[2u * i]);
    var hi = 0u;
    if (2u * i + 1u < n) {
        hi = f16_bits(x[2u * i + 1u]);
    }
    q[i] = lo | (hi << 16u);
}

@compute @workgroup_size(WG)
fn to_q8_0(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, nwg, lid);
    if (i >= p.items) {
        return;
    }
    let lo = q8_0_block(2u * i);
    var hi = 0u;
    if (2u * i + 1u < p.blocks) {
        hi = q8_0_block(2u * i + 1u);
    }
    scales[i] = lo | (hi << 16u);
}

@compute @workgroup_size(WG)
fn to_q4_0(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = item(wg, nwg, lid);
    if (i >= p.items) {
        return;
    }
    let lo = q4_0_block(2u * i);
    var hi = 0u;
    if (2u * i + 1u < p.blocks) {
        hi = q4_0_block(2u * i + 1u);
    }
    scales[i] = lo | (hi << 16u);
}
