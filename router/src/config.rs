//! The router's settings: [`RouterArgs`], the command line of `skillkv-operator router` (every
//! flag also readable from the `SKILLKV_*` environment variables the Helm chart sets), and
//! [`RouterConfig`], the resolved settings `run` takes, with files already read, and, in a
//! cluster, the [`DiscoveryConfig`] of the watches that keep backends, keys and limits current.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::ArgAction;
use skillkv_api::skills::{DetectorSettings, LoadEmbeddingsError};

use crate::auth::{ApiKeys, LoadApiKeysError};
use crate::ratelimit::RateLimiter;
use crate::ratelimit::policy::LoadRateLimitsError;
use crate::routing::{Policy, RoutingConfig};

/// How the router reaches one daemon's admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminEndpoint {
    /// The public URL with the port plus one (the daemon's defaults are 8080 and 8081).
    NextPort,
    /// An explicit admin base URL.
    Url(String),
    /// No admin API: the router knows nothing of the daemon's skills, cache or load.
    Disabled,
}

/// One `--backend` value: `URL[,admin=URL|none][,admin-token-file=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Base URL of the daemon's public (OpenAI) API, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Its admin API.
    pub admin: AdminEndpoint,
    /// File holding its admin bearer token; default `--admin-token-file`.
    pub admin_token_file: Option<PathBuf>,
}

/// Why a `--backend` value or a file named by a flag is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureRouterError {
    /// A `--backend` value is malformed.
    #[error("invalid --backend `{value}`: {problem}")]
    Backend {
        /// The value.
        value: String,
        /// What is wrong.
        problem: String,
    },
    /// No backend was given.
    #[error(
        "no backend: give at least one --backend URL, or run in a cluster with --discovery kubernetes"
    )]
    NoBackends,
    /// Both static backends and Kubernetes discovery were asked for.
    #[error("--backend and --discovery kubernetes exclude each other; give one")]
    BackendsWithDiscovery,
    /// An admin token file could not be read.
    #[error("cannot read the admin token file {path}")]
    AdminToken {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The API-key file failed.
    #[error(transparent)]
    ApiKeys(#[from] LoadApiKeysError),
    /// The rate-limit file failed.
    #[error(transparent)]
    RateLimits(#[from] LoadRateLimitsError),
    /// `--detector-embeddings` names a folder that cannot be loaded.
    #[error("loading --detector-embeddings failed")]
    DetectorEmbeddings(#[source] LoadEmbeddingsError),
}

/// `http://host:port` without a trailing slash, or why not.
fn base_url(url: &str) -> Result<(String, Option<u16>), String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// backends are supported".to_string());
    }
    let Some(authority) = uri.authority() else {
        return Err("the URL has no host".to_string());
    };
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("give the daemon's base URL without a path".to_string());
    }
    Ok((format!("http://{authority}"), authority.port_u16()))
}

impl FromStr for BackendSpec {
    type Err = ConfigureRouterError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let problem = |problem: String| ConfigureRouterError::Backend {
            value: value.to_string(),
            problem,
        };
        let mut parts = value.split(',');
        let (url, _) = base_url(parts.next().unwrap_or_default().trim()).map_err(problem)?;
        let mut spec = Self {
            url,
            admin: AdminEndpoint::NextPort,
            admin_token_file: None,
        };
        for part in parts {
            match part.trim().split_once('=') {
                Some(("admin", "none")) => spec.admin = AdminEndpoint::Disabled,
                Some(("admin", admin)) => {
                    let (admin, _) = base_url(admin).map_err(problem)?;
                    spec.admin = AdminEndpoint::Url(admin);
                }
                Some(("admin-token-file", path)) if !path.is_empty() => {
                    spec.admin_token_file = Some(PathBuf::from(path));
                }
                _ => {
                    return Err(problem(format!(
                        "unknown option `{part}`; expected admin=URL, admin=none or admin-token-file=PATH"
                    )));
                }
            }
        }
        Ok(spec)
    }
}

/// Where the router's backends, API keys and rate limits come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryMode {
    /// `kubernetes` when no `--backend` is given and the router runs in a pod
    /// (`KUBERNETES_SERVICE_HOST` is set), else `static`.
    Auto,
    /// The `--backend` flags and the key and rate-limit files.
    Static,
    /// Watch the cluster: ModelDeployments' EndpointSlices, LoRAAdapters, API-key Secrets and
    /// RateLimitPolicies.
    Kubernetes,
}

