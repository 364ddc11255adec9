//! A private OpenSSH server on 127.0.0.1 for the tests of workers on
//! other machines: its own host key, one client key, a config under a
//! temporary directory, no systemd. Started once per test binary; it dies
//! with the tests (a death signal), and so do its sessions.
//!
//! Needs `sshd`, `ssh` and `ssh-keygen` (Debian: `openssh-server
//! openssh-client`; CI installs them).

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    key: PathBuf,
}

impl Sshd {
    /// The `ssh` command line (`$MALT_SSH_COMMAND` form) that reaches this
    /// server with its key, trusting its host key.
    pub fn ssh_command(&self) -> String {
        format!("ssh {}", self.ssh_args().join(" "))
    }

    /// The options of `ssh` that reach this server.
    pub fn ssh_args(&self) -> Vec<String> {
        let port = self.port.to_string();
        let key = self.key.display().to_string();
        [
            "-F",
            "/dev/null",
            "-p",
            &port,
            "-i",
            &key,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]
        .map(String::from)
        .to_vec()
    }

    /// A launcher to this server running `program` (a path on this same
    /// machine: the "remote" is 127.0.0.1). Plain `ssh` with options,
    /// whatever `$MALT_SSH_COMMAND` says: the worker's pid is ssh's.
    pub fn launcher(&self, program: &Path) -> malt::launcher::Ssh {
        self.ssh_args().into_iter().fold(
            malt::Launcher::ssh("127.0.0.1")
                .ssh_command("")
                .remote_program(program.display().to_string()),
            |ssh, arg| ssh.arg(arg),
        )
    }
}

fn find(program: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(program))
    .find(|p| p.is_file())
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether OpenSSH (server, client, keygen) is installed.
pub fn available() -> bool {
    ["sshd", "ssh", "ssh-keygen"]
        .iter()
        .all(|p| find(p).is_some())
}

/// The server, started on first use.
pub fn sshd() -> &'static Sshd {
    static SSHD: OnceLock<Sshd> = OnceLock::new();
    SSHD.get_or_init(start)
}

fn start() -> Sshd {
    let missing = || {
        panic!(
            "these tests run workers over a private sshd on 127.0.0.1: install OpenSSH \
             (Debian: apt-get install openssh-server openssh-client)"
        )
    };
    let sshd = find("sshd").unwrap_or_else(missing);
    let keygen = find("ssh-keygen").unwrap_or_else(missing);
    find("ssh").unwrap_or_else(missing);

    let dir = std::env::temp_dir().join(format!("malt-sshd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for key in ["host_key", "client_key"] {
        run(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)),
            "ssh-keygen",
        );
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    // Root's sshd separates privileges into this directory.
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        let _ = std::fs::create_dir_all("/run/sshd");
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPidFile {dir}/sshd.pid\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nMaxStartups 100:30:200\nMaxSessions 100\n\
             LogLevel ERROR\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&sshd);
    cmd.arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    // The death signal fires when the thread that spawned the child ends:
    // spawn it from a thread that lives as long as the process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return tx.send(Err(e.to_string())).unwrap(),
        };
        let pid = child.id();
        tx.send(Ok(pid)).unwrap();
        let status = child.wait();
        eprintln!("the tests' sshd exited: {status:?}");
    });
    let pid = rx.recv().unwrap().expect("start sshd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_ok(),
            "sshd exited at start"
        );
        assert!(
            Instant::now() < deadline,
            "sshd did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        port,
        key: dir.join("client_key"),
        dir,
    }
}
