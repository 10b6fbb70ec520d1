//! Rotary position embeddings (RoPE) in Hugging Face's "rotate half" layout, shared by
//! the decoder architectures, with the frequency scalings real checkpoints use.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::registry::{FieldError, ensure};

/// How the rotary frequencies are rescaled for a longer context
/// (`rope_scaling` / `rope_parameters` in a Hugging Face config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between `original_max_position_embeddings / low_freq_factor` and
    /// `/ high_freq_factor` wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    pub fn validate(&self) -> Result<(), FieldError> {
        match *self {
            RopeScaling::Linear { factor } => ensure(factor > 0.0, "rope_scaling.factor", "must be positive"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                ensure(factor > 0.0, "rope_scaling.factor", "must be positive")?;
                ensure(
                    low_freq_factor > 0.0,
                    "rope_scaling.low_freq_factor",
                    "must be positive",
                )?;
                ensure(
                    high_freq_factor > low_freq_factor,
                    "rope_scaling.high_freq_factor",
                    "must be greater than low_freq_factor",
                )?;
                ensure(
                    original_max_position_embeddings > 0,
                    "rope_scaling.original_max_position_embeddings",
                    "must be at least 1",
                )
            }
        }
    }

    /// The rescaled inverse frequency (transformers' `_compute_*_parameters`).
    fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < old / high_freq_factor {
                    inv_freq
                } else if wavelen > old / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// Rotary position tables `cos`, `sin`: `[max_positions, D]`, computed once at init.
#[derive(Module, Debug)]
pub struct RotaryEmbedding {
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
}

impl RotaryEmbedding {
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: &Device,
    ) -> Self {
        // inv_freq[i] = theta^(-2i/D), i < D/2, then rescaled; angles[p, i] = p * inv_freq[i],
        // duplicated to [p, D] as HF does (cat(freqs, freqs)).
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                scaling.map_or(f, |s| s.apply(f))
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for p in 0..max_positions {
            for j in 0..head_dim {
                let angle = p as f64 * inv_freq[j % half];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [max_positions, head_dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_positions, head_dim]), device),
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate `x` `[B, heads, T, D]` for positions `start..start+T`:
    /// `x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let t = x.dims()[2];
        let cos = self.cos.clone().slice(s![start..start + t, ..]).unsqueeze::<4>(); // [1, 1, T, D]
        let sin = self.sin.clone().slice(s![start..start + t, ..]).unsqueeze::<4>();
        rotate(x, cos, sin)
    }

    /// Rotate `x` `[B, heads, 1, D]` row `b` at position `positions[b]` (a decode step
    /// of independent sequences); the same arithmetic as [`apply`](Self::apply).
    pub fn apply_rows(&self, x: Tensor<4>, positions: Tensor<1, Int>) -> Tensor<4> {
        // On flex: one pass over the rows (the same products and sum).
        if let Some(y) = crate::fused::flex::rope_rows(&x, &self.cos, &self.sin, &positions) {
            return y;
        }
        let [b, _, _, d] = x.dims();
        let cos = self.cos.clone().select(0, positions.clone()).reshape([b, 1, 1, d]);
        let sin = self.sin.clone().select(0, positions).reshape([b, 1, 1, d]);
        rotate(x, cos, sin)
    }
}

/// `x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]` over the last
/// dimension; `cos`/`sin` broadcast against `x`.
fn rotate(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().slice(s![.., .., .., 0..d / 2]);
    let x2 = x.clone().slice(s![.., .., .., d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // wavelength 2pi/1 = 6.3 < 8192/4: kept
        assert_eq!(s.apply(1.0), 1.0);
        // wavelength 2pi/1e-4 = 62832 > 8192: divided by the factor
        assert!((s.apply(1e-4) - 1e-4 / 8.0).abs() < 1e-18);
        // in between: strictly between the two
        let mid = 2.0 * std::f64::consts::PI / 4000.0;
        assert!(s.apply(mid) < mid && s.apply(mid) > mid / 8.0);
        assert_eq!(RopeScaling::Linear { factor: 4.0 }.apply(2.0), 0.5);
    }

    #[test]
    fn an_unknown_rope_type_is_refused_by_name() {
        let err = serde_json::from_str::<RopeScaling>(r#"{"rope_type": "yarn", "factor": 2.0}"#).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
        let err =
            serde_json::from_str::<RopeScaling>(r#"{"rope_type": "linear", "factor": 2.0, "beta": 1}"#).unwrap_err();
        assert!(err.to_string().contains("beta"), "{err}");
    }
}
