//! `convert --quantize`: a Kiln model directory with its weights packed in GGUF blocks.
//!
//! Which weights: every linear layer's, and a language model's token embedding
//! (`embed_tokens`, which a tied head also multiplies by), as `llama-quantize --pure`
//! does; norms, biases and other embeddings (positions, BERT's) stay f32, and so does a
//! weight whose rows are not a whole number of 32-value blocks. `--keep REGEX` keeps
//! more modules f32 (matched against the module path, e.g. `lm_head`). The blocks are
//! byte for byte what `gguf.quants.quantize` makes of the same rows
//! ([`kiln_kernels::quant::quantize`]); the layout on disk is in [`kiln_models::quant`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use kiln_core::ModelFile;
use kiln_core::layout::{
    CONFIG, GENERATION_CONFIG, HF_CONFIG, LABELS, MODEL_WEIGHTS, ModelDir, TOKENIZER, TOKENIZER_CONFIG, WhichWeights,
};
use kiln_kernels::quant::{BLOCK, QuantType, quantize};
use kiln_models::quant::{Quantizable, Quantization, WeightKind, quantizable};
use kiln_models::{EncoderArchitecture, FamilyVisitor, ImageArchitecture, LanguageArchitecture};
use regex::Regex;

use crate::gguf::GgufBlocks;
use crate::{ConvertError, read_err};
use safetensors::tensor::TensorView;

/// What `--quantize` did to each weight.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    /// Module, format, `[rows, cols]`.
    pub packed: Vec<(String, QuantType, [usize; 2])>,
    /// Module and why it stayed f32.
    pub kept: Vec<(String, String)>,
    /// Bytes of the weights file before and after.
    pub bytes: [usize; 2],
}

/// The linear and embedding weights of the model `dir` describes (built lazily on flex:
/// nothing is initialised).
fn weights_of(file: &ModelFile) -> Vec<Quantizable> {
    struct Find<'a>(&'a ModelFile);
    impl FamilyVisitor for Find<'_> {
        type Output = Vec<Quantizable>;
        fn causal_lm<A: LanguageArchitecture>(self, config: &A) -> Self::Output {
            quantizable(&config.init(&Device::flex()))
        }
        fn image_classifier<A: ImageArchitecture>(self, config: &A) -> Self::Output {
            quantizable(&config.init(&Device::flex()))
        }
        fn encoder<A: EncoderArchitecture>(self, config: &A) -> Self::Output {
            match &self.0.head {
                Some(head) => quantizable(&config.init_classifier(head, &Device::flex())),
                None => quantizable(&config.init(&Device::flex())),
            }
        }
    }
    file.model.visit_family(Find(file))
}

/// The plan: which module gets packed, and why each other one does not.
pub fn plan(weights: &[Quantizable], ty: QuantType, keep: &[Regex]) -> (Quantization, Vec<(String, String)>) {
    let mut plan = Quantization::default();
    let mut kept = Vec::new();
    for w in weights {
        let reason = if let Some(re) = keep.iter().find(|re| re.is_match(&w.module)) {
            Some(format!("--keep {re}"))
        } else if w.kind == WeightKind::Embedding && !w.module.ends_with("embed_tokens") {
            Some("an embedding other than a language model's token embedding".to_string())
        } else if !w.packable {
            Some("its module type has no packed form".to_string())
        } else if !w.cols.is_multiple_of(BLOCK) {
            Some(format!("{} values per row is not a multiple of {BLOCK}", w.cols))
        } else {
            None
        };
        match reason {
            Some(r) => kept.push((w.module.clone(), r)),
            None => {
                plan.tensors.insert(w.module.clone(), ty.name().to_string());
            }
        }
    }
    (plan, kept)
}

