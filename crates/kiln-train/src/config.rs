//! Run configs: typed TOML, validated at load, with `--set key=value` overrides.
//!
//! ```toml
//! [model]   # kiln_models::ModelConfig, tagged by `arch`
//! [data]    # kiln_data::DataConfig, tagged by `kind`
//! [train]   # TrainConfig
//! [optim]   # OptimConfig
//! ```
//! An unknown key, a wrong type or an impossible value is an error naming the key and
//! the file.

use std::path::Path;

use kiln_core::config::{ConfigError, invalid, parse_toml, read_text};
use kiln_data::DataConfig;
use kiln_models::ModelConfig;
use serde::{Deserialize, Serialize};

fn d_seed() -> u64 {
    1337
}
fn d_one() -> usize {
    1
}
fn d_eval_iters() -> usize {
    20
}
fn d_log_interval() -> usize {
    10
}
fn d_grad_clip() -> f64 {
    1.0
}
fn d_keep() -> usize {
    2
}

/// The `[train]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Sequences (or images) per micro-batch.
    pub batch_size: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum_steps: usize,
    /// Evaluate (and write metrics, plot, best checkpoint) every N steps and at the end.
    pub eval_interval: usize,
    /// Validation batches per evaluation (language models).
    #[serde(default = "d_eval_iters")]
    pub eval_iters: usize,
    /// Write a resumable checkpoint every N steps (0: at evaluations only) and at the end.
    #[serde(default)]
    pub checkpoint_interval: usize,
    /// How many resumable checkpoints to keep.
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Progress-bar refresh interval in steps.
    #[serde(default = "d_log_interval")]
    pub log_interval: usize,
    /// Clip the global gradient norm to this value (0 disables).
    #[serde(default = "d_grad_clip")]
    pub grad_clip: f64,
    /// Tokens per training sequence of a language model (default: the model's whole
    /// context). Fine-tuning a pretrained LLM (context 8k-32k) trains on shorter windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
}

impl TrainConfig {
    /// The training window of a language model whose context is `model_context`: at most
    /// the model's context, at least 2 tokens.
    pub fn lm_context(&self, model_context: usize) -> Result<usize, String> {
        match self.context {
            None => Ok(model_context),
            Some(c) if c < 2 => Err(format!("train.context: {c} must be at least 2")),
            Some(c) if c > model_context => Err(format!(
                "train.context: {c} is longer than the model's context ({model_context})"
            )),
            Some(c) => Ok(c),
        }
    }
}

fn d_lr() -> f64 {
    1e-3
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.99
}
fn d_eps() -> f64 {
    1e-8
}
fn d_wd() -> f64 {
    0.1
}

/// The `[optim]` section: AdamW with linear warmup and cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// The learning rate at the end of the cosine decay (default lr / 10).
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Cosine decay length (default: train.max_steps).
    #[serde(default)]
    pub decay_steps: Option<usize>,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to biases, norms).
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Parameters with their own peak learning rate (e.g. a new head faster than a
    /// pretrained backbone). The same warmup and cosine shape applies, scaled to `lr`.
    /// A parameter matching several groups takes the last one.
    #[serde(default)]
    pub groups: Vec<LrGroup>,
}

/// `[[optim.groups]]`: parameters whose path matches `pattern` (a regex, e.g.
/// `"^classifier\\."`) train at peak learning rate `lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrGroup {
    pub pattern: String,
    pub lr: f64,
}

/// What the training loop needs of a config: its `[train]` and `[optim]` sections.
#[derive(Debug, Clone, Copy)]
pub struct Recipe<'a> {
    pub train: &'a TrainConfig,
    pub optim: &'a OptimConfig,
}

impl Default for OptimConfig {
    fn default() -> Self {
        toml::from_str("").expect("every optim field has a default")
    }
}

/// A whole run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
}

