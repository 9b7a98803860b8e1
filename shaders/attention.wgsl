// Fused scaled dot-product attention, flash style:
//   o[b, i, h·D + d] = Σ_j softmax_j(scale · q[b, i, h·] · k[b, j, h·]) · v[b, j, h·D + d]
// Heads are interleaved in the last dimension (head h owns columns h·D .. (h+1)·D), the layout
// of diffusers' attention processors around head splitting. With `causal`, key j > query i is
// masked (CLIP's text encoder).
//
// One workgroup owns BQ queries of one (batch, head); each invocation owns one query row and
// keeps it, and its output accumulator, in registers as D4 = ceil(D/4) vec4s. Keys and values
// are staged BK at a time in workgroup memory, where every invocation reads the same element
// at the same time (a broadcast: no bank conflicts on GPUs, one scalar load on CPU rasterizers
// that run invocations as SIMD lanes). Each invocation runs an online softmax over groups of
// four keys: a running max m and sum l, the accumulator rescaled by exp2(m_old - m_new). The
// Nq × Nk score matrix never exists. Scores are in base 2: the host folds log2(e) into scale.
//
// Valued defines: HEAD_DIM (D), BQ (queries per workgroup = invocations), BK (keys per tile,
// a multiple of 4). Workgroup memory: 2·BK·D4 vec4 (32·BK·D4 bytes); the host picks BK to fit
// the device's limit. Flag SAVE_LSE: also write each row's log-sum-exp of its scaled scores,
// L = ln Σ_j exp(scale · q·k_j), which the backward (shaders/grad_attention.wgsl) uses to
// recompute the probabilities as exp(scale · q·k_j − L).

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
#ifdef SAVE_LSE
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;  // (B·H, Nq) natural log-sum-exp
#endif

const D4: u32 = (HEAD_DIM + 3u) / 4u;
// Score of a masked key (WGSL has no infinity literal).
const MASKED: f32 = -3.0e38;

var<workgroup> k_tile: array<vec4<f32>, BK * D4>;  // (BK, D4) keys, zero past D
var<workgroup> v_tile: array<vec4<f32>, BK * D4>;  // (BK, D4) values, zero past D

@compute @workgroup_size(BQ)
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
    let i = q0 + lid;  // this invocation's query
    let causal = p.causal != 0u;

    // The query row, scaled; rows past nq compute on zeros and are not written.
    var qr: array<vec4<f32>, D4>;
    var acc: array<vec4<f32>, D4>;
    let qbase = (b * p.nq + min(i, p.nq - 1u)) * hd + col0;
    for (var c = 0u; c < D4; c++) {
        var x = vec4(0.0);
        for (var u = 0u; u < 4u; u++) {
            let d = 4u * c + u;
            if (i < p.nq && d < HEAD_DIM) {
                x[u] = q[qbase + d] * p.scale;
            }
        }
        qr[c] = x;
        acc[c] = vec4(0.0);
    }
    var m = MASKED;  // running max of the row's scores
    var l = 0.0;     // running sum of exp2(score - m)

    // With the causal mask, keys past the tile's last query are never visited. The first key
    // is visible to every row, so m is finite after the first group of keys.
    var kend = p.nk;
    if (causal) {
        kend = min(p.nk, q0 + BQ);
    }
    let kbase = b * p.nk;
    for (var k0 = 0u; k0 < kend; k0 += BK) {
        for (var e = lid; e < BK * D4; e += BQ) {
            let j = k0 + e / D4;
            let d0 = 4u * (e % D4);
            var kx = vec4(0.0);
            var vx = vec4(0.0);
            if (j < p.nk) {
                let base = (kbase + j) * hd + col0 + d0;
                for (var u = 0u; u < 4u; u++) {
                    if (d0 + u < HEAD_DIM) {
                        kx[u] = k[base + u];
                        vx[u] = v[base + u];
                    }
                }
            }
            k_tile[e] = kx;
            v_tile[e] = vx;
        }
        workgroupBarrier();

        let kn = min(BK, kend - k0);
        for (var jj = 0u; jj < kn; jj += 4u) {
            // Scores of keys jj .. jj+3 (rows past the tile are zero and masked below).
            var s = vec4(0.0);
            for (var c = 0u; c < D4; c++) {
                let x = qr[c];
                s += vec4(dot(x, k_tile[jj * D4 + c]), dot(x, k_tile[(jj + 1u) * D4 + c]),
                          dot(x, k_tile[(jj + 2u) * D4 + c]), dot(x, k_tile[(jj + 3u) * D4 + c]));
            }
            let j = vec4(k0 + jj) + vec4(0u, 1u, 2u, 3u);
            var visible = j < vec4(p.nk);
            if (causal) {
                visible = visible & (j <= vec4(i));
            }
            s = select(vec4(MASKED), s, visible);
            let m_new = max(m, max(max(s.x, s.y), max(s.z, s.w)));
            let corr = exp2(m - m_new);
            let pr = select(vec4(0.0), exp2(s - m_new), visible);
            m = m_new;
            l = l * corr + (pr.x + pr.y) + (pr.z + pr.w);
            for (var c = 0u; c < D4; c++) {
                acc[c] = acc[c] * corr + pr.x * v_tile[jj * D4 + c] + pr.y * v_tile[(jj + 1u) * D4 + c]
                    + pr.z * v_tile[(jj + 2u) * D4 + c] + pr.w * v_tile[(jj + 3u) * D4 + c];
            }
        }
        workgroupBarrier();
    }

    if (i < p.nq) {
        let inv = 1.0 / l;
        let base = (b * p.nq + i) * hd + col0;
        for (var c = 0u; c < D4; c++) {
            let x = acc[c] * inv;
            for (var u = 0u; u < 4u; u++) {
                let d = 4u * c + u;
                if (d < HEAD_DIM) {
                    o[base + d] = x[u];
                }
            }
        }
#ifdef SAVE_LSE
        // m and l are in base 2: log2 Σ exp2(s) = m + log2(l).
        lse[bh * p.nq + i] = (m + log2(l)) * 0.6931471805599453;
#endif
    }
}
