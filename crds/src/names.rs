//! The names, labels and ports that the controller gives a ModelDeployment's children and that
//! the router finds them by: one definition for both, so a rename cannot silently break
//! discovery.

/// Label naming the ModelDeployment a daemon pod (or child object) belongs to.
pub const MODEL_LABEL: &str = "skillkv.io/model-deployment";
/// Label `app.kubernetes.io/managed-by`, set on every child.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "skillkv-operator";
/// Label `app.kubernetes.io/component` of daemon pods and their children.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Value of [`COMPONENT_LABEL`] for daemon pods.
pub const DAEMON_COMPONENT: &str = "daemon";
/// Key of the admin bearer token in the per-ModelDeployment Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Name of the daemons' public (OpenAI API, health) port in pods and the headless Service.
pub const PUBLIC_PORT_NAME: &str = "http";
/// Name of the daemons' admin port in pods and the headless Service.
pub const ADMIN_PORT_NAME: &str = "admin";
/// Default label selector of API-key Secrets (DESIGN §3).
pub const API_KEY_SELECTOR: &str = "skillkv.io/api-key=true";
/// Data key of the bearer token in an API-key Secret.
pub const API_KEY_KEY: &str = "key";
/// Data key of the optional tenant in an API-key Secret.
pub const API_KEY_TENANT: &str = "tenant";

/// Name of the daemon Deployment and the headless Service of a ModelDeployment.
pub fn daemon_pool_name(model_deployment: &str) -> String {
    format!("{model_deployment}-daemon")
}

/// Name of the Secret holding a ModelDeployment's daemon admin token.
pub fn admin_token_secret_name(model_deployment: &str) -> String {
    format!("{model_deployment}-admin-token")
}

/// Label selector of every daemon-pool child the controller creates (the headless Services,
/// so their EndpointSlices, which inherit the Service's labels, and the admin-token Secrets).
pub fn daemon_children_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={DAEMON_COMPONENT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_selector_names_the_controller_and_the_daemon_component() {
        assert_eq!(
            daemon_children_selector(),
            "app.kubernetes.io/managed-by=skillkv-operator,app.kubernetes.io/component=daemon"
        );
        assert_eq!(daemon_pool_name("llm"), "llm-daemon");
        assert_eq!(admin_token_secret_name("llm"), "llm-admin-token");
    }
}
