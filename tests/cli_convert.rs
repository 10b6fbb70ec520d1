//! The `convert` binary: a real conversion end to end (then `infer --embed` on its
//! output), and refusals with a non-zero exit, a message naming the file, no panic and
//! no output directory. (A test of the `convert` package, for CARGO_BIN_EXE_convert.)

mod common;

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .current_dir(common::repo_root())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn converts_minilm_and_refuses_bad_input() {
    let convert = env!("CARGO_BIN_EXE_convert");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("minilm");
    let minilm = common::repo_root().join("datasets/pretrained/all-MiniLM-L6-v2");
    let o = run(
        convert,
        &[
            "--input",
            minilm.to_str().unwrap(),
            "--arch",
            "bert",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("103 mapped, 1 ignored, 0 missing, 0 unexpected"),
        "{}",
        text(&o.stdout)
    );
    for f in ["model.safetensors", "config.toml", "config.json", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The same output directory again: refused, the first one left intact.
    let o = run(
        convert,
        &[
            "--input",
            minilm.to_str().unwrap(),
            "--arch",
            "bert",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success() && text(&o.stderr).contains("already exists"));

    for (input, arch, needle) in [
        ("tests/fixtures/evil.pt", "mlp", "refused"),
        ("tests/fixtures/missing.safetensors", "bert", "no such file"),
        ("configs/shakespeare-char.toml", "gpt2", "unknown checkpoint type"),
    ] {
        let target = dir.path().join("bad");
        let o = run(
            convert,
            &[
                "--input",
                input,
                "--arch",
                arch,
                "--config",
                "configs/fashion-mnist-mlp.toml",
                "--output",
                target.to_str().unwrap(),
            ],
        );
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{input}: {err}");
        assert!(err.contains(input) && err.contains(needle), "{input}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!target.exists(), "{input}: a refused conversion left output behind");
    }
}
