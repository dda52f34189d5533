//! The KV of skills this daemon does not pin. Each skill of a request whose segment the engine
//! can serve from the skill's own KV — the first skill (it is the prompt's prefix) and every
//! later `modular` one (copied and re-rotated) — but which is not pinned here is prefilled on
//! its own into the prefix cache before the request is queued, or found there already. Its KV
//! then serves this request and every later one on this daemon until the cache evicts it
//! (least recently used first, like any cached prefix), and the router, which sees the blocks
//! stored, sends the skill's next requests here: a skill placed on one pod becomes warm on
//! whichever pods its traffic reaches, within their unpinned KV.
//!
//! Prefilling a later modular segment on its own costs no more than computing it in context
//! (its tokens attend to fewer positions), and the request is then assembled exactly as it is
//! where the skill is pinned. Nothing holds the blocks between the prefill and the request's
//! admission: under memory pressure they may be evicted in between, and the segment is then
//! computed in context, as it would be without this step — never a request refused for KV
//! that a pin held.
//!
//! Requests that need a skill while it is being prefilled wait for that one prefill
//! ([`UnpinnedSkillCache`] keeps one per skill version in flight) instead of each computing it
//! again; so these prefills, which run before a request meets admission control, never queue
//! more than one per skill version however many requests arrive.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared, join_all};
use skillkv_api::block_hash::BLOCK_TOKENS;
use skillkv_api::v1alpha1::Assembly;

use crate::engine::EngineHandle;
use crate::engine::handle::{CachedPrefix, PinError, PinRequest};
use crate::skills::ResolvedSkill;

type SharedPrefill = Shared<BoxFuture<'static, Result<CachedPrefix, PinError>>>;

/// What [`UnpinnedSkillCache::prepare`] did with one request's unpinned skills (those whose
/// segment is served from their own KV), for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpinnedPrepared {
    /// Found in the prefix cache already.
    pub cached: usize,
    /// Prefilled on their own now.
    pub prefilled: usize,
    /// The engine could not prefill them; computed in context.
    pub failed: usize,
    /// Not looked at: the engine's waiting queue was full.
    pub skipped: usize,
}

/// The prefills of unpinned skills in flight, one per skill version (by content hash), shared
/// by every request that needs the skill meanwhile.
#[derive(Default)]
pub struct UnpinnedSkillCache {
    in_flight: Mutex<HashMap<String, SharedPrefill>>,
}

impl fmt::Debug for UnpinnedSkillCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnpinnedSkillCache")
            .field("in_flight", &self.lock().len())
            .finish()
    }
}

/// Whether the segment of the skill at `index` in a prompt is served from the skill's own KV
/// when that KV is at hand.
fn reusable(index: usize, assembly: Assembly) -> bool {
    index == 0 || assembly == Assembly::Modular
}

