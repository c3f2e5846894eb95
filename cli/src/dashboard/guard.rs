//! Who may use the dashboard: the browser that opened the URL with its token
//! (then a cookie), on the dashboard's own host name, from its own origin.
//! Every answer carries the security headers.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};

/// The Content-Security-Policy of every answer: only the dashboard's own
/// script, styles and API; no inline script; never framed.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The header a state-changing request must carry (a cross-site form cannot set it).
pub(crate) const CSRF_HEADER: &str = "x-palisade-dashboard";

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it.
    Pass,
    /// The token in the URL is right: set the cookie and go to `/`.
    Login,
    /// Refuse it with this status and short message (the log says why).
    Refuse(StatusCode, &'static str, &'static str),
}

/// The dashboard's secret and names.
pub(crate) struct Guard {
    token: String,
    cookie_name: String,
    hosts: Vec<String>,
    origins: Vec<String>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("hosts", &self.hosts).finish_non_exhaustive()
    }
}

/// A random token: 32 bytes from the system's generator, URL-safe base64.
pub(crate) fn new_token() -> anyhow::Result<String> {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| anyhow::anyhow!("no random numbers from the system"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

impl Guard {
    /// `addr`: where the dashboard listens; `tls`: whether it serves HTTPS.
    pub(crate) fn new(token: String, addr: SocketAddr, tls: bool) -> Self {
        let port = addr.port();
        let mut hosts = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            hosts.extend([format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("[::1]:{port}")]);
        }
        hosts.dedup();
        let scheme = if tls { "https" } else { "http" };
        let origins = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
        Self { token, cookie_name: format!("palisade-dashboard-{port}"), hosts, origins }
    }

    /// The URL to open.
    pub(crate) fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}/?token={}", self.hosts[0], self.token)
    }

    /// The cookie that stands for the token from then on: the browser keeps
    /// it from script (HttpOnly) and sends it to this site only (Strict).
    pub(crate) fn set_cookie(&self, tls: bool) -> HeaderValue {
        let secure = if tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict{secure}",
            self.cookie_name, self.token
        ))
        .expect("invariant: the token is URL-safe base64")
    }

    pub(crate) fn check<B>(&self, req: &Request<B>) -> Verdict {
        let h = req.headers();
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !self.hosts.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return Verdict::Refuse(StatusCode::MISDIRECTED_REQUEST, "unknown host", "foreign Host header");
        }
        if let Some(o) = h.get(header::ORIGIN)
            && !self.origins.iter().any(|a| o.as_bytes().eq_ignore_ascii_case(a.as_bytes()))
        {
            return Verdict::Refuse(StatusCode::FORBIDDEN, "cross-origin request refused", "foreign Origin");
        }
        if let Some(site) = h.get("sec-fetch-site")
            && !matches!(site.as_bytes(), b"same-origin" | b"none")
        {
            return Verdict::Refuse(
                StatusCode::FORBIDDEN,
                "cross-origin request refused",
                "Sec-Fetch-Site not same-origin",
            );
        }
        if req.uri().path() == "/"
            && let Some(t) = query_token(req.uri().query())
        {
            return if same(t, &self.token) {
                Verdict::Login
            } else {
                Verdict::Refuse(StatusCode::UNAUTHORIZED, "wrong token", "wrong token in the URL")
            };
        }
        if !cookie(h, &self.cookie_name).is_some_and(|c| same(c, &self.token)) {
            return Verdict::Refuse(
                StatusCode::UNAUTHORIZED,
                "open the URL `palisadectl dashboard` printed",
                "no token or a wrong one",
            );
        }
        match *req.method() {
            Method::GET | Method::HEAD => Verdict::Pass,
            Method::POST if req.uri().path() == "/api/preview" => {
                let json = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                    v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
                });
                if json && h.get(CSRF_HEADER).is_some_and(|v| v == "1") && h.contains_key(header::ORIGIN) {
                    Verdict::Pass
                } else {
                    Verdict::Refuse(
                        StatusCode::FORBIDDEN,
                        "refused",
                        "a POST without the dashboard's header, JSON or Origin",
                    )
                }
            }
            _ => Verdict::Refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "method not allowed"),
        }
    }
}

/// The `token` query parameter.
fn query_token(q: Option<&str>) -> Option<&str> {
    q?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Compares in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The headers every answer carries.
pub(crate) fn secure(h: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    set(h, "permissions-policy", "camera=(), microphone=(), geolocation=()");
    set(h, "cache-control", "no-store");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_the_token_holder_on_the_right_host_and_origin_passes() {
        let g = Guard::new("tok".into(), "127.0.0.1:9999".parse().unwrap(), false);
        let host = ("host", "127.0.0.1:9999");
        let cookie = ("cookie", "a=b; palisade-dashboard-9999=tok");
        assert_eq!(g.check(&req("GET", "/?token=tok", &[host])), Verdict::Login);
        assert!(matches!(g.check(&req("GET", "/?token=tox", &[host])), Verdict::Refuse(StatusCode::UNAUTHORIZED, ..)));
        assert!(matches!(
            g.check(&req("GET", "/api/overview", &[host])),
            Verdict::Refuse(StatusCode::UNAUTHORIZED, ..)
        ));
        assert_eq!(g.check(&req("GET", "/api/overview", &[host, cookie])), Verdict::Pass);
        assert_eq!(g.check(&req("GET", "/", &[("host", "localhost:9999"), cookie])), Verdict::Pass);
        for bad_host in ["evil.example:9999", "127.0.0.1:80", "", "127.0.0.1:9999.evil"] {
            assert!(matches!(
                g.check(&req("GET", "/?token=tok", &[("host", bad_host), cookie])),
                Verdict::Refuse(StatusCode::MISDIRECTED_REQUEST, ..)
            ));
        }
        let evil = ("origin", "http://evil.example");
        assert!(matches!(g.check(&req("GET", "/api/overview", &[host, cookie, evil])), Verdict::Refuse(..)));
        let cross = ("sec-fetch-site", "cross-site");
        assert!(matches!(g.check(&req("GET", "/api/overview", &[host, cookie, cross])), Verdict::Refuse(..)));
        let ours = ("origin", "http://127.0.0.1:9999");
        let json = ("content-type", "application/json");
        let csrf = (CSRF_HEADER, "1");
        assert_eq!(g.check(&req("POST", "/api/preview", &[host, cookie, ours, json, csrf])), Verdict::Pass);
        for missing in [[host, cookie, ours, json], [host, cookie, ours, csrf], [host, cookie, json, csrf]] {
            assert!(matches!(
                g.check(&req("POST", "/api/preview", &missing)),
                Verdict::Refuse(StatusCode::FORBIDDEN, ..)
            ));
        }
        let form = ("content-type", "text/plain");
        assert!(matches!(
            g.check(&req("POST", "/api/preview", &[host, cookie, ours, form, csrf])),
            Verdict::Refuse(..)
        ));
        assert!(matches!(g.check(&req("DELETE", "/api/overview", &[host, cookie])), Verdict::Refuse(..)));
        assert!(matches!(
            g.check(&req("POST", "/api/overview", &[host, cookie, ours, json, csrf])),
            Verdict::Refuse(..)
        ));
        assert!(!format!("{g:?}").contains("tok"), "the token stays out of Debug");
    }
}
