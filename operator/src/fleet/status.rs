//! The statuses a ModelDeployment's reconcile writes, as pure functions of the plan and what
//! the daemons reported: Skill and LoRAAdapter placements and Conditions, the ModelDeployment's
//! replica counts and Conditions, and whether each pod's pinned skills are warm.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use skillkv_api::admin::AdapterPhase;
use skillkv_api::v1alpha1::{
    AdapterPlacement, AdapterState, LoRAAdapter, LoRAAdapterStatus, ModelDeployment,
    ModelDeploymentStatus, PlacementState, SkillPlacement, SkillStatus, condition_types as types,
};

use super::plan::{Plan, PodReport, PoolPod, ResolvedSkill, adapter_uri, skill_tokens};
use crate::conditions::{ConditionUpdate, merge_conditions};
use crate::names;

/// What the reconcile learned about each pod beyond its report: a failed push.
pub type PushErrors = BTreeMap<String, String>;

/// Observations shared by the status functions.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The pool's pods.
    pub pods: &'a [PoolPod],
    /// Each pod's report.
    pub reports: &'a BTreeMap<String, PodReport>,
    /// Pushes that failed, by pod.
    pub push_errors: &'a PushErrors,
    /// The plan.
    pub plan: &'a Plan,
    /// Now, for transition times.
    pub now: Timestamp,
}

impl Observed<'_> {
    fn node_of(&self, pod: &str) -> Option<String> {
        self.pods
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.node.clone())
    }

    /// Why a pod's daemon could not be used this round, if it could not.
    fn pod_problem(&self, pod: &str) -> Option<String> {
        match self.reports.get(pod) {
            Some(PodReport::State(_)) => self.push_errors.get(pod).cloned(),
            Some(PodReport::Unreachable(message)) => Some(message.clone()),
            Some(PodReport::NoAddress) | None => Some("the pod has no address yet".to_owned()),
        }
    }
}

