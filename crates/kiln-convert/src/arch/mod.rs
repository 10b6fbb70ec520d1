//! One file per architecture: its weight-name rule table and its Hugging Face
//! `config.json` mapping (a serde struct each way). [`ALL`] lists them; an architecture
//! of the model registry without an entry here cannot be converted (and says so).

use kiln_models::ModelConfig;
use serde_json::Value;

use crate::ConvertError;

pub(crate) mod bert;
pub use bert::sentence_pooling;
mod cnn;
mod gemma3;
mod gpt2;
mod llama;
mod mlp;
mod roberta;

/// The conversion table of one architecture.
pub struct Rules {
    /// `(regex, replacement)` applied in order to every source name.
    pub renames: &'static [(&'static str, &'static str)],
    /// Source names (regex, before renaming) that are buffers or duplicates, not weights.
    pub ignore: &'static [&'static str],
    /// Kiln names (regex) whose source is `[out, in]` and is transposed.
    pub transpose: &'static [&'static str],
    /// `(regex, replacement)` from Kiln names back to Hugging Face ones (`--to hf`).
    pub export: &'static [(&'static str, &'static str)],
    /// Kiln names (regex) of parameters that a model with tied weights does not have:
    /// a checkpoint's copy of them is a duplicate, ignored (`lm_head.weight`).
    pub tied: &'static [&'static str],
}

/// How an architecture reads a GGUF file ([`crate::gguf`]).
pub struct GgufRules {
    /// The `general.architecture` values it reads.
    pub architectures: &'static [&'static str],
    /// `(regex, replacement)`: llama.cpp tensor name -> Hugging Face name. A tensor no
    /// rule matches is refused.
    pub tensors: &'static [(&'static str, &'static str)],
    /// The Hugging Face `config.json` of the file's metadata.
    pub config: fn(&kiln_gguf::GgufFile) -> Result<Value, ConvertError>,
    /// Undo llama.cpp's changes to one tensor (HF name, row-major shape, values, the HF
    /// config); an error message when the tensor cannot be undone.
    pub fix: Option<fn(&str, &[usize], &mut [f32], &Value) -> Result<(), String>>,
}

/// Reads a Hugging Face `config.json` (`path` names it in errors).
pub type FromHf = fn(&Value, &str) -> Result<ModelConfig, ConvertError>;
/// Writes a Hugging Face `config.json`; `None` when the config is another architecture's.
pub type ToHf = fn(&ModelConfig) -> Option<Value>;

/// How one architecture converts.
pub struct Conversion {
    /// The Kiln architecture (`[model] arch`).
    pub arch: &'static str,
    pub rules: Rules,
    /// Hugging Face `model_type`s this architecture reads.
    pub model_types: &'static [&'static str],
    pub from_hf: Option<FromHf>,
    pub to_hf: Option<ToHf>,
    pub gguf: Option<&'static GgufRules>,
    /// Places an ONNX graph's weights by their role ([`crate::onnx`]); without one, an
    /// ONNX file of this architecture converts only when its initializers keep their
    /// parameter names.
    pub onnx: Option<crate::onnx::Resolver>,
    /// How a task model's sequence-classification head converts; `None`: the
    /// architecture has no classifier.
    pub head: Option<&'static HeadRules>,
}

/// A sequence-classification head on an encoder (`BertForSequenceClassification`,
/// `RobertaForSequenceClassification`): Kiln keeps the encoder's parameters under
/// [`CLASSIFIER_ENCODER`] and the head beside them, with the labels and pooling in
/// `[head]` (read from the config by [`bert::head_from_hf`]).
pub struct HeadRules {
    /// The Hugging Face class `--to hf` writes.
    pub class: &'static str,
    /// The encoder's prefix in the Hugging Face task model's names (`bert.`, `roberta.`).
    pub hf_encoder: &'static str,
    /// `(regex, replacement)`: the head's Hugging Face names (after wrapper prefixes) ->
    /// Kiln's.
    pub tensors: &'static [(&'static str, &'static str)],
    /// `(regex, replacement)`: Kiln names of the head's tensors -> Hugging Face's.
    pub export: &'static [(&'static str, &'static str)],
    /// Kiln names (regex) of head weights stored `[out, in]` (transposed both ways).
    pub transpose: &'static [&'static str],
}

/// Where a Kiln classifier keeps its encoder (`BertForSequenceClassification::bert`),
/// whatever the architecture.
pub const CLASSIFIER_ENCODER: &str = "bert.";

/// Prefixes that wrappers put before every parameter name, whatever the architecture:
/// torch.compile (`_orig_mod.`), DistributedDataParallel / DataParallel (`module.`),
/// sentence-transformers (`0.auto_model.`, `model.0.auto_model.` when the
/// SentenceTransformer is itself wrapped, `auto_model.` of its Transformer module).
/// Stripped, repeatedly and in any order, before the architecture's own renames.
pub const WRAPPER_PREFIXES: &[&str] = &[
    "_orig_mod.",
    "module.",
    "model.0.auto_model.",
    "0.auto_model.",
    "auto_model.",
];

/// `name` without its wrapper prefixes, and the prefixes removed.
pub fn strip_wrappers(name: &str) -> (&str, Vec<&'static str>) {
    let mut rest = name;
    let mut removed = vec![];
    while let Some(p) = WRAPPER_PREFIXES.iter().find(|p| rest.starts_with(**p)) {
        rest = &rest[p.len()..];
        removed.push(*p);
    }
    (rest, removed)
}

