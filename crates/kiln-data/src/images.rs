//! Labelled image datasets from IDX files, normalised to float tensors, with
//! deterministic per-epoch shuffling.

use std::path::Path;

use burn::prelude::*;

use crate::{DataError, SplitMix64, idx};

/// Images `[N, H, W]` (u8) and labels `[N]` of one split.
#[derive(Debug, Clone)]
pub struct ImageSplit {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

impl ImageSplit {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn load(dir: &Path, images: &str, labels: &str, limit: usize) -> Result<Self, DataError> {
        let images_path = idx::find(dir, images)?;
        let labels_path = idx::find(dir, labels)?;
        let images = idx::read(&images_path)?;
        let labels = idx::read(&labels_path)?;
        if images.dims.len() != 3 {
            return Err(DataError::format(
                &images_path,
                format!("expected [N, H, W], found {:?}", images.dims),
            ));
        }
        if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
            return Err(DataError::format(
                &labels_path,
                format!("{:?} labels for {} images", labels.dims, images.dims[0]),
            ));
        }
        let (h, w) = (images.dims[1], images.dims[2]);
        let n = if limit == 0 {
            images.dims[0]
        } else {
            limit.min(images.dims[0])
        };
        let mut pixels = images.data;
        pixels.truncate(n * h * w);
        let mut labels = labels.data;
        labels.truncate(n);
        Ok(Self {
            pixels,
            labels,
            height: h,
            width: w,
        })
    }

    /// Images `indices` as `[B, 1, H, W]` floats, `(x/255 - 0.5) / 0.5`, and labels `[B]`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> ImageBatch {
        let hw = self.height * self.width;
        let mut pixels = Vec::with_capacity(indices.len() * hw);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend(
                self.pixels[i * hw..(i + 1) * hw]
                    .iter()
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
            labels.push(self.labels[i] as i64);
        }
        let b = indices.len();
        ImageBatch {
            images: Tensor::from_data(TensorData::new(pixels, [b, 1, self.height, self.width]), device),
            labels: Tensor::from_data(TensorData::new(labels, [b]), device),
        }
    }
}

/// A batch of images `[B, 1, H, W]` and labels `[B]`.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    pub images: Tensor<4>,
    pub labels: Tensor<1, Int>,
}

/// Train and test splits of an IDX image dataset.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    pub train: ImageSplit,
    pub test: ImageSplit,
    pub num_classes: usize,
}

impl ImageDataset {
    pub fn load(dir: &Path, max_train: usize, max_test: usize) -> Result<Self, DataError> {
        let train = ImageSplit::load(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", max_train)?;
        let test = ImageSplit::load(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", max_test)?;
        let num_classes = train.labels.iter().chain(&test.labels).copied().max().unwrap_or(0) as usize + 1;
        Ok(Self {
            train,
            test,
            num_classes,
        })
    }
}

/// Training order: an endless stream of epochs, each a permutation of the training set
/// seeded by `(seed, epoch)`. Step `s` takes stream positions `s*B .. (s+1)*B`, so the
/// order depends only on the step (resume needs nothing else). The permutation buffer
/// is reused across steps and rebuilt once per epoch.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    seed: u64,
    epoch: Option<usize>,
    order: Vec<usize>,
}

impl EpochSampler {
    pub fn new(seed: u64, len: usize) -> Self {
        Self {
            seed,
            epoch: None,
            order: (0..len).collect(),
        }
    }

    /// Fill `out` with the sample indices of training step `step`.
    pub fn indices(&mut self, step: usize, batch: usize, out: &mut Vec<usize>) {
        let n = self.order.len();
        out.clear();
        for position in step * batch..(step + 1) * batch {
            let epoch = position / n;
            if self.epoch != Some(epoch) {
                self.order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
                SplitMix64::derive(self.seed, epoch as u64).shuffle(&mut self.order);
                self.epoch = Some(epoch);
            }
            out.push(self.order[position % n]);
        }
    }
}
