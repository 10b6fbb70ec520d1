//! GPT-2: token + learned position embeddings, pre-LayerNorm blocks of causal
//! self-attention and a GELU MLP, a final LayerNorm, and an LM head tied to the token
//! embedding. Module paths follow Hugging Face's `GPT2LMHeadModel`
//! (`transformer.wte`, `transformer.h.{i}.attn.c_attn`, ...).
//!
//! Shapes: B = batch, T = sequence, C = n_embd, H = n_head, D = C / H, V = vocab.

use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

pub use crate::fused::gelu_tanh;
use crate::fused::{LayerNorm, attention, linear};
use crate::quant::Linear;
use crate::registry::{FieldError, ensure};
use crate::{CausalLm, KvCache, Logits};

fn default_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// GPT-2 hyper-parameters (`[model] arch = "gpt2"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpt2Config {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Embedding width C.
    pub n_embd: usize,
    /// Context length (number of learned positions).
    pub block_size: usize,
    /// Vocabulary size; 0 in a config means "take it from the tokenizer".
    #[serde(default)]
    pub vocab_size: usize,
    /// Dropout on embeddings, attention weights and residual branches.
    #[serde(default)]
    pub dropout: f64,
    /// Biases in Linear and LayerNorm layers (GPT-2 has them).
    #[serde(default = "default_true")]
    pub bias: bool,
    #[serde(default = "default_epsilon")]
    pub layer_norm_epsilon: f64,
    /// The MLP's GELU: `gelu_tanh` (GPT-2's tanh approximation, HF "gelu_new"; what
    /// pretrained GPT-2 weights expect) or `gelu` (the exact erf form, nanoGPT's
    /// `nn.GELU()`; one fused kernel forward and backward on every backend).
    #[serde(default)]
    pub activation: Gpt2Activation,
}

/// The GELU variant of a GPT-2 MLP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gpt2Activation {
    #[default]
    GeluTanh,
    Gelu,
}

impl Gpt2Config {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(self.n_layer > 0, "n_layer", "must be at least 1")?;
        ensure(self.n_head > 0, "n_head", "must be at least 1")?;
        ensure(self.n_embd > 0, "n_embd", "must be at least 1")?;
        ensure(
            self.n_embd.is_multiple_of(self.n_head),
            "n_embd",
            format!("{} is not divisible by n_head = {}", self.n_embd, self.n_head),
        )?;
        ensure(self.block_size > 0, "block_size", "must be at least 1")?;
        ensure(
            (0.0..1.0).contains(&self.dropout),
            "dropout",
            format!("{} is not in [0, 1)", self.dropout),
        )?;
        ensure(self.layer_norm_epsilon > 0.0, "layer_norm_epsilon", "must be positive")
    }

    /// Build the model with GPT-2's initialisation: N(0, 0.02) weights, residual
    /// projections scaled by 1/sqrt(2 * n_layer), zero biases.
    pub fn init(&self, device: &Device) -> Gpt2LMHeadModel {
        assert!(self.vocab_size > 0, "Gpt2Config::init: vocab_size must be set");
        let normal = Initializer::Normal { mean: 0.0, std: 0.02 };
        let proj = Initializer::Normal {
            mean: 0.0,
            std: 0.02 / (2.0 * self.n_layer as f64).sqrt(),
        };
        // Weights drawn from `init`, biases zero (a fresh parameter that trains).
        let linear = |d_in, d_out, init: &Initializer| {
            let mut layer = Linear::from(
                LinearConfig::new(d_in, d_out)
                    .with_bias(false)
                    .with_initializer(init.clone())
                    .init(device),
            );
            layer.bias = self.bias.then(|| Initializer::Zeros.init([d_out], device));
            layer
        };
        let layer_norm = || LayerNorm::new(self.n_embd, self.layer_norm_epsilon, self.bias, device);
        let c = self.n_embd;
        let h = (0..self.n_layer)
            .map(|_| Block {
                ln_1: layer_norm(),
                attn: CausalSelfAttention {
                    c_attn: linear(c, 3 * c, &normal),
                    c_proj: linear(c, c, &proj),
                    resid_dropout: DropoutConfig::new(self.dropout).init(),
                    n_head: self.n_head,
                },
                ln_2: layer_norm(),
                mlp: Gpt2Mlp {
                    c_fc: linear(c, 4 * c, &normal),
                    c_proj: linear(4 * c, c, &proj),
                    dropout: DropoutConfig::new(self.dropout).init(),
                    activation: self.activation,
                },
            })
            .collect();
        Gpt2LMHeadModel {
            transformer: Gpt2Model {
                wte: EmbeddingConfig::new(self.vocab_size, c)
                    .with_initializer(normal.clone())
                    .init(device),
                wpe: EmbeddingConfig::new(self.block_size, c)
                    .with_initializer(normal)
                    .init(device),
                drop: DropoutConfig::new(self.dropout).init(),
                h,
                ln_f: layer_norm(),
            },
        }
    }
}

