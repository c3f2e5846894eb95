//! What the control plane runs on, opened at start: the data dir (locked),
//! the store, the CA and its home, the token service, and the [`Shared`]
//! state the services hold.

use std::path::Path;
use std::sync::Arc;

use palisade_certs::TrustDomain;

use crate::attest::join_token::JoinTokenAttestor;
use crate::attest::{self, Attestors};
use crate::store::etcd::{EtcdOptions, EtcdSecrets, EtcdStore};
use crate::store::sealed::{FileSecrets, Kek, SecretHome};
use crate::store::{FileStore, Store};
use crate::{Config, Shared, StartError, ca, config, directory_guard, jwks, oauth, observe, pki, push};

/// Creates the data dir (owner only: it holds the CA key and token hashes)
/// and takes its lock: one control plane per data dir.
pub(crate) fn lock_data_dir(data: &Path) -> Result<std::fs::File, StartError> {
    let dir_err = |source: std::io::Error| {
        let runs_as = (source.kind() == std::io::ErrorKind::PermissionDenied).then(effective_ids).flatten();
        StartError::DataDir { path: data.to_path_buf(), source, runs_as }
    };
    std::fs::create_dir_all(data).map_err(dir_err)?;
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(dir_err)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("lock"))
        .map_err(dir_err)?;
    if lock.try_lock().is_err() {
        return Err(StartError::Locked { path: data.to_path_buf() });
    }
    Ok(lock)
}

/// This process's effective uid and gid, from /proc/self/status ("Uid:" and
/// "Gid:" list the real, effective, saved and filesystem ids).
fn effective_ids() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().nth(1)?.parse().ok();
    Some((effective("Uid:")?, effective("Gid:")?))
}

/// The fix a refused data dir needs, for [`StartError::DataDir`]'s message:
/// the image runs as 65532:65532, and a volume made by root is not writable by it.
pub(crate) fn data_dir_fix(path: &Path, runs_as: Option<(u32, u32)>) -> String {
    match runs_as {
        Some((uid, gid)) => format!(
            "; the control plane runs as {uid}:{gid} and the directory must be writable by it \
             (for a mounted volume, on the host: `chown {uid}:{gid} <the host directory>`; here: `chown {uid}:{gid} {}`)",
            path.display()
        ),
        None => String::new(),
    }
}

/// Runs a blocking start-up step off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The key that seals the store's secrets (`--store-key-file`), as private as the CA key.
fn store_key(path: &Path) -> Result<Arc<Kek>, StartError> {
    Ok(Arc::new(Kek::from_file(path, |p| pki::check_key_mode(p).is_ok())?))
}

/// The store (`--store`), and the etcd store when it is etcd; with
/// `--migrate-from`, a single-node install's state imported first.
pub(crate) async fn open_store(cfg: &Config) -> Result<(Arc<dyn Store>, Option<Arc<EtcdStore>>), StartError> {
    if cfg.store == config::StoreKind::File {
        return Ok((Arc::new(FileStore::open(&cfg.data_dir)?), None));
    }
    let opts = EtcdOptions {
        endpoints: cfg.etcd_endpoints.clone(),
        prefix: cfg.etcd_prefix.clone(),
        ca_file: cfg.etcd_ca_file.clone(),
        cert_file: cfg.etcd_cert_file.clone(),
        key_file: cfg.etcd_key_file.clone(),
        user: cfg.etcd_user.clone(),
        password_file: cfg.etcd_password_file.clone(),
    };
    let etcd = Arc::new(blocking(move || Ok(EtcdStore::open(&opts)?)).await?);
    tracing::info!(endpoints = %cfg.etcd_endpoints.join(","), prefix = %cfg.etcd_prefix, "state in etcd");
    if let (Some(from), Some(key_file)) = (&cfg.migrate_from, &cfg.store_key_file) {
        let secrets = EtcdSecrets::new(etcd.clone(), store_key(key_file)?);
        let (to, from) = (etcd.clone(), from.clone());
        let report = blocking(move || {
            let ca = ca::migrating(&from)?;
            let note = if ca.is_empty() {
                "no generated CA (an operator CA: give --ca-cert and --ca-key to every replica)"
            } else {
                "its generated CA"
            };
            Ok(format!("{}; {note}", to.import(&from, &secrets, ca)?))
        })
        .await?;
        tracing::info!(target: "audit", event = "migrated", "{report}");
    }
    Ok((etcd.clone(), Some(etcd)))
}

/// The CA in force, from its home: on etcd with a store key, the store's
/// sealed secrets (where it rotates; an operator's root without
/// `--ca-bundle` seeds it on the first start); else the data dir's files.
pub(crate) async fn open_ca(cfg: &Config, etcd: Option<&Arc<EtcdStore>>) -> Result<Arc<ca::Authority>, StartError> {
    let (data, td) = (&cfg.data_dir, &cfg.trust_domain);
    let operator = cfg.operator_ca().map(pki::operator_ca);
    let operator = operator.as_ref().map(|o| (o.cert.as_path(), o.key.as_path(), o.bundle.as_deref()));
    let home: Box<dyn ca::CaHome> = match (etcd, operator, &cfg.store_key_file) {
        (Some(etcd), op, Some(key_file)) if op.is_none_or(|(_, _, bundle)| bundle.is_none()) => {
            let secrets = EtcdSecrets::new(etcd.clone(), store_key(key_file)?);
            let seed = op.map(|(c, k, _)| (c.to_path_buf(), k.to_path_buf()));
            Box::new(ca::SealedHome::new(Arc::new(secrets), td, pki::ROOT_VALIDITY, seed))
        }
        (Some(_), None, None) => Box::new(ca::FileHome::new(
            data,
            td,
            None,
            Some("each replica keeps its own CA in its data dir (no --store-key-file): give the replicas --store-key-file so that the CA lives in etcd, where it can be rotated".into()),
        )),
        (None, Some((cert, key, None)), _) if cfg.ca_seed => Box::new(ca::FileHome::seeded(data, td, cert, key)),
        _ => Box::new(ca::FileHome::new(data, td, operator, None)),
    };
    let td = td.clone();
    let authority = Arc::new(blocking(move || Ok(ca::Authority::open(home, td)?)).await?);
    tracing::info!(ca = ?authority.view().signing, trust_domain = %cfg.trust_domain, "CA ready");
    Ok(authority)
}

