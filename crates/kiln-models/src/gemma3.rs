//! Gemma 3 (text): Hugging Face's `Gemma3ForCausalLM`, top to bottom.
//!
//! Token embedding scaled by `sqrt(C)`; decoder layers, each
//! `x + post_attn_norm(attn(input_norm(x)))` then `x + post_ff_norm(mlp(pre_ff_norm(x)))`;
//! a final norm and the tied LM head, optionally soft-capped (`cap * tanh(logits / cap)`).
//! Every RMSNorm scales by `(1 + weight)`. Attention is grouped-query with RMSNorm on
//! each query and key head, scores scaled by `query_pre_attn_scalar^-1/2`; most layers
//! are local (sliding-window attention over the last `sliding_window` positions, rotary
//! base `rope_local_theta`), every `sliding_window_pattern`-th layer is global (full
//! causal attention, rotary base `rope_theta`, with `rope_scaling` if any). The MLP is
//! GeGLU: `down(gelu_tanh(gate(x)) * up(x))`. No biases.
//!
//! Module paths follow HF (`model.embed_tokens`, `model.layers.{i}.self_attn.q_norm`,
//! `model.layers.{i}.pre_feedforward_layernorm`, ...); norm weights are HF's (the `1 +`
//! is applied in the forward pass), so HF checkpoints load unchanged.
//!
//! Shapes: B = batch, T = sequence, C = n_embd, H = n_head, K = n_kv_head,
//! D = head_dim (independent of C), F = intermediate_size, V = vocab.

use burn::module::Param;
use burn::nn::{EmbeddingConfig, Initializer, LinearConfig};
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

use crate::fused::{attention, gelu_tanh_mul, linear, linears, tied_head};
use crate::kv_cache::repeat_kv;
use crate::quant::{Embedding, Linear};
use crate::registry::{FieldError, ensure};
use crate::rope::{RopeScaling, RotaryEmbedding, Rotation};
use crate::{CausalLm, KvCache, Logits};

fn default_rope_theta() -> f64 {
    1_000_000.0
}
fn default_rope_local_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_sliding_window() -> usize {
    4096
}
fn default_pattern() -> usize {
    6
}

/// Whether a layer attends over a sliding window or the whole context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerAttention {
    SlidingAttention,
    FullAttention,
}

/// Gemma 3 hyper-parameters (`[model] arch = "gemma3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma3Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// Per-head width D (Gemma 3: 256, whatever C is).
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Context length.
    pub block_size: usize,
    /// Vocabulary size; 0 in a config means "take it from the tokenizer".
    #[serde(default)]
    pub vocab_size: usize,
    /// Rotary base of the global layers.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Rotary base of the local (sliding-window) layers.
    #[serde(default = "default_rope_local_theta")]
    pub rope_local_theta: f64,
    /// Rotary scaling of the global layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Positions a local layer sees: query `p` attends to keys `p - window < j <= p`.
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    /// Every `pattern`-th layer (1-based) is global, the others local.
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    /// An explicit per-layer list, overriding the pattern (HF `layer_types`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerAttention>>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` (default: head_dim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
}

