//! The libtorch side of [`super`]: a Burn backend extension (`#[backend_extension]`,
//! Burn's documented way to add an operation to a backend) implemented for `LibTorch`
//! and for `Autodiff<LibTorch>`.
//!
//! - Inference (`LibTorch`): libtorch's kernel (`addmm`, `conv2d`, `layer_norm`,
//!   `gelu(approximate="tanh")`, `silu`, `relu`, `scaled_dot_product_attention`, `log_softmax`).
//! - Training (`Autodiff<LibTorch>`): the same forward kernel, and a backward step in
//!   Burn's graph that calls libtorch's derivative. Linear: two GEMMs and a column sum
//!   ([`LinearBackward`]). GELU, SiLU, ReLU: `gelu_backward`, `silu_backward`,
//!   `threshold_backward`. Log-softmax: `_log_softmax_backward_data`. Attention on the
//!   CPU: the flash-attention kernels forward and backward. Layer norm, convolution and
//!   attention on CUDA, whose backward kernels tch does not bind:
//!   libtorch's own autograd over that one op (its inputs enter as fresh leaves, so the
//!   recorded graph is the op's single node; see [`TorchOpGraph`]).
//! - AdamW: one in-place update per parameter ([`TorchFusedOps::adamw_update`]).
//!
//! Every tensor a backward step needs is held as a `TchTensor` clone, which also tells
//! burn-tch that the buffer is shared, so it is never overwritten in place.

// burn-tch is marked deprecated in Burn 0.22 but is the libtorch backend Kiln ships.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension};
use burn::prelude::*;

use super::AdamWStep;

/// Whether `x` lives on a libtorch device (CPU or CUDA, with or without autodiff).
pub(super) fn runs_on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::LibTorch(_))
}

pub(super) fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    epsilon: f64,
) -> Tensor<D> {
    let (x, gamma) = (x.into_dispatch(), gamma.into_dispatch());
    Tensor::from_dispatch(match beta {
        Some(beta) => <Dispatch as TorchFusedOps>::layer_norm(x, gamma, beta.into_dispatch(), epsilon),
        None => <Dispatch as TorchFusedOps>::layer_norm_no_bias(x, gamma, epsilon),
    })
}

pub(super) fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => <Dispatch as TorchFusedOps>::linear(x, weight, bias.into_dispatch()),
        None => <Dispatch as TorchFusedOps>::linear_no_bias(x, weight),
    })
}

/// Stride, symmetric padding, dilation and groups of a 2-D convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv2dOptions {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

pub(super) fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: Conv2dOptions) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => <Dispatch as TorchFusedOps>::conv2d(x, weight, bias.into_dispatch(), options),
        None => <Dispatch as TorchFusedOps>::conv2d_no_bias(x, weight, options),
    })
}

pub(super) fn adamw_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (param, m, v) = <Dispatch as TorchFusedOps>::adamw_update(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

pub(super) fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TorchFusedOps>::gelu_tanh(x.into_dispatch()))
}

pub(super) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, is_causal: bool, scale: f64) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TorchFusedOps>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        is_causal,
        scale,
    ))
}

pub(super) fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TorchFusedOps>::log_softmax(x.into_dispatch(), dim))
}

pub(super) fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TorchFusedOps>::relu(x.into_dispatch()))
}

pub(super) fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TorchFusedOps>::silu(x.into_dispatch()))
}