/// Quantize the model directory `input` (f32 weights, or f16 / bf16 ones) into a new
/// directory `output`; the tensors left unpacked keep their dtype.
pub fn quantize_dir(
    input: &Path,
    output: &Path,
    ty: QuantType,
    keep: &[Regex],
) -> Result<QuantizeReport, ConvertError> {
    let dir = ModelDir::open(input, WhichWeights::Best).map_err(|e| ConvertError::Config(e.to_string()))?;
    if dir.file.quantization.is_some() {
        return Err(ConvertError::Config(format!(
            "{}: already quantized ([quantization]); quantize the f32 model directory",
            dir.path(CONFIG).display()
        )));
    }
    let weights = weights_of(&dir.file);
    let (plan, kept) = plan(&weights, ty, keep);
    if plan.tensors.is_empty() {
        return Err(ConvertError::Config(format!(
            "{}: no weight of this {} model can be packed",
            input.display(),
            dir.file.model.arch()
        )));
    }
    let path = &dir.weights;
    let file = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    // SAFETY: read-only map of a file this process does not modify.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(path, e))?;
    let mut report = QuantizeReport {
        kept,
        ..Default::default()
    };
    let bytes = write_packed(&map, path, &weights, &plan, &mut report, |name, w, view| {
        // A half-precision directory (`convert --dtype f16|bf16`) is widened exactly first.
        let values = kiln_core::weights::f32_values(view.dtype(), view.data())
            .filter(|_| view.shape().len() == 2)
            .ok_or_else(|| {
                format!(
                    "{name}: {:?} {:?}, expected a 2-D F32, F16 or BF16 weight",
                    view.dtype(),
                    view.shape()
                )
            })?;
        // Rows as GGUF packs them: a linear weight is stored [in, out], its rows are the
        // outputs; an embedding's rows are its tokens.
        let rows = match w.kind {
            WeightKind::Linear => {
                let [k, n] = [view.shape()[0], view.shape()[1]];
                let mut t = vec![0f32; k * n];
                kiln_kernels::matvec::transpose(&values, k, n, &mut t);
                t
            }
            WeightKind::Embedding => values,
        };
        if w.rows * w.cols != rows.len() {
            return Err(format!(
                "{name}: {:?} does not hold the model's {} x {}",
                view.shape(),
                w.cols,
                w.rows
            ));
        }
        if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name}: value {i} is {}, which cannot be quantized", rows[i]));
        }
        let mut packed = vec![0u8; ty.bytes_for(rows.len()).expect("whole blocks (checked by the plan)")];
        quantize(ty, &rows, &mut packed);
        Ok((ty, packed))
    })?;
    report.bytes = [map.len(), bytes.len()];
    let config = ModelFile {
        quantization: Some(plan),
        ..dir.file.clone()
    }
    .to_toml();
    let mut files: Vec<(&str, Vec<u8>)> = vec![(MODEL_WEIGHTS, bytes), (CONFIG, config.into_bytes())];
    for name in [TOKENIZER, HF_CONFIG, GENERATION_CONFIG, TOKENIZER_CONFIG, LABELS] {
        let src: PathBuf = dir.path(name);
        if src.is_file() {
            files.push((name, std::fs::read(&src).map_err(|e| read_err(&src, e))?));
        }
    }
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    crate::write_dir_atomically(output, &refs)?;
    Ok(report)
}

