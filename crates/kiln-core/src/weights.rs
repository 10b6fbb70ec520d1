//! Model weights as safetensors: save, check every name, shape and dtype, load.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};

use crate::io::{StoreError, atomic_write, io_err};

/// What a model expects of each stored tensor: its shape and its safetensors dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub shape: Vec<usize>,
    /// `None` for an integer parameter not built yet (a lazy parameter has no dtype until
    /// it is made): any integer dtype; its module checks the width it needs once loaded.
    pub dtype: Option<safetensors::Dtype>,
}

/// The safetensors dtype a Burn dtype is stored as.
fn storage_dtype(dtype: burn::tensor::DType) -> safetensors::Dtype {
    use burn::tensor::DType as B;
    use safetensors::Dtype as S;
    match dtype {
        B::F64 => S::F64,
        B::F16 => S::F16,
        B::BF16 => S::BF16,
        B::I64 => S::I64,
        B::I32 => S::I32,
        B::I16 => S::I16,
        B::I8 => S::I8,
        B::U64 => S::U64,
        B::U32 => S::U32,
        B::U16 => S::U16,
        B::U8 => S::U8,
        B::Bool(_) => S::BOOL,
        _ => S::F32,
    }
}

/// The parameter names, shapes and dtypes a model expects, as safetensors would store them.
pub fn expected_tensors<M: Module>(model: &M) -> BTreeMap<String, ExpectedTensor> {
    model
        .collect(None, None, false)
        .into_iter()
        .map(|t| {
            (
                t.name.clone(),
                ExpectedTensor {
                    shape: t.shape.as_slice().to_vec(),
                    dtype: Some(storage_dtype(t.dtype)),
                },
            )
        })
        .collect()
}

/// The parameter names and shapes a model expects, as safetensors would store them.
pub fn expected_shapes<M: Module>(model: &M) -> BTreeMap<String, Vec<usize>> {
    expected_tensors(model)
        .into_iter()
        .map(|(name, t)| (name, t.shape))
        .collect()
}

/// Serialise a model's parameters to safetensors bytes.
pub fn weights_to_bytes<M: Module>(model: &M) -> Result<Vec<u8>, String> {
    let mut store = SafetensorsStore::from_bytes(None);
    model.save_into(&mut store).map_err(|e| e.to_string())?;
    store.get_bytes().map_err(|e| e.to_string())
}

/// Path fragment of the factors of a LoRA adapter (`<weight>.lora.a`, `<weight>.lora.b`).
pub const LORA_PATHS: &str = r"\.lora\.";

/// Whether `model` carries LoRA adapters.
pub fn has_adapters<M: Module>(model: &M) -> bool {
    model
        .collect(None, None, false)
        .iter()
        .any(|t| t.name.contains(".lora."))
}

/// Save the weights of a (validation-mode) model as inference uses them: adapters merged
/// into their base weights, to `path`. A model with LoRA adapters also gets the adapter
/// factors alone in `<stem>.adapter.safetensors` beside it. Both writes are atomic.
pub fn save_inference_weights<M: Module>(model: &M, path: &Path) -> Result<(), StoreError> {
    if has_adapters(model) {
        let mut store = SafetensorsStore::from_bytes(None).with_regex(LORA_PATHS);
        let err = |message: String| StoreError::Other {
            path: path.to_path_buf(),
            message,
        };
        model.save_into(&mut store).map_err(|e| err(e.to_string()))?;
        let bytes = store.get_bytes().map_err(|e| err(e.to_string()))?;
        atomic_write(&path.with_extension("adapter.safetensors"), &bytes)?;
        save_weights(&model.clone().materialize(), path)
    } else {
        save_weights(model, path)
    }
}

/// Save a model's parameters to `path` as safetensors, atomically.
pub fn save_weights<M: Module>(model: &M, path: &Path) -> Result<(), StoreError> {
    let bytes = weights_to_bytes(model).map_err(|message| StoreError::Other {
        path: path.to_path_buf(),
        message,
    })?;
    atomic_write(path, &bytes)
}

/// Whether a stored tensor of `found` dtype can load where `want` is expected:
/// half-precision weights load into f32 parameters (`convert --dtype f16`), and an
/// integer parameter not built yet takes any integer dtype.
fn dtype_fits(found: safetensors::Dtype, want: Option<safetensors::Dtype>) -> bool {
    use safetensors::Dtype as S;
    match want {
        Some(w) => found == w || (w == S::F32 && matches!(found, S::F16 | S::BF16)),
        None => matches!(
            found,
            S::U8 | S::I8 | S::U16 | S::I16 | S::U32 | S::I32 | S::U64 | S::I64
        ),
    }
}

