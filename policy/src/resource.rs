//! The resources, as operators write them (the field names are the API):
//! the [`Resource`] envelope and its parsing here, the spec types of each
//! kind in `spec`, and the field-by-field validation in `validate`.

use serde::{Deserialize, Serialize};

pub(crate) mod spec;
#[cfg(test)]
mod tests;
mod validate;

pub use spec::{
    Action, ApiKeys, AuthenticationSpec, AuthnMode, AuthorizationSpec, ClaimToHeader, Condition, JWT_ALGORITHMS,
    JwtIssuer, Limit, LimitKey, LimitMatch, MAX_CLOCK_SKEW, Operation, RateLimitSpec, Rule, Scope, Source, TokenHeader,
};
pub use spec::{Target, reserved_header};
pub use validate::{parse_clock_skew, parse_period};

/// Why a document is not a valid Palisade resource. Every variant names the
/// resource and the field, says what is wrong, and what would be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The text is not YAML/JSON of the expected shape (unknown field, wrong type...).
    #[error("{what}: {message}")]
    Parse {
        /// Which document or resource.
        what: String,
        /// What the parser said (names the field).
        message: String,
    },
    /// A field holds a value that is not allowed.
    #[error("{resource}: {field}: {value:?} {why}")]
    Invalid {
        /// `Kind namespace/name`.
        resource: String,
        /// Path of the field, e.g. `spec.rules[0].to[1].methods[0]`.
        field: String,
        /// The offending value.
        value: String,
        /// Why, and what is expected.
        why: String,
    },
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// DNS-label-like name.
    pub name: String,
    /// The namespace the policy belongs to.
    pub namespace: String,
}

/// A parsed, validated resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Resource {
    /// An authorization policy.
    AuthorizationPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: AuthorizationSpec,
    },
    /// A rate-limit policy.
    RateLimitPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: RateLimitSpec,
    },
    /// A request-authentication policy.
    AuthenticationPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: AuthenticationSpec,
    },
    /// A traffic policy (header rewriting, security headers).
    TrafficPolicy {
        /// Always [`crate::API_VERSION`].
        #[serde(rename = "apiVersion")]
        api_version: String,
        /// Name and namespace.
        metadata: Metadata,
        /// The policy.
        spec: Box<crate::traffic::TrafficSpec>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
}

/// The policy kinds, as `kind:` spells them.
pub const KINDS: [&str; 4] = ["AuthorizationPolicy", "RateLimitPolicy", "AuthenticationPolicy", "TrafficPolicy"];

/// The kind a user meant, the way kubectl reads kinds: any case, singular or
/// plural (`authorizationpolicies`), or the short name (`ap`, `rlp`).
pub fn canonical_kind(s: &str) -> Option<&'static str> {
    let k = s.to_ascii_lowercase();
    match k.as_str() {
        "authorizationpolicy" | "authorizationpolicies" | "ap" => Some(KINDS[0]),
        "ratelimitpolicy" | "ratelimitpolicies" | "rlp" => Some(KINDS[1]),
        "authenticationpolicy" | "authenticationpolicies" | "authn" => Some(KINDS[2]),
        "trafficpolicy" | "trafficpolicies" | "tp" => Some(KINDS[3]),
        _ => None,
    }
}

