//! OS hardening of a wasm host process (Linux), applied before any guest
//! code runs, so that a guest escaping wasmtime still finds a locked
//! process. See SECURITY.md for the policy and the threat model.
//!
//! - `no_new_privs`: no gaining privileges through exec (set-uid, file
//!   capabilities), and a precondition for an unprivileged seccomp filter.
//! - rlimits: no core dumps (guest memory stays in the process), few open
//!   files.
//! - seccomp, an allowlist: only the syscalls a host makes (memory,
//!   threads, clocks, its descriptors, files beneath its grants) are
//!   allowed; every other call fails with `EPERM`, among them all an
//!   attacker would reach for: starting programs (`execve`, `execveat`),
//!   new processes (`fork`, `vfork`, `clone` without `CLONE_THREAD`),
//!   network sockets (workers have no network), tracing, signalling or
//!   reading other processes, and kernel administration. `clone3` answers
//!   `ENOSYS` (its flags live in memory a filter cannot read): the C
//!   library falls back to `clone` with `CLONE_THREAD`.
//! - Landlock (where the kernel has it): once the guest's artifact is
//!   loaded, the process may open files only beneath the directories
//!   granted to the guest (read-only grants: read rights only).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Most files a hardened host may have open.
pub(crate) const MAX_OPEN_FILES: u64 = 256;

/// Calls an attacker would reach for: outside the allowlist, so denied
/// (a test keeps them out of it and checks each).
#[cfg(test)]
const DENIED: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // Kernel surfaces a host never uses and that have had their share of
    // privilege escalations.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_modify_ldt,
    libc::SYS_kcmp,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_fanotify_init,
    libc::SYS_personality,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Other processes: signals through pidfds, their memory.
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_process_madvise,
    libc::SYS_tkill,
    // SysV IPC: shared with every process of the user.
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
];

/// Syscalls a hardened host may make, whatever their arguments: the rest
/// (but for the few with conditions in [`allow_filter`]) fail with
/// `EPERM`. Drawn from what hosts call in the whole test suite (traced
/// with `strace -f`) and from the calls behind WASI's filesystem and
/// clocks.
const ALLOWED: &[i64] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    // Threads and their synchronization.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Signals (wasmtime's trap handlers; sending is conditional).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // Clocks and sleeping.
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    // Descriptors the host has: the protocol, output pipes, granted files.
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // Files beneath the grants (Landlock decides which).
    libc::SYS_openat,
    // What cap-std resolves beneath a grant with, when the kernel has it.
    libc::SYS_openat2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_flock,
    libc::SYS_getcwd,
    // About this process.
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    // Locking itself further: more filters, Landlock.
    libc::SYS_seccomp,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
];

/// Syscall numbers with this bit set are x32 calls: another numbering on
/// the same architecture, which rules keyed on numbers would miss.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn arch() -> Result<seccompiler::TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))
}

fn bpf_err(e: seccompiler::BackendError) -> String {
    format!("seccomp: {e}")
}

/// The filters: by number, a binary search over the allowlist (everything
/// else `EPERM`, `clone3` `ENOSYS` so that the C library falls back to
/// `clone`, whose flags a filter can read; x32 calls `EPERM`, another
/// architecture's calls kill the process); then the argument checks of
/// the few allowed calls that have some. Shaped for the kernel: a filter
/// that decides by number alone lets it answer those calls from its
/// per-syscall cache, and a search costs a few steps where a chain over
/// a hundred calls costs a hundred (at every call the cache cannot answer,
/// and for each syscall number when the filter is loaded).
pub(crate) fn filters(policy: Policy) -> Result<[BpfProgram; 2], String> {
    // SAFETY: getpid has no preconditions.
    filters_for(unsafe { libc::getpid() } as u64, policy)
}

/// What a host may do besides serving its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Nothing: no process of its own, no waiting for one.
    Host,
    /// A host that rolls its guest back (`HostConfig::rollback`): it forks
    /// copies of itself (plain `fork`, nothing else `clone` can do), waits
    /// for them, and sets the death signal of the copies.
    Rollback,
}

