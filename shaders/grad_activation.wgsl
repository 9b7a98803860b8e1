// Backward of the activations and of the nearest 2x upsample, and in-place gradient
// accumulation. One invocation per output element; nothing is reduced across invocations.
//   silu_grad:       dx[i] = dy[i] · σ(x)·(1 + x·(1 − σ(x)))
//   gelu_grad:       dx[i] = dy[i] · (Φ(x) + x·φ(x)), the exact (erf) GELU of elementwise.wgsl:
//                    Φ(x) = (1 + erf(x/√2)) / 2, φ(x) = exp(−x²/2) / √(2π)
//   quick_gelu_grad: dx[i] = dy[i] · (s + 1.702·x·s·(1 − s)), s = σ(1.702·x), the gradient of
//                    CLIP's x·σ(1.702·x)
//   geglu_grad:      x (rows, 2D) = [hidden | gate], dy (rows, D); per (r, j):
//                    dx[r, j] = dy[r, j] · gelu(gate), dx[r, D + j] = dy[r, j] · hidden · gelu'(gate)
//   upsample2x_grad: dx[bc, y, x] = the sum of the 2×2 block dy[bc, 2y .. 2y+1, 2x .. 2x+1],
//                    as (top-left + top-right) + (bottom-left + bottom-right)
//   accumulate:      acc[i] += alpha · g[i]

struct Params {
    n: u32,       // invocations: elements of dx (geglu_grad: of dy; accumulate: of acc)
    d: u32,       // geglu_grad: D; upsample2x_grad: W of dx
    alpha: f32,   // accumulate
}

@group(0) @binding(0) var<uniform> p: Params;
// silu_grad, gelu_grad, quick_gelu_grad: x, dy, dx (n). geglu_grad: x, dx (rows, 2D), dy (rows, D).
// upsample2x_grad: dy (B·C, 2H, 2W), dx (B·C, H, W). accumulate: dy is g (n), dx is acc (n).
@group(0) @binding(1) var<storage, read> x: array<f32>;         // (n) / (rows, 2D)
@group(0) @binding(2) var<storage, read> dy: array<f32>;        // (n) / (rows, D) / (B·C, 2H, 2W)
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;  // (n) / (rows, 2D) / (B·C, H, W)

const WG: u32 = 256u;

// erf with |error| < 1.2e-7: the same fit as elementwise.wgsl, so the gradient belongs to the
// function the forward computes.
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, x >= 0.0);
}

// (gelu(x), gelu'(x)) of the exact GELU.
fn gelu_and_grad(x: f32) -> vec2<f32> {
    let cdf = 0.5 * (1.0 + erf_(x * 0.70710678118654752));
    let pdf = 0.39894228040143268 * exp(-0.5 * x * x);
    return vec2<f32>(x * cdf, cdf + x * pdf);
}

fn sigmoid(x: f32) -> f32 {
    // Stable for large |x|.
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn silu_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let v = x[i];
    let s = sigmoid(v);
    dx[i] = dy[i] * s * (1.0 + v * (1.0 - s));
}

@compute @workgroup_size(WG)
fn gelu_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    dx[i] = dy[i] * gelu_and_grad(x[i]).y;
}

@compute @workgroup_size(WG)
fn quick_gelu_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let v = x[i];
    let s = sigmoid(1.702 * v);
    dx[i] = dy[i] * (s + 1.702 * v * s * (1.0 - s));
}

@compute @workgroup_size(WG)
fn geglu_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let src = (i / p.d) * 2u * p.d + i % p.d;
    let h = x[src];
    let gg = gelu_and_grad(x[src + p.d]);
    let g = dy[i];
    dx[src] = g * gg.x;
    dx[src + p.d] = g * h * gg.y;
}

@compute @workgroup_size(WG)
fn upsample2x_grad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let w = p.d;
    let ox = i % w;
    let row = i / w;                          // bc · H + y
    let top = (2u * row) * (2u * w) + 2u * ox; // dy[bc, 2y, 2x]: (bc · 2H + 2y) · 2W + 2x
    let bottom = top + 2u * w;
    dx[i] = (dy[top] + dy[top + 1u]) + (dy[bottom] + dy[bottom + 1u]);
}

@compute @workgroup_size(WG)
fn accumulate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    dx[i] += p.alpha * dy[i];
}
