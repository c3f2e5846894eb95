//! The sidecar's one client of the control plane: one TLS configuration, one
//! channel (authenticated with our current certificate, replaced when the
//! certificate is renewed), shared by `Identity.Certify` renewals and the
//! `MeshConfig.Subscribe` stream that carries everything else.
//!
//! The stream is incremental and scoped: it opens with a Hello naming the
//! resources this sidecar holds from earlier streams and the services and
//! addresses it needs endpoints of; the control plane answers with the
//! difference, then sends changes as they happen. Each update is applied
//! type by type and ACKed, or NACKed naming the types rejected
//! ([`apply`]). Services and addresses looked up for the first time while
//! the stream is open are asked for on it ([`Directory::take_wants`]).
//! Taps' matches, recorded requests and stats go up the same stream.
//!
//! The stream reconnects with exponential backoff and jitter; whatever was
//! applied last stays in force while the control plane is away.

use std::sync::Arc;
use std::time::Duration;

use palisade_certs::TrustDomain;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
use palisade_proto::channel::{ChannelError, ControlPlaneAddr};
use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::mesh_config_client::MeshConfigClient;
use palisade_proto::v1::{ConfigAck, ConfigNack, ConfigRequest, Report};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::policy::PolicyState;

pub mod apply;

/// `d` scaled by a random factor in `[1 - spread/2, 1 + spread/2]`, so
/// sidecars that renew or reconnect together do not do so in lockstep (the
/// sidecar's one jitter: certificate renewal and control-stream reconnects).
pub(crate) fn jitter(d: Duration, spread: f64) -> Duration {
    let mut b = [0u8; 4];
    let r = match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    };
    d.mul_f64(1.0 - spread / 2.0 + spread * r)
}

#[cfg(test)]
mod tests;

use apply::{Applier, Held};

/// Timeout to connect (TCP + TLS) and of one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a live stream checks whether our certificate was renewed.
const RENEWAL_CHECK: Duration = Duration::from_secs(2);

/// The way to the control plane: one or several replicas (each address,
/// and each A/AAAA record of a name, is one). The first tried is chosen at
/// random, so sidecars spread across replicas; after a failure the next
/// one is tried first.
#[derive(Debug)]
pub struct ControlPlane {
    addrs: Vec<ControlPlaneAddr>,
    /// Index in `addrs` of the replica tried first.
    next: std::sync::atomic::AtomicUsize,
    /// The replica the shared channel is connected to, for logs.
    connected: std::sync::Mutex<String>,
    trust_domain: TrustDomain,
    svids: SvidStore,
    /// Presents our current certificate (renewals, the stream).
    authenticated: Arc<rustls::ClientConfig>,
    /// Presents none (first attestation).
    anonymous: Arc<rustls::ClientConfig>,
    /// The shared channel and the certificate it was opened with.
    channel: tokio::sync::Mutex<Option<(Channel, Arc<Svid>)>>,
}

impl ControlPlane {
    /// Both TLS configurations verify the control plane's SPIFFE ID against
    /// `bundle`, which the stream keeps current.
    pub fn new(
        addrs: Vec<ControlPlaneAddr>,
        trust_domain: TrustDomain,
        bundle: TrustBundle,
        svids: SvidStore,
    ) -> Result<Self, rustls::Error> {
        let verifier = SpiffeServerVerifier::new(bundle, PeerIdentity::Exact(trust_domain.control_plane()));
        let authenticated =
            Arc::new(palisade_certs::tls::client_config(verifier.clone(), Some(Arc::new(svids.clone())))?);
        let anonymous = Arc::new(palisade_certs::tls::client_config(verifier, None)?);
        let first = (crate::seed() as usize) % addrs.len().max(1);
        Ok(Self {
            addrs,
            next: first.into(),
            connected: std::sync::Mutex::default(),
            trust_domain,
            svids,
            authenticated,
            anonymous,
            channel: tokio::sync::Mutex::default(),
        })
    }

    /// Connects to the first replica that answers, from the one tried first.
    async fn dial(&self, tls: &Arc<rustls::ClientConfig>) -> Result<Channel, ChannelError> {
        use std::sync::atomic::Ordering;
        let n = self.addrs.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            for target in resolve(&self.addrs[idx]).await {
                match palisade_proto::channel::connect(&target, tls.clone(), CALL_TIMEOUT).await {
                    Ok(ch) => {
                        self.next.store(idx, Ordering::Relaxed);
                        let name = if target.host == self.addrs[idx].host {
                            target.to_string()
                        } else {
                            format!("{} ({target})", self.addrs[idx])
                        };
                        let mut connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
                        if *connected != name {
                            if n > 1 || !connected.is_empty() {
                                tracing::info!(control_plane = %name, "connected to a control-plane replica");
                            }
                            *connected = name;
                        }
                        return Ok(ch);
                    }
                    Err(e) => {
                        tracing::debug!(control_plane = %target, error = %e, "control-plane replica unreachable");
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| ChannelError::InvalidAddress {
            addr: String::new(),
            why: "no control-plane address".into(),
        }))
    }

    /// Tries the next replica first from now on (the one in use failed).
    pub fn failover(&self) {
        if self.addrs.len() > 1 {
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let n = self.addrs.len();
            let _ = self.next.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |v| Some(v % n),
            );
        }
    }

