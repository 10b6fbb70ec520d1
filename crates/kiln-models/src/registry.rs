//! The architecture registry: every architecture Kiln knows, listed once in
//! [`architectures!`] below.
//!
//! An architecture is its model file (`gpt2.rs`, ...: the config, the modules and an
//! `impl Architecture` for the config) plus one line here. Everything that needs to
//! build or inspect "the configured model" (train, finetune, infer, convert, serve, the
//! benchmarks) goes through [`ModelConfig::visit`] or [`ModelConfig::visit_family`]
//! with a generic visitor, never through a `match` of its own: a new architecture is
//! picked up by all of them at once.

use burn::module::Module;
use burn::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    BertConfig, CausalLm, ClassifierHead, CnnConfig, Encoder, Gemma3Config, Gpt2Config, ImageClassifier, LlamaConfig,
    MlpConfig, SequenceClassifier,
};

/// An impossible hyper-parameter, named by its config key.
#[derive(Debug, thiserror::Error)]
#[error("model.{key}: {message}")]
pub struct FieldError {
    pub key: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }
}

/// Fail with a [`FieldError`] naming `key` unless `ok`.
pub(crate) fn ensure(ok: bool, key: &'static str, message: impl Into<String>) -> Result<(), FieldError> {
    if ok { Ok(()) } else { Err(FieldError::new(key, message)) }
}

/// `vocab_size = 0` ("from the tokenizer") left unresolved.
pub(crate) fn unresolved_vocab(vocab_size: usize) -> Vec<FieldError> {
    if vocab_size == 0 {
        vec![FieldError::new(
            "vocab_size",
            "is 0 (\"take it from the tokenizer\"), but this model file must give the real size",
        )]
    } else {
        Vec::new()
    }
}

/// What a model consumes and produces; decides which data, loss and inference go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Token ids in, next-token logits out.
    CausalLm,
    /// Images in, class logits out.
    ImageClassifier,
    /// Token ids in, contextual states and sentence embeddings out (BERT).
    Encoder,
}

/// The hyper-parameters of one architecture and how to build its model.
pub trait Architecture:
    Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The model this config builds.
    type Model: Module + Clone + Send + 'static;
    /// Check every field; the error names the offending key. A config that passes can
    /// still leave sizes to be resolved (a language model's `vocab_size = 0` until the
    /// tokenizer is known): see [`ModelConfig::validate_complete`].
    fn validate(&self) -> Result<(), FieldError>;
    /// Fields that must be set before [`init`](Self::init) (e.g. `vocab_size`), with
    /// what is wrong; empty when the model can be built.
    fn unresolved(&self) -> Vec<FieldError> {
        Vec::new()
    }
    /// The model with freshly initialised parameters on `device`.
    fn init(&self, device: &Device) -> Self::Model;
}

/// Sizes of a language model's config (dyn-compatible, for [`ModelConfig::lm`]).
pub trait LmSizes {
    fn context_len(&self) -> usize;
    /// 0 until resolved from the tokenizer.
    fn vocab_size(&self) -> usize;
    fn set_vocab_size(&mut self, vocab_size: usize);
}

/// A causal language model architecture (gpt2, llama, ...).
pub trait LanguageArchitecture: Architecture<Model: CausalLm> + LmSizes {}

/// An image classifier architecture (mlp, cnn, ...).
pub trait ImageArchitecture: Architecture<Model: ImageClassifier> {}

/// A text encoder architecture (bert, ...), with its sequence-classification model.
pub trait EncoderArchitecture: Architecture<Model: Encoder> {
    /// The encoder with a classification head (what `finetune` with `task = "classify"`
    /// trains and a fine-tuned model directory holds).
    type Classifier: Module + Clone + Send + SequenceClassifier + 'static;
    fn init_classifier(&self, head: &ClassifierHead, device: &Device) -> Self::Classifier;
}

/// A generic operation on any architecture's config.
pub trait ArchVisitor {
    type Output;
    fn visit<A: Architecture>(self, config: &A) -> Self::Output;
}

/// A generic operation that depends on the model family.
pub trait FamilyVisitor {
    type Output;
    fn causal_lm<A: LanguageArchitecture>(self, config: &A) -> Self::Output;
    fn image_classifier<A: ImageArchitecture>(self, config: &A) -> Self::Output;
    fn encoder<A: EncoderArchitecture>(self, config: &A) -> Self::Output;
}

