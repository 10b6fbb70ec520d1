//! GGUF, llama.cpp's model file: a bounds-checked reader and the dequantisers of its
//! block formats ([`quants`]).
//!
//! Layout (little-endian, versions 2 and 3): magic `GGUF`, `u32` version, `u64` tensor
//! count, `u64` metadata count; the metadata key/values (`u64`-length strings, a `u32`
//! value type, the value; arrays are a `u32` element type, a `u64` count and the
//! elements); the tensor infos (name, `u32` dimension count, `u64` dimensions innermost
//! first, `u32` GGML type, `u64` offset into the data); padding to `general.alignment`
//! (default 32); the tensor data.
//!
//! The file is memory-mapped and read in place: nothing is copied until a tensor is
//! dequantised. Every length, count and offset is checked against the file before it is
//! used, so a truncated or lying file is a [`GgufError`] naming the offset, never a
//! panic or an out-of-bounds read.

pub mod quants;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use quants::GgmlType;

/// What is wrong with a GGUF file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// The bytes at `offset` are not valid GGUF.
    #[error("{path}: at byte offset {offset}: {message}")]
    Format {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    /// A metadata key is missing or has the wrong type.
    #[error("{path}: metadata {key}: {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A tensor cannot be read.
    #[error("{path}: tensor {tensor}: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, from any integer type that holds it.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer (token type arrays are `i32`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "UINT8",
            Value::I8(_) => "INT8",
            Value::U16(_) => "UINT16",
            Value::I16(_) => "INT16",
            Value::U32(_) => "UINT32",
            Value::I32(_) => "INT32",
            Value::U64(_) => "UINT64",
            Value::I64(_) => "INT64",
            Value::F32(_) => "FLOAT32",
            Value::F64(_) => "FLOAT64",
            Value::Bool(_) => "BOOL",
            Value::String(_) => "STRING",
            Value::Array(_) => "ARRAY",
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
    /// Byte length of the data.
    pub size: u64,
}

impl TensorInfo {
    /// Row-major shape (PyTorch / safetensors order): the GGML dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn len(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: BTreeMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section.
    pub data_start: u64,
    pub alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A checked cursor over the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, offset: usize, message: impl Into<String>) -> GgufError {
        GgufError::Format {
            path: self.path.to_path_buf(),
            offset: offset as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(self.err(
                self.at,
                format!("{what}: needs {n} bytes, the file has {left} left (truncated?)"),
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_item` bytes each, checked against what is left.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, GgufError> {
        let at = self.at;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if min_item > 0 && n > left / min_item as u64 {
            return Err(self.err(at, format!("{what}: {n} items cannot fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.at;
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(at, format!("{what}: not UTF-8: {e}")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, GgufError> {
        let at = self.at;
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(at, format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(at, format!("{what}: nested arrays are not supported")));
                }
                let item = self.u32(what)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.err(at, format!("{what}: unknown array element type {other}"))),
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.err(at, format!("{what}: unknown value type {other}"))),
        })
    }
}

/// GGML's maximum number of dimensions.
const MAX_DIMS: u32 = 4;

impl GgufFile {
    /// Map and validate `path`: header, metadata, tensor infos, and that every tensor's
    /// data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let io = |e: std::io::Error| GgufError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath by another process is
        // outside what any reader can guard against (as with every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self, GgufError> {
        let mut c = Cursor {
            bytes: &map,
            at: 0,
            path,
        };
        let magic = c.array::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(c.err(0, format!("not a GGUF file (magic {magic:?}, expected \"GGUF\")")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(4, format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        // A tensor info is at least 4 + 8 + 4 + 8 + 8 bytes, a key/value 8 + 4 + 1.
        let n_tensors = c.count(32, "tensor count")?;
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut index = BTreeMap::new();
        for i in 0..n_kv {
            let at = c.at;
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(at, format!("metadata key {key} appears twice")));
            }
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => 32,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        path: path.to_path_buf(),
                        key: "general.alignment".into(),
                        message: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut names = BTreeMap::new();
        for i in 0..n_tensors {
            let at = c.at;
            let name = c.string(&format!("tensor {i} name"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(
                    at,
                    format!("tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ty_at = c.at;
            let ty = GgmlType::from_id(c.u32(&name)?)
                .map_err(|e| c.err(ty_at, format!("tensor {name}: {e} is not supported")))?;
            let offset = c.u64(&name)?;
            let count = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| c.err(at, format!("tensor {name}: dimensions {dims:?} overflow")))?;
            let bs = ty.block_size() as u64;
            if dims[0] % bs != 0 {
                return Err(c.err(
                    at,
                    format!(
                        "tensor {name}: innermost dimension {} is not a multiple of the {} block size {bs}",
                        dims[0],
                        ty.name()
                    ),
                ));
            }
            let size = (count / bs)
                .checked_mul(ty.type_size() as u64)
                .ok_or_else(|| c.err(at, format!("tensor {name}: size overflows")))?;
            if offset % alignment != 0 {
                return Err(c.err(
                    at,
                    format!("tensor {name}: data offset {offset} is not aligned to {alignment}"),
                ));
            }
            if names.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(at, format!("tensor {name} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.size));
            if end.is_none_or(|end| end > file_len) {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    message: format!(
                        "{} data of {} bytes at offset {} ends past the end of the {file_len}-byte file (truncated?)",
                        t.ty.name(),
                        t.size,
                        data_start + t.offset
                    ),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            index,
            tensors,
            data_start,
            alignment,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, message: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("expected {want}, found {}", v.type_name()))),
        }
    }

    /// An optional integer key (any integer type); a value of another type is an error.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "an unsigned integer", Value::as_u64)
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.typed(key, "a float", Value::as_f64)
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn array(&self, key: &str) -> Result<Option<&[Value]>, GgufError> {
        self.typed(key, "an array", Value::as_array)
    }

    /// A required key, an error naming it when absent.
    pub fn require<T>(&self, key: &str, got: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        got?.ok_or_else(|| self.meta_err(key, "missing"))
    }

    /// A string array (`tokenizer.ggml.tokens`, `merges`).
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.meta_err(key, format!("item {i} is {}, not a string", v.type_name())))
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantized) bytes of `tensor`.
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        let start = (self.data_start + tensor.offset) as usize;
        &self.map[start..start + tensor.size as usize]
    }

    /// `tensor` as f32 values, row-major in [`TensorInfo::shape`].
    pub fn dequantize(&self, tensor: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let mut out = vec![0.0f32; tensor.len()];
        quants::dequantize(tensor.ty, self.data(tensor), &mut out);
        Ok(out)
    }
}
