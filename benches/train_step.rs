//! Training-step benchmark: steady-state ms/step and tokens/s of a run config on each
//! CPU backend, optionally beside the PyTorch eager reference (scripts/torch_gpt_reference.py).
//!
//! ```text
//! cargo bench --bench train_step -- [--config configs/shakespeare-char.toml]
//!     [--backends flex,ndarray] [--warmup 10] [--steps 100] [--torch .venv/bin/python]
//! ```
//! Prints a Markdown table (the numbers in docs/benchmarks.md come from it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use burn::tensor::Device;
use kiln_runtime::config::RunConfig;
use kiln_runtime::optim::adamw;
use kiln_runtime::run::{Prepared, RunError, TaskJob, with_task};
use kiln_runtime::task::Task;
use kiln_runtime::training::train_step;
use kiln_runtime::{BackendKind, Selected};

struct Args {
    config: PathBuf,
    backends: Vec<BackendKind>,
    warmup: usize,
    steps: usize,
    torch: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        config: "configs/shakespeare-char.toml".into(),
        backends: vec![BackendKind::Flex, BackendKind::Ndarray],
        warmup: 10,
        steps: 100,
        torch: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--config" => args.config = value().into(),
            "--backends" => {
                args.backends = value()
                    .split(',')
                    .map(|b| b.parse().unwrap_or_else(|e| panic!("{e}")))
                    .collect()
            }
            "--warmup" => args.warmup = value().parse().expect("--warmup N"),
            "--steps" => args.steps = value().parse().expect("--steps N"),
            "--torch" => args.torch = Some(value()),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Per-step wall times (ms) after `warmup` untimed steps.
struct StepTimer {
    warmup: usize,
    steps: usize,
    device: Device,
}

impl TaskJob for StepTimer {
    type Output = (Vec<f64>, usize);

    fn run<T: Task>(self, mut task: T, mut model: T::Model, prepared: &Prepared) -> Result<Self::Output, RunError> {
        let cfg = &prepared.config;
        let mut optim = adamw(&cfg.optim, &model);
        let mut times = Vec::with_capacity(self.steps);
        for step in 0..self.warmup + self.steps {
            let started = Instant::now();
            let (next, stats) = train_step(&mut task, model, &mut optim, cfg.recipe(), step, &self.device);
            model = next;
            assert!(stats.loss.is_finite());
            if step >= self.warmup {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok((times, task.items_per_batch() * cfg.train.grad_accum_steps))
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = parse_args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root).unwrap();
    let cfg = RunConfig::load(&args.config, &[]).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "config {} | {} | warm-up {} steps, timed {} steps | {} threads available",
        args.config.display(),
        cfg.model.arch(),
        args.warmup,
        args.steps,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let mut rows = Vec::new();
    for backend in &args.backends {
        let selected = Selected::new(*backend, 0).unwrap_or_else(|e| panic!("{e}"));
        let device = selected.device.clone().autodiff();
        let job = StepTimer {
            warmup: args.warmup,
            steps: args.steps,
            device: device.clone(),
        };
        let (times, items) = with_task(cfg.clone(), None, &device, job).unwrap_or_else(|e| panic!("{e}"));
        rows.push((
            backend.to_string(),
            mean(&times),
            median(&times),
            items as f64 / (mean(&times) / 1e3),
        ));
    }
    if let Some(python) = &args.torch {
        let out = Command::new(python)
            .args(["scripts/torch_gpt_reference.py", "--json", "--arch", cfg.model.arch()])
            .args([
                "--steps",
                &args.steps.to_string(),
                "--warmup-steps",
                &args.warmup.to_string(),
            ])
            .output()
            .expect("run the PyTorch reference");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reference prints JSON");
        let label = format!(
            "pytorch {} eager ({} threads)",
            r["torch"].as_str().unwrap_or("?"),
            r["threads"]
        );
        rows.push((
            label,
            r["ms_per_step_mean"].as_f64().unwrap(),
            r["ms_per_step_median"].as_f64().unwrap(),
            r["tokens_per_s"].as_f64().unwrap(),
        ));
    }
    let reference = args.torch.as_ref().map(|_| rows.last().unwrap().1);
    println!("\n| implementation | ms/step (mean) | ms/step (median) | items/s | time vs PyTorch |");
    println!("|---|---:|---:|---:|---:|");
    for (name, mean_ms, median_ms, rate) in &rows {
        let ratio = reference
            .map(|r| format!("{:.2}x", mean_ms / r))
            .unwrap_or_else(|| "-".into());
        println!("| {name} | {mean_ms:.1} | {median_ms:.1} | {rate:.0} | {ratio} |");
    }
}
