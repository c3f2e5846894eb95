//! The mesh's OAuth 2.0 token service: the client credentials grant
//! (RFC 6749 section 4.4) on its own HTTPS listener, issuing JWT access
//! tokens in the RFC 9068 profile, signed ES256 with a key that rotates by
//! `kid`, published at `/.well-known/jwks.json` with RFC 8414 metadata.
//!
//! Client secrets are stored as SHA-256 hashes (they are 256-bit random
//! values, so a slow hash adds nothing); failed authentications are counted
//! per source address and per client and address ([`throttle`]): a guesser's
//! address is answered 429 until the window passes, and the client, from
//! any other address, is still served. No secret or token is ever logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::https::reply;
use crate::store::{OAuthClientRecord, Store};
use palisade_cmd::{hex, unix_now};

mod throttle;

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// The key set's path.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The RFC 8414 metadata path.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";

/// Largest token request body (a form of a few fields).
const MAX_BODY: usize = 16 * 1024;

/// Why the token service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("OAuth signing keys {path}: {why}")]
    Keys { path: PathBuf, why: String },
}

/// Random bytes, base64url.
pub fn random_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    SystemRandom::new().fill(&mut b).expect("invariant: the system RNG works");
    URL_SAFE_NO_PAD.encode(b)
}

/// Equal, in time that depends only on the length.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct SigningKey {
    kid: String,
    created: u64,
    /// Unix seconds from which it signs (published before that, so every
    /// sidecar holds it before the first token it signs exists).
    active_from: u64,
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl SigningKey {
    fn generate(now: u64, active_from: u64) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|e| e.to_string())?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec(), now, active_from)
    }

    fn from_pkcs8(pkcs8: Vec<u8>, created: u64, active_from: u64) -> Result<Self, String> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &SystemRandom::new())
            .map_err(|e| format!("unusable key: {e}"))?;
        let kid = hex(&palisade_policy::authn::sha256(pair.public_key().as_ref())[..8]);
        Ok(Self { kid, created, active_from, pkcs8, pair })
    }

    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
               "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
    }
}

/// The stored keys' bytes, if any.
fn read_keys(home: &KeyHome) -> Result<Option<Vec<u8>>, String> {
    match home {
        KeyHome::File(path) => match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        KeyHome::Etcd(etcd, kek) => etcd.get_sealed("oauth-keys", kek).map_err(|e| e.to_string()),
    }
}

fn parse_keys(bytes: Option<&[u8]>) -> Result<Vec<SigningKey>, String> {
    let Some(bytes) = bytes else { return Ok(Vec::new()) };
    let stored: Vec<StoredKey> = serde_json::from_slice(bytes).map_err(|e| format!("corrupt: {e}"))?;
    stored
        .into_iter()
        .map(|k| {
            let pkcs8 = STANDARD.decode(&k.pkcs8).map_err(|e| format!("corrupt key: {e}"))?;
            SigningKey::from_pkcs8(pkcs8, k.created, k.active_from)
        })
        .collect()
}

/// How the token service is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of its tokens.
    pub issuer: String,
    pub token_ttl: Duration,
    /// A new signing key every this long.
    pub key_rotation: Duration,
}

/// Where the signing keys are kept.
#[derive(Debug)]
pub enum KeyHome {
    /// `DIR/oauth-keys.json`, mode 0600.
    File(PathBuf),
    /// Sealed in etcd, shared by every replica (the leader rotates them).
    Etcd(Arc<crate::store::etcd::EtcdStore>, Arc<crate::store::sealed::Kek>),
}

impl KeyHome {
    fn describe(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::Etcd(..) => PathBuf::from("etcd:oauth-keys"),
        }
    }
}

