// Fused scaled dot-product attention, flash style:
//   o[b, i, h·D + d] = Σ_j softmax_j(scale · q[b, i, h·] · k[b, j, h·]) · v[b, j, h·D + d]
// Heads are interleaved in the last dimension (head h owns columns h·D .. (h+1)·D), the layout
// of diffusers' attention processors around head splitting. With `causal`, key j > query i is
// masked (CLIP's text encoder).
//
// One workgroup owns BQ queries of one (batch, head). TPQ invocations share a query row: each
// owns the output dimensions d ≡ t (mod TPQ) of the accumulator. Keys are visited in tiles of
// BK with an online softmax (running max m and sum l; the accumulator is rescaled whenever the
// max grows), so the Nq × Nk score matrix never exists outside workgroup memory. Scores are in
// base 2 (the host folds log2(e) into the scale) so probabilities are exp2.
//
// Per key tile:
//   1. load the key tile into kv_tile
//   2. each invocation scores its keys j ≡ t (mod TPQ) against its row (kept in registers)
//      and publishes its partial row max
//   3. load the value tile into kv_tile; every invocation of a row derives the same new row
//      max, rescales its accumulator and publishes the probabilities of its keys
//   4. accumulate probabilities times values into the owned dimensions
//
// Valued defines: HEAD_DIM (D), BQ (queries per workgroup), BK (keys per tile), TPQ
// (invocations per query). Workgroup memory: (BQ·QS + BK·KS + BQ·BK + BQ·TPQ) f32, the host
// picks tile sizes that fit the device's limit.

struct Params {
    batch: u32,
    nq: u32,       // queries per batch item
    nk: u32,       // keys (and values) per batch item
    heads: u32,
    q_tiles: u32,  // ceil(nq / BQ)
    causal: u32,   // 1: mask key j > query i
    scale: f32,    // softmax scale · log2(e)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;        // (B, Nq, H·D)
@group(0) @binding(2) var<storage, read> k: array<f32>;        // (B, Nk, H·D)
@group(0) @binding(3) var<storage, read> v: array<f32>;        // (B, Nk, H·D)
@group(0) @binding(4) var<storage, read_write> o: array<f32>;  // (B, Nq, H·D)

const WG: u32 = BQ * TPQ;
// Output dimensions owned by one invocation, and keys it scores per tile.
const DPT: u32 = (HEAD_DIM + TPQ - 1u) / TPQ;
const KPT: u32 = (BK + TPQ - 1u) / TPQ;
// Odd row strides keep rows of the tiles in different memory banks.
const QS: u32 = HEAD_DIM | 1u;
const KS: u32 = HEAD_DIM | 1u;
// Score of a masked key (WGSL has no infinity literal).
const MASKED: f32 = -3.0e38;

var<workgroup> q_tile: array<f32, BQ * QS>;     // (BQ, D) queries times scale, stride QS
var<workgroup> kv_tile: array<f32, BK * KS>;    // (BK, D) keys, then values, stride KS
var<workgroup> p_tile: array<f32, BQ * BK>;     // (BQ, BK) probabilities of the tile
var<workgroup> max_part: array<f32, BQ * TPQ>;  // (BQ, TPQ) partial row maxima of the tile

@compute @workgroup_size(WG)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let wid = wg.x + wg.y * nwg.x;
    if (wid >= p.batch * p.heads * p.q_tiles) {
        return;
    }
    let qt = wid % p.q_tiles;
    let bh = wid / p.q_tiles;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let hd = p.heads * HEAD_DIM;
    let col0 = h * HEAD_DIM;
    let q0 = qt * BQ;
    let r = lid / TPQ;   // query row within the tile
    let t = lid % TPQ;   // position within the row's invocations
    let causal = p.causal != 0u;

    for (var e = lid; e < BQ * HEAD_DIM; e += WG) {
        let rr = e / HEAD_DIM;
        let d = e % HEAD_DIM;
        let i = q0 + rr;
        var x = 0.0;
        if (i < p.nq) {
            x = q[(b * p.nq + i) * hd + col0 + d] * p.scale;
        }
        q_tile[rr * QS + d] = x;
    }

    var acc: array<f32, DPT>;
    for (var c = 0u; c < DPT; c++) {
        acc[c] = 0.0;
    }
    var m = MASKED;  // running row max
    var l = 0.0;     // running row sum of exp2(score - m)
    var s: array<f32, KPT>;

    // With the causal mask, keys past the tile's last query are never visited. The first key
    // is visible to every row, so m is finite after the first tile.
    var kend = p.nk;
    if (causal) {
        kend = min(p.nk, q0 + BQ);
    }
    let kbase = b * p.nk;
    for (var k0 = 0u; k0 < kend; k0 += BK) {
        // 1. keys
        for (var e = lid; e < BK * HEAD_DIM; e += WG) {
            let jj = e / HEAD_DIM;
            let d = e % HEAD_DIM;
            let j = k0 + jj;
            var x = 0.0;
            if (j < p.nk) {
                x = k[(kbase + j) * hd + col0 + d];
            }
            kv_tile[jj * KS + d] = x;
        }
        workgroupBarrier();

        // 2. scores of keys jj ≡ t (mod TPQ) for row r
        var mx = MASKED;
        for (var c = 0u; c < KPT; c++) {
            let jj = t + c * TPQ;
            var sc = MASKED;
            if (jj < BK) {
                let j = k0 + jj;
                if (j < p.nk && !(causal && j > q0 + r)) {
                    var dot = 0.0;
                    for (var d = 0u; d < HEAD_DIM; d++) {
                        dot += q_tile[r * QS + d] * kv_tile[jj * KS + d];
                    }
                    sc = dot;
                }
            }
            s[c] = sc;
            mx = max(mx, sc);
        }
        max_part[lid] = mx;
        workgroupBarrier();

        // 3. values; new row max, rescaling, probabilities
        for (var e = lid; e < BK * HEAD_DIM; e += WG) {
            let jj = e / HEAD_DIM;
            let d = e % HEAD_DIM;
            let j = k0 + jj;
            var x = 0.0;
            if (j < p.nk) {
                x = v[(kbase + j) * hd + col0 + d];
            }
            kv_tile[jj * KS + d] = x;
        }
        var m_new = m;
        for (var u = 0u; u < TPQ; u++) {
            m_new = max(m_new, max_part[r * TPQ + u]);
        }
        let corr = exp2(m - m_new);
        m = m_new;
        l *= corr;
        for (var c = 0u; c < DPT; c++) {
            acc[c] *= corr;
        }
        for (var c = 0u; c < KPT; c++) {
            let jj = t + c * TPQ;
            if (jj < BK) {
                p_tile[r * BK + jj] = select(0.0, exp2(s[c] - m_new), s[c] > MASKED);
            }
        }
        workgroupBarrier();

        // 4. accumulate
        for (var jj = 0u; jj < BK; jj++) {
            let pj = p_tile[r * BK + jj];
            l += pj;
            for (var c = 0u; c < DPT; c++) {
                let d = t + c * TPQ;
                if (d < HEAD_DIM) {
                    acc[c] += pj * kv_tile[jj * KS + d];
                }
            }
        }
        workgroupBarrier();
    }

    let i = q0 + r;
    if (i < p.nq) {
        let inv = 1.0 / l;
        let base = (b * p.nq + i) * hd + col0;
        for (var c = 0u; c < DPT; c++) {
            let d = t + c * TPQ;
            if (d < HEAD_DIM) {
                o[base + d] = acc[c] * inv;
            }
        }
    }
}
