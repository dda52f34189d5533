//! CPU reference implementations: one function per CUDA kernel, written for clarity rather than
//! speed, that defines what the kernel computes. The GPU tests compare every kernel against its
//! reference; the CPU backend may use them directly. Layouts follow the daemon's paged KV pool:
//! blocks of [`BLOCK_SIZE`](crate::registry::BLOCK_SIZE) tokens, K `[block][kv_head][head_dim]
//! [slot]`, V `[block][kv_head][slot][head_dim]`, all f32.

pub mod attention;
pub mod dequant;
pub mod elementwise;
pub mod kv;
pub mod rope;
