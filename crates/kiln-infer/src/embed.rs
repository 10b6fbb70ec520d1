//! Sentence embeddings with an encoder: tokenize, run, pool, L2-normalise.

use burn::prelude::*;
use kiln_data::{DataError, Tokenizer};
use kiln_models::Encoder;

/// Embeddings `[len(texts)][hidden]` of `texts`, computed in batches of `batch` texts.
pub fn embed_texts(
    model: &dyn Encoder,
    tokenizer: &Tokenizer,
    texts: &[&str],
    batch: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>, DataError> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        if let Some(i) = chunk.iter().position(|t| t.trim().is_empty()) {
            return Err(DataError::Tokenizer(format!("text {} is empty", out.len() + i + 1)));
        }
        let (ids, masks) = tokenizer.encode_batch(chunk)?;
        let (b, t) = (ids.len(), ids[0].len());
        if t > model.max_positions() {
            return Err(DataError::Tokenizer(format!(
                "a text is {t} tokens long, more than the model's {} positions",
                model.max_positions()
            )));
        }
        let flat = |rows: Vec<Vec<u32>>| -> Tensor<2, Int> {
            let data: Vec<i64> = rows.into_iter().flatten().map(|x| x as i64).collect();
            Tensor::from_data(TensorData::new(data, [b, t]), device)
        };
        let emb = model.embed(flat(ids), flat(masks));
        let [_, c] = emb.dims();
        let values = emb.into_data().try_into_vec::<f32>().expect("embeddings are f32");
        out.extend(values.chunks(c).map(<[f32]>::to_vec));
    }
    Ok(out)
}
