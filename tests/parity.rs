//! Backend parity: the same weights (one safetensors file) and the same batch give the
//! same logits and loss (1e-4 relative), the same gradients after one backward (1e-3
//! relative) and the same 20-step training curve (1e-3) on every backend compiled into
//! this build (flex and ndarray by default; wgpu and tch when their features are on).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use kiln_core::BackendKind;
use kiln_core::weights::{load_weights, save_weights};
use kiln_models::loss::cross_entropy;
use kiln_models::{BertConfig, CausalLm, CnnConfig, Gpt2Config, ImageClassifier, LlamaConfig, MlpConfig};
use kiln_train::config::RunConfig;
use kiln_train::optim::adamw;
use kiln_train::run::{Prepared, RunError, TaskJob, with_task};
use kiln_train::task::Task;
use kiln_train::training::train_step;

/// Every compiled CPU-capable backend other than the reference (flex).
fn others() -> Vec<BackendKind> {
    [BackendKind::Ndarray, BackendKind::Wgpu, BackendKind::Tch]
        .into_iter()
        .filter(|b| b.is_compiled())
        .collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// max |a - b| / max(1, max |b|)
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Gradients keyed by parameter path (ids differ between separately loaded copies).
struct GradsByPath<'a> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    out: BTreeMap<String, Vec<f32>>,
}

impl ModuleVisitor for GradsByPath<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.out.insert(self.path.join("."), values(g));
        }
    }
}

