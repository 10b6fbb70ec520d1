//! The `finetune` binary on the real pretrained all-MiniLM-L6-v2 (scripts/fetch-minilm.sh)
//! and slices of the real Rotten Tomatoes split (scripts/fetch-sentiment.sh): full, frozen
//! and LoRA fine-tuning, what each trains, the files a run leaves, `infer --text` on the
//! result, resume, a language-model fine-tune, and clear errors for bad input.
//! (Compiled as a test of the `finetune` package, which provides CARGO_BIN_EXE_finetune.)

mod common;
#[path = "common/sentiment.rs"]
mod sentiment;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::assert_clean_failure;
use kiln_core::{BackendKind, Selected};
use kiln_train::config::RunConfig;
use kiln_train::run::run_training;
use kiln_train::training::TrainOptions;

fn finetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finetune"))
        .current_dir(common::repo_root())
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .output()
        .expect("finetune runs")
}

fn infer(args: &[&str]) -> Output {
    let infer = PathBuf::from(env!("CARGO_BIN_EXE_finetune")).with_file_name("infer");
    assert!(
        infer.exists(),
        "build the workspace first: {} is missing",
        infer.display()
    );
    Command::new(infer)
        .current_dir(common::repo_root())
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .output()
        .expect("infer runs")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small sentiment config over slices of the real split (48 / 16 / 16 rows).
fn sentiment_toml(dir: &Path, method: &str, steps: usize) -> PathBuf {
    let (train, val, test) = (
        sentiment::slice("train", 48, dir),
        sentiment::slice("validation", 16, dir),
        sentiment::slice("test", 16, dir),
    );
    let text = format!(
        "init_from = {:?}\ntask = \"classify\"\nmethod = \"{method}\"\nmax_length = 64\n\n\
         [head]\ndropout = 0.0\n\n[lora]\nrank = 4\nalpha = 8.0\ntargets = [\"query\", \"value\"]\n\n\
         [data]\nkind = \"csv\"\ntrain = {train:?}\nvalidation = {val:?}\ntest = {test:?}\n\
         label_column = \"category\"\ndrop_labels = [\"plot\"]\nempty_text = \"drop\"\n\n\
         [train]\nseed = 3\nbatch_size = 8\nmax_steps = {steps}\neval_interval = 2\nlog_interval = 1\n\n\
         [optim]\nlr = 1e-4\nwarmup_steps = 1\ndecay_steps = 8\nweight_decay = 0.01\n\n\
         [[optim.groups]]\npattern = '^classifier\\.'\nlr = 1e-3\n",
        common::minilm_kiln()
    );
    common::write(dir, &format!("{method}.toml"), &text)
}

fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn report(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("finetune.json")).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn full_fine_tune_reports_test_metrics_and_infer_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentiment_toml(dir.path(), "full", 4);
    let run = dir.path().join("run");
    ok(&finetune(&["--config", s(&cfg), "--out", s(&run), "--quiet"]));
    let r = report(&run);
    assert_eq!(r["labels"], serde_json::json!(["fresh", "rotten"]));
    assert_eq!(r["trainable_params"], r["total_params"]);
    let test = &r["test"];
    let n = test["n"].as_u64().unwrap();
    assert!(n > 0 && n <= 16, "plot rows are dropped: {n}");
    let acc = test["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc) && test["macro_f1"].as_f64().unwrap() <= 1.0);
    assert!(r["initial_val_loss"].as_f64().unwrap() > 0.0);
    assert!(r["epoch_time_s"].as_f64().unwrap() > 0.0 && r["peak_rss_mib"].as_f64().unwrap() > 0.0);
    for file in [
        "config.toml",
        "finetune.toml",
        "tokenizer.json",
        "best.safetensors",
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
    ] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    // The run directory is a classifier `infer` opens; a text file gives one line each.
    let texts = common::write(
        dir.path(),
        "texts.txt",
        "A triumph, warm and funny.\nTedious and badly acted.\n",
    );
    let out = ok(&infer(&[
        "--checkpoint",
        s(&run),
        "--text",
        "One of the best films of the year.",
        "--text-file",
        s(&texts),
    ]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["text"], "A triumph, warm and funny.");
    for line in &lines {
        let probs = line["probabilities"].as_object().unwrap();
        let total: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{line}");
        let label = line["label"].as_str().unwrap();
        let best = probs
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(label, best);
    }
    // Bad inference input: an empty line, no text at all.
    let empty = common::write(dir.path(), "empty.txt", "fine\n\n");
    assert_clean_failure(
        &infer(&["--checkpoint", s(&run), "--text-file", s(&empty)]),
        &["empty.txt:2", "empty"],
    );
    assert_clean_failure(&infer(&["--checkpoint", s(&run)]), &["--text"]);
}

#[test]
fn frozen_trains_only_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentiment_toml(dir.path(), "frozen", 2);
    let run = dir.path().join("run");
    ok(&finetune(&["--config", s(&cfg), "--out", s(&run), "--quiet"]));
    assert_eq!(report(&run)["trainable_params"], 384 * 2 + 2);
    let pretrained = tensors(&common::minilm_kiln().join("model.safetensors"));
    let tuned = tensors(&run.join("model.safetensors"));
    for (name, value) in &pretrained {
        assert_eq!(Some(value), tuned.get(&format!("bert.{name}")), "{name} changed");
    }
    assert!(
        tuned["classifier.weight"].1.iter().any(|&w| w != 0.0),
        "the head did not train"
    );
}

#[test]
fn lora_saves_the_adapter_alone_and_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentiment_toml(dir.path(), "lora", 2);
    let run = dir.path().join("run");
    ok(&finetune(&["--config", s(&cfg), "--out", s(&run), "--quiet"]));
    // Adapters on query and value of 6 layers: A [384, 4] + B [4, 384] each, plus the head.
    assert_eq!(report(&run)["trainable_params"], 12 * 2 * 384 * 4 + 384 * 2 + 2);
    let adapter = tensors(&run.join("model.adapter.safetensors"));
    assert_eq!(adapter.len(), 24, "{:?}", adapter.keys());
    assert!(adapter.keys().all(|k| k.contains(".lora.")));
    let merged = tensors(&run.join("model.safetensors"));
    assert!(merged.keys().all(|k| !k.contains(".lora.")));
    let pretrained = tensors(&common::minilm_kiln().join("model.safetensors"));
    let base = |name: &str| &pretrained[name.strip_prefix("bert.").unwrap()].1;
    // Untargeted weights are the pretrained ones, bit for bit.
    let key = "bert.encoder.layer.0.attention.self_attn.key.weight";
    assert_eq!(&merged[key].1, base(key));
    // A targeted weight is base + (alpha / rank) * A @ B.
    let q = "bert.encoder.layer.0.attention.self_attn.query.weight";
    let (a, b) = (&adapter[&format!("{q}.lora.a")], &adapter[&format!("{q}.lora.b")]);
    let (d_in, rank, d_out) = (a.0[0], a.0[1], b.0[1]);
    let scale = 8.0 / 4.0;
    let mut max_err = 0f32;
    let mut max_delta = 0f32;
    for i in 0..d_in {
        for j in 0..d_out {
            let delta: f32 = (0..rank).map(|r| a.1[i * rank + r] * b.1[r * d_out + j]).sum::<f32>() * scale;
            let expected = base(q)[i * d_out + j] + delta;
            max_err = max_err.max((merged[q].1[i * d_out + j] - expected).abs());
            max_delta = max_delta.max(delta.abs());
        }
    }
    assert!(max_delta > 0.0, "the adapter did not train");
    assert!(max_err < 1e-5, "merged != base + scale * A @ B: {max_err}");
    // The merged classifier is what `infer` loads.
    ok(&infer(&["--checkpoint", s(&run), "--text", "Lovely."]));
}

