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

use crate::{ConvertError, read_err};

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

/// Quantize the model directory `input` (f32 weights) into a new directory `output`.
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
    let by_module: BTreeMap<&str, &Quantizable> = weights.iter().map(|w| (w.module.as_str(), w)).collect();
    let path = &dir.weights;
    let file = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    // SAFETY: read-only map of a file this process does not modify.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| read_err(path, e))?;
    let mut report = QuantizeReport {
        kept,
        ..Default::default()
    };
    // name -> (dtype, shape, bytes)
    let mut out: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let module = name.strip_suffix(".weight").filter(|m| plan.tensors.contains_key(*m));
        let Some(module) = module else {
            out.insert(name, (view.dtype(), view.shape().to_vec(), view.data().to_vec()));
            continue;
        };
        let w = by_module[module];
        if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 2 {
            return Err(read_err(
                path,
                format!(
                    "{name}: {:?} {:?}, expected a 2-D F32 weight",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Rows as GGUF packs them: a linear weight is stored [in, out], its rows are the
        // outputs; an embedding's rows are its tokens.
        let (shape, rows) = match w.kind {
            WeightKind::Linear => {
                let [k, n] = [view.shape()[0], view.shape()[1]];
                let mut t = vec![0f32; k * n];
                kiln_kernels::matvec::transpose(&values, k, n, &mut t);
                (vec![0, n], t)
            }
            WeightKind::Embedding => (vec![0, view.shape()[1]], values),
        };
        if w.rows * w.cols != rows.len() {
            return Err(read_err(
                path,
                format!(
                    "{name}: {:?} does not hold the model's {} x {}",
                    view.shape(),
                    w.cols,
                    w.rows
                ),
            ));
        }
        if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
            return Err(read_err(
                path,
                format!("{name}: value {i} is {}, which cannot be quantized", rows[i]),
            ));
        }
        let mut packed = vec![0u8; ty.bytes_for(rows.len()).expect("whole blocks (checked by the plan)")];
        quantize(ty, &rows, &mut packed);
        out.insert(name.clone(), (safetensors::Dtype::F32, shape, Vec::new()));
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
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| read_err(path, format!("{name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let metadata = std::collections::HashMap::from([("kiln.packed".to_string(), "gguf-blocks".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| ConvertError::Write {
        path: output.join(MODEL_WEIGHTS),
        message: e.to_string(),
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
