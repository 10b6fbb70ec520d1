//! GGUF's block formats kept quantized: the quantizers (the same bytes as llama.cpp's
//! reference, `gguf.quants.quantize` of PyPI `gguf`) and matrix-vector products that read
//! the packed weights in place. Every format here is a sequence of 32-value blocks:
//!
//! | type | bytes per 32 values | block | value |
//! |---|---:|---|---|
//! | Q8_0 | 34 | f16 `d`, 32 x i8 `q` | `d * q` |
//! | Q4_0 | 18 | f16 `d`, 16 bytes: low nibbles values 0..16, high 16..32 | `d * (q - 8)` |
//! | Q4_1 | 20 | f16 `d`, f16 `m`, nibbles as Q4_0 | `d * q + m` |
//! | Q5_0 | 22 | f16 `d`, u32 `qh` (bit `i`: value `i`'s fifth bit), nibbles as Q4_0 | `d * (q - 16)` |
//! | Q4_K | 24 | f32 `s`, f32 `m`, nibbles as Q4_0 | `s * q + m` |
//! | Q6_K | 36 | f16 `d`, i8 `s0`, i8 `s1`, 32 x i8 `q` | `(d * s0) * q` (values 0..16), `(d * s1) * q` (16..32) |
//!
//! Q8_0, Q4_0, Q4_1 and Q5_0 are GGUF's own blocks, byte for byte. GGUF's Q4_K and Q6_K
//! are 256-value super-blocks (scales of 6 and 8 bits relative to one or two f16 numbers
//! per super-block); [`kquant`] rewrites each into eight 32-value blocks that hold the
//! same values exactly (every product of an f16 and a small integer is exact in f32), so
//! the same kernels read them: Q4_K is Q4_1 with f32 scale and minimum (`d * sc` and `-dmin *
//! m` of its 32-value sub-block), Q6_K keeps its f16 `d` and the i8 scales of its two
//! 16-value sub-blocks, and the values `q - 32` as bytes. Only Q8_0, Q4_0 and Q4_1 are made
//! by [`quantize`]; the others come from GGUF files.
//!
//! The products quantize the activation rows to 8 bits per 32-value block first (as
//! llama.cpp does: Q8_0 with an f16 scale, plus each block's scaled sum for the minima),
//! then take integer dot products block by block: AVX-512 VNNI `vpdpbusd` or AVX2
//! `vpmaddubsw` / `vpmaddwd` when the CPU has them, a portable loop otherwise, never an
//! f32 copy of the weight. The weight is `[out, in]` in GGUF's row order
//! ([`Layout::Rows`]) or eight rows interleaved ([`Layout::X8`], [`x8`]); its rows (or
//! groups of eight) are split over [`Pool`]. Q5_0, Q4_K and Q6_K have SIMD kernels in the
//! interleaved layout (where every weight of whole groups of eight rows goes on an AVX2
//! CPU) and the portable loop in GGUF's.

use crate::matvec::{MAX_ROWS, PASS_ROWS};
use crate::pool::Pool;
use crate::{Isa, MAX_PRODUCTS, SharedMut, Split};
use kiln_gguf::GgmlType;
use std::cell::RefCell;

pub mod kquant;
pub mod x8;

/// Values per block, for every type here.
pub const BLOCK: usize = 32;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    /// GGUF's Q4_K in 32-value blocks ([`kquant`]).
    Q4K,
    /// GGUF's Q6_K in 32-value blocks ([`kquant`]).
    Q6K,
}

impl QuantType {
    /// Every format.
    pub const ALL: [QuantType; 6] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q4K,
        QuantType::Q6K,
    ];

    /// Bytes of one block of 32 values.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q4K => 24,
            QuantType::Q6K => 36,
        }
    }

    /// The name GGUF and llama.cpp use.
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q4K => "Q4_K",
            QuantType::Q6K => "Q6_K",
        }
    }

    /// By name (`q8_0`, `Q4_K`, ...).
    pub fn from_name(name: &str) -> Option<QuantType> {
        let name = name.to_ascii_uppercase();
        QuantType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether [`quantize`] makes this format (the others come from GGUF files).
    pub const fn quantizable(self) -> bool {
        matches!(self, QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1)
    }

    /// Whether the blocks are GGUF's own, byte for byte (Q4_K and Q6_K are Kiln's
    /// 32-value form of GGUF's super-blocks, [`kquant`]).
    pub const fn gguf_blocks(self) -> bool {
        !matches!(self, QuantType::Q4K | QuantType::Q6K)
    }

    /// The format whose blocks are `bytes` long (34, 18, 20, 22, 24, 36), the last
    /// dimension of a packed weight.
    pub fn from_block_bytes(bytes: usize) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.block_bytes() == bytes)
    }

    /// Bytes of `values` values, `None` unless a whole number of blocks.
    pub fn bytes_for(self, values: usize) -> Option<usize> {
        values
            .is_multiple_of(BLOCK)
            .then(|| values / BLOCK * self.block_bytes())
    }

    /// The GGUF type the blocks come from (for Q4_K and Q6_K, in Kiln's 32-value form
    /// of its super-blocks).
    pub const fn ggml(self) -> GgmlType {
        match self {
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q5_0 => GgmlType::Q5_0,
            QuantType::Q4K => GgmlType::Q4_K,
            QuantType::Q6K => GgmlType::Q6_K,
        }
    }

    /// The format of a GGUF type, if Kiln has kernels for it ([`QuantType::ggml`]
    /// reversed).
    pub fn from_ggml(ty: GgmlType) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|q| q.ggml() == ty)
    }

    /// The fields at the start of each block, in order; the values follow them.
    pub(crate) const fn head(self) -> &'static [Field] {
        match self {
            QuantType::Q8_0 | QuantType::Q4_0 => &[Field::F16],
            QuantType::Q4_1 => &[Field::F16, Field::F16],
            QuantType::Q5_0 => &[Field::F16, Field::Bytes(4)],
            QuantType::Q4K => &[Field::F32, Field::F32],
            QuantType::Q6K => &[Field::F16, Field::Bytes(1), Field::Bytes(1)],
        }
    }

    /// Bytes of a block's [`head`](QuantType::head): where its values start.
    pub(crate) const fn head_len(self) -> usize {
        let (head, mut i, mut len) = (self.head(), 0, 0);
        while i < head.len() {
            len += head[i].width();
            i += 1;
        }
        len
    }

    /// The byte offsets of a block's scales and minima and whether each is an f32 (else
    /// an f16): what [`check_blocks`] checks are finite.
    fn numbers(self) -> impl Iterator<Item = (usize, bool)> {
        let mut at = 0;
        self.head().iter().filter_map(move |&f| {
            let here = at;
            at += f.width();
            match f {
                Field::F16 => Some((here, false)),
                Field::F32 => Some((here, true)),
                Field::Bytes(_) => None,
            }
        })
    }
}

