//! The artifact cache: components compiled once, loaded by every worker.
//!
//! Compiling the script guest with Cranelift takes seconds and ~100 MB;
//! loading a compiled artifact takes under a millisecond. So the manager
//! compiles a component once (never inside a worker) and keeps the
//! artifact in a private directory, keyed on the component's SHA-256, the
//! wasmtime version and the engine's compatibility hash. Loading an
//! artifact runs native code, so the directory must be writable by its
//! owner only (malt creates it 0700 and refuses one that is not), no guest
//! may be granted it, and an artifact runs only once its bytes check out
//! against the cache's keyed seal (see `seal`).

mod seal;

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use malt_protocol::ArtifactIdentity;
use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::error::{Error, Result};

/// The version of wasmtime that runs wasm guests (part of every artifact's
/// cache key; `malt --version` prints it).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "MALT_CACHE_DIR";

/// The compiling engines (without and with fuel metering), made once per
/// process.
fn engine(fuel: bool) -> Result<&'static Engine> {
    static ENGINES: [OnceLock<std::result::Result<Engine, String>>; 2] =
        [OnceLock::new(), OnceLock::new()];
    ENGINES[fuel as usize]
        .get_or_init(|| {
            Engine::new(&crate::host::wasm::engine_config(fuel)).map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| Error::Component(format!("cannot create the wasm engine: {e}")))
}

/// The cache directory: `$MALT_CACHE_DIR`, else `$XDG_CACHE_HOME/malt`,
/// else `~/.cache/malt` (the home from `$HOME`, else from the user
/// database); only for a user without a home, `$TMPDIR/malt-UID`, which is
/// used only if this user owns it and no one else can write it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("malt");
    }
    match std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(passwd_home)
    {
        Some(home) => home.join(".cache").join("malt"),
        // No home at all: a per-user directory in the shared temporary
        // directory, which `private_dir` refuses unless this user owns it
        // and nobody else can write it.
        // SAFETY: geteuid has no preconditions.
        None => std::env::temp_dir().join(format!("malt-{}", unsafe { libc::geteuid() })),
    }
}

/// This user's home directory from the user database (when `$HOME` is
/// unset, as for a service).
fn passwd_home() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r with a zeroed passwd, a buffer of its stated
    // length and a result pointer, all living across the call; the strings
    // it returns point into `buf`, copied out before `buf` is dropped.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pw.pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr(pw.pw_dir).to_bytes();
        (!dir.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(dir)))
    }
}

/// A path with its longest existing prefix resolved (symlinks followed),
/// so that paths are compared as the kernel would see them.
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Refuses a grant, read-only or read-write, that contains the artifact
/// cache or lies inside it: a guest that can write there could replace the
/// compiled code other workers run, and one that can read it could read
/// the key that seals those artifacts.
pub(crate) fn check_grants(dirs: &[crate::DirGrant]) -> std::result::Result<(), String> {
    if dirs.is_empty() {
        // Most workers: nothing to resolve on the start-up path.
        return Ok(());
    }
    let cache = resolved(&cache_dir());
    for dir in dirs {
        let granted = resolved(Path::new(&dir.host));
        if cache.starts_with(&granted) || granted.starts_with(&cache) {
            return Err(format!(
                "refusing to grant {}: it {} malt's artifact cache ({}), where a guest could \
                 {} the code other workers run; grant another directory (or move the cache \
                 with ${CACHE_DIR_ENV})",
                dir.host,
                if granted.starts_with(&cache) {
                    "lies inside"
                } else {
                    "contains"
                },
                cache.display(),
                if dir.read_only {
                    "read the key that vouches for"
                } else {
                    "replace"
                }
            ));
        }
    }
    Ok(())
}

/// Creates the cache directory if needed and checks that only its owner
/// (this user) can write it.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::io(
            format!("cannot create the cache directory {}", dir.display()),
            e,
        )
    })?;
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::Component(format!(
            "the cache directory {} belongs to another user (uid {}); refusing to load artifacts from it",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("cannot make {} private", dir.display()), e))?;
    }
    Ok(())
}

/// Hex SHA-256 of a component.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn compatibility_key(engine: &Engine) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    WASMTIME_VERSION.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// What a wasm file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WasmKind {
    /// A component (the component model; WASI 0.2).
    Component,
    /// A core module (e.g. a WASI preview 1 program).
    CoreModule,
}

