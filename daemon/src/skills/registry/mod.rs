//! The daemon's skill registry: every skill it knows, its lifecycle
//! (Pending → Prefilling → Ready | Failed), the pinned-KV budget, hot updates and per-skill
//! accounting.
//!
//! A skill's KV is its prefix tokens (see [`super::assembly`]) prefilled and pinned in the
//! engine's radix cache. Prefills run one at a time, highest priority first within a batch of
//! changes. A new version of a skill is prefilled while the old one keeps serving; when it is
//! Ready the switch is one assignment under the lock, and the old pin is released afterwards —
//! requests that started on the old version hold their blocks through the engine's reference
//! counts, so they finish on it. A skill whose pinned blocks would exceed the budget is Failed
//! with reason `InsufficientKVCapacity`; nothing already pinned is evicted to make room.
//!
//! A skill desired with `pin: false` (the operator placed it on other pods) is known but never
//! prefilled here: its state is `Unpinned`, requests may still name it and get it assembled
//! from its tokens (cold), and turning `pin` on or off later pins or releases its KV.
//!
//! Which skills a request gets (named, detected by the router, or detected here) is resolved
//! in the `resolve` submodule.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use skillkv_api::admin::{AdminEvent, SkillOrigin, SkillState};
use skillkv_api::block_hash::{BlockHash, block_hashes_from};
use skillkv_api::skills::{DetectorSettings, SkillDetector, SkillDocument};
use skillkv_api::v1alpha1::{Assembly, PlacementState};
use tokio::sync::{Semaphore, broadcast, watch};

use crate::engine::EngineHandle;
use crate::engine::chat_template::ChatTemplate;
use crate::engine::handle::PinId;
use crate::engine::tokenizer::GgufTokenizer;
use crate::skills::assembly::{PromptSkill, TokenizedSkill, tokenize_skill};
use crate::skills::store::SkillStore;

mod prefill;
mod resolve;

pub use prefill::LOADED_FROM_STORE;
pub use resolve::{ResolveSkillsError, ResolvedSkill, SkillSelection};

/// Limits of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct SkillsConfig {
    /// Most KV blocks all skills together may pin.
    pub pinned_budget_blocks: usize,
    /// Bytes of KV per token (for the reported `kvBytes`).
    pub kv_bytes_per_token: usize,
    /// Detection of skills for requests that name none.
    pub detector: DetectorSettings,
    /// Most skills one request may name.
    pub max_skills_per_request: usize,
    /// Leading tokens of each modular skill segment computed in context instead of copied
    /// (see [`crate::skills::assembly::modular_spans`]).
    pub modular_recompute_tokens: usize,
}

impl Default for SkillsConfig {
    fn default() -> Self {
        Self {
            pinned_budget_blocks: 0,
            kv_bytes_per_token: 0,
            detector: DetectorSettings::default(),
            max_skills_per_request: 8,
            modular_recompute_tokens: crate::skills::assembly::DEFAULT_MODULAR_RECOMPUTE_TOKENS,
        }
    }
}

/// One version of a skill's text and its prefix tokens.
#[derive(Debug)]
pub struct SkillVersion {
    /// The parsed SKILL.md.
    pub document: SkillDocument,
    /// The chat template's rendering of `[system: SKILL.md]`, which `prefix_tokens` encode.
    pub rendered: String,
    /// The tokens prefilled and pinned for it (`[system: SKILL.md]`).
    pub prefix_tokens: Vec<u32>,
    /// The hash of the last full block of those tokens under the base model's namespace
    /// (reported as the skill's `lastBlock`); `None` below one block.
    pub last_block: Option<BlockHash>,
}

impl SkillVersion {
    /// A version of `document` rendered and tokenized as `prefix`, its blocks chained from
    /// `root`.
    pub fn new(document: SkillDocument, prefix: TokenizedSkill, root: BlockHash) -> Self {
        let last_block = block_hashes_from(root, &prefix.tokens).last().copied();
        Self {
            document,
            rendered: prefix.rendered,
            prefix_tokens: prefix.tokens,
            last_block,
        }
    }
}

impl PromptSkill for &SkillVersion {
    fn text(&self) -> &str {
        &self.document.text
    }

    fn rendered_alone(&self) -> Option<(&str, &[u32])> {
        Some((&self.rendered, &self.prefix_tokens))
    }
}

/// Per-skill usage counters, shared with requests that use the skill.
#[derive(Debug, Default)]
pub struct SkillCounters {
    hits: AtomicU64,
    cached_tokens: AtomicU64,
    saved_nanos: AtomicU64,
    /// Prefill cost per token in nanoseconds, from the skill's last prefill.
    prefill_nanos_per_token: AtomicU64,
}

