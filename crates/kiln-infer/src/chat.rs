//! Chat templates: a model's Jinja `chat_template` (from `tokenizer_config.json`, where
//! `convert` also puts a GGUF's `tokenizer.chat_template`) rendered with `minijinja` and
//! its Python-compatibility methods (`.strip()`, `.startswith()`, ... which Hugging Face
//! templates call), with the variables transformers' `apply_chat_template` passes:
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the
//! `raise_exception` function.

use std::path::{Path, PathBuf};

use kiln_core::layout::TOKENIZER_CONFIG;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: no chat_template: this model has no chat format (a base model); give it a plain --prompt instead")]
    NoTemplate { path: PathBuf },
    #[error("{path}: chat_template: {message}")]
    Render { path: PathBuf, message: String },
}

/// A model's chat template with its special tokens.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    path: PathBuf,
}

/// A special token of `tokenizer_config.json`: a string, or `{"content": ...}`.
fn token(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model directory `dir`; [`ChatError::NoTemplate`] when it has
    /// none.
    pub fn load(dir: &Path) -> Result<Self, ChatError> {
        let path = dir.join(TOKENIZER_CONFIG);
        let file_err = |message: String| ChatError::File {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(ChatError::NoTemplate { path });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| file_err(format!("not JSON: {e}")))?;
        let source = match config.get("chat_template") {
            None | Some(Value::Null) => return Err(ChatError::NoTemplate { path }),
            Some(Value::String(s)) => s.clone(),
            // A list of named templates: the "default" one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or_else(|| file_err("chat_template is a list without a \"default\" template".into()))?
                .to_string(),
            Some(other) => return Err(file_err(format!("chat_template is {other}, not a string"))),
        };
        let template = Self {
            source,
            bos_token: token(&config, "bos_token"),
            eos_token: token(&config, "eos_token"),
            path,
        };
        // A template that does not compile is an error now, not at the first message.
        template.environment()?;
        Ok(template)
    }

    /// A template from its source (tests, `--chat-template`).
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str, path: &Path) -> Result<Self, ChatError> {
        let template = Self {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            path: path.to_path_buf(),
        };
        template.environment()?;
        Ok(template)
    }

    fn render_err(&self, e: minijinja::Error) -> ChatError {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message += &format!(": {s}");
            source = s.source();
        }
        ChatError::Render {
            path: self.path.clone(),
            message,
        }
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>, ChatError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
            },
        );
        // Templates strip a trailing newline the way Jinja does by default in transformers.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| self.render_err(e))?;
        Ok(env)
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let env = self.environment()?;
        let template = env.get_template("chat").map_err(|e| self.render_err(e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| self.render_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_chatml_template_renders_like_transformers() {
        let t = ChatTemplate::from_source(CHATML, "", "<|im_end|>", Path::new("tokenizer_config.json")).unwrap();
        let text = t.render(&[Message::new("user", "Hi!")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user/assistant') }}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        let t = ChatTemplate::from_source(src, "<bos>", "<eos>", Path::new("tc.json")).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "<bos>HI");
        let err = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
        assert!(
            err.contains("tc.json") && err.contains("roles must be user/assistant"),
            "{err}"
        );
        let err = ChatTemplate::from_source("{% for %}", "", "", Path::new("tc.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tc.json") && err.contains("chat_template"), "{err}");
    }
}
