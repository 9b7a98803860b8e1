// Backward of the normalisation ops in norm.wgsl with the affine parameters frozen: only the
// gradient with respect to the input is computed.
//
// With x̂ = (x - mean) · rstd, z = gamma · x̂ + beta and the upstream gradient dz,
// g = dz · gamma, the input gradient over one normalised set of d values is
//   dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)).
//
//   layer_norm_grad: one workgroup per row of D values: mean, rstd (two passes), then the two
//                    means of g and g·x̂ in one reduction, then dx.
//   softmax_grad:    one workgroup per row: y = softmax(scale · x) given, s = Σ dy·y,
//                    dx = scale · y · (dy - s).
//   group norm, five dispatches (a group of B·G is the contiguous run of C/G channels); the
//   statistics are recomputed from x, in chunks of `chunk` values so large groups (VAE, UNet
//   at high resolution) spread over many workgroups:
//     gnb_partial_stats: per chunk, the chunk's mean and sum of squares about it;
//     gnb_stats:         per group, combines the chunks (Chan et al.) into (mean, rstd);
//     gnb_partial_grad:  per chunk, Σ g and Σ g·x̂; with the SiLU flag the upstream gradient
//                        is first taken through the SiLU: dz = dy · silu'(z), z recomputed;
//     gnb_grad:          per group, mean(g) and mean(g·x̂) from the chunk sums;
//     gnb_dx:            one invocation per element.
//
// Every reduction is a per-invocation strided loop followed by a workgroup-memory tree, both
// in a fixed order, so results are bit-reproducible (no atomics, no subgroup operations).

struct Params {
    rows: u32,     // layer_norm_grad / softmax_grad: rows; gnb_*: number of groups B·G
    d: u32,        // row length / values per group (C/G · spatial)
    chunk: u32,    // gnb_partial_* / gnb_stats / gnb_grad: values per chunk
    chunks: u32,   // gnb_*: chunks per group
    spatial: u32,  // gnb_partial_grad / gnb_dx: values per channel
    channels: u32, // gnb_partial_grad / gnb_dx: C
    cpg: u32,      // gnb_partial_grad / gnb_dx: channels per group
    flags: u32,    // bit 0: gamma given, bit 1: beta given, bit 2: SiLU after the norm
    eps: f32,
    scale: f32,    // softmax_grad: the forward's scale
    n: u32,        // gnb_dx: B·C·spatial
}

@group(0) @binding(0) var<uniform> p: Params;
// softmax_grad reads the forward's output y through `x`.
@group(0) @binding(1) var<storage, read> x: array<f32>;              // (rows, d) / (B, C, spatial)
@group(0) @binding(2) var<storage, read> dy: array<f32>;             // same shape as x
@group(0) @binding(3) var<storage, read> gamma: array<f32>;          // (d) / (C); unused unless flags bit 0
@group(0) @binding(4) var<storage, read> beta: array<f32>;           // (C); unused unless flags bits 1 and 2
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;       // same shape as x
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;  // (groups, chunks, 2)
// stats per group: mean, rstd, mean(g), mean(g·x̂)
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;    // (groups, 4)

const WG: u32 = 256u;

var<workgroup> scratch: array<vec2<f32>, WG>;

// Sum of `v` over the workgroup (a fixed-order tree). Every invocation must call it.
fn wg_sum2(v: vec2<f32>, lid: u32) -> vec2<f32> {
    workgroupBarrier();
    scratch[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) { scratch[lid] += scratch[lid + s]; }
    }
    workgroupBarrier();
    return scratch[0];
}

fn wg_sum(v: f32, lid: u32) -> f32 {
    return wg_sum2(vec2<f32>(v, 0.0), lid).x;
}

fn linear(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

fn gamma_at(c: u32) -> f32 {
    return select(1.0, gamma[c], (p.flags & 1u) != 0u);
}

fn beta_at(c: u32) -> f32 {
    return select(0.0, beta[c], (p.flags & 2u) != 0u);
}

// d silu(z) / dz = σ(z) · (1 + z · (1 - σ(z))), σ evaluated without overflow.
fn silu_grad(z: f32) -> f32 {
    let e = exp(-abs(z));
    let s = select(e / (1.0 + e), 1.0 / (1.0 + e), z >= 0.0);
    return s * (1.0 + z * (1.0 - s));
}

// (mean, rstd) of `len` values of x from `base`, two passes about a sample value.
fn row_stats(base: u32, len: u32, lid: u32) -> vec2<f32> {
    let shift = x[base];
    var s = 0.0;
    for (var i = lid; i < len; i += WG) { s += x[base + i] - shift; }
    let mean = shift + wg_sum(s, lid) / f32(len);
    var q = 0.0;
    for (var i = lid; i < len; i += WG) {
        let c = x[base + i] - mean;
        q += c * c;
    }
    return vec2<f32>(mean, wg_sum(q, lid));
}

@compute @workgroup_size(WG)
fn layer_norm_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = linear(wg, nwg);
    // Uniform per workgroup: the whole workgroup leaves together.
    if (row >= p.rows) { return; }
    let base = row * p.d;
    let ms = row_stats(base, p.d, lid);
    let mean = ms.x;
    let rstd = inverseSqrt(ms.y / f32(p.d) + p.eps);
    var acc = vec2<f32>(0.0);
    for (var i = lid; i < p.d; i += WG) {
        let g = dy[base + i] * gamma_at(i);
        acc += vec2<f32>(g, g * (x[base + i] - mean) * rstd);
    }
    let m = wg_sum2(acc, lid) / f32(p.d);
    for (var i = lid; i < p.d; i += WG) {
        let g = dy[base + i] * gamma_at(i);
        let xh = (x[base + i] - mean) * rstd;
        dx[base + i] = rstd * (g - m.x - xh * m.y);
    }
}

