//! The generation engine: many sequences at once through one model, with a KV cache per
//! sequence, per-sequence sampling and stop conditions, and a step API a server drives.
//!
//! Each step (1) admits waiting sequences up to `max_batch`, (2) runs prompt chunks
//! ("prefill") of the sequences still reading long prompts, up to `prefill_chunk`
//! tokens in all (chunk boundaries fixed per prompt, so a long prompt never stalls the
//! others for more than a chunk, and short ones arriving together all start in one
//! step), and (3) runs one batched forward pass ([`CausalLm::forward_chunks`]) over
//! every running sequence's next token and the whole of each new prompt of at most
//! `step_prompt` tokens: linear layers over all rows at once, each row attending over
//! its own sequence's cache up to its own position. A server's requests are mostly
//! short prompts arriving while others decode; in their own forward pass each paid for
//! a pass over the weights and a few hundred small ops, where inside the step they share
//! one. (A model without that pass prefills them alone and decodes through
//! [`CausalLm::forward_step`].) A sequence's tokens depend only on its prompt, its
//! settings and its own random stream, not on what it is batched with. Finished or
//! removed sequences leave at once and their caches are reused.

use std::collections::VecDeque;
use std::time::Instant;

use burn::prelude::*;
use kiln_data::Tokenizer;
use kiln_models::{CausalLm, KvCache};

use crate::detokenizer::{Detokenizer, StopScan, StopStrings};
use crate::sampler::{Sampler, Sampling, SamplingError};

/// Why a sequence stopped (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What to do when a sequence fills the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextFull {
    /// Finish with [`FinishReason::Length`].
    #[default]
    Stop,
    /// Slide the window: refill the cache from the last half-context and go on.
    Slide,
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end the sequence (not part of the output).
    pub eos_token_ids: Vec<u32>,
    /// Texts that end the sequence (not part of the output text); needs a tokenizer.
    pub stop_strings: Vec<String>,
    /// Report each generated token's log-probability under the model (its raw
    /// distribution, before temperature, top-k and top-p) and this many of the most
    /// likely alternatives (`Some(0)`: the chosen token's only).
    pub logprobs: Option<usize>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize, sampling: Sampling) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: None,
        }
    }
}

/// A request that cannot run; says why.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty: give at least one token (e.g. --prompt \"\\n\")")]
    EmptyPrompt,
    #[error("the prompt is {len} tokens long, longer than the model's context of {context} tokens")]
    PromptTooLong { len: usize, context: usize },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("stop strings need the model's tokenizer")]
    StopWithoutTokenizer,
    #[error("decoding generated tokens: {0}")]
    Detokenize(#[from] kiln_data::DataError),
}

/// [`EngineConfig::step_prompt`]'s default.
pub const STEP_PROMPT: usize = 64;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Prompt tokens per chunk, and most prompt tokens run in one step (several
    /// prompts' chunks while they fit, at least one chunk).
    pub prefill_chunk: usize,
    /// Prompts of at most this many tokens run inside the step's one batched pass
    /// ([`CausalLm::forward_chunks`]): their rows share the weights' pass with the
    /// decoding sequences' instead of a forward pass of their own. Longer prompts
    /// prefill in chunks. Which way a prompt goes depends on its length only, so a
    /// sequence computes the same alone as in any batch.
    pub step_prompt: usize,
    pub context_full: ContextFull,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 512,
            step_prompt: STEP_PROMPT,
            context_full: ContextFull::Stop,
        }
    }
}

/// A sequence's handle, unique within one engine.
pub type SeqId = u64;

/// A token generated by one step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: SeqId,
    pub token: u32,
    /// Text this token completes (with a tokenizer; may be empty).
    pub text: String,
    /// Set on the sequence's last event.
    pub finished: Option<FinishReason>,
    /// With [`Request::logprobs`], for a generated token (not an end-of-sequence one).
    pub logprobs: Option<TokenLogprobs>,
}

