//! `PUT /admin/v1/desired`: applying the controller's full desired set of skills and adapters.
//!
//! The document is complete — desired skills that are absent from it are removed; skills from
//! the `--skills` folder are not touched (a desired skill of the same name takes over). A
//! repeat of the last document changes nothing; a lower generation, or the same generation with
//! different content, is a conflict, so a stale controller cannot roll the daemon back. LoRA
//! adapters are recorded as Failed with a clear message: this engine serves base models only.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use skillkv_api::admin::{
    AdapterPhase, AdapterState, AdminEvent, DesiredState, DesiredStateApplied, SkillOrigin,
};
use skillkv_api::skills::{SkillDocument, is_skill_object_name};

use crate::skills::registry::{SkillRegistry, SkillUpdate};

/// The message adapters get until the engine applies LoRA weights.
pub const ADAPTERS_UNSUPPORTED: &str =
    "LoRA adapters are not supported by this daemon's engine yet; it serves the base model only";

/// Why a desired state was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyDesiredStateError {
    /// The generation is older than the one applied.
    #[error("generation {given} is older than the applied generation {applied}")]
    StaleGeneration {
        /// The document's generation.
        given: u64,
        /// The generation applied.
        applied: u64,
    },
    /// The same generation was applied with different content.
    #[error("generation {generation} was already applied with different content")]
    ConflictingGeneration {
        /// The generation.
        generation: u64,
    },
    /// A skill is invalid (bad name, malformed SKILL.md, duplicate).
    #[error("skill `{name}`: {problem}")]
    InvalidSkill {
        /// The skill's name.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// The last desired state and the adapters' states.
#[derive(Debug)]
pub struct DesiredStateManager {
    registry: Arc<SkillRegistry>,
    applied: Mutex<Option<DesiredState>>,
    adapters: Mutex<Vec<AdapterState>>,
    events: tokio::sync::broadcast::Sender<AdminEvent>,
}

impl DesiredStateManager {
    /// A manager that has applied nothing yet.
    pub fn new(registry: Arc<SkillRegistry>) -> Self {
        Self {
            registry,
            applied: Mutex::new(None),
            adapters: Mutex::new(Vec::new()),
            events: tokio::sync::broadcast::channel(64).0,
        }
    }

    /// Adapter state changes from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AdminEvent> {
        self.events.subscribe()
    }

    /// The generation applied last.
    pub fn generation(&self) -> Option<u64> {
        self.applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|desired| desired.generation)
    }

    /// The adapters' states, by name.
    pub fn adapters(&self) -> Vec<AdapterState> {
        self.adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies `desired`.
    pub fn apply(
        &self,
        desired: DesiredState,
    ) -> Result<DesiredStateApplied, ApplyDesiredStateError> {
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(previous) = applied.as_ref() {
            if desired.generation < previous.generation {
                return Err(ApplyDesiredStateError::StaleGeneration {
                    given: desired.generation,
                    applied: previous.generation,
                });
            }
            if desired.generation == previous.generation {
                return if *previous == desired {
                    Ok(DesiredStateApplied {
                        generation: desired.generation,
                        changed: false,
                    })
                } else {
                    Err(ApplyDesiredStateError::ConflictingGeneration {
                        generation: desired.generation,
                    })
                };
            }
        }
        let updates = parse_skills(&desired)?;
        let wanted: BTreeSet<&str> = updates.iter().map(|u| u.name.as_str()).collect();
        let stale: Vec<String> = self
            .registry
            .names_from(SkillOrigin::Desired)
            .into_iter()
            .filter(|name| !wanted.contains(name.as_str()))
            .collect();
        let mut changed = self.registry.remove(&stale);
        changed |= self.registry.upsert(updates);
        changed |= self.apply_adapters(&desired);
        tracing::info!(
            generation = desired.generation,
            skills = desired.skills.len(),
            adapters = desired.adapters.len(),
            changed,
            "desired state applied"
        );
        let generation = desired.generation;
        *applied = Some(desired);
        Ok(DesiredStateApplied {
            generation,
            changed,
        })
    }

    fn apply_adapters(&self, desired: &DesiredState) -> bool {
        let mut states: Vec<AdapterState> = desired
            .adapters
            .iter()
            .map(|adapter| AdapterState {
                name: adapter.name.clone(),
                state: AdapterPhase::Failed,
                message: Some(ADAPTERS_UNSUPPORTED.to_string()),
            })
            .collect();
        states.sort_by(|a, b| a.name.cmp(&b.name));
        states.dedup_by(|a, b| a.name == b.name);
        let mut current = self
            .adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current == states {
            return false;
        }
        for state in states.iter().filter(|state| !current.contains(state)) {
            tracing::warn!(adapter = %state.name, "{ADAPTERS_UNSUPPORTED}");
            let _ = self.events.send(AdminEvent::AdapterState(state.clone()));
        }
        *current = states;
        true
    }
}

fn parse_skills(desired: &DesiredState) -> Result<Vec<SkillUpdate>, ApplyDesiredStateError> {
    let mut seen = BTreeSet::new();
    desired
        .skills
        .iter()
        .map(|skill| {
            let invalid = |problem: String| ApplyDesiredStateError::InvalidSkill {
                name: skill.name.clone(),
                problem,
            };
            if !is_skill_object_name(&skill.name) {
                return Err(invalid(
                    "a skill's name must be 1-253 lowercase letters, digits, '-' and '.', \
                     starting and ending with a letter or digit (a Kubernetes object name)"
                        .to_string(),
                ));
            }
            if !seen.insert(skill.name.as_str()) {
                return Err(invalid("listed twice".to_string()));
            }
            let origin = format!("desired:{}", skill.name);
            let document = SkillDocument::parse(Path::new(&origin), skill.content.clone())
                .map_err(|error| invalid(error.to_string()))?;
            Ok(SkillUpdate {
                name: skill.name.clone(),
                document,
                origin: SkillOrigin::Desired,
                assembly: skill.assembly,
                priority: skill.priority,
                pin: skill.pin,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skillkv_api::admin::DesiredSkill;
    use skillkv_api::v1alpha1::Assembly;

    fn desired(names: &[&str]) -> DesiredState {
        DesiredState {
            generation: 1,
            skills: names
                .iter()
                .map(|name| DesiredSkill {
                    name: name.to_string(),
                    content: "---\nname: some-skill\ndescription: d\n---\nbody\n".to_string(),
                    priority: 0,
                    assembly: Assembly::default(),
                    pin: true,
                })
                .collect(),
            adapters: Vec::new(),
        }
    }

    #[test]
    fn skill_names_must_be_kubernetes_object_names() {
        for bad in [
            "../escape",
            "a,b",
            "Upper",
            "",
            "-lead",
            "trail.",
            "with space",
            "ünï",
        ] {
            match parse_skills(&desired(&[bad])) {
                Err(ApplyDesiredStateError::InvalidSkill { name, problem }) => {
                    assert_eq!(name, bad);
                    assert!(problem.contains("Kubernetes object name"), "{problem}");
                }
                other => panic!("{bad:?} was accepted: {other:?}"),
            }
        }
        let names: Vec<String> = parse_skills(&desired(&["sql-tuning", "team.sql-2"]))
            .expect("valid names")
            .into_iter()
            .map(|update| update.name)
            .collect();
        assert_eq!(names, ["sql-tuning", "team.sql-2"]);
    }
}
