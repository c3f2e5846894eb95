//! Palisade policy: the `AuthorizationPolicy`, `RateLimitPolicy`,
//! `AuthenticationPolicy` and `TrafficPolicy` resources (apiVersion
//! `palisade.dev/v1`), their validation, compilation into indexed per-workload
//! rule sets, and the evaluator, shared by the control plane (validate,
//! simulate) and the sidecar (enforce).
//!
//! Not yet implemented: this crate holds only the API version constant until
//! the policy issue lands. It is not a general-purpose policy engine.

/// The `apiVersion` of every Palisade resource.
pub const API_VERSION: &str = "palisade.dev/v1";