/// A skill's status.
pub fn skill_status(resolved: &ResolvedSkill, observed: Observed<'_>) -> SkillStatus {
    let skill = &resolved.skill;
    let name = skill.name_any();
    let old = skill.status.clone().unwrap_or_default();
    let generation = skill.metadata.generation;
    let content = match &resolved.content {
        Ok(content) => content,
        Err(message) => {
            let updates = [
                ConditionUpdate::unmet(types::READY, "InvalidSkill", message.clone()),
                ConditionUpdate::unmet(types::PROGRESSING, "InvalidSkill", message.clone()),
                ConditionUpdate::met(types::DEGRADED, "InvalidSkill", message.clone()),
            ];
            return SkillStatus {
                observed_generation: generation,
                conditions: merge_conditions(&old.conditions, &updates, generation, observed.now),
                ..old
            };
        }
    };
    let assignment = observed
        .plan
        .placement
        .skills
        .get(&name)
        .cloned()
        .unwrap_or_default();
    let mut placements = Vec::new();
    for pod in &assignment.pods {
        let mut placement = SkillPlacement {
            pod: pod.clone(),
            node: observed.node_of(pod),
            state: PlacementState::Pending,
            prefill_millis: None,
            message: None,
        };
        if let Some(problem) = observed.pod_problem(pod) {
            placement.message = Some(problem);
        } else if let Some(reported) = observed
            .reports
            .get(pod)
            .and_then(PodReport::state)
            .and_then(|state| state.skills.iter().find(|s| s.name == name))
        {
            if reported.content_hash == content.hash {
                // Placed here but still unpinned: the push that pins it has not landed yet.
                placement.state = match reported.state {
                    PlacementState::Unpinned => PlacementState::Pending,
                    state => state,
                };
                placement.prefill_millis = reported.prefill_millis.map(|ms| ms as i64);
                placement.message = reported.message.clone();
            } else {
                placement.message = Some("the daemon still serves older content".to_owned());
            }
        }
        placements.push(placement);
    }
    let ready = placements
        .iter()
        .filter(|p| p.state == PlacementState::Ready)
        .count();
    let failed: Vec<&SkillPlacement> = placements
        .iter()
        .filter(|p| p.state == PlacementState::Failed)
        .collect();
    let unreachable = placements
        .iter()
        .filter(|p| p.state == PlacementState::Pending && p.message.is_some())
        .count();
    let in_progress = placements.iter().any(|p| {
        matches!(
            p.state,
            PlacementState::Pending | PlacementState::Prefilling
        )
    });
    let (tokens, measured) = skill_tokens(&name, content, observed.reports);
    let kv_bytes = observed
        .reports
        .values()
        .filter_map(PodReport::state)
        .flat_map(|state| state.skills.iter())
        .filter(|s| s.name == name && s.content_hash == content.hash && s.kv_bytes > 0)
        .map(|s| s.kv_bytes as i64)
        .max();

    let blocks = observed
        .plan
        .skill_blocks
        .get(&name)
        .copied()
        .unwrap_or_default();
    let short = format!(
        "placed on {} of {} pods: not enough pinned KV capacity for {blocks} more blocks",
        assignment.pods.len(),
        assignment.wanted
    );
    let unreachable_daemons = observed
        .pods
        .iter()
        .filter(|pod| {
            matches!(
                observed.reports.get(&pod.name),
                Some(PodReport::Unreachable(_))
            )
        })
        .count();
    let starting_pods = observed
        .pods
        .iter()
        .filter(|pod| {
            matches!(
                observed.reports.get(&pod.name),
                Some(PodReport::NoAddress) | None
            )
        })
        .count();
    let degraded = if assignment.is_short() && unreachable_daemons > 0 {
        let message = format!(
            "{short}; {unreachable_daemons} daemon(s) could not be reached to learn their capacity"
        );
        ConditionUpdate::met(types::DEGRADED, "DaemonUnreachable", message)
    } else if assignment.is_short() && starting_pods > 0 {
        ConditionUpdate::unmet(
            types::DEGRADED,
            "WaitingForPods",
            format!("{starting_pods} pod(s) are starting"),
        )
    } else if assignment.is_short() {
        ConditionUpdate::met(types::DEGRADED, "InsufficientKVCapacity", short.clone())
    } else if let Some(first) = failed.first() {
        let message = format!(
            "prefill failed on {}: {}",
            first.pod,
            first.message.clone().unwrap_or_default()
        );
        ConditionUpdate::met(types::DEGRADED, "PrefillFailed", message)
    } else if unreachable > 0 {
        ConditionUpdate::met(
            types::DEGRADED,
            "DaemonUnreachable",
            format!("{unreachable} daemon(s) could not be reached"),
        )
    } else {
        ConditionUpdate::unmet(types::DEGRADED, "AsExpected", "")
    };
    let ready_condition = if assignment.wanted == 0 {
        ConditionUpdate::unmet(
            types::READY,
            "NoDaemonPods",
            format!(
                "ModelDeployment {} has no daemon pods",
                skill.spec.model_ref.name
            ),
        )
    } else if ready == assignment.wanted {
        ConditionUpdate::met(types::READY, "Warm", format!("KV pinned on {ready} pod(s)"))
    } else if degraded.status || degraded.reason == "WaitingForPods" {
        ConditionUpdate::unmet(types::READY, degraded.reason, degraded.message.clone())
    } else {
        ConditionUpdate::unmet(
            types::READY,
            "Prefilling",
            format!("{ready} of {} pods ready", assignment.wanted),
        )
    };
    let progressing = if in_progress {
        ConditionUpdate::met(
            types::PROGRESSING,
            "Prefilling",
            format!("{ready} of {} pods ready", assignment.wanted),
        )
    } else {
        ConditionUpdate::unmet(types::PROGRESSING, "Settled", "")
    };
    SkillStatus {
        observed_generation: generation,
        content_hash: Some(content.hash.clone()),
        tokens: measured.then_some(tokens as i64).or(old
            .tokens
            .filter(|_| old.content_hash.as_ref() == Some(&content.hash))),
        kv_bytes: kv_bytes.or(old
            .kv_bytes
            .filter(|_| old.content_hash.as_ref() == Some(&content.hash))),
        ready_replicas: Some(ready as i32),
        ready: Some(format!("{ready}/{}", assignment.wanted)),
        placements,
        conditions: merge_conditions(
            &old.conditions,
            &[ready_condition, progressing, degraded],
            generation,
            observed.now,
        ),
    }
}