/// A field at the start of a block: an f16 or f32 number (a scale or minimum), or bytes
/// that are not one (Q5_0's fifth bits, Q6_K's i8 scales).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    F16,
    F32,
    Bytes(usize),
}

impl Field {
    pub(crate) const fn width(self) -> usize {
        match self {
            Field::F16 => 2,
            Field::F32 => 4,
            Field::Bytes(n) => n,
        }
    }
}

/// How a packed weight's blocks are ordered in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// GGUF's: each row's blocks one after another (on disk, always).
    Rows,
    /// Eight rows interleaved block by block ([`x8`]): what the products read fastest,
    /// made at load ([`x8::interleave`]) for weights of whole groups of eight rows.
    X8,
}

/// Why packed blocks cannot be used ([`check_blocks`]).
#[derive(Debug, Clone, PartialEq)]
pub enum BlockError {
    /// The row length is not a whole number of 32-value blocks.
    Columns { k: usize },
    /// The bytes are not `rows` rows of `k / 32` blocks.
    Length { expected: usize, found: usize },
    /// A block's scale (or Q4_1's minimum) is not a finite number.
    Scale {
        row: usize,
        block: usize,
        offset: usize,
        value: f32,
    },
}

impl std::fmt::Display for BlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockError::Columns { k } => write!(f, "rows of {k} values are not a whole number of {BLOCK}-value blocks"),
            BlockError::Length { expected, found } => {
                write!(f, "{found} bytes of packed blocks where the shape needs {expected}")
            }
            BlockError::Scale {
                row,
                block,
                offset,
                value,
            } => write!(
                f,
                "row {row}, block {block}: scale {value} at byte offset {offset} is not finite"
            ),
        }
    }
}

impl std::error::Error for BlockError {}

/// Check packed `ty` blocks of a `[rows, k]` matrix before any product reads them: their
/// length, and every block's f16 scale (and Q4_1's minimum) finite. The products do not
/// check (they would only compute garbage from a corrupt block); a loader calls this once.
pub fn check_blocks(ty: QuantType, data: &[u8], rows: usize, k: usize) -> Result<(), BlockError> {
    let row_bytes = ty.bytes_for(k).ok_or(BlockError::Columns { k })?;
    let expected = row_bytes * rows;
    if data.len() != expected {
        return Err(BlockError::Length {
            expected,
            found: data.len(),
        });
    }
    for (i, block) in data.chunks_exact(ty.block_bytes()).enumerate() {
        for (at, wide) in ty.numbers() {
            let value = if wide { f32_at(block, at) } else { f16_at(block, at) };
            if !value.is_finite() {
                let per_row = k / BLOCK;
                return Err(BlockError::Scale {
                    row: i / per_row,
                    block: i % per_row,
                    offset: i * ty.block_bytes() + at,
                    value,
                });
            }
        }
    }
    Ok(())
}

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// numpy's `np_roundf` of gguf-py (and C's `roundf`): round half away from zero.
fn roundf(v: f32) -> f32 {
    let a = v.abs();
    let floored = a.floor();
    (floored + (2.0 * (a - floored)).floor()).copysign(v)
}

/// Quantize `x` (a whole number of 32-value blocks) into `out`, byte for byte as
/// `gguf.quants.quantize` (gguf 0.19.0) does. Panics on lengths that disagree, and on a
/// format that is not [`QuantType::quantizable`].
pub fn quantize(ty: QuantType, x: &[f32], out: &mut [u8]) {
    assert!(
        ty.quantizable(),
        "{} blocks come from GGUF files, Kiln does not make them",
        ty.name()
    );
    let bytes = ty.bytes_for(x.len()).expect("a whole number of 32-value blocks");
    assert_eq!(
        out.len(),
        bytes,
        "{}: {} bytes for {} values",
        ty.name(),
        out.len(),
        x.len()
    );
    for (b, o) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(ty.block_bytes())) {
        match ty {
            QuantType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                o[..2].copy_from_slice(&f16_bits(d));
                for (q, &v) in o[2..].iter_mut().zip(b) {
                    *q = roundf(v * id) as i8 as u8;
                }
            }
            QuantType::Q4_0 => {
                // the first value of largest magnitude, with its sign
                let mut max = 0f32;
                for &v in b {
                    if v.abs() > max.abs() {
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                o[..2].copy_from_slice(&f16_bits(d));
                let q = |v: f32| ((v * id + 8.5).trunc().max(0.0) as u8).min(15);
                for j in 0..16 {
                    o[2 + j] = q(b[j]) | (q(b[j + 16]) << 4);
                }
            }
            QuantType::Q4_1 => {
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let d = (max - min) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                o[..2].copy_from_slice(&f16_bits(d));
                o[2..4].copy_from_slice(&f16_bits(min));
                let q = |v: f32| (((v - min) * id + 0.5).trunc().max(0.0) as u8).min(15);
                for j in 0..16 {
                    o[4 + j] = q(b[j]) | (q(b[j + 16]) << 4);
                }
            }
            QuantType::Q5_0 | QuantType::Q4K | QuantType::Q6K => unreachable!("checked above"),
        }
    }
}

/// The values of `data` (whole `ty` blocks) into `out`, in the arithmetic of gguf-py's
/// `gguf.quants.dequantize`: GGUF's own blocks by Kiln's GGUF reader
/// ([`kiln_gguf::quants::dequantize`]), Q4_K's and Q6_K's 32-value blocks here, to the
/// values of the GGUF super-blocks they came from ([`kquant`]). Panics on lengths that
/// disagree.
pub fn dequantize(ty: QuantType, data: &[u8], out: &mut [f32]) {
    if ty.gguf_blocks() {
        return kiln_gguf::quants::dequantize(ty.ggml(), data, out);
    }
    let bb = ty.block_bytes();
    assert_eq!(data.len() % bb, 0, "{}: whole blocks", ty.name());
    assert_eq!(out.len(), data.len() / bb * BLOCK, "{}: 32 values per block", ty.name());
    for (b, o) in data.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        let (lo, hi) = o.split_at_mut(16);
        if ty == QuantType::Q4K {
            let (s, m) = (f32_at(b, 0), f32_at(b, 4));
            for (j, &q) in b[ty.head_len()..].iter().enumerate() {
                lo[j] = s * (q & 0x0f) as f32 + m;
                hi[j] = s * (q >> 4) as f32 + m;
            }
        } else {
            let d = f16_at(b, 0);
            let (s0, s1) = (d * b[2] as i8 as f32, d * b[3] as i8 as f32);
            lo.iter_mut()
                .zip(&b[4..20])
                .for_each(|(v, &q)| *v = s0 * q as i8 as f32);
            hi.iter_mut()
                .zip(&b[20..36])
                .for_each(|(v, &q)| *v = s1 * q as i8 as f32);
        }
    }
}

