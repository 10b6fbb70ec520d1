//! Llama: token embedding, pre-RMSNorm decoder layers of grouped-query attention with
//! rotary positions and a SwiGLU MLP, a final RMSNorm and an LM head (its own, or tied
//! to the embedding as SmolLM2 and Llama 3.2 do). Biases are optional: on q/k/v
//! (Qwen2-style), on the attention output, on the MLP.
//! Module paths follow Hugging Face's `LlamaForCausalLM`
//! (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `lm_head`, ...).
//! Rotary embeddings use HF's "rotate half" layout, so HF checkpoints load unpermuted.
//!
//! Shapes: B = batch, T = sequence, C = n_embd, H = n_head, K = n_kv_head,
//! D = head_dim (default C / H), F = intermediate_size, V = vocab.

use burn::nn::{EmbeddingConfig, Initializer, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

use crate::fused::{attention, linear, linears, rms_norm, silu_mul};
use crate::kv_cache::repeat_kv;
use crate::quant::{Embedding, Linear};
use crate::registry::{FieldError, ensure};
pub use crate::rope::{RopeScaling, RotaryEmbedding, Rotation};
use crate::{CausalLm, KvCache, Logits};

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}

/// Llama hyper-parameters (`[model] arch = "llama"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Number of decoder layers.
    pub n_layer: usize,
    /// Query heads H.
    pub n_head: usize,
    /// Key/value heads K (grouped-query attention: H must be a multiple of K).
    pub n_kv_head: usize,
    /// Hidden width C.
    pub n_embd: usize,
    /// SwiGLU hidden width F.
    pub intermediate_size: usize,
    /// Context length.
    pub block_size: usize,
    /// Vocabulary size; 0 in a config means "take it from the tokenizer".
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Per-head width D when it is not `n_embd / n_head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The LM head is the transposed token embedding (no `lm_head` parameter).
    #[serde(default, skip_serializing_if = "is_false")]
    pub tie_word_embeddings: bool,
    /// Rotary frequency scaling for long contexts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the q, k and v projections (Qwen2; HF Llama's `attention_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// A bias on the attention output projection (HF Llama's `attention_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub o_bias: bool,
    /// Biases on the MLP projections (HF Llama's `mlp_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        ensure(self.n_layer > 0, "n_layer", "must be at least 1")?;
        ensure(self.n_head > 0, "n_head", "must be at least 1")?;
        ensure(self.n_kv_head > 0, "n_kv_head", "must be at least 1")?;
        ensure(
            self.n_head.is_multiple_of(self.n_kv_head),
            "n_kv_head",
            format!(
                "n_head = {} is not a multiple of n_kv_head = {}",
                self.n_head, self.n_kv_head
            ),
        )?;
        match self.head_dim {
            Some(d) => ensure(
                d > 0 && d.is_multiple_of(2),
                "head_dim",
                "must be even and positive for rotary embeddings",
            )?,
            None => {
                ensure(
                    self.n_embd.is_multiple_of(self.n_head),
                    "n_embd",
                    format!(
                        "{} is not divisible by n_head = {} (set head_dim)",
                        self.n_embd, self.n_head
                    ),
                )?;
                ensure(
                    (self.n_embd / self.n_head).is_multiple_of(2),
                    "n_embd",
                    "head dimension must be even for rotary embeddings",
                )?;
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        ensure(self.intermediate_size > 0, "intermediate_size", "must be at least 1")?;
        ensure(self.block_size > 0, "block_size", "must be at least 1")?;
        ensure(self.rope_theta > 0.0, "rope_theta", "must be positive")?;
        ensure(self.rms_norm_eps > 0.0, "rms_norm_eps", "must be positive")
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head)
    }

    /// Build the model with HF's initialisation: N(0, 0.02) weights, unit norms.
    pub fn init(&self, device: &Device) -> LlamaForCausalLM {
        assert!(self.vocab_size > 0, "LlamaConfig::init: vocab_size must be set");
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        let linear_b = |d_in, d_out, bias| {
            Linear::from(
                LinearConfig::new(d_in, d_out)
                    .with_bias(bias)
                    .with_initializer(init.clone())
                    .init(device),
            )
        };
        let linear = |d_in, d_out| linear_b(d_in, d_out, false);
        let rms_norm = || {
            RmsNormConfig::new(self.n_embd)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let (c, d, f) = (self.n_embd, self.head_dim(), self.intermediate_size);
        let layers = (0..self.n_layer)
            .map(|_| LlamaDecoderLayer {
                input_layernorm: rms_norm(),
                self_attn: LlamaAttention {
                    q_proj: linear_b(c, self.n_head * d, self.qkv_bias),
                    k_proj: linear_b(c, self.n_kv_head * d, self.qkv_bias),
                    v_proj: linear_b(c, self.n_kv_head * d, self.qkv_bias),
                    o_proj: linear_b(self.n_head * d, c, self.o_bias),
                    n_head: self.n_head,
                    n_kv_head: self.n_kv_head,
                    head_dim: d,
                },
                post_attention_layernorm: rms_norm(),
                mlp: LlamaMlp {
                    gate_proj: linear_b(c, f, self.mlp_bias),
                    up_proj: linear_b(c, f, self.mlp_bias),
                    down_proj: linear_b(f, c, self.mlp_bias),
                },
            })
            .collect();
        LlamaForCausalLM {
            model: LlamaModel {
                embed_tokens: Embedding::from(
                    EmbeddingConfig::new(self.vocab_size, c)
                        .with_initializer(init.clone())
                        .init(device),
                ),
                layers,
                norm: rms_norm(),
                rotary: RotaryEmbedding::new(d, self.block_size, self.rope_theta, self.rope_scaling.as_ref()),
            },
            lm_head: (!self.tie_word_embeddings).then(|| linear(c, self.vocab_size)),
        }
    }
}

