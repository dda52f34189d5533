//! What the server serves once the model is loaded: the engine handle, tokenizer, chat
//! template, the model's identity and the skill registry, built from the GGUF file.

use std::path::Path;
use std::sync::Arc;

use skillkv_api::admin::{DeviceInfo, ModelInfo};
use skillkv_api::skills::DetectorSettings;
use skillkv_api::v1alpha1::Assembly;

use crate::engine::chat_template::{ChatTemplate, LoadTemplateError};
use crate::engine::device::{
    DeviceRequest, ReadDeviceMemoryError, SelectDeviceError, select_device,
};
use crate::engine::gguf::LoadModelError;
use crate::engine::handle::StartEngineError;
use crate::engine::kv_pool::KvPool;
use crate::engine::model::{LlamaModel, LoadOptions};
use crate::engine::tokenizer::{BuildTokenizerError, GgufTokenizer};
use crate::engine::{Engine, EngineConfig, EngineHandle, KvCacheSize};
use crate::skills::assembly::DEFAULT_MODULAR_RECOMPUTE_TOKENS;
use crate::skills::store::OpenSkillStoreError;
use crate::skills::{
    DesiredStateManager, SkillRegistry, SkillStore, SkillsConfig, StoreIdentity, UnpinnedSkillCache,
};
use crate::telemetry::memory::{
    KvCacheMemory, MemorySources, ReadAvailableMemoryError, kv_cache_memory,
};

/// How the skills of a served model are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SkillsSettings {
    /// Fraction of the KV pool skills may pin.
    pub pinned_fraction: f64,
    /// The node's skill KV store, if any.
    pub store_dir: Option<std::path::PathBuf>,
    /// How skills read from the skills folder are assembled (the admin API sets its own).
    pub folder_assembly: Assembly,
    /// Leading tokens of each copied (modular) skill segment recomputed in context.
    pub modular_recompute_tokens: usize,
    /// Skill detection for requests that name no skills.
    pub detector: DetectorSettings,
}

impl Default for SkillsSettings {
    fn default() -> Self {
        Self {
            pinned_fraction: 0.5,
            store_dir: None,
            folder_assembly: Assembly::Exact,
            modular_recompute_tokens: DEFAULT_MODULAR_RECOMPUTE_TOKENS,
            detector: DetectorSettings::default(),
        }
    }
}

/// How the model and its KV pool are sized (`skillkv serve --context-length`,
/// `--kv-cache-fraction`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelSettings {
    /// Where the engine runs (`--device`).
    pub device: DeviceRequest,
    /// Caps the context length below the model's own; a larger value keeps the model's (with a
    /// warning: RoPE beyond the trained length degrades output).
    pub context_length: Option<usize>,
    /// Sizes the KV pool as this fraction of the memory still available once the weights are
    /// loaded — the GPU's free memory on a GPU, else host `MemAvailable` bounded by the cgroup
    /// limit — replacing the engine's `kv_cache`.
    pub kv_cache_fraction: Option<f64>,
}

