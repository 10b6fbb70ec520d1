//! The training loop on real data: loss goes down, runs are deterministic, configs are
//! validated, the optimizer pieces do what they claim.

mod common;

use std::path::Path;

use burn::prelude::*;
use kiln_core::ConfigError;
use kiln_core::{BackendKind, Selected};
use kiln_train::config::{OptimConfig, RunConfig};
use kiln_train::metrics::read_metrics;
use kiln_train::run::{prepare_run_dir, run_training};
use kiln_train::training::{TrainOptions, TrainSummary};

fn train_toml(toml: &str, run_dir: &Path) -> TrainSummary {
    let cfg = RunConfig::parse(toml, Path::new("test.toml"), &[]).unwrap();
    let cfg = prepare_run_dir(run_dir, Some(&cfg), false, &[]).unwrap();
    let backend = Selected::new(BackendKind::Flex, 0).unwrap();
    let options = TrainOptions {
        run_dir: run_dir.to_path_buf(),
        resume: false,
        progress: false,
    };
    run_training(cfg, &backend, &options).unwrap()
}

fn first_and_last_val_loss(run_dir: &Path) -> (f64, f64) {
    let m = read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    (m.first().unwrap().val_loss, m.last().unwrap().val_loss)
}

/// 30 steps on Shakespeare take both language models well below the uniform loss
/// ln(vocab) and lower the validation loss between the first and last evaluation.
#[test]
fn thirty_steps_lower_the_loss_of_both_language_models() {
    for arch in ["gpt2", "llama"] {
        let dir = tempfile::tempdir().unwrap();
        let summary = train_toml(&common::tiny_lm_toml(arch, 30), dir.path());
        let (first, last) = first_and_last_val_loss(dir.path());
        let vocab = kiln_data::Tokenizer::load(&dir.path().join("tokenizer.json"))
            .unwrap()
            .vocab_size();
        let uniform = (vocab as f64).ln();
        assert!(last < first, "{arch}: val loss did not go down: {first} -> {last}");
        assert!(
            summary.final_val_loss < uniform - 0.8,
            "{arch}: {} vs uniform {uniform}",
            summary.final_val_loss
        );
        for file in [
            "config.toml",
            "run.json",
            "tokenizer.json",
            "model.safetensors",
            "best.safetensors",
            "metrics.jsonl",
            "loss.png",
            "summary.json",
        ] {
            assert!(dir.path().join(file).is_file(), "{arch}: run directory lacks {file}");
        }
        let png = std::fs::read(dir.path().join("loss.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}

#[test]
fn thirty_steps_train_the_image_models() {
    for arch in ["mlp", "cnn"] {
        let dir = tempfile::tempdir().unwrap();
        let summary = train_toml(&common::tiny_image_toml(arch, 30), dir.path());
        let (first, last) = first_and_last_val_loss(dir.path());
        assert!(last < first, "{arch}: {first} -> {last}");
        let acc = summary.final_val_accuracy.unwrap();
        assert!(acc > 0.3, "{arch}: test accuracy {acc} after 30 steps (chance is 0.1)");
    }
}

/// Same seed, same backend: the same metrics, bit for bit.
#[test]
fn training_is_deterministic_on_cpu() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_toml(&common::tiny_lm_toml("gpt2", 20), a.path());
    train_toml(&common::tiny_lm_toml("gpt2", 20), b.path());
    let strip = |dir: &Path| -> Vec<(usize, f64, f64, f64, f64)> {
        read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|r| (r.step, r.train_loss, r.val_loss, r.lr, r.grad_norm))
            .collect()
    };
    assert_eq!(strip(a.path()), strip(b.path()));
    common::assert_same_tensors(
        &std::fs::read(a.path().join("model.safetensors")).unwrap(),
        &std::fs::read(b.path().join("model.safetensors")).unwrap(),
    );
}

#[test]
fn a_run_directory_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    train_toml(&common::tiny_lm_toml("gpt2", 10), dir.path());
    let cfg = RunConfig::parse(&common::tiny_lm_toml("gpt2", 10), Path::new("t.toml"), &[]).unwrap();
    let err = prepare_run_dir(dir.path(), Some(&cfg), false, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
}

fn config_error(toml: &str, overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match RunConfig::parse(toml, Path::new("configs/bad.toml"), &overrides) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("config was accepted: {toml} {overrides:?}"),
    }
}

#[test]
fn bad_configs_name_the_key_and_the_file() {
    let good = common::tiny_lm_toml("gpt2", 10);
    let cases: &[(&str, &[&str], &[&str])] = &[
        // unknown key
        (
            &good.replace("batch_size", "batchsize"),
            &[],
            &["configs/bad.toml", "batchsize"],
        ),
        (&good, &["train.learning_rate=0.1"], &["learning_rate"]),
        (&good, &["model.n_layers=3"], &["n_layers"]),
        // wrong type
        (&good, &["train.max_steps=\"many\""], &["train.max_steps"]),
        // impossible values
        (&good, &["model.n_embd=31"], &["model.n_embd", "n_head"]),
        (&good, &["train.batch_size=0"], &["train.batch_size"]),
        (&good, &["optim.lr=-1"], &["optim.lr"]),
        (&good, &["data.val_fraction=1.5"], &["data.val_fraction"]),
        (&good, &["data.tokenizer=words"], &["data.tokenizer"]),
        (&good, &["model.arch=transformer"], &["transformer"]),
        // a language model on image data
        (&good.replace("kind = \"text\"", "kind = \"idx\""), &[], &["data.kind"]),
    ];
    for (toml, overrides, needles) in cases {
        let msg = config_error(toml, overrides);
        assert!(msg.contains("configs/bad.toml"), "{msg}");
        for n in *needles {
            assert!(msg.contains(n), "{overrides:?}: error {msg:?} does not mention {n:?}");
        }
    }
    assert!(matches!(
        RunConfig::parse(&good, Path::new("x.toml"), &["nonsense".into()]),
        Err(ConfigError::BadOverride(_))
    ));
}

#[test]
fn overrides_change_typed_values() {
    let cfg = RunConfig::parse(
        &common::tiny_lm_toml("gpt2", 10),
        Path::new("t.toml"),
        &[
            "train.max_steps=123".into(),
            "optim.lr=0.5".into(),
            "model.n_layer=3".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.train.max_steps, 123);
    assert_eq!(cfg.optim.lr, 0.5);
    assert!(matches!(cfg.model, kiln_models::ModelConfig::Gpt2(ref g) if g.n_layer == 3));
}

#[test]
fn every_shipped_config_loads() {
    let dir = common::repo_root().join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("finetune-") {
            kiln_train::finetune::FinetuneConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        } else if name.ends_with(".toml") {
            RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 6);
}

#[test]
fn warmup_then_cosine_schedule() {
    let o = OptimConfig {
        lr: 1e-3,
        min_lr: Some(1e-4),
        warmup_steps: 10,
        ..OptimConfig::default()
    };
    assert!((o.lr_at(0, 100) - 1e-4).abs() < 1e-12);
    assert!((o.lr_at(9, 100) - 1e-3).abs() < 1e-12);
    assert!((o.lr_at(10, 100) - 1e-3).abs() < 1e-12);
    assert!((o.lr_at(55, 100) - 5.5e-4).abs() < 1e-9, "{}", o.lr_at(55, 100));
    assert!((o.lr_at(100, 100) - 1e-4).abs() < 1e-12);
    assert!(o.lr_at(40, 100) > o.lr_at(41, 100));
}

/// Clipping scales all gradients together so that their joint L2 norm is the limit.
#[test]
fn global_norm_clipping_scales_all_gradients_together() {
    use burn::optim::GradientsParams;
    use kiln_train::optim::{clip_global_norm, global_grad_norm};
    let device = Device::flex().autodiff();
    let model = kiln_models::MlpConfig {
        hidden_sizes: vec![4],
        input_shape: [1, 2, 2],
        num_classes: 3,
        dropout: 0.0,
    }
    .init(&device);
    let x = Tensor::<4>::ones([2, 1, 2, 2], &device) * 10.0;
    let loss = kiln_models::ImageClassifier::forward(&model, x).powi_scalar(2).sum();
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    let before = global_grad_norm(&model, &grads);
    assert!(before > 1.0, "{before}");
    let reported = clip_global_norm(&model, &mut grads, 1.0);
    assert!((reported - before).abs() < 1e-9);
    let after = global_grad_norm(&model, &grads);
    assert!((after - 1.0).abs() < 1e-3, "norm after clipping: {after}");
    // Below the limit nothing changes.
    let again = clip_global_norm(&model, &mut grads, 10.0);
    assert!((again - after).abs() < 1e-9);
}

/// Every parameter of every architecture receives a gradient (a parameter created
/// without `require_grad` would silently never train).
#[test]
fn every_parameter_receives_a_gradient() {
    use burn::optim::GradientsParams;
    use kiln_models::{CausalLm, ImageClassifier};
    let d = Device::flex().autodiff();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [2, 3]), &d);
    let gpt2 = kiln_models::Gpt2Config {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        block_size: 4,
        vocab_size: 7,
        dropout: 0.0,
        bias: true,
        layer_norm_epsilon: 1e-5,
        activation: Default::default(),
    }
    .init(&d);
    let grads = GradientsParams::from_grads(
        CausalLm::forward(&gpt2, tokens.clone()).powi_scalar(2).sum().backward(),
        &gpt2,
    );
    assert_eq!(grads.len(), gpt2.num_params_tensors(), "gpt2");
    let llama = kiln_models::LlamaConfig {
        n_layer: 2,
        n_head: 2,
        n_kv_head: 1,
        n_embd: 8,
        intermediate_size: 12,
        block_size: 4,
        vocab_size: 7,
        rope_theta: 1e4,
        rms_norm_eps: 1e-5,
        ..Default::default()
    }
    .init(&d);
    let grads = GradientsParams::from_grads(
        CausalLm::forward(&llama, tokens).powi_scalar(2).sum().backward(),
        &llama,
    );
    assert_eq!(grads.len(), llama.num_params_tensors(), "llama");
    let images = Tensor::<4>::ones([2, 1, 28, 28], &d);
    let cnn = kiln_models::CnnConfig {
        channels: [2, 2],
        hidden_size: 4,
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    }
    .init(&d);
    let grads = GradientsParams::from_grads(
        ImageClassifier::forward(&cnn, images.clone())
            .powi_scalar(2)
            .sum()
            .backward(),
        &cnn,
    );
    assert_eq!(grads.len(), cnn.num_params_tensors(), "cnn");
    let mlp = kiln_models::MlpConfig {
        hidden_sizes: vec![4],
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    }
    .init(&d);
    let grads = GradientsParams::from_grads(
        ImageClassifier::forward(&mlp, images).powi_scalar(2).sum().backward(),
        &mlp,
    );
    assert_eq!(grads.len(), mlp.num_params_tensors(), "mlp");
}

