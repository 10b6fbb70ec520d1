//! Training losses shared by every task.

use burn::prelude::*;

use crate::fused::log_softmax;

/// Mean cross-entropy of `logits` `[N, K]` against class ids `targets` `[N]`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let log_probs = log_softmax(logits, 1);
    log_probs.gather(1, targets.reshape([n, 1])).mean().neg()
}
