//! ONNX models read through their graph: a checked node list over the protobuf types of
//! Burn's ONNX crate (`onnx_ir::ModelProto`), the constants it holds (initializers, also
//! in external data files, and `Constant` nodes), and the building blocks an
//! architecture's resolver places by the way the graph uses them ([`Graph::linears`],
//! [`Graph::norms`], [`Graph::embeddings`]) rather than by initializer name, which exporters
//! rename (`onnx::MatMul_470`, already transposed to `[in, out]`).
//!
//! Constants are folded through the nodes that only repackage a weight: `Transpose`,
//! `Cast`, `Identity`, `DequantizeLinear`, and the `MatMulInteger` pattern of
//! onnxruntime's dynamic int8 quantization, so an FP16, pre-transposed or int8 weight
//! reaches the resolver as f32 values with a note of what was undone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use onnx_ir::{AttributeProto, Message, ModelProto, TensorProto};

use crate::{ConvertError, read_err};

/// A constant of the graph (an initializer or a `Constant` node's value).
#[derive(Debug, Clone)]
pub struct Const {
    /// The initializer (or `Constant` node output) it came from.
    pub source: String,
    pub shape: Vec<usize>,
    pub values: ConstValues,
    /// TensorProto data type name (`FLOAT16`, `INT8`, ...).
    pub dtype: &'static str,
}

#[derive(Debug, Clone)]
pub enum ConstValues {
    Float(Arc<[f32]>),
    Int(Vec<i64>),
}

/// A weight after folding: f32 values in the layout the graph computes with.
#[derive(Debug, Clone)]
pub struct Folded {
    pub source: String,
    pub shape: Vec<usize>,
    /// Shared with the constant it was folded from when nothing was undone.
    pub values: Arc<[f32]>,
    /// What folding undid, in order: `FLOAT16 -> f32`, `transposed`, `dequantized INT8`.
    pub steps: Vec<String>,
}

/// One node: its name (or `#index op` for an unnamed one), operator, inputs and outputs.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Its attributes, moved out of the protobuf (a `Constant`'s value is in
    /// [`Graph::consts`] instead).
    attributes: Vec<AttributeProto>,
}

impl Node {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes.iter().find(|a| a.name == name)
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }
    /// Input `slot`, unless absent or empty (an optional input left out).
    pub fn input(&self, slot: usize) -> Option<&str> {
        self.inputs.get(slot).map(String::as_str).filter(|s| !s.is_empty())
    }
}

/// A linear layer found in the graph: `y = x @ weight (+ bias)`, weight `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The node that multiplies (`MatMul`, `Gemm`, `MatMulInteger`).
    pub node: usize,
    /// The node that reads `x`: the multiplying one, or the `DynamicQuantizeLinear`
    /// before a `MatMulInteger`.
    pub reader: usize,
    pub x: String,
    pub y: String,
    pub weight: Folded,
    pub bias: Option<Folded>,
}

impl Linear {
    /// Whether this projection multiplies by `table` (an embedding `[V, C]`) transposed
    /// and adds nothing: a head tied to the token embedding.
    pub fn is_tied_to(&self, table: &Folded) -> bool {
        let [v, c] = table.shape[..] else { return false };
        // weight[i, j] (`[C, V]`) against table[j, i], without a transposed copy.
        self.weight.shape == [c, v]
            && self.bias.is_none()
            && (0..c).all(|i| (0..v).all(|j| self.weight.values[i * v + j] == table.values[j * c + i]))
    }
}

/// A layer norm (a `LayerNormalization` node or its decomposed form), or an RMS norm
/// (no `beta`: `x / sqrt(mean(x^2) + eps) * gamma`).
#[derive(Debug, Clone)]
pub struct Norm {
    pub node: usize,
    pub x: String,
    pub y: String,
    pub gamma: Folded,
    pub beta: Option<Folded>,
    pub eps: f64,
}

/// An embedding lookup: `Gather` of rows of a constant table.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub node: usize,
    pub indices: String,
    pub y: String,
    pub table: Folded,
}

/// An f32 epsilon as the decimal it was written as (`1e-5`, not `9.99999974e-6`).
fn eps64(eps: f32) -> f64 {
    eps.to_string().parse().unwrap_or(eps as f64)
}

/// One pre-norm decoder block found by [`Graph::decoder`].
#[derive(Debug)]
pub struct DecoderLayer<'a> {
    pub attn_norm: &'a Norm,
    /// The projections reading the normed stream (q, k and v, or one fused `c_attn`).
    pub attn_in: Vec<&'a Linear>,
    pub attn_out: &'a Linear,
    /// A norm of the attention output before the residual Add (Gemma's sandwich).
    pub attn_post_norm: Option<&'a Norm>,
    pub mlp_norm: &'a Norm,
    /// The projections reading the second norm (`c_fc`, or gate and up).
    pub mlp_in: Vec<&'a Linear>,
    pub mlp_out: &'a Linear,
    pub mlp_post_norm: Option<&'a Norm>,
}

impl DecoderLayer<'_> {
    /// Refuse sandwich norms (an architecture without them reading a Gemma graph).
    pub fn without_post_norms(&self, block: usize) -> Result<(), String> {
        match (self.attn_post_norm, self.mlp_post_norm) {
            (None, None) => Ok(()),
            _ => Err(format!(
                "block {block}: norms between the projections and the residual Adds (a Gemma-style sandwich)"
            )),
        }
    }
}

/// A pre-norm decoder found by [`Graph::decoder`].
#[derive(Debug)]
pub struct Decoder<'a> {
    pub layers: Vec<DecoderLayer<'a>>,
    pub final_norm: &'a Norm,
    /// The projection reading the final norm (the language-model head), if any.
    pub head: Option<&'a Linear>,
}

/// A checked ONNX graph.
pub struct Graph {
    pub path: PathBuf,
    pub nodes: Vec<Node>,
    /// Graph inputs that are not initializers, in order.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub consts: HashMap<String, Const>,
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<(usize, usize)>>,
    /// The building blocks, found once however many resolvers look at the graph.
    blocks: Blocks,
}

/// [`Graph`]'s building blocks, each found on first use.
#[derive(Default)]
struct Blocks {
    linears: std::cell::OnceCell<Vec<Linear>>,
    norms: std::cell::OnceCell<Vec<Norm>>,
    rms_norms: std::cell::OnceCell<Vec<Norm>>,
    embeddings: std::cell::OnceCell<Vec<Embedding>>,
}

