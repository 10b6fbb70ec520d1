//! Linear layers and embeddings whose weight may be kept packed in 32-value block
//! formats (GGUF's Q8_0, Q4_0, Q4_1, Q5_0, and Q4_K / Q6_K in Kiln's 32-value form:
//! [`kiln_kernels::quant`]), and the `[quantization]` section of a model directory that
//! says which.
//!
//! [`Linear`] and [`Embedding`] are Burn's `nn::Linear` and `nn::Embedding` (the same
//! parameter names and shapes, so checkpoints and LoRA paths are unchanged) plus an
//! optional `packed` parameter: the weight as rows of blocks, `[rows, cols / 32, block
//! bytes]` U8, row `j` being output `j` of a linear layer (GGUF's `[out, in]` layout) or
//! token `j` of an embedding. A packed module's `weight` is empty (`[0, out]`, `[0, C]`),
//! so nothing can read a stale f32 copy; the block format follows from the last
//! dimension (34, 18, 20, 22, 24 or 36 bytes).
//!
//! On flex a packed product is [`kiln_kernels::quant::matvec`] over the blocks in place
//! (activations quantized to 8 bits, integer dot products); elsewhere the weight is
//! dequantized for each product and Burn multiplies (correct, not fast). A model
//! directory loaded on another backend is dequantized once at load ([`unpacked`]).
//!
//! On disk (`model.safetensors` + `config.toml`):
//! - `<module>.packed`: U8 `[rows, cols / 32, block bytes]`, the blocks byte for byte as
//!   GGUF stores that tensor (f16 scales little-endian), or for Q4_K and Q6_K Kiln's
//!   32-value blocks of the same values (the table in [`kiln_kernels::quant`]);
//! - `<module>.weight`: F32 `[0, out]` (linear) or `[0, C]` (embedding), a marker;
//! - `[quantization.tensors]` in `config.toml`: `"<module>" = "Q8_0"` for each packed
//!   module. Loading checks that every entry names a linear layer or embedding of the
//!   model whose width is a multiple of 32, and every tensor's shape and dtype.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, Param, ParamId,
};
use burn::prelude::*;
use burn::tensor::DType;
use kiln_kernels::quant::BLOCK;
use kiln_kernels::quant::dequantize;
use kiln_kernels::quant::x8;
pub use kiln_kernels::quant::{Layout, QuantType};
use serde::{Deserialize, Serialize};

use crate::registry::FieldError;

/// `[quantization]` of a model directory: the modules whose weight is stored packed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// Module path (`model.layers.0.self_attn.q_proj`) -> block format (`Q8_0`, `Q4_0`,
    /// `Q4_1`, `Q5_0`, `Q4_K`, `Q6_K`).
    pub tensors: BTreeMap<String, String>,
}

impl Quantization {
    /// Every block format is one Kiln has kernels for.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (path, ty) in &self.tensors {
            if QuantType::from_name(ty).is_none() {
                return Err(FieldError::new(
                    "quantization.tensors",
                    format!("{path} = {ty:?}: unknown block format (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K)"),
                ));
            }
        }
        Ok(())
    }

    /// The block format of `module`, if it is packed.
    pub fn get(&self, module: &str) -> Option<QuantType> {
        self.tensors.get(module).and_then(|t| QuantType::from_name(t))
    }
}