/// The token service.
pub struct TokenService {
    settings: Settings,
    home: KeyHome,
    keys: RwLock<Vec<SigningKey>>,
    store: Arc<dyn Store>,
    failures: Mutex<throttle::Throttle>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self.keys.read().map(|k| k.iter().map(|k| k.kid.clone()).collect()).unwrap_or_default();
        f.debug_struct("TokenService")
            .field("issuer", &self.settings.issuer)
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredKey {
    kid: String,
    created: u64,
    active_from: u64,
    pkcs8: String,
}

impl TokenService {
    /// Loads the signing keys from `dir/oauth-keys.json` (mode 0600), making
    /// the first one if there is none.
    pub fn open(dir: &Path, settings: Settings, store: Arc<dyn Store>) -> Result<Self, OAuthError> {
        Self::open_at(KeyHome::File(dir.join("oauth-keys.json")), settings, store)
    }

    /// Loads the signing keys from `home`, making the first one if there is none.
    pub fn open_at(home: KeyHome, settings: Settings, store: Arc<dyn Store>) -> Result<Self, OAuthError> {
        let path = home.describe();
        let err = |why: String| OAuthError::Keys { path: path.clone(), why };
        let keys = parse_keys(read_keys(&home).map_err(err)?.as_deref()).map_err(err)?;
        let svc = Self { settings, home, keys: RwLock::new(keys), store, failures: Mutex::default() };
        if svc.keys.read().map(|k| k.is_empty()).unwrap_or(true) {
            let now = unix_now();
            let first = SigningKey::generate(now, now).map_err(err)?;
            svc.keys.write().unwrap_or_else(|p| p.into_inner()).push(first);
            if !svc.save(true).map_err(err)? {
                // Another replica made the first key meanwhile: use its.
                svc.reload().map_err(err)?;
            }
        }
        Ok(svc)
    }

    /// Reads the keys again (another replica rotated them).
    pub fn reload(&self) -> Result<(), String> {
        let keys = parse_keys(read_keys(&self.home)?.as_deref())?;
        if !keys.is_empty() {
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        }
        Ok(())
    }

    /// The issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Writes the keys; with `create` (the first key), only if no other
    /// replica stored some first (`false` then).
    fn save(&self, create: bool) -> Result<bool, String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let stored: Vec<StoredKey> = keys
            .iter()
            .map(|k| StoredKey {
                kid: k.kid.clone(),
                created: k.created,
                active_from: k.active_from,
                pkcs8: STANDARD.encode(&k.pkcs8),
            })
            .collect();
        let bytes = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        match &self.home {
            KeyHome::File(path) => {
                palisade_certs::files::write_atomic(path, &bytes, 0o600).map_err(|e| e.to_string()).map(|()| true)
            }
            KeyHome::Etcd(etcd, kek) => etcd.put_sealed("oauth-keys", &bytes, kek, create).map_err(|e| e.to_string()),
        }
    }

    /// How long before it signs a new key is published.
    fn lead(&self) -> u64 {
        (self.settings.key_rotation / 4).min(Duration::from_secs(300)).as_secs().max(1)
    }

