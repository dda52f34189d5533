//! Pure functions from what the cluster says to the backends the router routes to: the ready
//! endpoints of every ModelDeployment's headless Service (its EndpointSlices) become backends
//! with the pool's admin token, and LoRAAdapters become adapter ids served by their base model.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::ResourceExt;
use skillkv_api::v1alpha1::{LoRAAdapter, ModelDeployment};

use super::names;
use crate::config::BackendConfig;

/// A ModelDeployment, by namespace and name.
pub type PoolKey = (String, String);

/// The admin token of every pool whose admin-token Secret is readable, by pool.
pub fn admin_tokens(secrets: &[Secret]) -> BTreeMap<PoolKey, String> {
    secrets
        .iter()
        .filter_map(|secret| {
            let pool = secret.labels().get(names::MODEL_LABEL)?;
            if secret.name_any() != names::admin_token_secret_name(pool) {
                return None;
            }
            let bytes = secret.data.as_ref()?.get(names::ADMIN_TOKEN_KEY)?;
            let token = std::str::from_utf8(&bytes.0).ok()?.trim();
            (!token.is_empty()).then(|| {
                (
                    (secret.namespace().unwrap_or_default(), pool.clone()),
                    token.to_string(),
                )
            })
        })
        .collect()
}

/// Whether an endpoint takes traffic: ready (unknown counts as ready, as the API documents)
/// and not terminating.
fn is_ready(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    conditions.and_then(|c| c.ready).unwrap_or(true)
        && !conditions.and_then(|c| c.terminating).unwrap_or(false)
}

fn port_named(slice: &EndpointSlice, name: &str) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| p.port)
        .and_then(|port| u16::try_from(port).ok())
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// The backends of every ready daemon endpoint of `models`' headless Services, sorted by name.
/// A backend is named `namespace/pod` (or `namespace/address` without a pod reference); an
/// endpoint listed twice (slices overlap while they are rebalanced) counts once. Pools without
/// an admin token get `fallback_token`.
pub fn desired_backends(
    models: &[ModelDeployment],
    slices: &[EndpointSlice],
    tokens: &BTreeMap<PoolKey, String>,
    fallback_token: Option<&str>,
) -> Vec<BackendConfig> {
    let services: BTreeMap<(String, String), PoolKey> = models
        .iter()
        .map(|model| {
            let namespace = model.namespace().unwrap_or_default();
            let name = model.name_any();
            (
                (namespace.clone(), names::daemon_service_name(&name)),
                (namespace, name),
            )
        })
        .collect();
    let mut backends: BTreeMap<String, BackendConfig> = BTreeMap::new();
    for slice in slices {
        let namespace = slice.namespace().unwrap_or_default();
        let Some(service) = slice.labels().get(names::SERVICE_NAME_LABEL) else {
            continue;
        };
        let Some(pool) = services.get(&(namespace.clone(), service.clone())) else {
            continue;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(public_port) = port_named(slice, names::PUBLIC_PORT_NAME) else {
            continue;
        };
        let admin_port = port_named(slice, names::ADMIN_PORT_NAME);
        let token = tokens
            .get(pool)
            .map(String::as_str)
            .or(fallback_token)
            .map(str::to_string);
        for endpoint in slice.endpoints.iter().filter(|e| is_ready(e)) {
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
                .unwrap_or(address);
            let name = format!("{namespace}/{pod}");
            backends
                .entry(name.clone())
                .or_insert_with(|| BackendConfig {
                    name,
                    url: format!("http://{}", authority(address, public_port)),
                    admin_url: admin_port
                        .map(|port| format!("http://{}", authority(address, port))),
                    admin_token: token.clone(),
                });
        }
    }
    backends.into_values().collect()
}

/// The model id a ModelDeployment serves: `servedName`, default its name.
pub fn served_name(model: &ModelDeployment) -> String {
    model
        .spec
        .served_name
        .clone()
        .unwrap_or_else(|| model.name_any())
}

/// Every LoRAAdapter whose ModelDeployment exists: its served name → the base model's id. When
/// two adapters claim one served name, the first by namespace and name wins.
pub fn declared_adapters(
    models: &[ModelDeployment],
    adapters: &[LoRAAdapter],
) -> BTreeMap<String, String> {
    let bases: BTreeMap<PoolKey, String> = models
        .iter()
        .map(|m| {
            (
                (m.namespace().unwrap_or_default(), m.name_any()),
                served_name(m),
            )
        })
        .collect();
    let mut sorted: Vec<&LoRAAdapter> = adapters.iter().collect();
    sorted.sort_by_key(|a| (a.namespace(), a.name_any()));
    let mut declared = BTreeMap::new();
    for adapter in sorted {
        let key = (
            adapter.namespace().unwrap_or_default(),
            adapter.spec.model_ref.name.clone(),
        );
        if let Some(base) = bases.get(&key) {
            declared
                .entry(adapter.spec.served_name.clone())
                .or_insert_with(|| base.clone());
        }
    }
    declared
}

#[cfg(test)]
#[path = "backends_tests.rs"]
mod tests;
