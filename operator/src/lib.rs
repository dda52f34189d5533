//! skillkv's Kubernetes operator as a library: the `controller` subcommand's reconcilers and
//! their pure building blocks. The binary (`main.rs`) only parses flags and calls [`controller::run`].

pub mod build;
pub mod conditions;
pub mod context;
pub mod controller;
pub mod daemon;
pub mod fleet;
pub mod names;
pub mod rate_limit;
pub mod settings;
pub mod skill_finalizer;

#[cfg(test)]
pub mod fixtures;
