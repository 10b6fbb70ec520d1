//! The `train` binary: errors and exit codes, resume after SIGKILL, run comparison.
//! (Compiled as a test of the `train` package, which provides CARGO_BIN_EXE_train.)

mod common;

use common::assert_clean_failure;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_train::metrics::read_metrics;

fn train() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.current_dir(common::repo_root()).env_remove("RUST_BACKTRACE");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("train runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_exits_non_zero_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write(
        dir.path(),
        "bad.toml",
        &common::tiny_lm_toml("gpt2", 5).replace("n_head = 2", "n_head = 2\nheads = 3"),
    );
    let out = run(train()
        .args(["--config", cfg.to_str().unwrap(), "--out"])
        .arg(dir.path().join("r")));
    assert_clean_failure(&out, &["bad.toml", "heads"]);
    let out = run(train()
        .args([
            "--config",
            "configs/shakespeare-char.toml",
            "--set",
            "train.eval_interval=0",
            "--out",
        ])
        .arg(dir.path().join("r")));
    assert_clean_failure(&out, &["shakespeare-char.toml", "train.eval_interval"]);
    let out = run(train().args(["--config", "configs/missing.toml"]));
    assert_clean_failure(&out, &["configs/missing.toml"]);
    assert!(
        !dir.path().join("r").exists(),
        "a rejected config must not create the run directory"
    );
}

#[test]
fn backend_not_compiled_in_says_how_to_enable_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write(dir.path(), "c.toml", &common::tiny_lm_toml("gpt2", 5));
    for (backend, hint) in [("wgpu", "setup-vulkan.sh"), ("tch", "setup-libtorch.sh")] {
        if kiln_core::BackendKind::Wgpu.is_compiled() && backend == "wgpu" {
            continue;
        }
        if kiln_core::BackendKind::Tch.is_compiled() && backend == "tch" {
            continue;
        }
        let out = run(train()
            .args(["--config", cfg.to_str().unwrap(), "--backend", backend, "--out"])
            .arg(dir.path().join(backend)));
        assert_clean_failure(&out, &[&format!("--features {backend}"), hint]);
    }
    let out = run(train().args(["--config", cfg.to_str().unwrap(), "--backend", "tpu"]));
    assert!(!out.status.success() && stderr(&out).contains("tpu"));
}

#[test]
fn threads_flag_sizes_the_cpu_pool_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write(dir.path(), "c.toml", &common::tiny_lm_toml("gpt2", 2));
    let out = run(train()
        .args(["--config", cfg.to_str().unwrap(), "--quiet", "--threads", "1", "--out"])
        .arg(dir.path().join("r")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("(1 CPU threads)"), "{}", stderr(&out));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r/run.json")).unwrap()).unwrap();
    assert_eq!(info["cpu_threads"], 1, "{info}");
    let out = run(train()
        .args(["--config", cfg.to_str().unwrap(), "--threads", "0", "--out"])
        .arg(dir.path().join("zero")));
    assert_clean_failure(&out, &["--threads"]);
    assert!(!dir.path().join("zero").exists());
}

fn metrics_without_timing(dir: &Path) -> Vec<(usize, f64, f64, f64, f64)> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| (r.step, r.train_loss, r.val_loss, r.lr, r.grad_norm))
        .collect()
}

/// A run killed with SIGKILL after its first checkpoint and resumed produces exactly the
/// metrics and weights of an uninterrupted run.
#[test]
fn resume_after_sigkill_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let toml =
        common::tiny_lm_toml("gpt2", 60).replace("eval_interval = 10", "eval_interval = 10\ncheckpoint_interval = 10");
    let cfg = common::write(dir.path(), "c.toml", &toml);
    let full = dir.path().join("full");
    let out = run(train().args([
        "--quiet",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        full.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = dir.path().join("killed");
    let mut child = train()
        .args([
            "--quiet",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            killed.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    // Kill it once it has committed a checkpoint past step 10 but before it finishes.
    let latest = killed.join("checkpoints/LATEST");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let step = std::fs::read_to_string(&latest)
            .ok()
            .and_then(|s| s.trim().trim_start_matches("step-").parse::<usize>().ok());
        if step.is_some_and(|s| s >= 20) {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("summary.json").exists(),
        "the run was killed before finishing"
    );

    let out = run(train().args(["--quiet", "--resume", "--out", killed.to_str().unwrap()]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(metrics_without_timing(&full), metrics_without_timing(&killed));
    assert_eq!(metrics_without_timing(&full).len(), 6);
    common::assert_same_tensors(
        &std::fs::read(full.join("model.safetensors")).unwrap(),
        &std::fs::read(killed.join("model.safetensors")).unwrap(),
    );
}

#[test]
fn compare_draws_validation_curves_and_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["gpt2", "llama"] {
        let cfg = common::write(dir.path(), &format!("{arch}.toml"), &common::tiny_lm_toml(arch, 20));
        let out = run(train()
            .args(["--quiet", "--config", cfg.to_str().unwrap(), "--out"])
            .arg(dir.path().join(arch)));
        assert!(out.status.success(), "{}", stderr(&out));
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(
            summary.contains("done: 20 steps") && summary.contains("final val loss"),
            "{summary}"
        );
    }
    let png = dir.path().join("cmp.png");
    let out = run(train()
        .arg("compare")
        .arg(dir.path().join("gpt2"))
        .arg(dir.path().join("llama"))
        .arg("--out")
        .arg(&png));
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| gpt2 | gpt2 | flex |") && table.contains("| llama | llama | flex |"),
        "{table}"
    );
    assert!(
        table.contains("final val loss") && table.contains("wall time"),
        "{table}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
}
