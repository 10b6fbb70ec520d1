//! What the training loop trains: a model, its batches, its loss and its evaluation.
//! One implementation per kind of model; `train` and `finetune` share them.

use burn::module::Module;
use burn::prelude::*;
use kiln_data::{
    ClassBatch, EncodedSplit, EpochSampler, ImageBatch, ImageDataset, SplitMix64, TextDataset, TokenBatch,
};
use kiln_infer::classify::{argmax, predict};
use kiln_infer::engine::{GenerationStats, generate};
use kiln_infer::sampler::Sampling;
use kiln_models::loss::cross_entropy;
use kiln_models::{BertForSequenceClassification, CausalLm, ImageClassifier};

/// Result of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

pub trait Task {
    type Model: Module + Clone;
    type Batch;

    /// Tokens (or images) in one micro-batch, for throughput.
    fn items_per_batch(&self) -> usize;
    /// Micro-batch `micro` of optimizer step `step`: a pure function of both.
    fn train_batch(&mut self, step: usize, micro: usize, device: &Device) -> Self::Batch;
    /// Scalar training loss `[1]`.
    fn loss(&self, model: &Self::Model, batch: &Self::Batch) -> Tensor<1>;
    /// Evaluate `model` (already in validation mode) on the held-out split.
    fn evaluate(&mut self, model: &Self::Model, device: &Device) -> Evaluation;
    /// Greedy, KV-cached generation from a validation prompt of `prompt_len` tokens until
    /// the context is full, for decode benchmarks; `None` for a model that does not generate.
    fn greedy_decode(&self, model: &Self::Model, prompt_len: usize, device: &Device) -> Option<GenerationStats> {
        let _ = (model, prompt_len, device);
        None
    }
}

/// Next-token prediction on a tokenized corpus.
pub struct LmTask<M> {
    pub data: TextDataset,
    pub batch_size: usize,
    pub context: usize,
    pub seed: u64,
    pub grad_accum: usize,
    pub eval_iters: usize,
    _model: std::marker::PhantomData<M>,
}

impl<M> LmTask<M> {
    pub fn new(
        data: TextDataset,
        batch_size: usize,
        context: usize,
        seed: u64,
        grad_accum: usize,
        eval_iters: usize,
    ) -> Self {
        Self {
            data,
            batch_size,
            context,
            seed,
            grad_accum,
            eval_iters,
            _model: std::marker::PhantomData,
        }
    }
}

/// Salt that separates the evaluation batches' stream from the training stream.
const EVAL_STREAM: u64 = 0xE7A1_0000_0000_0000;

fn lm_loss<M: CausalLm>(model: &M, batch: &TokenBatch) -> Tensor<1> {
    let logits = model.forward(batch.inputs.clone());
    let [b, t, v] = logits.dims();
    cross_entropy(logits.reshape([b * t, v]), batch.targets.clone().reshape([b * t]))
}

impl<M: CausalLm + Module + Clone> Task for LmTask<M> {
    type Model = M;
    type Batch = TokenBatch;

    fn items_per_batch(&self) -> usize {
        self.batch_size * self.context
    }

    fn train_batch(&mut self, step: usize, micro: usize, device: &Device) -> TokenBatch {
        let mut rng = SplitMix64::derive(self.seed, (step * self.grad_accum + micro) as u64);
        TextDataset::sample(&self.data.train, self.batch_size, self.context, &mut rng, device)
    }

    fn loss(&self, model: &M, batch: &TokenBatch) -> Tensor<1> {
        lm_loss(model, batch)
    }

    /// Mean loss over `eval_iters` fixed validation batches (the same ones every time).
    fn evaluate(&mut self, model: &M, device: &Device) -> Evaluation {
        let mut total = 0.0;
        for i in 0..self.eval_iters {
            let mut rng = SplitMix64::derive(self.seed ^ EVAL_STREAM, i as u64);
            let batch = TextDataset::sample(&self.data.val, self.batch_size, self.context, &mut rng, device);
            total += lm_loss(model, &batch).into_scalar::<f32>() as f64;
        }
        Evaluation {
            loss: total / self.eval_iters as f64,
            accuracy: None,
        }
    }

    fn greedy_decode(&self, model: &M, prompt_len: usize, device: &Device) -> Option<GenerationStats> {
        if self.context < 2 {
            return None; // no room for a prompt and a new token
        }
        let prompt_len = prompt_len.clamp(1, self.context - 1);
        let prompt = &self.data.val[..prompt_len];
        let new_tokens = self.context - prompt_len;
        let (_, stats) = generate(model, prompt, new_tokens, &Sampling::greedy(), true, device, |_| {})
            .expect("a validation prompt shorter than the context");
        Some(stats)
    }
}

/// Image classification on an IDX dataset.
pub struct ImageTask<M> {
    pub data: ImageDataset,
    pub batch_size: usize,
    pub grad_accum: usize,
    sampler: EpochSampler,
    indices: Vec<usize>,
    _model: std::marker::PhantomData<M>,
}

