//! Who may use the dashboard: whoever holds its token, which is the first
//! segment of every path (`/<token>/…`: the page loads its script, styles
//! and API relative to it), on the dashboard's own host name, from its own
//! origin. No cookie: a browser sends a 127.0.0.1 cookie to every port of
//! the host, so any other local server would receive it. Every answer
//! carries the security headers.

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
pub(crate) enum Verdict<'a> {
    /// Serve it: the path after the token (`/`, `/api/overview`, …).
    Pass(&'a str),
    /// `/<token>` without its slash: to `/<token>/`, where relative URLs work.
    Slash,
    /// Refuse it with this status and short message (the log says why).
    Refuse(StatusCode, &'static str, &'static str),
}

/// The dashboard's secret and names.
pub(crate) struct Guard {
    token: String,
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
        Self { token, hosts, origins }
    }

    /// The URL to open.
    pub(crate) fn url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}/{}/", self.hosts[0], self.token)
    }

    /// The path to send `/<token>` to.
    pub(crate) fn slash(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("/{}/", self.token)).expect("invariant: the token is URL-safe base64")
    }

    pub(crate) fn check<'r, B>(&self, req: &'r Request<B>) -> Verdict<'r> {
        let h = req.headers();
        let mut hosts = h.get_all(header::HOST).iter();
        let host = hosts.next().and_then(|v| v.to_str().ok()).unwrap_or_default();
        if hosts.next().is_some() || req.uri().authority().is_some() {
            return Verdict::Refuse(StatusCode::BAD_REQUEST, "bad request", "two Host headers, or an absolute URI");
        }
        if !self.hosts.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return Verdict::Refuse(StatusCode::MISDIRECTED_REQUEST, "unknown host", "foreign Host header");
        }
        if h.get_all(header::ORIGIN).iter().count() > 1 || h.get_all("sec-fetch-site").iter().count() > 1 {
            return Verdict::Refuse(StatusCode::BAD_REQUEST, "bad request", "two Origin or Sec-Fetch-Site headers");
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
        let path = req.uri().path();
        let (first, rest) = match path.strip_prefix('/').map(|p| p.split_once('/')) {
            Some(Some((first, _))) => (first, &path[first.len() + 1..]),
            _ => (path.trim_start_matches('/'), ""),
        };
        if !same(first, &self.token) {
            return Verdict::Refuse(
                StatusCode::UNAUTHORIZED,
                "open the URL `palisadectl dashboard` printed",
                "no token or a wrong one",
            );
        }
        if rest.is_empty() {
            return Verdict::Slash;
        }
        match *req.method() {
            Method::GET | Method::HEAD => Verdict::Pass(rest),
            Method::POST if rest == "/api/preview" => {
                let json = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                    v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
                });
                if json && h.get(CSRF_HEADER).is_some_and(|v| v == "1") && h.contains_key(header::ORIGIN) {
                    Verdict::Pass(rest)
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
        assert_eq!(g.url(false), "http://127.0.0.1:9999/tok/");
        let host = ("host", "127.0.0.1:9999");
        assert_eq!(g.check(&req("GET", "/tok/", &[host])), Verdict::Pass("/"));
        assert_eq!(g.check(&req("GET", "/tok/api/overview?x=1", &[host])), Verdict::Pass("/api/overview"));
        assert_eq!(g.check(&req("GET", "/tok", &[host])), Verdict::Slash);
        assert_eq!(
            g.check(&req("GET", "/tok/js/main.js", &[("host", "localhost:9999")])),
            Verdict::Pass("/js/main.js")
        );
        for wrong in ["/", "/api/overview", "/tox/", "/to/", "/tokk/", "//tok/", "/TOK/", "/?token=tok", "/x/tok/"] {
            assert!(
                matches!(g.check(&req("GET", wrong, &[host])), Verdict::Refuse(StatusCode::UNAUTHORIZED, ..)),
                "{wrong}"
            );
        }
        for bad_host in ["evil.example:9999", "127.0.0.1:80", "", "127.0.0.1:9999.evil"] {
            assert!(matches!(
                g.check(&req("GET", "/tok/", &[("host", bad_host)])),
                Verdict::Refuse(StatusCode::MISDIRECTED_REQUEST, ..)
            ));
        }
        let ours = ("origin", "http://127.0.0.1:9999");
        let evil_too = req("GET", "/tok/", &[host, ours, ("origin", "http://evil.example")]);
        assert!(matches!(g.check(&evil_too), Verdict::Refuse(StatusCode::BAD_REQUEST, ..)), "two Origin headers");
        let sites = req("GET", "/tok/", &[host, ("sec-fetch-site", "same-origin"), ("sec-fetch-site", "cross-site")]);
        assert!(matches!(g.check(&sites), Verdict::Refuse(StatusCode::BAD_REQUEST, ..)), "two Sec-Fetch-Site headers");
        let two = req("GET", "/tok/", &[host, ("host", "evil.example")]);
        assert!(matches!(g.check(&two), Verdict::Refuse(StatusCode::BAD_REQUEST, ..)), "two Host headers");
        let absolute = req("GET", "http://evil.example/tok/", &[host]);
        assert!(matches!(g.check(&absolute), Verdict::Refuse(StatusCode::BAD_REQUEST, ..)), "an absolute URI");
        let evil = ("origin", "http://evil.example");
        assert!(matches!(g.check(&req("GET", "/tok/api/overview", &[host, evil])), Verdict::Refuse(..)));
        let cross = ("sec-fetch-site", "cross-site");
        assert!(matches!(g.check(&req("GET", "/tok/api/overview", &[host, cross])), Verdict::Refuse(..)));
        let ours = ("origin", "http://127.0.0.1:9999");
        let json = ("content-type", "application/json");
        let csrf = (CSRF_HEADER, "1");
        assert_eq!(g.check(&req("POST", "/tok/api/preview", &[host, ours, json, csrf])), Verdict::Pass("/api/preview"));
        for missing in [[host, ours, json], [host, ours, csrf], [host, json, csrf]] {
            assert!(matches!(
                g.check(&req("POST", "/tok/api/preview", &missing)),
                Verdict::Refuse(StatusCode::FORBIDDEN, ..)
            ));
        }
        let form = ("content-type", "text/plain");
        assert!(matches!(g.check(&req("POST", "/tok/api/preview", &[host, ours, form, csrf])), Verdict::Refuse(..)));
        assert!(matches!(g.check(&req("DELETE", "/tok/api/overview", &[host])), Verdict::Refuse(..)));
        assert!(matches!(g.check(&req("POST", "/tok/api/overview", &[host, ours, json, csrf])), Verdict::Refuse(..)));
        assert!(!format!("{g:?}").contains("tok"), "the token stays out of Debug");
    }
}
