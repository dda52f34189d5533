//! Fleet state: what the router knows of every daemon — reachable or not, its model and ready
//! adapters, its skills, a bounded index of its cached prefix blocks, its last reported load,
//! and the requests this router has in flight on it. [`follow`] keeps it current from each
//! daemon's admin event stream; routing reads snapshots of it. Membership is dynamic
//! ([`membership`]): discovery replaces the set of daemons while requests are routed, and each
//! pod keeps a fleet-unique index that is never reused.

pub mod follow;
pub mod membership;
pub mod prefix;
pub mod sse;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use skillkv_api::admin::{
    AdapterPhase, AdminEvent, DaemonState, KvBudget, LoadFigures, ModelInfo, SkillState,
};
use skillkv_api::block_hash::{BlockHash, block_hashes_from};
use skillkv_api::skills::{DetectorSettings, SkillCard, SkillDetector};
use skillkv_api::v1alpha1::PlacementState;

use self::prefix::PrefixIndex;
use crate::config::BackendConfig;
use crate::routing::Candidate;

/// How long a pod that refused a connection is avoided.
const CONNECT_FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// What the router knows of one daemon.
#[derive(Debug)]
pub struct PodState {
    /// Its admin event stream is connected (always true for a pod without admin API).
    pub stream_up: bool,
    /// Avoid it until then: a connection to it failed.
    pub avoid_until: Option<Instant>,
    /// Its base model, once known.
    pub model: Option<ModelInfo>,
    /// Its KV budget, once known.
    pub kv_budget: Option<KvBudget>,
    /// Adapters it serves (Ready).
    pub adapters: BTreeSet<String>,
    /// Its skills by name.
    pub skills: BTreeMap<String, SkillState>,
    /// Its cached prefix blocks.
    pub prefix: PrefixIndex,
    /// Its last reported load.
    pub load: LoadFigures,
}

/// One daemon.
#[derive(Debug)]
pub struct Pod {
    /// Its fleet-unique index: given when it joins, never reused after it leaves.
    pub index: usize,
    /// Where it is.
    pub backend: BackendConfig,
    state: Mutex<PodState>,
    in_flight: AtomicUsize,
    skills_epoch: Arc<AtomicU64>,
}

/// Decrements the pod's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Pod>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pod {
    /// A pod that knows nothing yet; one without an admin API counts as connected.
    fn new(
        index: usize,
        backend: BackendConfig,
        prefix_index_blocks: usize,
        skills_epoch: Arc<AtomicU64>,
    ) -> Self {
        Self {
            index,
            state: Mutex::new(PodState {
                stream_up: backend.admin_url.is_none(),
                avoid_until: None,
                model: None,
                kv_budget: None,
                adapters: BTreeSet::new(),
                skills: BTreeMap::new(),
                prefix: PrefixIndex::new(prefix_index_blocks),
                load: LoadFigures::default(),
            }),
            backend,
            in_flight: AtomicUsize::new(0),
            skills_epoch,
        }
    }

    /// Locks the state.
    pub fn state(&self) -> MutexGuard<'_, PodState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests in flight from this router.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether the router knows the skills it has: it has an admin API and its state has been
    /// read. Only then does the router's detection stand for the daemon's.
    pub fn reports_skills(&self) -> bool {
        self.backend.admin_url.is_some() && self.state().model.is_some()
    }

    /// Whether routing should prefer it.
    pub fn is_healthy(&self, now: Instant) -> bool {
        let state = self.state();
        state.stream_up && state.avoid_until.is_none_or(|until| now >= until)
    }

    /// A connection to it failed: avoid it for a moment.
    pub fn connect_failed(&self, now: Instant) {
        self.state().avoid_until = Some(now + CONNECT_FAILURE_COOLDOWN);
    }

    /// Whether it serves `model` (as base model or adapter). A pod whose model is unknown
    /// (no admin API, or not yet connected) serves nothing known.
    pub fn serves(&self, model: &str) -> bool {
        let state = self.state();
        state.model.as_ref().is_some_and(|m| m.id == model) || state.adapters.contains(model)
    }

    fn skills_changed(&self) {
        self.skills_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces everything with a fresh snapshot; the stream counts as up.
    pub fn apply_snapshot(&self, snapshot: DaemonState) {
        let mut state = self.state();
        state.stream_up = true;
        state.avoid_until = None;
        state.model = Some(snapshot.model);
        state.prefix.clear();
        state.prefix.fit_to_pool(snapshot.kv_budget.total_blocks);
        state.kv_budget = Some(snapshot.kv_budget);
        state.load = snapshot.load;
        state.adapters = snapshot
            .adapters
            .into_iter()
            .filter(|a| a.state == AdapterPhase::Ready)
            .map(|a| a.name)
            .collect();
        state.skills = snapshot
            .skills
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        drop(state);
        self.skills_changed();
    }

    /// A request needing `skills` is sent here (each attempt): the last block of each skill's
    /// own KV becomes the most recently used in the prefix index, as the daemon's cache marks
    /// the blocks a request reuses (a hit emits no event), so a skill cached here and in use
    /// is not the first the index forgets.
    pub fn note_routed(&self, skills: &[String]) {
        let mut state = self.state();
        let state = &mut *state;
        for name in skills {
            if let Some(block) = state.skills.get(name).and_then(|skill| skill.last_block) {
                state.prefix.touch(&block);
            }
        }
    }

    /// Applies one event. `EventsMissed` clears the prefix index; the caller re-reads the
    /// snapshot.
    pub fn apply_event(&self, event: AdminEvent) {
        let mut state = self.state();
        match event {
            AdminEvent::BlockStored { hash, .. } => state.prefix.insert(hash),
            AdminEvent::BlockEvicted { hash } => state.prefix.remove(&hash),
            AdminEvent::Load(load) => state.load = load,
            AdminEvent::SkillState(skill) => {
                // Detection reads only a skill's card: its phase and counters keep the detector.
                let card_changed = state.skills.get(&skill.name).is_none_or(|known| {
                    (&known.description, &known.keywords) != (&skill.description, &skill.keywords)
                });
                state.skills.insert(skill.name.clone(), skill);
                drop(state);
                if card_changed {
                    self.skills_changed();
                }
            }
            AdminEvent::SkillRemoved { name } => {
                state.skills.remove(&name);
                drop(state);
                self.skills_changed();
            }
            AdminEvent::AdapterState(adapter) => {
                if adapter.state == AdapterPhase::Ready {
                    state.adapters.insert(adapter.name);
                } else {
                    state.adapters.remove(&adapter.name);
                }
            }
            AdminEvent::EventsMissed { .. } => state.prefix.clear(),
        }
    }

    /// Its event stream dropped.
    pub fn stream_down(&self) {
        self.state().stream_up = false;
    }
}