/// One 32-value block of an activation row, quantized for the integer products.
#[derive(Debug, Clone, Copy, Default)]
struct ActBlock {
    /// The scale, rounded through f16 as llama.cpp's `block_q8_0`/`block_q8_1` store it.
    d: f32,
    /// `d * sum(q)`, for the minimum term of Q4_1 (and of Q4_0 on AVX2, as `-8 d`).
    s: f32,
    q: [i8; BLOCK],
    /// `sum(q)`, for the offsets of Q4_0 and Q8_0 in [`Layout::X8`]'s integer sums.
    sum: i32,
}

/// Quantize an activation row into Q8 blocks on `isa`: the same bits on every path.
fn quantize_act_with(isa: Isa, x: &[f32], out: &mut [ActBlock]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (checked by the caller): AVX2, FMA and F16C.
        Isa::Avx2Fma | Isa::Avx512Vnni => unsafe { avx2::quantize_act(x, out) },
        _ => quantize_act(x, out),
    }
}

/// The inverse scale of an activation block: 0 for a block of zeros, and for one so
/// small (amax < 127 / f32::MAX) that `1 / d` overflows (its values quantize to 0).
fn inverse_scale(d: f32) -> f32 {
    let id = 1.0 / d;
    if d == 0.0 || !id.is_finite() { 0.0 } else { id }
}

/// Quantize an activation row into Q8 blocks (Q8_0's arithmetic).
fn quantize_act(x: &[f32], out: &mut [ActBlock]) {
    for (b, o) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse_scale(d);
        let mut sum = 0i32;
        for (q, &v) in o.q.iter_mut().zip(b) {
            *q = roundf(v * id) as i8;
            sum += *q as i32;
        }
        o.d = half::f16::from_f32(d).to_f32();
        o.s = o.d * sum as f32;
        o.sum = sum;
    }
}

