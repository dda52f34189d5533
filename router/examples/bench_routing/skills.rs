//! The benchmark's skills: their SKILL.md texts, and which daemon gets which of them — either
//! as the operator places Skill objects (`replicate-hot`: the operator's own
//! [`skillkv_api::placement::place_skills`]; every daemon is pushed every skill, pinned where
//! placed, as `skillkv_operator::fleet::plan` builds a pod's desired state) or the original
//! `partitioned` scheme (each skill pinned on one daemon).

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skillkv_api::admin::DaemonState;
use skillkv_api::placement::{Placement, PodSlot, SkillDemand, blocks_for_tokens, place_skills};
use skillkv_daemon::cli::bench::skills::WorkItem;

use crate::real;

/// How skills are placed on the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacementMode {
    /// As the operator places Skill objects: the `--hot-skills` most popular skills with
    /// `replicas` omitted (every pod) and a higher `priority`, the rest with `replicas: 1`.
    ReplicateHot,
    /// Skill `j` pinned on daemon `j mod N` only (known, served cold, everywhere else).
    Partitioned,
}

/// Priority of the replicated hot skills (the tail's is 0).
const HOT_PRIORITY: i32 = 10;

const TOPICS: [&str; 16] = [
    "caches", "queues", "kernels", "indexes", "leases", "shards", "tokens", "sockets", "paging",
    "locks", "probes", "quotas", "batches", "replicas", "schemas", "traces",
];
const NOUNS: [&str; 12] = [
    "request", "buffer", "thread", "budget", "counter", "window", "table", "stream", "timer",
    "record", "header", "worker",
];
const VERBS: [&str; 8] = [
    "stalls", "grows", "retries", "drops", "splits", "waits", "spikes", "drifts",
];

/// A SKILL.md of about `chars` characters about its own topic: `(name, text)`.
pub fn skill_document(index: usize, chars: usize) -> (String, String) {
    let name = skill_document_name(index);
    let topic = TOPICS[index % TOPICS.len()];
    let mut rng = StdRng::seed_from_u64(1000 + index as u64);
    let mut body = format!("Guide {index} on {topic}. ");
    let mut rule = 0;
    while body.len() < chars {
        let pick =
            |rng: &mut StdRng, words: &[&'static str]| words[rng.random_range(0..words.len())];
        body.push_str(&format!(
            "Rule {rule} for {topic}: when the {} {}, check the {} before the {}. ",
            pick(&mut rng, &NOUNS),
            pick(&mut rng, &VERBS),
            pick(&mut rng, &NOUNS),
            pick(&mut rng, &NOUNS),
        ));
        rule += 1;
    }
    let text = real::skill_markdown(&name, &format!("Guidance on {topic} number {index}"), &body);
    (name, text)
}

/// `text` cut or repeated, at word boundaries, to about `chars` characters (at least one word).
pub fn fit_text(text: &str, chars: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut fitted = String::new();
    // Each word adds at least one character, so `chars + 1` of them always pass the limit.
    for word in words.iter().cycle().take(chars + 1) {
        if !fitted.is_empty() && fitted.len() + 1 + word.len() > chars {
            break;
        }
        if !fitted.is_empty() {
            fitted.push(' ');
        }
        fitted.push_str(word);
    }
    fitted
}

/// The name of daemon `d` in placement (its pod name, on a node of its own).
pub fn pod_name(d: usize) -> String {
    format!("daemon-{d}")
}

/// The Skill objects a user would write for `replicate-hot`: the `hot` most popular skills
/// (the workload's Zipf ranks are the skill indices, 0 the hottest) on every pod with a higher
/// priority, the rest once. `tokens[j]` is skill `j`'s token count as the daemons report it.
pub fn demands(tokens: &[usize], hot: usize, block_tokens: u64) -> Vec<SkillDemand> {
    tokens
        .iter()
        .enumerate()
        .map(|(j, &count)| SkillDemand {
            name: skill_document_name(j),
            blocks: blocks_for_tokens(count as u64, block_tokens).max(1),
            replicas: if j < hot { None } else { Some(1) },
            priority: if j < hot { HOT_PRIORITY } else { 0 },
            current: BTreeSet::new(),
        })
        .collect()
}

fn skill_document_name(index: usize) -> String {
    format!("skill-{index:02}")
}

/// The operator's placement of `demands` over daemons that reported `states`, the way the
/// controller does it: each pod's budget is its `pinnedBudgetBlocks`.
pub fn operator_placement(states: &[DaemonState], demands: &[SkillDemand]) -> Placement {
    let slots: Vec<PodSlot> = states
        .iter()
        .enumerate()
        .map(|(d, state)| PodSlot {
            name: pod_name(d),
            node: Some(format!("node-{d}")),
            budget_blocks: Some(state.kv_budget.pinned_budget_blocks as u64),
        })
        .collect();
    place_skills(&slots, demands)
}

/// What each daemon is pushed: `(name, SKILL.md, priority, pin)` per daemon, every skill on
/// every daemon (so any request can be served anywhere). With the operator's `placement`
/// (`replicate-hot`), as `fleet::plan` builds a pod's desired state: the Skill's priority, pinned
/// where placed. Without (`partitioned`): skill `j` pinned on daemon `j mod N` only.
pub fn desired_per_daemon(
    documents: &[(String, String)],
    placement: Option<&Placement>,
    demands: &[SkillDemand],
    daemons: usize,
) -> Vec<Vec<(String, String, i32, bool)>> {
    (0..daemons)
        .map(|d| match placement {
            Some(placement) => demands
                .iter()
                .zip(documents)
                .map(|(demand, (name, text))| {
                    let placed = placement
                        .skills
                        .get(&demand.name)
                        .is_some_and(|a| a.pods.contains(&pod_name(d)));
                    (name.clone(), text.clone(), demand.priority, placed)
                })
                .collect(),
            None => documents
                .iter()
                .enumerate()
                .map(|(j, (name, text))| (name.clone(), text.clone(), 0, j % daemons == d))
                .collect(),
        })
        .collect()
}

/// The skill hit rate no routing can beat: each request on the daemon that has the most of its
/// skills pinned (`pinned[d]`: the names Ready on daemon `d`).
pub fn hit_rate_ceiling(
    work: &[WorkItem],
    documents: &[(String, String)],
    pinned: &[BTreeSet<String>],
) -> f64 {
    let (warm, total) = work.iter().fold((0, 0), |(warm, total), item| {
        let best = pinned
            .iter()
            .map(|held| {
                item.skills
                    .iter()
                    .filter(|&&j| held.contains(&documents[j].0))
                    .count()
            })
            .max()
            .unwrap_or(0);
        (warm + best, total + item.skills.len())
    });
    warm as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::fit_text;

    #[test]
    fn fit_text_cuts_and_extends_at_word_boundaries() {
        let text = "alpha beta gamma delta";
        assert_eq!(fit_text(text, 10), "alpha beta");
        assert_eq!(fit_text(text, 9), "alpha");
        let long = fit_text(text, 40);
        assert_eq!(long, "alpha beta gamma delta alpha beta gamma");
        assert!(long.len() <= 40);
        // At least one word, even when it is longer than asked.
        assert_eq!(fit_text(text, 2), "alpha");
        assert_eq!(fit_text("", 10), "");
    }
}
