// Backward of a 2-D convolution (PyTorch nn.Conv2d: zero padding, no dilation, one group)
//   y[b, co, oy, ox] = Σ_{ci, ky, kx} w[co, ci, ky, kx] · x[b, ci, oy·s + ky − pad, ox·s + kx − pad]
// as two implicit GEMMs on the register-blocked core of common/gemm.wgsl (an 8×8 block of C
// per invocation, BM × BN per workgroup, the reduction in slices of KT). T = KH·KW taps.
//
// conv2d_input_grad: the transposed convolution, gathered (every dx element is written once by
// the invocation that sums it; no atomics):
//   dx[b, ci, iy, ix] = Σ_{co, ky, kx} w[co, ci, ky, kx] · dy[b, co, oy, ox]
//   over the taps with oy·s = iy + pad − ky, ox·s = ix + pad − kx inside dy.
//   C[ci, n] over input pixels n = (b, iy, ix); reduction k = (co, ky, kx);
//   A[ci, k] = W[co, ci·T + tap], the frozen weight in any storage type (common/weights.wgsl),
//   read across its rows (one value per (co, tap), or four consecutive ci when T = 1);
//   B[k, n] = dy gathered at the tap's output pixel (0 where none lies there).
//   LOWRANK continues the reduction over the low-rank path of a LoCon adapter:
//   k = (r, ky, kx), A[ci, k] = down[r, ci·T + tap] (f32), B = lr_g [B, R, Ho, Wo], the
//   gradient at the down convolution's output (already scaled).
//
// conv2d_weight_grad: dW[co, ci, ky, kx] = alpha · Σ_{b, oy, ox} dy[b, co, oy, ox] · x[b, ci, iy, ix]
//   (iy = oy·s + ky − pad, ix = ox·s + kx − pad; 0 in the padding). C[co, k] over k = (ci, ky,
//   kx); the reduction over output pixels is split into `chunks` ranges of `chunk` pixels, each
//   summed by its own workgroups into wpart[c] (the caller adds them up in chunk order).
//   A[co, n] = dy, four consecutive pixels of one channel; B[n, k] = x gathered im2col-style.
//
// Valued defines: BM, BN (multiples of 8, (BM/8)·(BN/8) <= 256), KT (multiple of 4), KH, KW.
// Flags: one weight type (W_F32 | W_F16 | W_Q8_0+W_QUANT | W_Q4_0+W_QUANT; the weight gradient
// reads no weight and uses W_F32); LOWRANK (conv2d_input_grad).

