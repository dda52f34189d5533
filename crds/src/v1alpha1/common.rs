//! Types shared by several resources: references, conditions and placement states.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to a ModelDeployment in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// Name of the ModelDeployment (same namespace) whose pods serve this object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Standard Condition types used across the skillkv resources.
pub mod condition_types {
    /// The object does what it asks for (Skill, LoRAAdapter).
    pub const READY: &str = "Ready";
    /// The ModelDeployment has at least its minimum of ready pods.
    pub const AVAILABLE: &str = "Available";
    /// The controller is moving the object towards its spec.
    pub const PROGRESSING: &str = "Progressing";
    /// Something failed and needs attention; the reason says what.
    pub const DEGRADED: &str = "Degraded";
    /// A RateLimitPolicy was validated and published to the router.
    pub const ACCEPTED: &str = "Accepted";
    /// A RateLimitPolicy claims a subject another policy claims with different limits.
    pub const CONFLICTED: &str = "Conflicted";
}