    /// The trust domain we belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The shared channel, presenting the certificate we hold now; `None`
    /// when we hold no valid certificate. A channel opened with a certificate
    /// since renewed is replaced: the control plane checks certificates on
    /// every call and would refuse the old one once it expires.
    pub async fn channel(&self) -> Result<Option<Channel>, ChannelError> {
        let Some(ours) = self.svids.valid() else { return Ok(None) };
        let mut slot = self.channel.lock().await;
        if let Some((ch, with)) = slot.as_ref()
            && Arc::ptr_eq(with, &ours)
        {
            return Ok(Some(ch.clone()));
        }
        let ch = self.dial(&self.authenticated).await?;
        *slot = Some((ch.clone(), ours));
        Ok(Some(ch))
    }

    /// Forgets the shared channel after a transport failure, and tries
    /// the next replica first.
    pub async fn reset(&self) {
        *self.channel.lock().await = None;
        self.failover();
    }

    /// A one-off channel presenting no certificate, for the first attestation.
    pub async fn anonymous(&self) -> Result<Channel, ChannelError> {
        self.dial(&self.anonymous).await
    }

    /// Whether `svid` is still the certificate we hold.
    fn still_current(&self, svid: &Arc<Svid>) -> bool {
        self.svids.get().is_some_and(|s| Arc::ptr_eq(&s, svid))
    }
}

/// Why a config stream session failed (the stream is reopened, and what
/// was applied last stays in force).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No replica could be reached.
    #[error(transparent)]
    Connect(#[from] ChannelError),
    /// The control plane refused or ended the stream with a gRPC status.
    #[error("{code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    /// The stream's request half closed before the Hello went out.
    #[error("channel closed")]
    Closed,
}

impl From<tonic::Status> for StreamError {
    fn from(s: tonic::Status) -> Self {
        Self::Status { code: s.code(), message: s.message().to_string() }
    }
}

/// Keeps the configuration stream open and applies what it carries.
#[derive(Debug)]
pub struct ConfigStream {
    pub control: Arc<ControlPlane>,
    pub inbound_addr: String,
    pub bundle: TrustBundle,
    pub policy: PolicyState,
    pub directory: Arc<Directory>,
    pub metrics: Arc<Metrics>,
    /// The balancer, whose view of the called services goes up with the stats.
    pub balancer: Arc<crate::balance::Balancer>,
    /// Taps, recorded requests and stats, carried on the stream.
    pub observe: Arc<crate::observe::Observe>,
    pub report_interval: Duration,
    /// A root rotation's "renew now unless your certificate chains to these"
    /// (read by the identity task).
    pub renew_unless: tokio::sync::watch::Sender<Vec<CertificateDer<'static>>>,
    /// The resources received, kept across streams (empty at start): a
    /// reconnect names them and receives only what changed.
    pub held: std::sync::Mutex<Held>,
}

impl ConfigStream {
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut received = false;
            let result = self.session(&mut received).await;
            self.metrics.policy_stream_connected.set(0);
            // Taps live as long as the stream that gave them.
            self.observe.set_taps(&[]);
            // Start over quickly only after a stream that delivered: a stream
            // that opens and then fails on every update backs off like a
            // refused connection.
            if received {
                backoff = Duration::from_millis(200);
            }
            // A stream that worked and was lost: every sidecar of a replica
            // that died loses it at once, so the first retry is spread over
            // a whole second (no herd at the next replica); later ones back off.
            let wait = if received { spread(FIRST_RETRY_SPREAD) } else { jitter(backoff, 0.5) };
            match result {
                Ok(Ended::Renewed) => continue,
                Ok(Ended::NoCertificate) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(Ended::ByServer) => {
                    tracing::info!(retry_in = ?wait, "config stream closed by the control plane; reconnecting")
                }
                Err(e) => {
                    self.metrics.directory_refresh_failures.inc();
                    self.control.reset().await;
                    tracing::warn!(error = %e, retry_in = ?wait, "config stream failed; keeping the last good configuration")
                }
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// What an update configures.
    fn applier(&self) -> Applier<'_> {
        Applier {
            held: &self.held,
            bundle: &self.bundle,
            policy: &self.policy,
            directory: &self.directory,
            metrics: &self.metrics,
            renew_unless: &self.renew_unless,
        }
    }