thread_local! {
    /// Set while [`packed_layout`] maps a model: unpacked modules offer an empty packed
    /// slot to the mapper.
    static OFFER_SLOT: Cell<bool> = const { Cell::new(false) };
    /// Set while [`unpacked`] maps a model: packed modules dequantize themselves.
    static UNPACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with `flag` set, cleared again even if `f` panics.
fn with_flag<R>(flag: &'static std::thread::LocalKey<Cell<bool>>, f: impl FnOnce() -> R) -> R {
    struct Reset(&'static std::thread::LocalKey<Cell<bool>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    flag.set(true);
    let _reset = Reset(flag);
    f()
}

/// A packed weight: the U8 blocks and what they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedShape {
    pub ty: QuantType,
    /// Output features (linear) or tokens (embedding).
    pub rows: usize,
    /// Values per row: input features (linear) or the embedding width.
    pub cols: usize,
    /// GGUF's row order (as loaded), or eight rows interleaved ([`interleaved`], made at
    /// load on flex), told apart by the U8 tensor's shape.
    pub layout: Layout,
}

impl PackedShape {
    /// The U8 tensor's shape: `[rows, cols / 32, block bytes]`, or `[rows / 8, cols /
    /// 32, 8 x block bytes]` interleaved.
    pub fn dims(&self) -> [usize; 3] {
        match self.layout {
            Layout::Rows => [self.rows, self.cols / BLOCK, self.ty.block_bytes()],
            Layout::X8 => [
                self.rows / x8::ROWS,
                self.cols / BLOCK,
                x8::ROWS * self.ty.block_bytes(),
            ],
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.ty.block_bytes()
    }

    fn of(packed: &Param<Tensor<3, Int>>) -> PackedShape {
        let [rows, blocks, bytes] = packed.lazy_shape().dims();
        let (ty, layout, rows) = match QuantType::from_block_bytes(bytes) {
            Some(ty) => (ty, Layout::Rows, rows),
            None => {
                let ty = QuantType::from_block_bytes(bytes / x8::ROWS)
                    .filter(|_| bytes.is_multiple_of(x8::ROWS))
                    .expect("a packed weight's last dimension is a block size, or eight");
                (ty, Layout::X8, rows * x8::ROWS)
            }
        };
        PackedShape {
            ty,
            rows,
            cols: blocks * BLOCK,
            layout,
        }
    }
}

/// The bytes of a packed parameter (copied off the device unless it is a flex tensor).
fn packed_bytes(packed: &Param<Tensor<3, Int>>) -> Vec<u8> {
    let data = packed.val().into_data();
    data.as_bytes().to_vec()
}

/// Dequantize all rows of `shape` from `bytes` into `out` (`rows * cols` values).
pub fn dequantize_rows(shape: PackedShape, bytes: &[u8], out: &mut [f32]) {
    match shape.layout {
        Layout::Rows => dequantize(shape.ty, bytes, out),
        Layout::X8 => dequantize(
            shape.ty,
            &x8::deinterleave(shape.ty, bytes, shape.rows, shape.cols),
            out,
        ),
    }
}

thread_local! {
    /// One row's blocks in GGUF's order, reused by [`dequantize_row`].
    static ROW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Dequantize row `i` of `shape` (all of its `bytes`) into `out` (`cols` values).
pub fn dequantize_row(shape: PackedShape, bytes: &[u8], i: usize, out: &mut [f32]) {
    let rb = shape.row_bytes();
    match shape.layout {
        Layout::Rows => dequantize(shape.ty, &bytes[i * rb..(i + 1) * rb], out),
        Layout::X8 => ROW.with_borrow_mut(|row| {
            row.resize(rb, 0);
            x8::row_blocks(shape.ty, bytes, shape.cols, i, row);
            dequantize(shape.ty, row, out)
        }),
    }
}

/// The rows of a packed weight, `[rows, cols]` f32 on `device`.
fn dequantized(packed: &Param<Tensor<3, Int>>, shape: PackedShape, device: &Device) -> Tensor<2> {
    let mut rows = vec![0f32; shape.rows * shape.cols];
    dequantize_rows(shape, &packed_bytes(packed), &mut rows);
    Tensor::from_data(TensorData::new(rows, [shape.rows, shape.cols]), device)
}

/// An empty packed slot or weight on `device`.
fn empty_packed(dims: [usize; 3], device: &Device) -> Param<Tensor<3, Int>> {
    Param::initialized(ParamId::new(), Tensor::empty(dims, (device, DType::U8)))
}

/// Maps the optional packed slot of a module: the slot when set; during [`packed_layout`]
/// an empty one offered to the mapper, kept if the mapper gave it a shape.
fn map_packed<M: ModuleMapper>(
    packed: Option<Param<Tensor<3, Int>>>,
    container: &str,
    device: &Device,
    mapper: &mut M,
) -> Option<Param<Tensor<3, Int>>> {
    let slot = match packed {
        Some(p) => p,
        None if OFFER_SLOT.get() => empty_packed([0, 0, 0], device),
        None => return None,
    };
    mapper.enter_module("packed", container);
    let slot = mapper.map_int(slot);
    mapper.exit_module("packed", container);
    (slot.lazy_shape().num_elements() > 0).then_some(slot)
}

fn visit_field<V: ModuleVisitor, M: Module>(visitor: &mut V, name: &str, container: &str, field: &M) {
    visitor.enter_module(name, container);
    field.visit(visitor);
    visitor.exit_module(name, container);
}

fn map_field<Mp: ModuleMapper, M: Module>(mapper: &mut Mp, name: &str, container: &str, field: M) -> M {
    mapper.enter_module(name, container);
    let field = field.map(mapper);
    mapper.exit_module(name, container);
    field
}

/// `Module` (and its display) for a module of parameter `$field`s plus the optional
/// packed slot, which [`packed_layout`] can fill and [`unpacked`] dequantizes: what
/// `#[derive(Module)]` writes, with the slot's two extra behaviours.
macro_rules! packed_module {
    ($name:ident, $container:literal, { $($field:ident),* }) => {
        impl Module for $name {
            fn collect_devices(&self, devices: Devices) -> Devices {
                $(let devices = self.$field.collect_devices(devices);)*
                self.packed.collect_devices(devices)
            }

            fn fork(self, device: &Device) -> Self {
                $name { $($field: self.$field.fork(device),)* packed: self.packed.fork(device) }
            }

            fn to_device(self, device: &Device) -> Self {
                $name { $($field: self.$field.to_device(device),)* packed: self.packed.to_device(device) }
            }

            fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
                $(visit_field(visitor, stringify!($field), $container, &self.$field);)*
                visit_field(visitor, "packed", $container, &self.packed);
            }

            fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
                let this = if UNPACK.get() { self.into_unpacked() } else { self };
                let device = this.weight.lazy_device();
                // The weight first: a mapper packing this module sees its shape before the slot.
                $(let $field = map_field(mapper, stringify!($field), $container, this.$field);)*
                let packed = map_packed(this.packed, $container, &device, mapper);
                $name { $($field,)* packed }
            }

            fn valid(&self) -> Self {
                $name { $($field: self.$field.valid(),)* packed: self.packed.valid() }
            }

            fn train(self) -> Self {
                $name { $($field: self.$field.train(),)* packed: self.packed.train() }
            }

            fn materialize(self) -> Self {
                $name { $($field: self.$field.materialize(),)* packed: self.packed.materialize() }
            }
        }

        impl ModuleDisplayDefault for $name {
            fn num_params(&self) -> usize {
                Module::num_params(self)
            }

            fn content(&self, content: Content) -> Option<Content> {
                content
                    $(.add(stringify!($field), &self.$field))*
                    .add("packed", &self.packed)
                    .optional()
            }
        }

        impl ModuleDisplay for $name {}

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.format(burn::module::DisplaySettings::new()))
            }
        }
    };
}