/// Check that safetensors `bytes` (read from `path`) hold exactly the tensors `expected`,
/// with the same shapes, as f32. Nothing is applied; the error lists every problem.
pub fn check_weights(bytes: &[u8], path: &Path, expected: &BTreeMap<String, ExpectedTensor>) -> Result<(), StoreError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut problems = Vec::new();
    let found: BTreeMap<String, (Vec<usize>, safetensors::Dtype)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.shape().to_vec(), view.dtype())))
        .collect();
    for (name, want) in expected {
        let shape = &want.shape;
        match found.get(name) {
            None => problems.push(format!("missing tensor {name} {shape:?}")),
            Some((s, _)) if s != shape => {
                problems.push(format!("tensor {name} has shape {s:?}, the model expects {shape:?}"))
            }
            Some((_, dtype)) if !dtype_fits(*dtype, want.dtype) => problems.push(match want.dtype {
                Some(w) => format!("tensor {name} is {dtype:?}, expected {w:?}"),
                None => format!("tensor {name} is {dtype:?}, expected an integer dtype"),
            }),
            _ => {}
        }
    }
    for name in found.keys().filter(|n| !expected.contains_key(*n)) {
        problems.push(format!("unexpected tensor {name}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Mismatch {
            path: path.to_path_buf(),
            message: problems.join("; "),
        })
    }
}

/// [`expected_tensors`] without materialising any parameter: names and shapes come from
/// the parameters' lazy shapes, so a freshly built model about to be loaded never runs its
/// random initialisation (on a 270M-parameter model that was most of the load time).
/// A lazy float parameter is stored as F32 (what it would initialise to); initialised
/// ones, and the (small) integer and boolean parameters, report their own dtype.
pub fn expected_tensors_lazy<M: Module>(model: &M) -> BTreeMap<String, ExpectedTensor> {
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::{Bool, Int, Tensor};
    #[derive(Default)]
    struct Shapes {
        path: Vec<String>,
        out: BTreeMap<String, ExpectedTensor>,
    }
    impl Shapes {
        fn add(&mut self, shape: &[usize], dtype: Option<safetensors::Dtype>) {
            self.out.insert(
                self.path.join("."),
                ExpectedTensor {
                    shape: shape.to_vec(),
                    dtype,
                },
            );
        }
    }
    impl ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.pop();
            }
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let dtype = if param.is_initialized() {
                storage_dtype(param.val().dtype())
            } else {
                safetensors::Dtype::F32
            };
            self.add(param.lazy_shape().as_slice(), Some(dtype));
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            // (a lazy integer parameter, such as a packed weight's placeholder, stays
            // unbuilt: making it would hold a second copy of the weight while it loads)
            let dtype = param.is_initialized().then(|| storage_dtype(param.val().dtype()));
            self.add(param.lazy_shape().as_slice(), dtype);
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
            let t = param.val();
            self.add(t.dims().as_slice(), Some(storage_dtype(t.dtype())));
        }
    }
    let mut shapes = Shapes::default();
    model.visit(&mut shapes);
    shapes.out
}

/// The values of a safetensors tensor's little-endian bytes as f32: F32 as is, F16 and
/// BF16 widened exactly (every half-precision value is an f32 value); `None` for any other
/// dtype.
pub fn f32_values(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let half = |widen: fn([u8; 2]) -> f32| Some(bytes.chunks_exact(2).map(|b| widen([b[0], b[1]])).collect());
    match dtype {
        safetensors::Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        safetensors::Dtype::F16 => half(|b| half::f16::from_le_bytes(b).to_f32()),
        safetensors::Dtype::BF16 => half(|b| half::bf16::from_le_bytes(b).to_f32()),
        _ => None,
    }
}

