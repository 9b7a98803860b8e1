// 2-D convolution (PyTorch nn.Conv2d: zero padding, no dilation, one group) as an implicit GEMM:
//   y[b, co, oy, ox] = bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[b, ci, iy, ix]
//   iy = oy*stride + ky - pad, ix = ox*stride + kx - pad (x is zero outside the image).
// GEMM view: C[co, n] = sum_k W[co, k] * X[k, n] over n = (b, oy, ox) and k = (ci, ky, kx),
// computed by the register-blocked core of common/gemm.wgsl (BM output channels × BN output
// pixels per workgroup, an 8×8 block per invocation, K in slices of KT):
// - A = W, the [Cout, Cin*kh*kw] weight matrix, read four consecutive k at a time through
//   common/weights.wgsl (w_at4, dequantized while the slice is staged);
// - B = X, gathered im2col-style from the image four consecutive pixels of one k at a time;
// - the epilogue writes four consecutive pixels of one channel, plus bias[co].
// Valued defines: BM, BN (multiples of 8, (BM/8)·(BN/8) <= 256), KT (multiple of 4), and the
// kernel size KH, KW (constants, so decoding k = (ci, ky, kx) divides by constants).
// Flags: one weight type (W_F32 | W_F16 | W_Q8_0+W_QUANT | W_Q4_0+W_QUANT); BIAS; ADAPTER
// (unmerged adapters on W, common/adapter.wgsl: R more reduction steps with A = up · col_scale
// and B = lr_t, the low-rank activations [B, R, Ho, Wo] of the stacked down convolutions, plus
// a bias delta); ADAPTER_W (with ADAPTER: scales and extra terms while staging W, for IA³,
// DoRA, LoHa, LoKr and full adapters).

struct Params {
    cin: u32,      // input channels
    h: u32,        // input height
    w: u32,        // input width
    cout: u32,     // output channels (rows of W)
    ho: u32,       // output height
    wo: u32,       // output width
    stride: u32,
    pad: u32,
    k: u32,        // cin*kh*kw (columns of W)
    n: u32,        // batch*ho*wo (columns of C)
    m_tiles: u32,  // workgroup tiles along cout (ceil(Cout / BM))
#ifdef ADAPTER
    @align(16) ad: AdapterParams,  // word offsets into `ad` (common/adapter.wgsl), at word 12
#endif
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (B, Cin, H, W)
#ifdef W_F32
@group(0) @binding(2) var<storage, read> w: array<f32>;          // (Cout, Cin*kh*kw)
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;          // (Cout, Cin*kh*kw) packed
#endif
#ifdef W_QUANT
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;   // (Cout*ceil(K/32)) f16 pairs
#endif
#ifdef BIAS
@group(0) @binding(4) var<storage, read> bias: array<f32>;       // (Cout)
#endif
@group(0) @binding(5) var<storage, read_write> y: array<f32>;    // (B, Cout, Ho, Wo)
#ifdef ADAPTER
@group(0) @binding(6) var<storage, read> lr_t: array<f32>;       // (B, R, Ho, Wo)
@group(0) @binding(7) var<storage, read> ad: array<u32>;         // packed adapter data
#endif

#include "common/weights.wgsl"
#include "common/gemm.wgsl"
#ifdef ADAPTER
#include "common/adapter.wgsl"
#endif

// When WG is a multiple of TN, every invocation gathers the same pixel quad in every slice, so
// it is decoded once.
const QUAD_FIXED: bool = (WG % TN) == 0u;

// Four consecutive output pixels n .. n+3 located in the input: `base` is the element offset
// of the pixel's input image, (iy0, ix0) the top-left of its window. Pixels past N get a
// window far outside the image, so every tap reads as padding.
struct Quad {
    base: vec4<u32>,
    iy0: vec4<i32>,
    ix0: vec4<i32>,
}

fn quad_at(n: u32) -> Quad {
    let pix = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    let howo = p.ho * p.wo;
    let q = pix % howo;
    let oy = q / p.wo;
    let ox = q - oy * p.wo;
    let iy0 = vec4<i32>(oy * p.stride) - i32(p.pad);
    let ix0 = vec4<i32>(ox * p.stride) - i32(p.pad);
    let outside = vec4<i32>(-0x40000000);
    let ok = pix < vec4<u32>(p.n);
    return Quad((pix / howo) * (p.cin * p.h * p.w), select(outside, iy0, ok), ix0);
}

// Input values of reduction index k for the four pixels of `qd` (0 in the padding, past K).
fn gather4(qd: Quad, k: u32) -> vec4<f32> {
    if (k >= p.k) {
        return vec4<f32>(0.0);
    }
    let ci = k / (KH * KW);
    let r = k - ci * (KH * KW);
    let ky = r / KW;
    let kx = r - ky * KW;
    let iy = qd.iy0 + i32(ky);
    let ix = qd.ix0 + i32(kx);
    let ok = (vec4<u32>(iy) < vec4<u32>(p.h)) & (vec4<u32>(ix) < vec4<u32>(p.w));
    // Taps in the padding read element 0 (always in bounds) and are then zeroed.
    let e = select(vec4<u32>(0u), qd.base + ci * (p.h * p.w) + vec4<u32>(iy) * p.w + vec4<u32>(ix), ok);
    return select(vec4<f32>(0.0), vec4<f32>(x[e.x], x[e.y], x[e.z], x[e.w]), ok);
}

#ifdef ADAPTER
// Low-rank activations of column j for pixels n .. n+3 (0 past N or R).
fn lowrank_pixels4(n: u32, j: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (j >= p.ad.rank) {
        return v;
    }
    let howo = p.ho * p.wo;
    for (var q = 0u; q < 4u; q++) {
        let pix = n + q;
        if (pix < p.n) {
            v[q] = lr_t[(pix / howo) * (p.ad.rank * howo) + j * howo + pix % howo];
        }
    }
    return v;
}
#endif

// Writes acc (+ bias) to channel co, pixels n .. n+3 (offsets `offs` within channel 0),
// skipping channels past Cout and pixels past N.
fn store4(co: u32, n: u32, offs: vec4<u32>, acc: vec4<f32>) {
    if (co >= p.cout) {
        return;
    }
    var v = acc;
#ifdef BIAS
    v += bias[co];
#endif
#ifdef ADAPTER
    v += ad_bias1(co);
#endif
    let e = offs + co * (p.ho * p.wo);
    for (var j = 0u; j < 4u; j++) {
        if (n + j < p.n) {
            y[e[j]] = v[j];
        }
    }
}

// Offsets in y of channel 0 for pixels n .. n+3.
fn out4(n: u32) -> vec4<u32> {
    let howo = p.ho * p.wo;
    let pix = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    return (pix / howo) * (p.cout * howo) + pix % howo;
}

@compute @workgroup_size(WG)
fn conv2d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * nwg.x;
    let m0 = (tile % p.m_tiles) * BM;
    let n0 = (tile / p.m_tiles) * BN;
    if (n0 >= p.n) {
        return;
    }
    let tx = gemm_tx(lid); // pixels n0 + 8·tx ..
    let ty = gemm_ty(lid); // channels m0 + 8·ty ..
    let my_quad = quad_at(n0 + 4u * (lid % TN));

