//! Gemma 3 (text): Hugging Face `Gemma3ForCausalLM` (`model_type` `gemma3_text`), and
//! llama.cpp's `gemma3` GGUF files.

use kiln_gguf::GgufFile;
use kiln_models::gemma3::LayerAttention;
use kiln_models::{Gemma3Config, ModelConfig};
use serde::Deserialize;
use serde_json::{Value, json};

use super::llama::{rope_of, rope_scaling_json};
use super::{Conversion, GgufRules, Rules, check_model_type, parse};
use crate::ConvertError;
use crate::gguf::meta_u64;
use crate::onnx::{Graph, Linear, Norm, Resolved};

pub const CONVERSION: Conversion = Conversion {
    arch: "gemma3",
    rules: Rules {
        // Kiln's module paths are HF's.
        renames: &[],
        ignore: &[r"\.rotary_emb(_local)?\.inv_freq$"],
        transpose: &[r"_proj\.weight$"],
        export: &[],
        tied: &[r"^lm_head\.weight$"],
    },
    model_types: &["gemma3_text"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: Some(&GGUF),
    onnx: Some(resolve_onnx),
    head: None,
};

const GGUF: GgufRules = GgufRules {
    architectures: &["gemma3"],
    tensors: &[
        (r"^token_embd\.weight$", "model.embed_tokens.weight"),
        (r"^output_norm\.weight$", "model.norm.weight"),
        (
            r"^blk\.(\d+)\.attn_norm\.weight$",
            "model.layers.$1.input_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.post_attention_norm\.weight$",
            "model.layers.$1.post_attention_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.ffn_norm\.weight$",
            "model.layers.$1.pre_feedforward_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.post_ffw_norm\.weight$",
            "model.layers.$1.post_feedforward_layernorm.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_q_norm\.weight$",
            "model.layers.$1.self_attn.q_norm.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_k_norm\.weight$",
            "model.layers.$1.self_attn.k_norm.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_q\.weight$",
            "model.layers.$1.self_attn.q_proj.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_k\.weight$",
            "model.layers.$1.self_attn.k_proj.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_v\.weight$",
            "model.layers.$1.self_attn.v_proj.weight",
        ),
        (
            r"^blk\.(\d+)\.attn_output\.weight$",
            "model.layers.$1.self_attn.o_proj.weight",
        ),
        (
            r"^blk\.(\d+)\.ffn_gate\.weight$",
            "model.layers.$1.mlp.gate_proj.weight",
        ),
        (r"^blk\.(\d+)\.ffn_up\.weight$", "model.layers.$1.mlp.up_proj.weight"),
        (
            r"^blk\.(\d+)\.ffn_down\.weight$",
            "model.layers.$1.mlp.down_proj.weight",
        ),
    ],
    config: gguf_config,
    fix: Some(unfold_norms),
};

#[derive(Deserialize)]
struct HfGemma3 {
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    hidden_size: usize,
    head_dim: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_local_theta")]
    rope_local_base_freq: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_window")]
    sliding_window: usize,
    #[serde(default, alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<LayerAttention>>,
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

fn default_local_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_window() -> usize {
    4096
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    if json.get("model_type").and_then(Value::as_str) == Some("gemma3") {
        return Err(ConvertError::Config(format!(
            "{path}: model_type gemma3 is the multimodal Gemma 3 (text_config inside); Kiln reads the text model (gemma3_text)"
        )));
    }
    let hf: HfGemma3 = parse(json, path)?;
    check_model_type(json, CONVERSION.model_types, "gemma3", path)?;
    if let Some(act) = hf.hidden_activation.as_deref().filter(|a| *a != "gelu_pytorch_tanh") {
        return Err(ConvertError::Config(format!(
            "{path}: hidden_activation: {act:?} is not supported (Gemma 3's MLP is gelu_pytorch_tanh)"
        )));
    }
    if hf.tie_word_embeddings == Some(false) {
        return Err(ConvertError::Config(format!(
            "{path}: tie_word_embeddings: false is not supported (Gemma 3 ties its head)"
        )));
    }
    let (rope_theta, rope_scaling) = rope_of(json, 1_000_000.0, path)?;
    let mut config = Gemma3Config {
        n_layer: hf.num_hidden_layers,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads,
        n_embd: hf.hidden_size,
        head_dim: hf.head_dim,
        intermediate_size: hf.intermediate_size,
        block_size: hf.max_position_embeddings,
        vocab_size: hf.vocab_size,
        rope_theta,
        rope_local_theta: hf.rope_local_base_freq,
        rope_scaling,
        rms_norm_eps: hf.rms_norm_eps,
        sliding_window: hf.sliding_window,
        sliding_window_pattern: hf.sliding_window_pattern.unwrap_or(6),
        layer_types: hf.layer_types,
        query_pre_attn_scalar: hf.query_pre_attn_scalar,
        final_logit_softcapping: hf.final_logit_softcapping,
        attn_logit_softcapping: hf.attn_logit_softcapping,
    };
    // Explicit values that say what the defaults say are kept as the defaults, so a
    // config reads back as it was written (`--to hf` and back).
    if let Some(types) = config.layer_types.take() {
        let by_pattern = (0..config.n_layer)
            .all(|i| config.is_sliding(i) == (types.get(i) == Some(&LayerAttention::SlidingAttention)));
        if !by_pattern || types.len() != config.n_layer {
            config.layer_types = Some(types);
        }
    }
    if config.query_pre_attn_scalar == Some(config.head_dim as f64) {
        config.query_pre_attn_scalar = None;
    }
    Ok(ModelConfig::Gemma3(config))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Gemma3(c) = model else { return None };
    let layer_types: Vec<LayerAttention> = (0..c.n_layer)
        .map(|i| {
            if c.is_sliding(i) {
                LayerAttention::SlidingAttention
            } else {
                LayerAttention::FullAttention
            }
        })
        .collect();
    Some(json!({
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
        "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rope_local_base_freq": c.rope_local_theta,
        "rope_scaling": rope_scaling_json(&c.rope_scaling), "rms_norm_eps": c.rms_norm_eps,
        "sliding_window": c.sliding_window, "layer_types": layer_types,
        "query_pre_attn_scalar": c.query_pre_attn_scalar.unwrap_or(c.head_dim as f64),
        "final_logit_softcapping": c.final_logit_softcapping, "attn_logit_softcapping": c.attn_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
    }))
}

/// A Gemma 3 text `config.json` from `gemma3.*` metadata. The file does not carry the
/// local/global layer pattern or the local rotary base: the architecture's defaults
/// apply (every 6th layer global, base 10 000), as in transformers.
fn gguf_config(g: &GgufFile) -> Result<Value, ConvertError> {
    let key = |k: &str| format!("gemma3.{k}");
    let n_head = meta_u64(g, &key("attention.head_count"))?;
    let hidden = meta_u64(g, &key("embedding_length"))?;
    let vocab = g.strings("tokenizer.ggml.tokens")?.map_or(0, |t| t.len() as u64);
    let mut c = json!({
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": meta_u64(g, &key("block_count"))?,
        "hidden_size": hidden,
        "intermediate_size": meta_u64(g, &key("feed_forward_length"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": g.u64(&key("attention.head_count_kv"))?.unwrap_or(n_head),
        "head_dim": g.u64(&key("attention.key_length"))?.unwrap_or(hidden / n_head.max(1)),
        "max_position_embeddings": meta_u64(g, &key("context_length"))?,
        "rms_norm_eps": g.require(&key("attention.layer_norm_rms_epsilon"), g.f64(&key("attention.layer_norm_rms_epsilon")))?,
        "rope_theta": g.f64(&key("rope.freq_base"))?.unwrap_or(1_000_000.0),
        "sliding_window": g.u64(&key("attention.sliding_window"))?.unwrap_or(4096),
        "vocab_size": vocab,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": true,
    });
    let scaling = crate::gguf::rope_scaling(g, "gemma3")?;
    if !scaling.is_null() {
        c["rope_scaling"] = scaling;
    }
    for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(v) = g.f64(&key(cap))? {
            c[cap] = json!(v);
        }
    }
    if g.tensor("output.weight").is_some() {
        return Err(ConvertError::Config(format!(
            "{}: tensor output.weight: an untied head is not supported for Gemma 3",
            g.path().display()
        )));
    }
    Ok(c)
}

/// llama.cpp's converter stores Gemma's norm weights with the `1 +` folded in; HF (and
/// Kiln) keep `w` and compute `1 + w`.
fn unfold_norms(name: &str, _shape: &[usize], values: &mut [f32], _config: &Value) -> Result<(), String> {
    if name.ends_with("norm.weight") {
        values.iter_mut().for_each(|v| *v -= 1.0);
    }
    Ok(())
}

/// Place a Gemma 3's weights by their role in an ONNX graph (see [`crate::onnx`]): the
/// token table (indexed by the ids input), the stream starting at its product with
/// `sqrt(hidden)`, then [`Graph::decoder`]'s sandwich blocks: `input_layernorm`; q, k,
/// v (as Llama's, [`super::llama::query_key_value`]) with `q_norm` / `k_norm`, the RMS
/// norms their heads pass; `o_proj`; `post_attention_layernorm` (before the residual
/// Add); `pre_feedforward_layernorm`; gate (through tanh-GELU's `Tanh`) and up;
/// `down_proj`; `post_feedforward_layernorm`; the final `norm`; the head must be the
/// token table transposed (Gemma 3 ties them). Gemma's norms scale by `1 + w` and an
/// export folds that sum into one constant: `w` is taken back out (within one f32
/// rounding of 1). The hyper-parameters a graph does not state (the sliding window and
/// which layers use it, the two rope bases, the query scale, softcapping) come from the
/// `config.json` that Optimum writes beside the file, or `--config`.
pub(crate) fn resolve_onnx(g: &Graph) -> Result<Resolved, String> {
    let (linears, norms, embeds) = (g.linears(), g.rms_norms(), g.embeddings());
    let word = g.token_embedding(&embeds, "Gemma")?;
    let c = word.table.shape[1];
    // Gemma multiplies the embedding by sqrt(hidden) (as a constant, in the model's dtype).
    let sqrt_c = (c as f32).sqrt();
    let h0 = g
        .binary_with(&word.y, "Mul", |s| {
            g.fold(s)
                .is_some_and(|f| f.values.len() == 1 && (f.values[0] - sqrt_c).abs() <= 1e-2 * sqrt_c)
        })
        .ok_or("the token embedding is not scaled by sqrt(hidden size) (not a Gemma graph)")?;
    let dec = g.decoder(&h0, &norms, &linears)?;
    let matmuls = super::llama::attention_matmuls(g, &linears);
    let mut out = Resolved::default();
    out.place("model.embed_tokens.weight".into(), &word.table, false);
    // `1 + w` folded into one constant: w.
    let place_norm = |out: &mut Resolved, name: String, n: &Norm| {
        let mut w = n.gamma.clone();
        w.values = w.values.iter().map(|v| v - 1.0).collect();
        w.steps.push("1 + w of Gemma's norm taken back to w".into());
        out.place(name, &w, false);
    };
    for (i, layer) in dec.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let (Some(post_attn), Some(post_mlp)) = (layer.attn_post_norm, layer.mlp_post_norm) else {
            return Err(format!(
                "block {i}: no norms between the projections and the residual Adds (Gemma's sandwich)"
            ));
        };
        let [q, k, v] = super::llama::query_key_value(g, layer, &matmuls, i)?;
        // The per-head norm a projection's output passes (through its reshape to heads).
        let head_norm = |l: &Linear, what: &str| {
            let stops = g.through_reshapes(&l.y).0;
            norms
                .iter()
                .find(|n| stops.contains(&(n.node, 0)))
                .ok_or_else(|| format!("block {i}: no {what} after {}", l.weight.source))
        };
        let (q_norm, k_norm) = (head_norm(q, "q_norm")?, head_norm(k, "k_norm")?);
        let [gate, up] = super::llama::gate_up(g, layer, "Tanh", i)?;
        place_norm(&mut out, format!("{p}.input_layernorm.weight"), layer.attn_norm);
        for (name, l) in [("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", layer.attn_out)] {
            out.place(format!("{p}.self_attn.{name}.weight"), &l.weight, true);
        }
        place_norm(&mut out, format!("{p}.self_attn.q_norm.weight"), q_norm);
        place_norm(&mut out, format!("{p}.self_attn.k_norm.weight"), k_norm);
        place_norm(&mut out, format!("{p}.post_attention_layernorm.weight"), post_attn);
        place_norm(
            &mut out,
            format!("{p}.pre_feedforward_layernorm.weight"),
            layer.mlp_norm,
        );
        for (name, l) in [("gate_proj", gate), ("up_proj", up), ("down_proj", layer.mlp_out)] {
            out.place(format!("{p}.mlp.{name}.weight"), &l.weight, true);
        }
        place_norm(&mut out, format!("{p}.post_feedforward_layernorm.weight"), post_mlp);
        if let Some(l) = [q, k, v, layer.attn_out, gate, up, layer.mlp_out]
            .iter()
            .find(|l| l.bias.is_some())
        {
            return Err(format!(
                "block {i}: {} has a bias (Gemma's projections have none)",
                l.weight.source
            ));
        }
    }
    place_norm(&mut out, "model.norm.weight".into(), dec.final_norm);
    let head = dec.head.ok_or("no output projection after the final norm")?;
    if !head.is_tied_to(&word.table) {
        return Err(format!(
            "the output projection {} is not the token embedding (Gemma 3 ties them)",
            head.weight.source
        ));
    }
    out.notes.push(format!(
        "{}: the output projection, the token embedding transposed (tied)",
        head.weight.source
    ));
    out.notes
        .push("the sliding window, rope bases and query scale of a Gemma 3 graph come from its config.json".into());
    // No config off the graph: the caller takes the config.json beside the file.
    out.config = Value::Null;
    Ok(out)
}
