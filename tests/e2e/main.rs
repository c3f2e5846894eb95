//! End-to-end tests: the real binaries on loopback with real TLS.
//! Run with `cargo build --bins && cargo nextest run` (see tests/README.md).

mod api;
mod attack;
mod attack_control;
mod attack_directory;
mod attack_listeners;
mod attack_protocol;
mod attack_push;
mod authn;
mod certify;
mod cli;
mod dashboard;
mod dataplane;
mod differential;
mod failover;
mod identity;
mod inproc;
mod k8s;
mod kube;
mod negative;
mod netns;
mod observe;
mod operator_ca;
mod podman;
mod policy;
mod push;
mod replicas;
mod resilience;
mod rotation;
mod trace;
mod visible;
mod walkthrough;
