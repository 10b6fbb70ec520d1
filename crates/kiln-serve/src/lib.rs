//! Kiln's inference server: one model directory behind OpenAI's HTTP API.
//!
//! - [`generation`]: the language-model worker thread (continuous batching over
//!   [`kiln_infer::Engine`]); [`encoders`]: the embeddings/classification worker thread
//!   (dynamic batches under a token budget). Model calls never run on the async runtime:
//!   requests and tokens cross over channels.
//! - [`routes`] and [`completions`]: the HTTP edge (axum): OpenAI's shapes, a bounded
//!   queue (`429` + `Retry-After`), a body limit (`413`), Bearer auth, request timeouts,
//!   server-sent events, Prometheus [`metrics`].
//! - [`serve`]: binds first (so `/health` answers `503` while the model loads), loads on
//!   the worker thread, serves until SIGTERM/SIGINT, then drains in-flight requests
//!   within a deadline.

pub mod api;
pub mod completions;
pub mod encoders;
pub mod generation;
pub mod metrics;
pub mod routes;

pub use kiln_infer::engine::STEP_PROMPT;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use kiln_core::layout::WhichWeights;
use kiln_core::{BackendKind, Selected};
use kiln_data::Tokenizer;
use kiln_infer::chat::{ChatError, ChatTemplate};
use kiln_infer::engine::{ContextFull, EngineConfig};
use kiln_infer::{LoadedModel, Model};
use kiln_models::CausalLm;

/// Everything `serve` is told on its command line.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    /// The name clients give as `model` (default: the directory's name).
    pub model_name: Option<String>,
    pub backend: BackendKind,
    pub device_index: usize,
    pub host: String,
    pub port: u16,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most sequences waiting for a slot; beyond it, `429`.
    pub max_queue: usize,
    /// Prompt tokens per prefill chunk (interleaved with decode steps).
    pub prefill_chunk: usize,
    /// Prompts of at most this many tokens join the batched decode pass whole.
    pub step_prompt: usize,
    /// Padded tokens per encoder batch.
    pub batch_tokens: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// A request still running after this is cut (`504`, or the stream ends).
    pub request_timeout: Duration,
    /// After SIGTERM: how long in-flight requests may take before the process exits.
    pub shutdown_deadline: Duration,
    pub threads: Option<NonZeroUsize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::new(),
            model_name: None,
            backend: BackendKind::Flex,
            device_index: 0,
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch: 16,
            max_queue: 256,
            prefill_chunk: 512,
            step_prompt: kiln_infer::engine::STEP_PROMPT,
            batch_tokens: 16384,
            api_key: None,
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(600),
            shutdown_deadline: Duration::from_secs(30),
            threads: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error("loading {dir}: {message}")]
    Load { dir: PathBuf, message: String },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A language model as the edge sees it.
pub struct LanguageModel {
    pub generator: generation::Generator,
    pub tokenizer: Arc<Tokenizer>,
    /// The tokenizer's vocabulary with its added tokens, counted once at load: the
    /// `tokenizers` crate counts it by building the whole vocabulary map (49,152 entries
    /// for SmolLM2), which every request paid on the async runtime.
    pub vocab: u32,
    /// `None`: a base model (chat answers `400`).
    pub template: Option<Arc<ChatTemplate>>,
    pub context: usize,
    pub eos_token_ids: Vec<u32>,
}

/// A text encoder (embeddings; classification with a head) as the edge sees it.
pub struct TextEncoder {
    pub jobs: mpsc::Sender<encoders::EncodeJob>,
    /// Class names; empty without a classification head.
    pub labels: Vec<String>,
}

/// The loaded model's side of the edge.
pub enum Served {
    Language(LanguageModel),
    Encoder(TextEncoder),
}

/// What every handler shares.
pub struct AppState {
    pub config: ServeConfig,
    pub model_name: String,
    /// Set once the model has loaded; `/health` is `503` until then.
    pub served: OnceLock<Served>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub started: Instant,
}

