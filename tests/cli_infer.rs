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
fn runs() -> &'static (PathBuf, PathBuf, PathBuf, PathBuf) {
    static RUNS: OnceLock<(PathBuf, PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    RUNS.get_or_init(|| {
        let dir = common::scratch_dir("cli-infer-runs");
        let (gpt2, llama, cnn) = (dir.join("gpt2"), dir.join("llama"), dir.join("cnn"));
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

#[test]
fn image_class_names_are_saved_with_the_run_and_printed() {
    const NAMES: [&str; 10] = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ];
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mlp");
    let labels = NAMES.map(|n| format!("{n:?}")).join(", ");
    let toml = common::tiny_image_toml("mlp", 10)
        .replace("kind = \"idx\"\n", &format!("kind = \"idx\"\nlabels = [{labels}]\n"));
    train_into(&toml, &run);
    let saved: Vec<String> = serde_json::from_str(&std::fs::read_to_string(run.join("labels.json")).unwrap()).unwrap();
    assert_eq!(saved, NAMES);
    let idx = common::fashion_small().join("t10k-images-idx3-ubyte.gz");
    let args = [
        "--checkpoint",
        run.to_str().unwrap(),
        "--idx",
        idx.to_str().unwrap(),
        "--top",
        "10",
    ];
    let out = infer(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for name in NAMES {
        assert!(stdout.contains(name), "{name} missing from {stdout}");
    }
    assert!(!stdout.contains("class "), "{stdout}");
    // Without names (the tiny CNN's config gives none) classes are numbered.
    let (_, _, _, cnn) = runs();
    let out = infer(&["--checkpoint", cnn.to_str().unwrap(), "--idx", idx.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("class "), "{}", text(&out.stdout));
    // A labels.json that does not fit the model is an error naming it.
    std::fs::write(run.join("labels.json"), r#"["a", "b"]"#).unwrap();
    assert_clean_failure(&infer(&args), &["labels.json", "names 2 classes", "10"]);
}

#[test]
fn a_prompt_file_is_generated_as_one_batch_each_line_as_it_would_be_alone() {
    let (_, gpt2, _, _) = runs();
    let dir = tempfile::tempdir().unwrap();
    let prompts = ["ROMEO:", "To be", "KING HENRY:"];
    let file = common::write(dir.path(), "prompts.txt", &(prompts.join("\n") + "\n"));
    let ckpt = gpt2.to_str().unwrap();
    let sampling = [
        "--temperature",
        "0.8",
        "--top-k",
        "10",
        "--seed",
        "5",
        "--max-new-tokens",
        "12",
    ];
    let out = infer(
        &[
            &["--checkpoint", ckpt, "--prompt-file", file.to_str().unwrap()],
            &sampling[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, prompt) in lines.iter().zip(prompts) {
        assert_eq!(line["prompt"], prompt);
        assert_eq!(line["finish_reason"], "length");
        assert_eq!(line["new_tokens"], 12);
        // The same prompt alone, streamed with --prompt.
        let alone = infer(&[&["--checkpoint", ckpt, "--prompt", prompt], &sampling[..]].concat());
        let alone = text(&alone.stdout);
        assert_eq!(
            alone.trim_end_matches('\n'),
            format!("{prompt}{}", line["text"].as_str().unwrap())
        );
        assert!(
            text(&infer(&[&["--checkpoint", ckpt, "--prompt", prompt], &sampling[..]].concat()).stderr)
                .contains("finish_reason length")
        );
    }
    // A stop string ends a line with finish_reason "stop" and is not in its text.
    let first = lines[0]["text"].as_str().unwrap();
    let stop: String = first.chars().skip(3).take(2).collect();
    let out = infer(
        &[
            &[
                "--checkpoint",
                ckpt,
                "--prompt-file",
                file.to_str().unwrap(),
                "--stop",
                &stop,
            ],
            &sampling[..],
        ]
        .concat(),
    );
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["finish_reason"], "stop");
    assert_eq!(line["stop"], stop.as_str());
    assert_eq!(line["text"].as_str().unwrap(), &first[..first.find(&stop).unwrap()]);
    // An empty prompt file is an error naming it.
    let empty = common::write(dir.path(), "empty.txt", "");
    assert_clean_failure(
        &infer(&["--checkpoint", ckpt, "--prompt-file", empty.to_str().unwrap()]),
        &["empty.txt", "no prompts"],
    );
}