/// Tells a component from a core module, with a clear message when the
/// bytes are neither.
pub(crate) fn wasm_kind(bytes: &[u8], what: &str) -> Result<WasmKind> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(Error::Component(format!(
            "{what} is not a WebAssembly file (no \\0asm header)"
        )));
    }
    // Bytes 4..8: a core module has version 1, layer 0; a component has
    // layer 1.
    Ok(if bytes[6..8] == [0, 0] {
        WasmKind::CoreModule
    } else {
        WasmKind::Component
    })
}

/// Checks that `bytes` look like a component, with a clear message when not.
pub(crate) fn check_component(bytes: &[u8], what: &str) -> Result<()> {
    match wasm_kind(bytes, what)? {
        WasmKind::Component => Ok(()),
        WasmKind::CoreModule => Err(Error::Component(format!(
            "{what} is a core WebAssembly module, not a component: a worker guest is a \
             component (build it for wasm32-wasip2, or wrap it with `wasm-tools component \
             new`); `malt run` runs WASI preview 1 modules as they are"
        ))),
    }
}

/// Compiles a component or a core module.
/// Compiles wasm into an artifact, in a child process with limits (see
/// `compiler`): the manager never runs Cranelift on untrusted input.
fn precompile(bytes: &[u8], what: &str, fuel: bool) -> Result<Vec<u8>> {
    crate::compiler::compile(bytes, wasm_kind(bytes, what)?, fuel, what)
}

/// A compiled component in the cache, checked against its seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Artifact {
    /// Where it is.
    pub path: PathBuf,
    /// The file whose bytes were checked: a host loads only this file.
    pub identity: ArtifactIdentity,
}

/// Artifacts checked by this process, by (cache directory, component
/// hash, fuel).
type Known = Mutex<HashMap<(PathBuf, String, bool), Artifact>>;

fn known() -> &'static Known {
    static KNOWN: OnceLock<Known> = OnceLock::new();
    KNOWN.get_or_init(Default::default)
}

/// Returns the compiled artifact of a component, compiling it first if the
/// cache does not have it (or has one that fails its seal). Blocking: call
/// it off the async runtime.
pub(crate) fn artifact(bytes: &[u8], sha256: &str, what: &str, fuel: bool) -> Result<Artifact> {
    artifact_status(bytes, sha256, what, fuel).map(|(artifact, _)| artifact)
}

/// A component file's hash, from [`component_digest`].
pub(crate) struct ComponentDigest {
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its bytes, when they had to be read to hash them.
    pub bytes: Option<Vec<u8>>,
    /// The open file: read it (`read_component`) if the bytes are needed
    /// after all.
    pub file: std::fs::File,
}

/// The hash of the component file at `path`, read and hashed once per
/// version of the file in this process: a file whose identity (device,
/// inode, size, mtime, ctime: any write changes one) is the one hashed
/// before keeps that hash. A 19 MB component (the Python guest) costs a
/// `stat` per worker, not tens of milliseconds.
pub(crate) fn component_digest(path: &Path) -> Result<ComponentDigest> {
    type Hashed = Mutex<HashMap<(PathBuf, ArtifactIdentity), String>>;
    static HASHED: OnceLock<Hashed> = OnceLock::new();
    let what = path.display().to_string();
    let cannot_read = |e| Error::io(format!("cannot read the component {what}"), e);
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    let identity = ArtifactIdentity::of(&file.metadata().map_err(cannot_read)?);
    let key = (path.to_path_buf(), identity);
    let hashed = HASHED.get_or_init(Default::default);
    let known = hashed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let (sha256, bytes) = match known {
        Some(sha256) => (sha256, None),
        None => {
            let bytes = read_component(&mut file, &what)?;
            let sha256 = sha256_hex(&bytes);
            hashed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, sha256.clone());
            (sha256, Some(bytes))
        }
    };
    Ok(ComponentDigest {
        sha256,
        size: identity.size,
        bytes,
        file,
    })
}

/// Reads a component from an open file, checking that it is one.
pub(crate) fn read_component(file: &mut std::fs::File, what: &str) -> Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| Error::io(format!("cannot read the component {what}"), e))?;
    check_component(&bytes, what)?;
    Ok(bytes)
}

