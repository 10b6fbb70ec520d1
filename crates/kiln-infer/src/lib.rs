//! Kiln's inference: load any model directory ([`model::LoadedModel`]), generate text
//! with the batched [`engine::Engine`] (sampler, stop conditions, incremental
//! detokenizer), compute sentence embeddings and classify texts or images.
//!
//! The engine knows token ids, not the command line: `infer` is its first client, a
//! server drives the same step API. Nothing here depends on the training crate.

pub mod chat;
pub mod classify;
pub mod detokenizer;
pub mod embed;
pub mod engine;
pub mod model;
pub mod perplexity;
pub mod sampler;

pub use engine::{Completion, Engine, EngineConfig, FinishReason, GenerateError, Request};
pub use model::{LoadedModel, Model};
pub use sampler::{Sampler, Sampling};
