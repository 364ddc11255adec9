//! Request handles and the encoding of values.

use super::*;

/// The bytes of a reply value; a reply without one reads as nil.
pub(crate) fn reply_bytes(value: &Option<protocol::FrameBytes>) -> &[u8] {
    const NIL: &[u8] = &[0xc0];
    value.as_ref().map_or(NIL, protocol::FrameBytes::bytes)
}

pub(crate) fn decode_value<R: DeserializeOwned>(worker: &str, bytes: &[u8]) -> Result<R> {
    protocol::from_msgpack(bytes).map_err(|e| Error::Decode {
        worker: worker.to_string(),
        type_name: std::any::type_name::<R>(),
        message: e.to_string(),
    })
}

/// Encodes call arguments as a MessagePack array: a tuple as its
/// elements, `()` as no arguments, any other single value as one argument.
pub(crate) fn encode_args(args: &impl Serialize) -> Result<Vec<u8>> {
    let bytes = encode_value(args)?;
    match bytes.first() {
        Some(0x90..=0x9f | 0xdc | 0xdd) => Ok(bytes),
        Some(0xc0) if bytes.len() == 1 => Ok(vec![0x90]),
        _ => {
            let mut wrapped = Vec::with_capacity(bytes.len() + 1);
            wrapped.push(0x91);
            wrapped.extend_from_slice(&bytes);
            Ok(wrapped)
        }
    }
}

pub(crate) fn encode_value(value: &impl Serialize) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
}

/// A request already sent to a worker; await it for the result.
///
/// Dropping the handle does not cancel the request: the worker still runs
/// it, and its result is discarded.
#[must_use = "the request runs anyway; await the handle to get its result"]
pub struct CallHandle<R> {
    state: CallState,
    worker: Arc<Inner>,
    _result: PhantomData<fn() -> R>,
}

pub(crate) enum CallState {
    Waiting(oneshot::Receiver<Reply>),
    Failed(Option<Error>),
}

impl<R> std::fmt::Debug for CallHandle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallHandle")
            .field("worker", &self.worker.name)
            .finish_non_exhaustive()
    }
}

impl<R> CallHandle<R> {
    pub(crate) fn new(worker: &Arc<Inner>, sent: Result<oneshot::Receiver<Reply>>) -> Self {
        CallHandle {
            state: match sent {
                Ok(rx) => CallState::Waiting(rx),
                Err(e) => CallState::Failed(Some(e)),
            },
            worker: worker.clone(),
            _result: PhantomData,
        }
    }
}

impl<R: DeserializeOwned> Future for CallHandle<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &mut this.state {
            CallState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(Error::TerminatedWorker))),
            CallState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Err(Error::TerminatedWorker)),
                Poll::Ready(Ok(Err(e))) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(Ok(value))) => {
                    let bytes = reply_bytes(&value);
                    Poll::Ready(this.worker.decode(bytes))
                }
            },
        }
    }
}
