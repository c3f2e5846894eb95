//! Validation of a parsed resource, field by field: the first problem is
//! reported with the path of its field and what would be right.

use std::time::Duration;

use super::spec::reserved_header;
use super::{AuthenticationSpec, JWT_ALGORITHMS, LimitKey, MAX_CLOCK_SKEW, Operation, PolicyError, Resource};
use crate::ratelimit::Algorithm;

impl Resource {
    /// Checks every field; the first problem is returned with its path.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let name = format!("{} {}", self.kind(), self.key());
        let invalid = |field: String, value: &str, why: &str| PolicyError::Invalid {
            resource: name.clone(),
            field,
            value: value.into(),
            why: why.into(),
        };
        let m = self.metadata();
        for (field, v) in [("metadata.name", &m.name), ("metadata.namespace", &m.namespace)] {
            let ok = !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-');
            if !ok {
                return Err(invalid(
                    field.into(),
                    v,
                    "must be a DNS label: lowercase letters, digits and '-', at most 63",
                ));
            }
        }
        let target = self.target();
        if target.identities.is_empty() {
            return Err(invalid(
                "spec.target.identities".into(),
                "",
                "must name at least one workload identity (globs allowed)",
            ));
        }
        for (i, id) in target.identities.iter().enumerate() {
            check_identity_glob(id).map_err(|why| invalid(format!("spec.target.identities[{i}]"), id, why))?;
        }
        match self {
            Self::AuthorizationPolicy { spec, .. } => {
                for (r, rule) in spec.rules.iter().enumerate() {
                    for (f, src) in rule.from.iter().enumerate() {
                        let base = format!("spec.rules[{r}].from[{f}]");
                        let empty = src.identities.is_empty()
                            && src.not_identities.is_empty()
                            && src.namespaces.is_empty()
                            && src.not_namespaces.is_empty()
                            && src.unauthenticated.is_none()
                            && !src.names_request_principal();
                        if empty {
                            return Err(invalid(
                                base,
                                "{}",
                                "is empty; name identities, namespaces, requestPrincipals, apiKeys or unauthenticated, or drop it to match any caller",
                            ));
                        }
                        for (list, field) in [
                            (&src.request_principals, "requestPrincipals"),
                            (&src.not_request_principals, "notRequestPrincipals"),
                            (&src.api_keys, "apiKeys"),
                            (&src.not_api_keys, "notApiKeys"),
                        ] {
                            for (i, p) in list.iter().enumerate() {
                                if p.is_empty() || p.len() > 512 || p.chars().any(char::is_control) {
                                    return Err(invalid(
                                        format!("{base}.{field}[{i}]"),
                                        p,
                                        "must be a non-empty pattern (requestPrincipals: <issuer>/<subject>, globs allowed)",
                                    ));
                                }
                            }
                        }
                        for (list, field) in [(&src.identities, "identities"), (&src.not_identities, "notIdentities")] {
                            for (i, id) in list.iter().enumerate() {
                                check_identity_glob(id)
                                    .map_err(|why| invalid(format!("{base}.{field}[{i}]"), id, why))?;
                            }
                        }
                        if src.unauthenticated == Some(true)
                            && !(src.identities.is_empty() && src.namespaces.is_empty())
                        {
                            return Err(invalid(
                                base,
                                "unauthenticated: true",
                                "cannot be combined with identities or namespaces: unauthenticated callers have none",
                            ));
                        }
                    }
                    for (t, op) in rule.to.iter().enumerate() {
                        check_operation(op, &format!("spec.rules[{r}].to[{t}]"))
                            .map_err(|(f, v, why)| invalid(f, &v, why))?;
                    }
                    for (w, c) in rule.when.iter().enumerate() {
                        let base = format!("spec.rules[{r}].when[{w}]");
                        match (&c.header, &c.claim) {
                            (Some(h), None) if !header_name_ok(h) => {
                                return Err(invalid(format!("{base}.header"), h, "must be an HTTP header name"));
                            }
                            (None, Some(claim)) if claim.is_empty() || claim.len() > 256 => {
                                return Err(invalid(format!("{base}.claim"), claim, "must name a claim"));
                            }
                            (Some(_), None) | (None, Some(_)) => {}
                            _ => {
                                return Err(invalid(
                                    base,
                                    "",
                                    "must name exactly one of header (a request header) or claim (of the verified token)",
                                ));
                            }
                        }
                        if c.values.is_empty() {
                            return Err(invalid(format!("{base}.values"), "", "must list at least one value"));
                        }
                    }
                }
            }
            Self::RateLimitPolicy { spec, .. } => {
                if spec.limits.is_empty() {
                    return Err(invalid("spec.limits".into(), "", "must hold at least one limit"));
                }
                let mut names = std::collections::HashSet::new();
                for (i, l) in spec.limits.iter().enumerate() {
                    let base = format!("spec.limits[{i}]");
                    if l.name.is_empty() || !names.insert(l.name.as_str()) {
                        return Err(invalid(
                            format!("{base}.name"),
                            &l.name,
                            "must be non-empty and unique in the policy",
                        ));
                    }
                    if l.rate == 0 {
                        return Err(invalid(format!("{base}.rate"), "0", "must be at least 1"));
                    }
                    let period =
                        parse_period(&l.period).map_err(|why| invalid(format!("{base}.period"), &l.period, why))?;
                    let _ = period;
                    let windowed = matches!(l.algorithm, Algorithm::FixedWindow | Algorithm::SlidingWindow);
                    if windowed && l.burst > 0 {
                        return Err(invalid(
                            format!("{base}.burst"),
                            &l.burst.to_string(),
                            "applies to token_bucket and leaky_bucket only; windows admit `rate` per period",
                        ));
                    }
                    if let LimitKey::Unrecognised(k) = &l.key {
                        return Err(invalid(
                            format!("{base}.key"),
                            k,
                            "must be identity, header:<name>, source_ip, principal, api_key or none",
                        ));
                    }
                    let op = Operation {
                        methods: l.match_.methods.clone(),
                        paths: l.match_.paths.clone(),
                        ..Default::default()
                    };
                    check_operation(&op, &format!("{base}.match")).map_err(|(f, v, why)| invalid(f, &v, why))?;
                }
            }
            Self::AuthenticationPolicy { spec, .. } => {
                validate_authn(spec).map_err(|(f, v, why)| invalid(f, &v, &why))?;
            }
            Self::TrafficPolicy { spec, .. } => {
                crate::traffic::validate(spec).map_err(|(f, v, why)| invalid(f, &v, &why))?;
            }
        }
        Ok(())
    }
}

