//! Names shared by every reconciler: the field manager, finalizer, labels, annotations, the
//! readiness gate, and the names of the children generated for a ModelDeployment (those the
//! router also relies on come from `skillkv_api::names`).

use std::collections::BTreeMap;

pub use skillkv_api::names::{
    ADMIN_PORT_NAME, ADMIN_TOKEN_KEY, API_KEY_SELECTOR, COMPONENT_LABEL, DAEMON_COMPONENT,
    MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL, PUBLIC_PORT_NAME, admin_token_secret_name,
    daemon_pool_name,
};

/// The one server-side-apply field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "skillkv-operator";
/// Finalizer on Skills: their KV is unpinned from the daemons before the object goes away.
pub const SKILL_FINALIZER: &str = "skillkv.io/unpin-skill";
/// Pod readiness gate (and condition type) set once a pod's pinned skills are warm.
pub const SKILLS_WARM_CONDITION: &str = "skillkv.io/skills-warm";
/// Where daemon pods mount the admin-token Secret.
pub const ADMIN_TOKEN_MOUNT: &str = "/var/run/skillkv/admin";
/// Public (OpenAI API, health) port of a daemon pod.
pub const DAEMON_PUBLIC_PORT: i32 = 8080;
/// Admin port of a daemon pod.
pub const DAEMON_ADMIN_PORT: i32 = 8081;
/// User and group the daemon container runs as (the daemon image's `USER`); the node-local KV
/// store is handed to them.
pub const DAEMON_UID: i64 = 65532;

/// Labels that select the daemon pods of one ModelDeployment.
pub fn selector_labels(model_deployment: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MODEL_LABEL.to_owned(), model_deployment.to_owned()),
        (COMPONENT_LABEL.to_owned(), DAEMON_COMPONENT.to_owned()),
    ])
}

/// Labels of every child of one ModelDeployment: the selector plus `managed-by`.
pub fn child_labels(model_deployment: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(model_deployment);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

/// The selector as the `status.selector` string of the `scale` subresource.
pub fn selector_string(model_deployment: &str) -> String {
    selector_labels(model_deployment)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}
