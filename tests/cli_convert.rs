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

/// `convert ARGS`, which must succeed: its standard output.
fn convert_ok(args: &[&str]) -> String {
    let o = run(env!("CARGO_BIN_EXE_convert"), args);
    assert!(o.status.success(), "convert {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
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

/// A GGUF metadata value for [`gguf_bytes`].
enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
    Strs(&'a [&'a str]),
}

/// A small GGUF v3 file: `meta`, then `tensors` (name, GGML dims, type id, data).
fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[(&str, &[u64], u32, Vec<u8>)]) -> Vec<u8> {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut b, key);
        match value {
            Meta::U32(v) => {
                b.extend(4u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                b.extend(6u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                string(&mut b, s);
            }
            Meta::Strs(items) => {
                b.extend(9u32.to_le_bytes());
                b.extend(8u32.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for s in *items {
                    string(&mut b, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        b.extend(data);
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b
}

fn llama_meta() -> Vec<(&'static str, Meta<'static>)> {
    vec![
        ("general.architecture", Meta::Str("llama")),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(8)),
        ("llama.feed_forward_length", Meta::U32(16)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.context_length", Meta::U32(32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
    ]
}

#[test]
fn refuses_bad_gguf_files_by_name() {
    let convert = env!("CARGO_BIN_EXE_convert");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let case = |name: &str, bytes: Vec<u8>, needles: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let o = run(
            convert,
            &["--input", path.to_str().unwrap(), "--output", out.to_str().unwrap()],
        );
        let mut needles = needles.to_vec();
        needles.push(name);
        common::assert_clean_failure(&o, &needles);
        assert!(!out.exists(), "{name}: an output directory was left behind");
    };
    // An architecture Kiln lacks.
    case(
        "mamba.gguf",
        gguf_bytes(&[("general.architecture", Meta::Str("mamba"))], &[]),
        &["general.architecture", "mamba", "llama, gemma3"],
    );
    // A required key missing.
    let mut meta = llama_meta();
    meta.remove(1);
    case(
        "no-layers.gguf",
        gguf_bytes(&meta, &[]),
        &["llama.block_count", "missing"],
    );
    // No tokenizer.
    case(
        "no-tokenizer.gguf",
        gguf_bytes(&llama_meta(), &[]),
        &["tokenizer.ggml.model", "missing"],
    );
    // A pre-tokenizer Kiln does not know.
    let mut meta = llama_meta();
    meta.extend([
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.pre", Meta::Str("tekken")),
        ("tokenizer.ggml.tokens", Meta::Strs(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", Meta::Strs(&["a b"])),
    ]);
    case("tekken.gguf", gguf_bytes(&meta, &[]), &["tokenizer.ggml.pre", "tekken"]);
    // A tensor of a type Kiln does not read, and one of an unknown type.
    let f32s = vec![0u8; 8 * 4];
    case(
        "iq2.gguf",
        gguf_bytes(&llama_meta(), &[("output_norm.weight", &[8], 16, f32s.clone())]),
        &["output_norm.weight", "IQ2_XXS", "not supported"],
    );
    case(
        "type77.gguf",
        gguf_bytes(&llama_meta(), &[("output_norm.weight", &[8], 77, f32s.clone())]),
        &["unknown tensor type 77"],
    );
    // A size that disagrees with the shape (Q4_0 blocks are 32 values), and data past
    // the end of the file.
    case(
        "odd-q4.gguf",
        gguf_bytes(&llama_meta(), &[("output_norm.weight", &[8], 2, vec![0; 18])]),
        &["output_norm.weight", "not a multiple", "Q4_0"],
    );
    let mut cut = gguf_bytes(&llama_meta(), &[("output_norm.weight", &[8], 0, f32s.clone())]);
    cut.truncate(cut.len() - 16);
    case(
        "truncated.gguf",
        cut,
        &["output_norm.weight", "past the end", "truncated"],
    );
    // A tensor no rule of the architecture places.
    case(
        "stray.gguf",
        gguf_bytes(&llama_meta(), &[("blk.0.mystery.weight", &[8], 0, f32s)]),
        &["blk.0.mystery.weight", "no place"],
    );
    // Not GGUF at all.
    case(
        "text.gguf",
        b"hello, not a model".to_vec(),
        &["not a GGUF file", "offset 0"],
    );
}

/// An ONNX file without a config.json: the binary converts it with the config read off
/// the graph, writes that config.json into the model directory, and reports the pooler
/// the export's outputs do not use.
#[test]
fn converts_an_onnx_file_with_the_config_read_off_its_graph() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let onnx = common::repo_root().join("tests/fixtures/onnx/default.onnx");
    let stdout = convert_ok(&["--input", onnx.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(
        stdout.contains("placed by their role in a bert graph") && stdout.contains("pooler.dense.weight"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["num_attention_heads"], 4, "{json}");
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        toml.contains("arch = \"bert\"") && toml.contains("n_head = 4"),
        "{toml}"
    );
}

/// A Hugging Face sequence classifier converts with its head (`[head]` labels from
/// `id2label`) and `--to hf` writes it back as `BertForSequenceClassification`; a GPT-2
/// exported by Optimum converts with its architecture detected from the graph.
#[test]
fn converts_a_classifier_with_its_head_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (kiln, hf) = (dir.path().join("kiln"), dir.path().join("hf"));
    let input = common::repo_root().join("tests/fixtures/hf-tiny-bert-classifier");
    let stdout = convert_ok(&["--input", input.to_str().unwrap(), "--output", kiln.to_str().unwrap()]);
    assert!(
        stdout.contains("classifier head: 3 labels (negative, neutral, positive), Cls pooling")
            && stdout.contains("classifier.weight -> classifier.weight (transposed)"),
        "{stdout}"
    );
    let toml = std::fs::read_to_string(kiln.join("config.toml")).unwrap();
    assert!(toml.contains("[head]") && toml.contains("\"neutral\""), "{toml}");
    convert_ok(&[
        "--to",
        "hf",
        "--input",
        kiln.to_str().unwrap(),
        "--output",
        hf.to_str().unwrap(),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["architectures"][0], "BertForSequenceClassification", "{json}");
    assert_eq!(json["id2label"]["2"], "positive", "{json}");

    let out = dir.path().join("gpt2");
    let onnx = common::repo_root().join("tests/fixtures/onnx/gpt2-with-past.onnx");
    let stdout = convert_ok(&["--input", onnx.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(
        stdout.contains("placed by their role in a gpt2 graph") && stdout.contains("(tied)"),
        "{stdout}"
    );
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(toml.contains("arch = \"gpt2\""), "{toml}");
}
