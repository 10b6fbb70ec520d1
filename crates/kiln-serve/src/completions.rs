//! `POST /v1/completions` and `POST /v1/chat/completions`: a request becomes one
//! engine sequence per choice (`n`, times the prompts of a list), queued on the
//! generation worker; the answer is collected whole or streamed as server-sent events.
//!
//! A client that goes away drops its end of the token channel (the stream or the
//! handler's future is dropped); the worker sees it before its next step and takes the
//! sequences out of the batch.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use kiln_data::Tokenizer;
use kiln_infer::chat::Message;
use kiln_infer::engine::{TokenLogprobs, check_request};
use kiln_infer::{FinishReason, Request, Sampling};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::{self, ApiError, ChatContent, ChatRequest, CompletionRequest, Prompt, SamplingParams, Usage};
use crate::generation::{GenEvent, Job};
use crate::metrics as m;
use crate::routes::{Shared, check_model, served, unix_time};
use crate::{LanguageModel, Served};

/// Most choices one request may ask for (prompts times `n`).
const MAX_CHOICES: usize = 128;
/// Most alternatives per token (OpenAI's limit for chat).
const MAX_LOGPROBS: usize = 20;
/// Most stop strings.
const MAX_STOPS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

fn language<'a>(state: &'a crate::AppState, endpoint: &str) -> Result<&'a LanguageModel, ApiError> {
    match served(state)? {
        Served::Language(lm) => Ok(lm),
        Served::Encoder(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{endpoint} needs a language model; this server runs a text encoder (use /v1/embeddings)"),
        )),
    }
}

pub async fn completions(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let request: CompletionRequest = api::parse(&body)?;
    let sampling: SamplingParams = api::parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    let lm = language(&state, "/v1/completions")?;
    let prompts: Vec<Vec<u32>> = match &request.prompt {
        Prompt::Text(text) => vec![encode_prompt(&lm.tokenizer, text, "prompt")?],
        Prompt::Texts(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, t)| encode_prompt(&lm.tokenizer, t, &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_param("prompt", "is empty"));
    }
    let vocab = lm.vocab;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(bad) = p.iter().find(|&&t| t >= vocab) {
            return Err(ApiError::bad_param(
                &format!("prompt[{i}]"),
                format!("token {bad} is not in the vocabulary of {vocab}"),
            ));
        }
    }
    if let Some(k) = request.logprobs
        && k > MAX_LOGPROBS
    {
        return Err(ApiError::bad_param("logprobs", format!("{k}: at most {MAX_LOGPROBS}")));
    }
    let echo = if request.echo {
        prompts
            .iter()
            .map(|p| lm.tokenizer.decode(p).map_err(|e| ApiError::bad_param("prompt", e)))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let spec = Spec {
        kind: Kind::Completion,
        prompts,
        logprobs: request.logprobs,
        // OpenAI's default for completions.
        default_max_tokens: Some(16),
        echo,
    };
    generate(&state, lm, spec, &sampling, arrived).await
}

pub async fn chat(State(state): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let request: ChatRequest = api::parse(&body)?;
    let sampling: SamplingParams = api::parse(&body)?;
    check_model(&state, request.model.as_deref())?;
    let lm = language(&state, "/v1/chat/completions")?;
    let Some(template) = &lm.template else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "this model has no chat template (a base model): use /v1/completions",
        ));
    };
    if request.messages.is_empty() {
        return Err(ApiError::bad_param("messages", "is empty: give at least one message"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, msg) in request.messages.iter().enumerate() {
        let content = match &msg.content {
            None => String::new(),
            Some(ChatContent::Text(t)) => t.clone(),
            Some(ChatContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_param(
                                &format!("messages[{i}].content[{j}]"),
                                format!("a {kind:?} part: this model reads text parts only"),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(&msg.role, &content));
    }
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_param("messages", e))?;
    // The template writes the special tokens (BOS included) itself.
    let prompt = lm
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::bad_param("messages", e))?;
    let top = request.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(ApiError::bad_param(
            "top_logprobs",
            format!("{top}: at most {MAX_LOGPROBS}"),
        ));
    }
    if request.top_logprobs.is_some() && !request.logprobs {
        return Err(ApiError::bad_param("top_logprobs", "needs logprobs: true"));
    }
    let spec = Spec {
        kind: Kind::Chat,
        prompts: vec![prompt],
        logprobs: request.logprobs.then_some(top),
        default_max_tokens: None,
        echo: Vec::new(),
    };
    generate(&state, lm, spec, &sampling, arrived).await
}

