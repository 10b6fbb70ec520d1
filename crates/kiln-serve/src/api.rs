//! OpenAI's request and response shapes (completions, chat completions, embeddings,
//! models) and Kiln's classification extension, with OpenAI-style error bodies.
//!
//! Requests are parsed with the path of a bad field kept (`serde_path_to_error`), so a
//! `400` names what to fix: `messages[2].content: invalid type: integer ...`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error as OpenAI's API returns one: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Seconds to wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// `400`: field `param` has a bad value.
    pub fn bad_param(param: &str, message: impl std::fmt::Display) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, format!("{param}: {message}"))
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Parse a JSON request body; a bad one is a `400` naming the field (`param`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => Ok(value),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not valid JSON: {inner}"),
                ));
            }
            if path == "." {
                Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the body: {inner}")))
            } else {
                Err(ApiError::bad_param(&path, inner))
            }
        }
    }
}

/// A string or a list of strings (`stop`, `input`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both generation endpoints share. Parsed from the same body as the endpoint's
/// own request (not `#[serde(flatten)]`-ed into it, which loses the path of a bad field).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Kiln extension (as vLLM and llama-server take it).
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Do not stop at the model's end-of-sequence tokens (as vLLM's extension).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// How many alternatives to report per token (the chosen token's log-probability
    /// comes with any value).
    pub logprobs: Option<usize>,
    /// Echo the prompt before the completion.
    #[serde(default)]
    pub echo: bool,
    pub user: Option<String>,
}

/// One message of a chat request: `content` a string or a list of text parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<ChatContent>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub user: Option<String>,
}

/// `encoding_format` of an embeddings request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32 bytes in base64 (what the `openai` package asks for by default).
    Base64,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: OneOrMany,
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    pub user: Option<String>,
}

/// `POST /v1/classify` (Kiln extension): texts in, label and probabilities out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClassifyRequest {
    pub model: Option<String>,
    pub input: OneOrMany,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_field_is_named_with_its_path() {
        let err = parse::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("messages[0].content"), "{err}");
        let err = parse::<SamplingParams>(br#"{"prompt": "a", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"), "{err}");
        let err = parse::<SamplingParams>(br#"{"prompt": "a", "max_tokens": -1}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"), "{err}");
        let err = parse::<CompletionRequest>(br#"{"temperature": 1}"#).unwrap_err();
        assert!(err.message.contains("prompt"), "{err}");
    }

    #[test]
    fn broken_json_is_a_400_without_a_field() {
        let err = parse::<CompletionRequest>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("not valid JSON"), "{err}");
        assert_eq!(err.param, None);
    }

    #[test]
    fn prompts_and_stops_take_every_shape_openai_allows() {
        let body = br#"{"prompt": ["a", "b"], "stop": "x"}"#;
        let r: CompletionRequest = parse(body).unwrap();
        assert_eq!(r.prompt, Prompt::Texts(vec!["a".into(), "b".into()]));
        let s: SamplingParams = parse(body).unwrap();
        assert_eq!(s.stop.unwrap().into_vec(), vec!["x".to_string()]);
        let r: CompletionRequest = parse(br#"{"prompt": [1, 2, 3], "stop": ["x", "y"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2, 3]));
        let r: CompletionRequest = parse(br#"{"prompt": [[1], [2, 3]]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::TokenLists(vec![vec![1], vec![2, 3]]));
        let body = br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "stream": true}"#;
        let r: ChatRequest = parse(body).unwrap();
        assert!(matches!(&r.messages[0].content, Some(ChatContent::Parts(p)) if p[0].text.as_deref() == Some("hi")));
        assert!(parse::<SamplingParams>(body).unwrap().stream);
        let r: EmbeddingRequest = parse(br#"{"input": "x", "encoding_format": "base64"}"#).unwrap();
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
    }

    #[test]
    fn errors_have_openais_shape_and_retry_after() {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "the queue is full");
        e.retry_after = Some(1);
        let body = e.body();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], 429);
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
