//! Convert checkpoints trained elsewhere into Kiln model directories.
//!
//! Sources are read through Burn's store crate (`burn::store`): `SafetensorsStore` for
//! `.safetensors` files and Hugging Face directories (sharded ones included), and
//! `PytorchStore` for PyTorch `.pt`/`.pth`/`.bin` files, which reads the pickle without
//! executing it. Names are mapped by the architecture's rule table ([`arch`]), checked
//! against the Kiln model's own names and shapes, and written as one safetensors file.

pub mod arch;
pub mod gguf;
pub mod hf_config;
pub mod onnx;
pub mod quantize;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::store::{ModuleSnapshot, ModuleStore, PytorchStore, SafetensorsStore};
use burn::tensor::{DType, Device, TensorData};
use burn_pack::Tensor as PackTensor;
use kiln_core::config::ModelFile;
use kiln_core::layout::{CONFIG, GENERATION_CONFIG, HF_CONFIG, MODEL_WEIGHTS, TOKENIZER, TOKENIZER_CONFIG};
use kiln_models::{ArchVisitor, Architecture, ClassifierHead, EncoderArchitecture, FamilyVisitor, ModelConfig};
use regex::Regex;

pub use arch::{Conversion, Rules};

/// A conversion that cannot be done; every variant names the file or the tensors.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(
        "the checkpoint does not fit the {arch} model ({summary}); pass --allow-partial to convert anyway:\n{details}"
    )]
    Refused {
        arch: String,
        summary: String,
        details: String,
    },
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
}

pub(crate) fn read_err(path: &Path, message: impl std::fmt::Display) -> ConvertError {
    ConvertError::Read {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// What a checkpoint holds: its tensors, and the config and tokenizer found beside them.
#[derive(Default)]
pub struct Source {
    pub tensors: BTreeMap<String, PackTensor>,
    /// A Hugging Face `config.json`, when the input had one.
    pub hf_config: Option<(PathBuf, serde_json::Value)>,
    pub tokenizer: Option<PathBuf>,
    /// The files the tensors came from.
    pub files: Vec<PathBuf>,
    /// Files for the model directory made from the source itself (a GGUF file's
    /// `config.json`, `tokenizer.json`, ...), written in place of copies.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// A GGUF file read with `keep_quantized` ([`gguf::read_with`]): each quantized
    /// tensor (by Hugging Face name) as its blocks, or why they cannot be kept.
    pub packed: BTreeMap<String, Result<gguf::GgufBlocks, String>>,
    /// Where a tensor came from, when its name is not the source's own (an ONNX
    /// initializer placed by its role in the graph).
    pub origins: BTreeMap<String, String>,
    /// What reading the source did, for the report (casts, dequantization).
    pub notes: Vec<String>,
    /// Prefixes of Kiln parameters the source cannot hold (an ONNX graph whose outputs do
    /// not use them): they keep their initial values and the report says so.
    pub absent: Vec<String>,
}

/// A JSON file, errors naming it.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| read_err(path, e))
}

fn read_store(
    store: &mut impl ModuleStore,
    path: &Path,
    into: &mut BTreeMap<String, PackTensor>,
) -> Result<(), ConvertError> {
    let tensors = store.get_all_tensors().map_err(|e| read_err(path, e))?;
    for (name, tensor) in tensors {
        if into.insert(name.clone(), tensor.clone()).is_some() {
            return Err(read_err(path, format!("tensor {name} appears twice")));
        }
    }
    Ok(())
}

fn read_file(path: &Path, into: &mut BTreeMap<String, PackTensor>) -> Result<(), ConvertError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => {
            // Validate the header against the file first (a lying or truncated header is
            // an error here, before any tensor is touched).
            let bytes = std::fs::read(path).map_err(|e| read_err(path, e))?;
            safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| read_err(path, format!("not a valid safetensors file: {e}")))?;
            read_store(&mut SafetensorsStore::from_bytes(Some(bytes)), path, into)
        }
        "pt" | "pth" | "bin" => {
            if !path.is_file() {
                return Err(read_err(path, "no such file"));
            }
            refuse_foreign_calls(path)?;
            read_store(&mut PytorchStore::from_file(path), path, into)
        }
        _ => Err(read_err(
            path,
            "unknown checkpoint type: expected .safetensors, .pt, .pth, .bin, .onnx, .gguf or a Hugging Face directory",
        )),
    }
}

