//! Architectures: shapes, the KV cache against the full forward pass, safetensors
//! round trips, and bad checkpoints.

mod common;

use burn::prelude::*;
use kiln_core::StoreError;
use kiln_core::weights::{load_weights, save_weights};
use kiln_models::{CausalLm, CnnConfig, Gpt2Config, ImageClassifier, LlamaConfig, MlpConfig};

fn device() -> Device {
    Device::flex()
}

fn gpt2() -> Gpt2Config {
    Gpt2Config {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 12,
        vocab_size: 11,
        dropout: 0.0,
        bias: true,
        layer_norm_epsilon: 1e-5,
        activation: Default::default(),
    }
}

fn llama() -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 16,
        intermediate_size: 24,
        block_size: 12,
        vocab_size: 11,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        ..Default::default()
    }
}

fn tokens(b: usize, t: usize) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..b * t).map(|i| ((i * 7 + 3) % 11) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [b, t]), &device())
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn language_model_shapes() {
    let d = device();
    let g = gpt2().init(&d);
    assert_eq!(g.forward(tokens(3, 5)).dims(), [3, 5, 11]);
    assert_eq!((g.context_len(), g.vocab_size()), (12, 11));
    let l = llama().init(&d);
    assert_eq!(l.forward(tokens(2, 12)).dims(), [2, 12, 11]);
    assert_eq!((l.context_len(), l.vocab_size()), (12, 11));
}

#[test]
fn image_model_shapes() {
    let d = device();
    let x = Tensor::<4>::zeros([4, 1, 28, 28], &d);
    let mlp = MlpConfig {
        hidden_sizes: vec![32, 16],
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    }
    .init(&d);
    assert_eq!(mlp.forward(x.clone()).dims(), [4, 10]);
    let cnn = CnnConfig {
        channels: [4, 8],
        hidden_size: 16,
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    }
    .init(&d);
    assert_eq!(cnn.forward(x).dims(), [4, 10]);
    assert_eq!(cnn.input_shape(), [1, 28, 28]);
}

/// Parameter names follow Hugging Face's (the conversion rule tables rely on it).
#[test]
fn parameter_names_follow_hugging_face() {
    let d = device();
    let names = kiln_core::weights::expected_shapes(&gpt2().init(&d));
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.gamma",
    ] {
        assert!(names.contains_key(name), "gpt2 lacks {name}: {:?}", names.keys());
    }
    assert_eq!(
        names["transformer.h.0.attn.c_attn.weight"],
        vec![16, 48],
        "Conv1D layout [in, out]"
    );
    let names = kiln_core::weights::expected_shapes(&llama().init(&d));
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.gamma",
        "lm_head.weight",
    ] {
        assert!(names.contains_key(name), "llama lacks {name}: {:?}", names.keys());
    }
    assert_eq!(
        names["model.layers.0.self_attn.k_proj.weight"],
        vec![16, 8],
        "2 kv heads of 4 dims"
    );
    assert!(
        !names.keys().any(|n| n.contains("rotary")),
        "rotary tables are not parameters"
    );
}

/// Incremental decoding through the cache gives the logits of the full forward pass,
/// for a prefill of several tokens followed by single-token steps.
fn check_cache<M: CausalLm>(model: &M) {
    let d = device();
    let seq = tokens(2, 10);
    let full = model.forward(seq.clone());
    let mut cache = model.new_cache(2, &d);
    let mut parts = vec![model.forward_cached(seq.clone().slice(s![.., 0..4]), &mut cache)];
    for t in 4..10 {
        parts.push(model.forward_cached(seq.clone().slice(s![.., t..t + 1]), &mut cache));
    }
    assert_eq!(cache.len(), 10);
    let cached = Tensor::cat(parts, 1);
    let diff = max_abs_diff(full, cached);
    assert!(diff < 1e-5, "cached logits differ from the full pass by {diff}");
}

#[test]
fn kv_cache_matches_full_forward_gpt2() {
    check_cache(&gpt2().init(&device()));
}

#[test]
fn kv_cache_matches_full_forward_llama() {
    check_cache(&llama().init(&device()));
    check_cache(&llama_tied().init(&device()));
}

/// With a window of 3 the 10-token sequence crosses it in the prefill and in the decode
/// steps, so the cached path's key slicing is checked against the full pass's mask.
#[test]
fn kv_cache_matches_full_forward_gemma3() {
    check_cache(&gemma3().init(&device()));
}

