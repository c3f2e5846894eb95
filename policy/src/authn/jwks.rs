//! Key sets (RFC 7517) and the JWS signature algorithms Palisade verifies,
//! over `ring`: RS256, PS256, ES256, ES384 and EdDSA. Keys Palisade cannot
//! use for signatures are skipped; a private key in a published set is an
//! error, never used.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

/// Most keys one JWKS may hold.
pub const MAX_JWKS_KEYS: usize = 64;

/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A JWS algorithm Palisade verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    pub(super) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Self::Rs256,
            "PS256" => Self::Ps256,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "EdDSA" => Self::EdDsa,
            _ => return None,
        })
    }
}

#[derive(Clone)]
pub(super) enum PublicKey {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl PublicKey {
    pub(super) fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (Self::Rsa { .. }, Alg::Rs256 | Alg::Ps256)
                | (Self::P256(_), Alg::Es256)
                | (Self::P384(_), Alg::Es384)
                | (Self::Ed25519(_), Alg::EdDsa)
        )
    }

    pub(super) fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        use ring::signature as s;
        match (self, alg) {
            (Self::Rsa { n, e }, Alg::Rs256) => {
                s::RsaPublicKeyComponents { n, e }.verify(&s::RSA_PKCS1_2048_8192_SHA256, msg, sig).is_ok()
            }
            (Self::Rsa { n, e }, Alg::Ps256) => {
                s::RsaPublicKeyComponents { n, e }.verify(&s::RSA_PSS_2048_8192_SHA256, msg, sig).is_ok()
            }
            (Self::P256(p), Alg::Es256) => {
                s::UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, p).verify(msg, sig).is_ok()
            }
            (Self::P384(p), Alg::Es384) => {
                s::UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, p).verify(msg, sig).is_ok()
            }
            (Self::Ed25519(p), Alg::EdDsa) => s::UnparsedPublicKey::new(&s::ED25519, p).verify(msg, sig).is_ok(),
            _ => false,
        }
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rsa { .. } => "RSA",
            Self::P256(_) => "EC P-256",
            Self::P384(_) => "EC P-384",
            Self::Ed25519(_) => "Ed25519",
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct Jwk {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<Alg>,
    pub(super) key: PublicKey,
}

/// An issuer's key set (RFC 7517), the signing keys Palisade can use.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub(super) keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    // A private key in a published key set is a leak: refused, not used.
    d: Option<Value>,
}

fn b64(s: &Option<String>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.as_deref()?).ok()
}

impl RawJwk {
    fn key(&self) -> Result<Option<PublicKey>, String> {
        if self.d.is_some() {
            return Err("holds a private key (`d`); publish only public keys".into());
        }
        if self.use_.as_deref().is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let point = |len: usize| -> Option<Vec<u8>> {
            let (x, y) = (b64(&self.x)?, b64(&self.y)?);
            (x.len() == len && y.len() == len).then(|| [&[4u8][..], &x, &y].concat())
        };
        Ok(match (self.kty.as_deref(), self.crv.as_deref()) {
            (Some("RSA"), _) => {
                let n = b64(&self.n).ok_or("an RSA key needs base64url `n` and `e`")?;
                let e = b64(&self.e).ok_or("an RSA key needs base64url `n` and `e`")?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if !(2048..=8192).contains(&bits) {
                    return Err(format!("has an RSA key of {bits} bits; 2048 to 8192 are accepted"));
                }
                Some(PublicKey::Rsa { n, e })
            }
            (Some("EC"), Some("P-256")) => {
                Some(PublicKey::P256(point(32).ok_or("an EC P-256 key needs 32-byte x and y")?))
            }
            (Some("EC"), Some("P-384")) => {
                Some(PublicKey::P384(point(48).ok_or("an EC P-384 key needs 48-byte x and y")?))
            }
            (Some("OKP"), Some("Ed25519")) => {
                let x = b64(&self.x).filter(|x| x.len() == 32).ok_or("an Ed25519 key needs a 32-byte x")?;
                Some(PublicKey::Ed25519(x))
            }
            // Other key types (encryption keys, symmetric "oct" keys) are not signing keys Palisade accepts.
            _ => None,
        })
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`). Keys Palisade cannot use
    /// for signatures are skipped; a set with none left is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(format!("is {} bytes; at most {MAX_JWKS_BYTES} are accepted", text.len()));
        }
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<RawJwk>,
        }
        let doc: Doc =
            serde_json::from_str(text).map_err(|e| format!("is not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
        if doc.keys.len() > MAX_JWKS_KEYS {
            return Err(format!("holds {} keys; at most {MAX_JWKS_KEYS} are accepted", doc.keys.len()));
        }
        let mut keys = Vec::new();
        for (i, raw) in doc.keys.iter().enumerate() {
            let alg = match raw.alg.as_deref() {
                None => None,
                Some(a) => match Alg::parse(a) {
                    Some(a) => Some(a),
                    None => continue, // a key for an algorithm Palisade never accepts
                },
            };
            if let Some(key) = raw.key().map_err(|why| format!("key {i}: {why}"))? {
                if alg.is_some_and(|a| !key.fits(a)) {
                    return Err(format!("key {i}: its alg does not fit its key type"));
                }
                keys.push(Jwk { kid: raw.kid.clone(), alg, key });
            }
        }
        if keys.is_empty() {
            return Err("holds no usable signing key (RSA 2048+ bits, EC P-256 or P-384, Ed25519)".into());
        }
        Ok(Self { keys })
    }

    /// How many usable keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}