/// The safetensors `weights` (f32, read from `path`) with every module of `plan` packed:
/// `blocks(name, weight, view)` gives the blocks of the module's `.weight` tensor, row `j`
/// being output `j` (linear) or token `j` (embedding), or an error message. The layout
/// is [`kiln_models::quant`]'s: `<module>.packed` U8 `[rows, cols / 32, block bytes]`
/// and an empty `<module>.weight` marker.
fn write_packed(
    weights: &[u8],
    path: &Path,
    model: &[Quantizable],
    plan: &Quantization,
    report: &mut QuantizeReport,
    mut blocks: impl FnMut(&str, &Quantizable, &TensorView<'_>) -> Result<(QuantType, Vec<u8>), String>,
) -> Result<Vec<u8>, ConvertError> {
    let by_module: BTreeMap<&str, &Quantizable> = model.iter().map(|w| (w.module.as_str(), w)).collect();
    let st = safetensors::SafeTensors::deserialize(weights).map_err(|e| read_err(path, e))?;
    // name -> (dtype, shape, bytes)
    let mut out: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let module = name.strip_suffix(".weight").filter(|m| plan.tensors.contains_key(*m));
        let Some(module) = module else {
            out.insert(name, (view.dtype(), view.shape().to_vec(), view.data().to_vec()));
            continue;
        };
        let w = by_module[module];
        let (ty, packed) = blocks(&name, w, &view).map_err(|m| read_err(path, m))?;
        if ty.bytes_for(w.rows * w.cols) != Some(packed.len()) {
            return Err(read_err(
                path,
                format!(
                    "{name}: {} bytes of {} blocks for {} x {} values",
                    packed.len(),
                    ty.name(),
                    w.rows,
                    w.cols
                ),
            ));
        }
        // The marker: no values, the width of what the module outputs.
        let marker = match w.kind {
            WeightKind::Linear => vec![0, w.rows],
            WeightKind::Embedding => vec![0, w.cols],
        };
        out.insert(name.clone(), (safetensors::Dtype::F32, marker, Vec::new()));
        out.insert(
            format!("{module}.packed"),
            (
                safetensors::Dtype::U8,
                vec![w.rows, w.cols / BLOCK, ty.block_bytes()],
                packed,
            ),
        );
        report.packed.push((module.to_string(), ty, [w.rows, w.cols]));
    }
    let views: Vec<(String, TensorView<'_>)> = out
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| read_err(path, format!("{name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let metadata = std::collections::HashMap::from([("kiln.packed".to_string(), "gguf-blocks".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| ConvertError::Write {
        path: path.with_file_name(MODEL_WEIGHTS),
        message: e.to_string(),
    })
}

/// A GGUF file's own blocks in the converted model: `weights` are the f32 safetensors of
/// [`crate::convert`] on a source read with `keep_quantized` ([`crate::gguf::read_with`])
/// and `mapped` its report's (source name, Kiln name) pairs. Each linear weight or token
/// embedding whose GGUF tensor is Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K is replaced by
/// the file's blocks, byte for byte (Q4_K and Q6_K: the same values in Kiln's 32-value
/// blocks; rows reordered where the architecture undoes llama.cpp's Q/K permutation);
/// the others stay f32, each with its reason in the report. Returns the new weights and
/// their `[quantization]`.
pub fn keep_gguf_blocks(
    weights: &[u8],
    path: &Path,
    model: &kiln_models::ModelConfig,
    packed: &BTreeMap<String, Result<GgufBlocks, String>>,
    mapped: &[(String, String, bool)],
) -> Result<(Vec<u8>, Quantization, QuantizeReport), ConvertError> {
    let file = ModelFile {
        model: model.clone(),
        head: None,
        quantization: None,
    };
    let model_weights = weights_of(&file);
    let by_module: BTreeMap<&str, &Quantizable> = model_weights.iter().map(|w| (w.module.as_str(), w)).collect();
    let mut plan = Quantization::default();
    let mut report = QuantizeReport::default();
    let mut blocks_of: BTreeMap<String, &GgufBlocks> = BTreeMap::new();
    for (source, kiln, _) in mapped {
        let Some(kept) = packed.get(source) else { continue };
        let Some(module) = kiln.strip_suffix(".weight") else {
            report
                .kept
                .push((kiln.clone(), "not a weight (dequantized)".to_string()));
            continue;
        };
        let reason = match (kept, by_module.get(module)) {
            (Err(why), _) => Some(why.clone()),
            (Ok(_), None) => Some("not a linear layer or embedding (dequantized)".to_string()),
            (Ok(b), Some(w)) if !w.packable => {
                Some(format!("{} module without a packed form (dequantized)", b.ty.name()))
            }
            (Ok(b), Some(w)) if [b.rows, b.cols] != [w.rows, w.cols] => Some(format!(
                "{} x {} blocks for a module of {} x {}",
                b.rows, b.cols, w.rows, w.cols
            )),
            (Ok(_), Some(_)) => None,
        };
        match (reason, kept) {
            (None, Ok(b)) => {
                plan.tensors.insert(module.to_string(), b.ty.name().to_string());
                blocks_of.insert(module.to_string(), b);
            }
            (Some(why), _) => report.kept.push((module.to_string(), why)),
            (None, Err(_)) => unreachable!("an error is a reason"),
        }
    }
    let bytes = write_packed(weights, path, &model_weights, &plan, &mut report, |name, _, _| {
        let module = name.strip_suffix(".weight").expect("planned modules are weights");
        let b = blocks_of[module];
        Ok((b.ty, b.bytes.clone()))
    })?;
    report.bytes = [weights.len(), bytes.len()];
    Ok((bytes, plan, report))
}
