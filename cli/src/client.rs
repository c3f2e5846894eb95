//! The connection to the control plane's Admin API with the admin credential.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use palisade_certs::SvidInfo;
use palisade_certs::svid::rfc3339;
use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
use palisade_proto::channel::ControlPlaneAddr;
use palisade_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::Online;

/// The admin credential loaded from disk.
pub(crate) struct Credentials {
    pub(crate) bundle: TrustBundle,
    pub(crate) svid: Svid,
}

/// Reads the admin credential from `--credentials`; errors name the file and the fix.
pub(crate) fn load_credentials(cli: &Online) -> Result<Credentials> {
    let dir = cli
        .credentials
        .as_ref()
        .ok_or_else(|| crate::usage("no admin credential: pass --credentials DIR or set PALISADE_CREDENTIALS to the control plane's <data-dir>/admin"))?;
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!("cannot read {} (is --credentials the control plane's <data-dir>/admin?)", p.display())
        })
    };
    let roots =
        palisade_certs::ca::parse_pem_certs(&read("ca.pem")?).map_err(|e| anyhow!("{}/ca.pem: {e}", dir.display()))?;
    let chain = palisade_certs::ca::parse_pem_certs(&read("cert.pem")?)
        .map_err(|e| anyhow!("{}/cert.pem: {e}", dir.display()))?;
    let key = palisade_certs::SecretPem::new(read("key.pem")?);
    let (id, info) = SvidInfo::parse_svid(&chain[0]).with_context(|| format!("{}/cert.pem", dir.display()))?;
    let certified = palisade_certs::csr::certified_key_from_pem(chain, &key)
        .with_context(|| format!("{}/key.pem", dir.display()))?;
    let bundle = TrustBundle::new(&roots).with_context(|| format!("{}/ca.pem", dir.display()))?;
    Ok(Credentials { bundle, svid: Svid { certified, info, id } })
}

/// A TLS channel to the control plane, presenting the admin credential and
/// requiring the control plane's own identity; errors carry a hint.
pub(crate) async fn connect(cli: &Online, creds: &Credentials) -> Result<Channel> {
    let addr = ControlPlaneAddr::parse(&cli.control_plane)?;
    let now = SystemTime::now();
    if !creds.svid.is_valid_at(now) {
        bail!(
            "the admin credential expired at {}; restart the control plane to reissue it",
            rfc3339::format(creds.svid.info.not_after)
        );
    }
    let td = creds.svid.id.trust_domain().clone();
    let verifier = SpiffeServerVerifier::new(creds.bundle.clone(), PeerIdentity::Exact(td.control_plane()));
    let store = SvidStore::new();
    store.set(Svid {
        certified: creds.svid.certified.clone(),
        info: creds.svid.info.clone(),
        id: creds.svid.id.clone(),
    });
    let tls = palisade_certs::tls::client_config(verifier, Some(Arc::new(store)))?;
    palisade_proto::channel::connect(&addr, Arc::new(tls), Duration::from_secs(10)).await.map_err(|e| {
        use palisade_proto::channel::{ChannelError, Failure};
        let hint = match &e {
            ChannelError::Connect { failure: Failure::UnknownCa | Failure::ClientRejected, .. } => format!(
                "hint: --credentials / PALISADE_CREDENTIALS ({}) must be the admin directory of the control plane at {addr}",
                cli.credentials.as_ref().map(|c| c.display().to_string()).unwrap_or_default()
            ),
            _ => format!("hint: the address comes from --control-plane / PALISADE_CONTROL_PLANE ({addr})"),
        };
        anyhow!("{e}\n{hint}")
    })
}

/// An Admin API client over [`connect`], with the admin message size limits.
pub(crate) async fn admin(cli: &Online) -> Result<AdminClient<Channel>> {
    let creds = load_credentials(cli)?;
    Ok(AdminClient::new(connect(cli, &creds).await?)
        .max_decoding_message_size(palisade_proto::limits::MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(palisade_proto::limits::MAX_ADMIN_MESSAGE_BYTES))
}

/// Re-certifies the admin credential of `--credentials` under the root that
/// signs now: the same key (key.pem is not touched), the same expiry; the
/// roots of both bundles go to ca.pem first, then the new cert.pem.
pub(crate) async fn recertify(cli: &Online) -> Result<()> {
    let dir = cli.credentials.clone().ok_or_else(|| anyhow!("no --credentials directory"))?;
    let creds = load_credentials(cli)?;
    let key = palisade_certs::SecretPem::new(
        std::fs::read_to_string(dir.join("key.pem")).with_context(|| format!("{}/key.pem", dir.display()))?,
    );
    let csr = palisade_certs::csr::csr_for_key(&key, &creds.svid.id)?;
    let mut identity = palisade_proto::v1::identity_client::IdentityClient::new(connect(cli, &creds).await?);
    let resp = identity
        .certify(palisade_proto::v1::CertifyRequest { csr_der: csr, ..Default::default() })
        .await
        .map_err(status_err)?
        .into_inner();
    let pem = |ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|d| palisade_certs::ca::der_to_pem(&rustls_pki_types::CertificateDer::from(d.clone())))
            .collect()
    };
    let mut roots = std::fs::read_to_string(dir.join("ca.pem")).unwrap_or_default();
    for root in resp.trust_bundle_der.chunks(1) {
        let root = pem(root);
        if !roots.contains(root.trim()) {
            roots.push_str(&root);
        }
    }
    palisade_certs::files::write_public(&dir.join("ca.pem"), &roots)?;
    palisade_certs::files::write_public(&dir.join("cert.pem"), &pem(&resp.cert_chain_der))?;
    Ok(())
}

/// A gRPC status as the operator reads it: `PERMISSION_DENIED: <message>`
/// (kept typed: `INVALID_ARGUMENT` is a usage error, see `exit_code`).
#[derive(Debug)]
pub(crate) struct StatusError(pub(crate) tonic::Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.0.code()), self.0.message())?;
        // TLS 1.3: a client certificate the server refuses shows only as the
        // first call failing.
        if self.0.code() == tonic::Code::Unknown && self.0.message().contains("transport error") {
            write!(
                f,
                "\nhint: the connection ended under the call; if the control plane refused this credential (one from a root a rotation has retired since: it moves only with a watching `ca rotate`), use the control plane's own DIR/admin, which it keeps current"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for StatusError {}

/// A gRPC status as the operator reads it: `PERMISSION_DENIED: <message>`.
pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    StatusError(s).into()
}

/// `PermissionDenied` as `PERMISSION_DENIED`, the name gRPC documents.
fn code_name(c: tonic::Code) -> String {
    format!("{c:?}").chars().fold(String::new(), |mut out, ch| {
        if ch.is_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
        out
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn statuses_read_as_grpc_names_them() {
        assert_eq!(super::code_name(tonic::Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(super::code_name(tonic::Code::Ok), "OK");
        let e = super::status_err(tonic::Status::not_found("no policy x"));
        assert_eq!(e.to_string(), "NOT_FOUND: no policy x");
        let e = super::status_err(tonic::Status::unknown("transport error"));
        assert!(e.to_string().starts_with("UNKNOWN: transport error\nhint: ") && e.to_string().contains("DIR/admin"));
    }
}
