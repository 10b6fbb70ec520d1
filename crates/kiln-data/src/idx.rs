//! The IDX format of MNIST-style datasets (optionally gzipped): a big-endian header
//! `0x00 0x00 <dtype> <ndim>`, `ndim` u32 dimensions, then the raw data.
//! Only `u8` data (dtype 0x08) is used by image datasets.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DataError;

/// An IDX array of bytes with its dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// `path`, or `path.gz` if only that exists.
pub fn find(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() {
        Ok(gz)
    } else if plain.exists() {
        Ok(plain)
    } else {
        Err(DataError::format(
            &gz,
            "missing (run scripts/fetch-fashion-mnist.sh, or point data.path at a directory of IDX files)",
        ))
    }
}

/// Read an IDX file of `u8` data; gzip is detected by its magic bytes.
pub fn read(path: &Path) -> Result<IdxArray, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(path, format!("corrupt gzip: {e}")))?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(|m| DataError::format(path, m))
}

/// Parse IDX bytes.
pub fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic number)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!("IDX data type 0x{:02x} is not unsigned bytes (0x08)", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&len| len.checked_add(header).is_some())
        .ok_or_else(|| format!("header dimensions {dims:?} overflow: no file holds that many bytes"))?;
    if bytes.len() != header + len {
        return Err(format!(
            "header says {dims:?} ({len} bytes of data) but the file holds {}",
            bytes.len() - header
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn header(dims: &[u32]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b
    }

    #[test]
    fn parses_a_small_array() {
        let mut b = header(&[2, 3]);
        b.extend([1, 2, 3, 4, 5, 6]);
        let a = parse(&b).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn dimensions_whose_product_overflows_are_an_error_not_a_panic() {
        let b = header(&[u32::MAX, u32::MAX, u32::MAX, 2]);
        let err = parse(&b).unwrap_err();
        assert!(err.contains("overflow"), "{err}");
    }

    #[test]
    fn truncated_and_lying_files_are_errors() {
        assert!(parse(&[0, 0, 8]).unwrap_err().contains("magic"));
        assert!(parse(&[0, 0, 8, 2, 0, 0]).unwrap_err().contains("truncated"));
        let mut b = header(&[2, 3]);
        b.extend([1, 2]);
        assert!(parse(&b).unwrap_err().contains("6 bytes"));
    }
}
