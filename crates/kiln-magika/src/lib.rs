//! Magika's file-type classifier (an ONNX model that is not a Kiln architecture), turned
//! into Burn code by burn-onnx's `ModelGen` in `build.rs`, plus the feature extraction it
//! expects: the first and last 1024 bytes of the content, padded with 256.

#[allow(clippy::all, unused, non_snake_case)]
pub mod model {
    include!(concat!(env!("OUT_DIR"), "/model/magika_standard_v3_3.rs"));
}

use burn::prelude::*;

pub use model::Model;

/// The pretrained Magika model on `device`, from the weights the build script generated
/// beside the code. (The generated `Model::default()` loads them on Burn's default
/// device, which is wgpu in a build with the `wgpu` feature, not the caller's.)
pub fn pretrained(device: &Device) -> Model {
    Model::from_file(concat!(env!("OUT_DIR"), "/model/magika_standard_v3_3.bpk"), device)
}

const BEG: usize = 1024;
const END: usize = 1024;
const PADDING: i32 = 256;

/// The model's input for `content`: `[BEG bytes | END bytes]`, each side padded with 256
/// (the beginning on the right, the end on the left), after stripping leading and trailing
/// ASCII whitespace as Magika does.
pub fn features(content: &[u8]) -> Vec<i32> {
    let start = content
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(content.len());
    let stop = content
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    let body = &content[start..stop.max(start)];
    let mut out = vec![PADDING; BEG + END];
    for (i, &b) in body.iter().take(BEG).enumerate() {
        out[i] = b as i32;
    }
    let tail = &body[body.len().saturating_sub(END)..];
    let offset = BEG + END - tail.len();
    for (i, &b) in tail.iter().enumerate() {
        out[offset + i] = b as i32;
    }
    out
}

/// Labels, in the order of the model's outputs.
pub fn labels() -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Config {
        target_labels_space: Vec<String>,
    }
    let config: Config = serde_json::from_str(include_str!("../model/magika_standard_v3_3.config.json"))
        .expect("the committed Magika config is valid");
    config.target_labels_space
}

/// Label probabilities `[files][214]` of several files' contents.
pub fn classify(model: &Model, contents: &[&[u8]], device: &Device) -> Vec<Vec<f32>> {
    let rows: Vec<i32> = contents.iter().flat_map(|c| features(c)).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(rows, [contents.len(), BEG + END]), device);
    let probs: Tensor<2> = model.forward(input);
    let [_, n] = probs.dims();
    probs
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 output")
        .chunks(n)
        .map(<[f32]>::to_vec)
        .collect()
}