impl Resource {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        let m = self.metadata();
        format!("{}/{}", m.namespace, m.name)
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Self::AuthorizationPolicy { metadata, .. }
            | Self::RateLimitPolicy { metadata, .. }
            | Self::AuthenticationPolicy { metadata, .. }
            | Self::TrafficPolicy { metadata, .. } => metadata,
        }
    }

    /// The workloads it applies to.
    pub fn target(&self) -> &Target {
        match self {
            Self::AuthorizationPolicy { spec, .. } => &spec.target,
            Self::RateLimitPolicy { spec, .. } => &spec.target,
            Self::AuthenticationPolicy { spec, .. } => &spec.target,
            Self::TrafficPolicy { spec, .. } => &spec.target,
        }
    }

    /// Whether this policy applies to the workload `identity`.
    pub fn targets(&self, identity: &str) -> bool {
        self.target().identities.iter().any(|g| wildmatch::WildMatch::new(g).matches(identity))
    }

    /// Every SPIFFE ID pattern the policy names, with its field path:
    /// the targets, and for authorization policies the callers of each rule.
    pub fn identity_patterns(&self) -> Vec<(String, &str)> {
        let (target, rules) = match self {
            Self::AuthorizationPolicy { spec, .. } => (&spec.target, spec.rules.as_slice()),
            _ => (self.target(), &[][..]),
        };
        let mut out: Vec<(String, &str)> = target
            .identities
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("spec.target.identities[{i}]"), g.as_str()))
            .collect();
        for (r, rule) in rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                for (name, list) in [("identities", &from.identities), ("notIdentities", &from.not_identities)] {
                    for (i, g) in list.iter().enumerate() {
                        out.push((format!("spec.rules[{r}].from[{f}].{name}[{i}]"), g.as_str()));
                    }
                }
            }
        }
        out
    }

    /// Canonical JSON (what the control plane stores and sends).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AuthorizationPolicy { .. } => "AuthorizationPolicy",
            Self::RateLimitPolicy { .. } => "RateLimitPolicy",
            Self::AuthenticationPolicy { .. } => "AuthenticationPolicy",
            Self::TrafficPolicy { .. } => "TrafficPolicy",
        }
    }

    /// Parses a JSON text (one resource, or an array of them) and validates each.
    /// YAML is turned into JSON values by the caller (see [`Resource::from_values`]),
    /// which keeps a YAML parser out of the sidecar.
    pub fn parse_json(text: &str) -> Result<Vec<Self>, PolicyError> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Array(a)) => Self::from_values(a),
            Ok(v) => Self::from_values(vec![v]),
            Err(e) => Err(PolicyError::Parse { what: "JSON".into(), message: e.to_string() }),
        }
    }

    /// Validates already-parsed documents (empty ones are skipped).
    pub fn from_values(docs: Vec<serde_json::Value>) -> Result<Vec<Self>, PolicyError> {
        docs.into_iter().filter(|d| !d.is_null()).enumerate().map(|(i, d)| Self::from_value(d, i)).collect()
    }

    fn from_value(doc: serde_json::Value, index: usize) -> Result<Self, PolicyError> {
        let what = format!("document {}", index + 1);
        let env: Envelope = serde_json::from_value(doc)
            .map_err(|e| PolicyError::Parse { what: what.clone(), message: e.to_string() })?;
        let missing =
            |field: &str| PolicyError::Parse { what: what.clone(), message: format!("missing field `{field}`") };
        let kind = env.kind.ok_or_else(|| missing("kind"))?;
        let metadata: Metadata = field(env.metadata.ok_or_else(|| missing("metadata"))?, &what, "metadata")?;
        let api_version = env.api_version.ok_or_else(|| missing("apiVersion"))?;
        let name = format!("{kind} {}/{}", metadata.namespace, metadata.name);
        let invalid = |field: &str, value: &str, why: &str| PolicyError::Invalid {
            resource: name.clone(),
            field: field.into(),
            value: value.into(),
            why: why.into(),
        };
        if api_version != crate::API_VERSION {
            return Err(invalid("apiVersion", &api_version, &format!("is not supported; use {}", crate::API_VERSION)));
        }
        let spec = env.spec.ok_or_else(|| invalid("spec", "", "is missing"))?;
        let resource = match kind.as_str() {
            "AuthorizationPolicy" => {
                Self::AuthorizationPolicy { api_version, metadata, spec: field(spec, &name, "spec")? }
            }
            "RateLimitPolicy" => Self::RateLimitPolicy { api_version, metadata, spec: field(spec, &name, "spec")? },
            "AuthenticationPolicy" => {
                Self::AuthenticationPolicy { api_version, metadata, spec: field(spec, &name, "spec")? }
            }
            "TrafficPolicy" => Self::TrafficPolicy { api_version, metadata, spec: field(spec, &name, "spec")? },
            other => {
                return Err(invalid(
                    "kind",
                    other,
                    "is not a Palisade policy kind; use AuthorizationPolicy, RateLimitPolicy, AuthenticationPolicy or TrafficPolicy",
                ));
            }
        };
        resource.validate()?;
        Ok(resource)
    }
}

/// Deserializes the part of a document at `at` (`spec`, `metadata`); an
/// error names the exact field it is about, `spec.rules[0].form: unknown
/// field, expected one of `from`, `to`, `when``, not just `spec`.
fn field<T: serde::de::DeserializeOwned>(value: serde_json::Value, what: &str, at: &str) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let mut field = if path == "." { at.to_string() } else { format!("{at}.{path}") };
        // `unknown field `form`, expected ...`: the path stops at the struct;
        // name the field itself and say the rest once.
        let message = match message.strip_prefix("unknown field `").and_then(|m| m.split_once('`')) {
            Some((unknown, rest)) => {
                if !field.ends_with(&format!(".{unknown}")) {
                    field = format!("{field}.{unknown}");
                }
                format!("unknown field{rest}")
            }
            None => message,
        };
        PolicyError::Parse { what: what.to_string(), message: format!("{field}: {message}") }
    })
}
