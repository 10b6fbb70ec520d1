//! Backend comparison: the same model and batch on each backend, beside PyTorch eager.
//!
//! ```text
//! cargo bench --bench compare_backends [--features tch,wgpu] -- \
//!     [--config configs/shakespeare-char.toml]... [--backends flex,ndarray,tch,wgpu] \
//!     [--rounds 3] [--warmup 10] [--steps 50] [--threads N] \
//!     [--torch .venv/bin/python] [--out runs/compare-backends]
//! ```
//! (`scripts/compare-backends.sh` is the one-command form.)
//!
//! Every measurement is a fresh process (this binary with `--worker`), so one backend's
//! thread pools, allocator or caches never slow another, and peak RSS is per backend.
//! Rounds are interleaved: round 1 runs every backend and PyTorch once, then round 2,
//! ...; each figure is the median over rounds. One worker measures, on one model built
//! from the config's seed:
//! - `first_step_ms`: the first training step of the process (kernel compilation and
//!   autotuning on wgpu, lazy initialisation elsewhere);
//! - training ms/step and items/s (tokens or images) over `--steps` steps after
//!   `--warmup` untimed ones: forward, backward, clipping, AdamW, loss read back;
//! - forward-only ms: the loss of one training batch in inference mode (no autodiff);
//! - decode tokens/s (language models): greedy KV-cached generation from a validation
//!   prompt of a quarter context until the context is full;
//! - peak RSS of the process (VmHWM).
//!
//! Writes `<out>/compare-backends.md` (a table per config), `.json` and `.png` (each
//! Kiln backend's throughput as a multiple of PyTorch's), and prints the Markdown.
//!
//! `--pair BACKEND --config A --config B` instead trains A and B at once from two threads
//! of one process, then one after the other, and prints both timings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use kiln_core::{BackendKind, Selected};
use kiln_train::config::RunConfig;
use kiln_train::metrics::{BarPanel, plot_bars};
use kiln_train::optim::adamw;
use kiln_train::run::{Prepared, RunError, TaskJob, with_task};
use kiln_train::task::Task;
use kiln_train::training::train_step;
use serde::{Deserialize, Serialize};

const REFERENCE: &str = "pytorch";

struct Args {
    configs: Vec<PathBuf>,
    backends: Vec<BackendKind>,
    rounds: usize,
    warmup: usize,
    steps: usize,
    threads: usize,
    torch: Option<String>,
    out: PathBuf,
    worker: Option<BackendKind>,
    pair: Option<BackendKind>,
}

const USAGE: &str = "usage: cargo bench --bench compare_backends [--features tch,wgpu] -- \
[--config configs/X.toml]... [--backends flex,ndarray,tch,wgpu] [--rounds N] [--warmup N] [--steps N] \
[--threads N] [--torch PYTHON] [--out DIR] [--worker BACKEND | --pair BACKEND]";

/// The command line, or an error message (a bad or unknown flag) to print with the usage.
fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        configs: Vec::new(),
        backends: vec![BackendKind::Flex, BackendKind::Ndarray],
        rounds: 3,
        warmup: 10,
        steps: 50,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        torch: None,
        out: "runs/compare-backends".into(),
        worker: None,
        pair: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let number = |v: String, flag: &str| -> Result<usize, String> {
            v.parse().map_err(|_| format!("{flag} takes a whole number, not {v:?}"))
        };
        let backend = |v: String, flag: &str| -> Result<BackendKind, String> {
            v.trim().parse().map_err(|e| format!("{flag}: {e}"))
        };
        match a.as_str() {
            "--help" | "-h" => return Err(String::new()),
            "--config" => args.configs.push(value()?.into()),
            "--backends" => {
                args.backends = value()?
                    .split(',')
                    .map(|b| backend(b.to_string(), "--backends"))
                    .collect::<Result<_, _>>()?
            }
            "--rounds" => args.rounds = number(value()?, "--rounds")?.max(1),
            "--warmup" => args.warmup = number(value()?, "--warmup")?,
            "--steps" => args.steps = number(value()?, "--steps")?.max(1),
            "--threads" => args.threads = number(value()?, "--threads")?.max(1),
            "--torch" => args.torch = Some(value()?),
            "--out" => args.out = value()?.into(),
            "--worker" => args.worker = Some(backend(value()?, "--worker")?),
            "--pair" => args.pair = Some(backend(value()?, "--pair")?),
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.configs.is_empty() {
        args.configs.push("configs/shakespeare-char.toml".into());
    }
    Ok(args)
}

