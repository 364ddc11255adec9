//! The framed protocol between a manager and a worker's host.
//!
//! One duplex byte stream per worker (the host process's stdin and stdout).
//! Every message is a frame: a 4-byte little-endian length, then that many
//! bytes of MessagePack encoding one [`ToHost`] or [`FromHost`] message.
//! The length is capped on both sides ([`DEFAULT_MAX_FRAME`] unless
//! configured), so a garbage length can never make either side allocate
//! without bound.
//!
//! The conversation:
//!
//! 1. the manager sends [`ToHost::Init`] with the worker's configuration;
//! 2. the host answers [`FromHost::Hello`] once the guest is instantiated,
//!    or [`FromHost::Fatal`] (and exits) if it cannot start;
//! 3. then requests and replies flow, matched by id. Guest output travels
//!    as [`FromHost::Output`] frames, never raw on the stream.

#![deny(missing_docs)]

use std::io::{self, Read};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of this protocol; the host refuses a manager that speaks another.
pub const PROTOCOL_VERSION: u32 = 6;

/// Version of malt that this protocol crate belongs to. A manager and a
/// host must be the same version exactly: the host refuses another, and the
/// manager checks the host's answer (never a silent mix).
pub const MALT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default cap on one frame, in bytes (both directions).
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;

/// Largest capacity of one worker channel (values it holds before puts
/// wait). Both sides refuse more.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 20;

/// Cap on the handshake frames (`Init` and `Hello`), read before the
/// configured cap is known.
pub const HANDSHAKE_MAX_FRAME: usize = 1 << 20;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// What the manager wants back from a call or eval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyMode {
    /// The value (`remote_call`, `remote_call_fetch`).
    Value,
    /// Only success or failure (`remote_call_wait`).
    Ack,
    /// Nothing at all; failures are reported on the worker's stderr (`remote_do`).
    None,
}

/// One directory the guest may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGrant {
    /// Path on the host machine.
    pub host: String,
    /// Path the guest sees.
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// Configuration the manager sends in [`ToHost::Init`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// Protocol version the manager speaks.
    pub version: u32,
    /// malt version of the manager ([`MALT_VERSION`]).
    pub malt_version: String,
    /// Human name of the worker, used in the host's own diagnostics.
    pub name: String,
    /// The guest to run.
    pub guest: GuestSpec,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_limit: u64,
    /// Time a guest gets to stop cooperatively before it is killed.
    pub interrupt_grace: Duration,
    /// Wall-clock limit of one call or eval, if any.
    pub call_timeout: Option<Duration>,
    /// Wall-clock limit of starting the guest (instantiation and its start
    /// function), and of each reset after a trap or kill.
    pub start_timeout: Duration,
    /// Cap on one frame in either direction.
    pub max_frame: usize,
    /// Fuel (roughly, wasm instructions) each request may burn, if limited.
    pub fuel: Option<u64>,
    /// Bytes of output one request may print; the rest is dropped with a
    /// notice.
    pub output_limit: u64,
    /// Environment variables the guest sees.
    pub env: Vec<(String, String)>,
    /// Directories the guest sees.
    pub dirs: Vec<DirGrant>,
    /// How often the manager sends [`ToHost::Ping`], if it does (a host
    /// on another machine): the host gives up on a manager it has not
    /// heard from for [`HEARTBEAT_MISSES`] intervals, so a dead link
    /// leaves no host behind.
    pub heartbeat: Option<Duration>,
    /// A function of the guest's, called with no arguments in a spare
    /// instance made ahead for a worker like this one before the worker
    /// gets it, so that its first request finds the guest warm (in-process
    /// workers start from spares). Set only for a guest that such a call
    /// leaves as it was: the Python guest's.
    pub warm_up: Option<String>,
    /// Roll the guest back to its state before a request that had to be
    /// killed (an interrupt it ignored, a timeout), instead of resetting
    /// it: the host keeps a copy-on-write fork of itself taken between
    /// requests and hands the stream over to it. Process hosts only.
    #[serde(default)]
    pub rollback: bool,
}

/// Intervals without a byte from the other side after which a heartbeat
/// watcher (on either side) declares the link dead.
pub const HEARTBEAT_MISSES: u32 = 3;