/// The artifact of the component file at `path` (hashed as
/// [`component_digest`] does; read again only if it must be compiled).
pub(crate) fn component_artifact(path: &Path, fuel: bool) -> Result<Artifact> {
    let what = path.display().to_string();
    let ComponentDigest {
        sha256,
        bytes,
        mut file,
        ..
    } = component_digest(path)?;
    if let Some(bytes) = bytes {
        return artifact(&bytes, &sha256, &what, fuel);
    }
    artifact_from(&sha256, &what, fuel, || {
        // Compiling after all (the cache lost it): the same open file,
        // checked against the hash it had.
        let bytes = read_component(&mut file, &what)?;
        match sha256_hex(&bytes) == sha256 {
            true => Ok(Cow::Owned(bytes)),
            false => Err(Error::Component(format!(
                "{what} changed while it was read"
            ))),
        }
    })
    .map(|(artifact, _)| artifact)
}

/// Like [`artifact`], and tells whether the cache had it already.
pub(crate) fn artifact_status(
    bytes: &[u8],
    sha256: &str,
    what: &str,
    fuel: bool,
) -> Result<(Artifact, bool)> {
    artifact_from(sha256, what, fuel, || Ok(Cow::Borrowed(bytes)))
}

/// Like [`artifact_status`], getting the component's bytes only if it
/// must be compiled.
fn artifact_from<'a>(
    sha256: &str,
    what: &str,
    fuel: bool,
    bytes: impl FnOnce() -> Result<Cow<'a, [u8]>>,
) -> Result<(Artifact, bool)> {
    let dir = cache_dir();
    let key = (dir.clone(), sha256.to_string(), fuel);
    if let Some(artifact) = known().lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok((artifact.clone(), true));
    }
    let path = artifact_path(&dir, sha256, fuel)?;
    private_dir(&dir)?;
    let mut was_cached = path.exists();
    let checked = match was_cached {
        true => seal::verify(&dir, &path)?,
        false => Err(String::new()),
    };
    let identity = match checked {
        Ok(identity) => identity,
        Err(why) => {
            if was_cached {
                tracing::warn!(
                    "{what}: not running the cached artifact {}: {why}; compiling again",
                    path.display()
                );
                remove(&path);
                was_cached = false;
            }
            compile_into(&bytes()?, &dir, &path, what, fuel)?;
            seal::verify(&dir, &path)?.map_err(|why| {
                Error::Component(format!(
                    "the artifact just compiled for {what} ({}) fails its check: {why}",
                    path.display()
                ))
            })?
        }
    };
    let artifact = Artifact { path, identity };
    known()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, artifact.clone());
    Ok((artifact, was_cached))
}

/// The artifact store of a host whose manager is on another machine (see
/// `malt_host::ComponentStore`): this machine's cache, the bytes fetched
/// from the manager only when the cache lacks the component, and checked
/// against the hash the manager named it by before they are compiled.
pub(crate) fn remote_store(
    request: malt_host::ComponentRequest<'_>,
) -> std::result::Result<(String, ArtifactIdentity), String> {
    let sha256 = request.sha256;
    // The hash becomes a file name: nothing but a hash passes.
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(format!("{sha256:?} is not a SHA-256 in lowercase hex"));
    }
    // The manager checked its grants against its own cache; this host's
    // cache is another directory.
    check_grants(request.dirs)?;
    let what = format!("the component {}", &sha256[..12]);
    let fetch = request.fetch;
    let (artifact, _) = artifact_from(sha256, &what, request.fuel, || {
        let bytes = fetch().map_err(Error::Component)?;
        let got = sha256_hex(&bytes);
        if got != sha256 {
            return Err(Error::Component(format!(
                "the bytes sent for {what} have another hash ({got}): refused"
            )));
        }
        check_component(&bytes, &what)?;
        Ok(Cow::Owned(bytes))
    })
    .map_err(|e| e.to_string())?;
    Ok((
        artifact.path.to_string_lossy().into_owned(),
        artifact.identity,
    ))
}

fn remove(artifact: &Path) {
    let _ = std::fs::remove_file(artifact);
    seal::discard(artifact);
}

/// Removes an artifact that failed to load, so the next request compiles
/// the component again.
pub(crate) fn discard(artifact: &Path) {
    remove(artifact);
    known()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|_, known| known.path != artifact);
}

