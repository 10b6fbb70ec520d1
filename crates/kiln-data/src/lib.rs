//! Datasets, tokenizers and batchers for Kiln.
//!
//! Everything here is deterministic: a batch is a pure function of `(seed, step)`,
//! so a resumed run sees exactly the batches the uninterrupted run would have seen,
//! and "the data position" to checkpoint is just the step number.

pub mod bpe_json;
pub mod config;
pub mod idx;
pub mod images;
pub mod labeled;
pub mod rng;
pub mod text;
pub mod tokenizer;

pub use config::{DataConfig, DataError};
pub use images::{EpochSampler, ImageBatch, ImageDataset, ImageSplit};
pub use labeled::{ClassBatch, CsvSpec, EncodedSplit, Example, LabeledTexts, LoadReport, Truncation};
pub use rng::SplitMix64;
pub use text::{TextDataset, TokenBatch};
pub use tokenizer::{Tokenizer, TokenizerSpec};