impl UnpinnedSkillCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, SharedPrefill>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The prefill of `skill`'s own KV: the one in flight, or a new one.
    fn prefill(&self, engine: &EngineHandle, skill: &ResolvedSkill) -> (String, SharedPrefill) {
        let key = skill.version.document.content_hash.clone();
        let mut in_flight = self.lock();
        let prefill = in_flight
            .entry(key.clone())
            .or_insert_with(|| {
                let engine = engine.clone();
                let tokens = skill.version.prefix_tokens.clone();
                async move {
                    engine
                        .cache_prefix(PinRequest {
                            tokens,
                            adapter: None,
                        })
                        .await
                }
                .boxed()
                .shared()
            })
            .clone();
        (key, prefill)
    }

    /// Prefills into the prefix cache (or finds there) the own KV of every skill in `skills`
    /// (in prompt order) that is reusable but not pinned, and marks those found already cached
    /// ([`ResolvedSkill::cached`]). A skill the engine cannot prefill (it refused, or stopped)
    /// is computed in context, as without this step. Nothing is prefilled while the engine's
    /// waiting queue is full: the request is about to be refused with 429.
    pub async fn prepare(
        &self,
        engine: &EngineHandle,
        skills: &mut [(ResolvedSkill, Range<usize>)],
    ) -> UnpinnedPrepared {
        let mut prepared = UnpinnedPrepared::default();
        let wanted: Vec<usize> = skills
            .iter()
            .enumerate()
            .filter(|(index, (skill, _))| {
                !skill.warm
                    && reusable(*index, skill.assembly)
                    && skill.version.prefix_tokens.len() >= BLOCK_TOKENS
            })
            .map(|(index, _)| index)
            .collect();
        if engine.waiting_is_full() {
            prepared.skipped = wanted.len();
            return prepared;
        }
        let prefills: Vec<(String, SharedPrefill)> = wanted
            .iter()
            .map(|&index| self.prefill(engine, &skills[index].0))
            .collect();
        let outcomes = join_all(prefills.iter().map(|(_, prefill)| prefill.clone())).await;
        {
            // Done: the next request starts its own (cheap, if the blocks are still cached).
            let mut in_flight = self.lock();
            for (key, prefill) in &prefills {
                if in_flight
                    .get(key)
                    .is_some_and(|current| current.ptr_eq(prefill))
                {
                    in_flight.remove(key);
                }
            }
        }
        for (index, outcome) in wanted.into_iter().zip(outcomes) {
            let skill = &mut skills[index].0;
            match outcome {
                Ok(prefix) => {
                    skill.cached = prefix.was_cached();
                    if skill.cached {
                        prepared.cached += 1;
                    } else {
                        prepared.prefilled += 1;
                    }
                    tracing::debug!(
                        skill = %skill.name,
                        cached = skill.cached,
                        tokens = prefix.full_tokens,
                        "unpinned skill's KV in the prefix cache"
                    );
                }
                Err(error) => {
                    prepared.failed += 1;
                    tracing::warn!(
                        skill = %skill.name,
                        error = %error,
                        "could not prefill an unpinned skill on its own; computing it in context"
                    );
                }
            }
        }
        prepared
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use skillkv_api::block_hash::HashNamespace;
    use skillkv_api::skills::SkillDocument;

    use super::*;
    use crate::engine::model::{LlamaModel, LoadOptions};
    use crate::engine::testing::{TinyModelSpec, write_tiny_gguf};
    use crate::engine::{Engine, EngineConfig, KvCacheSize};
    use crate::skills::{SkillVersion, TokenizedSkill};

    fn engine() -> EngineHandle {
        engine_with(EngineConfig {
            kv_cache: KvCacheSize::Blocks(64),
            ..EngineConfig::default()
        })
    }

    fn engine_with(config: EngineConfig) -> EngineHandle {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &TinyModelSpec::default()).expect("tiny model");
        let loaded = LlamaModel::load(&path, &LoadOptions::default()).expect("loads");
        Engine::start(Arc::new(loaded.model), None, config).expect("engine starts")
    }

    fn skill(name: &str, warm: bool, assembly: Assembly) -> ResolvedSkill {
        let text = format!("---\nname: {name}\ndescription: d\n---\nbody of {name}\n");
        let document = SkillDocument::parse(Path::new("SKILL.md"), text).expect("parses");
        let salt = name.len() as u32;
        ResolvedSkill {
            name: name.to_string(),
            version: Arc::new(SkillVersion::new(
                document,
                TokenizedSkill {
                    rendered: String::new(),
                    tokens: (0..40).map(|i| (i * 7 + salt) % 250 + 3).collect(),
                },
                HashNamespace::default().root(),
            )),
            warm,
            cached: false,
            assembly,
            counters: Arc::default(),
        }
    }

    /// (cached, prefilled, failed, skipped)
    fn counts(prepared: UnpinnedPrepared) -> (usize, usize, usize, usize) {
        (
            prepared.cached,
            prepared.prefilled,
            prepared.failed,
            prepared.skipped,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_needing_the_same_skill_share_one_prefill_and_then_find_it_cached() {
        let engine = engine();
        let cache = UnpinnedSkillCache::default();
        let gamma = skill("gamma", false, Assembly::Modular);
        let (_, first) = cache.prefill(&engine, &gamma);
        let (_, second) = cache.prefill(&engine, &gamma);
        assert!(first.ptr_eq(&second));

        // This request joins the prefill in flight: not found cached, but cached now.
        let mut skills = vec![(gamma.clone(), 0..40)];
        let prepared = cache.prepare(&engine, &mut skills).await;
        assert_eq!(counts(prepared), (0, 1, 0, 0));
        assert!(!skills[0].0.cached);
        assert_eq!(cache.lock().len(), 0);
        let stats = engine.kv_stats().await.expect("stats");
        assert_eq!(
            (stats.cached, stats.pinned, stats.used),
            (2, 0, 0),
            "{stats:?}"
        );

        let mut again = vec![(gamma, 0..40)];
        let prepared = cache.prepare(&engine, &mut again).await;
        assert_eq!(counts(prepared), (1, 0, 0, 0));
        assert!(again[0].0.cached);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_unpinned_segments_served_from_their_own_kv_are_prefilled() {
        let engine = engine();
        let cache = UnpinnedSkillCache::default();
        // The first skill is pinned; the second is exact (computed in context after the
        // first); the third is modular and pinned nowhere.
        let mut skills = vec![
            (skill("alpha", true, Assembly::Exact), 0..40),
            (skill("beta", false, Assembly::Exact), 40..80),
            (skill("gamma", false, Assembly::Modular), 80..120),
        ];
        let prepared = cache.prepare(&engine, &mut skills).await;
        assert_eq!(counts(prepared), (0, 1, 0, 0));
        let stats = engine.kv_stats().await.expect("stats");
        // Only gamma's two full blocks were prefilled.
        assert_eq!(stats.cached, 2, "{stats:?}");
        let prepared = cache.prepare(&engine, &mut skills).await;
        assert_eq!(counts(prepared), (1, 0, 0, 0));
        let cached: Vec<bool> = skills.iter().map(|(s, _)| s.cached).collect();
        assert_eq!(cached, vec![false, false, true]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_prefilled_for_a_request_the_engine_will_refuse() {
        let engine = engine_with(EngineConfig {
            kv_cache: KvCacheSize::Blocks(64),
            max_waiting: 0,
            ..EngineConfig::default()
        });
        assert!(engine.waiting_is_full());
        let cache = UnpinnedSkillCache::default();
        let mut skills = vec![(skill("gamma", false, Assembly::Modular), 0..40)];
        let prepared = cache.prepare(&engine, &mut skills).await;
        assert_eq!(counts(prepared), (0, 0, 0, 1));
        let stats = engine.kv_stats().await.expect("stats");
        assert_eq!(stats.cached, 0, "{stats:?}");
    }
}