/// A LoRA adapter's status.
pub fn adapter_status(adapter: &LoRAAdapter, observed: Observed<'_>) -> LoRAAdapterStatus {
    let old = adapter.status.clone().unwrap_or_default();
    let generation = adapter.metadata.generation;
    let chosen = observed
        .plan
        .adapters
        .get(&adapter.name_any())
        .cloned()
        .unwrap_or_default();
    let unsupported = adapter_uri(adapter).err();
    let placements: Vec<AdapterPlacement> = chosen
        .iter()
        .map(|pod| {
            let mut placement = AdapterPlacement {
                pod: pod.clone(),
                node: observed.node_of(pod),
                state: AdapterState::Pending,
                message: None,
            };
            if let Some(message) = &unsupported {
                placement.state = AdapterState::Failed;
                placement.message = Some(message.clone());
            } else if let Some(problem) = observed.pod_problem(pod) {
                placement.message = Some(problem);
            } else if let Some(reported) = observed
                .reports
                .get(pod)
                .and_then(PodReport::state)
                .and_then(|state| {
                    state
                        .adapters
                        .iter()
                        .find(|a| a.name == adapter.spec.served_name)
                })
            {
                placement.state = match reported.state {
                    AdapterPhase::Ready => AdapterState::Ready,
                    AdapterPhase::Failed => AdapterState::Failed,
                };
                placement.message = reported.message.clone();
            } else {
                placement.state = AdapterState::Loading;
            }
            placement
        })
        .collect();
    let loaded = placements
        .iter()
        .filter(|p| p.state == AdapterState::Ready)
        .count();
    let failed = placements.iter().find(|p| p.state == AdapterState::Failed);
    let waiting = placements
        .iter()
        .filter(|p| p.state == AdapterState::Pending)
        .count();
    let degraded = match (failed, waiting) {
        (Some(first), _) => ConditionUpdate::met(
            types::DEGRADED,
            if unsupported.is_some() {
                "UnsupportedSource"
            } else {
                "LoadFailed"
            },
            format!(
                "{}: {}",
                first.pod,
                first.message.clone().unwrap_or_default()
            ),
        ),
        (None, n) if n > 0 => ConditionUpdate::met(
            types::DEGRADED,
            "DaemonUnreachable",
            format!("{n} daemon(s) could not be reached"),
        ),
        _ => ConditionUpdate::unmet(types::DEGRADED, "AsExpected", ""),
    };
    let ready = if chosen.is_empty() {
        ConditionUpdate::unmet(
            types::READY,
            "NoDaemonPods",
            format!(
                "ModelDeployment {} has no daemon pods",
                adapter.spec.model_ref.name
            ),
        )
    } else if loaded == chosen.len() {
        ConditionUpdate::met(types::READY, "Loaded", format!("loaded on {loaded} pod(s)"))
    } else if degraded.status {
        ConditionUpdate::unmet(types::READY, degraded.reason, degraded.message.clone())
    } else {
        ConditionUpdate::unmet(
            types::READY,
            "Loading",
            format!("{loaded} of {} pods loaded", chosen.len()),
        )
    };
    LoRAAdapterStatus {
        observed_generation: generation,
        loaded_replicas: Some(loaded as i32),
        placements,
        conditions: merge_conditions(
            &old.conditions,
            &[ready, degraded],
            generation,
            observed.now,
        ),
    }
}

/// Whether a pod's pinned skills are all Ready with the desired content (the readiness gate).
pub fn pod_is_warm(pod: &str, observed: Observed<'_>) -> bool {
    let Some(state) = observed.reports.get(pod).and_then(PodReport::state) else {
        return false;
    };
    if observed.push_errors.contains_key(pod) {
        return false;
    }
    let Some(desired) = observed.plan.desired.get(pod) else {
        return true;
    };
    desired.hashes.iter().all(|(name, hash)| {
        state
            .skills
            .iter()
            .any(|s| &s.name == name && &s.content_hash == hash && s.state == PlacementState::Ready)
    })
}

/// The ModelDeployment's status.
pub fn model_status(model: &ModelDeployment, observed: Observed<'_>) -> ModelDeploymentStatus {
    let old = model.status.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let desired = model.spec.replicas.unwrap_or(1).max(0) as usize;
    let existing = observed.pods.len();
    let ready = observed.pods.iter().filter(|pod| pod.ready).count();
    let troubled: Vec<String> = observed
        .pods
        .iter()
        .filter_map(|pod| match observed.reports.get(&pod.name) {
            Some(PodReport::Unreachable(message)) => Some(format!("{}: {message}", pod.name)),
            Some(PodReport::State(_)) => observed
                .push_errors
                .get(&pod.name)
                .map(|e| format!("{}: {e}", pod.name)),
            _ => None,
        })
        .collect();
    let available = if desired == 0 || ready > 0 {
        ConditionUpdate::met(
            types::AVAILABLE,
            "MinimumReplicasAvailable",
            format!("{ready} of {desired} pods ready"),
        )
    } else {
        ConditionUpdate::unmet(
            types::AVAILABLE,
            "NoReadyReplicas",
            format!("0 of {desired} pods ready"),
        )
    };
    let progressing = if existing != desired || ready < desired {
        ConditionUpdate::met(
            types::PROGRESSING,
            "RollingOut",
            format!("{ready} of {desired} pods ready, {existing} exist"),
        )
    } else {
        ConditionUpdate::unmet(
            types::PROGRESSING,
            "Complete",
            format!("{ready} of {desired} pods ready"),
        )
    };
    let degraded = if troubled.is_empty() {
        ConditionUpdate::unmet(types::DEGRADED, "AsExpected", "")
    } else {
        ConditionUpdate::met(types::DEGRADED, "DaemonUnreachable", troubled.join("; "))
    };
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas: Some(existing as i32),
        ready_replicas: Some(ready as i32),
        selector: Some(names::selector_string(&model.name_any())),
        conditions: merge_conditions(
            &old.conditions,
            &[available, progressing, degraded],
            generation,
            observed.now,
        ),
    }
}