/// `LlamaForCausalLM`: the decoder plus the LM head.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    /// `[C, V]`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
}

/// `LlamaModel`: embedding, decoder layers, final norm, and the rotary tables.
#[derive(Module, Debug)]
pub struct LlamaModel {
    /// `[V, C]`
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: RmsNorm,
    /// The rotary frequencies (constants: not parameters, not saved).
    #[module(skip)]
    pub rotary: RotaryEmbedding,
}

/// `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: LlamaAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: LlamaMlp,
}

/// Grouped-query attention: H query heads share K key/value heads.
#[derive(Module, Debug)]
pub struct LlamaAttention {
    /// `[C, H*D]`
    pub q_proj: Linear,
    /// `[C, K*D]`
    pub k_proj: Linear,
    /// `[C, K*D]`
    pub v_proj: Linear,
    /// `[H*D, C]`
    pub o_proj: Linear,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`, `C -> F -> C`.
#[derive(Module, Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LlamaAttention {
    /// `[B, T, C]` -> queries `[B, H, T, D]`, keys and values `[B, K, T, D]` (K heads).
    fn qkv(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, _] = x.dims();
        let (h, k, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let [q, kk, v] = linears([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let q = q.reshape([b, t, h, d]).swap_dims(1, 2);
        let kk = kk.reshape([b, t, k, d]).swap_dims(1, 2);
        let v = v.reshape([b, t, k, d]).swap_dims(1, 2);
        (q, kk, v)
    }

    /// `x`: `[B, T, C]` at positions `start..start+T` -> `[B, T, C]`.
    fn forward(&self, x: Tensor<3>, rotation: &Rotation, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, k, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let (q, kk, v) = self.qkv(x);
        let q = rotation.apply(q);
        let kk = rotation.apply(kk);
        let (kk, v) = match cache {
            Some((cache, layer)) => cache.append(layer, kk, v),
            None => (kk, v),
        };
        let (kk, v) = (repeat_kv(kk, h / k), repeat_kv(v, h / k));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: t > 1,
        };
        // [B, H, T, D] -> [B, T, H*D] -> [B, T, C]
        let y = attention(q, kk, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([b, t, h * d]);
        linear(&self.o_proj, y)
    }
}

impl LlamaAttention {
    /// Decode step of independent sequences: `x` `[B, 1, C]`, row `b` at its position
    /// (`rotation`, [`RotaryEmbedding::at`]) attending over `caches[b]` -> `[B, 1, C]`.
    fn forward_step(&self, x: Tensor<3>, rotation: &Rotation, caches: &mut [&mut KvCache], layer: usize) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, d) = (self.n_head, self.head_dim);
        let (q, kk, v) = self.qkv(x);
        let q = rotation.apply(q);
        let kk = rotation.apply(kk);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let rows = crate::kv_cache::append_rows(caches, layer, kk, v);
        let y = crate::kv_cache::attend_rows(q, rows, None, options);
        let y = y.swap_dims(1, 2).reshape([b, t, h * d]);
        linear(&self.o_proj, y)
    }
}

impl LlamaMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = linears([&self.gate_proj, &self.up_proj], x);
        linear(&self.down_proj, silu_mul(gate, up))
    }
}

impl LlamaDecoderLayer {
    fn forward(&self, x: Tensor<3>, rotation: &Rotation, cache: Option<(&mut KvCache, usize)>) -> Tensor<3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(rms_norm(&self.input_layernorm, x), rotation, cache);
        x.clone() + self.mlp.forward(rms_norm(&self.post_attention_layernorm, x))
    }
}

impl LlamaForCausalLM {
    fn forward_from(
        &self,
        tokens: Tensor<2, Int>,
        start: usize,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
    ) -> Tensor<3> {
        let m = &self.model;
        let t = tokens.dims()[1];
        // [B, T] -> [B, T, C]
        let rotation = m.rotary.range(start, t, &tokens.device());
        let mut x = m.embed_tokens.forward(tokens);
        for (i, layer) in m.layers.iter().enumerate() {
            x = layer.forward(x, &rotation, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        // [B, T, C] -> [B, T or 1, V]
        self.head(rms_norm(&m.norm, logits.positions(x)))
    }

    /// The weights as the fused flex decode step reads them; `None` off flex or in
    /// Burn's `[in, out]` weight layout.
    fn step_plan(&self) -> Option<crate::fused::step::Plan> {
        use crate::fused::step::{Head, Layer, Matrix, Norm, Plan, Proj};
        let m = &self.model;
        let norm = |n: &RmsNorm| Norm::new(&n.gamma.val(), n.epsilon);
        let layers = m
            .layers
            .iter()
            .map(|l| {
                let (a, f) = (&l.self_attn, &l.mlp);
                Some(Layer {
                    attn_norm: norm(&l.input_layernorm)?,
                    q: Proj::new(&a.q_proj)?,
                    k: Proj::new(&a.k_proj)?,
                    v: Proj::new(&a.v_proj)?,
                    qk_norm: None,
                    o: Proj::new(&a.o_proj)?,
                    post_attn_norm: None,
                    ff_norm: norm(&l.post_attention_layernorm)?,
                    gate: Proj::new(&f.gate_proj)?,
                    up: Proj::new(&f.up_proj)?,
                    down: Proj::new(&f.down_proj)?,
                    post_ff_norm: None,
                    rotary: 0,
                    window: None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let attn = &m.layers.first()?.self_attn;
        Some(Plan {
            embed: Matrix::embedding(&m.embed_tokens)?,
            embed_scale: None,
            layers,
            norm: norm(&m.norm)?,
            head: match &self.lm_head {
                Some(head) => Head::Proj(Proj::new(head)?),
                None => Head::Tied,
            },
            final_softcap: None,
            norm_add_one: false,
            gelu: false,
            heads: attn.n_head,
            kv_heads: attn.n_kv_head,
            head_dim: attn.head_dim,
            scale: None,
            attn_softcap: None,
            rotary: vec![m.rotary.clone()],
        })
    }

    /// `[B, T, C]` -> logits `[B, T, V]`, through `lm_head` or the tied embedding.
    fn head(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => linear(head, x),
            None => crate::fused::tied_head(x, &self.model.embed_tokens),
        }
    }
}

impl CausalLm for LlamaForCausalLM {
    fn context_len(&self) -> usize {
        self.model.rotary.max_positions()
    }

    fn vocab_size(&self) -> usize {
        self.model.embed_tokens.vocab()
    }

    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_from(tokens, 0, None, Logits::All)
    }

    fn new_cache(&self, batch: usize, device: &Device) -> KvCache {
        let attn = &self.model.layers[0].self_attn;
        KvCache::new(
            self.model.layers.len(),
            batch,
            attn.n_kv_head,
            self.context_len(),
            attn.head_dim,
            device,
        )
    }

    fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let start = cache.len();
        self.forward_from(tokens, start, Some(cache), Logits::All)
    }

    fn forward_cached_last(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let start = cache.len();
        self.forward_from(tokens, start, Some(cache), Logits::Last)
    }

    fn forward_chunks(&self, chunks: &[&[u32]], caches: &mut [&mut KvCache]) -> Option<Tensor<2>> {
        crate::fused::step::forward_chunks(&self.step_plan()?, chunks, caches)
    }

    fn forward_step(&self, tokens: Tensor<2, Int>, caches: &mut [&mut KvCache]) -> Tensor<3> {
        // On flex with the decode layout: the whole step as one pass over raw buffers.
        if let Some(plan) = self.step_plan()
            && let Some(logits) = crate::fused::step::run(&plan, &tokens, caches)
        {
            return logits;
        }
        let m = &self.model;
        let rotation = m.rotary.at(&crate::kv_cache::cache_lengths(caches), &tokens.device());
        // [B, 1] -> [B, 1, C]
        let mut x = m.embed_tokens.forward(tokens);
        for (i, layer) in m.layers.iter().enumerate() {
            let y = layer
                .self_attn
                .forward_step(rms_norm(&layer.input_layernorm, x.clone()), &rotation, caches, i);
            x = x + y;
            x = x.clone() + layer.mlp.forward(rms_norm(&layer.post_attention_layernorm, x));
        }
        crate::kv_cache::advance_rows(caches);
        self.head(rms_norm(&m.norm, x))
    }
}

impl crate::Architecture for LlamaConfig {
    type Model = LlamaForCausalLM;
    fn validate(&self) -> Result<(), FieldError> {
        LlamaConfig::validate(self)
    }
    fn unresolved(&self) -> Vec<FieldError> {
        crate::registry::unresolved_vocab(self.vocab_size)
    }
    fn init(&self, device: &Device) -> LlamaForCausalLM {
        LlamaConfig::init(self, device)
    }
}

impl crate::LmSizes for LlamaConfig {
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

impl crate::LanguageArchitecture for LlamaConfig {}