#[test]
fn lora_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentiment_toml(dir.path(), "lora", 4);
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    ok(&finetune(&["--config", s(&cfg), "--out", s(&whole), "--quiet"]));
    ok(&finetune(&[
        "--config",
        s(&cfg),
        "--out",
        s(&split),
        "--quiet",
        "--set",
        "train.max_steps=2",
    ]));
    ok(&finetune(&[
        "--out",
        s(&split),
        "--resume",
        "--quiet",
        "--set",
        "train.max_steps=4",
    ]));
    for file in ["model.safetensors", "model.adapter.safetensors"] {
        common::assert_same_tensors(
            &std::fs::read(whole.join(file)).unwrap(),
            &std::fs::read(split.join(file)).unwrap(),
        );
    }
}

/// A tiny GPT-2 trained by `train` (in process) on the eight plays.
fn tiny_lm_run(dir: &Path) -> PathBuf {
    let run = dir.join("base");
    let cfg = RunConfig::parse(&common::tiny_lm_toml("gpt2", 10), Path::new("tiny.toml"), &[]).unwrap();
    let backend = Selected::new(BackendKind::Flex, 0).unwrap();
    let options = TrainOptions {
        run_dir: run.clone(),
        resume: false,
        progress: false,
    };
    std::fs::create_dir_all(&run).unwrap();
    run_training(cfg, &backend, &options).unwrap();
    run
}

