//! Unit tests of the routing decisions.

use super::*;

fn pod(index: usize) -> Candidate {
    Candidate {
        pod: index,
        name: format!("pod-{index}"),
        healthy: true,
        in_flight: 0,
        waiting: 0,
        free_blocks: 100,
        skills_ready: 0,
        knows_skills: true,
        prefix_blocks: 0,
    }
}

fn skills(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn locality() -> RoutingConfig {
    RoutingConfig::default()
}

#[test]
fn the_pod_with_the_skills_ready_wins_over_a_lighter_one() {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    pods[2].skills_ready = 1;
    pods[2].in_flight = 1;
    pods[0].in_flight = 1;
    let decision = decide(&pods, &skills(&["sql"]), &locality(), 0).expect("decides");
    assert_eq!(decision.order[0], 2);
    assert_eq!(decision.reason, Reason::SkillHit);
    // Every pod stays in the retry order, the lightest next.
    assert_eq!(decision.order, vec![2, 1, 0]);
}

#[test]
fn more_of_the_skills_beats_fewer_and_prefix_breaks_ties() {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    pods[0].skills_ready = 1;
    pods[1].skills_ready = 2;
    pods[2].skills_ready = 2;
    pods[2].prefix_blocks = 5;
    let decision = decide(&pods, &skills(&["a", "b"]), &locality(), 0).expect("decides");
    assert_eq!(decision.order[0], 2);
}

/// Three pods as the operator places a hot skill (`replicas` omitted: every pod) and a cold one
/// (`replicas: 1`, on pod 1 only): the pods without `cold` do not know it.
fn hot_everywhere_cold_on_pod_1() -> Vec<Candidate> {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    for p in &mut pods {
        p.skills_ready = 1;
        p.knows_skills = false;
    }
    pods[1].skills_ready = 2;
    pods[1].knows_skills = true;
    pods
}

#[test]
fn a_hot_and_a_cold_skill_go_to_the_pod_holding_the_cold_one() {
    let request = skills(&["cold", "hot"]);
    let mut pods = hot_everywhere_cold_on_pod_1();
    pods[0].in_flight = 1;
    let decision = decide(&pods, &request, &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (1, Reason::SkillHit));
    // Over the load bound, pod 1 still takes it: nobody else can serve `cold`.
    pods[1].in_flight = 5;
    let decision = decide(&pods, &request, &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (1, Reason::SkillHit));
    // Were `cold` known everywhere (served cold elsewhere), the bound would move it.
    for p in &mut pods {
        p.knows_skills = true;
    }
    let decision = decide(&pods, &request, &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (2, Reason::SkillHit));
}

#[test]
fn every_policy_chooses_only_among_pods_that_know_the_skills() {
    let request = skills(&["cold", "hot"]);
    let mut pods = hot_everywhere_cold_on_pod_1();
    pods[2].knows_skills = true;
    pods[2].skills_ready = 1;
    pods[0].in_flight = 0;
    pods[1].in_flight = 2;
    pods[2].in_flight = 1;
    let round_robin = RoutingConfig {
        policy: Policy::RoundRobin,
        ..locality()
    };
    let chosen: std::collections::BTreeSet<usize> = (0..6)
        .map(|turn| {
            decide(&pods, &request, &round_robin, turn)
                .expect("decides")
                .order[0]
        })
        .collect();
    assert_eq!(chosen, [1, 2].into());
    let least_loaded = RoutingConfig {
        policy: Policy::LeastLoaded,
        ..locality()
    };
    let decision = decide(&pods, &request, &least_loaded, 0).expect("decides");
    assert_eq!(
        decision.order[0], 2,
        "pod 0 is lighter but does not know `cold`"
    );
    // The pods that know the skills come first in the retry order too.
    assert_eq!(decision.order, vec![2, 1, 0]);
}

#[test]
fn when_no_pod_knows_every_skill_any_healthy_pod_may_be_chosen() {
    let request = skills(&["a", "b"]);
    let mut pods = vec![pod(0), pod(1), pod(2)];
    for p in &mut pods {
        p.knows_skills = false;
    }
    pods[0].skills_ready = 1;
    let decision = decide(&pods, &request, &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (0, Reason::SkillHit));
    let round_robin = RoutingConfig {
        policy: Policy::RoundRobin,
        ..locality()
    };
    let chosen: std::collections::BTreeSet<usize> = (0..3)
        .map(|turn| {
            decide(&pods, &request, &round_robin, turn)
                .expect("decides")
                .order[0]
        })
        .collect();
    assert_eq!(chosen.len(), 3);
}

#[test]
fn the_longest_cached_prefix_wins_without_skills() {
    let mut pods = vec![pod(0), pod(1)];
    pods[0].prefix_blocks = 3;
    pods[1].prefix_blocks = 8;
    let decision = decide(&pods, &[], &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (1, Reason::PrefixHit));
}

#[test]
fn bounded_load_moves_traffic_off_a_hot_warm_pod() {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    pods[0].skills_ready = 1;
    pods[0].in_flight = 4;
    pods[1].in_flight = 1;
    // Mean with this request: 6/3 = 2; cap ⌈1.25 × 2⌉ = 3: pod 0 (4) may not take more.
    assert_eq!(load_cap(&[4, 1, 0], 0.25), 3);
    let decision = decide(&pods, &skills(&["sql"]), &locality(), 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (2, Reason::Load));
    // With a large ε the warm pod keeps it.
    let loose = RoutingConfig {
        load_epsilon: 2.0,
        ..locality()
    };
    let decision = decide(&pods, &skills(&["sql"]), &loose, 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (0, Reason::SkillHit));
}

#[test]
fn no_pod_ever_exceeds_the_bound_under_a_stream_of_warm_requests() {
    let epsilon = 0.25;
    let config = RoutingConfig {
        load_epsilon: epsilon,
        ..locality()
    };
    let mut pods = vec![pod(0), pod(1), pod(2), pod(3)];
    pods[1].skills_ready = 1;
    for _ in 0..40 {
        let decision = decide(&pods, &skills(&["s"]), &config, 0).expect("decides");
        let in_flight: Vec<usize> = pods.iter().map(|p| p.in_flight).collect();
        let cap = load_cap(&in_flight, epsilon);
        pods[decision.order[0]].in_flight += 1;
        assert!(pods[decision.order[0]].in_flight <= cap);
    }
    let max = pods.iter().map(|p| p.in_flight).max().unwrap_or(0);
    let mean = 40.0 / 4.0;
    assert!(max as f64 <= ((1.0 + epsilon) * mean).ceil(), "max {max}");
    // And the warm pod carried the most.
    assert_eq!(max, pods[1].in_flight);
}

#[test]
fn cold_skills_hash_consistently_and_spread_over_pods() {
    let pods = vec![pod(0), pod(1), pod(2)];
    let first = decide(&pods, &skills(&["x"]), &locality(), 0).expect("decides");
    assert_eq!(first.reason, Reason::Hash);
    for turn in 1..5 {
        let again = decide(&pods, &skills(&["x"]), &locality(), turn).expect("decides");
        assert_eq!(again.order[0], first.order[0]);
    }
    let chosen: std::collections::BTreeSet<usize> = (0..30)
        .map(|i| {
            decide(&pods, &skills(&[&format!("skill-{i}")]), &locality(), 0)
                .expect("decides")
                .order[0]
        })
        .collect();
    assert_eq!(chosen.len(), 3, "30 skill sets should use every pod");
}

#[test]
fn removing_a_pod_only_moves_the_skills_that_hashed_to_it() {
    let pods = vec![pod(0), pod(1), pod(2)];
    let without_1: Vec<Candidate> = pods.iter().filter(|p| p.pod != 1).cloned().collect();
    for i in 0..30 {
        let set = skills(&[&format!("skill-{i}")]);
        let before = decide(&pods, &set, &locality(), 0).expect("decides").order[0];
        let after = decide(&without_1, &set, &locality(), 0)
            .expect("decides")
            .order[0];
        if before != 1 {
            assert_eq!(before, after, "skill-{i} moved although its pod stayed");
        }
    }
}

#[test]
fn unhealthy_pods_are_avoided_and_tried_last() {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    pods[0].skills_ready = 1;
    pods[0].healthy = false;
    let decision = decide(&pods, &skills(&["s"]), &locality(), 0).expect("decides");
    assert_ne!(decision.order[0], 0);
    assert_eq!(decision.order.last(), Some(&0));
}

#[test]
fn with_no_healthy_pod_all_are_tried_least_loaded_first() {
    let mut pods = vec![pod(0), pod(1)];
    for p in &mut pods {
        p.healthy = false;
    }
    pods[0].in_flight = 3;
    let decision = decide(&pods, &[], &locality(), 0).expect("decides");
    assert_eq!(
        decision,
        Decision {
            order: vec![1, 0],
            reason: Reason::Fallback
        }
    );
    assert!(decide(&[], &[], &locality(), 0).is_none());
}

#[test]
fn round_robin_and_least_loaded_ignore_locality() {
    let mut pods = vec![pod(0), pod(1), pod(2)];
    pods[0].skills_ready = 1;
    pods[1].in_flight = 2;
    let rr = RoutingConfig {
        policy: Policy::RoundRobin,
        ..locality()
    };
    let firsts: Vec<usize> = (0..3)
        .map(|turn| {
            decide(&pods, &skills(&["s"]), &rr, turn)
                .expect("decides")
                .order[0]
        })
        .collect();
    assert_eq!(firsts, vec![0, 1, 2]);
    let ll = RoutingConfig {
        policy: Policy::LeastLoaded,
        ..locality()
    };
    pods[0].in_flight = 1;
    let decision = decide(&pods, &skills(&["s"]), &ll, 0).expect("decides");
    assert_eq!((decision.order[0], decision.reason), (2, Reason::Load));
}