/// `(op, fewest inputs, most inputs)` of the operators the resolvers read; a node of one
/// of these with another input count is refused, named.
const ARITY: &[(&str, usize, usize)] = &[
    ("MatMul", 2, 2),
    ("Gemm", 2, 3),
    ("MatMulInteger", 2, 4),
    ("DynamicQuantizeLinear", 1, 1),
    ("DequantizeLinear", 2, 3),
    ("Add", 2, 2),
    ("Sub", 2, 2),
    ("Mul", 2, 2),
    ("Div", 2, 2),
    ("Pow", 2, 2),
    ("Gather", 2, 2),
    ("LayerNormalization", 2, 3),
    ("Transpose", 1, 1),
    ("Reshape", 2, 2),
    ("Cast", 1, 1),
    ("Identity", 1, 1),
    ("Softmax", 1, 1),
    ("Tanh", 1, 1),
    ("Sigmoid", 1, 1),
    ("Reciprocal", 1, 1),
    ("Neg", 1, 1),
    ("Split", 1, 2),
    ("Erf", 1, 1),
    ("Sqrt", 1, 1),
    ("ReduceMean", 1, 2),
    ("Concat", 1, usize::MAX),
    ("Constant", 0, 0),
];

/// TensorProto.DataType names.
fn dtype_name(t: i32) -> &'static str {
    match t {
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        16 => "BFLOAT16",
        _ => "unsupported",
    }
}

/// An initializer's bytes: `raw_data`, the typed fields, or a range of an external file.
fn tensor_bytes(t: &TensorProto, dir: &Path, what: &str) -> Result<Option<Vec<u8>>, String> {
    if !t.external_data.is_empty() {
        let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
        let location = entry("location").ok_or_else(|| format!("{what}: external data without a location"))?;
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "{what}: external data location {location:?} is not a file beside the model"
            ));
        }
        let file = dir.join(rel);
        let number = |k: &str| -> Result<Option<u64>, String> {
            entry(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{what}: external data {k} {v:?} is not a number"))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let size = std::fs::metadata(&file)
            .map_err(|e| format!("{what}: external data file {}: {e}", file.display()))?
            .len();
        let length = number("length")?.unwrap_or(size.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(format!(
                "{what}: external data {} bytes at offset {offset} run past the end of {} ({size} bytes)",
                length,
                file.display()
            ));
        }
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&file).map_err(|e| format!("{what}: {}: {e}", file.display()))?;
        let mut buf = vec![0u8; length as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("{what}: {} at offset {offset}: {e}", file.display()))?;
        return Ok(Some(buf));
    }
    if !t.raw_data.is_empty() {
        return Ok(Some(t.raw_data.to_vec()));
    }
    Ok(None)
}

fn decode(t: &TensorProto, dir: &Path, source: &str) -> Result<Option<Const>, String> {
    let what = format!("initializer {source}");
    let dtype = dtype_name(t.data_type);
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("{what}: negative dimension {d}")))
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{what}: shape {shape:?} overflows"))?;
    let width = match dtype {
        "FLOAT" | "INT32" => 4,
        "FLOAT16" | "BFLOAT16" | "INT16" => 2,
        "DOUBLE" | "INT64" => 8,
        "INT8" | "UINT8" | "BOOL" => 1,
        _ => return Ok(None),
    };
    let raw = tensor_bytes(t, dir, &what)?;
    if let Some(raw) = &raw
        && raw.len() != count * width
    {
        return Err(format!("{what}: {} bytes of {dtype} for shape {shape:?}", raw.len()));
    }
    let typed_len = |n: usize| {
        if n == count {
            Ok(())
        } else {
            Err(format!("{what}: {n} values for shape {shape:?}"))
        }
    };
    // f32 and half-precision bytes as Kiln's weight loader widens them.
    let widened = |dtype: safetensors::Dtype, bytes: &[u8]| {
        ConstValues::Float(
            kiln_core::weights::f32_values(dtype, bytes)
                .expect("a float dtype")
                .into(),
        )
    };
    let values = match (dtype, raw) {
        ("FLOAT", Some(r)) => widened(safetensors::Dtype::F32, &r),
        ("FLOAT", None) => {
            typed_len(t.float_data.len())?;
            ConstValues::Float(t.float_data.clone().into())
        }
        ("DOUBLE", Some(r)) => ConstValues::Float(
            r.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
        ),
        ("DOUBLE", None) => {
            typed_len(t.double_data.len())?;
            ConstValues::Float(t.double_data.iter().map(|&v| v as f32).collect())
        }
        ("FLOAT16", r) | ("BFLOAT16", r) => {
            // Outside raw_data, each value's 16 bits are one int32_data entry.
            let bytes = match r {
                Some(r) => r,
                None => {
                    typed_len(t.int32_data.len())?;
                    t.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect()
                }
            };
            let half = if dtype == "FLOAT16" {
                safetensors::Dtype::F16
            } else {
                safetensors::Dtype::BF16
            };
            widened(half, &bytes)
        }
        ("INT64", Some(r)) => ConstValues::Int(
            r.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ),
        ("INT64", None) => {
            typed_len(t.int64_data.len())?;
            ConstValues::Int(t.int64_data.clone())
        }
        ("INT32", Some(r)) => ConstValues::Int(
            r.chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
        ),
        ("INT16", Some(r)) => ConstValues::Int(
            r.chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as i64)
                .collect(),
        ),
        ("INT8", Some(r)) => ConstValues::Int(r.iter().map(|&b| b as i8 as i64).collect()),
        ("UINT8", Some(r)) | ("BOOL", Some(r)) => ConstValues::Int(r.iter().map(|&b| b as i64).collect()),
        (_, None) => {
            // INT8/UINT8/INT16/INT32/BOOL outside raw_data live in int32_data.
            typed_len(t.int32_data.len())?;
            ConstValues::Int(t.int32_data.iter().map(|&v| v as i64).collect())
        }
        _ => unreachable!("every dtype with a width is decoded above"),
    };
    Ok(Some(Const {
        source: source.to_string(),
        shape,
        values,
        dtype,
    }))
}

