//! Rotary position embeddings as transformers computes them: the inverse frequencies of each
//! `rope_type` (default, linear, dynamic, llama3, yarn, longrope), partial rotary dimensions,
//! the attention factor that yarn and longrope multiply into cos/sin, and the per-token cos/sin
//! rows a forward pass uses (HF's `cat(freqs, freqs)` layout for `rotate_half`).
//!
//! ```
//! use dpo::model::arch::rope::{Rope, RopeScaling};
//! let rope = Rope { theta: 10000.0, rotary_dim: 4, scaling: RopeScaling::Default, max_position_embeddings: 64 };
//! let t = rope.tables(&[0, 1]).unwrap();
//! assert_eq!(t.cos[..4], [1.0; 4]); // position 0 is not rotated
//! assert!((t.sin[4] - 1f32.sin()).abs() < 1e-7); // position 1, the fastest frequency (1.0)
//! ```
use anyhow::{Result, bail};

/// How a `rope_type` rescales the default frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware dynamic scaling. Its frequencies equal the default ones for every sequence up to
    /// `max_position_embeddings` and change only beyond it; dpo refuses longer sequences, so
    /// for training it *is* the default RoPE.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
    /// YaRN: interpolated and extrapolated frequencies blended by a ramp; cos/sin scaled by the
    /// attention factor.
    Yarn {
        factor: f64,
        original_max: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-frequency factors, the long set once a batch's longest sequence
    /// passes `original_max`; cos/sin scaled by the attention factor.
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max: usize,
        factor: Option<f64>,
        attention_factor: Option<f64>,
    },
}

/// One RoPE setting: what `rotary_emb` holds for a layer type.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// The leading dimensions of each head that rotate (`head_dim · partial_rotary_factor`);
    /// the rest pass through.
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
    pub max_position_embeddings: usize,
}

/// cos/sin for each token: `[tokens, rotary_dim]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTables {
    pub rotary_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// The default frequencies `1 / θ^(2i/d)` for `i < d/2`.
    fn base_inv_freq(&self) -> Vec<f64> {
        let d = self.rotary_dim as f64;
        (0..self.rotary_dim / 2).map(|i| 1.0 / self.theta.powf((2 * i) as f64 / d)).collect()
    }

    /// The inverse frequencies for a batch whose positions go up to `max_position`.
    pub fn inv_freq(&self, max_position: usize) -> Vec<f32> {
        let base = self.base_inv_freq();
        let f: Vec<f64> = match &self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => {
                let old = *original_max as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn { factor, original_max, beta_fast, beta_slow, truncate, .. } => {
                let d = self.rotary_dim as f64;
                let correction = |rotations: f64| {
                    d * (*original_max as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
            RopeScaling::LongRope { short, long, original_max, .. } => {
                let ext = if max_position + 1 > *original_max { long } else { short };
                base.iter().zip(ext).map(|(f, e)| f / e).collect()
            }
        };
        f.into_iter().map(|f| f as f32).collect()
    }

    /// What yarn and longrope multiply cos and sin by (1 for the others).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn { factor, attention_factor, mscale, mscale_all_dim, .. } => {
                let get = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => get(*factor, *m) / get(*factor, *all),
                    _ => get(*factor, 1.0),
                }
            }
            RopeScaling::LongRope { original_max, factor, attention_factor, .. } => {
                if let Some(a) = attention_factor {
                    return *a;
                }
                let factor = factor.unwrap_or(self.max_position_embeddings as f64 / *original_max as f64);
                if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (*original_max as f64).ln()).sqrt() }
            }
            _ => 1.0,
        }
    }

    /// cos/sin rows for each position (transformers' f32 angle `position · inv_freq`).
    pub fn tables(&self, positions: &[u32]) -> Result<RopeTables> {
        let max = positions.iter().copied().max().unwrap_or(0) as usize;
        if max >= self.max_position_embeddings {
            bail!(
                "position {max} is beyond max_position_embeddings ({}); use a smaller --max-length",
                self.max_position_embeddings
            );
        }
        let inv = self.inv_freq(max);
        let scale = self.attention_factor() as f32;
        let d = self.rotary_dim;
        let (mut cos, mut sin) = (Vec::with_capacity(positions.len() * d), Vec::with_capacity(positions.len() * d));
        for &p in positions {
            for _half in 0..2 {
                for f in &inv {
                    let angle = p as f32 * f;
                    cos.push(angle.cos() * scale);
                    sin.push(angle.sin() * scale);
                }
            }
        }
        Ok(RopeTables { rotary_dim: d, cos, sin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> Rope {
        Rope { theta: 500000.0, rotary_dim: 16, scaling, max_position_embeddings: 512 }
    }

    #[test]
    fn dynamic_equals_default_within_max_positions() {
        let a = rope(RopeScaling::Default).tables(&[0, 5, 511]).unwrap();
        let b = rope(RopeScaling::Dynamic { factor: 4.0 }).tables(&[0, 5, 511]).unwrap();
        assert_eq!(a, b);
        assert!(rope(RopeScaling::Default).tables(&[512]).is_err());
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let base = rope(RopeScaling::Default).inv_freq(0);
        let l3 =
            rope(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max: 64 })
                .inv_freq(0);
        assert_eq!(l3[0], base[0]);
        assert!((l3[7] - base[7] / 8.0).abs() <= 1e-12);
    }

    #[test]
    fn longrope_switches_factor_sets_past_the_original_length() {
        let r = Rope {
            theta: 10000.0,
            rotary_dim: 4,
            scaling: RopeScaling::LongRope {
                short: vec![1.0, 2.0],
                long: vec![3.0, 4.0],
                original_max: 64,
                factor: None,
                attention_factor: None,
            },
            max_position_embeddings: 256,
        };
        assert_eq!(r.inv_freq(63), vec![1.0, 0.005]);
        assert_eq!(r.inv_freq(64), vec![1.0 / 3.0, 0.0025]);
        let want = (1.0 + 4f64.ln() / 64f64.ln()).sqrt();
        assert!((r.attention_factor() - want).abs() < 1e-12);
    }
}
