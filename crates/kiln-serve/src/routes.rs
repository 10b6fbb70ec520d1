//! The router, its middleware (metrics per endpoint and status, Bearer auth, JSON
//! bodies for every error) and the endpoints that are not generation: health, models,
//! metrics, embeddings, classification.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::api::{self, ApiError, ClassifyRequest, EmbeddingRequest, EncodingFormat};
use crate::encoders::{EncodeJob, Task};
use crate::metrics as m;
use crate::{AppState, Served, TextEncoder, completions};

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// Every response: counted by endpoint and status, timed (streams time themselves when
/// they end), and an error without a JSON body (axum's own 405, 413, ...) given one.
async fn observe(request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    metrics::counter!(m::REQUESTS, "endpoint" => endpoint.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    if !content_type.starts_with("text/event-stream") {
        metrics::histogram!(m::E2E, "endpoint" => endpoint).record(arrived.elapsed().as_secs_f64());
    }
    if (status.is_client_error() || status.is_server_error()) && !content_type.starts_with("application/json") {
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than the server's limit (--max-body-bytes)",
            StatusCode::METHOD_NOT_ALLOWED => "this endpoint does not take that method",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "send the body as application/json",
            _ => status.canonical_reason().unwrap_or("error"),
        };
        let mut fixed = ApiError::new(status, message).into_response();
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                fixed.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return fixed;
    }
    response
}

/// With `--api-key`: `/v1/*` needs `Authorization: Bearer KEY` (health and metrics stay
/// public, for load balancers and scrapers).
async fn auth(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes()));
        if !ok {
            let message = if given.is_some() {
                "the API key is not valid"
            } else {
                "this server needs an API key: send `Authorization: Bearer KEY`"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}", request.method(), request.uri().path()),
    )
}

async fn health(State(state): State<Shared>) -> Response {
    match state.served.get() {
        Some(_) => (
            StatusCode::OK,
            axum::Json(json!({"status": "ok", "model": state.model_name})),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading", "model": state.model_name})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<Shared>) -> Response {
    let mut response = Body::from(state.metrics.render()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn models(State(state): State<Shared>) -> Response {
    let created = unix_time();
    axum::Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": created, "owned_by": "kiln"}],
    }))
    .into_response()
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The loaded model, or `503` while it loads.
pub fn served(state: &AppState) -> Result<&Served, ApiError> {
    state.served.get().ok_or_else(|| {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading");
        e.retry_after = Some(1);
        e
    })
}

/// A request's `model`, when given, must be the one served.
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(name) if !name.is_empty() && name != state.model_name => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} is not served here (this server serves {:?})",
                    state.model_name
                ),
            )
        }),
        _ => Ok(()),
    }
}

fn encoder<'a>(state: &'a AppState, endpoint: &str) -> Result<&'a TextEncoder, ApiError> {
    match served(state)? {
        Served::Encoder(e) => Ok(e),
        Served::Language(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{endpoint} needs a text encoder; this server runs a language model (use /v1/completions)"),
        )),
    }
}

/// Run `texts` on the encoder worker; waits without blocking the runtime.
async fn encode(
    state: &AppState,
    encoder: &TextEncoder,
    texts: Vec<String>,
    task: Task,
) -> Result<crate::encoders::Encoded, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::bad_param("input", "is empty: give at least one text"));
    }
    let (reply, rx) = tokio::sync::oneshot::channel();
    encoder
        .jobs
        .send(EncodeJob { texts, task, reply })
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model worker has stopped"))?;
    match tokio::time::timeout(state.config.request_timeout, rx).await {
        Err(_) => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the request timed out")),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model worker has stopped",
        )),
        Ok(Ok(Err(message))) => Err(ApiError::bad_param("input", message.trim_start_matches("input"))),
        Ok(Ok(Ok(encoded))) => Ok(encoded),
    }
}

/// The response of an encoder endpoint: one entry a text, the tokens they were.
fn encoded_list(state: &AppState, data: Vec<Value>, tokens: usize) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn embeddings(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = api::parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    let encoder = encoder(&state, "/v1/embeddings")?;
    let encoded = encode(&state, encoder, request.input.into_vec(), Task::Embed).await?;
    if let Some(d) = request.dimensions {
        let have = encoded.rows.first().map_or(0, Vec::len);
        if d != have {
            return Err(ApiError::bad_param(
                "dimensions",
                format!("{d}: this model's embeddings have {have} dimensions"),
            ));
        }
    }
    let data: Vec<Value> = encoded
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let embedding = match request.encoding_format {
                EncodingFormat::Float => json!(row),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(encoded_list(&state, data, encoded.tokens))
}

async fn classify(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let request: ClassifyRequest = api::parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    let encoder = encoder(&state, "/v1/classify")?;
    if encoder.labels.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "/v1/classify needs a classifier (a fine-tuned model with a head); this encoder only embeds (use /v1/embeddings)",
        ));
    }
    let encoded = encode(&state, encoder, request.input.into_vec(), Task::Classify).await?;
    let data: Vec<Value> = encoded
        .rows
        .iter()
        .enumerate()
        .map(|(i, probs)| {
            let best = kiln_infer::classify::argmax(probs);
            let probabilities: serde_json::Map<String, Value> = encoder
                .labels
                .iter()
                .zip(probs)
                .map(|(label, &p)| (label.clone(), json!(p)))
                .collect();
            json!({"index": i, "label": encoder.labels.get(best), "score": probs.get(best), "probabilities": probabilities})
        })
        .collect();
    Ok(encoded_list(&state, data, encoded.tokens))
}
