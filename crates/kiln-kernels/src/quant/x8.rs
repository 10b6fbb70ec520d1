//! Packed weights interleaved eight rows at a time ([`Layout::X8`](super::Layout::X8)), the layout the
//! products read fastest (llama.cpp repacks its Q4_0 the same way at load, its
//! `block_q4_0x8`; this layout is Kiln's own). GGUF stores each row's blocks one after
//! another, so a product of one weight row with an activation block ends in eight i32
//! lanes that need a horizontal sum, and every block's f16 scale is a scalar to convert
//! and broadcast. Here the eight rows' blocks `b` sit together: their eight scales in one
//! 16-byte load, and their values in 32-byte chunks whose lane `r` holds four values of
//! row `r`, so one `vpdpbusd` against four broadcast activation values advances all
//! eight rows, and the block's scales are applied to the eight sums at once.
//!
//! One group-block (eight rows, one 32-value block each), `8 x block_bytes` bytes:
//!
//! | type | bytes | layout |
//! |---|---:|---|
//! | Q8_0 | 272 | 8 f16 `d`; 8 chunks of 32: chunk `c`, byte `4r + t` = row `r`'s `q[4c + t] ^ 0x80` |
//! | Q4_0 | 144 | 8 f16 `d`; 4 chunks of 32: chunk `c`, byte `4r + t` = row `r`'s packed byte `4c + t` |
//! | Q4_1 | 160 | 8 f16 `d`; 8 f16 `m`; 4 chunks as Q4_0 |
//! | Q5_0 | 176 | 8 f16 `d`; 8 u32 `qh`; 4 chunks as Q4_0 |
//! | Q4_K | 192 | 8 f32 `s`; 8 f32 `m`; 4 chunks as Q4_0 |
//! | Q6_K | 288 | 8 f16 `d`; 8 i8 `s0`; 8 i8 `s1`; 8 chunks as Q8_0, the values as they are |
//!
//! (Each row's numbers of its block, in the block's order, eight rows at a time: a field
//! `w` bytes wide is `8 w` bytes, row `r`'s at `w r`.)
//!
//! (Q8_0's values are stored offset by 128, as unsigned bytes, so `vpdpbusd` takes them
//! directly: `Σ (q + 128) x - 128 Σ x = Σ q x`, exact in i32.) Groups follow each other,
//! blocks in order within a group: group `g`'s block `b` starts at `(g * blocks + b) * 8 *
//! block_bytes`. The bytes are as many as GGUF's; [`interleave`] and [`row_blocks`] turn
//! one into the other.
//!
//! Every path computes a row's sum the same way, so it gets the same bits on any path, in
//! any batch and any split over threads: per block, the i32 dot product of the values
//! with the activation block's (exact; Q4_0 and Q8_0 with their offsets `-8` and `-128`
//! taken out in integers), then `acc = fma(d_w * d_x, dot, acc)`, and for Q4_1 `off =
//! fma(m_w, d_x Σ x, off)`; the row's value is `acc (+ off)`. Q5_0 is Q4_0 with the fifth
//! bits ORed into the nibbles and the offset `-16`; Q4_K is Q4_1 with f32 numbers; Q6_K
//! takes the dot products of its two 16-value halves apart, `acc = fma((d s0) d_x, dot0,
//! acc)` then the same with `s1`.

use super::{ActBlock, BLOCK, QuantType, f16_at, f32_at};
use crate::matvec::MAX_ROWS;

/// Rows per group.
pub const ROWS: usize = 8;

/// `$f::<T, M>(args)` for the type code `T` of `$ty` (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4
/// Q4_K, 5 Q6_K) and `M = $m` activation rows (1 to 8): one compiled loop per type and
/// row count.
macro_rules! by_type_and_rows {
    ($f:ident, $ty:expr, $m:expr, $args:tt) => {
        match $ty {
            QuantType::Q8_0 => by_rows!($f, 0, $m, $args),
            QuantType::Q4_0 => by_rows!($f, 1, $m, $args),
            QuantType::Q4_1 => by_rows!($f, 2, $m, $args),
            QuantType::Q5_0 => by_rows!($f, 3, $m, $args),
            QuantType::Q4K => by_rows!($f, 4, $m, $args),
            QuantType::Q6K => by_rows!($f, 5, $m, $args),
        }
    };
}

