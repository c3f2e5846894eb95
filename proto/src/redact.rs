//! `Debug` for the messages that carry a secret (join tokens, API keys,
//! OAuth client secrets): every other field shows, the secret never does.

use std::fmt;

use crate::v1::{
    CertifyRequest, CreateApiKeyResponse, CreateJoinTokenResponse, CreateOAuthClientResponse, RotateCaRequest,
};

const REDACTED: &str = "<redacted>";

impl fmt::Debug for CreateJoinTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateJoinTokenResponse").field("token", &REDACTED).field("info", &self.info).finish()
    }
}

impl fmt::Debug for CreateApiKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateApiKeyResponse").field("key", &REDACTED).field("info", &self.info).finish()
    }
}

impl fmt::Debug for CreateOAuthClientResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateOAuthClientResponse")
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .field("info", &self.info)
            .finish()
    }
}

impl fmt::Debug for CertifyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifyRequest")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .field("attestation", &self.attestation.as_ref().map(|_| REDACTED))
            .field("inbound_addr", &self.inbound_addr)
            .finish()
    }
}

impl fmt::Debug for RotateCaRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateCaRequest")
            .field("generate", &self.generate)
            .field("abort", &self.abort)
            .field("min_phase_seconds", &self.min_phase_seconds)
            .field("new_root_cert_pem", &format_args!("{} bytes", self.new_root_cert_pem.len()))
            .field("new_root_key_pem", &(!self.new_root_key_pem.is_empty()).then_some(REDACTED))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let s = format!(
            "{:?} {:?} {:?} {:?}",
            CreateJoinTokenResponse { token: "jt-SECRET".into(), info: None },
            CreateApiKeyResponse { key: "pal-SECRET".into(), info: None },
            CreateOAuthClientResponse { client_id: "c1".into(), client_secret: "cs-SECRET".into(), info: None },
            CertifyRequest {
                attestation: Some(crate::v1::certify_request::Attestation::JoinToken("jt-SECRET".into())),
                ..Default::default()
            },
        );
        assert!(!s.contains("SECRET"), "{s}");
        assert!(s.contains("c1") && s.contains(REDACTED), "{s}");
    }
}
