//! `convert` on a real pretrained model: all-MiniLM-L6-v2 (scripts/fetch-minilm.sh)
//! converted to Kiln gives sentence-transformers' embeddings; bad input is refused
//! with errors naming the file or the tensors, and leaves no output behind.

mod common;
#[path = "support/half.rs"]
mod half_copy;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kiln_convert::{ConvertError, Source, convert, write_model_dir};
use kiln_core::layout::WhichWeights;
use kiln_infer::{LoadedModel, Model};

fn minilm() -> PathBuf {
    let dir = common::repo_root().join("datasets/pretrained/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-minilm.sh",
        dir.display()
    );
    dir
}

fn convert_dir(
    input: &Path,
    arch: &str,
    out: &Path,
    allow_partial: bool,
) -> Result<kiln_convert::Report, ConvertError> {
    let source = Source::read(input)?;
    let (path, json) = source.hf_config.clone().expect("config.json");
    let model = kiln_convert::hf_config::model_config(arch, &json, &path.display().to_string())?;
    let (weights, report) = convert(&source, &model, allow_partial)?;
    write_model_dir(out, &model, &weights, Some(&path), source.tokenizer.as_deref())?;
    Ok(report)
}

#[derive(serde::Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

/// Converted Kiln embeddings of 12 sentences match sentence-transformers' (PyTorch):
/// cosine >= 0.99999 and max abs difference <= 1e-4 for every sentence.
#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("minilm");
    let report = convert_dir(&minilm(), "bert", &out, false).unwrap();
    assert_eq!(report.mapped.len(), 103);
    assert_eq!(report.ignored, vec!["embeddings.position_ids".to_string()]);
    let transposed = report.mapped.iter().filter(|m| m.2).count();
    assert_eq!(
        transposed,
        6 * 6 + 1,
        "q, k, v, attention/intermediate/output dense per layer + pooler"
    );

    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("tests/fixtures/minilm_embeddings.json")).unwrap(),
    )
    .unwrap();
    let device = Device::flex();
    let run = LoadedModel::open(&out, WhichWeights::Best, &device).unwrap();
    let Model::Encoder(model) = &run.model else {
        panic!("not bert")
    };
    let texts: Vec<&str> = fixture.sentences.iter().map(String::as_str).collect();
    let ours =
        kiln_infer::embed::embed_texts(model.as_ref(), run.tokenizer.as_ref().unwrap(), &texts, 5, &device).unwrap();
    assert_eq!(ours.len(), 12);
    for (i, (a, b)) in ours.iter().zip(&fixture.embeddings).enumerate() {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let (na, nb) = (
            a.iter().map(|x| x * x).sum::<f32>().sqrt(),
            b.iter().map(|x| x * x).sum::<f32>().sqrt(),
        );
        let cosine = dot / (na * nb);
        let max_diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(cosine >= 0.99999, "sentence {i}: cosine {cosine}");
        assert!(max_diff <= 1e-4, "sentence {i}: max abs diff {max_diff}");
    }
}

#[test]
fn a_checkpoint_of_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let err = convert_dir(&minilm(), "gpt2", &out, false).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("n_layer"), "{err}");
    // With a config forced to another architecture the tensors themselves disagree.
    let source = Source::read(&minilm()).unwrap();
    let llama = kiln_models::ModelConfig::Llama(kiln_models::LlamaConfig {
        n_layer: 6,
        n_head: 12,
        n_kv_head: 12,
        n_embd: 384,
        intermediate_size: 1536,
        block_size: 512,
        vocab_size: 30522,
        rope_theta: 1e4,
        rms_norm_eps: 1e-6,
        ..Default::default()
    });
    let err = convert(&source, &llama, false).err().unwrap().to_string();
    assert!(
        err.contains("missing: model.embed_tokens.weight")
            && err.contains("unexpected: embeddings.word_embeddings.weight"),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(!out.exists());
}

#[test]
fn missing_tensors_are_named_and_partial_conversion_is_explicit() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of MiniLM with one tensor removed.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(minilm().join("config.json"), src.join("config.json")).unwrap();
    let bytes = std::fs::read(minilm().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "pooler.dense.bias")
        .collect();
    std::fs::write(
        src.join("model.safetensors"),
        safetensors::serialize(kept, None).unwrap(),
    )
    .unwrap();
    let err = convert_dir(&src, "bert", &dir.path().join("out"), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing: pooler.dense.bias [384]") && err.contains("--allow-partial"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "a refused conversion writes nothing");
    let report = convert_dir(&src, "bert", &dir.path().join("out"), true).unwrap();
    assert_eq!(report.missing, vec!["pooler.dense.bias [384]".to_string()]);
    assert!(dir.path().join("out/model.safetensors").is_file());
}