macro_rules! by_rows {
    ($f:ident, $t:expr, $m:expr, ($($arg:expr),*)) => {
        match $m {
            1 => $f::<{ $t }, 1>($($arg),*),
            2 => $f::<{ $t }, 2>($($arg),*),
            3 => $f::<{ $t }, 3>($($arg),*),
            4 => $f::<{ $t }, 4>($($arg),*),
            5 => $f::<{ $t }, 5>($($arg),*),
            6 => $f::<{ $t }, 6>($($arg),*),
            7 => $f::<{ $t }, 7>($($arg),*),
            _ => $f::<{ $t }, 8>($($arg),*),
        }
    };
}

/// Bytes of the numbers (scales, minima, fifth bits) at the start of a group-block.
const fn head_bytes(ty: QuantType) -> usize {
    ROWS * ty.head_len()
}

/// Whether a `[n, k]` weight can take the layout (whole groups of eight rows).
pub fn fits(n: usize) -> bool {
    n > 0 && n.is_multiple_of(ROWS)
}

/// Whether this CPU reads the layout faster than GGUF's: with AVX2 (measured by
/// `examples/matvec_bandwidth.rs`: 2.4-3.6x on SmolLM2's products); the portable loop
/// over it is slower than over rows, so a CPU without them keeps the rows.
pub fn preferred() -> bool {
    crate::Isa::best().has_avx2()
}

/// Where byte `i` of row `r`'s GGUF block goes in the group-block, and what it is XORed
/// with there: the f16 scale (and Q4_1's minimum) into the scales, each value byte into
/// its chunk (Q8_0's offset by 128). The one map [`interleave_in_place`] and
/// [`row_blocks`] both follow, one way and back, as a table made once per call
/// ([`byte_map`]: the loads of a whole model go through it byte by byte).
fn byte_at(ty: QuantType, r: usize, i: usize) -> (usize, u8) {
    let (mut base, mut start) = (0, 0);
    for width in ty.head().iter().map(|f| f.width()) {
        if i < start + width {
            return (base + width * r + i - start, 0);
        }
        base += ROWS * width;
        start += width;
    }
    let v = i - start;
    let flip = if ty == QuantType::Q8_0 { 0x80 } else { 0 };
    (base + (v / 4) * 32 + r * 4 + v % 4, flip)
}

/// The largest group-block (Q6_K's).
const MAX_GROUP_BLOCK: usize = ROWS * QuantType::Q6K.block_bytes();

/// [`byte_at`] for every row and byte of a group-block: entry `r * block_bytes + i`.
fn byte_map(ty: QuantType) -> [(u16, u8); MAX_GROUP_BLOCK] {
    let bb = ty.block_bytes();
    let mut map = [(0u16, 0u8); MAX_GROUP_BLOCK];
    for (e, slot) in map.iter_mut().enumerate().take(ROWS * bb) {
        let (at, flip) = byte_at(ty, e / bb, e % bb);
        *slot = (at as u16, flip);
    }
    map
}

/// `rows` (`n` rows of `k` values packed as `ty`, GGUF's layout) in [`Layout::X8`](super::Layout::X8).
/// Panics unless `n` is a multiple of eight and the lengths agree.
pub fn interleave(ty: QuantType, rows: &[u8], n: usize, k: usize) -> Vec<u8> {
    let mut out = rows.to_vec();
    interleave_in_place(ty, &mut out, n, k);
    out
}