    /// How often [`Self::rotate_if_due`] should run.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs((self.lead() / 2).clamp(1, 60))
    }

    /// Publishes the next key when the current one nears its rotation, and
    /// retires keys no live token can carry. `true` if the key set changed.
    pub fn rotate_if_due(&self, now: u64) -> Result<bool, String> {
        let rotation = self.settings.key_rotation.as_secs().max(1);
        let ttl = self.settings.token_ttl.as_secs() + 60;
        let mut changed = false;
        {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let newest = keys.iter().map(|k| k.active_from).max().unwrap_or(0);
            if newest + rotation <= now + self.lead() {
                let from = (newest + rotation).max(now + self.lead());
                keys.push(SigningKey::generate(now, from)?);
                changed = true;
            }
            // A key is retired once the key after it has signed for longer than a token lives.
            let mut starts: Vec<u64> = keys.iter().map(|k| k.active_from).collect();
            starts.sort_unstable();
            let before = keys.len();
            keys.retain(|k| match starts.iter().find(|s| **s > k.active_from) {
                Some(next) => *next > now || now - *next < ttl,
                None => true,
            });
            changed |= keys.len() != before;
        }
        if changed {
            self.save(false)?;
            tracing::info!(target: "audit", event = "oauth_keys_rotated", kids = ?self.kids(), "OAuth signing keys changed");
        }
        Ok(changed)
    }

    fn kids(&self) -> Vec<String> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).iter().map(|k| k.kid.clone()).collect()
    }

    /// The published key set (every key not retired, including the next one).
    pub fn jwks_json(&self) -> String {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        json!({"keys": keys.iter().map(SigningKey::jwk).collect::<Vec<_>>()}).to_string()
    }

    fn metadata(&self) -> Value {
        let iss = &self.settings.issuer;
        json!({
            "issuer": iss,
            "token_endpoint": format!("{iss}{TOKEN_PATH}"),
            "jwks_uri": format!("{iss}{JWKS_PATH}"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "response_types_supported": ["token"],
            "scopes_supported": [],
        })
    }

    /// Signs an access token for `client`.
    fn issue(
        &self,
        client: &OAuthClientRecord,
        scopes: &[String],
        aud: Vec<String>,
        now: u64,
    ) -> Result<String, String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys
            .iter()
            .filter(|k| k.active_from <= now)
            .max_by_key(|k| k.active_from)
            .ok_or("no signing key is active")?;
        let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": key.kid});
        let aud = if aud.len() == 1 { json!(aud[0]) } else { json!(aud) };
        let claims = json!({
            "iss": self.settings.issuer,
            "sub": client.client_id,
            "aud": aud,
            "exp": now + self.settings.token_ttl.as_secs(),
            "iat": now,
            "nbf": now,
            "jti": random_b64(16),
            "client_id": client.client_id,
            "scope": scopes.join(" "),
        });
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = key.pair.sign(&SystemRandom::new(), input.as_bytes()).map_err(|e| e.to_string())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// Whether `addr`, or `client` from `addr`, is locked out after too many failures.
    fn locked(&self, client: Option<&str>, addr: std::net::IpAddr) -> Option<Duration> {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        f.addr_locked(addr, now).or_else(|| client.and_then(|c| f.client_locked(c, addr, now)))
    }

    /// Counts a failed authentication; waits before the answer when it could not be counted.
    async fn failed(&self, client: Option<&str>, addr: std::net::IpAddr) {
        let verdict = self.failures.lock().unwrap_or_else(|p| p.into_inner()).failed(client, addr, Instant::now());
        if verdict == throttle::Verdict::Slow {
            tokio::time::sleep(throttle::SLOW_ANSWER).await;
        }
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let known = [TOKEN_PATH, JWKS_PATH, METADATA_PATH].contains(&path.as_str());
        let want = if path == TOKEN_PATH { Method::POST } else { Method::GET };
        if !known {
            return reply(StatusCode::NOT_FOUND, "application/json", br#"{"error":"not_found"}"#.to_vec());
        }
        if req.method() != want {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                br#"{"error":"method_not_allowed"}"#.to_vec(),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_str(want.as_str()).unwrap_or(HeaderValue::from_static("GET")));
            return r;
        }
        match path.as_str() {
            JWKS_PATH => {
                let mut r = reply(StatusCode::OK, "application/json", self.jwks_json().into_bytes());
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
                r
            }
            METADATA_PATH => reply(StatusCode::OK, "application/json", self.metadata().to_string().into_bytes()),
            _ => {
                let store = self.store.clone();
                let this = self.clone();
                match this.token(req, peer, store).await {
                    Ok(r) | Err(r) => r,
                }
            }
        }
    }

    async fn token(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        store: Arc<dyn Store>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        let addr = peer.ip();
        let refuse = |reason: &'static str, client: Option<&str>| {
            crate::metrics::METRICS
                .oauth_tokens
                .get_or_create(&crate::metrics::ResultReason { result: "refused", reason })
                .inc();
            tracing::warn!(target: "audit", event = "oauth_token_refused", src.addr = %peer, client_id = client.unwrap_or(""), reason, "token request refused");
        };
        if let Some(wait) = self.locked(None, addr) {
            refuse("too_many_failures_from_address", None);
            return Err(too_many(wait));
        }
        let form_ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
        if !form_ct {
            refuse("not_a_form", None);
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "send application/x-www-form-urlencoded",
            ));
        }
        let basic = match req.headers().get_all(header::AUTHORIZATION).iter().count() {
            0 => None,
            1 => Some(parse_basic(req.headers().get(header::AUTHORIZATION)).ok_or_else(|| {
                refuse("bad_basic_header", None);
                invalid_client()
            })?),
            _ => {
                refuse("several_authorization_headers", None);
                return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "one Authorization header"));
            }
        };
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                refuse("body_too_large", None);
                return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "the request body is too large"));
            }
        };
        let Some(form) = parse_form(&body) else {
            refuse("bad_form", None);
            return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "malformed or repeated parameters"));
        };
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (id, secret) = match (basic, get("client_id"), get("client_secret")) {
            (Some(_), _, Some(_)) => {
                refuse("two_client_authentication_methods", None);
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "use one client authentication method",
                ));
            }
            (Some((id, secret)), body_id, None) => {
                if body_id.is_some_and(|b| b != id) {
                    refuse("client_id_mismatch", Some(&id));
                    return Err(invalid_client());
                }
                (id, secret)
            }
            (None, Some(id), Some(secret)) => (id.to_string(), secret.to_string()),
            (None, _, _) => {
                refuse("no_client_authentication", get("client_id"));
                return Err(invalid_client());
            }
        };
        if let Some(wait) = self.locked(Some(&id), addr) {
            refuse("too_many_failures_for_client", Some(&id));
            return Err(too_many(wait));
        }
        let presented = palisade_policy::authn::sha256(secret.as_bytes());
        let clients = crate::store::blocking(&store, |s| s.oauth_clients()).await;
        let client = clients.into_iter().find(|c| c.client_id == id);
        let ok = client.as_ref().is_some_and(|c| same(hex(&presented).as_bytes(), c.secret_sha256.as_bytes()));
        let Some(client) = client.filter(|_| ok) else {
            self.failed(Some(&id), addr).await;
            refuse("bad_client_credentials", Some(&id));
            return Err(invalid_client());
        };
        match get("grant_type") {
            Some("client_credentials") => {}
            None => {
                refuse("no_grant_type", Some(&id));
                return Err(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is required"));
            }
            Some(_) => {
                refuse("unsupported_grant_type", Some(&id));
                return Err(oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only client_credentials"));
            }
        }
        let scopes: Vec<String> = match get("scope") {
            None => client.scopes.clone(),
            Some(s) => {
                let asked: Vec<String> = s.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
                if asked.iter().any(|a| !client.scopes.contains(a)) {
                    refuse("invalid_scope", Some(&id));
                    return Err(oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        "a requested scope is not granted to this client",
                    ));
                }
                asked
            }
        };
        let aud = match get("audience").or(get("resource")) {
            Some(a) if client.audiences.iter().any(|c| c == a) => vec![a.to_string()],
            Some(_) => {
                refuse("invalid_target", Some(&id));
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_target",
                    "the requested audience is not granted to this client",
                ));
            }
            None if client.audiences.is_empty() => vec![self.settings.issuer.clone()],
            None => client.audiences.clone(),
        };
        let now = unix_now();
        let token = self.issue(&client, &scopes, aud, now).map_err(|e| {
            tracing::error!(error = %e, "cannot sign an access token");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "cannot issue a token now")
        })?;
        crate::metrics::METRICS
            .oauth_tokens
            .get_or_create(&crate::metrics::ResultReason { result: "issued", reason: "client_credentials" })
            .inc();
        tracing::info!(target: "audit", event = "oauth_token_issued", src.addr = %peer, client_id = %client.client_id, client = %client.name, scope = %scopes.join(" "), "access token issued");
        let body = json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.settings.token_ttl.as_secs(),
            "scope": scopes.join(" "),
        });
        let mut r = reply(StatusCode::OK, "application/json", body.to_string().into_bytes());
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        Ok(r)
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    let mut r = reply(
        status,
        "application/json",
        json!({"error": error, "error_description": description}).to_string().into_bytes(),
    );
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn invalid_client() -> Response<Full<Bytes>> {
    let mut r = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication failed");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"palisade\""));
    r
}