/// `skillkv-operator router`: one OpenAI endpoint in front of the daemons.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    /// Address of the OpenAI API.
    #[arg(long, env = "SKILLKV_LISTEN_ADDR", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SKILLKV_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// A daemon, `URL[,admin=URL|none][,admin-token-file=PATH]`; repeat for each. The admin
    /// API defaults to the URL's port plus one; `admin=none` routes to it by load alone.
    #[arg(
        long = "backend",
        value_name = "URL[,OPTIONS]",
        env = "SKILLKV_BACKENDS",
        value_delimiter = ' '
    )]
    pub backends: Vec<BackendSpec>,
    /// File holding the admin bearer token of every backend without its own.
    #[arg(long, env = "SKILLKV_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// YAML list of API keys: `- {key, name, tenant, labels}`.
    #[arg(long, env = "SKILLKV_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Reject requests that carry no API key (401).
    #[arg(long, env = "SKILLKV_REQUIRE_API_KEY", action = ArgAction::Set, default_value_t = false)]
    pub require_api_key: bool,
    /// YAML file of RateLimitPolicy objects (`---`-separated).
    #[arg(long, env = "SKILLKV_RATE_LIMITS_FILE")]
    pub rate_limits_file: Option<PathBuf>,
    /// Router replicas sharing the rate limits; each enforces 1/N of every limit.
    #[arg(long, env = "SKILLKV_ROUTER_REPLICAS", default_value_t = 1)]
    pub replicas: u32,
    /// Routing policy: `locality` (skills, cached prefix, bounded load), `round-robin` or
    /// `least-loaded` (the last two exist to compare against).
    #[arg(long, env = "SKILLKV_ROUTING_POLICY", default_value = "locality")]
    pub policy: Policy,
    /// Bounded-load slack ε: no pod gets a request that puts it above (1+ε)× the mean
    /// in-flight requests of the healthy pods.
    #[arg(long, env = "SKILLKV_LOAD_EPSILON", default_value_t = 0.25)]
    pub load_epsilon: f64,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most backends one request is tried on (connect failures and 503 before the first byte).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: usize,
    /// Most prefix blocks remembered per backend (fewer when its KV pool is smaller).
    #[arg(long, default_value_t = 65_536)]
    pub prefix_index_blocks: usize,
    /// Where backends, API keys and rate limits come from: `auto`, `static` or `kubernetes`.
    #[arg(long, env = "SKILLKV_DISCOVERY", value_enum, default_value_t = DiscoveryMode::Auto)]
    pub discovery: DiscoveryMode,
    /// Kubernetes discovery: the one namespace to watch; empty watches every namespace.
    #[arg(long, env = "SKILLKV_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Kubernetes discovery: label selector of the API-key Secrets.
    #[arg(
        long,
        env = "SKILLKV_API_KEY_SELECTOR",
        default_value = skillkv_api::names::API_KEY_SELECTOR
    )]
    pub api_key_selector: String,
    /// Kubernetes discovery: the router's own Service (in `--namespace`). The rate limits are
    /// split across its ready endpoints instead of `--replicas`.
    #[arg(long, env = "SKILLKV_ROUTER_SERVICE")]
    pub router_service: Option<String>,
    /// The router's own namespace (of `--router-service`).
    #[arg(long, env = "SKILLKV_POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Folder of static token embeddings for skill detection's semantic checks; the same
    /// folder as the daemons' `--detector-embeddings`, so that router and daemons agree.
    #[arg(long, env = "SKILLKV_DETECTOR_EMBEDDINGS")]
    pub detector_embeddings: Option<PathBuf>,
}

/// What Kubernetes discovery watches and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The one namespace watched; `None` watches every namespace.
    pub namespace: Option<String>,
    /// Label selector of the API-key Secrets; `None` when the keys come from a file.
    pub api_key_selector: Option<String>,
    /// Whether RateLimitPolicies are watched (not when the limits come from a file).
    pub watch_rate_limits: bool,
    /// The router's own Service (`namespace`, `name`), whose ready endpoints are the replica
    /// count; `None`: `replicas`.
    pub router_service: Option<(String, String)>,
    /// Router replicas sharing the limits when no Service is watched.
    pub replicas: u32,
    /// Admin token of pools whose admin-token Secret is missing (`--admin-token-file`).
    pub fallback_admin_token: Option<String>,
}

/// Everything the router needs to know about one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Its name in logs and metrics (the `host:port` of its public URL).
    pub name: String,
    /// Base URL of the public API.
    pub url: String,
    /// Base URL of the admin API, if followed.
    pub admin_url: Option<String>,
    /// The admin bearer token.
    pub admin_token: Option<String>,
}

impl BackendConfig {
    /// A backend at `url` whose admin API is not followed.
    pub fn without_admin(url: &str) -> Self {
        Self {
            name: url.trim_start_matches("http://").to_string(),
            url: url.to_string(),
            admin_url: None,
            admin_token: None,
        }
    }
}