impl Gemma3Config {
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
        ensure(
            self.head_dim > 0 && self.head_dim.is_multiple_of(2),
            "head_dim",
            "must be even and positive for rotary embeddings",
        )?;
        ensure(self.n_embd > 0, "n_embd", "must be at least 1")?;
        ensure(self.intermediate_size > 0, "intermediate_size", "must be at least 1")?;
        ensure(self.block_size > 0, "block_size", "must be at least 1")?;
        ensure(self.rope_theta > 0.0, "rope_theta", "must be positive")?;
        ensure(self.rope_local_theta > 0.0, "rope_local_theta", "must be positive")?;
        ensure(self.rms_norm_eps > 0.0, "rms_norm_eps", "must be positive")?;
        ensure(self.sliding_window > 0, "sliding_window", "must be at least 1")?;
        ensure(
            self.sliding_window_pattern > 0,
            "sliding_window_pattern",
            "must be at least 1",
        )?;
        if let Some(types) = &self.layer_types {
            ensure(
                types.len() == self.n_layer,
                "layer_types",
                format!("{} entries for n_layer = {}", types.len(), self.n_layer),
            )?;
        }
        for (name, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if let Some(cap) = cap {
                ensure(cap > 0.0, name, "must be positive")?;
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        Ok(())
    }

    /// Whether layer `i` is local (sliding-window).
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types[i] == LayerAttention::SlidingAttention,
            None => !(i + 1).is_multiple_of(self.sliding_window_pattern),
        }
    }

    /// Build the model: N(0, 0.02) weights, norms at zero (a unit scale, `1 + 0`).
    pub fn init(&self, device: &Device) -> Gemma3ForCausalLM {
        assert!(self.vocab_size > 0, "Gemma3Config::init: vocab_size must be set");
        let init = Initializer::Normal { mean: 0.0, std: 0.02 };
        let linear = |d_in, d_out| {
            Linear::from(
                LinearConfig::new(d_in, d_out)
                    .with_bias(false)
                    .with_initializer(init.clone())
                    .init(device),
            )
        };
        let norm = |d| GemmaRmsNorm::new(d, self.rms_norm_eps, device);
        let (c, d, f) = (self.n_embd, self.head_dim, self.intermediate_size);
        let scale = self.query_pre_attn_scalar.unwrap_or(d as f64).powf(-0.5);
        let layers = (0..self.n_layer)
            .map(|i| Gemma3DecoderLayer {
                input_layernorm: norm(c),
                self_attn: Gemma3Attention {
                    q_proj: linear(c, self.n_head * d),
                    k_proj: linear(c, self.n_kv_head * d),
                    v_proj: linear(c, self.n_kv_head * d),
                    o_proj: linear(self.n_head * d, c),
                    q_norm: norm(d),
                    k_norm: norm(d),
                    n_head: self.n_head,
                    n_kv_head: self.n_kv_head,
                    head_dim: d,
                    scale,
                    softcap: self.attn_logit_softcapping,
                    window: self.is_sliding(i).then_some(self.sliding_window),
                },
                post_attention_layernorm: norm(c),
                pre_feedforward_layernorm: norm(c),
                mlp: Gemma3Mlp {
                    gate_proj: linear(c, f),
                    up_proj: linear(c, f),
                    down_proj: linear(f, c),
                },
                post_feedforward_layernorm: norm(c),
            })
            .collect();
        Gemma3ForCausalLM {
            model: Gemma3Model {
                embed_tokens: Embedding::from(
                    EmbeddingConfig::new(self.vocab_size, c)
                        .with_initializer(init.clone())
                        .init(device),
                ),
                layers,
                norm: norm(c),
                rotary_global: RotaryEmbedding::new(d, self.block_size, self.rope_theta, self.rope_scaling.as_ref()),
                rotary_local: RotaryEmbedding::new(d, self.block_size, self.rope_local_theta, None),
                // HF: sqrt(hidden_size) as a tensor of the embedding dtype (f32).
                embed_scale: (c as f64).sqrt() as f32,
                final_logit_softcapping: self.final_logit_softcapping,
            },
        }
    }
}

/// `Gemma3ForCausalLM`: the decoder; the LM head is the tied embedding.
#[derive(Module, Debug)]
pub struct Gemma3ForCausalLM {
    pub model: Gemma3Model,
}

#[derive(Module, Debug)]
pub struct Gemma3Model {
    /// `[V, C]`
    pub embed_tokens: Embedding,
    pub layers: Vec<Gemma3DecoderLayer>,
    pub norm: GemmaRmsNorm,
    /// Rotary frequencies of the global and the local layers (constants, not saved).
    #[module(skip)]
    pub rotary_global: RotaryEmbedding,
    #[module(skip)]
    pub rotary_local: RotaryEmbedding,
    #[module(skip)]
    pub embed_scale: f32,
    #[module(skip)]
    pub final_logit_softcapping: Option<f64>,
}

