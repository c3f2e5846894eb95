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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Value, json};

use crate::https::reply;
use crate::store::Store;
use palisade_cmd::{hex, unix_now};

mod keys;
mod throttle;

use keys::SigningKey;
pub use keys::{KEYS_FILE, KEYS_RECORD, KeyError};

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
    #[error("OAuth signing keys {at}: {source}")]
    Keys { at: String, source: KeyError },
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

/// How the token service is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `iss` of its tokens.
    pub issuer: String,
    pub token_ttl: Duration,
    /// A new signing key every this long.
    pub key_rotation: Duration,
}

/// The token service.
pub struct TokenService {
    settings: Settings,
    /// Where the signing keys are kept, under which name (shared by the
    /// replicas on etcd, where the leader rotates them).
    home: Arc<dyn crate::store::sealed::SecretHome>,
    name: &'static str,
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

impl TokenService {
    /// The issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
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
}