    // acc[2i + h]: channel 8·ty + i, pixels 8·tx + 4h .. +3 (common/gemm.wgsl).
    var acc = array<vec4<f32>, 16>();

    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        // Stage W (BM channels × KT), dequantizing; zero past Cout or K.
        for (var i = lid; i < BM * KC; i += WG) {
            let mm = i / KC;
            let kk = (i % KC) * 4u;
            var v = vec4<f32>(0.0);
            if (m0 + mm < p.cout) {
                v = w_at4(m0 + mm, k0 + kk, p.k);
#ifdef ADAPTER_W
                v = adapt_w4_row(m0 + mm, k0 + kk, p.k, v);
#endif
            }
            stage_a_k4(mm, kk, v);
        }
        // Stage X (KT × BN quads), gathered from the image.
        for (var i = lid; i < KT * TN; i += WG) {
            var qd = my_quad;
            if (!QUAD_FIXED) {
                qd = quad_at(n0 + 4u * (i % TN));
            }
            stage_b_n4(i / TN, i % TN, gather4(qd, k0 + i / TN));
        }
        workgroupBarrier();
        gemm_slice(&acc, tx, ty);
        workgroupBarrier();
    }
#ifdef ADAPTER
    // The low-rank part: R more reduction steps, A = up · col_scale (Cout, R), B = lr_t.
    for (var j0 = 0u; j0 < p.ad.rank; j0 += KT) {
        for (var i = lid; i < BM * KC; i += WG) {
            let mm = i / KC;
            let kk = (i % KC) * 4u;
            stage_a_k4(mm, kk, lowrank_up4(m0 + mm, j0 + kk, p.cout));
        }
        for (var i = lid; i < KT * TN; i += WG) {
            stage_b_n4(i / TN, i % TN, lowrank_pixels4(n0 + 4u * (i % TN), j0 + i / TN));
        }
        workgroupBarrier();
        gemm_slice_n(&acc, tx, ty, min(KT, p.ad.rank - j0));
        workgroupBarrier();
    }
#endif

    let co = m0 + ty * 8u;
    let n = n0 + tx * 8u;
    let out0 = out4(n);
    let out1 = out4(n + 4u);
    store4(co, n, out0, acc[0]);
    store4(co, n + 4u, out1, acc[1]);
    store4(co + 1u, n, out0, acc[2]);
    store4(co + 1u, n + 4u, out1, acc[3]);
    store4(co + 2u, n, out0, acc[4]);
    store4(co + 2u, n + 4u, out1, acc[5]);
    store4(co + 3u, n, out0, acc[6]);
    store4(co + 3u, n + 4u, out1, acc[7]);
    store4(co + 4u, n, out0, acc[8]);
    store4(co + 4u, n + 4u, out1, acc[9]);
    store4(co + 5u, n, out0, acc[10]);
    store4(co + 5u, n + 4u, out1, acc[11]);
    store4(co + 6u, n, out0, acc[12]);
    store4(co + 6u, n + 4u, out1, acc[13]);
    store4(co + 7u, n, out0, acc[14]);
    store4(co + 7u, n + 4u, out1, acc[15]);
}
