// Backward of the fused attention (shaders/attention.wgsl), FlashAttention-2 style. With
// scaled scores s_ij = scale · q_i·k_j, probabilities P_ij = exp(s_ij − L_i) (L from the
// forward's SAVE_LSE variant), output O_i = Σ_j P_ij v_j and upstream gradient dO:
//   dP_ij = dO_i·v_j        D_i = Σ_j P_ij dP_ij = dO_i·O_i        dS_ij = P_ij (dP_ij − D_i)
//   dQ_i = scale Σ_j dS_ij k_j     dK_j = scale Σ_i dS_ij q_i     dV_j = Σ_i P_ij dO_i
// Heads are interleaved in the last dimension as in the forward (head h owns columns
// h·D .. (h+1)·D). With `causal`, key j > query i is masked.
//
// Two kernels, neither with atomics: every gradient element is summed by one invocation in a
// fixed order, so results are bit-reproducible.
// - grad_q: one workgroup per ROWS queries of one (batch, head), one query row per invocation
//   (q, dO and the dQ accumulator in registers). It computes D_i, writes it to `delta` for
//   grad_kv, and visits the keys and values staged STAGE at a time in workgroup memory.
// - grad_kv (after grad_q): one workgroup per ROWS keys, one key row per invocation (k, v and
//   the dK, dV accumulators in registers); queries, dO, L and D are staged STAGE at a time.
// Staged rows are read by every invocation at the same time (broadcasts), four at a time as
// in the forward. Scores are in base 2: the host folds log2(e) into scale2.
//
// Valued defines: HEAD_DIM (D), ROWS (rows per workgroup = invocations), STAGE (rows per
// staged tile, a multiple of 4). Workgroup memory: 2·STAGE·D4 vec4 + 2·STAGE f32
// (STAGE·(32·D4 + 8) bytes); the host picks STAGE to fit the device's limit.

