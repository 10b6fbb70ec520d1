//! Kiln's CPU kernels, independent of Burn: they take slices and write slices, so the
//! models' backend extension (`kiln-models/src/fused/flex.rs`) and the benchmarks call
//! the same code.
//!
//! Decoding multiplies one (or a few) activation rows by every weight matrix of the
//! model: a matrix-vector product whose speed is the memory bandwidth, and which
//! Burn 0.22's flex backend runs on one thread (the `gemm` crate's gemv path). The
//! kernels here split the weight over [`pool::Pool`] (the caller and spinning helpers),
//! stream each weight once whatever the number of rows, and use AVX2 + FMA when the CPU has them
//! ([`Isa::detect`], at run time), a portable loop otherwise. The tests run every path
//! the machine has against a plain triple loop.

pub mod decode;
pub mod matvec;
pub mod memory;
pub mod pool;
pub mod quant;

pub use matvec::{
    MAX_ROWS, NkProduct, linear_kn, linear_kn_with, linear_nk, linear_nk_many, linear_nk_with, transpose,
};

/// The instruction-set paths of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (the compiler's own vectorisation, SSE2 on x86-64).
    Portable,
    /// x86-64 AVX2 with FMA and F16C (every AVX2 CPU has them).
    Avx2Fma,
    /// [`Isa::Avx2Fma`] plus AVX-512 VNNI (with VL and BW): the quantized products' u8 x
    /// i8 dot products in one instruction (`vpdpbusd`, as llama.cpp uses it) instead of
    /// two, on 256-bit vectors, and on 512-bit ones for interleaved weights
    /// ([`quant::x8`]); every other kernel runs its AVX2 code here.
    Avx512Vnni,
}

impl Isa {
    /// The best path this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return Isa::Avx512Vnni;
            }
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Every path this CPU runs, the portable one first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Vnni]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    /// Whether this CPU runs this path (no allocation: the kernels check it per call).
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2Fma => Isa::best().has_avx2(),
            Isa::Avx512Vnni => Isa::best() == Isa::Avx512Vnni,
        }
    }

    /// Whether this path includes AVX2, FMA and F16C (the f32 kernels' AVX2 code).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2Fma | Isa::Avx512Vnni)
    }

    /// The cached [`detect`](Isa::detect) result.
    pub fn best() -> Isa {
        use std::sync::OnceLock;
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }
}

/// A buffer the tasks of one pool job share, each writing its own part of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: the tasks write disjoint parts of a buffer that outlives the job.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Most products one [`linear_nk_many`] or [`quant::matvec_many`] call takes (a
/// layer's q, k, v; its gate and up).
pub const MAX_PRODUCTS: usize = 4;

/// The tasks of one pool job over several products' output rows, on the stack (a
/// decode step makes these calls a hundred times per token): product `i` is cut into
/// [`matvec::row_tasks`] slabs of consecutive rows.
pub(crate) struct Split {
    /// Task counts, cumulative: product `i` owns tasks `ends[i - 1]..ends[i]`.
    ends: [usize; MAX_PRODUCTS],
    rows: [usize; MAX_PRODUCTS],
    len: usize,
}

impl Split {
    /// `rows[i]` output rows of `cols` inputs for product `i`, at least `min_rows` rows
    /// per task. Panics on more than [`MAX_PRODUCTS`] products.
    pub(crate) fn new(rows: impl ExactSizeIterator<Item = usize>, cols: usize, min_rows: usize) -> Split {
        assert!(
            rows.len() <= MAX_PRODUCTS,
            "at most {MAX_PRODUCTS} products in one call"
        );
        let mut split = Split {
            ends: [0; MAX_PRODUCTS],
            rows: [0; MAX_PRODUCTS],
            len: 0,
        };
        let mut total = 0;
        for (i, n) in rows.enumerate() {
            total += matvec::row_tasks(n, cols, min_rows);
            split.ends[i] = total;
            split.rows[i] = n;
            split.len = i + 1;
        }
        split
    }

    /// Tasks in all.
    pub(crate) fn tasks(&self) -> usize {
        if self.len == 0 { 0 } else { self.ends[self.len - 1] }
    }

    /// Task `t`: (its product, first row, end row).
    pub(crate) fn task(&self, t: usize) -> (usize, usize, usize) {
        let i = self.ends[..self.len]
            .iter()
            .position(|&e| t < e)
            .expect("a task of this split");
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let (n, parts) = (self.rows[i], self.ends[i] - start);
        let slab = n.div_ceil(parts);
        let q = t - start;
        (i, (q * slab).min(n), ((q + 1) * slab).min(n))
    }
}

/// The sum of the eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s4 = _mm_add_ps(lo, hi);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// A deterministic pseudo-random fill in [-1, 1), for the tests.
#[cfg(test)]
pub(crate) fn test_fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
