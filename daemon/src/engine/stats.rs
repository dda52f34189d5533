//! Plain snapshots of the engine's state (no metrics library here): KV block accounting and
//! queue figures. The server turns them into Prometheus metrics and admin-API load figures.

use serde::Serialize;

/// Where every KV block of the pool is. `free + cached + pinned + used == total` always, and
/// when the engine is idle `used == 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks on the free list.
    pub free: usize,
    /// Prefix-cache blocks no sequence references and no pin holds: evictable on demand.
    pub cached: usize,
    /// Prefix-cache blocks held by a pin (skills); never evicted.
    pub pinned: usize,
    /// Unpinned blocks referenced by running sequences.
    pub used: usize,
}

impl KvStats {
    /// Blocks a new allocation can get: free ones plus evictable cached ones.
    pub fn available(&self) -> usize {
        self.free + self.cached
    }
}

/// A snapshot of the scheduler: KV accounting plus queue lengths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// KV block accounting.
    pub kv: KvStats,
    /// Sequences admitted and running (prefill or decode).
    pub running: usize,
    /// Sequences waiting for admission (including preempted ones).
    pub waiting: usize,
    /// Sequences preempted since the engine started.
    pub preemptions: u64,
}
