//! The guest thread: runs requests one at a time, answers them, and
//! resets the guest after a trap or a kill.

use super::*;
use crate::control::Reason;
use crate::rollback::Rollback;
use crate::serve::Request;

/// A queued request: one call or eval, or a batch of calls of one
/// function (run in a loop here, answered with one frame).
pub(crate) enum Job {
    One(Work),
    Batch { name: String, args: Vec<Vec<u8>> },
}

/// Runs requests one at a time, in arrival order.
pub(crate) fn guest_loop(
    mut guest: Box<dyn Guest>,
    mut work: Receiver<Request>,
    shared: &Shared,
    place: Place,
    mut idle: Option<crate::serve::Idle>,
    mut rollback: Option<Rollback>,
) {
    loop {
        if let Some(resumed) = rollback.as_mut().and_then(Rollback::snapshot_if_stale) {
            // This process is the snapshot, and serves from here on.
            work = resumed.work;
            idle = resumed.idle;
        }
        let given_back = rollback.as_mut().and_then(Rollback::given_back);
        let next = match given_back {
            Some(request) => Ok((request, false)),
            None => work.try_recv().map(|r| (r, true)).or_else(|_| {
                // Nothing more is queued: what was held goes out now.
                shared.flush_held();
                match idle.as_mut().and_then(|read| read(&work)) {
                    Some(next) => Ok(next),
                    None => work.recv().map(|r| (r, true)),
                }
            }),
        };
        let Ok(((id, job, mode), queued)) = next else {
            return;
        };
        if queued {
            shared
                .queued
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        let go_on = match job {
            Job::One(request) => Ran {
                shared,
                place,
                id,
                mode,
            }
            .one(&mut *guest, request, rollback.as_mut().map(|r| (r, &work))),
            Job::Batch { name, args } => run_batch(&mut *guest, shared, place, id, name, args),
        };
        if let Some(rollback) = rollback.as_mut() {
            rollback.guest_changed();
        }
        if !go_on {
            return;
        }
    }
}

/// Runs one call of a request: `None` when the host is shutting down (no
/// answer is due).
fn run_call(guest: &mut dyn Guest, shared: &Shared, id: u64, work: &Work) -> Option<Outcome> {
    if !shared.control.begin(id, &shared.channels) {
        return None;
    }
    shared
        .output_used
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let outcome = guest.run(work);
    let ended = shared.control.end();
    if ended.shut_down {
        // An in-process worker winding down: the manager sees the stream
        // end, not a reply.
        return None;
    }
    let trapped = matches!(outcome, Err(GuestError::Trap { .. }));
    let killed = ended.interrupted.filter(|_| ended.killed && trapped);
    Some(Outcome {
        result: outcome.map_err(|e| failure(e, &ended)),
        trapped,
        killed,
    })
}

/// How one call ended: its result, whether the guest trapped (it needs a
/// reset), and why it was killed, if it was.
struct Outcome {
    result: Result<Vec<u8>, Failure>,
    trapped: bool,
    killed: Option<Reason>,
}

/// One request (a call or an eval) to run and answer.
struct Ran<'a> {
    shared: &'a Shared,
    place: Place,
    id: u64,
    mode: ReplyMode,
}

impl Ran<'_> {
    /// Runs the request and answers it; false when the guest loop must
    /// end. With rollback, a killed request hands the stream over to the
    /// snapshot taken before it, with the `queue` (and this process ends
    /// there), unless that fails: then the guest is reset as without.
    fn one(
        self,
        guest: &mut dyn Guest,
        work: Work,
        rollback: Option<(&mut Rollback, &Receiver<Request>)>,
    ) -> bool {
        let Some(Outcome {
            result,
            trapped,
            killed,
        }) = run_call(guest, self.shared, self.id, &work)
        else {
            return false;
        };
        if let (Some(reason), Some((rollback, queue))) = (killed, rollback)
            && rollback.ready()
        {
            match rollback.hand_over(queue) {
                Ok(handed_over) => {
                    let rolled_back = Err(reason.rolled_back());
                    reply(self.shared, self.id, &work, self.mode, rolled_back);
                    handed_over.exit();
                }
                Err(why) => eprintln!("malt host: rollback failed, resetting the guest: {why}"),
            }
        }
        reply(self.shared, self.id, &work, self.mode, result);
        // The caller has its answer; the next request needs a fresh guest.
        !trapped || reset(guest, self.shared, self.place)
    }
}

