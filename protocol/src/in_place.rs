//! Values in frames without copies: a large call's arguments or reply
//! value is written behind a frame head from where it lies, and read in
//! place from the frame body it arrived in.

use serde::{Deserialize, Serialize};

use crate::{Failure, FrameError, HEADER_LEN, ReplyMode, encode, from_msgpack};

/// Values (call arguments, reply values) at least this large are written
/// behind a frame head ([`call_head`], [`frame_head`]) rather than copied
/// into their frame; smaller ones are not worth a second `write`.
pub const IN_PLACE_BYTES: usize = 64 << 10;

/// Bytes that lie inside a frame body: a value read in place, without
/// copying it out of the frame (a value can be as large as the frame cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameBytes {
    body: Vec<u8>,
    range: std::ops::Range<usize>,
}

impl FrameBytes {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.body[self.range.clone()]
    }
}

impl From<Vec<u8>> for FrameBytes {
    fn from(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        FrameBytes { body: bytes, range }
    }
}

impl std::ops::Deref for FrameBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

/// A [`FromHost::Reply`](crate::FromHost::Reply), its value read in place.
pub type Reply = (u64, Result<Option<FrameBytes>, Failure>);

/// Reads a frame body that holds a [`FromHost::Reply`](crate::FromHost::Reply) without copying
/// its value: the request's id and its value (or why it failed). Any
/// other message (or a malformed one: [`decode`](crate::decode) says what is wrong with
/// it) gives the body back.
pub fn decode_reply(body: Vec<u8>) -> Result<Reply, Vec<u8>> {
    /// [`FromHost`] with its `Reply` variant alone, the value borrowed.
    #[derive(Deserialize)]
    enum Borrowed<'a> {
        Reply {
            id: u64,
            #[serde(borrow)]
            result: Result<Option<&'a serde_bytes::Bytes>, Failure>,
        },
    }
    let (id, result) = match from_msgpack::<Borrowed<'_>>(&body) {
        Ok(Borrowed::Reply { id, result }) => {
            (id, result.map(|value| value.map(|v| range_in(&body, v))))
        }
        Err(_) => return Err(body),
    };
    let result = result.map(|range| range.map(|range| FrameBytes { body, range }));
    Ok((id, result))
}

/// Where `inner`, a slice of `body`, lies in it.
fn range_in(body: &[u8], inner: &[u8]) -> std::ops::Range<usize> {
    let offset = inner.as_ptr() as usize - body.as_ptr() as usize;
    debug_assert!(offset + inner.len() <= body.len());
    offset..offset + inner.len()
}

/// A [`ToHost::Call`](crate::ToHost::Call), its arguments read in place: id, function name,
/// arguments, reply mode.
pub type Call = (u64, String, FrameBytes, ReplyMode);

/// Reads a frame body that holds a [`ToHost::Call`](crate::ToHost::Call) without copying its
/// arguments; any other message gives the body back (see
/// [`decode_reply`]).
pub fn decode_call(body: Vec<u8>) -> Result<Call, Vec<u8>> {
    /// [`ToHost`] with its `Call` variant alone, the arguments borrowed.
    #[derive(Deserialize)]
    enum Borrowed<'a> {
        Call {
            id: u64,
            name: String,
            #[serde(borrow)]
            args: &'a serde_bytes::Bytes,
            reply: ReplyMode,
        },
    }
    let (id, name, range, reply) = match from_msgpack::<Borrowed<'_>>(&body) {
        Ok(Borrowed::Call {
            id,
            name,
            args,
            reply,
        }) => (id, name, range_in(&body, args), reply),
        Err(_) => return Err(body),
    };
    Ok((id, name, FrameBytes { body, range }, reply))
}

/// The head of a frame whose message ends in a value of `len` bytes (a
/// MessagePack bin) that the writer sends after the head, from where it
/// already lies: `message` is the message with that value empty. The
/// head is the frame header, the message up to the value, and the
/// value's bin header. Over `max` is [`FrameError::TooLarge`].
///
/// A large reply goes out without being copied into a frame first.
pub fn frame_head(message: &impl Serialize, len: usize, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut head = encode(message);
    // An empty bin: bin 8, length 0.
    if !head.ends_with(&[0xc4, 0x00]) {
        return Err(FrameError::Malformed(
            "the message does not end in an empty value".into(),
        ));
    }
    head.truncate(head.len() - 2);
    let max = max.min(u32::MAX as usize);
    let message_len = head.len() - HEADER_LEN;
    let too_large = || FrameError::TooLarge {
        len: message_len + len,
        max,
    };
    let len32 = u32::try_from(len).map_err(|_| too_large())?;
    match len {
        0..=0xff => head.extend_from_slice(&[0xc4, len as u8]),
        0x100..=0xffff => {
            head.push(0xc5);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head.push(0xc6);
            head.extend_from_slice(&len32.to_be_bytes());
        }
    }
    let body = head.len() - HEADER_LEN + len;
    let header = u32::try_from(body)
        .ok()
        .filter(|_| body <= max)
        .ok_or_else(too_large)?;
    head[..HEADER_LEN].copy_from_slice(&header.to_le_bytes());
    Ok(head)
}

