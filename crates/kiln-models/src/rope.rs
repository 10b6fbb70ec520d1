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

/// Rotary position embedding: the inverse frequencies, from which the cos/sin values of
/// the positions a forward pass rotates are made when it needs them ([`Rotation`]). The
/// values are those of a `[max_positions, D]` table computed once, bit for bit (the same
/// f64 angle, rounded to f32), without holding one: Gemma 3 270M's two tables at its
/// 32,768 positions were 134 MB, more than its Q4_0 weights.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[D / 2]`: `theta^(-2i/D)`, rescaled.
    inv_freq: Vec<f64>,
    max_positions: usize,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        // inv_freq[i] = theta^(-2i/D), i < D/2, then rescaled; angles[p, i] = p * inv_freq[i],
        // duplicated to [p, D] as HF does (cat(freqs, freqs)).
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                scaling.map_or(f, |s| s.apply(f))
            })
            .collect();
        Self {
            inv_freq,
            max_positions,
        }
    }

    /// The positions the model was configured for (its context).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos` and `sin` `[positions.len(), D]` of `positions`, row `r` at `positions[r]`
    /// (resized and overwritten).
    pub fn rows(&self, positions: impl IntoIterator<Item = usize>, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let (half, d) = (self.inv_freq.len(), self.head_dim());
        cos.clear();
        sin.clear();
        for p in positions {
            let at = cos.len();
            cos.resize(at + d, 0.0);
            sin.resize(at + d, 0.0);
            for (i, f) in self.inv_freq.iter().enumerate() {
                let angle = p as f64 * f;
                let (s, c) = (angle.sin() as f32, angle.cos() as f32);
                (cos[at + i], cos[at + half + i]) = (c, c);
                (sin[at + i], sin[at + half + i]) = (s, s);
            }
        }
    }

    /// The rotation of positions `start..start + t` (a prompt, a training sequence),
    /// for queries and keys `[B, heads, t, D]`.
    pub fn range(&self, start: usize, t: usize, device: &Device) -> Rotation {
        self.rotation(start..start + t, [1, 1, t, self.head_dim()], device)
    }

    /// The rotation of one position per row (a decode step of independent sequences),
    /// row `b` at `positions[b]`, for queries and keys `[B, heads, 1, D]`.
    pub fn at(&self, positions: &[usize], device: &Device) -> Rotation {
        self.rotation(
            positions.iter().copied(),
            [positions.len(), 1, 1, self.head_dim()],
            device,
        )
    }

    fn rotation(&self, positions: impl IntoIterator<Item = usize>, shape: [usize; 4], device: &Device) -> Rotation {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.rows(positions, &mut cos, &mut sin);
        Rotation {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// The cos/sin values of the positions one forward pass rotates, made once
/// ([`RotaryEmbedding::range`] / [`RotaryEmbedding::at`]) and applied by every layer:
/// `[1, 1, T, D]` for a run of positions, `[B, 1, 1, D]` for one per row.
#[derive(Debug, Clone)]
pub struct Rotation {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rotation {
    /// Rotate `x` `[B, heads, T, D]`: `x * cos + rotate_half(x) * sin`,
    /// `rotate_half([x1, x2]) = [-x2, x1]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        // On flex, one position per row: one pass over the rows (the same products and sum).
        if let Some(y) = crate::fused::flex::rope_rows(&x, &self.cos, &self.sin) {
            return y;
        }
        rotate(x, self.cos.clone(), self.sin.clone())
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
    fn rows_hold_the_values_of_the_precomputed_table() {
        let scaling = RopeScaling::Linear { factor: 2.0 };
        let (d, theta) = (8, 10_000.0);
        let rope = RotaryEmbedding::new(d, 64, theta, Some(&scaling));
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.rows([5, 0, 40_000], &mut cos, &mut sin);
        assert_eq!((cos.len(), sin.len()), (3 * d, 3 * d));
        for (r, p) in [5usize, 0, 40_000].into_iter().enumerate() {
            for j in 0..d {
                let f = scaling.apply(1.0 / theta.powf((2 * (j % (d / 2))) as f64 / d as f64));
                let angle = p as f64 * f;
                assert_eq!(cos[r * d + j], angle.cos() as f32, "cos row {r} [{j}]");
                assert_eq!(sin[r * d + j], angle.sin() as f32, "sin row {r} [{j}]");
            }
        }
    }

    #[test]
    fn a_range_and_rows_at_the_same_positions_rotate_alike() {
        let device = Device::flex();
        let rope = RotaryEmbedding::new(4, 16, 10_000.0, None);
        // [1, 2 heads, 3 positions, 4]
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..24).map(|i| i as f32 * 0.25 - 2.0).collect::<Vec<f32>>(),
                [1, 2, 3, 4],
            ),
            &device,
        );
        let by_range: Vec<f32> = rope
            .range(7, 3, &device)
            .apply(x.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        // the same three positions as three rows of one position each: [3, 2, 1, 4]
        let rows = x.swap_dims(0, 2);
        let by_row = rope.at(&[7, 8, 9], &device).apply(rows).swap_dims(0, 2);
        assert_eq!(by_range, by_row.into_data().try_to_vec::<f32>().unwrap());
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
