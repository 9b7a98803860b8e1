//! How many values each adapter algorithm trains for a layer (or a whole UNet) at a rank, and
//! the file size per storage type: the arithmetic behind "LoRA trains 128× fewer values".
//!
//! For a weight `[d, k]` (a convolution `[out, in, kh, kw]` flattened to `d = out`,
//! `k = in·kh·kw`, as kohya and LyCORIS do) and rank r:
//! - full fine-tuning: `d·k`;
//! - LoRA / LoCon: `r·(d + k)` (`lora_down [r, k]`, `lora_up [d, r]`) plus one alpha;
//! - LoHa: `2r·(d + k)` (two such pairs) plus one alpha;
//! - LoKr (LyCORIS defaults: factor −1, no decompose_both, no Tucker): `d = a·b`, `in = c·e`
//!   split by LyCORIS' `factorization` (the two divisors closest to √n), `w1 [a, c]` full,
//!   `w2 [b, e·kh·kw]` low-rank `r·(b + e·kh·kw)` when `r < max(b, e)/2`, else full; plus one alpha;
//! - IA³: one value per output channel (LyCORIS' default, `d`).

use super::{Delta, LayerShape, ModelLayers, Target};
use crate::error::{Error, Result};
use serde::Serialize;

/// Values per algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub full: u64,
    pub lora: u64,
    pub loha: u64,
    pub lokr: u64,
    pub ia3: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.full += o.full;
        self.lora += o.lora;
        self.loha += o.loha;
        self.lokr += o.lokr;
        self.ia3 += o.ia3;
    }

    fn map(&self, f: impl Fn(u64) -> u64) -> Counts {
        Counts { full: f(self.full), lora: f(self.lora), loha: f(self.loha), lokr: f(self.lokr), ia3: f(self.ia3) }
    }
}

/// File bytes of the tensors per storage type (alphas stored like the factors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bytes {
    pub f32: Counts,
    pub f16: Counts,
    pub bf16: Counts,
}

/// Trained values and file sizes of each algorithm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamCounts {
    pub rank: usize,
    /// Layers counted.
    pub layers: usize,
    #[serde(flatten)]
    pub values: Counts,
    /// Alpha scalars (one per layer for LoRA, LoHa and LoKr).
    pub alphas: u64,
    pub bytes: Bytes,
    /// full / lora: how many times fewer values LoRA trains.
    pub lora_ratio: f64,
}

