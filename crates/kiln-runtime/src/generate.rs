//! Autoregressive text generation with a KV cache, temperature, top-k and top-p.
//!
//! The prompt is run once through the model filling the cache ("prefill"); each new
//! token then costs one forward pass of a single position. When the cache is full the
//! window slides: the cache is refilled from the last half-context of tokens and
//! generation goes on.

use std::time::Instant;

use burn::prelude::*;
use kiln_data::SplitMix64;
use kiln_models::CausalLm;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), GenerateError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(GenerateError::Sampling(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(GenerateError::Sampling("--top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(GenerateError::Sampling(format!("--top-p {p} must be in (0, 1]")));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty: give at least one token (e.g. --prompt \"\\n\")")]
    EmptyPrompt,
    #[error("the prompt is {len} tokens long, longer than the model's context of {context} tokens")]
    PromptTooLong { len: usize, context: usize },
    #[error("{0}")]
    Sampling(String),
}

/// Timings of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Time to the first new token (prompt processing).
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

/// Logits of the last position of `logits` `[1, T, V]`, on the host.
fn last_logits(logits: Tensor<3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits
        .slice(s![.., t - 1..t, ..])
        .reshape([v])
        .into_data()
        .try_into_vec::<f32>()
        .expect("logits are f32")
}

/// Choose a token from `logits` (modified in place).
pub fn sample(logits: &mut [f32], sampling: &Sampling, rng: &mut SplitMix64) -> u32 {
    if sampling.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / sampling.temperature as f32;
    logits.iter_mut().for_each(|l| *l *= inv_t);
    // Candidate ids sorted by logit, descending; top-k keeps the first k.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    if let Some(k) = sampling.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0] as usize];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    // Top-p: the smallest prefix whose probability reaches p.
    if let Some(top_p) = sampling.top_p {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return order[i];
        }
    }
    *order.last().expect("at least one candidate")
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn tokens_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` with each as it
/// comes. `use_cache = false` re-runs the whole (windowed) sequence for every token,
/// the reference the cached path is tested against.
pub fn generate<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    use_cache: bool,
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
    let mut rng = SplitMix64::new(sampling.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = use_cache.then(|| model.new_cache(1, device));
    let started = Instant::now();
    let mut first_token_at = None;
    // Logits for the next token.
    let mut logits = match cache.as_mut() {
        Some(cache) => model.forward_cached(tokens_tensor(prompt, device), cache),
        None => model.forward(tokens_tensor(prompt, device)),
    };
    for i in 0..max_new {
        let mut host = last_logits(logits);
        let next = sample(&mut host, sampling, &mut rng);
        tokens.push(next);
        on_token(next);
        if i == 0 {
            first_token_at = Some(started.elapsed().as_secs_f64());
        }
        if i + 1 == max_new {
            break;
        }
        logits = match cache.as_mut() {
            Some(cache) if cache.len() < cache.capacity() => {
                model.forward_cached(tokens_tensor(&[next], device), cache)
            }
            Some(cache) => {
                // Window full: refill from the last half-context of tokens.
                cache.clear();
                let keep = (context / 2).max(1);
                model.forward_cached(tokens_tensor(&tokens[tokens.len() - keep..], device), cache)
            }
            None => {
                let window = &tokens[tokens.len().saturating_sub(context)..];
                model.forward(tokens_tensor(window, device))
            }
        };
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