macro_rules! architectures {
    ($( $name:literal => $variant:ident($config:ty), $family:ident; )*) => {
        /// One architecture's hyper-parameters, tagged by `arch` (`[model] arch = "gpt2"`).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "arch")]
        pub enum ModelConfig {
            $( #[serde(rename = $name)] $variant($config), )*
        }

        impl ModelConfig {
            /// Every architecture name, in registry order.
            pub const ARCHITECTURES: &'static [&'static str] = &[$( $name ),*];

            /// The `arch` name.
            pub fn arch(&self) -> &'static str {
                match self { $( Self::$variant(_) => $name, )* }
            }

            /// Run `visitor` on the architecture's typed config.
            pub fn visit<V: ArchVisitor>(&self, visitor: V) -> V::Output {
                match self { $( Self::$variant(c) => visitor.visit(c), )* }
            }

            /// Run `visitor` on the typed config through its family's method.
            pub fn visit_family<V: FamilyVisitor>(&self, visitor: V) -> V::Output {
                match self { $( Self::$variant(c) => visitor.$family(c), )* }
            }

            /// The sizes of a language model's config (`None` for other families).
            pub fn lm(&self) -> Option<&dyn LmSizes> {
                match self { $( Self::$variant(c) => architectures!(@lm $family, c), )* }
            }

            /// [`lm`](Self::lm), mutably.
            pub fn lm_mut(&mut self) -> Option<&mut dyn LmSizes> {
                match self { $( Self::$variant(c) => architectures!(@lm $family, c), )* }
            }

            pub fn kind(&self) -> ModelKind {
                match self { $( Self::$variant(_) => architectures!(@kind $family), )* }
            }
        }
    };
    (@lm causal_lm, $c:ident) => { Some($c) };
    (@lm $other:ident, $c:ident) => {{
        let _ = $c;
        None
    }};
    (@kind causal_lm) => { ModelKind::CausalLm };
    (@kind image_classifier) => { ModelKind::ImageClassifier };
    (@kind encoder) => { ModelKind::Encoder };
}

// The registry: `"arch" => Variant(Config), family;`
architectures! {
    "gpt2" => Gpt2(Gpt2Config), causal_lm;
    "llama" => Llama(LlamaConfig), causal_lm;
    "gemma3" => Gemma3(Gemma3Config), causal_lm;
    "mlp" => Mlp(MlpConfig), image_classifier;
    "cnn" => Cnn(CnnConfig), image_classifier;
    "bert" => Bert(BertConfig), encoder;
    // RoBERTa / XLM-R: BERT's layers with positions after the padding index.
    "roberta" => Roberta(BertConfig), encoder;
}

struct Validate;
impl ArchVisitor for Validate {
    type Output = Result<(), FieldError>;
    fn visit<A: Architecture>(self, config: &A) -> Self::Output {
        config.validate()
    }
}

struct Unresolved;
impl ArchVisitor for Unresolved {
    type Output = Vec<FieldError>;
    fn visit<A: Architecture>(self, config: &A) -> Self::Output {
        config.unresolved()
    }
}

impl ModelConfig {
    /// Check every field; the error names the offending key.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.visit(Validate)
    }

    /// [`validate`](Self::validate), and every size resolved: what a model directory
    /// must hold, since its model is built as is.
    pub fn validate_complete(&self) -> Result<(), FieldError> {
        self.validate()?;
        match self.visit(Unresolved).into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Context length of a language model (`None` for other families).
    pub fn context_len(&self) -> Option<usize> {
        self.lm().map(|lm| lm.context_len())
    }

    /// Vocabulary size of a language model (`None` for other families).
    pub fn vocab_size(&self) -> Option<usize> {
        self.lm().map(|lm| lm.vocab_size())
    }

    /// Set the vocabulary size of a language model once the tokenizer is known.
    pub fn set_vocab_size(&mut self, vocab_size: usize) {
        if let Some(lm) = self.lm_mut() {
            lm.set_vocab_size(vocab_size);
        }
    }

    /// Look up an architecture name (for error messages that list the known ones).
    pub fn is_known(arch: &str) -> bool {
        Self::ARCHITECTURES.contains(&arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_name_round_trips_through_serde() {
        let configs = [
            ModelConfig::Gpt2(Gpt2Config {
                n_layer: 1,
                n_head: 1,
                n_embd: 8,
                block_size: 4,
                vocab_size: 5,
                dropout: 0.0,
                bias: true,
                layer_norm_epsilon: 1e-5,
                activation: Default::default(),
            }),
            ModelConfig::Mlp(MlpConfig {
                hidden_sizes: vec![3],
                input_shape: [1, 2, 2],
                num_classes: 2,
                dropout: 0.0,
            }),
        ];
        for c in configs {
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(json["arch"], c.arch());
            assert!(ModelConfig::is_known(c.arch()));
            let back: ModelConfig = serde_json::from_value(json).unwrap();
            assert_eq!(back, c);
        }
        assert_eq!(
            ModelConfig::ARCHITECTURES,
            ["gpt2", "llama", "gemma3", "mlp", "cnn", "bert", "roberta"]
        );
    }

    #[test]
    fn a_language_model_without_a_vocabulary_is_incomplete() {
        let mut c = ModelConfig::Gpt2(Gpt2Config {
            n_layer: 1,
            n_head: 1,
            n_embd: 8,
            block_size: 4,
            vocab_size: 0,
            dropout: 0.0,
            bias: true,
            layer_norm_epsilon: 1e-5,
            activation: Default::default(),
        });
        assert!(c.validate().is_ok());
        let err = c.validate_complete().unwrap_err();
        assert_eq!(err.key, "vocab_size");
        c.set_vocab_size(7);
        assert!(c.validate_complete().is_ok());
        assert_eq!(c.vocab_size(), Some(7));
        assert_eq!(c.kind(), ModelKind::CausalLm);
    }
}
