//! Rate limiting: every RateLimitPolicy that matches a request is enforced at once — requests
//! per minute with a burst (a token bucket, i.e. GCRA), tokens per minute (prompt plus
//! completion tokens, charged when the response completes, so a long answer puts the subject in
//! debt that later requests wait out), and requests in flight. A request is admitted only if
//! every matching policy admits it; the answer carries OpenAI's `x-ratelimit-*` headers.
//! In a cluster the policy set is replaced while the router runs ([`RateLimiter::replace`]);
//! budgets are kept per policy name and subject, so an unchanged policy keeps its budgets.

pub mod bucket;
pub mod policy;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

use self::bucket::TokenBucket;
use self::policy::{EnforcedPolicy, LoadRateLimitsError, load_policies};
use crate::auth::Caller;

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute (and burst).
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Requests in flight.
    Concurrency,
}

impl LimitKind {
    /// The metric label and error code suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
        }
    }
}

/// One `limit` / `remaining` / `reset` header trio.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitTrio {
    /// The limit per minute on this replica.
    pub limit: u64,
    /// What may be spent right now.
    pub remaining: u64,
    /// Time until the budget is whole again.
    pub reset: Duration,
}

/// The `x-ratelimit-*` headers of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    /// The requests trio, when a requests-per-minute limit applies.
    pub requests: Option<LimitTrio>,
    /// The tokens trio, when a tokens-per-minute limit applies.
    pub tokens: Option<LimitTrio>,
}

impl RateHeaders {
    /// Writes the headers into `headers`.
    pub fn write(&self, headers: &mut HeaderMap) {
        for (kind, trio) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(trio) = trio else { continue };
            for (what, value) in [
                ("limit", trio.limit.to_string()),
                ("remaining", trio.remaining.to_string()),
                ("reset", format_reset(trio.reset)),
            ] {
                let name = format!("x-ratelimit-{what}-{kind}");
                if let (Ok(name), Ok(value)) =
                    (HeaderName::try_from(name), HeaderValue::try_from(value))
                {
                    headers.insert(name, value);
                }
            }
        }
    }

    /// Keeps, per trio, the one with least remaining.
    fn tightest(self, other: Self) -> Self {
        let pick = |a: Option<LimitTrio>, b: Option<LimitTrio>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        };
        Self {
            requests: pick(self.requests, other.requests),
            tokens: pick(self.tokens, other.tokens),
        }
    }
}

/// OpenAI's duration format: `250ms`, `1.5s`, `6m0s`.
pub fn format_reset(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let minutes = millis / 60_000;
    let seconds = (millis % 60_000) as f64 / 1000.0;
    let seconds = format!("{seconds:.3}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string();
    if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// A request turned away by a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The policy whose limit it hit.
    pub policy: String,
    /// Which limit.
    pub kind: LimitKind,
    /// How long until it would be admitted.
    pub retry_after: Duration,
    /// The headers of the answer.
    pub headers: RateHeaders,
}

impl Rejection {
    /// The error message.
    pub fn message(&self) -> String {
        format!(
            "rate limit of policy `{}` exceeded ({}); retry after {}",
            self.policy,
            self.kind.as_str(),
            format_reset(self.retry_after)
        )
    }

    /// OpenAI's error code.
    pub fn code(&self) -> &'static str {
        match self.kind {
            LimitKind::Requests => "rate_limit_exceeded",
            LimitKind::Tokens => "tokens_rate_limit_exceeded",
            LimitKind::Concurrency => "concurrency_limit_exceeded",
        }
    }

    /// `Retry-After` (whole seconds, rounded up, at least 1) and the `x-ratelimit-*` headers.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let seconds = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        self.headers.write(headers);
    }
}

#[derive(Debug)]
struct SubjectState {
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    in_flight: u32,
}

/// Budgets by policy name and subject.
type Budgets = HashMap<(String, String), SubjectState>;

type Policies = Arc<Vec<EnforcedPolicy>>;

/// Every policy and every subject's budget. Clones share both, so a clone kept by discovery
/// replaces the policies the server enforces.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    policies: Arc<RwLock<Policies>>,
    budgets: Arc<Mutex<Budgets>>,
}

/// An admitted request: holds its concurrency slots until dropped and is charged its tokens.
#[derive(Debug)]
pub struct Admission {
    budgets: Arc<Mutex<Budgets>>,
    slots: Vec<(String, String)>,
    /// The headers of the answer.
    pub headers: RateHeaders,
}

fn trio(bucket: &mut TokenBucket, per_minute: f64, now: Instant) -> LimitTrio {
    let level = bucket.level(now);
    LimitTrio {
        limit: per_minute.round().max(1.0) as u64,
        remaining: level.max(0.0).floor() as u64,
        reset: bucket.until_full(),
    }
}

impl RateLimiter {
    /// Enforces `policies` (already split across router replicas).
    pub fn new(policies: Vec<EnforcedPolicy>) -> Self {
        Self {
            policies: Arc::new(RwLock::new(Arc::new(policies))),
            budgets: Arc::default(),
        }
    }