/// A linear layer `y = x W + b`, `W` `[in, out]` (Burn's `nn::Linear`), or packed.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`; `[0, out]` when packed.
    pub weight: Param<Tensor<2>>,
    /// `[out]`
    pub bias: Option<Param<Tensor<1>>>,
    /// `W` transposed, as blocks: `[out, in / 32, block bytes]` U8.
    pub packed: Option<Param<Tensor<3, Int>>>,
}

impl From<burn::nn::Linear> for Linear {
    fn from(l: burn::nn::Linear) -> Self {
        Linear {
            weight: l.weight,
            bias: l.bias,
            packed: None,
        }
    }
}

impl Linear {
    /// The packed weight's format and shape, if packed.
    pub fn packed_shape(&self) -> Option<PackedShape> {
        self.packed.as_ref().map(PackedShape::of)
    }

    /// Input features.
    pub fn d_input(&self) -> usize {
        match self.packed_shape() {
            Some(p) => p.cols,
            None => self.weight.lazy_shape().dims::<2>()[0],
        }
    }

    /// Output features.
    pub fn d_output(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[1]
    }

    /// `[..., in]` -> `[..., out]` ([`crate::fused::linear`]).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::fused::linear(self, x)
    }

    /// The weight `[in, out]` as f32 on `device`, dequantized when packed.
    pub fn dense_weight(&self) -> Tensor<2> {
        match (&self.packed, self.packed_shape()) {
            (Some(p), Some(shape)) => dequantized(p, shape, &self.weight.lazy_device()).transpose(),
            _ => self.weight.val(),
        }
    }

    fn into_unpacked(self) -> Self {
        if self.packed.is_none() {
            return self;
        }
        let weight = self.dense_weight();
        // A contiguous `[in, out]` copy, the layout of a loaded weight.
        let weight = Tensor::<2>::from_data(weight.into_data(), &self.weight.lazy_device());
        Linear {
            weight: Param::initialized(self.weight.id, weight),
            bias: self.bias,
            packed: None,
        }
    }
}

packed_module!(Linear, "Struct:Linear", { weight, bias });

/// A token embedding `[V, C]` (Burn's `nn::Embedding`), or packed.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[V, C]`; `[0, C]` when packed.
    pub weight: Param<Tensor<2>>,
    /// `[V, C / 32, block bytes]` U8.
    pub packed: Option<Param<Tensor<3, Int>>>,
}