/// A generated token's log-probability and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token, log-probability)`, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The log-softmax of `logits` at `token`, with the `top` most likely entries.
    pub fn of(logits: &[f32], token: u32, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let top = top.min(order.len());
        if top > 0 && top < order.len() {
            order.select_nth_unstable_by(top - 1, by_logit);
        }
        order.truncate(top);
        order.sort_unstable_by(by_logit);
        Self {
            logprob: lp(token as usize),
            top: order.into_iter().map(|i| (i, lp(i as usize))).collect(),
        }
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Time from the request's admission to its first new token (prompt processing).
    pub prefill_s: f64,
    /// Time for the remaining tokens.
    pub decode_s: f64,
}

impl GenerationStats {
    /// Decode throughput: new tokens after the first, per second.
    pub fn tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.new_tokens.saturating_sub(1) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// A finished sequence.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: SeqId,
    /// Generated tokens (without an end-of-sequence token).
    pub tokens: Vec<u32>,
    /// Their text, cut before a stop string (with a tokenizer).
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop_string: Option<String>,
    /// Whether it was removed before it finished.
    pub cancelled: bool,
    pub stats: GenerationStats,
}

/// A sequence in the engine.
struct Sequence {
    id: SeqId,
    request: Request,
    sampler: Sampler,
    cache: Option<KvCache>,
    /// Prompt tokens already run.
    prefilled: usize,
    /// Every token so far (prompt, then generated).
    tokens: Vec<u32>,
    /// Generated, kept in the output.
    generated: Vec<u32>,
    /// The last sampled token, not yet run through the model.
    pending: Option<u32>,
    detok: Option<Detokenizer>,
    stops: StopStrings,
    text: String,
    admitted: Instant,
    first_token: Option<f64>,
    finished: Option<(FinishReason, Option<String>)>,
    /// [`ContextFull::Slide`]: a full window slides instead of finishing.
    slide: bool,
}

/// The generation engine over one causal language model on one device.
pub struct Engine<'a, M: CausalLm + ?Sized> {
    model: &'a M,
    device: Device,
    tokenizer: Option<&'a Tokenizer>,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    spare_caches: Vec<KvCache>,
    next_id: SeqId,
}

impl<'a, M: CausalLm + ?Sized> Engine<'a, M> {
    pub fn new(model: &'a M, device: &Device, tokenizer: Option<&'a Tokenizer>, config: EngineConfig) -> Self {
        Self {
            model,
            device: device.clone(),
            tokenizer,
            config: EngineConfig {
                max_batch: config.max_batch.max(1),
                prefill_chunk: config.prefill_chunk.max(1),
                ..config
            },
            waiting: VecDeque::new(),
            running: Vec::new(),
            spare_caches: Vec::new(),
            next_id: 0,
        }
    }

