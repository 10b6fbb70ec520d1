//! Config files: TOML with `--set key=value` overrides, errors that name the file and
//! the key, and [`ModelFile`], the `[model]` section every model directory holds.

use std::path::{Path, PathBuf};

use kiln_models::quant::Quantization;
use kiln_models::{ClassifierHead, ModelConfig};
use serde::{Deserialize, Serialize};

/// A config that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("--set {0}: expected key=value, e.g. --set train.max_steps=200")]
    BadOverride(String),
}

pub fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The text of the config file at `path`.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Deserialize TOML `text` (read from `path`) after applying `--set` `overrides`; an
/// error names the key and the file.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let mut value: toml::Table = toml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
        let key = e.path().to_string();
        invalid(path, format!("{key}: {}", e.into_inner()))
    })
}

/// Set `a.b.c = value` in `table`, creating tables on the way.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(assignment.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::BadOverride(assignment.to_string()));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("split yields at least one part");
    let mut cursor = table;
    for part in parts {
        let entry = cursor
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::BadOverride(format!("{assignment} ({part} is not a table)")))?;
    }
    cursor.insert(last.to_string(), value);
    Ok(())
}

/// The `[model]` section of a `config.toml`: all a model directory needs (a training
/// run's config has more sections, a converted model's has only this one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    pub model: ModelConfig,
    /// The classification head of a fine-tuned classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<ClassifierHead>,
    /// Which weights are stored packed in GGUF blocks (`convert --quantize`, a GGUF kept
    /// quantized); see `kiln_models::quant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
}

/// [`ModelFile`] as a file that must hold nothing else (`convert --config`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictModelFile {
    model: ModelConfig,
    #[serde(default)]
    head: Option<ClassifierHead>,
    #[serde(default)]
    quantization: Option<Quantization>,
}

impl ModelFile {
    /// Read the `[model]` (and `[head]`) sections of a model directory's `config.toml`
    /// (other sections of a training run's config are its own business) and check that
    /// the model can be built as written: every field valid and every size resolved.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        let file: Self = toml::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
        file.validate(path)?;
        Ok(file)
    }

    /// [`load`](Self::load) for a file that describes a model and nothing else: a
    /// training run's `[data]`/`[train]`/`[optim]` sections (or anything unknown) are
    /// an error naming them, not silently ignored.
    pub fn load_strict(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        let strict: StrictModelFile = toml::from_str(&text).map_err(|e| {
            invalid(
                path,
                format!("{e}(a model config holds [model] and optionally [head]; a run config's other sections do not apply here)"),
            )
        })?;
        let file = Self {
            model: strict.model,
            head: strict.head,
            quantization: strict.quantization,
        };
        file.validate(path)?;
        Ok(file)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |e: kiln_models::FieldError| invalid(path, e.to_string());
        self.model.validate_complete().map_err(bad)?;
        if let Some(head) = &self.head {
            head.validate().map_err(bad)?;
        }
        if let Some(q) = &self.quantization {
            q.validate().map_err(bad)?;
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a model file serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const GPT2: &str = "[model]\narch = \"gpt2\"\nn_layer = 1\nn_head = 1\nn_embd = 8\nblock_size = 4\n";

    #[test]
    fn a_model_file_without_a_vocabulary_is_refused_by_key() {
        let (_d, path) = write(&format!("{GPT2}vocab_size = 0\n"));
        let err = ModelFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("model.vocab_size"), "{err}");
        let (_d, path) = write(GPT2);
        assert!(
            ModelFile::load(&path)
                .unwrap_err()
                .to_string()
                .contains("model.vocab_size")
        );
        let (_d, path) = write(&format!("{GPT2}vocab_size = 5\n"));
        assert_eq!(ModelFile::load(&path).unwrap().model.vocab_size(), Some(5));
    }

    #[test]
    fn a_strict_model_file_refuses_a_run_configs_other_sections() {
        let (_d, path) = write(&format!("{GPT2}vocab_size = 5\n[train]\nbatch_size = 2\n"));
        assert!(ModelFile::load(&path).is_ok());
        let err = ModelFile::load_strict(&path).unwrap_err().to_string();
        assert!(err.contains("train") && err.contains("config.toml"), "{err}");
    }
}