@compute @workgroup_size(WG)
fn softmax_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let row = linear(wg, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.d;
    var s = 0.0;
    for (var i = lid; i < p.d; i += WG) { s += dy[base + i] * x[base + i]; }
    let t = wg_sum(s, lid);
    for (var i = lid; i < p.d; i += WG) {
        dx[base + i] = p.scale * x[base + i] * (dy[base + i] - t);
    }
}

@compute @workgroup_size(WG)
fn gnb_partial_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let w = linear(wg, nwg);
    if (w >= p.rows * p.chunks) { return; }
    let group = w / p.chunks;
    let start = (w % p.chunks) * p.chunk;
    let ms = row_stats(group * p.d + start, min(p.chunk, p.d - start), lid);
    if (lid == 0u) {
        partial[2u * w] = ms.x;
        partial[2u * w + 1u] = ms.y;
    }
}

// Values in chunk i of a group: p.chunk except possibly the last.
fn chunk_len(i: u32) -> u32 {
    return select(p.chunk, p.d - (p.chunks - 1u) * p.chunk, i == p.chunks - 1u);
}

@compute @workgroup_size(WG)
fn gnb_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let group = linear(wg, nwg);
    if (group >= p.rows) { return; }
    let base = group * p.chunks;
    let shift = partial[2u * base];
    var s = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        s += f32(chunk_len(i)) * (partial[2u * (base + i)] - shift);
    }
    let mean = shift + wg_sum(s, lid) / f32(p.d);
    var q = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        let dm = partial[2u * (base + i)] - mean;
        q += partial[2u * (base + i) + 1u] + f32(chunk_len(i)) * dm * dm;
    }
    let variance = wg_sum(q, lid) / f32(p.d);
    if (lid == 0u) {
        stats[4u * group] = mean;
        stats[4u * group + 1u] = inverseSqrt(variance + p.eps);
    }
}

// (x̂, g) of element i, which lies in `group`.
fn gn_point(i: u32, group: u32) -> vec2<f32> {
    let c = (i / p.spatial) % p.channels;
    let xh = (x[i] - stats[4u * group]) * stats[4u * group + 1u];
    let ga = gamma_at(c);
    var dz = dy[i];
    if ((p.flags & 4u) != 0u) {
        dz *= silu_grad(ga * xh + beta_at(c));
    }
    return vec2<f32>(xh, dz * ga);
}

@compute @workgroup_size(WG)
fn gnb_partial_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let w = linear(wg, nwg);
    if (w >= p.rows * p.chunks) { return; }
    let group = w / p.chunks;
    let start = (w % p.chunks) * p.chunk;
    let len = min(p.chunk, p.d - start);
    let base = group * p.d + start;
    var acc = vec2<f32>(0.0);
    for (var i = lid; i < len; i += WG) {
        let pt = gn_point(base + i, group);
        acc += vec2<f32>(pt.y, pt.y * pt.x);
    }
    let s = wg_sum2(acc, lid);
    if (lid == 0u) {
        partial[2u * w] = s.x;
        partial[2u * w + 1u] = s.y;
    }
}

@compute @workgroup_size(WG)
fn gnb_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let group = linear(wg, nwg);
    if (group >= p.rows) { return; }
    let base = group * p.chunks;
    var acc = vec2<f32>(0.0);
    for (var i = lid; i < p.chunks; i += WG) {
        acc += vec2<f32>(partial[2u * (base + i)], partial[2u * (base + i) + 1u]);
    }
    let m = wg_sum2(acc, lid) / f32(p.d);
    if (lid == 0u) {
        stats[4u * group + 2u] = m.x;
        stats[4u * group + 3u] = m.y;
    }
}

@compute @workgroup_size(WG)
fn gnb_dx(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = linear(wg, nwg) * WG + lid;
    if (i >= p.n) { return; }
    let group = (i / p.spatial) / p.cpg;  // b·G + g
    let pt = gn_point(i, group);
    dx[i] = stats[4u * group + 1u] * (pt.y - stats[4u * group + 2u] - pt.x * stats[4u * group + 3u]);
}