/// Which guest a host runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestSpec {
    /// A precompiled wasm component (an artifact from malt's cache).
    Artifact {
        /// Path of the artifact.
        path: String,
        /// The file the manager verified (see [`ArtifactIdentity`]): the
        /// host loads the file at `path` only if it is still that file,
        /// unchanged since. `None` for an artifact the user chose.
        identity: Option<ArtifactIdentity>,
    },
    /// A wasm component named by its content: a host that cannot reach the
    /// manager's files (on another machine) looks it up in its own
    /// artifact cache and, if it lacks it, asks for the bytes
    /// ([`FromHost::NeedComponent`]), checks them against the hash and
    /// compiles them.
    Component {
        /// SHA-256 of the component's bytes, in lowercase hex.
        sha256: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The script guest, compiled into the host natively (no wasm).
    NativeScript,
    /// The native guest the host program registered (see
    /// `malt::host::main_if_host_with`).
    Native,
}

/// Which file, in which state, an artifact was when the manager verified
/// its bytes (against a keyed MAC in malt's cache): any write, rename or
/// replacement since changes one of these (the kernel sets `ctime` on each
/// and no user can set it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArtifactIdentity {
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Last status change, nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl ArtifactIdentity {
    /// The identity of an open file, from its metadata.
    #[cfg(unix)]
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        ArtifactIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The bytes a MAC of this identity covers.
    pub fn to_bytes(&self) -> [u8; 56] {
        let mut out = [0; 56];
        out[..8].copy_from_slice(&self.dev.to_le_bytes());
        out[8..16].copy_from_slice(&self.ino.to_le_bytes());
        out[16..24].copy_from_slice(&self.size.to_le_bytes());
        out[24..40].copy_from_slice(&self.mtime_ns.to_le_bytes());
        out[40..56].copy_from_slice(&self.ctime_ns.to_le_bytes());
        out
    }
}

/// Messages from the manager to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToHost {
    /// First frame: configuration.
    Init(Box<HostConfig>),
    /// Call a guest function. `args` is a MessagePack array.
    Call {
        /// The request id its reply will carry.
        id: u64,
        /// The function's name.
        name: String,
        /// The arguments, a MessagePack array.
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
        /// What the manager wants back.
        reply: ReplyMode,
    },
    /// Call one guest function once per input, in order, as separate
    /// requests run back to back (each with its own timeout); the reply
    /// is one value: a MessagePack array of `Result<bytes, Failure>`, one
    /// per input run. The batch stops after the first input that fails
    /// other than with [`Failure::Remote`] (a trap, an interrupt, a
    /// limit), so the array may be shorter than the inputs.
    CallBatch {
        /// The request id its reply will carry.
        id: u64,
        /// The function's name.
        name: String,
        /// Each call's arguments, a MessagePack array.
        args: Vec<serde_bytes::ByteBuf>,
    },
    /// Evaluate code in the guest's session.
    Eval {
        /// The request id its reply will carry.
        id: u64,
        /// The source code.
        code: String,
        /// What the manager wants back.
        reply: ReplyMode,
    },
    /// Interrupt the request now running; if none is, the next one to
    /// begin, provided the manager sent it before this interrupt.
    Interrupt {
        /// The last request id the manager had used when it interrupted.
        up_to: u64,
    },
    /// Create a worker channel unless it exists; replies with no value.
    ChannelOpen {
        /// The request id its reply will carry.
        id: u64,
        /// The channel's name.
        name: String,
        /// Values it holds before puts wait (at most [`MAX_CHANNEL_CAPACITY`]).
        capacity: u32,
    },
    /// Append a value to a channel; replies once it is in the queue.
    ChannelPut {
        /// The request id its reply will carry.
        id: u64,
        /// The channel's name.
        name: String,
        /// The value, MessagePack.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Take a value from a channel; replies once there is one.
    ChannelTake {
        /// The request id its reply will carry.
        id: u64,
        /// The channel's name.
        name: String,
    },
    /// Whether a take would not block; replies with a MessagePack bool.
    ChannelIsReady {
        /// The request id its reply will carry.
        id: u64,
        /// The channel's name.
        name: String,
    },
    /// Shut down now.
    Stop,
    /// Nothing but a sign of life (see [`HostConfig::heartbeat`]); the
    /// host answers [`FromHost::Pong`].
    Ping,
    /// The bytes of the component the host asked for with
    /// [`FromHost::NeedComponent`] (during the handshake only).
    Component(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Which of the guest's output streams a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
}

/// Which worker limit a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Limit {
    /// The guest's linear memory cap.
    Memory,
    /// A frame or value larger than the frame cap.
    FrameSize,
    /// The fuel (instruction budget) of one request.
    Fuel,
    /// Requests waiting for a reply on one worker.
    PendingRequests,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Memory => "memory limit",
            Limit::FrameSize => "frame size limit",
            Limit::Fuel => "fuel limit",
            Limit::PendingRequests => "pending request limit",
        })
    }
}