#[test]
fn corrupt_and_lying_safetensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(minilm().join("model.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = Source::read(&truncated).err().unwrap().to_string();
    assert!(
        err.contains("truncated.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
    // A header that claims more data than the file holds.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let lying = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[0,9", 1);
    let mut forged = (lying.len() as u64).to_le_bytes().to_vec();
    forged.extend(lying.as_bytes());
    forged.extend(&bytes[8 + n..]);
    let path = dir.path().join("lying.safetensors");
    std::fs::write(&path, forged).unwrap();
    let err = Source::read(&path).err().unwrap().to_string();
    assert!(err.contains("lying.safetensors"), "{err}");
    let not_onnx = dir.path().join("model.onnx");
    std::fs::write(&not_onnx, b"not onnx").unwrap();
    assert!(
        Source::read(&not_onnx)
            .err()
            .unwrap()
            .to_string()
            .contains("model.onnx")
    );
    let err = Source::read(&dir.path().join("nothing.pt")).err().unwrap().to_string();
    assert!(err.contains("nothing.pt"), "{err}");
}

/// A `torch.save`d state dict (nn.Linear `[out, in]` weights) converts through Burn's
/// pickle reader and gives PyTorch's logits on real images.
#[test]
fn pytorch_state_dict_converts_and_matches_pytorch_logits() {
    #[derive(serde::Deserialize)]
    struct Logits {
        logits: Vec<Vec<f32>>,
    }
    let fixtures = common::repo_root().join("tests/fixtures");
    let source = Source::read(&fixtures.join("mlp_torch.pt")).unwrap();
    let model = kiln_models::ModelConfig::Mlp(kiln_models::MlpConfig {
        hidden_sizes: vec![16],
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    });
    let (weights, report) = convert(&source, &model, false).unwrap();
    assert_eq!(report.mapped.len(), 4);
    assert!(
        report.mapped.iter().filter(|m| m.1.ends_with(".weight")).all(|m| m.2),
        "Linear weights are transposed"
    );
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(&dir.path().join("mlp"), &model, &weights, None, None).unwrap();
    let device = Device::flex();
    let run = LoadedModel::open(&dir.path().join("mlp"), WhichWeights::Best, &device).unwrap();
    let Model::ImageClassifier(mlp) = &run.model else {
        panic!()
    };
    let images = kiln_data::ImageDataset::load(&common::fashion_small(), 0, 4).unwrap();
    let batch = images.test.batch(&[0, 1, 2, 3], &device);
    let ours = mlp.forward(batch.images).into_data().try_to_vec::<f32>().unwrap();
    let reference: Logits =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("mlp_torch.json")).unwrap()).unwrap();
    let reference: Vec<f32> = reference.logits.concat();
    let max_diff = ours
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_diff <= 1e-4, "max abs logit difference {max_diff}");
}

