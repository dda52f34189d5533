//! Settings of `skillkv-operator controller`: flags with environment-variable fallbacks (the
//! Helm chart sets the variables listed in docs/helm.md).

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of the controller.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerSettings {
    /// Image of daemon pods for ModelDeployments without `spec.image`.
    #[arg(long, env = "SKILLKV_DAEMON_IMAGE", default_value = DEFAULT_DAEMON_IMAGE)]
    pub daemon_image: String,

    /// Pull policy of daemon pods (`Always`, `IfNotPresent`, `Never`).
    #[arg(
        long,
        env = "SKILLKV_DAEMON_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub daemon_image_pull_policy: String,

    /// Comma-separated image pull Secret names given to daemon pods.
    #[arg(long, env = "SKILLKV_DAEMON_IMAGE_PULL_SECRETS", default_value = "", value_parser = parse_name_list)]
    pub daemon_image_pull_secrets: NameList,

    /// Node directory where `hf://` models are downloaded and cached.
    #[arg(
        long,
        env = "SKILLKV_MODEL_CACHE_DIR",
        default_value = "/var/cache/skillkv/models"
    )]
    pub model_cache_dir: String,

    /// Image of the init step that downloads `hf://` models (needs `sh`, `curl` and
    /// `sha256sum`). Default: the daemon image.
    #[arg(long, env = "SKILLKV_MODEL_FETCH_IMAGE")]
    pub model_fetch_image: Option<String>,

    /// Name of the leader-election Lease (in `--namespace`).
    #[arg(long, env = "SKILLKV_LEASE_NAME", default_value = "skillkv-controller")]
    pub lease_name: String,

    /// Namespace of the Lease (the controller's own namespace).
    #[arg(long, env = "SKILLKV_POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// This replica's identity in the Lease.
    #[arg(
        long,
        env = "SKILLKV_POD_NAME",
        default_value = "skillkv-controller-local"
    )]
    pub identity: String,

    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoints.
    #[arg(long, env = "SKILLKV_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Label selector of API-key Secrets (for RateLimitPolicy `status.matchedKeys`).
    #[arg(
        long,
        env = "SKILLKV_API_KEY_SELECTOR",
        default_value = skillkv_api::names::API_KEY_SELECTOR
    )]
    pub api_key_selector: String,

    /// Log format: `json` or `text`.
    #[arg(long, env = "SKILLKV_LOG_FORMAT", default_value = "json")]
    pub log_format: String,

    /// Seconds between reconciles of a settled ModelDeployment (daemon state is polled).
    #[arg(long, env = "SKILLKV_RESYNC_SECONDS", default_value_t = 60)]
    pub resync_seconds: u64,

    /// Seconds between reconciles while skills are prefilling or pods are starting.
    #[arg(long, env = "SKILLKV_PROGRESS_SECONDS", default_value_t = 5)]
    pub progress_seconds: u64,

    /// Seconds a daemon admin request may take.
    #[arg(long, env = "SKILLKV_DAEMON_TIMEOUT_SECONDS", default_value_t = 10)]
    pub daemon_timeout_seconds: u64,
}

/// Default daemon image when neither the flag nor the environment names one.
pub const DEFAULT_DAEMON_IMAGE: &str =
    concat!("ghcr.io/skillkv/skillkv:", env!("CARGO_PKG_VERSION"));

/// A list of names given as one comma-separated string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameList(pub Vec<String>);

fn parse_name_list(text: &str) -> Result<NameList, std::convert::Infallible> {
    Ok(NameList(
        text.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

impl ControllerSettings {
    /// Requeue delay of a settled object.
    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds.max(1))
    }
    /// Requeue delay while something is in progress.
    pub fn progress(&self) -> Duration {
        Duration::from_secs(self.progress_seconds.max(1))
    }
    /// Timeout of one daemon admin request.
    pub fn daemon_timeout(&self) -> Duration {
        Duration::from_secs(self.daemon_timeout_seconds.max(1))
    }
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            daemon_image: DEFAULT_DAEMON_IMAGE.to_owned(),
            daemon_image_pull_policy: "IfNotPresent".to_owned(),
            daemon_image_pull_secrets: NameList::default(),
            model_cache_dir: "/var/cache/skillkv/models".to_owned(),
            model_fetch_image: None,
            lease_name: "skillkv-controller".to_owned(),
            namespace: "default".to_owned(),
            identity: "skillkv-controller-local".to_owned(),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            api_key_selector: skillkv_api::names::API_KEY_SELECTOR.to_owned(),
            log_format: "json".to_owned(),
            resync_seconds: 60,
            progress_seconds: 5,
            daemon_timeout_seconds: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_secret_list_drops_blanks_and_spaces() {
        let parsed = parse_name_list(" a, ,b,").unwrap_or_default();
        assert_eq!(parsed, NameList(vec!["a".to_owned(), "b".to_owned()]));
    }
}
