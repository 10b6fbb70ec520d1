//! Every block format the kernels read, against llama.cpp's Python package: the tensors
//! of tests/fixtures/gguf/quants.gguf (written by `gguf.GGUFWriter`, with each tensor's
//! values as `gguf.quants.dequantize` gives them beside it; scripts/make_gguf_fixtures.py)
//! rewritten into Kiln's blocks (`kquant::from_gguf`: a copy, or Q4_K's and Q6_K's 32-value
//! form), then dequantized and multiplied by every path.

use kiln_gguf::{GgmlType, GgufFile};
use kiln_kernels::Isa;
use kiln_kernels::quant::{Layout, QuantType, dequantize, kquant, matvec_with, x8};
use std::path::PathBuf;

fn fixture() -> GgufFile {
    let path = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../tests/fixtures/gguf/quants.gguf");
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const TYPES: [(QuantType, GgmlType); 6] = [
    (QuantType::Q8_0, GgmlType::Q8_0),
    (QuantType::Q4_0, GgmlType::Q4_0),
    (QuantType::Q4_1, GgmlType::Q4_1),
    (QuantType::Q5_0, GgmlType::Q5_0),
    (QuantType::Q4K, GgmlType::Q4_K),
    (QuantType::Q6K, GgmlType::Q6_K),
];

/// The fixture's `[2, 512]` tensor of `gg` as Kiln's blocks, and gguf-py's values of it.
fn tensor(file: &GgufFile, ty: QuantType, gg: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let t = file.tensor(gg.name()).expect("the fixture holds every type");
    assert_eq!((t.ty, t.shape()), (gg, vec![2, 512]));
    let mut blocks = Vec::new();
    kquant::from_gguf(ty, file.data(t), &mut blocks).unwrap();
    let want = file
        .dequantize(file.tensor(&format!("{}.expected", gg.name())).unwrap())
        .unwrap();
    (blocks, want)
}

#[test]
fn kiln_blocks_hold_gguf_py_values_bit_for_bit() {
    let file = fixture();
    for (ty, gg) in TYPES {
        let (blocks, want) = tensor(&file, ty, gg);
        assert_eq!(blocks.len(), ty.bytes_for(want.len()).unwrap(), "{}", ty.name());
        assert_eq!(ty.gguf_blocks(), blocks == file.data(file.tensor(gg.name()).unwrap()));
        let mut got = vec![f32::NAN; want.len()];
        dequantize(ty, &blocks, &mut got);
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{}: {differ} of {} values differ from gguf-py",
            ty.name(),
            want.len()
        );
        assert!(want.iter().any(|&v| v != 0.0), "{}: not all zeros", ty.name());
    }
}

/// With one-hot activations each output is one weight value times the quantized 1.0, so
/// every path must read every packed value as gguf-py decodes it.
#[test]
fn products_read_every_value_as_gguf_py_decodes_it() {
    let file = fixture();
    let k = 512;
    // the quantized 1.0 of a one-hot activation block: 127 * f16(1 / 127)
    let one = 127.0 * half::f16::from_f32(1.0 / 127.0).to_f32();
    for (ty, gg) in TYPES {
        let (two, values) = tensor(&file, ty, gg);
        // eight rows (the fixture's two, four times) for the interleaved layout
        let n = 8;
        let w = two.repeat(4);
        let want = values.repeat(4);
        let interleaved = x8::interleave(ty, &w, n, k);
        let largest = max_abs(&values);
        let m = 8;
        for start in (0..k).step_by(m * 7) {
            let mut x = vec![0f32; m * k];
            for r in 0..m {
                x[r * k + (start + r * 3) % k] = 1.0;
            }
            for isa in Isa::available() {
                for (layout, bytes) in [(Layout::Rows, &w), (Layout::X8, &interleaved)] {
                    let mut y = vec![f32::NAN; m * n];
                    matvec_with(isa, ty, layout, bytes, &x, None, &mut y, m, k, n);
                    for r in 0..m {
                        let col = (start + r * 3) % k;
                        for j in 0..n {
                            let want = want[j * k + col] * one;
                            let got = y[r * n + j];
                            // Q4_1's and Q4_K's `s q + m` is summed as s q x + m x: rounding
                            // relative to the terms (at most about twice the largest value),
                            // not to their (possibly cancelling) sum; one step of any format
                            // is far above this
                            assert!(
                                (got - want).abs() <= 4e-6 * one * largest,
                                "{} {isa:?} {layout:?}: w[{j}, {col}] read as {got}, gguf-py decodes {want}",
                                ty.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn gguf_blocks_of_the_wrong_length_are_refused() {
    let mut out = Vec::new();
    let err = kquant::from_gguf(QuantType::Q4K, &[0u8; 145], &mut out).unwrap_err();
    assert_eq!((err.found, err.block), (145, GgmlType::Q4_K.type_size()));
    assert!(kquant::from_gguf(QuantType::Q6K, &[0u8; 209], &mut out).is_err());
    assert!(kquant::from_gguf(QuantType::Q5_0, &[0u8; 23], &mut out).is_err());
    assert!(out.is_empty(), "nothing appended on an error");
}
