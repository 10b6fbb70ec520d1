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
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{AllocationProperty, Bytes, DType, Shape};
use kiln_kernels::memory::{HugeArena, HugeSlice};

use crate::quant::PackedShape;

pub use kiln_kernels::MAX_ROWS;

/// The untracked f32 flex tensor behind `x`, if that is what it is.
pub(super) fn flex_f32<const D: usize>(x: &Tensor<D>) -> Option<FlexTensor> {
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
pub(super) enum WeightLayout<'a> {
    /// Row-major `[k, n]`.
    Kn(&'a [f32]),
    /// A transposed view of row-major `[n, k]`.
    Nk(&'a [f32]),
}

pub(super) fn weight_layout(w: &FlexTensor) -> Option<WeightLayout<'_>> {
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
pub(crate) fn linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
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

/// The U8 flex tensor of a packed weight ([`crate::quant`]), if that is what it is.
pub(crate) fn packed_bytes<const D: usize>(packed: &Param<Tensor<D, Int>>) -> Option<FlexTensor> {
    let dispatch = packed.val().into_dispatch();
    match dispatch.kind {
        DispatchTensorKind::Flex(BackendTensor::Int(t)) if t.dtype() == DType::U8 => Some(t),
        _ => None,
    }
}

/// `y = x Wᵀ + b` with `W` packed (`shape.rows` outputs of `shape.cols` inputs) for an
/// untracked f32 flex `x` `[..., cols]` of any number of rows, on Kiln's quantized
/// kernel ([`kiln_kernels::quant::matvec`], eight rows per pass over the weight);
/// `None` otherwise.
pub(crate) fn packed_linear<const D: usize>(
    x: &Tensor<D>,
    packed: &Param<Tensor<3, Int>>,
    shape: PackedShape,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    let dims = x.dims();
    let (k, n) = (dims[D - 1], shape.rows);
    let m = dims[..D - 1].iter().product::<usize>();
    if m == 0 || k != shape.cols {
        return None;
    }
    let xt = flex_f32(x)?;
    let wt = packed_bytes(packed)?;
    let bt = match bias {
        Some(b) => Some(flex_f32(b)?),
        None => None,
    };
    let copied;
    let xs = match xt.as_slice::<f32>() {
        Some(xs) => xs,
        None => {
            copied = x.to_data().try_to_vec::<f32>().ok()?;
            &copied[..]
        }
    };
    let bs = match &bt {
        Some(b) => Some(b.as_slice::<f32>()?),
        None => None,
    };
    let mut y = vec![0f32; m * n];
    kiln_kernels::quant::matvec(shape.ty, shape.layout, wt.as_slice::<u8>()?, xs, bs, &mut y, m, k, n);
    let mut out = dims;
    out[D - 1] = n;
    Some(wrap(y, &out))
}

/// `x` `[..., C]` times the transposed embedding `[V, C]` -> `[..., V]` (a tied head)
/// under the same conditions as [`linear`].
pub(crate) fn tied_head<const D: usize>(x: &Tensor<D>, embedding: &Tensor<2>) -> Option<Tensor<D>> {
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
pub(super) fn wrap<const D: usize>(values: Vec<f32>, shape: &[usize; D]) -> Tensor<D> {
    let shape = Shape::from(shape.to_vec());
    untracked(FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    ))
}

/// `t` as an untracked tensor.
pub(super) fn untracked<const D: usize>(t: FlexTensor) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Flex(BackendTensor::Float(t)),
        autodiff: DispatchAutodiffContext::Disabled,
    })
}

/// RMS normalisation over the last dimension (`g = gamma`, or `1 + gamma` with
/// `add_one`) as one pass ([`kiln_kernels::decode::rms_norm`]) for an untracked f32 flex
/// tensor; `None` otherwise.
pub(crate) fn rms_norm<const D: usize>(x: &Tensor<D>, gamma: &Tensor<1>, eps: f64, add_one: bool) -> Option<Tensor<D>> {
    let xt = flex_f32(x)?;
    let gt = flex_f32(gamma)?;
    let (xs, gs) = (xt.as_slice::<f32>()?, gt.as_slice::<f32>()?);
    if gs.is_empty() || x.dims()[D - 1] != gs.len() {
        return None;
    }
    let mut y = vec![0f32; xs.len()];
    kiln_kernels::decode::rms_norm(xs, gs, eps as f32, add_one, &mut y);
    Some(wrap(y, &x.dims()))
}

/// One sequence's cached keys or values `[1, K, len, D]` as a view of its buffer.
pub(super) fn cache_view(t: &FlexTensor) -> Option<kiln_kernels::decode::CacheView<'_>> {
    let layout = t.layout();
    let dims = layout.shape().to_vec();
    let [1, _, _, d] = dims[..] else { return None };
    let strides = layout.strides();
    if strides[3] != 1 || strides[2] != d as isize || strides[1] < 0 {
        return None;
    }
    Some(kiln_kernels::decode::CacheView {
        data: t.storage::<f32>(),
        start: layout.start_offset(),
        head_stride: strides[1] as usize,
    })
}

