//! The `infer` binary on a freshly trained run: streamed KV-cached generation, its
//! equality with uncached generation, image classification, and clear errors.
//! (Compiled as a test of the `infer` package, which provides CARGO_BIN_EXE_infer.)

mod common;

use common::assert_clean_failure;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kiln_core::{BackendKind, Selected};
use kiln_train::config::RunConfig;
use kiln_train::run::{prepare_run_dir, run_training};
use kiln_train::training::TrainOptions;

fn train_into(toml: &str, dir: &Path) {
    let cfg = RunConfig::parse(toml, Path::new("t.toml"), &[]).unwrap();
    let cfg = prepare_run_dir(dir, Some(&cfg), false, &[]).unwrap();
    let backend = Selected::new(BackendKind::Flex, 0).unwrap();
    run_training(
        cfg,
        &backend,
        &TrainOptions {
            run_dir: dir.to_path_buf(),
            resume: false,
            progress: false,
        },
    )
    .unwrap();
}

/// Trained once per test binary: a tiny GPT-2, a tiny Llama and a tiny CNN.
fn runs() -> &'static (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    static RUNS: OnceLock<(tempfile::TempDir, PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    RUNS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (gpt2, llama, cnn) = (
            dir.path().join("gpt2"),
            dir.path().join("llama"),
            dir.path().join("cnn"),
        );
        train_into(&common::tiny_lm_toml("gpt2", 40), &gpt2);
        train_into(&common::tiny_lm_toml("llama", 40), &llama);
        train_into(&common::tiny_image_toml("cnn", 30), &cnn);
        (dir, gpt2, llama, cnn)
    })
}

fn infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infer"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .current_dir(common::repo_root())
        .output()
        .expect("infer runs")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn generates_streams_and_reports_throughput() {
    let (_, gpt2, _, _) = runs();
    let out = infer(&[
        "--checkpoint",
        gpt2.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "20",
        "--top-k",
        "10",
        "--top-p",
        "0.9",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("ROMEO:"), "{stdout}");
    assert_eq!(
        stdout.trim_end_matches('\n').chars().count(),
        "ROMEO:".len() + 20,
        "{stdout:?}"
    );
    let err = text(&out.stderr);
    assert!(err.contains("tokens/s") && err.contains("KV cache"), "{err}");
}

/// Greedy decoding with the KV cache and without it produce the same tokens.
#[test]
fn cached_and_uncached_greedy_generation_agree() {
    let (_, gpt2, llama, _) = runs();
    for run in [gpt2, llama] {
        let args = |cache: bool| {
            let mut a = vec![
                "--checkpoint",
                run.to_str().unwrap(),
                "--prompt",
                "KING",
                "--max-new-tokens",
                "24",
                "--temperature",
                "0",
            ];
            if !cache {
                a.push("--no-cache");
            }
            infer(&a)
        };
        let (cached, uncached) = (args(true), args(false));
        assert!(
            cached.status.success() && uncached.status.success(),
            "{}",
            text(&cached.stderr)
        );
        assert_eq!(text(&cached.stdout), text(&uncached.stdout));
    }
}

/// Past the context the window slides and generation goes on.
#[test]
fn generates_past_the_context() {
    let (_, gpt2, llama, _) = runs();
    for run in [gpt2, llama] {
        let out = infer(&[
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            "A",
            "--max-new-tokens",
            "100",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim_end_matches('\n').chars().count(), 101);
    }
}

#[test]
fn classifies_a_png_image() {
    let (_, _, _, cnn) = runs();
    // A real test image written as an 8-bit grayscale PNG.
    let images = kiln_data::idx::read(&common::fashion_small().join("t10k-images-idx3-ubyte.gz")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("item.png");
    image::GrayImage::from_raw(28, 28, images.data[..784].to_vec())
        .unwrap()
        .save(&png)
        .unwrap();
    let out = infer(&[
        "--checkpoint",
        cnn.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--top",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.contains('%')).count(), 2);
    let out = infer(&["--checkpoint", cnn.to_str().unwrap(), "--image", "no-such.png"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no-such.png"));
}

#[test]
fn classifies_an_idx_image() {
    let (_, _, _, cnn) = runs();
    let idx = common::fashion_small().join("t10k-images-idx3-ubyte.gz");
    let out = infer(&[
        "--checkpoint",
        cnn.to_str().unwrap(),
        "--idx",
        idx.to_str().unwrap(),
        "--index",
        "3",
        "--top",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.contains('%')).count(), 3, "{stdout}");
    let out = infer(&[
        "--checkpoint",
        cnn.to_str().unwrap(),
        "--idx",
        idx.to_str().unwrap(),
        "--index",
        "99999",
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("out of range"));
}

#[test]
fn bad_input_gets_clear_errors() {
    let (_, gpt2, _, _) = runs();
    let ckpt = gpt2.to_str().unwrap();
    let long = "a".repeat(33);
    assert_clean_failure(
        &infer(&["--checkpoint", ckpt, "--prompt", &long]),
        &["33 tokens", "context of 32"],
    );
    assert_clean_failure(&infer(&["--checkpoint", ckpt, "--prompt", ""]), &["prompt is empty"]);
    assert_clean_failure(
        &infer(&["--checkpoint", ckpt, "--prompt", "\u{263A}"]),
        &["not in the vocabulary"],
    );
    assert_clean_failure(
        &infer(&["--checkpoint", "runs/does-not-exist", "--prompt", "A"]),
        &["runs/does-not-exist"],
    );
    assert_clean_failure(
        &infer(&["--checkpoint", ckpt, "--prompt", "A", "--top-p", "2"]),
        &["--top-p"],
    );

    // A checkpoint whose shapes do not match its config.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.toml", "tokenizer.json", "best.safetensors"] {
        std::fs::copy(gpt2.join(f), dir.path().join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.path().join("config.toml"))
        .unwrap()
        .replace("n_embd = 32", "n_embd = 64");
    std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
    assert_clean_failure(
        &infer(&["--checkpoint", dir.path().to_str().unwrap(), "--prompt", "A"]),
        &["best.safetensors", "does not match the model", "transformer.wte.weight"],
    );
    // A truncated checkpoint.
    std::fs::copy(gpt2.join("config.toml"), dir.path().join("config.toml")).unwrap();
    let bytes = std::fs::read(gpt2.join("best.safetensors")).unwrap();
    std::fs::write(dir.path().join("best.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_failure(
        &infer(&["--checkpoint", dir.path().to_str().unwrap(), "--prompt", "A"]),
        &["not a valid safetensors file"],
    );
}
