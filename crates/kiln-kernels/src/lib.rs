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
}

impl Isa {
    /// The best path this CPU runs.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Every path this CPU runs, the portable one first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut paths = vec![Isa::Portable];
        if Isa::detect() == Isa::Avx2Fma {
            paths.push(Isa::Avx2Fma);
        }
        paths
    }

    /// The cached [`detect`](Isa::detect) result.
    pub fn best() -> Isa {
        use std::sync::OnceLock;
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }
}
