//! The `[data]` section of a run config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Errors reading or validating data; each names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("data.{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

fn default_val_fraction() -> f64 {
    0.1
}
fn default_tokenizer() -> String {
    "char".into()
}
fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}

/// Where the data comes from and how it is cut, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataConfig {
    /// Plain text: every `*.txt` under `path` (sorted by name) concatenated, tokenized,
    /// the last `val_fraction` held out for validation.
    Text {
        path: PathBuf,
        /// `"char"`, `"bpe:<vocab size>"` (trained on the training split), or a path to a
        /// Hugging Face `tokenizer.json`.
        #[serde(default = "default_tokenizer")]
        tokenizer: String,
        #[serde(default = "default_val_fraction")]
        val_fraction: f64,
    },
    /// IDX files (MNIST layout, optionally gzipped): `train-images-idx3-ubyte[.gz]`,
    /// `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`.
    Idx {
        path: PathBuf,
        /// Use only the first N training images (0 = all).
        #[serde(default)]
        max_train: usize,
        /// Use only the first N test images (0 = all).
        #[serde(default)]
        max_test: usize,
        /// Class names, index = class id (saved with the run, printed by `infer`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        labels: Vec<String>,
    },
    /// Labelled texts for classification (`finetune` with `task = "classify"`): three CSV
    /// files with a header, one text and one label column.
    Csv {
        train: PathBuf,
        validation: PathBuf,
        test: PathBuf,
        #[serde(default = "default_text_column")]
        text_column: String,
        #[serde(default = "default_label_column")]
        label_column: String,
        /// Rows with these labels are skipped (and counted).
        #[serde(default)]
        drop_labels: Vec<String>,
        /// `"strict"` (invalid UTF-8 is an error) or `"lenient"` (repaired and counted).
        #[serde(default)]
        encoding: crate::labeled::Encoding,
        /// `"error"` or `"drop"` for rows whose text is empty.
        #[serde(default)]
        empty_text: crate::labeled::EmptyText,
    },
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        match self {
            DataConfig::Text {
                val_fraction,
                tokenizer,
                ..
            } => {
                if !(*val_fraction > 0.0 && *val_fraction < 1.0) {
                    return Err(DataError::Config {
                        key: "val_fraction",
                        message: format!("{val_fraction} is not in (0, 1)"),
                    });
                }
                crate::TokenizerSpec::parse(tokenizer)
                    .map(|_| ())
                    .map_err(|message| DataError::Config {
                        key: "tokenizer",
                        message,
                    })
            }
            DataConfig::Idx { .. } | DataConfig::Csv { .. } => Ok(()),
        }
    }

    /// The CSV fields of a `kind = "csv"` config.
    pub fn csv_spec(&self) -> Option<crate::labeled::CsvSpec> {
        match self {
            DataConfig::Csv {
                train,
                validation,
                test,
                text_column,
                label_column,
                drop_labels,
                encoding,
                empty_text,
            } => Some(crate::labeled::CsvSpec {
                train: train.clone(),
                validation: validation.clone(),
                test: test.clone(),
                text_column: text_column.clone(),
                label_column: label_column.clone(),
                drop_labels: drop_labels.clone(),
                encoding: *encoding,
                empty_text: *empty_text,
            }),
            _ => None,
        }
    }
}
