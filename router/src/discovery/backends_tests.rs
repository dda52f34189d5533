//! Unit tests of the backend set and adapters derived from cluster objects.

use serde_json::{Value, json};

use super::*;

fn model(namespace: &str, name: &str, served: Option<&str>) -> ModelDeployment {
    let mut spec = json!({"model": {"uri": "file:///models/m.gguf"}});
    if let Some(served) = served {
        spec["servedName"] = json!(served);
    }
    serde_json::from_value(json!({
        "apiVersion": "skillkv.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec
    }))
    .expect("a ModelDeployment")
}

fn endpoint(pod: &str, address: &str, ready: Option<bool>, terminating: bool) -> Value {
    let mut conditions = json!({"terminating": terminating});
    if let Some(ready) = ready {
        conditions["ready"] = json!(ready);
    }
    json!({"addresses": [address], "conditions": conditions,
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "x"}})
}

fn slice(namespace: &str, service: &str, family: &str, endpoints: Vec<Value>) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": [{"name": "admin", "port": 8081, "protocol": "TCP"},
                  {"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .expect("an EndpointSlice")
}

fn secret(namespace: &str, name: &str, labels: Value, data: Value) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": data
    }))
    .expect("a Secret")
}

/// base64 of `text`, as Secret data is written.
fn b64(text: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec())).expect("encodes")
}

#[test]
fn ready_endpoints_of_daemon_services_become_backends_with_their_pool_token() {
    let models = [model("team", "llama", None), model("other", "qwen", None)];
    let slices = [
        slice(
            "team",
            "llama-daemon",
            "IPv4",
            vec![
                endpoint("llama-daemon-a", "10.0.0.1", Some(true), false),
                endpoint("llama-daemon-b", "10.0.0.2", None, false),
                endpoint("llama-daemon-c", "10.0.0.3", Some(false), false),
                endpoint("llama-daemon-d", "10.0.0.4", Some(true), true),
            ],
        ),
        // The same pod again in a second slice: counted once.
        slice(
            "team",
            "llama-daemon",
            "IPv4",
            vec![endpoint("llama-daemon-a", "10.0.0.1", Some(true), false)],
        ),
        slice(
            "other",
            "qwen-daemon",
            "IPv6",
            vec![endpoint("qwen-daemon-a", "fd00::5", Some(true), false)],
        ),
        // Not a daemon pool: another Service, and a pool's name in the wrong namespace.
        slice(
            "team",
            "web",
            "IPv4",
            vec![endpoint("web-a", "10.0.0.9", Some(true), false)],
        ),
        slice(
            "team",
            "qwen-daemon",
            "IPv4",
            vec![endpoint("stray", "10.0.0.8", Some(true), false)],
        ),
    ];
    let tokens = BTreeMap::from([(("team".to_string(), "llama".to_string()), "t0k".to_string())]);
    let backends = desired_backends(&models, &slices, &tokens, Some("fallback"));
    let summary: Vec<(&str, &str, Option<&str>, Option<&str>)> = backends
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.url.as_str(),
                b.admin_url.as_deref(),
                b.admin_token.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "other/qwen-daemon-a",
                "http://[fd00::5]:8080",
                Some("http://[fd00::5]:8081"),
                Some("fallback"),
            ),
            (
                "team/llama-daemon-a",
                "http://10.0.0.1:8080",
                Some("http://10.0.0.1:8081"),
                Some("t0k"),
            ),
            (
                "team/llama-daemon-b",
                "http://10.0.0.2:8080",
                Some("http://10.0.0.2:8081"),
                Some("t0k"),
            ),
        ]
    );
    // Without its ModelDeployment, a pool's endpoints are not backends.
    assert!(desired_backends(&models[1..], &slices[..2], &tokens, None).is_empty());
}

#[test]
fn a_slice_without_an_admin_port_gives_backends_without_admin_api() {
    let mut only_http = slice(
        "team",
        "llama-daemon",
        "IPv4",
        vec![endpoint("p", "10.0.0.1", Some(true), false)],
    );
    only_http
        .ports
        .as_mut()
        .expect("ports")
        .retain(|p| p.name.as_deref() == Some("http"));
    let backends = desired_backends(
        &[model("team", "llama", None)],
        &[only_http],
        &BTreeMap::new(),
        None,
    );
    assert_eq!(backends.len(), 1);
    assert_eq!(backends[0].admin_url, None);
}

#[test]
fn admin_tokens_come_from_each_pools_secret() {
    let pool_labels = json!({"skillkv.io/model-deployment": "llama",
                             "app.kubernetes.io/component": "daemon"});
    let secrets = [
        secret(
            "team",
            "llama-admin-token",
            pool_labels.clone(),
            json!({"token": b64(" abc \n")}),
        ),
        // Wrong name for its label, empty token, token not UTF-8: all ignored.
        secret(
            "team",
            "something-else",
            pool_labels.clone(),
            json!({"token": b64("x")}),
        ),
        secret(
            "other",
            "llama-admin-token",
            pool_labels.clone(),
            json!({"token": b64("  ")}),
        ),
        secret(
            "third",
            "llama-admin-token",
            pool_labels,
            json!({"token": serde_json::to_value(k8s_openapi::ByteString(vec![0xff, 0xfe])).expect("encodes")}),
        ),
    ];
    assert_eq!(
        admin_tokens(&secrets),
        BTreeMap::from([(("team".to_string(), "llama".to_string()), "abc".to_string())])
    );
}

#[test]
fn adapters_map_to_their_base_models_served_name() {
    let adapter = |namespace: &str, name: &str, base: &str, served: &str| -> LoRAAdapter {
        serde_json::from_value(json!({
            "apiVersion": "skillkv.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"modelRef": {"name": base}, "source": {"uri": "file:///a"}, "servedName": served}
        }))
        .expect("a LoRAAdapter")
    };
    let models = [
        model("team", "llama", Some("llama-3")),
        model("team", "qwen", None),
    ];
    let adapters = [
        adapter("team", "b-sql", "llama", "sql"),
        adapter("team", "a-sql", "qwen", "sql"),
        adapter("team", "chat", "qwen", "chat"),
        adapter("elsewhere", "x", "llama", "x"),
        adapter("team", "missing", "gone", "missing"),
    ];
    let declared = declared_adapters(&models, &adapters);
    assert_eq!(
        declared,
        BTreeMap::from([
            ("chat".to_string(), "qwen".to_string()),
            ("sql".to_string(), "qwen".to_string()),
        ])
    );
}
