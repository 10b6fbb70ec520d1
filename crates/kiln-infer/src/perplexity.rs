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
    #[error(
        "the reference model has {reference} tokens in its vocabulary, this model {model}: they must share a tokenizer"
    )]
    Vocabulary { model: usize, reference: usize },
}

/// The windows `method` cuts `ids` into: (tokens, index of the first position scored).
fn windows(
    ids: &[u32],
    method: PerplexityMethod,
    bos: Option<u32>,
    max: usize,
) -> Result<Vec<(Vec<u32>, usize)>, PerplexityError> {
    let context = match method {
        PerplexityMethod::Sliding { context, .. } | PerplexityMethod::Chunks { context } => context,
    };
    if context < 4 || context > max {
        return Err(PerplexityError::Context {
            context,
            message: format!("must be between 4 and the model's context length {max}"),
        });
    }
    let mut out = Vec::new();
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
                out.push((window.to_vec(), from));
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
            for c in 0..chunks {
                let mut window = ids[c * context..(c + 1) * context].to_vec();
                if let Some(bos) = bos {
                    window[0] = bos;
                }
                out.push((window, context / 2));
            }
        }
    }
    Ok(out)
}

/// Log-probabilities `[1, n, V]` of the next token at positions `from..T-1` of `window`,
/// and the targets `[1, n, 1]`.
fn window_logp(model: &dyn CausalLm, window: &[u32], from: usize, device: &Device) -> (Tensor<3>, Tensor<3, Int>) {
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
    (log_softmax(logits, 2), targets)
}

fn f32s<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values")
}

/// The summed negative log-likelihood of the targets.
fn nll(logp: Tensor<3>, targets: Tensor<3, Int>) -> f64 {
    -f32s(logp.gather(2, targets)).iter().map(|&v| v as f64).sum::<f64>()
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
    let windows = windows(ids, method, bos, model.context_len())?;
    let (mut total, mut scored) = (0.0, 0);
    for (window, from) in &windows {
        let (logp, targets) = window_logp(model, window, *from, device);
        total += nll(logp, targets);
        scored += window.len() - 1 - from;
    }
    Ok(summary(total, scored, ids.len(), windows.len(), method, bos))
}

fn summary(
    nll: f64,
    scored: usize,
    tokens: usize,
    windows: usize,
    method: PerplexityMethod,
    bos: Option<u32>,
) -> Perplexity {
    Perplexity {
        perplexity: (nll / scored as f64).exp(),
        nll,
        scored,
        tokens,
        windows,
        bos_per_window: matches!(method, PerplexityMethod::Chunks { .. }) && bos.is_some(),
        method,
    }
}

/// How far a model's next-token distributions are from a reference model's over the
/// same text (llama.cpp's `llama-perplexity --kl-divergence`): at every scored position
/// `KL(reference || model)` in nats and whether the two agree on the most likely token.
#[derive(Debug, Clone)]
pub struct Divergence {
    pub model: Perplexity,
    pub reference: Perplexity,
    pub kl_mean: f64,
    pub kl_median: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Fraction of positions where both models' most likely token is the same.
    pub top1_agreement: f64,
}

/// [`perplexity`] of `model` and of `reference` over the same windows, and the KL
/// divergence between their distributions at every scored position. Both models must
/// share the tokenizer (the vocabulary sizes are checked).
pub fn divergence(
    model: &dyn CausalLm,
    reference: &dyn CausalLm,
    ids: &[u32],
    method: PerplexityMethod,
    bos: Option<u32>,
    device: &Device,
) -> Result<Divergence, PerplexityError> {
    if model.vocab_size() != reference.vocab_size() {
        return Err(PerplexityError::Vocabulary {
            model: model.vocab_size(),
            reference: reference.vocab_size(),
        });
    }
    let windows = windows(ids, method, bos, model.context_len().min(reference.context_len()))?;
    let (mut nll_m, mut nll_r, mut scored) = (0.0, 0.0, 0);
    let (mut kl, mut same) = (Vec::new(), 0usize);
    for (window, from) in &windows {
        let (lm, targets) = window_logp(model, window, *from, device);
        let (lr, _) = window_logp(reference, window, *from, device);
        nll_m += nll(lm.clone(), targets.clone());
        nll_r += nll(lr.clone(), targets);
        // The most likely token at each position.
        let top = |logp: &Tensor<3>| -> Vec<i64> {
            logp.clone()
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .try_to_vec()
                .expect("ids")
        };
        same += top(&lm).iter().zip(&top(&lr)).filter(|(a, b)| a == b).count();
        // KL(r || m) = sum_v p_r (log p_r - log p_m), per position.
        let per_position = (lr.clone().exp() * (lr - lm)).sum_dim(2);
        kl.extend(f32s(per_position).into_iter().map(|v| v as f64));
        scored += window.len() - 1 - from;
    }
    let n = kl.len().max(1);
    let kl_mean = kl.iter().sum::<f64>() / n as f64;
    kl.sort_by(f64::total_cmp);
    let at = |q: f64| {
        kl.get(((kl.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Divergence {
        model: summary(nll_m, scored, ids.len(), windows.len(), method, bos),
        reference: summary(nll_r, scored, ids.len(), windows.len(), method, bos),
        kl_mean,
        kl_median: at(0.5),
        kl_p99: at(0.99),
        kl_max: at(1.0),
        top1_agreement: same as f64 / n as f64,
    })
}
