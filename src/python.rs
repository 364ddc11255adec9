//! Python guests: a CPython session in a wasm worker
//! ([`Worker::python`](crate::Worker::python)).
//!
//! The guest is a WebAssembly component built with
//! [componentize-py](https://github.com/bytecodealliance/componentize-py)
//! from the Python sources that ship inside malt (`guest/python`): CPython,
//! the guest's modules and a snapshot of the interpreter with the standard
//! library's common modules already imported. It is about 19 MB and not
//! embedded in malt: build it once with [`build_component`] (the CLI:
//! `malt build-python`), which needs `pip install componentize-py==0.25.1`.
//! It is written to [`component_path`], where `Worker::python()` looks, and
//! compiled into the artifact cache at once (like any component's), so the
//! first worker does not wait for CPython to compile. The build also
//! writes the rest of the standard library, compiled, beside the
//! component ([`stdlib_dir`]); every Python worker gets it read-only and
//! imports from it what the snapshot lacks.
//!
//! In a session, `remote_eval` runs code in one persistent namespace and
//! returns the value of a trailing expression (as Jupyter does), `None`
//! otherwise; `remote_call("f", args)` calls a function defined earlier.
//! Values cross as MessagePack: None, bool, int, float, str, bytes, list,
//! tuple, dict, nested. An exception is an [`Error::Remote`] carrying the
//! traceback of the user's frames. An interrupt raises `KeyboardInterrupt`
//! in running code, as CPython's own asynchronous exception (the host
//! writes it into the interpreter's thread state, which the interpreter
//! checks on every loop jump and call anyway), and in `time.sleep`,
//! `malt.sleep` and `malt.channel_take`; `try/except` catches it; code
//! that lets it propagate ends with `Interrupted { state_lost: false }`
//! and the namespace intact; code stuck inside C is killed after the grace
//! period (state lost), as any guest, unless the worker rolls back
//! ([`WorkerBuilder::rollback`](crate::WorkerBuilder::rollback)): then the
//! namespace is as it was before that cell.
//! Guest code can `import malt` for `interrupted()`, `sleep(s)`,
//! `channel_put/take/is_ready` and `env(name)`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Environment variable naming the Python guest component to use instead
/// of the one at the default [`component_path`].
pub const COMPONENT_ENV: &str = "MALT_PYTHON_COMPONENT";

/// The componentize-py version the guest is built with.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The Python sources of the guest, and the world it implements.
const SOURCES: [(&str, &str); 4] = [
    ("guest.py", include_str!("../guest/python/guest.py")),
    ("malt.py", include_str!("../guest/python/malt.py")),
    ("_msgpack.py", include_str!("../guest/python/_msgpack.py")),
    (
        "stdlib_export.py",
        include_str!("../guest/python/stdlib_export.py"),
    ),
];
const WIT: &str = include_str!("../wit/worker.wit");

/// Where `Worker::python()` finds the component: `$MALT_PYTHON_COMPONENT`,
/// else `malt-python/malt_python-VERSION.wasm` beside the artifact cache
/// directory (not in it: workers may read the standard library kept next
/// to the component, never the cache).
pub fn component_path() -> PathBuf {
    match std::env::var_os(COMPONENT_ENV).filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = crate::cache_dir();
            cache
                .parent()
                .map_or_else(|| cache.clone(), Path::to_path_buf)
                .join("malt-python")
                .join(format!("malt_python-{}.wasm", crate::VERSION))
        }
    }
}

/// The rest of the standard library beside a component `path`
/// (`x.wasm` → `x.stdlib`): its modules and their bytecode, written by the
/// build. A worker mounts it read-only, when it exists, and imports from it
/// what the component's snapshot lacks.
pub fn stdlib_dir(component: &Path) -> PathBuf {
    component.with_extension("stdlib")
}

/// What to do when the component is missing.
pub(crate) fn missing(path: &Path) -> String {
    format!(
        "the Python guest component is not built ({} does not exist): run `pip install \
         componentize-py=={COMPONENTIZE_PY_VERSION}` and `malt build-python` (or \
         malt::python::build_component), or set ${COMPONENT_ENV} to a built one",
        path.display()
    )
}

