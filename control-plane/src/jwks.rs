//! JWT key sets named by `jwksUri`: fetched by the control plane over
//! HTTPS, checked, cached and refreshed, and pushed to the sidecars with
//! their policy, so that sidecars never reach out to an identity provider.
//!
//! A set is fetched when a policy first names it, every refresh interval
//! after that, and when a sidecar saw a token whose `kid` is not in it (the
//! issuer may have rotated), at most once per minimum interval per URI. A
//! failed fetch keeps the last good set.
//!
//! Every fetch runs as a task of its own with a [`FETCH_TIMEOUT`]: a slow or
//! silent server delays its own set, never another's, and `policy apply`
//! never waits for one (it stores the policy and says the set is pending;
//! the set follows the policy to the sidecars as soon as it is fetched).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use palisade_policy::authn::{Jwks, MAX_JWKS_BYTES};
use tokio::net::TcpStream;

/// Why a key set is not at hand (fetch errors are logged and shown to `policy apply`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "its key set is pending: it is being fetched in the background (at most {secs}s a try); apply does not wait for it",
        secs = FETCH_TIMEOUT.as_secs()
    )]
    Pending,
    #[error("no answer within {secs}s", secs = FETCH_TIMEOUT.as_secs())]
    Timeout,
    #[error("not a URL: {0}")]
    NotUrl(http::uri::InvalidUri),
    #[error("only https:// key set URLs are fetched")]
    NotHttps,
    #[error("no host")]
    NoHost,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("bad host name: {0}")]
    HostName(rustls_pki_types::InvalidDnsNameError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Request(#[from] http::Error),
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("cannot read the body (at most {max} bytes): {0}", max = MAX_JWKS_BYTES)]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("the key set {0}")]
    Invalid(String),
    #[error("{0}")]
    Json(serde_json::Error),
}

/// Why `--jwks-ca-file` is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct RootsError {
    path: std::path::PathBuf,
    source: rustls_pki_types::pem::Error,
}

/// Time allowed for one fetch, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Entry {
    /// The last good set, as fetched (compact JSON).
    json: Option<String>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    requested: bool,
    /// A fetch task is running for it.
    in_flight: bool,
}

impl Entry {
    fn new() -> Self {
        Self { json: None, fetched: None, attempted: None, requested: false, in_flight: false }
    }
}

/// The cache of fetched key sets.
pub struct JwksCache {
    entries: Mutex<HashMap<String, Entry>>,
    tls: Arc<rustls::ClientConfig>,
    refresh: Duration,
    min_interval: Duration,
    wake: tokio::sync::Notify,
    /// A fetch task stored a new set that [`JwksCache::fetch_due`] has not reported yet.
    changed: AtomicBool,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache").field("refresh", &self.refresh).field("min_interval", &self.min_interval).finish()
    }
}