    /// Loads the policies of a YAML file.
    pub fn load(path: &Path, replicas: u32) -> Result<Self, LoadRateLimitsError> {
        let policies = load_policies(path)?
            .iter()
            .map(|policy| EnforcedPolicy::new(policy, replicas, path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(policies))
    }

    /// Number of policies.
    pub fn policy_count(&self) -> usize {
        self.policies().len()
    }

    /// The policies enforced now.
    pub fn policies(&self) -> Policies {
        self.policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn lock(&self) -> MutexGuard<'_, Budgets> {
        lock(&self.budgets)
    }

    /// Enforces `policies` from now on; returns whether anything changed. Budgets of a policy
    /// that is gone are dropped; those of a policy whose limits changed keep their in-flight
    /// count and what their buckets hold (capped at the new limits).
    pub fn replace(&self, policies: Vec<EnforcedPolicy>, now: Instant) -> bool {
        // Budgets first, then policies, as in `admit`: no budget of an old policy is created
        // after the swap.
        let mut budgets = self.lock();
        let mut current = self
            .policies
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current == policies {
            return false;
        }
        let by_name: HashMap<&str, &EnforcedPolicy> =
            policies.iter().map(|p| (p.name.as_str(), p)).collect();
        budgets.retain(|(name, _), state| {
            let Some(policy) = by_name.get(name.as_str()) else {
                return false;
            };
            resize(state, policy, now);
            true
        });
        drop(by_name);
        *current = Arc::new(policies);
        true
    }

    /// Admits a request of `caller` for `model` at `now`, or says which limit refuses it.
    pub fn admit(
        &self,
        caller: &Caller,
        model: &str,
        now: Instant,
    ) -> Result<Admission, Rejection> {
        let mut budgets = self.lock();
        let policies = self.policies();
        let matched: Vec<(&EnforcedPolicy, (String, String))> = policies
            .iter()
            .filter(|p| p.matches(caller, model))
            .map(|p| (p, (p.name.clone(), p.subject_of(caller))))
            .collect();
        // Check every policy first; spend only when all admit.
        for (policy, slot) in &matched {
            let state = budgets
                .entry(slot.clone())
                .or_insert_with(|| new_state(policy, now));
            if let Some(rejection) = check(policy, state, now) {
                return Err(rejection);
            }
        }
        let mut headers = RateHeaders::default();
        for (policy, slot) in &matched {
            let Some(state) = budgets.get_mut(slot) else {
                continue;
            };
            state.in_flight += 1;
            if let Some(bucket) = state.requests.as_mut() {
                bucket.take(1.0, now);
            }
            headers = headers.tightest(policy_headers(policy, state, now));
        }
        Ok(Admission {
            budgets: self.budgets.clone(),
            slots: matched.into_iter().map(|(_, slot)| slot).collect(),
            headers,
        })
    }
}

fn lock(budgets: &Mutex<Budgets>) -> MutexGuard<'_, Budgets> {
    // A panic while holding the lock leaves consistent numbers behind; keep using them.
    budgets
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_state(policy: &EnforcedPolicy, now: Instant) -> SubjectState {
    let limits = &policy.limits;
    SubjectState {
        requests: limits
            .requests_per_minute
            .map(|rpm| TokenBucket::new(limits.burst, rpm / 60.0, now)),
        tokens: limits
            .tokens_per_minute
            .map(|tpm| TokenBucket::new(tpm, tpm / 60.0, now)),
        in_flight: 0,
    }
}

/// Moves a subject's buckets to `policy`'s current limits.
fn resize(state: &mut SubjectState, policy: &EnforcedPolicy, now: Instant) {
    let limits = &policy.limits;
    state.requests = limits
        .requests_per_minute
        .map(|rpm| match state.requests.take() {
            Some(bucket) => bucket.with_limits(limits.burst, rpm / 60.0, now),
            None => TokenBucket::new(limits.burst, rpm / 60.0, now),
        });
    state.tokens = limits
        .tokens_per_minute
        .map(|tpm| match state.tokens.take() {
            Some(bucket) => bucket.with_limits(tpm, tpm / 60.0, now),
            None => TokenBucket::new(tpm, tpm / 60.0, now),
        });
}

fn policy_headers(policy: &EnforcedPolicy, state: &mut SubjectState, now: Instant) -> RateHeaders {
    let limits = &policy.limits;
    RateHeaders {
        requests: state
            .requests
            .as_mut()
            .zip(limits.requests_per_minute)
            .map(|(bucket, rpm)| trio(bucket, rpm, now)),
        tokens: state
            .tokens
            .as_mut()
            .zip(limits.tokens_per_minute)
            .map(|(bucket, tpm)| trio(bucket, tpm, now)),
    }
}

fn check(policy: &EnforcedPolicy, state: &mut SubjectState, now: Instant) -> Option<Rejection> {
    let reject = |kind, retry_after, state: &mut SubjectState| Rejection {
        policy: policy.name.clone(),
        kind,
        retry_after,
        headers: policy_headers(policy, state, now),
    };
    if let Some(max) = policy.limits.max_concurrent
        && state.in_flight >= max
    {
        return Some(reject(
            LimitKind::Concurrency,
            Duration::from_secs(1),
            state,
        ));
    }
    if let Some(Err(wait)) = state.requests.as_mut().map(|b| b.check(1.0, now)) {
        return Some(reject(LimitKind::Requests, wait, state));
    }
    if let Some(Err(wait)) = state.tokens.as_mut().map(|b| b.check(1.0, now)) {
        return Some(reject(LimitKind::Tokens, wait, state));
    }
    None
}

impl Admission {
    /// Charges the response's prompt plus completion tokens to every matching budget.
    pub fn charge_tokens(&self, tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut budgets = lock(&self.budgets);
        for slot in &self.slots {
            if let Some(bucket) = budgets.get_mut(slot).and_then(|s| s.tokens.as_mut()) {
                bucket.take(tokens as f64, now);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut budgets = lock(&self.budgets);
        for slot in &self.slots {
            if let Some(state) = budgets.get_mut(slot) {
                state.in_flight = state.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
