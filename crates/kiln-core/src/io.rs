//! Atomic writes: every file is written to a temporary name in the same directory,
//! flushed to disk and renamed over the target, so a crash leaves either the old file
//! or the new one, never a torn one. A directory is written the same way, whole.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file that cannot be read or written, or weights that do not fit the model; names
/// the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` atomically (temp file + fsync + rename + fsync of the directory).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
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

/// Write the files of a directory atomically: everything goes into a temporary
/// directory beside `out` (each file fsynced), renamed into place only when complete.
/// `out` must not exist.
pub fn write_dir_atomically(out: &Path, files: &[(&str, &[u8])]) -> Result<(), StoreError> {
    let other = |path: &Path, message: String| StoreError::Other {
        path: path.to_path_buf(),
        message,
    };
    if out.exists() {
        return Err(other(out, "already exists; choose a new output directory".into()));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<(), StoreError> {
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for (file, bytes) in files {
            atomic_write(&tmp.join(file), bytes)?;
        }
        sync_dir(&tmp).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        sync_dir(parent).map_err(io_err(parent))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_written_whole_and_never_over_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model");
        write_dir_atomically(&out, &[("a.txt", b"one"), ("b.txt", b"two")]).unwrap();
        assert_eq!(std::fs::read(out.join("b.txt")).unwrap(), b"two");
        let err = write_dir_atomically(&out, &[("a.txt", b"new")]).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"one");
        // No temporary directory is left beside it.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
