//! The generation engine (kiln-infer) on freshly trained language models: a batch of
//! prompts of different lengths gives each prompt exactly what it gives alone (greedy
//! and seeded sampling, on flex and ndarray), sequences join and leave mid-flight, and
//! every stop condition ends a sequence with its reason.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;
use kiln_core::layout::WhichWeights;
use kiln_core::{BackendKind, Selected};
use kiln_infer::engine::{ContextFull, Engine, EngineConfig, Request, TokenEvent, generate};
use kiln_infer::{FinishReason, LoadedModel, Model, Sampling};
use kiln_models::CausalLm;
use kiln_train::config::RunConfig;
use kiln_train::run::{prepare_run_dir, run_training};
use kiln_train::training::TrainOptions;

fn train_into(toml: &str, dir: &Path) {
    let cfg = RunConfig::parse(toml, Path::new("t.toml"), &[]).unwrap();
    let cfg = prepare_run_dir(dir, Some(&cfg), false, &[]).unwrap();
    let backend = Selected::new(BackendKind::Flex, 0).unwrap();
    let options = TrainOptions {
        run_dir: dir.to_path_buf(),
        resume: false,
        progress: false,
    };
    run_training(cfg, &backend, &options).unwrap();
}

/// A tiny GPT-2 and a tiny Llama, trained once per test binary.
fn runs() -> &'static (PathBuf, Vec<PathBuf>) {
    static RUNS: OnceLock<(PathBuf, Vec<PathBuf>)> = OnceLock::new();
    RUNS.get_or_init(|| {
        let dir = common::scratch_dir("engine-runs");
        let paths: Vec<PathBuf> = ["gpt2", "llama"].iter().map(|a| dir.join(a)).collect();
        for (arch, path) in ["gpt2", "llama"].iter().zip(&paths) {
            train_into(&common::tiny_lm_toml(arch, 60), path);
        }
        (dir, paths)
    })
}

/// Eight prompts of eight different lengths, cut from the validation text.
const PROMPTS: [&str; 8] = [
    "R",
    "KING:",
    "First Cit",
    "Thou art a",
    "O Romeo, Romeo",
    "What light through",
    "To be, or not to be:",
    "Now is the winter of our",
];

fn open(dir: &Path, device: &Device) -> (LoadedModel, Vec<Vec<u32>>) {
    let loaded = LoadedModel::open(dir, WhichWeights::Latest, device).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let prompts = PROMPTS.iter().map(|p| tok.encode(p).unwrap()).collect();
    (loaded, prompts)
}

fn lm(loaded: &LoadedModel) -> &dyn CausalLm {
    match &loaded.model {
        Model::CausalLm(m) => m.as_ref(),
        _ => panic!("not a language model"),
    }
}

fn config(max_batch: usize) -> EngineConfig {
    with_step_prompt(max_batch, kiln_infer::engine::STEP_PROMPT)
}

/// Prompts of up to `step_prompt` tokens run inside the batched pass; longer ones (all,
/// with 0) prefill in chunks of 8.
fn with_step_prompt(max_batch: usize, step_prompt: usize) -> EngineConfig {
    EngineConfig {
        max_batch,
        prefill_chunk: 8,
        step_prompt,
        context_full: ContextFull::Stop,
    }
}

/// Each prompt through an engine of its own (the "alone" reference).
fn alone(model: &dyn CausalLm, device: &Device, requests: &[Request], step_prompt: usize) -> Vec<Vec<u32>> {
    requests
        .iter()
        .map(|r| {
            let mut engine = Engine::new(model, device, None, with_step_prompt(1, step_prompt));
            engine.add(r.clone()).unwrap();
            engine.run(|_| true).unwrap().remove(0).tokens
        })
        .collect()
}

