//! skillkv's contract between the operator, the router and the daemons: the custom resource
//! types (which generate the CRD manifests), the daemon admin-protocol types, and the prefix
//! block hash that the daemons' radix cache and the router's prefix index share.

pub mod admin;
pub mod block_hash;
pub mod crdgen;
pub mod names;
pub mod openai_error;
pub mod reference;
pub mod skills;
pub mod v1alpha1;