    /// Allocate the KV caches of `slots` sequences now (a server's `max_batch`), so that
    /// requests reuse them instead of allocating as they arrive.
    pub fn preallocate(&mut self, slots: usize) {
        while self.spare_caches.len() + self.running.len() < slots {
            self.spare_caches.push(self.model.new_cache(1, &self.device));
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Sequences admitted and not finished.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queue `request`; it joins the running batch at the next step with a free slot.
    pub fn add(&mut self, request: Request) -> Result<SeqId, GenerateError> {
        check_request(&request, self.model.context_len(), self.tokenizer.is_some())?;
        let id = self.next_id;
        self.next_id += 1;
        let finished = (request.max_new_tokens == 0).then_some((FinishReason::Length, None));
        self.waiting.push_back(Sequence {
            id,
            sampler: Sampler::new(request.sampling.clone()),
            cache: None,
            prefilled: 0,
            tokens: request.prompt.clone(),
            generated: Vec::new(),
            pending: None,
            detok: self.tokenizer.map(|_| Detokenizer::new()),
            stops: StopStrings::new(request.stop_strings.clone()),
            text: String::new(),
            admitted: Instant::now(),
            first_token: None,
            finished,
            slide: self.config.context_full == ContextFull::Slide,
            request,
        });
        Ok(id)
    }

    /// Remove a sequence mid-flight (a cancelled request); its cache is freed at once.
    pub fn remove(&mut self, id: SeqId) -> Option<Completion> {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let seq = self.waiting.remove(i).expect("index found");
            return Some(self.complete(seq, true));
        }
        let i = self.running.iter().position(|s| s.id == id)?;
        let seq = self.running.swap_remove(i);
        Some(self.complete(seq, true))
    }

    /// One engine step: admit, run one prefill chunk, decode one token for every running
    /// sequence. Returns the tokens generated and the sequences that finished.
    pub fn step(&mut self) -> Result<(Vec<TokenEvent>, Vec<Completion>), GenerateError> {
        // Admit.
        while self.running.len() < self.config.max_batch {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            seq.admitted = Instant::now();
            if seq.finished.is_none() {
                seq.cache = Some(
                    self.spare_caches
                        .pop()
                        .unwrap_or_else(|| self.model.new_cache(1, &self.device)),
                );
            }
            self.running.push(seq);
        }
        let mut events = Vec::new();
        // Prefill: the sequences still reading their prompts, in admission order, up to
        // `prefill_chunk` tokens in all (at least one prompt or chunk). A prompt of at
        // most `step_prompt` tokens joins the batched step below whole; a longer one
        // runs here in chunks whose boundaries depend only on its own length.
        let mut budget = self.config.prefill_chunk;
        let mut ran_one = false;
        let mut whole = vec![false; self.running.len()];
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.finished.is_some() || seq.prefilled >= seq.request.prompt.len() {
                continue;
            }
            let in_step = seq.prefilled == 0 && seq.request.prompt.len() <= self.config.step_prompt;
            let end = (seq.prefilled + self.config.prefill_chunk).min(seq.request.prompt.len());
            let n = if in_step {
                seq.request.prompt.len()
            } else {
                end - seq.prefilled
            };
            if ran_one && n > budget {
                break;
            }
            ran_one = true;
            budget = budget.saturating_sub(n);
            if in_step {
                whole[i] = true;
            } else {
                let chunk = tokens_tensor(&seq.request.prompt[seq.prefilled..end], &self.device);
                let cache = seq.cache.as_mut().expect("admitted");
                let logits = self.model.forward_cached_last(chunk, cache);
                seq.prefilled = end;
                if end == seq.request.prompt.len() {
                    let (token, lp) = sample(seq, last_row_logits(logits));
                    events.push(accept(seq, token, lp, self.tokenizer, self.model.context_len())?);
                }
            }
            if budget == 0 {
                break;
            }
        }
        // Decode: every sequence with a pending token, batched; full windows slide alone.
        let context = self.model.context_len();
        for seq in self.running.iter_mut() {
            if seq.finished.is_some() {
                continue;
            }
            let Some(token) = seq.pending else { continue };
            let cache = seq.cache.as_mut().expect("admitted");
            if cache.len() < cache.capacity() {
                continue;
            }
            // Window full (only with ContextFull::Slide): refill from the last half-context.
            cache.clear();
            let keep = (context / 2).max(1);
            let window = &seq.tokens[seq.tokens.len() - keep..];
            let logits = self
                .model
                .forward_cached_last(tokens_tensor(window, &self.device), cache);
            debug_assert_eq!(seq.tokens.last(), Some(&token));
            seq.pending = None;
            let (next, lp) = sample(seq, last_row_logits(logits));
            events.push(accept(seq, next, lp, self.tokenizer, context)?);
        }
        // One batched pass: the whole short prompts and every pending token, each
        // sequence over its own cache (`forward_chunks`); where the model has no such
        // pass, the prompts run alone and the tokens through `forward_step`.
        let step_rows = |running: &[Sequence], whole: &[bool]| -> Vec<(usize, Vec<u32>)> {
            running
                .iter()
                .enumerate()
                .filter(|(_, seq)| seq.finished.is_none())
                .filter_map(|(i, seq)| {
                    if whole[i] {
                        Some((i, seq.request.prompt.clone()))
                    } else {
                        seq.pending.map(|token| (i, vec![token]))
                    }
                })
                .collect()
        };
        let rows = step_rows(&self.running, &whole);
        if !rows.is_empty() {
            let chunks: Vec<&[u32]> = rows.iter().map(|(_, chunk)| chunk.as_slice()).collect();
            let indices: Vec<usize> = rows.iter().map(|&(i, _)| i).collect();
            let logits = self
                .model
                .forward_chunks(&chunks, &mut caches_of(&mut self.running, &indices));
            match logits {
                Some(logits) => {
                    let (host, v) = host_logits(logits);
                    for (row, &i) in indices.iter().enumerate() {
                        let seq = &mut self.running[i];
                        if whole[i] {
                            seq.prefilled = seq.request.prompt.len();
                        } else {
                            seq.pending = None;
                        }
                        let (token, lp) = sample(seq, host[row * v..(row + 1) * v].to_vec());
                        events.push(accept(seq, token, lp, self.tokenizer, context)?);
                    }
                }
                None => {
                    for (i, seq) in self.running.iter_mut().enumerate() {
                        if !whole[i] {
                            continue;
                        }
                        let prompt = tokens_tensor(&seq.request.prompt, &self.device);
                        let logits = self
                            .model
                            .forward_cached_last(prompt, seq.cache.as_mut().expect("admitted"));
                        seq.prefilled = seq.request.prompt.len();
                        let (token, lp) = sample(seq, last_row_logits(logits));
                        events.push(accept(seq, token, lp, self.tokenizer, context)?);
                    }
                    whole.fill(false);
                    let indices: Vec<usize> = step_rows(&self.running, &whole).into_iter().map(|(i, _)| i).collect();
                    if !indices.is_empty() {
                        self.decode_step(&indices, &mut events)?;
                    }
                }
            }
        }
        // Leave.
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished.is_some() {
                let seq = self.running.swap_remove(i);
                done.push(self.complete(seq, false));
            } else {
                i += 1;
            }
        }
        done.sort_by_key(|c| c.id);
        Ok((events, done))
    }

    /// The pending tokens of the running sequences at `indices` (in increasing order)
    /// through [`CausalLm::forward_step`], one token each.
    fn decode_step(&mut self, indices: &[usize], events: &mut Vec<TokenEvent>) -> Result<(), GenerateError> {
        let context = self.model.context_len();
        let ids: Vec<i64> = indices
            .iter()
            .map(|&i| self.running[i].pending.take().expect("pending") as i64)
            .collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [indices.len(), 1]), &self.device);
        let logits = self
            .model
            .forward_step(tokens, &mut caches_of(&mut self.running, indices));
        let (host, v) = host_logits(logits);
        for (row, &i) in indices.iter().enumerate() {
            let seq = &mut self.running[i];
            let (token, lp) = sample(seq, host[row * v..(row + 1) * v].to_vec());
            events.push(accept(seq, token, lp, self.tokenizer, context)?);
        }
        Ok(())
    }

    /// Step until every sequence has finished. `on_event` sees every token as it comes
    /// and returns `false` to cancel that sequence (removed when the step's events have
    /// been seen, before the next step).
    pub fn run(&mut self, mut on_event: impl FnMut(&TokenEvent) -> bool) -> Result<Vec<Completion>, GenerateError> {
        let mut out = Vec::new();
        while !self.is_idle() {
            let (events, done) = self.step()?;
            out.extend(done);
            for event in &events {
                if !on_event(event) && event.finished.is_none() {
                    out.extend(self.remove(event.id));
                }
            }
        }
        out.sort_by_key(|c| c.id);
        Ok(out)
    }

    fn complete(&mut self, mut seq: Sequence, cancelled: bool) -> Completion {
        if let Some(mut cache) = seq.cache.take() {
            cache.clear();
            self.spare_caches.push(cache);
        }
        let total = seq.admitted.elapsed().as_secs_f64();
        let prefill_s = seq.first_token.unwrap_or(total);
        let (finish_reason, stop_string) = seq.finished.take().unwrap_or((FinishReason::Length, None));
        Completion {
            id: seq.id,
            stats: GenerationStats {
                prompt_tokens: seq.request.prompt.len(),
                new_tokens: seq.generated.len(),
                prefill_s,
                decode_s: total - prefill_s,
            },
            tokens: seq.generated,
            text: seq.detok.map(|_| seq.text),
            finish_reason,
            stop_string,
            cancelled,
        }
    }
}