fn batched(
    model: &dyn CausalLm,
    device: &Device,
    requests: &[Request],
    max_batch: usize,
    step_prompt: usize,
) -> Vec<Vec<u32>> {
    let mut engine = Engine::new(model, device, None, with_step_prompt(max_batch, step_prompt));
    for r in requests {
        engine.add(r.clone()).unwrap();
    }
    engine.run(|_| true).unwrap().into_iter().map(|c| c.tokens).collect()
}

fn requests(prompts: &[Vec<u32>], sampling: impl Fn(usize) -> Sampling) -> Vec<Request> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request::new(p.clone(), 12 + i, sampling(i)))
        .collect()
}

#[test]
fn a_batch_of_eight_prompts_gives_each_prompt_what_it_gives_alone() {
    let (_, dirs) = runs();
    for backend in [BackendKind::Flex, BackendKind::Ndarray] {
        let device = backend.device(0).unwrap();
        for dir in dirs {
            let (loaded, prompts) = open(dir, &device);
            let model = lm(&loaded);
            let greedy = requests(&prompts, |_| Sampling::greedy());
            let sampled = requests(&prompts, |i| Sampling {
                temperature: 0.9,
                top_k: Some(20),
                top_p: Some(0.95),
                seed: 100 + i as u64,
            });
            // The prompts (1-24 tokens) inside the batched pass, and all in chunks of 8.
            for (reqs, step_prompt) in [&greedy, &sampled]
                .into_iter()
                .flat_map(|r| [(r, kiln_infer::engine::STEP_PROMPT), (r, 0)])
            {
                let reference = alone(model, &device, reqs, step_prompt);
                // max_new_tokens, or as many as the 32-token context holds (the long prompts).
                let context = model.context_len();
                for (i, (t, p)) in reference.iter().zip(&prompts).enumerate() {
                    assert_eq!(t.len(), (12 + i).min(context + 1 - p.len()), "prompt {i}");
                }
                for max_batch in [8, 3] {
                    let together = batched(model, &device, reqs, max_batch, step_prompt);
                    assert_eq!(
                        together,
                        reference,
                        "{backend} {} max_batch {max_batch} step_prompt {step_prompt}",
                        dir.display()
                    );
                }
            }
            // The engine's single-sequence path is what `infer` ran before it: greedy
            // cached generation equals the uncached reference.
            let (cached, _) = generate(model, &prompts[3], 20, &Sampling::greedy(), true, &device, |_| {}).unwrap();
            let (uncached, _) = generate(model, &prompts[3], 20, &Sampling::greedy(), false, &device, |_| {}).unwrap();
            assert_eq!(cached, uncached, "{backend} {}", dir.display());
        }
    }
}

#[test]
fn sequences_join_and_leave_mid_flight_without_changing_the_others() {
    let (_, dirs) = runs();
    let device = Device::flex();
    let (loaded, prompts) = open(&dirs[1], &device);
    let model = lm(&loaded);
    let reqs = requests(&prompts, |_| Sampling::greedy());
    let reference = alone(model, &device, &reqs, kiln_infer::engine::STEP_PROMPT);
    let mut engine = Engine::new(model, &device, None, config(4));
    let first = engine.add(reqs[0].clone()).unwrap();
    let doomed = engine.add(reqs[1].clone()).unwrap();
    engine.step().unwrap();
    engine.step().unwrap();
    // Joins while the others decode.
    let late = engine.add(reqs[5].clone()).unwrap();
    engine.step().unwrap();
    let removed = engine.remove(doomed).expect("running");
    assert!(removed.cancelled && removed.tokens.len() < reqs[1].max_new_tokens);
    assert_eq!(removed.tokens[..], reference[1][..removed.tokens.len()]);
    let done = engine.run(|_| true).unwrap();
    let by_id = |id| done.iter().find(|c| c.id == id).unwrap();
    assert_eq!(by_id(first).tokens, reference[0]);
    assert_eq!(by_id(late).tokens, reference[5]);
    assert!(engine.is_idle() && engine.remove(first).is_none());
}