/// `GPT2LMHeadModel`: the transformer plus an LM head tied to `transformer.wte`.
#[derive(Module, Debug)]
pub struct Gpt2LMHeadModel {
    pub transformer: Gpt2Model,
}

/// `GPT2Model`: embeddings, blocks, final LayerNorm.
#[derive(Module, Debug)]
pub struct Gpt2Model {
    /// Token embedding `[V, C]`, also the LM head.
    pub wte: Embedding,
    /// Position embedding `[block_size, C]`.
    pub wpe: Embedding,
    pub drop: Dropout,
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
}

/// One pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Module, Debug)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: Gpt2Mlp,
}

/// Multi-head causal self-attention with a fused q/k/v projection.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// `[C, 3C]`: q, k and v in one matmul (HF's Conv1D layout is `[in, out]` too).
    pub c_attn: Linear,
    /// `[C, C]`
    pub c_proj: Linear,
    pub resid_dropout: Dropout,
    pub n_head: usize,
}

/// Position-wise MLP: `C -> 4C -> GELU -> C`.
#[derive(Module, Debug)]
pub struct Gpt2Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub dropout: Dropout,
    #[module(skip)]
    pub activation: Gpt2Activation,
}

impl CausalSelfAttention {
    /// Queries, keys and values of `x` `[B, T, C]`: `[B, T, 3C]` -> 3 x `[B, H, T, D]`.
    fn qkv(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, c] = x.dims();
        let (h, d) = (self.n_head, c / self.n_head);
        let qkv = linear(&self.c_attn, x)
            .reshape([b, t, 3, h, d])
            .permute([2, 0, 3, 1, 4]);
        let mut qkv = qkv.chunk(3, 0).into_iter().map(|p| p.squeeze_dim::<4>(0));
        (qkv.next().unwrap(), qkv.next().unwrap(), qkv.next().unwrap())
    }

    /// `x`: `[B, T, C]` -> `[B, T, C]`. With a cache, `x` holds only the new positions
    /// and attends over every cached one.
    fn forward(&self, x: Tensor<3>, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let (q, k, v) = self.qkv(x);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        // softmax(q k^T / sqrt(D)) v, causal (aligned to the last key): [B, H, T, D]
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: t > 1,
        };
        let y = attention(q, k, v, None, None, options);
        // [B, H, T, D] -> [B, T, C]
        let y = y.swap_dims(1, 2).reshape([b, t, c]);
        self.resid_dropout.forward(linear(&self.c_proj, y))
    }
}

impl CausalSelfAttention {
    /// Decode step of independent sequences: `x` `[B, 1, C]`, row `b` attending over
    /// `caches[b]` -> `[B, 1, C]`.
    fn forward_step(&self, x: Tensor<3>, caches: &mut [&mut KvCache], layer: usize) -> Tensor<3> {
        let [b, t, c] = x.dims();
        // [B, 1, C] -> 3 x [B, H, 1, D]
        let (q, k, v) = self.qkv(x);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        // Per row: [1, H, 1, D] over its own [1, H, len_b + 1, D]
        let rows = crate::kv_cache::append_rows(caches, layer, k, v);
        let y = crate::kv_cache::attend_rows(q, rows, None, options);
        // [B, H, 1, D] -> [B, 1, C]
        let y = y.swap_dims(1, 2).reshape([b, t, c]);
        self.resid_dropout.forward(linear(&self.c_proj, y))
    }
}

