//! The names and labels the controller gives a ModelDeployment's children, as the router finds
//! them: the shared definitions of `skillkv_api::names`, plus the EndpointSlice label.

pub use skillkv_api::names::{
    ADMIN_PORT_NAME, ADMIN_TOKEN_KEY, API_KEY_KEY, API_KEY_TENANT, MODEL_LABEL, PUBLIC_PORT_NAME,
    admin_token_secret_name, daemon_children_selector, daemon_pool_name as daemon_service_name,
};

/// Label the EndpointSlice controller sets to the Service's name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