fn grads_by_path<M: Module>(model: &M, grads: &GradientsParams) -> BTreeMap<String, Vec<f32>> {
    let mut v = GradsByPath {
        grads,
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Forward `loss_of` on `backend` with the weights at `path`: (logits, loss, grads).
fn run_on<M: Module>(
    backend: BackendKind,
    init: impl Fn(&Device) -> M,
    path: &Path,
    logits_of: impl Fn(&M, &Device) -> Tensor<2>,
    targets: &[i64],
) -> (Vec<f32>, f32, BTreeMap<String, Vec<f32>>) {
    let device = backend.device(0).unwrap().autodiff();
    let model = load_weights(init(&device), path).unwrap();
    let logits = logits_of(&model, &device);
    let n = targets.len();
    let loss = cross_entropy(
        logits.clone(),
        Tensor::from_data(TensorData::new(targets.to_vec(), [n]), &device),
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let grads = grads_by_path(&model, &grads);
    (values(logits.inner()), loss.inner().into_scalar::<f32>(), grads)
}

fn check_arch<M: Module>(
    arch: &str,
    init: impl Fn(&Device) -> M,
    logits_of: impl Fn(&M, &Device) -> Tensor<2>,
    targets: &[i64],
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    save_weights(&init(&Device::flex()), &path).unwrap();
    let (logits, loss, grads) = run_on(BackendKind::Flex, &init, &path, &logits_of, targets);
    assert_eq!(
        grads.len(),
        kiln_core::weights::expected_shapes(&init(&Device::flex())).len(),
        "{arch}: every parameter has a gradient"
    );
    // Inference (no autodiff) can take other kernels than training: check it on every
    // backend, flex included, against flex's training-mode logits.
    for backend in std::iter::once(BackendKind::Flex).chain(others()) {
        let device = backend.device(0).unwrap();
        let model = load_weights(init(&device), &path).unwrap();
        let d = rel_diff(&values(logits_of(&model, &device)), &logits);
        eprintln!("{arch} {backend} vs flex: inference logits {d:.2e}");
        assert!(
            d <= 1e-4,
            "{arch} on {backend}: inference logits differ by {d} (relative)"
        );
    }
    for backend in others() {
        let (l, s, g) = run_on(backend, &init, &path, &logits_of, targets);
        let d = rel_diff(&l, &logits);
        eprintln!(
            "{arch} {backend} vs flex: logits {d:.2e}, loss {:.2e}",
            (s - loss).abs() / loss.abs()
        );
        assert!(d <= 1e-4, "{arch} on {backend}: logits differ by {d} (relative)");
        assert!(
            (s - loss).abs() <= 1e-4 * loss.abs(),
            "{arch} on {backend}: loss {s} vs {loss}"
        );
        let worst = grads.iter().map(|(k, v)| rel_diff(&g[k], v)).fold(0.0, f32::max);
        eprintln!("{arch} {backend} vs flex: gradients {worst:.2e}");
        assert!(
            worst <= 1e-3,
            "{arch} on {backend}: gradients differ by {worst} (relative)"
        );
    }
}

fn tokens(device: &Device, b: usize, t: usize, vocab: usize) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..b * t).map(|i| ((i * 31 + 7) % vocab) as i64).collect();
    Tensor::from_data(TensorData::new(ids, [b, t]), device)
}

#[test]
fn every_architecture_computes_the_same_on_every_backend() {
    let (b, t, v) = (2usize, 16usize, 50usize);
    let lm_targets: Vec<i64> = (0..b * t).map(|i| ((i * 13 + 5) % v) as i64).collect();
    let gpt2 = Gpt2Config {
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        block_size: 16,
        vocab_size: v,
        dropout: 0.0,
        bias: true,
        layer_norm_epsilon: 1e-5,
        activation: Default::default(),
    };
    check_arch(
        "gpt2",
        |d| gpt2.init(d),
        |m, d| CausalLm::forward(m, tokens(d, b, t, v)).reshape([b * t, v]),
        &lm_targets,
    );
    let llama = LlamaConfig {
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 32,
        intermediate_size: 64,
        block_size: 16,
        vocab_size: v,
        rope_theta: 1e4,
        rms_norm_eps: 1e-5,
        ..Default::default()
    };
    check_arch(
        "llama",
        |d| llama.init(d),
        |m, d| CausalLm::forward(m, tokens(d, b, t, v)).reshape([b * t, v]),
        &lm_targets,
    );
    // SmolLM2's shape of llama: tied head, explicit head_dim, with q/k/v biases.
    let llama_tied = LlamaConfig {
        tie_word_embeddings: true,
        head_dim: Some(16),
        qkv_bias: true,
        ..llama.clone()
    };
    check_arch(
        "llama (tied, head_dim, biases)",
        |d| llama_tied.init(d),
        |m, d| CausalLm::forward(m, tokens(d, b, t, v)).reshape([b * t, v]),
        &lm_targets,
    );
    // A window shorter than the sequence, so local layers mask far keys.
    let gemma3: kiln_models::Gemma3Config = serde_json::from_value(serde_json::json!({
        "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "head_dim": 16,
        "intermediate_size": 64, "block_size": 16, "vocab_size": v, "sliding_window": 3,
        "sliding_window_pattern": 2, "final_logit_softcapping": 30.0
    }))
    .unwrap();
    check_arch(
        "gemma3",
        |d| gemma3.init(d),
        |m, d| CausalLm::forward(m, tokens(d, b, t, v)).reshape([b * t, v]),
        &lm_targets,
    );
    let bert = BertConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        intermediate_size: 64,
        max_positions: 16,
        vocab_size: v,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        sentence_pooling: Default::default(),
        normalize: true,
        position_offset: 0,
    };
    check_arch(
        "bert",
        |d| bert.init(d),
        |m, d| {
            // Token states plus the pooled output, so that every parameter is exercised.
            // The second sequence ends in 5 padding positions.
            let mask: Vec<i64> = (0..b * t).map(|i| i64::from(i < b * t - 5)).collect();
            let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [b, t]), d);
            let hidden = m.forward(tokens(d, b, t, v), mask);
            let pooled = m.pooled(hidden.clone()).reshape([b, 1, 32]);
            (hidden + pooled).reshape([b * t, 32])
        },
        &lm_targets.iter().map(|x| x % 32).collect::<Vec<_>>(),
    );
    let images = kiln_data::ImageDataset::load(&common::fashion_small(), 8, 8).unwrap();
    let labels: Vec<i64> = images.train.labels.iter().map(|&l| l as i64).collect();
    let batch = |d: &Device| images.train.batch(&(0..8).collect::<Vec<_>>(), d).images;
    let mlp = MlpConfig {
        hidden_sizes: vec![32],
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    };
    check_arch(
        "mlp",
        |d| mlp.init(d),
        |m, d| ImageClassifier::forward(m, batch(d)),
        &labels,
    );
    let cnn = CnnConfig {
        channels: [4, 8],
        hidden_size: 16,
        input_shape: [1, 28, 28],
        num_classes: 10,
        dropout: 0.0,
    };
    check_arch(
        "cnn",
        |d| cnn.init(d),
        |m, d| ImageClassifier::forward(m, batch(d)),
        &labels,
    );
}

