//! Writing credential files safely: private keys are created with mode 0600
//! from the start (never chmod'ed after being world-readable), and every
//! write goes to a temporary file that is renamed into place, so a crash never
//! leaves half a key or half a certificate behind.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` is filtered by the umask on create; make it exact.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a private key (mode 0600).
pub fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    write_atomic(path, contents.as_bytes(), 0o600)
}

/// Writes a public file such as a certificate (mode 0644).
pub fn write_public(path: &Path, contents: &str) -> std::io::Result<()> {
    write_atomic(path, contents.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        super::write_secret(&p, "secret").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        super::write_secret(&p, "secret2").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "secret2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }
}
