//! Pure functions from a ModelDeployment to the children the controller applies: the daemon
//! Deployment, its headless Service and the admin-token Secret, each owner-referenced to the
//! ModelDeployment and labelled so that orphans can be found by label.

mod deployment;
mod model_source;

pub use deployment::{
    DAEMON_LOG_FORMAT_ENV, DaemonPoolConfig, KV_STORE_MOUNT, SUPPORTED_KV_DTYPES,
    build_daemon_deployment, check_engine_settings, daemon_args,
};
pub use model_source::{
    ModelFetch, ModelMount, ResolveModelUriError, resolve_model_uri, served_model_path,
};

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use skillkv_api::v1alpha1::ModelDeployment;

use crate::names;

/// Why the children of a ModelDeployment could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum BuildChildrenError {
    /// The object has no name, namespace or uid (it was not read from the API server).
    #[error("the ModelDeployment lacks metadata.{0}")]
    MissingMetadata(&'static str),
    /// `model.uri` cannot be mounted, or `servedName` cannot name the model file.
    #[error(transparent)]
    ModelUri(#[from] ResolveModelUriError),
    /// `engine.kvDtype` names an element type the daemon cannot store.
    #[error(
        "engine.kvDtype {0} is not supported by this daemon version (its CPU backend stores the KV cache as f32)"
    )]
    UnsupportedKvDtype(&'static str),
}

/// The owner reference every child carries (controller, blocks owner deletion).
pub fn owner_reference(model: &ModelDeployment) -> Result<OwnerReference, BuildChildrenError> {
    model
        .controller_owner_ref(&())
        .ok_or(BuildChildrenError::MissingMetadata("uid"))
}

/// Metadata of a child: name, namespace, labels and the owner reference.
pub fn child_metadata(
    model: &ModelDeployment,
    name: String,
) -> Result<ObjectMeta, BuildChildrenError> {
    let namespace = model
        .namespace()
        .ok_or(BuildChildrenError::MissingMetadata("namespace"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        labels: Some(names::child_labels(&model.name_any())),
        owner_references: Some(vec![owner_reference(model)?]),
        ..ObjectMeta::default()
    })
}

/// The headless Service of the daemon pods: the router discovers them through its
/// EndpointSlices.
pub fn build_daemon_service(model: &ModelDeployment) -> Result<Service, BuildChildrenError> {
    let name = model
        .meta()
        .name
        .clone()
        .ok_or(BuildChildrenError::MissingMetadata("name"))?;
    Ok(Service {
        metadata: child_metadata(model, names::daemon_pool_name(&name))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(names::selector_labels(&name)),
            ports: Some(vec![
                service_port(names::PUBLIC_PORT_NAME, names::DAEMON_PUBLIC_PORT),
                service_port(names::ADMIN_PORT_NAME, names::DAEMON_ADMIN_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// The Secret holding the daemons' admin bearer token, mounted into every daemon pod and read by
/// the controller. The token is chosen once by the caller ([`generate_admin_token`]) and kept.
pub fn build_admin_token_secret(
    model: &ModelDeployment,
    token: &str,
) -> Result<Secret, BuildChildrenError> {
    let name = model
        .meta()
        .name
        .clone()
        .ok_or(BuildChildrenError::MissingMetadata("name"))?;
    Ok(Secret {
        metadata: child_metadata(model, names::admin_token_secret_name(&name))?,
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            names::ADMIN_TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

/// A fresh admin token: 32 random bytes, hex.
pub fn generate_admin_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod daemon_cli_tests;
#[cfg(test)]
mod tests;
