//! What the CLI prints: values, errors and their exit codes, progress.

use super::*;

pub(crate) fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Usage>().is_some() {
        return 2;
    }
    match error.downcast_ref::<Error>() {
        Some(
            Error::Remote(_)
            | Error::Trap { .. }
            | Error::LimitExceeded { .. }
            | Error::Decode { .. },
        ) => 1,
        Some(Error::Encode(_) | Error::Invalid { .. }) => 2,
        Some(Error::Spawn { .. } | Error::Component(_) | Error::Io { .. }) => 3,
        Some(Error::Interrupted { .. } | Error::Timeout) => 4,
        _ => 5,
    }
}

pub(crate) fn error_kind(error: &anyhow::Error) -> &'static str {
    if error.downcast_ref::<Usage>().is_some() {
        return "usage";
    }
    match error.downcast_ref::<Error>() {
        Some(Error::Remote(_)) => "remote",
        Some(Error::Trap { .. }) => "trap",
        Some(Error::LimitExceeded { .. }) => "limit",
        Some(Error::Decode { .. }) => "decode",
        Some(Error::Spawn { .. }) => "spawn",
        Some(Error::Component(_) | Error::Io { .. }) => "component",
        Some(Error::Interrupted { .. }) => "interrupted",
        Some(Error::Timeout) => "timeout",
        Some(Error::TerminatedWorker) => "terminated",
        _ => "error",
    }
}

/// Whether to color what goes to stderr.
pub(crate) fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub(crate) fn print_error(error: &anyhow::Error) {
    let (start, end) = if color_stderr() {
        ("\x1b[1;31m", "\x1b[0m")
    } else {
        ("", "")
    };
    eprintln!("{start}error:{end} {error:#}");
}
