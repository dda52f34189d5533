//! The `skillkv.io/v1alpha1` custom resources: their specs, statuses, schema validation
//! (ranges, enums, required fields, CEL rules across fields) and CRD metadata (printer
//! columns, short names, the `skillkv` category, subresources).

mod common;
mod lora_adapter;
mod model_deployment;
mod rate_limit_policy;
mod skill;

pub use common::*;
pub use lora_adapter::*;
pub use model_deployment::*;
pub use rate_limit_policy::*;
pub use skill::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every skillkv resource.
pub const GROUP: &str = "skillkv.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD of this version, in a stable order (the order of the generated files).
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        ModelDeployment::crd(),
        Skill::crd(),
        LoRAAdapter::crd(),
        RateLimitPolicy::crd(),
    ]
}
