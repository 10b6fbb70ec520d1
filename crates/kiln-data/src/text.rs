//! A text corpus as token ids, split into train/validation, and nanoGPT-style random
//! context windows as batches.

use std::path::Path;

use burn::prelude::*;

use crate::{DataError, SplitMix64, Tokenizer, TokenizerSpec};

/// Every `*.txt` file directly under `dir`, sorted by file name, concatenated.
pub fn read_corpus(dir: &Path) -> Result<String, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(DataError::format(
            dir,
            "no *.txt files (run scripts/fetch-shakespeare.sh?)",
        ));
    }
    let mut text = String::new();
    for file in files {
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        let part = String::from_utf8(bytes).map_err(|e| DataError::format(&file, format!("not UTF-8: {e}")))?;
        text.push_str(&part);
    }
    Ok(text)
}

/// Split `text` by characters: the first `1 - val_fraction` for training, the rest for validation.
pub fn split_text(text: &str, val_fraction: f64) -> (&str, &str) {
    let n_chars = text.chars().count();
    let split = text
        .char_indices()
        .nth(((n_chars as f64) * (1.0 - val_fraction)) as usize)
        .map_or(text.len(), |(i, _)| i);
    text.split_at(split)
}

/// Token ids of a corpus, split by position into train and validation.
#[derive(Debug, Clone)]
pub struct TextDataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// `inputs[b, t] = ids[s_b + t]`, `targets[b, t] = ids[s_b + t + 1]`.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
}

impl TextDataset {
    /// Read `dir`, split the text at `1 - val_fraction` (by characters), build the
    /// tokenizer from the training part and tokenize both parts.
    pub fn load(dir: &Path, spec: &TokenizerSpec, val_fraction: f64) -> Result<(Self, Tokenizer), DataError> {
        let text = read_corpus(dir)?;
        let (train_text, val_text) = split_text(&text, val_fraction);
        // A char vocabulary covers the whole corpus (as nanoGPT's does), so that
        // validation text never holds an unknown character.
        let tokenizer = match spec {
            TokenizerSpec::Char => Tokenizer::build(spec, &text)?,
            _ => Tokenizer::build(spec, train_text)?,
        };
        let dataset = Self {
            train: tokenizer.encode(train_text)?,
            val: tokenizer.encode(val_text)?,
        };
        Ok((dataset, tokenizer))
    }

    /// Tokenize a corpus with an existing tokenizer (resume, fine-tuning).
    pub fn load_with(dir: &Path, tokenizer: &Tokenizer, val_fraction: f64) -> Result<Self, DataError> {
        let text = read_corpus(dir)?;
        let (train_text, val_text) = split_text(&text, val_fraction);
        Ok(Self {
            train: tokenizer.encode(train_text)?,
            val: tokenizer.encode(val_text)?,
        })
    }

    /// Check both splits hold at least one window of `context + 1` tokens.
    pub fn check_context(&self, context: usize) -> Result<(), DataError> {
        for (name, ids) in [("train", &self.train), ("validation", &self.val)] {
            if ids.len() <= context {
                return Err(DataError::Config {
                    key: "path",
                    message: format!(
                        "the {name} split has {} tokens, fewer than context + 1 = {}",
                        ids.len(),
                        context + 1
                    ),
                });
            }
        }
        Ok(())
    }

    /// `batch` random windows of `context` tokens from `ids`, drawn by `rng`.
    pub fn sample(ids: &[u32], batch: usize, context: usize, rng: &mut SplitMix64, device: &Device) -> TokenBatch {
        let mut inputs = Vec::with_capacity(batch * context);
        let mut targets = Vec::with_capacity(batch * context);
        for _ in 0..batch {
            let start = rng.below(ids.len() - context);
            inputs.extend(ids[start..start + context].iter().map(|&t| t as i64));
            targets.extend(ids[start + 1..start + context + 1].iter().map(|&t| t as i64));
        }
        TokenBatch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, context]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, context]), device),
        }
    }
}
