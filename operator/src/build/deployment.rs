//! The Deployment of daemon pods generated for a ModelDeployment: image and arguments, resources
//! (`nvidia.com/gpu` when `gpus > 0`), placement, the model volume, the node-local skill KV store,
//! the admin-token Secret, probes and the `skillkv.io/skills-warm` readiness gate.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, LocalObjectReference, PodReadinessGate,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use skillkv_api::v1alpha1::{KvDtype, ModelDeployment};

use super::model_source::{ModelFetch, host_path_volume, resolve_model_uri};
use super::{BuildChildrenError, child_metadata};
use crate::names;

/// Where the node-local skill KV store is mounted in daemon pods.
pub const KV_STORE_MOUNT: &str = "/var/lib/skillkv/kv";
/// The daemon's log-format variable (its global `--log-format` flag); pods log JSON.
pub const DAEMON_LOG_FORMAT_ENV: &str = "SKILLKV_LOG_FORMAT";

/// Operator-wide inputs of the daemon Deployment (from the controller's settings).
#[derive(Debug, Clone, Copy)]
pub struct DaemonPoolConfig<'a> {
    /// Image for ModelDeployments without `spec.image`.
    pub default_image: &'a str,
    /// Image pull policy of daemon pods.
    pub pull_policy: &'a str,
    /// Image pull Secrets of daemon pods.
    pub pull_secrets: &'a [String],
    /// Node directory of the `hf://` model cache.
    pub model_cache_dir: &'a str,
    /// Image of the `hf://` download step (`sh`, `curl`, `sha256sum`); `None`: the daemon image.
    pub fetch_image: Option<&'a str>,
}

/// The arguments of `skillkv serve` in a daemon pod (`daemon/src/cli/serve.rs` defines them),
/// without `--kv-store`, which comes with the persistence volume. Unset engine settings are left
/// to the daemon's defaults.
pub fn daemon_args(model: &ModelDeployment, model_path: &str) -> Vec<String> {
    let token_path = format!("{}/{}", names::ADMIN_TOKEN_MOUNT, names::ADMIN_TOKEN_KEY);
    let mut args = vec![
        "serve".to_owned(),
        "--host=0.0.0.0".to_owned(),
        format!("--port={}", names::DAEMON_PUBLIC_PORT),
        format!("--admin-port={}", names::DAEMON_ADMIN_PORT),
        format!("--admin-token-file={token_path}"),
        format!("--model={model_path}"),
    ];
    let engine = model.spec.engine.clone().unwrap_or_default();
    if let Some(bytes) = engine.kv_cache_bytes {
        args.push(format!("--kv-cache-bytes={bytes}"));
    }
    if let Some(fraction) = engine.kv_cache_fraction {
        args.push(format!("--kv-cache-fraction={fraction}"));
    }
    if let Some(tokens) = engine.context_length {
        args.push(format!("--context-length={tokens}"));
    }
    if let Some(dtype) = engine.kv_dtype {
        args.push(format!("--kv-dtype={}", kv_dtype_flag(dtype)));
    }
    if let Some(fraction) = engine.pinned_fraction {
        args.push(format!("--pinned-fraction={fraction}"));
    }
    if let Some(tokens) = engine.max_batch_tokens {
        args.push(format!("--max-batch-tokens={tokens}"));
    }
    if let Some(seqs) = engine.max_seqs {
        args.push(format!("--max-seqs={seqs}"));
    }
    args
}

/// The KV element types this daemon version can store (its CPU backend: f32 only).
pub const SUPPORTED_KV_DTYPES: &[KvDtype] = &[KvDtype::F32];

/// The flag value of a KV element type.
fn kv_dtype_flag(dtype: KvDtype) -> &'static str {
    match dtype {
        KvDtype::F32 => "f32",
        KvDtype::F16 => "f16",
        KvDtype::Bf16 => "bf16",
    }
}

/// Refuses engine settings the daemon would reject at start, so that a pool is never rolled
/// onto pods that crash: today a `kvDtype` other than f32.
pub fn check_engine_settings(model: &ModelDeployment) -> Result<(), BuildChildrenError> {
    let requested = model
        .spec
        .engine
        .as_ref()
        .and_then(|engine| engine.kv_dtype);
    match requested {
        Some(dtype) if !SUPPORTED_KV_DTYPES.contains(&dtype) => {
            Err(BuildChildrenError::UnsupportedKvDtype(kv_dtype_flag(dtype)))
        }
        _ => Ok(()),
    }
}