/// RMSNorm scaling by `1 + weight` (weight initialised to zero), computed in f32.
#[derive(Module, Debug)]
pub struct GemmaRmsNorm {
    /// `[C]`
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub epsilon: f64,
}

impl GemmaRmsNorm {
    pub fn new(d: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([d], device)),
            epsilon,
        }
    }

    /// `[..., C]` -> `x / sqrt(mean(x^2) + eps) * (1 + w)`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(y) = crate::fused::flex::rms_norm(&x, &self.weight.val(), self.epsilon, true) {
            return y;
        }
        let rms = (x.clone().square().mean_dim(D - 1) + self.epsilon).sqrt();
        let scale = self.weight.val() + 1.0;
        (x / rms) * scale.unsqueeze()
    }
}

#[derive(Module, Debug)]
pub struct Gemma3DecoderLayer {
    pub input_layernorm: GemmaRmsNorm,
    pub self_attn: Gemma3Attention,
    pub post_attention_layernorm: GemmaRmsNorm,
    pub pre_feedforward_layernorm: GemmaRmsNorm,
    pub mlp: Gemma3Mlp,
    pub post_feedforward_layernorm: GemmaRmsNorm,
}

/// Grouped-query attention with q/k head norms, local or global.
#[derive(Module, Debug)]
pub struct Gemma3Attention {
    /// `[C, H*D]`
    pub q_proj: Linear,
    /// `[C, K*D]`
    pub k_proj: Linear,
    /// `[C, K*D]`
    pub v_proj: Linear,
    /// `[H*D, C]`
    pub o_proj: Linear,
    /// `[D]`
    pub q_norm: GemmaRmsNorm,
    /// `[D]`
    pub k_norm: GemmaRmsNorm,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub softcap: Option<f64>,
    /// `Some(window)` for a local layer.
    #[module(skip)]
    pub window: Option<usize>,
}

/// GeGLU: `down(gelu_tanh(gate(x)) * up(x))`, `C -> F -> C`.
#[derive(Module, Debug)]
pub struct Gemma3Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Gemma3Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [gate, up] = linears([&self.gate_proj, &self.up_proj], x);
        linear(&self.down_proj, gelu_tanh_mul(gate, up))
    }
}

/// `true` where query `start + i` may not see key `j` (`[T, Tk]`, row-major): future
/// keys, and keys `window` or more positions back.
fn window_masked(t: usize, tk: usize, start: usize, window: usize) -> Vec<bool> {
    (0..t)
        .flat_map(|i| {
            let p = start + i;
            (0..tk).map(move |j| j > p || p - j >= window)
        })
        .collect()
}