impl From<burn::nn::Embedding> for Embedding {
    fn from(e: burn::nn::Embedding) -> Self {
        Embedding {
            weight: e.weight,
            packed: None,
        }
    }
}

impl Embedding {
    pub fn packed_shape(&self) -> Option<PackedShape> {
        self.packed.as_ref().map(PackedShape::of)
    }

    /// Number of tokens V.
    pub fn vocab(&self) -> usize {
        match self.packed_shape() {
            Some(p) => p.rows,
            None => self.weight.lazy_shape().dims::<2>()[0],
        }
    }

    /// Width C.
    pub fn width(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[1]
    }

    /// `[B, T]` token ids -> `[B, T, C]`. Packed rows are dequantized as they are read.
    /// Panics on an id outside the vocabulary, as Burn's embedding does.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let (Some(p), Some(shape)) = (&self.packed, self.packed_shape()) else {
            return burn::tensor::module::embedding(self.weight.val(), tokens);
        };
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let ids: Vec<i64> = tokens.into_data().convert::<i64>().try_to_vec().expect("i64 token ids");
        let mut out = vec![0f32; b * t * shape.cols];
        let mut gather = |bytes: &[u8]| {
            for (row, &id) in out.chunks_exact_mut(shape.cols).zip(&ids) {
                let id = usize::try_from(id)
                    .ok()
                    .filter(|&i| i < shape.rows)
                    .unwrap_or_else(|| panic!("token id {id} outside the vocabulary of {}", shape.rows));
                dequantize_row(shape, bytes, id, row);
            }
        };
        match crate::fused::flex::packed_bytes(p) {
            Some(bytes) => gather(bytes.as_slice::<u8>().expect("contiguous packed blocks")),
            None => gather(&packed_bytes(p)),
        }
        Tensor::from_data(TensorData::new(out, [b, t, shape.cols]), &device)
    }

    /// The weight `[V, C]` as f32, dequantized when packed.
    pub fn dense_weight(&self) -> Tensor<2> {
        match (&self.packed, self.packed_shape()) {
            (Some(p), Some(shape)) => dequantized(p, shape, &self.weight.lazy_device()),
            _ => self.weight.val(),
        }
    }

    fn into_unpacked(self) -> Self {
        if self.packed.is_none() {
            return self;
        }
        let weight = self.dense_weight();
        Embedding {
            weight: Param::initialized(self.weight.id, weight),
            packed: None,
        }
    }
}

packed_module!(Embedding, "Struct:Embedding", { weight });

/// What kind of module a quantizable weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    Linear,
    Embedding,
}

/// A weight that can be packed: its module path, kind and `[rows, cols]` as packed
/// (`[out, in]` for a linear layer, `[V, C]` for an embedding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantizable {
    pub module: String,
    pub kind: WeightKind,
    pub rows: usize,
    pub cols: usize,
    /// Whether the module type has a packed form (Kiln's [`Linear`] and [`Embedding`];
    /// Burn's own embedding does not).
    pub packable: bool,
}

/// Module path tracking shared by the visitor and the mapper (Enum containers are not
/// part of a path, as in the safetensors names).
#[derive(Default)]
struct Path {
    names: Vec<String>,
    containers: Vec<String>,
}

impl Path {
    fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.names.push(name.to_string());
        }
        self.containers.push(container.to_string());
    }

    fn exit(&mut self, container: &str) {
        if !container.starts_with("Enum:") {
            self.names.pop();
        }
        self.containers.pop();
    }

    /// `(module path, kind)` when the current parameter is `name` of a linear layer or
    /// an embedding.
    fn weight_of(&self, name: &str) -> Option<(String, WeightKind)> {
        let kind = match self.containers.last()?.as_str() {
            "Struct:Linear" => WeightKind::Linear,
            "Struct:Embedding" => WeightKind::Embedding,
            _ => return None,
        };
        let (last, module) = self.names.split_last()?;
        (last == name).then(|| (module.join("."), kind))
    }
}

