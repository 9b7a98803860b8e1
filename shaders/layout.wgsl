// Data movement on f32 activations.
//   upsample2x:  y[bc, oy, ox] = x[bc, oy / 2, ox / 2]            (nearest, [B·C, 2H, 2W])
//   concat_part: one input of a concatenation: x viewed as (outer, len·inner) goes to
//                y[o, off·inner + r] of y viewed as (outer, total·inner)
//   slice_last:  y[r, j] = x[r, start + j]                        (x: (rows, d), y: (rows, len))
//   transpose:   y[b, c, r] = x[b, r, c], through 16×16 tiles in workgroup memory
//   timestep_embedding: y[n, k] as diffusers' get_timestep_embedding (see the entry point)
//   pad2d:       y[bc, oy, ox] = x[bc, oy - top, ox - left], zero outside x   ([B·C, Ho, Wo])
//   embedding:   y[n, j] = table[ids[n], j]                       (nn.Embedding; table f32 or f16)
// One invocation per output element except in `transpose`.

struct Params {
    n: u32,     // output elements
    a: u32,     // upsample2x: W | concat_part: len·inner | slice_last: d | transpose: R | temb: dim
                // | embedding: D
    b: u32,     // concat_part: total·inner | slice_last: len | transpose: C | temb: flip (0/1)
                // | embedding: table is f16 (0/1)
    c: u32,     // concat_part: off·inner | slice_last: start | transpose: tiles along R
                // | embedding: rows of the table (ids past it read row 0; the host rejects them)
    d: u32,     // transpose: tiles along C
    f0: f32,    // temb: -ln(max_period) / (half - downscale_freq_shift)
    e: u32,     // pad2d: top (W, H, Wo, Ho in a, b, c, d)
    g: u32,     // pad2d: left
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // input (shapes above)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;  // output (shapes above)
@group(0) @binding(3) var<storage, read> table: array<u32>;    // embedding: (rows, D) f32 bits or f16 pairs
@group(0) @binding(4) var<storage, read> ids: array<u32>;      // embedding: (N)

const WG: u32 = 256u;
const TILE: u32 = 16u;

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn upsample2x(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let w2 = 2u * p.a;
    let ox = i % w2;
    let row = (i / w2) / 2u;  // (bc · 2H + oy) / 2 = bc · H + oy / 2
    y[i] = x[row * p.a + ox / 2u];
}

@compute @workgroup_size(WG)
fn concat_part(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);  // element of this input
    if (i >= p.n) { return; }
    let o = i / p.a;
    let r = i % p.a;
    y[o * p.b + p.c + r] = x[i];
}

@compute @workgroup_size(WG)
fn slice_last(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let r = i / p.b;
    let j = i % p.b;
    y[i] = x[r * p.a + p.c + j];
}

var<workgroup> tile: array<f32, 272>; // TILE × (TILE + 1)

// Workgroup (tile index) covers x[b, tr·16 .. +16, tc·16 .. +16].
@compute @workgroup_size(16, 16)
fn transpose(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) l: vec3<u32>) {
    let t = wg.x + wg.y * nwg.x;
    let per = p.c * p.d;
    let batch = t / per;
    let tr = (t % per) / p.d;
    let tc = t % p.d;
    let rows = p.a;
    let cols = p.b;
    let base = batch * rows * cols;
    let live = t < p.n;           // p.n: batches · tiles per batch
    let r = tr * TILE + l.y;
    let c = tc * TILE + l.x;
    if (live && r < rows && c < cols) {
        tile[l.y * (TILE + 1u) + l.x] = x[base + r * cols + c];
    }
    workgroupBarrier();
    // Write y[b, c', r'] with r' along x for coalescing.
    let c2 = tc * TILE + l.y;
    let r2 = tr * TILE + l.x;
    if (live && c2 < cols && r2 < rows) {
        y[base + c2 * rows + r2] = tile[l.x * (TILE + 1u) + l.y];
    }
}

// An angle reduced to [-pi, pi] (Cody–Waite: 2·pi = 6.28125 + 1.9353071795864769e-3, the first
// part exact in 8 bits so k · 6.28125 is exact), since GPU sin/cos are accurate only near zero.
fn reduce_2pi(v: f32) -> f32 {
    let k = round(v * 0.15915494309189535);
    return (v - k * 6.28125) - k * 1.9353071795864769e-3;
}

@compute @workgroup_size(WG)
fn timestep_embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    // y[n, k], dim = p.a, half = dim / 2:
    //   freq_j = exp(j · f0),  arg = t[n] · freq_j
    //   k < half: sin(arg_k) (cos when flipped); half <= k < 2·half: cos(arg_{k-half}) (sin
    //   when flipped); k = dim - 1 of an odd dim: 0.
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let dim = p.a;
    let half = dim / 2u;
    let n = i / dim;
    let k = i % dim;
    if (k >= 2u * half) {
        y[i] = 0.0;
        return;
    }
    let second = k >= half;
    let j = select(k, k - half, second);
    let arg = reduce_2pi(x[n] * exp(f32(j) * p.f0));
    let use_cos = second != (p.b != 0u);
    y[i] = select(sin(arg), cos(arg), use_cos);
}

@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    var row = ids[i / p.a];
    if (row >= p.c) { row = 0u; }
    let e = row * p.a + i % p.a;
    if (p.b == 0u) {
        y[i] = bitcast<f32>(table[e]);
    } else {
        let pair = unpack2x16float(table[e >> 1u]);
        y[i] = select(pair.x, pair.y, (e & 1u) == 1u);
    }
}

@compute @workgroup_size(WG)
fn pad2d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let ox = i % p.c;
    let oy = (i / p.c) % p.d;
    let bc = i / (p.c * p.d);
    var v = 0.0;
    if (ox >= p.g && oy >= p.e && ox - p.g < p.a && oy - p.e < p.b) {
        v = x[(bc * p.b + oy - p.e) * p.a + ox - p.g];
    }
    y[i] = v;
}
