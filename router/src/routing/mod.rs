//! Routing decisions as pure functions: given a snapshot of the candidate pods of a pool and a
//! request's skills, which pod to try first and in what order to try the rest.
//!
//! A daemon answers 400 for a skill it does not know. In a cluster every pod knows every skill
//! of its model (the operator pushes them all, pinned only where placed), but daemons started
//! with different `--skills` folders, or a pod the operator has not pushed yet, may not. So
//! whenever some healthy pod knows every skill the request names (in any state, warm or not),
//! every policy chooses among those pods only; when none does, among all healthy pods.
//!
//! The locality policy prefers, among the pods the bounded-load rule allows (no pod may reach
//! more than ⌈(1+ε)× the mean⌉ in-flight requests of the healthy pods, counting this one), the
//! pod with the most of the request's skills warm (Ready, i.e. pinned, or with their KV in the
//! pod's prefix cache from an earlier request — [`crate::fleet::Fleet::candidates`]), then the
//! longest cached prefix, then the lightest load. Skills warm nowhere go to the pod chosen by rendezvous hashing of the skill
//! set, so the same skills keep landing on the same pods while pods come and go.

use std::cmp::Reverse;

/// How pods are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Skills, cached prefix and load, with bounded load.
    #[default]
    Locality,
    /// Each healthy pod in turn.
    RoundRobin,
    /// The pod with the fewest requests in flight.
    LeastLoaded,
}

/// Routing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    /// The policy.
    pub policy: Policy,
    /// Bounded-load slack ε.
    pub load_epsilon: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Locality,
            load_epsilon: 0.25,
        }
    }
}

/// Why the first pod was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It has the request's skills Ready.
    SkillHit,
    /// It holds the longest cached prefix of the prompt.
    PrefixHit,
    /// It is the least loaded (also when the warm pods were too busy).
    Load,
    /// The skills are warm nowhere: rendezvous hashing picked it.
    Hash,
    /// Round-robin policy.
    RoundRobin,
    /// No pod is healthy: trying them all, least loaded first.
    Fallback,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SkillHit => "skill-hit",
            Self::PrefixHit => "prefix-hit",
            Self::Load => "load",
            Self::Hash => "hash",
            Self::RoundRobin => "round-robin",
            Self::Fallback => "fallback",
        }
    }
}

/// What routing knows of one pod of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The pod's index in the fleet ([`crate::fleet::Pod::index`]).
    pub pod: usize,
    /// Its stable name (the hashing key).
    pub name: String,
    /// Reachable, and its event stream is up.
    pub healthy: bool,
    /// Requests this router has in flight on it.
    pub in_flight: usize,
    /// Sequences waiting in its queue, as it last reported.
    pub waiting: usize,
    /// Free KV blocks, as it last reported.
    pub free_blocks: usize,
    /// How many of the request's skills are warm on it: Ready (pinned), or cached.
    pub skills_ready: usize,
    /// It knows every skill the request names (in any state), or it has no admin API, so its
    /// skills are unknown; true for a request without skills.
    pub knows_skills: bool,
    /// Leading blocks of the prompt it holds in its prefix cache.
    pub prefix_blocks: usize,
}

/// The pods to try, in order, and why the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Fleet indices of the pods, first choice first.
    pub order: Vec<usize>,
    /// Why the first.
    pub reason: Reason,
}

/// Lighter first: fewer in flight, fewer waiting, more free KV.
fn load_key(c: &Candidate) -> (usize, usize, Reverse<usize>) {
    (c.in_flight, c.waiting, Reverse(c.free_blocks))
}

