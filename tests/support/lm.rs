//! Language-model helpers for the root package's tests (which depend on Burn and the
//! model crate; `tests/common` is shared with packages that do not).
#![allow(dead_code)]

use burn::prelude::*;

/// The logits of a language model `model` with the Kiln safetensors `weights`, loaded on
/// flex through the registry, on `tokens` (rows of one length): `[B * T * V]`.
pub fn lm_logits(model: &kiln_models::ModelConfig, weights: &[u8], tokens: &[Vec<i64>]) -> Vec<f32> {
    use kiln_models::{EncoderArchitecture, FamilyVisitor, ImageArchitecture, LanguageArchitecture};
    struct Run<'a>(&'a std::path::Path, &'a [Vec<i64>]);
    impl FamilyVisitor for Run<'_> {
        type Output = Vec<f32>;
        fn causal_lm<A: LanguageArchitecture>(self, config: &A) -> Vec<f32> {
            use kiln_models::CausalLm;
            let device = Device::flex();
            let model = kiln_core::weights::load_weights(config.init(&device), self.0).unwrap();
            let (b, t) = (self.1.len(), self.1[0].len());
            let input = Tensor::<2, Int>::from_data(TensorData::new(self.1.concat(), [b, t]), &device);
            model.forward(input).into_data().try_to_vec::<f32>().unwrap()
        }
        fn image_classifier<A: ImageArchitecture>(self, _: &A) -> Vec<f32> {
            panic!("not a language model")
        }
        fn encoder<A: EncoderArchitecture>(self, _: &A) -> Vec<f32> {
            panic!("not a language model")
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, weights).unwrap();
    model.visit_family(Run(&path, tokens))
}

/// `max |a[i] - b[i]|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
