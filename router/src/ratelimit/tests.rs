//! Unit tests of admission, token charging, concurrency and the 429 headers.

use super::*;
use skillkv_api::v1alpha1::RateLimitPolicy;

fn limiter(limits: &str, replicas: u32) -> RateLimiter {
    let yaml = format!(
        "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  subject: apiKey\n  limits: {limits}\n"
    );
    let policy: RateLimitPolicy = serde_yaml::from_str(&yaml).expect("policy parses");
    let enforced = EnforcedPolicy::new(&policy, replicas, Path::new("test.yaml")).expect("valid");
    RateLimiter::new(vec![enforced])
}

fn key(name: &str) -> Caller {
    Caller {
        key_name: Some(name.to_string()),
        ..Caller::default()
    }
}

#[test]
fn requests_beyond_the_burst_are_rejected_until_the_rate_refills() {
    let limiter = limiter("{requestsPerMinute: 60, burst: 2}", 1);
    let start = Instant::now();
    let first = limiter
        .admit(&key("a"), "m", start)
        .expect("first admitted");
    let requests = first.headers.requests.expect("requests trio");
    assert_eq!((requests.limit, requests.remaining), (60, 1));
    assert_eq!(requests.reset, Duration::from_secs(1));
    drop(first);
    assert!(limiter.admit(&key("a"), "m", start).is_ok());
    let rejection = limiter
        .admit(&key("a"), "m", start)
        .expect_err("burst spent");
    assert_eq!(rejection.kind, LimitKind::Requests);
    assert_eq!(rejection.retry_after, Duration::from_secs(1));
    assert_eq!(rejection.headers.requests.map(|t| t.remaining), Some(0));
    // Another key has its own budget.
    assert!(limiter.admit(&key("b"), "m", start).is_ok());
    // One second later one request is allowed again.
    assert!(
        limiter
            .admit(&key("a"), "m", start + Duration::from_secs(1))
            .is_ok()
    );
}

#[test]
fn rejection_headers_follow_openai() {
    let limiter = limiter("{requestsPerMinute: 60, burst: 1, tokensPerMinute: 600}", 1);
    let start = Instant::now();
    let _first = limiter.admit(&key("a"), "m", start).expect("admitted");
    let rejection = limiter
        .admit(&key("a"), "m", start + Duration::from_millis(300))
        .expect_err("rate exceeded");
    let mut headers = HeaderMap::new();
    rejection.write_headers(&mut headers);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert_eq!(headers["x-ratelimit-limit-requests"], "60");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["x-ratelimit-reset-requests"], "700ms");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "600");
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "600");
    assert_eq!(headers["x-ratelimit-reset-tokens"], "0ms");
}

#[test]
fn tokens_are_charged_at_completion_and_debt_blocks_until_repaid() {
    let limiter = limiter("{tokensPerMinute: 600}", 1);
    let start = Instant::now();
    let admission = limiter.admit(&key("a"), "m", start).expect("admitted");
    // A second request may start while the first is still running: nothing is charged yet.
    assert!(limiter.admit(&key("a"), "m", start).is_ok());
    admission.charge_tokens(700, start);
    let rejection = limiter.admit(&key("a"), "m", start).expect_err("in debt");
    assert_eq!(rejection.kind, LimitKind::Tokens);
    // 101 tokens missing at 10 tokens/s.
    assert_eq!(rejection.retry_after, Duration::from_secs_f64(10.1));
    assert!(
        limiter
            .admit(&key("a"), "m", start + Duration::from_secs(11))
            .is_ok()
    );
}

#[test]
fn concurrency_slots_are_released_when_the_admission_drops() {
    let limiter = limiter("{maxConcurrent: 2}", 1);
    let now = Instant::now();
    let a = limiter.admit(&key("a"), "m", now).expect("1st");
    let _b = limiter.admit(&key("a"), "m", now).expect("2nd");
    let rejection = limiter.admit(&key("a"), "m", now).expect_err("3rd");
    assert_eq!(rejection.kind, LimitKind::Concurrency);
    drop(a);
    assert!(limiter.admit(&key("a"), "m", now).is_ok());
}

#[test]
fn a_rejected_request_spends_nothing() {
    // Two policies: the second rejects, so the first's budget must stay untouched.
    let yaml = "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: wide}\nspec: {subject: global, limits: {requestsPerMinute: 60, burst: 5}}\n";
    let wide: RateLimitPolicy = serde_yaml::from_str(yaml).expect("parses");
    let narrow_yaml = "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: narrow}\nspec: {subject: apiKey, limits: {maxConcurrent: 1}}\n";
    let narrow: RateLimitPolicy = serde_yaml::from_str(narrow_yaml).expect("parses");
    let path = Path::new("t.yaml");
    let limiter = RateLimiter::new(vec![
        EnforcedPolicy::new(&wide, 1, path).expect("valid"),
        EnforcedPolicy::new(&narrow, 1, path).expect("valid"),
    ]);
    let now = Instant::now();
    let held = limiter.admit(&key("a"), "m", now).expect("admitted");
    assert_eq!(held.headers.requests.map(|t| t.remaining), Some(4));
    for _ in 0..3 {
        assert!(limiter.admit(&key("a"), "m", now).is_err());
    }
    let other = limiter.admit(&key("b"), "m", now).expect("admitted");
    assert_eq!(other.headers.requests.map(|t| t.remaining), Some(3));
}

#[test]
fn limits_split_across_replicas() {
    let limiter = limiter("{requestsPerMinute: 120, burst: 2}", 2);
    let now = Instant::now();
    let admitted = limiter.admit(&key("a"), "m", now).expect("admitted");
    assert_eq!(admitted.headers.requests.map(|t| t.limit), Some(60));
    assert!(limiter.admit(&key("a"), "m", now).is_err());
}

#[test]
fn reset_durations_use_openai_units() {
    assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
    assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
    assert_eq!(format_reset(Duration::from_secs(1)), "1s");
    assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
}

#[test]
fn replacing_policies_keeps_unchanged_budgets_and_resizes_changed_ones() {
    let shared = limiter("{requestsPerMinute: 60, burst: 2, maxConcurrent: 5}", 1);
    let limiter = shared.clone();
    let start = Instant::now();
    let held = limiter.admit(&key("a"), "m", start).expect("admitted");
    assert!(limiter.admit(&key("a"), "m", start).is_ok());
    // Same policy again: nothing changes, the burst stays spent.
    let same = shared.policies().as_ref().clone();
    assert!(!shared.replace(same, start));
    assert!(limiter.admit(&key("a"), "m", start).is_err());
    // Tighter concurrency: the request still held counts against the new limit, and the spent
    // burst carries over.
    let tighter = {
        let yaml = "apiVersion: skillkv.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  subject: apiKey\n  limits: {requestsPerMinute: 60, burst: 4, maxConcurrent: 1}\n";
        let policy: RateLimitPolicy = serde_yaml::from_str(yaml).expect("policy parses");
        EnforcedPolicy::new(&policy, 1, Path::new("test.yaml")).expect("valid")
    };
    assert!(shared.replace(vec![tighter], start));
    let later = start + Duration::from_secs(2);
    let rejection = limiter
        .admit(&key("a"), "m", later)
        .expect_err("one request is in flight");
    assert_eq!(rejection.kind, LimitKind::Concurrency);
    drop(held);
    assert!(limiter.admit(&key("a"), "m", later).is_ok());
    // No policy: everything is admitted and the budgets are gone.
    assert!(shared.replace(Vec::new(), later));
    assert_eq!(limiter.policy_count(), 0);
    assert!(limiter.admit(&key("a"), "m", later).is_ok());
}
