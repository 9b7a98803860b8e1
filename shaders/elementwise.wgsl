// Elementwise ops on f32 activations.
//   unary:  y[i] = f(a[i])                      (op: 0 copy, 1 scale by alpha, 2 silu,
//                                                 3 gelu (erf), 4 gelu (tanh), 5 quick_gelu,
//                                                 6 add alpha)
//   binary: y[i] = a[i] (op) b[(i / inner) % m]  (op: 0 add, 1 mul, 2 sub, 3 a + alpha*b)
// `b` broadcasts: one value covers `inner` consecutive elements of `a`, and the pattern repeats
// every `m` values (a bias [C] over [M, C]: inner 1, m C; a [B, C] embedding over
// [B, C, H, W]: inner H·W, m B·C).

struct Params {
    n: u32,       // elements of a and y
    inner: u32,   // run length of one b value
    m: u32,       // elements of b
    op: u32,
    alpha: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;        // (n)
@group(0) @binding(2) var<storage, read> b: array<f32>;        // (m)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // (n)

const WG: u32 = 256u;

// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit).
fn erf_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, x >= 0.0);
}

fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * (1.0 + erf_(x * 0.70710678118654752));
}

fn gelu_tanh(x: f32) -> f32 {
    // tanh written with exp of a non-positive argument so large |u| cannot overflow.
    let u = 0.7978845608028654 * (x + 0.044715 * x * x * x);
    let e = exp(-2.0 * abs(u));
    let th = sign(u) * (1.0 - e) / (1.0 + e);
    return 0.5 * x * (1.0 + th);
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
fn unary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    var r: f32;
    switch p.op {
        case 0u: { r = x; }
        case 1u: { r = x * p.alpha; }
        case 2u: { r = x * sigmoid(x); }
        case 3u: { r = gelu_erf(x); }
        case 4u: { r = gelu_tanh(x); }
        case 5u: { r = x * sigmoid(1.702 * x); }
        default: { r = x + p.alpha; }
    }
    y[i] = r;
}

@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let x = a[i];
    let v = b[(i / p.inner) % p.m];
    var r: f32;
    switch p.op {
        case 0u: { r = x + v; }
        case 1u: { r = x * v; }
        case 2u: { r = x - v; }
        default: { r = x + p.alpha * v; }
    }
    y[i] = r;
}

// geglu: y[r, j] = a[r, j] · gelu_erf(a[r, D + j]) for a: (rows, 2D), y: (rows, D); D = p.inner,
// p.n = rows · D (diffusers' GEGLU: `hidden, gate = x.chunk(2, -1); hidden * gelu(gate)`).
@compute @workgroup_size(WG)
fn geglu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i >= p.n) { return; }
    let d = p.inner;
    let src = (i / d) * 2u * d + i % d;
    y[i] = a[src] * gelu_erf(a[src + d]);
}