/// LyCORIS `factorization(n, -1)`: `(m, n/m)`, `m ≤ n/m`, the divisor pair closest to √n.
pub fn factorization(dimension: usize) -> (usize, usize) {
    let (mut m, mut n) = (1, dimension.max(1));
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// Values of one layer `[d, k]` (k = in·kh·kw) at rank `r`.
fn layer_counts(out: usize, inp: usize, taps: usize, r: usize) -> Counts {
    let (d, k) = (out as u64, (inp * taps) as u64);
    let r64 = r as u64;
    let (a, b) = factorization(out);
    let (c, e) = factorization(inp);
    let w1 = (a * c) as u64;
    let w2 = if (r as f64) < (b.max(e) as f64) / 2.0 { r64 * (b + e * taps) as u64 } else { (b * e * taps) as u64 };
    Counts { full: d * k, lora: r64 * (d + k), loha: 2 * r64 * (d + k), lokr: w1 + w2, ia3: d }
}

fn finish(values: Counts, layers: usize, rank: usize) -> ParamCounts {
    let alphas = layers as u64;
    let with_alpha = |c: Counts| Counts { lora: c.lora + alphas, loha: c.loha + alphas, lokr: c.lokr + alphas, ..c };
    let stored = with_alpha(values);
    ParamCounts {
        rank,
        layers,
        values,
        alphas,
        bytes: Bytes { f32: stored.map(|v| v * 4), f16: stored.map(|v| v * 2), bf16: stored.map(|v| v * 2) },
        lora_ratio: if values.lora > 0 { values.full as f64 / values.lora as f64 } else { 0.0 },
    }
}

/// Counts for one weight of `shape` (`[d, k]` or `[out, in, kh, kw]`) at rank `r`.
pub fn counts_for_shape(shape: &[usize], rank: usize) -> Result<ParamCounts> {
    let (out, inp, taps) = match *shape {
        [d, k] => (d, k, 1),
        [o, i, kh, kw] => (o, i, kh * kw),
        _ => {
            return Err(Error::Invalid(format!(
                "layer shape {shape:?}: expected [out, in] or [out, in, kh, kw]"
            )))
        }
    };
    if out == 0 || inp == 0 || taps == 0 || rank == 0 {
        return Err(Error::Invalid(format!("layer shape {shape:?} at rank {rank}: every size must be ≥ 1")));
    }
    Ok(finish(layer_counts(out, inp, taps, rank), 1, rank))
}

/// The values an adapter layer's tensors hold (what was trained).
pub fn adapter_values(d: &Delta) -> usize {
    let n = |t: &super::HostTensor| t.numel();
    let f = |x: &super::Factor| match x {
        super::Factor::Full(w) => n(w),
        super::Factor::LowRank { a, b } => n(a) + n(b),
    };
    match d {
        Delta::LowRank { down, up, mid, .. } => n(down) + n(up) + mid.as_ref().map_or(0, n),
        Delta::LoHa { w1a, w1b, w2a, w2b, t1, t2, .. } => {
            n(w1a) + n(w1b) + n(w2a) + n(w2b) + t1.as_ref().map_or(0, n) + t2.as_ref().map_or(0, n)
        }
        Delta::LoKr { w1, w2, t2, .. } => f(w1) + f(w2) + t2.as_ref().map_or(0, n),
        Delta::Full { diff, diff_b } => n(diff) + diff_b.as_ref().map_or(0, n),
        Delta::Ia3 { weight, .. } => n(weight),
        Delta::Norm { weight, bias } => weight.as_ref().map_or(0, n) + bias.as_ref().map_or(0, n),
    }
}

/// Which UNet layers an adapter targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSet {
    /// The attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`): diffusers' LoRA
    /// training scripts' default.
    Attn,
    /// Every linear / 1×1 layer of the transformer blocks (attention, feed-forward, `proj_in`,
    /// `proj_out`): kohya's default LoRA.
    AttnFf,
    /// Plus the ResNet convolutions, their time projections and the down/upsamplers: kohya
    /// LoCon (`conv_dim`).
    AttnFfConv,
    /// Every linear and convolution layer of the UNet (`unet`).
    All,
}

impl TargetSet {
    /// `attn`, `attn+ff`, `attn+ff+conv`, `unet`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "attn" => Ok(TargetSet::Attn),
            "attn+ff" => Ok(TargetSet::AttnFf),
            "attn+ff+conv" => Ok(TargetSet::AttnFfConv),
            "unet" => Ok(TargetSet::All),
            other => Err(Error::Invalid(format!("target `{other}`: expected attn, attn+ff, attn+ff+conv or unet"))),
        }
    }

    /// Whether the UNet module is targeted.
    pub fn includes(self, module: &str) -> bool {
        let attn = (module.contains(".attn1.") || module.contains(".attn2."))
            && ["to_q", "to_k", "to_v", "to_out.0"].iter().any(|s| module.ends_with(&format!(".{s}")));
        let transformer = module.contains(".attentions.")
            && (attn || module.contains(".ff.net.") || module.ends_with(".proj_in") || module.ends_with(".proj_out"));
        let conv = (module.contains(".resnets.")
            && ["conv1", "conv2", "conv_shortcut", "time_emb_proj"].iter().any(|s| module.ends_with(&format!(".{s}"))))
            || module.ends_with("samplers.0.conv");
        match self {
            TargetSet::Attn => attn,
            TargetSet::AttnFf => transformer,
            TargetSet::AttnFfConv => transformer || conv,
            TargetSet::All => true,
        }
    }
}

