//! Operations that run on libtorch as libtorch's own kernels, forward and backward.
//!
//! Under `Autodiff<LibTorch>`, Burn 0.22 differentiates layer norm, GPT-2's tanh GELU,
//! SiLU, ReLU, log-softmax and training-mode attention as the chains of elementwise and
//! reduction ops it composes them from (a layer norm: 9 kernels forward, about 20
//! backward), runs `[B, T, C]` linear layers as batched GEMMs, and differentiates
//! convolutions through generic paths; PyTorch runs one fused kernel each way. On the
//! nanoGPT CPU recipe that was the whole gap between Kiln's tch backend and PyTorch eager
//! (docs/benchmarks.md, "Where the training step goes").
//!
//! Each function here checks the tensor's device: on libtorch (with or without autodiff)
//! it calls Kiln's backend extension ([`libtorch`], Burn's `#[backend_extension]`),
//! which runs libtorch's kernels and their derivatives; on every other backend it is
//! exactly Burn's op. The models call these functions, so an architecture still reads,
//! and runs, the same on every backend; `tests/parity.rs` checks each op and its
//! gradients against Burn's.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::ops::AttentionModuleOptions;

use crate::quant::{Embedding, Linear};

pub(crate) mod flex;
#[cfg(feature = "tch")]
mod libtorch;
pub(crate) mod step;

pub use flex::MAX_ROWS as KERNEL_MAX_ROWS;

/// How many decode steps (`CausalLm::forward_step`) this process has run as one pass
/// over flex buffers ([`step`]) rather than op by op: for tests that check the fast path
/// is the one taken.
pub fn fused_decode_steps() -> usize {
    step::STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `x` lives on a libtorch device, where this module's libtorch kernels run.
pub fn runs_on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    return libtorch::runs_on_libtorch(x);
    #[cfg(not(feature = "tch"))]
    {
        let _ = x;
        false
    }
}

/// The hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected
/// moments), as Burn's `AdamW` applies them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// The number of this update, 1 for the first.
    pub time: usize,
}

/// One AdamW update on libtorch tensors, in place where the buffers are not shared: 8
/// libtorch kernels per parameter (lerp, square, lerp, sqrt, add, mul, mul, addcdiv)
/// where Burn's `AdamW` composes 15. `param`, `grad`, and the moments `m`, `v` (zeros
/// before the first update) -> the updated `(param, m, v)`. Only for tensors on libtorch
/// ([`runs_on_libtorch`]); Burn's `AdamW` computes the same update everywhere.
#[cfg(feature = "tch")]
pub fn adamw_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    libtorch::adamw_update(param, grad, m, v, step)
}

/// `layer` (weight `[in, out]`, Burn's `nn::Linear` layout, or packed blocks) applied
/// to `x` `[..., in]` -> `[..., out]`.
///
/// On libtorch every leading dimension is folded into the rows of one matrix product
/// with the bias added in the same GEMM (`addmm`, as `torch.nn.Linear` does). Burn's
/// `Linear` keeps a `[B, T, C]` input as B batched GEMMs when T is a multiple of 32 (a
/// tiling rule for GPU kernels); on MKL that cost 3.5 ms of a 39 ms gpt2 training step.
///
/// On flex, without autodiff, an input of at most [`KERNEL_MAX_ROWS`] rows (a decode
/// step) runs Kiln's multi-threaded matrix-vector kernel ([`flex`]); Burn's flex runs it
/// on one thread. A packed weight runs Kiln's quantized kernel on flex (any number of
/// rows) and is dequantized for Burn's matmul elsewhere.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let bias = layer.bias.as_ref().map(|b| b.val());
    if let (Some(packed), Some(shape)) = (&layer.packed, layer.packed_shape()) {
        if let Some(y) = flex::packed_linear(&x, packed, shape, bias.as_ref()) {
            return y;
        }
        return burn::tensor::module::linear(x, layer.dense_weight(), bias);
    }
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::linear(x, layer.weight.val(), bias);
    }
    let weight = layer.weight.val();
    if let Some(y) = flex::linear(&x, &weight, bias.as_ref()) {
        return y;
    }
    if flex::is_out_in(&weight) {
        // A prefill over [out, in] weights (`for_decoding`): as `(W x^T)^T`, the GEMM
        // reading the weight in its stored layout, as the tied head does.
        let dims = x.dims();
        let (k, n) = (dims[D - 1], weight.dims()[1]);
        let m = dims[..D - 1].iter().product::<usize>();
        let y = weight.transpose().matmul(x.reshape([m, k]).transpose()).transpose();
        let y = match bias {
            Some(b) => y + b.unsqueeze::<2>(),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = n;
        return y.reshape(out);
    }
    burn::tensor::module::linear(x, weight, bias)
}

