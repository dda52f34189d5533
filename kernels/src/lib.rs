//! skillkv's CUDA kernels and their CPU reference implementations.
//!
//! - [`registry`]: the CUDA C sources (embedded, compiled at run time with NVRTC for the
//!   device's compute capability) and their entry points;
//! - [`reference`](mod@reference): a Rust implementation of every kernel that defines its semantics;
//! - [`ops`]: the forward pass's operations behind one trait, checked before they run, on the
//!   host (the references) and, with the `cuda` feature, on a device (the kernels and cuBLAS);
//! - with the `cuda` feature, [`nvrtc`] compiles the registry (and caches the PTX),
//!   [`loader`] loads it into a CUDA context and [`probe`] finds out, without panicking, whether NVRTC, the driver, cuBLAS and a device
//!   are there, and [`gemm`] opens a device for the engine and runs its projections through
//!   cuBLAS. cudarc loads every CUDA library dynamically, so the crate builds on machines
//!   without a CUDA toolkit.

#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod loader;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod ops;
#[cfg(feature = "cuda")]
pub mod probe;
pub mod reference;
pub mod registry;