/// What one worker process measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    first_step_ms: f64,
    train_ms: f64,
    items_per_step: usize,
    forward_ms: f64,
    decode_tokens_per_s: Option<f64>,
    peak_rss_mib: f64,
    params: usize,
}

/// Peak resident set size of this process, MiB (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    kiln_core::sys::peak_rss_mib().unwrap_or(0.0)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Measure {
    warmup: usize,
    steps: usize,
    device: Device,
}

impl TaskJob for Measure {
    type Output = Sample;

    fn run<T: Task>(self, mut task: T, mut model: T::Model, prepared: &Prepared) -> Result<Sample, RunError> {
        let cfg = &prepared.config;
        let params = model.num_params();
        let mut optim = adamw(&cfg.optim, &model);
        let mut first_step_ms = 0.0;
        let mut times = Vec::with_capacity(self.steps);
        for step in 0..1 + self.warmup + self.steps {
            let started = Instant::now();
            let (next, stats) = train_step(&mut task, model, &mut optim, cfg.recipe(), step, &self.device);
            model = next;
            assert!(stats.loss.is_finite(), "step {step}: loss {}", stats.loss);
            let ms = started.elapsed().as_secs_f64() * 1e3;
            match step {
                0 => first_step_ms = ms,
                s if s > self.warmup => times.push(ms),
                _ => {}
            }
        }

        // Forward only: the loss of one training batch, inference mode.
        let eval_device = self.device.clone().without_autodiff();
        let model = model.valid();
        let batch = task.train_batch(0, 0, &eval_device);
        let mut forward = Vec::new();
        for i in 0..3 + self.steps {
            let started = Instant::now();
            let loss = task.loss(&model, &batch).into_scalar::<f32>();
            assert!(loss.is_finite());
            if i >= 3 {
                forward.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }

        // Decode: one untimed generation, then the median of three.
        let prompt_len = cfg.model.context_len().map(|c| c / 4).unwrap_or(0);
        let decode_tokens_per_s = task.greedy_decode(&model, prompt_len, &eval_device).map(|_| {
            let rates: Vec<f64> = (0..3)
                .filter_map(|_| task.greedy_decode(&model, prompt_len, &eval_device))
                .map(|s| s.tokens_per_s())
                .collect();
            median(&rates)
        });

        Ok(Sample {
            first_step_ms,
            train_ms: mean(&times),
            items_per_step: task.items_per_batch() * cfg.train.grad_accum_steps,
            forward_ms: median(&forward),
            decode_tokens_per_s,
            peak_rss_mib: peak_rss_mib(),
            params,
        })
    }
}

/// Measure `backend` on `config` in this process.
fn measure(args: &Args, config: &Path, backend: BackendKind) -> Sample {
    let cfg = RunConfig::load(config, &[]).unwrap_or_else(|e| panic!("{e}"));
    let selected = Selected::new(backend, 0).unwrap_or_else(|e| panic!("{e}"));
    let device = selected.device.clone().autodiff();
    let job = Measure {
        warmup: args.warmup,
        steps: args.steps,
        device: device.clone(),
    };
    with_task(cfg, None, &device, job).unwrap_or_else(|e| panic!("{e}"))
}

/// `--worker BACKEND`: measure one backend on the first config, print one JSON line.
fn worker(args: &Args, backend: BackendKind) {
    let sample = measure(args, &args.configs[0], backend);
    println!("{}", serde_json::to_string(&sample).expect("serialises"));
}

/// `--pair BACKEND`: the first two configs' measurements run at once from two threads of
/// this one process, then one after the other; prints each one's training ms/step and the
/// wall times (the issue's "two models in one libtorch process").
fn pair(args: &Args, backend: BackendKind) {
    assert!(args.configs.len() >= 2, "--pair needs two --config");
    let run = |config: &Path| measure(args, config, backend);
    let (a, b) = (&args.configs[0], &args.configs[1]);
    let start = Instant::now();
    let (at_once_a, at_once_b) = std::thread::scope(|s| {
        let (ta, tb) = (s.spawn(|| run(a)), s.spawn(|| run(b)));
        (ta.join().expect("first model"), tb.join().expect("second model"))
    });
    let at_once = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let (apart_a, apart_b) = (run(a), run(b));
    let apart = start.elapsed().as_secs_f64();
    println!(
        "{backend}: one after the other {:.1} / {:.1} ms/step, {apart:.1} s; at once {:.1} / {:.1} ms/step, {at_once:.1} s",
        apart_a.train_ms, apart_b.train_ms, at_once_a.train_ms, at_once_b.train_ms
    );
}

/// Run this binary as a worker for `backend` on `config`.
fn run_worker(args: &Args, config: &Path, backend: BackendKind) -> Sample {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .args(["--worker", backend.name(), "--config"])
        .arg(config)
        .args(["--warmup", &args.warmup.to_string(), "--steps", &args.steps.to_string()])
        .envs(thread_env(args.threads))
        .output()
        .expect("start a worker");
    if !out.status.success() {
        panic!(
            "{backend} on {}: worker failed\n{}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{backend}: worker printed {line:?}: {e}"))
}

/// One thread count for every CPU implementation: rayon (flex, ndarray), OpenMP (libtorch).
fn thread_env(threads: usize) -> Vec<(&'static str, String)> {
    ["RAYON_NUM_THREADS", "OMP_NUM_THREADS"]
        .into_iter()
        .map(|k| (k, threads.to_string()))
        .collect()
}

/// The PyTorch eager reference on the same model, data and optimizer.
fn run_reference(args: &Args, python: &str, cfg: &RunConfig) -> Sample {
    use kiln_models::ModelConfig;
    let (t, o) = (&cfg.train, &cfg.optim);
    // The script, then `--flag value` pairs describing the same model and recipe.
    let (script, mut flags): (&str, Vec<(&str, String)>) = match &cfg.model {
        ModelConfig::Gpt2(m) => {
            let activation = serde_json::to_value(m.activation).expect("serialises");
            let activation = activation.as_str().expect("a name").to_string();
            let flags = vec![
                ("--arch", "gpt2".into()),
                ("--n-layer", m.n_layer.to_string()),
                ("--n-head", m.n_head.to_string()),
                ("--n-embd", m.n_embd.to_string()),
                ("--block-size", m.block_size.to_string()),
                ("--activation", activation),
            ];
            ("scripts/torch_gpt_reference.py", flags)
        }
        ModelConfig::Llama(m) => {
            let flags = vec![
                ("--arch", "llama".into()),
                ("--n-layer", m.n_layer.to_string()),
                ("--n-head", m.n_head.to_string()),
                ("--n-kv-head", m.n_kv_head.to_string()),
                ("--n-embd", m.n_embd.to_string()),
                ("--llama-hidden", m.intermediate_size.to_string()),
                ("--block-size", m.block_size.to_string()),
            ];
            ("scripts/torch_gpt_reference.py", flags)
        }
        ModelConfig::Cnn(m) => {
            let mut flags = vec![
                ("--channels", format!("{},{}", m.channels[0], m.channels[1])),
                ("--hidden", m.hidden_size.to_string()),
                ("--dropout", m.dropout.to_string()),
            ];
            if let kiln_data::DataConfig::Idx { path, .. } = &cfg.data {
                flags.push(("--data", path.display().to_string()));
            }
            ("scripts/torch_cnn_reference.py", flags)
        }
        other => panic!("no PyTorch reference for {} models", other.arch()),
    };
    flags.extend([
        ("--batch-size", t.batch_size.to_string()),
        ("--lr", o.lr.to_string()),
        ("--warmup-steps", args.warmup.to_string()),
        ("--steps", args.steps.to_string()),
        ("--threads", args.threads.to_string()),
    ]);
    let mut cmd = Command::new(python);
    cmd.arg(script).arg("--json");
    for (flag, value) in &flags {
        cmd.arg(flag).arg(value);
    }
    let out = cmd
        .envs(thread_env(args.threads))
        .output()
        .expect("run the PyTorch reference");
    assert!(
        out.status.success(),
        "PyTorch reference: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the PyTorch reference printed {stdout:?}: {e}"));
    let num = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("reference JSON lacks {k}"));
    Sample {
        first_step_ms: num("first_step_ms"),
        train_ms: num("ms_per_step_mean"),
        items_per_step: num("items_per_step") as usize,
        forward_ms: num("forward_ms"),
        decode_tokens_per_s: r["decode_tokens_per_s"].as_f64(),
        peak_rss_mib: num("peak_rss_mib"),
        params: num("params") as usize,
    }
}

