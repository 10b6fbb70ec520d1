//! Llama: Hugging Face `LlamaForCausalLM`.

use kiln_models::{LlamaConfig, ModelConfig};
use serde::Deserialize;
use serde_json::Value;

use super::{Conversion, Rules, check_model_type, parse};
use crate::ConvertError;

pub const CONVERSION: Conversion = Conversion {
    arch: "llama",
    rules: Rules {
        renames: &[(
            r"\.(input_layernorm|post_attention_layernorm|norm)\.weight$",
            ".$1.gamma",
        )],
        ignore: &[r"\.rotary_emb\.inv_freq$"],
        transpose: &[r"_proj\.weight$", r"^lm_head\.weight$"],
        export: &[(r"\.gamma$", ".weight")],
    },
    model_types: &["llama"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
};

/// The fields of a Llama `config.json` Kiln reads.
#[derive(Deserialize)]
struct HfLlama {
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    if json.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
        return Err(ConvertError::Config(format!(
            "{path}: tie_word_embeddings = true is not supported by Kiln's llama (untied head)"
        )));
    }
    let hf: HfLlama = parse(json, path)?;
    debug_assert!(!hf.tie_word_embeddings);
    check_model_type(json, CONVERSION.model_types, "llama", path)?;
    Ok(ModelConfig::Llama(LlamaConfig {
        n_layer: hf.num_hidden_layers,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        n_embd: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        block_size: hf.max_position_embeddings,
        vocab_size: hf.vocab_size,
        rope_theta: hf.rope_theta,
        rms_norm_eps: hf.rms_norm_eps,
    }))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Llama(c) = model else { return None };
    Some(serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
        "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
    }))
}
