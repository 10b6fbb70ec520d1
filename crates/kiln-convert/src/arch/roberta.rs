//! RoBERTa and XLM-RoBERTa: Hugging Face `RobertaModel` / `XLMRobertaModel` (and task
//! wrappers with a `roberta.` prefix, `RobertaForSequenceClassification`). The layers
//! are BERT's; positions start after the padding index (`pad_token_id + 1`), carried as
//! `position_offset` of Kiln's BERT config.

use kiln_models::ModelConfig;
use serde_json::Value;

use super::bert::{self, HfBert};
use super::{Conversion, HeadRules, Rules, check_model_type, parse};
use crate::ConvertError;
use crate::onnx::{Graph, Resolved};

pub const CONVERSION: Conversion = Conversion {
    arch: "roberta",
    rules: Rules {
        renames: &[
            (r"^roberta\.", ""),
            (r"\.LayerNorm\.weight$", ".layer_norm.gamma"),
            (r"\.LayerNorm\.bias$", ".layer_norm.beta"),
            (r"\.attention\.self\.", ".attention.self_attn."),
        ],
        // Buffers, and the masked-LM head of `RobertaForMaskedLM`.
        ignore: &[r"^embeddings\.(position_ids|token_type_ids)$", r"^lm_head\."],
        transpose: bert::CONVERSION.rules.transpose,
        export: bert::CONVERSION.rules.export,
        tied: &[],
    },
    model_types: &["roberta", "xlm-roberta"],
    from_hf: Some(from_hf),
    to_hf: Some(to_hf),
    gguf: None,
    onnx: Some(resolve_onnx),
    head: Some(&HEAD),
};

/// `RobertaForSequenceClassification`: `roberta.*` without a pooler, and a head of
/// `dense -> tanh -> out_proj` on the first token's state, which is Kiln's CLS pooling
/// (`tanh(pooler.dense(h[:, 0]))`) followed by the classifier: `classifier.dense` is the
/// pooler, `classifier.out_proj` the classifier.
const HEAD: HeadRules = HeadRules {
    class: "RobertaForSequenceClassification",
    hf_encoder: "roberta.",
    tensors: &[
        (r"^classifier\.dense\.(weight|bias)$", "bert.pooler.dense.$1"),
        (r"^classifier\.out_proj\.(weight|bias)$", "classifier.$1"),
    ],
    export: &[
        (r"^bert\.pooler\.dense\.(weight|bias)$", "classifier.dense.$1"),
        (r"^classifier\.(weight|bias)$", "classifier.out_proj.$1"),
    ],
    transpose: &[r"^classifier\.weight$", r"^bert\.pooler\.dense\.weight$"],
};

fn from_hf(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let hf: HfBert = parse(json, path)?;
    check_model_type(json, CONVERSION.model_types, "roberta", path)?;
    // transformers' create_position_ids_from_input_ids: padding_idx + 1 + i.
    let offset = hf.pad_token_id.unwrap_or(1) + 1;
    Ok(ModelConfig::Roberta(hf.config(offset, path)?))
}

fn to_hf(model: &ModelConfig) -> Option<Value> {
    let ModelConfig::Roberta(c) = model else { return None };
    let mut json = bert::hf_json(c, "roberta", "RobertaModel");
    json["pad_token_id"] = Value::from(c.position_offset.saturating_sub(1));
    Some(json)
}

/// A RoBERTa encoder's ONNX graph: BERT's resolver ([`bert::resolve_encoder`]), the
/// positions counted from the padding index (`cumsum(ids != pad) * mask + pad`).
fn resolve_onnx(g: &Graph) -> Result<Resolved, String> {
    bert::resolve_encoder(g, true)
}
