//! `convert` on ONNX files as third-party exporters write them
//! (scripts/export_onnx_variants.py): `torch.onnx.export` at its defaults (constant
//! folding: weight matrices renamed `onnx::MatMul_NNN` and pre-transposed, a
//! sentence-transformers wrapper prefix on the rest), opset 14's decomposed LayerNorm,
//! external data, FP16, onnxruntime's dynamic int8 and Optimum's exporter. The weights are placed by the
//! graph, the config is read off it, and the converted model's last hidden state and
//! sentence embedding are checked against onnxruntime on the same file. Malformed graphs
//! are errors naming the node.

mod common;
#[path = "support/lm.rs"]
mod lm;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kiln_convert::{Source, convert, hf_config};
use kiln_models::{BertModel, ModelConfig};

#[derive(serde::Deserialize)]
struct Reference {
    form: String,
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
    sentence_embedding: Vec<Vec<f32>>,
}

fn tiny_dir() -> PathBuf {
    common::repo_root().join("tests/fixtures/onnx")
}

fn minilm_dir() -> PathBuf {
    let dir = common::repo_root().join("datasets/pretrained/all-MiniLM-L6-v2/onnx-variants");
    assert!(
        dir.join("default.onnx.reference.json").is_file(),
        "{} is missing: run scripts/fetch-minilm.sh --torch",
        dir.display()
    );
    dir
}

/// Convert `file` with the config read off its graph; the converted model.
fn convert_onnx(file: &Path) -> (ModelConfig, BertModel, kiln_convert::Report, Vec<String>) {
    let source = Source::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let (path, json) = source.hf_config.clone().expect("a config from the graph");
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let (weights, report) = convert(&source, &model, false).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let out = tempfile::tempdir().unwrap();
    let st = out.path().join("model.safetensors");
    std::fs::write(&st, &weights).unwrap();
    let ModelConfig::Bert(c) = &model else {
        panic!("{}: detected {}", file.display(), model.arch())
    };
    let bert = kiln_core::weights::load_weights(c.init(&Device::flex()), &st).unwrap();
    (model, bert, report, source.notes)
}

/// `(max |kiln - ort| over the last hidden states of real tokens, max over the embeddings, the largest
/// |value| of onnxruntime's hidden states, the lowest embedding cosine)`.
fn compare(bert: &BertModel, reference: &Reference) -> (f32, f32, f32, f32) {
    let device = Device::flex();
    let (b, t) = (reference.input_ids.len(), reference.input_ids[0].len());
    let int = |rows: &[Vec<i64>]| Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), &device);
    let (ids, mask) = (int(&reference.input_ids), int(&reference.attention_mask));
    let hidden = bert
        .forward(ids.clone(), mask.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let emb = bert.embed(ids, mask).into_data().try_to_vec::<f32>().unwrap();
    let ort_hidden: Vec<f32> = reference
        .last_hidden_state
        .iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    // Hidden states of real tokens only: a padded position's state is whatever the
    // masked attention leaves (both sides ignore it when pooling).
    let c = reference.sentence_embedding[0].len();
    let real = |v: &[f32]| -> Vec<f32> {
        v.chunks(c)
            .zip(reference.attention_mask.concat())
            .filter(|(_, m)| *m != 0)
            .flat_map(|(row, _)| row.to_vec())
            .collect()
    };
    let (hidden, ort_hidden) = (real(&hidden), real(&ort_hidden));
    let cosine = emb
        .chunks(c)
        .zip(&reference.sentence_embedding)
        .map(|(a, b)| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (norm(a) * norm(b))
        })
        .fold(1.0, f32::min);
    let ort_emb: Vec<f32> = reference.sentence_embedding.concat();
    (
        max_diff(&hidden, &ort_hidden),
        max_diff(&emb, &ort_emb),
        ort_hidden.iter().fold(0.0, |m, v| v.abs().max(m)),
        cosine,
    )
}

