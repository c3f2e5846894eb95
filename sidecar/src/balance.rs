//! Which endpoint (peer sidecar) of a service a call goes to, on the
//! calling side: the cheaper of two endpoints drawn at random (power of two
//! choices), where an endpoint's cost is its peak-EWMA latency times its
//! requests in flight plus one; new endpoints warm up; endpoints that keep
//! failing are ejected for a growing time and probed back in
//! ([`health`]); a service's retries are bounded by its budget ([`budget`]).
//!
//! State is per service this sidecar calls, kept in step with the directory
//! (an endpoint that leaves it drains: what is in flight finishes, nothing
//! new is sent).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use palisade_policy::resilience::Balancing;

use crate::proxy::peer::Peer;

pub mod budget;
mod health;
#[cfg(test)]
mod tests;

pub use budget::Budget;
use health::Health;
pub use health::Outcome;

/// How endpoints are chosen (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Peak-EWMA latency with power of two choices, warm-up and ejection.
    PeakEwma,
    /// In turn, passing over endpoints that could not be reached (no
    /// latency awareness, no ejection on errors): for comparisons.
    RoundRobin,
}

/// How fast a latency estimate forgets (the decay's time constant).
const DECAY: Duration = Duration::from_secs(10);

/// All services this sidecar calls.
#[derive(Debug)]
pub struct Balancer {
    mode: Mode,
    epoch: Instant,
    services: RwLock<HashMap<Arc<str>, Arc<Service>, crate::directory::Fast>>,
}

/// One called service: its endpoints and its retry budget.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    endpoints: RwLock<Endpoints>,
    pub budget: Budget,
    next: AtomicUsize,
    /// Retries sent, and retries the budget refused.
    pub retries: AtomicU64,
    pub retries_refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Endpoints {
    /// The directory generation they reflect (0: never synced).
    generation: u64,
    list: Vec<Arc<Endpoint>>,
}

/// One endpoint and what this sidecar knows of it.
#[derive(Debug)]
pub struct Endpoint {
    pub peer: Peer,
    in_flight: AtomicU32,
    /// Milliseconds since the balancer's epoch until which it is ejected (0: not).
    ejected_until: AtomicU64,
    /// When it joined, and whether it warms up (it joined after the first sync).
    added: Instant,
    warms: bool,
    health: Mutex<Health>,
}

/// A request (or TCP connection) in flight on an endpoint, counted until
/// [`finish`](InFlight::finish)ed or dropped (dropped: no latency sample).
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    service: Arc<Service>,
    started: Instant,
    done: bool,
}