/// Logits `[..., V]` on the host, row-major, and `V`.
fn host_logits<const D: usize>(logits: Tensor<D>) -> (Vec<f32>, usize) {
    let v = logits.dims()[D - 1];
    let host = logits.into_data().try_into_vec::<f32>().expect("logits are f32");
    (host, v)
}

/// The caches of `running[i]` for each of `indices` (increasing, distinct), borrowed
/// together for one batched forward pass.
fn caches_of<'s>(running: &'s mut [Sequence], indices: &[usize]) -> Vec<&'s mut KvCache> {
    let mut caches = Vec::with_capacity(indices.len());
    let mut rest = running;
    let mut offset = 0;
    for &i in indices {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
        let (seq, tail) = tail.split_first_mut().expect("row in range");
        caches.push(seq.cache.as_mut().expect("admitted"));
        rest = tail;
        offset = i + 1;
    }
    caches
}

/// Sample `seq`'s next token from its logits (with their log-probabilities when asked).
fn sample(seq: &mut Sequence, mut logits: Vec<f32>) -> (u32, Option<TokenLogprobs>) {
    let Some(top) = seq.request.logprobs else {
        return (seq.sampler.sample(&mut logits), None);
    };
    // The sampler scales its logits in place; the log-probabilities are the model's own.
    let token = seq.sampler.sample(&mut logits.clone());
    (token, Some(TokenLogprobs::of(&logits, token, top)))
}