/// The float constants of an ONNX graph by name (for an architecture without a graph
/// resolver, whose export kept the parameter names), folded through Cast / Transpose /
/// DequantizeLinear like the resolvers see them.
fn read_onnx_by_name(graph: &onnx::Graph, into: &mut BTreeMap<String, PackTensor>) -> Result<(), ConvertError> {
    let mut inits: Vec<&String> = graph.consts.keys().collect();
    inits.sort();
    for name in inits {
        // Graph constants (`Constant` node outputs) are not weights.
        if graph.producer(name).is_some() {
            continue;
        }
        if let Some(f) = graph.fold(name) {
            into.insert(name.clone(), f32_tensor(name, &f.shape, f.values.to_vec()));
        }
    }
    Ok(())
}

/// An f32 tensor of `values`, which it takes over (no copy).
fn f32_tensor(name: &str, shape: &[usize], values: Vec<f32>) -> PackTensor {
    PackTensor::new(
        name.to_string(),
        DType::F32,
        shape.to_vec(),
        None,
        burn_pack::Bytes::from_elems(values),
    )
}

/// A file named `name` in `input` (a directory), or beside the file `input` or one
/// directory up (an exporter's `onnx/model.onnx` inside the model directory).
fn beside(input: &Path, name: &str) -> Option<PathBuf> {
    let dirs: Vec<&Path> = if input.is_dir() {
        vec![input]
    } else {
        input
            .parent()
            .into_iter()
            .chain(input.parent().and_then(Path::parent))
            .collect()
    };
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Source {
    /// An ONNX model: its graph checked, then its weights placed by the graph resolver of
    /// `arch`, or of the one architecture whose resolver fits (none or two fitting is an
    /// error listing why); an architecture without one reads the initializers by name.
    /// The config is a `config.json` beside the file, else the one the resolver read off
    /// the graph.
    fn read_onnx(path: &Path, arch: Option<&str>) -> Result<Self, ConvertError> {
        let graph = onnx::Graph::read(path)?;
        let candidates: Vec<&arch::Conversion> = match arch {
            Some(a) => vec![arch::for_arch(a)?],
            None => arch::ALL.iter().copied().filter(|c| c.onnx.is_some()).collect(),
        };
        // Every resolver is tried: the architecture is the one whose structure the graph
        // has, and a graph two of them could place is refused rather than guessed.
        let mut tried = vec![];
        let mut fits = vec![];
        for c in &candidates {
            match c.onnx {
                Some(resolve) => match resolve(&graph) {
                    Ok(r) => fits.push((c.arch, r)),
                    Err(why) => tried.push(format!("{}: {why}", c.arch)),
                },
                None => tried.push(format!("{}: no graph resolver", c.arch)),
            }
        }
        if fits.len() > 1 {
            return Err(read_err(
                path,
                format!(
                    "the graph fits more than one architecture ({}); pass --arch",
                    fits.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let resolved = fits.pop();
        let config_json = beside(path, "config.json");
        let mut source = Self {
            tokenizer: beside(path, "tokenizer.json"),
            files: vec![path.to_path_buf()],
            ..Self::default()
        };
        if let Some(json) = config_json {
            source.hf_config = Some((json.clone(), read_json(&json)?));
        }
        match resolved {
            Some((arch, r)) => {
                let mut steps: BTreeMap<String, usize> = BTreeMap::new();
                for (name, from, how) in &r.placed {
                    for step in how {
                        *steps.entry(step.clone()).or_default() += 1;
                    }
                    let how = if how.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", how.join(", "))
                    };
                    source
                        .origins
                        .insert(name.clone(), format!("{from} (by its role in the graph{how})"));
                }
                source.notes.push(format!(
                    "{}: {} tensors placed by their role in a {arch} graph ({} nodes)",
                    path.display(),
                    r.placed.len(),
                    graph.nodes.len()
                ));
                source.notes.extend(r.notes.iter().map(|n| format!("  {n}")));
                for (step, n) in steps {
                    source.notes.push(format!("  {n} tensors {step}"));
                }
                // The graph's constants are no longer needed: free them before the
                // placed tensors move into the source (one copy of the weights at a time).
                drop(graph);
                for (name, (shape, values)) in r.tensors {
                    source.tensors.insert(name.clone(), f32_tensor(&name, &shape, values));
                }
                source.absent = r.absent;
                if source.hf_config.is_none() && !r.config.is_null() {
                    // Written into the model directory as its config.json (there is no file to copy).
                    let json = serde_json::to_vec_pretty(&r.config).expect("a JSON value serializes");
                    source.extra_files.push((HF_CONFIG.to_string(), json));
                    source.hf_config = Some((
                        PathBuf::from(format!("{} (read off the graph)", path.display())),
                        r.config,
                    ));
                }
            }
            None if candidates.iter().all(|c| c.onnx.is_none()) => read_onnx_by_name(&graph, &mut source.tensors)?,
            None => {
                return Err(read_err(
                    path,
                    format!(
                        "the graph's weights could not be placed ({}); an architecture without a graph resolver reads initializers by name with --arch",
                        tried.join("; ")
                    ),
                ));
            }
        }
        Ok(source)
    }
}

/// Python types a PyTorch checkpoint legitimately holds beside plain data.
const ALLOWED_PICKLE_TYPES: &[&str] = &["torch.", "collections.", "numpy.", "builtins.", "__builtin__."];

/// Refuse a pickle that calls anything but PyTorch's tensor rebuilding (a `__reduce__`
/// payload such as `os.system`). Burn's reader never executes a pickle: it keeps an
/// unknown call as an opaque value, which is found here and named.
fn refuse_foreign_calls(path: &Path) -> Result<(), ConvertError> {
    use pytorch_reader::{PickleValue, PytorchReader};
    fn walk(value: &PickleValue, found: &mut BTreeSet<String>) {
        match value {
            PickleValue::Unsupported(name) if !ALLOWED_PICKLE_TYPES.iter().any(|p| name.starts_with(p)) => {
                found.insert(name.clone());
            }
            PickleValue::List(items) => items.iter().for_each(|v| walk(v, found)),
            PickleValue::Dict(map) => map.values().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let value = PytorchReader::read_pickle_data(path, None)
        .map_err(|e| read_err(path, format!("not a readable PyTorch checkpoint: {e}")))?;
    let mut found = BTreeSet::new();
    walk(&value, &mut found);
    if found.is_empty() {
        Ok(())
    } else {
        let names: Vec<String> = found.into_iter().collect();
        Err(read_err(
            path,
            format!(
                "refused: the pickle calls {} (not run; only tensors are read)",
                names.join(", ")
            ),
        ))
    }
}

impl Source {
    /// Read a checkpoint file, or a Hugging Face directory (`config.json` + `model.safetensors`,
    /// a sharded `model.safetensors.index.json`, or `pytorch_model.bin`).
    pub fn read(input: &Path) -> Result<Self, ConvertError> {
        Self::read_with(input, false)
    }

    /// [`Source::read`]; with `keep_quantized` (a `.gguf` input only), also the file's
    /// quantized blocks ([`gguf::read_with`]).
    pub fn read_with(input: &Path, keep_quantized: bool) -> Result<Self, ConvertError> {
        Self::read_for(input, keep_quantized, None)
    }

    /// [`Source::read_with`] for the architecture `arch` when the caller knows it (an
    /// ONNX graph is then resolved as that architecture's).
    pub fn read_for(input: &Path, keep_quantized: bool, arch: Option<&str>) -> Result<Self, ConvertError> {
        let mut tensors = BTreeMap::new();
        let mut files = Vec::new();
        if !input.exists() {
            return Err(read_err(input, "no such file or directory"));
        }
        if !input.is_dir() && input.extension().is_some_and(|e| e == "gguf") {
            return gguf::read_with(input, keep_quantized);
        }
        if !input.is_dir() && !keep_quantized && input.extension().is_some_and(|e| e == "onnx") {
            return Self::read_onnx(input, arch);
        }
        if keep_quantized {
            return Err(read_err(
                input,
                "not a .gguf file: only a GGUF file's quantized blocks can be kept (a Kiln model directory is quantized with --quantize)",
            ));
        }
        if !input.is_dir() {
            read_file(input, &mut tensors)?;
            files.push(input.to_path_buf());
            return Ok(Self {
                tensors,
                hf_config: None,
                tokenizer: None,
                files,
                ..Self::default()
            });
        }
        let index = input.join("model.safetensors.index.json");
        if index.is_file() {
            let json = read_json(&index)?;
            let shards: BTreeSet<&str> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| read_err(&index, "no weight_map"))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            for shard in shards {
                let path = input.join(shard);
                read_file(&path, &mut tensors)?;
                files.push(path);
            }
        } else {
            let file = ["model.safetensors", "pytorch_model.bin"]
                .iter()
                .map(|f| input.join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    read_err(
                        input,
                        "no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                    )
                })?;
            read_file(&file, &mut tensors)?;
            files.push(file);
        }
        let config = input.join("config.json");
        let hf_config = if config.is_file() {
            Some((config.clone(), read_json(&config)?))
        } else {
            None
        };
        let tokenizer = Some(input.join("tokenizer.json")).filter(|p| p.is_file());
        Ok(Self {
            tensors,
            hf_config,
            tokenizer,
            files,
            ..Self::default()
        })
    }
}

/// Sentence-transformers' pooling found beside the source (`modules.json` in the input
/// directory, or beside / one up from an ONNX file) set on a BERT `model`; the line the
/// report prints, when there was one.
pub fn apply_sentence_pooling(input: &Path, model: &mut ModelConfig) -> Result<Option<String>, ConvertError> {
    let Some(modules) = beside(input, "modules.json") else {
        return Ok(None);
    };
    let dir = modules.parent().expect("a file in a directory");
    let Some((pooling, normalize)) = arch::sentence_pooling(dir)? else {
        return Ok(None);
    };
    let (ModelConfig::Bert(c) | ModelConfig::Roberta(c)) = model else {
        return Err(ConvertError::Config(format!(
            "{}: sentence-transformers pooling for a {} model (only bert and roberta compute sentence embeddings)",
            modules.display(),
            model.arch()
        )));
    };
    c.sentence_pooling = pooling;
    c.normalize = normalize;
    Ok(Some(format!(
        "sentence embeddings: {pooling:?} pooling{} (from {})",
        if normalize {
            ", L2-normalised"
        } else {
            ", not normalised"
        },
        modules.display()
    )))
}

/// What happened to every tensor.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `(source name, Kiln name, transposed)`
    pub mapped: Vec<(String, String, bool)>,
    pub ignored: Vec<String>,
    /// Kiln parameters the checkpoint does not provide (initialised values kept).
    pub missing: Vec<String>,
    /// Source tensors no rule maps onto a Kiln parameter.
    pub unexpected: Vec<String>,
    pub mismatched: Vec<String>,
    /// Kiln parameters the source cannot hold ([`Source::absent`]), at initial values.
    pub absent: Vec<String>,
    /// Wrapper prefixes stripped from the source's names ([`arch::WRAPPER_PREFIXES`]).
    pub wrappers: Vec<String>,
    /// Casts done, by kind (`F16 -> F32`, `F32 -> BF16 (stored)`), and how many tensors each.
    pub casts: BTreeMap<String, usize>,
}

impl Report {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} mapped, {} ignored, {} missing, {} unexpected, {} shape mismatches",
            self.mapped.len(),
            self.ignored.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len()
        ) + &if self.absent.is_empty() {
            String::new()
        } else {
            format!(
                ", {} not in the source (its outputs do not use them; initial values kept)",
                self.absent.len()
            )
        }
    }

    /// Every problem, one per line.
    pub fn details(&self) -> String {
        let mut out = String::new();
        for m in &self.missing {
            out += &format!("  missing: {m}\n");
        }
        for u in &self.unexpected {
            out += &format!("  unexpected: {u}\n");
        }
        for m in &self.mismatched {
            out += &format!("  shape mismatch: {m}\n");
        }
        out
    }
}

/// Initial parameters of the configured model (names, shapes, values), built through
/// the architecture registry: with `head`, the encoder's classifier.
fn initial_tensors(
    model: &ModelConfig,
    head: Option<&ClassifierHead>,
    device: &Device,
) -> Result<Vec<PackTensor>, ConvertError> {
    struct Collect<'a>(&'a Device);
    impl ArchVisitor for Collect<'_> {
        type Output = Vec<PackTensor>;
        fn visit<A: Architecture>(self, config: &A) -> Vec<PackTensor> {
            config.init(self.0).collect(None, None, false)
        }
    }
    struct Classifier<'a>(&'a Device, &'a ClassifierHead);
    impl FamilyVisitor for Classifier<'_> {
        type Output = Option<Vec<PackTensor>>;
        fn causal_lm<A: kiln_models::LanguageArchitecture>(self, _: &A) -> Self::Output {
            None
        }
        fn image_classifier<A: kiln_models::ImageArchitecture>(self, _: &A) -> Self::Output {
            None
        }
        fn encoder<A: EncoderArchitecture>(self, config: &A) -> Self::Output {
            Some(config.init_classifier(self.1, self.0).collect(None, None, false))
        }
    }
    match head {
        None => Ok(model.visit(Collect(device))),
        Some(head) => model.visit_family(Classifier(device, head)).ok_or_else(|| {
            ConvertError::Config(format!(
                "a [head] on a {} model: only encoders have a sequence-classification head",
                model.arch()
            ))
        }),
    }
}