/// Every linear and embedding weight of `model` (nothing is materialised).
pub fn quantizable<M: Module>(model: &M) -> Vec<Quantizable> {
    #[derive(Default)]
    struct Find {
        path: Path,
        out: Vec<Quantizable>,
        packable: BTreeSet<String>,
    }
    impl ModuleVisitor for Find {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D != 2 {
                return;
            }
            let Some((module, kind)) = self.path.weight_of("weight") else {
                return;
            };
            let [a, b] = param.lazy_shape().dims::<2>();
            let (rows, cols) = match kind {
                WeightKind::Linear => (b, a),
                WeightKind::Embedding => (a, b),
            };
            self.out.push(Quantizable {
                module,
                kind,
                rows,
                cols,
                packable: false,
            });
        }
    }
    // Kiln's modules show their packed slot to a visitor only when set; ask them with a
    // layout pass that offers it, on a clone (cheap: lazy parameters stay lazy).
    struct Probe<'a> {
        path: Path,
        found: &'a mut BTreeSet<String>,
    }
    impl ModuleMapper for Probe<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
            if let Some((module, _)) = self.path.weight_of("packed") {
                self.found.insert(module);
            }
            param
        }
    }
    let mut find = Find::default();
    model.visit(&mut find);
    let mut probe = Probe {
        path: Path::default(),
        found: &mut find.packable,
    };
    with_flag(&OFFER_SLOT, || drop(model.clone().map(&mut probe)));
    let packable = find.packable;
    find.out
        .into_iter()
        .map(|q| Quantizable {
            packable: packable.contains(&q.module),
            ..q
        })
        .collect()
}

/// Why a `[quantization]` section does not fit a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quantization.tensors: {0}")]
pub struct LayoutError(pub String);

/// `model` (freshly built) with the modules `plan` names laid out packed: each named
/// weight emptied to `[0, ...]` and its packed slot `[rows, cols / 32, block bytes]` U8
/// (uninitialised, for the weights file to fill). Errors name every entry that is not a
/// linear layer or embedding of this model, not packable, or not 32-aligned.
pub fn packed_layout<M: Module>(model: M, plan: &Quantization) -> Result<M, LayoutError> {
    struct Layout<'a> {
        plan: &'a Quantization,
        path: Path,
        /// Module -> the packed shape its slot gets (set by the weight, taken by the slot).
        pending: BTreeMap<String, PackedShape>,
        done: BTreeSet<String>,
        errors: Vec<String>,
    }
    impl ModuleMapper for Layout<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some((module, kind)) = self.path.weight_of("weight") else {
                return param;
            };
            let Some(ty) = self.plan.get(&module) else {
                return param;
            };
            let dims = param.lazy_shape().dims::<D>();
            let (rows, cols, kept) = match (kind, dims.as_slice()) {
                (WeightKind::Linear, &[i, o]) => (o, i, o),
                (WeightKind::Embedding, &[v, c]) => (v, c, c),
                _ => return param,
            };
            if !cols.is_multiple_of(BLOCK) {
                self.errors.push(format!(
                    "{module}: {cols} values per row is not a multiple of {BLOCK}, it cannot be packed"
                ));
                return param;
            }
            self.pending.insert(
                module,
                PackedShape {
                    ty,
                    rows,
                    cols,
                    layout: kiln_kernels::quant::Layout::Rows,
                },
            );
            let mut shape = [0usize; D];
            shape[D - 1] = kept;
            lazy_empty(param.id, param.lazy_device(), shape, DType::F32)
        }
        fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
            let Some((module, _)) = self.path.weight_of("packed") else {
                return param;
            };
            let Some(shape) = self.pending.remove(&module) else {
                return param;
            };
            self.done.insert(module);
            let dims = shape.dims();
            let mut d = [0usize; D];
            if D != 3 {
                return param;
            }
            d.copy_from_slice(&dims[..D]);
            lazy_empty(param.id, param.lazy_device(), d, DType::U8)
        }
    }
    /// A parameter of `shape` made only if nothing loads into it: the loader replaces it
    /// by the file's tensor, and an eager placeholder (flex zeroes its memory) would hold
    /// a second copy of every packed weight while the file's is read (Gemma 3's Q8_0
    /// embedding: 178 MB twice at the peak).
    fn lazy_empty<const D: usize, K: burn::tensor::kind::Basic + 'static>(
        id: burn::module::ParamId,
        device: Device,
        shape: [usize; D],
        dtype: DType,
    ) -> Param<Tensor<D, K>>
    where
        Tensor<D, K>: burn::module::Parameter,
    {
        Param::uninitialized(
            id,
            move |device, _| Tensor::empty(shape, (device, dtype)),
            device,
            false,
            Shape::new(shape),
        )
    }
    let mut layout = Layout {
        plan,
        path: Path::default(),
        pending: BTreeMap::new(),
        done: BTreeSet::new(),
        errors: Vec::new(),
    };
    let model = with_flag(&OFFER_SLOT, || model.map(&mut layout));
    let mut errors = layout.errors;
    for module in plan.tensors.keys() {
        if layout.pending.contains_key(module) {
            errors.push(format!("{module}: this module type has no packed form"));
        } else if !layout.done.contains(module) && !errors.iter().any(|e| e.starts_with(&format!("{module}:"))) {
            errors.push(format!("{module}: not a linear layer or embedding of this model"));
        }
    }
    if errors.is_empty() {
        Ok(model)
    } else {
        Err(LayoutError(errors.join("; ")))
    }
}

