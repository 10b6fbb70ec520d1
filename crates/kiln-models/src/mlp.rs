//! A multilayer perceptron for small images: flatten, hidden Linear + ReLU layers, head.
//!
//! Shapes: B = batch, I = channels * height * width, N_i = hidden sizes, K = classes.

use burn::nn::{Dropout, DropoutConfig, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ImageClassifier;
use crate::fused::{linear, relu};
use crate::quant::Linear;
use crate::registry::{FieldError, ensure};

fn default_input() -> [usize; 3] {
    [1, 28, 28]
}
fn default_classes() -> usize {
    10
}

/// MLP hyper-parameters (`[model] arch = "mlp"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Widths of the hidden layers.
    pub hidden_sizes: Vec<usize>,
    /// Input `[channels, height, width]`.
    #[serde(default = "default_input")]
    pub input_shape: [usize; 3],
    #[serde(default = "default_classes")]
    pub num_classes: usize,
    #[serde(default)]
    pub dropout: f64,
}

impl MlpConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(
            self.hidden_sizes.iter().all(|&n| n > 0),
            "hidden_sizes",
            "every width must be at least 1",
        )?;
        ensure(
            self.input_shape.iter().all(|&n| n > 0),
            "input_shape",
            "every dimension must be at least 1",
        )?;
        ensure(self.num_classes >= 2, "num_classes", "must be at least 2")?;
        ensure(
            (0.0..1.0).contains(&self.dropout),
            "dropout",
            format!("{} is not in [0, 1)", self.dropout),
        )
    }

    pub fn init(&self, device: &Device) -> Mlp {
        let mut d_in = self.input_shape.iter().product();
        let mut hidden = Vec::with_capacity(self.hidden_sizes.len());
        for &d_out in &self.hidden_sizes {
            hidden.push(LinearConfig::new(d_in, d_out).init(device).into());
            d_in = d_out;
        }
        Mlp {
            hidden,
            head: LinearConfig::new(d_in, self.num_classes).init(device).into(),
            dropout: DropoutConfig::new(self.dropout).init(),
            input_shape: self.input_shape,
        }
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub hidden: Vec<Linear>,
    pub head: Linear,
    pub dropout: Dropout,
    #[module(skip)]
    pub input_shape: [usize; 3],
}

impl ImageClassifier for Mlp {
    fn num_classes(&self) -> usize {
        self.head.weight.dims()[1]
    }

    fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        // [B, C, H, W] -> [B, I]
        let mut x: Tensor<2> = images.flatten(1, 3);
        for layer in &self.hidden {
            // [B, N_i]
            x = self.dropout.forward(relu(linear(layer, x)));
        }
        // [B, K]
        linear(&self.head, x)
    }
}

impl crate::Architecture for MlpConfig {
    type Model = Mlp;
    fn validate(&self) -> Result<(), FieldError> {
        MlpConfig::validate(self)
    }
    fn init(&self, device: &Device) -> Mlp {
        MlpConfig::init(self, device)
    }
}

impl crate::ImageArchitecture for MlpConfig {}
