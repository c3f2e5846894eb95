//! `palisadectl cert inspect`: read a certificate chain from a PEM file or
//! from a live TLS endpoint, show its SVID facts, and verify it.

use palisade_cmd::outln;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use palisade_certs::SvidInfo;
use palisade_certs::svid::rfc3339;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertCmd {
    /// Show a certificate's SPIFFE ID, issuer, validity and time left, and
    /// verify its chain against a trust bundle.
    Inspect {
        /// A PEM file (leaf first), or a TLS endpoint: HOST:PORT or https://HOST:PORT.
        target: String,
        /// Trust bundle (PEM) to verify against; default: <credentials>/ca.pem.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Directory holding the admin credential; its ca.pem is the default bundle.
        #[arg(long, env = "PALISADE_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
}

/// Records the server's chain; verification is done afterwards, against the
/// bundle the operator chose, so a bad chain is shown rather than hidden.
#[derive(Debug)]
struct Capture {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `HOST:PORT` from `HOST:PORT`, `https://HOST:PORT` or `https://HOST:PORT/path`.
fn endpoint(target: &str) -> Result<(String, String)> {
    let rest = match target.split_once("://") {
        Some(("https", rest)) => rest,
        Some((scheme, _)) => {
            return Err(crate::usage(format!("{target}: only https:// endpoints carry certificates, not {scheme}://")));
        }
        None => target,
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let parsed: http::uri::Authority = authority
        .parse()
        .map_err(|_| crate::usage(format!("{target:?} is neither a readable PEM file nor HOST:PORT")))?;
    if parsed.port_u16().is_none() {
        return Err(crate::usage(format!("{target}: missing port (HOST:PORT, e.g. 127.0.0.1:7700)")));
    }
    let host = parsed.host().trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, authority.to_string()))
}

async fn fetch_chain(target: &str) -> Result<Vec<CertificateDer<'static>>> {
    let (host, target) = endpoint(target)?;
    let target = target.as_str();
    let capture = Arc::new(Capture { chain: Mutex::new(Vec::new()), provider: palisade_certs::provider() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(host).map_err(|e| anyhow!("{target}: {e}"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| anyhow!("connecting to {target} timed out"))?
        .map_err(|e| {
            let (failure, detail) = palisade_proto::channel::Failure::of(&e);
            anyhow!("cannot connect to {target}: {}", failure.explain(&detail))
        })?;
    // The handshake may fail after the server's certificate arrived (e.g. it
    // demands a client certificate); the chain is captured either way.
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await;
    let chain = capture.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if chain.is_empty() {
        match result {
            Ok(Err(e)) => {
                let (failure, detail) = palisade_proto::channel::Failure::of(&e);
                bail!(
                    "TLS handshake with {target} failed before a certificate was received: {}",
                    failure.explain(&detail)
                )
            }
            _ => bail!("{target} sent no certificate"),
        }
    }
    Ok(chain)
}

pub(crate) async fn inspect(target: &str, bundle: Option<&Path>, output: crate::Output) -> Result<()> {
    let chain = if Path::new(target).exists() {
        let pem = std::fs::read_to_string(target).with_context(|| format!("cannot read {target}"))?;
        palisade_certs::ca::parse_pem_certs(&pem).map_err(|e| anyhow!("{target}: {e}"))?
    } else if target.contains(':') {
        fetch_chain(target).await?
    } else {
        return Err(crate::usage(format!("{target:?} is neither a readable PEM file nor HOST:PORT")));
    };
    if chain.is_empty() {
        bail!("{target}: no certificate in it (expected PEM blocks BEGIN CERTIFICATE)");
    }
    let info = SvidInfo::parse(&chain[0])?;
    let now = SystemTime::now();
    let svid_check = SvidInfo::parse_svid(&chain[0]).map(|_| ()).map_err(|e| e.to_string());
    let verification: Option<Result<(), String>> = bundle.map(|b| {
        let pem = std::fs::read_to_string(b).map_err(|e| format!("cannot read bundle {}: {e}", b.display()))?;
        let roots = palisade_certs::ca::parse_pem_certs(&pem).map_err(|e| format!("bundle {}: {e}", b.display()))?;
        let store = palisade_certs::svid::root_store(&roots).map_err(|e| e.to_string())?;
        palisade_certs::svid::verify_chain(&chain, &store, now).map_err(|e| e.to_string())
    });
    let left = info.time_left(now);
    if output != crate::Output::Table {
        let v = serde_json::json!({
            "spiffe_id": info.spiffe_id.as_ref().map(|i| i.to_string()),
            "uri_sans": info.uri_sans,
            "subject": info.subject,
            "issuer": info.issuer,
            "serial": info.serial,
            "not_before": rfc3339::format(info.not_before),
            "not_after": rfc3339::format(info.not_after),
            "time_left_seconds": left.as_secs(),
            "is_ca": info.is_ca,
            "chain_length": chain.len(),
            "svid_valid": svid_check.is_ok(),
            "svid_error": svid_check.as_ref().err(),
            "chain_verified": verification.as_ref().map(|r| r.is_ok()),
            "chain_error": verification.as_ref().and_then(|r| r.as_ref().err()),
            "bundle": bundle.map(|b| b.display().to_string()),
        });
        crate::show::print_value(output, &v)?;
    } else {
        outln!(
            "SPIFFE ID:   {}",
            info.spiffe_id
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(|| format!("none ({})", svid_check.as_ref().err().cloned().unwrap_or_default()))
        );
        outln!("Subject:     {}", if info.subject.is_empty() { "(empty)" } else { &info.subject });
        outln!("Issuer:      {}", info.issuer);
        outln!("Serial:      {}", info.serial);
        outln!("Not before:  {}", rfc3339::format(info.not_before));
        outln!("Not after:   {}", rfc3339::format(info.not_after));
        let left_s = if left.is_zero() {
            "EXPIRED".to_string()
        } else {
            humantime::format_duration(Duration::from_secs(left.as_secs())).to_string()
        };
        outln!("Time left:   {left_s}");
        outln!("Chain:       {}", palisade_cmd::plural(chain.len(), "certificate", "certificates"));
        match &verification {
            None => outln!("Verified:    not checked (pass --bundle FILE or --credentials DIR)"),
            Some(Ok(())) => {
                outln!("Verified:    yes, against {}", bundle.map(|b| b.display().to_string()).unwrap_or_default())
            }
            Some(Err(e)) => outln!("Verified:    NO: {e}"),
        }
    }
    if let Some(Err(e)) = verification {
        bail!("chain verification failed: {e}");
    }
    Ok(())
}