thread_local! {
    /// Quantized activation rows, reused across calls (no allocation per token).
    static ACTS: RefCell<Vec<ActBlock>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ + bias` with `W` the `n` rows of `k` values packed as
/// `ty` blocks in `layout` (`w.len() == n * k / 32 * block_bytes`), on the best path of
/// this CPU. Panics on lengths that disagree (`k` not a multiple of 32, among them).
#[allow(clippy::too_many_arguments)]
pub fn matvec(
    ty: QuantType,
    layout: Layout,
    w: &[u8],
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    matvec_with(Isa::best(), ty, layout, w, x, bias, y, m, k, n)
}

/// [`matvec`] on a given path (one of [`Isa::available`]).
#[allow(clippy::too_many_arguments)]
pub fn matvec_with(
    isa: Isa,
    ty: QuantType,
    layout: Layout,
    w: &[u8],
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    let mut product = [QuantProduct {
        ty,
        layout,
        w,
        bias,
        y,
        n,
    }];
    matvec_many_with(isa, x, m, k, &mut product);
}

/// One product of [`matvec_many`]: `y[m, n] = x · W[n, k]ᵀ + bias`, `W` packed as `ty`.
pub struct QuantProduct<'a> {
    pub ty: QuantType,
    pub layout: Layout,
    pub w: &'a [u8],
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
    pub n: usize,
}

/// Several [`matvec`] products of the same `x` `[m, k]` (a layer's q, k and v, or its
/// gate and up projections): `x` quantized once and every product's rows one job of the
/// pool (one hand-out and one wait instead of one per product), each row computed as
/// [`matvec`] computes it (the same bits). Panics on lengths that disagree.
pub fn matvec_many(x: &[f32], m: usize, k: usize, products: &mut [QuantProduct<'_>]) {
    matvec_many_with(Isa::best(), x, m, k, products)
}

/// [`matvec_many`] on a given path (one of [`Isa::available`]).
pub fn matvec_many_with(isa: Isa, x: &[f32], m: usize, k: usize, products: &mut [QuantProduct<'_>]) {
    assert!(isa.is_available(), "{isa:?} is not available on this CPU");
    let blocks = k / BLOCK;
    assert!(k.is_multiple_of(BLOCK), "k is a multiple of 32");
    assert_eq!(x.len(), m * k, "x is [m, k]");
    for p in products.iter() {
        let row_bytes = p.ty.bytes_for(k).expect("k is a multiple of 32");
        assert_eq!(
            p.w.len(),
            p.n * row_bytes,
            "{}: w holds n rows of k values",
            p.ty.name()
        );
        assert_eq!(p.y.len(), m * p.n, "y is [m, n]");
        assert!(
            p.layout == Layout::Rows || x8::fits(p.n),
            "an X8 weight has whole groups of 8 rows"
        );
        if let Some(b) = p.bias {
            assert_eq!(b.len(), p.n, "bias is [n]");
        }
    }
    // The tasks split rows (at least 8 per task), or groups of eight rows for X8 (a task
    // never cuts a group; at least one per task).
    let split = if products.iter().any(|p| p.layout == Layout::X8) {
        let unit = |p: &QuantProduct<'_>| if p.layout == Layout::X8 { x8::ROWS } else { 1 };
        Split::new(products.iter().map(|p| p.n / unit(p)), k * x8::ROWS, 1)
    } else {
        Split::new(products.iter().map(|p| p.n), k, 8)
    };
    // The weights and the outputs' addresses; the outputs are written only through these.
    type Job<'a> = (QuantType, Layout, &'a [u8], Option<&'a [f32]>, usize, usize, SharedMut);
    let mut each = products.iter_mut();
    let jobs: [Option<Job<'_>>; MAX_PRODUCTS] = std::array::from_fn(|_| {
        each.next().map(|p| {
            let row_bytes = p.ty.bytes_for(k).expect("checked");
            (p.ty, p.layout, p.w, p.bias, p.n, row_bytes, SharedMut(p.y.as_mut_ptr()))
        })
    });
    let mut acts = ACTS.take();
    acts.resize(m * blocks, ActBlock::default());
    for (row, out) in x.chunks_exact(k).zip(acts.chunks_exact_mut(blocks)) {
        quantize_act_with(isa, row, out);
    }
    // One job per PASS_ROWS rows: each task takes its weight rows (or groups) through
    // every activation row of the pass, MAX_ROWS at a time while they are in L1, so a
    // batch of 16 reads the weight from memory once, not once per 8 rows, and waits on
    // one job.
    for p0 in (0..m).step_by(PASS_ROWS) {
        let pass = PASS_ROWS.min(m - p0);
        let (jobs, split, a) = (&jobs, &split, &acts[p0 * blocks..(p0 + pass) * blocks]);
        Pool::global().run(split.tasks(), &|t| {
            let (i, u0, u1) = split.task(t);
            let (ty, layout, w, bias, n, row_bytes, out) = jobs[i].expect("a product of this call");
            // Columns `j0..j0 + sums.len()` of row `r` (one column, or a group's eight).
            let put = |r: usize, j0: usize, sums: &[f32]| {
                assert!(j0 + sums.len() <= n);
                // SAFETY: task `t` alone writes columns of its rows (or groups) of product
                // i's `y` (m rows of n), which outlives the job; these are in row `r`.
                let y = unsafe { std::slice::from_raw_parts_mut({ out }.0.add((p0 + r) * n + j0), sums.len()) };
                match bias {
                    Some(b) => {
                        for ((y, &s), &b) in y.iter_mut().zip(sums).zip(&b[j0..j0 + sums.len()]) {
                            *y = s + b;
                        }
                    }
                    None => y.copy_from_slice(sums),
                }
            };
            match layout {
                Layout::Rows => rows_range(isa, ty, w, row_bytes, a, blocks, pass, u0..u1, |r0, j, sums| {
                    for (r, s) in sums.iter().enumerate() {
                        put(r0 + r, j, std::slice::from_ref(s))
                    }
                }),
                Layout::X8 => groups_range(isa, ty, w, row_bytes, a, blocks, pass, u0..u1, put),
            }
        });
    }
    ACTS.set(acts);
}

/// Weight rows `js` of `w` (packed, `row_bytes` each) · each of the `m` quantized
/// activation rows: `emit(r0, j, sums)`, `sums[r]` for activation row `r0 + r` (at most
/// [`MAX_ROWS`] rows at a time, each weight row through all of them). One activation
/// row (decode at batch 1) on AVX2 takes the weight rows four at a time, each activation
/// block loaded once for the four (the products of a small model have rows of only
/// 18-48 blocks, so a row's fixed costs, the final horizontal sum among them, count).
#[allow(clippy::too_many_arguments)]
fn rows_range(
    isa: Isa,
    ty: QuantType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActBlock],
    blocks: usize,
    m: usize,
    js: std::ops::Range<usize>,
    mut emit: impl FnMut(usize, usize, &[f32]),
) {
    let mut j = js.start;
    #[cfg(target_arch = "x86_64")]
    if m == 1 && isa.has_avx2() && ty.quantizable() {
        while j + 4 <= js.end {
            let four = &w[j * row_bytes..(j + 4) * row_bytes];
            let acts = &acts[..blocks];
            // SAFETY: `isa` is available (checked by the caller): AVX2, FMA and F16C, and
            // for Avx512Vnni AVX-512 VNNI and VL.
            let sums = unsafe {
                if isa == Isa::Avx512Vnni {
                    vnni::four_rows(ty, four, row_bytes, acts, blocks)
                } else {
                    avx2::four_rows(ty, four, row_bytes, acts, blocks)
                }
            };
            for (i, s) in sums.iter().enumerate() {
                emit(0, j + i, std::slice::from_ref(s));
            }
            j += 4;
        }
    }
    let mut sums = [0f32; MAX_ROWS];
    for j in j..js.end {
        for r0 in (0..m).step_by(MAX_ROWS) {
            let rows = MAX_ROWS.min(m - r0);
            let acts = &acts[r0 * blocks..(r0 + rows) * blocks];
            row_dots(
                isa,
                ty,
                &w[j * row_bytes..(j + 1) * row_bytes],
                acts,
                blocks,
                rows,
                &mut sums,
            );
            emit(r0, j, &sums[..rows]);
        }
    }
}

/// Groups `gs` of eight weight rows of `w` ([`Layout::X8`]) · each of the `m` quantized
/// activation rows: `put(r, j, sums)` for activation row `r` and weight rows `j..j + 8`
/// (one group's); each
/// group (or pair) through all the rows, [`MAX_ROWS`] at a time.
#[allow(clippy::too_many_arguments)]
fn groups_range(
    isa: Isa,
    ty: QuantType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActBlock],
    blocks: usize,
    m: usize,
    gs: std::ops::Range<usize>,
    put: impl Fn(usize, usize, &[f32]),
) {
    let mut out = [[[0f32; x8::ROWS]; MAX_ROWS]; 2];
    let group_bytes = x8::ROWS * row_bytes;
    let mut g = gs.start;
    while g < gs.end {
        // Two groups at once in 512-bit vectors where the CPU has them (the same bits), for
        // two activation rows or more: at one row the 256-bit kernel was as fast or faster
        // (AMD EPYC Zen 5 VM, examples/matvec_bandwidth.rs, 3 interleaved runs: Q4_0
        // medians 3.20 vs 4.61 ms; at 8 rows Q4_1 9.66 vs 6.94 ms, Q4_0 8.74 vs 8.03).
        let two =
            cfg!(target_arch = "x86_64") && isa == Isa::Avx512Vnni && ty.quantizable() && g + 1 < gs.end && m >= 2;
        let gw = &w[g * group_bytes..(g + 1 + two as usize) * group_bytes];
        for r0 in (0..m).step_by(MAX_ROWS) {
            let rows = MAX_ROWS.min(m - r0);
            let acts = &acts[r0 * blocks..(r0 + rows) * blocks];
            if two {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is available (checked by the caller): AVX-512 VNNI, VL and BW.
                unsafe {
                    x8::vnni512::pair(ty, gw, acts, blocks, rows, r0 == 0, &mut out)
                };
            } else {
                x8::group(isa, ty, gw, acts, blocks, rows, r0 == 0, &mut out[0]);
            }
            for (i, out) in out.iter().enumerate().take(1 + two as usize) {
                for (r, sums) in out.iter().enumerate().take(rows) {
                    put(r0 + r, (g + i) * x8::ROWS, sums);
                }
            }
        }
        g += 1 + two as usize;
    }
}

/// One weight row (packed) · each of the `m` quantized activation rows (`acts`, `m`
/// rows of `blocks` blocks) into `sums[..m]`; the weight is decoded once for all rows.
/// (Q5_0, Q4_K and Q6_K take the portable loop in this layout on every path.)
fn row_dots(isa: Isa, ty: QuantType, w: &[u8], acts: &[ActBlock], blocks: usize, m: usize, sums: &mut [f32; MAX_ROWS]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is available (checked by the caller): AVX2, FMA and F16C.
        Isa::Avx2Fma if ty.quantizable() => unsafe { avx2::row_dots(ty, w, acts, blocks, m, sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 VNNI and VL.
        Isa::Avx512Vnni if ty.quantizable() => unsafe { vnni::row_dots(ty, w, acts, blocks, m, sums) },
        _ => {
            for (r, s) in sums.iter_mut().enumerate().take(m) {
                *s = portable_row_dot(ty, w, &acts[r * blocks..(r + 1) * blocks]);
            }
        }
    }
}

fn portable_row_dot(ty: QuantType, w: &[u8], acts: &[ActBlock]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (b, a) in w.chunks_exact(bb).zip(acts) {
        match ty {
            QuantType::Q8_0 => {
                let dot: i32 = b[2..].iter().zip(&a.q).map(|(&q, &x)| q as i8 as i32 * x as i32).sum();
                sum += f16_at(b, 0) * a.d * dot as f32;
            }
            QuantType::Q4_0 => sum += f16_at(b, 0) * a.d * (nibble_dot(&b[2..18], 0, a) - 8 * a.sum) as f32,
            QuantType::Q4_1 => sum += f16_at(b, 0) * a.d * nibble_dot(&b[4..20], 0, a) as f32 + f16_at(b, 2) * a.s,
            QuantType::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                sum += f16_at(b, 0) * a.d * (nibble_dot(&b[6..22], qh, a) - 16 * a.sum) as f32;
            }
            QuantType::Q4K => sum += f32_at(b, 0) * a.d * nibble_dot(&b[8..24], 0, a) as f32 + f32_at(b, 4) * a.s,
            QuantType::Q6K => {
                let half = |i: usize| -> i32 { (0..16).map(|j| b[4 + i + j] as i8 as i32 * a.q[i + j] as i32).sum() };
                let d = f16_at(b, 0);
                sum += d * b[2] as i8 as f32 * a.d * half(0) as f32;
                sum += d * b[3] as i8 as f32 * a.d * half(16) as f32;
            }
        }
    }
    sum
}

/// `Σ q_i x_i` over a block's 32 nibbles (`nibbles`: byte `j` holds value `j` low and `j
/// + 16` high), each with its fifth bit from `qh` (Q5_0's; 0 for the 4-bit types).
fn nibble_dot(nibbles: &[u8], qh: u32, a: &ActBlock) -> i32 {
    let fifth = |i: usize| (((qh >> i) & 1) << 4) as i32;
    let mut dot = 0i32;
    for (j, &byte) in nibbles.iter().enumerate() {
        dot += ((byte & 0x0f) as i32 | fifth(j)) * a.q[j] as i32;
        dot += ((byte >> 4) as i32 | fifth(j + 16)) * a.q[j + 16] as i32;
    }
    dot
}

/// The integer kernels, compiled once per x86-64 path: `$features` for the target
/// features and `$dot` for the u8 x i8 dot product of 32 bytes into eight i32 lanes (the
/// one place the paths differ; both give the same sums, `vpmaddubsw`'s i16 pairs never
/// saturating on these values: at most 2 x 128 x 127).
#[cfg(target_arch = "x86_64")]
macro_rules! int_kernels {
    ($features:literal, |$u:ident, $s:ident| $dot:expr) => {
        use super::{ActBlock, MAX_ROWS, QuantType};
        use std::arch::x86_64::*;

        /// The eight i32 sums of `u[i] * s[i]` (u8 x i8) over 32 bytes, four products per
        /// lane.
        #[inline]
        #[target_feature(enable = $features)]
        fn dot_u8_i8($u: __m256i, $s: __m256i) -> __m256i {
            $dot
        }

        /// The 32 nibbles of 16 bytes as bytes 0..15: low nibbles first, then high.
        #[inline]
        #[target_feature(enable = $features)]
        fn nibbles(p: *const u8) -> __m256i {
            let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0f));
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f));
            _mm256_set_m128i(hi, lo)
        }

        /// An f16 scale through F16C.
        #[inline]
        #[target_feature(enable = $features)]
        fn scale(b: &[u8], at: usize) -> f32 {
            let bits = u16::from_le_bytes([b[at], b[at + 1]]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        /// The type codes of the const-generic kernel (one compiled loop per type).
        const Q8_0: u8 = 0;
        const Q4_0: u8 = 1;
        const Q4_1: u8 = 2;

        #[target_feature(enable = $features)]
        pub(super) unsafe fn row_dots(
            ty: QuantType,
            w: &[u8],
            acts: &[ActBlock],
            blocks: usize,
            m: usize,
            sums: &mut [f32; MAX_ROWS],
        ) {
            unsafe {
                match ty {
                    QuantType::Q8_0 => rows::<Q8_0>(w, acts, blocks, m, sums),
                    QuantType::Q4_0 => rows::<Q4_0>(w, acts, blocks, m, sums),
                    QuantType::Q4_1 => rows::<Q4_1>(w, acts, blocks, m, sums),
                    _ => unreachable!("{} takes the portable loop in rows", ty.name()),
                }
            }
        }

        /// Block `blk`'s weights: (the values, i8 for Q8_0, the u8 nibbles for Q4_0 and Q4_1; their
        /// scale; the minimum: Q4_1's own, -8 d for Q4_0, unused for Q8_0).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn block<const T: u8>(w: &[u8], blk: usize) -> (__m256i, f32, f32) {
            let bb = [34, 18, 20][T as usize];
            let b = &w[blk * bb..(blk + 1) * bb];
            let p = b.as_ptr();
            unsafe {
                match T {
                    Q8_0 => (_mm256_loadu_si256(p.add(2) as *const __m256i), scale(b, 0), 0.0),
                    // d * (q - 8) = d * q + (-8 d): Q4_1's form with the minimum -8 d, so
                    // the nibbles go straight into the unsigned x signed product.
                    Q4_0 => {
                        let d = scale(b, 0);
                        (nibbles(p.add(2)), d, -8.0 * d)
                    }
                    _ => (nibbles(p.add(4)), scale(b, 0), scale(b, 2)),
                }
            }
        }

        /// The eight i32 partial sums of one block's `w · x`.
        #[inline]
        #[target_feature(enable = $features)]
        fn block_dot<const T: u8>(q: __m256i, x: __m256i) -> __m256i {
            match T {
                Q8_0 => dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)),
                _ => dot_u8_i8(q, x),
            }
        }

        /// Four weight rows (`row_bytes` apart in `w`) · one activation row: each activation
        /// block loaded once for the four, four independent accumulators. Each row's sum is
        /// the same sequence of operations as in [`rows`] (one accumulator, blocks in order),
        /// so a row gets the same bits whichever path, batch or task split computes it.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn four_rows(
            ty: QuantType,
            w: &[u8],
            row_bytes: usize,
            acts: &[ActBlock],
            blocks: usize,
        ) -> [f32; 4] {
            unsafe {
                match ty {
                    QuantType::Q8_0 => four::<Q8_0>(w, row_bytes, acts, blocks),
                    QuantType::Q4_0 => four::<Q4_0>(w, row_bytes, acts, blocks),
                    QuantType::Q4_1 => four::<Q4_1>(w, row_bytes, acts, blocks),
                    _ => unreachable!("{} takes the portable loop in rows", ty.name()),
                }
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn four<const T: u8>(w: &[u8], row_bytes: usize, acts: &[ActBlock], blocks: usize) -> [f32; 4] {
            assert!(w.len() >= 4 * row_bytes && acts.len() >= blocks && row_bytes >= blocks * [34, 18, 20][T as usize]);
            let rows = [
                &w[..row_bytes],
                &w[row_bytes..2 * row_bytes],
                &w[2 * row_bytes..3 * row_bytes],
                &w[3 * row_bytes..4 * row_bytes],
            ];
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut offset = [0f32; 4];
            for (blk, a) in acts[..blocks].iter().enumerate() {
                let x = unsafe { _mm256_loadu_si256(a.q.as_ptr() as *const __m256i) };
                for r in 0..4 {
                    let (q, d, min) = unsafe { block::<T>(rows[r], blk) };
                    if T != Q8_0 {
                        offset[r] += min * a.s;
                    }
                    let s = _mm256_cvtepi32_ps(block_dot::<T>(q, x));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), s, acc[r]);
                }
            }
            [0, 1, 2, 3].map(|r| crate::hsum256(acc[r]) + offset[r])
        }

        /// Up to [`MAX_ROWS`] activation rows: each weight block decoded once for all, one
        /// accumulator per row over the blocks in order.
        #[target_feature(enable = $features)]
        unsafe fn rows<const T: u8>(w: &[u8], acts: &[ActBlock], blocks: usize, m: usize, sums: &mut [f32; MAX_ROWS]) {
            let mut acc = [_mm256_setzero_ps(); MAX_ROWS];
            let mut offset = [0f32; MAX_ROWS];
            for blk in 0..blocks {
                let (q, d, min) = unsafe { block::<T>(w, blk) };
                for r in 0..m {
                    let a = &acts[r * blocks + blk];
                    let x = unsafe { _mm256_loadu_si256(a.q.as_ptr() as *const __m256i) };
                    if T != Q8_0 {
                        offset[r] += min * a.s;
                    }
                    let s = _mm256_cvtepi32_ps(block_dot::<T>(q, x));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), s, acc[r]);
                }
            }
            for r in 0..m {
                sums[r] = crate::hsum256(acc[r]) + offset[r];
            }
        }
    };
}

