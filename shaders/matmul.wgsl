// Tiled matrix multiply: C = alpha * A * op(B) + bias.
//   A: (batch, M, K) f32, row-major.
//   B: a weight in any storage type (common/weights.wgsl), either shared by every batch or one
//      matrix per batch (b_rows > 0: batch b uses weight rows b*b_rows ..). Without TRANS_B it
//      is stored (K, N) and op(B) = B; with TRANS_B it is stored (N, K) and op(B) = Bᵀ
//      (nn.Linear's weight layout).
//   C: (batch, M, N) f32. BIAS adds bias[n] in the epilogue.
// One workgroup computes a BM×BN tile of C, stepping over K in slices of KT: the A slice and
// the (dequantized) B slice are staged in workgroup memory, then each invocation accumulates an
// 8×8 block of C in registers (the GEMM core in common/gemm.wgsl, shared with conv2d.wgsl).
// Weights are dequantized while staging, four values per load. A_VEC4 (K a multiple of 4)
// reads A four values at a time.
// ADAPTER applies unmerged adapters to B (a weight, N columns of C) inside the kernel: R more
// reduction steps over the low-rank activations lr_t (batch, M, R) and up [N, R]
// (common/adapter.wgsl), plus a bias delta; ADAPTER_W (with ADAPTER) also rescales the weight
// and adds the weight terms while staging (IA³, DoRA, LoHa, LoKr, full), which plain LoRA
// layers do not need.
// Valued defines: BM, BN (multiples of 8, (BM/8)·(BN/8) <= 256), KT (multiple of 4).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    tiles_n: u32, // ceil(N / BN)
    tiles_m: u32, // ceil(M / BM)
    b_rows: u32,  // weight rows per batch (0: one weight shared by all batches)
    alpha: f32,
#ifdef ADAPTER
    @align(16) ad: AdapterParams,  // word offsets into `ad` (common/adapter.wgsl)
#endif
}

@group(0) @binding(0) var<uniform> p: Params;
#ifdef A_VEC4
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;        // (batch, M, K / 4)
#else
@group(0) @binding(1) var<storage, read> a: array<f32>;              // (batch, M, K)
#endif
#ifdef W_F32
@group(0) @binding(2) var<storage, read> w: array<f32>;              // (N, K) | (K, N), per batch if b_rows > 0
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;              // packed (N, K) | (K, N)
#endif
#ifdef W_QUANT
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;       // (blocks) f16 pairs
#endif
#ifdef BIAS
@group(0) @binding(4) var<storage, read> bias: array<f32>;           // (N)
#endif
@group(0) @binding(5) var<storage, read_write> c: array<f32>;        // (batch, M, N)
#ifdef ADAPTER
@group(0) @binding(6) var<storage, read> lr_t: array<f32>;           // (batch, M, R)
@group(0) @binding(7) var<storage, read> ad: array<u32>;             // packed adapter data
#endif

#include "common/weights.wgsl"
#include "common/gemm.wgsl"
#ifdef ADAPTER
#include "common/adapter.wgsl"
#endif

