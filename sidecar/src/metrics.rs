//! Prometheus metrics served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The sidecar's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub cert_expiry: Gauge,
    pub cert_valid: Gauge,
    pub renewals: Counter,
    pub renewal_failures: Counter,
    pub control_plane_last_success: Gauge,
}

impl Metrics {
    /// Registers every metric under the `palisade_` prefix.
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "identity_cert_expiry_timestamp_seconds",
            "Unix time at which the current workload certificate expires",
            self.cert_expiry.clone(),
        );
        reg.register(
            "identity_cert_valid",
            "1 while the sidecar holds a currently valid certificate",
            self.cert_valid.clone(),
        );
        reg.register(
            "identity_renewals",
            "Certificates obtained from the control plane (first one included)",
            self.renewals.clone(),
        );
        reg.register(
            "identity_renewal_failures",
            "Failed attempts to obtain or renew a certificate",
            self.renewal_failures.clone(),
        );
        reg.register(
            "control_plane_last_success_timestamp_seconds",
            "Unix time of the last successful call to the control plane",
            self.control_plane_last_success.clone(),
        );
    }
}
