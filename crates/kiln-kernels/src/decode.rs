//! The small operations of a decode step, one pass each: RMS normalisation and the
//! attention of one query position over a key/value cache.
//!
//! Composed from Burn ops, a decode step's RMS norm is five kernels and five buffers
//! (square, mean, add, sqrt, divide, scale) and its attention over a grouped-query cache
//! copies every cached key and value once per step to repeat the heads; together with
//! the rest, about 60 small ops per layer, 5-6 ms of a 30 ms SmolLM2 step. Here each is
//! one loop over the data, writing into the caller's buffer.

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * g` for each row `r` of `x` `[rows, c]`,
/// where `g = gamma` or, with `add_one` (Gemma's convention), `g = 1 + gamma`. The mean
/// of squares is accumulated in f64.
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, add_one: bool, out: &mut [f32]) {
    let c = gamma.len();
    assert!(c > 0 && x.len() % c == 0, "x is [rows, gamma.len()]");
    assert_eq!(out.len(), x.len(), "out is like x");
    for (row, o) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / c as f64;
        let rms = (ms as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(gamma) {
            let g = if add_one { g + 1.0 } else { g };
            *o = v / rms * g;
        }
    }
}

/// The gated MLP's activation and product in one pass: `out = act(gate) * up`, with
/// `act` SiLU (`g * sigmoid(g)`, Llama) or, with `gelu`, GELU's tanh approximation in
/// its sigmoid form (`g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3))`, Gemma; what
/// `fused::gelu_tanh` computes off libtorch).
///
/// A batch's activations (16 rows of SmolLM2's 1,536) are split over the kernel pool in
/// chunks of [`GATED_CHUNK`]: one exponential per element on the calling thread was 4 %
/// of a 16-client server's samples, with the pool's other thread waiting. Each element
/// is computed alone, so the split does not change a bit.
pub fn gated(gate: &[f32], up: &[f32], gelu: bool, out: &mut [f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up alike");
    assert_eq!(out.len(), gate.len(), "out like gate");
    let len = gate.len();
    if len < 2 * GATED_CHUNK {
        return gated_range(gate, up, gelu, out);
    }
    let dst = crate::SharedMut(out.as_mut_ptr());
    crate::pool::Pool::global().run(len.div_ceil(GATED_CHUNK), &|t| {
        let (a, b) = (t * GATED_CHUNK, ((t + 1) * GATED_CHUNK).min(len));
        // SAFETY: task `t` alone writes out[a..b], within `out`.
        let out = unsafe { std::slice::from_raw_parts_mut({ dst }.0.add(a), b - a) };
        gated_range(&gate[a..b], &up[a..b], gelu, out);
    });
}

/// Elements of one task of [`gated`].
const GATED_CHUNK: usize = 4096;

fn gated_range(gate: &[f32], up: &[f32], gelu: bool, out: &mut [f32]) {
    const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let z = if gelu {
            (g + g * g * g * 0.044715) * TWO_SQRT_2_OVER_PI
        } else {
            g
        };
        *o = g * (1.0 / (1.0 + (-z).exp())) * u;
    }
}

/// Rotary embedding of one position per row, HF's rotate-half layout: `x` `[rows, heads, d]`,
/// `cos`/`sin` `[rows, d]` the values of each row's position:
/// `out = x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]`
/// (the products and the sum in that order, as the Burn ops compute them).
pub fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize, out: &mut [f32]) {
    assert!(d % 2 == 0 && d > 0 && heads > 0, "even head size");
    assert_eq!(x.len() % (heads * d), 0, "x is [rows, heads, d]");
    let rows = x.len() / (heads * d);
    assert_eq!(out.len(), x.len(), "out is like x");
    assert!(
        cos.len() == rows * d && sin.len() == rows * d,
        "cos and sin are [rows, d]"
    );
    let half = d / 2;
    for r in 0..rows {
        let (c, s) = (&cos[r * d..(r + 1) * d], &sin[r * d..(r + 1) * d]);
        for h in 0..heads {
            let at = (r * heads + h) * d;
            let (xh, oh) = (&x[at..at + d], &mut out[at..at + d]);
            for j in 0..d {
                let rot = if j < half { -xh[j + half] } else { xh[j - half] };
                oh[j] = xh[j] * c[j] + rot * s[j];
            }
        }
    }
}

/// Where one sequence's cached keys (or values) are: `data[start + h * head_stride + t * d ..][..d]`
/// is head `h`, position `t`.
#[derive(Debug, Clone, Copy)]
pub struct CacheView<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub head_stride: usize,
}

/// One sequence's query position for [`attention_steps`]: `q` `[heads, d]` over its
/// `len` cached positions.
#[derive(Debug, Clone, Copy)]
pub struct AttentionRow<'a> {
    pub q: &'a [f32],
    pub keys: CacheView<'a>,
    pub values: CacheView<'a>,
    pub len: usize,
}

/// The attention of each of a decode step's sequences at one query position: row `r`'s
/// `q` `[heads, d]` over its `len` cached positions of `kv_heads` key/value heads (query
/// head `h` reads key/value head `h / (heads / kv_heads)`), only the last `window` of them
/// when given: per head `softmax(s) v` with `s_t = scale * q·k_t`, soft-capped to
/// `cap * tanh(s_t / cap)` when `softcap` is given (Burn's `attention` order). `out` is
/// `[rows, heads, d]`.
///
/// Every (sequence, head) pair is one task of the kernel pool once the caches are long
/// enough to pay for the hand-out (on one thread, the attention of a 600-token SmolLM2
/// decode was 6 % of the step's samples while the other thread waited); each thread
/// scores into its own reused buffer. The loops are compiled for AVX2 + FMA as well,
/// picked at run time; the arithmetic is the same (fused multiply-adds written as
/// `f32::mul_add`, which is exact everywhere, in the same order), so are the results.
#[allow(clippy::too_many_arguments)]
pub fn attention_steps(
    rows: &[AttentionRow<'_>],
    heads: usize,
    kv_heads: usize,
    d: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    out: &mut [f32],
) {
    let isa = crate::Isa::best();
    attention_steps_with(isa, rows, heads, kv_heads, d, window, scale, softcap, out);
}

/// [`attention_steps`] on a given path (`isa` must be one of [`crate::Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_steps_with(
    isa: crate::Isa,
    rows: &[AttentionRow<'_>],
    heads: usize,
    kv_heads: usize,
    d: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    out: &mut [f32],
) {
    assert!(isa.is_available(), "{isa:?} is not available on this CPU");
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "heads is a multiple of kv_heads"
    );
    assert_eq!(out.len(), rows.len() * heads * d, "out is [rows, heads, d]");
    for row in rows {
        assert_eq!(row.q.len(), heads * d, "q is [heads, d]");
        assert!(row.len > 0, "at least one cached position");
        for view in [row.keys, row.values] {
            let last = view.start + (kv_heads - 1) * view.head_stride + row.len * d;
            assert!(
                last <= view.data.len(),
                "the cache holds {kv_heads} heads of {} positions",
                row.len
            );
        }
    }
    let first = |row: &AttentionRow| window.map_or(0, |w| row.len.saturating_sub(w));
    let rep = heads / kv_heads;
    let out = crate::SharedMut(out.as_mut_ptr());
    let task = |t: usize| {
        let (r, h) = (t / heads, t % heads);
        let row = &rows[r];
        // SAFETY: task `t` alone writes `out[t * d..(t + 1) * d]` (row r, head h), within `out`.
        let oh = unsafe { std::slice::from_raw_parts_mut({ out }.0.add(t * d), d) };
        let g = h / rep;
        let (first, keys, values) = (first(row), row.keys, row.values);
        let (kbase, vbase) = (keys.start + g * keys.head_stride, values.start + g * values.head_stride);
        let head = Head {
            q: &row.q[h * d..(h + 1) * d],
            keys: &keys.data[kbase + first * d..kbase + row.len * d],
            values: &values.data[vbase + first * d..vbase + row.len * d],
            scale,
            softcap,
        };
        SCORES.with_borrow_mut(|scores| {
            scores.resize(row.len - first, 0.0);
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is available (asserted above): AVX2.
                crate::Isa::Avx2Fma | crate::Isa::Avx512Vnni => unsafe { attend_head_avx2(&head, scores, oh) },
                _ => attend_head(&head, scores, oh, dot4),
            }
        });
    };
    let tasks = rows.len() * heads;
    let work: usize = rows.iter().map(|row| (row.len - first(row)) * heads * d).sum();
    if tasks > 1 && work >= crate::matvec::PARALLEL_MIN {
        crate::pool::Pool::global().run(tasks, &task);
    } else {
        (0..tasks).for_each(task);
    }
}