/// `layers` applied to the same `x` -> one output each, as [`linear`] computes them; on
/// flex (decode-sized `x`, weights laid out by [`for_decoding`]) as one job of Kiln's
/// kernels instead of one per layer.
pub fn linears<const D: usize, const N: usize>(layers: [&Linear; N], x: Tensor<D>) -> [Tensor<D>; N] {
    if layers.iter().any(|l| l.packed.is_some()) {
        return layers.map(|l| linear(l, x.clone()));
    }
    let params: Vec<(Tensor<2>, Option<Tensor<1>>)> = layers
        .iter()
        .map(|l| (l.weight.val(), l.bias.as_ref().map(|b| b.val())))
        .collect();
    if let Some(ys) = flex::linears(&x, &params)
        && let Ok(ys) = <[Tensor<D>; N]>::try_from(ys)
    {
        return ys;
    }
    layers.map(|l| linear(l, x.clone()))
}

/// `model` with every `Linear` weight on flex stored `[out, in]` (a transposed view, the
/// same logical `[in, out]` tensor), the layout Kiln's decode kernels stream fastest, and
/// linear and embedding weights on huge pages (`kiln_kernels::memory`).
/// For inference only (the weights become untracked); a no-op on other backends.
pub fn for_decoding<M: Module>(model: M) -> M {
    struct DecodeLayout {
        /// The type of each module entered (`Struct:Linear`, ...).
        modules: Vec<String>,
        /// Where the re-laid weights go (shared huge pages).
        arena: kiln_kernels::memory::HugeArena,
        /// Bytes moved out of the heap since the last [`release_free_heap`](kiln_kernels::memory::release_free_heap).
        freed: usize,
    }
    impl burn::module::ModuleMapper for DecodeLayout {
        fn enter_module(&mut self, _name: &str, container_type: &str) {
            self.modules.push(container_type.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.modules.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let relayout: fn(Tensor<2>, &mut kiln_kernels::memory::HugeArena) -> Tensor<2> =
                match self.modules.last().map(String::as_str) {
                    Some("Struct:Linear") => flex::out_in_layout,
                    Some("Struct:Embedding") => flex::on_huge_pages,
                    _ => return param,
                };
            if D != 2 {
                return param;
            }
            param.map(|t| {
                if t.dims()[0] == 0 {
                    return t;
                }
                let t2 = Tensor::<2>::from_dispatch(t.into_dispatch());
                let bytes = t2.shape().num_elements() * 4;
                let moved = Tensor::<D>::from_dispatch(relayout(t2, &mut self.arena).into_dispatch());
                // The heap copy is freed now: hand its pages back every 32 MiB, or they
                // stay resident beside their huge-page copies until the last one goes
                // (Gemma 3 f32: 390 MB more at the peak).
                self.freed += bytes;
                if self.freed >= 32 << 20 {
                    kiln_kernels::memory::release_free_heap();
                    self.freed = 0;
                }
                moved
            })
        }
    }
    let model = model.map(&mut DecodeLayout {
        modules: Vec::new(),
        arena: kiln_kernels::memory::HugeArena::new(),
        freed: 0,
    });
    kiln_kernels::memory::release_free_heap();
    model
}

/// `layer` (Burn's `nn::conv::Conv2d`) applied to `x` `[B, C_in, H, W]` -> `[B, C_out, H', W']`.
///
/// On libtorch (valid or symmetric explicit padding) this is libtorch's convolution and,
/// in training, its `convolution_backward` (oneDNN on the CPU); Burn 0.22 differentiates
/// a libtorch convolution through a transposed convolution and a generic weight-gradient
/// path.
pub fn conv2d(layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        // `Same` (possibly asymmetric) stays with Burn.
        let padding = match layer.padding {
            burn::nn::PaddingConfig2d::Valid => Some([0, 0]),
            burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
                Some([top, left])
            }
            _ => None,
        };
        if let Some(padding) = padding {
            let options = libtorch::Conv2dOptions {
                stride: layer.stride,
                padding,
                dilation: layer.dilation,
                groups: layer.groups,
            };
            return libtorch::conv2d(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()), options);
        }
    }
    layer.forward(x)
}

/// A tied LM head: `x` `[..., C]` times the transposed token embedding `[V, C]` ->
/// `[..., V]`, computed as `(E x^T)^T` so the large embedding is read in its stored
/// layout (a transposed view of it would be copied on every call); a packed embedding
/// is a packed linear layer with the tokens as its outputs.
pub fn tied_head<const D: usize>(x: Tensor<D>, embedding: &Embedding) -> Tensor<D> {
    if let (Some(packed), Some(shape)) = (&embedding.packed, embedding.packed_shape())
        && let Some(y) = flex::packed_linear(&x, packed, shape, None)
    {
        return y;
    }
    let embedding = embedding.dense_weight();
    if let Some(y) = flex::tied_head(&x, &embedding) {
        return y;
    }
    let dims = x.dims();
    let c = dims[D - 1];
    let n = dims[..D - 1].iter().product::<usize>();
    let v = embedding.dims()[0];
    let mut out = dims;
    out[D - 1] = v;
    // [V, C] x [C, N] -> [V, N] -> [N, V]
    embedding.matmul(x.reshape([n, c]).transpose()).transpose().reshape(out)
}