struct Params {
    cin: u32,      // input channels
    h: u32,        // input height
    w: u32,        // input width
    cout: u32,     // output channels (of dy)
    ho: u32,       // output height
    wo: u32,       // output width
    stride: u32,
    pad: u32,
    batch: u32,
    m_tiles: u32,  // workgroup tiles along C's rows (ci | co)
    n_tiles: u32,  // workgroup tiles along C's columns (input pixels | ci·T + tap)
    rank: u32,     // LOWRANK: R, channels of lr_g and rows of down
    chunk: u32,    // weight grad: output pixels per chunk
    chunks: u32,   // weight grad: chunks
    alpha: f32,    // weight grad: scale of the result
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;           // (B, Cout, Ho, Wo)
#ifdef W_F32
@group(0) @binding(2) var<storage, read> w: array<f32>;            // (Cout, Cin*KH*KW)
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;            // (Cout, Cin*KH*KW) packed
#endif
#ifdef W_QUANT
@group(0) @binding(3) var<storage, read> w_scales: array<u32>;     // (Cout*ceil(Cin*KH*KW/32)) f16 pairs
#endif
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;     // (B, Cin, H, W)
#ifdef LOWRANK
@group(0) @binding(5) var<storage, read> down: array<f32>;         // (R, Cin*KH*KW)
@group(0) @binding(6) var<storage, read> lr_g: array<f32>;         // (B, R, Ho, Wo)
#endif
@group(0) @binding(7) var<storage, read> x: array<f32>;            // (B, Cin, H, W)
@group(0) @binding(8) var<storage, read_write> wpart: array<f32>;  // (chunks, Cout, Cin*KH*KW)

#include "common/weights.wgsl"
#include "common/gemm.wgsl"

const T = KH * KW;
// Marks a pixel past the end: its window lies far outside every image.
const OUTSIDE = -0x40000000;

// Stores A (rows 4·mq .. 4·mq+3, reduction index k) of the slice.
fn stage_a_m4(k: u32, mq: u32, v: vec4<f32>) {
    a_tile[k * TM + mq] = v;
}

// ---- conv2d_input_grad ----------------------------------------------------------------

// Four consecutive input pixels n .. n+3: batch index and (iy + pad, ix + pad).
struct InQuad {
    b: vec4<u32>,
    iy: vec4<i32>,
    ix: vec4<i32>,
}

fn in_quad(n: u32) -> InQuad {
    let pix = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    let hw = p.h * p.w;
    let q = pix % hw;
    let iy = q / p.w;
    let ix = q - iy * p.w;
    let ok = pix < vec4<u32>(p.batch * hw);
    let iyp = select(vec4<i32>(OUTSIDE), vec4<i32>(iy + p.pad), ok);
    return InQuad(pix / hw, iyp, vec4<i32>(ix + p.pad));
}

// Elements of a (B, chans, Ho, Wo) tensor that tap `tap` of channel c reaches from the quad's
// pixels, and which exist (others read element 0 and are then zeroed).
struct Taps {
    e: vec4<u32>,
    ok: vec4<bool>,
}

fn taps(qd: InQuad, chans: u32, c: u32, tap: u32) -> Taps {
    let ky = tap / KW;
    let kx = tap - ky * KW;
    let s = i32(p.stride);
    let oyn = qd.iy - i32(ky);
    let oxn = qd.ix - i32(kx);
    let oy = oyn / s;
    let ox = oxn / s;
    let ok = (oyn >= vec4<i32>(0)) & (oxn >= vec4<i32>(0)) & (oy * s == oyn) & (ox * s == oxn)
        & (vec4<u32>(oy) < vec4<u32>(p.ho)) & (vec4<u32>(ox) < vec4<u32>(p.wo));
    let e = ((qd.b * chans + c) * p.ho + vec4<u32>(oy)) * p.wo + vec4<u32>(ox);
    return Taps(select(vec4<u32>(0u), e, ok), ok);
}

fn gather_dy4(qd: InQuad, k: u32) -> vec4<f32> {
    if (k >= p.cout * T) {
        return vec4<f32>(0.0);
    }
    let co = k / T;
    let t = taps(qd, p.cout, co, k - co * T);
    return select(vec4<f32>(0.0), vec4<f32>(dy[t.e.x], dy[t.e.y], dy[t.e.z], dy[t.e.w]), t.ok);
}

// W[co, (ci + j)·T + tap] for j = 0..3 (0 past Cin or past the reduction).
fn weight_cin4(k: u32, ci: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k >= p.cout * T) {
        return v;
    }
    let co = k / T;
    let tap = k - co * T;
    if (T == 1u) {
        // ci is a multiple of 4: one aligned read of a row.
        return w_at4(co, ci, p.cin);
    }
    for (var j = 0u; j < 4u; j++) {
        if (ci + j < p.cin) {
            v[j] = w_at(co, (ci + j) * T + tap, p.cin * T);
        }
    }
    return v;
}

#ifdef LOWRANK
fn gather_g4(qd: InQuad, k: u32) -> vec4<f32> {
    if (k >= p.rank * T) {
        return vec4<f32>(0.0);
    }
    let r = k / T;
    let t = taps(qd, p.rank, r, k - r * T);
    return select(vec4<f32>(0.0), vec4<f32>(lr_g[t.e.x], lr_g[t.e.y], lr_g[t.e.z], lr_g[t.e.w]), t.ok);
}

// down[r, (ci + j)·T + tap] for j = 0..3.
fn down_cin4(k: u32, ci: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k >= p.rank * T) {
        return v;
    }
    let r = k / T;
    let tap = k - r * T;
    for (var j = 0u; j < 4u; j++) {
        if (ci + j < p.cin) {
            v[j] = down[(r * p.cin + ci + j) * T + tap];
        }
    }
    return v;
}
#endif

// Writes acc to dx channel ci, input pixels n .. n+3.
fn store_dx4(ci: u32, n: u32, acc: vec4<f32>) {
    if (ci >= p.cin) {
        return;
    }
    let hw = p.h * p.w;
    for (var j = 0u; j < 4u; j++) {
        let pix = n + j;
        if (pix < p.batch * hw) {
            dx[((pix / hw) * p.cin + ci) * hw + pix % hw] = acc[j];
        }
    }
}