/// Serve `config.model_dir` until SIGTERM/SIGINT.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let started = Instant::now();
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    let handle = metrics::install().map_err(ServeError::Setup)?;
    if let Some(threads) = config.threads {
        kiln_core::backend::set_cpu_threads(threads).map_err(ServeError::Setup)?;
    }
    let model_name = config.model_name.clone().unwrap_or_else(|| {
        config
            .model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kiln".into())
    });
    let state = Arc::new(AppState {
        config: config.clone(),
        model_name,
        served: OnceLock::new(),
        metrics: handle,
        started,
    });
    // The model loads on its own thread, which then runs it; the edge serves meanwhile.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<ServeError>();
    {
        let state = state.clone();
        std::thread::Builder::new().name("kiln-model".into()).spawn(move || {
            if let Err(e) = load_and_run(&state) {
                let _ = failed_tx.send(e);
            }
        })?;
    }
    eprintln!(
        "serve: listening on http://{local} (loading {})",
        config.model_dir.display()
    );
    let app = routes::router(state.clone());
    let shutdown = {
        let deadline = config.shutdown_deadline;
        async move {
            tokio::select! {
                _ = shutdown_signal() => {
                    eprintln!("serve: shutting down: no new connections, finishing in-flight requests (at most {} s)", deadline.as_secs());
                    std::thread::spawn(move || {
                        std::thread::sleep(deadline);
                        eprintln!("serve: requests still running after the {} s shutdown deadline; exiting", deadline.as_secs());
                        std::process::exit(0);
                    });
                }
                Ok(e) = failed_rx => {
                    eprintln!("serve: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    eprintln!("serve: stopped after {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// On the model thread: load, publish the edge's view, run the worker until the edge
/// is gone.
fn load_and_run(state: &AppState) -> Result<(), ServeError> {
    let config = &state.config;
    let load_err = |message: String| ServeError::Load {
        dir: config.model_dir.clone(),
        message,
    };
    let backend = Selected::new(config.backend, config.device_index).map_err(|e| ServeError::Setup(e.to_string()))?;
    let device = backend.device.clone();
    let loaded =
        LoadedModel::open(&config.model_dir, WhichWeights::Best, &device).map_err(|e| load_err(e.to_string()))?;
    let tokenizer = loaded
        .tokenizer
        .clone()
        .ok_or_else(|| load_err("the model has no tokenizer".into()))?;
    match &loaded.model {
        Model::CausalLm(model) => {
            let template = match ChatTemplate::load(&loaded.dir.dir) {
                Ok(t) => Some(Arc::new(t)),
                Err(ChatError::NoTemplate { .. }) => None,
                Err(e) => return Err(load_err(e.to_string())),
            };
            let (generator, jobs, outstanding) = generation::channel(config.max_batch, config.max_queue);
            let model: &dyn CausalLm = model.as_ref();
            let served = Served::Language(LanguageModel {
                generator,
                tokenizer: Arc::new(tokenizer.clone()),
                vocab: tokenizer.vocab_size() as u32,
                template,
                context: model.context_len(),
                eos_token_ids: loaded.eos_token_ids.clone(),
            });
            let engine = EngineConfig {
                max_batch: config.max_batch,
                prefill_chunk: config.prefill_chunk,
                step_prompt: config.step_prompt,
                context_full: ContextFull::Stop,
            };
            generation::run(model, &tokenizer, &device, engine, jobs, outstanding, || {
                publish(state, served, &loaded, &backend)
            });
        }
        Model::Encoder(_) | Model::TextClassifier(_) => {
            let (tx, rx) = mpsc::channel();
            let model = match &loaded.model {
                Model::Encoder(e) => encoders::EncoderModel::Encoder(e.as_ref()),
                Model::TextClassifier(c) => {
                    encoders::EncoderModel::Classifier(c.as_ref(), loaded.classifier_max_length(c.as_ref()))
                }
                _ => unreachable!("matched above"),
            };
            let labels = match &loaded.model {
                Model::TextClassifier(c) => (0..c.num_classes()).map(|k| loaded.label(k)).collect(),
                _ => Vec::new(),
            };
            publish(
                state,
                Served::Encoder(TextEncoder { jobs: tx, labels }),
                &loaded,
                &backend,
            );
            encoders::run(model, &tokenizer, &device, config.batch_tokens, rx);
        }
        Model::ImageClassifier(_) => {
            return Err(load_err(
                "an image classifier: serve runs language models and text encoders (classify images with `infer --image`)"
                    .into(),
            ));
        }
    }
    Ok(())
}

fn publish(state: &AppState, served: Served, loaded: &LoadedModel, backend: &Selected) {
    let _ = state.served.set(served);
    eprintln!(
        "serve: ready in {:.0} ms: {} ({}) on {}",
        state.started.elapsed().as_secs_f64() * 1000.0,
        state.model_name,
        loaded.arch(),
        backend.describe()
    );
}
