//! Which skills a request gets: the ones it names, the ones the router detected for it, or
//! the ones this daemon detects in its text — resolved to the version each is served with.

use std::sync::Arc;

use skillkv_api::v1alpha1::Assembly;

use super::{SkillCounters, SkillRegistry, SkillVersion};

/// A skill chosen for a request: the version it uses and where to count its use.
#[derive(Debug, Clone)]
pub struct ResolvedSkill {
    /// The skill's name.
    pub name: String,
    /// The version the request is assembled with.
    pub version: Arc<SkillVersion>,
    /// Whether that version's KV is pinned.
    pub warm: bool,
    /// Whether its KV, though not pinned, was found in the prefix cache (an earlier request
    /// prefilled it; see [`crate::skills::unpinned`]). Set after resolution.
    pub cached: bool,
    /// How it is assembled into the request (its `spec.assembly`).
    pub assembly: Assembly,
    /// Its counters.
    pub counters: Arc<SkillCounters>,
}

/// Which skills a request wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkillSelection {
    /// Detect them from the request's text.
    Auto,
    /// Exactly these (possibly none).
    Named(Vec<String>),
    /// Detected by the router over the skills of the model's pods (`DETECTED_SKILLS_HEADER`):
    /// these, less any this daemon does not have, at most `max_skills_per_request`.
    Routed(Vec<String>),
}

impl SkillSelection {
    /// `named`, `detected` (here) or `routed` (detected by the router): the `selection` of
    /// `x-skillkv-cache` and `skillkv_skill_selections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Named(_) => "named",
            Self::Auto => "detected",
            Self::Routed(_) => "routed",
        }
    }
}

/// Why a request's skills could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveSkillsError {
    /// A named skill is not on this daemon.
    #[error("unknown skill `{name}`; this daemon has: {known}")]
    UnknownSkill {
        /// The name.
        name: String,
        /// The names it has, comma-separated.
        known: String,
    },
    /// Too many skills named.
    #[error("{count} skills named; at most {max} per request")]
    TooMany {
        /// How many were named.
        count: usize,
        /// The bound.
        max: usize,
    },
}

impl SkillRegistry {
    /// The skills for a request; `query` is the text detection looks at.
    pub fn resolve(
        &self,
        selection: &SkillSelection,
        query: &str,
    ) -> Result<Vec<ResolvedSkill>, ResolveSkillsError> {
        let mut state = self.lock();
        let names: Vec<String> = match selection {
            SkillSelection::Named(names) => {
                if names.len() > self.config.max_skills_per_request {
                    return Err(ResolveSkillsError::TooMany {
                        count: names.len(),
                        max: self.config.max_skills_per_request,
                    });
                }
                let mut names = names.clone();
                names.sort();
                names.dedup();
                names
            }
            SkillSelection::Routed(names) => {
                let (known, unknown): (Vec<String>, Vec<String>) = names
                    .iter()
                    .cloned()
                    .partition(|name| state.skills.contains_key(name));
                if !unknown.is_empty() {
                    tracing::debug!(
                        ?unknown,
                        "skills the router detected are not on this daemon"
                    );
                }
                let max = self.config.max_skills_per_request;
                if known.len() > max {
                    tracing::debug!(dropped = ?&known[max..], max, "more skills than a request may use");
                }
                known.into_iter().take(max).collect()
            }
            SkillSelection::Auto => {
                let detector = match &state.detector {
                    Some(detector) => detector.clone(),
                    None => {
                        let cards = state.skills.iter().map(|(name, entry)| {
                            let mut card = entry.latest.document.card();
                            card.name = name.clone();
                            card
                        });
                        let detector = Arc::new(self.config.detector.build(cards));
                        state.detector = Some(detector.clone());
                        state.detector_builds += 1;
                        detector
                    }
                };
                let mut names: Vec<String> = detector
                    .detect(query)
                    .into_iter()
                    .map(|detection| detection.name)
                    .collect();
                names.sort();
                names
            }
        };
        names
            .into_iter()
            .map(|name| {
                let Some(entry) = state.skills.get(&name) else {
                    let known: Vec<&str> = state.skills.keys().map(String::as_str).collect();
                    return Err(ResolveSkillsError::UnknownSkill {
                        name,
                        known: if known.is_empty() {
                            "no skills".to_string()
                        } else {
                            known.join(", ")
                        },
                    });
                };
                let (version, warm) = match &entry.serving {
                    Some(serving) => (serving.version.clone(), true),
                    None => (entry.latest.clone(), false),
                };
                Ok(ResolvedSkill {
                    name,
                    version,
                    warm,
                    cached: false,
                    assembly: entry.assembly,
                    counters: entry.counters.clone(),
                })
            })
            .collect()
    }
}