/// Operations Kiln runs as single libtorch kernels (only ever called for tensors on a
/// libtorch device; see [`runs_on_libtorch`]).
#[backend_extension(LibTorch, Autodiff)]
pub trait TorchFusedOps: Backend {
    /// `x @ weight + bias`; `x` `[..., in]`, `weight` `[in, out]`, `bias` `[out]`.
    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x @ weight`.
    fn linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// 2-D convolution; `x` `[B, C_in, H, W]`, `weight` `[C_out, C_in / groups, kH, kW]`.
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: Conv2dOptions,
    ) -> FloatTensor<Self>;
    /// 2-D convolution without a bias.
    fn conv2d_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: Conv2dOptions) -> FloatTensor<Self>;
    /// Layer norm over the last dimension of `x`; `gamma`, `beta`: `[C]`.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
    /// Layer norm without a bias.
    fn layer_norm_no_bias(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;
    /// GELU, tanh approximation.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `max(x, 0)`.
    fn relu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x * sigmoid(x)`.
    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `softmax(q k^T * scale [+ causal mask]) v` over `[B, H, T, D]` tensors.
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        is_causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// `log(softmax(x))` along `dim`.
    fn log_softmax(x: FloatTensor<Self>, dim: usize) -> FloatTensor<Self>;
    /// One AdamW update -> `(param, m, v)`; see [`super::adamw_update`].
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `t` itself when burn-tch may write to its buffer, otherwise a copy.
fn writable(t: TchTensor) -> TchTensor {
    if t.can_mut() {
        t
    } else {
        TchTensor::new(t.tensor.copy())
    }
}

fn torch_adamw_update(
    param: TchTensor,
    grad: &TchTensor,
    m: TchTensor,
    v: TchTensor,
    s: AdamWStep,
) -> (TchTensor, TchTensor, TchTensor) {
    let (mut param, mut m, mut v) = (writable(param), writable(m), writable(v));
    // Bias corrections in f32, as Burn's AdamW computes them.
    let t = s.time as i32;
    let correction = |beta: f64| (1.0 - (beta as f32).powi(t)) as f64;
    let (correction_1, correction_2) = (correction(s.beta_1), correction(s.beta_2));
    // m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    let _ = m.tensor.lerp_(&grad.tensor, 1.0 - s.beta_1);
    let _ = v.tensor.lerp_(&grad.tensor.square(), 1.0 - s.beta_2);
    // param <- param (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps), the last term as
    // m / denom with denom = (sqrt(v) + eps sqrt(c2)) / (-lr sqrt(c2) / c1).
    let mut denom = v.tensor.sqrt();
    let _ = denom.g_add_scalar_(s.epsilon * correction_2.sqrt());
    let _ = denom.g_mul_scalar_(-correction_1 / (s.lr * correction_2.sqrt()));
    if s.weight_decay != 0.0 {
        let _ = param.tensor.g_mul_scalar_(1.0 - s.lr * s.weight_decay);
    }
    let _ = param.tensor.addcdiv_(&m.tensor, &denom);
    (param, m, v)
}

fn torch_attention(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, is_causal: bool, scale: f64) -> tch::Tensor {
    tch::Tensor::scaled_dot_product_attention(q, k, v, None::<tch::Tensor>, 0.0, is_causal, scale, false)
}

const TANH: &str = "tanh";

/// `x` `[..., in]` as one `[rows, in]` matrix (a view when `x` is contiguous).
fn rows(x: &tch::Tensor) -> tch::Tensor {
    let d_in = *x.size().last().expect("linear: a tensor of rank 0");
    x.reshape([-1, d_in])
}

/// `[rows, n]` back to `like`'s leading dimensions: `[..., n]`.
fn unfold_rows(y: tch::Tensor, like: &tch::Tensor) -> tch::Tensor {
    let mut shape = like.size();
    *shape.last_mut().expect("rank >= 1") = *y.size().last().expect("rank 2");
    y.reshape(shape)
}

fn torch_linear(x: &tch::Tensor, weight: &tch::Tensor, bias: Option<&tch::Tensor>) -> tch::Tensor {
    let x2 = rows(x);
    let y = match bias {
        Some(bias) => bias.addmm(&x2, weight),
        None => x2.mm(weight),
    };
    unfold_rows(y, x)
}

fn torch_conv2d(x: &tch::Tensor, weight: &tch::Tensor, bias: Option<&tch::Tensor>, o: Conv2dOptions) -> tch::Tensor {
    let pair = |v: [usize; 2]| [v[0] as i64, v[1] as i64];
    x.conv2d(
        weight,
        bias,
        pair(o.stride),
        pair(o.padding),
        pair(o.dilation),
        o.groups as i64,
    )
}

fn torch_layer_norm(x: &tch::Tensor, gamma: &tch::Tensor, beta: Option<&tch::Tensor>, epsilon: f64) -> tch::Tensor {
    let c = *x.size().last().expect("layer_norm: a tensor of rank 0");
    // cudnn_enable only matters on CUDA, where it lets libtorch pick cuDNN's kernel.
    x.layer_norm([c], Some(gamma), beta, epsilon, true)
}

impl TorchFusedOps for LibTorch {
    fn conv2d(x: TchTensor, weight: TchTensor, bias: TchTensor, options: Conv2dOptions) -> TchTensor {
        TchTensor::new(torch_conv2d(&x.tensor, &weight.tensor, Some(&bias.tensor), options))
    }

    fn conv2d_no_bias(x: TchTensor, weight: TchTensor, options: Conv2dOptions) -> TchTensor {
        TchTensor::new(torch_conv2d(&x.tensor, &weight.tensor, None, options))
    }