/// [`window_masked`] as an additive score bias `[1, 1, T, Tk]`: 0 where the key is seen,
/// -inf where not. A bias rather than Burn's boolean mask: with the mask, Burn 0.22's
/// libtorch backend gave logits 0.77 (relative) away from flex's in tests/parity.rs
/// (PyTorch's boolean masks mean "attend", Burn's "hide": the likely cause), while the bias agrees on
/// every backend.
fn window_bias(t: usize, tk: usize, start: usize, window: usize, device: &Device) -> Tensor<4> {
    let bias: Vec<f32> = window_masked(t, tk, start, window)
        .into_iter()
        .map(|masked| if masked { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::<2>::from_data(TensorData::new(bias, [t, tk]), device).unsqueeze()
}

/// The rotations of one forward pass: the global layers' and the local layers'.
struct Rotations {
    global: Rotation,
    local: Rotation,
}

impl Gemma3Model {
    fn rotations(&self, rotation: impl Fn(&RotaryEmbedding) -> Rotation) -> Rotations {
        Rotations {
            global: rotation(&self.rotary_global),
            local: rotation(&self.rotary_local),
        }
    }
}

impl Gemma3Attention {
    fn rotation<'a>(&self, rotations: &'a Rotations) -> &'a Rotation {
        if self.window.is_some() {
            &rotations.local
        } else {
            &rotations.global
        }
    }

    /// `[B, T, C]` -> normed queries `[B, H, T, D]`, normed keys and values `[B, K, T, D]`.
    fn qkv(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, t, _] = x.dims();
        let (h, k, d) = (self.n_head, self.n_kv_head, self.head_dim);
        let [q, kk, v] = linears([&self.q_proj, &self.k_proj, &self.v_proj], x);
        let q = self.q_norm.forward(q.reshape([b, t, h, d]));
        let kk = self.k_norm.forward(kk.reshape([b, t, k, d]));
        let v = v.reshape([b, t, k, d]);
        (q.swap_dims(1, 2), kk.swap_dims(1, 2), v.swap_dims(1, 2))
    }

    fn options(&self, is_causal: bool) -> AttentionModuleOptions {
        AttentionModuleOptions {
            scale: Some(self.scale),
            softcap: self.softcap,
            is_causal,
        }
    }

    /// `[B, H, 1 or T, D]` attention output -> `[B, T, C]`.
    fn out(&self, y: Tensor<4>) -> Tensor<3> {
        let [b, h, t, d] = y.dims();
        linear(&self.o_proj, y.swap_dims(1, 2).reshape([b, t, h * d]))
    }

    /// `x`: `[B, T, C]` at positions `start..start+T` -> `[B, T, C]`.
    fn forward(
        &self,
        x: Tensor<3>,
        rotations: &Rotations,
        start: usize,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, k) = (self.n_head, self.n_kv_head);
        let (q, kk, v) = self.qkv(x);
        let rotation = self.rotation(rotations);
        let q = rotation.apply(q);
        let kk = rotation.apply(kk);
        let (kk, v) = match cache {
            Some((cache, layer)) => cache.append(layer, kk, v),
            None => (kk, v),
        };
        let tk = kk.dims()[2];
        let (kk, v) = (repeat_kv(kk, h / k), repeat_kv(v, h / k));
        let y = match self.window {
            // Some query would see a key `window` or more positions back: an explicit mask.
            Some(w) if start + t > w => {
                let bias = window_bias(t, tk, start, w, &q.device()).expand([b, h, t, tk]);
                attention(q, kk, v, None, Some(bias), self.options(false))
            }
            _ => attention(q, kk, v, None, None, self.options(t > 1)),
        };
        self.out(y)
    }

    /// Decode step of independent sequences: `x` `[B, 1, C]`, row `b` at its position
    /// (`rotations`, [`RotaryEmbedding::at`]) attending over `caches[b]` (its last
    /// `window` positions on a local layer).
    fn forward_step(
        &self,
        x: Tensor<3>,
        rotations: &Rotations,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Tensor<3> {
        let (q, kk, v) = self.qkv(x);
        let rotation = self.rotation(rotations);
        let q = rotation.apply(q);
        let kk = rotation.apply(kk);
        let rows = crate::kv_cache::append_rows(caches, layer, kk, v);
        let y = crate::kv_cache::attend_rows(q, rows, self.window, self.options(false));
        self.out(y)
    }
}

impl Gemma3DecoderLayer {
    fn mlp_block(&self, x: Tensor<3>) -> Tensor<3> {
        let y = self.mlp.forward(self.pre_feedforward_layernorm.forward(x.clone()));
        x + self.post_feedforward_layernorm.forward(y)
    }
}

impl Gemma3ForCausalLM {
    /// The weights as the fused flex decode step reads them; `None` off flex or in
    /// Burn's `[in, out]` weight layout.
    fn step_plan(&self) -> Option<crate::fused::step::Plan> {
        use crate::fused::step::{Head, Layer, Matrix, Norm, Plan, Proj};
        let m = &self.model;
        let norm = |n: &GemmaRmsNorm| Norm::new(&n.weight.val(), n.epsilon);
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
                    qk_norm: Some((norm(&a.q_norm)?, norm(&a.k_norm)?)),
                    o: Proj::new(&a.o_proj)?,
                    post_attn_norm: Some(norm(&l.post_attention_layernorm)?),
                    ff_norm: norm(&l.pre_feedforward_layernorm)?,
                    gate: Proj::new(&f.gate_proj)?,
                    up: Proj::new(&f.up_proj)?,
                    down: Proj::new(&f.down_proj)?,
                    post_ff_norm: Some(norm(&l.post_feedforward_layernorm)?),
                    // (Plan::rotary: the global frequencies, then the local ones)
                    rotary: usize::from(a.window.is_some()),
                    window: a.window,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let attn = &m.layers.first()?.self_attn;
        Some(Plan {
            embed: Matrix::embedding(&m.embed_tokens)?,
            embed_scale: Some(m.embed_scale),
            layers,
            norm: norm(&m.norm)?,
            head: Head::Tied,
            final_softcap: m.final_logit_softcapping,
            norm_add_one: true,
            gelu: true,
            heads: attn.n_head,
            kv_heads: attn.n_kv_head,
            head_dim: attn.head_dim,
            scale: Some(attn.scale),
            attn_softcap: attn.softcap,
            rotary: vec![m.rotary_global.clone(), m.rotary_local.clone()],
        })
    }

