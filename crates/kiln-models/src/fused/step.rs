//! The decode step of Llama and Gemma 3 on flex as one pass over raw buffers.
//!
//! With every matrix product, norm, rotary embedding and attention already on Kiln's
//! kernels, what was left of a SmolLM2 decode step outside them was the glue: about 20
//! tensor ops per layer (the residual adds, reshapes and head swaps that copy, the KV
//! cache's `slice_assign`, a fresh output buffer per op), each a dispatch and an
//! allocation, run on the calling thread while the pool's other thread waits (perf:
//! the helper idle 18 % of the step, `malloc`/`memmove`/`memset` on the caller). Here a
//! [`Plan`] borrows each weight's flex storage once per step and [`run`] walks the
//! layers with the kernels writing into buffers reused across steps (per thread), the
//! keys and values copied straight into the cache buffers.
//!
//! Same kernels, same order of operations as the per-op path, so the same logits: the
//! per-op path stays for everything the plan does not cover (another backend or dtype,
//! Burn's `[in, out]` weight layout), and
//! `tests/parity.rs` checks both against the other backends.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use kiln_kernels::decode::{AttentionRow, attention_steps, gated, rms_norm, rope_rows};
use kiln_kernels::quant::QuantProduct;
use kiln_kernels::{NkProduct, linear_nk, linear_nk_many};

use super::flex::{
    WeightLayout, cache_view, flex_f32, flex_indices, packed_bytes, weight_layout, wrap, write_cache_position,
};
use crate::KvCache;
use crate::quant::{Embedding, Linear, PackedShape, dequantize_row};

/// A run of f32 values in a flex tensor's storage (the tensor is held, so the run lives
/// as long as the plan).
#[derive(Clone)]
pub(crate) struct Values {
    tensor: FlexTensor,
    start: usize,
    len: usize,
}

impl Values {
    /// A contiguous untracked f32 flex tensor (a norm's weight, the token embedding).
    pub(crate) fn contiguous<const D: usize>(x: &Tensor<D>) -> Option<Values> {
        let tensor = flex_f32(x)?;
        let (start, end) = tensor.layout().contiguous_offsets()?;
        Some(Values {
            tensor,
            start,
            len: end - start,
        })
    }

    /// A `[k, n]` weight stored `[n, k]` row-major (`fused::for_decoding`'s layout).
    fn out_in(w: &Tensor<2>) -> Option<Values> {
        let tensor = flex_f32(w)?;
        let [k, n] = w.dims();
        if !matches!(weight_layout(&tensor)?, WeightLayout::Nk(_)) {
            return None;
        }
        let start = tensor.layout().start_offset();
        Some(Values {
            tensor,
            start,
            len: k * n,
        })
    }

    fn get(&self) -> &[f32] {
        &self.tensor.storage::<f32>()[self.start..self.start + self.len]
    }
}

/// An RMS norm's weight and epsilon.
pub(crate) struct Norm {
    gamma: Values,
    eps: f32,
}

impl Norm {
    pub(crate) fn new(gamma: &Tensor<1>, eps: f64) -> Option<Norm> {
        Some(Norm {
            gamma: Values::contiguous(gamma)?,
            eps: eps as f32,
        })
    }
}

/// A matrix of `rows` rows of `cols` values, as the step reads it: f32 rows (a weight
/// stored `[out, in]`, the token embedding) or packed blocks ([`crate::quant`]).
#[derive(Clone)]
pub(crate) enum Matrix {
    F32(Values),
    Packed { tensor: FlexTensor, shape: PackedShape },
}

impl Matrix {
    fn packed(layer_packed: &burn::module::Param<Tensor<3, Int>>, shape: PackedShape) -> Option<Matrix> {
        let tensor = packed_bytes(layer_packed)?;
        tensor.as_slice::<u8>()?;
        Some(Matrix::Packed { tensor, shape })
    }

    /// The token embedding `[V, C]`.
    pub(crate) fn embedding(e: &Embedding) -> Option<Matrix> {
        match (&e.packed, e.packed_shape()) {
            (Some(p), Some(shape)) => Matrix::packed(p, shape),
            _ => Some(Matrix::F32(Values::contiguous(&e.weight.val())?)),
        }
    }

