//! Snapshot tests of the generated children (committed under `snapshots/`; review changes with
//! `cargo insta review`), plus targeted assertions on what each spec field changes.

use super::*;
use serde_json::json;
use skillkv_api::v1alpha1::ModelDeployment;

pub(super) const CONFIG: DaemonPoolConfig<'static> = DaemonPoolConfig {
    default_image: "ghcr.io/skillkv/skillkv:0.1.0",
    pull_policy: "IfNotPresent",
    pull_secrets: &[],
    model_cache_dir: "/var/cache/skillkv/models",
    fetch_image: None,
};

pub(super) fn model(spec: serde_json::Value) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "skillkv.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llm", "namespace": "team", "uid": "0b6f-uid"},
        "spec": spec,
    }))
    .expect("valid ModelDeployment")
}

fn gpu_model() -> ModelDeployment {
    model(json!({
        "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2.q4_1.gguf", "sha256": "a".repeat(64)},
        "servedName": "smollm2",
        "replicas": 3,
        "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
        "placement": {
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        },
        "engine": {"kvCacheBytes": 1073741824, "pinnedFraction": 0.25, "maxBatchTokens": 1024, "maxSeqs": 32},
        "persistence": {"hostPath": "/var/lib/skillkv"}
    }))
}

#[test]
fn cpu_deployment_from_a_node_file() {
    let md = model(json!({"model": {"uri": "file:///models/smollm2.gguf"}}));
    let deployment = build_daemon_deployment(&md, CONFIG).expect("builds");
    insta::assert_yaml_snapshot!("cpu_deployment", deployment);
}

#[test]
fn gpu_deployment_from_the_hub_with_persistence() {
    let deployment = build_daemon_deployment(&gpu_model(), CONFIG).expect("builds");
    insta::assert_yaml_snapshot!("gpu_deployment", deployment);
}

#[test]
fn headless_service() {
    let service = build_daemon_service(&gpu_model()).expect("builds");
    insta::assert_yaml_snapshot!("service", service);
}

#[test]
fn gpus_are_limits_and_absent_on_cpu() {
    let gpu = build_daemon_deployment(&gpu_model(), CONFIG).expect("builds");
    let pod = gpu.spec.and_then(|s| s.template.spec).expect("pod spec");
    let limits = pod.containers[0]
        .resources
        .clone()
        .and_then(|r| r.limits)
        .unwrap_or_default();
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );

    let cpu = build_daemon_deployment(
        &model(json!({"model": {"uri": "file:///m.gguf"}, "resources": {"gpus": 0}})),
        CONFIG,
    )
    .expect("builds");
    let pod = cpu.spec.and_then(|s| s.template.spec).expect("pod spec");
    let limits = pod.containers[0]
        .resources
        .clone()
        .and_then(|r| r.limits)
        .unwrap_or_default();
    assert!(!limits.contains_key("nvidia.com/gpu"));
}

#[test]
fn every_child_is_owned_and_labelled() {
    let md = gpu_model();
    let deployment = build_daemon_deployment(&md, CONFIG).expect("builds");
    let service = build_daemon_service(&md).expect("builds");
    let secret = build_admin_token_secret(&md, "t").expect("builds");
    for meta in [&deployment.metadata, &service.metadata, &secret.metadata] {
        let owner = &meta.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.uid, "0b6f-uid");
        assert_eq!(owner.controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get(names::MODEL_LABEL).map(String::as_str),
            Some("llm")
        );
    }
}

#[test]
fn the_spec_image_wins_and_pull_secrets_pass_through() {
    let mut md = gpu_model();
    md.spec.image = Some("example.com/custom:1".to_owned());
    let secrets = ["regcred".to_owned()];
    let config = DaemonPoolConfig {
        pull_secrets: &secrets,
        ..CONFIG
    };
    let pod = build_daemon_deployment(&md, config)
        .expect("builds")
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("example.com/custom:1")
    );
    assert_eq!(
        pod.image_pull_secrets.expect("pull secrets")[0].name,
        "regcred"
    );
}

#[test]
fn an_object_without_uid_is_an_error() {
    let mut md = gpu_model();
    md.metadata.uid = None;
    assert!(build_daemon_service(&md).is_err());
}

#[test]
fn admin_tokens_are_random_hex() {
    let (a, b) = (generate_admin_token(), generate_admin_token());
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}