/// Write `rows` `[K, D]` (one position's keys or values) at position `pos` of the cache
/// buffer `t` `[1, K, allocated, D]`, in place (Burn's copy-on-write copies only a shared
/// buffer). `false`, writing nothing, unless `t` is an untracked f32 flex tensor laid out
/// as [`cache_view`] reads it with room for `pos`.
pub(super) fn write_cache_position(t: &mut Tensor<4>, pos: usize, rows: &[f32]) -> bool {
    let [_, k, allocated, d] = t.dims();
    let fits = flex_f32(t).is_some_and(|ft| cache_view(&ft).is_some());
    if !fits || pos >= allocated || rows.len() != k * d {
        return false;
    }
    t.inplace(|t| {
        let DispatchTensor { kind, autodiff } = t.into_dispatch();
        let kind = match kind {
            DispatchTensorKind::Flex(BackendTensor::Float(mut ft)) => {
                let (start, head_stride) = (ft.layout().start_offset(), ft.layout().strides()[1] as usize);
                let data = ft.storage_mut::<f32>();
                for (g, row) in rows.chunks_exact(d).enumerate() {
                    let at = start + g * head_stride + pos * d;
                    data[at..at + d].copy_from_slice(row);
                }
                DispatchTensorKind::Flex(BackendTensor::Float(ft))
            }
            other => other,
        };
        Tensor::from_dispatch(DispatchTensor { kind, autodiff })
    });
    true
}

/// [`crate::kv_cache::attend_rows`] as one pass ([`kiln_kernels::decode::attention_steps`])
/// when every tensor is an untracked f32 flex tensor laid out as the KV cache leaves them;
/// `None` otherwise. `q` `[B, H, 1, D]`, `rows[b]` `[1, K, len_b, D]` -> `[B, H, 1, D]`.
pub(crate) fn attend_rows(
    q: &Tensor<4>,
    rows: &[(Tensor<4>, Tensor<4>)],
    window: Option<usize>,
    options: &AttentionModuleOptions,
) -> Option<Tensor<4>> {
    let (scale, softcap) = (options.scale, options.softcap);
    let [b, h, t, d] = q.dims();
    if t != 1 || rows.len() != b || b == 0 {
        return None;
    }
    let qt = flex_f32(q)?;
    let qs = qt.as_slice::<f32>()?;
    let scale = scale.unwrap_or_else(|| 1.0 / (d as f64).sqrt()) as f32;
    let mut held = Vec::with_capacity(b);
    for (k, v) in rows {
        let [_, kv, len, kd] = k.dims();
        if kd != d || v.dims() != k.dims() || kv == 0 || h % kv != 0 || len == 0 || kv != rows[0].0.dims()[1] {
            return None;
        }
        held.push((flex_f32(k)?, flex_f32(v)?, len));
    }
    let mut steps = Vec::with_capacity(b);
    for (row, (kt, vt, len)) in held.iter().enumerate() {
        steps.push(kiln_kernels::decode::AttentionRow {
            q: &qs[row * h * d..(row + 1) * h * d],
            keys: cache_view(kt)?,
            values: cache_view(vt)?,
            len: *len,
        });
    }
    let kv = rows[0].0.dims()[1];
    let mut out = vec![0f32; b * h * d];
    kiln_kernels::decode::attention_steps(&steps, h, kv, d, window, scale, softcap.map(|c| c as f32), &mut out);
    Some(wrap(out, &[b, h, 1, d]))
}

/// The values of an untracked flex int tensor as indices (positions, token ids), `None`
/// for a negative one or another backend.
pub(super) fn flex_indices<const D: usize>(t: &Tensor<D, Int>) -> Option<Vec<usize>> {
    let dispatch = t.clone().into_dispatch();
    let DispatchTensorKind::Flex(BackendTensor::Int(t)) = dispatch.kind else {
        return None;
    };
    let values: Vec<i64> = match t.dtype() {
        DType::I64 => t.as_slice::<i64>()?.to_vec(),
        DType::I32 => t.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
        _ => return None,
    };
    values.into_iter().map(|v| usize::try_from(v).ok()).collect()
}

/// [`crate::rope::Rotation::apply`] of one position per row as one pass
/// ([`kiln_kernels::decode::rope_rows`]): `x` `[B, heads, 1, D]`, `cos`/`sin`
/// `[B, 1, 1, D]`; `None` unless every tensor is an untracked f32 flex tensor.
pub(crate) fn rope_rows(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    let [b, heads, t, d] = x.dims();
    if t != 1 || cos.dims() != [b, 1, 1, d] || sin.dims() != [b, 1, 1, d] || d % 2 != 0 {
        return None;
    }
    let (xt, ct, st) = (flex_f32(x)?, flex_f32(cos)?, flex_f32(sin)?);
    let (xs, cs, ss) = (xt.as_slice::<f32>()?, ct.as_slice::<f32>()?, st.as_slice::<f32>()?);
    let mut y = vec![0f32; xs.len()];
    kiln_kernels::decode::rope_rows(xs, cs, ss, heads, d, &mut y);
    Some(wrap(y, &[b, heads, 1, d]))
}