impl SkillCounters {
    /// Records one request that used the skill and had `cached_tokens` of its segment served
    /// from cache.
    pub fn record_use(&self, cached_tokens: usize) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let cached = cached_tokens as u64;
        self.cached_tokens.fetch_add(cached, Ordering::Relaxed);
        let per_token = self.prefill_nanos_per_token.load(Ordering::Relaxed);
        self.saved_nanos
            .fetch_add(cached.saturating_mul(per_token), Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct ServingVersion {
    version: Arc<SkillVersion>,
    pin: PinId,
    blocks: usize,
    prefill_millis: u64,
}

#[derive(Debug)]
struct SkillEntry {
    origin: SkillOrigin,
    assembly: Assembly,
    priority: i32,
    latest: Arc<SkillVersion>,
    /// Whether its KV should be pinned on this daemon.
    pin: bool,
    state: PlacementState,
    message: Option<String>,
    revision: u64,
    serving: Option<ServingVersion>,
    /// Blocks reserved for an in-flight prefill of `latest`.
    reserved_blocks: usize,
    counters: Arc<SkillCounters>,
}

#[derive(Debug, Default)]
struct RegistryState {
    skills: BTreeMap<String, SkillEntry>,
    next_revision: u64,
    /// Built from the skills' cards by the first detection after a skill was added, removed or
    /// given a new text; state changes (prefilling, ready, pins) keep it.
    detector: Option<Arc<SkillDetector>>,
    detector_builds: u64,
}

impl RegistryState {
    /// Blocks held by serving pins and reserved by prefills.
    fn committed_blocks(&self) -> usize {
        self.skills
            .values()
            .map(|entry| entry.reserved_blocks + entry.serving.as_ref().map_or(0, |s| s.blocks))
            .sum()
    }
}

/// A skill to add or update.
#[derive(Debug, Clone)]
pub struct SkillUpdate {
    /// The name requests use.
    pub name: String,
    /// The parsed SKILL.md.
    pub document: SkillDocument,
    /// Where it came from.
    pub origin: SkillOrigin,
    /// How it is assembled.
    pub assembly: Assembly,
    /// Higher first when the budget is short.
    pub priority: i32,
    /// Keep its KV pinned here; false: known only (see the module docs).
    pub pin: bool,
}

impl SkillUpdate {
    /// A skill read from a skills folder (`skillkv serve --skills`): priority 0, pinned.
    pub fn from_folder(name: String, document: SkillDocument, assembly: Assembly) -> Self {
        Self {
            name,
            document,
            origin: SkillOrigin::Directory,
            assembly,
            priority: 0,
            pin: true,
        }
    }
}

/// The registry. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SkillRegistry {
    engine: EngineHandle,
    tokenizer: Arc<GgufTokenizer>,
    template: Arc<ChatTemplate>,
    config: SkillsConfig,
    store: Option<SkillStore>,
    state: Mutex<RegistryState>,
    prefill_gate: Semaphore,
    events: broadcast::Sender<AdminEvent>,
    /// Bumped on every state change (tests and the CLI wait on it).
    changes: watch::Sender<u64>,
}

impl SkillRegistry {
    /// An empty registry over a running engine.
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<GgufTokenizer>,
        template: Arc<ChatTemplate>,
        config: SkillsConfig,
        store: Option<SkillStore>,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            tokenizer,
            template,
            config,
            store,
            state: Mutex::new(RegistryState::default()),
            prefill_gate: Semaphore::new(1),
            events: broadcast::channel(256).0,
            changes: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The registry's limits.
    pub fn config(&self) -> &SkillsConfig {
        &self.config
    }

    /// Skill state changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AdminEvent> {
        self.events.subscribe()
    }

    /// How many times the skill detector was built: once after each change to the set of
    /// skills or their texts, on the first request that needs detection.
    pub fn detector_builds(&self) -> u64 {
        self.lock().detector_builds
    }

