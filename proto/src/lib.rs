//! Palisade's gRPC API (protobuf package `palisade.v1`) as generated tonic/prost
//! code, plus [`channel`], the one way Palisade clients dial the control plane:
//! gRPC over a rustls connection whose verifier checks SPIFFE identities.
//!
//! This crate holds no logic of its own beyond the channel; the services are
//! implemented in `palisade-control-plane` and used by the sidecar and CLI.

#![allow(missing_docs, unreachable_pub, missing_debug_implementations)]

/// Generated messages and services of `palisade.v1`.
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}

/// Encoded `FileDescriptorSet` of the Palisade API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("palisade_descriptor");

pub mod channel;
mod redact;

/// Re-exported so users of timestamps need no direct dependency.
pub use prost_types;

/// Size budgets shared by the control plane, the sidecar and the CLI, so
/// what one side accepts the other can always carry.
pub mod limits {
    /// Largest policy document one `ApplyPolicy` / `ValidatePolicy` takes.
    pub const MAX_DOCUMENT_BYTES: usize = 4 << 20;
    /// Largest total of all stored policies (compact JSON): a sidecar's
    /// snapshot holds at most all of them, plus endpoints and the bundle.
    pub const MAX_POLICY_BYTES: usize = 4 << 20;
    /// Largest Admin API message either way (a document in YAML, a list).
    pub const MAX_ADMIN_MESSAGE_BYTES: usize = 8 << 20;
    /// Largest snapshot on the policy stream; sidecars decode up to this.
    pub const MAX_SNAPSHOT_BYTES: usize = 16 << 20;
}

/// A unix time (seconds) as a protobuf `Timestamp`, as every API message carries times.
pub fn unix_timestamp(unix: u64) -> Option<prost_types::Timestamp> {
    Some((std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix)).into())
}
