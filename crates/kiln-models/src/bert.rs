//! BERT encoder: word + position + token-type embeddings and LayerNorm, post-norm
//! encoder layers (self-attention, then a GELU MLP, each added to its input and
//! normalised), a tanh pooler, and sentence embeddings by masked mean pooling + L2
//! normalisation (sentence-transformers' recipe). Module paths follow Hugging Face's
//! `BertModel` with two renames the conversion table applies: `LayerNorm` ->
//! `layer_norm` and `attention.self` -> `attention.self_attn` (`self` is a keyword).
//!
//! Shapes: B = batch, T = sequence, C = hidden, H = heads, D = C / H, F = intermediate.

use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, tanh};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

use crate::fused::{LayerNorm, linear};
use crate::quant::Linear;
use crate::registry::{FieldError, ensure};

fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}

/// BERT hyper-parameters (`[model] arch = "bert"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub n_layer: usize,
    pub n_head: usize,
    /// Hidden width C.
    pub n_embd: usize,
    /// MLP width F.
    pub intermediate_size: usize,
    /// Learned positions (maximum sequence length).
    pub max_positions: usize,
    pub vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// How [`BertModel::embed`] pools token states into a sentence embedding
    /// (sentence-transformers' `1_Pooling/config.json`); default mean.
    #[serde(default, skip_serializing_if = "SentencePooling::is_mean")]
    pub sentence_pooling: SentencePooling,
    /// Whether sentence embeddings are L2-normalised (a `Normalize` module in
    /// sentence-transformers' `modules.json`); default true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub normalize: bool,
    /// The position row of the first token: 0 for BERT; RoBERTa's positions start after
    /// its padding index (`pad_token_id + 1` = 2), so `max_positions - position_offset`
    /// tokens fit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub position_offset: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Sentence-transformers' pooling modes that Kiln computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SentencePooling {
    /// Masked mean of the token states.
    #[default]
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// Masked element-wise maximum of the token states.
    Max,
}

impl SentencePooling {
    fn is_mean(&self) -> bool {
        *self == Self::Mean
    }
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

impl BertConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(self.n_layer > 0, "n_layer", "must be at least 1")?;
        ensure(self.n_head > 0, "n_head", "must be at least 1")?;
        ensure(
            self.n_embd.is_multiple_of(self.n_head),
            "n_embd",
            format!("{} is not divisible by n_head = {}", self.n_embd, self.n_head),
        )?;
        ensure(self.intermediate_size > 0, "intermediate_size", "must be at least 1")?;
        ensure(self.max_positions > 0, "max_positions", "must be at least 1")?;
        ensure(
            self.position_offset < self.max_positions,
            "position_offset",
            format!(
                "{} leaves no position of max_positions = {}",
                self.position_offset, self.max_positions
            ),
        )?;
        ensure(self.vocab_size > 0, "vocab_size", "must be at least 1")?;
        ensure(self.type_vocab_size > 0, "type_vocab_size", "must be at least 1")?;
        ensure(self.layer_norm_eps > 0.0, "layer_norm_eps", "must be positive")
    }

    pub fn init(&self, device: &Device) -> BertModel {
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        let c = self.n_embd;
        let linear = |d_in, d_out| {
            let mut layer = Linear::from(
                LinearConfig::new(d_in, d_out)
                    .with_bias(false)
                    .with_initializer(init.clone())
                    .init(device),
            );
            layer.bias = Some(Initializer::Zeros.init([d_out], device));
            layer
        };
        let layer_norm = || LayerNorm::new(c, self.layer_norm_eps, true, device);
        let embedding = |n| EmbeddingConfig::new(n, c).with_initializer(init.clone()).init(device);
        BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: embedding(self.vocab_size),
                position_embeddings: embedding(self.max_positions),
                token_type_embeddings: embedding(self.type_vocab_size),
                layer_norm: layer_norm(),
                position_offset: self.position_offset,
            },
            encoder: BertEncoder {
                layer: (0..self.n_layer)
                    .map(|_| BertLayer {
                        attention: BertAttention {
                            self_attn: BertSelfAttention {
                                query: linear(c, c),
                                key: linear(c, c),
                                value: linear(c, c),
                                n_head: self.n_head,
                            },
                            output: BertSelfOutput {
                                dense: linear(c, c),
                                layer_norm: layer_norm(),
                            },
                        },
                        intermediate: BertIntermediate {
                            dense: linear(c, self.intermediate_size),
                        },
                        output: BertOutput {
                            dense: linear(self.intermediate_size, c),
                            layer_norm: layer_norm(),
                        },
                    })
                    .collect(),
            },
            pooler: BertPooler { dense: linear(c, c) },
            cls_pooling: self.sentence_pooling == SentencePooling::Cls,
            max_pooling: self.sentence_pooling == SentencePooling::Max,
            normalize: self.normalize,
        }
    }
}