    /// A receiver that changes whenever any skill's state does.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn publish(&self, state: &mut RegistryState, name: &str) {
        let event = match state.skills.get(name) {
            Some(entry) => AdminEvent::SkillState(self.snapshot_of(name, entry)),
            None => AdminEvent::SkillRemoved {
                name: name.to_string(),
            },
        };
        let _ = self.events.send(event);
        self.changes.send_modify(|count| *count += 1);
    }

    fn snapshot_of(&self, name: &str, entry: &SkillEntry) -> SkillState {
        let front = &entry.latest.document.front_matter;
        let tokens = entry.latest.prefix_tokens.len();
        SkillState {
            name: name.to_string(),
            version: front.version.clone(),
            description: front.description.clone(),
            keywords: front.keywords.clone(),
            content_hash: entry.latest.document.content_hash.clone(),
            serving_content_hash: entry
                .serving
                .as_ref()
                .map(|s| s.version.document.content_hash.clone()),
            origin: entry.origin,
            assembly: entry.assembly,
            state: entry.state,
            message: entry.message.clone(),
            tokens,
            last_block: entry.latest.last_block,
            kv_bytes: (tokens * self.config.kv_bytes_per_token) as u64,
            prefill_millis: entry.serving.as_ref().map(|s| s.prefill_millis),
            hits: entry.counters.hits.load(Ordering::Relaxed),
            cached_tokens: entry.counters.cached_tokens.load(Ordering::Relaxed),
            prefill_seconds_saved: entry.counters.saved_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Every skill's state, by name.
    pub fn snapshot(&self) -> Vec<SkillState> {
        let state = self.lock();
        state
            .skills
            .iter()
            .map(|(name, entry)| self.snapshot_of(name, entry))
            .collect()
    }

    /// Blocks pinned or reserved by skills.
    pub fn committed_blocks(&self) -> usize {
        self.lock().committed_blocks()
    }

    /// True when no skill is Pending or Prefilling.
    pub fn all_settled(&self) -> bool {
        self.lock()
            .skills
            .values()
            .all(|entry| entry.state.is_settled())
    }

    /// Names of the skills from `origin`.
    pub fn names_from(&self, origin: SkillOrigin) -> Vec<String> {
        self.lock()
            .skills
            .iter()
            .filter(|(_, entry)| entry.origin == origin)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Adds or updates skills; a changed text starts a prefill (highest priority first).
    /// Returns whether anything changed.
    pub fn upsert(self: &Arc<Self>, mut updates: Vec<SkillUpdate>) -> bool {
        updates.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        let mut changed = false;
        for update in updates {
            changed |= self.upsert_one(update);
        }
        changed
    }

    fn upsert_one(self: &Arc<Self>, update: SkillUpdate) -> bool {
        let mut state = self.lock();
        if let Some(entry) = state.skills.get_mut(&update.name)
            && entry.latest.document.content_hash == update.document.content_hash
            && entry.pin == update.pin
        {
            let changed = (entry.origin, entry.assembly, entry.priority)
                != (update.origin, update.assembly, update.priority);
            entry.origin = update.origin;
            entry.assembly = update.assembly;
            entry.priority = update.priority;
            if changed {
                self.publish(&mut state, &update.name);
            }
            return changed;
        }
        let card_changed = state
            .skills
            .get(&update.name)
            .is_none_or(|entry| entry.latest.document.content_hash != update.document.content_hash);
        if card_changed {
            state.detector = None;
        }
        let prefix = tokenize_skill(&self.template, &self.tokenizer, &update.document.text);
        let (prefix, failure) = match prefix {
            Ok(prefix) => (prefix, None),
            Err(error) => (
                TokenizedSkill::default(),
                Some(format!("cannot tokenize the skill: {error}")),
            ),
        };
        let version = Arc::new(SkillVersion::new(
            update.document,
            prefix,
            self.engine.namespace_root(None),
        ));
        state.next_revision += 1;
        let revision = state.next_revision;
        let (phase, message) = match failure {
            Some(message) => (PlacementState::Failed, Some(message)),
            None if !update.pin => (PlacementState::Unpinned, None),
            None => (PlacementState::Pending, None),
        };
        let entry = state
            .skills
            .entry(update.name.clone())
            .or_insert_with(|| SkillEntry {
                origin: update.origin,
                assembly: update.assembly,
                priority: update.priority,
                latest: version.clone(),
                pin: update.pin,
                state: phase,
                message: None,
                revision,
                serving: None,
                reserved_blocks: 0,
                counters: Arc::default(),
            });
        entry.origin = update.origin;
        entry.assembly = update.assembly;
        entry.priority = update.priority;
        entry.latest = version;
        entry.pin = update.pin;
        entry.state = phase;
        entry.message = message;
        entry.revision = revision;
        entry.reserved_blocks = 0;
        // Not pinned here (placement moved away, possibly with a new text): release the KV.
        let released = if update.pin {
            None
        } else {
            entry.serving.take().map(|serving| serving.pin)
        };
        self.publish(&mut state, &update.name);
        drop(state);
        self.release_pins(released.into_iter().collect());
        if phase == PlacementState::Pending {
            let registry = self.clone();
            let name = update.name;
            tokio::spawn(async move { registry.prefill(name, revision).await });
        }
        true
    }

    /// Removes skills; their pins are released. Returns whether anything changed.
    pub fn remove(&self, names: &[String]) -> bool {
        let mut unpins = Vec::new();
        let mut changed = false;
        let mut state = self.lock();
        for name in names {
            if let Some(entry) = state.skills.remove(name) {
                unpins.extend(entry.serving.map(|s| s.pin));
                state.detector = None;
                self.publish(&mut state, name);
                changed = true;
            }
        }
        drop(state);
        self.release_pins(unpins);
        changed
    }

    fn release_pins(&self, pins: Vec<PinId>) {
        if pins.is_empty() {
            return;
        }
        let engine = self.engine.clone();
        tokio::spawn(async move {
            for pin in pins {
                if let Err(error) = engine.unpin(pin).await {
                    tracing::warn!(%error, "releasing a skill's pin failed");
                }
            }
        });
    }
}
