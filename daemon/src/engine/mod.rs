//! The inference engine: model loading and the forward pass (D1), tokenization, chat templates
//! and sampling (C), and the KV block allocator, radix prefix cache, continuous-batching
//! scheduler and the engine thread with its public API (D2).
//!
//! Other engineers add their `pub mod` lines here; this file owns only the module list and the
//! re-exports the rest of the daemon uses.

pub mod batch;
pub mod blocks;
pub mod chat_template;
pub mod detokenize;
pub mod device;
pub mod gguf;
pub mod handle;
pub mod kv_pool;
pub mod model;
pub mod radix;
pub mod sampling;
pub mod scheduler;
pub mod stats;
pub mod stop;
pub mod testing;
pub mod tokenizer;

pub use handle::{
    Engine, EngineConfig, EngineHandle, FinishReason, GenerateRequest, GenerationEvent,
    GenerationStream, KvCacheSize, ModularSpan, SubmitError,
};
pub use scheduler::ForwardModel;
pub use stats::{EngineStats, KvStats};
