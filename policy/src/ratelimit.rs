//! Rate-limit algorithms, each a pure state machine over an explicit clock
//! (nanoseconds since an arbitrary origin), so their accuracy is tested on a
//! virtual clock and the sidecar drives them with a monotonic one.
//!
//! All four police (admit or refuse at once); none queues or delays:
//! - `token_bucket`: a bucket of `burst` tokens, refilled at `rate` per
//!   `period`, starting full: an initial burst of `burst`, then the rate.
//! - `leaky_bucket`: GCRA (virtual scheduling): requests are spaced by the
//!   emission interval `period / rate`, with `burst` extra requests of
//!   tolerance; `burst: 0` means strictly spaced requests.
//! - `fixed_window`: at most `rate` requests per aligned window of `period`
//!   (a burst straddling a boundary may get 2 x `rate` through, as fixed windows do).
//! - `sliding_window`: the weighted two-window estimate
//!   `previous * (1 - elapsed / period) + current` must stay below `rate`,
//!   which refuses the straddling burst.

use std::time::Duration;

/// Which algorithm a limit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Algorithm {
    /// See the module documentation.
    TokenBucket,
    /// See the module documentation.
    LeakyBucket,
    /// See the module documentation.
    FixedWindow,
    /// See the module documentation.
    SlidingWindow,
}

/// The numbers of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period (> 0).
    pub rate: u64,
    /// The period (> 0).
    pub period: Duration,
    /// Burst allowance (bucket algorithms only).
    pub burst: u64,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// Requests that could still be admitted right now.
    pub remaining: u64,
    /// When a refused request may succeed (zero when allowed).
    pub retry_after: Duration,
    /// When the quota is fully available again.
    pub reset_after: Duration,
}

/// Per-key state of one limit (fields are the algorithms' internals).
#[derive(Debug, Clone, Copy, PartialEq)]
#[allow(missing_docs)]
pub enum State {
    /// Tokens (scaled by 1e9 to stay in integers) and the last refill time.
    Token { nano_tokens: u128, last: u64 },
    /// Theoretical arrival time of the next conforming request.
    Gcra { tat: u64 },
    /// Window index and the count in it.
    Fixed { window: u64, count: u64 },
    /// Current window index, its count, and the previous window's count.
    Sliding { window: u64, current: u64, previous: u64 },
}