thread_local! {
    /// One thread's attention scores, reused across heads and steps.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One head's query and its keys and values `[positions, d]` (contiguous).
struct Head<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    scale: f32,
    softcap: Option<f32>,
}

/// [`attend_head`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(head: &Head, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: this function runs only where AVX2 is (its own target feature).
    attend_head(head, scores, out, |a, b| unsafe { dot4_avx2(a, b) })
}

/// One head: `out = softmax(s) v` over the `scores.len()` positions. The exponentials
/// are [`exp_nonpositive`] eight at a time, summed in eight lanes (written as plain
/// lane-wise Rust, so the AVX2 build vectorises the same operations: the same bits).
#[inline(always)]
fn attend_head(head: &Head, scores: &mut [f32], out: &mut [f32], dot4: impl Fn(&[f32], [&[f32]; 4]) -> [f32; 4]) {
    let d = head.q.len();
    let mut max = f32::NEG_INFINITY;
    let mut score = |s: &mut f32, dot: f32| {
        let mut v = dot * head.scale;
        if let Some(cap) = head.softcap {
            v = cap * (v / cap).tanh();
        }
        *s = v;
        max = max.max(v);
    };
    // Four positions at a time: four independent sums (one position's sum is a chain of
    // dependent adds), each in the same order as `dot` alone.
    let mut keys4 = head.keys.chunks_exact(4 * d);
    let mut scores4 = scores.chunks_exact_mut(4);
    for (s, k) in (&mut scores4).zip(&mut keys4) {
        let dots = dot4(head.q, [&k[..d], &k[d..2 * d], &k[2 * d..3 * d], &k[3 * d..]]);
        for (s, dot) in s.iter_mut().zip(dots) {
            score(s, dot);
        }
    }
    for (s, k) in scores4
        .into_remainder()
        .iter_mut()
        .zip(keys4.remainder().chunks_exact(d))
    {
        score(s, dot(head.q, k));
    }
    let mut lanes = [0f32; 8];
    let mut chunks = scores.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *s = exp_nonpositive(*s - max);
            *l += *s;
        }
    }
    for (s, l) in chunks.into_remainder().iter_mut().zip(lanes.iter_mut()) {
        *s = exp_nonpositive(*s - max);
        *l += *s;
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    let inv = 1.0 / sum;
    // 64 columns of `out` at a time, held in registers over all positions (the same sums,
    // in the same order, as a pass per position over the whole row). The full-width loop
    // is written apart from the last, narrower one so that its length is a constant: that
    // is what lets the compiler keep `acc` in registers.
    const COLS: usize = 64;
    for c0 in (0..d).step_by(COLS) {
        let w = COLS.min(d - c0);
        let mut acc = [0f32; COLS];
        if w == COLS {
            for (&p, v) in scores.iter().zip(head.values.chunks_exact(d)) {
                let (p, v) = (p * inv, &v[c0..c0 + COLS]);
                acc.iter_mut().zip(v).for_each(|(o, &v)| *o = p.mul_add(v, *o));
            }
        } else {
            for (&p, v) in scores.iter().zip(head.values.chunks_exact(d)) {
                let (p, v) = (p * inv, &v[c0..c0 + w]);
                acc.iter_mut().zip(v).for_each(|(o, &v)| *o = p.mul_add(v, *o));
            }
        }
        out[c0..c0 + w].copy_from_slice(&acc[..w]);
    }
}