    fn linear(x: TchTensor, weight: TchTensor, bias: TchTensor) -> TchTensor {
        TchTensor::new(torch_linear(&x.tensor, &weight.tensor, Some(&bias.tensor)))
    }

    fn linear_no_bias(x: TchTensor, weight: TchTensor) -> TchTensor {
        TchTensor::new(torch_linear(&x.tensor, &weight.tensor, None))
    }

    fn layer_norm(x: TchTensor, gamma: TchTensor, beta: TchTensor, epsilon: f64) -> TchTensor {
        TchTensor::new(torch_layer_norm(&x.tensor, &gamma.tensor, Some(&beta.tensor), epsilon))
    }

    fn layer_norm_no_bias(x: TchTensor, gamma: TchTensor, epsilon: f64) -> TchTensor {
        TchTensor::new(torch_layer_norm(&x.tensor, &gamma.tensor, None, epsilon))
    }

    fn gelu_tanh(x: TchTensor) -> TchTensor {
        x.unary_ops(|mut t| t.gelu_(TANH), |t| t.gelu(TANH))
    }

    fn relu(x: TchTensor) -> TchTensor {
        x.unary_ops(|mut t| t.relu_(), |t| t.relu())
    }

    fn silu(x: TchTensor) -> TchTensor {
        x.unary_ops(|mut t| t.silu_(), |t| t.silu())
    }

    fn attention(q: TchTensor, k: TchTensor, v: TchTensor, is_causal: bool, scale: f64) -> TchTensor {
        TchTensor::new(torch_attention(&q.tensor, &k.tensor, &v.tensor, is_causal, scale))
    }

    fn log_softmax(x: TchTensor, dim: usize) -> TchTensor {
        TchTensor::new(x.tensor.log_softmax(dim as i64, None))
    }

    fn adamw_update(
        param: TchTensor,
        grad: TchTensor,
        m: TchTensor,
        v: TchTensor,
        step: AdamWStep,
    ) -> (TchTensor, TchTensor, TchTensor) {
        torch_adamw_update(param, &grad, m, v, step)
    }
}

/// Backward of an elementwise activation whose derivative libtorch has as one kernel:
/// the state is the activation's input.
#[derive(Debug)]
struct ElementwiseBackward {
    derivative: fn(input: &tch::Tensor, grad: &tch::Tensor) -> tch::Tensor,
}

impl Backward<LibTorch, 1> for ElementwiseBackward {
    type State = TchTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let input = ops.state;
        unary::<LibTorch, _>(ops.parents, ops.node, grads, |grad| {
            TchTensor::new((self.derivative)(&input.tensor, &grad.tensor))
        });
    }
}

/// Forward of an elementwise activation under autodiff: `forward` on the inner backend,
/// and, when the input is tracked, an [`ElementwiseBackward`] step holding the input.
fn elementwise<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<LibTorch, C>>,
    forward: fn(TchTensor) -> TchTensor,
    derivative: fn(&tch::Tensor, &tch::Tensor) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let step = ElementwiseBackward { derivative };
    match step.prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let input = x.primitive().clone();
            prep.finish(input.clone(), forward(input))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}

/// Backward of [`TorchFusedOps::linear`] (3 parents: x, weight, bias) or
/// `linear_no_bias` (2): two GEMMs over the folded rows and a column sum.
#[derive(Debug)]
struct LinearBackward;

impl<const N: usize> Backward<LibTorch, N> for LinearBackward {
    /// The input `x` and the weight.
    type State = (TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let (x, weight) = ops.state;
        let grad_rows = rows(&grad.tensor); // [rows, out]
        let mut parents = ops.parents.into_iter();
        if let Some(node) = parents.next().flatten() {
            // [rows, out] @ [out, in] -> [..., in]
            let grad_x = unfold_rows(grad_rows.mm(&weight.tensor.tr()), &x.tensor);
            grads.register::<LibTorch>(node.id, TchTensor::new(grad_x));
        }
        if let Some(node) = parents.next().flatten() {
            // [in, rows] @ [rows, out]
            let grad_weight = rows(&x.tensor).tr().mm(&grad_rows);
            grads.register::<LibTorch>(node.id, TchTensor::new(grad_weight));
        }
        if let Some(node) = parents.next().flatten() {
            let grad_bias = grad_rows.sum_dim_intlist([0i64].as_slice(), false, None);
            grads.register::<LibTorch>(node.id, TchTensor::new(grad_bias));
        }
    }
}

