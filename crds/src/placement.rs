//! Skill placement: which daemon pods of a ModelDeployment keep which skills pinned. Pure and
//! deterministic: capacity-aware (each pod's pinned-KV budget in blocks), `replicas` honoured
//! (default: every pod), higher `priority` placed first, spread across nodes, and stable — a
//! skill stays on the pods that hold it as long as they exist and it fits; only the missing
//! copies are placed anew (for example after a pod disappears).
//!
//! The operator's controller places with it (`skillkv_operator::fleet::plan`); it lives in the
//! contract crate so that the routing benchmark (`router/examples/bench_routing`) places skills
//! exactly as the operator does.

use std::collections::{BTreeMap, BTreeSet};

/// One daemon pod as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSlot {
    /// Pod name.
    pub name: String,
    /// Node the pod runs on, if scheduled.
    pub node: Option<String>,
    /// Blocks the pod may pin, from the daemon's `kv_budget.pinned_budget_blocks`; `None` while the
    /// daemon has not reported (no new skills are placed there until it does).
    pub budget_blocks: Option<u64>,
}

/// One skill's demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkillDemand {
    /// Skill name.
    pub name: String,
    /// Blocks one copy pins.
    pub blocks: u64,
    /// Copies wanted; `None`: one on every pod.
    pub replicas: Option<u32>,
    /// Higher first when capacity is short.
    pub priority: i32,
    /// Pods holding it now (from its status); kept when they still exist and it still fits.
    pub current: BTreeSet<String>,
}

/// The outcome for one skill.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkillAssignment {
    /// Pods chosen, sorted.
    pub pods: BTreeSet<String>,
    /// Copies wanted (replicas capped at the number of pods).
    pub wanted: usize,
}

impl SkillAssignment {
    /// Whether fewer copies were placed than wanted for lack of pinned KV capacity.
    pub fn is_short(&self) -> bool {
        self.pods.len() < self.wanted
    }
}

/// The placement of every skill of one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Per skill name.
    pub skills: BTreeMap<String, SkillAssignment>,
}

impl Placement {
    /// Skills placed on one pod, sorted by name.
    pub fn skills_on(&self, pod: &str) -> Vec<&str> {
        self.skills
            .iter()
            .filter(|(_, assignment)| assignment.pods.contains(pod))
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// Blocks a prompt of `tokens` tokens occupies with `block_tokens` tokens per block.
pub fn blocks_for_tokens(tokens: u64, block_tokens: u64) -> u64 {
    tokens.div_ceil(block_tokens.max(1))
}

/// Places `skills` over `pods`. See the module documentation for the rules.
pub fn place_skills(pods: &[PodSlot], skills: &[SkillDemand]) -> Placement {
    let mut order: Vec<&SkillDemand> = skills.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });

    let mut remaining: BTreeMap<&str, Option<u64>> = pods
        .iter()
        .map(|pod| (pod.name.as_str(), pod.budget_blocks))
        .collect();
    let mut placement = Placement::default();

    // Pass 1: keep what is placed, highest priority first, while it fits.
    for skill in &order {
        let wanted = skill
            .replicas
            .map_or(pods.len(), |n| n as usize)
            .min(pods.len());
        let assignment = placement
            .skills
            .entry(skill.name.clone())
            .or_insert_with(|| SkillAssignment {
                pods: BTreeSet::new(),
                wanted,
            });
        for pod in &skill.current {
            if assignment.pods.len() >= wanted {
                break;
            }
            let Some(budget) = remaining.get_mut(pod.as_str()) else {
                continue; // the pod is gone
            };
            match budget {
                None => {
                    assignment.pods.insert(pod.clone());
                }
                Some(free) if *free >= skill.blocks => {
                    *free -= skill.blocks;
                    assignment.pods.insert(pod.clone());
                }
                Some(_) => {}
            }
        }
    }