/// A request's prompt as token ids, when the client sent token ids (`/v1/completions` with an
/// integer-array `prompt`); the only case the router can hash prefix blocks without a tokenizer.
pub type PromptTokens<'a> = Option<&'a [u32]>;

/// The skill detectors of the pools requests were routed to.
#[derive(Debug, Default)]
struct PoolDetectors {
    /// The newest skills epoch seen (all detectors are dropped when it moves on).
    built_at: u64,
    /// Per pool (its pods' indices), the detector over the skills its pods know.
    by_pool: HashMap<Vec<usize>, Arc<SkillDetector>>,
}

/// Every daemon.
#[derive(Debug)]
pub struct Fleet {
    pods: RwLock<Arc<Vec<Arc<Pod>>>>,
    next_index: AtomicUsize,
    prefix_index_blocks: usize,
    skills_epoch: Arc<AtomicU64>,
    detector_settings: DetectorSettings,
    detectors: Mutex<PoolDetectors>,
    declared_adapters: RwLock<Arc<BTreeMap<String, String>>>,
}

impl Fleet {
    /// A fleet of `backends`; pods without an admin API count as connected from the start.
    pub fn new(
        backends: Vec<BackendConfig>,
        prefix_index_blocks: usize,
        detector_settings: DetectorSettings,
    ) -> Self {
        let fleet = Self {
            pods: RwLock::default(),
            next_index: AtomicUsize::new(0),
            prefix_index_blocks,
            skills_epoch: Arc::new(AtomicU64::new(0)),
            detector_settings,
            detectors: Mutex::default(),
            declared_adapters: RwLock::default(),
        };
        let pods = backends.into_iter().map(|b| fleet.new_pod(b)).collect();
        *write(&fleet.pods) = Arc::new(pods);
        fleet
    }