impl Graph {
    /// Read and check `path`: every node's input is produced by a node, a graph input or
    /// a constant; nodes of the operators in [`ARITY`] have a valid input count; the graph
    /// has no cycle. Each failure names the node.
    pub fn read(path: &Path) -> Result<Self, ConvertError> {
        let bytes = std::fs::read(path).map_err(|e| read_err(path, e))?;
        let mut model =
            ModelProto::parse_from_bytes(&bytes).map_err(|e| read_err(path, format!("not an ONNX model: {e}")))?;
        drop(bytes);
        let graph = model
            .graph
            .as_mut()
            .ok_or_else(|| read_err(path, "not an ONNX model: no graph"))?;
        if graph.node.is_empty() && graph.initializer.is_empty() {
            return Err(read_err(path, "not an ONNX model: an empty graph"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut consts = HashMap::new();
        for init in graph.initializer.iter_mut() {
            if let Some(c) = decode(init, dir, &init.name).map_err(|m| read_err(path, m))? {
                if consts.insert(init.name.clone(), c).is_some() {
                    return Err(read_err(path, format!("initializer {} appears twice", init.name)));
                }
            }
            // Decoded: the protobuf's copy of the bytes goes (one copy of the weights at a time).
            init.raw_data = Default::default();
            init.float_data = Default::default();
        }
        let initializer_names: HashSet<&str> = graph.initializer.iter().map(|i| i.name.as_str()).collect();
        let inputs: Vec<String> = graph
            .input
            .iter()
            .map(|i| i.name.clone())
            .filter(|n| !initializer_names.contains(n.as_str()))
            .collect();
        let mut nodes = Vec::with_capacity(graph.node.len());
        let mut producer = HashMap::new();
        for (i, n) in graph.node.iter_mut().enumerate() {
            let name = if n.name.is_empty() {
                format!("#{i} {}", n.op_type)
            } else {
                std::mem::take(&mut n.name)
            };
            let mut node = Node {
                name,
                op: std::mem::take(&mut n.op_type),
                inputs: std::mem::take(&mut n.input),
                outputs: std::mem::take(&mut n.output),
                attributes: vec![],
            };
            let arity = node.inputs.iter().rposition(|s| !s.is_empty()).map_or(0, |p| p + 1);
            if let Some((_, lo, hi)) = ARITY.iter().find(|(op, _, _)| *op == node.op)
                && (arity < *lo || arity > *hi)
            {
                return Err(read_err(
                    path,
                    format!(
                        "node {} ({}) has {arity} inputs; {} takes {}",
                        node.name,
                        node.op,
                        node.op,
                        if hi == lo {
                            lo.to_string()
                        } else if *hi == usize::MAX {
                            format!("at least {lo}")
                        } else {
                            format!("{lo} to {hi}")
                        }
                    ),
                ));
            }
            for out in node.outputs.iter().filter(|o| !o.is_empty()) {
                if producer.insert(out.clone(), i).is_some() || initializer_names.contains(out.as_str()) {
                    return Err(read_err(
                        path,
                        format!(
                            "node {} writes {out}, which another node or an initializer also provides",
                            node.name
                        ),
                    ));
                }
            }
            if node.op == "Constant" {
                let value = n.attribute.iter().find(|a| a.name == "value");
                let out = node.outputs.first().cloned().unwrap_or_default();
                let c = match value.and_then(|a| a.t.as_ref()) {
                    Some(t) => decode(t, dir, &out).map_err(|m| read_err(path, m))?,
                    None => n.attribute.iter().find_map(|a| match a.name.as_str() {
                        "value_int" => Some(Const {
                            source: out.clone(),
                            shape: vec![],
                            values: ConstValues::Int(vec![a.i]),
                            dtype: "INT64",
                        }),
                        "value_ints" => Some(Const {
                            source: out.clone(),
                            shape: vec![a.ints.len()],
                            values: ConstValues::Int(a.ints.clone()),
                            dtype: "INT64",
                        }),
                        "value_float" => Some(Const {
                            source: out.clone(),
                            shape: vec![],
                            values: ConstValues::Float(vec![a.f].into()),
                            dtype: "FLOAT",
                        }),
                        "value_floats" => Some(Const {
                            source: out.clone(),
                            shape: vec![a.floats.len()],
                            values: ConstValues::Float(a.floats.clone().into()),
                            dtype: "FLOAT",
                        }),
                        _ => None,
                    }),
                };
                if let Some(c) = c {
                    consts.insert(out, c);
                }
            } else {
                node.attributes = std::mem::take(&mut n.attribute);
            }
            nodes.push(node);
        }
        let known =
            |v: &str| producer.contains_key(v) || initializer_names.contains(v) || inputs.iter().any(|i| i == v);
        let mut consumers: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            for (slot, input) in node.inputs.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
                if !known(input) {
                    return Err(read_err(
                        path,
                        format!(
                            "node {} ({}) reads {input}, which no node, graph input or initializer provides",
                            node.name, node.op
                        ),
                    ));
                }
                consumers.entry(input.clone()).or_default().push((i, slot));
            }
        }
        // Kahn's algorithm: a node left unsorted sits on (or behind) a cycle.
        let mut waiting: Vec<usize> = nodes
            .iter()
            .map(|n| n.inputs.iter().filter(|s| producer.contains_key(s.as_str())).count())
            .collect();
        let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
        let mut sorted = 0;
        while let Some(i) = ready.pop_front() {
            sorted += 1;
            for out in &nodes[i].outputs {
                for &(j, _) in consumers.get(out).into_iter().flatten() {
                    waiting[j] -= 1;
                    if waiting[j] == 0 {
                        ready.push_back(j);
                    }
                }
            }
        }
        if sorted < nodes.len() {
            let stuck = (0..nodes.len()).find(|&i| waiting[i] > 0).expect("an unsorted node");
            return Err(read_err(
                path,
                format!(
                    "the graph has a cycle through node {} ({}): {} of its nodes never get their inputs",
                    nodes[stuck].name,
                    nodes[stuck].op,
                    nodes.len() - sorted
                ),
            ));
        }
        let outputs = graph.output.iter().map(|o| o.name.clone()).collect();
        Ok(Self {
            path: path.to_path_buf(),
            nodes,
            inputs,
            outputs,
            consts,
            producer,
            consumers,
            blocks: Blocks::default(),
        })
    }

    /// The node that writes `value`.
    pub fn producer(&self, value: &str) -> Option<&Node> {
        self.producer.get(value).map(|&i| &self.nodes[i])
    }

    /// `(node, input slot)` of every reader of `value`.
    pub fn consumers(&self, value: &str) -> &[(usize, usize)] {
        self.consumers.get(value).map_or(&[], Vec::as_slice)
    }

    /// The token-ids input: `input_ids`, else the first graph input.
    pub fn ids_input(&self) -> Result<&str, String> {
        self.inputs
            .iter()
            .find(|i| *i == "input_ids")
            .or(self.inputs.first())
            .map(String::as_str)
            .ok_or_else(|| "the graph has no inputs".to_string())
    }

    /// The one embedding of a decoder without a position table (`arch` names it in the
    /// error), indexed by the ids input.
    pub fn token_embedding<'e>(&self, embeds: &'e [Embedding], arch: &str) -> Result<&'e Embedding, String> {
        let ids = self.ids_input()?;
        let [word] = embeds else {
            return Err(format!(
                "{} embedding tables ({arch} has one, the token embedding)",
                embeds.len()
            ));
        };
        if self.as_input(&word.indices) != Some(ids) {
            return Err(format!("the embedding {} is not indexed by {ids}", word.table.source));
        }
        Ok(word)
    }

    /// The output of the `op` node that reads `value` with an other operand `other` accepts.
    pub fn binary_with(&self, value: &str, op: &str, other: impl Fn(&str) -> bool) -> Option<String> {
        self.consumers(value).iter().find_map(|&(i, slot)| {
            let n = &self.nodes[i];
            (n.op == op && n.inputs.len() == 2 && n.input(1 - slot).is_some_and(&other)).then(|| n.outputs[0].clone())
        })
    }

    /// An integer constant's values.
    pub fn ints(&self, value: &str) -> Option<&[i64]> {
        match &self.consts.get(value)?.values {
            ConstValues::Int(v) => Some(v),
            ConstValues::Float(_) => None,
        }
    }

    /// `value` as a float weight, folded through `Cast`, `Identity`, `Transpose` and
    /// `DequantizeLinear` of constants; `None` when it is computed from the inputs.
    pub fn fold(&self, value: &str) -> Option<Folded> {
        if let Some(c) = self.consts.get(value) {
            let ConstValues::Float(values) = &c.values else {
                return None;
            };
            let steps = match c.dtype {
                "FLOAT" => vec![],
                other => vec![format!("{other} -> f32")],
            };
            return Some(Folded {
                source: c.source.clone(),
                shape: c.shape.clone(),
                values: values.clone(),
                steps,
            });
        }
        let node = self.producer(value)?;
        match node.op.as_str() {
            "Identity" | "Cast" => self.fold(node.input(0)?),
            "Transpose" => {
                let mut f = self.fold(node.input(0)?)?;
                let perm = node.attr_ints("perm").unwrap_or_else(|| vec![1, 0]);
                if f.shape.len() != 2 || perm != [1, 0] {
                    return None;
                }
                f.values = crate::transpose(&f.values, f.shape[0], f.shape[1]).into();
                f.shape.reverse();
                f.steps.push("transposed".into());
                Some(f)
            }
            "DequantizeLinear" => self.dequantize(
                node.input(0)?,
                node.input(1)?,
                node.input(2),
                node.attr_int("axis").unwrap_or(1),
            ),
            _ => None,
        }
    }

    /// `(q - zero_point) * scale` of an integer constant `q`, per tensor or along `axis`.
    fn dequantize(&self, q: &str, scale: &str, zero: Option<&str>, axis: i64) -> Option<Folded> {
        let qc = self.consts.get(q)?;
        let ConstValues::Int(qv) = &qc.values else { return None };
        let s = self.fold(scale)?;
        let z: Vec<i64> = match zero {
            Some(z) => self.ints(z)?.to_vec(),
            None => vec![0],
        };
        let rank = qc.shape.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        let channels = if s.values.len() == 1 {
            1
        } else {
            *qc.shape.get(usize::try_from(axis).ok()?)?
        };
        if s.values.len() != channels || (z.len() != 1 && z.len() != channels) {
            return None;
        }
        let inner: usize = qc.shape.iter().skip(axis.max(0) as usize + 1).product();
        let values = qv
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let c = if channels == 1 { 0 } else { (i / inner) % channels };
                (q - z[if z.len() == 1 { 0 } else { c }]) as f32 * s.values[c]
            })
            .collect();
        Some(Folded {
            source: qc.source.clone(),
            shape: qc.shape.clone(),
            values,
            steps: vec![format!(
                "dequantized {} ({})",
                qc.dtype,
                if channels == 1 { "per tensor" } else { "per channel" }
            )],
        })
    }

    /// The sole consumer of `value`, when there is exactly one.
    fn only_consumer(&self, value: &str) -> Option<(usize, usize)> {
        match self.consumers(value) {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The `Add` of a rank-1 constant of `len` values to `value`: `(bias, output)`.
    fn bias_of(&self, value: &str, len: usize) -> Option<(Folded, String)> {
        let (i, slot) = self.only_consumer(value)?;
        let add = &self.nodes[i];
        if add.op != "Add" {
            return None;
        }
        let bias = self.fold(add.input(1 - slot)?)?;
        (bias.shape == [len]).then(|| (bias, add.outputs[0].clone()))
    }

    /// Every linear layer: `MatMul` by a constant matrix, `Gemm`, and onnxruntime's
    /// dynamic int8 `MatMulInteger` pattern, each with the bias `Add` that follows it.
    pub fn linears(&self) -> &[Linear] {
        self.blocks.linears.get_or_init(|| self.find_linears())
    }

    fn find_linears(&self) -> Vec<Linear> {
        let mut out = vec![];
        for (i, node) in self.nodes.iter().enumerate() {
            let found = match node.op.as_str() {
                "MatMul" => (|| {
                    let w = self.fold(node.input(1)?)?;
                    (w.shape.len() == 2).then(|| (node.inputs[0].clone(), node.outputs[0].clone(), w))
                })(),
                "Gemm" => (|| {
                    let alpha = node.attr_float("alpha").unwrap_or(1.0);
                    if node.attr_int("transA").unwrap_or(0) != 0 || alpha != 1.0 {
                        return None;
                    }
                    let mut w = self.fold(node.input(1)?)?;
                    if w.shape.len() != 2 {
                        return None;
                    }
                    if node.attr_int("transB").unwrap_or(0) != 0 {
                        w.values = crate::transpose(&w.values, w.shape[0], w.shape[1]).into();
                        w.shape.reverse();
                        w.steps.push("transposed (Gemm transB)".into());
                    }
                    Some((node.inputs[0].clone(), node.outputs[0].clone(), w))
                })(),
                "MatMulInteger" => self.integer_linear(node),
                _ => None,
            };
            let Some((x, y, weight)) = found else { continue };
            let reader = if node.op == "MatMulInteger" {
                self.producer[&node.inputs[0]]
            } else {
                i
            };
            let cols = weight.shape[1];
            let gemm_bias = (node.op == "Gemm")
                .then(|| node.input(2).and_then(|c| self.fold(c)))
                .flatten()
                .filter(|b| b.shape == [cols] && node.attr_float("beta").unwrap_or(1.0) == 1.0);
            let (bias, y) = match gemm_bias {
                Some(b) => (Some(b), y),
                None => match self.bias_of(&y, cols) {
                    Some((b, y)) => (Some(b), y),
                    None => (None, y),
                },
            };
            out.push(Linear {
                node: i,
                reader,
                x,
                y,
                weight,
                bias,
            });
        }
        out
    }

    /// `DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, wzp) -> Cast -> Mul(_, x_scale *
    /// w_scale)`: `(x, the Mul's output, (Wq - wzp) * w_scale)`.
    fn integer_linear(&self, node: &Node) -> Option<(String, String, Folded)> {
        let dq = self.producer(node.input(0)?)?;
        if dq.op != "DynamicQuantizeLinear" {
            return None;
        }
        let (cast, _) = self.only_consumer(&node.outputs[0])?;
        let cast = &self.nodes[cast];
        if cast.op != "Cast" {
            return None;
        }
        let (mul, slot) = self.only_consumer(&cast.outputs[0])?;
        let mul = &self.nodes[mul];
        let scales = self.producer(mul.input(1 - slot)?)?;
        if mul.op != "Mul" || scales.op != "Mul" {
            return None;
        }
        // One factor is the activation's scale (DynamicQuantizeLinear's second output),
        // the other the weight's constant scale.
        let w_scale = scales.inputs.iter().find(|s| self.fold(s).is_some())?;
        let mut w = self.dequantize(node.input(1)?, w_scale, node.input(3), 1)?;
        if w.shape.len() != 2 {
            return None;
        }
        w.steps
            .push("activations were quantized at run time (MatMulInteger)".into());
        Some((dq.inputs[0].clone(), mul.outputs[0].clone(), w))
    }

    /// Every layer norm: `LayerNormalization` over the last axis, and the decomposed
    /// `(x - mean) / sqrt(var + eps) * gamma + beta` of exporters before opset 17.
    pub fn norms(&self) -> &[Norm] {
        self.blocks.norms.get_or_init(|| self.find_norms())
    }

    fn find_norms(&self) -> Vec<Norm> {
        let mut out = vec![];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.op == "LayerNormalization" {
                let (Some(gamma), Some(beta)) = (
                    node.input(1).and_then(|v| self.fold(v)),
                    node.input(2).and_then(|v| self.fold(v)),
                ) else {
                    continue;
                };
                if node.attr_int("axis").unwrap_or(-1) != -1 {
                    continue;
                }
                out.push(Norm {
                    node: i,
                    x: node.inputs[0].clone(),
                    y: node.outputs[0].clone(),
                    gamma,
                    beta: Some(beta),
                    eps: eps64(node.attr_float("epsilon").unwrap_or(1e-5)),
                });
            } else if node.op == "Div"
                && let Some(found) = self.decomposed_norm(i)
            {
                out.push(found);
            }
        }
        out
    }

    fn decomposed_norm(&self, div: usize) -> Option<Norm> {
        let node = &self.nodes[div];
        let centered = self.producer(node.input(0)?)?;
        let sqrt = self.producer(node.input(1)?)?;
        if centered.op != "Sub" || sqrt.op != "Sqrt" {
            return None;
        }
        let mean = self.producer(centered.input(1)?)?;
        if mean.op != "ReduceMean" || mean.input(0)? != centered.input(0)? {
            return None;
        }
        let add_eps = self.producer(sqrt.input(0)?)?;
        if add_eps.op != "Add" {
            return None;
        }
        let (var_slot, eps) = (0..2).find_map(|s| {
            let e = self.fold(add_eps.input(1 - s)?)?;
            (e.values.len() == 1).then_some((s, e.values[0]))
        })?;
        let var = self.producer(add_eps.input(var_slot)?)?;
        let pow = self.producer(var.input(0)?)?;
        if var.op != "ReduceMean" || pow.op != "Pow" || pow.input(0)? != node.input(0)? {
            return None;
        }
        let (mul, slot) = self.only_consumer(&node.outputs[0])?;
        let mul = &self.nodes[mul];
        if mul.op != "Mul" {
            return None;
        }
        let gamma = self.fold(mul.input(1 - slot)?)?;
        let (beta, y) = self.bias_of(&mul.outputs[0], gamma.values.len())?;
        Some(Norm {
            node: div,
            x: centered.inputs[0].clone(),
            y,
            gamma,
            beta: Some(beta),
            eps: eps64(eps),
        })
    }

    /// Every RMS norm `x / sqrt(mean(x^2) + eps) * gamma`: as exporters decompose it
    /// (`Pow -> ReduceMean -> Add -> Sqrt`, then `Div(x, s)`, `x * Div(1, s)` or
    /// `x * Reciprocal(s)`, casts between, and the `Mul` by gamma), and the fused
    /// `RMSNormalization` (opset 23) / onnxruntime's `SimplifiedLayerNormalization`.
    pub fn rms_norms(&self) -> &[Norm] {
        self.blocks.rms_norms.get_or_init(|| self.find_rms_norms())
    }

    fn find_rms_norms(&self) -> Vec<Norm> {
        let mut out = vec![];
        for (i, node) in self.nodes.iter().enumerate() {
            let found = match node.op.as_str() {
                "RMSNormalization" | "SimplifiedLayerNormalization" => (|| {
                    if node.attr_int("axis").unwrap_or(-1) != -1 {
                        return None;
                    }
                    Some(Norm {
                        node: i,
                        x: node.input(0)?.to_string(),
                        y: node.outputs.first()?.clone(),
                        gamma: self.fold(node.input(1)?)?,
                        beta: None,
                        eps: eps64(node.attr_float("epsilon").unwrap_or(1e-5)),
                    })
                })(),
                "Pow" => self.decomposed_rms(i),
                _ => None,
            };
            out.extend(found);
        }
        out
    }

    fn decomposed_rms(&self, pow: usize) -> Option<Norm> {
        let node = &self.nodes[pow];
        let x = node.input(0)?;
        // A layer norm squares the centered input: not an RMS norm.
        if self.fold(node.input(1)?)?.values[..] != [2.0] || self.producer(x).is_some_and(|p| p.op == "Sub") {
            return None;
        }
        let next = |v: &str, op: &str| -> Option<(&Node, usize)> {
            let (i, slot) = self.only_consumer(v)?;
            (self.nodes[i].op == op).then(|| (&self.nodes[i], slot))
        };
        let (mean, _) = next(&node.outputs[0], "ReduceMean")?;
        let (add, slot) = next(&mean.outputs[0], "Add")?;
        let eps = self.fold(add.input(1 - slot)?)?;
        if eps.values.len() != 1 {
            return None;
        }
        let (sqrt, _) = next(&add.outputs[0], "Sqrt")?;
        let (i, slot) = self.only_consumer(&sqrt.outputs[0])?;
        let inv = &self.nodes[i];
        let normed = match inv.op.as_str() {
            "Div" if slot == 1 && inv.input(0)? == x => inv.outputs[0].clone(),
            "Div" | "Reciprocal" => {
                if inv.op == "Div" && (slot != 1 || self.fold(inv.input(0)?)?.values[..] != [1.0]) {
                    return None;
                }
                let (mul, slot) = next(&inv.outputs[0], "Mul")?;
                if mul.input(1 - slot)? != x {
                    return None;
                }
                mul.outputs[0].clone()
            }
            _ => return None,
        };
        // Casts back to the model's dtype, then the scale.
        let mut v = normed;
        loop {
            let (i, slot) = self.only_consumer(&v)?;
            let n = &self.nodes[i];
            match n.op.as_str() {
                "Cast" | "Identity" => v = n.outputs[0].clone(),
                "Mul" => {
                    let gamma = self.fold(n.input(1 - slot)?)?;
                    return (gamma.shape.len() == 1).then(|| Norm {
                        node: pow,
                        x: x.to_string(),
                        y: n.outputs[0].clone(),
                        gamma,
                        beta: None,
                        eps: eps64(eps.values[0]),
                    });
                }
                _ => return None,
            }
        }
    }

    /// Walk a pre-norm decoder (GPT-2, Llama, Gemma) from the residual stream `h` (the
    /// embedding output): per block, the norm reading the stream, the projections reading
    /// the norm that lead to a `Softmax` (attention), the one projection they all reach
    /// (its output), a norm of that output if there is one (Gemma's sandwich), the
    /// residual `Add`, the second norm, the projections reading it and the one they reach
    /// (the MLP's output), its norm if any, and the second residual `Add`. The first norm
    /// whose readers lead to no `Softmax` is the final one; the projection reading it is
    /// the language-model head.
    pub fn decoder<'a>(&self, h: &str, norms: &'a [Norm], linears: &'a [Linear]) -> Result<Decoder<'a>, String> {
        let name = |i: usize| format!("{} ({})", self.nodes[i].name, self.nodes[i].op);
        let reader_nodes: HashSet<usize> = linears.iter().map(|l| l.reader).collect();
        let softmax: HashSet<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].op == "Softmax")
            .collect();
        let attention_stops: HashSet<usize> = reader_nodes.union(&softmax).copied().collect();
        let norm_of = |v: &str| norms.iter().find(|n| self.uncast(&n.x) == v);
        let linear_at = |node: usize| linears.iter().find(|l| l.reader == node).expect("a linear's reader");
        // The residual `Add` of a block's output (through reshapes) and the stream `h`.
        let residual = |out: &str, h: &str| -> Option<String> {
            self.through_reshapes(out).0.into_iter().find_map(|(i, slot)| {
                let n = &self.nodes[i];
                (n.op == "Add" && n.inputs.len() == 2 && self.uncast(&n.inputs[1 - slot]) == h)
                    .then(|| n.outputs[0].clone())
            })
        };
        // The one projection every reader reaches.
        let joined = |readers: &[&Linear], what: &str| -> Result<&'a Linear, String> {
            let after: BTreeSet<usize> = readers
                .iter()
                .flat_map(|l| self.reach(&l.y, &reader_nodes, 64))
                .collect();
            match after.iter().collect::<Vec<_>>()[..] {
                [one] => Ok(linear_at(*one)),
                _ => Err(format!(
                    "the {what} leads to {} projections, not one: {}",
                    after.len(),
                    after.iter().map(|&i| name(i)).collect::<Vec<_>>().join(", ")
                )),
            }
        };
        let mut layers = vec![];
        let mut h = h.to_string();
        loop {
            let layer = layers.len();
            let attn_norm =
                norm_of(&h).ok_or_else(|| format!("no norm reads the residual stream {h} (after {layer} blocks)"))?;
            let attn_in = self.readers(&attn_norm.y, linears);
            let attention = attn_in.iter().any(|l| {
                self.reach(&l.y, &attention_stops, 64)
                    .iter()
                    .any(|i| softmax.contains(i))
            });
            if !attention {
                let head = match attn_in[..] {
                    [] => None,
                    [one] => Some(one),
                    _ => {
                        return Err(format!(
                            "{} projections read the final norm {}",
                            attn_in.len(),
                            name(attn_norm.node)
                        ));
                    }
                };
                if layer == 0 {
                    return Err(format!(
                        "no attention block after the first norm {}",
                        name(attn_norm.node)
                    ));
                }
                return Ok(Decoder {
                    layers,
                    final_norm: attn_norm,
                    head,
                });
            }
            let attn_out = joined(&attn_in, &format!("block {layer}'s attention"))?;
            let attn_post_norm = norm_of(&attn_out.y);
            let attn_y = attn_post_norm.map_or(&attn_out.y, |n| &n.y);
            let h1 = residual(attn_y, &h).ok_or_else(|| {
                format!(
                    "block {layer}: no residual Add of the attention output {} and the stream",
                    name(attn_out.node)
                )
            })?;
            let mlp_norm =
                norm_of(&h1).ok_or_else(|| format!("block {layer}: no norm after the attention's residual {h1}"))?;
            let mlp_in = self.readers(&mlp_norm.y, linears);
            if mlp_in.is_empty() {
                return Err(format!(
                    "block {layer}: no projection reads the norm {}",
                    name(mlp_norm.node)
                ));
            }
            let mlp_out = joined(&mlp_in, &format!("block {layer}'s MLP"))?;
            let mlp_post_norm = norm_of(&mlp_out.y);
            let mlp_y = mlp_post_norm.map_or(&mlp_out.y, |n| &n.y);
            h = residual(mlp_y, &h1).ok_or_else(|| {
                format!(
                    "block {layer}: no residual Add of the MLP output {} and the stream",
                    name(mlp_out.node)
                )
            })?;
            layers.push(DecoderLayer {
                attn_norm,
                attn_in,
                attn_out,
                attn_post_norm,
                mlp_norm,
                mlp_in,
                mlp_out,
                mlp_post_norm,
            });
        }
    }

    /// Every `Gather` (axis 0) of rows of a constant float matrix.
    pub fn embeddings(&self) -> &[Embedding] {
        self.blocks.embeddings.get_or_init(|| self.find_embeddings())
    }

    fn find_embeddings(&self) -> Vec<Embedding> {
        let mut out = vec![];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.op != "Gather" || node.attr_int("axis").unwrap_or(0) != 0 {
                continue;
            }
            let found = match node.input(0).and_then(|v| self.fold(v)) {
                Some(table) => Some((table, node.outputs[0].clone())),
                // onnxruntime's quantized Gather: rows of an int8 table, dequantized after.
                None => (|| {
                    let (d, slot) = self.only_consumer(&node.outputs[0])?;
                    let d = &self.nodes[d];
                    if d.op != "DequantizeLinear" || slot != 0 {
                        return None;
                    }
                    let table = self.dequantize(node.input(0)?, d.input(1)?, d.input(2), 1)?;
                    Some((table, d.outputs[0].clone()))
                })(),
            };
            if let Some((table, y)) = found
                && table.shape.len() == 2
            {
                out.push(Embedding {
                    node: i,
                    indices: node.inputs[1].clone(),
                    y,
                    table,
                });
            }
        }
        out
    }

    /// The nodes reached from `value` through operators that only reshape, reorder or
    /// scale it by a constant (`Reshape`, `Transpose`, `Cast`, `Identity`, `Unsqueeze`,
    /// `Squeeze`, `Mul`/`Div` by a scalar): `(node, input slot)` of the first other
    /// readers, and the `Reshape` nodes passed on the way.
    pub fn through_reshapes(&self, value: &str) -> (Vec<(usize, usize)>, Vec<usize>) {
        let mut stops = vec![];
        let mut reshapes = vec![];
        let mut queue: VecDeque<String> = VecDeque::from([value.to_string()]);
        let mut seen = HashSet::new();
        while let Some(v) = queue.pop_front() {
            for &(i, slot) in self.consumers(&v) {
                let node = &self.nodes[i];
                let scalar = |s: usize| {
                    node.input(s)
                        .is_some_and(|o| self.fold(o).is_some_and(|f| f.values.len() == 1) || self.shape_derived(o))
                };
                let pass = match node.op.as_str() {
                    "Reshape" | "Transpose" | "Cast" | "Identity" | "Unsqueeze" | "Squeeze" | "Dropout" => slot == 0,
                    "Mul" => scalar(1 - slot),
                    "Div" => slot == 0 && scalar(1),
                    _ => false,
                };
                if pass {
                    if node.op == "Reshape" {
                        reshapes.push(i);
                    }
                    if seen.insert(i) {
                        queue.push_back(node.outputs[0].clone());
                    }
                } else {
                    stops.push((i, slot));
                }
            }
        }
        (stops, reshapes)
    }

    /// Whether `value` is computed from constants and tensor shapes only (an attention
    /// scale `1 / sqrt(head_dim)` of an export without constant folding).
    fn shape_derived(&self, value: &str) -> bool {
        let mut stack = vec![value.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) || self.consts.contains_key(&v) {
                continue;
            }
            match self.producer(&v) {
                Some(node) if node.op == "Shape" => {}
                Some(node) => stack.extend(node.inputs.iter().filter(|s| !s.is_empty()).cloned()),
                None => return false,
            }
        }
        true
    }

    /// Nodes reached from `value` through any operator except those in `stop_at` (which
    /// are collected, not passed) and `Shape` (which reads no values).
    pub fn reach(&self, value: &str, stop_at: &HashSet<usize>, limit: usize) -> BTreeSet<usize> {
        self.walk(value, stop_at, limit).0
    }

    /// The operators [`Graph::reach`] passes on its way from `value` to `stop_at`.
    pub fn ops_on_the_way(&self, value: &str, stop_at: &HashSet<usize>, limit: usize) -> BTreeSet<String> {
        self.walk(value, stop_at, limit)
            .1
            .into_iter()
            .map(|i| self.nodes[i].op.clone())
            .collect()
    }

    /// `(stops found, nodes passed)` of the walk from `value`, breadth first.
    fn walk(&self, value: &str, stop_at: &HashSet<usize>, limit: usize) -> (BTreeSet<usize>, Vec<usize>) {
        let mut found = BTreeSet::new();
        let mut passed = vec![];
        let mut queue: VecDeque<(String, usize)> = VecDeque::from([(value.to_string(), 0)]);
        let mut seen = HashSet::new();
        while let Some((v, depth)) = queue.pop_front() {
            for &(i, _) in self.consumers(&v) {
                if stop_at.contains(&i) {
                    found.insert(i);
                } else if self.nodes[i].op != "Shape" && depth < limit && seen.insert(i) {
                    passed.push(i);
                    for o in &self.nodes[i].outputs {
                        queue.push_back((o.clone(), depth + 1));
                    }
                }
            }
        }
        (found, passed)
    }

    /// Whether `value` is computed from `from` (at most `limit` nodes upstream).
    pub fn depends_on(&self, value: &str, from: &str, limit: usize) -> bool {
        let mut queue: VecDeque<(&str, usize)> = VecDeque::from([(value, 0)]);
        let mut seen = HashSet::new();
        while let Some((v, depth)) = queue.pop_front() {
            if v == from {
                return true;
            }
            if depth >= limit || !seen.insert(v) {
                continue;
            }
            if let Some(node) = self.producer(v) {
                queue.extend(
                    node.inputs
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(|s| (s.as_str(), depth + 1)),
                );
            }
        }
        false
    }

    /// `value` before any `Cast` / `Identity`: the value it is a copy of.
    pub fn uncast<'a>(&'a self, value: &'a str) -> &'a str {
        match self.producer(value) {
            Some(n) if matches!(n.op.as_str(), "Cast" | "Identity") => n.input(0).map_or(value, |v| self.uncast(v)),
            _ => value,
        }
    }

    /// The linear layers among `linears` that read `value` (through reshapes, casts and
    /// scalar scales, [`Graph::through_reshapes`]).
    pub fn readers<'l>(&self, value: &str, linears: &'l [Linear]) -> Vec<&'l Linear> {
        let stops = self.through_reshapes(value).0;
        linears
            .iter()
            .filter(|l| stops.iter().any(|&(i, slot)| i == l.reader && slot == 0))
            .collect()
    }

    /// The attention heads of a projection `value` of `width` columns: the first `Reshape`
    /// after it to `[.., heads, head_dim]` (heads written out, or `-1`).
    pub fn heads(&self, value: &str, width: usize) -> Option<usize> {
        let (_, passed) = self.walk(value, &HashSet::new(), 8);
        passed
            .into_iter()
            .filter(|&i| self.nodes[i].op == "Reshape")
            .find_map(|r| {
                let target = self.reshape_target(r)?;
                let [.., heads, Some(dim)] = target[..] else {
                    return None;
                };
                let dim = usize::try_from(dim)
                    .ok()
                    .filter(|&d| d > 0 && d < width && width % d == 0)?;
                match heads {
                    None | Some(-1) => Some(width / dim),
                    Some(h) if h as usize * dim == width => Some(width / dim),
                    Some(_) => None,
                }
            })
    }

    /// What `value` is computed from: the graph inputs, operators and integer constants
    /// upstream of it.
    pub fn upstream(&self, value: &str) -> Upstream {
        let mut up = Upstream::default();
        let mut stack = vec![value.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v.clone()) {
                continue;
            }
            if self.inputs.contains(&v) {
                up.inputs.insert(v.clone());
            }
            match self.consts.get(&v).map(|c| &c.values) {
                Some(ConstValues::Int(ints)) => up.int_consts.push(ints.to_vec()),
                // Small constants only (frequencies, scales), never a weight matrix.
                Some(ConstValues::Float(f)) if f.len() <= 4096 => up.float_consts.push(f.to_vec()),
                Some(ConstValues::Float(_)) => {}
                None => {}
            }
            if let Some(node) = self.producer(&v) {
                up.ops.insert(node.op.clone());
                stack.extend(node.inputs.iter().filter(|s| !s.is_empty()).cloned());
            }
        }
        up
    }

    /// `value` with `Cast` / `Identity` / `Unsqueeze` / `Squeeze` / `Reshape` / `Flatten`
    /// stripped: the graph input it is a copy of, if any.
    pub fn as_input(&self, value: &str) -> Option<&str> {
        if let Some(input) = self.inputs.iter().find(|i| *i == value) {
            return Some(input);
        }
        let node = self.producer(value)?;
        match node.op.as_str() {
            "Cast" | "Identity" | "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => self.as_input(node.input(0)?),
            _ => None,
        }
    }

    /// The target shape of a `Reshape` node, entry by entry (`None` where it is computed
    /// at run time from the input's shape).
    pub fn reshape_target(&self, reshape: usize) -> Option<Vec<Option<i64>>> {
        let shape = self.nodes[reshape].input(1)?;
        self.int_entries(shape)
    }

    fn int_entries(&self, value: &str) -> Option<Vec<Option<i64>>> {
        if let Some(v) = self.ints(value) {
            return Some(v.iter().map(|&x| Some(x)).collect());
        }
        let node = self.producer(value)?;
        match node.op.as_str() {
            "Concat" => {
                let mut out = vec![];
                for part in node.inputs.iter().filter(|s| !s.is_empty()) {
                    match self.int_entries(part) {
                        Some(p) => out.extend(p),
                        None => out.push(None),
                    }
                }
                Some(out)
            }
            "Unsqueeze" | "Cast" | "Identity" => self.int_entries(node.input(0)?),
            _ => None,
        }
    }
}

