//! `y = x W (+ b)` for a few rows of `x`: the matrix-vector products of decoding.
//!
//! Two weight layouts, because the models hold both:
//! - [`linear_kn`]: `w` `[k, n]` row-major, Burn's `nn::Linear` layout (`x @ w`). The `k`
//!   rows are cut into one contiguous slab per thread; each thread streams its slab once
//!   and accumulates a partial `y` `[m, n]` (in L1/L2), and the partials are summed. A
//!   weight is read once, front to back, whatever `m`.
//! - [`linear_nk`]: `w` `[n, k]` row-major, PyTorch's layout and a token embedding's (a
//!   tied LM head): each output is a dot product of a weight row with `x`; the `n` rows
//!   are cut into one slab per thread.
//!
//! `x` is `[m, k]`, `y` `[m, n]`, both row-major; `m` up to [`MAX_ROWS`] (`[in, out]`) or
//! [`PASS_ROWS`] (`[out, in]`) is one pass over the weight (more rows take more passes).
//! Sums are in f32, in a different order from a GEMM's, so results agree with one to
//! rounding (the tests use 1e-5 relative to the sum of magnitudes).

use crate::pool::Pool;
use crate::{Isa, MAX_PRODUCTS, SharedMut, Split};
use std::cell::RefCell;

/// The activation rows the kernels take at once (their registers); a weight's rows or
/// tiles go through the rows of a pass this many at a time while they are in L1.
pub const MAX_ROWS: usize = 8;

/// The rows one pass over a weight serves (one pool job); the rest of a batch takes
/// further passes. A serving batch of 16 reads each weight from memory once; past 32
/// (long prompts in the step) the activations would leave L2 for every weight tile.
pub const PASS_ROWS: usize = 32;

/// Weights smaller than this many elements run on the calling thread (handing out
/// the work costs more than the product).
pub(crate) const PARALLEL_MIN: usize = 32 * 1024;

thread_local! {
    /// The partial sums of [`linear_kn`], reused across calls (no allocation per token).
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = x[m, k] · w[k, n] + bias[n]` with `w` row-major `[k, n]`, on the best path
/// of this CPU. Panics if a slice's length disagrees with `m`, `k`, `n`.
pub fn linear_kn(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) {
    linear_kn_with(Isa::best(), x, w, bias, y, m, k, n)
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]` with `w` row-major `[n, k]`, on the best path
/// of this CPU. Panics if a slice's length disagrees with `m`, `k`, `n`.
pub fn linear_nk(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) {
    linear_nk_with(Isa::best(), x, w, bias, y, m, k, n)
}

fn check(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &[f32], m: usize, k: usize, n: usize) {
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w.len(), k * n, "w has k * n elements");
    assert_eq!(y.len(), m * n, "y is [m, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias is [n]");
    }
}

/// How many slabs to cut `rows` rows of a `rows * cols` weight into: one per thread
/// (the `[in, out]` path, whose slabs are partial sums added up after the job).
pub(crate) fn slabs(rows: usize, cols: usize, min_rows: usize) -> usize {
    if rows * cols < PARALLEL_MIN {
        return 1;
    }
    Pool::global().threads().min(rows / min_rows).max(1)
}

/// Tasks per thread of a job over output rows: the pool hands them out one at a time,
/// so a thread that starts late or is preempted (a VM's stolen time) takes fewer of
/// them instead of the others waiting for its half. One slab per thread left the caller
/// waiting in `Pool::run` for 9 % of a SmolLM2 decode step (perf).
const TASKS_PER_THREAD: usize = 4;

/// How many tasks to cut the `rows` output rows of a `rows * cols` weight into, each at
/// least `min_rows` rows.
pub(crate) fn row_tasks(rows: usize, cols: usize, min_rows: usize) -> usize {
    if rows * cols < PARALLEL_MIN {
        return 1;
    }
    (Pool::global().threads() * TASKS_PER_THREAD)
        .min(rows / min_rows)
        .max(1)
}

/// [`linear_kn`] on a given path (`isa` must be one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_kn_with(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    in_passes(isa, x, w, bias, y, m, k, n, MAX_ROWS, kn_pass);
}

/// The signature of one pass over a weight for a pass's rows.
type Pass = fn(Isa, &[f32], &[f32], Option<&[f32]>, &mut [f32], usize, usize, usize);

