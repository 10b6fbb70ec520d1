//! Any model directory loaded for inference, as a typed model of its family.
//!
//! [`LoadedModel::open`] reads the directory's `config.toml`, builds the configured
//! architecture through the registry ([`ModelConfig::visit_family`]), loads and checks
//! its weights, and reads what inference needs beside them: the tokenizer, the class
//! names, the end-of-sequence tokens.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use kiln_core::StoreError;
use kiln_core::layout::{
    CONFIG, GENERATION_CONFIG, HF_CONFIG, LABELS, ModelDir, ModelDirError, TOKENIZER, WhichWeights,
};
use kiln_core::weights::load_weights;
use kiln_data::{DataError, Tokenizer};
use kiln_models::quant::{self, Quantization};
use kiln_models::{
    CausalLm, ClassifierHead, Encoder, EncoderArchitecture, FamilyVisitor, ImageArchitecture, ImageClassifier,
    LanguageArchitecture, ModelKind, SequenceClassifier,
};

/// A model of one family, ready to run.
pub enum Model {
    CausalLm(Box<dyn CausalLm + Send>),
    ImageClassifier(Box<dyn ImageClassifier + Send>),
    /// An encoder (sentence embeddings).
    Encoder(Box<dyn Encoder + Send>),
    /// An encoder with a classification head (a fine-tuned classifier).
    TextClassifier(Box<dyn SequenceClassifier + Send>),
}

/// A model directory that cannot be loaded; names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Dir(#[from] ModelDirError),
    #[error(transparent)]
    Weights(#[from] StoreError),
    #[error(transparent)]
    Tokenizer(#[from] DataError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A model directory loaded for inference.
pub struct LoadedModel {
    pub dir: ModelDir,
    pub model: Model,
    /// Language models and encoders.
    pub tokenizer: Option<Tokenizer>,
    /// Class names (a classifier head's labels, or an image model's `labels.json`);
    /// empty when the directory names no classes.
    pub labels: Vec<String>,
    /// Tokens that end generation: `eos_token_id` of `generation_config.json` or
    /// `config.json` when the directory has them, else the tokenizer's end-of-text
    /// tokens.
    pub eos_token_ids: Vec<u32>,
}

impl LoadedModel {
    /// Open `dir` and load its model on `device`.
    pub fn open(dir: &Path, which: WhichWeights, device: &Device) -> Result<Self, LoadError> {
        let dir = ModelDir::open(dir, which)?;
        let kind = dir.file.model.kind();
        let tokenizer = match kind {
            ModelKind::CausalLm | ModelKind::Encoder => Some(Tokenizer::load(&dir.path(TOKENIZER))?),
            ModelKind::ImageClassifier => None,
        };
        // (the tokenizer's parse leaves free pages the weights would sit on top of:
        // 14 MiB for Gemma 3's)
        kiln_core::sys::release_free_heap();
        let model = dir.file.model.visit_family(Build {
            weights: &dir.weights,
            config: &dir.path(CONFIG),
            head: dir.file.head.as_ref(),
            quantization: dir.file.quantization.as_ref(),
            device,
        })?;
        let labels = match (&model, &dir.file.head) {
            (_, Some(head)) => head.labels.clone(),
            (Model::ImageClassifier(m), None) => read_labels(&dir.path(LABELS), m.num_classes())?,
            _ => Vec::new(),
        };
        let eos_token_ids = match kind {
            ModelKind::CausalLm => eos_ids(&dir, tokenizer.as_ref())?,
            _ => Vec::new(),
        };
        Ok(Self {
            dir,
            model,
            tokenizer,
            labels,
            eos_token_ids,
        })
    }

    pub fn arch(&self) -> &'static str {
        self.dir.file.model.arch()
    }

    /// The longest input (tokens) a text classifier takes: the length its head was
    /// trained on (`[head] max_length`), else its encoder's positions.
    pub fn classifier_max_length(&self, model: &dyn SequenceClassifier) -> usize {
        self.dir
            .file
            .head
            .as_ref()
            .and_then(|h| h.max_length)
            .unwrap_or_else(|| model.max_positions())
    }

    /// The name of class `k` (`class k` when the directory names none).
    pub fn label(&self, k: usize) -> String {
        self.labels.get(k).cloned().unwrap_or_else(|| format!("class {k}"))
    }
}

/// The registry visitor that builds and loads the configured model.
struct Build<'a> {
    weights: &'a Path,
    head: Option<&'a ClassifierHead>,
    device: &'a Device,
    /// The directory's `config.toml` (for errors in its `[quantization]`).
    config: &'a Path,
    quantization: Option<&'a Quantization>,
}

