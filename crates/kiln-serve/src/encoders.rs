//! The encoder worker: embeddings and text classification on their own thread, with
//! concurrent requests batched dynamically. The worker takes every request waiting
//! when it is free, up to a token budget per batch, sorts their texts by length (less
//! padding) and runs them together; each request gets its own rows back.

use std::collections::VecDeque;
use std::sync::mpsc;

use burn::prelude::Device;
use kiln_data::Tokenizer;
use kiln_infer::classify::classify_texts;
use kiln_infer::embed::embed_texts;
use kiln_models::{Encoder, SequenceClassifier};
use tokio::sync::oneshot;

use crate::metrics as m;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Embed,
    Classify,
}

/// Texts to embed or classify.
pub struct EncodeJob {
    pub texts: Vec<String>,
    pub task: Task,
    pub reply: oneshot::Sender<Result<Encoded, String>>,
}

/// A job's result: one row per text (an embedding, or class probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub rows: Vec<Vec<f32>>,
    /// Tokens the texts were (special tokens included).
    pub tokens: usize,
}

/// The model a worker runs.
pub enum EncoderModel<'a> {
    Encoder(&'a dyn Encoder),
    /// A fine-tuned classifier (it embeds with its encoder too), with the longest input
    /// it was trained on.
    Classifier(&'a dyn SequenceClassifier, usize),
}

impl EncoderModel<'_> {
    fn encoder(&self) -> &dyn Encoder {
        match self {
            Self::Encoder(e) => *e,
            Self::Classifier(c, _) => c.encoder(),
        }
    }
}

/// A job checked and counted, waiting for its batch.
struct Pending {
    job: EncodeJob,
    lengths: Vec<usize>,
}

/// The worker loop; returns when every sender is dropped.
pub fn run(
    model: EncoderModel<'_>,
    tokenizer: &Tokenizer,
    device: &Device,
    batch_tokens: usize,
    jobs: mpsc::Receiver<EncodeJob>,
) {
    let max_positions = model.encoder().max_positions();
    let mut held: VecDeque<Pending> = VecDeque::new();
    // Count a job's tokens; a job that cannot run is answered here, alone.
    let check = |job: EncodeJob| -> Option<Pending> {
        let mut lengths = Vec::with_capacity(job.texts.len());
        for (i, text) in job.texts.iter().enumerate() {
            let error = if text.trim().is_empty() {
                Some(format!("input[{i}] is empty"))
            } else {
                match tokenizer.encode_with_special(text) {
                    Ok(ids) if job.task == Task::Embed && ids.len() > max_positions => Some(format!(
                        "input[{i}] is {} tokens long, more than the model's {max_positions} positions",
                        ids.len()
                    )),
                    Ok(ids) => {
                        lengths.push(ids.len());
                        None
                    }
                    Err(e) => Some(format!("input[{i}]: {e}")),
                }
            };
            if let Some(error) = error {
                let _ = job.reply.send(Err(error));
                return None;
            }
        }
        Some(Pending { job, lengths })
    };
    loop {
        if held.is_empty() {
            match jobs.recv() {
                Ok(job) => held.extend(check(job)),
                Err(_) => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            held.extend(check(job));
        }
        let Some(first) = held.pop_front() else { continue };
        // This batch: the first job, then every held job of the same task within budget.
        let task = first.job.task;
        let mut tokens: usize = first.lengths.iter().sum();
        let mut batch = vec![first];
        let mut rest = VecDeque::new();
        while let Some(p) = held.pop_front() {
            let t: usize = p.lengths.iter().sum();
            if p.job.task == task && tokens + t <= batch_tokens {
                tokens += t;
                batch.push(p);
            } else {
                rest.push_back(p);
            }
        }
        held = rest;
        let texts: Vec<&str> = batch
            .iter()
            .flat_map(|p| p.job.texts.iter().map(String::as_str))
            .collect();
        let lengths: Vec<usize> = batch.iter().flat_map(|p| p.lengths.iter().copied()).collect();
        let result = encode(&model, tokenizer, device, task, &texts, &lengths, batch_tokens);
        metrics::counter!(m::ENCODED_TEXTS).increment(texts.len() as u64);
        metrics::counter!(m::ENCODER_BATCHES).increment(1);
        let mut rows = result.map(Vec::into_iter);
        for p in batch {
            let n = p.job.texts.len();
            let reply = match &mut rows {
                Ok(rows) => Ok(Encoded {
                    rows: rows.by_ref().take(n).collect(),
                    tokens: p.lengths.iter().sum(),
                }),
                Err(e) => Err(e.clone()),
            };
            let _ = p.job.reply.send(reply);
        }
    }
}

/// Rows for `texts` in their order, run in length-sorted chunks of at most
/// `batch_tokens` padded tokens.
fn encode(
    model: &EncoderModel<'_>,
    tokenizer: &Tokenizer,
    device: &Device,
    task: Task,
    texts: &[&str],
    lengths: &[usize],
    batch_tokens: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut out = vec![Vec::new(); texts.len()];
    let mut start = 0;
    while start < order.len() {
        // Sorted ascending: a chunk's padded size is its last text's length times its count.
        let mut end = start + 1;
        while end < order.len() && lengths[order[end]] * (end + 1 - start) <= batch_tokens {
            end += 1;
        }
        let chunk: Vec<&str> = order[start..end].iter().map(|&i| texts[i]).collect();
        let rows = match (model, task) {
            (_, Task::Embed) => embed_texts(model.encoder(), tokenizer, &chunk, chunk.len(), device),
            (EncoderModel::Classifier(c, max_len), Task::Classify) => {
                classify_texts(*c, tokenizer, &chunk, *max_len, chunk.len(), device).map(|p| p.probabilities)
            }
            (EncoderModel::Encoder(_), Task::Classify) => {
                return Err("this model has no classification head".into());
            }
        }
        .map_err(|e| e.to_string())?;
        for (&i, row) in order[start..end].iter().zip(rows) {
            out[i] = row;
        }
        start = end;
    }
    Ok(out)
}
