//! API keys: known to the sidecar only by their SHA-256, looked up by the
//! hash of the key a request presents.

use std::sync::Arc;

use super::{Authenticator, Failure, count};
use crate::Headers;

/// An API key as the control plane sends it: its hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The key's name (what `apiKeys` in authorization rules match).
    pub name: String,
    /// The principal requests made with it act as.
    pub principal: String,
    /// SHA-256 of the key, hex.
    pub sha256: String,
    /// Unix seconds after which it is refused; 0: never.
    pub expires_at: u64,
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub(super) fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug)]
pub(super) struct ApiKeyEntry {
    pub(super) name: Arc<str>,
    pub(super) principal: String,
    pub(super) expires_at: u64,
}

impl Authenticator {
    pub(super) fn find_api_key(&self, headers: &dyn Headers, now: u64) -> Result<Option<&ApiKeyEntry>, Failure> {
        let mut presented: Option<&str> = None;
        for h in &self.api_key_headers {
            if count(headers, h) > 1 {
                return Err(Failure::Malformed);
            }
            if let Some(v) = headers.first(h) {
                if presented.is_some_and(|p| p != v) {
                    return Err(Failure::Malformed);
                }
                presented = Some(v);
            }
        }
        let Some(key) = presented else { return Ok(None) };
        if key.is_empty() || key.len() > 256 {
            return Err(Failure::UnknownApiKey);
        }
        match self.api_keys.get(&sha256(key.trim().as_bytes())) {
            None => Err(Failure::UnknownApiKey),
            Some(e) if e.expires_at != 0 && e.expires_at <= now => Err(Failure::ExpiredApiKey),
            Some(e) => Ok(Some(e)),
        }
    }
}