    fn new_pod(&self, backend: BackendConfig) -> Arc<Pod> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        Arc::new(Pod::new(
            index,
            backend,
            self.prefix_index_blocks,
            self.skills_epoch.clone(),
        ))
    }

    /// Every pod now, ordered by index (a snapshot: later membership changes don't touch it).
    pub fn pods(&self) -> Arc<Vec<Arc<Pod>>> {
        read(&self.pods).clone()
    }

    /// The pod with `index`, if it is still a member.
    pub fn pod(&self, index: usize) -> Option<Arc<Pod>> {
        let pods = self.pods();
        pods.binary_search_by_key(&index, |p| p.index)
            .ok()
            .map(|i| pods[i].clone())
    }

    /// LoRA adapters declared by the cluster (served name → base model id), listed in
    /// `/v1/models` and routed to their base model's pods until a pod reports them loaded.
    pub fn declared_adapters(&self) -> Arc<BTreeMap<String, String>> {
        read(&self.declared_adapters).clone()
    }

    /// Replaces the declared adapters.
    pub fn set_declared_adapters(&self, adapters: BTreeMap<String, String>) {
        *write(&self.declared_adapters) = Arc::new(adapters);
    }

    /// The pods of the pool serving `model`: those that serve it; when none is known to, the
    /// pods of a declared adapter's base model; else the pods whose model is unknown (they may).
    pub fn pool(&self, model: &str) -> Vec<Arc<Pod>> {
        let pods = self.pods();
        let serving: Vec<Arc<Pod>> = pods.iter().filter(|p| p.serves(model)).cloned().collect();
        if !serving.is_empty() {
            return serving;
        }
        if let Some(base) = self.declared_adapters().get(model) {
            let base_pool: Vec<Arc<Pod>> =
                pods.iter().filter(|p| p.serves(base)).cloned().collect();
            if !base_pool.is_empty() {
                return base_pool;
            }
        }
        pods.iter()
            .filter(|p| p.state().model.is_none())
            .cloned()
            .collect()
    }

    /// The skill detector over the skills the pods of `pool` know — a request for one model
    /// is never given a skill of another — rebuilt when a skill appears, goes or gets another
    /// description or keywords (not when its phase changes), or when the pool has other pods.
    pub fn detector(&self, pool: &[Arc<Pod>]) -> Arc<SkillDetector> {
        let epoch = self.skills_epoch.load(Ordering::Relaxed);
        let key: Vec<usize> = pool.iter().map(|pod| pod.index).collect();
        let mut cached = self
            .detectors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if epoch > cached.built_at {
            cached.built_at = epoch;
            cached.by_pool.clear();
        }
        let current = epoch == cached.built_at;
        if current && let Some(detector) = cached.by_pool.get(&key) {
            return detector.clone();
        }
        let mut cards: BTreeMap<String, SkillCard> = BTreeMap::new();
        for pod in pool {
            for skill in pod.state().skills.values() {
                cards
                    .entry(skill.name.clone())
                    .or_insert_with(|| SkillCard {
                        name: skill.name.clone(),
                        description: skill.description.clone(),
                        keywords: skill.keywords.clone(),
                    });
            }
        }
        let detector = Arc::new(self.detector_settings.build(cards.into_values()));
        // Built from the skills as they are now, which may be newer than `epoch`: cached only
        // under the epoch the cache is at, so a later skills change still rebuilds it.
        if current {
            cached.by_pool.insert(key, detector.clone());
        }
        detector
    }

    /// Routing's view of `pool` for a request needing `skills`, whose prompt is `tokens`.
    pub fn candidates(
        &self,
        pool: &[Arc<Pod>],
        skills: &[String],
        tokens: PromptTokens<'_>,
        now: Instant,
    ) -> Vec<Candidate> {
        let mut chains: Vec<(BlockHash, Vec<BlockHash>)> = Vec::new();
        pool.iter()
            .map(|pod| {
                let healthy = pod.is_healthy(now);
                let state = pod.state();
                let skills_ready = skills
                    .iter()
                    .filter(|name| {
                        state
                            .skills
                            .get(*name)
                            .is_some_and(|skill| skill_is_warm(skill, &state.prefix))
                    })
                    .count();
                let knows_skills = pod.backend.admin_url.is_none()
                    || skills.iter().all(|name| state.skills.contains_key(name));
                let prefix_blocks = match (tokens, state.model.as_ref()) {
                    (Some(tokens), Some(model)) if !state.prefix.is_empty() => {
                        let root = model.namespace_root;
                        let position = chains.iter().position(|(r, _)| *r == root);
                        let hashes = match position {
                            Some(i) => &chains[i].1,
                            None => {
                                chains.push((root, block_hashes_from(root, tokens)));
                                &chains[chains.len() - 1].1
                            }
                        };
                        state.prefix.matched_prefix(hashes)
                    }
                    _ => 0,
                };
                Candidate {
                    pod: pod.index,
                    name: pod.backend.name.clone(),
                    healthy,
                    in_flight: pod.in_flight(),
                    waiting: state.load.waiting,
                    free_blocks: state.load.free_blocks,
                    skills_ready,
                    knows_skills,
                    prefix_blocks,
                }
            })
            .collect()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a skill's KV serves requests on the pod now: pinned and Ready, or during a hot
/// update still serving the previous version while the new one prefills; or not pinned there
/// but cached, because an earlier request prefilled it (the pod's prefix blocks hold the last
/// block of the skill's own segment).
fn skill_is_warm(skill: &SkillState, prefix: &PrefixIndex) -> bool {
    skill.state == PlacementState::Ready
        || skill.serving_content_hash.is_some()
        || skill
            .last_block
            .is_some_and(|block| prefix.contains(&block))
}

#[cfg(test)]
mod tests;
