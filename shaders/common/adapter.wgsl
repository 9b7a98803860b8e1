// Adapters (LoRA, LoCon, LoHa, LoKr, IA³, full, DoRA) applied inside the GEMM kernels
// (matmul.wgsl with ADAPTER, conv2d.wgsl with ADAPTER), unmerged. For a weight W₀ [N, K]
// (K = Cin·kh·kw for a convolution) the kernel multiplies by
//   W = W₀ · (row[n] + col[k]) + Σ_terms s_t · row_t[n] · col_t[k] · T_t[n, k]
// (row / col: W₀'s scale as a sum of a per-row and a per-column part, either may be absent;
// adapters that rescale the base, IA³ and DoRA, stack additively this way)
// while staging weight slices (adapt_w), and afterwards adds the factored low-rank part
//   Σ_j up[n, j] · col_scale[j] · t[·, j]   with   t = down · x   (computed by one small GEMM
// before the kernel, all adapters' down matrices stacked: R = Σ rᵢ columns)
// as R more reduction steps of the same register-blocked core (lowrank_b4 / lowrank_rows4).
// T_t is a dense ΔW (f32 or f16: LoHa, full, DoRA, materialised once) or a Kronecker product
// kron(w1, w2) generated element by element from its factors (LoKr): never materialised.
//
// Everything lives in one u32 buffer `ad` (f32 as bits, f16 as pairs), word offsets in `p.ad`.
// The strengths only enter through a small region at the start of `ad` (col_scale, the term
// table's scales and the row/col vectors), so changing a strength rewrites a few words.
//
// The including shader declares its uniform `p` with a last member `ad: AdapterParams`
// (16-byte aligned) and the buffers:
//   @group(0) @binding(6) var<storage, read> lr_t: array<f32>;  // low-rank activations (R per row/pixel)
//   @group(0) @binding(7) var<storage, read> ad: array<u32>;    // packed adapter data

const AD_NONE: u32 = 0xffffffffu;
// Words per term in the term table.
const AD_TERM_WORDS: u32 = 10u;
// Term kinds.
const AD_DENSE_F32: u32 = 0u;
const AD_DENSE_F16: u32 = 1u;
const AD_KRON: u32 = 2u;

struct AdapterParams {
    rank: u32,       // R: stacked low-rank columns (0: none)
    up: u32,         // word offset of up [N, R] (f32)
    col_scale: u32,  // word offset of [R] f32: alpha/r · strength of each column's adapter
    terms: u32,      // number of weight terms
    table: u32,      // word offset of the term table (AD_TERM_WORDS words per term)
    base_row: u32,   // word offset of [N] f32: per-row part of W₀'s scale (IA³ out, DoRA), or AD_NONE
    base_col: u32,   // word offset of [K] f32: per-column part of W₀'s scale (IA³ on_input), or AD_NONE
    bias: u32,       // word offset of [N] f32 added to the bias (full diff_b), or AD_NONE
}

fn ad_f32(i: u32) -> f32 {
    return bitcast<f32>(ad[i]);
}

// Element `e` of an f16 array starting at word `base`.
fn ad_f16(base: u32, e: u32) -> f32 {
    let pair = unpack2x16float(ad[base + (e >> 1u)]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
}

// Term table entry t, word j.
fn ad_term(t: u32, j: u32) -> u32 {
    return ad[p.ad.table + t * AD_TERM_WORDS + j];
}

// Element (n, k) of term t's matrix (without its scales). kcols = K.
// Table words: 0 kind, 1 data offset, 2 scale (f32), 3 row vector, 4 col vector,
// KRON: 5 w2 offset, 6 b (w1 columns), 7 c (w2 rows), 8 d (w2 in-channels), 9 kk (taps).
fn ad_term_value(t: u32, kind: u32, n: u32, k: u32, kcols: u32) -> f32 {
    let off = ad_term(t, 1u);
    if (kind == AD_DENSE_F32) {
        return ad_f32(off + n * kcols + k);
    }
    if (kind == AD_DENSE_F16) {
        return ad_f16(off, n * kcols + k);
    }
    // kron(w1 [a, b], w2 [c, d·kk]): row n = i·c + r2, column k = (j·d + l)·kk + tp.ad.
    let b = ad_term(t, 6u);
    let c = ad_term(t, 7u);
    let d = ad_term(t, 8u);
    let kk = ad_term(t, 9u);
    let ci = k / kk;
    let tap = k - ci * kk;
    let j = ci / d;
    let l = ci - j * d;
    let i = n / c;
    let r2 = n - i * c;
    return ad_f32(off + i * b + j) * ad_f32(ad_term(t, 5u) + r2 * (d * kk) + l * kk + tap);
}

// The adapted weight element (n, k) given the base value w0.
fn adapt_w(n: u32, k: u32, kcols: u32, w0: f32) -> f32 {
    var v = w0;
    if (p.ad.base_row != AD_NONE || p.ad.base_col != AD_NONE) {
        var f = 0.0;
        if (p.ad.base_row != AD_NONE) {
            f += ad_f32(p.ad.base_row + n);
        }
        if (p.ad.base_col != AD_NONE) {
            f += ad_f32(p.ad.base_col + k);
        }
        v *= f;
    }
    for (var t = 0u; t < p.ad.terms; t++) {
        var s = bitcast<f32>(ad_term(t, 2u));
        let rv = ad_term(t, 3u);
        if (rv != AD_NONE) {
            s *= ad_f32(rv + n);
        }
        let cv = ad_term(t, 4u);
        if (cv != AD_NONE) {
            s *= ad_f32(cv + k);
        }
        v += s * ad_term_value(t, ad_term(t, 0u), n, k, kcols);
    }
    return v;
}

// Adapted weight values (n, k .. k+3); entries past K stay as they are (0).
fn adapt_w4_row(n: u32, k: u32, kcols: u32, w0: vec4<f32>) -> vec4<f32> {
    var v = w0;
    for (var j = 0u; j < 4u; j++) {
        if (k + j < kcols) {
            v[j] = adapt_w(n, k + j, kcols, w0[j]);
        }
    }
    return v;
}

// Adapted weight values (n .. n+3, k); entries past N stay as they are (0).
fn adapt_w4_col(n: u32, k: u32, kcols: u32, nrows: u32, w0: vec4<f32>) -> vec4<f32> {
    var v = w0;
    if (k >= kcols) {
        return v;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n + j < nrows) {
            v[j] = adapt_w(n + j, k, kcols, w0[j]);
        }
    }
    return v;
}

// up[n, j .. j+3] · col_scale[j .. j+3]: 0 past N or R.
fn lowrank_up4(n: u32, j: u32, nrows: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (n >= nrows) {
        return v;
    }
    for (var q = 0u; q < 4u; q++) {
        if (j + q < p.ad.rank) {
            v[q] = ad_f32(p.ad.up + n * p.ad.rank + j + q) * ad_f32(p.ad.col_scale + j + q);
        }
    }
    return v;
}

// Bias delta of rows n .. n+3 (0 without one or past N).
fn ad_bias4(n: u32, nrows: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (p.ad.bias == AD_NONE) {
        return v;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n + j < nrows) {
            v[j] = ad_f32(p.ad.bias + n + j);
        }
    }
    return v;
}

// Bias delta of row n (0 without one).
fn ad_bias1(n: u32) -> f32 {
    if (p.ad.bias == AD_NONE) {
        return 0.0;
    }
    return ad_f32(p.ad.bias + n);
}