fn validate_authn(spec: &AuthenticationSpec) -> Result<(), (String, String, String)> {
    let err = |f: String, v: &str, why: &str| Err((f, v.to_string(), why.to_string()));
    if spec.jwt.is_empty() && spec.api_keys.is_none() {
        return err(
            "spec".into(),
            "",
            "names no credential; give jwt (issuers) and/or apiKeys, or delete the policy to stop authenticating",
        );
    }
    if let Some(k) = &spec.api_keys
        && (!header_name_ok(&k.header) || reserved_header(&k.header))
    {
        return err(
            "spec.apiKeys.header".into(),
            &k.header,
            "must be an HTTP header name Palisade does not reserve (e.g. x-api-key)",
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, j) in spec.jwt.iter().enumerate() {
        let base = format!("spec.jwt[{i}]");
        if j.issuer.is_empty() || j.issuer.len() > 512 || j.issuer.chars().any(char::is_control) {
            return err(format!("{base}.issuer"), &j.issuer, "must be the exact `iss` of the issuer's tokens");
        }
        if !seen.insert(j.issuer.as_str()) {
            return err(format!("{base}.issuer"), &j.issuer, "appears twice; list each issuer once");
        }
        if j.audiences.is_empty() {
            return err(
                format!("{base}.audiences"),
                "",
                "must list at least one audience: a token for another API must not be accepted here",
            );
        }
        for (a, aud) in j.audiences.iter().enumerate() {
            if aud.is_empty() {
                return err(format!("{base}.audiences[{a}]"), aud, "must not be empty");
            }
        }
        match (&j.jwks, &j.jwks_uri) {
            (Some(_), Some(_)) => {
                return err(format!("{base}.jwks"), "", "and jwksUri are both given; keep one");
            }
            (Some(jwks), None) => {
                if let Err(why) = crate::authn::Jwks::parse(&jwks.to_string()) {
                    return err(format!("{base}.jwks"), "", &why);
                }
            }
            (None, Some(uri)) => {
                let ok = uri.strip_prefix("https://").is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
                    && uri.len() <= 2048
                    && !uri.chars().any(|c| c.is_whitespace() || c.is_control());
                if !ok {
                    return err(format!("{base}.jwksUri"), uri, "must be an https:// URL");
                }
            }
            (None, None) => {}
        }
        for (a, alg) in j.algorithms.iter().enumerate() {
            if !JWT_ALGORITHMS.contains(&alg.as_str()) {
                return err(
                    format!("{base}.algorithms[{a}]"),
                    alg,
                    "is not accepted; use RS256, PS256, ES256, ES384 or EdDSA (never none or an HMAC algorithm)",
                );
            }
        }
        for (h, th) in j.from_headers.iter().enumerate() {
            if !header_name_ok(&th.name) || th.name.to_ascii_lowercase().starts_with("x-palisade-") {
                return err(format!("{base}.fromHeaders[{h}].name"), &th.name, "must be an HTTP header name");
            }
        }
        for (c, ch) in j.claims_to_headers.iter().enumerate() {
            if ch.claim.is_empty() || ch.claim.len() > 256 {
                return err(format!("{base}.claimsToHeaders[{c}].claim"), &ch.claim, "must name a claim");
            }
            if !header_name_ok(&ch.header) || reserved_header(&ch.header) {
                return err(
                    format!("{base}.claimsToHeaders[{c}].header"),
                    &ch.header,
                    "must be an HTTP header name Palisade does not reserve (x-palisade-*, host, authorization...)",
                );
            }
        }
        if let Err(why) = parse_clock_skew(j.clock_skew.as_deref()) {
            return err(format!("{base}.clockSkew"), j.clock_skew.as_deref().unwrap_or_default(), why);
        }
        if let Some(t) = &j.typ
            && (t.is_empty() || t.len() > 64)
        {
            return err(format!("{base}.typ"), t, "must be a media type such as at+jwt");
        }
    }
    Ok(())
}

/// Parses a limit period: `1s`..`24h`.
pub fn parse_period(s: &str) -> Result<Duration, &'static str> {
    let d = humantime::parse_duration(s).map_err(|_| "is not a duration; use e.g. 1s, 1m or 1h")?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(86400) {
        return Err("must be between 1ms and 24h");
    }
    Ok(d)
}

