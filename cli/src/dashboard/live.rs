//! What the dashboard keeps while it runs: whether the control plane
//! answers, and the refusals a tap of every sidecar reports (the decisions
//! view), pushed to the pages as server-sent events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_proto::v1::{GetStatusRequest, TapRequest};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::api::Admin;

/// Refusals counted per 10 s step over 15 minutes.
const STEP_MS: u64 = 10_000;
const STEPS: usize = 90;
/// Deciding rules told apart, at most; the requests kept behind each.
const MAX_RULES: usize = 1000;
const SAMPLES: usize = 20;
const REASONS: [&str; 4] = ["deny", "unauthenticated", "invalid", "rate_limited"];

/// Whether the control plane answers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conn {
    pub(crate) connected: bool,
    pub(crate) error: Option<String>,
    /// Since when (unix ms).
    pub(crate) at: u64,
}

impl Conn {
    pub(crate) fn json(&self) -> Value {
        json!({"connected": self.connected, "error": self.error, "at": self.at})
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// (reason, policy, rule, callee).
type RuleKey = (String, String, String, String);

#[derive(Debug, Default)]
struct Rule {
    count: u64,
    last: u64,
    samples: VecDeque<Value>,
}

/// Refusals by reason over time and by deciding rule.
#[derive(Debug)]
pub(crate) struct Decisions {
    since: u64,
    dropped: u64,
    steps: VecDeque<(u64, [u64; 4])>,
    rules: HashMap<RuleKey, Rule>,
}

impl Decisions {
    fn new() -> Self {
        Self { since: now_ms(), dropped: 0, steps: VecDeque::new(), rules: HashMap::new() }
    }

    /// Counts one refused request (a tap event).
    pub(crate) fn add(&mut self, ev: Value, at: u64) {
        let s = |k: &str| ev[k].as_str().unwrap_or_default().to_string();
        let reason = s("decision");
        let step = at / STEP_MS * STEP_MS;
        if self.steps.back().is_none_or(|(t, _)| *t != step) {
            self.steps.push_back((step, [0; 4]));
            while self.steps.len() > STEPS {
                self.steps.pop_front();
            }
        }
        if let (Some(i), Some((_, c))) = (REASONS.iter().position(|r| *r == reason), self.steps.back_mut()) {
            c[i] += 1;
        }
        let rule = ev["rule"].as_u64().map(|r| r.to_string()).unwrap_or_default();
        let key = (reason, s("policy"), rule, s("callee"));
        if !self.rules.contains_key(&key) && self.rules.len() >= MAX_RULES {
            return;
        }
        let r = self.rules.entry(key).or_default();
        r.count += 1;
        r.last = at;
        r.samples.push_front(ev);
        r.samples.truncate(SAMPLES);
    }

    pub(crate) fn json(&self) -> Value {
        let now = now_ms() / STEP_MS * STEP_MS;
        let first = now.saturating_sub(STEP_MS * (STEPS as u64 - 1));
        let buckets: Vec<Value> = (0..STEPS as u64)
            .map(|i| first + i * STEP_MS)
            .map(|t| {
                let c = self.steps.iter().find(|(s, _)| *s == t).map_or([0; 4], |(_, c)| *c);
                json!({"t": t, "deny": c[0], "unauthenticated": c[1], "invalid": c[2], "rate_limited": c[3]})
            })
            .collect();
        let mut rules: Vec<(&RuleKey, &Rule)> = self.rules.iter().collect();
        rules.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(b.1.last.cmp(&a.1.last)));
        let rules: Vec<Value> = rules
            .into_iter()
            .map(|((reason, policy, rule, to), r)| {
                json!({"reason": reason, "policy": policy, "rule": rule, "to": to, "count": r.count,
                       "last": r.last, "samples": r.samples})
            })
            .collect();
        json!({"since": self.since, "dropped": self.dropped, "bucket_ms": STEP_MS, "buckets": buckets, "rules": rules})
    }
}

/// The dashboard's shared state.
pub(crate) struct Live {
    pub(crate) admin: Admin,
    pub(crate) conn: watch::Sender<Conn>,
    pub(crate) decisions: Mutex<Decisions>,
    /// Each refused request as it comes (JSON), for the pages' event streams.
    pub(crate) decided: broadcast::Sender<Arc<str>>,
    /// Live taps the pages hold open, at most (the control plane runs 16 in all).
    pub(crate) taps: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("conn", &*self.conn.borrow()).finish_non_exhaustive()
    }
}

/// An error of a call to the control plane: whether it came from the
/// control plane (it answered) or from not reaching it.
pub(crate) trait Reach: std::fmt::Display {
    fn reached(&self) -> bool;
}

