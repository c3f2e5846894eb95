//! Palisade policy, the one policy engine: the `AuthorizationPolicy`,
//! `RateLimitPolicy` and `AuthenticationPolicy` resources (apiVersion `palisade.dev/v1`), typed, parsed
//! from JSON (and YAML with the `yaml` feature), validated with precise
//! errors, and compiled for one workload into an [`Enforcer`] that makes
//! every decision about a request (authentication, authorization, then rate
//! limits). The
//! sidecar runs the enforcer; the control plane and the CLI run the same
//! enforcer to validate and explain, so the two sides judge alike.
//!
//! It knows nothing of the wire: no gRPC, no HTTP types. A new policy kind
//! is added here, once.

#![warn(missing_docs)]

pub mod authn;
pub mod decide;
pub mod enforcer;
pub mod eval;
pub mod path;
pub mod preview;
pub mod ratelimit;
pub mod resilience;
pub mod resource;
pub mod route;
pub mod schema;
pub mod traffic;
#[cfg(feature = "yaml")]
pub mod yaml;

pub use authn::{ApiKey, Authenticated, Failure as AuthnFailure, Outcome as AuthnOutcome};
pub use decide::{Action, Authn, HeaderOp, Mode, Outcome, Refusal, Refused, RequestHead};
pub use enforcer::{Enforcer, Inputs, Limited};
pub use eval::{Decision, HeaderList, Headers, Request, RuleSet, Verdict};
pub use resource::{KINDS, LimitKey, PolicyError, Resource, canonical_kind};

/// The `apiVersion` of every Palisade resource.
pub const API_VERSION: &str = "palisade.dev/v1";

#[cfg(test)]
mod test_util {
    pub(crate) use crate::yaml::parse_text as parse_all;
}