/// Gemma 3 with a local window of 3 and every second layer global.
fn gemma3() -> kiln_models::Gemma3Config {
    serde_json::from_value(serde_json::json!({
        "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 16, "head_dim": 8,
        "intermediate_size": 24, "block_size": 12, "vocab_size": 11, "sliding_window": 3,
        "sliding_window_pattern": 2, "final_logit_softcapping": 30.0
    }))
    .unwrap()
}

/// SmolLM2's shape of llama: tied head, head_dim not C / H, q/k/v biases.
fn llama_tied() -> LlamaConfig {
    LlamaConfig {
        tie_word_embeddings: true,
        head_dim: Some(8),
        qkv_bias: true,
        ..llama()
    }
}

/// A local layer sees only its window: with one local layer of window 3, the last
/// position's logits ignore a change at position 0 and follow one at position 5.
#[test]
fn gemma3_local_layers_see_only_their_window() {
    let d = device();
    let mut one = gemma3();
    one.n_layer = 1;
    one.layer_types = Some(vec![kiln_models::gemma3::LayerAttention::SlidingAttention]);
    let model = one.init(&d);
    let ids = |v: [i64; 8]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [1, 8]), &d);
    let last = |x: Tensor<2, Int>| model.forward(x).slice(s![.., 7..8, ..]);
    let base = last(ids([1, 2, 3, 4, 5, 6, 7, 8]));
    let far = last(ids([9, 2, 3, 4, 5, 6, 7, 8]));
    let near = last(ids([1, 2, 3, 4, 5, 9, 7, 8]));
    assert_eq!(
        max_abs_diff(base.clone(), far),
        0.0,
        "position 0 is outside the window of 7"
    );
    assert!(max_abs_diff(base, near) > 0.0, "position 5 is inside it");
}

/// The fused causal attention path equals softmax(q k^T / sqrt(d) + causal mask) v
/// computed by hand, including a query block that ends at the last key (the cache case).
#[test]
fn causal_attention_matches_textbook() {
    use burn::tensor::activation::softmax;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let d = device();
    let q = Tensor::<4>::random([1, 2, 3, 4], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    let k = Tensor::<4>::random([1, 2, 5, 4], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    let v = Tensor::<4>::random([1, 2, 5, 4], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
    let fused = attention(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        None,
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        },
    );
    let scores = q.matmul(k.swap_dims(2, 3)) / 2.0;
    // query i (of 3) sits at position i + 2 of 5: it sees keys 0..=i+2
    let mask = Tensor::<2, Bool>::tril_mask([3, 5], 2, &d).unsqueeze::<4>();
    let reference = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3).matmul(v);
    assert!(max_abs_diff(fused, reference) < 1e-5);
}

fn roundtrip<M: burn::module::Module>(model: M, fresh: M) {
    // The names and shapes read off the lazy (never initialised) parameters are those of
    // the initialised model.
    assert_eq!(
        kiln_core::weights::expected_tensors_lazy(&fresh),
        kiln_core::weights::expected_tensors(&model)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let before = kiln_core::weights::weights_to_bytes(&model).unwrap();
    save_weights(&model, &path).unwrap();
    let loaded = load_weights(fresh, &path).unwrap();
    let after = kiln_core::weights::weights_to_bytes(&loaded).unwrap();
    common::assert_same_tensors(&before, &after);
}

#[test]
fn safetensors_round_trip_is_exact_for_every_architecture() {
    let d = device();
    roundtrip(gpt2().init(&d), gpt2().init(&d));
    roundtrip(llama().init(&d), llama().init(&d));
    roundtrip(llama_tied().init(&d), llama_tied().init(&d));
    roundtrip(gemma3().init(&d), gemma3().init(&d));
    let mlp = MlpConfig {
        hidden_sizes: vec![8],
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    };
    roundtrip(mlp.init(&d), mlp.init(&d));
    let cnn = CnnConfig {
        channels: [2, 4],
        hidden_size: 8,
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    };
    roundtrip(cnn.init(&d), cnn.init(&d));
}

#[test]
fn loaded_weights_give_identical_logits() {
    let d = device();
    let model = gpt2().init(&d);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_weights(&model, &path).unwrap();
    let loaded = load_weights(gpt2().init(&d), &path).unwrap();
    assert_eq!(
        max_abs_diff(model.forward(tokens(1, 6)), loaded.forward(tokens(1, 6))),
        0.0
    );
}

#[test]
fn mismatched_checkpoint_names_the_tensor() {
    let d = device();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_weights(&gpt2().init(&d), &path).unwrap();
    let mut wider = gpt2();
    wider.n_embd = 32;
    let err = load_weights(wider.init(&d), &path).unwrap_err();
    assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("m.safetensors") && msg.contains("transformer.wte.weight") && msg.contains("[11, 16]"),
        "{msg}"
    );
    // Another architecture altogether: every tensor is reported missing or unexpected.
    let err = load_weights(llama().init(&d), &path).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor model.embed_tokens.weight")
            && err.contains("unexpected tensor transformer.wte.weight"),
        "{err}"
    );
}