/// Load safetensors weights from `path` into `model`, after checking every name and shape.
/// The model's own initial values are never computed (see [`expected_tensors_lazy`]).
/// The header is read from a memory map (only its pages are touched); each tensor is
/// then read from the file straight into its own buffer when the model takes it
/// (`pread`, one tensor at a time), so the process never holds the file's pages beside
/// its copy of them: peak memory is the model, not twice the model (Burn's
/// `SafetensorsStore::from_file` keeps the whole map resident while it loads).
pub fn load_weights<M: Module>(mut model: M, path: &Path) -> Result<M, StoreError> {
    use burn::store::burn_pack::{Bytes, Error as PackError, Tensor as PackTensor};
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a file Kiln does not modify while loading it.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    check_weights(&map, path, &expected_tensors_lazy(&model))?;
    let (header, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    drop(map);
    let data_start = 8 + header as u64;
    let file = std::sync::Arc::new(file);
    let mut tensors = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = burn_dtype(info.dtype).ok_or_else(|| StoreError::Corrupt {
            path: path.to_path_buf(),
            message: format!("tensor {name}: dtype {:?} is not one Kiln loads", info.dtype),
        })?;
        let (begin, end) = info.data_offsets;
        let (file, at, len, width) = (
            file.clone(),
            data_start + begin as u64,
            end - begin,
            info.dtype.bitsize() / 8,
        );
        // f16 / bf16 weights become f32 (exactly) as they are read.
        let st_dtype = info.dtype;
        let widen = matches!(st_dtype, safetensors::Dtype::F16 | safetensors::Dtype::BF16);
        let (dtype, loaded_len) = if widen {
            (burn::tensor::DType::F32, len * 2)
        } else {
            (dtype, len)
        };
        let what = format!("{}: tensor {name}", path.display());
        tensors.push(PackTensor::deferred(
            name,
            dtype,
            info.shape.clone(),
            None,
            loaded_len,
            move || {
                let read = |buf: &mut [u8]| {
                    file.read_exact_at(buf, at)
                        .map_err(|e| PackError::IoError(format!("{what}: {e}")))
                };
                // Read as elements of the dtype's width, so the buffer has the alignment
                // the tensor needs and is taken as it is (`Bytes::from_bytes_vec` would
                // copy every tensor once more to align it to 16 bytes: for a packed
                // Gemma 3 embedding 178 MB twice at the peak).
                macro_rules! read_as {
                    ($t:ty) => {{
                        let mut values = vec![<$t>::default(); len / std::mem::size_of::<$t>()];
                        // SAFETY: the bytes of `values`, exactly `len` of them (`len` is a
                        // multiple of the width, checked by the header's validation).
                        read(unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, len) })?;
                        Ok(Bytes::from_elems(values))
                    }};
                }
                if st_dtype == safetensors::Dtype::F32 && len >= HUGE_TENSOR_BYTES {
                    // A token embedding: straight onto huge pages, where the decode step
                    // reads it (`fused::for_decoding` keeps a buffer already there
                    // instead of copying it: Gemma 3's f32 embedding is 671 MB).
                    let mut values = kiln_kernels::memory::HugeBuffer::zeroed(len / 4);
                    let slice = values.as_mut_slice();
                    // SAFETY: the bytes of `slice`, exactly `len` of them.
                    read(unsafe { std::slice::from_raw_parts_mut(slice.as_mut_ptr() as *mut u8, len) })?;
                    Ok(Bytes::from_shared(
                        bytes::Bytes::from_owner(values),
                        burn::tensor::AllocationProperty::Native,
                    ))
                } else if widen {
                    let mut bytes = vec![0u8; len];
                    read(&mut bytes)?;
                    let values = f32_values(st_dtype, &bytes).expect("a half-precision dtype");
                    Ok(Bytes::from_elems(values))
                } else {
                    match width {
                        1 => read_as!(u8),
                        2 => read_as!(u16),
                        4 => read_as!(u32),
                        8 => read_as!(u64),
                        _ => {
                            let mut bytes = vec![0u8; len];
                            read(&mut bytes)?;
                            Ok(Bytes::from_bytes_vec(bytes))
                        }
                    }
                }
            },
        ));
    }
    let result = model.apply(tensors, None, None, false);
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(StoreError::Mismatch {
            path: path.to_path_buf(),
            message: format!("{:?} {:?}", result.errors, result.missing),
        });
    }
    Ok(model)
}

/// F32 tensors from this size up are read onto huge pages ([`load_weights`]).
const HUGE_TENSOR_BYTES: usize = 64 << 20;

/// The Burn dtype of a safetensors dtype Kiln stores.
fn burn_dtype(dtype: safetensors::Dtype) -> Option<burn::tensor::DType> {
    use burn::tensor::DType as B;
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F64 => B::F64,
        S::F32 => B::F32,
        S::F16 => B::F16,
        S::BF16 => B::BF16,
        S::I64 => B::I64,
        S::I32 => B::I32,
        S::I16 => B::I16,
        S::I8 => B::I8,
        S::U64 => B::U64,
        S::U32 => B::U32,
        S::U8 => B::U8,
        S::BOOL => B::Bool(burn::tensor::BoolStore::Native),
        _ => return None,
    })
}
