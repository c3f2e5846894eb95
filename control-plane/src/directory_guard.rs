//! Who may put what in the directory. A sidecar names its inbound address
//! when it certifies (a join or a renewal); that address goes to every
//! sidecar as where its identity is served. Without checks a workload's
//! certificate could name another workload's address (and push it out of
//! the directory) or thousands of made-up ones. So, before a record is
//! written:
//!
//! - the address's IP must be where the connection comes from, unless that
//!   is loopback (one host: demos, tests) or the operator turned the check
//!   off (`--inbound-addr-check off`, sidecars behind NAT);
//! - an address held by a live record of another identity stays with it:
//!   the claim is refused, unless the claim's IP was verified against the
//!   connection and IPs are one workload's each (`exclusive`, Kubernetes pod
//!   IPs: the old holder's pod is gone and its IP was reused);
//! - one identity holds at most `--max-addresses-per-identity` addresses;
//! - directory changes by renewals and Kubernetes attestations (which a
//!   workload can repeat on its own) are rate limited per caller (identity
//!   and source IP); a join token's uses are bounded by the operator.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use crate::store::ProxyRecord;

/// How a claimed inbound address is checked against the connection's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddrCheck {
    /// The IP must be the connection's source (unless loopback), and an IP
    /// is one workload's (Kubernetes pod IPs): a verified claim takes the
    /// address over from another identity's record (a reused pod IP).
    Exclusive,
    /// The IP must be the connection's source (unless loopback), but hosts
    /// run several workloads (VMs): another identity's live record is never replaced.
    Shared,
    /// No source check (sidecars reach the control plane through NAT);
    /// another identity's live record is never replaced.
    Off,
}

/// Why a claimed inbound address was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DirectoryRefusal {
    #[error(
        "inbound_addr {claimed} is not where this connection comes from ({source_ip}): a sidecar registers its own address; set its --advertise to the IP the control plane sees, or run the control plane with --inbound-addr-check off if sidecars reach it through NAT"
    )]
    NotSource { claimed: SocketAddr, source_ip: String },
    #[error(
        "inbound_addr {addr} is held by {holder} (its certificate is valid for {secs_left}s more); an address belongs to one identity: give this sidecar another address with --advertise/--inbound, or wait until the holder's certificate expires"
    )]
    Held { addr: String, holder: String, secs_left: u64 },
    #[error(
        "{identity} already holds {held} inbound addresses, the most --max-addresses-per-identity ({max}) allows; records go when their certificates expire, or raise the limit for a larger service"
    )]
    TooMany { identity: String, held: usize, max: usize },
    #[error(
        "{identity} from {source_ip} changed the directory too often (at most {per_minute} a minute, --directory-changes-per-minute); retry in {retry_secs}s"
    )]
    RateLimited { identity: String, source_ip: String, per_minute: u32, retry_secs: u64 },
}

/// What a claim that passed may do to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Allowed {
    /// Replace another identity's record at the address (a verified reused IP).
    pub(crate) take_over: bool,
    /// The directory changes (a new address for the identity, or a takeover).
    pub(crate) changes: bool,
}

/// A claim to check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim<'a> {
    pub(crate) identity: &'a str,
    /// The inbound address (already parsed as HOST:PORT); empty: none.
    pub(crate) addr: &'a str,
    /// The connection's source.
    pub(crate) peer: Option<SocketAddr>,
    /// The serial of the record a renewal supersedes.
    pub(crate) replaces: Option<&'a str>,
    /// Whether the caller can repeat the claim at will (renewal, Kubernetes).
    pub(crate) rate_limited: bool,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before full (idle) ones are forgotten.
const MAX_BUCKETS: usize = 16_384;