impl Reach for tonic::Status {
    fn reached(&self) -> bool {
        use tonic::Code;
        !matches!(self.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
    }
}

impl Reach for anyhow::Error {
    fn reached(&self) -> bool {
        self.downcast_ref::<tonic::Status>().is_some_and(Reach::reached)
    }
}

impl Reach for String {
    fn reached(&self) -> bool {
        false
    }
}

/// Live taps of the pages at once, at most.
pub(crate) const MAX_PAGE_TAPS: usize = 4;

impl Live {
    pub(crate) fn new(admin: Admin) -> Arc<Self> {
        Arc::new(Self {
            admin,
            conn: watch::channel(Conn { connected: true, error: None, at: now_ms() }).0,
            decisions: Mutex::new(Decisions::new()),
            decided: broadcast::channel(256).0,
            taps: Arc::new(tokio::sync::Semaphore::new(MAX_PAGE_TAPS)),
        })
    }

    /// Records whether a call to the control plane reached it (an answer
    /// that refuses the request, such as an invalid argument, did).
    pub(crate) fn note<T, E: Reach>(&self, r: &Result<T, E>) {
        let (connected, error) = match r {
            Ok(_) => (true, None),
            Err(e) if e.reached() => (true, None),
            Err(e) => (false, Some(format!("control plane unreachable: {e}"))),
        };
        self.conn.send_if_modified(|c| {
            if c.connected == connected && (connected || c.error == error) {
                return false;
            }
            if c.connected != connected {
                c.at = now_ms();
            }
            c.connected = connected;
            c.error = error;
            true
        });
    }

    /// Runs until the process ends: asks the control plane every 2 s
    /// whether it answers, and taps every sidecar's refusals.
    pub(crate) fn start(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let r =
                    tokio::time::timeout(Duration::from_secs(2), this.admin.clone().get_status(GetStatusRequest {}))
                        .await
                        .map_err(|_| "no answer within 2 s".to_string())
                        .and_then(|r| r.map_err(|s| s.message().to_string()));
                this.note(&r);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let r = this.tap_refusals().await;
                if r.is_err() {
                    this.note(&r);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn tap_refusals(&self) -> Result<(), String> {
        let req = TapRequest { decision: "deny".into(), ..Default::default() };
        let mut stream = self.admin.clone().tap(req).await.map_err(|s| s.message().to_string())?.into_inner();
        while let Some(ev) = stream.message().await.map_err(|s| s.message().to_string())? {
            let Ok(v) = serde_json::from_str::<Value>(&ev.json) else {
                self.decisions.lock().unwrap_or_else(|p| p.into_inner()).dropped = ev.dropped;
                continue;
            };
            {
                let mut d = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
                d.dropped = ev.dropped;
                d.add(v, now_ms());
            }
            let _ = self.decided.send(Arc::from(ev.json.as_str()));
        }
        Err("the tap of refusals ended".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_an_unreachable_control_plane_shows_as_lost() {
        let ch = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let live = Live::new(palisade_proto::v1::admin_client::AdminClient::new(ch));
        live.note::<(), _>(&Err(tonic::Status::invalid_argument("path: not a path")));
        assert!(live.conn.borrow().connected, "an answer that refuses the request came from it");
        live.note::<(), _>(&Err(anyhow::Error::from(tonic::Status::unavailable("connection refused"))));
        let c = live.conn.borrow().clone();
        assert!(!c.connected && c.error.as_deref().is_some_and(|e| e.contains("unreachable")), "{c:?}");
        live.note::<(), tonic::Status>(&Ok(()));
        assert!(live.conn.borrow().connected);
    }

    #[test]
    fn refusals_are_counted_by_reason_and_rule_with_their_requests() {
        let mut d = Decisions::new();
        let now = now_ms();
        for i in 0..25 {
            d.add(json!({"decision": "deny", "policy": "shop/no-admin", "rule": 0, "callee": "spiffe://td/ns/shop/sa/orders", "path": format!("/admin/{i}")}), now);
        }
        d.add(
            json!({"decision": "rate_limited", "policy": "shop/limit", "callee": "spiffe://td/ns/shop/sa/orders"}),
            now,
        );
        let v = d.json();
        let rules = v["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0]["policy"].as_str(), rules[0]["rule"].as_str(), rules[0]["count"].as_u64()),
            (Some("shop/no-admin"), Some("0"), Some(25))
        );
        assert_eq!(rules[0]["samples"].as_array().unwrap().len(), SAMPLES);
        assert_eq!(rules[0]["samples"][0]["path"], "/admin/24", "newest first");
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), STEPS);
        let last = buckets.last().unwrap();
        assert_eq!((last["deny"].as_u64(), last["rate_limited"].as_u64()), (Some(25), Some(1)));
    }
}