/// Rendezvous (highest random weight) hash of `key` on `pod`.
fn rendezvous_weight(key: &str, pod: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(pod.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The most in-flight requests a pod may reach by taking this request.
pub fn load_cap(healthy_in_flight: &[usize], epsilon: f64) -> usize {
    if healthy_in_flight.is_empty() {
        return usize::MAX;
    }
    let total = healthy_in_flight.iter().sum::<usize>() + 1;
    let mean = total as f64 / healthy_in_flight.len() as f64;
    ((1.0 + epsilon.max(0.0)) * mean).ceil() as usize
}

/// Chooses the pod order for a request needing `skills` (sorted, possibly empty).
/// `turn` drives round-robin. `None` when there is no candidate at all.
pub fn decide(
    candidates: &[Candidate],
    skills: &[String],
    config: &RoutingConfig,
    turn: u64,
) -> Option<Decision> {
    if candidates.is_empty() {
        return None;
    }
    let healthy: Vec<&Candidate> = candidates.iter().filter(|c| c.healthy).collect();
    if healthy.is_empty() {
        let mut all: Vec<&Candidate> = candidates.iter().collect();
        all.sort_by_key(|c| load_key(c));
        return Some(Decision {
            order: all.iter().map(|c| c.pod).collect(),
            reason: Reason::Fallback,
        });
    }
    let knowing: Vec<&Candidate> = healthy.iter().copied().filter(|c| c.knows_skills).collect();
    let choosable = if knowing.is_empty() {
        &healthy
    } else {
        &knowing
    };
    let (first, reason) = match config.policy {
        Policy::RoundRobin => (
            choosable[(turn % choosable.len() as u64) as usize],
            Reason::RoundRobin,
        ),
        Policy::LeastLoaded => (least_loaded(choosable), Reason::Load),
        Policy::Locality => locality(&healthy, choosable, skills, config.load_epsilon),
    };
    let mut rest: Vec<&Candidate> = candidates.iter().filter(|c| c.pod != first.pod).collect();
    rest.sort_by_key(|c| (!c.healthy, !c.knows_skills, load_key(c)));
    let order = std::iter::once(first.pod)
        .chain(rest.iter().map(|c| c.pod))
        .collect();
    Some(Decision { order, reason })
}

fn least_loaded<'a>(pods: &[&'a Candidate]) -> &'a Candidate {
    pods.iter()
        .copied()
        .min_by_key(|c| (load_key(c), c.pod))
        .unwrap_or(pods[0])
}

/// The locality choice among `choosable` (a subset of `healthy`); the load bound is the mean
/// over every healthy pod.
fn locality<'a>(
    healthy: &[&'a Candidate],
    choosable: &[&'a Candidate],
    skills: &[String],
    epsilon: f64,
) -> (&'a Candidate, Reason) {
    let in_flight: Vec<usize> = healthy.iter().map(|c| c.in_flight).collect();
    let cap = load_cap(&in_flight, epsilon);
    let eligible: Vec<&Candidate> = choosable
        .iter()
        .copied()
        .filter(|c| c.in_flight < cap)
        .collect();
    // The least-loaded healthy pod is always below the cap; when only some pods know the
    // skills, they may all be above it, and then one of them still takes the request.
    let eligible = if eligible.is_empty() {
        choosable.to_vec()
    } else {
        eligible
    };
    let best_skills = eligible.iter().map(|c| c.skills_ready).max().unwrap_or(0);
    if !skills.is_empty() && best_skills > 0 {
        let pick = eligible
            .iter()
            .copied()
            .filter(|c| c.skills_ready == best_skills)
            .min_by_key(|c| (Reverse(c.prefix_blocks), load_key(c), c.pod))
            .unwrap_or(eligible[0]);
        return (pick, Reason::SkillHit);
    }
    let best_prefix = eligible.iter().map(|c| c.prefix_blocks).max().unwrap_or(0);
    if best_prefix > 0 {
        let pick = eligible
            .iter()
            .copied()
            .filter(|c| c.prefix_blocks == best_prefix)
            .min_by_key(|c| (load_key(c), c.pod))
            .unwrap_or(eligible[0]);
        return (pick, Reason::PrefixHit);
    }
    let warm_but_busy = choosable
        .iter()
        .any(|c| (!skills.is_empty() && c.skills_ready > 0) || c.prefix_blocks > 0);
    if skills.is_empty() || warm_but_busy {
        return (least_loaded(&eligible), Reason::Load);
    }
    let key = skills.join("\n");
    let pick = eligible
        .iter()
        .copied()
        .max_by_key(|c| rendezvous_weight(&key, &c.name))
        .unwrap_or(eligible[0]);
    (pick, Reason::Hash)
}

#[cfg(test)]
mod tests;
