//! GPT-2: Hugging Face `GPT2LMHeadModel` / `GPT2Model`.

use kiln_models::gpt2::Gpt2Activation;
use kiln_models::{Gpt2Config, ModelConfig};
use serde::Deserialize;
use serde_json::Value;

use super::{Conversion, Rules, check_model_type, parse};
use crate::ConvertError;

pub const CONVERSION: Conversion = Conversion {
    arch: "gpt2",
    rules: Rules {
        renames: &[
            // GPT2Model checkpoints have no `transformer.` prefix; GPT2LMHeadModel ones do.
            (r"^(h|wte|wpe|ln_f)\.", "transformer.$1."),
            (r"\.(ln_1|ln_2|ln_f)\.weight$", ".$1.gamma"),
            (r"\.(ln_1|ln_2|ln_f)\.bias$", ".$1.beta"),
        ],
        ignore: &[
            r"\.attn\.(bias|masked_bias)$", // causal-mask buffers
            r"^lm_head\.weight$",           // tied to transformer.wte.weight
        ],
        // GPT-2's Conv1D already stores [in, out]: no transpose (a blanket Linear
        // transpose would silently corrupt the square c_proj).
        transpose: &[],
        export: &[(r"\.gamma$", ".weight"), (r"\.beta$", ".bias")],
        tied: &[],
    },
    model_types: &["gpt2"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: None,
    onnx: None,
};

/// The fields of a GPT-2 `config.json` Kiln reads.
#[derive(Deserialize)]
struct HfGpt2 {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_positions: usize,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    activation_function: Option<String>,
}

fn default_eps() -> f64 {
    1e-5
}

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfGpt2 = parse(json, path)?;
    let activation = match hf.activation_function.as_deref() {
        None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Gpt2Activation::GeluTanh,
        Some("gelu") => Gpt2Activation::Gelu,
        Some(other) => {
            return Err(ConvertError::Config(format!(
                "{path}: activation_function = {other:?} is not supported (gelu_new or gelu)"
            )));
        }
    };
    check_model_type(json, CONVERSION.model_types, "gpt2", path)?;
    Ok(ModelConfig::Gpt2(Gpt2Config {
        n_layer: hf.n_layer,
        n_head: hf.n_head,
        n_embd: hf.n_embd,
        block_size: hf.n_positions,
        vocab_size: hf.vocab_size,
        dropout: 0.0,
        bias: true,
        layer_norm_epsilon: hf.layer_norm_epsilon,
        activation,
    }))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Gpt2(c) = model else { return None };
    Some(serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "activation_function": match c.activation {
            Gpt2Activation::GeluTanh => "gelu_new",
            Gpt2Activation::Gelu => "gelu",
        },
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": true,
    }))
}
