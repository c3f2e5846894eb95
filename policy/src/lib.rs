//! Palisade policy: the `AuthorizationPolicy` and `RateLimitPolicy`
//! resources (apiVersion `palisade.dev/v1`), parsed from YAML or JSON, their
//! validation with precise errors, their compilation into an indexed rule
//! set for one workload, the authorization evaluator, and the rate-limit
//! algorithms. Shared by the control plane (validate, simulate) and the
//! sidecar (enforce), so both sides judge a resource the same way.
//!
//! Not yet wired: neither the control plane nor the sidecar use this crate
//! today (the policy issue does that); it is not a general policy engine.

#![warn(missing_docs)]

pub mod eval;
pub mod ratelimit;
pub mod resource;

pub use eval::{Decision, Request, RuleSet, Verdict};
pub use resource::{PolicyError, Resource};

/// The `apiVersion` of every Palisade resource.
pub const API_VERSION: &str = "palisade.dev/v1";

#[cfg(test)]
mod test_util {
    use crate::{PolicyError, Resource};

    /// YAML or JSON, as the CLI and control plane accept it.
    pub(crate) fn parse_all(text: &str) -> Result<Vec<Resource>, PolicyError> {
        if text.trim_start().starts_with('{') {
            return Resource::parse_json(text);
        }
        let docs = serde_saphyr::from_multiple::<serde_json::Value>(text)
            .map_err(|e| PolicyError::Parse { what: "YAML".into(), message: e.to_string() })?;
        Resource::from_values(docs)
    }
}
