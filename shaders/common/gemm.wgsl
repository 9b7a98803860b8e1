// Register-blocked GEMM core shared by matmul.wgsl and conv2d.wgsl: C = A·B with A (M, K) and
// B (K, N). One workgroup of WG invocations computes a BM×BN tile of C, stepping over K in
// slices of KT. For each slice the including kernel stages the A slice (KT × BM) and the
// B slice (KT × BN) in workgroup memory with the stage_* helpers, then calls gemm_slice, which
// adds the slice's products to the invocation's 8×8 block of C (64 multiply-adds per four vec4
// reads of workgroup memory).
// The including shader defines the valued constants BM, BN (multiples of 8,
// (BM/8)·(BN/8) <= 256) and KT (multiple of 4).
//
// Accumulator layout (array<vec4<f32>, 16>, indexed only by constants so it stays in
// registers): acc[2i + h] holds row 8·gemm_ty + i, columns 8·gemm_tx + 4h .. +3 of the tile.

const TM = BM / 4u;                 // vec4 slots along M
const TN = BN / 4u;                 // vec4 slots along N
const WG = (BM / 8u) * (BN / 8u);   // invocations per workgroup
const KC = KT / 4u;                 // 4-value chunks along one K slice

var<workgroup> a_tile: array<vec4<f32>, KT * TM>;  // (KT, BM): a_tile[k * TM + m / 4][m % 4]
var<workgroup> b_tile: array<vec4<f32>, KT * TN>;  // (KT, BN): b_tile[k * TN + n / 4][n % 4]

// Column block of invocation `lid`: tile columns 8·gemm_tx(lid) ..
fn gemm_tx(lid: u32) -> u32 {
    return lid % (BN / 8u);
}

// Row block of invocation `lid`: tile rows 8·gemm_ty(lid) .. (visibly 0 when the tile has one
// row block, so A reads are uniform loads on SIMD CPU drivers such as lavapipe).
fn gemm_ty(lid: u32) -> u32 {
    return select(lid / (BN / 8u), 0u, BM == 8u);
}

// Stores A (row m, k .. k+3) of the slice (k a multiple of 4), transposed into a_tile.
fn stage_a_k4(m: u32, k: u32, v: vec4<f32>) {
    let slot = k * TM + m / 4u;
    let lane = m % 4u;
    a_tile[slot][lane] = v.x;
    a_tile[slot + TM][lane] = v.y;
    a_tile[slot + 2u * TM][lane] = v.z;
    a_tile[slot + 3u * TM][lane] = v.w;
}

// Stores B (k .. k+3, column n) of the slice (k a multiple of 4), transposed into b_tile.
fn stage_b_k4(n: u32, k: u32, v: vec4<f32>) {
    let slot = k * TN + n / 4u;
    let lane = n % 4u;
    b_tile[slot][lane] = v.x;
    b_tile[slot + TN][lane] = v.y;
    b_tile[slot + 2u * TN][lane] = v.z;
    b_tile[slot + 3u * TN][lane] = v.w;
}

// Stores B (k, columns 4·nq .. 4·nq+3) of the slice.
fn stage_b_n4(k: u32, nq: u32, v: vec4<f32>) {
    b_tile[k * TN + nq] = v;
}

// Adds the staged slice's products to the block (tx, ty) in `acc`. Call between two
// workgroupBarrier()s: after staging, before the next slice overwrites the tiles.
fn gemm_slice(acc: ptr<function, array<vec4<f32>, 16>>, tx: u32, ty: u32) {
    for (var kk = 0u; kk < KT; kk++) {
        let a0 = a_tile[kk * TM + 2u * ty];
        let a1 = a_tile[kk * TM + 2u * ty + 1u];
        let b0 = b_tile[kk * TN + 2u * tx];
        let b1 = b_tile[kk * TN + 2u * tx + 1u];
        (*acc)[0] += a0.x * b0;
        (*acc)[1] += a0.x * b1;
        (*acc)[2] += a0.y * b0;
        (*acc)[3] += a0.y * b1;
        (*acc)[4] += a0.z * b0;
        (*acc)[5] += a0.z * b1;
        (*acc)[6] += a0.w * b0;
        (*acc)[7] += a0.w * b1;
        (*acc)[8] += a1.x * b0;
        (*acc)[9] += a1.x * b1;
        (*acc)[10] += a1.y * b0;
        (*acc)[11] += a1.y * b1;
        (*acc)[12] += a1.z * b0;
        (*acc)[13] += a1.z * b1;
        (*acc)[14] += a1.w * b0;
        (*acc)[15] += a1.w * b1;
    }
}

// gemm_slice over the first `kn` (<= KT, uniform) rows of the staged slice only: for a short
// last slice, such as an adapter's R low-rank columns (R = 16 fills half of a 32-deep slice).
fn gemm_slice_n(acc: ptr<function, array<vec4<f32>, 16>>, tx: u32, ty: u32, kn: u32) {
    for (var kk = 0u; kk < kn; kk++) {
        let a0 = a_tile[kk * TM + 2u * ty];
        let a1 = a_tile[kk * TM + 2u * ty + 1u];
        let b0 = b_tile[kk * TN + 2u * tx];
        let b1 = b_tile[kk * TN + 2u * tx + 1u];
        (*acc)[0] += a0.x * b0;
        (*acc)[1] += a0.x * b1;
        (*acc)[2] += a0.y * b0;
        (*acc)[3] += a0.y * b1;
        (*acc)[4] += a0.z * b0;
        (*acc)[5] += a0.z * b1;
        (*acc)[6] += a0.w * b0;
        (*acc)[7] += a0.w * b1;
        (*acc)[8] += a1.x * b0;
        (*acc)[9] += a1.x * b1;
        (*acc)[10] += a1.y * b0;
        (*acc)[11] += a1.y * b1;
        (*acc)[12] += a1.z * b0;
        (*acc)[13] += a1.z * b1;
        (*acc)[14] += a1.w * b0;
        (*acc)[15] += a1.w * b1;
    }
}