/// A tensor's values as f32 (converted from f16/bf16/f64), in its stored layout.
fn f32_values(tensor: &PackTensor) -> Result<Vec<f32>, ConvertError> {
    let bytes = tensor.to_bytes().map_err(|e| read_err(Path::new(&tensor.name), e))?;
    TensorData::from_bytes(bytes, tensor.shape.as_slice().to_vec(), tensor.dtype)
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| read_err(Path::new(&tensor.name), format!("{e:?}")))
}

/// `[rows, cols]` row-major -> `[cols, rows]`.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn compile(patterns: &[&str]) -> Vec<Regex> {
    patterns
        .iter()
        .map(|p| Regex::new(p).expect("rule tables hold valid regexes"))
        .collect()
}

fn compile_renames(rules: &'static [(&'static str, &'static str)]) -> Vec<(Regex, &'static str)> {
    rules
        .iter()
        .map(|(from, to)| (Regex::new(from).expect("rule tables hold valid regexes"), *to))
        .collect()
}

/// `name` after every rename rule, in order.
fn rename(name: &str, renames: &[(Regex, &str)]) -> String {
    renames
        .iter()
        .fold(name.to_string(), |n, (from, to)| from.replace_all(&n, *to).into_owned())
}

/// Map `source` onto `model`'s parameters; returns Kiln safetensors bytes and the report.
/// Refuses (listing every tensor) on missing, unexpected or mis-shaped tensors unless
/// `allow_partial`, in which case missing parameters keep their initial values.
pub fn convert(source: &Source, model: &ModelConfig, allow_partial: bool) -> Result<(Vec<u8>, Report), ConvertError> {
    convert_as(source, model, None, allow_partial, StoreDtype::F32)
}