/// Where the artifact of a component (by hash) lives in the cache.
fn artifact_path(dir: &Path, sha256: &str, fuel: bool) -> Result<PathBuf> {
    let engine = engine(fuel)?;
    Ok(dir.join(format!("{sha256}-{}.cwasm", compatibility_key(engine))))
}

/// Compiles a component to a standalone artifact file (for `malt compile -o`).
pub(crate) fn compile_to_file(bytes: &[u8], what: &str, out: &Path, fuel: bool) -> Result<()> {
    let compiled = precompile(bytes, what, fuel)?;
    std::fs::write(out, compiled)
        .map_err(|e| Error::io(format!("cannot write {}", out.display()), e))
}

/// Writes a new file only its owner can read or write (0600).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// Compiles under a file lock, so that concurrent managers compile a
/// component once, and publishes the artifact with an atomic rename.
fn compile_into(bytes: &[u8], dir: &Path, path: &Path, what: &str, fuel: bool) -> Result<()> {
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
    lock.lock()
        .map_err(|e| Error::io(format!("cannot lock {}", lock_path.display()), e))?;
    if path.exists() {
        return Ok(());
    }
    let compiled = precompile(bytes, what, fuel)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // Left behind by a process of the same pid that crashed.
    let _ = std::fs::remove_file(&tmp);
    // Sealed before it is published: a manager that finds the artifact
    // finds its seal.
    seal::seal(dir, path, &compiled)?;
    write_private(&tmp, &compiled)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("cannot write the artifact {}", path.display()), e)
        })?;
    let _ = std::fs::remove_file(&lock_path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_database_knows_this_users_home() {
        // The fallback for a process without $HOME (a service): never a
        // shared directory when the user has a home.
        let home = passwd_home().expect("this user has an entry with a home");
        assert!(home.is_absolute(), "{}", home.display());
    }

    #[test]
    fn component_header_check() {
        assert!(check_component(b"hello world", "x").is_err());
        let core = b"\0asm\x01\0\0\0";
        let err = check_component(core, "x").unwrap_err().to_string();
        assert!(err.contains("core WebAssembly module"), "{err}");
        assert!(check_component(b"\0asm\x0d\0\x01\0", "x").is_ok());
    }

    fn request<'a>(
        sha256: &'a str,
        dirs: &'a [crate::DirGrant],
        fetch: &'a mut dyn FnMut() -> std::result::Result<Vec<u8>, String>,
    ) -> malt_host::ComponentRequest<'a> {
        malt_host::ComponentRequest {
            sha256,
            size: 8,
            fuel: false,
            dirs,
            fetch,
        }
    }

    #[test]
    fn a_remote_host_refuses_bytes_that_are_not_the_named_component() {
        // A hash that names no cached artifact: the bytes are fetched, and
        // refused before anything compiles them.
        let named = sha256_hex(b"the component the manager named");
        let mut fetched = 0;
        let mut fetch = || {
            fetched += 1;
            Ok(b"\0asm\x0d\0\x01\0".to_vec())
        };
        let err = remote_store(request(&named, &[], &mut fetch)).unwrap_err();
        assert!(err.contains("another hash"), "{err}");
        assert_eq!(fetched, 1);

        // Nothing but a hash becomes a file name.
        let mut never = || -> std::result::Result<Vec<u8>, String> { panic!("fetched") };
        for bad in ["../../../etc/passwd", &"AB".repeat(32), &"a".repeat(63)] {
            let err = remote_store(request(bad, &[], &mut never)).unwrap_err();
            assert!(err.contains("not a SHA-256"), "{err}");
        }

        // A grant that reaches this machine's cache is refused here too.
        let grant = [crate::DirGrant {
            host: cache_dir().to_string_lossy().into_owned(),
            guest: "/c".into(),
            read_only: true,
        }];
        assert!(remote_store(request(&named, &grant, &mut never)).is_err());
    }

    #[test]
    fn a_component_file_is_hashed_again_only_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("malt-hash-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.wasm");
        // Not a component: reading it fails the header check, each time
        // it is read.
        std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
        let err = component_artifact(&path, false).unwrap_err().to_string();
        assert!(err.contains("core WebAssembly module"), "{err}");
        // A changed file is read again (and its new error seen).
        std::fs::write(&path, b"not wasm at all").unwrap();
        let err = component_artifact(&path, false).unwrap_err().to_string();
        assert!(!err.contains("core WebAssembly module"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