/// AVX2: `vpmaddubsw` into i16 pairs, `vpmaddwd` by ones into i32.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    int_kernels!("avx2,fma,f16c", |u, s| _mm256_madd_epi16(
        _mm256_maddubs_epi16(u, s),
        _mm256_set1_epi16(1)
    ));

    /// [`super::quantize_act`] eight lanes at a time, the same operations (max of the
    /// magnitudes, `v * (1 / d)`, round half away from zero as `floor(a) + floor(2 (a -
    /// floor(a)))` with the sign put back), so the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [ActBlock]) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        for (b, o) in x.chunks_exact(super::BLOCK).zip(out.iter_mut()) {
            let p = b.as_ptr();
            // SAFETY: `b` holds 32 values.
            let v = unsafe { [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i))) };
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(super::inverse_scale(d));
            let q = v.map(|v| {
                let t = _mm256_mul_ps(v, id);
                let a = _mm256_and_ps(t, abs);
                let f = _mm256_floor_ps(a);
                let two = _mm256_floor_ps(_mm256_mul_ps(_mm256_set1_ps(2.0), _mm256_sub_ps(a, f)));
                let r = _mm256_or_ps(_mm256_add_ps(f, two), _mm256_and_ps(t, sign));
                _mm256_cvtps_epi32(r)
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
            // i32 -> i16 -> i8 saturating packs work within 128-bit lanes: put the
            // eight 4-byte groups back in order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: `o.q` is 32 bytes.
            unsafe { _mm256_storeu_si256(o.q.as_mut_ptr() as *mut __m256i, ordered) };
            o.d = half::f16::from_f32(d).to_f32();
            o.s = o.d * total as f32;
            o.sum = total;
        }
    }
}

