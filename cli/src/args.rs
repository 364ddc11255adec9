//! Flags shared by the commands, and their parsers.

use super::*;

/// Sandbox and limit flags shared by every command that runs a guest.
#[derive(Args, Clone, Default)]
pub(crate) struct Sandbox {
    /// Cap on the guest's memory, e.g. 64M, 1G (default 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// Wall-clock limit per call, e.g. 500ms, 2s, 1m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// Instruction budget per call (fuel metering).
    #[arg(long, value_name = "N")]
    pub(crate) fuel: Option<u64>,
    /// Grant a directory: HOST[::GUEST][:ro] (repeatable; read-write unless :ro).
    #[arg(long = "dir", value_name = "HOST[::GUEST][:ro]", value_parser = parse_dir)]
    pub(crate) dirs: Vec<DirGrant>,
    /// A directory of pure-Python modules for a --python session's
    /// sys.path (read-only; repeatable).
    #[arg(long = "python-path", value_name = "DIR")]
    pub(crate) python_path: Vec<std::path::PathBuf>,
    /// Environment variable for the guest, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// Roll the guest back to where it was before a call that had to be
    /// killed (an ignored interrupt, a timeout) instead of restarting it
    /// empty; costs a fork between calls.
    #[arg(long)]
    pub(crate) rollback: bool,
    /// Allow network access (not supported: malt workers have no network).
    #[arg(long)]
    pub(crate) allow_net: bool,
    /// Refuse to run unless the guest's process is fully locked down
    /// (seccomp and every Landlock rule; Linux 6.12 or later).
    #[arg(long)]
    pub(crate) strict: bool,
}

/// Where the worker's host runs: here, or on another machine over SSH.
#[derive(Args, Clone, Default)]
pub(crate) struct Remote {
    /// Run the worker on another machine: `ssh -T [USER@]HOST malt
    /// __malt-host` ($MALT_SSH_COMMAND replaces `ssh` and its options, as
    /// GIT_SSH_COMMAND does for git). The remote malt must be this version.
    #[arg(long, value_name = "[USER@]HOST")]
    pub(crate) ssh: Option<String>,
    /// The malt program on the remote machine (default: `malt` on its PATH).
    #[arg(long, value_name = "PATH", requires = "ssh")]
    pub(crate) remote_program: Option<String>,
}

impl Remote {
    pub(crate) fn apply(&self, builder: WorkerBuilder) -> WorkerBuilder {
        match &self.ssh {
            Some(destination) => {
                let mut ssh = malt::Launcher::ssh(destination.clone());
                if let Some(program) = &self.remote_program {
                    ssh = ssh.remote_program(program.clone());
                }
                builder.launcher(ssh)
            }
            None => builder,
        }
    }
}

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(String);

pub(crate) fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit `{unit}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64M, 1G, 1048576)"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("unknown unit `{unit}` (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub(crate) fn parse_dir(s: &str) -> Result<DirGrant, String> {
    let (spec, read_only) = match s.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (host, guest) = match spec.split_once("::") {
        Some((h, g)) => (h, g),
        None => (spec, spec),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("`{s}`: expected HOST[::GUEST][:ro]"));
    }
    Ok(DirGrant {
        host: host.to_string(),
        guest: guest.to_string(),
        read_only,
    })
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}`: expected KEY=VALUE")),
    }
}

impl Sandbox {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.allow_net {
            return Err(usage(
                "--allow-net: network access is not supported; malt workers have no network",
            ));
        }
        Ok(())
    }

    pub(crate) fn apply(
        &self,
        mut builder: WorkerBuilder,
        native: bool,
    ) -> anyhow::Result<WorkerBuilder> {
        self.check()?;
        if native {
            for (flag, given) in [
                ("--memory", self.memory.is_some()),
                ("--fuel", self.fuel.is_some()),
                ("--dir", !self.dirs.is_empty()),
                ("--python-path", !self.python_path.is_empty()),
                ("--rollback", self.rollback),
            ] {
                if given {
                    return Err(usage(format!(
                        "{flag} is a wasm sandbox limit; a native worker has none (drop --native)"
                    )));
                }
            }
        }
        if let Some(bytes) = self.memory {
            builder = builder.memory_limit(bytes);
        }
        if let Some(t) = self.timeout {
            builder = builder.call_timeout(t);
        }
        if let Some(f) = self.fuel {
            builder = builder.fuel(f);
        }
        if self.rollback {
            builder = builder.rollback(true);
        }
        for (k, v) in &self.env {
            builder = builder.env(k, v);
        }
        for dir in &self.python_path {
            builder = builder.python_path(dir);
        }
        for d in &self.dirs {
            builder = if d.read_only {
                builder.dir_read_only(&d.host, d.guest.clone())
            } else {
                builder.dir(&d.host, d.guest.clone())
            };
        }
        // One worker, so its output goes to ours as is.
        Ok(builder.prefix_output(false).require_hardening(self.strict))
    }
}