    /// `[B, T]` -> scaled embeddings `[B, T, C]`.
    fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(tokens) * self.model.embed_scale
    }

    /// Final norm, tied head, soft cap: `[B, T, C]` -> `[B, T, V]`.
    fn head(&self, x: Tensor<3>) -> Tensor<3> {
        let m = &self.model;
        let logits = tied_head(m.norm.forward(x), &m.embed_tokens);
        match m.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    fn forward_from(
        &self,
        tokens: Tensor<2, Int>,
        start: usize,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
    ) -> Tensor<3> {
        let t = tokens.dims()[1];
        let device = tokens.device();
        let rotations = self.model.rotations(|r| r.range(start, t, &device));
        let mut x = self.embed(tokens);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let y = layer.self_attn.forward(
                layer.input_layernorm.forward(x.clone()),
                &rotations,
                start,
                cache.as_deref_mut().map(|c| (c, i)),
            );
            x = layer.mlp_block(x + layer.post_attention_layernorm.forward(y));
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        self.head(logits.positions(x))
    }
}

impl CausalLm for Gemma3ForCausalLM {
    fn context_len(&self) -> usize {
        self.model.rotary_global.max_positions()
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
        let (positions, device) = (crate::kv_cache::cache_lengths(caches), tokens.device());
        let rotations = self.model.rotations(|r| r.at(&positions, &device));
        let mut x = self.embed(tokens);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let y = layer
                .self_attn
                .forward_step(layer.input_layernorm.forward(x.clone()), &rotations, caches, i);
            x = layer.mlp_block(x + layer.post_attention_layernorm.forward(y));
        }
        crate::kv_cache::advance_rows(caches);
        self.head(x)
    }
}

impl crate::Architecture for Gemma3Config {
    type Model = Gemma3ForCausalLM;
    fn validate(&self) -> Result<(), FieldError> {
        Gemma3Config::validate(self)
    }
    fn unresolved(&self) -> Vec<FieldError> {
        crate::registry::unresolved_vocab(self.vocab_size)
    }
    fn init(&self, device: &Device) -> Gemma3ForCausalLM {
        Gemma3Config::init(self, device)
    }
}

impl crate::LmSizes for Gemma3Config {
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

impl crate::LanguageArchitecture for Gemma3Config {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pattern_makes_every_sixth_layer_global() {
        let c: Gemma3Config = serde_json::from_value(serde_json::json!({
            "n_layer": 12, "n_head": 4, "n_kv_head": 1, "n_embd": 64, "head_dim": 16,
            "intermediate_size": 128, "block_size": 64, "vocab_size": 10
        }))
        .unwrap();
        let global: Vec<usize> = (0..12).filter(|&i| !c.is_sliding(i)).collect();
        assert_eq!(global, vec![5, 11]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_window_mask_hides_future_and_far_keys() {
        let m = window_masked(3, 5, 2, 2);
        // query 2 sees keys 1, 2; query 3 sees 2, 3; query 4 sees 3, 4
        #[rustfmt::skip]
        let want = [
            true, false, false, true, true,
            true, true, false, false, true,
            true, true, true, false, false,
        ];
        assert_eq!(m, want);
    }
}
