// The optimizer step and the fixed-order reductions of training (ops::grad::optim).
//   sum_partials: out[i] = Σ_c part[c·n + i], c = 0, 1, .. count-1 in that order (the chunks of
//                 a split reduction, e.g. a weight gradient summed over pixel ranges).
//   sq_partials:  partials[count + g] = Σ x[i]² over the WG·SQ_PER_THREAD elements of
//                 workgroup g (one gradient tensor per dispatch; `count` is where its partials
//                 start).
//   norm_finish:  norm[0] = sqrt(Σ partials[0 .. n]) in one workgroup.
//   clip_scale:   grad[i] *= min(max_norm / (norm[0] + 1e-6), 1)
//                 (torch.nn.utils.clip_grad_norm_).
//   adamw:        one torch.optim.AdamW step (decoupled weight decay, bias correction, eps
//                 outside the square root) on param, m, v in place; with CLIP the gradient is
//                 first scaled as clip_scale does.
// Every sum runs in an order fixed by the shapes alone (each invocation a strided sequential
// sum, then a tree over workgroup memory), so a run repeats bit for bit; no atomics.

struct Params {
    n: u32,               // elements (norm_finish: partial sums)
    count: u32,           // sum_partials: partial arrays; sq_partials: first partial's index
    _pad0: u32,
    _pad1: u32,
    decay: f32,           // adamw: 1 − lr·weight_decay
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,       // adamw: lr / (1 − beta1^step)
    bc2_sqrt: f32,        // adamw: sqrt(1 − beta2^step)
    eps: f32,
    max_norm: f32,        // clip_scale, adamw with CLIP
}

const WG: u32 = 256u;
// Elements each sq_partials invocation sums (a workgroup covers WG·SQ_PER_THREAD).
const SQ_PER_THREAD: u32 = 8u;
// The epsilon clip_grad_norm_ adds to the norm.
const CLIP_EPS: f32 = 1e-6;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;            // (count, n)
@group(0) @binding(2) var<storage, read_write> out: array<f32>;       // (n)
@group(0) @binding(3) var<storage, read> x: array<f32>;               // (n)
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;  // (all partial sums)
@group(0) @binding(5) var<storage, read_write> norm: array<f32>;      // (1)
@group(0) @binding(6) var<storage, read_write> grad: array<f32>;      // (n)
@group(0) @binding(7) var<storage, read_write> param: array<f32>;     // (n)
@group(0) @binding(8) var<storage, read_write> m: array<f32>;         // (n) first moment
@group(0) @binding(9) var<storage, read_write> v: array<f32>;         // (n) second moment

var<workgroup> red: array<f32, WG>;

fn linear_id(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

// Sums red[0 .. WG] into red[0]: halves pairwise, always in the same order.
fn tree_sum(lid: u32) {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn sum_partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var s = 0.0;
    for (var c = 0u; c < p.count; c++) {
        s += part[c * p.n + i];
    }
    out[i] = s;
}

@compute @workgroup_size(WG)
fn sq_partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let g = wg.x + wg.y * nwg.x;
    let start = g * WG * SQ_PER_THREAD;
    var s = 0.0;
    for (var j = 0u; j < SQ_PER_THREAD; j++) {
        let i = start + j * WG + lid;
        if (i < p.n) {
            s += x[i] * x[i];
        }
    }
    red[lid] = s;
    tree_sum(lid);
    // Whole workgroups past the end (2-D grids round up) write nothing.
    if (lid == 0u && start < p.n) {
        partials[p.count + g] = red[0];
    }
}

@compute @workgroup_size(WG)
fn norm_finish(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += partials[i];
    }
    red[lid] = s;
    tree_sum(lid);
    if (lid == 0u) {
        norm[0] = sqrt(red[0]);
    }
}

// The factor clip_grad_norm_ multiplies gradients by.
fn clip_coef() -> f32 {
    return min(p.max_norm / (norm[0] + CLIP_EPS), 1.0);
}

@compute @workgroup_size(WG)
fn clip_scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, nwg, lid);
    if (i >= p.n) {
        return;
    }
    grad[i] *= clip_coef();
}

@compute @workgroup_size(WG)
fn adamw(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var g = grad[i];
#ifdef CLIP
    g *= clip_coef();
#endif
    // Decoupled weight decay: param.mul_(1 − lr·wd).
    var w = param[i] * p.decay;
    // exp_avg.lerp_(grad, 1 − beta1), with torch's two-sided lerp formula.
    let mi = m[i];
    let wt = p.one_minus_beta1;
    let m_new = select(g - (g - mi) * (1.0 - wt), mi + wt * (g - mi), wt < 0.5);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value = 1 − beta2).
    let v_new = v[i] * p.beta2 + p.one_minus_beta2 * g * g;
    // denom = sqrt(v) / sqrt(1 − beta2^t) + eps; param.addcdiv_(m, denom, value = −step_size).
    let denom = sqrt(v_new) / p.bc2_sqrt + p.eps;
    w += -p.step_size * (m_new / denom);
    m[i] = m_new;
    v[i] = v_new;
    param[i] = w;
}