impl Build<'_> {
    /// `init(device)` loaded from the weights file. With packed weights: built and
    /// loaded on flex with its packed layout, every block checked, then on flex
    /// interleaved eight rows at a time for Kiln's quantized kernels
    /// ([`quant::interleaved`]), and on another backend dequantized and moved there.
    fn load<M: burn::module::Module>(&self, init: impl Fn(&Device) -> M) -> Result<M, LoadError> {
        let Some(q) = self.quantization else {
            return Ok(load_weights(init(self.device), self.weights)?);
        };
        let bad = |path: &Path, message: String| LoadError::File {
            path: path.to_path_buf(),
            message,
        };
        let flex = Device::flex();
        let model = quant::packed_layout(init(&flex), q).map_err(|e| bad(self.config, e.to_string()))?;
        let model = load_weights(model, self.weights)?;
        quant::check_packed(&model).map_err(|e| bad(self.weights, e))?;
        if *self.device == flex {
            Ok(quant::interleaved(model))
        } else {
            Ok(quant::unpacked(model).to_device(self.device))
        }
    }
}

impl FamilyVisitor for Build<'_> {
    type Output = Result<Model, LoadError>;

    fn causal_lm<A: LanguageArchitecture>(self, config: &A) -> Self::Output {
        let model = self.load(|device| config.init(device))?;
        // Decoding streams every linear weight once per token: on flex, lay them out
        // for Kiln's matrix-vector kernels.
        Ok(Model::CausalLm(Box::new(kiln_models::fused::for_decoding(model))))
    }

    fn image_classifier<A: ImageArchitecture>(self, config: &A) -> Self::Output {
        Ok(Model::ImageClassifier(Box::new(
            self.load(|device| config.init(device))?,
        )))
    }

    fn encoder<A: EncoderArchitecture>(self, config: &A) -> Self::Output {
        Ok(match self.head {
            Some(head) => Model::TextClassifier(Box::new(self.load(|device| config.init_classifier(head, device))?)),
            None => Model::Encoder(Box::new(self.load(|device| config.init(device))?)),
        })
    }
}

/// `labels.json` (a JSON array of `classes` names), if the directory has one.
fn read_labels(path: &Path, classes: usize) -> Result<Vec<String>, LoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(LoadError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    let labels: Vec<String> = serde_json::from_str(&text).map_err(|e| LoadError::File {
        path: path.to_path_buf(),
        message: format!("not a JSON array of class names: {e}"),
    })?;
    if labels.len() != classes {
        return Err(LoadError::File {
            path: path.to_path_buf(),
            message: format!("names {} classes, the model has {classes}", labels.len()),
        });
    }
    Ok(labels)
}

/// End-of-sequence ids: `eos_token_id` (a number or a list) of `generation_config.json`,
/// else of `config.json`, else the tokenizer's end-of-text tokens.
fn eos_ids(dir: &ModelDir, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, LoadError> {
    for name in [GENERATION_CONFIG, HF_CONFIG] {
        let path = dir.path(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::File {
            path: path.clone(),
            message: format!("not JSON: {e}"),
        })?;
        if let Some(ids) = parse_eos(&json, &path)? {
            return Ok(ids);
        }
    }
    Ok(tokenizer.map(Tokenizer::end_of_text_ids).unwrap_or_default())
}

/// `eos_token_id` of a Hugging Face config: absent/null -> `None`, a number or a list of
/// numbers -> the ids, anything else -> an error naming the file and key.
pub fn parse_eos(json: &serde_json::Value, path: &Path) -> Result<Option<Vec<u32>>, LoadError> {
    let bad = || LoadError::File {
        path: path.to_path_buf(),
        message: format!(
            "eos_token_id = {} is not a token id or a list of them",
            json["eos_token_id"]
        ),
    };
    let id = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match json.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(ids)) => ids
            .iter()
            .map(|v| id(v).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(Some),
        Some(v) => id(v).map(|i| Some(vec![i])).ok_or_else(bad),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_token_ids_are_read_as_a_number_or_a_list() {
        let p = Path::new("config.json");
        let parse = |text: &str| parse_eos(&serde_json::from_str(text).unwrap(), p);
        assert_eq!(parse(r#"{"eos_token_id": 50256}"#).unwrap(), Some(vec![50256]));
        assert_eq!(parse(r#"{"eos_token_id": [1, 107]}"#).unwrap(), Some(vec![1, 107]));
        assert_eq!(parse(r#"{"eos_token_id": null}"#).unwrap(), None);
        assert_eq!(parse(r#"{"bos_token_id": 1}"#).unwrap(), None);
        let err = parse(r#"{"eos_token_id": "x"}"#).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("eos_token_id"), "{err}");
    }
}