trait CountTensors {
    fn num_params_tensors(&self) -> usize;
}

impl<M: burn::module::Module> CountTensors for M {
    fn num_params_tensors(&self) -> usize {
        kiln_core::weights::expected_shapes(self).len()
    }
}

/// `tokenizer = "bpe:<vocab>"` trains a byte-level BPE on the training split; the run
/// stores it as a Hugging Face tokenizer.json that a later run can name as its tokenizer.
#[test]
fn bpe_tokenizer_is_trained_saved_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::tiny_lm_toml("gpt2", 10).replace("kind = \"text\"", "kind = \"text\"\ntokenizer = \"bpe:300\"");
    train_toml(&toml, &dir.path().join("a"));
    let saved = dir.path().join("a/tokenizer.json");
    let tok = kiln_data::Tokenizer::load(&saved).unwrap();
    assert!(matches!(tok, kiln_data::Tokenizer::Hf(_)));
    assert_eq!(tok.vocab_size(), 300);
    let text = "ROMEO: But soft, what light through yonder window breaks?\n";
    let ids = tok.encode(text).unwrap();
    assert!(
        ids.len() < text.len(),
        "BPE merges characters: {} ids for {} chars",
        ids.len(),
        text.len()
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // A second run names the saved file and gets the same vocabulary.
    let toml = common::tiny_lm_toml("gpt2", 10).replace(
        "kind = \"text\"",
        &format!("kind = \"text\"\ntokenizer = {:?}", saved.display().to_string()),
    );
    train_toml(&toml, &dir.path().join("b"));
    let again = kiln_data::Tokenizer::load(&dir.path().join("b/tokenizer.json")).unwrap();
    assert_eq!(again.encode(text).unwrap(), ids);
}

