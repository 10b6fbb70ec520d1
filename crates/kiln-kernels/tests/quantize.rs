//! The quantizers against llama.cpp's own Python package, and the quantized products
//! against Kiln's GGUF reader's dequantisers (themselves bit-identical to gguf-py's,
//! crates/kiln-gguf/tests/reference.rs).
//!
//! Fixtures: tests/fixtures/quant/, made by scripts/make_quant_fixtures.py with
//! `gguf.quants.quantize` (gguf 0.19.0).

use kiln_gguf::GgmlType;
use kiln_kernels::Isa;
use kiln_kernels::quant::{Layout, QuantType, matvec_with, quantize, x8};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path = // the checkout `cargo test` runs in (the compiled-in path is only a fallback: a shared
    // target directory can reuse a test binary built in another checkout)
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../tests/fixtures/quant")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (scripts/make_quant_fixtures.py)", path.display()))
}

fn input() -> Vec<f32> {
    fixture("input.f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

const TYPES: [(QuantType, GgmlType); 3] = [
    (QuantType::Q8_0, GgmlType::Q8_0),
    (QuantType::Q4_0, GgmlType::Q4_0),
    (QuantType::Q4_1, GgmlType::Q4_1),
];

#[test]
fn quantize_gives_gguf_py_bytes() {
    let x = input();
    for (ty, _) in TYPES {
        let want = fixture(&format!("{}.bin", ty.name()));
        let mut got = vec![0u8; ty.bytes_for(x.len()).unwrap()];
        quantize(ty, &x, &mut got);
        for (b, (g, w)) in got
            .chunks(ty.block_bytes())
            .zip(want.chunks(ty.block_bytes()))
            .enumerate()
        {
            assert_eq!(g, w, "{}: block {b} differs from gguf.quants.quantize", ty.name());
        }
    }
}

/// With one-hot activations each output is one weight value times the activation's
/// quantized 1.0, so the kernels must read every packed value exactly as the GGUF
/// reader decodes it (scales, nibble order, Q4_1's offset).
#[test]
fn products_read_the_blocks_as_the_gguf_reader_decodes_them() {
    let (k, n) = (64usize, 32usize);
    let wf = input()[..k * n].to_vec();
    for (ty, gg) in TYPES {
        let mut w = vec![0u8; ty.bytes_for(k * n).unwrap()];
        quantize(ty, &wf, &mut w);
        let mut dequant = vec![0f32; k * n];
        kiln_gguf::quants::dequantize(gg, &w, &mut dequant);
        // one-hot rows: x[i] = 1 at column i
        let m = 8;
        for start in (0..k).step_by(m) {
            let mut x = vec![0f32; m * k];
            for r in 0..m {
                x[r * k + start + r] = 1.0;
            }
            // the quantized 1.0: 127 * f16(1 / 127)
            let one = 127.0 * half_round(1.0 / 127.0);
            let interleaved = x8::interleave(ty, &w, n, k);
            for (isa, layout) in Isa::available()
                .into_iter()
                .flat_map(|isa| [(isa, Layout::Rows), (isa, Layout::X8)])
            {
                let bytes = if layout == Layout::X8 { &interleaved } else { &w };
                let mut y = vec![f32::NAN; m * n];
                matvec_with(isa, ty, layout, bytes, &x, None, &mut y, m, k, n);
                for r in 0..m {
                    for j in 0..n {
                        let want = dequant[j * k + start + r] * one;
                        let got = y[r * n + j];
                        // Q4_1's `d q + m` is summed as d q x + m x: rounding relative
                        // to the two terms, not to their (possibly cancelling) sum
                        let block = &w[(j * k + start + r) / 32 * ty.block_bytes()..];
                        let m = match ty {
                            QuantType::Q4_1 => f16(block[2], block[3]).abs() * one,
                            _ => 0.0,
                        };
                        assert!(
                            (got - want).abs() <= 1e-6 * (want.abs() + 2.0 * m).max(1e-30),
                            "{} {isa:?} {layout:?}: w[{j}, {}] read as {got}, the reader decodes {want}",
                            ty.name(),
                            start + r
                        );
                    }
                }
            }
        }
    }
}

fn half_round(v: f32) -> f32 {
    // f32 -> f16 (round to nearest even) -> f32, as the activation scale is stored
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "a normal f16");
    let mant = bits & 0x7f_ffff;
    let (keep, rest) = (mant >> 13, mant & 0x1fff);
    let round = rest > 0x1000 || (rest == 0x1000 && keep & 1 == 1);
    let h = ((exp as u32) << 10 | keep) + round as u32;
    let (e, m) = ((h >> 10) as i32 - 15, h & 0x3ff);
    (1.0 + m as f32 / 1024.0) * 2f32.powi(e)
}

fn f16(lo: u8, hi: u8) -> f32 {
    let mut one = [0f32; 1];
    // decode through the reader's F16 path
    kiln_gguf::quants::dequantize(GgmlType::F16, &[lo, hi], &mut one);
    one[0]
}
