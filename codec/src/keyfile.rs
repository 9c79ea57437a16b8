//! Secret key files on disk.
//!
//! The only module of this crate that touches the filesystem. A key file is
//! text, so an operator can see what it is:
//!
//! ```text
//! # celluler ed25519 secret key; public key: <52 base32 chars>
//! celluler-secret-key-v1 <52 base32 chars of the 32-byte secret seed>
//! ```
//!
//! It is created with mode 0600 and refused when group or others can read it.

use crate::error::KeyError;
use crate::key::{Keypair, decode_b32, encode_b32};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The tag that starts the secret line of a key file.
pub const KEYFILE_TAG: &str = "celluler-secret-key-v1";

/// Why a key file could not be read or written.
#[derive(Debug, Error)]
pub enum KeyFileError {
    /// The file could not be opened, read or written. The OS error is
    /// part of the message, not a `source()`, so a printed chain names it
    /// once.
    #[error("key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file exists where a new key was to be written.
    #[error(
        "key file {0} already exists; refusing to overwrite an identity (remove it first if you mean to)"
    )]
    Exists(PathBuf),
    /// Group or others may read the file.
    #[error(
        "key file {path} has mode {mode:03o}: group or others can read this secret; run `chmod 600 {}`",
        shell_word(path)
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file.
    #[error("key file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line number.
        reason: String,
    },
}

/// `path` as one shell word, quoted if it needs to be, for a command the
/// operator can paste.
fn shell_word(path: &Path) -> String {
    let s = path.to_string_lossy();
    shlex::try_quote(&s).map_or_else(|_| s.to_string(), |q| q.into_owned())
}

/// Writes `kp` to a new file at `path` with mode 0600, creating parent
/// directories (mode 0700). Refuses to overwrite an existing file.
pub fn write_keyfile(path: &Path, kp: &Keypair) -> Result<(), KeyFileError> {
    let io = |error| KeyFileError::Io {
        path: path.to_owned(),
        error,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir).map_err(io)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    let text = format!(
        "# celluler ed25519 secret key; public key: {}\n{KEYFILE_TAG} {}\n",
        kp.public(),
        encode_b32(&kp.secret_bytes())
    );
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Reads the keypair stored at `path`, refusing a file that group or others
/// can read, or whose content is not exactly one key line (comments aside).
pub fn read_keyfile(path: &Path) -> Result<Keypair, KeyFileError> {
    let io = |error| KeyFileError::Io {
        path: path.to_owned(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    // A key file is two short lines; anything much bigger is not one.
    if meta.len() > 4096 {
        return Err(malformed(
            path,
            format!("{} bytes; a key file is under 200", meta.len()),
        ));
    }
    let text = std::fs::read(path).map_err(io)?;
    let text = String::from_utf8(text).map_err(|_| malformed(path, "not UTF-8 text".into()))?;
    parse_keyfile(&text).map_err(|reason| malformed(path, reason))
}

/// Reads the keypair at `path`, or creates one there if the file is absent.
/// Returns the keypair and whether it was created.
pub fn load_or_create_keyfile(path: &Path) -> Result<(Keypair, bool), KeyFileError> {
    match read_keyfile(path) {
        Ok(kp) => Ok((kp, false)),
        Err(KeyFileError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate();
            write_keyfile(path, &kp)?;
            Ok((kp, true))
        }
        Err(e) => Err(e),
    }
}

fn malformed(path: &Path, reason: String) -> KeyFileError {
    KeyFileError::Malformed {
        path: path.to_owned(),
        reason,
    }
}

/// Parses the text of a key file.
fn parse_keyfile(text: &str) -> Result<Keypair, String> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let (tag, value) = line
            .split_once(' ')
            .ok_or_else(|| format!("line {n}: expected `{KEYFILE_TAG} <key>`"))?;
        if tag != KEYFILE_TAG {
            return Err(format!("line {n}: expected `{KEYFILE_TAG}`, found {tag:?}"));
        }
        if found.is_some() {
            return Err(format!("line {n}: a second key"));
        }
        let secret = decode_b32(value).map_err(|e: KeyError| format!("line {n}: {e}"))?;
        found = Some(Keypair::from_secret_bytes(&secret));
    }
    found.ok_or_else(|| format!("no `{KEYFILE_TAG}` line"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_key_reads_back_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cell.key");
        let kp = Keypair::generate();
        write_keyfile(&path, &kp).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_keyfile(&path).unwrap().public(), kp.public());
        assert!(matches!(
            write_keyfile(&path, &kp),
            Err(KeyFileError::Exists(_))
        ));
    }

    #[test]
    fn load_or_create_creates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (a, created) = load_or_create_keyfile(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create_keyfile(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
    }

    #[test]
    fn readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_keyfile(&path, &Keypair::generate()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_keyfile(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Permissions { mode: 0o644, .. }));
        assert!(
            err.to_string()
                .ends_with(&format!("run `chmod 600 {}`", path.display())),
            "{err}"
        );
        // Group-readable is refused too; a path with a space is quoted so
        // the command runs as printed.
        let spaced = dir.path().join("my key");
        write_keyfile(&spaced, &Keypair::generate()).unwrap();
        std::fs::set_permissions(&spaced, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_keyfile(&spaced).unwrap_err().to_string();
        assert!(
            err.contains("mode 640") && err.contains(&format!("chmod 600 '{}'", spaced.display())),
            "{err}"
        );
    }

    #[test]
    fn an_os_error_is_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_keyfile(&dir.path().join("absent")).unwrap_err();
        let shown = err.to_string();
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        // The cause is in the message, so nothing repeats it as a source.
        assert!(std::error::Error::source(&err).is_none());
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let good = encode_b32(&[7; 32]);
        let cases = [
            ("", "no `celluler-secret-key-v1` line"),
            ("hello\n", "line 1"),
            ("wrong-tag abc\n", "line 1: expected"),
            (
                &format!("{KEYFILE_TAG} abc\n") as &str,
                "line 1: a key is 52",
            ),
            (
                &format!("{KEYFILE_TAG} {good}\n{KEYFILE_TAG} {good}\n"),
                "line 2: a second key",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("k{i}"));
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = read_keyfile(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'#'; 10_000]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_keyfile(&path),
            Err(KeyFileError::Malformed { .. })
        ));
        let missing = read_keyfile(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(missing, KeyFileError::Io { .. }));
    }
}
