//! Packed (quantized) weights end to end: `convert --quantize` of Kiln model directories
//! (`kiln_convert::quantize`), loading them on flex (packed, Kiln's quantized kernels)
//! and on ndarray (dequantized once at load), the fused decode step over packed weights,
//! and the refusals (corrupt scales, a `[quantization]` that does not fit the model).
//!
//! Tolerances (random small models, so only bounds; the error figures that mean something
//! are perplexity and KL divergence on the real models, docs/benchmarks.md): against the
//! f32 model the logits' relative L2 error stays under 5 % for Q8_0 and 50 % for the
//! 4-bit formats (Gemma's sandwich norms scale every perturbation of a block's output back
//! up to the residual's size: about 3x Llama's error). Packed on flex against the same
//! weights dequantized on ndarray, the difference is the 8-bit quantization of the
//! activations alone: under 5 %. Decode steps against the full forward over the same
//! tokens: the same kernels row by row, usually the same bits, but attention's f32
//! rounding differs between the two paths and can tip an activation to the neighbouring
//! 8-bit step: under 1e-2 (a wrong row or bias is of order 1).

mod common;
#[path = "support/half.rs"]
mod half_copy;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;
use kiln_convert::quantize::quantize_dir;
use kiln_core::ModelFile;
use kiln_core::layout::{CONFIG, MODEL_WEIGHTS, TOKENIZER, WhichWeights};
use kiln_core::weights::save_weights;
use kiln_data::Tokenizer;
use kiln_infer::{LoadedModel, Model};
use kiln_models::quant::QuantType;
use kiln_models::{BertConfig, CausalLm, Gemma3Config, LlamaConfig, ModelConfig};

const VOCAB: usize = 40;

fn llama() -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 64,
        intermediate_size: 96,
        block_size: 32,
        vocab_size: VOCAB,
        head_dim: Some(16),
        qkv_bias: true,
        tie_word_embeddings: true,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        ..Default::default()
    }
}

fn gemma() -> Gemma3Config {
    serde_json::from_value(serde_json::json!({
        "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "head_dim": 16,
        "intermediate_size": 96, "block_size": 32, "vocab_size": VOCAB, "sliding_window": 3,
        "sliding_window_pattern": 2, "final_logit_softcapping": 30.0
    }))
    .unwrap()
}

/// A model directory of `config` with freshly initialised f32 weights.
fn f32_dir<M: Module>(root: &Path, name: &str, config: ModelConfig, model: &M) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = ModelFile {
        model: config,
        head: None,
        quantization: None,
    };
    std::fs::write(dir.join(CONFIG), file.to_toml()).unwrap();
    save_weights(model, &dir.join(MODEL_WEIGHTS)).unwrap();
    let text: String = (0..VOCAB as u8).map(|i| (b'0' + i) as char).collect();
    std::fs::write(
        dir.join(TOKENIZER),
        Tokenizer::build(&kiln_data::TokenizerSpec::Char, &text)
            .unwrap()
            .to_json()
            .unwrap(),
    )
    .unwrap();
    dir
}