/// Why a request failed, as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The guest returned an error.
    Remote(String),
    /// The request was interrupted.
    Interrupted {
        /// Whether the guest was killed and reset (its state is gone).
        state_lost: bool,
        /// Whether the guest was killed and rolled back to its state
        /// before the request (`HostConfig::rollback`).
        #[serde(default)]
        rolled_back: bool,
    },
    /// The request ran past the call timeout.
    Timeout {
        /// Whether the guest was killed and reset (its state is gone).
        state_lost: bool,
        /// Whether the guest was killed and rolled back to its state
        /// before the request.
        #[serde(default)]
        rolled_back: bool,
    },
    /// The guest trapped (panic, unreachable, stack overflow); state was reset.
    Trap(String),
    /// A limit was hit.
    Limit {
        /// Which limit.
        limit: Limit,
        /// What happened, for people.
        message: String,
    },
    /// The request itself was invalid (e.g. a channel with capacity 0).
    Invalid(String),
}

/// What a wasm host process locked down before it ran guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardening {
    /// The seccomp filter is on, on every thread.
    pub seccomp: bool,
    /// The Landlock ABI the kernel enforced the rules with; 0 without
    /// Landlock.
    pub landlock_abi: u32,
    /// Every Landlock rule malt asks for was enforced (files, TCP, scopes:
    /// ABI 6 or later).
    pub landlock_full: bool,
}

impl Hardening {
    /// Whether every layer is in force.
    pub fn is_complete(&self) -> bool {
        self.seccomp && self.landlock_full
    }
}

/// Messages from the host to the manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromHost {
    /// The host is ready.
    Hello {
        /// Protocol version the host speaks.
        version: u32,
        /// malt version of the host ([`MALT_VERSION`]).
        malt_version: String,
        /// What serves the guest.
        kind: GuestKind,
        /// The host's process id.
        pid: u32,
        /// What the host process locked down before running guest code;
        /// `None` where it does not lock itself (an in-process or native
        /// worker).
        hardening: Option<Hardening>,
    },
    /// The answer to a request. `None` when no value was asked for
    /// (`remote_do` gets one too, so the manager knows it ran).
    Reply {
        /// The id of the request answered.
        id: u64,
        /// Its value (MessagePack), none, or why it failed.
        result: Result<Option<serde_bytes::ByteBuf>, Failure>,
    },
    /// The host killed a request the only way a native guest can be
    /// killed, by exiting; the manager starts a fresh host and sends it
    /// the requests still unanswered.
    Restart,
    /// A chunk of guest output.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, as the guest wrote them.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The answer to [`ToHost::Ping`].
    Pong,
    /// During the handshake: the host's cache lacks the component of a
    /// [`GuestSpec::Component`]; the manager answers
    /// [`ToHost::Component`].
    NeedComponent {
        /// The hash the host looked up.
        sha256: String,
    },
    /// The host cannot go on; it exits after this frame.
    Fatal {
        /// What went wrong, for the manager to act on.
        kind: FatalKind,
        /// What went wrong, for people.
        message: String,
    },
}

/// What serves a guest in a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    /// A WebAssembly component run by wasmtime.
    Wasm,
    /// Rust code compiled into the host.
    Native,
}

/// Why a host gave up ([`FromHost::Fatal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FatalKind {
    /// The first frame was not a valid `Init` of this version.
    Handshake,
    /// The compiled artifact could not be loaded (damaged, or built for
    /// another engine): the manager compiles it again.
    ArtifactLoad,
    /// The guest could not be started (its imports, its world, its start
    /// function, or a configuration this host cannot serve).
    GuestStart,
    /// The host could not lock itself down before running guest code.
    Harden,
    /// A malformed frame from the manager.
    Protocol,
    /// A killed guest did not stop (it is blocked outside guest code).
    Unkillable,
    /// The guest could not be started again after a trap or a kill (its
    /// start timed out, or the host ran out of a resource).
    Reset,
}

