// Normalisation and softmax over f32 activations.
//
//   layer_norm: one workgroup per row of D values: mean, then the variance of the centred
//               values (two passes over the row), then y = (x - mean) * rstd * gamma + beta.
//   softmax:    one workgroup per row: m = max(scale * x), s = sum(exp(scale * x - m)),
//               y = exp(scale * x - m) / s.
//   group norm, three dispatches (a group of B·G is the contiguous run of C/G channels):
//     gn_partial: one workgroup per chunk of `chunk` values of a group: the chunk's mean and
//                 the sum of squares about that mean (two passes over the chunk).
//   Means are summed about a sample value (x[0] of the row or chunk, the first chunk's mean), so
//   a large common offset does not cost precision.
//     gn_stats:   one workgroup per group: combines the chunks exactly (Chan et al.):
//                 mean = sum(n_i mean_i) / n, M2 = sum(M2_i + n_i (mean_i - mean)^2);
//                 writes (mean, 1 / sqrt(M2 / n + eps)).
//     gn_apply:   one invocation per element: (x - mean) * rstd * gamma[c] + beta[c], then
//                 SiLU when asked.
//
// Reductions go through wg_sum / wg_max: with SUBGROUPS, subgroupAdd / subgroupMax inside each
// subgroup and one workgroup-memory slot per subgroup (subgroups are taken to be consecutive
// runs of local_invocation_index, as on every implementation); otherwise a workgroup-memory
// tree. Every invocation of the workgroup must call them (uniform control flow).

struct Params {
    rows: u32,     // layer_norm / softmax: rows; gn_*: number of groups B·G
    d: u32,        // layer_norm / softmax: row length; gn_*: values per group (C/G · spatial)
    chunk: u32,    // gn_partial / gn_stats: values per chunk
    chunks: u32,   // gn_partial / gn_stats: chunks per group
    spatial: u32,  // gn_apply: values per channel
    channels: u32, // gn_apply: C
    cpg: u32,      // gn_apply: channels per group
    flags: u32,    // bit 0: gamma given, bit 1: beta given, bit 2: SiLU after (gn_apply)
    eps: f32,
    scale: f32,    // softmax
    n: u32,        // gn_apply: B·C·spatial
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;            // (rows, d) / (B, C, spatial)
@group(0) @binding(2) var<storage, read> gamma: array<f32>;        // (d) / (C); unused unless flags bit 0
@group(0) @binding(3) var<storage, read> beta: array<f32>;         // (d) / (C); unused unless flags bit 1
@group(0) @binding(4) var<storage, read_write> y: array<f32>;      // same shape as x
@group(0) @binding(5) var<storage, read_write> partial: array<f32>; // (groups, chunks, 2): mean, M2
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;  // (groups, 2): mean, rstd

const WG: u32 = 256u;

var<workgroup> scratch: array<f32, WG>;

#ifdef SUBGROUPS
var<private> sg_size: u32;
var<private> sg_lane: u32;

fn wg_sum(v: f32, lid: u32) -> f32 {
    let s = subgroupAdd(v);
    workgroupBarrier();
    if (sg_lane == 0u) { scratch[lid / sg_size] = s; }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < WG / sg_size; i++) { t += scratch[i]; }
    return t;
}

fn wg_max(v: f32, lid: u32) -> f32 {
    let s = subgroupMax(v);
    workgroupBarrier();
    if (sg_lane == 0u) { scratch[lid / sg_size] = s; }
    workgroupBarrier();
    var t = scratch[0];
    for (var i = 1u; i < WG / sg_size; i++) { t = max(t, scratch[i]); }
    return t;
}
#else
fn wg_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    scratch[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) { scratch[lid] += scratch[lid + s]; }
    }
    workgroupBarrier();
    return scratch[0];
}

fn wg_max(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    scratch[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) { scratch[lid] = max(scratch[lid], scratch[lid + s]); }
    }
    workgroupBarrier();
    return scratch[0];
}
#endif

