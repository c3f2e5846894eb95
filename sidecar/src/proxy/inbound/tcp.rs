//! Opaque TCP at the callee: one decision per connection, then a splice
//! that ends when the caller's certificate does.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;

use super::{AppTarget, Caller, Inbound};
use crate::metrics::AuthnLabels;

impl Inbound {
    /// The L4 decision (the policy pipeline's, for a connection): only the
    /// caller and the port exist here.
    pub(super) fn authorize_tcp(&self, src: SocketAddr, caller: Option<&Caller>, app: &AppTarget) -> bool {
        let source = caller.map(|c| c.subject.as_str());
        let Some(policy) = self.policy.current() else {
            tracing::info!(target: "audit", decision = "deny", src.addr = %src, src.identity = source, reason = "no policy received yet (not ready)", "TCP connection refused");
            return false;
        };
        let o = policy.enforcer.decide_connection(source, app.addr.port());
        if let Some(d) = &o.decision {
            policy.count(d);
        }
        let Some(r) = o.refusal() else { return true };
        if r.kind == palisade_policy::Refused::Unauthenticated {
            self.metrics.authn.get_or_create(&AuthnLabels { result: "refused", reason: "missing_credential" }).inc();
        }
        tracing::info!(target: "audit", decision = r.kind.label(), src.addr = %src, src.identity = source, policy = o.policy.as_deref(), rule = o.rule, reason = %r.reason, "TCP connection refused");
        false
    }

    pub(super) async fn tcp<I>(
        &self,
        mut io: I,
        src: SocketAddr,
        caller: Option<&Caller>,
        app_target: &AppTarget,
        connected: Option<TcpStream>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut app = match connected {
            Some(a) => a,
            None => {
                if !self.authorize_tcp(src, caller, app_target) {
                    return;
                }
                match TcpStream::connect(app_target.addr).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(src.addr = %src, src.identity = caller.map(|c| c.subject.as_str()), dst.addr = %app_target.addr, error = %e, "app unreachable for TCP");
                        return;
                    }
                }
            }
        };
        let _ = app.set_nodelay(true);
        let log = self.opts.access_log && crate::proxy::access::sampled(self.opts.access_log_sampling);
        let tap = self.opts.observe.tapping();
        let entry = (log || tap).then(|| {
            let mut e = crate::proxy::access::Entry::new("inbound", src);
            e.log = log;
            e.tap = tap.then(|| self.opts.observe.clone());
            e.caller = caller.map(|c| c.subject.to_string());
            e.callee = self.svids.get().map(|s| s.id.to_string());
            e
        });
        // An opaque connection is authorised once, with the caller's
        // certificate: it ends when that certificate expires.
        let lifetime =
            caller.map_or(Duration::MAX, |c| c.not_after.duration_since(SystemTime::now()).unwrap_or_default());
        let spliced = match tokio::time::timeout(lifetime, crate::proxy::tcp::splice(&mut io, &mut app)).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics.protocol_refused("cert_expired");
                tracing::info!(target: "audit", decision = "deny", src.addr = %src, src.identity = caller.map(|c| c.subject.as_str()), reason = "the certificate the connection was authorised with expired", "opaque TCP connection closed");
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "caller certificate expired"))
            }
        };
        match spliced {
            Ok((up, down)) => {
                if let Some(e) = entry {
                    e.bytes_in.store(up, std::sync::atomic::Ordering::Relaxed);
                    e.write(None, None, "allow", down);
                }
            }
            Err(err) => {
                tracing::debug!(src.addr = %src, error = %err, "inbound TCP stream ended with an error");
                if let Some(e) = entry {
                    e.write(None, None, "allow", 0);
                }
            }
        }
    }
}