/// [`interleave`] in place (a group's eight rows occupy the same bytes in both
/// layouts): no second copy of the weight, one group's bytes of scratch.
pub fn interleave_in_place(ty: QuantType, w: &mut [u8], n: usize, k: usize) {
    let (bb, blocks) = (ty.block_bytes(), k / BLOCK);
    let rb = blocks * bb;
    assert!(
        fits(n) && k.is_multiple_of(BLOCK),
        "whole groups of 8 rows and 32-value blocks"
    );
    assert_eq!(w.len(), n * rb, "{}: n rows of k values", ty.name());
    let map = byte_map(ty);
    let mut rows = vec![0u8; ROWS * rb];
    for group in w.chunks_exact_mut(ROWS * rb) {
        rows.copy_from_slice(group);
        for (b, dst) in group.chunks_exact_mut(ROWS * bb).enumerate() {
            for r in 0..ROWS {
                let src = &rows[r * rb + b * bb..][..bb];
                for (&byte, &(at, flip)) in src.iter().zip(&map[r * bb..(r + 1) * bb]) {
                    dst[at as usize] = byte ^ flip;
                }
            }
        }
    }
}

/// Row `j`'s blocks in GGUF's layout, from `w` in [`Layout::X8`](super::Layout::X8)
/// (rows of `k` values): `out` is one row's bytes.
pub fn row_blocks(ty: QuantType, w: &[u8], k: usize, j: usize, out: &mut [u8]) {
    let (bb, blocks) = (ty.block_bytes(), k / BLOCK);
    assert_eq!(out.len(), blocks * bb, "one row's bytes");
    let (g, r) = (j / ROWS, j % ROWS);
    let map = byte_map(ty);
    for (b, dst) in out.chunks_exact_mut(bb).enumerate() {
        let src = &w[(g * blocks + b) * ROWS * bb..][..ROWS * bb];
        for (byte, &(at, flip)) in dst.iter_mut().zip(&map[r * bb..(r + 1) * bb]) {
            *byte = src[at as usize] ^ flip;
        }
    }
}

/// `[n, k]` in GGUF's layout again (the inverse of [`interleave`]).
pub fn deinterleave(ty: QuantType, w: &[u8], n: usize, k: usize) -> Vec<u8> {
    let rb = ty.bytes_for(k).expect("k is a multiple of 32");
    let mut out = vec![0u8; n * rb];
    for (j, row) in out.chunks_exact_mut(rb).enumerate() {
        row_blocks(ty, w, k, j, row);
    }
    out
}

