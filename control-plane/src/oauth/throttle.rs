//! Who is guessing client secrets at the token endpoint, and for how long
//! they are held off.
//!
//! Failures are counted per source address (an IPv6 address by its /64, what
//! one host is usually given) and per client and address, never per client
//! alone: knowing a client_id (it is in every token the client uses) must not
//! let anyone lock the client out. The guesser's address is refused; the
//! holder of the secret, from its own address, is not.
//!
//! Both tables are bounded and an entry that holds a lock-out is never
//! dropped before the lock-out ends, however many other sources fail: churn
//! cannot unlock a guesser. When a table is full of lock-outs, a failure that
//! finds no room is not recorded but answered late ([`Verdict::Slow`]), so a
//! guesser with more addresses than the table holds is still slowed down.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures allowed from one address, over every client, per window.
pub(crate) const MAX_FAILURES_PER_ADDR: u32 = 20;
/// Failures allowed for one client from one address, per window.
pub(crate) const MAX_FAILURES_PER_CLIENT_ADDR: u32 = 5;
/// Counting window, and how long a lock-out lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Entries per table: 16,384 sources at ~100 bytes each.
const CAPACITY: usize = 16_384;
/// How late a failure that could not be recorded is answered.
pub(crate) const SLOW_ANSWER: Duration = Duration::from_secs(1);

/// The key of an address: an IPv4 address, or the /64 of an IPv6 one.
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    since: Instant,
    locked_until: Option<Instant>,
    last: Instant,
}

impl Entry {
    fn locked(&self, now: Instant) -> Option<Duration> {
        self.locked_until.filter(|u| *u > now).map(|u| u - now)
    }

    /// Whether it may be dropped to make room: no lock-out in force.
    fn evictable(&self, now: Instant) -> bool {
        self.locked(now).is_none()
    }
}

/// A bounded table of failure counts.
#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
    max: u32,
    capacity: usize,
    /// No entry can be dropped before this (every one is locked out until then or later).
    full_until: Option<Instant>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(max: u32, capacity: usize) -> Self {
        Self { entries: HashMap::new(), max, capacity, full_until: None }
    }

    fn locked(&self, key: &K, now: Instant) -> Option<Duration> {
        self.entries.get(key).and_then(|e| e.locked(now))
    }

    /// Counts a failure; `false` if the table had no room for a new entry.
    fn fail(&mut self, key: &K, now: Instant) -> bool {
        if !self.entries.contains_key(key) && !self.make_room(now) {
            return false;
        }
        let e =
            self.entries.entry(key.clone()).or_insert(Entry { failures: 0, since: now, locked_until: None, last: now });
        if e.locked(now).is_none() && now.duration_since(e.since) >= WINDOW {
            *e = Entry { failures: 0, since: now, locked_until: None, last: now };
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        if e.failures >= self.max {
            // Each failure past the limit keeps the source out a full window more.
            e.locked_until = Some(now + WINDOW);
        }
        true
    }

    /// Frees one entry if the table is full: one whose window has passed,
    /// else the least recently failing one not locked out. Never a lock-out.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.entries.len() < self.capacity {
            return true;
        }
        if self.full_until.is_some_and(|u| now < u) {
            return false;
        }
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.evictable(now))
            .min_by_key(|(_, e)| (now.duration_since(e.since) < WINDOW, e.last))
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.entries.remove(&k);
                true
            }
            None => {
                self.full_until = self.entries.values().filter_map(|e| e.locked_until).min();
                false
            }
        }
    }
}

/// What the token endpoint does with a failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Counted; answer at once.
    Counted,
    /// No room to count it (the tables are full of lock-outs): answer late.
    Slow,
}

