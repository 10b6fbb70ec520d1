//! Resumable training checkpoints: a directory per step (`checkpoints/step-00000200/`)
//! that is complete before it is renamed into place and before `checkpoints/LATEST`
//! names it.

use std::path::{Path, PathBuf};

use kiln_core::io::{StoreError, atomic_write, io_err, sync_dir};
use kiln_core::layout::CHECKPOINTS;

/// Directory names of resumable checkpoints.
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            root: run_dir.join(CHECKPOINTS),
        }
    }

    fn latest_file(&self) -> PathBuf {
        self.root.join("LATEST")
    }

    /// The newest complete checkpoint directory, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, StoreError> {
        let file = self.latest_file();
        match std::fs::read_to_string(&file) {
            Ok(name) => {
                let dir = self.root.join(name.trim());
                if dir.is_dir() {
                    Ok(Some(dir))
                } else {
                    Err(StoreError::Other {
                        path: file,
                        message: format!("names {} which does not exist", dir.display()),
                    })
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path: file, source: e }),
        }
    }

    /// Write a checkpoint for `step`: `write` fills a fresh temporary directory, which
    /// is then renamed into place and recorded in `LATEST`; older ones beyond `keep` go.
    pub fn commit(
        &self,
        step: usize,
        keep: usize,
        write: impl FnOnce(&Path) -> Result<(), StoreError>,
    ) -> Result<PathBuf, StoreError> {
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

    fn prune(&self, keep: usize, newest: &str) -> Result<(), StoreError> {
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