/// AVX-512 VNNI on 256-bit vectors: `vpdpbusd`, the four u8 x i8 products of each lane
/// summed into i32 in one instruction.
#[cfg(target_arch = "x86_64")]
mod vnni {
    int_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512vnni", |u, s| _mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        u,
        s
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_products_give_each_product_the_bits_it_gets_alone() {
        let (k, ns) = (96, [40usize, 24, 64]);
        let sets = [
            [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1],
            [QuantType::Q5_0, QuantType::Q4K, QuantType::Q6K],
        ];
        for (m, types) in [1, 3, 8, 11].into_iter().flat_map(|m| sets.map(|t| (m, t))) {
            let x = crate::test_fill(m * k, 5);
            let weights: Vec<Vec<u8>> = ns
                .iter()
                .zip(types)
                .enumerate()
                .map(|(i, (&n, ty))| pack(ty, n * k, 10 + i as u64))
                .collect();
            let bias = crate::test_fill(24, 99);
            let mut alone: Vec<Vec<f32>> = Vec::new();
            for (i, (&n, ty)) in ns.iter().zip(types).enumerate() {
                let mut y = vec![0f32; m * n];
                let b = (i == 1).then_some(&bias[..]);
                matvec(ty, Layout::Rows, &weights[i], &x, b, &mut y, m, k, n);
                alone.push(y);
            }
            let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
            let mut products: Vec<QuantProduct<'_>> = outs
                .iter_mut()
                .enumerate()
                .map(|(i, y)| QuantProduct {
                    ty: types[i],
                    layout: Layout::Rows,
                    w: &weights[i],
                    bias: (i == 1).then_some(&bias[..]),
                    y,
                    n: ns[i],
                })
                .collect();
            matvec_many(&x, m, k, &mut products);
            assert_eq!(outs, alone, "m = {m}");
        }
    }

