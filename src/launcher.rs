//! How a worker's host is started and reached: as a process of this
//! program on this machine ([`Launcher::local`], the default), on threads
//! of this process ([`Launcher::in_process`]), or by a command that may
//! reach another machine.
//!
//! A host only needs a byte stream to its manager, so any command whose
//! stdin and stdout reach a remote `malt __malt-host` serves: OpenSSH with
//! the user's own configuration, keys and `ControlMaster`
//! ([`Launcher::ssh`]), `kubectl exec -i`, Slurm's `srun`
//! ([`Launcher::command`]), or anything else that implements [`Launch`].
//!
//! What changes for a host behind a launcher:
//!
//! - **The component travels by content.** The manager names it by its
//!   SHA-256; the host looks in its own machine's artifact cache and asks
//!   for the bytes only if it lacks them, checks them against the hash,
//!   compiles them there (in a limited child process) and seals the
//!   artifact in that cache. A second worker from the same component sends
//!   nothing but the hash.
//! - **Versions are checked at the handshake**, both ways: a host of
//!   another malt version is refused with both versions named.
//! - **Heartbeats** ([`WorkerBuilder::heartbeat`](crate::WorkerBuilder::heartbeat),
//!   default every [`DEFAULT_HEARTBEAT`]): a link that carries nothing for
//!   three intervals is dead. The manager then kills the launcher process
//!   and the worker ends ([`Error::TerminatedWorker`](crate::Error::TerminatedWorker) for its
//!   pending calls, the reason in
//!   [`Worker::termination_reason`](crate::Worker::termination_reason));
//!   the host, hearing nothing either, exits by itself.
//! - **No orphans**: the launcher process dies with the manager (a death
//!   signal), and the remote host exits at the end of its stdin, which the
//!   remote side sees when the link closes.
//! - Directory grants name directories of the host's machine, and
//!   [`Worker::pid`](crate::Worker::pid) is the launcher's local process
//!   ([`Worker::host_pid`](crate::Worker::host_pid) is the host's, on its
//!   machine).

use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Default interval of heartbeats on a link through a launcher.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

/// Environment variable that replaces `ssh` and its options for
/// [`Launcher::ssh`], as `GIT_SSH_COMMAND` does for git (a shell command
/// line: `ssh -p 2222 -i ~/.ssh/other`).
pub const SSH_COMMAND_ENV: &str = "MALT_SSH_COMMAND";

/// Starts hosts: the command whose stdin and stdout reach a host serving
/// malt's protocol. Implement it for a transport of your own.
pub trait Launch: fmt::Debug + Send + Sync + 'static {
    /// The command that starts one host. `host_args` are what the host
    /// program takes (`__malt-host`; a native guest program its own), to be
    /// passed to the program on the other side.
    fn command(&self, host_args: &[&str]) -> std::process::Command;
}

/// How a worker's host is started: a cheap handle on a [`Launch`].
///
/// ```no_run
/// # async fn demo() -> malt::Result<()> {
/// use malt::{Worker, launcher::Launcher};
///
/// let remote = Worker::script()
///     .launcher(Launcher::ssh("build@10.0.0.7").arg("-p").arg("2222"))
///     .spawn()
///     .await?;
/// let pod = Worker::script()
///     .launcher(Launcher::command(["kubectl", "exec", "-i", "pod-1", "--", "malt"]))
///     .spawn()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Launcher(pub(crate) Via);

/// The launchers malt knows, and yours.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// A process of this program (or the chosen host program) here.
    Local,
    /// Threads of this process.
    InProcess,
    /// A command: a host anywhere.
    Command(Arc<dyn Launch>),
}

impl Launcher {
    /// A launcher of your own.
    pub fn new(launch: impl Launch) -> Self {
        Launcher(Via::Command(Arc::new(launch)))
    }

    /// The default: the host is a process of this program (or of
    /// [`host_program`](crate::WorkerBuilder::host_program)) on this
    /// machine, sharing its artifact cache.
    pub fn local() -> Self {
        Launcher(Via::Local)
    }

    /// The host runs on threads of this process (the wasm wall only), as
    /// [`WorkerBuilder::in_process`](crate::WorkerBuilder::in_process).
    pub fn in_process() -> Self {
        Launcher(Via::InProcess)
    }

    /// Runs hosts through OpenSSH: `ssh -T [ARGS] -- DESTINATION malt
    /// __malt-host`, with the user's `ssh` (or [`SSH_COMMAND_ENV`]) and
    /// its configuration. `destination` is `[user@]host`.
    pub fn ssh(destination: impl Into<String>) -> Ssh {
        Ssh {
            destination: destination.into(),
            args: Vec::new(),
            remote_program: "malt".into(),
            ssh_command: None,
        }
    }