/// Check the arguments, then run `pass` over the rows of `x` `pass_rows` at a time.
#[allow(clippy::too_many_arguments)]
fn in_passes(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    pass_rows: usize,
    pass: Pass,
) {
    check(x, w, bias, y, m, k, n);
    assert!(isa.is_available(), "{isa:?} is not available on this CPU");
    for r0 in (0..m).step_by(pass_rows) {
        let rows = pass_rows.min(m - r0);
        let x = &x[r0 * k..(r0 + rows) * k];
        let y = &mut y[r0 * n..(r0 + rows) * n];
        pass(isa, x, w, bias, y, rows, k, n);
    }
}

#[allow(clippy::too_many_arguments)]
fn kn_pass(isa: Isa, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) {
    let parts = slabs(k, n, 16);
    let slab = k.div_ceil(parts);
    let init = |out: &mut [f32]| match bias {
        Some(b) => out.chunks_mut(n).for_each(|row| row.copy_from_slice(b)),
        None => out.fill(0.0),
    };
    if parts == 1 {
        init(y);
        kn_slab(isa, x, w, y, m, k, n, 0, k);
        return;
    }
    // Taken out of the thread-local for the call and put back after.
    let mut partials = PARTIALS.take();
    {
        partials.resize(parts * m * n, 0.0);
        let out = SharedMut(partials.as_mut_ptr());
        Pool::global().run(parts, &|p| {
            let (k0, k1) = (p * slab, ((p + 1) * slab).min(k));
            // SAFETY: task `p` alone writes partial `p`, within the buffer.
            let out = unsafe { std::slice::from_raw_parts_mut({ out }.0.add(p * m * n), m * n) };
            out.fill(0.0);
            kn_slab(isa, x, w, out, m, k, n, k0, k1);
        });
        init(y);
        for part in partials.chunks(m * n) {
            y.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
    }
    PARTIALS.set(partials);
}

/// `acc[m, n] += x[:, k0..k1] · w[k0..k1, :]`.
#[allow(clippy::too_many_arguments)]
fn kn_slab(isa: Isa, x: &[f32], w: &[f32], acc: &mut [f32], m: usize, k: usize, n: usize, k0: usize, k1: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (checked by the caller), so the CPU has AVX2 and FMA.
        Isa::Avx2Fma | Isa::Avx512Vnni => unsafe { avx2::kn_slab(x, w, acc, m, k, n, k0, k1) },
        _ => {
            for kk in k0..k1 {
                let row = &w[kk * n..(kk + 1) * n];
                for r in 0..m {
                    let xv = x[r * k + kk];
                    acc[r * n..(r + 1) * n]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(a, wv)| *a += xv * wv);
                }
            }
        }
    }
}

/// [`linear_nk`] on a given path (`isa` must be one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn linear_nk_with(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    in_passes(isa, x, w, bias, y, m, k, n, PASS_ROWS, nk_pass);
}

/// One product of [`linear_nk_many`]: `y[m, n] = x · w[n, k]ᵀ + bias`.
pub struct NkProduct<'a> {
    pub w: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
    pub n: usize,
}

/// Several [`linear_nk`] products of the same `x` `[m, k]` (a layer's q, k and v, or
/// its gate and up projections) as one job of the pool: one hand-out and one wait
/// instead of one per product. Panics if a slice's length disagrees with `m`, `k`, `n`.
pub fn linear_nk_many(x: &[f32], m: usize, k: usize, products: &mut [NkProduct<'_>]) {
    let isa = Isa::best();
    if m > PASS_ROWS {
        for p in products.iter_mut() {
            linear_nk_with(isa, x, p.w, p.bias, p.y, m, k, p.n);
        }
        return;
    }
    for p in products.iter() {
        check(x, p.w, p.bias, p.y, m, k, p.n);
    }
    let split = Split::new(products.iter().map(|p| p.n), k, 8);
    // The weights and the outputs' addresses; the outputs are written only through these.
    let mut each = products.iter_mut();
    let jobs: [Option<(&[f32], Option<&[f32]>, usize, SharedMut)>; MAX_PRODUCTS] =
        std::array::from_fn(|_| each.next().map(|p| (p.w, p.bias, p.n, SharedMut(p.y.as_mut_ptr()))));
    let jobs = &jobs;
    Pool::global().run(split.tasks(), &|t| {
        let (i, j0, j1) = split.task(t);
        let (w, bias, n, out) = jobs[i].expect("a product of this call");
        // SAFETY: task `t` writes only columns j0..j1 of product i's `y` (m rows of n),
        // which outlives the job.
        let write = |r: usize, j: usize, v: f32| unsafe { *{ out }.0.add(r * n + j) = v };
        nk_slab(isa, x, w, bias, m, k, j0, j1, write);
    });
}

/// `dst[n, k] = src[k, n]ᵀ` (row-major both), in 32 x 32 blocks, split over the pool
/// by blocks of `dst` rows: re-laying a `[in, out]` weight as `[out, in]` for
/// [`linear_nk`] once at load.
pub fn transpose(src: &[f32], k: usize, n: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), k * n, "src is [k, n]");
    assert_eq!(dst.len(), k * n, "dst is [n, k]");
    const B: usize = 32;
    let out = SharedMut(dst.as_mut_ptr());
    let run = |block: usize| {
        let n0 = block * B;
        for k0 in (0..k).step_by(B) {
            for j in n0..(n0 + B).min(n) {
                for i in k0..(k0 + B).min(k) {
                    // SAFETY: block `block` writes only rows n0..n0+B of `dst`.
                    unsafe { *{ out }.0.add(j * k + i) = src[i * n + j] };
                }
            }
        }
    };
    let blocks = n.div_ceil(B);
    if k * n < PARALLEL_MIN {
        (0..blocks).for_each(run);
    } else {
        Pool::global().run(blocks, &run);
    }
}