    const TYPES: [QuantType; 6] = QuantType::ALL;
    const QUANTIZABLE: [QuantType; 3] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1];

    /// `matvec_with` into a fresh output.
    #[allow(clippy::too_many_arguments)]
    fn product(isa: Isa, ty: QuantType, layout: Layout, w: &[u8], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        matvec_with(isa, ty, layout, w, x, None, &mut y, m, k, n);
        y
    }

    use crate::test_fill as fill;

    /// The values a block format holds.
    fn decode(ty: QuantType, data: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; data.len() / ty.block_bytes() * BLOCK];
        dequantize(ty, data, &mut out);
        out
    }

    /// `values` values packed as `ty`: quantized from [`fill`] for the formats Kiln
    /// makes, pseudo-random GGUF blocks (small f16 scales, any bits) through
    /// [`kquant::from_gguf`] for the others.
    fn pack(ty: QuantType, values: usize, seed: u64) -> Vec<u8> {
        if ty.quantizable() {
            let mut w = vec![0u8; ty.bytes_for(values).unwrap()];
            quantize(ty, &fill(values, seed), &mut w);
            return w;
        }
        // (whole super-blocks, cut to `values`: the blocks are 32 values each)
        let gguf = ty
            .ggml()
            .bytes_for(values.div_ceil(kquant::SUPER) * kquant::SUPER)
            .unwrap();
        let mut src: Vec<u8> = fill(gguf, seed).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        let (block, scales): (usize, &[usize]) = match ty {
            QuantType::Q5_0 => (22, &[0]),
            QuantType::Q4K => (GgmlType::Q4_K.type_size(), &[0, 2]),
            _ => (GgmlType::Q6_K.type_size(), &[208]),
        };
        for (b, blk) in src.chunks_exact_mut(block).enumerate() {
            for &at in scales {
                let d = 0.001 + 0.003 * ((b * 7 + at) % 11) as f32;
                blk[at..at + 2].copy_from_slice(&f16_bits(d));
            }
        }
        let mut out = Vec::new();
        kquant::from_gguf(ty, &src, &mut out).unwrap();
        out.truncate(ty.bytes_for(values).unwrap());
        out
    }

    #[test]
    fn round_half_away_from_zero() {
        for (v, want) in [
            (0.5f32, 1.0f32),
            (-0.5, -1.0),
            (1.5, 2.0),
            (2.5, 3.0),
            (-2.4999, -2.0),
            (0.0, 0.0),
        ] {
            assert_eq!(roundf(v), want, "{v}");
        }
    }

    #[test]
    fn quantize_then_decode_is_within_half_a_step() {
        let x = fill(32 * 64, 1);
        for ty in QUANTIZABLE {
            let mut q = vec![0u8; ty.bytes_for(x.len()).unwrap()];
            quantize(ty, &x, &mut q);
            let back = decode(ty, &q);
            for (b, (xs, bs)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let (max, min) = xs.iter().fold((f32::MIN, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
                let amax = max.abs().max(min.abs());
                let step = match ty {
                    QuantType::Q8_0 => amax / 127.0,
                    QuantType::Q4_0 => amax / 8.0,
                    QuantType::Q4_1 => (max - min) / 15.0,
                    _ => unreachable!("quantizable types only"),
                };
                // Q4_0 spans d * [-8, 7] with d = max / -8: the side opposite the largest
                // value reaches only 7/8 of it, and values beyond are clipped (as in ggml).
                let (lo, hi) = match ty {
                    QuantType::Q4_0 => {
                        let d = f16_at(&q[b * ty.block_bytes()..], 0);
                        ((-8.0 * d).min(7.0 * d), (-8.0 * d).max(7.0 * d))
                    }
                    _ => (f32::NEG_INFINITY, f32::INFINITY),
                };
                for (v, w) in xs.iter().zip(bs) {
                    // half a step, plus the f16 rounding of the scale (and of Q4_1's min)
                    let v = v.clamp(lo, hi);
                    assert!(
                        (v - w).abs() <= 0.5 * step * 1.01 + 2e-3 * amax,
                        "{ty:?} block {b}: {v} -> {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_zero_block_stays_zero() {
        for ty in QUANTIZABLE {
            let mut q = vec![0u8; ty.block_bytes()];
            quantize(ty, &[0.0; 32], &mut q);
            assert!(decode(ty, &q).iter().all(|&v| v == 0.0), "{ty:?}");
        }
    }

    /// The product the kernels compute, in f64: the decoded weight times the decoded
    /// quantized activations.
    fn reference(ty: QuantType, w: &[u8], x: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let wd = decode(ty, w);
        let mut xq = vec![ActBlock::default(); k / 32];
        let (mut y, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
        for r in 0..m {
            quantize_act(&x[r * k..(r + 1) * k], &mut xq);
            let xd: Vec<f64> = xq
                .iter()
                .flat_map(|a| a.q.iter().map(move |&q| a.d as f64 * q as f64))
                .collect();
            for j in 0..n {
                for i in 0..k {
                    let p = wd[j * k + i] as f64 * xd[i];
                    y[r * n + j] += p;
                    mag[r * n + j] += p.abs();
                }
            }
        }
        (y, mag)
    }

    #[test]
    fn matvec_matches_the_decoded_product_on_every_path() {
        for ty in TYPES {
            for (m, k, n) in [
                (1, 32, 1),
                (1, 576, 192),
                (1, 96, 70),
                (3, 64, 70),
                (8, 576, 300),
                (11, 96, 33),
                (1, 576, 64),
                (5, 64, 16),
                (8, 96, 40),
                (11, 160, 24),
            ] {
                let (w, x) = (pack(ty, n * k, 2), fill(m * k, 3));
                let (want, mag) = reference(ty, &w, &x, m, k, n);
                let interleaved = x8::fits(n).then(|| x8::interleave(ty, &w, n, k));
                let layouts = [(Layout::Rows, Some(&w)), (Layout::X8, interleaved.as_ref())];
                for (layout, bytes) in layouts {
                    let Some(bytes) = bytes else { continue };
                    for isa in Isa::available() {
                        let mut y = vec![f32::NAN; m * n];
                        matvec_with(isa, ty, layout, bytes, &x, None, &mut y, m, k, n);
                        for (i, ((g, w), a)) in y.iter().zip(&want).zip(&mag).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= 1e-5 * a.max(1e-20),
                                "{ty:?} {layout:?} {isa:?} m={m} k={k} n={n} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Decoding a sequence alone or in a batch must give it the same logits (greedy
    /// output independent of the batch), so a row's sum is the same whether it is one of
    /// four weight rows at batch 1, one row alone at a slab's end, or one of m rows.
    #[test]
    fn a_row_gets_the_same_bits_in_any_batch_and_any_split() {
        let (k, n) = (160, 37);
        for ty in TYPES {
            let w = pack(ty, n * k, 21);
            let row_bytes = ty.bytes_for(k).unwrap();
            let mut avx2_family: Vec<(Isa, Vec<f32>)> = Vec::new();
            for isa in Isa::available() {
                // Past MAX_ROWS: the rows go through in chunks of 8 inside one job.
                let m = 10;
                let x = fill(m * k, 22);
                let mut batch = vec![0f32; m * n];
                matvec_with(isa, ty, Layout::Rows, &w, &x, None, &mut batch, m, k, n);
                if isa.has_avx2() {
                    // vpdpbusd and vpmaddubsw + vpmaddwd give the same sums.
                    if let Some((first, bits)) = avx2_family.first() {
                        assert_eq!(bits, &batch, "{ty:?}: {isa:?} vs {first:?}");
                    }
                    avx2_family.push((isa, batch.clone()));
                }
                for r in 0..m {
                    let alone = product(isa, ty, Layout::Rows, &w, &x[r * k..(r + 1) * k], 1, k, n);
                    assert_eq!(alone, batch[r * n..(r + 1) * n], "{ty:?} {isa:?} row {r}");
                    // Rows from 1 on: groups of four start at another row.
                    let mut acts = vec![ActBlock::default(); k / BLOCK];
                    quantize_act(&x[r * k..(r + 1) * k], &mut acts);
                    let mut shifted = vec![f32::NAN; n];
                    rows_range(isa, ty, &w, row_bytes, &acts, k / BLOCK, 1, 1..n, |_, j, s| {
                        shifted[j] = s[0]
                    });
                    assert_eq!(shifted[1..], alone[1..], "{ty:?} {isa:?} row {r}, split at 1");
                }
            }
        }
    }

    /// The interleaved layout: every path (the portable one included) gives a row the same
    /// bits, alone, in any batch, in any split over groups, and beside other products.
    #[test]
    fn x8_rows_get_the_same_bits_on_every_path_batch_and_split() {
        let (k, n) = (160, 40);
        for ty in TYPES {
            let rows = pack(ty, n * k, 41);
            let w = x8::interleave(ty, &rows, n, k);
            let row_bytes = ty.bytes_for(k).unwrap();
            // Past MAX_ROWS twice: the rows go through 8 at a time.
            let m = 19;
            let x = fill(m * k, 42);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::available() {
                let mut batch = vec![0f32; m * n];
                matvec_with(isa, ty, Layout::X8, &w, &x, None, &mut batch, m, k, n);
                if let Some(bits) = &first {
                    assert_eq!(bits, &batch, "{ty:?}: {isa:?} vs the portable path");
                }
                first.get_or_insert(batch.clone());
                for r in 0..m {
                    let alone = product(isa, ty, Layout::X8, &w, &x[r * k..(r + 1) * k], 1, k, n);
                    assert_eq!(alone, batch[r * n..(r + 1) * n], "{ty:?} {isa:?} row {r}");
                    let mut acts = vec![ActBlock::default(); k / BLOCK];
                    quantize_act(&x[r * k..(r + 1) * k], &mut acts);
                    let shifted = std::cell::RefCell::new(vec![f32::NAN; n]);
                    groups_range(isa, ty, &w, row_bytes, &acts, k / BLOCK, 1, 2..n / 8, |_, j, s| {
                        shifted.borrow_mut()[j..j + s.len()].copy_from_slice(s)
                    });
                    let shifted = shifted.into_inner();
                    assert_eq!(shifted[16..], alone[16..], "{ty:?} {isa:?} row {r}, groups from 2");
                }
                // Beside a product in GGUF's layout, in one call.
                let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
                let mut products = [
                    QuantProduct {
                        ty,
                        layout: Layout::X8,
                        w: &w,
                        bias: None,
                        y: &mut a,
                        n,
                    },
                    QuantProduct {
                        ty,
                        layout: Layout::Rows,
                        w: &rows,
                        bias: None,
                        y: &mut b,
                        n,
                    },
                ];
                matvec_many_with(isa, &x, m, k, &mut products);
                assert_eq!(a, batch, "{ty:?} {isa:?}: X8 beside Rows");
                let mut alone_rows = vec![0f32; m * n];
                matvec_with(isa, ty, Layout::Rows, &rows, &x, None, &mut alone_rows, m, k, n);
                assert_eq!(b, alone_rows, "{ty:?} {isa:?}: Rows beside X8");
            }
        }
    }

    #[test]
    fn x8_interleaving_round_trips_and_gives_back_each_row() {
        let (k, n) = (96, 24);
        for ty in TYPES {
            let rows = pack(ty, n * k, 51);
            let w = x8::interleave(ty, &rows, n, k);
            assert_eq!(w.len(), rows.len());
            assert_ne!(w, rows, "{ty:?}: the layout moves bytes");
            assert_eq!(x8::deinterleave(ty, &w, n, k), rows, "{ty:?}");
            let rb = ty.bytes_for(k).unwrap();
            let mut one = vec![0u8; rb];
            for j in [0, 7, 8, 13, 23] {
                x8::row_blocks(ty, &w, k, j, &mut one);
                assert_eq!(one, rows[j * rb..(j + 1) * rb], "{ty:?} row {j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "whole groups of 8 rows")]
    fn x8_needs_whole_groups() {
        let mut y = vec![0f32; 4];
        let w = vec![0u8; 4 * 34];
        matvec(QuantType::Q8_0, Layout::X8, &w, &[0.0; 32], None, &mut y, 1, 32, 4);
    }

    #[test]
    fn activations_quantize_to_the_same_bits_on_every_path() {
        let mut x = fill(32 * 9, 31);
        // Ties (x.5 after scaling by 127 / 2), zeros, a zero block, extremes.
        x[0] = 2.0;
        x[1] = 0.5 / 127.0 * 2.0;
        x[2] = -1.5 / 127.0 * 2.0;
        x[3] = -0.0;
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        x[64] = 1e30;
        // A block so small that 1 / d overflows.
        x[96..128].iter_mut().for_each(|v| *v *= 1e-37);
        let mut want = vec![ActBlock::default(); 9];
        quantize_act(&x, &mut want);
        for isa in Isa::available() {
            let mut got = vec![ActBlock::default(); 9];
            quantize_act_with(isa, &x, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    (g.q, g.d.to_bits(), g.s.to_bits(), g.sum),
                    (w.q, w.d.to_bits(), w.s.to_bits(), w.sum),
                    "{isa:?} block {i}"
                );
            }
        }
    }

    #[test]
    fn bias_is_added() {
        let (m, k, n) = (2, 64, 5);
        let (wf, x, b) = (fill(n * k, 4), fill(m * k, 5), fill(n, 6));
        let mut w = vec![0u8; QuantType::Q8_0.bytes_for(n * k).unwrap()];
        quantize(QuantType::Q8_0, &wf, &mut w);
        let (mut with, mut without) = (vec![0f32; m * n], vec![0f32; m * n]);
        matvec(QuantType::Q8_0, Layout::Rows, &w, &x, Some(&b), &mut with, m, k, n);
        matvec(QuantType::Q8_0, Layout::Rows, &w, &x, None, &mut without, m, k, n);
        for (i, (a, c)) in with.iter().zip(&without).enumerate() {
            assert!((a - c - b[i % n]).abs() < 1e-6, "[{i}]");
        }
    }

    #[test]
    #[should_panic(expected = "w holds n rows of k values")]
    fn packed_data_of_the_wrong_length_is_refused() {
        let mut y = vec![0f32; 2];
        matvec(
            QuantType::Q4_0,
            Layout::Rows,
            &[0u8; 17],
            &[0.0; 32],
            None,
            &mut y[..1],
            1,
            32,
            1,
        );
    }

    #[test]
    fn check_blocks_refuses_a_wrong_length_and_corrupt_scales_by_offset() {
        let (rows, k) = (3, 64);
        for ty in TYPES {
            let w = pack(ty, rows * k, 9);
            assert_eq!(check_blocks(ty, &w, rows, k), Ok(()), "{ty:?}");
            assert_eq!(check_blocks(ty, &w, rows, 48), Err(BlockError::Columns { k: 48 }));
            assert_eq!(
                check_blocks(ty, &w[1..], rows, k),
                Err(BlockError::Length {
                    expected: w.len(),
                    found: w.len() - 1
                })
            );
            // Row 1's second block: each of its numbers made NaN / infinite.
            let block = 2 + 1;
            for (at, wide) in ty.numbers() {
                let bad_bits: [&[u8]; 2] = if wide {
                    [&f32::NAN.to_le_bytes(), &f32::INFINITY.to_le_bytes()]
                } else {
                    [&0x7e00u16.to_le_bytes(), &0x7c00u16.to_le_bytes()]
                };
                for bits in bad_bits {
                    let mut bad = w.clone();
                    let offset = block * ty.block_bytes() + at;
                    bad[offset..offset + bits.len()].copy_from_slice(bits);
                    match check_blocks(ty, &bad, rows, k) {
                        Err(BlockError::Scale {
                            row: 1,
                            block: 1,
                            offset: o,
                            ..
                        }) => assert_eq!(o, offset),
                        other => panic!("{ty:?} {at} {bits:?}: {other:?}"),
                    }
                }
            }
        }
    }
}