/// Why the model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadServingError {
    /// The requested device cannot be used.
    #[error("choosing the engine's device failed")]
    Device(#[from] SelectDeviceError),
    /// `kvCacheFraction` on a GPU whose free memory cannot be read.
    #[error("sizing the KV pool from the GPU's memory failed")]
    DeviceMemory(#[from] ReadDeviceMemoryError),
    /// Loading the GGUF failed.
    #[error("loading the model failed")]
    Model(#[from] LoadModelError),
    /// Its tokenizer could not be built.
    #[error("building the tokenizer failed")]
    Tokenizer(#[from] BuildTokenizerError),
    /// Its chat template could not be loaded.
    #[error("loading the chat template failed")]
    Template(#[from] LoadTemplateError),
    /// The engine did not start.
    #[error("starting the engine failed")]
    Engine(#[from] StartEngineError),
    /// The skill KV store could not be opened.
    #[error(transparent)]
    Store(#[from] OpenSkillStoreError),
    /// `--kv-cache-fraction` needs the available memory, which could not be read.
    #[error("sizing the KV cache from the available memory failed")]
    AvailableMemory(#[from] ReadAvailableMemoryError),
}

/// The loaded model and its running engine.
#[derive(Debug)]
pub struct Serving {
    /// The engine.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<GgufTokenizer>,
    /// The model's chat template.
    pub template: Arc<ChatTemplate>,
    /// Identity of the model, as the admin API reports it.
    pub info: ModelInfo,
    /// Blocks in the KV pool.
    pub total_blocks: usize,
    /// The skills and their KV.
    pub skills: Arc<SkillRegistry>,
    /// The admin API's desired state.
    pub desired: DesiredStateManager,
    /// Prefills of skills this daemon does not pin, for the requests that use them.
    pub unpinned: UnpinnedSkillCache,
    /// Where the engine runs and why.
    pub device: DeviceInfo,
    /// The memory `kvCacheFraction` was taken of; `None` when the pool's size was configured.
    pub kv_cache_memory: Option<KvCacheMemory>,
}

/// The id clients send as `model`: the file name without `.gguf`.
pub fn model_id_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

impl Serving {
    /// Loads the model, tokenizer and template, and starts the engine (blocking; seconds). The
    /// skills get `pinned_fraction` of the KV pool. Must run inside a Tokio runtime.
    pub fn load(
        path: &Path,
        engine_config: EngineConfig,
        skills: &SkillsSettings,
    ) -> Result<Self, LoadServingError> {
        Self::load_with(path, engine_config, skills, ModelSettings::default())
    }

    /// [`Serving::load`] with the model's context length and KV pool sized by `model`.
    pub fn load_with(
        path: &Path,
        mut engine_config: EngineConfig,
        skills: &SkillsSettings,
        model: ModelSettings,
    ) -> Result<Self, LoadServingError> {
        let mut selected = select_device(model.device)?;
        let options = LoadOptions {
            max_context: model.context_length,
            device: selected.device.clone(),
        };
        let loaded = LlamaModel::load(path, &options)?;
        let device_free = selected.device.free_memory_bytes();
        selected.info.memory_free_after_weights_bytes =
            device_free.as_ref().ok().copied().flatten();
        if let Some(requested) = model.context_length
            && requested > loaded.config.context_length
        {
            tracing::warn!(
                requested,
                context_length = loaded.config.context_length,
                "the requested context length exceeds the model's; using the model's"
            );
        }
        let mut sized_from_memory = None;
        if let Some(fraction) = model.kv_cache_fraction {
            // On a GPU the pool is sized from the device or not at all: never from host memory.
            let memory = kv_cache_memory(device_free?, &MemorySources::default())?;
            let bytes = memory.share(fraction);
            tracing::info!(
                fraction,
                source = ?memory.source,
                available_bytes = memory.bytes,
                cgroup_limited = memory.cgroup_limited,
                kv_cache_bytes = bytes,
                "KV cache sized from the memory available after the weights"
            );
            engine_config.kv_cache = KvCacheSize::Bytes(bytes);
            sized_from_memory = Some(memory);
        }
        let tokenizer = Arc::new(GgufTokenizer::from_gguf(&loaded.gguf)?);
        let template = Arc::new(ChatTemplate::from_gguf(&loaded.gguf)?);
        let bytes_per_block = KvPool::bytes_per_block(&loaded.config).max(1);
        let total_blocks = match engine_config.kv_cache {
            KvCacheSize::Blocks(blocks) => blocks,
            KvCacheSize::Bytes(bytes) => bytes / bytes_per_block,
        };
        engine_config.cache_namespace.model_digest = loaded.model_digest.clone();
        engine_config.cache_namespace.tokenizer_digest = tokenizer.digest();
        let context_length = loaded.config.context_length;
        let engine = Engine::start(
            Arc::new(loaded.model),
            Some(tokenizer.clone()),
            engine_config,
        )?;
        let info = ModelInfo {
            id: model_id_of(path),
            model_digest: loaded.model_digest,
            tokenizer_digest: tokenizer.digest(),
            chat_template_digest: template.digest(),
            context_length,
            namespace_root: engine.namespace_root(None),
        };
        tracing::info!(model = %info.id, digest = %info.model_digest, total_blocks, "model loaded");
        let store = match &skills.store_dir {
            Some(dir) => Some(SkillStore::open(
                dir,
                StoreIdentity {
                    model_digest: info.model_digest.clone(),
                    tokenizer_digest: info.tokenizer_digest.clone(),
                    chat_template_digest: info.chat_template_digest.clone(),
                    kv_dtype: engine.config().cache_namespace.kv_dtype.clone(),
                    kv_format_version: engine.config().cache_namespace.kv_format_version,
                    n_layers: loaded.config.n_layers,
                    block_floats: KvPool::floats_per_block_layer(&loaded.config),
                    block_tokens: skillkv_api::block_hash::BLOCK_TOKENS,
                },
            )?),
            None => None,
        };
        tracing::info!(detection = %skills.detector.mode(), "skill detection");
        let registry = SkillRegistry::new(
            engine.clone(),
            tokenizer.clone(),
            template.clone(),
            SkillsConfig {
                pinned_budget_blocks: (total_blocks as f64 * skills.pinned_fraction.clamp(0.0, 1.0))
                    as usize,
                kv_bytes_per_token: bytes_per_block / skillkv_api::block_hash::BLOCK_TOKENS,
                modular_recompute_tokens: skills.modular_recompute_tokens,
                detector: skills.detector.clone(),
                ..SkillsConfig::default()
            },
            store,
        );
        let desired = DesiredStateManager::new(registry.clone());
        Ok(Self {
            engine,
            tokenizer,
            template,
            info,
            total_blocks,
            skills: registry,
            desired,
            unpinned: UnpinnedSkillCache::default(),
            device: selected.info,
            kv_cache_memory: sized_from_memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kv_cache_fraction_on_the_cpu_sizes_the_pool_from_host_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tiny.gguf");
        crate::engine::testing::write_tiny_gguf(&path, &Default::default()).expect("tiny model");
        let fraction = 0.001;
        let serving = tokio::task::block_in_place(|| {
            Serving::load_with(
                &path,
                EngineConfig::default(),
                &SkillsSettings::default(),
                ModelSettings {
                    kv_cache_fraction: Some(fraction),
                    ..ModelSettings::default()
                },
            )
        })
        .expect("serving loads");
        let memory = serving.kv_cache_memory.expect("sized from memory");
        assert_eq!(memory.source, skillkv_api::admin::KvPoolSizing::HostMemory);
        let available = memory.bytes;
        assert!(available > 0);
        // The pool is that share of the figure, in whole blocks.
        let file = crate::engine::gguf::GgufFile::open(&path).expect("opens");
        let config = crate::engine::gguf::ModelConfig::from_gguf(&file.content).expect("config");
        let share = (available as f64 * fraction) as usize;
        assert_eq!(
            serving.total_blocks,
            share / KvPool::bytes_per_block(&config)
        );
        assert!(serving.total_blocks > 0);
        assert_eq!(serving.device.memory_free_after_weights_bytes, None);
    }

    #[test]
    fn model_id_drops_the_gguf_extension() {
        assert_eq!(
            model_id_of(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(model_id_of(Path::new("plain")), "plain");
    }
}
