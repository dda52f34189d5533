//! skillkv daemon: the inference engine, skills (prefill, pinning, assembly), the HTTP server
//! (`skillkv serve`), GPU telemetry and the command line.

pub mod cli;
pub mod engine;
pub mod server;
pub mod skills;
pub mod telemetry;
