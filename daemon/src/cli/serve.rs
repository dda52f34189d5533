//! `skillkv serve`: the flags, reading the key and token files, and running the server on a
//! multi-threaded Tokio runtime.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use skillkv_api::skills::{DetectorSettings, LoadEmbeddingsError};
use skillkv_api::v1alpha1::Assembly;

use crate::engine::device::DeviceRequest;
use crate::engine::{EngineConfig, KvCacheSize};
use crate::server::serving::{ModelSettings, SkillsSettings};
use crate::server::{self, Listeners, ServeConfig, ServeError};
use crate::skills::assembly::DEFAULT_MODULAR_RECOMPUTE_TOKENS;

/// Environment variable with comma-separated API keys.
pub const API_KEYS_ENV: &str = "SKILLKV_API_KEYS";

/// `skillkv serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// GGUF model file [default: $SKILLKV_MODEL, else ~/.cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, env = "SKILLKV_MODEL")]
    pub model: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Public port (OpenAI API, /healthz, /readyz, /metrics); 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Admin API port; 0 picks a free one.
    #[arg(long, default_value_t = 8081)]
    pub admin_port: u16,
    /// File holding the admin bearer token; without it the admin API is not served.
    #[arg(long, env = "SKILLKV_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File of API keys, one per line (`#` comments); also $SKILLKV_API_KEYS, comma-separated.
    /// With none, the API is open.
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// KV cache budget in bytes [default: 536870912 (512 MiB) unless --kv-cache-fraction].
    #[arg(long, conflicts_with = "kv_cache_fraction")]
    pub kv_cache_bytes: Option<usize>,
    /// KV cache budget as a fraction, in (0, 1], of the memory still available once the
    /// weights are loaded (on a GPU its free memory; on the CPU host MemAvailable, bounded by
    /// the container's cgroup limit).
    #[arg(long, value_parser = parse_positive_fraction)]
    pub kv_cache_fraction: Option<f64>,
    /// Longest sequence (prompt plus completion) in tokens; at most the model's own.
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..))]
    pub context_length: Option<u32>,
    /// Where the engine runs: `auto` (CUDA device 0 when the driver, NVRTC and cuBLAS load and
    /// the daemon was built with the `cuda` feature, else the CPU), `cpu`, or `cuda[:N]` (an
    /// error when that device cannot be used).
    #[arg(long, env = "SKILLKV_DEVICE", default_value = "auto")]
    pub device: DeviceRequest,
    /// Element type of the KV cache. The CPU backend stores f32 only.
    #[arg(long, value_enum, default_value_t = KvDtypeArg::F32)]
    pub kv_dtype: KvDtypeArg,
    /// Most tokens per forward batch.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// Most requests waiting for admission; beyond it requests get 429.
    #[arg(long, default_value_t = 64)]
    pub max_waiting: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Per-request timeout in seconds, streaming included.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Log prompts and completions at debug level (off by default).
    #[arg(long)]
    pub log_content: bool,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Folder of skills (`NAME/SKILL.md`) to prefill and pin at start.
    #[arg(long, env = "SKILLKV_SKILLS_DIR")]
    pub skills: Option<PathBuf>,
    /// Fraction of the KV cache that skills may pin (0–1).
    #[arg(long, default_value_t = 0.5, value_parser = parse_fraction)]
    pub pinned_fraction: f64,
    /// How skills from --skills are assembled into requests: `exact` (reuse through the
    /// prefix cache, bit-exact) or `modular` (later skills copied from their own pinned KV with
    /// positions re-rotated; approximate, no per-combination prefill).
    #[arg(long, default_value = "exact", value_parser = parse_assembly)]
    pub skills_assembly: Assembly,
    /// Leading tokens of each copied (modular) skill recomputed in context.
    #[arg(long, default_value_t = DEFAULT_MODULAR_RECOMPUTE_TOKENS)]
    pub modular_recompute_tokens: usize,
    /// Folder of the node's skill KV store: skills load from it at start instead of being
    /// prefilled again, and fresh prefills are saved to it.
    #[arg(long, env = "SKILLKV_KV_STORE")]
    pub kv_store: Option<PathBuf>,
    /// Folder of static token embeddings (`tokenizer.json`, `embeddings.safetensors`; `make
    /// detector-embeddings`) with which skill detection also checks meaning, not only words.
    /// Give the router the same folder so that both detect alike.
    #[arg(long, env = "SKILLKV_DETECTOR_EMBEDDINGS")]
    pub detector_embeddings: Option<PathBuf>,
}

