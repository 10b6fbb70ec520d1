//! Every Kiln architecture, defined once and run unchanged on every Burn backend.
//!
//! In Burn 0.22 modules and tensors carry no backend type: the backend is the
//! [`Device`](burn::tensor::Device) the parameters live on, chosen at run time.
//! Each architecture reads top to bottom in its own file with shapes in comments,
//! and has a typed config (serde, validated) that implements [`Architecture`]; the
//! [`registry`] lists every architecture once and [`ModelConfig`] selects one by `arch`.
//!
//! Parameter paths of `gpt2` and `llama` follow the Hugging Face names of those
//! architectures (`transformer.h.0.attn.c_attn`, `model.layers.0.self_attn.q_proj`, ...)
//! so that weights convert in and out by small rule tables.

pub mod bert;
pub mod cnn;
pub mod fused;
pub mod gemma3;
pub mod gpt2;
pub mod kv_cache;
pub mod llama;
pub mod loss;
pub mod mlp;
pub mod quant;
pub mod registry;
pub mod rope;

pub use bert::{BertConfig, BertForSequenceClassification, BertModel, ClassifierHead, Pooling, SentencePooling};
pub use cnn::{Cnn, CnnConfig};
pub use gemma3::{Gemma3Config, Gemma3ForCausalLM};
pub use gpt2::{Gpt2Config, Gpt2LMHeadModel};
pub use kv_cache::KvCache;
pub use llama::{LlamaConfig, LlamaForCausalLM};
pub use mlp::{Mlp, MlpConfig};
pub use registry::{
    ArchVisitor, Architecture, EncoderArchitecture, FamilyVisitor, FieldError, ImageArchitecture, LanguageArchitecture,
    LmSizes, ModelConfig, ModelKind,
};
pub use rope::{RopeScaling, RotaryEmbedding};

use burn::prelude::*;

/// A causal language model: tokens in, next-token logits out, with an incremental
/// (KV-cached) path for generation.
pub trait CausalLm {
    /// Maximum number of positions the model attends over.
    fn context_len(&self) -> usize;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Full forward pass. `tokens`: `[batch, seq]` -> logits `[batch, seq, vocab]`.
    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3>;
    /// An empty cache sized for `batch` sequences of up to [`context_len`](Self::context_len).
    fn new_cache(&self, batch: usize, device: &Device) -> KvCache;
    /// Incremental forward pass: `tokens` `[batch, new]` continue the sequence held in
    /// `cache`; returns logits `[batch, new, vocab]` and appends the new keys/values.
    fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3>;
    /// [`forward_cached`](Self::forward_cached) for generation: the logits of the last
    /// position only, `[batch, 1, vocab]` (the LM head over one row instead of `new`:
    /// for Gemma 3's 262,144-token vocabulary a 512-token prompt's logits are 537 MB).
    fn forward_cached_last(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3>;
    /// One decode step of `B` independent sequences: `tokens` `[B, 1]`, row `b`
    /// continuing `caches[b]` (a batch-1 cache, each at its own length) and appending to
    /// it. Linear layers run over the `B` rows at once; each row attends over its own
    /// cache only. Returns logits `[B, 1, V]`.
    fn forward_step(&self, tokens: Tensor<2, Int>, caches: &mut [&mut KvCache]) -> Tensor<3>;
    /// One step of `B` independent sequences, each continuing its own cache by a chunk
    /// of tokens (a decode step's one token, or a short prompt): the chunks' rows share
    /// every linear layer and each row attends over its own sequence up to its own
    /// position. Returns the logits of each chunk's last position, `[B, V]`, and appends
    /// every chunk to its cache; a sequence's logits are the same alone as in any batch.
    /// `None`, changing nothing, where the model has no such path (on this backend or
    /// weight layout): the caller runs [`forward_cached_last`](Self::forward_cached_last)
    /// and [`forward_step`](Self::forward_step) instead.
    fn forward_chunks(&self, chunks: &[&[u32]], caches: &mut [&mut KvCache]) -> Option<Tensor<2>> {
        let _ = (chunks, caches);
        None
    }
}

/// Which positions' logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

impl Logits {
    /// The hidden states `[B, T, C]` of the positions wanted.
    pub fn positions(self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Logits::All => x,
            Logits::Last => {
                let t = x.dims()[1];
                x.slice(s![.., t - 1..t, ..])
            }
        }
    }
}

/// An image classifier: `[batch, channels, height, width]` -> logits `[batch, classes]`.
pub trait ImageClassifier {
    fn num_classes(&self) -> usize;
    /// Expected input `[channels, height, width]`.
    fn input_shape(&self) -> [usize; 3];
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;
}

/// A text encoder: token ids and attention mask `[batch, seq]` (1 = token, 0 = padding)
/// in, sentence embeddings out.
pub trait Encoder {
    /// Longest input in tokens.
    fn max_positions(&self) -> usize;
    /// L2-normalised sentence embeddings `[batch, hidden]`.
    fn embed(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2>;
}

/// A text classifier: an encoder with a classification head.
pub trait SequenceClassifier {
    fn num_classes(&self) -> usize;
    /// Longest input in tokens.
    fn max_positions(&self) -> usize;
    /// Token ids and attention mask `[batch, seq]` -> class logits `[batch, classes]`.
    fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2>;
    /// The encoder under the head (for sentence embeddings of a fine-tuned model).
    fn encoder(&self) -> &dyn Encoder;
}
