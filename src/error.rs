//! Errors of the manager API.

use std::fmt;

pub use crate::protocol::Limit;

/// An error raised by guest code in a worker, rethrown in the manager.
///
/// As in Malt, the original error object stays in the worker; the manager
/// gets its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteException {
    /// The worker that raised it (e.g. `worker 3 (wasm, pid 4242)`).
    pub worker: String,
    /// The guest's error text.
    pub message: String,
}

impl fmt::Display for RemoteException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Remote exception from {}:\n\n{}",
            self.worker, self.message
        )
    }
}

impl std::error::Error for RemoteException {}

/// Everything that can go wrong when using a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The guest raised an error (Malt's `RemoteException`).
    #[error(transparent)]
    Remote(#[from] RemoteException),

    /// The worker is not running: it was stopped, killed, or it crashed
    /// (Malt's `TerminatedWorkerException`). Pending and new requests on
    /// it fail with this.
    #[error("the worker has terminated")]
    TerminatedWorker,

    /// The request was interrupted. `state_lost` tells whether the guest's
    /// session had to be reset because it did not stop by itself within
    /// the interrupt grace period; `rolled_back` that it was killed but
    /// its session is as it was before the request
    /// ([`WorkerBuilder::rollback`](crate::WorkerBuilder::rollback)).
    #[error("interrupted{}", interrupted_detail(*state_lost, *rolled_back))]
    Interrupted {
        /// Whether the guest's state was lost.
        state_lost: bool,
        /// Whether the guest was killed and rolled back to its state before
        /// the request (nothing the request did remains).
        rolled_back: bool,
    },

    /// The request ran past the worker's call timeout and was stopped (its
    /// state is reset if it did not stop by itself, or rolled back to
    /// before the request with
    /// [`WorkerBuilder::rollback`](crate::WorkerBuilder::rollback)).
    #[error("the call timed out")]
    Timeout,

    /// The guest trapped (a panic, `unreachable`, a stack overflow); the
    /// worker reset its state and is still running.
    #[error("{worker}: the guest trapped (its state was reset): {message}")]
    Trap {
        /// The worker.
        worker: String,
        /// The trap's description.
        message: String,
    },

    /// The request hit one of the worker's limits.
    #[error("{worker}: {limit} exceeded: {message}")]
    LimitExceeded {
        /// The worker.
        worker: String,
        /// Which limit.
        limit: Limit,
        /// Details.
        message: String,
    },

    /// The worker could not be started.
    #[error("could not start {worker}: {message}{}", stderr_tail(stderr))]
    Spawn {
        /// The worker.
        worker: String,
        /// What went wrong.
        message: String,
        /// The last lines the host process wrote to its stderr.
        stderr: String,
    },

    /// A value from the worker could not be decoded into the requested type.
    #[error("{worker}: cannot decode the value as {type_name}: {message}")]
    Decode {
        /// The worker.
        worker: String,
        /// The Rust type asked for.
        type_name: &'static str,
        /// The decoder's message.
        message: String,
    },

    /// A value could not be encoded to be sent to the worker.
    #[error("cannot encode the value to send: {0}")]
    Encode(String),

    /// The request itself was invalid (e.g. a channel of capacity 0).
    #[error("{worker}: invalid request: {message}")]
    Invalid {
        /// The worker.
        worker: String,
        /// What was wrong.
        message: String,
    },

    /// An I/O error in the manager, e.g. while preparing a guest.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A wasm component could not be loaded or compiled.
    #[error("{0}")]
    Component(String),
    /// A pool has no worker left: each died more often than its restart
    /// policy allows.
    #[error("the pool has no worker left: {0}")]
    PoolExhausted(String),
}

fn interrupted_detail(state_lost: bool, rolled_back: bool) -> &'static str {
    match (state_lost, rolled_back) {
        (_, true) => " (the guest did not stop in time: it was rolled back to before the request)",
        (true, false) => " (the guest did not stop in time: its state was reset)",
        (false, false) => "",
    }
}

fn stderr_tail(stderr: &str) -> String {
    let tail = stderr.trim();
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nworker stderr:\n{tail}")
    }
}

impl Error {
    /// True for [`Error::TerminatedWorker`].
    pub fn is_terminated(&self) -> bool {
        matches!(self, Error::TerminatedWorker)
    }

    /// The remote exception, if this is one.
    pub fn as_remote(&self) -> Option<&RemoteException> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }

    /// The same error again, for each of several requests it ended (an
    /// I/O error keeps its kind and message).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Error::Remote(e) => Error::Remote(e.clone()),
            Error::TerminatedWorker => Error::TerminatedWorker,
            Error::Interrupted {
                state_lost,
                rolled_back,
            } => Error::Interrupted {
                state_lost: *state_lost,
                rolled_back: *rolled_back,
            },
            Error::Timeout => Error::Timeout,
            Error::Trap { worker, message } => Error::Trap {
                worker: worker.clone(),
                message: message.clone(),
            },
            Error::LimitExceeded {
                worker,
                limit,
                message,
            } => Error::LimitExceeded {
                worker: worker.clone(),
                limit: *limit,
                message: message.clone(),
            },
            Error::Spawn {
                worker,
                message,
                stderr,
            } => Error::Spawn {
                worker: worker.clone(),
                message: message.clone(),
                stderr: stderr.clone(),
            },
            Error::Decode {
                worker,
                type_name,
                message,
            } => Error::Decode {
                worker: worker.clone(),
                type_name,
                message: message.clone(),
            },
            Error::Encode(m) => Error::Encode(m.clone()),
            Error::Invalid { worker, message } => Error::Invalid {
                worker: worker.clone(),
                message: message.clone(),
            },
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Component(m) => Error::Component(m.clone()),
            Error::PoolExhausted(m) => Error::PoolExhausted(m.clone()),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with malt's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