fn encode_prompt(tokenizer: &Tokenizer, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    // With the tokenizer's special tokens (BOS first when it adds one), as `infer --prompt`.
    tokenizer
        .encode_with_special(text)
        .map_err(|e| ApiError::bad_param(param, e))
}

/// What a generation request asks for, once its prompt is tokens.
struct Spec {
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    logprobs: Option<usize>,
    /// `None`: up to the context.
    default_max_tokens: Option<usize>,
    /// Completions with `echo`: each prompt's text, put before its choices' text.
    echo: Vec<String>,
}

/// Seeds for requests that give none: different per request, as OpenAI's are.
fn fresh_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// The engine requests of `spec` (prompt-major: choice `i * n + j` is prompt `i`'s
/// `j`-th), checked.
fn engine_requests(lm: &LanguageModel, spec: &Spec, p: &SamplingParams) -> Result<Vec<Request>, ApiError> {
    let n = p.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad_param("n", "0: must be at least 1"));
    }
    if n * spec.prompts.len() > MAX_CHOICES {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "{n} choices for {} prompts: at most {MAX_CHOICES} in all",
                spec.prompts.len()
            ),
        ));
    }
    let (max_param, asked) = match (p.max_completion_tokens, p.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    if asked == Some(0) {
        return Err(ApiError::bad_param(max_param, "0: must be at least 1"));
    }
    let stops = p.stop.clone().map(api::OneOrMany::into_vec).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_param(
            "stop",
            format!("{} strings: at most {MAX_STOPS}", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad_param("stop", "an empty string"));
    }
    if let Some(t) = p.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::bad_param("temperature", format!("{t}: must be in [0, 2]")));
    }
    let seed = p.seed.unwrap_or_else(fresh_seed);
    let prompt_param = match spec.kind {
        Kind::Completion => "prompt",
        Kind::Chat => "messages",
    };
    let mut requests = Vec::with_capacity(n * spec.prompts.len());
    for (i, prompt) in spec.prompts.iter().enumerate() {
        if prompt.len() >= lm.context {
            return Err(ApiError::bad_param(
                prompt_param,
                format!(
                    "{} tokens: the model's context is {} tokens, with room for at least one to generate",
                    prompt.len(),
                    lm.context
                ),
            ));
        }
        // max_tokens is capped by what the context has room for.
        let room = lm.context - prompt.len();
        let max_new_tokens = asked.or(spec.default_max_tokens).unwrap_or(room).min(room);
        for j in 0..n {
            let request = Request {
                prompt: prompt.clone(),
                max_new_tokens,
                sampling: Sampling {
                    temperature: p.temperature.unwrap_or(1.0),
                    top_k: p.top_k,
                    top_p: p.top_p,
                    seed: seed.wrapping_add(j as u64),
                },
                eos_token_ids: if p.ignore_eos {
                    Vec::new()
                } else {
                    lm.eos_token_ids.clone()
                },
                stop_strings: stops.clone(),
                logprobs: spec.logprobs,
            };
            check_request(&request, lm.context, true).map_err(|e| match e {
                kiln_infer::GenerateError::Sampling(s) => ApiError::bad_param(s.field, &s.message),
                kiln_infer::GenerateError::EmptyPrompt => {
                    ApiError::bad_param(&format!("{prompt_param}[{i}]"), "is empty: give at least one token")
                }
                other => ApiError::bad_param(prompt_param, other),
            })?;
            requests.push(request);
        }
    }
    Ok(requests)
}