/// The OAuth token service, when on; on etcd its signing keys are shared
/// by every replica, sealed like the CA.
pub(crate) async fn open_oauth(
    cfg: &Config,
    store: &Arc<dyn Store>,
    etcd: Option<&Arc<EtcdStore>>,
) -> Result<Option<Arc<oauth::TokenService>>, StartError> {
    let Some(issuer) = cfg.issuer_url() else { return Ok(None) };
    let settings = oauth::Settings { issuer, token_ttl: cfg.oauth_token_ttl, key_rotation: cfg.oauth_key_rotation };
    let (home, name): (Arc<dyn SecretHome>, _) = match (etcd, &cfg.store_key_file) {
        (Some(etcd), Some(key_file)) => {
            (Arc::new(EtcdSecrets::new(etcd.clone(), store_key(key_file)?)), oauth::KEYS_RECORD)
        }
        _ => (Arc::new(FileSecrets::new(&cfg.data_dir)), oauth::KEYS_FILE),
    };
    let store = store.clone();
    let service = blocking(move || Ok(oauth::TokenService::open_at(home, name, settings, store)?)).await?;
    Ok(Some(Arc::new(service)))
}

/// The Kubernetes attestor, with `--k8s-attestation`.
fn k8s_attestor(cfg: &Config, td: &TrustDomain) -> Result<Option<Arc<dyn attest::Attestor>>, StartError> {
    if !cfg.k8s_attestation {
        return Ok(None);
    }
    let api_server = cfg
        .k8s_api_server
        .clone()
        .or_else(attest::k8s::K8sConfig::in_cluster_api_server)
        .ok_or(attest::k8s::K8sError::NoApiServer)?;
    let k = attest::k8s::K8sAttestor::new(
        attest::k8s::K8sConfig {
            api_server,
            ca_file: cfg.k8s_ca_file.clone(),
            token_file: cfg.k8s_token_file.clone(),
            audience: cfg.k8s_audience.clone(),
        },
        td.clone(),
    )?;
    Ok(Some(Arc::new(k)))
}

/// The state the services share.
pub(crate) fn shared(
    cfg: &Config,
    store: Arc<dyn Store>,
    authority: Arc<ca::Authority>,
    oauth: Option<Arc<oauth::TokenService>>,
) -> Result<Arc<Shared>, StartError> {
    let td = &cfg.trust_domain;
    let roots = jwks::load_roots(
        cfg.jwks_ca_file.as_deref().unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt")),
        cfg.jwks_ca_file.is_some(),
    )?;
    let jwks = Arc::new(jwks::JwksCache::new(roots, cfg.jwks_refresh, cfg.jwks_min_refresh_interval)?);
    Ok(Arc::new(Shared {
        ca: authority,
        trust_domain: td.clone(),
        cert_ttl: cfg.cert_ttl,
        join_token_ttl: cfg.join_token_ttl,
        store: store.clone(),
        attestors: Attestors {
            join_token: Arc::new(JoinTokenAttestor { store: store.clone() }),
            k8s: k8s_attestor(cfg, td)?,
            trust_domain: td.clone(),
        },
        hub: push::Hub::new(cfg.push_coalesce),
        observe: Arc::new(observe::Observatory::new(cfg.preview_window, cfg.preview_memory_mib << 20)),
        directory: directory_guard::DirectoryGuard::new(
            cfg.inbound_addr_check,
            cfg.max_addresses_per_identity,
            cfg.directory_changes_per_minute,
        ),
        default_allow_authenticated: cfg.default_policy == config::DefaultPolicy::AllowAuthenticated,
        oauth,
        jwks,
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_refused_data_dir_names_the_user_and_the_chown() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let runs_as = effective_ids();
        let (uid, gid) = runs_as.expect("Linux has /proc/self/status");
        let tmp = tempfile::tempdir().unwrap();
        let made = std::fs::metadata(tmp.path()).unwrap();
        assert_eq!((uid, gid), (made.uid(), made.gid()), "what a file this process makes is owned by");
        let err = StartError::DataDir { path: "/data/cp".into(), source: denied, runs_as };
        let msg = err.to_string();
        assert!(msg.starts_with("cannot create data dir /data/cp: permission denied"), "{msg}");
        assert!(msg.contains(&format!("runs as {uid}:{gid}")), "{msg}");
        assert!(msg.contains(&format!("`chown {uid}:{gid} /data/cp`")), "{msg}");
    }

    #[test]
    fn a_data_dir_under_a_file_is_refused_without_the_chown_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = lock_data_dir(&file.join("cp")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("cannot create data dir {}/cp: ", file.display())), "{msg}");
        assert!(!msg.contains("chown"), "not a permission problem: {msg}");
    }
}
