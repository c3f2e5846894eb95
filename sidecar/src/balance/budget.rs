//! The retry budget of this sidecar for one service: over the last 10 s,
//! retries may be at most `percent`% of the requests, plus `min_per_second`
//! a second (so a quiet service can still retry). Under a full outage a
//! caller therefore sends at most `1 + percent/100` times its load, plus
//! the floor: retries never multiply an outage.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Seconds the budget looks back.
pub const WINDOW_SECS: u64 = 10;

#[derive(Debug)]
pub struct Budget {
    epoch: Instant,
    inner: Mutex<Window>,
    /// The parameters last used (percent << 32 | minimum a second), for snapshots.
    params: AtomicU64,
}

/// Requests and retries per second, in a ring over the window.
#[derive(Debug, Default)]
struct Window {
    /// The second (since the epoch) the newest slot counts.
    second: u64,
    slots: [(u32, u32); WINDOW_SECS as usize],
}

impl Window {
    fn advance(&mut self, second: u64) {
        if second <= self.second {
            return;
        }
        let gap = (second - self.second).min(WINDOW_SECS);
        for k in 1..=gap {
            self.slots[((self.second + k) % WINDOW_SECS) as usize] = (0, 0);
        }
        self.second = second;
    }

    fn slot(&mut self) -> &mut (u32, u32) {
        &mut self.slots[(self.second % WINDOW_SECS) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.slots.iter().fold((0, 0), |(r, t), s| (r + u64::from(s.0), t + u64::from(s.1)))
    }
}

/// What a budget holds now.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Snapshot {
    /// Requests and retries in the window.
    pub requests: u64,
    pub retries: u64,
    /// Retries the budget allows now (with the parameters last used).
    pub left: u64,
}

impl Budget {
    pub fn new(epoch: Instant) -> Self {
        let d = palisade_policy::resilience::Retry::default();
        let params = AtomicU64::new(u64::from(d.budget_percent) << 32 | u64::from(d.budget_min_per_second));
        Self { epoch, inner: Mutex::default(), params }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window_at(Instant::now())
    }

    fn window_at(&self, now: Instant) -> std::sync::MutexGuard<'_, Window> {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        w.advance(second);
        w
    }

    /// Counts one request (not a retry), made `now`.
    pub fn deposit(&self, now: Instant) {
        let mut w = self.window_at(now);
        let s = w.slot();
        s.0 = s.0.saturating_add(1);
    }

    /// Takes one retry from the budget, if it allows one.
    pub fn withdraw(&self, percent: u32, min_per_second: u32) -> bool {
        self.params.store(u64::from(percent) << 32 | u64::from(min_per_second), Ordering::Relaxed);
        let mut w = self.window();
        if allowed(w.totals(), percent, min_per_second) == 0 {
            return false;
        }
        let s = w.slot();
        s.1 = s.1.saturating_add(1);
        true
    }

    /// The window's counts, and the retries `percent`/`min_per_second` allow now.
    pub fn snapshot_with(&self, percent: u32, min_per_second: u32) -> Snapshot {
        let w = self.window();
        let (requests, retries) = w.totals();
        Snapshot { requests, retries, left: allowed((requests, retries), percent, min_per_second) }
    }

    /// Like [`snapshot_with`](Self::snapshot_with), with the parameters last used.
    pub fn snapshot(&self) -> Snapshot {
        let p = self.params.load(Ordering::Relaxed);
        self.snapshot_with((p >> 32) as u32, p as u32)
    }
}

/// Retries still allowed with `(requests, retries)` in the window.
fn allowed((requests, retries): (u64, u64), percent: u32, min_per_second: u32) -> u64 {
    let cap = requests * u64::from(percent) / 100 + u64::from(min_per_second) * WINDOW_SECS;
    cap.saturating_sub(retries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests_plus_a_floor() {
        let b = Budget::new(Instant::now());
        // The floor alone: 1 a second over the window.
        let granted = (0..100).filter(|_| b.withdraw(20, 1)).count();
        assert_eq!(granted, 10);
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let granted = (0..100).filter(|_| b.withdraw(20, 1)).count();
        assert_eq!(granted, 20, "20% of 100 requests");
        assert_eq!(b.snapshot_with(20, 1).left, 0);
        assert_eq!(b.snapshot_with(20, 1).retries, 30);
    }

    #[test]
    fn the_window_forgets_old_seconds() {
        let mut w = Window::default();
        w.advance(3);
        w.slot().0 = 50;
        w.advance(12);
        assert_eq!(w.totals().0, 50, "second 3 is within the 10 s ending at 12");
        w.advance(13);
        assert_eq!(w.totals().0, 0);
        w.advance(500);
        assert_eq!(w.totals(), (0, 0));
    }
}