@compute @workgroup_size(WG)
fn conv2d_input_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * nwg.x;
    if (tile >= p.m_tiles * p.n_tiles) {
        return;
    }
    let m0 = (tile % p.m_tiles) * BM;  // input channels
    let n0 = (tile / p.m_tiles) * BN;  // input pixels
    let tx = gemm_tx(lid);
    let ty = gemm_ty(lid);
    // When WG is a multiple of TN every invocation stages the same pixel quad in every slice.
    let fixed = (WG % TN) == 0u;
    let my_quad = in_quad(n0 + 4u * (lid % TN));
    var acc = array<vec4<f32>, 16>();

    for (var k0 = 0u; k0 < p.cout * T; k0 += KT) {
        for (var i = lid; i < KT * TM; i += WG) {
            let kk = i / TM;
            let mq = i % TM;
            stage_a_m4(kk, mq, weight_cin4(k0 + kk, m0 + 4u * mq));
        }
        for (var i = lid; i < KT * TN; i += WG) {
            var qd = my_quad;
            if (!fixed) {
                qd = in_quad(n0 + 4u * (i % TN));
            }
            stage_b_n4(i / TN, i % TN, gather_dy4(qd, k0 + i / TN));
        }
        workgroupBarrier();
        gemm_slice(&acc, tx, ty);
        workgroupBarrier();
    }
#ifdef LOWRANK
    for (var k0 = 0u; k0 < p.rank * T; k0 += KT) {
        for (var i = lid; i < KT * TM; i += WG) {
            let kk = i / TM;
            let mq = i % TM;
            stage_a_m4(kk, mq, down_cin4(k0 + kk, m0 + 4u * mq));
        }
        for (var i = lid; i < KT * TN; i += WG) {
            var qd = my_quad;
            if (!fixed) {
                qd = in_quad(n0 + 4u * (i % TN));
            }
            stage_b_n4(i / TN, i % TN, gather_g4(qd, k0 + i / TN));
        }
        workgroupBarrier();
        gemm_slice(&acc, tx, ty);
        workgroupBarrier();
    }
#endif

    let ci = m0 + ty * 8u;
    let n = n0 + tx * 8u;
    // acc[2i + h]: channel ci + i, pixels n + 4h .. +3 (constant indices keep acc in registers).
    store_dx4(ci, n, acc[0]);
    store_dx4(ci, n + 4u, acc[1]);
    store_dx4(ci + 1u, n, acc[2]);
    store_dx4(ci + 1u, n + 4u, acc[3]);
    store_dx4(ci + 2u, n, acc[4]);
    store_dx4(ci + 2u, n + 4u, acc[5]);
    store_dx4(ci + 3u, n, acc[6]);
    store_dx4(ci + 3u, n + 4u, acc[7]);
    store_dx4(ci + 4u, n, acc[8]);
    store_dx4(ci + 4u, n + 4u, acc[9]);
    store_dx4(ci + 5u, n, acc[10]);
    store_dx4(ci + 5u, n + 4u, acc[11]);
    store_dx4(ci + 6u, n, acc[12]);
    store_dx4(ci + 6u, n + 4u, acc[13]);
    store_dx4(ci + 7u, n, acc[14]);
    store_dx4(ci + 7u, n + 4u, acc[15]);
}

// ---- conv2d_weight_grad ---------------------------------------------------------------

// Four consecutive output pixels n .. n+3 located in the input (as conv2d.wgsl's quad_at):
// `base` the element offset of the pixel's image in x, (iy0, ix0) its window's top-left;
// pixels at or past `end` get a window far outside the image.
struct OutQuad {
    base: vec4<u32>,
    iy0: vec4<i32>,
    ix0: vec4<i32>,
}

fn out_quad(n: u32, end: u32) -> OutQuad {
    let pix = vec4<u32>(n) + vec4<u32>(0u, 1u, 2u, 3u);
    let howo = p.ho * p.wo;
    let q = pix % howo;
    let oy = q / p.wo;
    let ox = q - oy * p.wo;
    let iy0 = vec4<i32>(oy * p.stride) - i32(p.pad);
    let ix0 = vec4<i32>(ox * p.stride) - i32(p.pad);
    let ok = pix < vec4<u32>(end);
    return OutQuad((pix / howo) * (p.cin * p.h * p.w), select(vec4<i32>(OUTSIDE), iy0, ok), ix0);
}

