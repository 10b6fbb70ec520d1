//! Hugging Face `config.json` <-> Kiln model config, through the architecture's entry
//! in [`crate::arch`].

use kiln_models::{ClassifierHead, ModelConfig};
use serde_json::Value;

use crate::ConvertError;
use crate::arch;

/// Read the hyper-parameters of `arch` from a Hugging Face config (`path` names it in
/// errors).
pub fn model_config(arch: &str, json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    let conversion = arch::for_arch(arch)?;
    let from_hf = conversion.from_hf.ok_or_else(|| {
        ConvertError::Config(format!(
            "{path}: a Hugging Face config for --arch {arch} is not supported ({})",
            arch::ALL
                .iter()
                .filter(|c| c.from_hf.is_some())
                .map(|c| c.arch)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let config = from_hf(json, path)?;
    config
        .validate_complete()
        .map_err(|e| ConvertError::Config(format!("{path}: {e}")))?;
    Ok(config)
}

/// [`model_config`] with the architecture detected from `model_type` / `architectures`.
pub fn detect_model_config(json: &Value, path: &str) -> Result<ModelConfig, ConvertError> {
    model_config(arch::detect(json, path)?, json, path)
}

/// A Hugging Face `config.json` for a Kiln model config (`--to hf`).
pub fn to_hf_json(model: &ModelConfig) -> Result<Value, ConvertError> {
    let conversion = arch::for_arch(model.arch())?;
    conversion
        .to_hf
        .and_then(|to_hf| to_hf(model))
        .ok_or_else(|| ConvertError::Config(format!("--to hf: {} has no Hugging Face counterpart", model.arch())))
}

/// [`to_hf_json`] of a task model: the encoder's config with the head's keys
/// (`BertForSequenceClassification`, `id2label`, ...).
pub fn to_hf_json_with(model: &ModelConfig, head: Option<&ClassifierHead>) -> Result<Value, ConvertError> {
    let json = to_hf_json(model)?;
    let Some(head) = head else { return Ok(json) };
    let rules = arch::for_arch(model.arch())?
        .head
        .ok_or_else(|| ConvertError::Config(format!("{} has no sequence-classification head", model.arch())))?;
    arch::bert::head_to_hf(json, head, rules.class)
}

/// The classification head a Hugging Face `config.json` describes for `model`
/// (`BertForSequenceClassification`: its labels, CLS pooling); `None` for a bare model.
pub fn head(json: &Value, model: &ModelConfig, path: &str) -> Result<Option<ClassifierHead>, ConvertError> {
    match arch::for_arch(model.arch())?.head {
        Some(_) => arch::bert::head_from_hf(json, path),
        None => Ok(None),
    }
}
