//! Hugging Face `config.json` -> Kiln model config.

use kiln_models::gpt2::Gpt2Activation;
use kiln_models::{BertConfig, Gpt2Config, LlamaConfig, ModelConfig};
use serde_json::Value;

use crate::ConvertError;

fn get(json: &Value, key: &str, path: &str) -> Result<usize, ConvertError> {
    json.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| ConvertError::Config(format!("{path}: missing or non-integer \"{key}\"")))
}

fn get_f64(json: &Value, key: &str, default: f64) -> f64 {
    json.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// Read the hyper-parameters of `arch` from a Hugging Face config.
pub fn model_config(arch: &str, json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let config = match arch {
        "gpt2" => ModelConfig::Gpt2(Gpt2Config {
            n_layer: get(json, "n_layer", path)?,
            n_head: get(json, "n_head", path)?,
            n_embd: get(json, "n_embd", path)?,
            block_size: get(json, "n_positions", path)?,
            vocab_size: get(json, "vocab_size", path)?,
            dropout: 0.0,
            bias: true,
            layer_norm_epsilon: get_f64(json, "layer_norm_epsilon", 1e-5),
            activation: match json.get("activation_function").and_then(Value::as_str) {
                None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Gpt2Activation::GeluTanh,
                Some("gelu") => Gpt2Activation::Gelu,
                Some(other) => {
                    return Err(ConvertError::Config(format!(
                        "{path}: activation_function = {other:?} is not supported (gelu_new or gelu)"
                    )));
                }
            },
        }),
        "llama" => {
            if json.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
                return Err(ConvertError::Config(format!(
                    "{path}: tie_word_embeddings = true is not supported by Kiln's llama (untied head)"
                )));
            }
            let n_head = get(json, "num_attention_heads", path)?;
            ModelConfig::Llama(LlamaConfig {
                n_layer: get(json, "num_hidden_layers", path)?,
                n_head,
                n_kv_head: get(json, "num_key_value_heads", path).unwrap_or(n_head),
                n_embd: get(json, "hidden_size", path)?,
                intermediate_size: get(json, "intermediate_size", path)?,
                block_size: get(json, "max_position_embeddings", path)?,
                vocab_size: get(json, "vocab_size", path)?,
                rope_theta: get_f64(json, "rope_theta", 10_000.0),
                rms_norm_eps: get_f64(json, "rms_norm_eps", 1e-6),
            })
        }
        "bert" => ModelConfig::Bert(BertConfig {
            n_layer: get(json, "num_hidden_layers", path)?,
            n_head: get(json, "num_attention_heads", path)?,
            n_embd: get(json, "hidden_size", path)?,
            intermediate_size: get(json, "intermediate_size", path)?,
            max_positions: get(json, "max_position_embeddings", path)?,
            vocab_size: get(json, "vocab_size", path)?,
            type_vocab_size: get(json, "type_vocab_size", path).unwrap_or(2),
            layer_norm_eps: get_f64(json, "layer_norm_eps", 1e-12),
        }),
        other => {
            return Err(ConvertError::Config(format!(
                "{path}: a Hugging Face config for --arch {other} is not supported (gpt2, llama, bert)"
            )));
        }
    };
    if let Some(model_type) = json.get("model_type").and_then(Value::as_str)
        && model_type != arch
    {
        return Err(ConvertError::Config(format!(
            "{path}: model_type is \"{model_type}\", not {arch}: a checkpoint of another architecture"
        )));
    }
    config
        .validate()
        .map_err(|e| ConvertError::Config(format!("{path}: {e}")))?;
    Ok(config)
}

/// A Hugging Face `config.json` for a Kiln model config (`--to hf`).
pub fn to_hf_json(model: &ModelConfig) -> Result<Value, ConvertError> {
    Ok(match model {
        ModelConfig::Gpt2(c) => serde_json::json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "activation_function": match c.activation {
                Gpt2Activation::GeluTanh => "gelu_new",
                Gpt2Activation::Gelu => "gelu",
            },
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": true,
        }),
        ModelConfig::Llama(c) => serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.block_size,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
        }),
        ModelConfig::Bert(c) => serde_json::json!({
            "model_type": "bert", "architectures": ["BertModel"],
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_positions,
            "vocab_size": c.vocab_size, "type_vocab_size": c.type_vocab_size,
            "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu", "position_embedding_type": "absolute",
        }),
        other => {
            return Err(ConvertError::Config(format!(
                "--to hf: {} has no Hugging Face counterpart",
                other.arch()
            )));
        }
    })
}
