//! The model: loading a GGUF Llama-family file onto a backend and the forward pass over the
//! paged KV pool. [`LlamaModel`] is what the scheduler uses; it is immutable after load and
//! `Send + Sync`.

pub mod attention;
pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod int8;
pub mod llama;
pub mod matmul;
pub mod ops;
pub mod resident;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use skillkv_kernels::ops::PoolOps;
#[cfg(feature = "cuda")]
use skillkv_kernels::ops::cuda::CudaOps;
use skillkv_kernels::ops::host::HostOps;

use crate::engine::batch::{ForwardBatch, ForwardOutput};
use crate::engine::device::EngineDevice;
use crate::engine::gguf::{GgufFile, LoadModelError, ModelConfig, file_sha256};
use crate::engine::kv_pool::KvPool;
use crate::engine::model::cpu::CpuBackend;
use crate::engine::model::llama::Llama;
use crate::engine::model::resident::{ResidentLlama, ResidentPool};

pub use crate::engine::model::llama::ForwardError;

/// Options for [`LlamaModel::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Caps the context length below the model's own (smaller RoPE tables, earlier
    /// [`ForwardError::ContextOverflow`]); `None` keeps the model's.
    pub max_context: Option<usize>,
    /// The device to load onto (from [`select_device`](crate::engine::device::select_device));
    /// the CPU by default.
    pub device: EngineDevice,
}

/// A model ready to run, with what the rest of the engine needs from its file.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: LlamaModel,
    /// Its hyperparameters (also `model.config()`).
    pub config: ModelConfig,
    /// The GGUF metadata (tokenizer, chat template).
    pub gguf: Content,
    /// SHA-256 of the model file, lower-case hex.
    pub model_digest: String,
}

/// A Llama-family model on the CPU backend, or the resident forward pass on a GPU (or, for
/// tests, through the kernels' host references).
#[derive(Debug)]
pub struct LlamaModel {
    inner: OnBackend,
}

/// The forward pass on the backend it was loaded onto.
#[derive(Debug)]
enum OnBackend {
    /// The host forward pass with the CPU kernels; a host pool.
    Cpu(Llama<CpuBackend>),
    /// The resident forward pass through the kernels' host references; its pool is a
    /// [`ResidentPool<HostOps>`].
    HostKernels(ResidentLlama<HostOps>),
    /// The resident forward pass on a GPU; its pool is a [`ResidentPool<CudaOps>`].
    #[cfg(feature = "cuda")]
    Cuda(ResidentLlama<CudaOps>),
}

impl LlamaModel {
    /// Loads the GGUF file at `path`.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<LoadedModel, LoadModelError> {
        let started = std::time::Instant::now();
        let mut file = GgufFile::open(path)?;
        file.check_supported()?;
        let mut config = ModelConfig::from_gguf(&file.content)?;
        if let Some(limit) = options.max_context {
            config.context_length = config.context_length.min(limit.max(1));
        }
        let inner = match &options.device {
            EngineDevice::Cpu => {
                OnBackend::Cpu(Llama::load(CpuBackend, config.clone(), &mut file)?)
            }
            EngineDevice::HostKernels => OnBackend::HostKernels(ResidentLlama::load(
                Arc::new(HostOps),
                config.clone(),
                &mut file,
            )?),
            #[cfg(feature = "cuda")]
            EngineDevice::Cuda(device) => {
                let ops = CudaOps::new(device.clone()).map_err(LoadModelError::Kernels)?;
                OnBackend::Cuda(ResidentLlama::load(
                    Arc::new(ops),
                    config.clone(),
                    &mut file,
                )?)
            }
        };
        let model_digest = file_sha256(path)?;
        tracing::info!(
            path = %path.display(),
            layers = config.n_layers,
            hidden = config.hidden,
            vocab = config.vocab,
            context_length = config.context_length,
            model_digest = %model_digest,
            backend = inner.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(LoadedModel {
            model: Self { inner },
            config,
            gguf: file.content,
            model_digest,
        })
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        match &self.inner {
            OnBackend::Cpu(llama) => llama.config(),
            OnBackend::HostKernels(llama) => llama.config(),
            #[cfg(feature = "cuda")]
            OnBackend::Cuda(llama) => llama.config(),
        }
    }

    /// A zeroed KV pool of `num_blocks` blocks where this model's forward pass keeps KV: host
    /// memory for the CPU backend, the device for the resident ones.
    pub fn new_pool(&self, num_blocks: usize) -> Result<KvPool, ForwardError> {
        let config = self.config();
        Ok(match &self.inner {
            OnBackend::Cpu(_) => KvPool::new(config, num_blocks),
            OnBackend::HostKernels(llama) => {
                KvPool::on_device(config, num_blocks, Box::new(llama.new_pool(num_blocks)?))
            }
            #[cfg(feature = "cuda")]
            OnBackend::Cuda(llama) => {
                KvPool::on_device(config, num_blocks, Box::new(llama.new_pool(num_blocks)?))
            }
        })
    }

    /// The backend's name (`cpu`, `host-kernels`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        self.inner.name()
    }

    /// Runs one batch: writes the new tokens' K/V into `kv` and returns the logits of the last
    /// token of every chunk that wants them.
    pub fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvPool,
    ) -> Result<ForwardOutput, ForwardError> {
        match &self.inner {
            OnBackend::Cpu(llama) => llama.forward(batch, kv),
            OnBackend::HostKernels(llama) => {
                llama.forward(batch, resident_pool(kv, "host-kernels")?)
            }
            #[cfg(feature = "cuda")]
            OnBackend::Cuda(llama) => llama.forward(batch, resident_pool(kv, "cuda")?),
        }
    }
}

/// The resident pool of kernels `K` inside `kv`, or what the forward pass answers when `kv`
/// is elsewhere.
fn resident_pool<'a, K: PoolOps + 'static>(
    kv: &'a mut KvPool,
    kernels: &'static str,
) -> Result<&'a mut ResidentPool<K>, ForwardError> {
    kv.device_mut()
        .and_then(|device| device.downcast_mut::<ResidentPool<K>>())
        .ok_or(ForwardError::PoolElsewhere { expected: kernels })
}

impl OnBackend {
    fn name(&self) -> &'static str {
        match self {
            Self::Cpu(_) => "cpu",
            Self::HostKernels(_) => "host-kernels",
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => "cuda",
        }
    }
}