async fn generate(
    state: &Shared,
    lm: &LanguageModel,
    spec: Spec,
    params: &SamplingParams,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let requests = engine_requests(lm, &spec, params)?;
    let prompt_tokens: usize = spec.prompts.iter().map(Vec::len).sum();
    let choices = requests.len();
    let n = params.n.unwrap_or(1);
    let (tx, rx) = unbounded_channel();
    lm.generator.submit(Job {
        requests,
        events: tx,
        arrived,
    })?;
    let mut out = Choices::new(
        spec.kind,
        state.model_name.clone(),
        lm.tokenizer.clone(),
        spec.logprobs,
        prompt_tokens,
        choices,
    );
    if !spec.echo.is_empty() {
        for c in 0..choices {
            out.texts[c] = spec.echo[c / n].clone();
        }
    }
    let deadline = tokio::time::Instant::now() + state.config.request_timeout;
    if params.stream {
        let include_usage = params.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let echo = std::mem::take(&mut out.texts);
        out.texts = vec![String::new(); choices];
        let stream = sse_stream(rx, out, include_usage, deadline, echo, arrived);
        return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
    }
    let mut rx = rx;
    while out.remaining > 0 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the request ran past the server's {} s timeout",
                        state.config.request_timeout.as_secs()
                    ),
                ));
            }
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the model worker stopped",
                ));
            }
            Ok(Some(GenEvent::Failed(message))) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message));
            }
            Ok(Some(event)) => {
                out.absorb(event);
            }
        }
    }
    Ok(axum::Json(out.response()).into_response())
}

/// A request's choices as their tokens arrive: the whole response, or its stream chunks.
struct Choices {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    logprobs: Option<usize>,
    prompt_tokens: usize,
    completion_tokens: usize,
    remaining: usize,
    texts: Vec<String>,
    token_logprobs: Vec<Vec<(u32, TokenLogprobs)>>,
    finish: Vec<Option<FinishReason>>,
}

fn request_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    format!("{prefix}-{:016x}", fresh_seed())
}

impl Choices {
    fn new(
        kind: Kind,
        model: String,
        tokenizer: Arc<Tokenizer>,
        logprobs: Option<usize>,
        prompt_tokens: usize,
        choices: usize,
    ) -> Self {
        Self {
            kind,
            id: request_id(kind),
            created: unix_time(),
            model,
            tokenizer,
            logprobs,
            prompt_tokens,
            completion_tokens: 0,
            remaining: choices,
            texts: vec![String::new(); choices],
            token_logprobs: vec![Vec::new(); choices],
            finish: vec![None; choices],
        }
    }

    /// Take a worker event into the collected response.
    fn absorb(&mut self, event: GenEvent) {
        match event {
            GenEvent::Token { choice, event } => {
                self.texts[choice] += &event.text;
                if let Some(lp) = event.logprobs {
                    self.token_logprobs[choice].push((event.token, lp));
                }
            }
            GenEvent::Done { choice, completion } => {
                self.completion_tokens += completion.tokens.len();
                self.finish[choice] = Some(completion.finish_reason);
                self.remaining -= 1;
            }
            GenEvent::Failed(_) => {}
        }
    }

    fn token_text(&self, token: u32) -> String {
        self.tokenizer.decode(&[token]).unwrap_or_default()
    }

