//! Hugging Face `config.json` -> Kiln model config.

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