    /// Runs hosts with `argv` followed by the host's arguments (so `argv`
    /// ends with the malt program on the other side):
    /// `["kubectl", "exec", "-i", "pod", "--", "malt"]`.
    pub fn command<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Launcher::new(Argv(argv.into_iter().map(Into::into).collect()))
    }
}

impl fmt::Debug for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Via::Local => f.write_str("Launcher::local()"),
            Via::InProcess => f.write_str("Launcher::in_process()"),
            Via::Command(launch) => launch.fmt(f),
        }
    }
}

impl<L: Launch> From<L> for Launcher {
    fn from(launch: L) -> Self {
        Launcher::new(launch)
    }
}

/// A command line, followed by the host's arguments.
#[derive(Debug, Clone)]
struct Argv(Vec<OsString>);

impl Launch for Argv {
    fn command(&self, host_args: &[&str]) -> std::process::Command {
        let (program, args) = self.0.split_first().map_or_else(
            || (OsString::from("malt"), &[][..]),
            |(p, rest)| (p.clone(), rest),
        );
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).args(host_args);
        cmd
    }
}

/// Hosts through OpenSSH; made by [`Launcher::ssh`].
#[derive(Debug, Clone)]
#[must_use = "an Ssh launcher does nothing until a worker uses it"]
pub struct Ssh {
    destination: String,
    args: Vec<String>,
    remote_program: String,
    ssh_command: Option<String>,
}

impl Ssh {
    /// Adds an argument for `ssh` itself (before the destination): `-p`,
    /// `-i`, `-o`, `-J`…
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The malt program on the remote machine (default `malt`, found on the
    /// remote `PATH`). The remote shell reads it, so it may be a path or a
    /// short command line (`env MALT_CACHE_DIR=/scratch/malt malt`).
    pub fn remote_program(mut self, program: impl Into<String>) -> Self {
        self.remote_program = program.into();
        self
    }

    /// Replaces `ssh` and its options with a shell command line, as
    /// [`SSH_COMMAND_ENV`] does (which is used when this is not set). An
    /// empty line means plain `ssh`, whatever the environment says.
    pub fn ssh_command(mut self, command: impl Into<String>) -> Self {
        self.ssh_command = Some(command.into());
        self
    }
}

impl Launch for Ssh {
    fn command(&self, host_args: &[&str]) -> std::process::Command {
        let remote = std::iter::once(self.remote_program.as_str())
            .chain(host_args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let custom = self
            .ssh_command
            .clone()
            .or_else(|| std::env::var(SSH_COMMAND_ENV).ok())
            .filter(|c| !c.trim().is_empty());
        let mut cmd = match custom {
            // As git runs GIT_SSH_COMMAND: through the shell, with the
            // arguments after it.
            Some(line) => {
                let mut cmd = std::process::Command::new("/bin/sh");
                cmd.arg("-c").arg(format!("{line} \"$@\"")).arg("ssh");
                cmd
            }
            None => std::process::Command::new("ssh"),
        };
        // No terminal (the stream is binary); `--` so that a destination
        // can never be read as an option.
        cmd.arg("-T")
            .args(&self.args)
            .arg("--")
            .arg(&self.destination)
            .arg(remote);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &std::process::Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn ssh_puts_options_before_the_destination_and_the_host_after() {
        let ssh = Launcher::ssh("me@box")
            .arg("-p")
            .arg("2222")
            .remote_program("/opt/malt/bin/malt")
            .ssh_command("");
        assert_eq!(
            argv(&ssh.command(&["__malt-host"]))[1..],
            [
                "-T",
                "-p",
                "2222",
                "--",
                "me@box",
                "/opt/malt/bin/malt __malt-host"
            ]
        );
    }

    #[test]
    fn a_custom_ssh_command_runs_through_the_shell() {
        let ssh = Launcher::ssh("box").ssh_command("ssh -i key");
        assert_eq!(
            argv(&ssh.command(&["__malt-host"])),
            [
                "/bin/sh",
                "-c",
                "ssh -i key \"$@\"",
                "ssh",
                "-T",
                "--",
                "box",
                "malt __malt-host"
            ]
        );
    }

    #[test]
    fn a_command_gets_the_host_arguments_last() {
        let launcher = Launcher::command(["kubectl", "exec", "-i", "pod", "--", "malt"]);
        let Via::Command(launch) = &launcher.0 else {
            panic!("a command launcher")
        };
        assert_eq!(
            argv(&launch.command(&["__malt-host"])),
            ["kubectl", "exec", "-i", "pod", "--", "malt", "__malt-host"]
        );
    }
}
