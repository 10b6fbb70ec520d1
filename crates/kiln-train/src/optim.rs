//! AdamW with decoupled weight decay on matrices only (nanoGPT's grouping), and
//! global-norm gradient clipping across every parameter.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, AdamWState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer};
use burn::prelude::*;
use kiln_models::fused::AdamWStep;

use crate::config::OptimConfig;

/// Ids of parameters with fewer than two dimensions (biases, norm scales).
struct VectorParams(Vec<ParamId>);

impl ModuleVisitor for VectorParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D < 2 {
            self.0.push(param.id);
        }
    }
}

/// AdamW over `model`: weight decay on parameters of rank >= 2, none on the rest.
pub fn adamw<M: Module>(cfg: &OptimConfig, model: &M) -> ModuleOptimizer {
    let mut vectors = VectorParams(Vec::new());
    model.visit(&mut vectors);
    ModuleOptimizer::from(AdamW::new(cfg, cfg.weight_decay)).with_group(
        ParamGroup::from_ids(vectors.0),
        AdamW::new(cfg, 0.0),
        None,
    )
}

/// Burn's `AdamW` (same update, same state, so checkpoints are unchanged), whose update
/// runs as [`kiln_models::fused::adamw_update`] on libtorch: 8 in-place libtorch kernels per
/// parameter instead of the 15 Burn composes.
#[derive(Clone)]
pub struct AdamW {
    burn: burn::optim::AdamW,
    /// The fused update's hyper-parameters (`lr` and `time` are set per step).
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    hyper: AdamWStep,
}

impl AdamW {
    /// The hyper-parameters of `cfg`, with `weight_decay` for this parameter group.
    pub fn new(cfg: &OptimConfig, weight_decay: f64) -> Self {
        // Burn's AdamW holds its hyper-parameters as f32; the fused update uses the same.
        let (beta_1, beta_2, epsilon, weight_decay) =
            (cfg.beta1 as f32, cfg.beta2 as f32, cfg.eps as f32, weight_decay as f32);
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        let hyper = AdamWStep {
            lr: 0.0,
            beta_1: beta_1 as f64,
            beta_2: beta_2 as f64,
            epsilon: epsilon as f64,
            weight_decay: weight_decay as f64,
            time: 0,
        };
        AdamW { burn, hyper }
    }
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        #[cfg(feature = "tch")]
        if kiln_models::fused::runs_on_libtorch(&tensor) {
            use burn::optim::AdaptiveMomentumState;
            let (m, v, time) = match state {
                Some(AdamWState { momentum }) => (momentum.moment_1, momentum.moment_2, momentum.time + 1),
                None => (tensor.zeros_like(), tensor.zeros_like(), 1),
            };
            let step = AdamWStep { lr, time, ..self.hyper };
            let (tensor, m, v) = kiln_models::fused::adamw_update(tensor, grad, m, v, step);
            return (tensor, Some(AdamWState::new(AdaptiveMomentumState::new(time, m, v))));
        }
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        burn::optim::AdamW::to_device(state, device)
    }
}

struct SumOfSquares<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SumOfSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let s = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all gradients together.
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SumOfSquares { grads, total: None };
    model.visit(&mut visitor);
    visitor.total.map_or(0.0, |t| t.into_scalar::<f32>() as f64).sqrt()
}

/// Scale every gradient by `min(1, max_norm / norm)` where `norm` is the global norm
/// (PyTorch's `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm(model, grads);
    if max_norm > 0.0 && norm > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    norm
}