/// The sums of one group (`gw`: its `blocks` group-blocks) with each of the `m`
/// quantized activation rows: `out[r][lane]` for activation row `r` and the group's row
/// `lane`. With `ahead`, the x86 paths prefetch the next group (the bytes after these)
/// as they read this one: at 8 activation rows the hardware prefetcher falls behind.
#[allow(clippy::too_many_arguments)]
pub(super) fn group(
    isa: crate::Isa,
    ty: QuantType,
    gw: &[u8],
    acts: &[ActBlock],
    blocks: usize,
    m: usize,
    ahead: bool,
    out: &mut [[f32; ROWS]; MAX_ROWS],
) {
    assert!(gw.len() >= blocks * ROWS * ty.block_bytes() && acts.len() >= m * blocks && m <= MAX_ROWS);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (checked by the caller): AVX2, FMA and F16C; the
        // lengths are checked above.
        crate::Isa::Avx2Fma => unsafe { avx2::group(ty, gw, acts, blocks, m, ahead, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 VNNI and VL.
        crate::Isa::Avx512Vnni => unsafe { vnni::group(ty, gw, acts, blocks, m, ahead, out) },
        _ => portable(ty, gw, acts, blocks, m, out),
    }
}

fn portable(ty: QuantType, gw: &[u8], acts: &[ActBlock], blocks: usize, m: usize, out: &mut [[f32; ROWS]; MAX_ROWS]) {
    let gb = ROWS * ty.block_bytes();
    let head = head_bytes(ty);
    let minimum = matches!(ty, QuantType::Q4_1 | QuantType::Q4K);
    for (r, out) in out.iter_mut().enumerate().take(m) {
        let (mut acc, mut off) = ([0f32; ROWS], [0f32; ROWS]);
        for b in 0..blocks {
            let blk = &gw[b * gb..(b + 1) * gb];
            let a = &acts[r * blocks + b];
            for lane in 0..ROWS {
                let q = |c: usize, t: usize| blk[head + c * 32 + lane * 4 + t];
                let mut dot = 0i32;
                match ty {
                    QuantType::Q8_0 => {
                        for i in 0..BLOCK {
                            dot += (q(i / 4, i % 4) ^ 0x80) as i8 as i32 * a.q[i] as i32;
                        }
                    }
                    QuantType::Q6K => {
                        let half = |h: usize| -> i32 {
                            (16 * h..16 * h + 16)
                                .map(|i| q(i / 4, i % 4) as i8 as i32 * a.q[i] as i32)
                                .sum()
                        };
                        let d = f16_at(blk, 2 * lane);
                        for (h, at) in [(0, 16), (1, 24)] {
                            let s = d * blk[at + lane] as i8 as f32;
                            acc[lane] = (s * a.d).mul_add(half(h) as f32, acc[lane]);
                        }
                        continue;
                    }
                    _ => {
                        let qh = if ty == QuantType::Q5_0 {
                            u32::from_le_bytes(blk[16 + 4 * lane..20 + 4 * lane].try_into().expect("4 bytes"))
                        } else {
                            0
                        };
                        let fifth = |i: usize| (((qh >> i) & 1) << 4) as i32;
                        for i in 0..16 {
                            let byte = q(i / 4, i % 4);
                            dot += ((byte & 0x0f) as i32 | fifth(i)) * a.q[i] as i32
                                + ((byte >> 4) as i32 | fifth(i + 16)) * a.q[i + 16] as i32;
                        }
                        match ty {
                            QuantType::Q4_0 => dot -= 8 * a.sum,
                            QuantType::Q5_0 => dot -= 16 * a.sum,
                            _ => {}
                        }
                    }
                }
                let (d, min) = if ty == QuantType::Q4K {
                    (f32_at(blk, 4 * lane), f32_at(blk, 32 + 4 * lane))
                } else {
                    (
                        f16_at(blk, 2 * lane),
                        if minimum { f16_at(blk, 16 + 2 * lane) } else { 0.0 },
                    )
                };
                acc[lane] = (d * a.d).mul_add(dot as f32, acc[lane]);
                if minimum {
                    off[lane] = min.mul_add(a.s, off[lane]);
                }
            }
        }
        for lane in 0..ROWS {
            out[lane] = if minimum { acc[lane] + off[lane] } else { acc[lane] };
        }
    }
}

/// The x86-64 kernels, once per path: `$features`, whether Q8_0's values are taken back
/// to signed bytes (AVX2's `vpmaddubsw` would saturate on `q + 128`), and `$dot`, the
/// i32 accumulation of the u8 x i8 products of 32 bytes, four per lane.
#[cfg(target_arch = "x86_64")]
macro_rules! x8_kernels {
    ($features:literal, signed_q8 = $signed:literal, pairs16 = $pairs16:literal, |$acc:ident, $u:ident, $s:ident| $dot:expr) => {
        use super::{ROWS, head_bytes};
        use crate::matvec::MAX_ROWS;
        use crate::quant::{ActBlock, QuantType};
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = $features)]
        fn dot($acc: __m256i, $u: __m256i, $s: __m256i) -> __m256i {
            $dot
        }

        const Q8_0: u8 = 0;
        const Q4_0: u8 = 1;
        const Q4_1: u8 = 2;
        const Q5_0: u8 = 3;
        const Q4K: u8 = 4;
        const Q6K: u8 = 5;

        #[target_feature(enable = $features)]
        pub(super) unsafe fn group(
            ty: QuantType,
            gw: &[u8],
            acts: &[ActBlock],
            blocks: usize,
            m: usize,
            ahead: bool,
            out: &mut [[f32; ROWS]; MAX_ROWS],
        ) {
            // SAFETY: as the caller's.
            unsafe { by_type_and_rows!(rows, ty, m, (gw, acts, blocks, ahead, out)) }
        }

        /// Q5_0's fifth bits for one chunk of nibbles: `qh` holds row `r`'s 32 bits in
        /// lane `r`; byte `t` of lane `r` gets bit `at + t` as 0x10. The four bits are
        /// spread to the four bytes by one multiply (`b * 0x00204081` puts bit `t` at
        /// bit `8 t`, no two shifted copies overlapping).
        #[inline]
        #[target_feature(enable = $features)]
        fn fifth_bits(qh: __m256i, at: i32) -> __m256i {
            let b = _mm256_and_si256(
                _mm256_srl_epi32(qh, _mm_cvtsi32_si128(at)),
                _mm256_set1_epi32(0x0f),
            );
            let spread = _mm256_mullo_epi32(b, _mm256_set1_epi32(0x0020_4081));
            _mm256_and_si256(_mm256_slli_epi32(spread, 4), _mm256_set1_epi32(0x1010_1010))
        }

        /// `M` activation rows against one group: the group-block's values loaded (and
        /// Q4's nibbles split) once for the `M` rows.
        #[target_feature(enable = $features)]
        unsafe fn rows<const T: u8, const M: usize>(
            gw: &[u8],
            acts: &[ActBlock],
            blocks: usize,
            ahead: bool,
            out: &mut [[f32; ROWS]; MAX_ROWS],
        ) {
            let ty = QuantType::ALL[T as usize];
            let gb = ROWS * ty.block_bytes();
            let head = head_bytes(ty);
            // Whether the row's value has a minimum term (Q4_1, Q4_K).
            let minimum = T == Q4_1 || T == Q4K;
            let mut acc = [_mm256_setzero_ps(); M];
            let mut off = [_mm256_setzero_ps(); M];
            let low = _mm256_set1_epi8(0x0f);
            // The next group: the `blocks * gb` bytes after this one.
            let next = gw.as_ptr().wrapping_add(blocks * gb) as *const i8;
            for b in 0..blocks {
                if ahead {
                    // A prefetch never faults; past the weight's end it fetches nothing.
                    let mut at = 0;
                    while at < gb {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * gb + at));
                        at += 64;
                    }
                }
                // SAFETY: the caller checked that `gw` holds `blocks` group-blocks and
                // `acts` `M` rows of `blocks` blocks.
                unsafe {
                    let p = gw.as_ptr().add(b * gb);
                    let d = if T == Q4K {
                        _mm256_loadu_ps(p as *const f32)
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
                    };
                    let mins = match T {
                        Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
                        Q4K => _mm256_loadu_ps(p.add(32) as *const f32),
                        _ => _mm256_setzero_ps(),
                    };
                    // Q6_K: the scales of the two halves, d * s0 and d * s1 (exact).
                    let halves = if T == Q6K {
                        let s = |at: usize| {
                            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(at) as *const __m128i)))
                        };
                        [_mm256_mul_ps(d, s(16)), _mm256_mul_ps(d, s(24))]
                    } else {
                        [d, d]
                    };
                    let q = p.add(head);
                    // w[i] holds four values of each row, against activation values 4i..4i+4.
                    let mut w = [_mm256_setzero_si256(); 8];
                    if T == Q8_0 || T == Q6K {
                        for (c, w) in w.iter_mut().enumerate() {
                            let raw = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
                            *w = if T == Q8_0 && $signed {
                                _mm256_xor_si256(raw, _mm256_set1_epi8(-128))
                            } else {
                                raw
                            };
                        }
                    } else {
                        let qh = if T == Q5_0 {
                            _mm256_loadu_si256(p.add(16) as *const __m256i)
                        } else {
                            _mm256_setzero_si256()
                        };
                        for c in 0..4 {
                            let raw = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
                            w[c] = _mm256_and_si256(raw, low);
                            w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                            if T == Q5_0 {
                                w[c] = _mm256_or_si256(w[c], fifth_bits(qh, 4 * c as i32));
                                w[c + 4] = _mm256_or_si256(w[c + 4], fifth_bits(qh, 16 + 4 * c as i32));
                            }
                        }
                    }
                    for r in 0..M {
                        let a = acts.get_unchecked(r * blocks + b);
                        let x = a.q.as_ptr() as *const i32;
                        if T == Q6K {
                            // Signed values on both paths: |w| x sign(w) x (at most 32 x
                            // 127 per product, no i16 pair saturates).
                            let mut half = [_mm256_setzero_si256(); 2];
                            for (i, &wi) in w.iter().enumerate() {
                                let xi = _mm256_set1_epi32(x.add(i).read_unaligned());
                                half[i / 4] = dot(half[i / 4], _mm256_sign_epi8(wi, wi), _mm256_sign_epi8(xi, wi));
                            }
                            let dx = _mm256_set1_ps(a.d);
                            for (h, &s) in half.iter().zip(&halves) {
                                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(*h), acc[r]);
                            }
                            continue;
                        }
                        let mut isum = _mm256_setzero_si256();
                        if (T == Q4_0 || T == Q4_1 || T == Q4K) && $pairs16 {
                            // A nibble (0..=15) times an activation byte, two to an i16
                            // lane: at most 2 x 15 x 128 = 3,840, so the eight chunks'
                            // pairs add up in i16 (<= 30,720) and widen to i32 once.
                            let mut pairs = _mm256_setzero_si256();
                            for (i, &wi) in w.iter().enumerate() {
                                let xi = _mm256_set1_epi32(x.add(i).read_unaligned());
                                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(wi, xi));
                            }
                            isum = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
                        } else {
                            for (i, &wi) in w.iter().enumerate() {
                                let xi = _mm256_set1_epi32(x.add(i).read_unaligned());
                                isum = if T == Q8_0 && $signed {
                                    dot(isum, _mm256_sign_epi8(wi, wi), _mm256_sign_epi8(xi, wi))
                                } else {
                                    dot(isum, wi, xi)
                                };
                            }
                        }
                        if T == Q4_0 {
                            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * a.sum));
                        } else if T == Q5_0 {
                            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * a.sum));
                        } else if T == Q8_0 && !$signed {
                            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * a.sum));
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
                        if minimum {
                            off[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(a.s), off[r]);
                        }
                    }
                }
            }
            for r in 0..M {
                let v = if minimum {
                    _mm256_add_ps(acc[r], off[r])
                } else {
                    acc[r]
                };
                // SAFETY: `out[r]` is eight f32.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr(), v) };
            }
        }
    };
}