/// Runs a batch: each call as its own request (its own timeout, output
/// allowance and interrupt), until the first that fails other than by
/// the guest's own error (a trap, an interrupt, a limit): the batch stops
/// there, and its answer holds the results so far, that one's included.
/// The manager sends the rest again.
fn run_batch(
    guest: &mut dyn Guest,
    shared: &Shared,
    place: Place,
    id: u64,
    name: String,
    args: Vec<Vec<u8>>,
) -> bool {
    let mut results: Vec<Result<serde_bytes::ByteBuf, Failure>> = Vec::with_capacity(args.len());
    let mut work = Work::Call {
        name,
        args: Vec::new().into(),
    };
    let mut trapped = false;
    for input in args {
        if let Work::Call { args, .. } = &mut work {
            *args = input.into();
        }
        let Some(Outcome {
            result,
            trapped: trap,
            ..
        }) = run_call(guest, shared, id, &work)
        else {
            return false;
        };
        let stop = !matches!(result, Ok(_) | Err(Failure::Remote(_)));
        results.push(result.map(serde_bytes::ByteBuf::from));
        if stop {
            trapped = trap;
            break;
        }
    }
    match rmp_serde::to_vec(&results) {
        Ok(bytes) => shared.answer(id, Ok(Some(bytes))),
        Err(e) => shared.answer(
            id,
            Err(Failure::Invalid(format!("encoding the batch: {e}"))),
        ),
    }
    !trapped || reset(guest, shared, place)
}

/// What the manager is told about a request that did not succeed.
fn failure(error: GuestError, ended: &super::control::Ended) -> Failure {
    match error {
        GuestError::Error(message) => match ended.interrupted {
            Some(reason) => reason.failure(false),
            None => Failure::Remote(message),
        },
        GuestError::Trap {
            message,
            memory_limit_hit,
            out_of_fuel,
        } => match ended.interrupted {
            Some(reason) if ended.killed => reason.failure(true),
            _ if out_of_fuel => Failure::Limit {
                limit: protocol::Limit::Fuel,
                message: "the request used up its fuel; the guest was reset".into(),
            },
            _ if memory_limit_hit => Failure::Limit {
                limit: protocol::Limit::Memory,
                message: format!("the guest ran out of its memory limit ({message})"),
            },
            _ => Failure::Trap(message),
        },
    }
}

fn reply(shared: &Shared, id: u64, work: &Work, mode: ReplyMode, result: Result<Vec<u8>, Failure>) {
    match mode {
        // A value over the frame cap is answered with that error by
        // `Shared::send`.
        ReplyMode::Value => shared.answer(id, result.map(Some)),
        ReplyMode::Ack => shared.answer(id, result.map(|_| None)),
        ReplyMode::None => {
            if let Err(failure) = result {
                let what = match work {
                    Work::Call { name, .. } => format!("remote_do({name})"),
                    Work::Eval { .. } => "remote_do(eval)".to_string(),
                };
                shared.output(
                    Stream::Stderr,
                    format!("{what} failed: {}\n", failure_text(&failure)).as_bytes(),
                );
            }
            // No value, but the manager learns the request ran (a
            // restarted native host must not run it twice).
            shared.answer(id, Ok(None));
        }
    }
}

/// Why a start or restart failed.
pub(crate) enum StartError {
    /// It failed, or was killed by the start timeout: the message says.
    Failed(String),
    /// The host is winding down (an in-process worker stopped meanwhile).
    ShutDown,
}

/// Runs a guest's start (`verb`: "start") or restart ("restart") under
/// the start timeout, so that one that loops or blocks is killed.
pub(crate) fn under_start_timeout(
    shared: &Shared,
    verb: &str,
    start: impl FnOnce() -> Result<(), String>,
) -> Result<(), StartError> {
    shared.control.begin_start(shared.start_timeout);
    let result = start();
    let ended = shared.control.end();
    match (result, ended.killed) {
        _ if ended.shut_down => Err(StartError::ShutDown),
        (Ok(()), false) => Ok(()),
        (Err(e), false) => Err(StartError::Failed(e)),
        (_, true) => Err(StartError::Failed(format!(
            "the guest did not {verb} within {:?} (does its start function loop or block?)",
            shared.start_timeout
        ))),
    }
}

/// Replaces a guest that trapped or was killed, under the start timeout.
/// False when it cannot be: the worker ends with a `Reset` fatal frame
/// (never the manager's process: an in-process worker just stops).
fn reset(guest: &mut dyn Guest, shared: &Shared, place: Place) -> bool {
    // A reset can take milliseconds: nothing answered waits for it.
    shared.flush_held();
    match under_start_timeout(shared, "restart", || guest.reset()) {
        Ok(()) => true,
        Err(StartError::ShutDown) => false,
        Err(StartError::Failed(why)) => {
            let message = format!("cannot restart the guest after a trap or kill: {why}");
            shared.end_worker(FatalKind::Reset, message, place, exit::START_FAILED);
            false
        }
    }
}

fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Remote(m) | Failure::Trap(m) | Failure::Invalid(m) => m.clone(),
        Failure::Interrupted { .. } => "interrupted".into(),
        Failure::Timeout { .. } => "timed out".into(),
        Failure::Limit { limit, message } => format!("{limit} exceeded: {message}"),
    }
}