/// 20 optimizer steps of the real training loop, from the same initial weights.
struct Curve<'a> {
    weights: &'a Path,
    save: bool,
    device: Device,
}

impl TaskJob for Curve<'_> {
    type Output = Vec<f64>;

    fn run<T: Task>(self, mut task: T, model: T::Model, prepared: &Prepared) -> Result<Vec<f64>, RunError> {
        if self.save {
            save_weights(&model, self.weights)?;
        }
        let mut model = load_weights(model, self.weights)?;
        let mut optim = adamw(&prepared.config.optim, &model);
        let mut losses = Vec::new();
        for step in 0..20 {
            let (next, stats) = train_step(
                &mut task,
                model,
                &mut optim,
                prepared.config.recipe(),
                step,
                &self.device,
            );
            model = next;
            losses.push(stats.loss);
        }
        Ok(losses)
    }
}

#[test]
fn twenty_training_steps_follow_the_same_curve_on_every_backend() {
    for (arch, toml) in [
        ("gpt2", common::tiny_lm_toml("gpt2", 20)),
        ("llama", common::tiny_lm_toml("llama", 20)),
        ("cnn", common::tiny_image_toml("cnn", 20)),
    ] {
        let cfg = RunConfig::parse(&toml, Path::new("t.toml"), &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("init.safetensors");
        let run = |backend: BackendKind, save: bool| {
            let device = backend.device(0).unwrap().autodiff();
            with_task(
                cfg.clone(),
                None,
                &device,
                Curve {
                    weights: &weights,
                    save,
                    device: device.clone(),
                },
            )
            .unwrap()
        };
        let reference = run(BackendKind::Flex, true);
        for backend in others() {
            let curve = run(backend, false);
            let worst = curve
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            eprintln!("{arch} {backend} vs flex: 20-step loss curve {worst:.2e}");
            assert!(
                worst <= 1e-3,
                "{arch} on {backend}: loss curves differ by {worst}: {curve:?} vs {reference:?}"
            );
        }
    }
}

/// A deterministic input of `shape`, values in [-2, 2).
fn input<const D: usize>(device: &Device, shape: [usize; D], salt: usize) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % 4001) as f32 / 1000.0 - 2.0)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// A tracked input of a fused op, by rank.
enum Leaf {
    R1(Tensor<1>),
    R2(Tensor<2>),
    R3(Tensor<3>),
    R4(Tensor<4>),
}

impl Leaf {
    fn grad(&self, grads: &burn::tensor::Gradients) -> Vec<f32> {
        let missing = "a tracked input has a gradient";
        match self {
            Leaf::R1(t) => values(t.grad(grads).expect(missing)),
            Leaf::R2(t) => values(t.grad(grads).expect(missing)),
            Leaf::R3(t) => values(t.grad(grads).expect(missing)),
            Leaf::R4(t) => values(t.grad(grads).expect(missing)),
        }
    }
}

/// One `kiln_models::fused` op on `device` (with autodiff): its output and its inputs.
type FusedCase = fn(&Device) -> (Tensor<4>, Vec<Leaf>);

/// The output and the gradients of `sum(output * w)` (w fixed, non-uniform) with respect
/// to each input.
fn output_and_grads(device: &Device, case: FusedCase) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (out, inputs) = case(device);
    let w = input(device, out.dims(), 99);
    let grads = (out.clone() * w).sum().backward();
    let input_grads = inputs.iter().map(|x| x.grad(&grads)).collect();
    (values(out.inner()), input_grads)
}