// x at column k = (ci, ky, kx) for the quad's four pixels (0 in the padding, past K).
fn gather_x4(qd: OutQuad, k: u32) -> vec4<f32> {
    if (k >= p.cin * T) {
        return vec4<f32>(0.0);
    }
    let ci = k / T;
    let r = k - ci * T;
    let ky = r / KW;
    let kx = r - ky * KW;
    let iy = qd.iy0 + i32(ky);
    let ix = qd.ix0 + i32(kx);
    let ok = (vec4<u32>(iy) < vec4<u32>(p.h)) & (vec4<u32>(ix) < vec4<u32>(p.w));
    let e = select(vec4<u32>(0u), qd.base + ci * (p.h * p.w) + vec4<u32>(iy) * p.w + vec4<u32>(ix), ok);
    return select(vec4<f32>(0.0), vec4<f32>(x[e.x], x[e.y], x[e.z], x[e.w]), ok);
}

// dy channel co at output pixels n .. n+3 (0 past Cout or at/past `end`).
fn dy_pixels4(co: u32, n: u32, end: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (co >= p.cout) {
        return v;
    }
    let howo = p.ho * p.wo;
    for (var j = 0u; j < 4u; j++) {
        let pix = n + j;
        if (pix < end) {
            v[j] = dy[((pix / howo) * p.cout + co) * howo + pix % howo];
        }
    }
    return v;
}

// Writes alpha·acc to the chunk's partial gradient, row co, columns k .. k+3.
fn store_w4(c: u32, co: u32, k: u32, acc: vec4<f32>) {
    let kn = p.cin * T;
    if (co >= p.cout) {
        return;
    }
    let e = (c * p.cout + co) * kn + k;
    for (var j = 0u; j < 4u; j++) {
        if (k + j < kn) {
            wpart[e + j] = p.alpha * acc[j];
        }
    }
}

@compute @workgroup_size(WG)
fn conv2d_weight_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let tile = wg.x + wg.y * nwg.x;
    let per_chunk = p.m_tiles * p.n_tiles;
    if (tile >= per_chunk * p.chunks) {
        return;
    }
    let c = tile / per_chunk;
    let m0 = (tile % p.m_tiles) * BM;                // output channels
    let n0 = ((tile % per_chunk) / p.m_tiles) * BN;  // columns (ci, ky, kx)
    let start = c * p.chunk;
    let end = min(start + p.chunk, p.batch * p.ho * p.wo);
    let tx = gemm_tx(lid);
    let ty = gemm_ty(lid);
    // When WG is a multiple of KC every invocation stages the same pixel quad of each slice.
    let fixed = (WG % KC) == 0u;
    var acc = array<vec4<f32>, 16>();

    for (var s0 = start; s0 < end; s0 += KT) {
        for (var i = lid; i < BM * KC; i += WG) {
            let mm = i / KC;
            let kk = (i % KC) * 4u;
            stage_a_k4(mm, kk, dy_pixels4(m0 + mm, s0 + kk, end));
        }
        let my_quad = out_quad(s0 + 4u * (lid % KC), end);
        for (var i = lid; i < BN * KC; i += WG) {
            let col = i / KC;
            let kk = (i % KC) * 4u;
            var qd = my_quad;
            if (!fixed) {
                qd = out_quad(s0 + kk, end);
            }
            stage_b_k4(col, kk, gather_x4(qd, n0 + col));
        }
        workgroupBarrier();
        gemm_slice(&acc, tx, ty);
        workgroupBarrier();
    }

    let co = m0 + ty * 8u;
    let k = n0 + tx * 8u;
    // acc[2i + h]: channel co + i, columns k + 4h .. +3.
    store_w4(c, co, k, acc[0]);
    store_w4(c, co, k + 4u, acc[1]);
    store_w4(c, co + 1u, k, acc[2]);
    store_w4(c, co + 1u, k + 4u, acc[3]);
    store_w4(c, co + 2u, k, acc[4]);
    store_w4(c, co + 2u, k + 4u, acc[5]);
    store_w4(c, co + 3u, k, acc[6]);
    store_w4(c, co + 3u, k + 4u, acc[7]);
    store_w4(c, co + 4u, k, acc[8]);
    store_w4(c, co + 4u, k + 4u, acc[9]);
    store_w4(c, co + 5u, k, acc[10]);
    store_w4(c, co + 5u, k + 4u, acc[11]);
    store_w4(c, co + 6u, k, acc[12]);
    store_w4(c, co + 6u, k + 4u, acc[13]);
    store_w4(c, co + 7u, k, acc[14]);
    store_w4(c, co + 7u, k + 4u, acc[15]);
}
