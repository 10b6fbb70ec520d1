//! Classification: texts with a fine-tuned encoder, images with an image classifier.

use burn::prelude::*;
use kiln_data::labeled::{encode_for_classifier, pad_batch};
use kiln_data::{DataError, EncodedSplit, Tokenizer};
use kiln_models::loss::cross_entropy;
use kiln_models::{ImageClassifier, SequenceClassifier};

/// Class probabilities `[N][K]` of every text of `split`, with the cross-entropy against
/// its labels summed over them, in batches of `batch` texts of similar length (less
/// padding).
pub fn predict(
    model: &dyn SequenceClassifier,
    split: &EncodedSplit,
    batch: usize,
    device: &Device,
) -> (Vec<Vec<f32>>, f64) {
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.sort_by_key(|&i| split.ids[i].len());
    let k = model.num_classes();
    let mut probs = vec![Vec::new(); split.len()];
    let mut loss = 0.0;
    for chunk in order.chunks(batch.max(1)) {
        let b = split.batch(chunk, device);
        let logits = model.forward(b.ids, b.mask);
        loss += cross_entropy(logits.clone(), b.labels).into_scalar::<f32>() as f64 * chunk.len() as f64;
        let p = softmax_rows(logits);
        for (row, &i) in chunk.iter().enumerate() {
            probs[i] = p[row * k..(row + 1) * k].to_vec();
        }
    }
    (probs, loss)
}

/// Classified texts: probabilities `[N][K]` in input order, and how many texts were
/// longer than `max_len` tokens and cut.
pub struct TextPredictions {
    pub probabilities: Vec<Vec<f32>>,
    pub truncated: usize,
}

/// Classify `texts` (no labels needed), encoded as the classifier was trained: special
/// tokens, cut to `max_len`; in batches of `batch` texts of similar length.
pub fn classify_texts(
    model: &dyn SequenceClassifier,
    tokenizer: &Tokenizer,
    texts: &[&str],
    max_len: usize,
    batch: usize,
    device: &Device,
) -> Result<TextPredictions, DataError> {
    let tokenizer = tokenizer.unpadded();
    let mut encoded = Vec::with_capacity(texts.len());
    let mut truncated = 0;
    for (i, text) in texts.iter().enumerate() {
        if text.trim().is_empty() {
            return Err(DataError::Tokenizer(format!("text {} is empty", i + 1)));
        }
        let (ids, cut) = encode_for_classifier(&tokenizer, text, max_len.min(model.max_positions()))?;
        truncated += cut as usize;
        encoded.push(ids);
    }
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| encoded[i].len());
    let k = model.num_classes();
    let mut probabilities = vec![Vec::new(); texts.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
        let (ids, mask) = pad_batch(&rows, device);
        let p = softmax_rows(model.forward(ids, mask));
        for (row, &i) in chunk.iter().enumerate() {
            probabilities[i] = p[row * k..(row + 1) * k].to_vec();
        }
    }
    Ok(TextPredictions {
        probabilities,
        truncated,
    })
}

/// Class probabilities of one image, `pixels` `[height * width * channels]` bytes in
/// the classifier's input shape.
pub fn classify_image(model: &dyn ImageClassifier, pixels: &[u8], device: &Device) -> Vec<f32> {
    let [c, h, w] = model.input_shape();
    let split = kiln_data::ImageSplit {
        pixels: pixels.to_vec(),
        labels: vec![0],
        height: h,
        width: w,
    };
    debug_assert_eq!(pixels.len(), c * h * w);
    softmax_rows(model.forward(split.batch(&[0], device).images))
}

/// An input image could not be read or does not fit the model; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {message}")]
    Bad { path: std::path::PathBuf, message: String },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// A PNG (or any format the `image` crate reads) as grayscale bytes resized to the
/// model's `[channels, height, width]` input.
pub fn image_from_png(path: &std::path::Path, shape: [usize; 3]) -> Result<Vec<u8>, ImageError> {
    let [c, h, w] = shape;
    let bad = |message: String| ImageError::Bad {
        path: path.to_path_buf(),
        message,
    };
    if c != 1 {
        return Err(bad(format!(
            "the model expects {c} channels; only grayscale input is supported"
        )));
    }
    let img = image::open(path).map_err(|e| bad(format!("cannot read image: {e}")))?;
    let resized = image::imageops::resize(
        &img.to_luma8(),
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    );
    Ok(resized.into_raw())
}

/// Image `index` of an IDX file of `[N, height, width]` bytes.
pub fn image_from_idx(path: &std::path::Path, index: usize, shape: [usize; 3]) -> Result<Vec<u8>, ImageError> {
    let [_, h, w] = shape;
    let bad = |message: String| ImageError::Bad {
        path: path.to_path_buf(),
        message,
    };
    let array = kiln_data::idx::read(path)?;
    if array.dims.len() != 3 || array.dims[1] != h || array.dims[2] != w {
        return Err(bad(format!(
            "holds images {:?}, the model expects [N, {h}, {w}]",
            array.dims
        )));
    }
    if index >= array.dims[0] {
        return Err(bad(format!(
            "--index {index} is out of range: the file holds {} images",
            array.dims[0]
        )));
    }
    let n = h * w;
    Ok(array.data[index * n..(index + 1) * n].to_vec())
}

/// Row-wise softmax of `[N, K]` logits, on the host.
fn softmax_rows(logits: Tensor<2>) -> Vec<f32> {
    burn::tensor::activation::softmax(logits, 1)
        .into_data()
        .try_into_vec::<f32>()
        .expect("probabilities are f32")
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    crate::sampler::argmax(values) as usize
}
