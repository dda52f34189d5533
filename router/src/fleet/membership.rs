//! Dynamic fleet membership: [`diff_backends`] (pure) says which daemons join and leave when
//! the desired set changes, and [`Fleet::set_backends`] swaps the pod list atomically. Pods are
//! keyed by their backend name; a pod whose address, admin URL or admin token changed leaves
//! and joins again as a new pod (new index, fresh state, new follower).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Fleet, Pod, write};
use crate::config::BackendConfig;

/// How the desired backends differ from the current ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendDiff {
    /// Backends to add, in desired order.
    pub added: Vec<BackendConfig>,
    /// Names of the backends to remove.
    pub removed: Vec<String>,
}

impl BackendDiff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What changes to turn `current` into `desired`, by backend name. A name present in both with
/// a different configuration is removed and added; a name repeated in `desired` counts once
/// (the first).
pub fn diff_backends(current: &[BackendConfig], desired: &[BackendConfig]) -> BackendDiff {
    let current: BTreeMap<&str, &BackendConfig> =
        current.iter().map(|b| (b.name.as_str(), b)).collect();
    let mut seen = BTreeSet::new();
    let mut diff = BackendDiff::default();
    for backend in desired {
        if !seen.insert(backend.name.as_str()) {
            continue;
        }
        match current.get(backend.name.as_str()) {
            Some(existing) if *existing == backend => {}
            Some(_) => {
                diff.removed.push(backend.name.clone());
                diff.added.push(backend.clone());
            }
            None => diff.added.push(backend.clone()),
        }
    }
    diff.removed.extend(
        current
            .keys()
            .filter(|name| !seen.contains(*name))
            .map(|name| (*name).to_string()),
    );
    diff
}

/// The pods that joined and left in one membership change.
#[derive(Debug, Default)]
pub struct MembershipChange {
    /// New pods: start following them.
    pub added: Vec<Arc<Pod>>,
    /// Pods that left: stop following them. Requests in flight on them finish.
    pub removed: Vec<Arc<Pod>>,
}

impl MembershipChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl Fleet {
    /// Makes the fleet exactly `desired`: pods that are unchanged keep their state, the others
    /// leave or join. Routing sees the old or the new list, never a mix.
    pub fn set_backends(&self, desired: Vec<BackendConfig>) -> MembershipChange {
        let mut pods = write(&self.pods);
        let current: Vec<BackendConfig> = pods.iter().map(|p| p.backend.clone()).collect();
        let diff = diff_backends(&current, &desired);
        if diff.is_empty() {
            return MembershipChange::default();
        }
        let removed_names: BTreeSet<&str> = diff.removed.iter().map(String::as_str).collect();
        let (removed, mut kept): (Vec<Arc<Pod>>, Vec<Arc<Pod>>) = pods
            .iter()
            .cloned()
            .partition(|p| removed_names.contains(p.backend.name.as_str()));
        let added: Vec<Arc<Pod>> = diff.added.into_iter().map(|b| self.new_pod(b)).collect();
        kept.extend(added.iter().cloned());
        kept.sort_by_key(|p| p.index);
        *pods = Arc::new(kept);
        drop(pods);
        if !removed.is_empty() {
            // Their skills no longer count for detection.
            self.skills_epoch
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        MembershipChange { added, removed }
    }
}

#[cfg(test)]
mod tests {
    use skillkv_api::skills::DetectorSettings;

    use super::*;

    fn backend(name: &str, token: Option<&str>) -> BackendConfig {
        BackendConfig {
            name: name.to_string(),
            url: format!("http://{name}:8080"),
            admin_url: Some(format!("http://{name}:8081")),
            admin_token: token.map(str::to_string),
        }
    }

    #[test]
    fn diff_adds_removes_and_replaces_changed_backends() {
        let current = [backend("a", None), backend("b", None), backend("c", None)];
        let desired = [
            backend("b", None),
            backend("c", Some("t")),
            backend("d", None),
            backend("d", Some("ignored duplicate")),
        ];
        let diff = diff_backends(&current, &desired);
        assert_eq!(
            diff.added,
            vec![backend("c", Some("t")), backend("d", None)]
        );
        let mut removed = diff.removed;
        removed.sort();
        assert_eq!(removed, vec!["a", "c"]);
        assert!(diff_backends(&desired[..3], &desired[..3]).is_empty());
    }

    #[test]
    fn set_backends_keeps_unchanged_pods_and_never_reuses_indices() {
        let fleet = Fleet::new(
            vec![backend("a", None), backend("b", None)],
            16,
            DetectorSettings::default(),
        );
        let b_before = fleet.pod(1).expect("b is index 1");
        let _in_flight = b_before.start_request();
        let change = fleet.set_backends(vec![backend("b", None), backend("c", None)]);
        let names = |pods: &[Arc<Pod>]| {
            pods.iter()
                .map(|p| (p.index, p.backend.name.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&change.added), vec![(2, "c".to_string())]);
        assert_eq!(names(&change.removed), vec![(0, "a".to_string())]);
        assert_eq!(
            names(&fleet.pods()),
            vec![(1, "b".to_string()), (2, "c".to_string())]
        );
        let b_after = fleet.pod(1).expect("b stays");
        assert!(Arc::ptr_eq(&b_after, &b_before));
        assert_eq!(b_after.in_flight(), 1, "an unchanged pod keeps its state");
        assert!(fleet.pod(0).is_none(), "a left");
        assert!(fleet.set_backends(fleet_backends(&fleet)).is_empty());
        // A changed token replaces the pod: a new index and fresh state.
        let change = fleet.set_backends(vec![backend("b", Some("t")), backend("c", None)]);
        assert_eq!(names(&change.added), vec![(3, "b".to_string())]);
        assert_eq!(names(&change.removed), vec![(1, "b".to_string())]);
        assert_eq!(fleet.pod(3).expect("new b").in_flight(), 0);
        let change = fleet.set_backends(Vec::new());
        assert_eq!(change.removed.len(), 2);
        assert!(fleet.pods().is_empty());
    }

    fn fleet_backends(fleet: &Fleet) -> Vec<BackendConfig> {
        fleet.pods().iter().map(|p| p.backend.clone()).collect()
    }
}