/// A pickle with a `__reduce__` payload is refused, names the call, and runs nothing.
#[test]
fn a_pickle_that_runs_code_is_refused_and_runs_nothing() {
    let marker = Path::new("/tmp/kiln-pickle-payload-ran");
    let _ = std::fs::remove_file(marker);
    let err = Source::read(&common::repo_root().join("tests/fixtures/evil.pt"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("evil.pt") && err.contains("refused") && err.contains("system"),
        "{err}"
    );
    assert!(!marker.exists(), "the payload ran");
}

#[derive(serde::Deserialize)]
struct HfLogits {
    tokens: Vec<Vec<i64>>,
    gpt2: Vec<Vec<Vec<f32>>>,
    llama: Vec<Vec<Vec<f32>>>,
}

/// Tiny random HF GPT2LMHeadModel and LlamaForCausalLM (made by scripts/make_hf_fixtures.py),
/// from both their safetensors and their pickled state dicts, give transformers' logits
/// (<= 1e-4) after conversion, on every CPU backend.
#[test]
fn tiny_hf_gpt2_and_llama_match_transformers_logits() {
    use kiln_models::CausalLm;
    let fixtures = common::repo_root().join("tests/fixtures");
    let expected: HfLogits =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("hf_tiny_logits.json")).unwrap()).unwrap();
    let (b, t) = (expected.tokens.len(), expected.tokens[0].len());
    let tokens: Vec<i64> = expected.tokens.concat();
    for (arch, reference) in [("gpt2", &expected.gpt2), ("llama", &expected.llama)] {
        let dir = fixtures.join(format!("hf-tiny-{arch}"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let model = kiln_convert::hf_config::model_config(arch, &json, "config.json").unwrap();
        let reference: Vec<f32> = reference.iter().flatten().flatten().copied().collect();
        for file in ["model.safetensors", "pytorch_model.bin"] {
            let source = Source::read(&dir.join(file)).unwrap();
            let (weights, report) = convert(&source, &model, false).unwrap();
            assert!(report.is_complete(), "{arch} {file}: {}", report.details());
            let out = tempfile::tempdir().unwrap();
            let path = out.path().join("m");
            write_model_dir(&path, &model, &weights, None, None).unwrap();
            let run = LoadedModel::open(&path, WhichWeights::Best, &Device::flex());
            // A converted LM directory without tokenizer.json cannot be opened for sampling;
            // load the weights directly.
            assert!(run.is_err());
            for backend in [kiln_core::BackendKind::Flex, kiln_core::BackendKind::Ndarray] {
                let device = backend.device(0).unwrap();
                let input = Tensor::<2, Int>::from_data(TensorData::new(tokens.clone(), [b, t]), &device);
                let logits = match &model {
                    kiln_models::ModelConfig::Gpt2(c) => {
                        kiln_core::weights::load_weights(c.init(&device), &path.join("model.safetensors"))
                            .unwrap()
                            .forward(input)
                    }
                    kiln_models::ModelConfig::Llama(c) => {
                        kiln_core::weights::load_weights(c.init(&device), &path.join("model.safetensors"))
                            .unwrap()
                            .forward(input)
                    }
                    _ => unreachable!(),
                };
                let ours = logits.into_data().try_to_vec::<f32>().unwrap();
                let max_diff = ours
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                eprintln!("{arch} {file} on {backend}: max abs logit difference {max_diff:.2e}");
                assert!(
                    max_diff <= 1e-4,
                    "{arch} {file} on {backend}: max abs logit difference {max_diff}"
                );
            }
        }
    }
}

/// HF -> Kiln -> HF (`--to hf`) gives back the original tensors bit for bit, under the
/// original names (buffers the import ignores aside). transformers loading the exports
/// was checked with scripts (identical logits); this test needs no Python.
#[test]
fn export_to_hugging_face_round_trips_exactly() {
    let fixtures = common::repo_root().join("tests/fixtures");
    for (dir, arch) in [
        (fixtures.join("hf-tiny-gpt2"), "gpt2"),
        (fixtures.join("hf-tiny-llama"), "llama"),
        (minilm(), "bert"),
    ] {
        let source = Source::read(&dir).unwrap();
        let (path, json) = source.hf_config.clone().unwrap();
        let model = kiln_convert::hf_config::model_config(arch, &json, &path.display().to_string()).unwrap();
        let (kiln, report) = convert(&source, &model, false).unwrap();
        let hf = kiln_convert::export_hf(&kiln, &model, None).unwrap();
        let exported = safetensors::SafeTensors::deserialize(&hf).unwrap();
        let original_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let original = safetensors::SafeTensors::deserialize(&original_bytes).unwrap();
        let mut names: Vec<String> = original
            .names()
            .into_iter()
            .filter(|n| !report.ignored.iter().any(|i| i == n))
            .map(str::to_string)
            .collect();
        names.sort();
        let mut got: Vec<String> = exported.names().into_iter().map(str::to_string).collect();
        got.sort();
        assert_eq!(got, names, "{arch}: exported names");
        for name in &names {
            let (a, b) = (original.tensor(name).unwrap(), exported.tensor(name).unwrap());
            assert_eq!(a.shape(), b.shape(), "{arch} {name}");
            assert!(
                a.data() == b.data(),
                "{arch} {name}: values differ after the round trip"
            );
        }
        let hf_json = kiln_convert::hf_config::to_hf_json(&model).unwrap();
        assert_eq!(
            kiln_convert::hf_config::model_config(arch, &hf_json, "exported").unwrap(),
            model,
            "{arch}: config round trip"
        );
    }
}

/// The same MiniLM re-saved by torch as a pickled `.bin` and exported to ONNX
/// (scripts/fetch-minilm.sh --torch) converts to the same tensors as its safetensors,
/// and the Kiln embeddings match onnxruntime's within 1e-4.
#[test]
fn minilm_bin_and_onnx_convert_to_the_same_weights_and_match_onnxruntime() {
    let dir = minilm();
    let onnx = dir.join("model.onnx");
    assert!(
        onnx.is_file(),
        "{} is missing: run scripts/fetch-minilm.sh --torch",
        onnx.display()
    );
    let (path, json) = Source::read(&dir).unwrap().hf_config.unwrap();
    let model = kiln_convert::hf_config::model_config("bert", &json, &path.display().to_string()).unwrap();
    let (reference, _) = convert(&Source::read(&dir.join("model.safetensors")).unwrap(), &model, false).unwrap();
    for file in ["pytorch_model.bin", "model.onnx"] {
        let (weights, report) = convert(&Source::read(&dir.join(file)).unwrap(), &model, false).unwrap();
        assert!(report.is_complete(), "{file}: {}", report.details());
        common::assert_same_tensors(&reference, &weights);
    }
    #[derive(serde::Deserialize)]
    struct Ort {
        sentences: Vec<String>,
        embeddings: Vec<Vec<f32>>,
    }
    let ort: Ort =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.onnx.reference.json")).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (weights, _) = convert(&Source::read(&onnx).unwrap(), &model, false).unwrap();
    write_model_dir(
        &out.path().join("m"),
        &model,
        &weights,
        None,
        Some(&dir.join("tokenizer.json")),
    )
    .unwrap();
    let device = Device::flex();
    let run = LoadedModel::open(&out.path().join("m"), WhichWeights::Best, &device).unwrap();
    let Model::Encoder(bert) = &run.model else {
        unreachable!()
    };
    let texts: Vec<&str> = ort.sentences.iter().map(String::as_str).collect();
    let ours =
        kiln_infer::embed::embed_texts(bert.as_ref(), run.tokenizer.as_ref().unwrap(), &texts, 4, &device).unwrap();
    let max_diff = ours
        .iter()
        .flatten()
        .zip(ort.embeddings.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    eprintln!("MiniLM from ONNX vs onnxruntime: max abs difference {max_diff:.2e}");
    assert!(max_diff <= 1e-4, "max abs difference from onnxruntime {max_diff}");
}

/// A Hugging Face directory sharded with `model.safetensors.index.json` converts to
/// the same weights as the single file.
#[test]
fn sharded_hugging_face_directory_converts_like_a_single_file() {
    let fixtures = common::repo_root().join("tests/fixtures/hf-tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(fixtures.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut a, mut b, mut map) = (Vec::new(), Vec::new(), serde_json::Map::new());
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), serde_json::Value::String(shard.into()));
        if i % 2 == 0 {
            a.push((name, view))
        } else {
            b.push((name, view))
        }
    }
    std::fs::write(
        dir.path().join("model-00001-of-00002.safetensors"),
        safetensors::serialize(a, None).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model-00002-of-00002.safetensors"),
        safetensors::serialize(b, None).unwrap(),
    )
    .unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let sharded = Source::read(dir.path()).unwrap();
    assert_eq!(sharded.files.len(), 2);
    let single = Source::read(&fixtures).unwrap();
    let (path, json) = single.hf_config.clone().unwrap();
    let model = kiln_convert::hf_config::model_config("llama", &json, &path.display().to_string()).unwrap();
    let (x, _) = convert(&single, &model, false).unwrap();
    let (y, _) = convert(&sharded, &model, false).unwrap();
    common::assert_same_tensors(&x, &y);
}

