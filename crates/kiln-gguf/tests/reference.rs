//! Kiln's GGUF reader against llama.cpp's Python package (`gguf`): the fixture
//! tests/fixtures/gguf/quants.gguf was written by `gguf.GGUFWriter` and holds, for
//! every tensor type Kiln reads, random blocks and `gguf.quants.dequantize`'s output
//! (scripts/make_gguf_fixtures.py). Plus truncated and lying files.

use std::path::PathBuf;

use kiln_gguf::{GgmlType, GgufError, GgufFile, Value};

fn fixture() -> PathBuf {
    // the checkout `cargo test` runs in (the compiled-in path is only a fallback: a shared
    // target directory can reuse a test binary built in another checkout)
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../../tests/fixtures/gguf/quants.gguf")
}

#[test]
fn every_type_dequantizes_bit_identically_to_gguf_py() {
    let file = GgufFile::open(fixture()).unwrap();
    assert_eq!(file.version, 3);
    for ty in GgmlType::ALL {
        let t = file
            .tensor(ty.name())
            .unwrap_or_else(|| panic!("{} is in the fixture", ty.name()));
        assert_eq!(t.ty, ty);
        assert_eq!(t.shape(), vec![2, 512]);
        let expected = file.tensor(&format!("{}.expected", ty.name())).unwrap();
        assert_eq!(expected.ty, GgmlType::F32);
        let got = file.dequantize(t).unwrap();
        let want = file.dequantize(expected).unwrap();
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
        assert!(
            want.iter().any(|v| *v != 0.0),
            "{}: the fixture is not all zeros",
            ty.name()
        );
    }
}

#[test]
fn metadata_of_every_value_type() {
    let file = GgufFile::open(fixture()).unwrap();
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(get("kiln.u8"), Value::U8(200));
    assert_eq!(get("kiln.i8"), Value::I8(-100));
    assert_eq!(get("kiln.u16"), Value::U16(60000));
    assert_eq!(get("kiln.i16"), Value::I16(-30000));
    assert_eq!(get("kiln.u32"), Value::U32(4_000_000_000));
    assert_eq!(get("kiln.i32"), Value::I32(-2_000_000_000));
    assert_eq!(get("kiln.u64"), Value::U64(18_000_000_000_000_000_000));
    assert_eq!(get("kiln.i64"), Value::I64(-9_000_000_000_000_000_000));
    assert_eq!(get("kiln.f32"), Value::F32(0.25));
    assert_eq!(get("kiln.f64"), Value::F64(-1e300));
    assert_eq!(get("kiln.bool"), Value::Bool(true));
    assert_eq!(file.str("kiln.string").unwrap(), Some("Grüße, 世界 🌍"));
    assert_eq!(file.strings("kiln.strings").unwrap().unwrap(), vec!["a", "", "ü"]);
    let ints: Vec<i64> = file
        .array("kiln.ints")
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ints, vec![1, -2, 3]);
    assert_eq!(file.str("general.architecture").unwrap(), Some("kiln-fixture"));
    // a key of the wrong type names the key and both types
    let err = file.str("kiln.u8").unwrap_err().to_string();
    assert!(err.contains("kiln.u8") && err.contains("UINT8"), "{err}");
    let err = file.require("nope", file.u64("nope")).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("missing"), "{err}");
}

fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

#[test]
fn truncated_files_are_errors_naming_an_offset_at_every_cut() {
    let bytes = std::fs::read(fixture()).unwrap();
    let file = GgufFile::open(fixture()).unwrap();
    let header_end = file.data_start as usize;
    // every cut inside the header, and a sample of cuts inside the data
    let cuts: Vec<usize> = (0..header_end).chain((header_end..bytes.len()).step_by(997)).collect();
    for cut in cuts {
        let f = write_tmp(&bytes[..cut]);
        let err = GgufFile::open(f.path()).expect_err(&format!("a file cut at {cut} bytes opened"));
        let msg = err.to_string();
        assert!(
            matches!(err, GgufError::Format { .. } | GgufError::Tensor { .. }),
            "cut {cut}: {msg}"
        );
        assert!(msg.contains(&f.path().display().to_string()), "cut {cut}: {msg}");
    }
}

#[test]
fn lying_headers_are_refused_by_name() {
    let bytes = std::fs::read(fixture()).unwrap();
    let open = |b: &[u8]| GgufFile::open(write_tmp(b).path()).unwrap_err().to_string();
    // bad magic, unsupported version
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(open(&b).contains("not a GGUF file"));
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open(&b).contains("version 1"));
    // a tensor count far beyond what the file could hold
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open(&b);
    assert!(err.contains("tensor count") && err.contains("offset 8"), "{err}");
    // the first key's length claims more bytes than exist
    let mut b = bytes.clone();
    b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open(&b);
    assert!(err.contains("offset 24"), "{err}");
    // an unknown tensor type: find the F32 tensor info (name "F32", 2 dims, type 0)
    let needle: Vec<u8> = [&3u64.to_le_bytes()[..], b"F32", &2u32.to_le_bytes()].concat();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap()
        + needle.len()
        + 16;
    let mut b = bytes.clone();
    b[at..at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
    let err = open(&b);
    assert!(err.contains("tensor F32") && err.contains("IQ2_XXS"), "{err}");
    let mut b = bytes.clone();
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    assert!(open(&b).contains("unknown tensor type 77"));
    // a size that disagrees with the shape: Q4_K needs the innermost dimension in 256s
    let mut b = bytes.clone();
    b[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
    b[at - 16..at - 8].copy_from_slice(&100u64.to_le_bytes());
    let err = open(&b);
    assert!(err.contains("not a multiple") && err.contains("Q4_K"), "{err}");
    // a data offset past the end of the file
    let mut b = bytes.clone();
    b[at + 4..at + 12].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let err = open(&b);
    assert!(err.contains("tensor F32") && err.contains("past the end"), "{err}");
}