/// AVX2: `vpmaddubsw` into i16 pairs, `vpmaddwd` by ones into i32 (for Q4, once per
/// block: the nibbles' pairs of all eight chunks fit an i16).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    x8_kernels!("avx2,fma,f16c", signed_q8 = true, pairs16 = true, |acc, u, s| {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    });
}

/// AVX-512 VNNI on 256-bit vectors: `vpdpbusd` accumulates the four u8 x i8 products of
/// each lane in one instruction.
#[cfg(target_arch = "x86_64")]
mod vnni {
    x8_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        signed_q8 = false,
        pairs16 = false,
        |acc, u, s| _mm256_dpbusd_epi32(acc, u, s)
    );
}

/// Two groups side by side in 512-bit vectors (AVX-512 VNNI and BW): lanes 0-7 the
/// first group's rows, 8-15 the second's, every lane computed as in the 256-bit kernels
/// (the same bits), one `vpdpbusd` for sixteen rows.
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni512 {
    use super::{ROWS, head_bytes};
    use crate::matvec::MAX_ROWS;
    use crate::quant::{ActBlock, QuantType};
    use std::arch::x86_64::*;

    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;

    /// Groups `gw[..group_bytes]` and `gw[group_bytes..2 * group_bytes]` against `m`
    /// activation rows: `out[0]` and `out[1]` as [`super::group`] gives them.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::quant) unsafe fn pair(
        ty: QuantType,
        gw: &[u8],
        acts: &[ActBlock],
        blocks: usize,
        m: usize,
        ahead: bool,
        out: &mut [[[f32; ROWS]; MAX_ROWS]; 2],
    ) {
        assert!(gw.len() >= 2 * blocks * ROWS * ty.block_bytes() && acts.len() >= m * blocks && m <= MAX_ROWS);
        // SAFETY: as the caller's.
        unsafe {
            match ty {
                QuantType::Q8_0 => by_rows!(rows, 0, m, (gw, acts, blocks, ahead, out)),
                QuantType::Q4_0 => by_rows!(rows, 1, m, (gw, acts, blocks, ahead, out)),
                QuantType::Q4_1 => by_rows!(rows, 2, m, (gw, acts, blocks, ahead, out)),
                _ => unreachable!("{}: the 256-bit kernel (groups_range)", ty.name()),
            }
        }
    }

    /// Two 16-byte halves (one per group) as one 256-bit vector.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn halves(a: *const u8, b: *const u8) -> __m256i {
        unsafe {
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)),
                _mm_loadu_si128(b as *const __m128i),
            )
        }
    }

    /// Two 32-byte chunks (one per group) as one 512-bit vector.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn chunks(a: *const u8, b: *const u8) -> __m512i {
        unsafe {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)),
                _mm256_loadu_si256(b as *const __m256i),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows<const T: u8, const M: usize>(
        gw: &[u8],
        acts: &[ActBlock],
        blocks: usize,
        ahead: bool,
        out: &mut [[[f32; ROWS]; MAX_ROWS]; 2],
    ) {
        let ty = QuantType::ALL[T as usize];
        let gb = ROWS * ty.block_bytes();
        let second = blocks * gb;
        let head = head_bytes(ty);
        let mut acc = [_mm512_setzero_ps(); M];
        let mut off = [_mm512_setzero_ps(); M];
        let low = _mm512_set1_epi8(0x0f);
        // The next pair: the two groups after these two.
        let next = gw.as_ptr().wrapping_add(2 * second) as *const i8;
        for b in 0..blocks {
            if ahead {
                // As the 256-bit kernels: block `b` of both next groups while this pair's
                // block `b` is read (a prefetch never faults).
                let mut at = 0;
                while at < gb {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * gb + at));
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(second + b * gb + at));
                    at += 64;
                }
            }
            // SAFETY: the caller checked that `gw` holds two groups of `blocks`
            // group-blocks and `acts` `M` rows of `blocks` blocks.
            unsafe {
                let p = gw.as_ptr().add(b * gb);
                let p2 = p.add(second);
                let d = _mm512_cvtph_ps(halves(p, p2));
                let mins = if T == Q4_1 {
                    _mm512_cvtph_ps(halves(p.add(16), p2.add(16)))
                } else {
                    _mm512_setzero_ps()
                };
                let (q, q2) = (p.add(head), p2.add(head));
                let mut w = [_mm512_setzero_si512(); 8];
                if T == Q8_0 {
                    for (c, w) in w.iter_mut().enumerate() {
                        *w = chunks(q.add(32 * c), q2.add(32 * c));
                    }
                } else {
                    for c in 0..4 {
                        let raw = chunks(q.add(32 * c), q2.add(32 * c));
                        w[c] = _mm512_and_si512(raw, low);
                        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                    }
                }
                for r in 0..M {
                    let a = acts.get_unchecked(r * blocks + b);
                    let x = a.q.as_ptr() as *const i32;
                    let mut isum = _mm512_setzero_si512();
                    for (i, &wi) in w.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, wi, _mm512_set1_epi32(x.add(i).read_unaligned()));
                    }
                    if T == Q4_0 {
                        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * a.sum));
                    } else if T == Q8_0 {
                        isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * a.sum));
                    }
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                    acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc[r]);
                    if T == Q4_1 {
                        off[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(a.s), off[r]);
                    }
                }
            }
        }
        for r in 0..M {
            let v = if T == Q4_1 {
                _mm512_add_ps(acc[r], off[r])
            } else {
                acc[r]
            };
            let mut lanes = [0f32; 2 * ROWS];
            // SAFETY: `lanes` is sixteen f32.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
            out[0][r].copy_from_slice(&lanes[..ROWS]);
            out[1][r].copy_from_slice(&lanes[ROWS..]);
        }
    }
}
