//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), validated per the SPIFFE ID
//! specification, and the workload shape Palisade issues:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not an acceptable SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("{value:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme {
        /// The rejected input.
        value: String,
    },
    /// The trust domain is empty or holds characters outside `[a-z0-9.-_]`.
    #[error("trust domain {value:?} is invalid: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain {
        /// The rejected trust domain.
        value: String,
    },
    /// The path has an empty, `.`/`..`, or badly-charactered segment, a query or fragment.
    #[error("SPIFFE ID {value:?} has an invalid path: segments must be non-empty [A-Za-z0-9.-_] and not '.' or '..'")]
    Path {
        /// The rejected input.
        value: String,
    },
    /// The ID is valid but not of the workload shape `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "SPIFFE ID {value:?} is not a workload identity: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkload {
        /// The rejected input.
        value: String,
    },
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses and validates a trust domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok { Ok(Self(name.to_string())) } else { Err(SpiffeIdError::TrustDomain { value: name.to_string() }) }
    }
    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` in this trust domain.
    pub fn workload(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, SpiffeIdError> {
        format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.0).parse()
    }
    /// The control plane's own identity, `spiffe://<td>/palisade/control-plane`.
    /// It is not of the workload shape, so `Identity.Certify` can never issue it.
    pub fn control_plane(&self) -> SpiffeId {
        SpiffeId { trust_domain: self.clone(), path: "/palisade/control-plane".into() }
    }
    /// The operator identity of the admin credential, `spiffe://<td>/palisade/admin`.
    pub fn admin(&self) -> SpiffeId {
        SpiffeId { trust_domain: self.clone(), path: "/palisade/admin".into() }
    }
}

/// Parses with [`TrustDomain::new`], so a flag can be a `TrustDomain`
/// directly (clap picks `FromStr`).
impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self("cluster.local".into())
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Starts with `/`, or empty for the trust domain's own ID.
    path: String,
}

impl SpiffeId {
    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    /// The path part (starts with `/`).
    pub fn path(&self) -> &str {
        &self.path
    }
    /// `(namespace, service_account)` if the ID has the workload shape.
    pub fn workload(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
    /// Parses an ID and requires the workload shape.
    pub fn parse_workload(s: &str) -> Result<Self, SpiffeIdError> {
        let id: Self = s.parse()?;
        if id.workload().is_none() {
            return Err(SpiffeIdError::NotWorkload { value: s.to_string() });
        }
        Ok(id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeIdError::Scheme { value: s.to_string() })?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td)?;
        if !path.is_empty() {
            let bad_segment = |seg: &str| {
                seg.is_empty()
                    || seg == "."
                    || seg == ".."
                    || !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            };
            if path[1..].split('/').any(bad_segment) {
                return Err(SpiffeIdError::Path { value: s.to_string() });
            }
        }
        if s.len() > 2048 {
            return Err(SpiffeIdError::Path { value: s.to_string() });
        }
        Ok(Self { trust_domain, path: path.to_string() })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse_workload("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.workload(), Some(("shop", "web")));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe://td/ns/a b/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
        for not_workload in
            ["spiffe://td", "spiffe://td/palisade/admin", "spiffe://td/ns/a/sa/b/c", "spiffe://td/sa/a/ns/b"]
        {
            assert!(
                matches!(SpiffeId::parse_workload(not_workload), Err(SpiffeIdError::NotWorkload { .. })),
                "{not_workload}"
            );
        }
    }

    #[test]
    fn trust_domains_parse_from_str() {
        assert_eq!("example.org".parse::<TrustDomain>().unwrap().as_str(), "example.org");
        let e = "Example.org".parse::<TrustDomain>().unwrap_err();
        assert_eq!(e, SpiffeIdError::TrustDomain { value: "Example.org".into() });
        assert!(e.to_string().contains("use lowercase letters"), "{e}");
        assert!("".parse::<TrustDomain>().is_err());
    }

    #[test]
    fn reserved_identities_are_not_workloads() {
        let td = TrustDomain::default();
        assert!(td.admin().workload().is_none());
        assert!(td.control_plane().workload().is_none());
    }
}
