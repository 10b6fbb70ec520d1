//! Slices of the real Rotten Tomatoes splits (scripts/fetch-sentiment.sh) for tests that
//! fine-tune on a few rows (included with `#[path]` by the tests that have `csv`).

use std::path::{Path, PathBuf};

/// The first `n` data rows of split `split` (with its header), written into `dir`.
pub fn slice(split: &str, n: usize, dir: &Path) -> PathBuf {
    let src = super::common::repo_root()
        .join("datasets/rotten-tomatoes")
        .join(format!("{split}.csv"));
    let mut reader = csv::Reader::from_path(&src)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-sentiment.sh)", src.display()));
    let path = dir.join(format!("{split}.csv"));
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().take(n) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    path
}