/// Forward of `linear` / `linear_no_bias` under autodiff.
fn linear_autodiff<const N: usize, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let forward =
        |t: &[TchTensor]| TchTensor::new(torch_linear(&t[0].tensor, &t[1].tensor, t.get(2).map(|b| &b.tensor)));
    match LinearBackward
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let primitives: Vec<TchTensor> = inputs.iter().map(|t| t.primitive().clone()).collect();
            let output = forward(&primitives);
            prep.finish((primitives[0].clone(), primitives[1].clone()), output)
        }
        OpsKind::UnTracked(prep) => {
            let primitives: Vec<TchTensor> = inputs.into_iter().map(|t| t.into_primitive()).collect();
            prep.finish(forward(&primitives))
        }
    }
}

/// Backward of attention on the CPU: libtorch's flash-attention backward kernel, from the
/// inputs, the output and the row log-sum-exp its forward kernel returned.
#[derive(Debug)]
struct CpuFlashAttentionBackward {
    is_causal: bool,
    scale: f64,
}

impl Backward<LibTorch, 3> for CpuFlashAttentionBackward {
    /// q, k, v, the output and the log-sum-exp.
    type State = (TchTensor, TchTensor, TchTensor, TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let (q, k, v, out, logsumexp) = ops.state;
        let (grad_q, grad_k, grad_v) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
            &grad.tensor,
            &q.tensor,
            &k.tensor,
            &v.tensor,
            &out.tensor,
            &logsumexp.tensor,
            0.0,
            self.is_causal,
            None::<tch::Tensor>,
            self.scale,
        );
        for (parent, input_grad) in ops.parents.into_iter().zip([grad_q, grad_k, grad_v]) {
            if let Some(node) = parent {
                grads.register::<LibTorch>(node.id, TchTensor::new(input_grad));
            }
        }
    }
}

/// Backward of log-softmax along `dim`: libtorch's kernel, from the output.
#[derive(Debug)]
struct LogSoftmaxBackward {
    dim: i64,
}

impl Backward<LibTorch, 1> for LogSoftmaxBackward {
    type State = TchTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let output = ops.state;
        unary::<LibTorch, _>(ops.parents, ops.node, grads, |grad| {
            let kind = output.tensor.kind();
            TchTensor::new(tch::Tensor::internal_log_softmax_backward_data(
                &grad.tensor,
                &output.tensor,
                self.dim,
                kind,
            ))
        });
    }
}

/// One libtorch op recorded by libtorch's autograd: its inputs as leaves (`None` for an
/// input Burn does not track) and its output, still attached to that one-node graph.
#[derive(Debug, Clone)]
struct TorchOpGraph {
    leaves: Vec<Option<TchTensor>>,
    output: TchTensor,
}

impl TorchOpGraph {
    /// Run `op` over `inputs` with libtorch's autograd recording (a tracked input becomes a
    /// leaf that requires grad) -> the graph and the output, detached for Burn.
    fn record(inputs: Vec<(TchTensor, bool)>, op: impl FnOnce(&[tch::Tensor]) -> tch::Tensor) -> (Self, TchTensor) {
        let leaves: Vec<Option<TchTensor>> = inputs
            .iter()
            .map(|(t, tracked)| {
                tracked.then(|| TchTensor::from_existing(t.tensor.detach().set_requires_grad(true), t.storage.clone()))
            })
            .collect();
        let args: Vec<tch::Tensor> = leaves
            .iter()
            .zip(&inputs)
            .map(|(leaf, (t, _))| leaf.as_ref().unwrap_or(t).tensor.shallow_clone())
            .collect();
        let output = TchTensor::new(op(&args));
        let detached = TchTensor::from_existing(output.tensor.detach(), output.storage.clone());
        (TorchOpGraph { leaves, output }, detached)
    }

    /// The vector-Jacobian product: gradients of `sum(output * grad)` for each tracked
    /// leaf, in input order (`None` for the others).
    fn backward(self, grad: &TchTensor) -> Vec<Option<TchTensor>> {
        let tracked: Vec<&tch::Tensor> = self.leaves.iter().flatten().map(|l| &l.tensor).collect();
        let weighted = (&self.output.tensor * &grad.tensor).sum(None);
        let mut grads = tch::Tensor::run_backward(&[weighted], &tracked, false, false).into_iter();
        self.leaves
            .iter()
            .map(|leaf| {
                leaf.as_ref()
                    .map(|_| TchTensor::new(grads.next().expect("one gradient per leaf")))
            })
            .collect()
    }
}

/// Backward of an op recorded in a [`TorchOpGraph`] with `N` inputs.
#[derive(Debug)]
struct TorchAutogradBackward;

