//! The server's settings, filled from the command line by `skillkv serve`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::EngineConfig;
use crate::server::serving::{ModelSettings, SkillsSettings};

/// Everything `serve` needs to know.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The GGUF model file.
    pub model_path: PathBuf,
    /// Address both listeners bind.
    pub host: IpAddr,
    /// Public port (OpenAI API, health, metrics); 0 picks a free one.
    pub port: u16,
    /// Admin port; 0 picks a free one.
    pub admin_port: u16,
    /// Bearer token of the admin API; without one the admin listener is not started.
    pub admin_token: Option<String>,
    /// API keys accepted on `/v1/*`; empty means no key is required.
    pub api_keys: Vec<String>,
    /// Engine limits (the cache namespace's digests are filled in from the model).
    pub engine: EngineConfig,
    /// Context length and KV pool sizing relative to the machine.
    pub model: ModelSettings,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request may take, streaming included.
    pub request_timeout: Duration,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Log prompts and completions at debug level.
    pub log_content: bool,
    /// Period of the load figures on the admin event stream.
    pub load_event_interval: Duration,
    /// Folder of skills to prefill and pin at start (`--skills`).
    pub skills_dir: Option<PathBuf>,
    /// Pinned fraction and KV store of the skills.
    pub skills: SkillsSettings,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            admin_port: 8081,
            admin_token: None,
            api_keys: Vec::new(),
            engine: EngineConfig::default(),
            model: ModelSettings::default(),
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            log_content: false,
            load_event_interval: Duration::from_secs(5),
            skills_dir: None,
            skills: SkillsSettings::default(),
        }
    }
}