#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
    pub pooler: BertPooler,
    /// Sentence embeddings from the first token's state ([`SentencePooling::Cls`]).
    pub cls_pooling: bool,
    /// Sentence embeddings by masked max ([`SentencePooling::Max`]).
    pub max_pooling: bool,
    /// L2-normalised sentence embeddings.
    pub normalize: bool,
}

#[derive(Module, Debug)]
pub struct BertEmbeddings {
    /// `[V, C]`
    pub word_embeddings: Embedding,
    /// `[max_positions, C]`
    pub position_embeddings: Embedding,
    /// `[type_vocab, C]`
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    /// Row of the first position ([`BertConfig::position_offset`]).
    pub position_offset: usize,
}

#[derive(Module, Debug)]
pub struct BertEncoder {
    pub layer: Vec<BertLayer>,
}

/// `a = norm(x + attn(x))`, then `norm(a + mlp(a))` (post-norm).
#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: BertIntermediate,
    pub output: BertOutput,
}

#[derive(Module, Debug)]
pub struct BertAttention {
    pub self_attn: BertSelfAttention,
    pub output: BertSelfOutput,
}

#[derive(Module, Debug)]
pub struct BertSelfAttention {
    /// `[C, C]` each
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub n_head: usize,
}

#[derive(Module, Debug)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertIntermediate {
    /// `[C, F]`
    pub dense: Linear,
}

#[derive(Module, Debug)]
pub struct BertOutput {
    /// `[F, C]`
    pub dense: Linear,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertPooler {
    pub dense: Linear,
}

impl BertSelfAttention {
    /// `x` `[B, T, C]`, `pad` `[B, H, T, T]` (an additive bias: 0 for tokens, a large
    /// negative number for padded keys) -> `[B, T, C]`.
    fn forward(&self, x: Tensor<3>, pad: Tensor<4>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let (h, d) = (self.n_head, c / self.n_head);
        let heads = |l: &Linear| linear(l, x.clone()).reshape([b, t, h, d]).swap_dims(1, 2); // [B, H, T, D]
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let y = attention(
            heads(&self.query),
            heads(&self.key),
            heads(&self.value),
            None,
            Some(pad),
            options,
        );
        y.swap_dims(1, 2).reshape([b, t, c])
    }
}

impl BertLayer {
    fn forward(&self, x: Tensor<3>, pad: Tensor<4>) -> Tensor<3> {
        let attn = self.attention.self_attn.forward(x.clone(), pad);
        let a = self
            .attention
            .output
            .layer_norm
            .forward(x + linear(&self.attention.output.dense, attn));
        // BERT's "gelu" is the exact (erf) GELU.
        let m = self
            .output
            .dense
            .forward(gelu(linear(&self.intermediate.dense, a.clone())));
        self.output.layer_norm.forward(a + m)
    }
}

impl BertModel {
    /// The longest input: the position rows after the offset.
    pub fn max_positions(&self) -> usize {
        self.embeddings.position_embeddings.weight.dims()[0] - self.embeddings.position_offset
    }

    /// Token ids and attention mask (1 = token, 0 = padding), both `[B, T]` ->
    /// last hidden states `[B, T, C]`. Token types are all 0 (single sentences).
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = ids.dims();
        let device = ids.device();
        let e = &self.embeddings;
        // RoBERTa counts positions from its offset; a right-padded sequence's real
        // tokens get exactly the rows transformers gives them (padded ones differ, and
        // are masked out).
        let offset = e.position_offset as i64;
        let positions = Tensor::<1, Int>::arange(offset..offset + t as i64, &device).reshape([1, t]);
        let types = Tensor::<2, Int>::zeros([b, t], &device);
        let x = e.word_embeddings.forward(ids)
            + e.position_embeddings.forward(positions)
            + e.token_type_embeddings.forward(types);
        let mut x = e.layer_norm.forward(x);
        // [B, T] -> [B, H, T(query), T(key)]: -1e9 where the key is padding, else 0. An
        // additive bias rather than a boolean mask: burn-tch 0.22.1 hands a boolean mask to
        // libtorch's scaled_dot_product_attention, where `true` means "attend" (Burn's
        // means "masked"), so padded keys would be attended on that backend.
        let h = self.encoder.layer.first().map_or(1, |l| l.attention.self_attn.n_head);
        let pad = mask
            .equal_elem(0)
            .float()
            .mul_scalar(-1e9)
            .reshape([b, 1, 1, t])
            .expand([b, h, t, t]);
        for layer in &self.encoder.layer {
            x = layer.forward(x, pad.clone());
        }
        x
    }

    /// The pooler: `tanh(dense(h[:, 0]))`, `[B, C]`.
    pub fn pooled(&self, hidden: Tensor<3>) -> Tensor<2> {
        let [b, _, c] = hidden.dims();
        tanh(
            self.pooler
                .dense
                .forward(hidden.slice(s![.., 0..1, ..]).reshape([b, c])),
        )
    }