/// The same MiniLM weights under the names wrappers give them (sentence-transformers'
/// `0.auto_model.`, DDP's `module.`, torch.compile's `_orig_mod.`) convert to the same
/// Kiln tensors, and the report names the prefixes it stripped.
#[test]
fn wrapped_checkpoints_convert_like_the_bare_model() {
    let dir = minilm();
    let (path, json) = Source::read(&dir).unwrap().hf_config.unwrap();
    let model = kiln_convert::hf_config::model_config("bert", &json, &path.display().to_string()).unwrap();
    let (reference, _) = convert(&Source::read(&dir).unwrap(), &model, false).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for prefix in [
        "0.auto_model.",
        "model.0.auto_model.",
        "module._orig_mod.",
        "_orig_mod.module.",
    ] {
        let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v))
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.safetensors");
        std::fs::write(&file, safetensors::serialize(renamed, None).unwrap()).unwrap();
        let (weights, report) = convert(&Source::read(&file).unwrap(), &model, false).unwrap();
        assert!(report.is_complete(), "{prefix}: {}", report.details());
        assert_eq!(
            report.wrappers.concat().len(),
            prefix.len(),
            "{prefix}: {:?}",
            report.wrappers
        );
        common::assert_same_tensors(&reference, &weights);
    }
}