#[test]
fn char_tokenizer_round_trips_the_corpus() {
    let text = kiln_data::text::read_corpus(&common::shakespeare()).unwrap();
    let tok = kiln_data::Tokenizer::build(&kiln_data::TokenizerSpec::Char, &text).unwrap();
    // 52 letters, digits, punctuation and whitespace of the eight plays.
    assert_eq!(tok.vocab_size(), 78);
    let sample: String = text.chars().take(5000).collect();
    assert_eq!(tok.decode(&tok.encode(&sample).unwrap()).unwrap(), sample);
    assert!(
        tok.encode("\u{263A}")
            .unwrap_err()
            .to_string()
            .contains("not in the vocabulary")
    );
}

/// The IDX reader checks its header against the data it holds.
#[test]
fn idx_reader_rejects_bad_files() {
    use kiln_data::idx::parse;
    let mut good = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    good.extend([1u8; 8]);
    assert_eq!(parse(&good).unwrap().dims, vec![2, 2, 2]);
    assert!(parse(&good[..good.len() - 1]).unwrap_err().contains("header says"));
    assert!(parse(b"PK\x03\x04").unwrap_err().contains("magic"));
    let mut floats = good.clone();
    floats[2] = 0x0d;
    assert!(parse(&floats).unwrap_err().contains("0x0d"));
    let data = kiln_data::ImageDataset::load(&common::fashion_small(), 0, 0).unwrap();
    assert_eq!((data.train.len(), data.test.len(), data.num_classes), (2000, 500, 10));
}
