//! Run-time backend and device selection (`--backend`, `--device`).
//!
//! Burn 0.22 picks the backend through the [`Device`]; adding a backend is one arm in
//! [`BackendKind::device`] behind its cargo feature. A backend that was not compiled in
//! is a clear error naming the feature and the setup script that enable it.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// Every backend Kiln knows, compiled in or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Burn's pure-Rust CPU backend (default).
    Flex,
    /// ndarray CPU backend.
    Ndarray,
    /// wgpu (Vulkan; Mesa's lavapipe on a machine without a GPU).
    Wgpu,
    /// libtorch on the CPU.
    Tch,
    /// libtorch on a CUDA GPU.
    TchCuda,
}

/// A backend that is unknown or not compiled into this binary.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend \"{0}\": expected one of flex, ndarray, wgpu, tch, tch-cuda")]
    Unknown(String),
    #[error(
        "backend \"{backend}\" is not compiled into this binary: rebuild with `--features {feature}` \
         (e.g. `cargo run --release -p train --features {feature} -- ...`){setup}"
    )]
    NotCompiled {
        backend: BackendKind,
        feature: &'static str,
        setup: &'static str,
    },
    #[error("{0}")]
    Threads(String),
}

impl BackendKind {
    pub const ALL: [BackendKind; 5] = [Self::Flex, Self::Ndarray, Self::Wgpu, Self::Tch, Self::TchCuda];

    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Tch => "tch",
            Self::TchCuda => "tch-cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(self) -> bool {
        self.device(0).is_ok()
    }

    /// The device `index` of this backend (the index only matters for GPUs).
    #[allow(unused_variables, unreachable_code)]
    pub fn device(self, index: usize) -> Result<Device, BackendError> {
        match self {
            Self::Flex => Ok(Device::flex()),
            #[allow(deprecated)] // burn-ndarray is deprecated upstream; we keep it for comparisons.
            Self::Ndarray => Ok(Device::ndarray()),
            Self::Wgpu => {
                // Device 0 is wgpu's best adapter (the GPU, or lavapipe's CPU device on a
                // machine without one; CUBECL_WGPU_DEFAULT_DEVICE overrides); N > 0 is the
                // N-th discrete GPU.
                #[cfg(feature = "wgpu")]
                return Ok(Device::wgpu(match index {
                    0 => burn::tensor::DeviceKind::DefaultDevice,
                    n => burn::tensor::DeviceKind::DiscreteGpu(n),
                }));
                Err(self.not_compiled(
                    "wgpu",
                    " (and a Vulkan driver: scripts/setup-vulkan.sh installs Mesa's lavapipe on a machine without a GPU)",
                ))
            }
            Self::Tch => {
                #[cfg(feature = "tch")]
                #[allow(deprecated)]
                return Ok(Device::libtorch());
                Err(self.not_compiled("tch", " (and scripts/setup-libtorch.sh for libtorch)"))
            }
            Self::TchCuda => {
                #[cfg(feature = "tch")]
                #[allow(deprecated)]
                return Ok(Device::libtorch_cuda(index));
                Err(self.not_compiled("tch", " (and scripts/setup-libtorch.sh for libtorch)"))
            }
        }
    }

    #[allow(dead_code)]
    fn not_compiled(self, feature: &'static str, setup: &'static str) -> BackendError {
        BackendError::NotCompiled {
            backend: self,
            feature,
            setup,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| BackendError::Unknown(s.to_string()))
    }
}

/// Use `threads` CPU threads for the backends' thread pools: rayon's global pool (flex,
/// ndarray) and libtorch's intra-op pool (tch). Call it before the first tensor
/// operation; libtorch's OpenMP reads `OMP_NUM_THREADS` when the library loads, before
/// `main`, so the environment variable alone is not enough for an in-process setting.
pub fn set_cpu_threads(threads: std::num::NonZeroUsize) -> Result<(), String> {
    let threads = threads.get();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("--threads {threads}: rayon's thread pool is already running: {e}"))?;
    #[cfg(feature = "tch")]
    tch::set_num_threads(threads as i32);
    Ok(())
}

/// A chosen backend and device, printed at start and recorded in the run directory.
#[derive(Debug, Clone)]
pub struct Selected {
    pub backend: BackendKind,
    pub index: usize,
    pub device: Device,
}

impl Selected {
    pub fn new(backend: BackendKind, index: usize) -> Result<Self, BackendError> {
        Ok(Self {
            backend,
            index,
            device: backend.device(index)?,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "backend {} device {:?} ({} CPU threads)",
            self.backend,
            self.device,
            self.cpu_threads()
        )
    }

    /// Threads of the pool this backend computes with on the CPU: libtorch's intra-op
    /// pool for tch, rayon's global pool otherwise.
    pub fn cpu_threads(&self) -> usize {
        #[cfg(feature = "tch")]
        if matches!(self.backend, BackendKind::Tch | BackendKind::TchCuda) {
            return tch::get_num_threads().max(0) as usize;
        }
        rayon::current_num_threads()
    }
}