/// The float type a converted model directory stores its weights in (`convert --dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDtype {
    /// What Kiln computes in (the default).
    #[default]
    F32,
    /// Half the size on disk; loaded as f32 (exactly: every f16 value is an f32 value).
    F16,
    BF16,
}

impl StoreDtype {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

/// [`convert`], with a classification `head` on the encoder (the task model's tensors:
/// the encoder's under [`arch::CLASSIFIER_ENCODER`], the head's beside), storing the
/// weights as `dtype`; the report counts every cast ([`Report::casts`]): a
/// half-precision source read into f32, an f32 one stored in half.
pub fn convert_as(
    source: &Source,
    model: &ModelConfig,
    head: Option<&ClassifierHead>,
    allow_partial: bool,
    dtype: StoreDtype,
) -> Result<(Vec<u8>, Report), ConvertError> {
    let tensors = source
        .tensors
        .iter()
        .map(|(name, t)| (name.clone(), std::borrow::Cow::Borrowed(t)));
    map_tensors(tensors, source, model, head, allow_partial, dtype)
}

/// [`convert_as`] taking the source's tensors out of it as it maps them, so that the
/// source's copy and the converted one do not both hold every weight at once (what
/// `convert` does; the source keeps its config, tokenizer and notes).
pub fn convert_from(
    source: &mut Source,
    model: &ModelConfig,
    head: Option<&ClassifierHead>,
    allow_partial: bool,
    dtype: StoreDtype,
) -> Result<(Vec<u8>, Report), ConvertError> {
    let tensors = std::mem::take(&mut source.tensors)
        .into_iter()
        .map(|(name, t)| (name, std::borrow::Cow::Owned(t)));
    map_tensors(tensors, source, model, head, allow_partial, dtype)
}

/// The mapping of [`convert_as`] over `tensors` (each dropped once mapped, when owned);
/// `source` gives the origins and absent parameters the report names.
fn map_tensors<'a>(
    tensors: impl Iterator<Item = (String, std::borrow::Cow<'a, PackTensor>)>,
    source: &Source,
    model: &ModelConfig,
    head: Option<&ClassifierHead>,
    allow_partial: bool,
    dtype: StoreDtype,
) -> Result<(Vec<u8>, Report), ConvertError> {
    let conversion = arch::for_arch(model.arch())?;
    let rules = &conversion.rules;
    let head_rules = head
        .map(|_| {
            conversion
                .head
                .ok_or_else(|| ConvertError::Config(format!("{} has no sequence-classification head", model.arch())))
        })
        .transpose()?;
    let head_renames = compile_renames(head_rules.map_or(&[][..], |h| h.tensors));
    let head_transposed = compile(head_rules.map_or(&[][..], |h| h.transpose));
    let prefix = if head_rules.is_some() {
        arch::CLASSIFIER_ENCODER
    } else {
        ""
    };
    let renames = compile_renames(rules.renames);
    let ignore = compile(rules.ignore);
    let transposed = compile(rules.transpose);
    let tied = compile(rules.tied);
    let device = Device::flex();
    // The model's parameters, in its order: names and shapes only (the initial values
    // are made again below if a partial conversion needs some).
    let params: Vec<(String, Vec<usize>)> = initial_tensors(model, head, &device)?
        .iter()
        .map(|t| (t.name.clone(), t.shape.as_slice().to_vec()))
        .collect();
    let expected: BTreeMap<String, Vec<usize>> = params.iter().cloned().collect();

    let mut report = Report::default();
    let mut out: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut wrappers = BTreeSet::new();
    for (full_name, tensor) in tensors {
        let (full_name, tensor) = (&full_name, tensor.as_ref());
        let (name, removed) = arch::strip_wrappers(full_name);
        wrappers.extend(removed);
        let name = &name.to_string();
        let head_rule = head_renames.iter().find(|(r, _)| r.is_match(name));
        let is_head = head_rule.is_some();
        if !is_head && ignore.iter().any(|r| r.is_match(name)) {
            report.ignored.push(full_name.clone());
            continue;
        }
        // A classifier's encoder goes under `bert.`; the head's tensors by its own rules.
        let kiln = match head_rule {
            Some((r, to)) => r.replace(name, *to).into_owned(),
            None => format!("{prefix}{}", rename(name, &renames)),
        };
        if !expected.contains_key(&kiln) && tied.iter().any(|r| r.is_match(&kiln)) {
            // The configured model ties this parameter: the checkpoint's copy is a duplicate.
            report.ignored.push(full_name.clone());
            continue;
        }
        let Some(want) = expected.get(&kiln) else {
            report
                .unexpected
                .push(format!("{full_name} {:?}", tensor.shape.as_slice()));
            continue;
        };
        let shape = tensor.shape.as_slice().to_vec();
        let transpose_it = if is_head {
            head_transposed.iter().any(|r| r.is_match(&kiln))
        } else {
            transposed.iter().any(|r| r.is_match(&kiln[prefix.len()..]))
        };
        let shape_in_kiln = if transpose_it && shape.len() == 2 {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        if &shape_in_kiln != want || !matches!(tensor.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            report.mismatched.push(format!(
                "{name} -> {kiln}: source {shape:?} {:?}{}, Kiln expects {want:?}",
                tensor.dtype,
                if transpose_it { " (transposed)" } else { "" }
            ));
            continue;
        }
        if tensor.dtype != DType::F32 {
            *report.casts.entry(format!("{:?} -> F32", tensor.dtype)).or_default() += 1;
        }
        if tensor.dtype != dtype.dtype() && dtype != StoreDtype::F32 {
            *report
                .casts
                .entry(format!("F32 -> {:?} (stored)", dtype.dtype()))
                .or_default() += 1;
        }
        let values = f32_values(tensor)?;
        let values = if transpose_it {
            transpose(&values, shape[0], shape[1])
        } else {
            values
        };
        let shown = source
            .origins
            .get(full_name)
            .map_or_else(|| full_name.clone(), |o| format!("{full_name} <- {o}"));
        report.mapped.push((shown, kiln.clone(), transpose_it));
        out.insert(kiln, (shape_in_kiln, values));
    }
    for (name, shape) in &params {
        if !out.contains_key(name) {
            let line = format!("{name} {shape:?}");
            if source.absent.iter().any(|p| name.starts_with(p.as_str())) {
                report.absent.push(line);
            } else {
                report.missing.push(line);
            }
        }
    }
    report.wrappers = wrappers.into_iter().map(str::to_string).collect();
    if !report.is_complete() && !allow_partial {
        return Err(ConvertError::Refused {
            arch: model.arch().to_string(),
            summary: report.summary(),
            details: report.details(),
        });
    }
    // Parameters the checkpoint lacks keep their initial values (--allow-partial).
    if params.iter().any(|(name, _)| !out.contains_key(name)) {
        for t in initial_tensors(model, head, &device)? {
            if !out.contains_key(&t.name) {
                let values = f32_values(&t)?;
                out.insert(t.name.clone(), (t.shape.as_slice().to_vec(), values));
            }
        }
    }
    let bytes = serialize_as(&out, dtype).map_err(|message| ConvertError::Write {
        path: "model.safetensors".into(),
        message,
    })?;
    Ok((bytes, report))
}

/// `tensors` as safetensors of `dtype` (rounded to nearest from f32 for half precision).
fn serialize_as(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, dtype: StoreDtype) -> Result<Vec<u8>, String> {
    use std::borrow::Cow;
    let half = |bits: fn(f32) -> [u8; 2], values: &[f32]| -> Cow<'static, [u8]> {
        Cow::Owned(values.iter().flat_map(|&v| bits(v)).collect())
    };
    let raw: Vec<(&String, &Vec<usize>, Cow<[u8]>)> = tensors
        .iter()
        .map(|(name, (shape, values))| {
            let bytes = match dtype {
                // f32 -> little-endian bytes without copying (x86-64/aarch64 are little-endian).
                StoreDtype::F32 => {
                    Cow::Borrowed(unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4) })
                }
                StoreDtype::F16 => half(|v| half::f16::from_f32(v).to_le_bytes(), values),
                StoreDtype::BF16 => half(|v| half::bf16::from_f32(v).to_le_bytes(), values),
            };
            (name, shape, bytes)
        })
        .collect();
    let st = match dtype {
        StoreDtype::F32 => safetensors::Dtype::F32,
        StoreDtype::F16 => safetensors::Dtype::F16,
        StoreDtype::BF16 => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st, shape.to_vec(), bytes)
                .map(|v| ((*name).clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Write the files of a model directory atomically (see [`kiln_core::io::write_dir_atomically`]).
pub fn write_dir_atomically(out: &Path, files: &[(&str, &[u8])]) -> Result<(), ConvertError> {
    kiln_core::io::write_dir_atomically(out, files).map_err(|e| ConvertError::Write {
        path: out.to_path_buf(),
        message: e.to_string(),
    })
}

/// Write a Kiln model directory: `model.safetensors`, `config.toml` (the `[model]`
/// section), and the source's `config.json` and `tokenizer.json` when given (with the
/// `generation_config.json` and `tokenizer_config.json` found beside them).
pub fn write_model_dir(
    out: &Path,
    model: &ModelConfig,
    weights: &[u8],
    hf_config: Option<&Path>,
    tokenizer: Option<&Path>,
) -> Result<(), ConvertError> {
    let file = ModelFile {
        model: model.clone(),
        head: None,
        quantization: None,
    };
    write_model_dir_with(out, &file, weights, hf_config, tokenizer, &[])
}

/// [`write_model_dir`] of a whole `config.toml` (a classifier's `[head]`, the
/// `[quantization]` of packed `weights`), plus `extra` files (name, bytes), which replace
/// copies of the same name.
pub fn write_model_dir_with(
    out: &Path,
    file: &ModelFile,
    weights: &[u8],
    hf_config: Option<&Path>,
    tokenizer: Option<&Path>,
    extra: &[(String, Vec<u8>)],
) -> Result<(), ConvertError> {
    let toml = file.to_toml();
    let mut files: Vec<(&str, Vec<u8>)> = vec![(CONFIG, toml.into_bytes())];
    // A generation_config.json beside the config.json carries the end-of-sequence tokens.
    let beside = |name: &str| hf_config.map(|p| p.with_file_name(name)).filter(|p| p.is_file());
    let (generation, tokenizer_config) = (beside(GENERATION_CONFIG), beside(TOKENIZER_CONFIG));
    for (name, src) in [
        (HF_CONFIG, hf_config),
        (TOKENIZER, tokenizer),
        (GENERATION_CONFIG, generation.as_deref()),
        (TOKENIZER_CONFIG, tokenizer_config.as_deref()),
    ] {
        if let Some(src) = src
            && !extra.iter().any(|(n, _)| n == name)
        {
            files.push((name, std::fs::read(src).map_err(|e| read_err(src, e))?));
        }
    }
    // The weights and the extra files are written from where they are (no copies).
    let refs: Vec<(&str, &[u8])> = std::iter::once((MODEL_WEIGHTS, weights))
        .chain(files.iter().map(|(n, b)| (*n, b.as_slice())))
        .chain(extra.iter().map(|(n, b)| (n.as_str(), b.as_slice())))
        .collect();
    write_dir_atomically(out, &refs)
}

/// Kiln safetensors `weights` of `model` (with a classification `head`: the task
/// model's) -> Hugging Face names and layouts (the reverse of [`convert_as`]), as
/// safetensors bytes.
pub fn export_hf(weights: &[u8], model: &ModelConfig, head: Option<&ClassifierHead>) -> Result<Vec<u8>, ConvertError> {
    let conversion = arch::for_arch(model.arch())?;
    let rules = &conversion.rules;
    let head_rules = conversion.head.filter(|_| head.is_some());
    let head_export = compile_renames(head_rules.map_or(&[][..], |h| h.export));
    let head_transposed = compile(head_rules.map_or(&[][..], |h| h.transpose));
    let (prefix, hf_prefix) = match head_rules {
        Some(h) => (arch::CLASSIFIER_ENCODER, h.hf_encoder),
        None => ("", ""),
    };
    let renames = compile_renames(rules.export);
    let transposed = compile(rules.transpose);
    let st = safetensors::SafeTensors::deserialize(weights).map_err(|e| {
        read_err(
            Path::new("model.safetensors"),
            format!("not a valid safetensors file: {e}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let values = kiln_core::weights::f32_values(view.dtype(), data).ok_or_else(|| {
            read_err(
                Path::new(&name),
                format!("{:?}: Kiln weights are F32, F16 or BF16", view.dtype()),
            )
        })?;
        let (hf, transpose_it) = match head_export.iter().find(|(r, _)| r.is_match(&name)) {
            Some((r, to)) => (
                r.replace(&name, *to).into_owned(),
                head_transposed.iter().any(|r| r.is_match(&name)),
            ),
            None => {
                let bare = name.strip_prefix(prefix).unwrap_or(&name);
                (
                    format!("{hf_prefix}{}", rename(bare, &renames)),
                    transposed.iter().any(|r| r.is_match(bare)),
                )
            }
        };
        let (shape, values) = if transpose_it && shape.len() == 2 {
            (vec![shape[1], shape[0]], transpose(&values, shape[0], shape[1]))
        } else {
            (shape, values)
        };
        out.insert(hf, (shape, values));
    }
    serialize_as(&out, StoreDtype::F32).map_err(|message| ConvertError::Write {
        path: "model.safetensors".into(),
        message,
    })
}
