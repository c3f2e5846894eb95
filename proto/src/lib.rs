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

/// Re-exported so users of timestamps need no direct dependency.
pub use prost_types;