/// Layer normalisation over the last dimension, Burn's `nn::LayerNorm` (same parameter
/// names `gamma` and `beta`, so checkpoints are unchanged) computed by [`layer_norm`].
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// `[C]`, initialised to ones.
    pub gamma: Param<Tensor<1>>,
    /// `[C]`, initialised to zeros; `None` for a norm without bias.
    pub beta: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub epsilon: f64,
}

impl LayerNorm {
    /// A fresh norm over `d_model` features: unit scale, zero bias (when `bias`).
    pub fn new(d_model: usize, epsilon: f64, bias: bool, device: &Device) -> Self {
        LayerNorm {
            gamma: Param::from_tensor(Tensor::ones([d_model], device)),
            beta: bias.then(|| Param::from_tensor(Tensor::zeros([d_model], device))),
            epsilon,
        }
    }

    /// `[..., C]` -> `[..., C]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.gamma.val(), self.beta.as_ref().map(|b| b.val()), self.epsilon)
    }
}

/// `(x - mean) / sqrt(var + epsilon) * gamma + beta` over the last dimension of `x`.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Option<Tensor<1>>, epsilon: f64) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::layer_norm(x, gamma, beta, epsilon);
    }
    burn::tensor::module::layer_norm(x, gamma, beta, epsilon)
}

/// GPT-2's GELU, the tanh approximation (HF "gelu_new", PyTorch's
/// `gelu(approximate="tanh")`): `0.5 x (1 + tanh(u))` with
/// `u = sqrt(2/pi) (x + 0.044715 x^3)`.
///
/// Off libtorch it is computed as the equal `x * sigmoid(2u)`: one `exp` per element
/// instead of `tanh` and `powf`, and a backward pass that reuses the sigmoid's output (on
/// the CPU backends those transcendental calls were a third of a training step).
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::gelu_tanh(x);
    }
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4;
    let cube = x.clone() * x.clone() * x.clone();
    let u2 = (x.clone() + cube * 0.044715) * TWO_SQRT_2_OVER_PI;
    x * sigmoid(u2)
}

/// Scaled dot-product attention, Burn's [`attention`](burn::tensor::module::attention)
/// with its arguments: `q` `[B, H, Tq, D]`, `k` and `v` `[B, H, Tk, D]` -> `[B, H, Tq, D]`.
///
/// On libtorch, attention without a mask, bias or softcap (causal only over a square
/// score matrix, where Burn's bottom-right and PyTorch's top-left alignments agree) is
/// `scaled_dot_product_attention`, whose CPU training path is a flash-attention kernel
/// forward and backward. Anything else is Burn's op.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    bias: Option<Tensor<4>>,
    options: AttentionModuleOptions,
) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&q)
        && mask.is_none()
        && bias.is_none()
        && options.softcap.is_none()
        && (!options.is_causal || q.dims()[2] == k.dims()[2])
    {
        let scale = options.scale.unwrap_or_else(|| 1.0 / (q.dims()[3] as f64).sqrt());
        return libtorch::attention(q, k, v, options.is_causal, scale);
    }
    burn::tensor::module::attention(q, k, v, mask, bias, options)
}

/// Burn's `nn::RmsNorm` applied to `x` `[..., C]`: `x / sqrt(mean(x^2) + eps) * gamma`.
/// On flex without autodiff it is one pass ([`flex`]), not five kernels.
pub fn rms_norm<const D: usize>(norm: &burn::nn::RmsNorm, x: Tensor<D>) -> Tensor<D> {
    if let Some(y) = flex::rms_norm(&x, &norm.gamma.val(), norm.epsilon, false) {
        return y;
    }
    norm.forward(x)
}

/// Llama's gated MLP activation, `silu(gate) * up`: one pass on flex without autodiff.
pub fn silu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if let Some(y) = flex::gated(&gate, &up, false) {
        return y;
    }
    silu(gate) * up
}

/// Gemma's gated MLP activation, `gelu_tanh(gate) * up`: one pass on flex without
/// autodiff.
pub fn gelu_tanh_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if let Some(y) = flex::gated(&gate, &up, true) {
        return y;
    }
    gelu_tanh(gate) * up
}

/// `log(softmax(x))` along `dim`.
pub fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::log_softmax(x, dim);
    }
    burn::tensor::activation::log_softmax(x, dim)
}

/// ReLU: `max(x, 0)`. On libtorch its backward is one `threshold_backward` kernel; Burn's
/// is a comparison and a (scalar) masked fill.
pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::relu(x);
    }
    burn::tensor::activation::relu(x)
}

/// SiLU (swish): `x * sigmoid(x)`.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if libtorch::runs_on_libtorch(&x) {
        return libtorch::silu(x);
    }
    burn::tensor::activation::silu(x)
}