    // Pass 2: place missing copies, highest priority first, spreading over nodes.
    for skill in &order {
        let Some(assignment) = placement.skills.get_mut(&skill.name) else {
            continue;
        };
        while assignment.pods.len() < assignment.wanted {
            let used_nodes: BTreeSet<&str> = pods
                .iter()
                .filter(|pod| assignment.pods.contains(&pod.name))
                .filter_map(|pod| pod.node.as_deref())
                .collect();
            let best = pods
                .iter()
                .filter(|pod| !assignment.pods.contains(&pod.name))
                .filter_map(|pod| match remaining.get(pod.name.as_str()) {
                    Some(Some(free)) if *free >= skill.blocks => Some((pod, *free)),
                    _ => None,
                })
                .min_by(|(a, a_free), (b, b_free)| {
                    let a_spread = a.node.as_deref().is_some_and(|n| used_nodes.contains(n));
                    let b_spread = b.node.as_deref().is_some_and(|n| used_nodes.contains(n));
                    a_spread
                        .cmp(&b_spread)
                        .then_with(|| b_free.cmp(a_free))
                        .then_with(|| a.name.cmp(&b.name))
                });
            let Some((pod, _)) = best else {
                break;
            };
            if let Some(Some(free)) = remaining.get_mut(pod.name.as_str()) {
                *free -= skill.blocks;
            }
            assignment.pods.insert(pod.name.clone());
        }
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(name: &str, node: &str, budget: u64) -> PodSlot {
        PodSlot {
            name: name.to_owned(),
            node: Some(node.to_owned()),
            budget_blocks: Some(budget),
        }
    }

    fn skill(name: &str, blocks: u64, replicas: Option<u32>, priority: i32) -> SkillDemand {
        SkillDemand {
            name: name.to_owned(),
            blocks,
            replicas,
            priority,
            current: BTreeSet::new(),
        }
    }

    fn with_current(mut demands: Vec<SkillDemand>, placement: &Placement) -> Vec<SkillDemand> {
        for demand in &mut demands {
            demand.current = placement.skills[&demand.name].pods.clone();
        }
        demands
    }

    fn used_blocks(
        pods: &[PodSlot],
        skills: &[SkillDemand],
        placement: &Placement,
    ) -> BTreeMap<String, u64> {
        let mut used: BTreeMap<String, u64> = pods.iter().map(|p| (p.name.clone(), 0)).collect();
        for demand in skills {
            for pod in &placement.skills[&demand.name].pods {
                *used.entry(pod.clone()).or_default() += demand.blocks;
            }
        }
        used
    }

    #[test]
    fn replicas_default_to_every_pod() {
        let pods = [pod("a", "n1", 10), pod("b", "n2", 10), pod("c", "n3", 10)];
        let placement = place_skills(&pods, &[skill("s", 2, None, 0)]);
        assert_eq!(placement.skills["s"].pods.len(), 3);
        assert!(!placement.skills["s"].is_short());
    }

    #[test]
    fn copies_spread_over_nodes_before_doubling_up() {
        let pods = [pod("a", "n1", 10), pod("b", "n1", 10), pod("c", "n2", 5)];
        let placement = place_skills(&pods, &[skill("s", 2, Some(2), 0)]);
        let chosen = &placement.skills["s"].pods;
        assert!(
            chosen.contains("c"),
            "the second node must get a copy: {chosen:?}"
        );
        assert_eq!(chosen.len(), 2);
    }

    #[test]
    fn higher_priority_wins_when_capacity_is_short() {
        let pods = [pod("a", "n1", 5)];
        let skills = [skill("low", 4, None, 0), skill("high", 4, None, 10)];
        let placement = place_skills(&pods, &skills);
        assert_eq!(placement.skills["high"].pods.len(), 1);
        assert!(placement.skills["low"].is_short());
    }

    #[test]
    fn a_vanished_pod_is_replaced_and_the_survivor_kept() {
        let pods = [pod("a", "n1", 10), pod("b", "n2", 10), pod("c", "n3", 10)];
        let skills = vec![skill("s", 3, Some(2), 0)];
        let first = place_skills(&pods, &skills);
        let lost = first.skills["s"]
            .pods
            .iter()
            .next()
            .cloned()
            .unwrap_or_default();
        let survivors: Vec<PodSlot> = pods.iter().filter(|p| p.name != lost).cloned().collect();
        let second = place_skills(&survivors, &with_current(skills, &first));
        let kept: BTreeSet<_> = first.skills["s"]
            .pods
            .iter()
            .filter(|p| **p != lost)
            .cloned()
            .collect();
        assert!(second.skills["s"].pods.is_superset(&kept));
        assert_eq!(second.skills["s"].pods.len(), 2);
        assert!(!second.skills["s"].pods.contains(&lost));
    }

    #[test]
    fn pods_without_a_reported_budget_get_no_new_skills() {
        let pods = [PodSlot {
            name: "a".to_owned(),
            node: None,
            budget_blocks: None,
        }];
        let placement = place_skills(&pods, &[skill("s", 1, None, 0)]);
        assert!(placement.skills["s"].pods.is_empty());
        assert!(placement.skills["s"].is_short());
    }

    fn arb_pods() -> impl Strategy<Value = Vec<PodSlot>> {
        prop::collection::vec((0u8..4, 0u64..64), 0..7).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (node, budget))| {
                    pod(&format!("pod-{i}"), &format!("node-{node}"), budget)
                })
                .collect()
        })
    }

    fn arb_skills() -> impl Strategy<Value = Vec<SkillDemand>> {
        prop::collection::vec((1u64..24, prop::option::of(0u32..8), 0i32..3), 0..8).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (blocks, replicas, priority))| {
                        skill(&format!("skill-{i}"), blocks, replicas, priority)
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn never_over_budget(pods in arb_pods(), skills in arb_skills()) {
            let placement = place_skills(&pods, &skills);
            let used = used_blocks(&pods, &skills, &placement);
            for pod in &pods {
                prop_assert!(used[&pod.name] <= pod.budget_blocks.unwrap_or(0), "{} over budget", pod.name);
            }
        }

        #[test]
        fn stable_when_nothing_changes(pods in arb_pods(), skills in arb_skills()) {
            let first = place_skills(&pods, &skills);
            let second = place_skills(&pods, &with_current(skills, &first));
            prop_assert_eq!(first, second);
        }

        #[test]
        fn replicas_honoured_when_capacity_allows(pods in arb_pods(), skills in arb_skills()) {
            // Give every pod room for every skill: then nobody may be short.
            let total: u64 = skills.iter().map(|s| s.blocks).sum();
            let roomy: Vec<PodSlot> = pods.iter().map(|p| PodSlot { budget_blocks: Some(total), ..p.clone() }).collect();
            let placement = place_skills(&roomy, &skills);
            for demand in &skills {
                let assignment = &placement.skills[&demand.name];
                let wanted = demand.replicas.map_or(roomy.len(), |n| n as usize).min(roomy.len());
                prop_assert_eq!(assignment.pods.len(), wanted);
                prop_assert!(!assignment.is_short());
            }
        }

        #[test]
        fn short_exactly_when_fewer_copies_than_wanted(pods in arb_pods(), skills in arb_skills()) {
            let placement = place_skills(&pods, &skills);
            for demand in &skills {
                let assignment = &placement.skills[&demand.name];
                let wanted = demand.replicas.map_or(pods.len(), |n| n as usize).min(pods.len());
                prop_assert_eq!(assignment.wanted, wanted);
                prop_assert_eq!(assignment.is_short(), assignment.pods.len() < wanted);
                prop_assert!(assignment.pods.len() <= wanted);
                // Short only when no pod without the skill has room for it.
                if assignment.is_short() {
                    let used = used_blocks(&pods, &skills, &placement);
                    for pod in pods.iter().filter(|p| !assignment.pods.contains(&p.name)) {
                        prop_assert!(pod.budget_blocks.unwrap_or(0) - used[&pod.name] < demand.blocks);
                    }
                }
            }
        }
    }
}
