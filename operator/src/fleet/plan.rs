//! The pure half of a ModelDeployment's reconcile: from the pool's pods, what their daemons
//! reported, the model's skills and adapters, compute the placement and each pod's desired
//! state, and decide which pods need a push.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use skillkv_api::admin::{DaemonState, DesiredAdapter, DesiredSkill, SkillOrigin};
use skillkv_api::placement::{Placement, PodSlot, SkillDemand, blocks_for_tokens, place_skills};
use skillkv_api::v1alpha1::{LoRAAdapter, PlacementState, Skill};

/// Tokens per block when no daemon has reported its block size.
pub const DEFAULT_BLOCK_TOKENS: u64 = 16;
/// Bytes per token assumed before a daemon reports a skill's real token count: BPE tokenizers
/// average about four bytes of English per token, three is a safe over-estimate.
pub const ESTIMATED_BYTES_PER_TOKEN: u64 = 3;

/// A daemon pod of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPod {
    /// Pod name.
    pub name: String,
    /// Node, once scheduled.
    pub node: Option<String>,
    /// Pod IP, once running.
    pub ip: Option<String>,
    /// The pod's `Ready` condition.
    pub ready: bool,
    /// The pod's `skillkv.io/skills-warm` condition, if set.
    pub warm: Option<bool>,
}

/// What asking a pod's daemon for its state gave.
#[derive(Debug, Clone, PartialEq)]
pub enum PodReport {
    /// The daemon's state.
    State(Box<DaemonState>),
    /// The pod has no IP yet.
    NoAddress,
    /// The call failed; the message says why.
    Unreachable(String),
}

impl PodReport {
    /// The state, when the daemon answered.
    pub fn state(&self) -> Option<&DaemonState> {
        match self {
            Self::State(state) => Some(state),
            _ => None,
        }
    }
}

/// A skill of the model with its SKILL.md text resolved.
#[derive(Debug, Clone)]
pub struct ResolvedSkill {
    /// The Skill object.
    pub skill: Skill,
    /// Its text and hash, or why it has none.
    pub content: Result<SkillContent, String>,
}

/// A skill's SKILL.md text and its BLAKE3 hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkillContent {
    /// The text.
    pub text: String,
    /// BLAKE3 hex of the text.
    pub hash: String,
}

/// The desired content of one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodDesired {
    /// Every skill of the model, pinned where placed.
    pub skills: Vec<DesiredSkill>,
    /// Adapters to load.
    pub adapters: Vec<DesiredAdapter>,
    /// Content hash of each desired skill, to compare with the daemon's report.
    pub hashes: BTreeMap<String, String>,
}

/// Everything the reconcile decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Skill placement.
    pub placement: Placement,
    /// Adapter name → pods that should load it.
    pub adapters: BTreeMap<String, BTreeSet<String>>,
    /// Pod → desired state.
    pub desired: BTreeMap<String, PodDesired>,
    /// Blocks one copy of each placed skill needs.
    pub skill_blocks: BTreeMap<String, u64>,
}

/// Tokens of a skill: the largest count a daemon reported for this content, else an estimate.
pub fn skill_tokens(
    name: &str,
    content: &SkillContent,
    reports: &BTreeMap<String, PodReport>,
) -> (u64, bool) {
    reports
        .values()
        .filter_map(PodReport::state)
        .flat_map(|state| state.skills.iter())
        .filter(|s| s.name == name && s.content_hash == content.hash && s.tokens > 0)
        .map(|s| s.tokens as u64)
        .max()
        .map_or_else(
            || {
                (
                    (content.text.len() as u64).div_ceil(ESTIMATED_BYTES_PER_TOKEN),
                    false,
                )
            },
            |tokens| (tokens, true),
        )
}