impl OptimConfig {
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }

    /// Learning rate of optimizer step `step` (0-based): linear warmup over
    /// `warmup_steps`, then cosine decay to `min_lr` at `decay_steps`, then flat.
    pub fn lr_at(&self, step: usize, max_steps: usize) -> f64 {
        let decay_steps = self.decay_steps.unwrap_or(max_steps);
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= decay_steps {
            return self.min_lr();
        }
        let progress = (step - self.warmup_steps) as f64 / (decay_steps - self.warmup_steps).max(1) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr() + coeff * (self.lr - self.min_lr())
    }

    /// The learning rate of every parameter at step `step`: [`lr_at`](Self::lr_at) for
    /// all, and for each group the same schedule scaled to its own peak.
    pub fn lr_policy(
        &self,
        step: usize,
        max_steps: usize,
    ) -> burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate {
        use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
        let lr = self.lr_at(step, max_steps);
        let mut policy = ModuleLrScheduler::new(lr);
        for group in &self.groups {
            let params = burn::module::ParamGroup::from_regex(&group.pattern).expect("validated at load");
            policy = policy.with_group(params, lr * group.lr / self.lr);
        }
        policy.step()
    }

    /// Check the values types cannot express; the message starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        let o = self;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(format!("optim.lr: {} must be positive", o.lr));
        }
        if !(o.min_lr() >= 0.0 && o.min_lr() <= o.lr) {
            return Err(format!("optim.min_lr: {} must be in [0, lr]", o.min_lr()));
        }
        if let Some(d) = o.decay_steps
            && d < o.warmup_steps
        {
            return Err(format!(
                "optim.decay_steps: {d} is shorter than warmup_steps = {}",
                o.warmup_steps
            ));
        }
        for (key, b) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(format!("{key}: {b} is not in [0, 1)"));
            }
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return Err(format!("optim.eps: {} must be positive", o.eps));
        }
        if o.weight_decay.is_nan() || o.weight_decay < 0.0 {
            return Err(format!("optim.weight_decay: {} must be >= 0", o.weight_decay));
        }
        for (i, g) in o.groups.iter().enumerate() {
            if let Err(e) = burn::module::ParamGroup::from_regex(&g.pattern) {
                return Err(format!("optim.groups[{i}].pattern: {:?}: {e:?}", g.pattern));
            }
            if !(g.lr > 0.0 && g.lr.is_finite()) {
                return Err(format!("optim.groups[{i}].lr: {} must be positive", g.lr));
            }
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Check the values types cannot express; the message starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        let t = self;
        let positive = [
            ("train.batch_size", t.batch_size),
            ("train.max_steps", t.max_steps),
            ("train.grad_accum_steps", t.grad_accum_steps),
            ("train.eval_interval", t.eval_interval),
            ("train.eval_iters", t.eval_iters),
            ("train.log_interval", t.log_interval),
            ("train.keep_checkpoints", t.keep_checkpoints),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if !(t.grad_clip >= 0.0 && t.grad_clip.is_finite()) {
            return Err(format!(
                "train.grad_clip: {} must be >= 0 (0 disables clipping)",
                t.grad_clip
            ));
        }
        Ok(())
    }
}

impl RunConfig {
    /// Read `path`, apply `overrides` (`section.key=value`, the value parsed as TOML and
    /// taken as a string if it is not TOML), deserialize and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::parse(&read_text(path)?, path, overrides)
    }

    /// [`load`](Self::load) from text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let config: RunConfig = parse_toml(text, path, overrides)?;
        config.validate().map_err(|m| invalid(path, m))?;
        Ok(config)
    }

    /// Check values the types cannot express; the message starts with the key.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        self.data.validate().map_err(|e| e.to_string())?;
        self.train.validate()?;
        self.optim.validate()?;
        match (&self.model.kind(), &self.data) {
            (kiln_models::ModelKind::CausalLm, DataConfig::Text { .. })
            | (kiln_models::ModelKind::ImageClassifier, DataConfig::Idx { .. }) => Ok(()),
            (kiln_models::ModelKind::Encoder, _) => Err(format!(
                "model.arch: {} models are not trained by `train` (convert a pretrained one; fine-tuning is `finetune`)",
                self.model.arch()
            )),
            (_, DataConfig::Csv { .. }) => {
                Err("data.kind: labelled texts (kind = \"csv\") are for `finetune` with task = \"classify\"".into())
            }
            _ => Err(format!(
                "data.kind: a {} model cannot train on this data (language models take kind = \"text\", image models kind = \"idx\")",
                self.model.arch()
            )),
        }
    }

    /// The `[train]` and `[optim]` sections, for the training loop.
    pub fn recipe(&self) -> Recipe<'_> {
        Recipe {
            train: &self.train,
            optim: &self.optim,
        }
    }

    /// The resolved config as TOML (what a run directory stores as `config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_training_window_is_within_the_model_context() {
        let mut t: TrainConfig = toml::from_str("batch_size = 2\nmax_steps = 1\neval_interval = 1").unwrap();
        assert_eq!(t.lm_context(8192), Ok(8192));
        t.context = Some(64);
        assert_eq!(t.lm_context(8192), Ok(64));
        assert!(t.lm_context(32).unwrap_err().contains("train.context"));
        t.context = Some(1);
        assert!(t.lm_context(8192).unwrap_err().contains("at least 2"));
    }
}