// A values (row, col .. col+3) of the batch matrix starting at `base`; 0 outside (M, K).
fn a_at4(base: u32, row: u32, col: u32) -> vec4<f32> {
    if (row >= p.m || col >= p.k) {
        return vec4<f32>(0.0);
    }
    let e = base + row * p.k + col;
#ifdef A_VEC4
    return a[e >> 2u];
#else
    if (col + 4u <= p.k) {
        return vec4<f32>(a[e], a[e + 1u], a[e + 2u], a[e + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (col + j < p.k) {
            v[j] = a[e + j];
        }
    }
    return v;
#endif
}

// Bias of columns col .. col+3 (0 without BIAS or past N), plus the adapters' bias delta.
fn bias4(col: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
#ifdef BIAS
    for (var j = 0u; j < 4u; j++) {
        if (col + j < p.n) {
            v[j] = bias[col + j];
        }
    }
#endif
#ifdef ADAPTER
    v += ad_bias4(col, p.n);
#endif
    return v;
}

#ifdef ADAPTER
// Low-rank activations (row, j .. j+3) of the batch matrix starting at `base`; 0 outside (M, R).
fn lowrank_a4(base: u32, row: u32, j: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (row >= p.m) {
        return v;
    }
    for (var q = 0u; q < 4u; q++) {
        if (j + q < p.ad.rank) {
            v[q] = lr_t[base + row * p.ad.rank + j + q];
        }
    }
    return v;
}
#endif

// Writes alpha·acc + add to C (row, col .. col+3), skipping what lies outside (M, N).
fn store4(c_base: u32, row: u32, col: u32, acc: vec4<f32>, add: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    let v = p.alpha * acc + add;
    let e = c_base + row * p.n + col;
    for (var j = 0u; j < 4u; j++) {
        if (col + j < p.n) {
            c[e + j] = v[j];
        }
    }
}

@compute @workgroup_size(WG)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * nwg.x;
    if (tile >= p.tiles_n * p.tiles_m * p.batch) {
        return;
    }
    let n0 = (tile % p.tiles_n) * BN;
    let m0 = ((tile / p.tiles_n) % p.tiles_m) * BM;
    let bat = tile / (p.tiles_n * p.tiles_m);
    let a_base = bat * p.m * p.k;
    let w_row0 = bat * p.b_rows;
    let tx = gemm_tx(lid); // columns n0 + 8·tx ..
    let ty = gemm_ty(lid); // rows m0 + 8·ty ..

    // acc[2i + h]: row 8·ty + i, columns 8·tx + 4h .. +3 (common/gemm.wgsl).
    var acc = array<vec4<f32>, 16>();

    let steps = (p.k + KT - 1u) / KT;
    for (var s = 0u; s < steps; s++) {
        let k0 = s * KT;
        // Stage A (BM rows × KT), transposed so the inner loop reads 4 rows at once.
        for (var i = lid; i < BM * KC; i += WG) {
            let mm = i / KC;
            let kk = (i % KC) * 4u;
            stage_a_k4(mm, kk, a_at4(a_base, m0 + mm, k0 + kk));
        }
        // Stage B (KT × BN), dequantizing.
#ifdef TRANS_B
        // Weight rows are n: read 4 consecutive k of one n.
        for (var i = lid; i < BN * KC; i += WG) {
            let nn = i / KC;
            let kk = (i % KC) * 4u;
            var v = vec4<f32>(0.0);
            if (n0 + nn < p.n) {
                v = w_at4(w_row0 + n0 + nn, k0 + kk, p.k);
#ifdef ADAPTER_W
                v = adapt_w4_row(n0 + nn, k0 + kk, p.k, v);
#endif
            }
            stage_b_k4(nn, kk, v);
        }
#else
        // Weight rows are k: read 4 consecutive n of one k.
        for (var i = lid; i < KT * TN; i += WG) {
            let kk = i / TN;
            let nn = (i % TN) * 4u;
            var v = vec4<f32>(0.0);
            if (k0 + kk < p.k) {
                v = w_at4(w_row0 + k0 + kk, n0 + nn, p.n);
#ifdef ADAPTER_W
                v = adapt_w4_col(n0 + nn, k0 + kk, p.k, p.n, v);
#endif
            }
            stage_b_n4(kk, i % TN, v);
        }
#endif
        workgroupBarrier();
        gemm_slice(&acc, tx, ty);
        workgroupBarrier();
    }
#ifdef ADAPTER
    // The low-rank part: R more reduction steps, A = lr_t (M, R), B = (up · col_scale)ᵀ.
    for (var j0 = 0u; j0 < p.ad.rank; j0 += KT) {
        for (var i = lid; i < BM * KC; i += WG) {
            let mm = i / KC;
            let kk = (i % KC) * 4u;
            stage_a_k4(mm, kk, lowrank_a4(bat * p.m * p.ad.rank, m0 + mm, j0 + kk));
        }
        for (var i = lid; i < BN * KC; i += WG) {
            let nn = i / KC;
            let kk = (i % KC) * 4u;
            stage_b_k4(nn, kk, lowrank_up4(n0 + nn, j0 + kk, p.n));
        }
        workgroupBarrier();
        gemm_slice_n(&acc, tx, ty, min(KT, p.ad.rank - j0));
        workgroupBarrier();
    }
#endif

    let c_base = bat * p.m * p.n;
    let r = m0 + ty * 8u;
    let c0 = n0 + tx * 8u;
    let add0 = bias4(c0);
    let add1 = bias4(c0 + 4u);
    store4(c_base, r, c0, acc[0], add0);
    store4(c_base, r, c0 + 4u, acc[1], add1);
    store4(c_base, r + 1u, c0, acc[2], add0);
    store4(c_base, r + 1u, c0 + 4u, acc[3], add1);
    store4(c_base, r + 2u, c0, acc[4], add0);
    store4(c_base, r + 2u, c0 + 4u, acc[5], add1);
    store4(c_base, r + 3u, c0, acc[6], add0);
    store4(c_base, r + 3u, c0 + 4u, acc[7], add1);
    store4(c_base, r + 4u, c0, acc[8], add0);
    store4(c_base, r + 4u, c0 + 4u, acc[9], add1);
    store4(c_base, r + 5u, c0, acc[10], add0);
    store4(c_base, r + 5u, c0 + 4u, acc[11], add1);
    store4(c_base, r + 6u, c0, acc[12], add0);
    store4(c_base, r + 6u, c0 + 4u, acc[13], add1);
    store4(c_base, r + 7u, c0, acc[14], add0);
    store4(c_base, r + 7u, c0 + 4u, acc[15], add1);
}