/// A frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly at a frame boundary.
    #[error("end of stream")]
    Eof,
    /// Reading or writing the stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The frame's length is over the cap.
    #[error("frame of {len} bytes is over the {max} byte cap")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The frame's bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a message as a frame (header included).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Control messages are small; a value-carrying one goes through
    // `encode_capped` with the worker's cap.
    encode_capped(message, usize::MAX).expect("a control message is far below 4 GiB")
}

/// Encodes a message as a frame of at most `max` bytes (and at most what
/// a frame header can say, 4 GiB): larger is [`FrameError::TooLarge`],
/// never a length that wraps.
pub fn encode_capped<T: Serialize>(message: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    // Writing into a Vec only fails for types serde cannot encode, and
    // every message type here encodes.
    rmp_serde::encode::write_named(&mut buf, message).expect("protocol messages always encode");
    let len = buf.len() - HEADER_LEN;
    let max = max.min(u32::MAX as usize);
    let header = u32::try_from(len)
        .ok()
        .filter(|_| len <= max)
        .ok_or(FrameError::TooLarge { len, max })?;
    buf[..HEADER_LEN].copy_from_slice(&header.to_le_bytes());
    Ok(buf)
}

mod in_place;
pub use in_place::{
    Call, FrameBytes, IN_PLACE_BYTES, Reply, call_head, decode_call, decode_reply, frame_head,
};

/// Deepest nesting of arrays and maps a decoded value may have. Deeper
/// input is an error, not a stack overflow: a guest's reply is untrusted,
/// and recursive types (`rmpv::Value`, `serde_json::Value`) recurse per
/// level.
pub const MAX_VALUE_DEPTH: usize = 128;

/// Decodes MessagePack with the nesting limit ([`MAX_VALUE_DEPTH`]).
pub fn from_msgpack<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_VALUE_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes a frame body (header excluded).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    from_msgpack(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame body from a blocking reader.
pub fn read_frame(reader: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut body = vec![0u8; body_len(header, max)?];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// The body length a frame header announces, checked against the cap
/// before anything is allocated. Every reader of frames (this module's
/// blocking one, the manager's async one) goes through it.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ToHost::Call {
            id: 7,
            name: "add".into(),
            args: rmp_serde::to_vec(&(1, 2)).unwrap(),
            reply: ReplyMode::Value,
        };
        let frame = encode(&msg);
        let body = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(decode::<ToHost>(&body).unwrap(), msg);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let frame = 1000u32.to_le_bytes();
        assert!(matches!(
            read_frame(&mut &frame[..], 10),
            Err(FrameError::TooLarge { len: 1000, max: 10 })
        ));
        let mut short = encode(&ToHost::Stop);
        short.pop();
        assert!(matches!(
            read_frame(&mut &short[..], DEFAULT_MAX_FRAME),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[][..], DEFAULT_MAX_FRAME),
            Err(FrameError::Eof)
        ));
    }

    #[test]
    fn encoding_refuses_a_frame_over_the_cap() {
        let message = FromHost::Output {
            stream: Stream::Stdout,
            data: vec![7; 1000],
        };
        let frame = encode_capped(&message, 2000).unwrap();
        let len = u32::from_le_bytes(frame[..HEADER_LEN].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - HEADER_LEN);
        match encode_capped(&message, 500) {
            Err(FrameError::TooLarge { len: l, max: 500 }) => assert_eq!(l, len),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // 100 000 nested one-element arrays around a nil.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert!(from_msgpack::<rmpv::Value>(&deep).is_err());
        assert!(from_msgpack::<serde_json::Value>(&deep).is_err());
        let mut ok = vec![0x91u8; MAX_VALUE_DEPTH - 1];
        ok.push(0xc0);
        assert!(from_msgpack::<serde_json::Value>(&ok).is_ok());
    }

    #[test]
    fn garbage_bodies_do_not_decode() {
        for garbage in [&b"\xff\xff"[..], b"", b"\x93\x01", b"\xc1"] {
            assert!(decode::<ToHost>(garbage).is_err());
            assert!(decode::<FromHost>(garbage).is_err());
        }
    }
}
