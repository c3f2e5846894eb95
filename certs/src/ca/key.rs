//! Reading an operator's CA private key from PEM, in the forms operators
//! have: EC P-256/P-384 in SEC1 (`BEGIN EC PRIVATE KEY`, what `openssl
//! ecparam -genkey`, `step` and cert-manager's default encoding write) or
//! PKCS#8, RSA 2048-4096 in PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8, and
//! Ed25519 in PKCS#8.
//!
//! rcgen with the ring backend takes PKCS#8 only, so a SEC1 or PKCS#1 key
//! is wrapped into a PKCS#8 `PrivateKeyInfo` (RFC 5208) first; the inner key
//! is passed through unchanged and ring checks it. The signature algorithm
//! follows the key: ECDSA P-256 with SHA-256, P-384 with SHA-384, RSA
//! PKCS#1 v1.5 with SHA-256, Ed25519. Encrypted keys are refused with how to
//! decrypt them. No error or `Debug` output holds key bytes: every reason
//! is a fixed text or a name (a PEM label, an OID, a size).

use rcgen::{KeyPair, SignatureAlgorithm};
use rustls_pki_types::PrivatePkcs8KeyDer;
use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};

mod der;

/// What keys are accepted, as every refusal says.
pub const ACCEPTED: &str = "accepted: unencrypted PEM, EC P-256/P-384 in SEC1 or PKCS#8, \
RSA 2048-4096 bits in PKCS#1 or PKCS#8, or Ed25519 in PKCS#8";

/// Why a CA private key was refused. The texts name the problem and what is
/// accepted ([`ACCEPTED`]); none holds key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is encrypted with a passphrase.
    #[error(
        "the key is encrypted ({how}); decrypt it first, e.g. `openssl pkey -in key.pem -out plain.pem` \
         (keep plain.pem mode 0600); {ACCEPTED}"
    )]
    Encrypted {
        /// How it is encrypted.
        how: &'static str,
    },
    /// The text is not PEM, or a PEM block is damaged.
    #[error("the key's PEM text is unreadable: {why}; {ACCEPTED}")]
    Pem {
        /// What is wrong (never the text itself).
        why: &'static str,
    },
    /// No private key block among the PEM blocks.
    #[error("no private key found (PEM blocks: {found}); {ACCEPTED}")]
    NoKey {
        /// The labels that were found, or "none".
        found: String,
    },
    /// A private key block of a kind that is not accepted (e.g. OpenSSH's).
    #[error("a \"{label}\" PEM block is not an accepted key form; {ACCEPTED}")]
    Label {
        /// The PEM label.
        label: String,
    },
    /// More than one private key in the text.
    #[error("{count} private keys found; give the CA's key alone; {ACCEPTED}")]
    Several {
        /// How many.
        count: usize,
    },
    /// The DER inside the PEM block is not the structure its label says.
    #[error("the {form} key is malformed: {why}; {ACCEPTED}")]
    Malformed {
        /// The form its label announced.
        form: KeyForm,
        /// What is wrong.
        why: &'static str,
    },
    /// An EC key on a curve other than P-256 and P-384.
    #[error("EC keys on {curve} are not supported; {ACCEPTED}")]
    Curve {
        /// The curve's name or OID.
        curve: String,
    },
    /// An RSA key outside 2048..=4096 bits.
    #[error("an RSA key of {bits} bits is not supported; {ACCEPTED}")]
    RsaSize {
        /// Its modulus size.
        bits: usize,
    },
    /// A PKCS#8 key of another algorithm (DSA, RSA-PSS, Ed448, ...).
    #[error("keys of algorithm {algorithm} are not supported; {ACCEPTED}")]
    Algorithm {
        /// Its name or OID.
        algorithm: String,
    },
    /// The key is well formed but ring refused it (inconsistent components).
    #[error("the {form} key was refused: {why}; {ACCEPTED}")]
    Rejected {
        /// Its form.
        form: KeyForm,
        /// ring's reason (a fixed description).
        why: String,
    },
    /// The key is not the one of the CA certificate.
    #[error(
        "the key does not match the CA certificate's public key (certificate: {cert}, key: {key}); \
         give the key the certificate was made for; {ACCEPTED}"
    )]
    Mismatch {
        /// The certificate's key algorithm.
        cert: String,
        /// The key's algorithm.
        key: String,
    },
}

/// The encoding a key came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyForm {
    /// `BEGIN PRIVATE KEY` (RFC 5208/5958).
    Pkcs8,
    /// `BEGIN EC PRIVATE KEY` (RFC 5915).
    Sec1,
    /// `BEGIN RSA PRIVATE KEY` (RFC 8017).
    Pkcs1,
}

impl std::fmt::Display for KeyForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pkcs8 => "PKCS#8",
            Self::Sec1 => "SEC1 (EC PRIVATE KEY)",
            Self::Pkcs1 => "PKCS#1 (RSA PRIVATE KEY)",
        })
    }
}

