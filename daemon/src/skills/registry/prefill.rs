//! The prefill of one skill version: budget check, loading from the node's store or computing
//! and pinning, the atomic switch to the new version, and saving fresh KV to the store.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use skillkv_api::block_hash::BLOCK_TOKENS;
use skillkv_api::v1alpha1::PlacementState;

use super::{ServingVersion, SkillRegistry, SkillVersion};
use crate::engine::handle::{PinError, PinId, PinRequest, PinnedPrefix};
use crate::skills::store::StoredKv;

/// The message of a skill whose KV came from the node's store.
pub const LOADED_FROM_STORE: &str = "loaded from the node's KV store";

impl SkillRegistry {
    /// Prefills and pins revision `revision` of `name`, unless it was superseded meanwhile.
    pub(super) async fn prefill(self: Arc<Self>, name: String, revision: u64) {
        let Ok(_permit) = self.prefill_gate.acquire().await else {
            return;
        };
        let version = {
            let mut state = self.lock();
            let committed = state.committed_blocks();
            let budget = self.config.pinned_budget_blocks;
            let Some(entry) = state.skills.get_mut(&name) else {
                return;
            };
            if entry.revision != revision {
                return;
            }
            let tokens = entry.latest.prefix_tokens.len();
            let needed = tokens / BLOCK_TOKENS;
            if committed + needed > budget {
                entry.state = PlacementState::Failed;
                entry.message = Some(format!(
                    "InsufficientKVCapacity: the skill needs {needed} pinned KV blocks ({tokens} \
                     tokens) but only {} of the pinned budget of {budget} blocks are free",
                    budget.saturating_sub(committed)
                ));
                tracing::warn!(skill = %name, needed, budget, committed, "skill does not fit the pinned KV budget");
                self.publish(&mut state, &name);
                return;
            }
            entry.reserved_blocks = needed;
            entry.state = PlacementState::Prefilling;
            entry.message = None;
            let version = entry.latest.clone();
            self.publish(&mut state, &name);
            version
        };
        let tokens = version.prefix_tokens.len();
        let started = Instant::now();
        let (result, stored_cost) = match self.load_stored(&name, &version).await {
            Some(stored) => {
                let imported = self
                    .engine
                    .import_pinned(version.prefix_tokens.clone(), None, stored.kv)
                    .await;
                match imported {
                    Ok(pinned) => (Ok(pinned), Some(stored.prefill_nanos_per_token)),
                    Err(error) => {
                        tracing::warn!(skill = %name, %error, "stored KV could not be imported; prefilling");
                        (self.prefill_now(&name, &version).await, None)
                    }
                }
            }
            None => (self.prefill_now(&name, &version).await, None),
        };
        // Fresh KV is stored before the skill turns Ready, so Ready means "survives a restart".
        if let (Ok(pinned), None) = (&result, stored_cost) {
            let computed = tokens.saturating_sub(pinned.cached_tokens).max(1);
            let cost = (started.elapsed().as_nanos() / computed as u128) as u64;
            self.save_to_store(&name, &version, pinned.id, cost).await;
        }
        let elapsed = started.elapsed();
        let mut state = self.lock();
        let current = state
            .skills
            .get_mut(&name)
            .filter(|entry| entry.revision == revision);
        let Some(entry) = current else {
            drop(state);
            if let Ok(pinned) = result {
                self.release_pins(vec![pinned.id]);
            }
            return;
        };
        entry.reserved_blocks = 0;
        match result {
            Ok(pinned) => {
                let computed = tokens.saturating_sub(pinned.cached_tokens).max(1);
                let nanos_per_token =
                    stored_cost.unwrap_or((elapsed.as_nanos() / computed as u128) as u64);
                entry
                    .counters
                    .prefill_nanos_per_token
                    .store(nanos_per_token, Ordering::Relaxed);
                // Loaded from the node's store: nothing was prefilled.
                let prefill_millis = if stored_cost.is_some() {
                    0
                } else {
                    elapsed.as_millis() as u64
                };
                let pin = pinned.id;
                let old = entry.serving.replace(ServingVersion {
                    version: version.clone(),
                    pin,
                    blocks: pinned.hashes.len(),
                    prefill_millis,
                });
                entry.state = PlacementState::Ready;
                entry.message = stored_cost.map(|_| LOADED_FROM_STORE.to_string());
                tracing::info!(
                    skill = %name,
                    tokens,
                    pinned_tokens = pinned.pinned_tokens,
                    prefill_ms = prefill_millis,
                    from_store = stored_cost.is_some(),
                    tokens_per_s = tokens as f64 / elapsed.as_secs_f64().max(1e-9),
                    "skill ready"
                );
                self.publish(&mut state, &name);
                drop(state);
                self.release_pins(old.into_iter().map(|s| s.pin).collect());
            }
            Err(error) => {
                entry.state = PlacementState::Failed;
                entry.message = Some(format!("PrefillFailed: {error}"));
                tracing::warn!(skill = %name, %error, "skill prefill failed");
                self.publish(&mut state, &name);
            }
        }
    }

    /// Prefills and pins a version's prefix tokens.
    async fn prefill_now(
        &self,
        name: &str,
        version: &SkillVersion,
    ) -> Result<PinnedPrefix, PinError> {
        tracing::info!(skill = %name, tokens = version.prefix_tokens.len(), "prefilling skill");
        self.engine
            .pin(PinRequest {
                tokens: version.prefix_tokens.clone(),
                adapter: None,
            })
            .await
    }

    /// The version's KV from the node's store, if it holds a usable copy (a bad one is
    /// reported and removed by the store).
    async fn load_stored(&self, name: &str, version: &Arc<SkillVersion>) -> Option<StoredKv> {
        let store = self.store.clone()?;
        let (skill, version) = (name.to_string(), version.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            store.load(
                &skill,
                &version.document.content_hash,
                &version.prefix_tokens,
            )
        })
        .await
        .ok()?;
        match loaded {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(skill = %name, error = %error, "stored skill KV is unusable; prefilling again");
                None
            }
        }
    }

    /// Exports a fresh pin's KV and writes it to the node's store; failures are logged (the
    /// skill still serves, it is just prefilled again after a restart).
    async fn save_to_store(&self, name: &str, version: &Arc<SkillVersion>, pin: PinId, cost: u64) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let Some(kv) = self.engine.export_pin(pin).await else {
            return;
        };
        let (skill, version) = (name.to_string(), version.clone());
        let saved = tokio::task::spawn_blocking(move || {
            store.save(
                &skill,
                &version.document.content_hash,
                &version.prefix_tokens,
                &kv,
                cost,
            )
        })
        .await;
        match saved {
            Ok(Ok(path)) => {
                tracing::info!(skill = %name, path = %path.display(), "skill KV stored")
            }
            Ok(Err(error)) => {
                tracing::warn!(skill = %name, error = %error, "storing skill KV failed")
            }
            Err(error) => tracing::warn!(skill = %name, %error, "storing skill KV panicked"),
        }
    }
}