impl<M> ImageTask<M> {
    pub fn new(data: ImageDataset, batch_size: usize, seed: u64, grad_accum: usize) -> Self {
        let sampler = EpochSampler::new(seed, data.train.len());
        Self {
            data,
            batch_size,
            grad_accum,
            sampler,
            indices: Vec::with_capacity(batch_size),
            _model: std::marker::PhantomData,
        }
    }
}

impl<M: ImageClassifier + Module + Clone> Task for ImageTask<M> {
    type Model = M;
    type Batch = ImageBatch;

    fn items_per_batch(&self) -> usize {
        self.batch_size
    }

    fn train_batch(&mut self, step: usize, micro: usize, device: &Device) -> ImageBatch {
        self.sampler
            .indices(step * self.grad_accum + micro, self.batch_size, &mut self.indices);
        self.data.train.batch(&self.indices, device)
    }

    fn loss(&self, model: &M, batch: &ImageBatch) -> Tensor<1> {
        cross_entropy(model.forward(batch.images.clone()), batch.labels.clone())
    }

    /// Loss and accuracy over the whole test split.
    fn evaluate(&mut self, model: &M, device: &Device) -> Evaluation {
        let n = self.data.test.len();
        let chunk = 500;
        let (mut loss, mut correct) = (0.0, 0usize);
        let mut indices = Vec::with_capacity(chunk);
        for start in (0..n).step_by(chunk) {
            indices.clear();
            indices.extend(start..(start + chunk).min(n));
            let batch = self.data.test.batch(&indices, device);
            let logits = model.forward(batch.images);
            let predicted = logits.clone().argmax(1).reshape([indices.len()]);
            correct += predicted.equal(batch.labels.clone()).int().sum().into_scalar::<i64>() as usize;
            loss += cross_entropy(logits, batch.labels).into_scalar::<f32>() as f64 * indices.len() as f64;
        }
        Evaluation {
            loss: loss / n as f64,
            accuracy: Some(correct as f64 / n as f64),
        }
    }
}

/// Sequence classification of labelled texts with an encoder and a head.
pub struct ClassifyTask {
    pub train: EncodedSplit,
    /// The split [`evaluate`](Task::evaluate) scores (validation).
    pub eval: EncodedSplit,
    pub batch_size: usize,
    pub grad_accum: usize,
    sampler: EpochSampler,
    indices: Vec<usize>,
}

impl ClassifyTask {
    pub fn new(train: EncodedSplit, eval: EncodedSplit, batch_size: usize, seed: u64, grad_accum: usize) -> Self {
        let sampler = EpochSampler::new(seed, train.len());
        Self {
            train,
            eval,
            batch_size,
            grad_accum,
            sampler,
            indices: Vec::with_capacity(batch_size),
        }
    }

    /// Optimizer steps in one pass over the training split.
    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.batch_size * self.grad_accum)
    }
}

/// Accuracy, macro-averaged F1 and per-class F1 of predictions against labels.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassMetrics {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub f1: Vec<f64>,
}

impl ClassMetrics {
    pub fn new(predicted: &[usize], labels: &[usize], num_classes: usize) -> Self {
        let n = labels.len();
        let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        let f1: Vec<f64> = (0..num_classes)
            .map(|c| {
                let tp = predicted
                    .iter()
                    .zip(labels)
                    .filter(|&(&p, &l)| p == c && l == c)
                    .count() as f64;
                let fp = predicted
                    .iter()
                    .zip(labels)
                    .filter(|&(&p, &l)| p == c && l != c)
                    .count() as f64;
                let fn_ = predicted
                    .iter()
                    .zip(labels)
                    .filter(|&(&p, &l)| p != c && l == c)
                    .count() as f64;
                if tp == 0.0 {
                    0.0
                } else {
                    2.0 * tp / (2.0 * tp + fp + fn_)
                }
            })
            .collect();
        Self {
            n,
            accuracy: correct as f64 / n.max(1) as f64,
            macro_f1: f1.iter().sum::<f64>() / num_classes.max(1) as f64,
            f1,
        }
    }
}

impl Task for ClassifyTask {
    type Model = BertForSequenceClassification;
    type Batch = ClassBatch;

    fn items_per_batch(&self) -> usize {
        self.batch_size
    }

    fn train_batch(&mut self, step: usize, micro: usize, device: &Device) -> ClassBatch {
        self.sampler
            .indices(step * self.grad_accum + micro, self.batch_size, &mut self.indices);
        self.train.batch(&self.indices, device)
    }

    fn loss(&self, model: &BertForSequenceClassification, batch: &ClassBatch) -> Tensor<1> {
        cross_entropy(
            model.forward(batch.ids.clone(), batch.mask.clone()),
            batch.labels.clone(),
        )
    }

    /// Loss and accuracy over the whole validation split.
    fn evaluate(&mut self, model: &BertForSequenceClassification, device: &Device) -> Evaluation {
        let (probs, loss) = predict(model, &self.eval, 64, device);
        let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
        let metrics = ClassMetrics::new(&predicted, &self.eval.labels, model.num_classes());
        Evaluation {
            loss: loss / self.eval.len().max(1) as f64,
            accuracy: Some(metrics.accuracy),
        }
    }
}
