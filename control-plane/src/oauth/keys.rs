//! The token service's signing keys: ES256, rotated by `kid` (published
//! ahead of signing, retired after the last token they signed expires),
//! kept in the store's secrets ([`SecretHome`]): a file of the data dir, or
//! sealed in etcd and shared by the replicas.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::{OAuthError, Settings, TokenService, hex, random_b64};
use crate::store::sealed::{FileSecrets, SecretError, SecretHome};
use crate::store::{OAuthClientRecord, Store};
use palisade_cmd::unix_now;

/// The keys' record in a data dir (mode 0600).
pub const KEYS_FILE: &str = "oauth-keys.json";
/// The keys' record in etcd (sealed).
pub const KEYS_RECORD: &str = "oauth-keys";

/// Why the signing keys could not be made, read, kept or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate a signing key")]
    Generate,
    #[error("unusable key: {0}")]
    Unusable(ring::error::KeyRejected),
    #[error("corrupt: {0}")]
    Corrupt(serde_json::Error),
    #[error("corrupt key: {0}")]
    CorruptKey(base64::DecodeError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("no signing key is active")]
    NoActiveKey,
    #[error("cannot sign the token")]
    Sign,
}

pub(super) struct SigningKey {
    pub(super) kid: String,
    created: u64,
    /// Unix seconds from which it signs (published before that, so every
    /// sidecar holds it before the first token it signs exists).
    active_from: u64,
    pkcs8: Vec<u8>,
    pair: EcdsaKeyPair,
}

impl SigningKey {
    fn generate(now: u64, active_from: u64) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| KeyError::Generate)?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec(), now, active_from)
    }

    fn from_pkcs8(pkcs8: Vec<u8>, created: u64, active_from: u64) -> Result<Self, KeyError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &SystemRandom::new())
            .map_err(KeyError::Unusable)?;
        let kid = hex(&palisade_policy::authn::sha256(pair.public_key().as_ref())[..8]);
        Ok(Self { kid, created, active_from, pkcs8, pair })
    }

    pub(super) fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
               "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
    }
}