fn linear(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

fn affine(v: f32, c: u32) -> f32 {
    var r = v;
    if ((p.flags & 1u) != 0u) { r *= gamma[c]; }
    if ((p.flags & 2u) != 0u) { r += beta[c]; }
    return r;
}

@compute @workgroup_size(WG)
fn layer_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32,
#ifdef SUBGROUPS
              @builtin(subgroup_size) sgs: u32, @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#ifdef SUBGROUPS
    sg_size = sgs;
    sg_lane = sgl;
#endif
    let row = linear(wg, nwg);
    // Uniform per workgroup: the whole workgroup leaves together.
    if (row >= p.rows) { return; }
    let base = row * p.d;
    // Summing about a sample of the row keeps a large common offset out of the sum.
    let shift = x[base];
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) { s += x[base + i] - shift; }
    let mean = shift + wg_sum(s, lid) / f32(p.d);
    var q = 0.0;
    for (var i = lid; i < p.d; i += WG) {
        let c = x[base + i] - mean;
        q += c * c;
    }
    let rstd = inverseSqrt(wg_sum(q, lid) / f32(p.d) + p.eps);
    for (var i = lid; i < p.d; i += WG) {
        y[base + i] = affine((x[base + i] - mean) * rstd, i);
    }
}

@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32,
#ifdef SUBGROUPS
           @builtin(subgroup_size) sgs: u32, @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#ifdef SUBGROUPS
    sg_size = sgs;
    sg_lane = sgl;
#endif
    let row = linear(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var m = -3.402823e38;
    for (var i = lid; i < p.d; i += WG) { m = max(m, p.scale * x[base + i]); }
    m = wg_max(m, lid);
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) { s += exp(p.scale * x[base + i] - m); }
    let inv = 1.0 / wg_sum(s, lid);
    for (var i = lid; i < p.d; i += WG) {
        y[base + i] = exp(p.scale * x[base + i] - m) * inv;
    }
}

@compute @workgroup_size(WG)
fn gn_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32,
#ifdef SUBGROUPS
              @builtin(subgroup_size) sgs: u32, @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#ifdef SUBGROUPS
    sg_size = sgs;
    sg_lane = sgl;
#endif
    let w = linear(wg, nwg);
    if (w >= p.rows * p.chunks) { return; }
    let group = w / p.chunks;
    let start = (w % p.chunks) * p.chunk;
    let len = min(p.chunk, p.d - start);
    let base = group * p.d + start;
    let shift = x[base];
    var s = 0.0;
    for (var i = lid; i < len; i += WG) { s += x[base + i] - shift; }
    let mean = shift + wg_sum(s, lid) / f32(len);
    var q = 0.0;
    for (var i = lid; i < len; i += WG) {
        let c = x[base + i] - mean;
        q += c * c;
    }
    let m2 = wg_sum(q, lid);
    if (lid == 0u) {
        partial[2u * w] = mean;
        partial[2u * w + 1u] = m2;
    }
}

@compute @workgroup_size(WG)
fn gn_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32,
#ifdef SUBGROUPS
            @builtin(subgroup_size) sgs: u32, @builtin(subgroup_invocation_id) sgl: u32,
#endif
) {
#ifdef SUBGROUPS
    sg_size = sgs;
    sg_lane = sgl;
#endif
    let group = linear(wg, nwg);
    if (group >= p.rows) { return; }
    let base = group * p.chunks;
    // Every chunk holds p.chunk values except possibly the last.
    let last = p.d - (p.chunks - 1u) * p.chunk;
    let shift = partial[2u * base];
    var s = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        let n = select(p.chunk, last, i == p.chunks - 1u);
        s += f32(n) * (partial[2u * (base + i)] - shift);
    }
    let mean = shift + wg_sum(s, lid) / f32(p.d);
    var q = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        let n = select(p.chunk, last, i == p.chunks - 1u);
        let dm = partial[2u * (base + i)] - mean;
        q += partial[2u * (base + i) + 1u] + f32(n) * dm * dm;
    }
    let variance = wg_sum(q, lid) / f32(p.d);
    if (lid == 0u) {
        stats[2u * group] = mean;
        stats[2u * group + 1u] = inverseSqrt(variance + p.eps);
    }
}

@compute @workgroup_size(WG)
fn gn_apply(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = linear(wg, nwg) * WG + lid;
    if (i >= p.n) { return; }
    let bc = i / p.spatial;           // b·C + c
    let c = bc % p.channels;
    let group = bc / p.cpg;           // b·G + g
    let v = affine((x[i] - stats[2u * group]) * stats[2u * group + 1u], c);
    if ((p.flags & 4u) != 0u) {
        // SiLU, stable for large |v|.
        let e = exp(-abs(v));
        y[i] = v * select(e / (1.0 + e), 1.0 / (1.0 + e), v >= 0.0);
    } else {
        y[i] = v;
    }
}
