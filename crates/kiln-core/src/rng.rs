//! Reproducible seeding. Burn's RNG is global per backend: whatever seeds it and then
//! draws from it (model initialisation, a training step's dropout, LoRA's factors) holds
//! one process-wide lock, so that another thread of the process (tests in parallel, a
//! second model) cannot reseed it or draw from it in between.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};

/// Run `f` holding the process-wide lock on the devices' random number generators.
/// Not reentrant.
pub fn with_rng_lock<R>(f: impl FnOnce() -> R) -> R {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f()
}

/// Initialise a model from `seed`, reproducibly even while other threads of the process
/// use the device's (process-wide) RNG: seeding and drawing every parameter happen under
/// [`with_rng_lock`]. Parameters are lazy in Burn, so each is read once here to draw it now.
pub fn seeded_init<M: Module>(seed: u64, device: &Device, init: impl FnOnce() -> M) -> M {
    struct Materialize;
    impl ModuleVisitor for Materialize {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    with_rng_lock(|| {
        device.seed(seed);
        let model = init();
        model.visit(&mut Materialize);
        model
    })
}