/// `--kv-dtype` values (the ModelDeployment's `engine.kvDtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
}

impl KvDtypeArg {
    /// The flag value, e.g. `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// The default KV cache budget, bytes.
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 * 1024 * 1024;

/// `exact` or `modular`.
pub(crate) fn parse_assembly(text: &str) -> Result<Assembly, String> {
    match text {
        "exact" => Ok(Assembly::Exact),
        "modular" => Ok(Assembly::Modular),
        other => Err(format!("`{other}` is neither `exact` nor `modular`")),
    }
}

fn parse_positive_fraction(text: &str) -> Result<f64, String> {
    let value = parse_fraction(text)?;
    if value > 0.0 {
        Ok(value)
    } else {
        Err("must be above 0".to_string())
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is outside [0, 1]"))
    }
}

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunServeError {
    /// No model path and no home directory to find the default in.
    #[error("no --model given, $SKILLKV_MODEL unset and $HOME unknown")]
    NoModelPath,
    /// A key or token file could not be read.
    #[error("reading {path} failed")]
    ReadSecret {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The KV element type is one this build's backend cannot store.
    #[error(
        "--kv-dtype {} is not supported: the CPU backend stores the KV cache as f32 (f16 and bf16 need the CUDA backend)",
        .0.name()
    )]
    UnsupportedKvDtype(KvDtypeArg),
    /// The token file holds no token.
    #[error("the admin token file {0} is empty")]
    EmptyAdminToken(PathBuf),
    /// `--detector-embeddings` names a folder that cannot be loaded.
    #[error("loading --detector-embeddings failed")]
    LoadDetectorEmbeddings(#[source] LoadEmbeddingsError),
    /// The Tokio runtime could not start.
    #[error("starting the async runtime failed")]
    Runtime(#[source] std::io::Error),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The default model path under `$HOME`.
pub fn default_model_path() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cache/skillkv/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn read_secret(path: &Path) -> Result<String, RunServeError> {
    std::fs::read_to_string(path).map_err(|source| RunServeError::ReadSecret {
        path: path.to_path_buf(),
        source,
    })
}

/// Keys from a file (one per line, `#` comments) and from a comma-separated list.
fn parse_api_keys(file: Option<&str>, env: Option<&str>) -> Vec<String> {
    let from_file = file
        .into_iter()
        .flat_map(str::lines)
        .filter(|line| !line.trim_start().starts_with('#'));
    let from_env = env.into_iter().flat_map(|keys| keys.split(','));
    from_file
        .chain(from_env)
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(str::to_string)
        .collect()
}

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Result<ServeConfig, RunServeError> {
        if self.kv_dtype != KvDtypeArg::F32 {
            return Err(RunServeError::UnsupportedKvDtype(self.kv_dtype));
        }
        let model_path = match &self.model {
            Some(path) => path.clone(),
            None => default_model_path().ok_or(RunServeError::NoModelPath)?,
        };
        let admin_token = match &self.admin_token_file {
            Some(path) => {
                let token = read_secret(path)?.trim().to_string();
                if token.is_empty() {
                    return Err(RunServeError::EmptyAdminToken(path.clone()));
                }
                Some(token)
            }
            None => None,
        };
        let keys_file = self.api_keys_file.as_deref().map(read_secret).transpose()?;
        let keys_env = std::env::var(API_KEYS_ENV).ok();
        let detector = DetectorSettings::load(self.detector_embeddings.as_deref())
            .map_err(RunServeError::LoadDetectorEmbeddings)?;
        Ok(ServeConfig {
            model_path,
            host: self.host,
            port: self.port,
            admin_port: self.admin_port,
            admin_token,
            api_keys: parse_api_keys(keys_file.as_deref(), keys_env.as_deref()),
            engine: EngineConfig {
                kv_cache: KvCacheSize::Bytes(self.kv_cache_bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES)),
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
                max_waiting: self.max_waiting,
                ..EngineConfig::default()
            },
            model: ModelSettings {
                device: self.device,
                context_length: self.context_length.map(|tokens| tokens as usize),
                kv_cache_fraction: self.kv_cache_fraction,
            },
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_secs(self.request_timeout),
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
            log_content: self.log_content,
            skills_dir: self.skills.clone(),
            skills: SkillsSettings {
                pinned_fraction: self.pinned_fraction,
                store_dir: self.kv_store.clone(),
                folder_assembly: self.skills_assembly,
                modular_recompute_tokens: self.modular_recompute_tokens,
                detector,
            },
            ..ServeConfig::default()
        })
    }
}

/// Runs `skillkv serve` until SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), RunServeError> {
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(RunServeError::Runtime)?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        server::serve(config, listeners).await
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_come_from_file_and_env() {
        let keys = parse_api_keys(Some("# comment\nalpha\n\n beta \n"), Some("gamma, ,delta"));
        assert_eq!(keys, ["alpha", "beta", "gamma", "delta"]);
        assert!(parse_api_keys(None, None).is_empty());
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .map(|cli| cli.serve)
    }