    /// Rows.
    fn rows(&self, cols: usize) -> usize {
        match self {
            Matrix::F32(v) => v.len / cols.max(1),
            Matrix::Packed { shape, .. } => shape.rows,
        }
    }

    /// Row `i` into `out` (`cols` values), dequantized when packed.
    fn row(&self, i: usize, out: &mut [f32]) {
        let c = out.len();
        match self {
            Matrix::F32(v) => out.copy_from_slice(&v.get()[i * c..(i + 1) * c]),
            Matrix::Packed { tensor, shape } => {
                dequantize_row(*shape, tensor.as_slice::<u8>().expect("checked contiguous"), i, out);
            }
        }
    }

    /// `y[m, rows] = x[m, cols] · selfᵀ + bias`.
    fn product(&self, x: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, cols: usize, rows: usize) {
        match self {
            Matrix::F32(w) => linear_nk(x, w.get(), bias, y, m, cols, rows),
            Matrix::Packed { tensor, shape } => {
                let w = tensor.as_slice::<u8>().expect("checked contiguous");
                kiln_kernels::quant::matvec(shape.ty, shape.layout, w, x, bias, y, m, cols, rows)
            }
        }
    }
}

/// A linear layer `[in, out]` stored `[out, in]` (or packed), with its bias.
pub(crate) struct Proj {
    w: Matrix,
    bias: Option<Values>,
    k: usize,
    n: usize,
}

impl Proj {
    pub(crate) fn new(layer: &Linear) -> Option<Proj> {
        let bias = match &layer.bias {
            Some(b) => Some(Values::contiguous(&b.val())?),
            None => None,
        };
        let (k, n) = (layer.d_input(), layer.d_output());
        let w = match (&layer.packed, layer.packed_shape()) {
            (Some(p), Some(shape)) => Matrix::packed(p, shape)?,
            _ => Matrix::F32(Values::out_in(&layer.weight.val())?),
        };
        Some(Proj { w, bias, k, n })
    }

    fn bias(&self) -> Option<&[f32]> {
        self.bias.as_ref().map(Values::get)
    }

    /// `y[m, n] = x[m, k] · W + b`.
    fn apply(&self, x: &[f32], y: &mut [f32], m: usize) {
        self.w.product(x, self.bias(), y, m, self.k, self.n)
    }
}

/// `projs` applied to the same `x` `[m, k]`, one output each: one job of the pool when
/// every weight is f32 or every weight is packed, else one product after another. The
/// products' list is an array on the stack: nothing is allocated per step.
fn apply_all<const N: usize>(x: &[f32], m: usize, k: usize, mut projs: [(&Proj, &mut [f32]); N]) {
    if projs.iter().all(|(p, _)| matches!(p.w, Matrix::F32(_))) {
        let mut products: [NkProduct<'_>; N] = projs.each_mut().map(|(p, y)| NkProduct {
            w: match &p.w {
                Matrix::F32(v) => v.get(),
                Matrix::Packed { .. } => unreachable!("all f32"),
            },
            bias: p.bias(),
            y: &mut y[..],
            n: p.n,
        });
        linear_nk_many(x, m, k, &mut products);
    } else if projs.iter().all(|(p, _)| matches!(p.w, Matrix::Packed { .. })) {
        let mut products: [QuantProduct<'_>; N] = projs.each_mut().map(|(p, y)| match &p.w {
            Matrix::Packed { tensor, shape } => QuantProduct {
                ty: shape.ty,
                layout: shape.layout,
                w: tensor.as_slice::<u8>().expect("checked contiguous"),
                bias: p.bias(),
                y: &mut y[..],
                n: p.n,
            },
            Matrix::F32(_) => unreachable!("all packed"),
        });
        kiln_kernels::quant::matvec_many(x, m, k, &mut products);
    } else {
        for (p, y) in projs.iter_mut() {
            p.apply(x, y, m);
        }
    }
}

