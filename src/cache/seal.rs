//! The cache's seal: how a manager knows that an artifact holds the code
//! it compiled, before any host maps it as executable code.
//!
//! A secret key of this user's lives in the cache directory, which no
//! grant may reach (see [`super::check_grants`]). Beside each artifact, a
//! seal file holds two HMAC-SHA256 tags under that key: one of the
//! artifact's bytes, written when it was compiled, and a *stamp*: one of
//! the file's identity (device, inode, size, mtime, ctime) when its bytes
//! were last checked against the first. A later process checks the stamp
//! against the file as it is now (one `fstat`): only a file whose identity
//! changed (any write does: the kernel sets ctime) is read and hashed
//! again. The identity then goes to the host, which loads the file only if
//! it still has it. Whoever cannot read the key cannot forge either tag;
//! a failed check discards the artifact and compiles the component again.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use hmac::{Hmac, Mac};
use malt_protocol::ArtifactIdentity;
use sha2::Sha256;

use crate::error::{Error, Result};

type Tag = Hmac<Sha256>;

/// The key's file in the cache directory.
const KEY_FILE: &str = "key";
const KEY_LEN: usize = 32;
/// Domain separation between the two tags.
const CONTENT: &[u8] = b"malt artifact content\0";
const STAMP: &[u8] = b"malt artifact stamp\0";

/// The seal file of an artifact.
fn seal_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("seal")
}

type Key = [u8; KEY_LEN];

/// This cache's key, created on first use (memoized per directory).
fn key(dir: &Path) -> Result<Key> {
    static KEYS: OnceLock<Mutex<Vec<(PathBuf, Key)>>> = OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let mut keys = keys.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, key)) = keys.iter().find(|(d, _)| d == dir) {
        return Ok(*key);
    }
    let key = load_or_create_key(dir)?;
    keys.push((dir.to_path_buf(), key));
    Ok(key)
}

fn load_or_create_key(dir: &Path) -> Result<[u8; KEY_LEN]> {
    let path = dir.join(KEY_FILE);
    let bad_key = |why: String| {
        Error::Component(format!(
            "the artifact cache's key {} {why}; remove it (malt makes a new one and \
             compiles again)",
            path.display()
        ))
    };
    for _ in 0..2 {
        match open_private(&path) {
            Ok((mut file, meta)) => {
                if meta.len() != KEY_LEN as u64 {
                    return Err(bad_key(format!("has {} bytes, not {KEY_LEN}", meta.len())));
                }
                let mut key = [0; KEY_LEN];
                file.read_exact(&mut key)
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
                return Ok(key);
            }
            Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                getrandom::fill(&mut key).map_err(|e| {
                    Error::io("cannot get random bytes for the cache key", e.into())
                })?;
                // Published with a link, which never replaces: concurrent
                // managers agree on the first key.
                let tmp = dir.join(format!("key.tmp{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                super::write_private(&tmp, &key)
                    .map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(Error::io(format!("cannot create {}", path.display()), e));
                    }
                }
            }
            Err(OpenError::Io(e)) => {
                return Err(Error::io(format!("cannot open {}", path.display()), e));
            }
            Err(OpenError::NotPrivate(why)) => return Err(bad_key(why)),
        }
    }
    Err(bad_key("keeps disappearing".into()))
}

enum OpenError {
    Io(std::io::Error),
    NotPrivate(String),
}

