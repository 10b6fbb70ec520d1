//! The flex side of [`super`]: decode-sized matrix products on Kiln's own kernels
//! (`kiln-kernels`), multi-threaded, reading the weight in place.
//!
//! Burn 0.22's flex backend multiplies one activation row by a weight with the `gemm`
//! crate's single-threaded gemv path, two thirds of a decode step on SmolLM2-135M (perf).
//! Here a product of at most [`MAX_ROWS`] rows (every decode step, batched or not) of an
//! untracked f32 flex tensor runs [`kiln_kernels::linear_kn`] (a Burn `Linear` weight,
//! `[in, out]`) or [`kiln_kernels::linear_nk`] (a weight stored `[out, in]`, a transposed
//! view, or the token embedding of a tied head). Anything else (more rows, autodiff,
//! another dtype, a strided activation) returns `None` and stays with Burn.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind};
use burn::prelude::*;
use burn::tensor::{Bytes, DType, Shape};

pub use kiln_kernels::MAX_ROWS;

/// The untracked f32 flex tensor behind `x`, if that is what it is.
fn flex_f32<const D: usize>(x: &Tensor<D>) -> Option<FlexTensor> {
    let dispatch = x.clone().into_dispatch();
    if !matches!(dispatch.autodiff, DispatchAutodiffContext::Disabled) {
        return None;
    }
    match dispatch.kind {
        DispatchTensorKind::Flex(BackendTensor::Float(t)) if t.dtype() == DType::F32 => Some(t),
        _ => None,
    }
}

/// How a weight `[k, n]` is laid out in its storage.
enum WeightLayout<'a> {
    /// Row-major `[k, n]`.
    Kn(&'a [f32]),
    /// A transposed view of row-major `[n, k]`.
    Nk(&'a [f32]),
}

fn weight_layout(w: &FlexTensor) -> Option<WeightLayout<'_>> {
    let layout = w.layout();
    let dims = layout.shape().to_vec();
    let [k, n] = dims[..] else { return None };
    if let Some(slice) = w.as_slice::<f32>() {
        return Some(WeightLayout::Kn(slice));
    }
    if layout.strides() == [1, k as isize] {
        let start = layout.start_offset();
        let storage: &[f32] = w.storage();
        return storage.get(start..start + k * n).map(WeightLayout::Nk);
    }
    None
}

/// `y = x w + b` with `x` `[..., k]`, `w` `[k, n]`, `b` `[n]` when `x` has at most
/// [`MAX_ROWS`] rows and every tensor is an untracked f32 flex tensor; `None` otherwise.
pub(super) fn linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    if m == 0 || m > MAX_ROWS || weight.dims()[0] != k {
        return None;
    }
    let n = weight.dims()[1];
    let xt = flex_f32(x)?;
    let wt = flex_f32(weight)?;
    let bt = match bias {
        Some(b) => Some(flex_f32(b)?),
        None => None,
    };
    let xs = xt.as_slice::<f32>()?;
    let bs = match &bt {
        Some(b) => Some(b.as_slice::<f32>()?),
        None => None,
    };
    let mut y = vec![0f32; m * n];
    match weight_layout(&wt)? {
        WeightLayout::Kn(w) => kiln_kernels::linear_kn(xs, w, bs, &mut y, m, k, n),
        WeightLayout::Nk(w) => kiln_kernels::linear_nk(xs, w, bs, &mut y, m, k, n),
    }
    let mut out = dims;
    out[D - 1] = n;
    Some(wrap(y, &out))
}

/// `x` `[..., C]` times the transposed embedding `[V, C]` -> `[..., V]` (a tied head)
/// under the same conditions as [`linear`].
pub(super) fn tied_head<const D: usize>(x: &Tensor<D>, embedding: &Tensor<2>) -> Option<Tensor<D>> {
    let dims = x.dims();
    let c = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    let [v, ec] = embedding.dims();
    if m == 0 || m > MAX_ROWS || ec != c {
        return None;
    }
    let xt = flex_f32(x)?;
    let et = flex_f32(embedding)?;
    let (xs, es) = (xt.as_slice::<f32>()?, et.as_slice::<f32>()?);
    let mut y = vec![0f32; m * v];
    kiln_kernels::linear_nk(xs, es, None, &mut y, m, c, v);
    let mut out = dims;
    out[D - 1] = v;
    Some(wrap(y, &out))
}

/// A fresh untracked flex tensor of `shape` holding `values`.
fn wrap<const D: usize>(values: Vec<f32>, shape: &[usize; D]) -> Tensor<D> {
    let shape = Shape::from(shape.to_vec());
    let t = FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32);
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}
