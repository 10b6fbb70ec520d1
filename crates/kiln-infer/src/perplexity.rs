//! Perplexity of a causal language model over a token sequence, computed two ways so
//! that Kiln's figure can be set beside either reference:
//!
//! - [`PerplexityMethod::Sliding`], transformers' guide
//!   (<https://huggingface.co/docs/transformers/perplexity>): windows of `context` tokens
//!   starting every `stride` tokens; each window scores only the tokens the previous one
//!   did not, so every token after the first is scored once, with up to
//!   `context - stride` tokens of history.
//! - [`PerplexityMethod::Chunks`], llama.cpp's `llama-perplexity`: non-overlapping chunks
//!   of `context` tokens, the first token of each replaced by BOS when the model adds
//!   one, scoring the second half of each chunk (tokens `context/2 + 1 ..`).
//!
//! `exp(mean negative log-likelihood)`, the log-likelihoods summed in f64.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use kiln_models::CausalLm;

/// How the sequence is cut into model calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PerplexityMethod {
    Sliding { context: usize, stride: usize },
    Chunks { context: usize },
}

impl std::fmt::Display for PerplexityMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PerplexityMethod::Sliding { context, stride } => write!(
                f,
                "sliding window (transformers' guide): context {context}, stride {stride}"
            ),
            PerplexityMethod::Chunks { context } => write!(
                f,
                "chunks (llama.cpp's llama-perplexity): context {context}, second half of each chunk scored"
            ),
        }
    }
}

/// What was computed, and how.
#[derive(Debug, Clone)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Sum of the negative log-likelihoods of the scored tokens (nats).
    pub nll: f64,
    pub scored: usize,
    pub tokens: usize,
    pub windows: usize,
    /// Whether each window starts with BOS (Chunks with a BOS token).
    pub bos_per_window: bool,
    pub method: PerplexityMethod,
}

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error("--context {context}: {message}")]
    Context { context: usize, message: String },
    #[error("--stride {stride}: {message}")]
    Stride { stride: usize, message: String },
    #[error("the text is {tokens} tokens: {message}")]
    TooShort { tokens: usize, message: String },
}

/// Negative log-likelihoods of `targets[i]` after `window[..=i]`, for `i` in `from..`.
fn window_nll(model: &dyn CausalLm, window: &[u32], from: usize, device: &Device) -> f64 {
    let t = window.len();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(window.iter().map(|&i| i as i64).collect(), [1, t]),
        device,
    );
    // [1, T, V]: position i predicts token i + 1.
    let logits = model.forward(ids).slice(s![.., from..t - 1, ..]);
    let n = t - 1 - from;
    let targets: Vec<i64> = window[from + 1..].iter().map(|&i| i as i64).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [1, n, 1]), device);
    let logp: Vec<f32> = log_softmax(logits, 2)
        .gather(2, targets)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 log-probabilities");
    -logp.iter().map(|&v| v as f64).sum::<f64>()
}

/// The perplexity of `ids` under `model`; `bos` is the token Chunks puts first in each
/// chunk (`None`: the chunks are left as they are).
pub fn perplexity(
    model: &dyn CausalLm,
    ids: &[u32],
    method: PerplexityMethod,
    bos: Option<u32>,
    device: &Device,
) -> Result<Perplexity, PerplexityError> {
    let max = model.context_len();
    let context = match method {
        PerplexityMethod::Sliding { context, .. } | PerplexityMethod::Chunks { context } => context,
    };
    if context < 4 || context > max {
        return Err(PerplexityError::Context {
            context,
            message: format!("must be between 4 and the model's context length {max}"),
        });
    }
    let (mut nll, mut scored, mut windows) = (0.0, 0, 0);
    match method {
        PerplexityMethod::Sliding { stride, .. } => {
            if stride == 0 || stride > context {
                return Err(PerplexityError::Stride {
                    stride,
                    message: format!("must be between 1 and the context {context}"),
                });
            }
            if ids.len() < 2 {
                return Err(PerplexityError::TooShort {
                    tokens: ids.len(),
                    message: "at least 2 are needed".into(),
                });
            }
            let mut prev_end = 0;
            let mut begin = 0;
            loop {
                let end = (begin + context).min(ids.len());
                let fresh = end - prev_end;
                let window = &ids[begin..end];
                // score the last `fresh` targets (all of them in the first window)
                let from = (window.len() - 1).saturating_sub(fresh);
                nll += window_nll(model, window, from, device);
                scored += window.len() - 1 - from;
                windows += 1;
                prev_end = end;
                if end == ids.len() {
                    break;
                }
                begin += stride;
            }
        }
        PerplexityMethod::Chunks { context } => {
            let chunks = ids.len() / context;
            if chunks == 0 {
                return Err(PerplexityError::TooShort {
                    tokens: ids.len(),
                    message: format!("fewer than one chunk of --context {context}"),
                });
            }
            let first = context / 2;
            let mut window = vec![0u32; context];
            for c in 0..chunks {
                window.copy_from_slice(&ids[c * context..(c + 1) * context]);
                if let Some(bos) = bos {
                    window[0] = bos;
                }
                nll += window_nll(model, &window, first, device);
                scored += context - 1 - first;
                windows += 1;
            }
        }
    }
    Ok(Perplexity {
        perplexity: (nll / scored as f64).exp(),
        nll,
        scored,
        tokens: ids.len(),
        windows,
        bos_per_window: matches!(method, PerplexityMethod::Chunks { .. }) && bos.is_some(),
        method,
    })
}