    async fn session(&self, received: &mut bool) -> Result<Ended, StreamError> {
        let Some(ours) = self.control.svids.valid() else { return Ok(Ended::NoCertificate) };
        let Some(channel) = self.control.channel().await? else {
            return Ok(Ended::NoCertificate);
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let hello = self.applier().hello(&self.inbound_addr);
        tx.send(request(Kind::Hello(hello))).await.map_err(|_| StreamError::Closed)?;
        let mut client =
            MeshConfigClient::new(channel).max_decoding_message_size(palisade_proto::limits::MAX_SNAPSHOT_BYTES);
        let mut updates = client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        self.metrics.policy_stream_connected.set(1);
        let mut renewal = tokio::time::interval(RENEWAL_CHECK);
        let mut report = tokio::time::interval(self.report_interval);
        let mut drops = tokio::time::interval(Duration::from_secs(1));
        loop {
            let update = tokio::select! {
                _ = drops.tick(), if self.observe.tapping() => {
                    let tap_events = self.observe.take_drops();
                    if !tap_events.is_empty() && !send(&tx, Kind::Report(Report { tap_events, ..Default::default() })).await {
                        return Ok(Ended::ByServer);
                    }
                    continue;
                }
                _ = report.tick() => {
                    let up = Report {
                        stats: Some(crate::observe::stat_report(&self.metrics, &self.balancer)),
                        recorded: self.observe.take_recorded(),
                        ..Default::default()
                    };
                    if !send(&tx, Kind::Report(up)).await {
                        return Ok(Ended::ByServer);
                    }
                    continue;
                }
                _ = self.observe.wake.notified() => {
                    let tap_events = self.observe.take_events();
                    if !tap_events.is_empty() && !send(&tx, Kind::Report(Report { tap_events, ..Default::default() })).await {
                        return Ok(Ended::ByServer);
                    }
                    continue;
                }
                _ = self.directory.wants_queued() => {
                    if let Some(want) = self.directory.take_wants()
                        && !send(&tx, Kind::Want(want)).await
                    {
                        return Ok(Ended::ByServer);
                    }
                    continue;
                }
                m = updates.message() => match m? {
                    Some(update) => update,
                    None => return Ok(Ended::ByServer),
                },
                _ = renewal.tick() => {
                    // Reopen on the renewed certificate's channel.
                    if self.control.still_current(&ours) { continue } else { return Ok(Ended::Renewed) }
                }
                _ = self.policy.refresh().notify.notified() => {
                    let jwks_refresh = self.policy.refresh().take();
                    if !jwks_refresh.is_empty() {
                        tracing::info!(jwks_uris = ?jwks_refresh, "a token named a key this sidecar lacks; asking the control plane to fetch the key set again");
                        if !send(&tx, Kind::Report(Report { jwks_refresh, ..Default::default() })).await {
                            return Ok(Ended::ByServer);
                        }
                    }
                    continue;
                }
            };
            if let Some(taps) = &update.taps {
                self.observe.set_taps(&taps.taps);
            }
            if update.nonce.is_empty() {
                // Taps only: nothing else to apply, nothing to answer.
                continue;
            }
            let rejected = self.applier().apply(&update, &ours.id);
            let reply = if rejected.is_empty() {
                *received = true;
                Kind::Ack(ConfigAck { nonce: update.nonce })
            } else {
                Kind::Nack(ConfigNack { nonce: update.nonce, rejected: apply::nack_reasons(rejected) })
            };
            if !send(&tx, reply).await {
                return Ok(Ended::ByServer);
            }
        }
    }
}

fn request(kind: Kind) -> ConfigRequest {
    ConfigRequest { kind: Some(kind) }
}

/// Sends on the stream; false once the stream is gone.
async fn send(tx: &tokio::sync::mpsc::Sender<ConfigRequest>, kind: Kind) -> bool {
    tx.send(request(kind)).await.is_ok()
}

/// Why a stream session ended without an error.
#[derive(Debug)]
enum Ended {
    ByServer,
    /// Our certificate was renewed: reopen on a channel that presents it.
    Renewed,
    NoCertificate,
}

/// The replicas behind one address: itself when it is an IP address;
/// each A/AAAA record of a name, from a random one (the name itself when
/// it does not resolve, so the error names it).
async fn resolve(addr: &ControlPlaneAddr) -> Vec<ControlPlaneAddr> {
    if addr.host.parse::<std::net::IpAddr>().is_ok() {
        return vec![addr.clone()];
    }
    let mut ips: Vec<std::net::IpAddr> = match tokio::net::lookup_host((addr.host.as_str(), addr.port)).await {
        Ok(found) => found.map(|a| a.ip()).collect(),
        Err(_) => return vec![addr.clone()],
    };
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return vec![addr.clone()];
    }
    let start = (crate::seed() as usize) % ips.len();
    ips.rotate_left(start);
    ips.into_iter().map(|ip| ControlPlaneAddr { host: ip.to_string(), port: addr.port }).collect()
}

/// How widely the first reconnect after a lost stream is spread.
const FIRST_RETRY_SPREAD: Duration = Duration::from_secs(1);

/// Anywhere in `[0, d]`.
fn spread(d: Duration) -> Duration {
    jitter(d / 2, 2.0)
}