const OID_EC: &str = "1.2.840.10045.2.1";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Reads the one private key in `pem` (other blocks such as `EC PARAMETERS`
/// or certificates are skipped) into a signing key pair.
pub fn load(pem: &str) -> Result<KeyPair, KeyError> {
    let (form, der) = private_key_block(pem)?;
    let (pkcs8, alg) = match form {
        KeyForm::Pkcs8 => {
            let alg = pkcs8_algorithm(&der)?;
            (der, alg)
        }
        KeyForm::Sec1 => sec1_to_pkcs8(&der)?,
        KeyForm::Pkcs1 => {
            rsa_size(&der, KeyForm::Pkcs1)?;
            (der::pkcs1_to_pkcs8(&der), &rcgen::PKCS_RSA_SHA256)
        }
    };
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), alg)
        .map_err(|e| KeyError::Rejected { form, why: e.to_string() })
}

/// A short name of a key's algorithm, for messages ("EC P-256", "RSA").
pub fn describe(key: &KeyPair) -> &'static str {
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        "EC P-256"
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        "EC P-384"
    } else if alg == &rcgen::PKCS_ED25519 {
        "Ed25519"
    } else {
        "RSA"
    }
}

/// The one private key block: its form and DER.
fn private_key_block(pem: &str) -> Result<(KeyForm, Vec<u8>), KeyError> {
    let blocks = pem::parse_many(pem).map_err(|e| KeyError::Pem { why: pem_why(&e) })?;
    if pem.matches("-----BEGIN ").count() != blocks.len() {
        return Err(KeyError::Pem { why: "a BEGIN line has no END line (is the file truncated?)" });
    }
    let mut keys = Vec::new();
    for b in &blocks {
        if b.headers().get("Proc-Type").is_some_and(|v| v.contains("ENCRYPTED")) {
            return Err(KeyError::Encrypted { how: "legacy PEM encryption, Proc-Type: 4,ENCRYPTED" });
        }
        let form = match b.tag() {
            "PRIVATE KEY" => KeyForm::Pkcs8,
            "EC PRIVATE KEY" => KeyForm::Sec1,
            "RSA PRIVATE KEY" => KeyForm::Pkcs1,
            "ENCRYPTED PRIVATE KEY" => {
                return Err(KeyError::Encrypted { how: "PKCS#8, BEGIN ENCRYPTED PRIVATE KEY" });
            }
            other if other.contains("PRIVATE KEY") => return Err(KeyError::Label { label: other.to_string() }),
            _ => continue,
        };
        keys.push((form, b.contents().to_vec()));
    }
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 => {
            let found = blocks.iter().map(|b| b.tag()).collect::<Vec<_>>().join(", ");
            Err(KeyError::NoKey { found: if found.is_empty() { "none".into() } else { found } })
        }
        count => Err(KeyError::Several { count }),
    }
}

fn pem_why(e: &pem::PemError) -> &'static str {
    match e {
        pem::PemError::MismatchedTags(..) => "a BEGIN line and its END line name different labels",
        pem::PemError::InvalidData(_) => "the base64 between BEGIN and END is invalid (truncated or altered?)",
        pem::PemError::InvalidHeader(_) => "a header line inside a PEM block is invalid",
        pem::PemError::NotUtf8(_) => "it is not UTF-8 text",
        pem::PemError::MissingData => "a PEM block is empty",
        _ => "malformed BEGIN/END lines",
    }
}

/// The elements of the one DER SEQUENCE `der` is.
fn sequence(der: &[u8]) -> Option<Vec<Any<'_>>> {
    let (rest, seq) = Any::from_der(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    elements(&seq)
}

/// The elements of a parsed SEQUENCE.
fn elements<'a>(seq: &Any<'a>) -> Option<Vec<Any<'a>>> {
    if seq.tag() != Tag::Sequence || seq.class() != Class::Universal {
        return None;
    }
    let mut items = Vec::new();
    let mut input = seq.data;
    while !input.is_empty() {
        let (rest, item) = Any::from_der(input).ok()?;
        items.push(item);
        input = rest;
    }
    Some(items)
}

fn oid_of(any: &Any<'_>) -> Option<String> {
    if any.tag() != Tag::Oid {
        return None;
    }
    any.as_oid().ok().map(|o| o.to_id_string())
}

