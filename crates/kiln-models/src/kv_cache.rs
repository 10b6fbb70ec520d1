//! Key/value cache for incremental decoding.
//!
//! Each layer holds a buffer `[batch, kv_heads, allocated, head_dim]`; new keys and
//! values are written into it in place (`slice_assign` on a uniquely owned tensor), so a
//! decode step allocates no new cache storage. The buffer starts at
//! [`INITIAL_POSITIONS`] (or the capacity, if smaller) and doubles when a write needs
//! more, up to the capacity: a 32k-context model does not reserve 32k positions per
//! sequence up front.

use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;

use crate::fused::attention;

/// Cached keys and values of one attention layer.
#[derive(Debug, Clone)]
pub struct LayerKv {
    keys: Tensor<4>,
    values: Tensor<4>,
}

/// Keys and values of every layer, plus how many positions are filled.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    /// Positions the buffers hold now.
    allocated: usize,
    capacity: usize,
}

/// Positions allocated by a new cache (at most its capacity): a chat turn's prompt and
/// reply fit, or need one doubling (128 f32 positions are 4.7 MB for Gemma 3 270M, 5.9 MB
/// for SmolLM2-135M).
pub const INITIAL_POSITIONS: usize = 128;

impl KvCache {
    /// An empty cache of `layers` layers for up to `capacity` positions of
    /// `[batch, kv_heads, _, head_dim]`.
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let allocated = capacity.min(INITIAL_POSITIONS);
        let layers = (0..layers)
            .map(|_| LayerKv {
                keys: Tensor::zeros([batch, kv_heads, allocated, head_dim], device),
                values: Tensor::zeros([batch, kv_heads, allocated, head_dim], device),
            })
            .collect();
        Self {
            layers,
            len: 0,
            allocated,
            capacity,
        }
    }

    /// Grow every layer's buffers to hold at least `end` positions (doubling).
    fn reserve(&mut self, end: usize) {
        if end <= self.allocated {
            return;
        }
        let allocated = end.max(self.allocated * 2).min(self.capacity);
        let len = self.len;
        for kv in &mut self.layers {
            for buf in [&mut kv.keys, &mut kv.values] {
                let [b, k, _, d] = buf.dims();
                let grown = Tensor::zeros([b, k, allocated, d], &buf.device());
                let filled = buf.clone().slice(s![.., .., 0..len, ..]);
                *buf = grown.slice_assign(s![.., .., 0..len, ..], filled);
            }
        }
        self.allocated = allocated;
    }

    /// Make room for `new` more positions (the fused step writes them itself); `false`,
    /// changing nothing, when they do not fit in the capacity.
    pub(crate) fn reserve_more(&mut self, new: usize) -> bool {
        if self.len + new > self.capacity {
            return false;
        }
        self.reserve(self.len + new);
        true
    }

    /// The key and value buffers of `layer`, `[batch, kv_heads, allocated, head_dim]`.
    pub(crate) fn buffers_mut(&mut self, layer: usize) -> (&mut Tensor<4>, &mut Tensor<4>) {
        let kv = &mut self.layers[layer];
        (&mut kv.keys, &mut kv.values)
    }

    /// Number of layers.
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget every cached position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Write `keys`/`values` `[batch, kv_heads, new, head_dim]` of `layer` at the current
    /// position and return all cached keys and values `[batch, kv_heads, len + new, head_dim]`.
    /// The position only advances in [`advance`](Self::advance), once every layer is written.
    pub fn append(&mut self, layer: usize, keys: Tensor<4>, values: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let new = keys.dims()[2];
        let end = self.len + new;
        assert!(end <= self.capacity, "KV cache overflow: {end} > {}", self.capacity);
        self.reserve(end);
        let start = self.len;
        let kv = &mut self.layers[layer];
        kv.keys
            .inplace(|buf| buf.slice_assign(s![.., .., start..end, ..], keys));
        kv.values
            .inplace(|buf| buf.slice_assign(s![.., .., start..end, ..], values));
        (
            kv.keys.clone().slice(s![.., .., 0..end, ..]),
            kv.values.clone().slice(s![.., .., 0..end, ..]),
        )
    }

    /// Mark `new` positions as filled.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

/// The decode step of independent sequences ([`CausalLm::forward_step`](crate::CausalLm)):
/// write row `b` of `keys`/`values` `[B, K, 1, D]` of `layer` into `caches[b]` and return
/// each row's cached keys and values `[1, K, len_b + 1, D]`. Positions advance in
/// [`advance_rows`].
pub fn append_rows(
    caches: &mut [&mut KvCache],
    layer: usize,
    keys: Tensor<4>,
    values: Tensor<4>,
) -> Vec<(Tensor<4>, Tensor<4>)> {
    let b = keys.dims()[0];
    assert_eq!(b, caches.len(), "one cache per row");
    if b == 1 {
        return vec![caches[0].append(layer, keys, values)];
    }
    caches
        .iter_mut()
        .enumerate()
        .map(|(row, cache)| {
            cache.append(
                layer,
                keys.clone().slice(s![row..row + 1, .., .., ..]),
                values.clone().slice(s![row..row + 1, .., .., ..]),
            )
        })
        .collect()
}

/// Mark one new position filled in every cache of a decode step.
pub fn advance_rows(caches: &mut [&mut KvCache]) {
    for cache in caches.iter_mut() {
        cache.advance(1);
    }
}

/// The positions the rows of a decode step write: each cache's length.
pub fn cache_lengths(caches: &[&mut KvCache]) -> Vec<usize> {
    caches.iter().map(|c| c.len()).collect()
}

/// [`cache_lengths`] as a tensor `[B]` on `device`.
pub fn row_positions(caches: &[&mut KvCache], device: &Device) -> Tensor<1, Int> {
    let positions: Vec<i64> = cache_lengths(caches).into_iter().map(|p| p as i64).collect();
    let b = positions.len();
    Tensor::from_data(TensorData::new(positions, [b]), device)
}

/// Repeat each of K key/value heads H/K times: `[B, K, T, D]` -> `[B, H, T, D]`.
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, k, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, k, n_rep, t, d])
        .reshape([b, k * n_rep, t, d])
}

/// The attention of one decode step of independent sequences: query row `b` of `q`
/// `[B, H, 1, D]` over its own cached keys and values `rows[b]` (what [`append_rows`]
/// returns, `[1, K, len_b + 1, D]`), only their last `window` positions when given, the
/// K key/value heads repeated to H -> `[B, H, 1, D]`.
pub fn attend_rows(
    q: Tensor<4>,
    rows: Vec<(Tensor<4>, Tensor<4>)>,
    window: Option<usize>,
    options: AttentionModuleOptions,
) -> Tensor<4> {
    // On flex: one pass per row over the cache buffers, no repeated heads.
    if let Some(y) = crate::fused::flex::attend_rows(&q, &rows, window, &options) {
        return y;
    }
    let b = q.dims()[0];
    let mut y: Vec<Tensor<4>> = rows
        .into_iter()
        .enumerate()
        .map(|(row, (k, v))| {
            let q = if b == 1 {
                q.clone()
            } else {
                q.clone().slice(s![row..row + 1, .., .., ..])
            };
            let tk = k.dims()[2];
            let (k, v) = match window {
                Some(w) if tk > w => (k.slice(s![.., .., tk - w..tk, ..]), v.slice(s![.., .., tk - w..tk, ..])),
                _ => (k, v),
            };
            let n_rep = q.dims()[1] / k.dims()[1];
            attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), None, None, options)
        })
        .collect();
    if b == 1 {
        y.pop().expect("one row")
    } else {
        Tensor::cat(y, 0)
    }
}