/// What a value is computed from ([`Graph::upstream`]).
#[derive(Debug, Default)]
pub struct Upstream {
    pub inputs: BTreeSet<String>,
    pub ops: BTreeSet<String>,
    pub int_consts: Vec<Vec<i64>>,
    pub float_consts: Vec<Vec<f32>>,
}

impl Upstream {
    /// Computed from `0, 1, 2, ...` (a `Range`, or a constant arange of 2+ values).
    pub fn has_arange(&self) -> bool {
        self.ops.contains("Range")
            || self
                .int_consts
                .iter()
                .any(|c| c.len() > 1 && c.iter().enumerate().all(|(i, &v)| v == i as i64))
    }
    /// Computed from a constant of zeros (2+ values) or `ConstantOfShape`.
    pub fn has_zeros(&self) -> bool {
        self.ops.contains("ConstantOfShape") || self.int_consts.iter().any(|c| c.len() > 1 && c.iter().all(|&v| v == 0))
    }
}

/// The tensors an architecture's resolver placed: Hugging Face names in Hugging Face
/// layouts, the config read off the graph, and what was undone on the way.
#[derive(Debug, Default)]
pub struct Resolved {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// `(Hugging Face name, source initializer, steps)`.
    pub placed: Vec<(String, String, Vec<String>)>,
    /// A Hugging Face `config.json` read off the graph.
    pub config: serde_json::Value,
    /// Prefixes of parameters the graph does not compute (its outputs do not use them,
    /// so the exporter left them out): converted at their initial values, and said so.
    pub absent: Vec<String>,
    /// What the resolver could not read off the graph and assumed, for the report.
    pub notes: Vec<String>,
}

impl Resolved {
    /// Place `f` as `name`; `transpose` turns a `[in, out]` graph weight into Hugging
    /// Face's `[out, in]`.
    pub fn place(&mut self, name: String, f: &Folded, transpose: bool) {
        let (shape, values) = if transpose && f.shape.len() == 2 {
            (
                vec![f.shape[1], f.shape[0]],
                crate::transpose(&f.values, f.shape[0], f.shape[1]),
            )
        } else {
            (f.shape.clone(), f.values.to_vec())
        };
        self.placed.push((name.clone(), f.source.clone(), f.steps.clone()));
        self.tensors.insert(name, (shape, values));
    }
}

/// How an architecture places an ONNX graph's weights.
pub type Resolver = fn(&Graph) -> Result<Resolved, String>;