impl Gpt2Mlp {
    /// `[B, T, C]` -> `[B, T, C]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // [B, T, C] -> [B, T, 4C]
        let x = linear(&self.c_fc, x);
        let x = match self.activation {
            Gpt2Activation::GeluTanh => gelu_tanh(x),
            Gpt2Activation::Gelu => gelu(x),
        };
        self.dropout.forward(linear(&self.c_proj, x))
    }
}

impl Block {
    fn forward(&self, x: Tensor<3>, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.ln_1.forward(x), cache);
        x.clone() + self.mlp.forward(self.ln_2.forward(x))
    }
}

impl Gpt2LMHeadModel {
    /// `[B, T, C]` final states -> logits `[B, T, V]` through the tied head.
    fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let tf = &self.transformer;
        let [b, t, c] = x.dims();
        let x = tf.ln_f.forward(x);
        // Tied head: [B*T, C] @ [C, V] -> [B, T, V]
        let logits = x.reshape([b * t, c]).matmul(tf.wte.weight.val().transpose());
        let v = logits.dims()[1];
        logits.reshape([b, t, v])
    }

    /// `tokens` `[B, T]` starting at position `start` -> logits `[B, T, V]`.
    fn forward_from(
        &self,
        tokens: Tensor<2, Int>,
        start: usize,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
    ) -> Tensor<3> {
        let tf = &self.transformer;
        let [_, t] = tokens.dims();
        let device = tokens.device();
        // [T] positions start..start+T -> [1, T]
        let positions = Tensor::<1, Int>::arange(start as i64..(start + t) as i64, &device).reshape([1, t]);
        // [B, T, C] + [1, T, C]
        let mut x = tf.drop.forward(tf.wte.forward(tokens) + tf.wpe.forward(positions));
        for (i, block) in tf.h.iter().enumerate() {
            x = block.forward(x, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        self.head(logits.positions(x))
    }
}

impl CausalLm for Gpt2LMHeadModel {
    fn context_len(&self) -> usize {
        self.transformer.wpe.weight.dims()[0]
    }

    fn vocab_size(&self) -> usize {
        self.transformer.wte.weight.dims()[0]
    }

    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_from(tokens, 0, None, Logits::All)
    }

    fn new_cache(&self, batch: usize, device: &Device) -> KvCache {
        let c = self.transformer.wte.weight.dims()[1];
        let h = self.transformer.h[0].attn.n_head;
        KvCache::new(self.transformer.h.len(), batch, h, self.context_len(), c / h, device)
    }

    fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let start = cache.len();
        self.forward_from(tokens, start, Some(cache), Logits::All)
    }

    fn forward_cached_last(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let start = cache.len();
        self.forward_from(tokens, start, Some(cache), Logits::Last)
    }

    fn forward_step(&self, tokens: Tensor<2, Int>, caches: &mut [&mut KvCache]) -> Tensor<3> {
        let tf = &self.transformer;
        let [b, _] = tokens.dims();
        // Row b sits at position len(caches[b]): [B] -> [B, 1]
        let positions = crate::kv_cache::row_positions(caches, &tokens.device()).reshape([b, 1]);
        // [B, 1, C] + [B, 1, C]
        let mut x = tf.drop.forward(tf.wte.forward(tokens) + tf.wpe.forward(positions));
        for (i, block) in tf.h.iter().enumerate() {
            let y = block.attn.forward_step(block.ln_1.forward(x.clone()), caches, i);
            x = x + y;
            x = x.clone() + block.mlp.forward(block.ln_2.forward(x));
        }
        crate::kv_cache::advance_rows(caches);
        self.head(x)
    }
}

impl crate::Architecture for Gpt2Config {
    type Model = Gpt2LMHeadModel;
    fn validate(&self) -> Result<(), FieldError> {
        Gpt2Config::validate(self)
    }
    fn unresolved(&self) -> Vec<FieldError> {
        crate::registry::unresolved_vocab(self.vocab_size)
    }
    fn init(&self, device: &Device) -> Gpt2LMHeadModel {
        Gpt2Config::init(self, device)
    }
}

impl crate::LmSizes for Gpt2Config {
    fn context_len(&self) -> usize {
        self.block_size
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn set_vocab_size(&mut self, vocab_size: usize) {
        self.vocab_size = vocab_size;
    }
}

impl crate::LanguageArchitecture for Gpt2Config {}
