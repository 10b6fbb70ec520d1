//! The language-model worker: one thread owns the model and its [`Engine`]; requests
//! arrive over a channel and their tokens leave over one channel per request. No tokio
//! worker ever waits on a forward pass.
//!
//! Every loop turn takes the requests that arrived (they join the running batch at
//! this step, up to `max_batch`; the rest wait in the engine's queue), drops the
//! sequences whose client has gone (their receiver is closed: a disconnected stream or
//! an abandoned request leaves the batch before the next step, and its KV cache goes
//! back to the pool), then runs one engine step: one chunk of one prompt and one token
//! for every running sequence.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use axum::http::StatusCode;
use burn::prelude::Device;
use kiln_data::Tokenizer;
use kiln_infer::engine::{Engine, EngineConfig, SeqId, TokenEvent};
use kiln_infer::{Completion, Request};
use kiln_models::CausalLm;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::ApiError;
use crate::metrics as m;

/// One HTTP request's generations (`n` choices, or one per prompt of a list).
pub struct Job {
    pub requests: Vec<Request>,
    pub events: UnboundedSender<GenEvent>,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// What the worker sends back for a job.
#[derive(Debug)]
pub enum GenEvent {
    Token { choice: usize, event: TokenEvent },
    Done { choice: usize, completion: Completion },
    Failed(String),
}

/// The edge's handle on the worker: submits jobs, enforces the queue bound.
#[derive(Clone)]
pub struct Generator {
    jobs: mpsc::Sender<Job>,
    /// Sequences submitted and not finished (running or waiting).
    outstanding: Arc<AtomicUsize>,
    /// Most sequences outstanding: `max_batch` running plus `max_queue` waiting.
    limit: usize,
}

impl Generator {
    /// Queue `job`, or refuse it at once with `429` when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let n = job.requests.len();
        let reserved = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now + n <= self.limit).then_some(now + n)
            });
        if reserved.is_err() {
            metrics::counter!(m::REJECTED).increment(1);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is at capacity ({} sequences running or queued): retry later",
                    self.limit
                ),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        self.jobs.send(job).map_err(|_| {
            self.outstanding.fetch_sub(n, Ordering::AcqRel);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model worker has stopped")
        })
    }
}

/// A sequence the worker is generating for a client.
struct Live {
    sender: UnboundedSender<GenEvent>,
    choice: usize,
    arrived: Instant,
    last_token: Option<Instant>,
}

/// The channel pair: the edge's [`Generator`] and the worker's receiving end.
pub fn channel(max_batch: usize, max_queue: usize) -> (Generator, mpsc::Receiver<Job>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::channel();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let generator = Generator {
        jobs: tx,
        outstanding: outstanding.clone(),
        limit: max_batch + max_queue,
    };
    (generator, rx, outstanding)
}

/// The worker loop; `ready` is called once the KV caches are allocated. Returns when
/// every [`Generator`] is dropped and nothing runs.
pub fn run(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    device: &Device,
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    outstanding: Arc<AtomicUsize>,
    ready: impl FnOnce(),
) {
    let mut engine = Engine::new(model, device, Some(tokenizer), config);
    // Every batch slot's KV cache up front (its first positions; it grows, amortised,
    // for a long sequence and is reused by the next one).
    engine.preallocate(config.max_batch);
    ready();
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    let finish = |n: usize| {
        outstanding.fetch_sub(n, Ordering::AcqRel);
    };
    loop {
        metrics::gauge!(m::QUEUE_DEPTH).set(engine.waiting() as f64);
        metrics::gauge!(m::RUNNING).set(engine.running() as f64);
        let mut admit = |job: Job, engine: &mut Engine<'_, dyn CausalLm>| {
            for (choice, request) in job.requests.into_iter().enumerate() {
                match engine.add(request) {
                    Ok(id) => {
                        live.insert(
                            id,
                            Live {
                                sender: job.events.clone(),
                                choice,
                                arrived: job.arrived,
                                last_token: None,
                            },
                        );
                    }
                    Err(e) => {
                        finish(1);
                        let _ = job.events.send(GenEvent::Failed(e.to_string()));
                    }
                }
            }
        };
        if engine.is_idle() {
            match jobs.recv() {
                Ok(job) => admit(job, &mut engine),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            admit(job, &mut engine);
        }
        // Clients that went away leave before the step.
        let gone: Vec<SeqId> = live
            .iter()
            .filter(|(_, l)| l.sender.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            live.remove(&id);
            if let Some(c) = engine.remove(id) {
                metrics::counter!(m::GENERATED_TOKENS).increment(c.tokens.len() as u64);
                metrics::counter!(m::PROMPT_TOKENS).increment(c.stats.prompt_tokens as u64);
            }
            metrics::counter!(m::CANCELLED).increment(1);
            finish(1);
        }
        if engine.is_idle() {
            continue;
        }
        metrics::counter!(m::STEPS).increment(1);
        match engine.step() {
            Ok((events, done)) => {
                let now = Instant::now();
                for event in events {
                    let Some(l) = live.get_mut(&event.id) else { continue };
                    match l.last_token {
                        None => metrics::histogram!(m::TTFT).record((now - l.arrived).as_secs_f64()),
                        Some(t) => metrics::histogram!(m::ITL).record((now - t).as_secs_f64()),
                    }
                    l.last_token = Some(now);
                    let _ = l.sender.send(GenEvent::Token {
                        choice: l.choice,
                        event,
                    });
                }
                for completion in done {
                    let Some(l) = live.remove(&completion.id) else { continue };
                    finish(1);
                    metrics::counter!(m::GENERATED_TOKENS).increment(completion.tokens.len() as u64);
                    metrics::counter!(m::PROMPT_TOKENS).increment(completion.stats.prompt_tokens as u64);
                    let _ = l.sender.send(GenEvent::Done {
                        choice: l.choice,
                        completion,
                    });
                }
            }
            Err(e) => {
                // A step that failed (a token the tokenizer cannot decode) fails every
                // sequence in it; the engine is emptied and goes on with new requests.
                let message = format!("generation failed: {e}");
                for (id, l) in live.drain() {
                    engine.remove(id);
                    finish(1);
                    let _ = l.sender.send(GenEvent::Failed(message.clone()));
                }
            }
        }
    }
}
