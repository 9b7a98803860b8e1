// 2-D convolution (PyTorch nn.Conv2d: zero padding, no dilation, one group) as an implicit GEMM:
//   y[b, co, oy, ox] = bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[b, ci, iy, ix]
//   iy = oy*stride + ky - pad, ix = ox*stride + kx - pad (x is zero outside the image).
// GEMM view: C[co, n] = sum_k W[co, k] * X[k, n] over n = (b, oy, ox) and k = (ci, ky, kx).
// W is the [Cout, Cin*kh*kw] weight matrix read through common/weights.wgsl (dequantized while
// the tile is loaded); X is gathered im2col-style from the image while its tile is loaded.
//
// One workgroup computes a BM x BN tile of C (BM = WG_M*TM output channels, BN = WG_N*TN output
// pixels), walking K in steps of BK through two tiles in workgroup memory; each invocation keeps
// a TM x TN block of accumulators (rows ty + i*WG_M, columns tx + j*WG_N).
// Valued defines: WG_M, WG_N, TM, TN, BK, and the kernel size KH, KW (constants, so decoding
// k = (ci, ky, kx) divides by constants). The host guarantees (WG_M*WG_N) % BN == 0 and
// (BK*BN) % (WG_M*WG_N) == 0 (each invocation gathers whole rows of one input-tile column).
// Flags: one weight type (W_F32 | W_F16 | W_Q8_0+W_QUANT | W_Q4_0+W_QUANT); BIAS.

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
    m_tiles: u32,  // workgroup tiles along cout
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

#include "common/weights.wgsl"

const NT: u32 = WG_M * WG_N;  // invocations per workgroup
const BM: u32 = WG_M * TM;    // output channels per tile
const BN: u32 = WG_N * TN;    // output pixels per tile

var<workgroup> wt: array<f32, BK * BM>;  // (BK, BM) weight tile, k-major
var<workgroup> xt: array<f32, BK * BN>;  // (BK, BN) gathered input tile, k-major

@compute @workgroup_size(NT)
fn conv2d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * nwg.x;
    let m0 = (tile % p.m_tiles) * BM;
    let n0 = (tile / p.m_tiles) * BN;
    let tx = lid % WG_N;
    // Constant 0 when WG_M is 1, so the weight-tile reads are visibly uniform (one load
    // broadcast to every lane on SIMD CPU drivers such as lavapipe).
    let ty = select(lid / WG_N, 0u, WG_M == 1u);
    
    let hw = p.h * p.w;
    let howo = p.ho * p.wo;

    // Input loader: this invocation always fills column xn of the input tile (rows
    // xk0 + s*(NT/BN)), so the pixel's position is decoded once.
    let xn = lid % BN;
    let xk0 = lid / BN;
    let pix = n0 + xn;
    let pix_ok = pix < p.n;
    let b = pix / howo;
    let q = pix % howo;
    let iy0 = i32((q / p.wo) * p.stride) - i32(p.pad);
    let ix0 = i32((q % p.wo) * p.stride) - i32(p.pad);
    let xbase = b * p.cin * hw;

    var acc: array<f32, TM * TN>;
    for (var i = 0u; i < TM * TN; i++) {
        acc[i] = 0.0;
    }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Weight tile, dequantized on load; zero past K or Cout.
        for (var e = lid; e < BM * BK; e += NT) {
            let m = e / BK;
            let kc = k0 + e % BK;
            let co = m0 + m;
            var v = 0.0;
            if (co < p.cout && kc < p.k) {
                v = w_at(co, kc, p.k);
            }
            wt[(e % BK) * BM + m] = v;
        }
        // Input tile, gathered from the image; zero in the padding and past K or N.
        for (var s = 0u; s < BK * BN / NT; s++) {
            let kr = xk0 + s * (NT / BN);
            let k = k0 + kr;
            var v = 0.0;
            if (pix_ok && k < p.k) {
                let ci = k / (KH * KW);
                let r = k - ci * (KH * KW);
                let ky = r / KW;
                let iy = iy0 + i32(ky);
                let ix = ix0 + i32(r - ky * KW);
                if (u32(iy) < p.h && u32(ix) < p.w) {
                    v = x[xbase + ci * hw + u32(iy) * p.w + u32(ix)];
                }
            }
            xt[kr * BN + xn] = v;
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, TM>;
            var c: array<f32, TN>;
            for (var i = 0u; i < TM; i++) {
                a[i] = wt[kk * BM + ty + i * WG_M];
            }
            for (var j = 0u; j < TN; j++) {
                c[j] = xt[kk * BN + tx + j * WG_N];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] = fma(a[i], c[j], acc[i * TN + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var j = 0u; j < TN; j++) {
        let n = n0 + tx + j * WG_N;
        if (n >= p.n) {
            continue;
        }
        let ob = (n / howo) * p.cout;
        let oq = n % howo;
        for (var i = 0u; i < TM; i++) {
            let co = m0 + ty + i * WG_M;
            if (co < p.cout) {
                var v = acc[i * TN + j];
#ifdef BIAS
                v += bias[co];
#endif
                y[(ob + co) * howo + oq] = v;
            }
        }
    }
}