/// One decoder layer: `x += [post_attn_norm](o(attn(rope(q, k), v)))` over
/// `attn_norm(x)`, then `x += [post_ff_norm](down(act(gate) * up))` over `ff_norm(x)`.
pub(crate) struct Layer {
    pub attn_norm: Norm,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    /// Per-head RMS norms of the queries and keys (Gemma 3).
    pub qk_norm: Option<(Norm, Norm)>,
    pub o: Proj,
    pub post_attn_norm: Option<Norm>,
    pub ff_norm: Norm,
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
    pub post_ff_norm: Option<Norm>,
    /// Which of [`Plan::rotary`] rotates this layer's queries and keys.
    pub rotary: usize,
    /// Attend only to the last `window` positions.
    pub window: Option<usize>,
}

/// The LM head: the tied token embedding or its own projection.
pub(crate) enum Head {
    Tied,
    Proj(Proj),
}

/// A model's decode step: its weights as flex storage and its hyper-parameters.
pub(crate) struct Plan {
    /// `[V, C]`
    pub embed: Matrix,
    /// Embeddings multiplied by this (Gemma: `sqrt(C)`).
    pub embed_scale: Option<f32>,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub head: Head,
    /// Logits soft-capped to `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// RMS norms multiply by `1 + weight` (Gemma).
    pub norm_add_one: bool,
    /// GELU-tanh gate (Gemma) instead of SiLU (Llama).
    pub gelu: bool,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Attention scale; `None` is `1 / sqrt(D)`.
    pub scale: Option<f64>,
    pub attn_softcap: Option<f64>,
    /// The rotary embeddings the layers use (Gemma 3: global, local).
    pub rotary: Vec<crate::rope::RotaryEmbedding>,
}

/// Buffers of one thread's decode steps, reused from step to step.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    q_rot: Vec<f32>,
    k_rot: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    out_normed: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// `[rotary, B, D]`: cos and sin of the step's positions for each of `Plan::rotary`.
    cos: Vec<Vec<f32>>,
    sin: Vec<Vec<f32>>,
}

/// Decode steps run here so far (process-wide).
pub(crate) static STEPS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// The decode step of `caches.len()` independent sequences, `tokens` `[B, 1]`, row `b`
/// written at position `caches[b].len()` of its cache -> logits `[B, 1, V]`, every cache
/// advanced by one: [`run_chunks`] with one token per sequence.
pub(crate) fn run(plan: &Plan, tokens: &Tensor<2, Int>, caches: &mut [&mut KvCache]) -> Option<Tensor<3>> {
    let [b, t] = tokens.dims();
    if t != 1 {
        return None;
    }
    let ids = flex_indices(tokens)?;
    let chunks: Vec<&[usize]> = ids.chunks_exact(1).collect();
    let logits = run_chunks(plan, &chunks, caches)?;
    let vocab = logits.len() / b.max(1);
    Some(wrap(logits, &[b, 1, vocab]))
}

/// [`CausalLm::forward_chunks`](crate::CausalLm::forward_chunks) through a plan: [`run_chunks`]
/// on token ids, logits as a `[B, V]` tensor.
pub(crate) fn forward_chunks(plan: &Plan, chunks: &[&[u32]], caches: &mut [&mut KvCache]) -> Option<Tensor<2>> {
    let ids: Vec<Vec<usize>> = chunks
        .iter()
        .map(|chunk| chunk.iter().map(|&id| id as usize).collect())
        .collect();
    let ids: Vec<&[usize]> = ids.iter().map(Vec::as_slice).collect();
    let logits = run_chunks(plan, &ids, caches)?;
    let vocab = logits.len() / chunks.len();
    Some(wrap(logits, &[chunks.len(), vocab]))
}