/// Medians over rounds of one implementation on one config.
#[derive(Debug, Clone, Serialize)]
struct Row {
    implementation: String,
    params: usize,
    train_ms_per_step: f64,
    items_per_s: f64,
    first_step_ms: f64,
    forward_ms: f64,
    decode_tokens_per_s: Option<f64>,
    peak_rss_mib: f64,
    /// Throughputs as multiples of PyTorch's (higher is faster).
    train_vs_pytorch: Option<f64>,
    forward_vs_pytorch: Option<f64>,
    decode_vs_pytorch: Option<f64>,
    rounds: Vec<Sample>,
}

fn summarize(name: &str, samples: Vec<Sample>) -> Row {
    let m = |f: fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
    let train_ms = m(|s| s.train_ms);
    let decode: Vec<f64> = samples.iter().filter_map(|s| s.decode_tokens_per_s).collect();
    Row {
        implementation: name.to_string(),
        params: samples[0].params,
        train_ms_per_step: train_ms,
        items_per_s: samples[0].items_per_step as f64 / (train_ms / 1e3),
        first_step_ms: m(|s| s.first_step_ms),
        forward_ms: m(|s| s.forward_ms),
        decode_tokens_per_s: (!decode.is_empty()).then(|| median(&decode)),
        peak_rss_mib: m(|s| s.peak_rss_mib),
        train_vs_pytorch: None,
        forward_vs_pytorch: None,
        decode_vs_pytorch: None,
        rounds: samples,
    }
}