impl Balancer {
    pub fn new(mode: Mode) -> Self {
        Self { mode, epoch: Instant::now(), services: RwLock::default() }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The state of `service`, created on its first call.
    pub fn service(&self, name: &str) -> Arc<Service> {
        if let Some(s) = self.services.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return s.clone();
        }
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(Service {
                    name: name.into(),
                    endpoints: RwLock::default(),
                    budget: Budget::new(self.epoch),
                    next: AtomicUsize::new(0),
                    retries: AtomicU64::new(0),
                    retries_refused: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Picks an endpoint of `service` among `peers` (the directory's, of
    /// `generation`), avoiding `avoid` when another can be had. Returns the
    /// endpoint and the peers that left the directory since the last pick
    /// (their pooled connections are to be closed once idle).
    pub fn pick(
        &self,
        service: &Arc<Service>,
        peers: &[Peer],
        generation: u64,
        cfg: &Balancing,
        avoid: Option<SocketAddr>,
    ) -> (Option<Arc<Endpoint>>, Vec<Peer>) {
        let mut removed = Vec::new();
        let stale = service.endpoints.read().unwrap_or_else(|p| p.into_inner()).generation != generation;
        if stale {
            removed = service.sync(peers, generation);
        }
        let endpoints = service.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let list = &endpoints.list;
        let instant = Instant::now();
        let now = self.ms(instant);
        let usable = |e: &Arc<Endpoint>| e.ejected_until.load(Ordering::Relaxed) <= now && Some(e.peer.addr) != avoid;
        let mut n = list.iter().filter(|e| usable(e)).count();
        // None usable: every endpoint is ejected or avoided; better one of
        // them than a refusal (the call may still succeed).
        let any = n == 0;
        if any {
            n = list.len();
        }
        if n == 0 {
            return (None, removed);
        }
        let nth = |k: usize| list.iter().filter(|e| any || usable(e)).nth(k).cloned();
        let chosen = match self.mode {
            Mode::RoundRobin => nth(service.next.fetch_add(1, Ordering::Relaxed) % n),
            Mode::PeakEwma if n == 1 => nth(0),
            Mode::PeakEwma => {
                let i = fastrand::usize(..n);
                let j = (i + 1 + fastrand::usize(..n - 1)) % n;
                let (a, b) = (nth(i), nth(j));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let (win, lose) = if a.cost(instant) <= b.cost(instant) { (a, b) } else { (b, a) };
                        // A warming endpoint wins only its share so far.
                        Some(if fastrand::f64() < win.warmth(instant, cfg.warmup) { win } else { lose })
                    }
                    (a, b) => a.or(b),
                }
            }
        };
        (chosen, removed)
    }

    /// Starts a request (or connection) on `endpoint`.
    pub fn start(&self, service: &Arc<Service>, endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { endpoint, service: service.clone(), started: Instant::now(), done: false }
    }

    /// Another request (or connection) on the endpoint of `flight`.
    pub fn again(&self, flight: &InFlight) -> InFlight {
        self.start(&flight.service, flight.endpoint.clone())
    }

    /// Records how a request on an endpoint went: its latency, and whether
    /// it counts towards ejecting it.
    pub fn finish(&self, mut flight: InFlight, outcome: Outcome, cfg: &Balancing) {
        flight.done = true;
        let now = Instant::now();
        let rtt = now.saturating_duration_since(flight.started);
        let ep = &flight.endpoint;
        ep.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Answers to requests sent before it was ejected are counted, and
        // change nothing else: neither eject it again nor end its probation.
        let out = ep.ejected_until.load(Ordering::Relaxed) > self.ms(now);
        let verdict = {
            let mut h = ep.health.lock().unwrap_or_else(|p| p.into_inner());
            match out {
                true => h.count(outcome),
                false => h.record(outcome, rtt, now, DECAY, self.mode == Mode::PeakEwma, &cfg.ejection),
            }
        };
        let eject = match verdict {
            health::Verdict::Keep => return,
            health::Verdict::Down => true,
            health::Verdict::Eject => false,
            health::Verdict::InRow => {
                if self.all_peers_failing(&flight.service, ep) {
                    return;
                }
                false
            }
            health::Verdict::Compare => {
                let mine = ep.health.lock().unwrap_or_else(|p| p.into_inner()).window(now);
                if !health::far_below(mine, self.peers_window(&flight.service, ep, now)) {
                    return;
                }
                false
            }
        };
        self.eject(&flight.service, ep, eject, now, cfg);
    }

    /// Whether every other endpoint of `ep`'s service that has answered
    /// failed its last answer too (and one has): then failures in a row are
    /// shared (a request every endpoint fails, an outage behind them all),
    /// not `ep`'s to be ejected for.
    fn all_peers_failing(&self, service: &Service, ep: &Arc<Endpoint>) -> bool {
        let endpoints = service.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let (mut answered, mut failing) = (0, 0);
        for e in endpoints.list.iter().filter(|e| !Arc::ptr_eq(e, ep)) {
            let (a, f) = e.health.lock().unwrap_or_else(|p| p.into_inner()).last();
            answered += usize::from(a);
            failing += usize::from(a && f);
        }
        answered > 0 && failing == answered
    }

    /// (successes, requests) of the other endpoints of `ep`'s service lately.
    fn peers_window(&self, service: &Service, ep: &Arc<Endpoint>, now: Instant) -> (u64, u64) {
        let endpoints = service.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let (mut ok, mut all) = (0u64, 0u64);
        for e in endpoints.list.iter().filter(|e| !Arc::ptr_eq(e, ep)) {
            let (o, a) = e.health.lock().unwrap_or_else(|p| p.into_inner()).window(now);
            ok += o;
            all += a;
        }
        (ok, all)
    }

    /// Ejects `ep` unless that would take out more than the allowed share
    /// of its service (`down`: it could not be reached at all, ejected regardless).
    fn eject(&self, service: &Service, ep: &Arc<Endpoint>, down: bool, now: Instant, cfg: &Balancing) {
        if self.mode == Mode::RoundRobin && !down {
            return;
        }
        let now_ms = self.now_ms();
        if !down {
            let endpoints = service.endpoints.read().unwrap_or_else(|p| p.into_inner());
            let ejected = endpoints.list.iter().filter(|e| e.ejected_until.load(Ordering::Relaxed) > now_ms).count();
            let allowed = endpoints.list.len() * cfg.ejection.max_percent as usize / 100;
            if ejected + 1 > allowed {
                tracing::debug!(service = %service.name, endpoint = %ep.peer.addr, ejected, allowed, "not ejected: the service's ejection share is reached");
                return;
            }
        }
        let time = ep.health.lock().unwrap_or_else(|p| p.into_inner()).eject(now, &cfg.ejection);
        ep.ejected_until.store(now_ms + time.as_millis() as u64, Ordering::Relaxed);
        tracing::info!(service = %service.name, endpoint = %ep.peer.addr, identity = %ep.peer.identity, ejected_for = ?time, unreachable = down, "endpoint ejected from balancing");
    }

    /// What is known of every endpoint and service, for metrics and reports.
    pub fn snapshot(&self) -> Vec<ServiceSnapshot> {
        let services: Vec<_> = self.services.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let (now, now_ms) = (Instant::now(), self.now_ms());
        let mut out: Vec<ServiceSnapshot> = services
            .iter()
            .map(|s| {
                let endpoints = s.endpoints.read().unwrap_or_else(|p| p.into_inner());
                let mut eps: Vec<EndpointSnapshot> = endpoints
                    .list
                    .iter()
                    .map(|e| {
                        let h = e.health.lock().unwrap_or_else(|p| p.into_inner());
                        let until = e.ejected_until.load(Ordering::Relaxed);
                        EndpointSnapshot {
                            addr: e.peer.addr,
                            identity: e.peer.identity.to_string(),
                            in_flight: e.in_flight.load(Ordering::Relaxed),
                            latency_ms: h.latency(now, DECAY).map(|d| d.as_secs_f64() * 1e3),
                            ejected_for_ms: until.saturating_sub(now_ms),
                            ejections: h.ejections,
                            requests: h.requests,
                            failures: h.failures,
                        }
                    })
                    .collect();
                eps.sort_by_key(|e| e.addr);
                ServiceSnapshot {
                    service: s.name.to_string(),
                    endpoints: eps,
                    retries: s.retries.load(Ordering::Relaxed),
                    retries_refused: s.retries_refused.load(Ordering::Relaxed),
                    budget: s.budget.snapshot(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}

impl Service {
    /// Brings the endpoints in step with the directory: kept ones keep what
    /// is known of them, new ones warm up (unless this is the first sync),
    /// gone ones are returned.
    fn sync(&self, peers: &[Peer], generation: u64) -> Vec<Peer> {
        let mut endpoints = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        if endpoints.generation == generation {
            return Vec::new();
        }
        let first = endpoints.generation == 0;
        let mut old: HashMap<Peer, Arc<Endpoint>> = endpoints.list.drain(..).map(|e| (e.peer.clone(), e)).collect();
        let now = Instant::now();
        endpoints.list = peers
            .iter()
            .map(|p| {
                old.remove(p).unwrap_or_else(|| {
                    Arc::new(Endpoint {
                        peer: p.clone(),
                        in_flight: AtomicU32::new(0),
                        ejected_until: AtomicU64::new(0),
                        added: now,
                        warms: !first,
                        health: Mutex::new(Health::new(now)),
                    })
                })
            })
            .collect();
        endpoints.generation = generation;
        old.into_keys().collect()
    }
}

impl Endpoint {
    /// Its cost now: estimated latency times (requests in flight + 1). One
    /// that has not answered yet costs next to nothing: it gets a request, and so
    /// an estimate (warm-up, not a guessed latency, keeps a new one from
    /// taking too much at once).
    fn cost(&self, now: Instant) -> f64 {
        let rtt = self.health.lock().unwrap_or_else(|p| p.into_inner()).latency(now, DECAY).unwrap_or_default();
        // At least 1 µs, so that requests in flight weigh even then.
        rtt.as_secs_f64().max(1e-6) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// The share of its wins it takes: rising from 10 % to all over the
    /// warm-up after it joined (1 when it does not warm up).
    fn warmth(&self, now: Instant, warmup: Duration) -> f64 {
        if !self.warms || warmup.is_zero() {
            return 1.0;
        }
        (now.saturating_duration_since(self.added).as_secs_f64() / warmup.as_secs_f64()).clamp(0.1, 1.0)
    }
}

impl InFlight {
    pub fn endpoint(&self) -> &Peer {
        &self.endpoint.peer
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One service as this sidecar sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceSnapshot {
    pub service: String,
    pub endpoints: Vec<EndpointSnapshot>,
    /// Retries sent, and retries the budget refused, since start.
    pub retries: u64,
    pub retries_refused: u64,
    pub budget: budget::Snapshot,
}

/// One endpoint as this sidecar sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointSnapshot {
    pub addr: SocketAddr,
    pub identity: String,
    pub in_flight: u32,
    /// Peak-EWMA latency (`None`: no answer yet).
    pub latency_ms: Option<f64>,
    /// Time left of its ejection (0: in balancing).
    pub ejected_for_ms: u64,
    pub ejections: u64,
    pub requests: u64,
    pub failures: u64,
}
