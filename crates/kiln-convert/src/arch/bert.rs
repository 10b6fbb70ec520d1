//! BERT: Hugging Face `BertModel` (and task wrappers with a `bert.` prefix).

use kiln_models::{BertConfig, ModelConfig};
use serde::Deserialize;
use serde_json::Value;

use super::{Conversion, Rules, check_model_type, parse};
use crate::ConvertError;

pub const CONVERSION: Conversion = Conversion {
    arch: "bert",
    rules: Rules {
        renames: &[
            (r"^bert\.", ""),
            (r"\.LayerNorm\.weight$", ".layer_norm.gamma"),
            (r"\.LayerNorm\.bias$", ".layer_norm.beta"),
            (r"\.attention\.self\.", ".attention.self_attn."),
        ],
        ignore: &[r"^embeddings\.position_ids$", r"^cls\."],
        transpose: &[r"\.(query|key|value|dense)\.weight$"],
        export: &[
            (r"\.layer_norm\.gamma$", ".LayerNorm.weight"),
            (r"\.layer_norm\.beta$", ".LayerNorm.bias"),
            (r"\.attention\.self_attn\.", ".attention.self."),
        ],
        tied: &[],
    },
    model_types: &["bert"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: None,
};

/// The fields of a BERT `config.json` Kiln reads.
#[derive(Deserialize)]
struct HfBert {
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfBert = parse(json, path)?;
    check_model_type(json, CONVERSION.model_types, "bert", path)?;
    Ok(ModelConfig::Bert(BertConfig {
        n_layer: hf.num_hidden_layers,
        n_head: hf.num_attention_heads,
        n_embd: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        max_positions: hf.max_position_embeddings,
        vocab_size: hf.vocab_size,
        type_vocab_size: hf.type_vocab_size,
        layer_norm_eps: hf.layer_norm_eps,
    }))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Bert(c) = model else { return None };
    Some(serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"],
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_positions,
        "vocab_size": c.vocab_size, "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu", "position_embedding_type": "absolute",
    }))
}
