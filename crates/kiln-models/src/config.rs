//! The architecture switch: `[model] arch = "gpt2" | "llama" | "mlp" | "cnn"` plus that
//! architecture's typed fields.

use serde::{Deserialize, Serialize};

use crate::{BertConfig, CnnConfig, Gpt2Config, LlamaConfig, MlpConfig};

/// An impossible hyper-parameter, named by its config key.
#[derive(Debug, thiserror::Error)]
#[error("model.{key}: {message}")]
pub struct ConfigError {
    pub key: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

/// Fail with a [`ConfigError`] naming `key` unless `ok`.
pub(crate) fn ensure(ok: bool, key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, message))
    }
}

/// What a model consumes and produces; decides which data and loss go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Token ids in, next-token logits out.
    CausalLm,
    /// Images in, class logits out.
    ImageClassifier,
    /// Token ids in, contextual states and sentence embeddings out (BERT).
    Encoder,
}

/// One architecture's hyper-parameters, tagged by `arch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
    Mlp(MlpConfig),
    Cnn(CnnConfig),
    Bert(BertConfig),
}

impl ModelConfig {
    pub fn arch(&self) -> &'static str {
        match self {
            Self::Gpt2(_) => "gpt2",
            Self::Llama(_) => "llama",
            Self::Mlp(_) => "mlp",
            Self::Cnn(_) => "cnn",
            Self::Bert(_) => "bert",
        }
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Self::Gpt2(_) | Self::Llama(_) => ModelKind::CausalLm,
            Self::Mlp(_) | Self::Cnn(_) => ModelKind::ImageClassifier,
            Self::Bert(_) => ModelKind::Encoder,
        }
    }

    /// Check every field; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Gpt2(c) => c.validate(),
            Self::Llama(c) => c.validate(),
            Self::Mlp(c) => c.validate(),
            Self::Cnn(c) => c.validate(),
            Self::Bert(c) => c.validate(),
        }
    }

    /// Context length of a language model (`None` for image models).
    pub fn context_len(&self) -> Option<usize> {
        match self {
            Self::Gpt2(c) => Some(c.block_size),
            Self::Llama(c) => Some(c.block_size),
            _ => None,
        }
    }

    /// Set the vocabulary size of a language model once the tokenizer is known.
    pub fn set_vocab_size(&mut self, vocab_size: usize) {
        match self {
            Self::Gpt2(c) => c.vocab_size = vocab_size,
            Self::Llama(c) => c.vocab_size = vocab_size,
            _ => {}
        }
    }

    pub fn vocab_size(&self) -> Option<usize> {
        match self {
            Self::Gpt2(c) => Some(c.vocab_size),
            Self::Llama(c) => Some(c.vocab_size),
            _ => None,
        }
    }
}