/// One step of `caches.len()` independent sequences, each continuing its own cache by
/// a chunk of tokens: `chunks[b]` written at positions `caches[b].len()..` (a decode
/// step's one token, or a whole short prompt) -> the logits of each chunk's last
/// position, `[B, V]` row-major, every cache advanced by its chunk. A chunk's rows join
/// the batch's rows in every product, and each row attends over its own sequence's
/// cache up to its own position (a prompt's causal mask). `None`, changing nothing,
/// unless every cache buffer is a flex tensor this step can read and write and every
/// cache has room. Any number of rows: the products take them
/// [`kiln_kernels::matvec::PASS_ROWS`] to a pass over each weight (f32 products one
/// after another beyond that), each row's sums the same whatever the batch, so a
/// sequence gets the same logits alone as batched with others.
pub(crate) fn run_chunks(plan: &Plan, chunks: &[&[usize]], caches: &mut [&mut KvCache]) -> Option<Vec<f32>> {
    let b = chunks.len();
    let (h, kv, d) = (plan.heads, plan.kv_heads, plan.head_dim);
    let c = plan.norm.gamma.len;
    let vocab = plan.embed.rows(c);
    if b == 0 || b != caches.len() || c == 0 || chunks.iter().any(|chunk| chunk.is_empty()) {
        return None;
    }
    if chunks.iter().flat_map(|chunk| chunk.iter()).any(|&id| id >= vocab) {
        return None;
    }
    // Row `r` of the step: its sequence and its position in that sequence.
    let rows_of: Vec<(usize, usize)> = chunks
        .iter()
        .zip(caches.iter())
        .enumerate()
        .flat_map(|(seq, (chunk, cache))| (0..chunk.len()).map(move |i| (seq, cache.len() + i)))
        .collect();
    let n = rows_of.len();
    // Everything checked before anything is written.
    if plan.rotary.iter().any(|r| r.head_dim() != d) || plan.layers.iter().any(|l| l.rotary >= plan.rotary.len()) {
        return None;
    }
    for (cache, chunk) in caches.iter_mut().zip(chunks) {
        if cache.layers() != plan.layers.len() || cache.len() + chunk.len() > cache.capacity() {
            return None;
        }
    }
    for (cache, chunk) in caches.iter_mut().zip(chunks) {
        assert!(cache.reserve_more(chunk.len()), "checked above");
        for layer in 0..plan.layers.len() {
            let (keys, values) = cache.buffers_mut(layer);
            for buf in [&*keys, &*values] {
                let [one, heads, _, hd] = buf.dims();
                let readable = flex_f32(buf).is_some_and(|ft| cache_view(&ft).is_some());
                if one != 1 || heads != kv || hd != d || !readable {
                    return None;
                }
            }
        }
    }
    let scale = plan.scale.unwrap_or_else(|| 1.0 / (d as f64).sqrt()) as f32;
    let attn_softcap = plan.attn_softcap.map(|cap| cap as f32);
    let add_one = plan.norm_add_one;
    let norm = |n: &Norm, x: &[f32], out: &mut [f32]| rms_norm(x, n.gamma.get(), n.eps, add_one, out);
    let logits = BUFFERS.with_borrow_mut(|buf| {
        // The rotations of this step's positions, once for all layers.
        buf.cos.resize_with(plan.rotary.len(), Vec::new);
        buf.sin.resize_with(plan.rotary.len(), Vec::new);
        for (r, rotary) in plan.rotary.iter().enumerate() {
            rotary.rows(rows_of.iter().map(|&(_, p)| p), &mut buf.cos[r], &mut buf.sin[r]);
        }
        let x = sized(&mut buf.x, n * c);
        let ids = chunks.iter().flat_map(|chunk| chunk.iter());
        for (row, &id) in x.chunks_exact_mut(c).zip(ids) {
            plan.embed.row(id, row);
            if let Some(s) = plan.embed_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        for (i, layer) in plan.layers.iter().enumerate() {
            // Attention block.
            let normed = sized(&mut buf.normed, n * c);
            norm(&layer.attn_norm, x, normed);
            let (q, k, v) = (
                sized(&mut buf.q, n * layer.q.n),
                sized(&mut buf.k, n * layer.k.n),
                sized(&mut buf.v, n * layer.v.n),
            );
            apply_all(normed, n, c, [(&layer.q, q), (&layer.k, k), (&layer.v, v)]);
            let (q, k, v) = (&mut buf.q[..n * h * d], &mut buf.k[..n * kv * d], &buf.v[..n * kv * d]);
            if let Some((qn, kn)) = &layer.qk_norm {
                let tmp = sized(&mut buf.q_rot, n * h * d);
                norm(qn, q, tmp);
                q.copy_from_slice(tmp);
                let tmp = sized(&mut buf.k_rot, n * kv * d);
                norm(kn, k, tmp);
                k.copy_from_slice(tmp);
            }
            let (cos, sin) = (&buf.cos[layer.rotary], &buf.sin[layer.rotary]);
            let q_rot = sized(&mut buf.q_rot, n * h * d);
            rope_rows(q, cos, sin, h, d, q_rot);
            let k_rot = sized(&mut buf.k_rot, n * kv * d);
            rope_rows(k, cos, sin, kv, d, k_rot);
            // Every row's key and value into its cache, then each row attends over its
            // sequence's positions up to its own.
            for (row, &(seq, p)) in rows_of.iter().enumerate() {
                let (keys, values) = caches[seq].buffers_mut(i);
                let written = write_cache_position(keys, p, &k_rot[row * kv * d..(row + 1) * kv * d])
                    && write_cache_position(values, p, &v[row * kv * d..(row + 1) * kv * d]);
                assert!(written, "cache buffers checked above");
            }
            let mut held = Vec::with_capacity(b);
            for cache in caches.iter_mut() {
                let (keys, values) = cache.buffers_mut(i);
                held.push((flex_f32(keys)?, flex_f32(values)?));
            }
            let mut rows = Vec::with_capacity(n);
            for (row, &(seq, p)) in rows_of.iter().enumerate() {
                let (kt, vt) = &held[seq];
                rows.push(AttentionRow {
                    q: &q_rot[row * h * d..(row + 1) * h * d],
                    keys: cache_view(kt)?,
                    values: cache_view(vt)?,
                    len: p + 1,
                });
            }
            let attn = sized(&mut buf.attn, n * h * d);
            attention_steps(&rows, h, kv, d, layer.window, scale, attn_softcap, attn);
            drop(rows);
            drop(held);
            let out = sized(&mut buf.out, n * c);
            layer.o.apply(attn, out, n);
            residual(x, out, layer.post_attn_norm.as_ref(), &mut buf.out_normed, norm);
            // MLP block.
            let normed = sized(&mut buf.normed, n * c);
            norm(&layer.ff_norm, x, normed);
            let f = layer.gate.n;
            let (gate, up) = (sized(&mut buf.gate, n * f), sized(&mut buf.up, n * f));
            apply_all(normed, n, c, [(&layer.gate, gate), (&layer.up, up)]);
            let act = sized(&mut buf.act, n * f);
            gated(&buf.gate[..n * f], &buf.up[..n * f], plan.gelu, act);
            let out = sized(&mut buf.out, n * c);
            layer.down.apply(act, out, n);
            residual(x, out, layer.post_ff_norm.as_ref(), &mut buf.out_normed, norm);
        }
        // The head over each chunk's last row only.
        let last = sized(&mut buf.out, b * c);
        let mut end = 0;
        for (chunk, dst) in chunks.iter().zip(last.chunks_exact_mut(c)) {
            end += chunk.len();
            dst.copy_from_slice(&x[(end - 1) * c..end * c]);
        }
        let normed = sized(&mut buf.normed, b * c);
        norm(&plan.norm, &buf.out[..b * c], normed);
        let mut logits = vec![0f32; b * vocab];
        match &plan.head {
            Head::Tied => plan.embed.product(normed, None, &mut logits, b, c, vocab),
            Head::Proj(p) => p.apply(normed, &mut logits, b),
        }
        if let Some(cap) = plan.final_softcap {
            let cap = cap as f32;
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
        Some(logits)
    })?;
    for (cache, chunk) in caches.iter_mut().zip(chunks) {
        cache.advance(chunk.len());
    }
    STEPS.fetch_add(1, Ordering::Relaxed);
    Some(logits)
}

/// `x += y`, or `x += norm(y)` when the block has an output norm (Gemma's sandwich).
fn residual(
    x: &mut [f32],
    y: &[f32],
    post_norm: Option<&Norm>,
    scratch: &mut Vec<f32>,
    norm: impl Fn(&Norm, &[f32], &mut [f32]),
) {
    let y = match post_norm {
        Some(n) => {
            let out = sized(scratch, y.len());
            norm(n, y, out);
            &*out
        }
        None => y,
    };
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}