/// Whether [`Engine::add`] takes `request` for a model of `context` tokens (with or
/// without a tokenizer): what a server checks before it queues one.
pub fn check_request(request: &Request, context: usize, has_tokenizer: bool) -> Result<(), GenerateError> {
    request.sampling.validate()?;
    if request.prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if request.prompt.len() > context {
        return Err(GenerateError::PromptTooLong {
            len: request.prompt.len(),
            context,
        });
    }
    if !request.stop_strings.is_empty() && !has_tokenizer {
        return Err(GenerateError::StopWithoutTokenizer);
    }
    Ok(())
}

/// Take `token` as `seq`'s next: check the stop conditions, stream its text.
fn accept(
    seq: &mut Sequence,
    token: u32,
    logprobs: Option<TokenLogprobs>,
    tokenizer: Option<&Tokenizer>,
    context: usize,
) -> Result<TokenEvent, GenerateError> {
    if seq.first_token.is_none() {
        seq.first_token = Some(seq.admitted.elapsed().as_secs_f64());
    }
    let mut event = TokenEvent {
        id: seq.id,
        token,
        text: String::new(),
        finished: None,
        logprobs: None,
    };
    if seq.request.eos_token_ids.contains(&token) {
        seq.finished = Some((FinishReason::Stop, None));
        event.finished = Some(FinishReason::Stop);
        if let (Some(detok), Some(tok)) = (seq.detok.as_mut(), tokenizer) {
            let rest = detok.finish(tok)?;
            event.text = seq.stops.push_final(&rest);
            seq.text += &event.text;
        }
        return Ok(event);
    }
    event.logprobs = logprobs;
    seq.generated.push(token);
    seq.tokens.push(token);
    if let (Some(detok), Some(tok)) = (seq.detok.as_mut(), tokenizer) {
        let piece = detok.push(tok, token)?;
        match seq.stops.push(&piece) {
            StopScan::Continue(text) => event.text = text,
            StopScan::Stopped { text, stop } => {
                event.text = text;
                seq.text += &event.text;
                seq.finished = Some((FinishReason::Stop, Some(stop)));
                event.finished = Some(FinishReason::Stop);
                return Ok(event);
            }
        }
        seq.text += &event.text;
    }
    // The token can be run through the model only while the cache has room for it.
    let cache_full = seq.tokens.len() > context;
    if seq.generated.len() >= seq.request.max_new_tokens {
        seq.finished = Some((FinishReason::Length, None));
    } else if cache_full && !seq.slide {
        seq.finished = Some((FinishReason::Length, None));
    } else {
        seq.pending = Some(token);
    }
    if seq.finished.is_some() {
        event.finished = Some(FinishReason::Length);
        if let (Some(detok), Some(tok)) = (seq.detok.as_mut(), tokenizer) {
            let rest = detok.finish(tok)?;
            let tail = seq.stops.push_final(&rest);
            event.text += &tail;
            seq.text += &tail;
        }
    }
    Ok(event)
}