/// The directory's admission checks (one per control plane).
#[derive(Debug)]
pub(crate) struct DirectoryGuard {
    check: AddrCheck,
    max_addrs: usize,
    per_minute: u32,
    buckets: Mutex<HashMap<(String, IpAddr), Bucket>>,
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl DirectoryGuard {
    pub(crate) fn new(check: AddrCheck, max_addrs: usize, per_minute: u32) -> Self {
        Self { check, max_addrs: max_addrs.max(1), per_minute: per_minute.max(1), buckets: Mutex::default() }
    }

    /// Checks a claim against the records held (`proxies`) at `now` (Unix
    /// seconds; `clock` for the rate limit). Spends a rate-limit token only
    /// when everything else passed and the directory would change.
    pub(crate) fn admit(
        &self,
        c: Claim<'_>,
        proxies: &[ProxyRecord],
        now: u64,
        clock: Instant,
    ) -> Result<Allowed, DirectoryRefusal> {
        if c.addr.is_empty() {
            return Ok(Allowed::default());
        }
        let Ok(claimed) = c.addr.parse::<SocketAddr>() else {
            // Checked by the caller already; never admit what does not parse.
            return Err(DirectoryRefusal::NotSource {
                claimed: SocketAddr::from(([0, 0, 0, 0], 0)),
                source_ip: "(unparsable claim)".into(),
            });
        };
        let source = c.peer.map(|p| canonical(p.ip()));
        let verified = match (self.check, source) {
            (AddrCheck::Off, _) => false,
            (_, Some(ip)) if ip.is_loopback() => false,
            (_, Some(ip)) if ip == canonical(claimed.ip()) => true,
            (_, source) => {
                return Err(DirectoryRefusal::NotSource {
                    claimed,
                    source_ip: source.map_or_else(|| "unknown".into(), |ip| ip.to_string()),
                });
            }
        };
        let live = proxies
            .iter()
            .filter(|p| p.cert_not_after > now && !p.inbound_addr.is_empty())
            .filter(|p| c.replaces != Some(p.cert_serial.as_str()));
        let mut own = BTreeSet::new();
        let mut holder: Option<&ProxyRecord> = None;
        for p in live {
            if p.identity == c.identity {
                own.insert(p.inbound_addr.as_str());
            } else if p.inbound_addr == c.addr && holder.is_none_or(|h| h.cert_not_after < p.cert_not_after) {
                holder = Some(p);
            }
        }
        let take_over = match holder {
            Some(_) if verified && self.check == AddrCheck::Exclusive => true,
            Some(h) => {
                return Err(DirectoryRefusal::Held {
                    addr: c.addr.to_string(),
                    holder: h.identity.clone(),
                    secs_left: h.cert_not_after.saturating_sub(now),
                });
            }
            None => false,
        };
        // The record a renewal supersedes (its own identity's only).
        let replaced = c.replaces.and_then(|s| proxies.iter().find(|p| p.cert_serial == s && p.identity == c.identity));
        if !own.contains(c.addr) && own.len() >= self.max_addrs {
            return Err(DirectoryRefusal::TooMany {
                identity: c.identity.to_string(),
                held: own.len(),
                max: self.max_addrs,
            });
        }
        // A renewal at the same address changes nothing; one elsewhere moves.
        let stays = replaced.is_some_and(|old| old.inbound_addr == c.addr);
        let moved_away = replaced.is_some_and(|old| !old.inbound_addr.is_empty() && old.inbound_addr != c.addr);
        let changes = (!own.contains(c.addr) && !stays) || take_over || moved_away;
        if changes && c.rate_limited {
            self.spend(c.identity, source.unwrap_or(IpAddr::from([0, 0, 0, 0])), clock)?;
        }
        Ok(Allowed { take_over, changes })
    }

    fn spend(&self, identity: &str, source: IpAddr, now: Instant) -> Result<(), DirectoryRefusal> {
        let cap = f64::from(self.per_minute);
        let per_sec = cap / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            // Forget the callers whose buckets have refilled: they lose nothing.
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < cap);
        }
        let b = buckets.entry((identity.to_string(), source)).or_insert(Bucket { tokens: cap, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(DirectoryRefusal::RateLimited {
            identity: identity.to_string(),
            source_ip: source.to_string(),
            per_minute: self.per_minute,
            retry_secs: ((1.0 - b.tokens) / per_sec).ceil() as u64,
        })
    }
}

/// The one spelling of a socket address the directory compares and
/// stores: parsed, an IPv4-mapped IPv6 address as IPv4, ports without
/// leading zeros. `127.0.0.1:014144` and `[::ffff:127.0.0.1]:14144` are
/// `127.0.0.1:14144`, so no other spelling of a held address passes as a
/// new one.
pub(crate) fn canonical_addr(addr: &str) -> Option<String> {
    let a: std::net::SocketAddr = addr.parse().ok()?;
    let ip = match a.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    Some(std::net::SocketAddr::new(ip, a.port()).to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_spelling_of_an_address_is_one() {
        for spelling in ["127.0.0.1:14144", "127.0.0.1:014144", "[::ffff:127.0.0.1]:14144", "[::ffff:7f00:1]:14144"] {
            assert_eq!(canonical_addr(spelling).as_deref(), Some("127.0.0.1:14144"), "{spelling}");
        }
        assert_eq!(canonical_addr("[::1]:80").as_deref(), Some("[::1]:80"));
        assert_eq!(canonical_addr("orders:80"), None);
    }

    const WEB: &str = "spiffe://td/ns/shop/sa/web";
    const ORDERS: &str = "spiffe://td/ns/shop/sa/orders";

    fn rec(identity: &str, addr: &str, serial: &str, not_after: u64) -> ProxyRecord {
        ProxyRecord {
            identity: identity.into(),
            inbound_addr: addr.into(),
            peer_addr: String::new(),
            cert_serial: serial.into(),
            cert_not_after: not_after,
            last_seen: 0,
            attestation: "token".into(),
            issuer: String::new(),
        }
    }

    fn claim<'a>(identity: &'a str, addr: &'a str, peer: &str) -> Claim<'a> {
        Claim { identity, addr, peer: Some(peer.parse().unwrap()), replaces: None, rate_limited: true }
    }

    #[test]
    fn another_identitys_address_is_refused_unless_a_verified_pod_ip() {
        let held = [rec(ORDERS, "10.0.0.7:4143", "o1", 100)];
        let g = DirectoryGuard::new(AddrCheck::Exclusive, 8, 60);
        let now = Instant::now();
        // From loopback nothing is verified: refused, whatever the mode.
        let r = g.admit(claim(WEB, "10.0.0.7:4143", "127.0.0.1:5000"), &held, 10, now);
        assert!(matches!(r, Err(DirectoryRefusal::Held { ref holder, .. }) if holder == ORDERS), "{r:?}");
        // From another IP: not its address.
        let r = g.admit(claim(WEB, "10.0.0.7:4143", "10.0.0.9:5000"), &held, 10, now);
        assert!(matches!(r, Err(DirectoryRefusal::NotSource { .. })), "{r:?}");
        // From that very IP (a reused pod IP): taken over.
        let ok = g.admit(claim(WEB, "10.0.0.7:4143", "[::ffff:10.0.0.7]:5000"), &held, 10, now).unwrap();
        assert!(ok.take_over && ok.changes);
        // On shared hosts, never.
        let shared = DirectoryGuard::new(AddrCheck::Shared, 8, 60);
        let r = shared.admit(claim(WEB, "10.0.0.7:4143", "10.0.0.7:5000"), &held, 10, now);
        assert!(matches!(r, Err(DirectoryRefusal::Held { .. })), "{r:?}");
        // With the check off, any IP may be named, but a held one still is not.
        let off = DirectoryGuard::new(AddrCheck::Off, 8, 60);
        assert!(off.admit(claim(WEB, "10.0.0.8:4143", "10.9.9.9:5000"), &held, 10, now).is_ok());
        assert!(off.admit(claim(WEB, "10.0.0.7:4143", "10.0.0.7:5000"), &held, 10, now).is_err());
        // An expired record holds nothing.
        assert!(off.admit(claim(WEB, "10.0.0.7:4143", "10.0.0.7:5000"), &held, 100, now).is_ok());
        // An unknown source is not trusted.
        let c = Claim { peer: None, ..claim(WEB, "10.0.0.8:1", "10.0.0.8:2") };
        assert!(matches!(g.admit(c, &held, 10, now), Err(DirectoryRefusal::NotSource { .. })));
    }

    #[test]
    fn an_identity_holds_a_bounded_number_of_addresses() {
        let g = DirectoryGuard::new(AddrCheck::Exclusive, 2, 1000);
        let mine = [rec(WEB, "127.0.0.1:1", "a", 100), rec(WEB, "127.0.0.1:2", "b", 100)];
        let now = Instant::now();
        let r = g.admit(claim(WEB, "127.0.0.1:3", "127.0.0.1:9"), &mine, 10, now);
        assert!(matches!(r, Err(DirectoryRefusal::TooMany { held: 2, max: 2, .. })), "{r:?}");
        // Its own address again (a restart): no change, allowed.
        let same = g.admit(claim(WEB, "127.0.0.1:2", "127.0.0.1:9"), &mine, 10, now).unwrap();
        assert_eq!(same, Allowed { take_over: false, changes: false });
        // A renewal that moves its record frees the old address.
        let c = Claim { replaces: Some("b"), ..claim(WEB, "127.0.0.1:3", "127.0.0.1:9") };
        assert!(g.admit(c, &mine, 10, now).unwrap().changes);
    }

    #[test]
    fn renewals_in_place_are_not_changes_and_never_rate_limited() {
        let g = DirectoryGuard::new(AddrCheck::Exclusive, 1, 1);
        let mut held = vec![rec(WEB, "127.0.0.1:1", "s0", 100)];
        let now = Instant::now();
        for i in 1..=20 {
            let prev = format!("s{}", i - 1);
            let c = Claim { replaces: Some(&prev), ..claim(WEB, "127.0.0.1:1", "127.0.0.1:9") };
            assert_eq!(g.admit(c, &held, 10, now).unwrap(), Allowed::default(), "renewal {i}");
            held = vec![rec(WEB, "127.0.0.1:1", &format!("s{i}"), 100)];
        }
    }

    #[test]
    fn directory_changes_are_rate_limited_per_caller() {
        let g = DirectoryGuard::new(AddrCheck::Off, 10_000, 6);
        let now = Instant::now();
        let addrs: Vec<String> = (1..=20).map(|p| format!("127.0.0.1:{p}")).collect();
        for a in &addrs[..6] {
            g.admit(claim(WEB, a, "127.0.0.1:9"), &[], 10, now).unwrap();
        }
        let r = g.admit(claim(WEB, &addrs[6], "127.0.0.1:9"), &[], 10, now);
        assert!(matches!(r, Err(DirectoryRefusal::RateLimited { retry_secs: 10, .. })), "{r:?}");
        // Another caller is not affected; a join token's joins are not limited.
        assert!(g.admit(claim(ORDERS, &addrs[7], "127.0.0.1:9"), &[], 10, now).is_ok());
        let join = Claim { rate_limited: false, ..claim(WEB, &addrs[8], "127.0.0.1:9") };
        assert!(g.admit(join, &[], 10, now).is_ok());
        // Ten seconds refill one change.
        let later = now + Duration::from_secs(10);
        assert!(g.admit(claim(WEB, &addrs[9], "127.0.0.1:9"), &[], 10, later).is_ok());
        assert!(g.admit(claim(WEB, &addrs[10], "127.0.0.1:9"), &[], 10, later).is_err());
    }
}