/// The resolved settings of a router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Address of the OpenAI API (port 0 picks one).
    pub listen: SocketAddr,
    /// Address of health and metrics.
    pub health_listen: SocketAddr,
    /// The daemons.
    pub backends: Vec<BackendConfig>,
    /// Accepted API keys.
    pub api_keys: ApiKeys,
    /// Rate limits.
    pub rate_limiter: RateLimiter,
    /// Routing policy and bounded-load slack.
    pub routing: RoutingConfig,
    /// Skill detection for requests that name no skills.
    pub detector: DetectorSettings,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most backends tried per request.
    pub max_attempts: usize,
    /// Time allowed to open a connection to a backend.
    pub connect_timeout: Duration,
    /// Most prefix blocks remembered per backend (fewer when its KV pool is smaller).
    pub prefix_index_blocks: usize,
    /// Longest wait between reconnects of an admin event stream.
    pub max_reconnect_backoff: Duration,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Kubernetes discovery; `None`: the backends, keys and limits above stay as they are.
    pub discovery: Option<DiscoveryConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            health_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            backends: Vec::new(),
            api_keys: ApiKeys::default(),
            rate_limiter: RateLimiter::default(),
            routing: RoutingConfig::default(),
            detector: DetectorSettings::default(),
            max_body_bytes: 4 * 1024 * 1024,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(2),
            prefix_index_blocks: 65_536,
            max_reconnect_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(55),
            discovery: None,
        }
    }
}

fn read_token(path: &Path) -> Result<String, ConfigureRouterError> {
    std::fs::read_to_string(path)
        .map(|token| token.trim().to_string())
        .map_err(|source| ConfigureRouterError::AdminToken {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether this process runs in a Kubernetes pod.
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

impl RouterArgs {
    /// Reads the files the flags name and resolves every backend, or sets up Kubernetes
    /// discovery (see [`DiscoveryMode`]).
    pub fn into_config(self) -> Result<RouterConfig, ConfigureRouterError> {
        self.into_config_where(in_cluster())
    }

    /// [`RouterArgs::into_config`], told whether the router runs in a pod.
    pub fn into_config_where(self, in_cluster: bool) -> Result<RouterConfig, ConfigureRouterError> {
        let discover = match self.discovery {
            DiscoveryMode::Static => false,
            DiscoveryMode::Kubernetes if !self.backends.is_empty() => {
                return Err(ConfigureRouterError::BackendsWithDiscovery);
            }
            DiscoveryMode::Kubernetes => true,
            DiscoveryMode::Auto => self.backends.is_empty() && in_cluster,
        };
        if self.backends.is_empty() && !discover {
            return Err(ConfigureRouterError::NoBackends);
        }
        let shared_token = self
            .admin_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let discovery = discover.then(|| DiscoveryConfig {
            namespace: Some(self.watch_namespace.trim().to_string()).filter(|n| !n.is_empty()),
            api_key_selector: self
                .api_keys_file
                .is_none()
                .then(|| self.api_key_selector.clone()),
            watch_rate_limits: self.rate_limits_file.is_none(),
            router_service: self
                .router_service
                .clone()
                .filter(|name| !name.trim().is_empty())
                .map(|name| (self.namespace.clone(), name.trim().to_string())),
            replicas: self.replicas.max(1),
            fallback_admin_token: shared_token.clone(),
        });
        let mut backends = Vec::new();
        for spec in self.backends {
            let admin_url = match &spec.admin {
                AdminEndpoint::Disabled => None,
                AdminEndpoint::Url(url) => Some(url.clone()),
                AdminEndpoint::NextPort => Some(next_port_url(&spec.url)?),
            };
            let admin_token = match &spec.admin_token_file {
                Some(path) => Some(read_token(path)?),
                None => shared_token.clone(),
            };
            backends.push(BackendConfig {
                admin_url,
                admin_token,
                ..BackendConfig::without_admin(&spec.url)
            });
        }
        let api_keys = match &self.api_keys_file {
            Some(path) => ApiKeys::load(path, self.require_api_key)?,
            None => ApiKeys::new(Vec::new(), self.require_api_key),
        };
        let rate_limiter = match &self.rate_limits_file {
            Some(path) => RateLimiter::load(path, self.replicas)?,
            None => RateLimiter::default(),
        };
        let detector = DetectorSettings::load(self.detector_embeddings.as_deref())
            .map_err(ConfigureRouterError::DetectorEmbeddings)?;
        Ok(RouterConfig {
            listen: self.listen,
            health_listen: self.metrics_listen,
            backends,
            api_keys,
            rate_limiter,
            routing: RoutingConfig {
                policy: self.policy,
                load_epsilon: self.load_epsilon,
            },
            max_body_bytes: self.max_body_bytes,
            max_attempts: self.max_attempts.max(1),
            prefix_index_blocks: self.prefix_index_blocks,
            detector,
            discovery,
            ..RouterConfig::default()
        })
    }
}

fn next_port_url(url: &str) -> Result<String, ConfigureRouterError> {
    let problem = |problem: &str| ConfigureRouterError::Backend {
        value: url.to_string(),
        problem: problem.to_string(),
    };
    let (_, port) = base_url(url).map_err(|e| problem(&e))?;
    let port =
        port.ok_or_else(|| problem("no port to derive the admin port from; add admin=URL"))?;
    let admin_port = port
        .checked_add(1)
        .ok_or_else(|| problem("port 65535 has no next port; add admin=URL"))?;
    let host = url.trim_end_matches(&format!(":{port}"));
    Ok(format!("{host}:{admin_port}"))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
