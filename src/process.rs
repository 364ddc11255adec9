//! Starting host processes: finding the host program, and making sure a
//! worker dies with its manager.
//!
//! Two mechanisms keep workers from outliving the manager: a host exits as
//! soon as its stdin (the protocol stream) reaches end of file, which the
//! kernel causes when the manager dies however it dies; and on Linux the
//! host sets `PR_SET_PDEATHSIG` on itself first thing (and checks that its
//! parent is still the manager, whose pid it gets as an argument). That
//! signal fires when the *thread* that spawned the child exits, so all
//! children are spawned from one dedicated thread that lives as long as
//! the process.
//!
//! The child does this itself rather than in a `pre_exec` hook: a hook
//! forces `fork` (copying the manager's page tables, milliseconds for a
//! big manager) where std otherwise uses `posix_spawn`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// Environment variable naming the host program.
pub const HOST_PROGRAM_ENV: &str = "MALT_HOST_PROGRAM";

/// Set by [`serve_if_host`]: the hook ran, so this executable can serve as
/// its own worker host.
static HOOK_RAN: AtomicBool = AtomicBool::new(false);

/// Every program that links malt can be a worker host: started with
/// [`malt_host::HOST_ARG`], it serves the protocol here, before `main` (or a
/// test harness) parses its arguments, and exits. So a library user needs no
/// `malt` binary and no call in `main`.
///
/// Before `main`, std's argument list may not be set up yet; the hook reads
/// the arguments from the kernel instead. Otherwise it does nothing but one
/// read of `/proc/self/cmdline`.
#[ctor::ctor(unsafe)]
fn serve_if_host() {
    HOOK_RAN.store(true, Ordering::Relaxed);
    if malt_host::first_arg_is(malt_host::HOST_ARG) {
        // A manager on another machine names its component by hash: this
        // machine's cache finds or compiles it.
        malt_host::set_component_store(crate::cache::remote_store);
        std::process::exit(malt_host::run_process(None));
    }
    if malt_host::first_arg_is(malt_host::zygote::ZYGOTE_ARG) {
        // Its children serve as hosts started with HOST_ARG do.
        malt_host::set_component_store(crate::cache::remote_store);
        std::process::exit(malt_host::zygote::run_zygote());
    }
    if malt_host::first_arg_is(crate::compiler::COMPILE_ARG) {
        let args: Vec<String> = malt_host::process_args()
            .into_iter()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        crate::compiler::serve(&args);
    }
}

/// Where a host program came from: the user chose it, or it is this
/// executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostProgram {
    /// `WorkerBuilder::host_program` or `$MALT_HOST_PROGRAM`; its version
    /// is checked in the handshake.
    Chosen(PathBuf),
    /// This executable, serving through [`serve_if_host`].
    ThisProgram(PathBuf),
}

impl HostProgram {
    pub fn path(&self) -> &Path {
        match self {
            HostProgram::Chosen(p) | HostProgram::ThisProgram(p) => p,
        }
    }
}

/// Finds the program that serves as a worker host: the builder's choice,
/// else `$MALT_HOST_PROGRAM`, else this executable.
pub(crate) fn host_program(chosen: Option<&Path>) -> Result<HostProgram, String> {
    if let Some(p) = chosen {
        return Ok(HostProgram::Chosen(p.to_path_buf()));
    }
    if let Some(p) = std::env::var_os(HOST_PROGRAM_ENV).filter(|p| !p.is_empty()) {
        return Ok(HostProgram::Chosen(PathBuf::from(p)));
    }
    // Keeps the hook linked in (it is referenced from here) and tells
    // whether it ran.
    if !HOOK_RAN.load(Ordering::Relaxed) {
        return Err(format!(
            "this program cannot serve as its own worker host (malt's start-up hook did \
             not run; is malt loaded as a plugin?): set {HOST_PROGRAM_ENV} or use \
             WorkerBuilder::host_program with a program that links malt, e.g. the malt CLI"
        ));
    }
    // /proc/self/exe works even if the file was replaced or deleted since
    // (a rebuild while the program runs).
    let exe = PathBuf::from("/proc/self/exe");
    if exe.exists() {
        Ok(HostProgram::ThisProgram(exe))
    } else {
        std::env::current_exe()
            .map(HostProgram::ThisProgram)
            .map_err(|e| format!("cannot find this program's executable: {e}"))
    }
}

type Job = (
    Command,
    tokio::runtime::Handle,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("malt-spawner".into())
            .spawn(move || {
                while let Ok((cmd, handle, reply)) = rx.recv() {
                    let _guard = handle.enter();
                    let mut cmd = tokio::process::Command::from(cmd);
                    // Dropping the child (e.g. a failed start) kills it.
                    cmd.kill_on_drop(true);
                    let _ = reply.send(spawn_retrying(&mut cmd));
                }
            })
            .expect("spawn the malt-spawner thread");
        tx
    })
}

/// Spawns `cmd`, again for a while if the program is busy being written
/// (ETXTBSY): a program just copied into place can be held open for
/// writing by a child that another thread of this process forked and
/// that has not exec'd yet, a window that closes by itself.
fn spawn_retrying(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            spawned => return spawned,
        }
    }
}

/// Spawns a launcher's command (`ssh …`) with piped stdio. It keeps this
/// process's environment (ssh needs its agent and home), leads a process
/// group of its own (killing the worker kills the group: a launcher that
/// is a script forking `ssh` goes whole) and gets SIGKILL when the manager
/// dies: the remote host then sees its stream end.
pub(crate) async fn spawn_launcher(mut cmd: Command) -> std::io::Result<tokio::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;

    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the
    // parent's (the hook runs between fork and exec).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_on_spawner(cmd).await
}

/// Spawns `cmd` as it is set up, from the spawner thread (so that a death
/// signal the child asks for is tied to a thread that lives as long as
/// this process).
pub(crate) async fn spawn_command(cmd: Command) -> std::io::Result<tokio::process::Child> {
    spawn_on_spawner(cmd).await
}

async fn spawn_on_spawner(cmd: Command) -> std::io::Result<tokio::process::Child> {
    let (tx, rx) = oneshot::channel();
    spawner()
        .send((cmd, tokio::runtime::Handle::current(), tx))
        .map_err(|_| std::io::Error::other("the malt-spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("the malt-spawner thread is gone"))?
}

/// Spawns a host process whose stdio are all pipes and whose environment
/// is empty.
pub(crate) async fn spawn_host(
    program: &Path,
    args: &[OsString],
) -> std::io::Result<tokio::process::Child> {
    use std::process::Stdio;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_on_spawner(cmd).await
}
