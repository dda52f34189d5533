//! A token bucket (equivalently GCRA): `capacity` tokens, refilled continuously at `per_second`.
//! Time is passed in, so every decision is a pure function of the instants it is given.

use std::time::{Duration, Instant};

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: f64, per_second: f64, now: Instant) -> Self {
        Self {
            capacity,
            per_second,
            level: capacity,
            updated: now,
        }
    }

    /// The same bucket under new limits: what it holds now (or its debt) carries over, capped
    /// at the new capacity.
    pub fn with_limits(mut self, capacity: f64, per_second: f64, now: Instant) -> Self {
        self.refill(now);
        Self {
            capacity,
            per_second,
            level: self.level.min(capacity),
            updated: self.updated,
        }
    }

    /// The most tokens it holds.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Tokens available at `now` (negative while in debt).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// `Ok` when `amount` tokens are available at `now`, else how long until they are.
    pub fn check(&mut self, amount: f64, now: Instant) -> Result<(), Duration> {
        let level = self.level(now);
        if level >= amount {
            Ok(())
        } else {
            Err(self.time_to_reach(amount))
        }
    }

    /// Removes `amount` tokens; the level may go negative (debt), which later checks repay.
    pub fn take(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level -= amount;
    }

    /// Time until the bucket is full again.
    pub fn until_full(&self) -> Duration {
        self.time_to_reach(self.capacity)
    }

    fn time_to_reach(&self, level: f64) -> Duration {
        let missing = (level - self.level).max(0.0);
        Duration::from_secs_f64(missing / self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_a_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 1.0, start);
        for _ in 0..2 {
            assert!(bucket.check(1.0, start).is_ok());
            bucket.take(1.0, start);
        }
        let wait = bucket.check(1.0, start).expect_err("burst spent");
        assert_eq!(wait, Duration::from_secs(1));
        assert!(
            bucket
                .check(1.0, start + Duration::from_millis(999))
                .is_err()
        );
        assert!(bucket.check(1.0, start + Duration::from_secs(1)).is_ok());
        assert_eq!(bucket.until_full(), Duration::from_secs(1));
    }

    #[test]
    fn debt_must_be_repaid_before_the_next_admission() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 10.0, start);
        bucket.take(150.0, start);
        assert_eq!(bucket.level(start), -50.0);
        assert_eq!(
            bucket.check(1.0, start).expect_err("in debt"),
            Duration::from_secs_f64(5.1)
        );
        assert!(bucket.check(1.0, start + Duration::from_secs(6)).is_ok());
    }

    #[test]
    fn never_fills_above_capacity() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3.0, 1.0, start);
        assert_eq!(bucket.level(start + Duration::from_secs(3600)), 3.0);
    }
}