/// [`dot4`] in AVX2 registers, one accumulator per row (the compiler's own vectorisation
/// of `dot4` went across the four rows and spilled), the same operations.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = a.len() / 8 * 8;
    assert!(b.iter().all(|b| b.len() >= a.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= every row's length.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            for (acc, b) in acc.iter_mut().zip(&b) {
                *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)), *acc);
            }
        }
    }
    std::array::from_fn(|r| {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        lanes.iter().sum::<f32>() + tail(&a[n..], &b[r][n..])
    })
}

/// [`dot`] of `a` with four rows at once (each sum as `dot` computes it).
#[inline(always)]
fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a.len() / 8 * 8;
    let mut acc = [[0f32; 8]; 4];
    for i in (0..n).step_by(8) {
        let x = &a[i..i + 8];
        for (acc, b) in acc.iter_mut().zip(&b) {
            let y = &b[i..i + 8];
            for l in 0..8 {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
    }
    std::array::from_fn(|r| acc[r].iter().sum::<f32>() + tail(&a[n..], &b[r][n..]))
}

/// `e^x` for the scores of a softmax less their maximum (`x <= 0`; NaN stays NaN): Cephes'
/// `expf` (`x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-7 polynomial in `r`, times `2^n`),
/// within 2 ulp of `exp` (tested), in plain operations the compiler vectorises (libm's
/// `expf` is a call per cached position).
/// Below -87 it returns `e^-87` instead of a smaller number (8e-39: nothing, beside the
/// maximum's 1).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: C1 exact in a few bits, so `fx * C1` is exact.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    let x = if x < -87.0 {
        -87.0
    } else if x > 0.0 {
        0.0
    } else {
        x
    };
    let fx = (x * LOG2E + 0.5).floor();
    let r = (x - fx * C1) - fx * C2;
    let z = r * r;
    let mut y = P[0];
    for c in &P[1..] {
        y = y * r + c;
    }
    let y = (y * z + r) + 1.0;
    // fx is in [-125, 0]: 2^fx is a normal f32 (NaN: fx as i32 is 0, y stays NaN).
    let n = fx as i32;
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// A dot product with eight independent partial sums (vectorised by the compiler).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest = tail(ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The last (fewer than eight) products of a dot product, in order.
#[inline(always)]
fn tail(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (x, y)| x.mul_add(*y, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_its_definition() {
        let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
        let gamma = [0.5f32, -1.0, 2.0, 0.25];
        for add_one in [false, true] {
            let mut out = vec![0f32; 12];
            rms_norm(&x, &gamma, 1e-6, add_one, &mut out);
            for r in 0..3 {
                let row = &x[r * 4..r * 4 + 4];
                let rms = (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 4.0 + 1e-6).sqrt();
                for j in 0..4 {
                    let g = gamma[j] as f64 + if add_one { 1.0 } else { 0.0 };
                    let want = row[j] as f64 / rms * g;
                    assert!((out[r * 4 + j] as f64 - want).abs() < 1e-6, "{add_one} {r} {j}");
                }
            }
        }
    }

    /// The plain definition with the heads repeated, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
        kv: usize,
        d: usize,
        len: usize,
        alloc: usize,
        first: usize,
        scale: f64,
        cap: Option<f64>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; heads * d];
        for h in 0..heads {
            let g = h / (heads / kv);
            let at = |buf: &[f32], t: usize, j: usize| buf[g * alloc * d + t * d + j] as f64;
            let s: Vec<f64> = (first..len)
                .map(|t| {
                    let dot: f64 = (0..d).map(|j| q[h * d + j] as f64 * at(k, t, j)).sum::<f64>() * scale;
                    cap.map_or(dot, |c| c * (dot / c).tanh())
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for j in 0..d {
                out[h * d + j] = (first..len).map(|t| e[t - first] / z * at(v, t, j)).sum();
            }
        }
        out
    }

    #[test]
    fn attention_steps_match_the_definition_with_grouped_heads_window_and_softcap() {
        // The last two run the heads on the pool (6 * len * 20 >= PARALLEL_MIN).
        let (heads, kv, d, alloc) = (6, 2, 20, 320);
        let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
        let (q, k, v) = (
            fill(heads * d, 0.37),
            fill(kv * alloc * d, 0.11),
            fill(kv * alloc * d, 0.23),
        );
        for (len, window, cap) in [
            (1, None, None),
            (13, None, None),
            (13, Some(4), None),
            (16, Some(32), Some(0.5)),
            (300, None, None),
            (320, Some(310), Some(0.5)),
        ] {
            let mut out = vec![0f32; heads * d];
            let view = |data| CacheView {
                data,
                start: 0,
                head_stride: alloc * d,
            };
            let scale = 1.0 / (d as f32).sqrt();
            let row = AttentionRow {
                q: &q,
                keys: view(&k),
                values: view(&v),
                len,
            };
            attention_steps(&[row], heads, kv, d, window, scale, cap, &mut out);
            let first = window.map_or(0, |w| len.saturating_sub(w));
            let want = reference(
                &q,
                &k,
                &v,
                heads,
                kv,
                d,
                len,
                alloc,
                first,
                scale as f64,
                cap.map(|c| c as f64),
            );
            for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*o as f64 - w).abs() < 1e-5,
                    "len {len} window {window:?} cap {cap:?} [{i}]: {o} vs {w}"
                );
            }
        }
    }

    /// Several sequences in one call, on every path the CPU has: each row as it is alone
    /// (bit for bit), and every path's bits the same.
    #[test]
    fn attention_steps_of_several_rows_equal_each_row_alone_on_every_path() {
        // d = 68: a tail after the dot products' 8-value chunks and after 64 columns.
        for d in [24, 68] {
            let (heads, kv, alloc) = (4, 2, 400);
            let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
            let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
                .map(|r| {
                    (
                        fill(kv * alloc * d, 0.1 + r as f32 * 0.01),
                        fill(kv * alloc * d, 0.2 + r as f32 * 0.03),
                    )
                })
                .collect();
            let qs: Vec<Vec<f32>> = (0..3).map(|r| fill(heads * d, 0.3 + r as f32 * 0.07)).collect();
            fn view(data: &[f32], head_stride: usize) -> CacheView<'_> {
                CacheView {
                    data,
                    start: 0,
                    head_stride,
                }
            }
            // Short and long caches: one call on one thread, one on the pool.
            for lens in [[1, 5, 9], [150, 399, 400]] {
                for (window, cap) in [(None, None), (Some(100), Some(0.7))] {
                    let rows: Vec<AttentionRow> = (0..3)
                        .map(|r| AttentionRow {
                            q: &qs[r],
                            keys: view(&caches[r].0, alloc * d),
                            values: view(&caches[r].1, alloc * d),
                            len: lens[r],
                        })
                        .collect();
                    let mut outs = Vec::new();
                    for isa in crate::Isa::available() {
                        let mut all = vec![0f32; 3 * heads * d];
                        attention_steps_with(isa, &rows, heads, kv, d, window, 0.2, cap, &mut all);
                        for (r, row) in rows.iter().enumerate() {
                            let mut one = vec![0f32; heads * d];
                            attention_steps_with(isa, &[*row], heads, kv, d, window, 0.2, cap, &mut one);
                            assert_eq!(
                                one[..],
                                all[r * heads * d..(r + 1) * heads * d],
                                "{isa:?} row {r} {lens:?}"
                            );
                        }
                        outs.push(all);
                    }
                    assert!(outs.windows(2).all(|w| w[0] == w[1]), "every path alike, {lens:?}");
                }
            }
        }
    }

    #[test]
    fn gated_is_the_activation_times_up() {
        let gate = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let up = [1.5f32, -2.0, 3.0, 0.25, -1.0];
        let mut out = [0f32; 5];
        for gelu in [false, true] {
            gated(&gate, &up, gelu, &mut out);
            for i in 0..5 {
                let g = gate[i] as f64;
                let act = if gelu {
                    0.5 * g * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g.powi(3))).tanh())
                } else {
                    g / (1.0 + (-g).exp())
                };
                assert!((out[i] as f64 - act * up[i] as f64).abs() < 1e-6, "gelu {gelu} [{i}]");
            }
        }
    }

    /// Over the pool (more than two chunks, a ragged last one) every element is what the
    /// one-thread loop gives it.
    #[test]
    fn gated_over_the_pool_equals_gated_on_one_thread() {
        let len = 2 * GATED_CHUNK + 123;
        let (gate, up) = (crate::test_fill(len, 61), crate::test_fill(len, 62));
        for gelu in [false, true] {
            let mut pooled = vec![f32::NAN; len];
            gated(&gate, &up, gelu, &mut pooled);
            let mut alone = vec![f32::NAN; len];
            gated_range(&gate, &up, gelu, &mut alone);
            assert_eq!(pooled, alone, "gelu {gelu}");
        }
    }

    #[test]
    fn rope_rows_rotates_each_row_by_its_own_values() {
        let (heads, d) = (2, 4);
        let angle = |p: usize, j: usize| p as f32 * (j % 2 + 1) as f32 * 0.3;
        // rows at positions 3 and 0
        let positions = [3, 0];
        let cos: Vec<f32> = (0..2 * d).map(|i| angle(positions[i / d], i % d).cos()).collect();
        let sin: Vec<f32> = (0..2 * d).map(|i| angle(positions[i / d], i % d).sin()).collect();
        let x: Vec<f32> = (0..2 * heads * d).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut out = vec![0f32; x.len()];
        rope_rows(&x, &cos, &sin, heads, d, &mut out);
        for r in 0..2 {
            for h in 0..heads {
                let v = &x[(r * heads + h) * d..][..d];
                let rot = [-v[2], -v[3], v[0], v[1]];
                for j in 0..d {
                    let want = v[j] * cos[r * d + j] + rot[j] * sin[r * d + j];
                    assert_eq!(out[(r * heads + h) * d + j], want, "row {r} head {h} [{j}]");
                }
            }
        }
        // position 0 is the identity
        assert_eq!(&out[heads * d..], &x[heads * d..]);
    }

    #[test]
    #[should_panic(expected = "the cache holds")]
    fn a_cache_shorter_than_len_is_refused() {
        let buf = vec![0f32; 10];
        let view = CacheView {
            data: &buf,
            start: 0,
            head_stride: 10,
        };
        let row = AttentionRow {
            q: &[0.0; 2],
            keys: view,
            values: view,
            len: 6,
        };
        attention_steps(&[row], 1, 1, 2, None, 1.0, None, &mut [0.0; 2]);
    }

    #[test]
    fn exp_nonpositive_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert!(exp_nonpositive(-1e30) < 1e-37);
    }
}