#[test]
fn a_callback_can_cancel_and_every_stop_condition_gives_its_reason() {
    let (_, dirs) = runs();
    let device = Device::flex();
    let (loaded, prompts) = open(&dirs[0], &device);
    let model = lm(&loaded);
    let tok = loaded.tokenizer.as_ref().unwrap();
    let greedy = |prompt: &[u32], n: usize| Request::new(prompt.to_vec(), n, Sampling::greedy());
    let reference = alone(
        model,
        &device,
        &[greedy(&prompts[2], 20)],
        kiln_infer::engine::STEP_PROMPT,
    )
    .remove(0);

    // Max new tokens: `length`.
    let mut engine = Engine::new(model, &device, Some(tok), config(2));
    engine.add(greedy(&prompts[2], 20)).unwrap();
    let c = engine.run(|_| true).unwrap().remove(0);
    assert_eq!((c.finish_reason, c.tokens.len()), (FinishReason::Length, 20));
    assert_eq!(c.text.as_deref(), Some(tok.decode(&reference).unwrap().as_str()));

    // An end-of-sequence token: `stop`, the token is not part of the output.
    let eos = reference[5];
    let cut = reference.iter().position(|&t| t == eos).unwrap();
    let mut r = greedy(&prompts[2], 20);
    r.eos_token_ids = vec![eos];
    engine.add(r).unwrap();
    let c = engine.run(|_| true).unwrap().remove(0);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.tokens, reference[..cut]);
    assert_eq!(c.stop_string, None);

    // A stop string: `stop`, the text ends before it; streamed text never shows it.
    let full = tok.decode(&reference).unwrap();
    let stop: String = full.chars().skip(6).take(2).collect();
    let before = &full[..full.find(&stop).unwrap()];
    let mut r = greedy(&prompts[2], 20);
    r.stop_strings = vec![stop.clone()];
    engine.add(r).unwrap();
    let mut streamed = String::new();
    let c = engine
        .run(|e: &TokenEvent| {
            streamed += &e.text;
            true
        })
        .unwrap()
        .remove(0);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.stop_string.as_deref(), Some(stop.as_str()));
    assert_eq!(c.text.as_deref(), Some(before));
    assert_eq!(streamed, before);

    // The context fills (block_size 32) with ContextFull::Stop: `length` after the last
    // token the cache can hold.
    let context = model.context_len();
    engine.add(greedy(&prompts[7], 1000)).unwrap();
    let c = engine.run(|_| true).unwrap().remove(0);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.tokens.len(), context + 1 - prompts[7].len());

    // A callback that returns false cancels its sequence at the end of that step (a
    // sequence whose prompt finishes in a step also decodes in it: at most 2 tokens);
    // the other goes on.
    let a = engine.add(greedy(&prompts[2], 15)).unwrap();
    let b = engine.add(greedy(&prompts[3], 15)).unwrap();
    let done = engine.run(|e| e.id != a || e.token == u32::MAX).unwrap();
    let (ca, cb) = (
        done.iter().find(|c| c.id == a).unwrap(),
        done.iter().find(|c| c.id == b).unwrap(),
    );
    assert!(ca.cancelled && (1..=2).contains(&ca.tokens.len()), "{ca:?}");
    assert!(!cb.cancelled && cb.tokens.len() == 15);

    // Requests that cannot run are refused with the reason.
    assert!(engine.add(greedy(&[], 5)).unwrap_err().to_string().contains("empty"));
    let long = vec![prompts[0][0]; context + 1];
    assert!(
        engine
            .add(greedy(&long, 5))
            .unwrap_err()
            .to_string()
            .contains("longer than")
    );
    let mut bad = greedy(&prompts[0], 5);
    bad.sampling.top_p = Some(2.0);
    assert!(engine.add(bad).unwrap_err().to_string().contains("top_p"));
    let mut no_tok = Engine::new(model, &device, None, config(1));
    let mut r = greedy(&prompts[0], 5);
    r.stop_strings = vec!["x".into()];
    assert!(no_tok.add(r).unwrap_err().to_string().contains("tokenizer"));
}