impl<const N: usize> Backward<LibTorch, N> for TorchAutogradBackward {
    type State = TorchOpGraph;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let input_grads = ops.state.backward(&grad);
        for (parent, input_grad) in ops.parents.iter().zip(input_grads) {
            if let (Some(node), Some(input_grad)) = (parent, input_grad) {
                grads.register::<LibTorch>(node.id, input_grad);
            }
        }
    }
}

/// Forward of a libtorch op over `N` autodiff inputs whose backward is libtorch's.
fn torch_autograd<const N: usize, C: CheckpointStrategy>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
    op: impl FnOnce(&[tch::Tensor]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    match TorchAutogradBackward
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let inputs = inputs.iter().map(|t| (t.primitive().clone(), t.is_tracked())).collect();
            let (graph, output) = TorchOpGraph::record(inputs, op);
            prep.finish(graph, output)
        }
        OpsKind::UnTracked(prep) => {
            let args: Vec<tch::Tensor> = inputs.into_iter().map(|t| t.into_primitive().tensor).collect();
            prep.finish(TchTensor::new(op(&args)))
        }
    }
}

impl<C: CheckpointStrategy> TorchFusedOps for Autodiff<LibTorch, C> {
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: Conv2dOptions,
    ) -> FloatTensor<Self> {
        torch_autograd::<3, C>([x, weight, bias], |t| torch_conv2d(&t[0], &t[1], Some(&t[2]), options))
    }

    fn conv2d_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: Conv2dOptions) -> FloatTensor<Self> {
        torch_autograd::<2, C>([x, weight], |t| torch_conv2d(&t[0], &t[1], None, options))
    }

    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        linear_autodiff::<3, C>([x, weight, bias])
    }

    fn linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        linear_autodiff::<2, C>([x, weight])
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        torch_autograd::<3, C>([x, gamma, beta], |t| {
            torch_layer_norm(&t[0], &t[1], Some(&t[2]), epsilon)
        })
    }

    fn layer_norm_no_bias(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        torch_autograd::<2, C>([x, gamma], |t| torch_layer_norm(&t[0], &t[1], None, epsilon))
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        elementwise::<C>(x, <LibTorch as TorchFusedOps>::gelu_tanh, |input, grad| {
            input.gelu_backward(grad, TANH)
        })
    }

    fn relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        elementwise::<C>(x, <LibTorch as TorchFusedOps>::relu, |input, grad| {
            input.threshold_backward(grad, 0.0)
        })
    }

    fn silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        elementwise::<C>(x, <LibTorch as TorchFusedOps>::silu, |input, grad| {
            input.silu_backward(grad)
        })
    }

    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        is_causal: bool,
        scale: f64,
    ) -> FloatTensor<Self> {
        if q.primitive().tensor.device() != tch::Device::Cpu {
            return torch_autograd::<3, C>([q, k, v], |t| torch_attention(&t[0], &t[1], &t[2], is_causal, scale));
        }
        let step = CpuFlashAttentionBackward { is_causal, scale };
        match step
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [q, k, v] = [q, k, v].map(|t| t.primitive().clone());
                let (out, logsumexp) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
                    &q.tensor,
                    &k.tensor,
                    &v.tensor,
                    0.0,
                    is_causal,
                    None::<tch::Tensor>,
                    scale,
                );
                let (out, logsumexp) = (TchTensor::new(out), TchTensor::new(logsumexp));
                prep.finish((q, k, v, out.clone(), logsumexp), out)
            }
            OpsKind::UnTracked(prep) => {
                let [q, k, v] = [q, k, v].map(|t| t.into_primitive());
                prep.finish(<LibTorch as TorchFusedOps>::attention(q, k, v, is_causal, scale))
            }
        }
    }

    fn log_softmax(x: FloatTensor<Self>, dim: usize) -> FloatTensor<Self> {
        let step = LogSoftmaxBackward { dim: dim as i64 };
        match step.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = <LibTorch as TorchFusedOps>::log_softmax(x.primitive().clone(), dim);
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(<LibTorch as TorchFusedOps>::log_softmax(x.into_primitive(), dim)),
        }
    }

    /// Optimizers update the inner tensors; an autodiff caller gets untracked results.
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, m, v) = torch_adamw_update(
            Self::inner(param),
            grad.primitive(),
            Self::inner(m),
            Self::inner(v),
            step,
        );
        (Self::from_inner(param), Self::from_inner(m), Self::from_inner(v))
    }
}