    /// Mean of the token states `[B, T, C]` over the mask `[B, T]` -> `[B, C]`.
    pub fn mean_pooled(hidden: Tensor<3>, mask: Tensor<2, Int>) -> Tensor<2> {
        let [b, t, c] = hidden.dims();
        let m = mask.float().reshape([b, t, 1]);
        let summed = (hidden * m.clone()).sum_dim(1).reshape([b, c]);
        let counts = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
        summed / counts
    }

    /// Sentence embeddings `[B, C]`: the token states pooled as configured (mean over
    /// the mask by default, the first token's, or the masked maximum), L2-normalised
    /// unless the config says not.
    pub fn embed(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        let hidden = self.forward(ids, mask.clone());
        let [b, t, c] = hidden.dims();
        let pooled = if self.cls_pooling {
            hidden.slice(s![.., 0..1, ..]).reshape([b, c])
        } else if self.max_pooling {
            // Padded positions get -1e9 so they never win the maximum.
            let pad = mask.equal_elem(0).float().mul_scalar(-1e9).reshape([b, t, 1]);
            (hidden + pad).max_dim(1).reshape([b, c])
        } else {
            Self::mean_pooled(hidden, mask)
        };
        if !self.normalize {
            return pooled;
        }
        let norm = pooled.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        pooled / norm
    }
}

/// How a classifier turns token states into one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Masked mean of the last hidden states (sentence-transformers' pooling).
    #[default]
    Mean,
    /// BERT's pooler: `tanh(dense(h[:, 0]))` (Hugging Face's `BertForSequenceClassification`).
    Cls,
}

fn default_head_dropout() -> f64 {
    0.1
}

/// A sequence-classification head (`[head]` of a fine-tuned model directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierHead {
    /// Class names; logit `i` is `labels[i]`.
    pub labels: Vec<String>,
    #[serde(default)]
    pub pooling: Pooling,
    /// Dropout on the pooled vector during training.
    #[serde(default = "default_head_dropout")]
    pub dropout: f64,
    /// Longest input (tokens) the classifier was trained on; inference cuts there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

impl ClassifierHead {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(
            self.labels.len() >= 2,
            "head.labels",
            "a classifier needs at least 2 labels",
        )?;
        ensure(
            (0.0..1.0).contains(&self.dropout),
            "head.dropout",
            format!("{} is not in [0, 1)", self.dropout),
        )
    }

    /// The encoder `bert` with this head on top. The head starts at zero (weights and
    /// bias), so every run from the same checkpoint starts from the same function.
    pub fn init(&self, bert: BertModel, device: &Device) -> BertForSequenceClassification {
        let c = bert.embeddings.word_embeddings.weight.dims()[1];
        BertForSequenceClassification {
            bert,
            dropout: DropoutConfig::new(self.dropout).init(),
            classifier: LinearConfig::new(c, self.labels.len())
                .with_initializer(Initializer::Zeros)
                .init(device)
                .into(),
            cls_pooling: self.pooling == Pooling::Cls,
        }
    }
}

/// BERT with a linear classifier on the pooled output (Hugging Face's
/// `BertForSequenceClassification` layout: `bert.*`, `classifier`).
#[derive(Module, Debug)]
pub struct BertForSequenceClassification {
    pub bert: BertModel,
    pub dropout: Dropout,
    /// `[C, K]`
    pub classifier: Linear,
    pub cls_pooling: bool,
}

impl BertForSequenceClassification {
    pub fn num_classes(&self) -> usize {
        self.classifier.weight.dims()[1]
    }

    /// Token ids and attention mask `[B, T]` -> class logits `[B, K]`.
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        let hidden = self.bert.forward(ids, mask.clone()); // [B, T, C]
        let pooled = if self.cls_pooling {
            self.bert.pooled(hidden)
        } else {
            BertModel::mean_pooled(hidden, mask)
        }; // [B, C]
        self.classifier.forward(self.dropout.forward(pooled))
    }
}

impl crate::Architecture for BertConfig {
    type Model = BertModel;
    fn validate(&self) -> Result<(), FieldError> {
        BertConfig::validate(self)
    }
    fn init(&self, device: &Device) -> BertModel {
        BertConfig::init(self, device)
    }
}

impl crate::EncoderArchitecture for BertConfig {
    type Classifier = BertForSequenceClassification;
    fn init_classifier(&self, head: &ClassifierHead, device: &Device) -> BertForSequenceClassification {
        head.init(self.init(device), device)
    }
}

impl crate::Encoder for BertModel {
    fn max_positions(&self) -> usize {
        BertModel::max_positions(self)
    }
    fn embed(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        BertModel::embed(self, ids, mask)
    }
}

impl crate::SequenceClassifier for BertForSequenceClassification {
    fn num_classes(&self) -> usize {
        BertForSequenceClassification::num_classes(self)
    }
    fn max_positions(&self) -> usize {
        self.bert.max_positions()
    }
    fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        BertForSequenceClassification::forward(self, ids, mask)
    }
    fn encoder(&self) -> &dyn crate::Encoder {
        &self.bert
    }
}
