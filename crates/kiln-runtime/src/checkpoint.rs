//! Checkpoint I/O: safetensors weights, resumable training state, atomic writes.
//!
//! Every file is written to a temporary name in the same directory, flushed to disk and
//! renamed over the target, so a crash leaves either the old file or the new one, never
//! a torn one. A resumable checkpoint is a directory (`checkpoints/step-000200/`) that is
//! complete before it is renamed into place and before `checkpoints/LATEST` names it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};

/// A checkpoint that cannot be written or does not fit the model; names file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: does not match the model: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Other { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` atomically (temp file + fsync + rename + fsync of the directory).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Flush a directory's entries (renames) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// What a model expects of each stored tensor: its shape and its safetensors dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub shape: Vec<usize>,
    pub dtype: safetensors::Dtype,
}

/// The safetensors dtype a Burn dtype is stored as.
fn storage_dtype(dtype: burn::tensor::DType) -> safetensors::Dtype {
    use burn::tensor::DType as B;
    use safetensors::Dtype as S;
    match dtype {
        B::F64 => S::F64,
        B::F16 => S::F16,
        B::BF16 => S::BF16,
        B::I64 => S::I64,
        B::I32 => S::I32,
        B::I16 => S::I16,
        B::I8 => S::I8,
        B::U64 => S::U64,
        B::U32 => S::U32,
        B::U16 => S::U16,
        B::U8 => S::U8,
        B::Bool(_) => S::BOOL,
        _ => S::F32,
    }
}

/// The parameter names, shapes and dtypes a model expects, as safetensors would store them.
pub fn expected_tensors<M: Module>(model: &M) -> BTreeMap<String, ExpectedTensor> {
    model
        .collect(None, None, false)
        .into_iter()
        .map(|t| {
            (
                t.name.clone(),
                ExpectedTensor {
                    shape: t.shape.as_slice().to_vec(),
                    dtype: storage_dtype(t.dtype),
                },
            )
        })
        .collect()
}

/// The parameter names and shapes a model expects, as safetensors would store them.
pub fn expected_shapes<M: Module>(model: &M) -> BTreeMap<String, Vec<usize>> {
    expected_tensors(model)
        .into_iter()
        .map(|(name, t)| (name, t.shape))
        .collect()
}

/// Serialise a model's parameters to safetensors bytes.
pub fn weights_to_bytes<M: Module>(model: &M) -> Result<Vec<u8>, String> {
    let mut store = SafetensorsStore::from_bytes(None);
    model.save_into(&mut store).map_err(|e| e.to_string())?;
    store.get_bytes().map_err(|e| e.to_string())
}

/// Path fragment of the factors of a LoRA adapter (`<weight>.lora.a`, `<weight>.lora.b`).
pub const LORA_PATHS: &str = r"\.lora\.";

/// Whether `model` carries LoRA adapters.
pub fn has_adapters<M: Module>(model: &M) -> bool {
    model
        .collect(None, None, false)
        .iter()
        .any(|t| t.name.contains(".lora."))
}

/// Save the weights of a (validation-mode) model as inference uses them: adapters merged
/// into their base weights, to `path`. A model with LoRA adapters also gets the adapter
/// factors alone in `<stem>.adapter.safetensors` beside it. Both writes are atomic.
pub fn save_inference_weights<M: Module>(model: &M, path: &Path) -> Result<(), CheckpointError> {
    if has_adapters(model) {
        let mut store = SafetensorsStore::from_bytes(None).with_regex(LORA_PATHS);
        let err = |message: String| CheckpointError::Other {
            path: path.to_path_buf(),
            message,
        };
        model.save_into(&mut store).map_err(|e| err(e.to_string()))?;
        let bytes = store.get_bytes().map_err(|e| err(e.to_string()))?;
        atomic_write(&path.with_extension("adapter.safetensors"), &bytes)?;
        save_weights(&model.clone().materialize(), path)
    } else {
        save_weights(model, path)
    }
}

/// Save a model's parameters to `path` as safetensors, atomically.
pub fn save_weights<M: Module>(model: &M, path: &Path) -> Result<(), CheckpointError> {
    let bytes = weights_to_bytes(model).map_err(|message| CheckpointError::Other {
        path: path.to_path_buf(),
        message,
    })?;
    atomic_write(path, &bytes)
}

/// Check that safetensors `bytes` (read from `path`) hold exactly the tensors `expected`,
/// with the same shapes, as f32. Nothing is applied; the error lists every problem.
pub fn check_weights(
    bytes: &[u8],
    path: &Path,
    expected: &BTreeMap<String, ExpectedTensor>,
) -> Result<(), CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut problems = Vec::new();
    let found: BTreeMap<String, (Vec<usize>, safetensors::Dtype)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.dtype())))
        .collect();
    for (name, want) in expected {
        let shape = &want.shape;
        match found.get(name) {
            None => problems.push(format!("missing tensor {name} {shape:?}")),
            Some((s, _)) if s != shape => {
                problems.push(format!("tensor {name} has shape {s:?}, the model expects {shape:?}"))
            }
            Some((_, dtype)) if *dtype != want.dtype => {
                problems.push(format!("tensor {name} is {dtype:?}, expected {:?}", want.dtype))
            }
            _ => {}
        }
    }
    for name in found.keys().filter(|n| !expected.contains_key(*n)) {
        problems.push(format!("unexpected tensor {name}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            message: problems.join("; "),
        })
    }
}

/// Load safetensors weights from `path` into `model`, after checking every name and shape.
pub fn load_weights<M: Module>(mut model: M, path: &Path) -> Result<M, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    check_weights(&bytes, path, &expected_tensors(&model))?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let result = model.load_from(&mut store).map_err(|e| CheckpointError::Other {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            message: format!("{:?} {:?}", result.errors, result.missing),
        });
    }
    Ok(model)
}

/// Directory names of resumable checkpoints.
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            root: run_dir.join("checkpoints"),
        }
    }

    fn latest_file(&self) -> PathBuf {
        self.root.join("LATEST")
    }

    /// The newest complete checkpoint directory, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        let file = self.latest_file();
        match std::fs::read_to_string(&file) {
            Ok(name) => {
                let dir = self.root.join(name.trim());
                if dir.is_dir() {
                    Ok(Some(dir))
                } else {
                    Err(CheckpointError::Other {
                        path: file,
                        message: format!("names {} which does not exist", dir.display()),
                    })
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CheckpointError::Io { path: file, source: e }),
        }
    }

    /// Write a checkpoint for `step`: `write` fills a fresh temporary directory, which
    /// is then renamed into place and recorded in `LATEST`; older ones beyond `keep` go.
    pub fn commit(
        &self,
        step: usize,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
    ) -> Result<PathBuf, CheckpointError> {
        let name = format!("step-{step:08}");
        let final_dir = self.root.join(&name);
        let tmp = self.root.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        write(&tmp)?;
        sync_dir(&tmp).map_err(io_err(&tmp))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        sync_dir(&self.root).map_err(io_err(&self.root))?;
        atomic_write(&self.latest_file(), name.as_bytes())?;
        self.prune(keep, &name)?;
        Ok(final_dir)
    }

    fn prune(&self, keep: usize, newest: &str) -> Result<(), CheckpointError> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(io_err(&self.root))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-") && n.as_str() <= newest)
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(keep.max(1));
        for name in &names[..excess] {
            let dir = self.root.join(name);
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }
}