/// The ops Kiln fuses on libtorch (linear and conv2d with and without bias, layer norm,
/// tanh GELU, ReLU, SiLU, causal and full attention, log-softmax, and the cases left to Burn:
/// `Same` padding, causal Tq != Tk) give
/// Burn's composed results, forward and backward, on every backend.
#[test]
fn fused_ops_match_burns_composed_ops_on_every_backend() {
    use burn::tensor::ops::AttentionModuleOptions;
    use kiln_models::fused;
    fn tracked<const D: usize>(device: &Device, shape: [usize; D], salt: usize) -> Tensor<D> {
        input(device, shape, salt).require_grad()
    }
    use Leaf::{R1, R2, R3, R4};
    fn attention_case(device: &Device, tq: usize, causal: bool) -> (Tensor<4>, Vec<Leaf>) {
        let (q, k, v) = (
            tracked(device, [2, 3, tq, 8], 1),
            tracked(device, [2, 3, 5, 8], 2),
            tracked(device, [2, 3, 5, 8], 3),
        );
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        };
        let out = fused::attention(q.clone(), k.clone(), v.clone(), None, None, options);
        (out, vec![R4(q), R4(k), R4(v)])
    }
    fn linear_case(device: &Device, bias: bool) -> (Tensor<4>, Vec<Leaf>) {
        // T = 64, a multiple of 32: Burn's Linear takes its batched-matmul path here.
        let x = tracked(device, [2, 64, 16], 1);
        let w = input(device, [16, 24], 2).require_grad();
        let b = input(device, [24], 3).require_grad();
        let layer = kiln_models::quant::Linear {
            weight: burn::module::Param::from_tensor(w.clone()),
            bias: bias.then(|| burn::module::Param::from_tensor(b.clone())),
            packed: None,
        };
        let out = fused::linear(&layer, x.clone()).reshape([2, 64, 4, 6]);
        let mut leaves = vec![R3(x), R2(w)];
        leaves.extend(bias.then(|| R1(b)));
        (out, leaves)
    }
    fn conv_case(device: &Device, padding: burn::nn::PaddingConfig2d) -> (Tensor<4>, Vec<Leaf>) {
        let x = tracked(device, [2, 3, 9, 9], 1);
        let layer = burn::nn::conv::Conv2dConfig::new([3, 4], [3, 3])
            .with_stride([2, 1])
            .with_padding(padding)
            .init(device);
        let w = input(device, [4, 3, 3, 3], 2).require_grad();
        let b = input(device, [4], 3).require_grad();
        let layer = burn::nn::conv::Conv2d {
            weight: burn::module::Param::from_tensor(w.clone()),
            bias: Some(burn::module::Param::from_tensor(b.clone())),
            ..layer
        };
        (fused::conv2d(&layer, x.clone()), vec![R4(x), R4(w), R1(b)])
    }
    let cases: [(&str, FusedCase); 14] = [
        ("linear", |d| linear_case(d, true)),
        ("linear without bias", |d| linear_case(d, false)),
        ("conv2d", |d| {
            conv_case(d, burn::nn::PaddingConfig2d::Explicit(1, 2, 1, 2))
        }),
        ("conv2d, valid", |d| conv_case(d, burn::nn::PaddingConfig2d::Valid)),
        ("conv2d, same (Burn's)", |d| {
            conv_case(d, burn::nn::PaddingConfig2d::Same)
        }),
        ("layer_norm", |d| {
            let (x, g, b) = (tracked(d, [2, 3, 5, 16], 1), tracked(d, [16], 2), tracked(d, [16], 3));
            let out = fused::layer_norm(x.clone(), g.clone(), Some(b.clone()), 1e-5);
            (out, vec![R4(x), R1(g), R1(b)])
        }),
        ("layer_norm without bias", |d| {
            let (x, g) = (tracked(d, [2, 3, 5, 16], 4), tracked(d, [16], 5));
            (fused::layer_norm(x.clone(), g.clone(), None, 1e-5), vec![R4(x), R1(g)])
        }),
        ("gelu_tanh", |d| {
            let x = tracked(d, [2, 3, 5, 16], 6);
            (fused::gelu_tanh(x.clone()), vec![R4(x)])
        }),
        ("relu", |d| {
            let x = tracked(d, [2, 3, 5, 16], 9);
            (fused::relu(x.clone()), vec![R4(x)])
        }),
        ("silu", |d| {
            let x = tracked(d, [2, 3, 5, 16], 7);
            (fused::silu(x.clone()), vec![R4(x)])
        }),
        ("causal attention", |d| attention_case(d, 5, true)),
        ("attention", |d| attention_case(d, 5, false)),
        ("causal attention, Tq < Tk", |d| attention_case(d, 2, true)),
        ("log_softmax", |d| {
            let x = tracked(d, [2, 3, 5, 16], 8);
            (fused::log_softmax(x.clone(), 3), vec![R4(x)])
        }),
    ];
    for (name, case) in cases {
        let (want, want_grads) = output_and_grads(&Device::flex().autodiff(), case);
        for backend in others() {
            let (got, got_grads) = output_and_grads(&backend.device(0).unwrap().autodiff(), case);
            let d = rel_diff(&got, &want);
            let g = got_grads
                .iter()
                .zip(&want_grads)
                .map(|(a, b)| rel_diff(a, b))
                .fold(0.0, f32::max);
            eprintln!("{name} {backend} vs flex: output {d:.2e}, gradients {g:.2e}");
            assert!(d <= 1e-5, "{name} on {backend}: output differs by {d} (relative)");
            assert!(g <= 1e-4, "{name} on {backend}: gradients differ by {g} (relative)");
        }
    }
}