/// The adapter's URI as a daemon reads it (only `file://` directories on the node).
pub fn adapter_uri(adapter: &LoRAAdapter) -> Result<String, String> {
    let uri = &adapter.spec.source.uri;
    if uri.starts_with("file:///") {
        Ok(uri.clone())
    } else {
        Err(format!(
            "source.uri {uri:?}: daemons load adapters from file:// directories only; mount the adapter on the node"
        ))
    }
}

/// Computes placement and each pod's desired state.
pub fn plan(
    pods: &[PoolPod],
    reports: &BTreeMap<String, PodReport>,
    skills: &[ResolvedSkill],
    adapters: &[LoRAAdapter],
) -> Plan {
    let block_tokens = reports
        .values()
        .filter_map(PodReport::state)
        .map(|state| state.kv_budget.block_tokens as u64)
        .find(|tokens| *tokens > 0)
        .unwrap_or(DEFAULT_BLOCK_TOKENS);
    let slots: Vec<PodSlot> = pods
        .iter()
        .map(|pod| PodSlot {
            name: pod.name.clone(),
            node: pod.node.clone(),
            budget_blocks: reports
                .get(&pod.name)
                .and_then(PodReport::state)
                .map(|state| state.kv_budget.pinned_budget_blocks as u64),
        })
        .collect();

    let mut skill_blocks = BTreeMap::new();
    let demands: Vec<SkillDemand> = skills
        .iter()
        .filter_map(|resolved| {
            let content = resolved.content.as_ref().ok()?;
            let name = resolved.skill.name_any();
            let (tokens, _) = skill_tokens(&name, content, reports);
            let blocks = blocks_for_tokens(tokens, block_tokens).max(1);
            skill_blocks.insert(name.clone(), blocks);
            Some(SkillDemand {
                current: current_skill_pods(&resolved.skill),
                name,
                blocks,
                replicas: resolved.skill.spec.replicas.map(|n| n.max(0) as u32),
                priority: resolved.skill.spec.priority.unwrap_or(0),
            })
        })
        .collect();
    let placement = place_skills(&slots, &demands);

    let adapter_pods: BTreeMap<String, BTreeSet<String>> = adapters
        .iter()
        .map(|adapter| (adapter.name_any(), place_adapter(pods, adapter)))
        .collect();

    let mut desired: BTreeMap<String, PodDesired> = BTreeMap::new();
    for pod in pods {
        let entry = desired.entry(pod.name.clone()).or_default();
        for resolved in skills {
            let name = resolved.skill.name_any();
            let (Ok(content), Some(assignment)) = (&resolved.content, placement.skills.get(&name))
            else {
                continue;
            };
            // Every pod knows every skill of its model, so any request naming any of them can
            // be served anywhere; only the pods placement chose pin its KV.
            entry.hashes.insert(name.clone(), content.hash.clone());
            entry.skills.push(DesiredSkill {
                name,
                content: content.text.clone(),
                priority: resolved.skill.spec.priority.unwrap_or(0),
                assembly: resolved.skill.spec.assembly.unwrap_or_default(),
                pin: assignment.pods.contains(&pod.name),
            });
        }
        for adapter in adapters {
            let on_pod = adapter_pods
                .get(&adapter.name_any())
                .is_some_and(|chosen| chosen.contains(&pod.name));
            if let (true, Ok(uri)) = (on_pod, adapter_uri(adapter)) {
                entry.adapters.push(DesiredAdapter {
                    name: adapter.spec.served_name.clone(),
                    uri,
                    scale: adapter.spec.scale.unwrap_or(1.0) as f32,
                });
            }
        }
        entry.skills.sort_by(|a, b| a.name.cmp(&b.name));
        entry.adapters.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Plan {
        placement,
        adapters: adapter_pods,
        desired,
        skill_blocks,
    }
}

fn current_skill_pods(skill: &Skill) -> BTreeSet<String> {
    skill
        .status
        .iter()
        .flat_map(|status| status.placements.iter())
        .map(|placement| placement.pod.clone())
        .collect()
}

/// Pods that load an adapter: those that hold it now, then the others by name, up to
/// `replicas` (default every pod).
fn place_adapter(pods: &[PoolPod], adapter: &LoRAAdapter) -> BTreeSet<String> {
    let wanted = adapter
        .spec
        .replicas
        .map_or(pods.len(), |n| n.max(0) as usize);
    let current: BTreeSet<&str> = adapter
        .status
        .iter()
        .flat_map(|status| status.placements.iter())
        .map(|placement| placement.pod.as_str())
        .collect();
    let mut ordered: Vec<&PoolPod> = pods.iter().collect();
    ordered.sort_by_key(|pod| (!current.contains(pod.name.as_str()), pod.name.clone()));
    ordered
        .into_iter()
        .take(wanted)
        .map(|pod| pod.name.clone())
        .collect()
}

/// Whether the daemon's state differs from what is desired of it (skills by name, content
/// hash and assembly; adapters by name).
pub fn needs_push(desired: &PodDesired, state: &DaemonState) -> bool {
    let reported: BTreeSet<(String, String, String, bool)> = state
        .skills
        .iter()
        .filter(|skill| skill.origin == SkillOrigin::Desired)
        .map(|skill| {
            (
                skill.name.clone(),
                skill.content_hash.clone(),
                format!("{:?}", skill.assembly),
                skill.state != PlacementState::Unpinned,
            )
        })
        .collect();
    let wanted: BTreeSet<(String, String, String, bool)> = desired
        .skills
        .iter()
        .map(|skill| {
            let hash = desired.hashes.get(&skill.name).cloned().unwrap_or_default();
            (
                skill.name.clone(),
                hash,
                format!("{:?}", skill.assembly),
                skill.pin,
            )
        })
        .collect();
    let reported_adapters: BTreeSet<&str> =
        state.adapters.iter().map(|a| a.name.as_str()).collect();
    let wanted_adapters: BTreeSet<&str> =
        desired.adapters.iter().map(|a| a.name.as_str()).collect();
    let never_pushed =
        state.desired_generation.is_none() && !(wanted.is_empty() && wanted_adapters.is_empty());
    never_pushed || reported != wanted || reported_adapters != wanted_adapters
}

#[cfg(test)]
mod tests {
    use skillkv_api::admin::SkillState;
    use skillkv_api::v1alpha1::Assembly;

    use super::*;
    use crate::fixtures::daemon_state;

    fn reported(state: PlacementState) -> DaemonState {
        let mut daemon = daemon_state(64);
        daemon.desired_generation = Some(1);
        daemon.skills.push(SkillState {
            name: "sql".into(),
            version: None,
            description: String::new(),
            keywords: Vec::new(),
            content_hash: "h".into(),
            serving_content_hash: None,
            origin: SkillOrigin::Desired,
            assembly: Assembly::Exact,
            state,
            message: None,
            tokens: 10,
            last_block: None,
            kv_bytes: 0,
            prefill_millis: None,
            hits: 0,
            cached_tokens: 0,
            prefill_seconds_saved: 0.0,
        });
        daemon
    }

    fn desired(pin: bool) -> PodDesired {
        PodDesired {
            skills: vec![DesiredSkill {
                name: "sql".into(),
                content: "text".into(),
                priority: 0,
                assembly: Assembly::Exact,
                pin,
            }],
            adapters: Vec::new(),
            hashes: BTreeMap::from([("sql".to_string(), "h".to_string())]),
        }
    }

    #[test]
    fn a_flip_between_pinned_and_known_only_is_pushed() {
        use PlacementState::{Failed, Ready, Unpinned};
        for (pin, state, push) in [
            (true, Ready, false),
            (true, Failed, false),
            (false, Unpinned, false),
            (false, Ready, true),
            (true, Unpinned, true),
        ] {
            let pushed = needs_push(&desired(pin), &reported(state));
            assert_eq!(pushed, push, "pin {pin}, reported {state:?}");
        }
    }
}
