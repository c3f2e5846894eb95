//! Join tokens: 256 random bits shown once to the operator, stored only as a
//! SHA-256 hash with an expiry and a use count.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use palisade_certs::ca::sha256_hex;
use palisade_cmd::unix_now;
use ring::rand::SecureRandom;

use super::{AttestError, Attested, Attestor};
use crate::store::{Store, StoreError, TokenRecord, TokenRefusal};

/// Prefix that makes a Palisade join token recognisable (e.g. by secret scanners).
pub const TOKEN_PREFIX: &str = "pjt_";

/// A freshly created token: the secret (shown once) and its record.
pub struct NewToken {
    pub secret: String,
    pub record: TokenRecord,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken").field("secret", &"<redacted>").field("record", &self.record).finish()
    }
}

/// How a token is stored and looked up: the SHA-256 of its text, lower-case hex.
fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Creates and stores a token for `identity`.
pub fn create(
    store: &dyn Store,
    identity: &palisade_certs::SpiffeId,
    ttl: Duration,
    uses: u32,
) -> Result<NewToken, StoreError> {
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut raw).expect("invariant: the OS random source is available");
    let secret = format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let sha256 = token_hash(&secret);
    let now = unix_now();
    let record = TokenRecord {
        id: sha256[..12].to_string(),
        sha256,
        identity: identity.to_string(),
        created_at: now,
        expires_at: now + ttl.as_secs().max(1),
        uses_total: uses,
        uses_left: uses,
        revoked: false,
    };
    store.put_token(record.clone())?;
    Ok(NewToken { secret, record })
}

/// Attests with join tokens held in the store.
#[derive(Debug)]
pub struct JoinTokenAttestor {
    pub store: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl Attestor for JoinTokenAttestor {
    async fn attest(&self, credential: &str) -> Result<Attested, AttestError> {
        let hash = token_hash(credential.trim());
        let (store, h) = (self.store.clone(), hash.clone());
        let consumed = crate::store::blocking(&store, move |s| s.consume_token(&h, unix_now())).await;
        let record = match consumed? {
            Ok(r) => r,
            Err(TokenRefusal::Unknown) => return Err(AttestError::UnknownToken),
            Err(TokenRefusal::Revoked(t)) => return Err(AttestError::RevokedToken { id: t.id }),
            Err(TokenRefusal::Expired(t)) => {
                return Err(AttestError::ExpiredToken {
                    id: t.id,
                    expired_at: palisade_certs::svid::rfc3339::format(UNIX_EPOCH + Duration::from_secs(t.expires_at)),
                });
            }
            Err(TokenRefusal::Exhausted(t)) => {
                return Err(AttestError::ExhaustedToken { id: t.id, uses: t.uses_total });
            }
        };
        // The identity was validated when the token was created.
        let identity = record.identity.parse().map_err(|_| AttestError::UnknownToken)?;
        Ok(Attested { identity, method: "token", refund: Some(hash) })
    }
}