/// Opens a file never through a symlink, and only a regular file of this
/// user that no one else may read or write.
fn open_private(path: &Path) -> std::result::Result<(std::fs::File, std::fs::Metadata), OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(OpenError::NotPrivate(format!(
            "is not a private file of this user (owner {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok((file, meta))
}

fn tag(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> Tag {
    let mut mac = Tag::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A seal file: the content tag, and the stamp if one was written.
struct Seal {
    content: Vec<u8>,
    stamp: Option<Vec<u8>>,
}

impl Seal {
    fn render(&self) -> String {
        format!(
            "content {}\nstamp {}\n",
            super::hex(&self.content),
            self.stamp
                .as_deref()
                .map(super::hex)
                .unwrap_or_else(|| "-".into())
        )
    }

    fn parse(text: &str) -> Option<Seal> {
        let mut lines = text.lines();
        let content = unhex(lines.next()?.strip_prefix("content ")?)?;
        let stamp = match lines.next()?.strip_prefix("stamp ")? {
            "-" => None,
            s => Some(unhex(s)?),
        };
        Some(Seal { content, stamp })
    }

    fn read(artifact: &Path) -> std::result::Result<Seal, String> {
        let path = seal_path(artifact);
        let (file, meta) = match open_private(&path) {
            Ok(opened) => opened,
            Err(OpenError::Io(e)) => return Err(format!("its seal {}: {e}", path.display())),
            Err(OpenError::NotPrivate(why)) => {
                return Err(format!("its seal {} {why}", path.display()));
            }
        };
        let mut text = String::new();
        file.take(meta.len().min(1024))
            .read_to_string(&mut text)
            .map_err(|e| format!("its seal {}: {e}", path.display()))?;
        Seal::parse(&text).ok_or_else(|| format!("its seal {} is garbled", path.display()))
    }

    /// Replaces the seal file (write, then rename).
    fn write(&self, artifact: &Path) -> std::io::Result<()> {
        let path = seal_path(artifact);
        let tmp = path.with_extension(format!("seal.tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        super::write_private(&tmp, self.render().as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
    }
}

/// Seals a freshly compiled artifact before it is published at `artifact`
/// (the seal first: a manager that sees the artifact finds its seal).
pub(crate) fn seal(dir: &Path, artifact: &Path, bytes: &[u8]) -> Result<()> {
    let key = key(dir)?;
    let seal = Seal {
        content: tag(&key, &[CONTENT, bytes])
            .finalize()
            .into_bytes()
            .to_vec(),
        stamp: None,
    };
    seal.write(artifact).map_err(|e| {
        Error::io(
            format!("cannot write the seal of {}", artifact.display()),
            e,
        )
    })
}

/// Checks a cached artifact against its seal and returns the identity
/// under which its bytes are known good. `Ok(Err(why))` when the artifact
/// must not run (the caller discards it and compiles again); `Err` when
/// the cache itself is unusable.
pub(crate) fn verify(
    dir: &Path,
    artifact: &Path,
) -> Result<std::result::Result<ArtifactIdentity, String>> {
    let key = key(dir)?;
    Ok(check(&key, artifact))
}

fn check(key: &[u8; KEY_LEN], artifact: &Path) -> std::result::Result<ArtifactIdentity, String> {
    let (mut file, meta) = match open_private(artifact) {
        Ok(opened) => opened,
        Err(OpenError::Io(e)) => return Err(e.to_string()),
        Err(OpenError::NotPrivate(why)) => return Err(why),
    };
    let identity = ArtifactIdentity::of(&meta);
    let mut seal = Seal::read(artifact)?;
    let stamp = |content: &[u8]| tag(key, &[STAMP, &identity.to_bytes(), content]);
    if let Some(recorded) = &seal.stamp
        && stamp(&seal.content).verify_slice(recorded).is_ok()
    {
        return Ok(identity);
    }
    // New, or changed since its last check: hash the bytes.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    tag(key, &[CONTENT, &bytes])
        .verify_slice(&seal.content)
        .map_err(|_| {
            "its bytes are not those malt compiled (they fail the seal's MAC)".to_string()
        })?;
    let after = file.metadata().map_err(|e| e.to_string())?;
    if ArtifactIdentity::of(&after) != identity {
        return Err("it changed while being checked".into());
    }
    seal.stamp = Some(stamp(&seal.content).finalize().into_bytes().to_vec());
    if let Err(e) = seal.write(artifact) {
        // Still good; the next process checks the bytes again.
        tracing::debug!("cannot stamp {}: {e}", artifact.display());
    }
    Ok(identity)
}

/// Removes an artifact's seal.
pub(crate) fn discard(artifact: &Path) {
    let _ = std::fs::remove_file(seal_path(artifact));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let artifact = dir.join("a.cwasm");
        let bytes = b"compiled code".repeat(100);
        seal(dir, &artifact, &bytes).unwrap();
        super::super::write_private(&artifact, &bytes).unwrap();
        artifact
    }

    #[test]
    fn a_sealed_artifact_verifies_and_is_stamped() {
        let tmp = tempfile::tempdir().unwrap();
        let artifact = fresh(tmp.path());
        let first = verify(tmp.path(), &artifact).unwrap().unwrap();
        let seal = Seal::read(&artifact).unwrap();
        assert!(seal.stamp.is_some(), "the first check stamps the seal");
        assert_eq!(verify(tmp.path(), &artifact).unwrap().unwrap(), first);
        let key = std::fs::metadata(tmp.path().join(KEY_FILE)).unwrap();
        assert_eq!(key.mode() & 0o777, 0o600);
        assert_eq!(key.len(), KEY_LEN as u64);
    }

    #[test]
    fn changed_bytes_fail_even_with_the_old_identity_restamped() {
        let tmp = tempfile::tempdir().unwrap();
        let artifact = fresh(tmp.path());
        verify(tmp.path(), &artifact).unwrap().unwrap();
        // Same length, other bytes: the stamp no longer matches the new
        // ctime, so the bytes are hashed again, and fail.
        let mut bytes = std::fs::read(&artifact).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&artifact, &bytes).unwrap();
        let why = verify(tmp.path(), &artifact).unwrap().unwrap_err();
        assert!(why.contains("not those malt compiled"), "{why}");
    }

    #[test]
    fn a_forged_or_missing_seal_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let artifact = fresh(tmp.path());
        // A seal made with another key (an attacker's own).
        let other = Seal {
            content: tag(&[7; KEY_LEN], &[CONTENT, b"evil"])
                .finalize()
                .into_bytes()
                .to_vec(),
            stamp: None,
        };
        std::fs::write(&artifact, b"evil").unwrap();
        other.write(&artifact).unwrap();
        assert!(verify(tmp.path(), &artifact).unwrap().is_err());
        discard(&artifact);
        let why = verify(tmp.path(), &artifact).unwrap().unwrap_err();
        assert!(why.contains("seal"), "{why}");
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let artifact = fresh(tmp.path());
        let key_path = tmp.path().join(KEY_FILE);
        std::fs::set_permissions(
            &key_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        // A fresh process would read it again: go around the memo.
        let err = load_or_create_key(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("not a private file"), "{err}");
        let _ = artifact;
    }
}