const NANO: u128 = 1_000_000_000;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Algorithm {
    /// The state of a key seen for the first time at `now`.
    pub fn initial(self, q: &Quota, now: u64) -> State {
        match self {
            Self::TokenBucket => State::Token { nano_tokens: u128::from(q.burst.max(1)) * NANO, last: now },
            Self::LeakyBucket => State::Gcra { tat: now },
            Self::FixedWindow => State::Fixed { window: now / nanos(q.period), count: 0 },
            Self::SlidingWindow => State::Sliding { window: now / nanos(q.period), current: 0, previous: 0 },
        }
    }

    /// Checks (and, if admitted, counts) one request at `now`.
    pub fn check(self, q: &Quota, state: &mut State, now: u64) -> Outcome {
        let period = nanos(q.period);
        let rate = q.rate.max(1);
        match state {
            State::Token { nano_tokens, last } => {
                let capacity = u128::from(q.burst.max(1)) * NANO;
                // tokens per ns = rate / period; in nano-tokens: rate * 1e9 / period per ns.
                let elapsed = u128::from(now.saturating_sub(*last));
                *nano_tokens = (*nano_tokens + elapsed * u128::from(rate) * NANO / u128::from(period)).min(capacity);
                *last = now.max(*last);
                let per_token_ns = |missing: u128| {
                    Duration::from_nanos(
                        u64::try_from(missing * u128::from(period) / (u128::from(rate) * NANO)).unwrap_or(u64::MAX),
                    )
                };
                if *nano_tokens >= NANO {
                    *nano_tokens -= NANO;
                    Outcome {
                        allowed: true,
                        remaining: u64::try_from(*nano_tokens / NANO).unwrap_or(u64::MAX),
                        retry_after: Duration::ZERO,
                        reset_after: per_token_ns(capacity - *nano_tokens),
                    }
                } else {
                    Outcome {
                        allowed: false,
                        remaining: 0,
                        retry_after: per_token_ns(NANO - *nano_tokens),
                        reset_after: per_token_ns(capacity - *nano_tokens),
                    }
                }
            }
            State::Gcra { tat } => {
                let interval = (period / rate).max(1);
                let tolerance = interval.saturating_mul(q.burst);
                let t = (*tat).max(now);
                if t - now <= tolerance {
                    *tat = t + interval;
                    let used = (*tat - now).div_ceil(interval);
                    Outcome {
                        allowed: true,
                        remaining: (q.burst + 1).saturating_sub(used),
                        retry_after: Duration::ZERO,
                        reset_after: Duration::from_nanos(*tat - now),
                    }
                } else {
                    Outcome {
                        allowed: false,
                        remaining: 0,
                        retry_after: Duration::from_nanos(t - now - tolerance),
                        reset_after: Duration::from_nanos(t - now),
                    }
                }
            }
            State::Fixed { window, count } => {
                let w = now / period;
                if w != *window {
                    *window = w;
                    *count = 0;
                }
                let reset = Duration::from_nanos((w + 1) * period - now);
                if *count < rate {
                    *count += 1;
                    Outcome { allowed: true, remaining: rate - *count, retry_after: Duration::ZERO, reset_after: reset }
                } else {
                    Outcome { allowed: false, remaining: 0, retry_after: reset, reset_after: reset }
                }
            }
            State::Sliding { window, current, previous } => {
                let w = now / period;
                if w != *window {
                    *previous = if w == *window + 1 { *current } else { 0 };
                    *current = 0;
                    *window = w;
                }
                let into = u128::from(now - w * period);
                let p = u128::from(period);
                // Estimate x period, exact: previous x (period - into) + current x period.
                let (prev, cur) = (*previous, *current);
                let scaled = |extra: u64| u128::from(prev) * (p - into) + u128::from(cur + extra) * p;
                let reset = Duration::from_nanos((w + 1) * period - now);
                if scaled(1) <= u128::from(rate) * p {
                    *current += 1;
                    let used = u64::try_from(scaled(1).div_ceil(p)).unwrap_or(u64::MAX);
                    Outcome {
                        allowed: true,
                        remaining: rate.saturating_sub(used),
                        retry_after: Duration::ZERO,
                        reset_after: reset,
                    }
                } else {
                    // When will the previous window's weight have dropped enough?
                    let retry = if prev == 0 {
                        reset
                    } else {
                        let excess = scaled(1) - u128::from(rate) * p;
                        let ns = excess.div_ceil(u128::from(prev));
                        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
                            .min(reset)
                            .max(Duration::from_millis(1))
                    };
                    Outcome { allowed: false, remaining: 0, retry_after: retry, reset_after: reset }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run(alg: Algorithm, q: Quota, times: &[u64]) -> Vec<bool> {
        let mut st = alg.initial(&q, times[0]);
        times.iter().map(|t| alg.check(&q, &mut st, *t).allowed).collect()
    }

    fn q(rate: u64, secs: u64, burst: u64) -> Quota {
        Quota { rate, period: Duration::from_secs(secs), burst }
    }

    #[test]
    fn token_bucket_admits_exactly_the_burst_then_the_rate() {
        // 10/s, burst 5: five at t=0, then one per 100 ms.
        let at0 = run(Algorithm::TokenBucket, q(10, 1, 5), &[0; 8]);
        assert_eq!(at0.iter().filter(|a| **a).count(), 5);
        let mut st = Algorithm::TokenBucket.initial(&q(10, 1, 5), 0);
        for _ in 0..5 {
            assert!(Algorithm::TokenBucket.check(&q(10, 1, 5), &mut st, 0).allowed);
        }
        let o = Algorithm::TokenBucket.check(&q(10, 1, 5), &mut st, 0);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_millis(100));
        assert!(!Algorithm::TokenBucket.check(&q(10, 1, 5), &mut st, 99_999_999).allowed);
        assert!(Algorithm::TokenBucket.check(&q(10, 1, 5), &mut st, 100_000_000).allowed);
        // Over 10 s at 1000 attempts/s: 5 + 10 * 10 admitted, exactly.
        let times: Vec<u64> = (0..10_000).map(|i| i * S / 1000).collect();
        let admitted = run(Algorithm::TokenBucket, q(10, 1, 5), &times).iter().filter(|a| **a).count();
        assert_eq!(admitted, 5 + 100 - 1, "the last refill lands at t=10s, outside the run");
    }

    #[test]
    fn leaky_bucket_spaces_requests_with_burst_tolerance() {
        // 10/s, no burst: one every 100 ms, strictly.
        assert_eq!(
            run(Algorithm::LeakyBucket, q(10, 1, 0), &[0, 0, 50_000_000, 100_000_000]),
            vec![true, false, false, true]
        );
        // burst 2: three at once, then spaced.
        assert_eq!(
            run(Algorithm::LeakyBucket, q(10, 1, 2), &[0, 0, 0, 0, 100_000_000]),
            vec![true, true, true, false, true]
        );
        let times: Vec<u64> = (0..10_000).map(|i| i * S / 1000).collect();
        let admitted = run(Algorithm::LeakyBucket, q(10, 1, 2), &times).iter().filter(|a| **a).count();
        assert_eq!(admitted, 3 + 99);
    }

    #[test]
    fn fixed_window_lets_a_straddling_burst_through_and_sliding_refuses_it() {
        let quota = q(10, 1, 0);
        // 10 requests just before the boundary, 10 just after.
        let mut times = vec![990_000_000; 10];
        times.extend(vec![1_010_000_000; 10]);
        let fixed = run(Algorithm::FixedWindow, quota, &times);
        assert_eq!(fixed.iter().filter(|a| **a).count(), 20, "fixed windows admit 2 x rate around a boundary");
        let sliding = run(Algorithm::SlidingWindow, quota, &times);
        assert_eq!(sliding.iter().filter(|a| **a).count(), 10, "the sliding estimate refuses the second half");
        // Exact per-window admits.
        assert_eq!(run(Algorithm::FixedWindow, quota, &[0; 12]).iter().filter(|a| **a).count(), 10);
        let mut st = Algorithm::FixedWindow.initial(&quota, 0);
        for _ in 0..10 {
            Algorithm::FixedWindow.check(&quota, &mut st, 250_000_000);
        }
        let o = Algorithm::FixedWindow.check(&quota, &mut st, 250_000_000);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_millis(750));
    }

    #[test]
    fn sliding_window_converges_to_the_rate() {
        let quota = q(100, 1, 0);
        let times: Vec<u64> = (0..20_000).map(|i| i * S / 1000).collect();
        let admitted = run(Algorithm::SlidingWindow, quota, &times).iter().filter(|a| **a).count() as f64;
        let rate = admitted / 20.0;
        assert!((rate - 100.0).abs() <= 5.0, "admitted {rate}/s for a 100/s limit");
        // A refused request is told when to come back.
        let mut st = Algorithm::SlidingWindow.initial(&quota, 0);
        for _ in 0..100 {
            assert!(Algorithm::SlidingWindow.check(&quota, &mut st, 0).allowed);
        }
        let o = Algorithm::SlidingWindow.check(&quota, &mut st, 0);
        assert!(!o.allowed && o.retry_after > Duration::ZERO);
    }
}