fn too_many(wait: Duration) -> Response<Full<Bytes>> {
    let mut r = oauth_error(StatusCode::TOO_MANY_REQUESTS, "invalid_client", "too many failed attempts; retry later");
    if let Ok(v) = HeaderValue::from_str(&(wait.as_secs() + 1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// `application/x-www-form-urlencoded` decoding of one component.
fn form_decode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).decode_utf8().ok().map(|c| c.into_owned())
}

/// The form's parameters; `None` if malformed or a parameter repeats (RFC 6749 section 3.2).
fn parse_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (form_decode(k)?, form_decode(v)?);
        if out.iter().any(|(n, _)| *n == k) || out.len() >= 32 {
            return None;
        }
        out.push((k, v));
    }
    Some(out)
}

/// `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 section 2.3.1).
fn parse_basic(v: Option<&HeaderValue>) -> Option<(String, String)> {
    let v = v?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || rest.len() > 2048 {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(rest.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_basic_credentials_decode_strictly() {
        assert_eq!(
            parse_form(b"grant_type=client_credentials&scope=a+b%20c").unwrap(),
            [("grant_type".into(), "client_credentials".into()), ("scope".into(), "a b c".into())]
        );
        assert!(parse_form(b"a=1&a=2").is_none(), "repeated");
        assert!(parse_form(b"a=%ff").is_none(), "not UTF-8");
        let h = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode("my%3Aid:s%2Bcret"))).unwrap();
        assert_eq!(parse_basic(Some(&h)).unwrap(), ("my:id".into(), "s+cret".into()));
        assert!(parse_basic(Some(&HeaderValue::from_static("Bearer x"))).is_none());
        assert!(parse_basic(Some(&HeaderValue::from_static("Basic !!!"))).is_none());
    }

    #[test]
    fn keys_rotate_by_kid_publish_ahead_and_retire_after_the_last_token() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::FileStore::open(dir.path()).unwrap());
        let settings = Settings {
            issuer: "https://127.0.0.1:7443".into(),
            token_ttl: Duration::from_secs(60),
            key_rotation: Duration::from_secs(3600),
        };
        let svc = TokenService::open(dir.path(), settings.clone(), store.clone()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("oauth-keys.json")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let first = svc.kids();
        let t0 = svc.keys.read().unwrap()[0].active_from;
        assert!(!svc.rotate_if_due(t0 + 100).unwrap());
        // 15 minutes (the lead) before the hour, the next key is published, not yet signing.
        assert!(svc.rotate_if_due(t0 + 3600 - 300).unwrap());
        assert_eq!(svc.kids().len(), 2);
        let client = OAuthClientRecord {
            client_id: "c".into(),
            name: "n".into(),
            secret_sha256: String::new(),
            scopes: vec![],
            audiences: vec![],
            created_at: 0,
        };
        let kid_of = |t: &str| {
            let h: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
            h["kid"].as_str().unwrap().to_string()
        };
        assert_eq!(kid_of(&svc.issue(&client, &[], vec!["a".into()], t0 + 3600 - 10).unwrap()), first[0]);
        assert_ne!(kid_of(&svc.issue(&client, &[], vec!["a".into()], t0 + 3600).unwrap()), first[0]);
        // The old key stays published while a token it signed may live, then goes.
        assert!(!svc.rotate_if_due(t0 + 3600 + 60).unwrap());
        assert!(svc.rotate_if_due(t0 + 3600 + 121).unwrap());
        assert!(!svc.kids().contains(&first[0]));
        // And the keys survive a restart.
        let again = TokenService::open(dir.path(), settings, store).unwrap();
        assert_eq!(again.kids(), svc.kids());
    }
}
