//! Status Conditions: building them and merging them into an existing list so that
//! `lastTransitionTime` only moves when a condition's status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set, without its time and generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// The type, e.g. `Ready`.
    pub type_: &'static str,
    /// Whether it holds.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// A sentence for people.
    pub message: String,
}

impl ConditionUpdate {
    /// A condition that holds.
    pub fn met(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }
    /// A condition that does not hold.
    pub fn unmet(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }
}

/// Merges `updates` into `existing`: a condition keeps its `lastTransitionTime` when its status
/// did not change; every condition gets `observedGeneration`. Conditions not updated are kept.
pub fn merge_conditions(
    existing: &[Condition],
    updates: &[ConditionUpdate],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing.to_vec();
    for update in updates {
        let status = if update.status { "True" } else { "False" }.to_owned();
        let previous = merged.iter().position(|c| c.type_ == update.type_);
        let last_transition_time = match previous.map(|i| &merged[i]) {
            Some(old) if old.status == status => old.last_transition_time.clone(),
            _ => Time(now),
        };
        let condition = Condition {
            type_: update.type_.to_owned(),
            status,
            reason: update.reason.to_owned(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time,
        };
        match previous {
            Some(i) => merged[i] = condition,
            None => merged.push(condition),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn time_moves_only_when_the_status_flips() {
        let first = merge_conditions(
            &[],
            &[ConditionUpdate::unmet("Ready", "Pending", "a")],
            Some(1),
            at(100),
        );
        assert_eq!(first[0].last_transition_time, Time(at(100)));

        let same = merge_conditions(
            &first,
            &[ConditionUpdate::unmet("Ready", "Other", "b")],
            Some(2),
            at(200),
        );
        assert_eq!(same[0].last_transition_time, Time(at(100)));
        assert_eq!(same[0].reason, "Other");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = merge_conditions(
            &same,
            &[ConditionUpdate::met("Ready", "Warm", "c")],
            Some(2),
            at(300),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn other_conditions_are_kept() {
        let first = merge_conditions(&[], &[ConditionUpdate::met("A", "R", "")], None, at(1));
        let both = merge_conditions(&first, &[ConditionUpdate::met("B", "R", "")], None, at(2));
        assert_eq!(both.len(), 2);
        assert_eq!(both[0].type_, "A");
    }
}