fn tokens_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Logits of the last position of `logits` `[1, T, V]`, on the host.
fn last_row_logits(logits: Tensor<3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits
        .slice(s![.., t - 1..t, ..])
        .reshape([v])
        .into_data()
        .try_into_vec::<f32>()
        .expect("logits are f32")
}

/// Generate up to `max_new` tokens after `prompt` (one sequence, no stop conditions),
/// calling `on_token` with each as it comes; a full context slides. With `use_cache` this
/// is the [`Engine`] with one sequence; without, every token re-runs the whole (windowed)
/// sequence: the reference the cached path is tested against.
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    use_cache: bool,
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats), GenerateError> {
    if !use_cache {
        return generate_uncached(model, prompt, max_new, sampling, device, on_token);
    }
    let config = EngineConfig {
        max_batch: 1,
        prefill_chunk: model.context_len(),
        step_prompt: STEP_PROMPT,
        context_full: ContextFull::Slide,
    };
    let mut engine = Engine::new(model, device, None, config);
    engine.add(Request::new(prompt.to_vec(), max_new, sampling.clone()))?;
    let done = engine.run(|event| {
        on_token(event.token);
        true
    })?;
    let done = done.into_iter().next().expect("one sequence");
    Ok((done.tokens, done.stats))
}

fn generate_uncached<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    device: &Device,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats), GenerateError> {
    sampling.validate()?;
    let context = model.context_len();
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > context {
        return Err(GenerateError::PromptTooLong {
            len: prompt.len(),
            context,
        });
    }
    let mut sampler = Sampler::new(sampling.clone());
    let mut tokens = prompt.to_vec();
    let started = Instant::now();
    let mut first_token_at = None;
    for _ in 0..max_new {
        let window = &tokens[tokens.len().saturating_sub(context)..];
        let mut host = last_row_logits(model.forward(tokens_tensor(window, device)));
        let next = sampler.sample(&mut host);
        tokens.push(next);
        on_token(next);
        first_token_at.get_or_insert_with(|| started.elapsed().as_secs_f64());
    }
    let total = started.elapsed().as_secs_f64();
    let prefill_s = first_token_at.unwrap_or(total);
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        new_tokens: max_new,
        prefill_s,
        decode_s: total - prefill_s,
    };
    Ok((tokens.split_off(prompt.len()), stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_with_the_most_likely_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lse = (1f64.exp() + 3f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let lp = TokenLogprobs::of(&logits, 2, 3);
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6, "{lp:?}");
        // Ties keep the lower id first.
        let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
        let total: f64 = (0..4)
            .map(|t| (TokenLogprobs::of(&logits, t, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(TokenLogprobs::of(&logits, 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::of(&logits, 0, 10).top.len(), 4);
    }
}
