//! burn-onnx's code generation on a real ONNX model that is not a Kiln architecture:
//! Magika's file-type classifier, generated at build time (crates/kiln-magika/build.rs),
//! matches onnxruntime on real files, and its weights round-trip through safetensors.

mod common;

use burn::prelude::*;

#[derive(serde::Deserialize)]
struct Reference {
    files: Vec<String>,
    top_label: Vec<String>,
    probabilities: Vec<Vec<f32>>,
}

#[test]
fn generated_magika_matches_onnxruntime_on_real_files() {
    let root = common::repo_root();
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(root.join("tests/fixtures/magika_onnxruntime.json")).unwrap())
            .unwrap();
    let contents: Vec<Vec<u8>> = reference
        .files
        .iter()
        .map(|f| std::fs::read(root.join(f)).unwrap())
        .collect();
    let slices: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let labels = kiln_magika::labels();
    assert_eq!(labels.len(), 214);

    let device = Device::flex();
    let model = kiln_magika::pretrained(&device);
    let ours = kiln_magika::classify(&model, &slices, &device);
    let mut worst = 0.0f32;
    for (i, (p, r)) in ours.iter().zip(&reference.probabilities).enumerate() {
        let diff = p.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        worst = worst.max(diff);
        let top = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(labels[top], reference.top_label[i], "{}", reference.files[i]);
    }
    eprintln!("magika: max abs probability difference from onnxruntime {worst:.2e}");
    assert!(worst <= 1e-4, "max abs probability difference {worst}");

    // The generated model's weights as safetensors, and back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("magika.safetensors");
    kiln_core::weights::save_weights(&model, &path).unwrap();
    let reloaded = kiln_core::weights::load_weights(kiln_magika::Model::new(&device), &path).unwrap();
    assert_eq!(kiln_magika::classify(&reloaded, &slices, &device), ours);
}