impl JwksCache {
    /// `roots`: the CAs whose servers are trusted to serve key sets.
    pub fn new(roots: rustls::RootCertStore, refresh: Duration, min_interval: Duration) -> Result<Self, rustls::Error> {
        let mut tls = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            entries: Mutex::default(),
            tls: Arc::new(tls),
            refresh,
            min_interval,
            wake: tokio::sync::Notify::new(),
            changed: AtomicBool::new(false),
        })
    }

    /// The last good set fetched from `uri`.
    pub fn get(&self, uri: &str) -> Option<String> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(uri).and_then(|e| e.json.clone())
    }

    /// A sidecar saw a `kid` missing from `uri`'s set: fetch it again soon
    /// (at most once per minimum interval).
    pub fn request_refresh(&self, uri: &str) {
        let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = all.get_mut(uri) {
            e.requested = true;
            drop(all);
            self.wake.notify_one();
        }
    }

    /// The URIs due for a fetch among `wanted` (marked in flight), and
    /// forgets the others (once their fetch, if any, is over).
    fn due(&self, wanted: &[String]) -> Vec<String> {
        let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|k, e| e.in_flight || wanted.contains(k));
        let now = Instant::now();
        let mut out = Vec::new();
        for uri in wanted {
            let e = all.entry(uri.clone()).or_insert_with(Entry::new);
            let since_attempt = e.attempted.map(|a| now - a);
            let due = match (e.fetched, since_attempt) {
                _ if e.in_flight => false,
                (_, Some(s)) if s < self.min_interval => false,
                (None, _) => true,
                (Some(f), _) => e.requested || now - f >= self.refresh,
            };
            if due {
                e.attempted = Some(now);
                e.requested = false;
                e.in_flight = true;
                out.push(uri.clone());
            }
        }
        out
    }

    /// Records a fetch; `true` if the set changed.
    fn store(&self, uri: &str, result: Result<String, FetchError>) -> bool {
        let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = all.get_mut(uri) else { return false };
        e.in_flight = false;
        match result {
            Ok(json) => {
                e.fetched = Some(Instant::now());
                let changed = e.json.as_deref() != Some(json.as_str());
                if changed {
                    tracing::info!(target: "audit", event = "jwks_fetched", jwks_uri = %palisade_telemetry::Untrusted(uri), "JWT key set fetched");
                }
                e.json = Some(json);
                changed
            }
            Err(why) => {
                tracing::warn!(jwks_uri = %palisade_telemetry::Untrusted(uri), error = %palisade_telemetry::Untrusted(&why.to_string()), kept_last_good = e.json.is_some(), "cannot fetch a JWT key set; tokens of its issuer are refused until it can be fetched, unless a last good set is kept");
                false
            }
        }
    }

    /// Starts a fetch of every due URI among `wanted`, each a task of its
    /// own, and returns without waiting for them: `true` if a set changed
    /// since the last call. A task that stores a new set wakes [`Self::wait`].
    pub async fn fetch_due(self: &Arc<Self>, wanted: &[String]) -> bool {
        for uri in self.due(wanted) {
            self.spawn_fetch(uri);
        }
        self.changed.swap(false, Ordering::AcqRel)
    }

    /// Fetches `uri` in a task (its entry is marked in flight).
    fn spawn_fetch(self: &Arc<Self>, uri: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.fetch_now(&uri).await;
            if this.store(&uri, result) {
                this.changed.store(true, Ordering::Release);
                this.wake.notify_one();
            }
        });
    }

    /// For `policy apply`: the set of `uri` if it is held; otherwise starts
    /// fetching it in the background (unless a fetch is running) and says it
    /// is pending, at once. Apply never waits on a key set server.
    pub async fn fetch(self: &Arc<Self>, uri: &str) -> Result<String, FetchError> {
        let start = {
            let mut all = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let e = all.entry(uri.to_string()).or_insert_with(Entry::new);
            if let Some(json) = &e.json {
                return Ok(json.clone());
            }
            let start = !e.in_flight && tokio::runtime::Handle::try_current().is_ok();
            if start {
                e.in_flight = true;
                e.attempted = Some(Instant::now());
            }
            start
        };
        if start {
            self.spawn_fetch(uri.to_string());
        }
        Err(FetchError::Pending)
    }

    /// Waits until a refresh is requested or `max` passes.
    pub async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.wake.notified()).await;
    }

    /// How often the fetch loop should look (a fraction of the refresh interval).
    pub fn tick(&self) -> Duration {
        (self.refresh / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Fetches and checks one key set, in [`FETCH_TIMEOUT`] at most.
    async fn fetch_now(&self, uri: &str) -> Result<String, FetchError> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_inner(uri)).await.map_err(|_| FetchError::Timeout)?
    }

    async fn fetch_inner(&self, uri: &str) -> Result<String, FetchError> {
        let parsed: Uri = uri.parse().map_err(FetchError::NotUrl)?;
        if parsed.scheme_str() != Some("https") {
            return Err(FetchError::NotHttps);
        }
        let host = parsed.host().ok_or(FetchError::NoHost)?.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = parsed.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(FetchError::Connect)?;
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(FetchError::HostName)?;
        let tls =
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(FetchError::Tls)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = parsed.authority().map(|a| a.as_str().to_string()).unwrap_or(host);
        let req = Request::get(parsed.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(header::USER_AGENT, concat!("palisade-control-plane/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect().await.map_err(FetchError::Body)?.to_bytes();
        let text = std::str::from_utf8(&body).map_err(|_| FetchError::NotUtf8)?;
        Jwks::parse(text).map_err(FetchError::Invalid)?;
        // Stored compact, so an unchanged set compares equal however it was formatted.
        let v: serde_json::Value = serde_json::from_str(text).map_err(FetchError::Json)?;
        Ok(v.to_string())
    }
}

/// The roots a `--jwks-ca-file` names; a missing default file gives none.
pub fn load_roots(path: &std::path::Path, explicit: bool) -> Result<rustls::RootCertStore, RootsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(path) {
        Ok(it) => it.collect::<Result<_, _>>().map_err(|source| RootsError { path: path.to_path_buf(), source })?,
        Err(e) if !explicit => {
            tracing::warn!(path = %path.display(), error = %e, "no CA file for jwksUri servers: key sets can be given inline (jwks) only; pass --jwks-ca-file");
            return Ok(roots);
        }
        Err(source) => return Err(RootsError { path: path.to_path_buf(), source }),
    };
    let (_, bad) = roots.add_parsable_certificates(certs);
    if bad > 0 {
        tracing::debug!(path = %path.display(), skipped = bad, "skipped unusable CA certificates");
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<JwksCache> {
        palisade_certs::install_default_provider();
        Arc::new(
            JwksCache::new(rustls::RootCertStore::empty(), Duration::from_secs(300), Duration::from_secs(1)).unwrap(),
        )
    }

    #[tokio::test]
    async fn silent_servers_hold_no_one_and_apply_never_waits() {
        // Three servers that accept and never answer.
        let mut uris = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            uris.push(format!("https://127.0.0.1:{}/jwks.json", l.local_addr().unwrap().port()));
            held.push(l);
        }
        let c = cache();
        let started = Instant::now();
        assert!(!c.fetch_due(&uris).await);
        // What apply calls: pending at once, and no second fetch of a set in flight.
        let e = c.fetch(&uris[0]).await.unwrap_err();
        assert!(matches!(e, FetchError::Pending), "{e}");
        assert!(c.due(&uris).is_empty(), "in flight: not started again");
        let fresh = "https://127.0.0.1:1/other.json".to_string();
        assert!(matches!(c.fetch(&fresh).await.unwrap_err(), FetchError::Pending));
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        // A set that is not wanted any more is kept while its fetch runs.
        c.due(&uris[..1]);
        assert!(c.entries.lock().unwrap().contains_key(&uris[2]));
    }
}