/// The [`frame_head`] of a [`ToHost::Call`](crate::ToHost::Call) whose arguments (`args_len`
/// bytes) the writer sends after it: the same message, its fields in
/// another order (a struct is a map here: its fields may come in any
/// order), the arguments last.
pub fn call_head(
    id: u64,
    name: &str,
    reply: ReplyMode,
    args_len: usize,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    /// [`ToHost`]'s `Call`, the arguments last.
    #[derive(Serialize)]
    enum Head<'a> {
        Call {
            id: u64,
            name: &'a str,
            reply: ReplyMode,
            #[serde(with = "serde_bytes")]
            args: &'a [u8],
        },
    }
    let head = Head::Call {
        id,
        name,
        reply,
        args: &[],
    };
    frame_head(&head, args_len, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_MAX_FRAME, FromHost, Stream, ToHost, decode, read_frame};

    #[test]
    fn replies_and_calls_are_read_in_place_and_nothing_else_is_taken_for_one() {
        let body = |m: &FromHost| read_frame(&mut &encode(m)[..], DEFAULT_MAX_FRAME).unwrap();
        let value = rmp_serde::to_vec(&vec![7u8; 300]).unwrap();
        let b = body(&FromHost::Reply {
            id: 9,
            result: Ok(Some(serde_bytes::ByteBuf::from(value.clone()))),
        });
        let (id, result) = decode_reply(b).unwrap();
        assert_eq!(id, 9);
        assert_eq!(result.unwrap().unwrap().bytes(), &value[..]);
        let b = body(&FromHost::Reply {
            id: 10,
            result: Ok(None),
        });
        assert_eq!(decode_reply(b), Ok((10, Ok(None))));
        let failure = Failure::Remote("no".into());
        let b = body(&FromHost::Reply {
            id: 11,
            result: Err(failure.clone()),
        });
        assert_eq!(decode_reply(b), Ok((11, Err(failure))));
        for other in [
            FromHost::Pong,
            FromHost::Restart,
            FromHost::Output {
                stream: Stream::Stdout,
                data: b"hi".to_vec(),
            },
            FromHost::NeedComponent {
                sha256: "ab".into(),
            },
        ] {
            let b = body(&other);
            assert_eq!(decode_reply(b.clone()), Err(b), "{other:?}");
        }
        assert_eq!(decode_reply(vec![0xc1, 0x00]), Err(vec![0xc1, 0x00]));

        let call = ToHost::Call {
            id: 3,
            name: "echo".into(),
            args: value.clone(),
            reply: ReplyMode::Ack,
        };
        let b = read_frame(&mut &encode(&call)[..], DEFAULT_MAX_FRAME).unwrap();
        let (id, name, args, reply) = decode_call(b).unwrap();
        assert_eq!(
            (id, name.as_str(), &args[..], reply),
            (3, "echo", &value[..], ReplyMode::Ack)
        );
        let b = read_frame(&mut &encode(&ToHost::Ping)[..], DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(decode_call(b.clone()), Err(b));
    }

    #[test]
    fn a_frame_head_and_its_value_make_the_frame() {
        for len in [0usize, 1, 255, 256, 65_535, 65_536, 300_000] {
            let value: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let empty = FromHost::Reply {
                id: 5,
                result: Ok(Some(serde_bytes::ByteBuf::new())),
            };
            let mut frame = frame_head(&empty, len, DEFAULT_MAX_FRAME).unwrap();
            frame.extend_from_slice(&value);
            let body = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(
                decode::<FromHost>(&body).unwrap(),
                FromHost::Reply {
                    id: 5,
                    result: Ok(Some(serde_bytes::ByteBuf::from(value))),
                },
                "{len} bytes"
            );
        }
        let empty = FromHost::Reply {
            id: 5,
            result: Ok(Some(serde_bytes::ByteBuf::new())),
        };
        assert!(matches!(
            frame_head(&empty, 2000, 1000),
            Err(FrameError::TooLarge { max: 1000, .. })
        ));
        assert!(matches!(
            frame_head(&FromHost::Pong, 10, DEFAULT_MAX_FRAME),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_call_head_and_its_arguments_make_the_call() {
        let args = rmp_serde::to_vec(&(serde_bytes::ByteBuf::from(vec![3u8; 70_000]),)).unwrap();
        let mut frame =
            call_head(8, "echo", ReplyMode::Value, args.len(), DEFAULT_MAX_FRAME).unwrap();
        frame.extend_from_slice(&args);
        let body = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME).unwrap();
        let call = ToHost::Call {
            id: 8,
            name: "echo".into(),
            args: args.clone(),
            reply: ReplyMode::Value,
        };
        assert_eq!(decode::<ToHost>(&body).unwrap(), call);
        let (id, name, read, reply) = decode_call(body).unwrap();
        assert_eq!(
            (id, name.as_str(), &read[..], reply),
            (8, "echo", &args[..], ReplyMode::Value)
        );
    }
}