fn add_ratios(rows: &mut [Row]) {
    let Some(r) = rows.iter().find(|r| r.implementation == REFERENCE).cloned() else {
        return;
    };
    for row in rows {
        row.train_vs_pytorch = Some(r.train_ms_per_step / row.train_ms_per_step);
        row.forward_vs_pytorch = Some(r.forward_ms / row.forward_ms);
        row.decode_vs_pytorch = row.decode_tokens_per_s.zip(r.decode_tokens_per_s).map(|(k, p)| k / p);
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!(" ({v:.2}x)")).unwrap_or_default()
}

fn markdown(title: &str, rows: &[Row], unit: &str) -> String {
    let mut s = format!(
        "#### {title}\n\n| implementation | train ms/step | {unit}/s | first step ms | forward ms | decode tokens/s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {:.1} | {:.0}{} | {:.0} | {:.2}{} | {}{} | {:.0} |\n",
            r.implementation,
            r.train_ms_per_step,
            r.items_per_s,
            ratio(r.train_vs_pytorch),
            r.first_step_ms,
            r.forward_ms,
            ratio(r.forward_vs_pytorch),
            fmt_opt(r.decode_tokens_per_s, 0),
            ratio(r.decode_vs_pytorch),
            r.peak_rss_mib,
        );
    }
    s
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                std::process::exit(0);
            }
            eprintln!("error: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root).expect("workspace root");
    if let Some(backend) = args.worker {
        return worker(&args, backend);
    }
    if let Some(backend) = args.pair {
        return pair(&args, backend);
    }

    let configs: Vec<(PathBuf, RunConfig)> = args
        .configs
        .iter()
        .map(|p| (p.clone(), RunConfig::load(p, &[]).unwrap_or_else(|e| panic!("{e}"))))
        .collect();
    let mut names: Vec<String> = args.backends.iter().map(|b| b.to_string()).collect();
    if args.torch.is_some() {
        names.push(REFERENCE.into());
    }
    let host = format!(
        "{} threads for every implementation; {} rounds, interleaved; warm-up {} steps, timed {} steps",
        args.threads, args.rounds, args.warmup, args.steps
    );
    eprintln!("{host}");

    // samples[config][implementation] = one Sample per round.
    let mut samples: Vec<BTreeMap<String, Vec<Sample>>> = vec![BTreeMap::new(); configs.len()];
    for round in 1..=args.rounds {
        for (c, (path, cfg)) in configs.iter().enumerate() {
            for name in &names {
                eprint!("round {round}/{}: {} on {name} ... ", args.rounds, path.display());
                let sample = match (name.as_str(), &args.torch) {
                    (REFERENCE, Some(python)) => run_reference(&args, python, cfg),
                    _ => run_worker(&args, path, name.parse().expect("a backend")),
                };
                eprintln!("{:.1} ms/step", sample.train_ms);
                samples[c].entry(name.clone()).or_default().push(sample);
            }
        }
    }

    std::fs::create_dir_all(&args.out).unwrap_or_else(|e| panic!("{}: {e}", args.out.display()));
    let mut md = format!(
        "{host}.\nThroughput ratios in parentheses: PyTorch eager's time / this implementation's (higher is faster).\n\n"
    );
    let mut json = Vec::new();
    let mut panels = Vec::new();
    for (c, (path, cfg)) in configs.iter().enumerate() {
        let mut rows: Vec<Row> = names
            .iter()
            .map(|n| summarize(n, samples[c].remove(n).unwrap_or_default()))
            .collect();
        add_ratios(&mut rows);
        let unit = if cfg.model.context_len().is_some() {
            "tokens"
        } else {
            "images"
        };
        let title = format!(
            "{} ({}, {} parameters, batch {})",
            path.display(),
            cfg.model.arch(),
            rows[0].params,
            cfg.train.batch_size
        );
        md += &markdown(&title, &rows, unit);
        md += "\n";
        if args.torch.is_some() {
            let kiln: Vec<&Row> = rows.iter().filter(|r| r.implementation != REFERENCE).collect();
            let decodes = kiln.iter().any(|r| r.decode_vs_pytorch.is_some());
            panels.push(BarPanel {
                title: format!(
                    "{} ({})",
                    path.file_stem().unwrap_or_default().to_string_lossy(),
                    cfg.model.arch()
                ),
                // No decode group for a model that does not generate.
                categories: ["train", "forward", "decode"][..2 + decodes as usize]
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
                series: kiln.iter().map(|r| r.implementation.clone()).collect(),
                values: kiln
                    .iter()
                    .map(|r| {
                        [r.train_vs_pytorch, r.forward_vs_pytorch, r.decode_vs_pytorch][..2 + decodes as usize].to_vec()
                    })
                    .collect(),
            });
        }
        json.push(serde_json::json!({
            "config": path,
            "arch": cfg.model.arch(),
            "batch_size": cfg.train.batch_size,
            "rows": rows,
        }));
    }
    let json = serde_json::json!({
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "configs": json,
    });
    let write = |name: &str, text: String| {
        let path = args.out.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    };
    write("compare-backends.md", md.clone());
    write(
        "compare-backends.json",
        serde_json::to_string_pretty(&json).expect("serialises"),
    );
    if !panels.is_empty() {
        let png = args.out.join("compare-backends.png");
        plot_bars(&png, "throughput / PyTorch eager", Some(1.0), &panels).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("wrote {}", png.display());
    }
    println!("{md}");
}
