//! What the server serves once the model is loaded: the engine handle, tokenizer, chat
//! template and the model's identity, built from the GGUF file.

use std::path::Path;
use std::sync::Arc;

use skillkv_api::admin::ModelInfo;

use crate::engine::chat_template::{ChatTemplate, LoadTemplateError};
use crate::engine::gguf::LoadModelError;
use crate::engine::handle::StartEngineError;
use crate::engine::model::{LlamaModel, LoadOptions};
use crate::engine::tokenizer::{BuildTokenizerError, GgufTokenizer};
use crate::engine::{Engine, EngineConfig, EngineHandle};

/// Why the model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadServingError {
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
}

/// The loaded model and its running engine.
#[derive(Debug)]
pub struct Serving {
    /// The engine.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<GgufTokenizer>,
    /// The model's chat template.
    pub template: ChatTemplate,
    /// Identity of the model, as the admin API reports it.
    pub info: ModelInfo,
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
    /// Loads the model, tokenizer and template, and starts the engine (blocking; seconds).
    pub fn load(path: &Path, mut engine_config: EngineConfig) -> Result<Self, LoadServingError> {
        let loaded = LlamaModel::load(path, &LoadOptions::default())?;
        let tokenizer = Arc::new(GgufTokenizer::from_gguf(&loaded.gguf)?);
        let template = ChatTemplate::from_gguf(&loaded.gguf)?;
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
        tracing::info!(model = %info.id, digest = %info.model_digest, "model loaded");
        Ok(Self {
            engine,
            tokenizer,
            template,
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_drops_the_gguf_extension() {
        assert_eq!(
            model_id_of(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(model_id_of(Path::new("plain")), "plain");
    }
}