fn lm_toml(dir: &Path, init_from: &Path, method: &str) -> PathBuf {
    let text = format!(
        "init_from = {init_from:?}\ntask = \"lm\"\nmethod = \"{method}\"\n[lora]\ntargets = [\"c_attn\"]\n\n\
         [data]\nkind = \"text\"\npath = {:?}\n\n\
         [train]\nseed = 7\nbatch_size = 8\nmax_steps = 6\neval_interval = 3\neval_iters = 4\n\n\
         [optim]\nlr = 1e-3\nwarmup_steps = 2\n",
        common::repo_root().join("datasets/shakespeare-poems")
    );
    common::write(dir, &format!("lm-{method}.toml"), &text)
}

#[test]
fn language_model_fine_tunes_on_new_text() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_lm_run(dir.path());
    for method in ["full", "lora"] {
        let run = dir.path().join(method);
        // LoRA's B factor starts at zero: it needs a larger step to move in six steps.
        let lr = if method == "lora" {
            "optim.lr=1e-2"
        } else {
            "optim.lr=1e-3"
        };
        ok(&finetune(&[
            "--config",
            s(&lm_toml(dir.path(), &base, method)),
            "--out",
            s(&run),
            "--quiet",
            "--set",
            lr,
        ]));
        let r = report(&run);
        let (before, after) = (
            r["initial_val_loss"].as_f64().unwrap(),
            r["train"]["best_val_loss"].as_f64().unwrap(),
        );
        assert!(after < before, "{method}: validation loss {before} -> {after}");
        // The tuned model samples with the base model's tokenizer.
        ok(&infer(&[
            "--checkpoint",
            s(&run),
            "--prompt",
            "Shall I",
            "--max-new-tokens",
            "5",
        ]));
    }
    assert_clean_failure(
        &finetune(&[
            "--config",
            s(&lm_toml(dir.path(), &base, "frozen")),
            "--out",
            s(&dir.path().join("x")),
        ]),
        &["lm-frozen.toml", "method", "head"],
    );
    // A language model is not an encoder to put a classifier on.
    let cfg = sentiment_toml(dir.path(), "full", 2);
    assert_clean_failure(
        &finetune(&[
            "--config",
            s(&cfg),
            "--set",
            &format!("init_from={:?}", s(&base)),
            "--out",
            s(&dir.path().join("y")),
        ]),
        &["holds a gpt2 model", "classify"],
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentiment_toml(dir.path(), "lora", 2);
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |extra: &[&str], name: &str| {
        let mut args = vec!["--config", s(&cfg), "--out"];
        let out = out(name);
        args.push(&out);
        args.extend_from_slice(extra);
        finetune(&args)
    };
    // A LoRA target that matches no weight.
    assert_clean_failure(
        &run(&["--set", "lora.targets=[\"qkv_proj\"]"], "a"),
        &["lora.targets[0]", "qkv_proj", "matches no parameter"],
    );
    assert_clean_failure(&run(&["--set", "lora.dropout=0.1"], "b"), &["lora.dropout"]);
    assert_clean_failure(&run(&["--set", "freeze=[\"(\"]"], "c"), &["freeze[0]"]);
    // A text longer than max_length, when cutting is refused.
    assert_clean_failure(
        &run(&["--set", "max_length=8", "--set", "truncation=\"error\""], "d"),
        &["train.csv", "line", "max_length = 8"],
    );
    // An unseen label in the test file.
    let test = dir.path().join("test.csv");
    let mut text = std::fs::read_to_string(&test).unwrap();
    text.push_str("meh,\"An unseen label.\",x,False\n");
    std::fs::write(&test, text).unwrap();
    assert_clean_failure(
        &run(&[], "e"),
        &["test.csv", "\"meh\"", "does not occur in the training file"],
    );
    // An empty text, when empty texts are errors.
    let mut text = std::fs::read_to_string(&test)
        .unwrap()
        .replace("meh,\"An unseen label.\"", "fresh,\"  \"");
    text.push('\n');
    std::fs::write(&test, text).unwrap();
    assert_clean_failure(
        &run(&["--set", "data.empty_text=\"error\""], "f"),
        &["test.csv", "line", "empty"],
    );
    // init_from that is not a model directory.
    assert_clean_failure(
        &run(&["--set", "init_from=\"datasets/shakespeare\""], "g"),
        &["datasets/shakespeare"],
    );
    for name in ["a", "b", "c", "d", "e", "f", "g"] {
        assert!(
            !Path::new(&out(name)).join("best.safetensors").exists(),
            "a refused run left weights in {name}"
        );
    }
}
