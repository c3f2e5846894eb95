//! The sealed secrets in etcd: each at `<prefix><name>`, sealed with
//! `--store-key-file` and bound to its name, shared by every replica.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp};

use super::EtcdStore;
use crate::store::StoreError;
use crate::store::sealed::{Kek, Sealed, SecretError, SecretHome, SecretWrite, Versioned};

/// [`SecretHome`] on etcd.
#[derive(Debug, Clone)]
pub struct EtcdSecrets {
    store: Arc<EtcdStore>,
    kek: Arc<Kek>,
}

impl EtcdSecrets {
    pub fn new(store: Arc<EtcdStore>, kek: Arc<Kek>) -> Self {
        Self { store, kek }
    }

    fn store_err(&self, name: &str, e: StoreError) -> SecretError {
        SecretError::Store { at: self.describe(name), source: Box::new(e) }
    }
}

impl SecretHome for EtcdSecrets {
    fn get(&self, name: &str) -> Result<Option<Versioned>, SecretError> {
        let Some((value, version)) = self.store.get_raw(name).map_err(|e| self.store_err(name, e))? else {
            return Ok(None);
        };
        let sealed: Sealed = serde_json::from_slice(&value)
            .map_err(|e| SecretError::Corrupt { at: self.describe(name), why: e.to_string() })?;
        let value =
            self.kek.open(&sealed, name).map_err(|source| SecretError::Seal { at: self.describe(name), source })?;
        Ok(Some(Versioned { value, version }))
    }

    fn put(&self, guard: Option<(&str, i64)>, writes: Vec<SecretWrite>) -> Result<bool, SecretError> {
        let key = |name: &str| format!("{}{name}", self.store.prefix);
        let compares = match guard {
            Some((name, 0)) => vec![Compare::create_revision(key(name), CompareOp::Equal, 0)],
            Some((name, version)) => vec![Compare::mod_revision(key(name), CompareOp::Equal, version)],
            None => Vec::new(),
        };
        let (mut puts, mut deletes) = (Vec::new(), Vec::new());
        for (name, value) in writes {
            match value {
                Some(plain) => {
                    let sealed = self
                        .kek
                        .seal(&plain, name)
                        .map_err(|source| SecretError::Seal { at: self.describe(name), source })?;
                    let json = serde_json::to_vec(&sealed)
                        .map_err(|e| SecretError::Corrupt { at: self.describe(name), why: e.to_string() })?;
                    puts.push((key(name), json));
                }
                None => deletes.push(key(name)),
            }
        }
        let at = guard.map(|(n, _)| n).unwrap_or("secrets");
        self.store.txn(compares, puts, deletes).map_err(|e| self.store_err(at, e))
    }

    fn describe(&self, name: &str) -> String {
        format!("etcd:{}{name}", self.store.prefix)
    }
}
