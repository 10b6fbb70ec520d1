//! `metrics.jsonl` (one JSON object per evaluation) and the loss-curve PNGs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use kiln_core::io::{StoreError, atomic_write};
use kiln_core::layout::{ACCURACY_PLOT, LOSS_PLOT, METRICS};

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    /// Mean training loss over the steps since the previous evaluation.
    pub train_loss: f64,
    pub val_loss: f64,
    /// Classification accuracy on the evaluation split (classifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    pub lr: f64,
    /// Global gradient norm (before clipping) at this step.
    pub grad_norm: f64,
    /// Training throughput since the previous evaluation: tokens (LMs) or images per second.
    pub tokens_per_s: f64,
    /// Wall time since the run started (excluding time before a resume).
    pub elapsed_s: f64,
}

/// Appends records to `metrics.jsonl`, flushing each line.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join(METRICS),
        }
    }

    /// Every record in the file (an empty list when it does not exist).
    pub fn read(&self) -> Result<Vec<EvalRecord>, StoreError> {
        read_metrics(&self.path)
    }

    /// Keep only records up to `step` (a resumed run rewrites what came after).
    pub fn truncate_after(&self, step: usize) -> Result<(), StoreError> {
        let kept: Vec<EvalRecord> = self.read()?.into_iter().filter(|r| r.step <= step).collect();
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r).expect("records serialise"));
            text.push('\n');
        }
        atomic_write(&self.path, text.as_bytes())
    }

    pub fn append(&self, record: &EvalRecord) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        let line = serde_json::to_string(record).expect("records serialise") + "\n";
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

/// Read a `metrics.jsonl`; a torn last line (a crash mid-write) is ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<EvalRecord>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(StoreError::Other {
                    path: path.to_path_buf(),
                    message: format!("line {}: {e}", i + 1),
                });
            }
        }
    }
    Ok(out)
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
        for family in ["sans-serif", "monospace"] {
            plotters::style::register_font(family, FontStyle::Normal, bytes)
                .unwrap_or_else(|_| panic!("embedded font is valid"));
        }
    });
}

/// One named curve: `(step, loss)` points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color_index: usize,
}

impl Curve {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>, color_index: usize) -> Self {
        Self {
            label: label.into(),
            points,
            color_index,
        }
    }
}

/// Draw into a PNG at `path` with `draw`: rendered in memory, encoded, and written with
/// [`atomic_write`], so a reader never sees half a PNG.
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), StoreError> {
    register_font();
    let plotting = |e: &dyn std::fmt::Display| StoreError::Other {
        path: path.to_path_buf(),
        message: format!("plotting: {e}"),
    };
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        (|| {
            root.fill(&WHITE)?;
            draw(&root)?;
            root.present()?;
            Ok::<_, Box<dyn std::error::Error>>(())
        })()
        .map_err(|e| plotting(&e))?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, rgb).ok_or_else(|| plotting(&"buffer size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageOutputFormat::Png)
        .map_err(|e| plotting(&e))?;
    atomic_write(path, png.get_ref())
}

/// Draw curves into a PNG at `path` (written atomically).
pub fn plot_curves(path: &Path, title: &str, y_label: &str, curves: &[Curve]) -> Result<(), StoreError> {
    write_png(path, (960, 600), |root| {
        let all = curves.iter().flat_map(|c| c.points.iter());
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in all {
            x_max = x_max.max(x);
            if y.is_finite() {
                y_min = y_min.min(y);
                y_max = y_max.max(y);
            }
        }
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        let pad = ((y_max - y_min) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for c in curves {
            let color = Palette99::pick(c.color_index).to_rgba();
            let style = ShapeStyle::from(color).stroke_width(2);
            chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    })
}

/// One panel of a grouped bar chart: for each category (a metric), one bar per series
/// (an implementation); `values[series][category]`, `None` where there is no value.
pub struct BarPanel {
    pub title: String,
    pub categories: Vec<String>,
    pub series: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
}

/// Panels of grouped bars, side by side, into a PNG at `path` (written atomically), with
/// a dashed line at `reference` (e.g. 1.0 for ratios to a baseline).
pub fn plot_bars(path: &Path, y_label: &str, reference: Option<f64>, panels: &[BarPanel]) -> Result<(), StoreError> {
    let width = 80 + 520 * panels.len().max(1) as u32;
    write_png(path, (width, 560), |root| {
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(&areas) {
            let y_max = panel
                .values
                .iter()
                .flatten()
                .flatten()
                .copied()
                .chain(reference)
                .fold(0.0f64, f64::max)
                * 1.15;
            let n_cat = panel.categories.len().max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.0..n_cat as f64, 0.0..y_max.max(1e-9))?;
            let categories = panel.categories.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n_cat * 2 + 1)
                .x_label_formatter(&move |x| {
                    let i = x.floor() as usize;
                    if (x.fract() - 0.5).abs() < 1e-6 && i < categories.len() {
                        categories[i].clone()
                    } else {
                        String::new()
                    }
                })
                .y_desc(y_label)
                .draw()?;
            let n_series = panel.series.len().max(1);
            let bar = 0.8 / n_series as f64;
            for (s, name) in panel.series.iter().enumerate() {
                let color = Palette99::pick(s).to_rgba();
                let bars = panel.values[s].iter().enumerate().filter_map(|(c, v)| {
                    v.map(|v| {
                        let x0 = c as f64 + 0.1 + s as f64 * bar;
                        Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, v)], color.filled())
                    })
                });
                chart
                    .draw_series(bars)?
                    .label(name.clone())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
            }
            if let Some(r) = reference {
                chart.draw_series(DashedLineSeries::new([(0.0, r), (n_cat as f64, r)], 6, 4, BLACK.into()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        Ok(())
    })
}

/// The curves of one run: train and validation loss against step (`loss.png`), and for
/// classifiers validation accuracy (`accuracy.png`).
pub fn plot_run(run_dir: &Path, records: &[EvalRecord]) -> Result<(), StoreError> {
    let train: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.train_loss)).collect();
    let val: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.val_loss)).collect();
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    plot_curves(
        &run_dir.join(LOSS_PLOT),
        &format!("{name}: loss"),
        "loss",
        &[Curve::new("train", train, 0), Curve::new("validation", val, 1)],
    )?;
    let accuracy: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_accuracy.map(|a| (r.step as f64, a * 100.0)))
        .collect();
    if accuracy.is_empty() {
        return Ok(());
    }
    plot_curves(
        &run_dir.join(ACCURACY_PLOT),
        &format!("{name}: validation accuracy"),
        "accuracy (%)",
        &[Curve::new("validation", accuracy, 1)],
    )
}
