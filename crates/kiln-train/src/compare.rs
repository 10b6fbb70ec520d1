//! Research comparisons: several run directories -> one validation-loss plot and a
//! table of final loss, steps, wall time and parameter count.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::metrics::{Curve, plot_curves, read_metrics};
use crate::training::TrainSummary;
use kiln_core::StoreError;
use kiln_core::layout::{METRICS, RUN_INFO, RunInfo, SUMMARY};

/// One row of the comparison table.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub name: String,
    pub arch: String,
    pub backend: String,
    pub params: usize,
    pub steps: usize,
    pub final_val_loss: f64,
    pub best_val_loss: f64,
    pub wall_time_s: f64,
    pub ms_per_step: f64,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| StoreError::Other {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Draw the validation-loss curves of `runs` into `out_png` and return the Markdown table.
pub fn compare_runs(runs: &[PathBuf], out_png: &Path) -> Result<String, StoreError> {
    let mut curves = Vec::new();
    let mut rows = Vec::new();
    for (i, dir) in runs.iter().enumerate() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let records = read_metrics(&dir.join(METRICS))?;
        if records.is_empty() {
            return Err(StoreError::Other {
                path: dir.join(METRICS),
                message: "no evaluations recorded".into(),
            });
        }
        let summary: TrainSummary = read_json(&dir.join(SUMMARY))?;
        let info: RunInfo = read_json(&dir.join(RUN_INFO))?;
        curves.push(Curve::new(
            format!("{name} ({})", info.arch),
            records.iter().map(|r| (r.step as f64, r.val_loss)).collect(),
            i,
        ));
        rows.push(RunRow {
            name,
            arch: info.arch,
            backend: info.backend,
            params: info.num_params,
            steps: summary.steps,
            final_val_loss: summary.final_val_loss,
            best_val_loss: summary.best_val_loss,
            wall_time_s: summary.wall_time_s,
            ms_per_step: summary.ms_per_step,
        });
    }
    plot_curves(out_png, "validation loss", "val loss", &curves)?;
    Ok(markdown_table(&rows))
}

pub fn markdown_table(rows: &[RunRow]) -> String {
    let mut out = String::from(
        "| run | arch | backend | params | steps | final val loss | best val loss | wall time (s) | ms/step |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3}M | {} | {:.4} | {:.4} | {:.1} | {:.1} |",
            r.name,
            r.arch,
            r.backend,
            r.params as f64 / 1e6,
            r.steps,
            r.final_val_loss,
            r.best_val_loss,
            r.wall_time_s,
            r.ms_per_step
        );
    }
    out
}