/// `w` `[k, n]` (a Burn `Linear` weight) re-laid as a transposed view of row-major
/// `[n, k]` storage on huge pages ([`HugeArena`]), the layout [`linear`] multiplies fastest (one contiguous dot product
/// per output: 15-20 % more weight bandwidth than `[k, n]` on the SmolLM2 decode step's
/// matrices, `kiln-kernels/examples/matvec_bandwidth.rs`). Same logical tensor, so
/// Burn's ops (the strided GEMM of a prefill) read it unchanged. Anything but an
/// untracked contiguous f32 flex matrix is returned as it is.
pub(crate) fn out_in_layout(w: Tensor<2>, arena: &mut HugeArena) -> Tensor<2> {
    let Some(t) = flex_f32(&w) else { return w };
    let [k, n] = w.dims();
    let Some(src) = t.as_slice::<f32>() else { return w };
    let dst = arena.alloc(k * n, |dst| kiln_kernels::transpose(src, k, n, dst));
    let layout = Layout::new(Shape::from(vec![k, n]), vec![1, k as isize], 0);
    from_huge(dst, layout)
}

/// `w` (a token embedding, read by the tied head every step) copied onto huge pages
/// ([`HugeArena`]), same layout; anything but an untracked contiguous f32 flex matrix
/// is returned as it is, and so is one whose values start on a huge page (Kiln's loader
/// reads an embedding there: no second copy at the peak; a heap buffer never starts
/// there, its allocator's header comes first).
pub(crate) fn on_huge_pages(w: Tensor<2>, arena: &mut HugeArena) -> Tensor<2> {
    let Some(t) = flex_f32(&w) else { return w };
    let Some(src) = t.as_slice::<f32>() else { return w };
    if (src.as_ptr() as usize).is_multiple_of(kiln_kernels::memory::HUGE_PAGE) {
        return w;
    }
    let dst = arena.alloc(src.len(), |dst| dst.copy_from_slice(src));
    from_huge(dst, Layout::contiguous(Shape::from(w.dims().to_vec())))
}

/// An untracked flex tensor over `values`, laid out by `layout`.
fn from_huge(values: HugeSlice, layout: Layout) -> Tensor<2> {
    let bytes = Bytes::from_shared(bytes::Bytes::from_owner(values), AllocationProperty::Native);
    untracked(FlexTensor::new(bytes, layout, DType::F32))
}

/// Several `x w_i + b_i` of the same `x` (`[..., k]`, at most [`MAX_ROWS`] rows) as one
/// pool job ([`kiln_kernels::linear_nk_many`]) when every weight is laid out `[out, in]`
/// ([`out_in_layout`]) and every tensor is an untracked f32 flex tensor; `None` otherwise.
pub(crate) fn linears<const D: usize>(
    x: &Tensor<D>,
    layers: &[(Tensor<2>, Option<Tensor<1>>)],
) -> Option<Vec<Tensor<D>>> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    if m == 0 || m > MAX_ROWS {
        return None;
    }
    let xt = flex_f32(x)?;
    let xs = xt.as_slice::<f32>()?;
    let mut held = Vec::with_capacity(layers.len());
    for (w, b) in layers {
        if w.dims()[0] != k {
            return None;
        }
        let bt = match b {
            Some(b) => Some(flex_f32(b)?),
            None => None,
        };
        held.push((flex_f32(w)?, bt, w.dims()[1]));
    }
    let mut weights = Vec::with_capacity(layers.len());
    for (wt, bt, n) in &held {
        let WeightLayout::Nk(w) = weight_layout(wt)? else {
            return None;
        };
        let bias = match bt {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        weights.push((w, bias, *n));
    }
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|(_, _, n)| vec![0f32; m * n]).collect();
    let mut products: Vec<kiln_kernels::NkProduct> = ys
        .iter_mut()
        .zip(&weights)
        .map(|(y, &(w, bias, n))| kiln_kernels::NkProduct { w, bias, y, n })
        .collect();
    kiln_kernels::linear_nk_many(xs, m, k, &mut products);
    Some(
        ys.into_iter()
            .zip(&weights)
            .map(|(y, (_, _, n))| {
                let mut out = dims;
                out[D - 1] = *n;
                wrap(y, &out)
            })
            .collect(),
    )
}

/// Whether `w` is an untracked f32 flex matrix laid out by [`out_in_layout`].
pub(crate) fn is_out_in(w: &Tensor<2>) -> bool {
    flex_f32(w).is_some_and(|t| matches!(weight_layout(&t), Some(WeightLayout::Nk(_))) && !t.is_contiguous())
}

/// `act(gate) * up` ([`kiln_kernels::decode::gated`]) in one pass for untracked f32 flex
/// tensors of one shape; `None` otherwise.
pub(crate) fn gated<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>, gelu: bool) -> Option<Tensor<D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    let (gt, ut) = (flex_f32(gate)?, flex_f32(up)?);
    let (gs, us) = (gt.as_slice::<f32>()?, ut.as_slice::<f32>()?);
    let mut y = vec![0f32; gs.len()];
    kiln_kernels::decode::gated(gs, us, gelu, &mut y);
    Some(wrap(y, &gate.dims()))
}