/// Kiln's AdamW (fused on libtorch) makes the same updates as Burn's `AdamW` on flex: five
/// steps with weight decay on a matrix, moments and parameters compared.
#[test]
fn adamw_matches_burns_adamw_on_every_backend() {
    use burn::optim::{AdamWConfig, Optimizer};
    use kiln_train::config::OptimConfig;
    let cfg = OptimConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
        ..OptimConfig::default()
    };
    let burn = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-6)
        .with_weight_decay(0.1)
        .build();
    let run = |device: &Device, kiln: bool| {
        let mut param = input(device, [8, 16], 1);
        let mut state = None;
        for step in 0..5 {
            let grad = input(device, [8, 16], 2 + step) * 0.1;
            let lr = 0.01 * (step + 1) as f64;
            (param, state) = if kiln {
                kiln_train::optim::AdamW::new(&cfg, cfg.weight_decay).step(lr, param, grad, state)
            } else {
                burn.step(lr, param, grad, state)
            };
        }
        let momentum = state.expect("AdamW keeps a state").momentum;
        [param, momentum.moment_1, momentum.moment_2].map(values)
    };
    let want = run(&Device::flex(), false);
    for backend in std::iter::once(BackendKind::Flex).chain(others()) {
        let got = run(&backend.device(0).unwrap(), true);
        let d = got.iter().zip(&want).map(|(a, b)| rel_diff(a, b)).fold(0.0, f32::max);
        eprintln!("adamw {backend} vs Burn's on flex: {d:.2e}");
        assert!(
            d <= 1e-5,
            "AdamW on {backend}: parameters or moments differ by {d} (relative)"
        );
    }
}