    #[test]
    fn an_unloadable_embeddings_folder_stops_the_start_naming_the_file() {
        let args = parse(&[
            "--model=/m.gguf",
            "--detector-embeddings=/nonexistent/embeddings",
        ])
        .expect("valid flags");
        match args.config() {
            Err(RunServeError::LoadDetectorEmbeddings(source)) => {
                assert!(
                    source
                        .to_string()
                        .contains("/nonexistent/embeddings/tokenizer.json"),
                    "{source}"
                );
            }
            other => panic!("expected LoadDetectorEmbeddings, got {other:?}"),
        }
    }

    #[test]
    fn engine_sizing_flags_reach_the_config() {
        let args = parse(&[
            "--model=/m.gguf",
            "--kv-cache-fraction=0.25",
            "--context-length=4096",
            "--kv-dtype=f32",
            "--skills-assembly=modular",
            "--modular-recompute-tokens=4",
            "--device=cuda:1",
        ])
        .expect("valid flags");
        let config = args.config().expect("config");
        assert_eq!(config.skills.folder_assembly, Assembly::Modular);
        assert_eq!(config.skills.modular_recompute_tokens, 4);
        assert_eq!(config.model.kv_cache_fraction, Some(0.25));
        assert_eq!(config.model.context_length, Some(4096));
        assert_eq!(config.model.device, DeviceRequest::Cuda(1));
        let defaults = parse(&["--model=/m.gguf"]).expect("defaults").config();
        let defaults = defaults.expect("config");
        // The CLI picks the device itself (`auto`); the library's default is the CPU.
        assert_eq!(
            defaults.model,
            ModelSettings {
                device: DeviceRequest::Auto,
                ..ModelSettings::default()
            }
        );
        assert_eq!(
            defaults.engine.kv_cache,
            KvCacheSize::Bytes(DEFAULT_KV_CACHE_BYTES)
        );
    }

    #[test]
    fn bad_engine_sizing_flags_are_refused() {
        for bad in [
            &["--kv-cache-fraction=0"][..],
            &["--kv-cache-fraction=1.5"],
            &["--kv-cache-fraction=0.5", "--kv-cache-bytes=1048576"],
            &["--context-length=8"],
            &["--kv-dtype=f64"],
            &["--skills-assembly=approximate"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        let f16 = parse(&["--model=/m.gguf", "--kv-dtype=f16"]).expect("parses");
        let error = f16.config().expect_err("f16 is refused on the CPU backend");
        let message = error.to_string();
        assert!(
            message.contains("--kv-dtype f16") && message.contains("f32"),
            "{message}"
        );
    }
}