/// Sentence-transformers' pooling is read from `modules.json` and `1_Pooling/config.json`:
/// MiniLM's own is mean + Normalize; a copy configured for CLS pooling without Normalize
/// embeds as the first token's raw state, one with max pooling as the masked maximum,
/// and a module Kiln does not compute is refused by name.
#[test]
fn sentence_transformers_pooling_is_respected() {
    use kiln_models::{ModelConfig, SentencePooling};
    let dir = minilm();
    let config = |dir: &Path| {
        let (path, json) = Source::read(dir).unwrap().hf_config.unwrap();
        kiln_convert::hf_config::model_config("bert", &json, &path.display().to_string()).unwrap()
    };
    let mut model = config(&dir);
    let line = kiln_convert::apply_sentence_pooling(&dir, &mut model).unwrap().unwrap();
    let ModelConfig::Bert(c) = &model else { unreachable!() };
    assert_eq!(
        (c.sentence_pooling, c.normalize),
        (SentencePooling::Mean, true),
        "{line}"
    );

    let copy = |pooling: &str, modules: &str| {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::os::unix::fs::symlink(dir.join(f), tmp.path().join(f)).unwrap();
        }
        std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
        std::fs::write(tmp.path().join("1_Pooling/config.json"), pooling).unwrap();
        std::fs::write(tmp.path().join("modules.json"), modules).unwrap();
        tmp
    };
    let two_modules = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#;
    let device = Device::flex();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![101i64, 2023, 2003, 1037, 3231, 102, 0, 0], [1, 8]),
        &device,
    );
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 0, 0], [1, 8]), &device);
    for (mode, key) in [
        (SentencePooling::Cls, "pooling_mode_cls_token"),
        (SentencePooling::Max, "pooling_mode_max_tokens"),
    ] {
        let tmp = copy(
            &format!(r#"{{"word_embedding_dimension": 384, "{key}": true, "pooling_mode_mean_tokens": false}}"#),
            two_modules,
        );
        let mut model = config(tmp.path());
        kiln_convert::apply_sentence_pooling(tmp.path(), &mut model)
            .unwrap()
            .unwrap();
        let ModelConfig::Bert(c) = &model else { unreachable!() };
        assert_eq!((c.sentence_pooling, c.normalize), (mode, false));
        let (weights, _) = convert(&Source::read(tmp.path()).unwrap(), &model, false).unwrap();
        let st = tmp.path().join("kiln.safetensors");
        std::fs::write(&st, weights).unwrap();
        let bert = kiln_core::weights::load_weights(c.init(&device), &st).unwrap();
        let hidden = bert.forward(ids.clone(), mask.clone());
        let want = match mode {
            SentencePooling::Cls => hidden.slice(burn::tensor::s![.., 0..1, ..]).reshape([1, 384]),
            _ => hidden
                .slice(burn::tensor::s![.., 0..6, ..])
                .max_dim(1)
                .reshape([1, 384]),
        };
        let got = bert.embed(ids.clone(), mask.clone());
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff <= 1e-6, "{mode:?}: {diff}");
    }
    let tmp = copy(
        r#"{"pooling_mode_mean_tokens": true}"#,
        r#"[{"path":"","type":"sentence_transformers.models.Transformer"},{"path":"2_Dense","type":"sentence_transformers.models.Dense"}]"#,
    );
    let err = kiln_convert::apply_sentence_pooling(tmp.path(), &mut config(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("modules.json") && err.contains("Dense"), "{err}");
    let tmp = copy(r#"{"pooling_mode_mean_sqrt_len_tokens": true}"#, two_modules);
    let err = kiln_convert::apply_sentence_pooling(tmp.path(), &mut config(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pooling_mode_mean_sqrt_len_tokens"), "{err}");
}

/// Half-precision checkpoints are read as what they are: MiniLM's weights saved in f16
/// convert to exactly their f32 values (the report counts the casts), `--dtype f16`
/// keeps them f16 at half the size and loads to the same model, and `--dtype bf16`
/// stores an f32 checkpoint in bf16 (cast counted, embeddings within 1e-2).
#[test]
fn half_precision_checkpoints_keep_their_values_and_dtype() {
    use kiln_convert::{StoreDtype, convert_as};
    use kiln_models::ModelConfig;
    let dir = minilm();
    let (path, json) = Source::read(&dir).unwrap().hf_config.unwrap();
    let model = kiln_convert::hf_config::model_config("bert", &json, &path.display().to_string()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f16_file = tmp.path().join("model.safetensors");
    std::fs::write(&f16_file, half_copy::f16_copy(&bytes)).unwrap();
    let source = Source::read(&f16_file).unwrap();
    let n = source.tensors.len(); // every tensor of the copy is F16

    let (as_f32, report) = convert(&source, &model, false).unwrap();
    assert_eq!(report.casts.get("F16 -> F32"), Some(&n), "{:?}", report.casts);
    // Every value is the f16 value, exactly.
    let (reference, _) = convert(&Source::read(&dir).unwrap(), &model, false).unwrap();
    assert_rounded(
        &as_f32,
        &reference,
        |v| half::f16::from_f32(v).to_f32(),
        "f16 safetensors",
    );

    let (as_f16, report) = convert_as(&source, &model, None, false, StoreDtype::F16).unwrap();
    assert!(!report.casts.keys().any(|k| k.contains("stored")), "{:?}", report.casts);
    let kept = safetensors::SafeTensors::deserialize(&as_f16).unwrap();
    assert!(kept.tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::F16));
    assert!(
        as_f16.len() * 10 < as_f32.len() * 6,
        "{} vs {} bytes",
        as_f16.len(),
        as_f32.len()
    );
    let ModelConfig::Bert(c) = &model else { unreachable!() };
    let device = Device::flex();
    let load = |bytes: &[u8], name: &str| {
        let file = tmp.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        kiln_core::weights::load_weights(c.init(&device), &file).unwrap()
    };
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![101i64, 2023, 2003, 1037, 3231, 102], [1, 6]),
        &device,
    );
    let mask = Tensor::<2, Int>::ones([1, 6], &device);
    let embed = |bytes: &[u8], name: &str| {
        load(bytes, name)
            .embed(ids.clone(), mask.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let e32 = embed(&as_f32, "f32.safetensors");
    assert_eq!(
        embed(&as_f16, "f16.safetensors"),
        e32,
        "f16 storage loads to the same model"
    );
    // A model directory stored in f16 is what `infer` and `serve` open.
    let f16_dir = tmp.path().join("minilm-f16");
    write_model_dir(&f16_dir, &model, &as_f16, None, Some(&dir.join("tokenizer.json"))).unwrap();
    let run = LoadedModel::open(&f16_dir, WhichWeights::Best, &device).unwrap();
    let Model::Encoder(bert) = &run.model else {
        unreachable!()
    };
    let texts = ["This is a test"];
    let opened =
        kiln_infer::embed::embed_texts(bert.as_ref(), run.tokenizer.as_ref().unwrap(), &texts, 1, &device).unwrap();
    let diff = opened[0]
        .iter()
        .zip(&e32)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-6, "the f16 directory embeds differently: {diff}");

    let (as_bf16, report) = convert_as(&Source::read(&dir).unwrap(), &model, None, false, StoreDtype::BF16).unwrap();
    assert_eq!(report.casts.get("F32 -> BF16 (stored)"), Some(&n), "{:?}", report.casts);
    let ebf = embed(&as_bf16, "bf16.safetensors");
    let diff = ebf.iter().zip(&e32).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    eprintln!("MiniLM stored in bf16: max |embedding - f32| {diff:.2e}");
    assert!(diff <= 1e-2, "{diff}");
}

/// Half-precision PyTorch pickles (scripts/export_onnx_variants.py saves MiniLM's state
/// dict in f16 and in bf16) are read as what they are: every value the f32 conversion's
/// rounded to that type, and the report counts the casts.
#[test]
fn half_precision_pickles_are_read_as_what_they_are() {
    let dir = minilm();
    let variants = dir.join("onnx-variants");
    let (path, json) = Source::read(&dir).unwrap().hf_config.unwrap();
    let model = kiln_convert::hf_config::model_config("bert", &json, &path.display().to_string()).unwrap();
    let (reference, _) = convert(&Source::read(&dir).unwrap(), &model, false).unwrap();
    type Round = fn(f32) -> f32;
    let cases: [(&str, &str, Round); 2] = [
        ("pytorch_model.f16.bin", "F16 -> F32", |v| {
            half::f16::from_f32(v).to_f32()
        }),
        ("pytorch_model.bf16.bin", "BF16 -> F32", |v| {
            half::bf16::from_f32(v).to_f32()
        }),
    ];
    for (file, cast, round) in cases {
        let path = variants.join(file);
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-minilm.sh --torch",
            path.display()
        );
        let (weights, report) = convert(&Source::read(&path).unwrap(), &model, false).unwrap();
        assert!(report.is_complete(), "{file}: {}", report.details());
        assert!(
            report.casts.get(cast).is_some_and(|&n| n > 100),
            "{file}: {:?}",
            report.casts
        );
        assert_rounded(&weights, &reference, round, file);
    }
}

/// Every f32 value of the safetensors `got` is `round` of the same value of `reference`.
fn assert_rounded(got: &[u8], reference: &[u8], round: fn(f32) -> f32, what: &str) {
    let (got, reference) = (
        safetensors::SafeTensors::deserialize(got).unwrap(),
        safetensors::SafeTensors::deserialize(reference).unwrap(),
    );
    for (name, view) in got.tensors() {
        let want = reference.tensor(&name).unwrap();
        for (x, y) in view.data().chunks_exact(4).zip(want.data().chunks_exact(4)) {
            let (x, y) = (
                f32::from_le_bytes(x.try_into().unwrap()),
                f32::from_le_bytes(y.try_into().unwrap()),
            );
            assert_eq!(x, round(y), "{what}: {name}");
        }
    }
}

#[derive(serde::Deserialize)]
struct ClassifierLogits {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    logits: Vec<Vec<f32>>,
}

/// Hugging Face sequence classifiers (scripts/make_classifier_fixture.py):
/// `BertForSequenceClassification` and `RobertaForSequenceClassification` convert into a
/// Kiln classifier directory: `[head]` from `id2label` with CLS pooling, the encoder under
/// `bert.` and the classifier beside it (RoBERTa's `classifier.dense` as the pooler,
/// `classifier.out_proj` as the classifier); their logits match transformers', and
/// `--to hf` gives back every original tensor bit for bit and a config that reads back
/// as the same head. Without the head, the classifier's tensors are refused.
#[test]
fn sequence_classifiers_convert_with_their_head_and_round_trip() {
    use kiln_convert::{StoreDtype, convert_as, hf_config};
    use kiln_core::ModelFile;
    for (fixture, class, head_tensor) in [
        (
            "hf-tiny-bert-classifier",
            "BertForSequenceClassification",
            "classifier.weight [3, 32]",
        ),
        (
            "hf-tiny-roberta-classifier",
            "RobertaForSequenceClassification",
            "classifier.out_proj.weight [3, 32]",
        ),
    ] {
        let dir = common::repo_root().join("tests/fixtures").join(fixture);
        let source = Source::read(&dir).unwrap();
        let (path, json) = source.hf_config.clone().unwrap();
        let p = path.display().to_string();
        let model = hf_config::detect_model_config(&json, &p).unwrap();
        let head = hf_config::head(&json, &model, &p)
            .unwrap()
            .expect("a classifier's config");
        assert_eq!(head.labels, ["negative", "neutral", "positive"]);
        assert_eq!(head.pooling, kiln_models::Pooling::Cls);
        let err = convert(&source, &model, false).unwrap_err().to_string();
        assert!(err.contains(&format!("unexpected: {head_tensor}")), "{fixture}: {err}");

        let (weights, report) = convert_as(&source, &model, Some(&head), false, StoreDtype::F32).unwrap();
        assert!(report.is_complete(), "{fixture}: {}", report.details());
        let out = tempfile::tempdir().unwrap();
        let kiln_dir = out.path().join("classifier");
        let file = ModelFile {
            model: model.clone(),
            head: Some(head.clone()),
            quantization: None,
        };
        kiln_convert::write_model_dir_with(&kiln_dir, &file, &weights, Some(&path), None, &[]).unwrap();
        let written = ModelFile::load(&kiln_dir.join("config.toml")).unwrap();
        assert_eq!(written.head.as_ref(), Some(&head));

        let reference: ClassifierLogits =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let (kiln_models::ModelConfig::Bert(c) | kiln_models::ModelConfig::Roberta(c)) = &model else {
            panic!("{}", model.arch())
        };
        let device = Device::flex();
        let classifier =
            kiln_core::weights::load_weights(head.init(c.init(&device), &device), &kiln_dir.join("model.safetensors"))
                .unwrap();
        let (b, t) = (reference.input_ids.len(), reference.input_ids[0].len());
        let int = |rows: &[Vec<i64>]| Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), &device);
        let logits = classifier
            .forward(int(&reference.input_ids), int(&reference.attention_mask))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want: Vec<f32> = reference.logits.concat();
        let max_diff = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        eprintln!("{class}: max |kiln - transformers| logit difference {max_diff:.2e}");
        assert!(max_diff <= 1e-5, "{fixture}: {max_diff}: {logits:?} vs {want:?}");

        // Back to Hugging Face: the same tensors, and a config with the same head.
        let hf = kiln_convert::export_hf(&weights, &model, Some(&head)).unwrap();
        assert_round_trip(&hf, &dir.join("model.safetensors"), fixture);
        let hf_json = hf_config::to_hf_json_with(&model, Some(&head)).unwrap();
        assert_eq!(hf_json["architectures"][0], class);
        assert_eq!(
            hf_config::head(&hf_json, &model, "exported").unwrap().as_ref(),
            Some(&head)
        );
        assert_eq!(
            hf_config::detect_model_config(&hf_json, "exported").unwrap(),
            model,
            "{fixture}: config round trip"
        );
    }
}