/// Builds the daemon Deployment of a ModelDeployment.
pub fn build_daemon_deployment(
    model: &ModelDeployment,
    config: DaemonPoolConfig<'_>,
) -> Result<Deployment, BuildChildrenError> {
    let name = model
        .meta()
        .name
        .clone()
        .ok_or(BuildChildrenError::MissingMetadata("name"))?;
    check_engine_settings(model)?;
    let spec = &model.spec;
    let image = spec.image.as_deref().unwrap_or(config.default_image);
    let served_name = spec.served_name.as_deref().unwrap_or(&name);
    let model_mount = resolve_model_uri(
        &spec.model.uri,
        served_name,
        ModelFetch {
            image: config.fetch_image.unwrap_or(image),
            pull_policy: config.pull_policy,
            cache_dir: config.model_cache_dir,
            sha256: spec.model.sha256.as_deref(),
        },
    )?;

    let mut args = daemon_args(model, &model_mount.model_path);
    let mut volumes = vec![
        model_mount.volume,
        Volume {
            name: "admin-token".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::admin_token_secret_name(&name)),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        model_mount.mount,
        VolumeMount {
            name: "admin-token".to_owned(),
            mount_path: names::ADMIN_TOKEN_MOUNT.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let env = vec![EnvVar {
        name: DAEMON_LOG_FORMAT_ENV.to_owned(),
        value: Some("json".to_owned()),
        ..EnvVar::default()
    }];
    let tools_image = config.fetch_image.unwrap_or(image);
    let mut init_containers: Vec<Container> = model_mount.init_container.into_iter().collect();
    if let Some(persistence) = &spec.persistence {
        init_containers.push(prepare_kv_store(tools_image, config.pull_policy));
        volumes.push(host_path_volume(
            "kv-store",
            &persistence.host_path,
            "DirectoryOrCreate",
        ));
        mounts.push(VolumeMount {
            name: "kv-store".to_owned(),
            mount_path: KV_STORE_MOUNT.to_owned(),
            ..VolumeMount::default()
        });
        args.push(format!("--kv-store={KV_STORE_MOUNT}"));
    }

    let container = Container {
        name: "daemon".to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: Some(config.pull_policy.to_owned()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            container_port(names::PUBLIC_PORT_NAME, names::DAEMON_PUBLIC_PORT),
            container_port(names::ADMIN_PORT_NAME, names::DAEMON_ADMIN_PORT),
        ]),
        resources: Some(resources(model)),
        volume_mounts: Some(mounts),
        startup_probe: Some(http_probe("/healthz", 5, 120)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        security_context: Some(SecurityContext {
            run_as_user: Some(names::DAEMON_UID),
            run_as_group: Some(names::DAEMON_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let placement = spec.placement.clone().unwrap_or_default();
    let pod_spec = PodSpec {
        containers: vec![container],
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        volumes: Some(volumes),
        node_selector: placement.node_selector,
        tolerations: placement.tolerations,
        affinity: placement.affinity,
        readiness_gates: Some(vec![PodReadinessGate {
            condition_type: names::SKILLS_WARM_CONDITION.to_owned(),
        }]),
        image_pull_secrets: (!config.pull_secrets.is_empty()).then(|| {
            config
                .pull_secrets
                .iter()
                .map(|secret| LocalObjectReference {
                    name: secret.clone(),
                })
                .collect()
        }),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(45),
        ..PodSpec::default()
    };

    Ok(Deployment {
        metadata: child_metadata(model, names::daemon_pool_name(&name))?,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas.unwrap_or(1)),
            selector: LabelSelector {
                match_labels: Some(names::selector_labels(&name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::child_labels(&name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// The init container that hands the node's KV store folder (created root-owned by kubelet) to
/// the daemon's user, so that the daemon can save prefills there. Runs as root, in an image with
/// `sh`, `chown` and `chmod` (the daemon image, or `--model-fetch-image`).
fn prepare_kv_store(image: &str, pull_policy: &str) -> Container {
    let uid = names::DAEMON_UID;
    Container {
        name: "prepare-kv-store".to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: Some(pull_policy.to_owned()),
        command: Some(vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("chown {uid}:{uid} '{KV_STORE_MOUNT}' && chmod 0750 '{KV_STORE_MOUNT}'"),
        ]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "kv-store".to_owned(),
            mount_path: KV_STORE_MOUNT.to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// Requests equal limits for cpu and memory (a predictable pod); GPUs are limits only, as the
/// device plugin requires.
fn resources(model: &ModelDeployment) -> ResourceRequirements {
    let wanted = model.spec.resources.clone().unwrap_or_default();
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = wanted.cpu {
        requests.insert("cpu".to_owned(), cpu.clone());
        limits.insert("cpu".to_owned(), cpu);
    }
    if let Some(memory) = wanted.memory {
        requests.insert("memory".to_owned(), memory.clone());
        limits.insert("memory".to_owned(), memory);
    }
    if let Some(gpus) = wanted.gpus.filter(|gpus| *gpus > 0) {
        limits.insert("nvidia.com/gpu".to_owned(), Quantity(gpus.to_string()));
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(names::PUBLIC_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}