/// Builds the Python guest component into `out` (default:
/// [`component_path`]) with `componentize-py` from `PATH`, which must be
/// version [`COMPONENTIZE_PY_VERSION`], and compiles it into the artifact
/// cache, so that the first worker starts at once. Takes about twenty
/// seconds. Returns the path written.
pub fn build_component(out: Option<&Path>) -> Result<PathBuf> {
    let out = out.map_or_else(component_path, Path::to_path_buf);
    // componentize-py runs in a scratch directory.
    let out = std::path::absolute(&out)
        .map_err(|e| Error::Component(format!("cannot resolve {}: {e}", out.display())))?;
    let failed = |why: String| Error::Component(format!("cannot build the Python guest: {why}"));
    let version = Command::new("componentize-py")
        .arg("--version")
        .output()
        .map_err(|e| {
            failed(format!(
                "componentize-py not found ({e}): pip install \
                 componentize-py=={COMPONENTIZE_PY_VERSION}"
            ))
        })?;
    let version = String::from_utf8_lossy(&version.stdout);
    if version.split_whitespace().nth(1) != Some(COMPONENTIZE_PY_VERSION) {
        return Err(failed(format!(
            "found {}, need componentize-py {COMPONENTIZE_PY_VERSION}: pip install \
             componentize-py=={COMPONENTIZE_PY_VERSION}",
            version.trim()
        )));
    }
    // The scratch directory lies beside `out`: what is built there is
    // renamed into place.
    let parent = out.parent().unwrap_or(Path::new("/"));
    let work = std::fs::create_dir_all(parent)
        .and_then(|()| scratch_dir(parent))
        .map_err(|e| failed(format!("cannot make a scratch directory: {e}")))?;
    // The guest, and the standard library's export (see stdlib_export.py),
    // built side by side, each in a copy of the sources.
    let result = (|| {
        for part in ["guest", "export"] {
            let dir = work.join(part);
            std::fs::create_dir_all(dir.join("wit"))?;
            std::fs::write(dir.join("wit/worker.wit"), WIT)?;
            for (name, source) in SOURCES {
                std::fs::write(dir.join(name), source)?;
            }
        }
        std::io::Result::Ok(())
    })()
    .map_err(|e| failed(format!("cannot write the sources: {e}")));
    let componentize = |part: &str, app: &str| {
        Command::new("componentize-py")
            .current_dir(work.join(part))
            .args(["-q", "-d", "wit", "-w", "worker", "componentize", "-p", "."])
            .args([app, "-o", "out.wasm"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run componentize-py: {e}")))
    };
    let built = result.and_then(|()| {
        let guest = componentize("guest", "guest")?;
        let export = componentize("export", "stdlib_export");
        let finished = |child: std::process::Child, what: &str| -> Result<()> {
            let output = child
                .wait_with_output()
                .map_err(|e| failed(format!("componentize-py ({what}): {e}")))?;
            if output.status.success() {
                return Ok(());
            }
            Err(failed(format!(
                "componentize-py failed ({what}, {}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        };
        let guest = finished(guest, "the guest");
        let export = export.and_then(|child| finished(child, "the standard library"));
        guest.and(export)?;
        let stdlib = stdlib_dir(&out);
        let _ = std::fs::remove_dir_all(&stdlib);
        std::fs::rename(work.join("export/stdlib"), &stdlib)
            .map_err(|e| failed(format!("cannot write {}: {e}", stdlib.display())))?;
        std::fs::rename(work.join("guest/out.wasm"), &out)
            .map_err(|e| failed(format!("cannot write {}: {e}", out.display())))
    });
    let _ = std::fs::remove_dir_all(&work);
    built?;
    // Compiled now, into the artifact cache: the first worker of a fresh
    // program then starts in milliseconds, not after compiling CPython.
    crate::cache::component_artifact(&out, false)?;
    Ok(out)
}

/// A fresh private directory in `parent`.
fn scratch_dir(parent: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let dir = parent.join(format!(".malt-python-build-{name}"));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}
