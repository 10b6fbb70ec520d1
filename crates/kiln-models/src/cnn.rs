//! A small convolutional network for 28x28 images:
//! two (conv 3x3 -> ReLU -> max-pool 2) stages, then a hidden Linear and the head.
//!
//! Shapes: B = batch, C_i = channels, 28 -> 14 -> 7 spatially, N = hidden, K = classes.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ImageClassifier;
use crate::fused::{conv2d, linear, relu};
use crate::quant::Linear;
use crate::registry::{FieldError, ensure};

fn default_input() -> [usize; 3] {
    [1, 28, 28]
}
fn default_classes() -> usize {
    10
}

/// CNN hyper-parameters (`[model] arch = "cnn"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    /// Output channels of the two conv stages.
    pub channels: [usize; 2],
    /// Width of the hidden Linear layer.
    pub hidden_size: usize,
    #[serde(default = "default_input")]
    pub input_shape: [usize; 3],
    #[serde(default = "default_classes")]
    pub num_classes: usize,
    #[serde(default)]
    pub dropout: f64,
}

impl CnnConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(self.channels.iter().all(|&n| n > 0), "channels", "must be at least 1")?;
        ensure(self.hidden_size > 0, "hidden_size", "must be at least 1")?;
        let [c, h, w] = self.input_shape;
        ensure(
            c > 0 && h >= 4 && w >= 4,
            "input_shape",
            "needs at least 1 channel and 4x4 pixels",
        )?;
        ensure(self.num_classes >= 2, "num_classes", "must be at least 2")?;
        ensure(
            (0.0..1.0).contains(&self.dropout),
            "dropout",
            format!("{} is not in [0, 1)", self.dropout),
        )
    }

    pub fn init(&self, device: &Device) -> Cnn {
        let [c_in, h, w] = self.input_shape;
        let [c1, c2] = self.channels;
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Cnn {
            conv1: conv(c_in, c1),
            conv2: conv(c1, c2),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(c2 * (h / 4) * (w / 4), self.hidden_size)
                .init(device)
                .into(),
            fc2: LinearConfig::new(self.hidden_size, self.num_classes)
                .init(device)
                .into(),
            dropout: DropoutConfig::new(self.dropout).init(),
            input_shape: self.input_shape,
        }
    }
}

#[derive(Module, Debug)]
pub struct Cnn {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub pool: MaxPool2d,
    pub fc1: Linear,
    pub fc2: Linear,
    pub dropout: Dropout,
    #[module(skip)]
    pub input_shape: [usize; 3],
}

impl ImageClassifier for Cnn {
    fn num_classes(&self) -> usize {
        self.fc2.weight.dims()[1]
    }

    fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        // [B, C, 28, 28] -> [B, C1, 14, 14]
        let x = self.pool.forward(relu(conv2d(&self.conv1, images)));
        // -> [B, C2, 7, 7]
        let x = self.pool.forward(relu(conv2d(&self.conv2, x)));
        // -> [B, C2*7*7] -> [B, N] -> [B, K]
        let x: Tensor<2> = x.flatten(1, 3);
        let x = self.dropout.forward(relu(linear(&self.fc1, x)));
        linear(&self.fc2, x)
    }
}

impl crate::Architecture for CnnConfig {
    type Model = Cnn;
    fn validate(&self) -> Result<(), FieldError> {
        CnnConfig::validate(self)
    }
    fn init(&self, device: &Device) -> Cnn {
        CnnConfig::init(self, device)
    }
}

impl crate::ImageArchitecture for CnnConfig {}
