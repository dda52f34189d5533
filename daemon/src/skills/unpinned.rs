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

use std::ops::Range;

use futures::future::join_all;
use skillkv_api::block_hash::BLOCK_TOKENS;
use skillkv_api::v1alpha1::Assembly;

use crate::engine::EngineHandle;
use crate::engine::handle::PinRequest;
use crate::skills::ResolvedSkill;

/// Whether the segment of the skill at `index` in a prompt is served from the skill's own KV
/// when that KV is at hand.
fn reusable(index: usize, assembly: Assembly) -> bool {
    index == 0 || assembly == Assembly::Modular
}

/// Prefills into the prefix cache (or finds there) the own KV of every skill in `skills` (in
/// prompt order) that is reusable but not pinned, and marks those it found already cached
/// ([`ResolvedSkill::cached`]). A skill the engine cannot prefill (it refused, or stopped) is
/// computed in context, as without this step.
pub async fn cache_unpinned_skills(
    engine: &EngineHandle,
    skills: &mut [(ResolvedSkill, Range<usize>)],
) {
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
    let prefills = wanted.iter().map(|&index| {
        engine.cache_prefix(PinRequest {
            tokens: skills[index].0.version.prefix_tokens.clone(),
            adapter: None,
        })
    });
    let outcomes = join_all(prefills).await;
    for (index, outcome) in wanted.into_iter().zip(outcomes) {
        let skill = &mut skills[index].0;
        match outcome {
            Ok(prefix) => {
                skill.cached = prefix.was_cached();
                tracing::debug!(
                    skill = %skill.name,
                    cached = skill.cached,
                    tokens = prefix.full_tokens,
                    "unpinned skill's KV in the prefix cache"
                );
            }
            Err(error) => tracing::warn!(
                skill = %skill.name,
                error = %error,
                "could not prefill an unpinned skill on its own; computing it in context"
            ),
        }
    }
}