/// Whole prompts inside the batched step (`forward_chunks`, the fused pass on flex):
/// each prompt's rows attend causally over its own sequence, so its last logits are
/// the prefill's (`forward_cached_last`, Burn's ops) to 1e-5 relative, and the decode
/// steps after it read the same cached keys and values; a sequence's logits have the
/// same bits alone as batched with a 10-token prompt and a decoding sequence (13 rows,
/// past the kernels' 8).
fn chunks_match_the_prefill<M: CausalLm>(name: &str, model: &M, device: &Device) {
    let ids = |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), device);
    let step = |model: &M, token: u32, cache: &mut kiln_models::KvCache| {
        values(model.forward_step(ids(&[token as i64]), &mut [cache]))
    };
    let (p1, p2): (&[u32], &[u32]) = (&[1, 5, 2, 7, 3, 9, 4, 10, 6, 8], &[4, 6]);
    // The reference: each prompt prefilled on its own by Burn's ops, then one step each.
    let mut want = Vec::new();
    let mut tails = Vec::new();
    for p in [p1, p2] {
        let mut cache = model.new_cache(1, device);
        let ids64: Vec<i64> = p.iter().map(|&t| t as i64).collect();
        want.push(values(model.forward_cached_last(ids(&ids64), &mut cache)));
        tails.push(step(model, 3, &mut cache));
    }
    // One prompt alone through the chunk pass.
    let mut alone = model.new_cache(1, device);
    let alone_logits = values(
        model
            .forward_chunks(&[p1], &mut [&mut alone])
            .expect("the fused layout"),
    );
    assert_eq!(alone.len(), p1.len(), "{name}: the chunk advanced its cache");
    // Both prompts and a decoding sequence in one pass.
    let (mut a, mut b, mut c) = (
        model.new_cache(1, device),
        model.new_cache(1, device),
        model.new_cache(1, device),
    );
    let _ = model
        .forward_chunks(&[&[2, 2]], &mut [&mut c])
        .expect("the fused layout");
    let batched = values(
        model
            .forward_chunks(&[p1, &[5], p2], &mut [&mut a, &mut c, &mut b])
            .expect("the fused layout"),
    );
    let v = batched.len() / 3;
    assert_eq!(
        alone_logits,
        batched[..v],
        "{name}: a prompt's logits have the same bits alone and batched"
    );
    for (got, want) in [(&batched[..v], &want[0]), (&batched[2 * v..], &want[1])] {
        assert!(
            rel_diff(got, want) < 1e-5,
            "{name}: chunk vs prefill {}",
            rel_diff(got, want)
        );
    }
    for (cache, want) in [(&mut a, &tails[0]), (&mut b, &tails[1])] {
        let got = step(model, 3, cache);
        assert!(
            rel_diff(&got, want) < 1e-5,
            "{name}: the step after a chunk vs after a prefill {}",
            rel_diff(&got, want)
        );
    }
}