struct Params {
    batch: u32,
    nq: u32,         // queries per batch item
    nk: u32,         // keys (and values) per batch item
    heads: u32,
    row_tiles: u32,  // ceil(nq / ROWS) for grad_q, ceil(nk / ROWS) for grad_kv
    causal: u32,     // 1: mask key j > query i
    scale2: f32,     // softmax scale · log2(e)
    scale: f32,      // softmax scale
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;             // (B, Nq, H·D)
@group(0) @binding(2) var<storage, read> k: array<f32>;             // (B, Nk, H·D)
@group(0) @binding(3) var<storage, read> v: array<f32>;             // (B, Nk, H·D)
@group(0) @binding(4) var<storage, read> d_o: array<f32>;           // (B, Nq, H·D) upstream gradient
@group(0) @binding(5) var<storage, read> lse: array<f32>;           // (B·H, Nq) natural log-sum-exp
@group(0) @binding(6) var<storage, read> o: array<f32>;             // (B, Nq, H·D) forward output
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;   // (B·H, Nq) D = rowsum(dO ⊙ O)
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;      // (B, Nq, H·D)
@group(0) @binding(9) var<storage, read_write> dk: array<f32>;      // (B, Nk, H·D)
@group(0) @binding(10) var<storage, read_write> dv: array<f32>;     // (B, Nk, H·D)

const D4: u32 = (HEAD_DIM + 3u) / 4u;
const LOG2E: f32 = 1.4426950408889634;

// grad_q: keys and values; grad_kv: queries and dO. Zero past D and past the last row.
var<workgroup> tile_a: array<vec4<f32>, STAGE * D4>;  // (STAGE, D4)
var<workgroup> tile_b: array<vec4<f32>, STAGE * D4>;  // (STAGE, D4)
// grad_kv: L · log2(e) and D of the staged queries.
var<workgroup> lse_tile: array<f32, STAGE>;           // (STAGE)
var<workgroup> delta_tile: array<f32, STAGE>;         // (STAGE)

// The (batch, head, row tile) a workgroup owns, or none past the last.
struct Work {
    valid: bool,
    b: u32,
    h: u32,
    tile: u32,
}

fn work(wg: vec3<u32>, nwg: vec3<u32>) -> Work {
    let wid = wg.x + wg.y * nwg.x;
    let tile = wid % p.row_tiles;
    let bh = wid / p.row_tiles;
    return Work(wid < p.batch * p.heads * p.row_tiles, bh / p.heads, bh % p.heads, tile);
}

@compute @workgroup_size(ROWS)
fn grad_q(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let w = work(wg, nwg);
    if (!w.valid) {
        return;
    }
    let hd = p.heads * HEAD_DIM;
    let col0 = w.h * HEAD_DIM;
    let bh = w.b * p.heads + w.h;
    let q0 = w.tile * ROWS;
    let i = q0 + lid;  // this invocation's query
    let ic = min(i, p.nq - 1u);  // rows past nq compute on the last row and are not written
    let causal = p.causal != 0u;

    // The scaled query row, dO row, D_i = dO_i·O_i and the dQ accumulator.
    var qr: array<vec4<f32>, D4>;
    var gr: array<vec4<f32>, D4>;
    var acc: array<vec4<f32>, D4>;
    var di = 0.0;
    let qbase = (w.b * p.nq + ic) * hd + col0;
    for (var c = 0u; c < D4; c++) {
        var x = vec4(0.0);
        var g = vec4(0.0);
        var y = vec4(0.0);
        for (var u = 0u; u < 4u; u++) {
            let d = 4u * c + u;
            if (d < HEAD_DIM) {
                x[u] = q[qbase + d] * p.scale2;
                g[u] = d_o[qbase + d];
                y[u] = o[qbase + d];
            }
        }
        qr[c] = x;
        gr[c] = g;
        acc[c] = vec4(0.0);
        di += dot(g, y);
    }
    let l2 = lse[bh * p.nq + ic] * LOG2E;
    if (i < p.nq) {
        delta[bh * p.nq + i] = di;
    }

    var kend = p.nk;
    if (causal) {
        kend = min(p.nk, q0 + ROWS);
    }
    let kbase = w.b * p.nk;
    for (var k0 = 0u; k0 < kend; k0 += STAGE) {
        for (var e = lid; e < STAGE * D4; e += ROWS) {
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
            tile_a[e] = kx;
            tile_b[e] = vx;
        }
        workgroupBarrier();

        let kn = min(STAGE, kend - k0);
        for (var jj = 0u; jj < kn; jj += 4u) {
            // Scores and dP of keys jj .. jj+3 (rows past the tile are zero and masked below).
            var s = vec4(0.0);
            var dp = vec4(0.0);
            for (var c = 0u; c < D4; c++) {
                let x = qr[c];
                let g = gr[c];
                s += vec4(dot(x, tile_a[jj * D4 + c]), dot(x, tile_a[(jj + 1u) * D4 + c]),
                          dot(x, tile_a[(jj + 2u) * D4 + c]), dot(x, tile_a[(jj + 3u) * D4 + c]));
                dp += vec4(dot(g, tile_b[jj * D4 + c]), dot(g, tile_b[(jj + 1u) * D4 + c]),
                           dot(g, tile_b[(jj + 2u) * D4 + c]), dot(g, tile_b[(jj + 3u) * D4 + c]));
            }
            let j = vec4(k0 + jj) + vec4(0u, 1u, 2u, 3u);
            var visible = j < vec4(p.nk);
            if (causal) {
                visible = visible & (j <= vec4(i));
            }
            let pr = select(vec4(0.0), exp2(min(s - l2, vec4(0.0))), visible);
            let ds = pr * (dp - di);
            for (var c = 0u; c < D4; c++) {
                acc[c] += ds.x * tile_a[jj * D4 + c] + ds.y * tile_a[(jj + 1u) * D4 + c]
                    + ds.z * tile_a[(jj + 2u) * D4 + c] + ds.w * tile_a[(jj + 3u) * D4 + c];
            }
        }
        workgroupBarrier();
    }

    if (i < p.nq) {
        let base = (w.b * p.nq + i) * hd + col0;
        for (var c = 0u; c < D4; c++) {
            let x = acc[c] * p.scale;
            for (var u = 0u; u < 4u; u++) {
                let d = 4u * c + u;
                if (d < HEAD_DIM) {
                    dq[base + d] = x[u];
                }
            }
        }
    }
}

@compute @workgroup_size(ROWS)
fn grad_kv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let w = work(wg, nwg);
    if (!w.valid) {
        return;
    }
    let hd = p.heads * HEAD_DIM;
    let col0 = w.h * HEAD_DIM;
    let bh = w.b * p.heads + w.h;
    let k0 = w.tile * ROWS;
    let j = k0 + lid;  // this invocation's key
    let causal = p.causal != 0u;