    /// OpenAI's `logprobs` object for `entries` (`text_offset` from `offset`).
    fn logprobs_json(&self, entries: &[(u32, TokenLogprobs)], mut offset: usize) -> Value {
        match self.kind {
            Kind::Chat => {
                let entry = |token: u32, logprob: f32| {
                    let text = self.token_text(token);
                    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
                };
                let content: Vec<Value> = entries
                    .iter()
                    .map(|(token, lp)| {
                        let mut e = entry(*token, lp.logprob);
                        e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let mut tokens = Vec::new();
                let mut token_logprobs = Vec::new();
                let mut top = Vec::new();
                let mut offsets = Vec::new();
                for (token, lp) in entries {
                    let text = self.token_text(*token);
                    offsets.push(offset);
                    offset += text.len();
                    tokens.push(text);
                    token_logprobs.push(lp.logprob);
                    let alternatives: serde_json::Map<String, Value> =
                        lp.top.iter().map(|&(t, l)| (self.token_text(t), json!(l))).collect();
                    top.push(Value::Object(alternatives));
                }
                json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
            }
        }
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.completion_tokens)
    }

    /// The whole (non-streamed) response.
    fn response(&self) -> Value {
        let choices: Vec<Value> = (0..self.texts.len())
            .map(|i| {
                let logprobs = match self.logprobs {
                    Some(_) => self.logprobs_json(&self.token_logprobs[i], 0),
                    None => Value::Null,
                };
                let finish = self.finish[i].map(FinishReason::as_str);
                match self.kind {
                    Kind::Completion => json!({
                        "index": i, "text": self.texts[i], "logprobs": logprobs, "finish_reason": finish,
                    }),
                    Kind::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": self.texts[i]},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        })
    }

    /// One stream chunk of choice `index`: `text` (a chat delta), its tokens'
    /// log-probabilities, and the finish reason on the last.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        logprobs: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.envelope(vec![choice])
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion.chunk" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

/// What the SSE stream is doing.
struct StreamState {
    rx: Option<UnboundedReceiver<GenEvent>>,
    out: Choices,
    queued: VecDeque<Event>,
    include_usage: bool,
    deadline: tokio::time::Instant,
    /// Chat: whether a choice's first chunk (with the role) went out.
    opened: Vec<bool>,
    /// Completions with `echo`: the prompt text, sent first.
    echo: Vec<String>,
    done: bool,
    started: Instant,
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn sse_stream(
    rx: UnboundedReceiver<GenEvent>,
    out: Choices,
    include_usage: bool,
    deadline: tokio::time::Instant,
    echo: Vec<String>,
    arrived: Instant,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let choices = out.texts.len();
    let state = StreamState {
        rx: Some(rx),
        out,
        queued: VecDeque::new(),
        include_usage,
        deadline,
        opened: vec![false; choices],
        echo,
        done: false,
        started: arrived,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.queued.pop_front() {
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            if s.out.remaining == 0 {
                // Every choice finished: the usage chunk when asked, then [DONE].
                if s.include_usage {
                    let mut chunk = s.out.envelope(Vec::new());
                    chunk["usage"] = json!(s.out.usage());
                    s.queued.push_back(data(&chunk));
                }
                s.queued.push_back(Event::default().data("[DONE]"));
                s.finish();
                continue;
            }
            let rx = s.rx.as_mut().expect("open until done");
            match tokio::time::timeout_at(s.deadline, rx.recv()).await {
                Err(_) => {
                    let e = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the request ran past the server's timeout");
                    s.queued.push_back(data(&e.body()));
                    s.queued.push_back(Event::default().data("[DONE]"));
                    s.finish();
                }
                Ok(None) => {
                    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model worker stopped");
                    s.queued.push_back(data(&e.body()));
                    s.finish();
                }
                Ok(Some(GenEvent::Failed(message))) => {
                    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message);
                    s.queued.push_back(data(&e.body()));
                    s.queued.push_back(Event::default().data("[DONE]"));
                    s.finish();
                }
                Ok(Some(event)) => s.push(event),
            }
        }
    })
}

impl StreamState {
    /// The chunks of one worker event.
    fn push(&mut self, event: GenEvent) {
        let (choice, text, logprobs, finish) = match &event {
            GenEvent::Token { choice, event } => {
                let lp = event.logprobs.as_ref().map(|lp| {
                    self.out
                        .logprobs_json(&[(event.token, lp.clone())], self.out.texts[*choice].len())
                });
                (*choice, event.text.clone(), lp, None)
            }
            GenEvent::Done { choice, completion } => (*choice, String::new(), None, Some(completion.finish_reason)),
            GenEvent::Failed(_) => return,
        };
        let mut text = text;
        if !self.opened[choice] {
            self.opened[choice] = true;
            if let Some(echo) = self.echo.get(choice).filter(|e| !e.is_empty()) {
                text = echo.clone() + &text;
            }
            if self.out.kind == Kind::Chat {
                let opening = self.out.chunk(choice, Some(""), true, None, None);
                self.queued.push_back(data(&opening));
            }
        }
        let has_text = !text.is_empty() || logprobs.is_some();
        self.out.absorb(event);
        if has_text {
            let chunk = self.out.chunk(choice, Some(&text), false, logprobs, None);
            self.queued.push_back(data(&chunk));
        }
        if let Some(reason) = finish {
            let text = match self.out.kind {
                Kind::Completion => Some(""),
                Kind::Chat => None,
            };
            let chunk = self.out.chunk(choice, text, false, None, Some(reason));
            self.queued.push_back(data(&chunk));
        }
    }

    /// The stream's end: the receiver goes (cancelling anything still running), the
    /// request's duration is recorded.
    fn finish(&mut self) {
        self.done = true;
        self.rx = None;
        let endpoint = match self.out.kind {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        };
        metrics::histogram!(m::E2E, "endpoint" => endpoint).record(self.started.elapsed().as_secs_f64());
    }
}