/// Decode steps of two sequences of different lengths (a prefill each, one of 10 rows,
/// past the kernels' 8, one of 2; then batched `forward_step`s, the last with eight more
/// sequences, ten rows): on flex these run Kiln's
/// kernels (matrix-vector products, RMS norm, rotary embedding, attention over the cache
/// buffers, `kiln-kernels`) op by op with the weights as Burn stores them, and as one
/// fused pass per step with the inference loader's layout; on every other backend Burn's
/// ops. Same weights, same logits to 1e-4 relative (1e-5 between the two flex paths):
/// grouped-query heads, q/k/v biases and a tied head (llama), its own head and output
/// and MLP biases (llama-untied), and a sliding window shorter than the sequence, q/k
/// norms and a soft-capped head (gemma3).
#[test]
fn decode_steps_on_flex_kernels_match_every_backend() {
    fn steps<M: CausalLm>(model: &M, device: &Device) -> Vec<f32> {
        let ids = |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), device);
        let (mut a, mut b) = (model.new_cache(1, device), model.new_cache(1, device));
        let mut out = values(model.forward_cached(ids(&[1, 5, 2, 7, 3, 9, 4, 10, 6, 8]), &mut a));
        out.extend(values(model.forward_cached(ids(&[4, 6]), &mut b)));
        for step in 0..5i64 {
            let next = vec![(3 * step + 1) % 11, (5 * step + 2) % 11];
            let step = Tensor::<2, Int>::from_data(TensorData::new(next, [2, 1]), device);
            out.extend(values(model.forward_step(step, &mut [&mut a, &mut b])));
        }
        // Ten sequences in one step: more rows than the kernels take in one pass.
        let mut more: Vec<kiln_models::KvCache> = (0..8i64)
            .map(|i| {
                let mut cache = model.new_cache(1, device);
                out.extend(values(model.forward_cached(ids(&[i % 11, 3]), &mut cache)));
                cache
            })
            .collect();
        // (One step: the first sequence then fills the tiny models' 16 positions.)
        for step in 0..1i64 {
            let next: Vec<i64> = (0..10).map(|i| (7 * step + i + 1) % 11).collect();
            let step = Tensor::<2, Int>::from_data(TensorData::new(next, [10, 1]), device);
            let mut all: Vec<&mut kiln_models::KvCache> = vec![&mut a, &mut b];
            all.extend(more.iter_mut());
            out.extend(values(model.forward_step(step, &mut all)));
        }
        out
    }
    /// Flex with Burn's layout, then with `for_decoding`'s (the fused step), then every
    /// other compiled backend: the same logits.
    fn check<M: CausalLm + Module + Clone>(name: &str, init: impl Fn(&Device) -> M, dir: &Path) {
        let flex = Device::flex();
        let model = init(&flex);
        let path = dir.join(format!("{name}.safetensors"));
        save_weights(&model, &path).unwrap();
        let want = steps(&model, &flex);
        // The inference loader's layout (`fused::for_decoding`: [out, in] weights) runs
        // each decode step as one pass over flex buffers (`fused::step`).
        let fused_before = kiln_models::fused::fused_decode_steps();
        let got = steps(&kiln_models::fused::for_decoding(model.clone()), &flex);
        assert!(
            kiln_models::fused::fused_decode_steps() >= fused_before + 6,
            "{name}: the decode layout's steps ran fused (ten sequences too)"
        );
        assert!(
            rel_diff(&want, &got) < 1e-5,
            "{name}, decode layout: {}",
            rel_diff(&want, &got)
        );
        let mut cache = model.new_cache(1, &flex);
        assert!(
            model.forward_chunks(&[&[1, 2]], &mut [&mut cache]).is_none() && cache.is_empty(),
            "{name}: Burn's layout has no batched chunk pass (and it changes nothing)"
        );
        chunks_match_the_prefill(name, &kiln_models::fused::for_decoding(model.clone()), &flex);
        let mut compared = 0;
        for kind in [BackendKind::Ndarray, BackendKind::Wgpu, BackendKind::Tch] {
            if !kind.is_compiled() {
                continue;
            }
            let device = kind.device(0).unwrap();
            let got = steps(&load_weights(init(&device), &path).unwrap(), &device);
            assert!(
                rel_diff(&want, &got) < 1e-4,
                "{name} on {kind:?}: {}",
                rel_diff(&want, &got)
            );
            compared += 1;
        }
        assert!(compared > 0, "ndarray is always compiled in");
    }
    let dir = tempfile::tempdir().unwrap();
    let llama = LlamaConfig {
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        n_embd: 16,
        intermediate_size: 24,
        block_size: 16,
        vocab_size: 11,
        head_dim: Some(8),
        qkv_bias: true,
        tie_word_embeddings: true,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        ..Default::default()
    };
    check("llama", |d| llama.init(d), dir.path());
    // Its own head, biases on the attention output and the MLP, no grouping.
    let untied = LlamaConfig {
        n_kv_head: 4,
        head_dim: None,
        qkv_bias: false,
        o_bias: true,
        mlp_bias: true,
        tie_word_embeddings: false,
        ..llama.clone()
    };
    check("llama-untied", |d| untied.init(d), dir.path());
    let gemma: kiln_models::Gemma3Config = serde_json::from_value(serde_json::json!({
        "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 16, "head_dim": 8,
        "intermediate_size": 24, "block_size": 16, "vocab_size": 11, "sliding_window": 3,
        "sliding_window_pattern": 2, "final_logit_softcapping": 30.0
    }))
    .unwrap();
    check("gemma3", |d| gemma.init(d), dir.path());
}
