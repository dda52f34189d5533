//! skillkv's contract between the operator, the router and the daemons: the custom resource
//! types (which generate the CRD manifests), the daemon admin-protocol types, the prefix
//! block hash that the daemons' radix cache and the router's prefix index share, and skill
//! placement (the operator's, which the routing benchmark reuses).

pub mod admin;
pub mod block_hash;
pub mod crdgen;
pub mod names;
pub mod openai_error;
pub mod placement;
pub mod reference;
pub mod skills;
pub mod v1alpha1;