fn nk_pass(isa: Isa, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], m: usize, k: usize, n: usize) {
    let parts = row_tasks(n, k, 8);
    let slab = n.div_ceil(parts);
    let out = SharedMut(y.as_mut_ptr());
    let run = |p: usize| {
        let (j0, j1) = (p * slab, ((p + 1) * slab).min(n));
        // SAFETY: slab `p` writes only columns j0..j1 of each of the m rows of `y`.
        let write = |r: usize, j: usize, v: f32| unsafe { *{ out }.0.add(r * n + j) = v };
        nk_slab(isa, x, w, bias, m, k, j0, j1, write);
    };
    Pool::global().run(parts, &run);
}

/// `y[r, j] = x[r, :] · w[j, :] + bias[j]` for the columns `j0..j1`, handed to `write`.
#[allow(clippy::too_many_arguments)]
fn nk_slab(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    j0: usize,
    j1: usize,
    write: impl Fn(usize, usize, f32),
) {
    assert!(j1 * k <= w.len() && x.len() >= m * k);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (checked by the caller): AVX2 and FMA; the lengths
        // are checked above.
        Isa::Avx2Fma | Isa::Avx512Vnni => unsafe { avx2::nk_tiles(x, w, bias, m, k, j0, j1, &write) },
        _ => {
            for j in j0..j1 {
                let row = &w[j * k..(j + 1) * k];
                let b = bias.map_or(0.0, |b| b[j]);
                for r in 0..m {
                    let s: f32 = row.iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a * b).sum();
                    write(r, j, s + b);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::MAX_ROWS;
    use std::arch::x86_64::*;

    /// `acc[m, n] += x[:, k0..k1] · w[k0..k1, :]`, four weight rows per sweep of `acc`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kn_slab(
        x: &[f32],
        w: &[f32],
        acc: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        k0: usize,
        k1: usize,
    ) {
        let n8 = n / 8 * 8;
        let (wp, ap) = (w.as_ptr(), acc.as_mut_ptr());
        let mut kk = k0;
        while kk + 4 <= k1 {
            let mut xb = [[_mm256_setzero_ps(); 4]; MAX_ROWS];
            for r in 0..m {
                for i in 0..4 {
                    xb[r][i] = _mm256_set1_ps(x[r * k + kk + i]);
                }
            }
            let rows = [0, 1, 2, 3].map(|i| unsafe { wp.add((kk + i) * n) });
            let mut j = 0;
            while j < n8 {
                unsafe {
                    let w0 = _mm256_loadu_ps(rows[0].add(j));
                    let w1 = _mm256_loadu_ps(rows[1].add(j));
                    let w2 = _mm256_loadu_ps(rows[2].add(j));
                    let w3 = _mm256_loadu_ps(rows[3].add(j));
                    for (r, xb) in xb.iter().enumerate().take(m) {
                        let p = ap.add(r * n + j);
                        let mut a = _mm256_loadu_ps(p);
                        a = _mm256_fmadd_ps(xb[0], w0, a);
                        a = _mm256_fmadd_ps(xb[1], w1, a);
                        a = _mm256_fmadd_ps(xb[2], w2, a);
                        a = _mm256_fmadd_ps(xb[3], w3, a);
                        _mm256_storeu_ps(p, a);
                    }
                }
                j += 8;
            }
            for j in n8..n {
                for r in 0..m {
                    let mut s = acc[r * n + j];
                    for i in 0..4 {
                        s += x[r * k + kk + i] * w[(kk + i) * n + j];
                    }
                    acc[r * n + j] = s;
                }
            }
            kk += 4;
        }
        while kk < k1 {
            let row = &w[kk * n..(kk + 1) * n];
            for r in 0..m {
                let xv = x[r * k + kk];
                let xb = _mm256_set1_ps(xv);
                let mut j = 0;
                while j < n8 {
                    unsafe {
                        let p = ap.add(r * n + j);
                        _mm256_storeu_ps(
                            p,
                            _mm256_fmadd_ps(xb, _mm256_loadu_ps(row.as_ptr().add(j)), _mm256_loadu_ps(p)),
                        );
                    }
                    j += 8;
                }
                for j in n8..n {
                    acc[r * n + j] += xv * row[j];
                }
            }
            kk += 1;
        }
    }

    /// Activation rows one tile takes.
    const TILE_X: usize = 4;

    /// `write(r, j, x[r, :] · w[j, :] + bias[j])` for the weight rows `j0..j1` and the `m`
    /// rows of `x`, in register tiles of up to 4 weight rows by [`TILE_X`] activation
    /// rows (12 or 16 accumulators, 7 or 8 loads per 12 or 16 fused multiply-adds, where
    /// one weight row against each activation row took a load per multiply-add): at 8
    /// rows the products are bound by the core, not the memory. Each output's sum is the
    /// same whatever the tile: one 8-lane accumulator over `k` in steps of 8, its lanes
    /// added in a fixed order, then the tail, so a row gets the same bits in any batch.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds rows `j0..j1` of `k` values and `x` `m` rows.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn nk_tiles(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        j0: usize,
        j1: usize,
        write: &impl Fn(usize, usize, f32),
    ) {
        let mut out = [[0f32; TILE_X]; 4];
        // Four weight rows against up to three activation rows, three against four: the
        // accumulators and the tile's weight vectors fill the 16 registers.
        let wide = if m >= TILE_X { 3 } else { 4 };
        let mut j = j0;
        while j < j1 {
            let q = wide.min(j1 - j);
            let mut r0 = 0;
            while r0 < m {
                let r = TILE_X.min(m - r0);
                // SAFETY: rows j..j + q of `w` and r0..r0 + r of `x` are in bounds (the
                // caller's checks).
                unsafe {
                    let (wp, xp) = (w.as_ptr().add(j * k), x.as_ptr().add(r0 * k));
                    match (q, r) {
                        (1, 1) => tile::<1, 1>(wp, xp, k, r0 == 0, &mut out),
                        (1, 2) => tile::<1, 2>(wp, xp, k, r0 == 0, &mut out),
                        (1, 3) => tile::<1, 3>(wp, xp, k, r0 == 0, &mut out),
                        (1, _) => tile::<1, 4>(wp, xp, k, r0 == 0, &mut out),
                        (2, 1) => tile::<2, 1>(wp, xp, k, r0 == 0, &mut out),
                        (2, 2) => tile::<2, 2>(wp, xp, k, r0 == 0, &mut out),
                        (2, 3) => tile::<2, 3>(wp, xp, k, r0 == 0, &mut out),
                        (2, _) => tile::<2, 4>(wp, xp, k, r0 == 0, &mut out),
                        (3, 1) => tile::<3, 1>(wp, xp, k, r0 == 0, &mut out),
                        (3, 2) => tile::<3, 2>(wp, xp, k, r0 == 0, &mut out),
                        (3, 3) => tile::<3, 3>(wp, xp, k, r0 == 0, &mut out),
                        (3, _) => tile::<3, 4>(wp, xp, k, r0 == 0, &mut out),
                        (_, 1) => tile::<4, 1>(wp, xp, k, r0 == 0, &mut out),
                        (_, 2) => tile::<4, 2>(wp, xp, k, r0 == 0, &mut out),
                        (_, _) => tile::<4, 3>(wp, xp, k, r0 == 0, &mut out),
                    }
                }
                for (dq, row) in out.iter().enumerate().take(q) {
                    let b = bias.map_or(0.0, |b| b[j + dq]);
                    for (dr, s) in row.iter().enumerate().take(r) {
                        write(r0 + dr, j + dq, s + b);
                    }
                }
                r0 += r;
            }
            j += q;
        }
    }

    /// `out[q][r] = w[q, :] · x[r, :]` for `Q` weight rows and `R` activation rows of `k`
    /// values from `wp` and `xp`. With `ahead`, the `Q` rows after these (the next tile,
    /// contiguous in memory) are prefetched as these are read, `32 Q` bytes a step: with
    /// 8 activation rows the core computes long enough per cache line that the hardware
    /// prefetcher's streams fall behind, and the step paid memory time plus compute time.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const Q: usize, const R: usize>(
        wp: *const f32,
        xp: *const f32,
        k: usize,
        ahead: bool,
        out: &mut [[f32; TILE_X]; 4],
    ) {
        let k8 = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); R]; Q];
        let mut i = 0;
        while i < k8 {
            if ahead {
                // A prefetch never faults; past the weight's end it fetches nothing useful.
                let next = wp.wrapping_add(Q * k + i * Q) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(next);
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64));
            }
            // SAFETY: i + 8 <= k, within each of the rows (the caller's bounds).
            unsafe {
                let mut wv = [_mm256_setzero_ps(); Q];
                for (q, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm256_loadu_ps(wp.add(q * k + i));
                }
                for r in 0..R {
                    let xv = _mm256_loadu_ps(xp.add(r * k + i));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        acc[r] = _mm256_fmadd_ps(*wv, xv, acc[r]);
                    }
                }
            }
            i += 8;
        }
        for (q, acc) in acc.iter().enumerate() {
            for (r, acc) in acc.iter().enumerate() {
                let mut s = crate::hsum256(*acc);
                for t in k8..k {
                    // SAFETY: t < k, within both rows.
                    unsafe { s = (*wp.add(q * k + t)).mul_add(*xp.add(r * k + t), s) };
                }
                out[q][r] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_fill as fill;

    /// The plain triple loop in f64, and the sum of magnitudes of each output (the scale
    /// of its rounding error).
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        kn: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                let (mut s, mut a) = (
                    bias.map_or(0.0, |b| b[j] as f64),
                    bias.map_or(0.0, |b| b[j].abs() as f64),
                );
                for i in 0..k {
                    let wv = if kn { w[i * n + j] } else { w[j * k + i] } as f64;
                    s += x[r * k + i] as f64 * wv;
                    a += (x[r * k + i] as f64 * wv).abs();
                }
                y[r * n + j] = s;
                mag[r * n + j] = a;
            }
        }
        (y, mag)
    }

    fn check_close(got: &[f32], want: &[f64], mag: &[f64], what: &str) {
        for (i, ((g, w), a)) in got.iter().zip(want).zip(mag).enumerate() {
            let err = (*g as f64 - w).abs();
            assert!(
                err <= 1e-5 * a.max(1e-30),
                "{what}: element {i}: {g} vs {w} (|diff| {err}, scale {a})"
            );
        }
    }

    /// Shapes that hit every tail: k not a multiple of 4 or 16, n not a multiple of 8,
    /// m over MAX_ROWS and PASS_ROWS, weights above and below the parallel threshold.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 3),
        (1, 37, 9),
        (2, 33, 17),
        (3, 576, 192),
        (1, 576, 1536),
        (4, 1537, 35),
        (8, 64, 1000),
        (11, 130, 257),
        (1, 576, 4099),
        (5, 24, 11),
        (6, 129, 50),
        (7, 17, 7),
        (16, 576, 200),
        (40, 70, 33),
    ];

    #[test]
    fn linear_kn_matches_the_triple_loop_on_every_path() {
        for isa in Isa::available() {
            for &(m, k, n) in SHAPES {
                let (x, w, b) = (fill(m * k, 1), fill(k * n, 2), fill(n, 3));
                for bias in [None, Some(&b[..])] {
                    let mut y = vec![f32::NAN; m * n];
                    linear_kn_with(isa, &x, &w, bias, &mut y, m, k, n);
                    let (want, mag) = reference(&x, &w, bias, m, k, n, true);
                    check_close(
                        &y,
                        &want,
                        &mag,
                        &format!("{isa:?} kn m={m} k={k} n={n} bias={}", bias.is_some()),
                    );
                }
            }
        }
    }

    #[test]
    fn linear_nk_matches_the_triple_loop_on_every_path() {
        for isa in Isa::available() {
            for &(m, k, n) in SHAPES {
                let (x, w, b) = (fill(m * k, 4), fill(k * n, 5), fill(n, 6));
                for bias in [None, Some(&b[..])] {
                    let mut y = vec![f32::NAN; m * n];
                    linear_nk_with(isa, &x, &w, bias, &mut y, m, k, n);
                    let (want, mag) = reference(&x, &w, bias, m, k, n, false);
                    check_close(
                        &y,
                        &want,
                        &mag,
                        &format!("{isa:?} nk m={m} k={k} n={n} bias={}", bias.is_some()),
                    );
                }
            }
        }
    }

    /// A sequence's products do not depend on what it is batched with: alone it gets the
    /// bits it gets in a batch.
    #[test]
    fn one_row_equals_its_row_in_a_batch_bit_for_bit() {
        let (k, n) = (37 * 16 + 5, 43);
        let (x, w) = (fill(k, 3), fill(k * n, 4));
        for isa in Isa::available() {
            let mut y1 = vec![0f32; n];
            linear_nk_with(isa, &x, &w, None, &mut y1, 1, k, n);
            // Batches whose tiles differ (4 weight rows by 2, by 1 + 4, 3 by 4 + 4): the
            // row sits in every position of them.
            for m in [2, 5, 8, 16] {
                let others = fill((m - 1) * k, 5 + m as u64);
                for at in 0..m {
                    let mut xm = others[..at * k].to_vec();
                    xm.extend_from_slice(&x);
                    xm.extend_from_slice(&others[at * k..]);
                    let mut ym = vec![0f32; m * n];
                    linear_nk_with(isa, &xm, &w, None, &mut ym, m, k, n);
                    assert_eq!(y1[..], ym[at * n..(at + 1) * n], "{isa:?} m={m} at {at}");
                }
            }
        }
    }

    #[test]
    fn one_slab_and_many_agree() {
        let (m, k, n) = (2, 576, 1536);
        let (x, w) = (fill(m * k, 7), fill(k * n, 8));
        let mut outs = Vec::new();
        for isa in Isa::available() {
            let mut y = vec![0f32; m * n];
            linear_kn_with(isa, &x, &w, None, &mut y, m, k, n);
            outs.push(y);
            // and on the calling thread alone
            let mut y = vec![0f32; m * n];
            kn_slab(isa, &x, &w, &mut y, m, k, n, 0, k);
            outs.push(y);
        }
        let (want, mag) = reference(&x, &w, None, m, k, n, true);
        for y in &outs {
            check_close(y, &want, &mag, "kn across thread counts");
        }
    }

    #[test]
    fn linear_nk_many_equals_one_product_at_a_time() {
        let (m, k) = (3, 576);
        let sizes = [576usize, 192, 192, 7];
        let x = fill(m * k, 9);
        let ws: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| fill(n * k, 10 + i as u64))
            .collect();
        let bias = fill(576, 20);
        let mut ys: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; m * n]).collect();
        let mut products: Vec<NkProduct> = ys
            .iter_mut()
            .zip(&ws)
            .zip(&sizes)
            .map(|((y, w), &n)| NkProduct {
                w,
                bias: (n == 576).then_some(&bias[..]),
                y,
                n,
            })
            .collect();
        linear_nk_many(&x, m, k, &mut products);
        for ((y, w), &n) in ys.iter().zip(&ws).zip(&sizes) {
            let mut one = vec![0f32; m * n];
            linear_nk(&x, w, (n == 576).then_some(&bias[..]), &mut one, m, k, n);
            assert_eq!(y, &one, "n = {n}");
        }
    }

    #[test]
    fn transpose_is_the_transpose() {
        for (k, n) in [(1, 1), (3, 70), (576, 192), (33, 65)] {
            let src = fill(k * n, 30);
            let mut dst = vec![f32::NAN; k * n];
            transpose(&src, k, n, &mut dst);
            for i in 0..k {
                for j in 0..n {
                    assert_eq!(dst[j * k + i], src[i * n + j], "{k}x{n} [{i}, {j}]");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "x is [m, k]")]
    fn a_wrong_length_is_refused() {
        let mut y = vec![0f32; 4];
        linear_kn(&[0.0; 3], &[0.0; 8], None, &mut y, 2, 2, 2);
    }
}
