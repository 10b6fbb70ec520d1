//! Shared by the test targets: the repository root and small, fast run configs on the
//! shipped data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The package directory: `cargo test` sets `CARGO_MANIFEST_DIR` when it runs a test
/// binary, and that is the checkout being tested. The value compiled in is only the
/// fallback: a target directory shared between checkouts (CI's cache) can reuse a test
/// binary built in another checkout, whose path may be gone.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A fresh, empty directory `name` under Cargo's scratch directory for integration tests
/// (`CARGO_TARGET_TMPDIR`): for what a test binary builds once and keeps in a static. A
/// `TempDir` in a static is never dropped, so it stayed in /tmp after every run (1.6 GB
/// of converted LLMs per run of `tests/pretrained.rs`); this one is replaced next run.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The repository root (tests of the `train`/`infer` packages live here too).
pub fn repo_root() -> PathBuf {
    let start = manifest_dir();
    let mut dir = start.clone();
    while !dir.join("datasets").is_dir() {
        assert!(
            dir.pop(),
            "repository root with datasets/ not found above {}",
            start.display()
        );
    }
    dir
}

pub fn shakespeare() -> PathBuf {
    repo_root().join("datasets/shakespeare")
}

pub fn fashion_small() -> PathBuf {
    repo_root().join("datasets/fashion-mnist-small")
}

/// A tiny character-level LM config (`arch` = gpt2 or llama) on the shipped Shakespeare.
pub fn tiny_lm_toml(arch: &str, steps: usize) -> String {
    let model = match arch {
        "gpt2" => "arch = \"gpt2\"\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n".to_string(),
        "llama" => "arch = \"llama\"\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nn_embd = 32\nintermediate_size = 64\nblock_size = 32\n"
            .to_string(),
        other => panic!("no tiny config for {other}"),
    };
    format!(
        "[model]\n{model}\n[data]\nkind = \"text\"\npath = {:?}\n\n[train]\nseed = 7\nbatch_size = 8\nmax_steps = {steps}\n\
         eval_interval = 10\neval_iters = 4\nlog_interval = 5\n\n[optim]\nlr = 3e-3\nwarmup_steps = 5\n",
        shakespeare().display().to_string()
    )
}

/// A tiny image config (`arch` = mlp or cnn) on the committed Fashion-MNIST slice.
pub fn tiny_image_toml(arch: &str, steps: usize) -> String {
    let model = match arch {
        "mlp" => "arch = \"mlp\"\nhidden_sizes = [64]\n",
        "cnn" => "arch = \"cnn\"\nchannels = [8, 16]\nhidden_size = 32\n",
        other => panic!("no tiny config for {other}"),
    };
    format!(
        "[model]\n{model}\n[data]\nkind = \"idx\"\npath = {:?}\nmax_test = 200\n\n[train]\nseed = 7\nbatch_size = 32\n\
         max_steps = {steps}\neval_interval = 10\nlog_interval = 5\n\n[optim]\nlr = 2e-3\nwarmup_steps = 3\n",
        fashion_small().display().to_string()
    )
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Two safetensors files hold the same tensors, bit for bit (the JSON header's key
/// order is not canonical, so whole files are not compared).
pub fn assert_same_tensors(a: &[u8], b: &[u8]) {
    let (a, b) = (
        safetensors::SafeTensors::deserialize(a).unwrap(),
        safetensors::SafeTensors::deserialize(b).unwrap(),
    );
    let (mut na, mut nb) = (a.names(), b.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    assert!(!na.is_empty());
    for name in na {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!((x.shape(), x.dtype()), (y.shape(), y.dtype()), "{name}");
        assert!(x.data() == y.data(), "{name}: tensors differ");
    }
}

/// A command failed cleanly: non-zero exit, no panic, and stderr names every needle.
pub fn assert_clean_failure(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "a panic is not an error message: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} does not mention {n:?}");
    }
}

/// Whether the pretrained MiniLM has been fetched and converted (scripts/fetch-minilm.sh,
/// which CI runs); tests that need it fail with this hint when it is missing.
pub fn minilm_kiln() -> PathBuf {
    let dir = repo_root().join("datasets/pretrained/all-MiniLM-L6-v2-kiln");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-minilm.sh",
        dir.display()
    );
    dir
}
