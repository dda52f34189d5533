//! The names and labels the controller gives a ModelDeployment's children, as the router finds
//! them. They mirror `operator/src/names.rs` (the operator crate depends on this one, so it
//! cannot be imported from here); a change there must be made here too.

/// Label naming the ModelDeployment a child belongs to.
pub const MODEL_LABEL: &str = "skillkv.io/model-deployment";
/// Label selector of the controller's daemon-pool children: the headless Services (so their
/// EndpointSlices, which inherit the Service's labels) and the admin-token Secrets.
pub const DAEMON_CHILDREN_SELECTOR: &str =
    "app.kubernetes.io/managed-by=skillkv-operator,app.kubernetes.io/component=daemon";
/// Label the EndpointSlice controller sets to the Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Name of the daemons' public (OpenAI API) port in the headless Service.
pub const PUBLIC_PORT_NAME: &str = "http";
/// Name of the daemons' admin port in the headless Service.
pub const ADMIN_PORT_NAME: &str = "admin";
/// Key of the admin bearer token in the admin-token Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Data key of the bearer token in an API-key Secret (DESIGN §3).
pub const API_KEY_KEY: &str = "key";
/// Data key of the optional tenant in an API-key Secret.
pub const API_KEY_TENANT: &str = "tenant";

/// The headless Service of a ModelDeployment's daemon pods.
pub fn daemon_service_name(model_deployment: &str) -> String {
    format!("{model_deployment}-daemon")
}

/// The Secret holding a ModelDeployment's daemon admin token.
pub fn admin_token_secret_name(model_deployment: &str) -> String {
    format!("{model_deployment}-admin-token")
}