/// The flags glibc's `fork` passes to `clone`.
const FORK_FLAGS: u64 =
    (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;

/// [`filters`] for a process whose id is `me`: it may signal only itself.
fn filters_for(me: u64, policy: Policy) -> Result<[BpfProgram; 2], String> {
    let allow = libc::SECCOMP_RET_ALLOW;
    let waits: &[i64] = match policy {
        Policy::Host => &[],
        Policy::Rollback => &[libc::SYS_wait4, libc::SYS_waitid],
    };
    let mut by_number: Vec<(i64, u32)> = ALLOWED
        .iter()
        .chain(CONDITIONAL)
        .chain(waits)
        .map(|&nr| (nr, allow))
        .collect();
    by_number.push((
        libc::SYS_clone3,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ));
    by_number.sort_unstable();
    by_number.dedup();
    let conditions =
        BpfProgram::try_from(argument_filter(me, policy)?).map_err(|e| format!("seccomp: {e}"))?;
    Ok([number_filter(&by_number)?, conditions])
}

/// Allowed calls whose arguments [`argument_filter`] checks.
const CONDITIONAL: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_socketpair,
    libc::SYS_prlimit64,
    libc::SYS_prctl,
    libc::SYS_ioctl,
];

/// The audit architecture of this build's syscalls.
fn audit_arch() -> Result<u32, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(0xc000_003e),
        "aarch64" => Ok(0xc000_00b7),
        other => Err(format!("seccomp: unsupported architecture: {other}")),
    }
}

fn stmt(code: u32, k: u32) -> seccompiler::sock_filter {
    jump(code, k, 0, 0)
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> seccompiler::sock_filter {
    seccompiler::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

/// A filter deciding by syscall number alone: `entries` (sorted numbers,
/// each with its action), every other number `EPERM`.
fn number_filter(entries: &[(i64, u32)]) -> Result<BpfProgram, String> {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let mut program = vec![
        // seccomp_data.arch
        stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        jump(BPF_JMP | BPF_JEQ | BPF_K, audit_arch()?, 1, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        // seccomp_data.nr
        stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        // x32 calls share x86-64's audit architecture: deny them all.
        jump(BPF_JMP | BPF_JSET | BPF_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET | BPF_K, EPERM),
    ];
    program.extend(search(entries)?);
    Ok(program)
}

/// Binary search over `entries` on the number in the accumulator.
fn search(entries: &[(i64, u32)]) -> Result<BpfProgram, String> {
    use libc::{BPF_JA, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_RET};
    let number = |nr: i64| u32::try_from(nr).map_err(|_| format!("seccomp: syscall {nr}"));
    if entries.len() <= 4 {
        let mut code = Vec::with_capacity(2 * entries.len() + 1);
        for &(nr, action) in entries {
            code.push(jump(BPF_JMP | BPF_JEQ | BPF_K, number(nr)?, 0, 1));
            code.push(stmt(BPF_RET | BPF_K, action));
        }
        code.push(stmt(BPF_RET | BPF_K, EPERM));
        return Ok(code);
    }
    let (low, high) = entries.split_at(entries.len() / 2);
    let low = search(low)?;
    let skip = u32::try_from(low.len()).map_err(|_| "seccomp: filter too long".to_string())?;
    // At or above the split: jump over the lower half (an unconditional
    // jump, whose offset is not limited to 255).
    let mut code = vec![
        jump(BPF_JMP | BPF_JGE | BPF_K, number(high[0].0)?, 0, 1),
        stmt(BPF_JMP | BPF_JA, skip),
    ];
    code.extend(low);
    code.extend(search(high)?);
    Ok(code)
}

/// A rule that holds when every `(argument, op, value)` holds, comparing
/// whole 64-bit registers: a value with stray upper bits is another value,
/// so a denial on `Ne` catches it; use [`rule32`] where the kernel
/// truncates an argument that is denied on `Eq`.
fn rule(conditions: Vec<(u8, SeccompCmpOp, u64)>) -> Result<SeccompRule, String> {
    rule_sized(SeccompCmpArgLen::Qword, conditions)
}

/// A rule on 32-bit arguments (the low half of each register), for
/// arguments the kernel reads as `int`: `ioctl(fd, TIOCSTI | 1 << 32)` is
/// a `TIOCSTI` to the kernel.
fn rule32(conditions: Vec<(u8, SeccompCmpOp, u64)>) -> Result<SeccompRule, String> {
    rule_sized(SeccompCmpArgLen::Dword, conditions)
}

fn rule_sized(
    len: SeccompCmpArgLen,
    conditions: Vec<(u8, SeccompCmpOp, u64)>,
) -> Result<SeccompRule, String> {
    let conditions = conditions
        .into_iter()
        .map(|(arg, op, value)| SeccompCondition::new(arg, len.clone(), op, value).map_err(bpf_err))
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conditions).map_err(bpf_err)
}

/// The argument checks of [`CONDITIONAL`] calls (`EPERM` when one
/// fails): threads but no processes, signals to itself only, its own
/// rlimits, unix socket pairs only, the `prctl` options that name threads
/// and lock the process, and `ioctl` but for terminal injection.
fn argument_filter(me: u64, policy: Policy) -> Result<SeccompFilter, String> {
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // clone(flags, ...) without CLONE_THREAD makes a process; a host that
    // rolls back may make one exactly as fork does (no namespaces, no
    // shared memory or files).
    let mut process = vec![(0, MaskedEq(libc::CLONE_THREAD as u64), 0)];
    if policy == Policy::Rollback {
        process.push((0, Ne, FORK_FLAGS));
    }
    rules.insert(libc::SYS_clone, vec![rule(process)?]);
    // Signals to this process only (glibc's abort raises its own).
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        rules.insert(nr, vec![rule(vec![(0, Ne, me)])?]);
    }
    // A connected pair, reaching nothing else (tokio's signal driver
    // makes one).
    rules.insert(
        libc::SYS_socketpair,
        vec![rule(vec![(0, Ne, libc::AF_UNIX as u64)])?],
    );
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![(0, Ne, 0), (0, Ne, me)])?],
    );
    rules.insert(
        libc::SYS_prctl,
        vec![rule(
            [
                libc::PR_SET_NAME,
                libc::PR_GET_NAME,
                libc::PR_SET_NO_NEW_PRIVS,
                libc::PR_GET_NO_NEW_PRIVS,
                libc::PR_SET_SECCOMP,
                libc::PR_GET_SECCOMP,
                libc::PR_SET_VMA,
            ]
            .into_iter()
            .chain(match policy {
                Policy::Host => None,
                Policy::Rollback => Some(libc::PR_SET_PDEATHSIG),
            })
            .map(|option| (0, Ne, option as u64))
            .collect(),
        )?],
    );
    // No typing into a terminal, no console tricks.
    rules.insert(
        libc::SYS_ioctl,
        vec![
            rule32(vec![(1, Eq, libc::TIOCSTI)])?,
            rule32(vec![(1, Eq, libc::TIOCLINUX)])?,
        ],
    );
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(bpf_err)
}