/// The exported safetensors `hf` hold exactly the tensors of `original`, bit for bit.
fn assert_round_trip(hf: &[u8], original: &Path, what: &str) {
    let exported = safetensors::SafeTensors::deserialize(hf).unwrap();
    let original_bytes = std::fs::read(original).unwrap();
    let original = safetensors::SafeTensors::deserialize(&original_bytes).unwrap();
    let (mut names, mut got) = (original.names(), exported.names());
    names.sort();
    got.sort();
    assert_eq!(got, names, "{what}");
    for name in names {
        let (a, b) = (original.tensor(name).unwrap(), exported.tensor(name).unwrap());
        assert!(
            a.shape() == b.shape() && a.data() == b.data(),
            "{what}: {name} differs after the round trip"
        );
    }
}

#[derive(serde::Deserialize)]
struct EncoderReference {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
    pooler_output: Vec<Vec<f32>>,
}

/// A Hugging Face `RobertaModel` converts to Kiln's `roberta` (BERT's layers, positions
/// after the padding index): its last hidden states (real tokens) and pooler output
/// match transformers', and `--to hf` round-trips bit for bit.
#[test]
fn roberta_matches_transformers_and_round_trips() {
    use kiln_convert::hf_config;
    let dir = common::repo_root().join("tests/fixtures/hf-tiny-roberta");
    let source = Source::read(&dir).unwrap();
    let (path, json) = source.hf_config.clone().unwrap();
    let model = hf_config::detect_model_config(&json, &path.display().to_string()).unwrap();
    let kiln_models::ModelConfig::Roberta(c) = &model else {
        panic!("detected {}", model.arch())
    };
    assert_eq!(c.position_offset, 2);
    let (weights, report) = convert(&source, &model, false).unwrap();
    assert!(report.is_complete(), "{}", report.details());
    let out = tempfile::tempdir().unwrap();
    let st = out.path().join("model.safetensors");
    std::fs::write(&st, &weights).unwrap();
    let device = Device::flex();
    let roberta = kiln_core::weights::load_weights(c.init(&device), &st).unwrap();
    assert_eq!(
        roberta.max_positions(),
        16,
        "18 position rows, the first 2 before the offset"
    );
    let reference: EncoderReference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let (b, t) = (reference.input_ids.len(), reference.input_ids[0].len());
    let int = |rows: &[Vec<i64>]| Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), &device);
    let hidden = roberta.forward(int(&reference.input_ids), int(&reference.attention_mask));
    let pooled = roberta.pooled(hidden.clone()).into_data().try_to_vec::<f32>().unwrap();
    let hidden = hidden.into_data().try_to_vec::<f32>().unwrap();
    let c = reference.pooler_output[0].len();
    let mut max_hidden = 0f32;
    for (i, mask) in reference.attention_mask.concat().iter().enumerate() {
        if *mask == 1 {
            let want = &reference.last_hidden_state[i / t][i % t];
            for (a, b) in hidden[i * c..(i + 1) * c].iter().zip(want) {
                max_hidden = max_hidden.max((a - b).abs());
            }
        }
    }
    let want: Vec<f32> = reference.pooler_output.concat();
    let max_pooled = pooled.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    eprintln!("RobertaModel: max |kiln - transformers| hidden {max_hidden:.2e}, pooler {max_pooled:.2e}");
    assert!(max_hidden <= 1e-5 && max_pooled <= 1e-5, "{max_hidden} {max_pooled}");
    let hf = kiln_convert::export_hf(&weights, &model, None).unwrap();
    assert_round_trip(&hf, &dir.join("model.safetensors"), "roberta");
    let hf_json = hf_config::to_hf_json(&model).unwrap();
    assert_eq!(hf_config::detect_model_config(&hf_json, "exported").unwrap(), model);
}

/// Task heads Kiln does not compute are refused naming the key.
#[test]
fn unsupported_classifier_configs_are_refused_by_key() {
    use kiln_convert::hf_config;
    let dir = common::repo_root().join("tests/fixtures/hf-tiny-bert-classifier");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let model = hf_config::detect_model_config(&json, "config.json").unwrap();
    let mut multi = json.clone();
    multi["problem_type"] = "multi_label_classification".into();
    let err = hf_config::head(&multi, &model, "config.json").unwrap_err().to_string();
    assert!(
        err.contains("config.json: problem_type") && err.contains("single-label"),
        "{err}"
    );
    let mut regression = json.clone();
    regression["num_labels"] = 1.into();
    let err = hf_config::head(&regression, &model, "config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("regression"), "{err}");
    let mut holes = json.clone();
    holes["num_labels"] = 4.into();
    let err = hf_config::head(&holes, &model, "config.json").unwrap_err().to_string();
    assert!(err.contains("id2label.3"), "{err}");
    let mut bare = json;
    bare["architectures"] = serde_json::json!(["BertModel"]);
    assert!(hf_config::head(&bare, &model, "config.json").unwrap().is_none());
}