/// Parses an issuer's `clockSkew` (default 60s).
pub fn parse_clock_skew(s: Option<&str>) -> Result<Duration, &'static str> {
    let Some(s) = s else { return Ok(Duration::from_secs(60)) };
    let d = humantime::parse_duration(s).map_err(|_| "is not a duration; use e.g. 30s or 2m")?;
    if d > MAX_CLOCK_SKEW {
        return Err("must be at most 5m");
    }
    Ok(d)
}

fn header_name_ok(h: &str) -> bool {
    !h.is_empty() && h.len() <= 128 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

fn check_operation(op: &Operation, base: &str) -> Result<(), (String, String, &'static str)> {
    for (i, m) in op.methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) && m != "*" {
            return Err((
                format!("{base}.methods[{i}]"),
                m.clone(),
                "is not an HTTP method (upper case: GET, POST, ...)",
            ));
        }
    }
    for (i, p) in op.paths.iter().enumerate() {
        if !p.starts_with('/') && p != "*" {
            return Err((
                format!("{base}.paths[{i}]"),
                p.clone(),
                "must start with '/' (exact path or glob such as /api/*)",
            ));
        }
    }
    for (i, port) in op.ports.iter().enumerate() {
        if *port == 0 {
            return Err((format!("{base}.ports[{i}]"), "0".into(), "must be 1-65535"));
        }
    }
    Ok(())
}

fn check_identity_glob(id: &str) -> Result<(), &'static str> {
    if id == "*" {
        return Ok(());
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err("must be a SPIFFE ID or glob: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>");
    };
    if rest.is_empty() || rest.contains("//") || rest.chars().any(|c| c.is_whitespace()) {
        return Err("is not a valid SPIFFE ID pattern");
    }
    Ok(())
}