/// `model` with every packed weight dequantized into its f32 `weight` (for backends
/// without Kiln's kernels, and for training).
pub fn unpacked<M: Module>(model: M) -> M {
    struct Identity;
    impl ModuleMapper for Identity {}
    with_flag(&UNPACK, || model.map(&mut Identity))
}

/// `model` with every packed weight of whole groups of eight rows in [`Layout::X8`], the
/// layout Kiln's products read fastest (made once at load, for flex; the bytes stay as
/// many), on a CPU whose kernels prefer it ([`x8::preferred`]; else `model` as it is).
/// The other backends dequantize ([`unpacked`]) and never see it.
pub fn interleaved<M: Module>(model: M) -> M {
    if !x8::preferred() {
        return model;
    }
    interleave_all(model)
}

/// [`interleaved`] whatever the CPU.
fn interleave_all<M: Module>(model: M) -> M {
    struct Interleave {
        path: Path,
    }
    impl ModuleMapper for Interleave {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
            if D != 3 || self.path.weight_of("packed").is_none() {
                return param;
            }
            let [rows, blocks, bytes] = {
                let d = param.lazy_shape().dims::<D>();
                [d[0], d[1], d[2]]
            };
            let Some(ty) = QuantType::from_block_bytes(bytes) else {
                return param;
            };
            if !x8::fits(rows) {
                return param;
            }
            let (id, device) = (param.id, param.lazy_device());
            // The loaded tensor's own bytes, rearranged where they are (flex hands them
            // over without a copy when nothing else holds them).
            let mut data = param.into_value().into_data();
            let Ok(w) = data.as_mut_slice::<u8>() else {
                unreachable!("a packed weight is U8")
            };
            x8::interleave_in_place(ty, w, rows, blocks * BLOCK);
            let dims = [rows / x8::ROWS, blocks, bytes * x8::ROWS];
            let data = TensorData::from_bytes(data.into_bytes(), dims[..D].to_vec(), DType::U8);
            Param::initialized(id, Tensor::from_data(data, (&device, DType::U8)))
        }
    }
    model.map(&mut Interleave { path: Path::default() })
}

/// Whether `model` holds any packed weight.
pub fn has_packed<M: Module>(model: &M) -> bool {
    struct Any {
        found: bool,
        path: Path,
    }
    impl ModuleVisitor for Any {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn visit_int<const D: usize>(&mut self, _param: &Param<Tensor<D, Int>>) {
            self.found |= self.path.weight_of("packed").is_some();
        }
    }
    let mut any = Any {
        found: false,
        path: Path::default(),
    };
    model.visit(&mut any);
    any.found
}