/// The signature algorithm for a PKCS#8 `PrivateKeyInfo`, refusing what ring cannot sign with.
fn pkcs8_algorithm(der: &[u8]) -> Result<&'static SignatureAlgorithm, KeyError> {
    let bad = |why| KeyError::Malformed { form: KeyForm::Pkcs8, why };
    let items = sequence(der).ok_or(bad("not a DER PrivateKeyInfo SEQUENCE"))?;
    let (Some(alg_id), Some(key)) = (items.get(1), items.get(2)) else {
        return Err(bad("the PrivateKeyInfo lacks its algorithm or key"));
    };
    let alg = elements(alg_id).ok_or(bad("the AlgorithmIdentifier is not a SEQUENCE"))?;
    let oid = alg.first().and_then(oid_of).ok_or(bad("the AlgorithmIdentifier holds no OID"))?;
    if key.tag() != Tag::OctetString {
        return Err(bad("the privateKey is not an OCTET STRING"));
    }
    match oid.as_str() {
        OID_EC => match alg.get(1).and_then(oid_of).as_deref() {
            Some(OID_P256) => Ok(&rcgen::PKCS_ECDSA_P256_SHA256),
            Some(OID_P384) => Ok(&rcgen::PKCS_ECDSA_P384_SHA384),
            Some(other) => Err(KeyError::Curve { curve: curve_name(other) }),
            None => Err(KeyError::Curve { curve: "explicit or missing curve parameters".into() }),
        },
        OID_RSA => {
            rsa_size(key.data, KeyForm::Pkcs8)?;
            Ok(&rcgen::PKCS_RSA_SHA256)
        }
        OID_ED25519 => Ok(&rcgen::PKCS_ED25519),
        other => Err(KeyError::Algorithm { algorithm: algorithm_name(other) }),
    }
}

/// Wraps a SEC1 `ECPrivateKey` into PKCS#8, with the curve its parameters
/// name (or, without them, the one its private scalar's length implies).
fn sec1_to_pkcs8(der: &[u8]) -> Result<(Vec<u8>, &'static SignatureAlgorithm), KeyError> {
    let bad = |why| KeyError::Malformed { form: KeyForm::Sec1, why };
    let items = sequence(der).ok_or(bad("not a DER ECPrivateKey SEQUENCE"))?;
    let scalar = items.get(1).filter(|a| a.tag() == Tag::OctetString).ok_or(bad("no private key OCTET STRING"))?;
    let tagged = |n: u32| items.iter().skip(2).find(|a| a.class() == Class::ContextSpecific && a.tag() == Tag(n));
    if tagged(1).is_none() {
        return Err(bad(
            "it does not hold its public key; `openssl ec -in key.pem -out full.pem` writes one that does",
        ));
    }
    let curve = match tagged(0) {
        Some(params) => match Any::from_der(params.data).ok().and_then(|(_, a)| oid_of(&a)) {
            Some(oid) => oid,
            None => {
                return Err(KeyError::Curve {
                    curve: "explicit curve parameters (re-export with `openssl ec -param_enc named_curve`)".into(),
                });
            }
        },
        None if scalar.data.len() == 32 => OID_P256.to_string(),
        None if scalar.data.len() == 48 => OID_P384.to_string(),
        None => return Err(KeyError::Curve { curve: format!("an unnamed curve of {} bytes", scalar.data.len()) }),
    };
    let alg: &'static SignatureAlgorithm = match curve.as_str() {
        OID_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        OID_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        other => return Err(KeyError::Curve { curve: curve_name(other) }),
    };
    let curve_oid = if curve == OID_P256 { der::OID_P256 } else { der::OID_P384 };
    Ok((der::sec1_to_pkcs8(der, curve_oid), alg))
}

/// Refuses an RSA key (a PKCS#1 `RSAPrivateKey`) outside 2048..=4096 bits.
fn rsa_size(pkcs1: &[u8], form: KeyForm) -> Result<(), KeyError> {
    let bad = |why| KeyError::Malformed { form, why };
    let items = sequence(pkcs1).ok_or(bad("not a DER RSAPrivateKey SEQUENCE"))?;
    let n = items.get(1).filter(|a| a.tag() == Tag::Integer).ok_or(bad("no modulus INTEGER"))?;
    let digits = match n.data.iter().position(|b| *b != 0) {
        Some(i) => &n.data[i..],
        None => &[][..],
    };
    let bits = digits.first().map_or(0, |top| (digits.len() - 1) * 8 + (8 - top.leading_zeros() as usize));
    if !(2048..=4096).contains(&bits) {
        return Err(KeyError::RsaSize { bits });
    }
    Ok(())
}

fn curve_name(oid: &str) -> String {
    match oid {
        "1.3.132.0.35" => "P-521 (secp521r1)".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        "1.2.840.10045.3.1.1" => "P-192 (prime192v1)".into(),
        "1.3.132.0.33" => "P-224 (secp224r1)".into(),
        other if other.starts_with("1.3.36.3.3.2.8.1.1.") => format!("brainpool curve {other}"),
        other => format!("curve {other}"),
    }
}

fn algorithm_name(oid: &str) -> String {
    match oid {
        "1.2.840.113549.1.1.10" => "RSA-PSS".into(),
        "1.2.840.10040.4.1" => "DSA".into(),
        "1.3.101.113" => "Ed448".into(),
        "1.3.101.110" | "1.3.101.111" => "X25519/X448 (key agreement only)".into(),
        other => format!("OID {other}"),
    }
}

#[cfg(test)]
mod tests;