#[test]
fn corrupt_checkpoints_are_errors_not_panics() {
    let d = device();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_weights(&gpt2().init(&d), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Truncated.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_weights(gpt2().init(&d), &path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    // Not safetensors at all.
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(
        load_weights(gpt2().init(&d), &path).unwrap_err(),
        StoreError::Corrupt { .. }
    ));
    // Missing file.
    let err = load_weights(gpt2().init(&d), &dir.path().join("nope.safetensors")).unwrap_err();
    assert!(
        matches!(err, StoreError::Io { .. }) && err.to_string().contains("nope.safetensors"),
        "{err}"
    );
}

#[test]
fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    kiln_core::io::atomic_write(&path, b"first").unwrap();
    kiln_core::io::atomic_write(&path, b"second version").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second version");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f.bin")]);
}

/// `activation = "gelu"` makes the MLP use the exact GELU (nanoGPT's `nn.GELU()`), the
/// default stays GPT-2's tanh form, and the choice survives the Hugging Face config.
#[test]
fn gpt2_activation_selects_the_gelu_variant() {
    let d = device();
    let exact = Gpt2Config {
        activation: kiln_models::gpt2::Gpt2Activation::Gelu,
        ..gpt2()
    };
    let model = exact.init(&d);
    let mut mlp = model.transformer.h[0].mlp.clone();
    // Pre-activations of order 1, where the two GELU forms differ by up to ~1e-3.
    mlp.c_fc.weight = mlp.c_fc.weight.map(|w| w.mul_scalar(50.0));
    mlp.c_proj.weight = mlp.c_proj.weight.map(|w| w.mul_scalar(50.0));
    let x = Tensor::<3>::random([2, 3, 16], burn::tensor::Distribution::Normal(0.0, 2.0), &d);
    let reference = |gelu: fn(Tensor<3>) -> Tensor<3>| mlp_with(&mlp, x.clone(), gelu);
    let by_hand_exact = reference(burn::tensor::activation::gelu);
    let by_hand_tanh = reference(kiln_models::gpt2::gelu_tanh);
    assert!(max_abs_diff(mlp.forward(x.clone()), by_hand_exact.clone()) < 1e-6);
    assert!(
        max_abs_diff(by_hand_exact, by_hand_tanh.clone()) > 1e-5,
        "the two forms must differ"
    );
    mlp.activation = kiln_models::gpt2::Gpt2Activation::GeluTanh;
    assert!(max_abs_diff(mlp.forward(x), by_hand_tanh) < 1e-6);

    let hf = kiln_convert::hf_config::to_hf_json(&kiln_models::ModelConfig::Gpt2(exact.clone())).unwrap();
    assert_eq!(hf["activation_function"], "gelu");
    let back = kiln_convert::hf_config::model_config("gpt2", &hf, "config.json").unwrap();
    assert_eq!(back, kiln_models::ModelConfig::Gpt2(exact));
    let mut bad = hf.clone();
    bad["activation_function"] = "relu".into();
    let err = kiln_convert::hf_config::model_config("gpt2", &bad, "config.json").unwrap_err();
    assert!(err.to_string().contains("activation_function"), "{err}");
}

fn mlp_with(mlp: &kiln_models::gpt2::Gpt2Mlp, x: Tensor<3>, gelu: fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
    mlp.c_proj.forward(gelu(mlp.c_fc.forward(x)))
}

/// The sigmoid form of GPT-2's GELU equals Burn's tanh approximation.
#[test]
fn gelu_tanh_matches_the_tanh_formula() {
    let x = Tensor::<1>::from_floats([-8.0, -3.0, -1.0, -0.1, 0.0, 0.1, 0.5, 1.0, 3.0, 8.0], &device());
    let diff = max_abs_diff(
        kiln_models::gpt2::gelu_tanh(x.clone()),
        burn::tensor::activation::gelu_approximate(x),
    );
    assert!(diff < 1e-6, "{diff}");
}
