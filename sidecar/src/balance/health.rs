//! One endpoint's health as its callers see it: a peak-EWMA latency, the
//! failures in a row, the successes and failures of the last 10 s, and its
//! ejections (each in a row twice as long, up to the maximum; after one, the
//! first answer decides: a failure ejects it again at once).

use std::time::{Duration, Instant};

use palisade_policy::resilience::Ejection;

/// How a request on an endpoint went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not a server error (4xx included: the caller's fault).
    Success,
    /// A 5xx, a reset before the answer, or a try that timed out.
    Failure,
    /// It could not be reached at all (refused, connect timeout).
    Unreachable,
}

/// What a recorded outcome asks of the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Keep,
    /// Eject: a failure on probation.
    Eject,
    /// Failures in a row: eject, unless its peers fail as much (a request
    /// every endpoint fails, say, is not this endpoint's fault).
    InRow,
    /// Unreachable: eject whatever the service's share.
    Down,
    /// Enough requests lately: compare its success rate with its peers'.
    Compare,
}

/// Length of one half of the success-rate window.
const HALF_WINDOW: Duration = Duration::from_secs(5);

/// A success rate this far below its peers' (as a share of theirs) ejects:
/// 50 % beside peers at 100 % does, 90 % beside 100 % does not.
const FAR_BELOW: f64 = 0.7;

#[derive(Debug)]
pub(super) struct Health {
    /// Latency estimate in seconds, and when it was last updated.
    ewma: Option<(f64, Instant)>,
    consecutive: u32,
    /// (successes, failures) of the current and the previous half window.
    halves: [(u64, u64); 2],
    half_start: Instant,
    /// Ejections in a row, and whether the next answer decides (just back).
    in_row: u32,
    probation: bool,
    back_at: Option<Instant>,
    last_time: Duration,
    pub(super) ejections: u64,
    pub(super) requests: u64,
    pub(super) failures: u64,
}

impl Health {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            ewma: None,
            consecutive: 0,
            halves: [(0, 0); 2],
            half_start: now,
            in_row: 0,
            probation: false,
            back_at: None,
            last_time: Duration::ZERO,
            ejections: 0,
            requests: 0,
            failures: 0,
        }
    }

    /// The latency estimate now (decayed since its last sample).
    pub(super) fn latency(&self, now: Instant, decay: Duration) -> Option<Duration> {
        let (v, at) = self.ewma?;
        let w = (-now.saturating_duration_since(at).as_secs_f64() / decay.as_secs_f64()).exp();
        Some(Duration::from_secs_f64(v * w))
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.half_start);
        if elapsed >= HALF_WINDOW * 2 {
            self.halves = [(0, 0); 2];
            self.half_start = now;
        } else if elapsed >= HALF_WINDOW {
            self.halves = [(0, 0), self.halves[0]];
            self.half_start += HALF_WINDOW;
        }
    }

    /// (successes, requests) over the last 10 s or so.
    pub(super) fn window(&mut self, now: Instant) -> (u64, u64) {
        self.roll(now);
        let ok = self.halves[0].0 + self.halves[1].0;
        (ok, ok + self.halves[0].1 + self.halves[1].1)
    }

    /// Counts an answer that came while the endpoint was ejected.
    pub(super) fn count(&mut self, outcome: Outcome) -> Verdict {
        self.requests += 1;
        self.failures += u64::from(outcome != Outcome::Success);
        Verdict::Keep
    }

    /// Records one outcome (`latency`: whether latency samples are kept).
    pub(super) fn record(
        &mut self,
        outcome: Outcome,
        rtt: Duration,
        now: Instant,
        decay: Duration,
        latency: bool,
        cfg: &Ejection,
    ) -> Verdict {
        self.roll(now);
        self.requests += 1;
        if outcome == Outcome::Success {
            self.halves[0].0 += 1;
            self.consecutive = 0;
            self.probation = false;
            // Healthy for longer than it was last out: its next ejection starts short.
            if self.back_at.is_some_and(|b| now.saturating_duration_since(b) > self.last_time) {
                self.in_row = 0;
                self.back_at = None;
            }
            if latency {
                self.sample(rtt, now, decay);
            }
            return Verdict::Keep;
        }
        self.halves[0].1 += 1;
        self.failures += 1;
        self.consecutive += 1;
        if outcome == Outcome::Unreachable {
            return Verdict::Down;
        }
        if self.probation {
            return Verdict::Eject;
        }
        if cfg.consecutive_failures > 0 && self.consecutive >= cfg.consecutive_failures {
            return Verdict::InRow;
        }
        let (_, all) = self.window(now);
        if cfg.success_rate_min_requests > 0 && all >= u64::from(cfg.success_rate_min_requests) {
            return Verdict::Compare;
        }
        Verdict::Keep
    }

    /// Peak EWMA: a slower answer is taken at once, a faster one blended in.
    fn sample(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_secs_f64();
        let v = match self.ewma {
            Some((v, _)) if rtt > v => rtt,
            Some((v, at)) => {
                let w = (-now.saturating_duration_since(at).as_secs_f64() / decay.as_secs_f64()).exp();
                v * w + rtt * (1.0 - w)
            }
            None => rtt,
        };
        self.ewma = Some((v, now));
    }

    /// Ejects: returns for how long (each ejection in a row doubles it).
    pub(super) fn eject(&mut self, now: Instant, cfg: &Ejection) -> Duration {
        self.in_row = self.in_row.saturating_add(1);
        self.ejections += 1;
        let factor = 1u32 << (self.in_row - 1).min(16);
        let time = cfg.base_time.saturating_mul(factor).min(cfg.max_time.max(cfg.base_time));
        self.last_time = time;
        self.back_at = Some(now + time);
        self.probation = true;
        self.consecutive = 0;
        self.halves = [(0, 0); 2];
        self.half_start = now;
        time
    }
}

impl Health {
    /// Whether it has answered, and whether its last answer was a failure.
    pub(super) fn last(&self) -> (bool, bool) {
        (self.requests > 0, self.consecutive > 0)
    }
}

/// Whether a success rate `(ok, all)` is far below its peers' (which must
/// have answered some requests themselves).
pub(super) fn far_below(mine: (u64, u64), peers: (u64, u64)) -> bool {
    if mine.1 == 0 || peers.1 < 10 {
        return false;
    }
    let rate = mine.0 as f64 / mine.1 as f64;
    let theirs = peers.0 as f64 / peers.1 as f64;
    rate < theirs * FAR_BELOW
}