/// Counts summed over a model's UNet layers in `targets`.
pub fn counts_for_model(model: &ModelLayers, targets: TargetSet, rank: usize) -> Result<ParamCounts> {
    if rank == 0 {
        return Err(Error::Invalid("rank must be ≥ 1".into()));
    }
    let mut total = Counts::default();
    let mut layers = 0;
    for (target, module, info) in model.iter() {
        if target != Target::Unet || !targets.includes(module) {
            continue;
        }
        let (out, inp, taps) = match info.shape {
            LayerShape::Linear { in_features, out_features } => (out_features, in_features, 1),
            LayerShape::Conv { in_channels, out_channels, kernel } => (out_channels, in_channels, kernel * kernel),
            LayerShape::Norm { .. } => continue,
        };
        total.add(&layer_counts(out, inp, taps, rank));
        layers += 1;
    }
    if layers == 0 {
        return Err(Error::Invalid(format!("the model has no UNet layers the target {targets:?} names")));
    }
    Ok(finish(total, layers, rank))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textbook_example() {
        let c = counts_for_shape(&[1024, 1024], 4).unwrap();
        assert_eq!(c.values.full, 1_048_576);
        assert_eq!(c.values.lora, 8_192);
        assert_eq!(c.lora_ratio, 128.0);
        assert_eq!(c.values.loha, 16_384);
        assert_eq!(c.values.ia3, 1024);
        // 1024 = 32·32: w1 [32, 32] full, w2 [32, 32] at rank 4 < 16: 4·64.
        assert_eq!(c.values.lokr, 32 * 32 + 4 * 64);
        assert_eq!(c.bytes.f16.lora, (8_192 + 1) * 2);
        assert_eq!(c.bytes.f32.full, 1_048_576 * 4);
    }

    #[test]
    fn lycoris_factorization_table() {
        // LyCORIS 4.1.3 `factorization(n, -1)` (its docstring's 360 → (8, 45) is not what the
        // code returns).
        let table = [(127, (1, 127)), (128, (8, 16)), (250, (10, 25)), (360, (18, 20)), (512, (16, 32)), (1024, (32, 32))];
        for (n, want) in table.into_iter().chain([(320, (16, 20)), (640, (20, 32)), (1280, (32, 40)), (768, (24, 32))]) {
            assert_eq!(factorization(n), want, "{n}");
        }
    }

    #[test]
    fn convolutions_flatten() {
        let c = counts_for_shape(&[320, 320, 3, 3], 8).unwrap();
        assert_eq!(c.values.full, 320 * 2880);
        assert_eq!(c.values.lora, 8 * (320 + 2880));
        // 320 = 16·20: w1 [16, 16]; rank 8 < 10: w2 8·(20 + 20·9).
        assert_eq!(c.values.lokr, 256 + 8 * (20 + 180));
        assert!(counts_for_shape(&[3], 4).is_err());
        assert!(counts_for_shape(&[4, 4], 0).is_err());
    }

    #[test]
    fn targets() {
        let t = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert!(TargetSet::Attn.includes(t) && TargetSet::AttnFf.includes(t));
        let ff = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj";
        assert!(!TargetSet::Attn.includes(ff) && TargetSet::AttnFf.includes(ff));
        let conv = "up_blocks.1.resnets.2.conv1";
        assert!(!TargetSet::AttnFf.includes(conv) && TargetSet::AttnFfConv.includes(conv));
        assert!(TargetSet::AttnFfConv.includes("down_blocks.0.downsamplers.0.conv"));
        assert!(!TargetSet::AttnFfConv.includes("conv_in") && TargetSet::All.includes("conv_in"));
        assert!(!TargetSet::AttnFfConv.includes("down_blocks.0.attentions.0.norm"));
    }
}