fn open(dir: &Path, device: &Device) -> LoadedModel {
    LoadedModel::open(dir, WhichWeights::Latest, device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn lm(loaded: &LoadedModel) -> &dyn CausalLm {
    match &loaded.model {
        Model::CausalLm(m) => m.as_ref(),
        _ => panic!("not a language model"),
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// ||a - b|| / ||b||
fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

const TOKENS: [i64; 12] = [1, 5, 2, 7, 3, 9, 4, 10, 6, 8, 30, 39];

fn logits(model: &dyn CausalLm, device: &Device) -> Vec<f32> {
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(TOKENS.to_vec(), [1, TOKENS.len()]), device);
    values(model.forward(tokens))
}

/// The prompt's first half prefilled, then one decode step per token of the rest
/// (two sequences at once, the second a copy of the first): the logits of each step.
fn stepped(model: &dyn CausalLm, device: &Device) -> Vec<f32> {
    let half = TOKENS.len() / 2;
    let prompt = Tensor::<2, Int>::from_data(TensorData::new(TOKENS[..half].to_vec(), [1, half]), device);
    let (mut a, mut b) = (model.new_cache(1, device), model.new_cache(1, device));
    let mut out = values(model.forward_cached(prompt.clone(), &mut a));
    model.forward_cached(prompt, &mut b);
    for &t in &TOKENS[half..] {
        let step = Tensor::<2, Int>::from_data(TensorData::new(vec![t, t], [2, 1]), device);
        let logits = values(model.forward_step(step, &mut [&mut a, &mut b]));
        let (first, second) = logits.split_at(logits.len() / 2);
        assert_eq!(
            first, second,
            "two copies of one sequence in a batch give the same logits"
        );
        out.extend_from_slice(first);
    }
    out
}

fn check_lm(name: &str, f32_dir: &Path, root: &Path) {
    let flex = Device::flex();
    let ndarray = kiln_core::BackendKind::Ndarray.device(0).unwrap();
    let reference = open(f32_dir, &flex);
    let want = logits(lm(&reference), &flex);
    for (ty, tolerance) in [(QuantType::Q8_0, 0.05), (QuantType::Q4_0, 0.5), (QuantType::Q4_1, 0.5)] {
        let dir = root.join(format!("{name}-{}", ty.name()));
        let report = quantize_dir(f32_dir, &dir, ty, &[]).unwrap();
        assert!(report.bytes[1] < report.bytes[0], "{name} {ty:?}: {:?}", report.bytes);
        let file = ModelFile::load(&dir.join(CONFIG)).unwrap();
        let plan = file.quantization.expect("a [quantization] section");
        assert!(
            plan.tensors.keys().any(|m| m.ends_with("embed_tokens")),
            "{name}: the token embedding is packed: {plan:?}"
        );
        assert!(
            plan.tensors.keys().any(|m| m.ends_with("down_proj")),
            "{name}: the MLP is packed: {plan:?}"
        );
        let packed = open(&dir, &flex);
        let got = logits(lm(&packed), &flex);
        let err = rel_l2(&got, &want);
        assert!(err < tolerance, "{name} {ty:?} vs f32: relative error {err}");
        // Decode steps over packed weights run fused and agree with the full forward.
        let fused_before = kiln_models::fused::fused_decode_steps();
        let steps = stepped(lm(&packed), &flex);
        assert!(
            kiln_models::fused::fused_decode_steps() >= fused_before + TOKENS.len() / 2,
            "{name} {ty:?}: the decode steps ran fused"
        );
        let step_err = rel_l2(&steps, &got);
        assert!(step_err < 1e-2, "{name} {ty:?}: decode steps vs forward {step_err}");
        // On ndarray the same weights, dequantized at load.
        let dense = open(&dir, &ndarray);
        let exact = logits(lm(&dense), &ndarray);
        let act_err = rel_l2(&got, &exact);
        assert!(
            act_err < 0.05,
            "{name} {ty:?}: packed on flex vs dequantized on ndarray {act_err}"
        );
        eprintln!(
            "{name} {}: vs f32 {err:.4}, vs dequantized {act_err:.4}, steps {step_err:.2e}",
            ty.name()
        );
    }
}

#[test]
fn quantized_language_models_run_packed_on_flex_and_dequantized_elsewhere() {
    let root = common::scratch_dir("quantized-lms");
    let flex = Device::flex();
    let cfg = llama();
    let dir = f32_dir(
        &root,
        "llama",
        ModelConfig::Llama(cfg.clone()),
        &kiln_core::rng::seeded_init(1, &flex, || cfg.init(&flex)),
    );
    check_lm("llama", &dir, &root);
    let untied = LlamaConfig {
        n_kv_head: 4,
        head_dim: None,
        qkv_bias: false,
        o_bias: true,
        mlp_bias: true,
        tie_word_embeddings: false,
        ..llama()
    };
    let dir = f32_dir(
        &root,
        "llama-untied",
        ModelConfig::Llama(untied.clone()),
        &kiln_core::rng::seeded_init(2, &flex, || untied.init(&flex)),
    );
    check_lm("llama-untied", &dir, &root);
    let g = gemma();
    let dir = f32_dir(
        &root,
        "gemma3",
        ModelConfig::Gemma3(g.clone()),
        &kiln_core::rng::seeded_init(3, &flex, || g.init(&flex)),
    );
    check_lm("gemma3", &dir, &root);
}

#[test]
fn keep_leaves_matching_modules_f32() {
    let root = common::scratch_dir("quantized-keep");
    let untied = LlamaConfig {
        tie_word_embeddings: false,
        ..llama()
    };
    let dir = f32_dir(
        &root,
        "f32",
        ModelConfig::Llama(untied.clone()),
        &untied.init(&Device::flex()),
    );
    let keep = [regex::Regex::new("lm_head|embed_tokens").unwrap()];
    let report = quantize_dir(&dir, &root.join("q8"), QuantType::Q8_0, &keep).unwrap();
    let kept: Vec<&str> = report.kept.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(kept, ["model.embed_tokens", "lm_head"], "{:?}", report.kept);
    assert_eq!(
        report.packed.len(),
        2 * 7,
        "every linear layer of the two decoder layers"
    );
    let plan = ModelFile::load(&root.join("q8").join(CONFIG))
        .unwrap()
        .quantization
        .unwrap();
    assert!(!plan.tensors.contains_key("lm_head"));
    open(&root.join("q8"), &Device::flex());
    let again = quantize_dir(&root.join("q8"), &root.join("q8-again"), QuantType::Q4_0, &[]);
    assert!(format!("{}", again.unwrap_err()).contains("already quantized"));
    assert!(
        !root.join("q8-again").exists(),
        "a refused conversion leaves no directory"
    );
}

#[test]
fn quantized_bert_embeds_like_f32() {
    let root = common::scratch_dir("quantized-bert");
    let cfg = BertConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        intermediate_size: 128,
        max_positions: 32,
        vocab_size: VOCAB,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        sentence_pooling: Default::default(),
        normalize: true,
        position_offset: 0,
    };
    let flex = Device::flex();
    let dir = f32_dir(&root, "bert", ModelConfig::Bert(cfg.clone()), &cfg.init(&flex));
    let report = quantize_dir(&dir, &root.join("q8"), QuantType::Q8_0, &[]).unwrap();
    assert_eq!(
        report.packed.len(),
        2 * 6 + 1,
        "q, k, v, attention output, intermediate, output per layer; the pooler"
    );
    assert!(report.kept.iter().any(|(m, _)| m.ends_with("word_embeddings")));
    let embed = |dir: &Path| {
        let loaded = open(dir, &flex);
        let Model::Encoder(e) = &loaded.model else {
            panic!("an encoder")
        };
        let ids = Tensor::<2, Int>::from_data(TensorData::new(TOKENS.to_vec(), [2, 6]), &flex);
        values(e.embed(ids.clone(), ids.ones_like()))
    };
    let (want, got) = (embed(&dir), embed(&root.join("q8")));
    for (w, g) in want.chunks(64).zip(got.chunks(64)) {
        let cos: f32 = w.iter().zip(g).map(|(a, b)| a * b).sum();
        assert!(cos > 0.999, "cosine to f32 {cos}");
    }
}

/// Rewrite one tensor's bytes in a weights file.
fn patch(path: &Path, tensor: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
    edit(&mut t.3);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn corrupt_or_mismatched_packed_weights_are_refused_by_name() {
    let root = common::scratch_dir("quantized-bad");
    let cfg = llama();
    let flex = Device::flex();
    let dir = f32_dir(&root, "f32", ModelConfig::Llama(cfg.clone()), &cfg.init(&flex));
    let fresh = |name: &str| {
        let out = root.join(name);
        quantize_dir(&dir, &out, QuantType::Q8_0, &[]).unwrap();
        out
    };
    let error = |dir: &Path| match LoadedModel::open(dir, WhichWeights::Latest, &flex) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    // A NaN scale in row 1, block 0.
    let bad = fresh("nan-scale");
    let tensor = "model.layers.1.mlp.up_proj.packed";
    patch(&bad.join(MODEL_WEIGHTS), tensor, |b| {
        let row = 64 / 32 * 34;
        b[row..row + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    });
    let e = error(&bad);
    assert!(e.contains(tensor) && e.contains("row 1, block 0"), "{e}");
    // The config names a module the model lacks, or a format Kiln has no kernel for.
    let edit_config = |name: &str, from: &str, to: &str| {
        let d = fresh(name);
        let text = std::fs::read_to_string(d.join(CONFIG)).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(d.join(CONFIG), text.replacen(from, to, 1)).unwrap();
        d
    };
    let e = error(&edit_config(
        "no-such-module",
        "\"model.layers.1.self_attn.q_proj\"",
        "\"model.layers.7.self_attn.q_proj\"",
    ));
    assert!(
        e.contains("model.layers.7.self_attn.q_proj") && e.contains(CONFIG),
        "{e}"
    );
    let e = error(&edit_config(
        "unknown-format",
        "\"model.layers.0.mlp.down_proj\" = \"Q8_0\"",
        "\"model.layers.0.mlp.down_proj\" = \"Q5_K\"",
    ));
    assert!(e.contains("Q5_K") && e.contains("model.layers.0.mlp.down_proj"), "{e}");
    // The config says Q4_0, the file holds Q8_0 blocks: the shapes disagree.
    let e = error(&edit_config(
        "wrong-format",
        "\"model.layers.0.mlp.down_proj\" = \"Q8_0\"",
        "\"model.layers.0.mlp.down_proj\" = \"Q4_0\"",
    ));
    assert!(e.contains("model.layers.0.mlp.down_proj.packed"), "{e}");
}

/// `infer --kl-reference`'s figures (`perplexity::divergence`) against a direct
/// computation: one window scoring every position, each model's log-softmax from its
/// own forward pass, KL(f32 || quantized) per position in f64. And a model against
/// itself diverges by nothing.
#[test]
fn kl_divergence_matches_a_direct_computation() {
    use kiln_infer::perplexity::{PerplexityMethod, divergence, perplexity};
    let root = common::scratch_dir("quantized-kl");
    let flex = Device::flex();
    let cfg = llama();
    let dir = f32_dir(
        &root,
        "f32",
        ModelConfig::Llama(cfg.clone()),
        &kiln_core::rng::seeded_init(5, &flex, || cfg.init(&flex)),
    );
    quantize_dir(&dir, &root.join("q4"), QuantType::Q4_0, &[]).unwrap();
    let (reference, quantized) = (open(&dir, &flex), open(&root.join("q4"), &flex));
    let ids: Vec<u32> = TOKENS.iter().map(|&t| t as u32).collect();
    let whole = PerplexityMethod::Sliding {
        context: ids.len(),
        stride: ids.len(),
    };
    let d = divergence(lm(&quantized), lm(&reference), &ids, whole, None, &flex).unwrap();

    let log_softmax = |model: &dyn CausalLm| -> Vec<Vec<f64>> {
        logits(model, &flex)
            .chunks(VOCAB)
            .map(|row| {
                let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                row.iter().map(|&v| v as f64 - lse).collect()
            })
            .collect()
    };
    let (lq, lr) = (log_softmax(lm(&quantized)), log_softmax(lm(&reference)));
    // Position i predicts token i + 1: the last position predicts nothing.
    let n = ids.len() - 1;
    let kl: Vec<f64> = (0..n)
        .map(|i| lr[i].iter().zip(&lq[i]).map(|(r, q)| r.exp() * (r - q)).sum())
        .collect();
    let argmax = |row: &[f64]| (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
    let same = (0..n).filter(|&i| argmax(&lq[i]) == argmax(&lr[i])).count();
    let mean = kl.iter().sum::<f64>() / n as f64;
    let max = kl.iter().fold(0f64, |m, &v| m.max(v));
    eprintln!("KL mean {} (direct {mean}), max {} (direct {max})", d.kl_mean, d.kl_max);
    assert!(mean > 1e-4, "Q4_0 moves the distributions: {mean}");
    assert!(
        (d.kl_mean - mean).abs() <= 1e-4 * mean + 1e-7,
        "mean KL {} vs {mean}",
        d.kl_mean
    );
    assert!(
        (d.kl_max - max).abs() <= 1e-4 * max + 1e-7,
        "max KL {} vs {max}",
        d.kl_max
    );
    assert!(d.kl_max >= d.kl_p99 && d.kl_p99 >= d.kl_median && d.kl_median >= 0.0);
    assert_eq!(d.top1_agreement, same as f64 / n as f64);
    let alone = perplexity(lm(&quantized), &ids, whole, None, &flex).unwrap();
    assert_eq!(d.model.perplexity, alone.perplexity);

    let itself = divergence(lm(&reference), lm(&reference), &ids, whole, None, &flex).unwrap();
    assert!(itself.kl_max.abs() < 1e-9, "{}", itself.kl_max);
    assert_eq!(itself.top1_agreement, 1.0);
    assert_eq!(itself.model.perplexity, itself.reference.perplexity);
}

/// A half-precision model directory (`convert --dtype f16`) quantizes like an f32 one:
/// its weights are widened exactly before packing, the tensors left unpacked stay F16,
/// and the packed model's logits are those of the f32 weights' packing up to the f16
/// rounding of the weights.
#[test]
fn a_half_precision_directory_quantizes() {
    let root = common::scratch_dir("quantized-f16");
    let flex = Device::flex();
    let cfg = llama();
    let dir = f32_dir(&root, "f32", ModelConfig::Llama(cfg.clone()), &cfg.init(&flex));
    // The same directory with every weight stored as f16.
    let half_dir = root.join("f16");
    std::fs::create_dir_all(&half_dir).unwrap();
    for name in [CONFIG, TOKENIZER] {
        std::fs::copy(dir.join(name), half_dir.join(name)).unwrap();
    }
    let bytes = std::fs::read(dir.join(MODEL_WEIGHTS)).unwrap();
    std::fs::write(half_dir.join(MODEL_WEIGHTS), half_copy::f16_copy(&bytes)).unwrap();

    let q8_f32 = root.join("q8-from-f32");
    let q8_f16 = root.join("q8-from-f16");
    let mut from_f32 = quantize_dir(&dir, &q8_f32, QuantType::Q8_0, &[]).unwrap();
    let mut from_f16 = quantize_dir(&half_dir, &q8_f16, QuantType::Q8_0, &[]).unwrap();
    from_f32.packed.sort_by(|a, b| a.0.cmp(&b.0));
    from_f16.packed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(from_f16.packed, from_f32.packed);
    let packed = std::fs::read(q8_f16.join(MODEL_WEIGHTS)).unwrap();
    let packed = safetensors::SafeTensors::deserialize(&packed).unwrap();
    let norm = packed.tensor("model.norm.gamma").unwrap();
    assert_eq!(
        norm.dtype(),
        safetensors::Dtype::F16,
        "unpacked tensors keep their dtype"
    );

    let [half, q8_half, q8_full] = [&half_dir, &q8_f16, &q8_f32].map(|d| logits(lm(&open(d, &flex)), &flex));
    let (to_own, to_f32s) = (rel_l2(&q8_half, &half), rel_l2(&q8_half, &q8_full));
    eprintln!("f16 -> Q8_0: rel L2 {to_own:.2e} to the f16 model, {to_f32s:.2e} to the f32 model's Q8_0");
    assert!(to_own < 0.05 && to_f32s < 0.02, "{to_own} {to_f32s}");
}