/// Memory a host needs besides the guest's: its code's data, thread
/// stacks, buffers.
const HOST_DATA: u64 = 256 << 20;

/// Backs the guest's memory limit with one the kernel enforces and the
/// host cannot lift: the process's private writable memory (`RLIMIT_DATA`)
/// may hold the guest's memory and its channels (each up to
/// `memory_limit`), a few frames in flight (`max_frame` each: read,
/// decoded, encoded) and the host's own. Generous on purpose: wasmtime's
/// and malt's accounting is the limit; this is what stops anything that
/// escapes it.
pub(crate) fn limit_data(memory_limit: u64, max_frame: u64) -> Result<(), String> {
    let max = memory_limit
        .saturating_mul(2)
        .saturating_add(max_frame.saturating_mul(4))
        .saturating_add(HOST_DATA);
    lower_limit(libc::RLIMIT_DATA, max)
}

fn lower_limit(resource: libc::__rlimit_resource_t, max: u64) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(resource, &mut limit) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        limit.rlim_cur = limit.rlim_cur.min(max);
        limit.rlim_max = limit.rlim_max.min(max);
        if libc::setrlimit(resource, &limit) != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Applies the whole policy to this process (every thread).
pub(crate) fn apply(policy: Policy) -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    lower_limit(libc::RLIMIT_CORE, 0)?;
    lower_limit(libc::RLIMIT_NOFILE, MAX_OPEN_FILES)?;
    for filter in filters(policy)? {
        seccompiler::apply_filter_all_threads(&filter).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

/// Restricts the filesystem the process (this thread and the threads it
/// starts later) can reach to the granted directories. Best effort: on a
/// kernel without Landlock the other layers remain.
pub(crate) fn restrict_files(
    dirs: &[malt_protocol::DirGrant],
) -> Result<malt_protocol::Hardening, String> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope,
    };
    // Files (ABI 1–5), TCP bind and connect with no port allowed (4), and
    // scopes (6): no signal to a process outside this host, no abstract
    // unix socket outside it. Each applies where the kernel has it.
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for dir in dirs {
        let access = if dir.read_only {
            AccessFs::from_read(abi)
        } else {
            AccessFs::from_all(abi)
        };
        let fd = PathFd::new(&dir.host).map_err(|e| format!("landlock: {}: {e}", dir.host))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    let landlock_abi = match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => effective_abi as u32,
        _ => 0,
    };
    Ok(malt_protocol::Hardening {
        seccomp: true,
        landlock_abi: if status.ruleset == RulesetStatus::NotEnforced {
            0
        } else {
            landlock_abi
        },
        landlock_full: status.ruleset == RulesetStatus::FullyEnforced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child with the filters applied and returns
    /// its exit code (the probe's own code, or 100 + errno).
    fn in_hardened_child(probe: fn() -> i32) -> i32 {
        in_child(probe, true, Policy::Host)
    }

    /// Runs `probe` in a forked child, with or without the filters (built
    /// here, before the fork, for a process id that is no process: so the
    /// probe may signal nobody, not even itself).
    fn in_child(probe: fn() -> i32, hardened: bool, policy: Policy) -> i32 {
        let filters = filters_for(0, policy).unwrap();
        // SAFETY: the child only makes raw syscalls and exits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for f in filters.iter().filter(|_| hardened) {
                    let prog = libc::sock_fprog {
                        len: f.len() as u16,
                        filter: f.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0 {
                        libc::_exit(99);
                    }
                }
                libc::_exit(probe());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "the probe died: {status}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn exec_is_denied() {
        let code = in_hardened_child(|| unsafe {
            let path = c"/bin/true".as_ptr();
            let argv = [path, std::ptr::null()];
            libc::execve(path, argv.as_ptr(), [std::ptr::null()].as_ptr());
            100 + errno()
        });
        assert_eq!(code, 100 + libc::EPERM);
    }

    #[test]
    fn new_processes_are_denied_but_threads_are_not() {
        let code = in_hardened_child(|| unsafe {
            let pid = libc::syscall(libc::SYS_fork);
            if pid == 0 {
                libc::_exit(0);
            }
            if pid > 0 {
                return 1;
            }
            let e = errno();
            if e != libc::EPERM {
                return 100 + e;
            }
            // clone3 is ENOSYS so the C library falls back to clone.
            if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1
                || errno() != libc::ENOSYS
            {
                return 2;
            }
            0
        });
        assert_eq!(code, 0);
    }

    /// A host that rolls back may fork, wait for its child and give it a
    /// death signal; nothing else a `clone` can do (a new namespace, a
    /// process sharing its memory) and no other `prctl`.
    #[test]
    fn a_rollback_host_may_fork_and_nothing_more() {
        let code = in_child(
            || unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        libc::_exit(7);
                    }
                    libc::_exit(42);
                }
                if pid < 0 {
                    return 100 + errno();
                }
                let mut status = 0;
                if libc::waitpid(pid, &mut status, 0) != pid || libc::WEXITSTATUS(status) != 42 {
                    return 1;
                }
                for flags in [
                    libc::CLONE_NEWUSER | libc::SIGCHLD,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    libc::CLONE_FILES | libc::SIGCHLD,
                ] {
                    let pid = libc::syscall(
                        libc::SYS_clone,
                        flags as u64,
                        0usize,
                        0usize,
                        0usize,
                        0usize,
                    );
                    if pid == 0 {
                        libc::_exit(0);
                    }
                    if pid > 0 || errno() != libc::EPERM {
                        return 2;
                    }
                }
                if libc::prctl(libc::PR_SET_DUMPABLE, 1) == 0 || errno() != libc::EPERM {
                    return 3;
                }
                0
            },
            true,
            Policy::Rollback,
        );
        assert_eq!(code, 0);
        // The same fork, by a host that does not roll back: refused.
        let code = in_child(
            || unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                if pid > 0 { 1 } else { 100 + errno() }
            },
            true,
            Policy::Host,
        );
        assert_eq!(code, 100 + libc::EPERM);
    }

    #[test]
    fn files_outside_the_grants_are_closed() {
        let dir = std::env::temp_dir().join(format!("malt-landlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("granted.txt"), "ok").unwrap();
        let grants = vec![malt_protocol::DirGrant {
            host: dir.to_string_lossy().into_owned(),
            guest: "/d".into(),
            read_only: true,
        }];
        let inside =
            std::ffi::CString::new(dir.join("granted.txt").to_string_lossy().as_bytes()).unwrap();
        let new_file =
            std::ffi::CString::new(dir.join("new.txt").to_string_lossy().as_bytes()).unwrap();
        // The child's parent: this process.
        let parent_mem =
            std::ffi::CString::new(format!("/proc/{}/mem", std::process::id())).unwrap();
        // SAFETY: the child makes raw syscalls and exits; the ruleset is
        // built and applied in the child (Landlock is per thread tree).
        let code = unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                match restrict_files(&grants) {
                    Ok(h) if h.landlock_full => {}
                    Ok(_) => libc::_exit(50), // kernel without (all of) Landlock
                    Err(_) => libc::_exit(51),
                }
                if libc::open(inside.as_ptr(), libc::O_RDONLY) < 0 {
                    libc::_exit(1);
                }
                if libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) >= 0 {
                    libc::_exit(2);
                }
                // No reading the manager's memory through /proc.
                if libc::open(parent_mem.as_ptr(), libc::O_RDONLY) >= 0 {
                    libc::_exit(6);
                }
                if libc::open(new_file.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600) >= 0 {
                    libc::_exit(3);
                }
                // No signal out of the sandbox (the parent: this test).
                if libc::kill(libc::getppid(), 0) == 0 || errno() != libc::EPERM {
                    libc::_exit(4);
                }
                // No TCP connection (the socket call itself is seccomp's).
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 1u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let connected = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                if fd < 0 || connected == 0 || errno() != libc::EACCES {
                    libc::_exit(5);
                }
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::WEXITSTATUS(status)
        };
        let _ = std::fs::remove_dir_all(&dir);
        // 50: this kernel has no Landlock, which is allowed (best effort).
        assert!(code == 0 || code == 50, "probe exit code {code}");
    }

    /// Each returns 0 on success, 100 + errno on failure.
    fn ret(r: libc::c_long) -> i32 {
        if r >= 0 { 0 } else { 100 + errno() }
    }

    /// The calls an attacker reaches for, each first shown to reach the
    /// kernel without the filter (it succeeds, or fails on its arguments:
    /// never `EPERM` or `ENOSYS`), then denied with `EPERM`.
    #[test]
    fn other_processes_and_risky_kernel_surfaces_are_denied() {
        type Probe = fn() -> i32;
        let probes: [(&str, Probe); 22] = [
            ("kill the parent", || unsafe {
                ret(libc::kill(libc::getppid(), 0).into())
            }),
            ("tgkill the parent", || unsafe {
                let p = libc::getppid();
                ret(libc::syscall(libc::SYS_tgkill, p, p, 0))
            }),
            ("tkill", || unsafe {
                ret(libc::syscall(libc::SYS_tkill, libc::getppid(), 0))
            }),
            ("pidfd_open", || unsafe {
                ret(libc::syscall(libc::SYS_pidfd_open, libc::getppid(), 0))
            }),
            ("pidfd_send_signal", || unsafe {
                ret(libc::syscall(libc::SYS_pidfd_send_signal, -1, 0, 0usize, 0))
            }),
            ("process_vm_readv", || unsafe {
                // Flags must be 0: EINVAL before any permission check.
                ret(libc::syscall(
                    libc::SYS_process_vm_readv,
                    libc::getppid(),
                    0usize,
                    0,
                    0usize,
                    0,
                    1,
                ))
            }),
            ("ptrace", || unsafe {
                // An unknown request to a process we do not trace: ESRCH.
                ret(libc::syscall(
                    libc::SYS_ptrace,
                    0x7fff,
                    libc::getppid(),
                    0,
                    0,
                ))
            }),
            ("SysV shared memory", || unsafe {
                let id = libc::shmget(libc::IPC_PRIVATE, 4096, 0o600);
                if id >= 0 {
                    libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                }
                ret(id.into())
            }),
            ("SysV semaphores", || unsafe {
                ret(libc::syscall(
                    libc::SYS_semctl,
                    -1,
                    0,
                    libc::IPC_STAT,
                    0usize,
                ))
            }),
            ("io_uring_setup", || unsafe {
                ret(libc::syscall(libc::SYS_io_uring_setup, 1, 0usize))
            }),
            ("modify_ldt", || unsafe {
                // An unknown function: ENOSYS from the kernel itself, so
                // read the ldt (func 0) with no room: 0 bytes, success.
                ret(libc::syscall(libc::SYS_modify_ldt, 0, 0usize, 0))
            }),
            ("personality", || unsafe {
                ret(libc::personality(0xffff_ffff).into())
            }),
            ("userfaultfd", || unsafe {
                ret(libc::syscall(libc::SYS_userfaultfd, -1))
            }),
            ("perf_event_open", || unsafe {
                ret(libc::syscall(
                    libc::SYS_perf_event_open,
                    0usize,
                    0,
                    -1,
                    -1,
                    0,
                ))
            }),
            ("bpf", || unsafe {
                ret(libc::syscall(libc::SYS_bpf, -1, 0usize, 0))
            }),
            ("keyctl", || unsafe {
                ret(libc::syscall(libc::SYS_keyctl, -1, 0, 0, 0, 0))
            }),
            ("unshare", || unsafe { ret(libc::unshare(0).into()) }),
            ("setns", || unsafe { ret(libc::setns(-1, 0).into()) }),
            ("umount2", || unsafe {
                // Unknown flags: EINVAL before the capability check.
                ret(libc::umount2(c"/".as_ptr(), 0x7000_0000).into())
            }),
            ("ioctl TIOCSTI", || unsafe {
                let c = b'x';
                ret(libc::ioctl(-1, libc::TIOCSTI, &c).into())
            }),
            ("ioctl TIOCSTI with stray upper bits", || unsafe {
                let c = b'x';
                ret(libc::syscall(
                    libc::SYS_ioctl,
                    -1,
                    (1u64 << 32) | libc::TIOCSTI,
                    &c as *const u8,
                ))
            }),
            ("an x32 call", || unsafe {
                ret(libc::syscall(
                    libc::SYS_getpid | X32_SYSCALL_BIT as libc::c_long,
                ))
            }),
        ];
        // Calls a kernel setting may refuse to a user who is not root
        // (the CI runs as root); an x32 call reaches the kernel only where
        // x32 is built in.
        let may_be_off = ["io_uring_setup", "userfaultfd", "bpf"];
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        for (name, probe) in probes {
            let open = in_child(probe, false, Policy::Host);
            if name != "an x32 call" && (root || !may_be_off.contains(&name)) {
                assert!(
                    open != 100 + libc::EPERM && open != 100 + libc::ENOSYS,
                    "{name} reaches the kernel unhardened: {open}"
                );
            }
            assert_eq!(
                in_child(probe, true, Policy::Host),
                100 + libc::EPERM,
                "{name} is denied"
            );
        }
    }

    /// A call nobody thought of denying is denied all the same: the filter
    /// is an allowlist, and no call of [`DENIED`] is on it.
    #[test]
    fn calls_outside_the_allowlist_are_denied() {
        for nr in DENIED {
            assert!(
                !ALLOWED.contains(nr),
                "syscall {nr} is both denied and allowed"
            );
        }
        type Probe = fn() -> i32;
        let probes: [(&str, Probe); 4] = [
            ("setpriority", || unsafe {
                ret(libc::setpriority(libc::PRIO_PROCESS, 0, 1).into())
            }),
            ("getsid", || unsafe { ret(libc::getsid(0).into()) }),
            ("chdir", || unsafe {
                ret(libc::chdir(c"/".as_ptr()).into())
            }),
            ("prctl PR_SET_DUMPABLE", || unsafe {
                ret(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0).into())
            }),
        ];
        for (name, probe) in probes {
            assert_eq!(
                in_child(probe, false, Policy::Host),
                0,
                "{name} works unhardened"
            );
            assert_eq!(
                in_child(probe, true, Policy::Host),
                100 + libc::EPERM,
                "{name} is not allowed"
            );
        }
        // What a host needs still works.
        let allowed = in_child(
            || unsafe {
                let mut buf = [0u8; 8];
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if page == libc::MAP_FAILED {
                    return 1;
                }
                if libc::getrandom(buf.as_mut_ptr().cast(), 8, 0) != 8 {
                    return 2;
                }
                if libc::prctl(libc::PR_SET_NAME, c"probe".as_ptr()) != 0 {
                    return 3;
                }
                0
            },
            true,
            Policy::Host,
        );
        assert_eq!(allowed, 0);
    }

    #[test]
    fn sockets_are_denied() {
        let code = in_hardened_child(|| unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd >= 0 { 1 } else { 100 + errno() }
        });
        assert_eq!(code, 100 + libc::EPERM);
    }
}
