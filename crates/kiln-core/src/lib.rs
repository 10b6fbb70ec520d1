//! Kiln's small core, shared by training, inference, conversion and serving:
//!
//! - [`layout`]: the model/run directory format, every file name defined once, and
//!   [`ModelDir`](layout::ModelDir) (which weights a directory serves);
//! - [`io`]: atomic writes of files and whole directories (temp + fsync + rename);
//! - [`weights`]: safetensors weights checked by name, shape and dtype;
//! - [`config`]: TOML files with `--set` overrides, errors naming file and key, and
//!   [`ModelFile`](config::ModelFile) (a directory's `[model]` section);
//! - [`backend`]: `--backend` / `--device` selection;
//! - [`rng`]: reproducible seeding under one process-wide lock;
//! - [`sys`]: process facts (peak RSS).

pub mod backend;
pub mod config;
pub mod io;
pub mod layout;
pub mod rng;
pub mod sys;
pub mod weights;

pub use backend::{BackendError, BackendKind, Selected};
pub use config::{ConfigError, ModelFile};
pub use io::{StoreError, atomic_write, write_dir_atomically};
pub use layout::ModelDir;