fn parse_keys(bytes: Option<&[u8]>) -> Result<Vec<SigningKey>, KeyError> {
    let Some(bytes) = bytes else { return Ok(Vec::new()) };
    let stored: Vec<StoredKey> = serde_json::from_slice(bytes).map_err(KeyError::Corrupt)?;
    stored
        .into_iter()
        .map(|k| {
            let pkcs8 = STANDARD.decode(&k.pkcs8).map_err(KeyError::CorruptKey)?;
            SigningKey::from_pkcs8(pkcs8, k.created, k.active_from)
        })
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredKey {
    kid: String,
    created: u64,
    active_from: u64,
    pkcs8: String,
}

impl TokenService {
    /// Loads the signing keys from `dir/oauth-keys.json` (mode 0600), making
    /// the first one if there is none.
    pub fn open(dir: &Path, settings: Settings, store: Arc<dyn Store>) -> Result<Self, OAuthError> {
        Self::open_at(Arc::new(FileSecrets::new(dir)), KEYS_FILE, settings, store)
    }

    /// Loads the signing keys kept in `home` as `name`, making the first one if there is none.
    pub fn open_at(
        home: Arc<dyn SecretHome>,
        name: &'static str,
        settings: Settings,
        store: Arc<dyn Store>,
    ) -> Result<Self, OAuthError> {
        let at = home.describe(name);
        let err = |source: KeyError| OAuthError::Keys { at: at.clone(), source };
        let stored = home.get(name).map_err(|e| err(e.into()))?;
        let keys = parse_keys(stored.as_ref().map(|v| v.value.as_slice())).map_err(err)?;
        let svc = Self { settings, home, name, keys: RwLock::new(keys), store, failures: Mutex::default() };
        if svc.keys.read().map(|k| k.is_empty()).unwrap_or(true) {
            let now = unix_now();
            let first = SigningKey::generate(now, now).map_err(err)?;
            svc.keys.write().unwrap_or_else(|p| p.into_inner()).push(first);
            if !svc.save(true).map_err(err)? {
                // Another replica made the first key meanwhile: use its.
                svc.reload().map_err(err)?;
            }
        }
        Ok(svc)
    }

    /// Reads the keys again (another replica rotated them).
    pub fn reload(&self) -> Result<(), KeyError> {
        let stored = self.home.get(self.name)?;
        let keys = parse_keys(stored.as_ref().map(|v| v.value.as_slice()))?;
        if !keys.is_empty() {
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        }
        Ok(())
    }

    /// Writes the keys; with `create` (the first key), only if no other
    /// replica stored some first (`false` then).
    fn save(&self, create: bool) -> Result<bool, KeyError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let stored: Vec<StoredKey> = keys
            .iter()
            .map(|k| StoredKey {
                kid: k.kid.clone(),
                created: k.created,
                active_from: k.active_from,
                pkcs8: STANDARD.encode(&k.pkcs8),
            })
            .collect();
        let bytes = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        Ok(self.home.put(create.then_some((self.name, 0)), vec![(self.name, Some(bytes))])?)
    }

    /// How long before it signs a new key is published.
    fn lead(&self) -> u64 {
        (self.settings.key_rotation / 4).min(Duration::from_secs(300)).as_secs().max(1)
    }

    /// How often [`Self::rotate_if_due`] should run.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs((self.lead() / 2).clamp(1, 60))
    }

    /// Publishes the next key when the current one nears its rotation, and
    /// retires keys no live token can carry. `true` if the key set changed.
    pub fn rotate_if_due(&self, now: u64) -> Result<bool, KeyError> {
        let rotation = self.settings.key_rotation.as_secs().max(1);
        let ttl = self.settings.token_ttl.as_secs() + 60;
        let mut changed = false;
        {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let newest = keys.iter().map(|k| k.active_from).max().unwrap_or(0);
            if newest + rotation <= now + self.lead() {
                let from = (newest + rotation).max(now + self.lead());
                keys.push(SigningKey::generate(now, from)?);
                changed = true;
            }
            // A key is retired once the key after it has signed for longer than a token lives.
            let mut starts: Vec<u64> = keys.iter().map(|k| k.active_from).collect();
            starts.sort_unstable();
            let before = keys.len();
            keys.retain(|k| match starts.iter().find(|s| **s > k.active_from) {
                Some(next) => *next > now || now - *next < ttl,
                None => true,
            });
            changed |= keys.len() != before;
        }
        if changed {
            self.save(false)?;
            tracing::info!(target: "audit", event = "oauth_keys_rotated", kids = ?self.kids(), "OAuth signing keys changed");
        }
        Ok(changed)
    }

    pub(super) fn kids(&self) -> Vec<String> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).iter().map(|k| k.kid.clone()).collect()
    }

    /// The published key set (every key not retired, including the next one).
    pub fn jwks_json(&self) -> String {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        json!({"keys": keys.iter().map(SigningKey::jwk).collect::<Vec<_>>()}).to_string()
    }

    /// Signs an access token for `client`.
    pub(super) fn issue(
        &self,
        client: &OAuthClientRecord,
        scopes: &[String],
        aud: Vec<String>,
        now: u64,
    ) -> Result<String, KeyError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key =
            keys.iter().filter(|k| k.active_from <= now).max_by_key(|k| k.active_from).ok_or(KeyError::NoActiveKey)?;
        let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": key.kid});
        let aud = if aud.len() == 1 { json!(aud[0]) } else { json!(aud) };
        let claims = json!({
            "iss": self.settings.issuer,
            "sub": client.client_id,
            "aud": aud,
            "exp": now + self.settings.token_ttl.as_secs(),
            "iat": now,
            "nbf": now,
            "jti": random_b64(16),
            "client_id": client.client_id,
            "scope": scopes.join(" "),
        });
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = key.pair.sign(&SystemRandom::new(), input.as_bytes()).map_err(|_| KeyError::Sign)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    #[test]
    fn keys_rotate_by_kid_publish_ahead_and_retire_after_the_last_token() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path()).unwrap());
        let settings = Settings {
            issuer: "https://127.0.0.1:7443".into(),
            token_ttl: Duration::from_secs(60),
            key_rotation: Duration::from_secs(3600),
        };
        let svc = TokenService::open(dir.path(), settings.clone(), store.clone()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("oauth-keys.json")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let first = svc.kids();
        let t0 = svc.keys.read().unwrap()[0].active_from;
        assert!(!svc.rotate_if_due(t0 + 100).unwrap());
        // 15 minutes (the lead) before the hour, the next key is published, not yet signing.
        assert!(svc.rotate_if_due(t0 + 3600 - 300).unwrap());
        assert_eq!(svc.kids().len(), 2);
        let client = OAuthClientRecord {
            client_id: "c".into(),
            name: "n".into(),
            secret_sha256: String::new(),
            scopes: vec![],
            audiences: vec![],
            created_at: 0,
        };
        let kid_of = |t: &str| {
            let h: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
            h["kid"].as_str().unwrap().to_string()
        };
        assert_eq!(kid_of(&svc.issue(&client, &[], vec!["a".into()], t0 + 3600 - 10).unwrap()), first[0]);
        assert_ne!(kid_of(&svc.issue(&client, &[], vec!["a".into()], t0 + 3600).unwrap()), first[0]);
        // The old key stays published while a token it signed may live, then goes.
        assert!(!svc.rotate_if_due(t0 + 3600 + 60).unwrap());
        assert!(svc.rotate_if_due(t0 + 3600 + 121).unwrap());
        assert!(!svc.kids().contains(&first[0]));
        // And the keys survive a restart.
        let again = TokenService::open(dir.path(), settings, store).unwrap();
        assert_eq!(again.kids(), svc.kids());
    }
}