/// Every architecture that converts.
pub const ALL: &[&Conversion] = &[
    &gpt2::CONVERSION,
    &llama::CONVERSION,
    &gemma3::CONVERSION,
    &bert::CONVERSION,
    &roberta::CONVERSION,
    &mlp::CONVERSION,
    &cnn::CONVERSION,
];

/// The conversion of `arch`.
pub fn for_arch(arch: &str) -> Result<&'static Conversion, ConvertError> {
    ALL.iter().copied().find(|c| c.arch == arch).ok_or_else(|| {
        ConvertError::Config(format!(
            "no conversion rules for architecture {arch:?} (known: {})",
            ALL.iter().map(|c| c.arch).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// The Kiln architecture of a Hugging Face `config.json`, from its `model_type`, else
/// from its `architectures` list (`GPT2LMHeadModel` -> gpt2, ...).
pub fn detect(json: &Value, path: &str) -> Result<&'static str, ConvertError> {
    let readable = || ALL.iter().filter(|c| c.from_hf.is_some());
    if let Some(model_type) = json.get("model_type").and_then(Value::as_str) {
        return readable()
            .find(|c| c.model_types.contains(&model_type))
            .map(|c| c.arch)
            .ok_or_else(|| {
                ConvertError::Config(format!(
                    "{path}: model_type {model_type:?} is not an architecture Kiln converts (model_type of: {})",
                    readable()
                        .flat_map(|c| c.model_types.iter().copied())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            });
    }
    let names: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for name in &names {
        let lower = name.to_ascii_lowercase();
        if let Some(c) = readable().find(|c| c.model_types.iter().any(|t| lower.starts_with(t))) {
            return Ok(c.arch);
        }
    }
    Err(ConvertError::Config(format!(
        "{path}: neither model_type nor architectures ({names:?}) names an architecture Kiln converts; pass --arch"
    )))
}

/// Parse `json` as `T`, an error naming the file and the key.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(json: &Value, path: &str) -> Result<T, ConvertError> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        ConvertError::Config(if key == "." {
            format!("{path}: {message}")
        } else {
            format!("{path}: {key}: {message}")
        })
    })
}

/// Refuse a `model_type` that is not `expected`'s.
pub(crate) fn check_model_type(json: &Value, expected: &[&str], arch: &str, path: &str) -> Result<(), ConvertError> {
    match json.get("model_type").and_then(Value::as_str) {
        Some(t) if !expected.contains(&t) => Err(ConvertError::Config(format!(
            "{path}: model_type is \"{t}\", not {arch}: a checkpoint of another architecture"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_architecture_is_detected_from_model_type_or_architectures() {
        let detect = |text: &str| detect(&serde_json::from_str(text).unwrap(), "config.json");
        assert_eq!(detect(r#"{"model_type": "gpt2"}"#).unwrap(), "gpt2");
        assert_eq!(detect(r#"{"model_type": "llama"}"#).unwrap(), "llama");
        assert_eq!(detect(r#"{"model_type": "gemma3_text"}"#).unwrap(), "gemma3");
        assert_eq!(detect(r#"{"model_type": "qwen2"}"#).unwrap(), "llama");
        assert_eq!(detect(r#"{"model_type": "bert"}"#).unwrap(), "bert");
        assert_eq!(detect(r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap(), "llama");
        assert_eq!(detect(r#"{"architectures": ["BertModel"]}"#).unwrap(), "bert");
        let err = detect(r#"{"model_type": "mamba"}"#).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("mamba") && err.contains("gpt2"),
            "{err}"
        );
        let err = detect(r#"{"architectures": ["Foo"]}"#).unwrap_err().to_string();
        assert!(err.contains("--arch"), "{err}");
    }

    #[test]
    fn wrapper_prefixes_are_stripped_in_any_order() {
        assert_eq!(
            strip_wrappers("module._orig_mod.encoder.layer.0.x").0,
            "encoder.layer.0.x"
        );
        assert_eq!(strip_wrappers("_orig_mod.module.h.0.attn").0, "h.0.attn");
        let (rest, removed) = strip_wrappers("model.0.auto_model.embeddings.word_embeddings.weight");
        assert_eq!(
            (rest, removed),
            ("embeddings.word_embeddings.weight", vec!["model.0.auto_model."])
        );
        assert_eq!(strip_wrappers("0.auto_model.pooler.dense.bias").0, "pooler.dense.bias");
        // A Llama's own `model.` is not a wrapper.
        assert_eq!(
            strip_wrappers("model.layers.0.mlp.up_proj.weight").0,
            "model.layers.0.mlp.up_proj.weight"
        );
    }

    #[test]
    fn every_registered_architecture_has_a_conversion() {
        for arch in ModelConfig::ARCHITECTURES {
            assert!(for_arch(arch).is_ok(), "{arch} has no conversion rules");
        }
        let Err(err) = for_arch("nope") else { panic!("found") };
        assert!(err.to_string().contains("known: gpt2"), "{err}");
    }

    #[test]
    fn a_missing_field_names_the_file_and_the_key() {
        let json = serde_json::json!({"model_type": "gpt2", "n_head": 2});
        let err = crate::hf_config::model_config("gpt2", &json, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json") && err.contains("n_layer"), "{err}");
        let err = crate::hf_config::model_config("bert", &json, "config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_hidden_layers"), "{err}");
    }
}