/// The failure tables of the token endpoint.
#[derive(Debug)]
pub(crate) struct Throttle {
    by_addr: Table<IpAddr>,
    by_client_addr: Table<(String, IpAddr)>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl Throttle {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            by_addr: Table::new(MAX_FAILURES_PER_ADDR, capacity),
            by_client_addr: Table::new(MAX_FAILURES_PER_CLIENT_ADDR, capacity),
        }
    }

    /// How long `addr` is still locked out, if it is.
    pub(crate) fn addr_locked(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        self.by_addr.locked(&source(addr), now)
    }

    /// How long `client` is still locked out for `addr`, if it is (and
    /// only for `addr`: from elsewhere the client is served).
    pub(crate) fn client_locked(&self, client: &str, addr: IpAddr, now: Instant) -> Option<Duration> {
        self.by_client_addr.locked(&(client.to_string(), source(addr)), now)
    }

    /// Counts a failed authentication of `client` (if one was named) from `addr`.
    pub(crate) fn failed(&mut self, client: Option<&str>, addr: IpAddr, now: Instant) -> Verdict {
        let addr = source(addr);
        let mut counted = self.by_addr.fail(&addr, now);
        if let Some(c) = client {
            counted &= self.by_client_addr.fail(&(c.to_string(), addr), now);
        }
        if counted { Verdict::Counted } else { Verdict::Slow }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_guesser_is_locked_out_for_its_address_only() {
        let mut t = Throttle::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES_PER_CLIENT_ADDR {
            assert_eq!(t.client_locked("c", ip("10.0.0.2"), now), None);
            assert_eq!(t.failed(Some("c"), ip("10.0.0.2"), now), Verdict::Counted);
        }
        assert_eq!(t.client_locked("c", ip("10.0.0.2"), now), Some(WINDOW));
        assert_eq!(t.client_locked("c", ip("10.0.0.3"), now), None, "the holder elsewhere is served");
        assert_eq!(t.client_locked("other", ip("10.0.0.2"), now), None);
        assert_eq!(t.addr_locked(ip("10.0.0.2"), now), None, "5 of 20");
        let later = now + WINDOW;
        assert_eq!(t.client_locked("c", ip("10.0.0.2"), later), None, "the lock-out ends");
        // Guessing across client ids locks the address.
        for i in 0..MAX_FAILURES_PER_ADDR {
            t.failed(Some(&format!("id{i}")), ip("10.0.0.4"), now);
        }
        assert!(t.addr_locked(ip("10.0.0.4"), now).is_some());
        // An IPv6 host is one source however many of its /64 it uses.
        for i in 0..MAX_FAILURES_PER_ADDR {
            t.failed(None, ip(&format!("2001:db8::{i:x}")), now);
        }
        assert!(t.addr_locked(ip("2001:db8::ffff:1"), now).is_some());
        assert!(t.addr_locked(ip("2001:db8:0:1::1"), now).is_none());
    }

    #[test]
    fn churn_never_unlocks_a_guesser_and_a_full_table_slows_new_sources() {
        let mut t = Throttle::with_capacity(8);
        let now = Instant::now();
        for _ in 0..MAX_FAILURES_PER_CLIENT_ADDR {
            t.failed(Some("victim"), ip("10.0.0.2"), now);
        }
        // Far more failing sources than the table holds: unlocked ones make room for each other.
        for i in 0..1000u32 {
            let a = IpAddr::from([10, 1, (i >> 8) as u8, i as u8]);
            assert_eq!(t.failed(Some(&format!("id{i}")), a, now), Verdict::Counted);
        }
        assert!(t.client_locked("victim", ip("10.0.0.2"), now).is_some(), "still locked");
        // A table full of lock-outs keeps them all and slows the newcomer.
        let mut t = Throttle::with_capacity(4);
        for i in 0..4u8 {
            for _ in 0..MAX_FAILURES_PER_CLIENT_ADDR {
                t.failed(Some("victim"), IpAddr::from([10, 0, 0, i]), now);
            }
        }
        assert_eq!(t.failed(Some("victim"), ip("10.0.9.9"), now), Verdict::Slow);
        for i in 0..4u8 {
            assert!(t.client_locked("victim", IpAddr::from([10, 0, 0, i]), now).is_some());
        }
        // Once the lock-outs end, there is room again.
        assert_eq!(t.failed(Some("victim"), ip("10.0.9.9"), now + WINDOW), Verdict::Counted);
    }
}