/// Check every packed weight of `model` once, before any product reads it
/// ([`kiln_kernels::quant::check_blocks`]: the length, every scale finite); the error
/// names the tensor, row, block and byte offset.
pub fn check_packed<M: Module>(model: &M) -> Result<(), String> {
    struct Check {
        path: Path,
        error: Option<String>,
    }
    impl ModuleVisitor for Check {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _name: &str, container: &str) {
            self.path.exit(container);
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            if self.error.is_some() || D != 3 {
                return;
            }
            let Some((module, _)) = self.path.weight_of("packed") else {
                return;
            };
            let [rows, blocks, bytes] = param.lazy_shape().dims::<3>();
            let Some(ty) = QuantType::from_block_bytes(bytes) else {
                self.error = Some(format!("{module}.packed: {bytes}-byte blocks are no known format"));
                return;
            };
            // (before `interleaved`: the blocks as loaded, in GGUF's order; a flex
            // tensor's own bytes, not a copy of a weight that can be 178 MB)
            let stored = crate::fused::flex::packed_bytes(param);
            let copied;
            let bytes = match stored.as_ref().and_then(|t| t.as_slice::<u8>()) {
                Some(bytes) => bytes,
                None => {
                    let data = param.val().into_data();
                    if data.dtype() != DType::U8 {
                        self.error = Some(format!(
                            "{module}.packed: stored as {:?}, expected U8 bytes",
                            data.dtype()
                        ));
                        return;
                    }
                    copied = data;
                    copied.as_bytes()
                }
            };
            if let Err(e) = kiln_kernels::quant::check_blocks(ty, bytes, rows, blocks * BLOCK) {
                self.error = Some(format!("{module}.packed ({}): {e}", ty.name()));
            }
        }
    }
    let mut check = Check {
        path: Path::default(),
        error: None,
    };
    model.visit(&mut check);
    check.error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LlamaConfig;

    fn tiny() -> crate::LlamaForCausalLM {
        LlamaConfig {
            n_layer: 2,
            n_head: 2,
            n_kv_head: 1,
            n_embd: 32,
            intermediate_size: 64,
            block_size: 8,
            vocab_size: 10,
            tie_word_embeddings: false,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            ..Default::default()
        }
        .init(&Device::flex())
    }

    fn plan(entries: &[(&str, &str)]) -> Quantization {
        Quantization {
            tensors: entries.iter().map(|(m, t)| (m.to_string(), t.to_string())).collect(),
        }
    }

    #[test]
    fn quantizable_lists_every_linear_and_embedding_weight_as_packed_rows() {
        let found = quantizable(&tiny());
        assert_eq!(found.len(), 1 + 2 * 7 + 1, "{found:?}");
        let q = found
            .iter()
            .find(|q| q.module == "model.layers.0.mlp.down_proj")
            .unwrap();
        assert_eq!((q.kind, q.rows, q.cols, q.packable), (WeightKind::Linear, 32, 64, true));
        let e = found.iter().find(|q| q.module == "model.embed_tokens").unwrap();
        assert_eq!(
            (e.kind, e.rows, e.cols, e.packable),
            (WeightKind::Embedding, 10, 32, true)
        );
        assert!(
            found
                .iter()
                .any(|q| q.module == "lm_head" && q.rows == 10 && q.cols == 32)
        );
    }

    #[test]
    fn the_layout_packs_what_the_plan_names_and_names_what_does_not_fit() {
        let model = packed_layout(
            tiny(),
            &plan(&[("model.layers.0.mlp.down_proj", "Q8_0"), ("model.embed_tokens", "q4_1")]),
        )
        .unwrap();
        let down = &model.model.layers[0].mlp.down_proj;
        let shape = PackedShape {
            ty: QuantType::Q8_0,
            rows: 32,
            cols: 64,
            layout: Layout::Rows,
        };
        assert_eq!(down.packed_shape(), Some(shape));
        assert_eq!(down.weight.val().dims(), [0, 32], "a packed layer keeps no f32 weight");
        assert_eq!((down.d_input(), down.d_output()), (64, 32));
        assert_eq!(down.packed.as_ref().unwrap().val().dims(), [32, 2, 34]);
        assert!(model.model.layers[1].mlp.down_proj.packed.is_none());
        assert_eq!(model.model.embed_tokens.vocab(), 10);
        assert_eq!(model.model.embed_tokens.packed_shape().unwrap().ty, QuantType::Q4_1);
        assert!(has_packed(&model));
        assert!(!has_packed(&tiny()));
        let err = packed_layout(
            tiny(),
            &plan(&[("model.layers.5.mlp.up_proj", "Q8_0"), ("model.norm", "Q4_0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.layers.5.mlp.up_proj") && err.contains("model.norm"),
            "{err}"
        );
        assert!(plan(&[("lm_head", "Q5_1")]).validate().is_err());
        assert!(plan(&[("lm_head", "Q6_K")]).validate().is_ok());
    }

    #[test]
    fn unpacking_dequantizes_into_the_weight_and_the_products_agree() {
        let model = packed_layout(tiny(), &plan(&[("model.layers.0.mlp.up_proj", "Q8_0")])).unwrap();
        let mut layer = model.model.layers[0].mlp.up_proj.clone();
        // Real blocks: the rows [out = 64, in = 32] of a known matrix, quantized.
        let rows: Vec<f32> = (0..64 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let mut bytes = vec![0u8; QuantType::Q8_0.bytes_for(rows.len()).unwrap()];
        kiln_kernels::quant::quantize(QuantType::Q8_0, &rows, &mut bytes);
        let device = Device::flex();
        layer.packed = Some(Param::initialized(
            ParamId::new(),
            Tensor::from_data(TensorData::new(bytes.clone(), [64, 1, 34]), (&device, DType::U8)),
        ));
        let mut want = vec![0f32; rows.len()];
        dequantize_rows(layer.packed_shape().unwrap(), &bytes, &mut want);
        let dense: Vec<f32> = layer.dense_weight().transpose().into_data().try_to_vec().unwrap();
        assert_eq!(dense, want, "dense_weight is the dequantized rows, [in, out]");
        let x = Tensor::<2>::from_data(
            TensorData::new((0..3 * 32).map(|i| (i as f32 * 0.1).sin()).collect::<Vec<_>>(), [3, 32]),
            &device,
        );
        let packed = layer.forward(x.clone());
        let unpacked = unpacked(layer.clone());
        assert!(unpacked.packed.is_none() && unpacked.weight.val().dims() == [32, 64]);
        let exact = unpacked.forward(x);
        let (p, e): (Vec<f32>, Vec<f32>) = (
            packed.into_data().try_to_vec().unwrap(),
            exact.into_data().try_to_vec().unwrap(),
        );
        let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = p.iter().zip(&e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // The packed product quantizes the activations to 8 bits: about 1 % of the scale.
        assert!(worst < 0.02 * scale, "worst {worst}, scale {scale}");
    }

    /// Interleaving at load moves bytes, not values: the same dense weight, the same
    /// embedding rows, the same products; a weight of rows not a multiple of 8 stays.
    #[test]
    fn interleaving_keeps_every_value_and_product() {
        let model = packed_layout(
            tiny(),
            &plan(&[("model.layers.0.mlp.up_proj", "Q4_1"), ("model.embed_tokens", "Q8_0")]),
        )
        .unwrap();
        let device = Device::flex();
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 40.0).collect()
        };
        let pack = |ty: QuantType, rows: usize, cols: usize, seed: usize| {
            let mut bytes = vec![0u8; ty.bytes_for(rows * cols).unwrap()];
            kiln_kernels::quant::quantize(ty, &fill(rows * cols, seed), &mut bytes);
            let dims = [rows, cols / BLOCK, ty.block_bytes()];
            let t = Tensor::from_data(
                TensorData::from_bytes_vec(bytes, dims.to_vec(), DType::U8),
                (&device, DType::U8),
            );
            Some(Param::initialized(ParamId::new(), t))
        };
        let mut model = model;
        model.model.layers[0].mlp.up_proj.packed = pack(QuantType::Q4_1, 64, 32, 1);
        // 10 tokens: not whole groups of 8, kept in rows.
        model.model.embed_tokens.packed = pack(QuantType::Q8_0, 10, 32, 2);
        let before = model.clone();
        let after = interleave_all(model);
        let (up0, up1) = (&before.model.layers[0].mlp.up_proj, &after.model.layers[0].mlp.up_proj);
        assert_eq!(up1.packed_shape().unwrap().layout, Layout::X8);
        assert_eq!(up1.packed.as_ref().unwrap().val().dims(), [8, 1, 160]);
        assert_eq!((up1.d_input(), up1.d_output()), (32, 64));
        let dense = |l: &Linear| -> Vec<f32> { l.dense_weight().into_data().try_to_vec().unwrap() };
        assert_eq!(dense(up0), dense(up1));
        let x = Tensor::<2>::from_data(TensorData::new(fill(5 * 32, 3), [5, 32]), &device);
        let y = |l: &Linear| -> Vec<f32> { l.forward(x.clone()).into_data().try_to_vec().unwrap() };
        let (y0, y1) = (y(up0), y(up1));
        let scale = y0.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = y0.iter().zip(&y1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Both quantize the activations the same way; the sums differ only in rounding.
        assert!(worst <= 1e-5 * scale, "worst {worst}, scale {scale}");
        let e1 = &after.model.embed_tokens;
        assert_eq!(e1.packed_shape().unwrap().layout, Layout::Rows);
        // An interleaved embedding gives back the rows it was given.
        let mut emb = before.model.embed_tokens.clone();
        emb.packed = pack(QuantType::Q8_0, 16, 32, 4);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 7, 8, 15, 3], [1, 5]), &device);
        let rows_before: Vec<f32> = emb.forward(ids.clone()).into_data().try_to_vec().unwrap();
        let mut holder = before.clone();
        holder.model.embed_tokens = emb;
        let emb = interleave_all(holder).model.embed_tokens;
        assert_eq!(emb.packed_shape().unwrap().layout, Layout::X8);
        let rows_after: Vec<f32> = emb.forward(ids).into_data().try_to_vec().unwrap();
        assert_eq!(rows_before, rows_after);
    }
}