    // The scaled key row, value row and the dK, dV accumulators; rows past nk compute on the
    // last row and are not written.
    var kr: array<vec4<f32>, D4>;
    var vr: array<vec4<f32>, D4>;
    var gk: array<vec4<f32>, D4>;
    var gv: array<vec4<f32>, D4>;
    let kbase = (w.b * p.nk + min(j, p.nk - 1u)) * hd + col0;
    for (var c = 0u; c < D4; c++) {
        var x = vec4(0.0);
        var y = vec4(0.0);
        for (var u = 0u; u < 4u; u++) {
            let d = 4u * c + u;
            if (d < HEAD_DIM) {
                x[u] = k[kbase + d] * p.scale2;
                y[u] = v[kbase + d];
            }
        }
        kr[c] = x;
        vr[c] = y;
        gk[c] = vec4(0.0);
        gv[c] = vec4(0.0);
    }

    // With the causal mask, queries before the tile's first key see none of its keys.
    var qstart = 0u;
    if (causal) {
        qstart = min(k0, p.nq);
    }
    let qbase = w.b * p.nq;
    for (var q0 = qstart; q0 < p.nq; q0 += STAGE) {
        for (var e = lid; e < STAGE * D4; e += ROWS) {
            let i = q0 + e / D4;
            let d0 = 4u * (e % D4);
            var qx = vec4(0.0);
            var gx = vec4(0.0);
            if (i < p.nq) {
                let base = (qbase + i) * hd + col0 + d0;
                for (var u = 0u; u < 4u; u++) {
                    if (d0 + u < HEAD_DIM) {
                        qx[u] = q[base + u];
                        gx[u] = d_o[base + u];
                    }
                }
            }
            tile_a[e] = qx;
            tile_b[e] = gx;
        }
        for (var e = lid; e < STAGE; e += ROWS) {
            let i = q0 + e;
            var l = 0.0;
            var dd = 0.0;
            if (i < p.nq) {
                l = lse[bh * p.nq + i] * LOG2E;
                dd = delta[bh * p.nq + i];
            }
            lse_tile[e] = l;
            delta_tile[e] = dd;
        }
        workgroupBarrier();

        let qn = min(STAGE, p.nq - q0);
        for (var ii = 0u; ii < qn; ii += 4u) {
            // Scores and dP of queries ii .. ii+3 (rows past the tile are zero and masked).
            var s = vec4(0.0);
            var dp = vec4(0.0);
            for (var c = 0u; c < D4; c++) {
                let x = kr[c];
                let y = vr[c];
                s += vec4(dot(x, tile_a[ii * D4 + c]), dot(x, tile_a[(ii + 1u) * D4 + c]),
                          dot(x, tile_a[(ii + 2u) * D4 + c]), dot(x, tile_a[(ii + 3u) * D4 + c]));
                dp += vec4(dot(y, tile_b[ii * D4 + c]), dot(y, tile_b[(ii + 1u) * D4 + c]),
                           dot(y, tile_b[(ii + 2u) * D4 + c]), dot(y, tile_b[(ii + 3u) * D4 + c]));
            }
            let l2 = vec4(lse_tile[ii], lse_tile[ii + 1u], lse_tile[ii + 2u], lse_tile[ii + 3u]);
            let dd = vec4(delta_tile[ii], delta_tile[ii + 1u], delta_tile[ii + 2u], delta_tile[ii + 3u]);
            let i = vec4(q0 + ii) + vec4(0u, 1u, 2u, 3u);
            var visible = i < vec4(p.nq);
            if (causal) {
                visible = visible & (vec4(j) <= i);
            }
            let pr = select(vec4(0.0), exp2(min(s - l2, vec4(0.0))), visible);
            let ds = pr * (dp - dd);
            for (var c = 0u; c < D4; c++) {
                gv[c] += pr.x * tile_b[ii * D4 + c] + pr.y * tile_b[(ii + 1u) * D4 + c]
                    + pr.z * tile_b[(ii + 2u) * D4 + c] + pr.w * tile_b[(ii + 3u) * D4 + c];
                gk[c] += ds.x * tile_a[ii * D4 + c] + ds.y * tile_a[(ii + 1u) * D4 + c]
                    + ds.z * tile_a[(ii + 2u) * D4 + c] + ds.w * tile_a[(ii + 3u) * D4 + c];
            }
        }
        workgroupBarrier();
    }

    if (j < p.nk) {
        let base = (w.b * p.nk + j) * hd + col0;
        for (var c = 0u; c < D4; c++) {
            let x = gk[c] * p.scale;
            let y = gv[c];
            for (var u = 0u; u < 4u; u++) {
                let d = 4u * c + u;
                if (d < HEAD_DIM) {
                    dk[base + d] = x[u];
                    dv[base + d] = y[u];
                }
            }
        }
    }
}