fn reference(file: &Path) -> Reference {
    let path = PathBuf::from(format!("{}.reference.json", file.display()));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The tolerance of each form: f32 files match onnxruntime to float rounding; FP16 ones
/// (onnxruntime computes in half precision) to 1e-2 of the hidden states' scale; int8
/// ones (onnxruntime also quantizes the activations, Kiln runs the dequantized weights in
/// f32) by the embeddings' cosine.
fn check(dir: &Path, name: &str, hidden_tol: f32, emb_tol: f32, min_cosine: f32) -> (f32, f32, f32) {
    let file = dir.join(name);
    let (model, bert, report, notes) = convert_onnx(&file);
    assert!(report.is_complete(), "{name}: {}", report.details());
    let r = reference(&file);
    let (hidden, emb, scale, cosine) = compare(&bert, &r);
    eprintln!(
        "{}/{name} ({}): max |hidden - ort| {hidden:.2e} (scale {scale:.2}), max |embedding - ort| {emb:.2e}, min cosine {cosine:.7}; {}",
        dir.file_name().unwrap().to_string_lossy(),
        r.form,
        notes.join(" |")
    );
    if name == "int8.onnx" {
        // How far onnxruntime's own int8 run and Kiln's (dequantized weights, f32
        // activations) are from the f32 model's embeddings.
        let f32_ref = reference(&dir.join("default.onnx"));
        let (_, _, _, ours) = compare(&bert, &f32_ref);
        let theirs = r
            .sentence_embedding
            .iter()
            .zip(&f32_ref.sentence_embedding)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
            .fold(1.0, f32::min);
        eprintln!("  int8 vs the f32 model's embeddings: min cosine Kiln {ours:.5}, onnxruntime {theirs:.5}");
        assert!(
            ours >= theirs - 1e-4,
            "Kiln's dequantized int8 is further from f32 than onnxruntime's int8"
        );
    }
    assert!(
        hidden <= hidden_tol * scale,
        "{name}: hidden states differ by {hidden} (scale {scale})"
    );
    assert!(emb <= emb_tol, "{name}: embeddings differ by {emb}");
    assert!(cosine >= min_cosine, "{name}: cosine {cosine}");
    assert_eq!(model.arch(), "bert");
    (hidden, emb, cosine)
}

#[test]
fn tiny_bert_exports_convert_through_the_graph_and_match_onnxruntime() {
    let dir = tiny_dir();
    for name in [
        "default.onnx",
        "opset14.onnx",
        "external.onnx",
        "token-types.onnx",
        "dynamo.onnx",
    ] {
        check(&dir, name, 1e-5, 1e-5, 0.99999);
    }
    check(&dir, "fp16.onnx", 1e-2, 1e-2, 0.999);
    check(&dir, "int8.onnx", 0.2, 0.1, 0.99);
}

#[test]
fn minilm_exports_convert_through_the_graph_and_match_onnxruntime() {
    let dir = minilm_dir();
    for name in ["default.onnx", "opset14.onnx", "external.onnx"] {
        check(&dir, name, 1e-5, 1e-5, 0.99999);
    }
    check(&dir, "fp16.onnx", 1e-2, 1e-2, 0.999);
    check(&dir, "int8.onnx", 0.2, 0.1, 0.98);
    // Optimum's exporter, its config.json beside the file.
    check(&dir.join("optimum"), "model.onnx", 1e-5, 1e-5, 0.99999);
}

#[test]
fn the_config_is_read_off_the_graph_and_the_report_names_the_initializers() {
    let file = tiny_dir().join("default.onnx");
    let source = Source::read(&file).unwrap();
    let (path, json) = source.hf_config.clone().unwrap();
    assert!(
        path.display().to_string().contains("read off the graph"),
        "{}",
        path.display()
    );
    let model = hf_config::detect_model_config(&json, "graph").unwrap();
    let ModelConfig::Bert(c) = &model else {
        panic!("{}", model.arch())
    };
    assert_eq!(
        (
            c.n_layer,
            c.n_head,
            c.n_embd,
            c.intermediate_size,
            c.max_positions,
            c.vocab_size,
            c.type_vocab_size
        ),
        (2, 4, 32, 37, 64, 99, 2)
    );
    assert!((c.layer_norm_eps - 1e-12).abs() < 1e-15, "{}", c.layer_norm_eps);
    let (_, report) = convert(&source, &model, false).unwrap();
    // A renamed, pre-transposed weight is named by its initializer and its role.
    let (from, to, _) = report
        .mapped
        .iter()
        .find(|(_, to, _)| to == "encoder.layer.1.intermediate.dense.weight")
        .expect("placed");
    assert!(from.contains("onnx::MatMul_"), "{from} -> {to}");
    // The export's outputs do not use the pooler: it is reported, not refused.
    assert!(
        report.absent.iter().any(|a| a.starts_with("pooler.dense.weight")),
        "{:?}",
        report.absent
    );
}

#[test]
fn malformed_graphs_are_errors_naming_the_node() {
    let dir = tiny_dir();
    #[derive(serde::Deserialize)]
    struct Malformed {
        #[serde(rename = "cycle.onnx")]
        cycle: String,
        #[serde(rename = "missing-initializer.onnx")]
        missing: (String, String),
    }
    let m: Malformed = serde_json::from_str(&std::fs::read_to_string(dir.join("malformed.json")).unwrap()).unwrap();
    let err = |name: &str| match Source::read(&dir.join(name)) {
        Ok(_) => panic!("{name} was accepted"),
        Err(e) => e.to_string(),
    };
    let e = err("cycle.onnx");
    assert!(e.contains("cycle") && e.contains(&m.cycle), "{e}");
    let e = err("missing-initializer.onnx");
    assert!(e.contains(&m.missing.0) && e.contains(&m.missing.1), "{e}");
    let e = err("wrong-arity.onnx");
    assert!(e.contains("MatMul") && e.contains("has 1 inputs"), "{e}");
    // External data that is not there, or a lying length: named, never read out of bounds.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("external.onnx"), tmp.path().join("external.onnx")).unwrap();
    let e = Source::read(&tmp.path().join("external.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("external.onnx.data"), "{e}");
    let data = std::fs::read(dir.join("external.onnx.data")).unwrap();
    std::fs::write(tmp.path().join("external.onnx.data"), &data[..data.len() / 2]).unwrap();
    let e = Source::read(&tmp.path().join("external.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("past the end"), "{e}");
}

#[derive(serde::Deserialize)]
struct LogitsReference {
    tokens: Vec<Vec<i64>>,
    logits: Vec<Vec<Vec<f32>>>,
}

/// GPT-2 and Llama as Optimum exports them (scripts/export_onnx_decoders.py), with and
/// without the KV-cache inputs model hubs ship: the architecture is detected from the
/// graph (no --arch, no config.json), the config read off it matches the Hugging Face
/// one, the weights are those of the safetensors the export was made from, bit for bit,
/// and the converted model's logits match onnxruntime's on the same file.
#[test]
fn gpt2_and_llama_exports_are_detected_from_the_graph_and_match_onnxruntime() {
    let fixtures = common::repo_root().join("tests/fixtures");
    for (arch, form) in [
        ("gpt2", "optimum"),
        ("gpt2", "with-past"),
        ("llama", "optimum"),
        ("llama", "with-past"),
    ] {
        let file = tiny_dir().join(format!("{arch}-{form}.onnx"));
        let reference: LogitsReference =
            serde_json::from_str(&std::fs::read_to_string(file.with_extension("onnx.reference.json")).unwrap())
                .unwrap();
        let source = Source::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            source.notes[0].contains(&format!("a {arch} graph")),
            "{}: {:?}",
            file.display(),
            source.notes
        );
        let (path, json) = source.hf_config.clone().expect("a config from the graph");
        let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
        // The config read off the graph is the Hugging Face one (Llama's context length
        // is not in the graph: assumed, and the report says so).
        let hf_dir = fixtures.join(format!("hf-tiny-{arch}"));
        let hf_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json")).unwrap()).unwrap();
        let mut expected = hf_config::model_config(arch, &hf_json, "config.json").unwrap();
        if let (ModelConfig::Llama(e), ModelConfig::Llama(m)) = (&mut expected, &model) {
            assert!(
                source.notes.iter().any(|n| n.contains("max_position_embeddings")),
                "{:?}",
                source.notes
            );
            e.block_size = m.block_size;
        }
        assert_eq!(model, expected, "{}", file.display());
        let (weights, report) = convert(&source, &model, false).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(report.is_complete(), "{}", report.details());
        let hf_source = Source::read(&hf_dir.join("model.safetensors")).unwrap();
        let (hf_weights, _) = convert(&hf_source, &model, false).unwrap();
        assert!(
            weights == hf_weights,
            "{}: weights differ from the safetensors'",
            file.display()
        );

        let ours = lm::lm_logits(&model, &weights, &reference.tokens);
        let ort: Vec<f32> = reference.logits.iter().flatten().flatten().copied().collect();
        let max_diff = lm::max_abs_diff(&ours, &ort);
        eprintln!("{arch} {form}: max |kiln - onnxruntime| logit difference {max_diff:.2e}");
        assert!(max_diff <= 1e-4, "{}: {max_diff}", file.display());
    }
}

/// What the graph cannot say is refused with the reason, per architecture tried: a
/// scaled rope's frequencies (its config.json is needed), a decoder read as an encoder.
#[test]
fn decoder_graphs_that_do_not_fit_are_refused_with_the_reason() {
    let Err(err) = Source::read(&tiny_dir().join("llama-scaled-rope.onnx")) else {
        panic!("a scaled rope converted without its config");
    };
    let err = err.to_string();
    assert!(
        err.contains("llama: rotary frequency") && err.contains("--config") && err.contains("bert:"),
        "{err}"
    );
    let Err(err) = Source::read_for(&tiny_dir().join("gpt2-optimum.onnx"), false, Some("bert")) else {
        panic!("a GPT-2 graph placed as BERT");
    };
    let err = err.to_string();
    assert!(err.contains("bert: ") && !err.contains("gpt2:"), "{err}");
}

/// Gemma 3 as Optimum exports it, with the config.json it writes beside the file: the
/// graph is told from Llama's by its sandwich norms and scaled embedding, the norms'
/// folded `1 + w` is taken back to `w`, and the converted model's logits (a sliding and a
/// global layer) match onnxruntime's.
#[test]
fn a_gemma3_export_converts_through_the_graph_and_matches_onnxruntime() {
    let file = tiny_dir().join("gemma3-optimum/model.onnx");
    let reference: LogitsReference =
        serde_json::from_str(&std::fs::read_to_string(file.with_extension("onnx.reference.json")).unwrap()).unwrap();
    let source = Source::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(source.notes[0].contains("a gemma3 graph"), "{:?}", source.notes);
    assert!(
        source.notes.iter().any(|n| n.contains("1 + w of Gemma's norm")),
        "{:?}",
        source.notes
    );
    let (path, json) = source.hf_config.clone().expect("the config.json beside the file");
    assert!(path.ends_with("gemma3-optimum/config.json"), "{}", path.display());
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let (weights, report) = convert(&source, &model, false).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.is_complete(), "{}", report.details());
    let ModelConfig::Gemma3(c) = &model else {
        panic!("detected {}", model.arch())
    };
    assert!(c.is_sliding(0) && !c.is_sliding(1), "{c:?}");
    let ours = lm::lm_logits(&model, &weights, &reference.tokens);
    let ort: Vec<f32> = reference.logits.iter().flatten().flatten().copied().collect();
    let max_diff = lm::max_abs_diff(&ours, &ort);
    eprintln!("gemma3 optimum: max |kiln - onnxruntime| logit difference {max_diff:.2e}");
    assert!(max_diff <= 1e-4, "{max_diff}");
}

#[derive(serde::Deserialize)]
struct HiddenReference {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
}

/// A RoBERTa encoder exported by Optimum: told from BERT by its positions (counted from
/// the padding index, read off the graph as `pad_token_id`), its config read off the
/// graph equal to the Hugging Face one, and its last hidden states (real tokens) equal
/// to onnxruntime's.
#[test]
fn a_roberta_export_is_told_from_bert_and_matches_onnxruntime() {
    let file = tiny_dir().join("roberta-optimum.onnx");
    let source = Source::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(source.notes[0].contains("a roberta graph"), "{:?}", source.notes);
    let (path, json) = source.hf_config.clone().expect("a config from the graph");
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let hf_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("tests/fixtures/hf-tiny-roberta/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        model,
        hf_config::model_config("roberta", &hf_json, "config.json").unwrap()
    );
    let (weights, report) = convert(&source, &model, false).unwrap();
    assert!(report.is_complete(), "{}", report.details());
    let ModelConfig::Roberta(c) = &model else {
        panic!("{}", model.arch())
    };
    let out = tempfile::tempdir().unwrap();
    let st = out.path().join("model.safetensors");
    std::fs::write(&st, &weights).unwrap();
    let device = Device::flex();
    let roberta = kiln_core::weights::load_weights(c.init(&device), &st).unwrap();
    let reference: HiddenReference =
        serde_json::from_str(&std::fs::read_to_string(file.with_extension("onnx.reference.json")).unwrap()).unwrap();
    let (b, t) = (reference.input_ids.len(), reference.input_ids[0].len());
    let int = |rows: &[Vec<i64>]| Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), &device);
    let hidden = roberta
        .forward(int(&reference.input_ids), int(&reference.attention_mask))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let width = c.n_embd;
    let mut max_diff = 0f32;
    for (i, mask) in reference.attention_mask.concat().iter().enumerate() {
        if *mask == 1 {
            let want = &reference.last_hidden_state[i / t][i % t];
            for (a, b) in hidden[i * width..(i + 1) * width].iter().zip(want) {
                max_diff = max_diff.max((a - b).abs());
            }
        }
    }
    eprintln!("roberta optimum: max |kiln - onnxruntime| hidden difference {max_diff:.2e}");
    assert!(max_diff <= 1e-5, "{max_diff}");
}
