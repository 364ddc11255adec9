//! Worker channels, seen from the manager.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::protocol::ToHost;
use crate::worker::{Inner, encode_value, reply_bytes};

/// A handle on a named FIFO queue kept by a worker's host (Malt's
/// `worker_channel`).
///
/// The guest reaches the same queue by name (`channel_put`,
/// `channel_take`, `channel_is_ready` in the script guest). Operations are
/// served by the host even while the guest is busy. The handle is `Send`
/// and `'static`: move it into another task freely.
pub struct WorkerChannel<T> {
    worker: Arc<Inner>,
    name: Arc<str>,
    _value: PhantomData<fn(T) -> T>,
}

impl<T> Clone for WorkerChannel<T> {
    fn clone(&self) -> Self {
        WorkerChannel {
            worker: self.worker.clone(),
            name: self.name.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for WorkerChannel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerChannel")
            .field("worker", &self.worker.name)
            .field("name", &self.name)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> WorkerChannel<T> {
    pub(crate) fn new(worker: Arc<Inner>, name: &str) -> Self {
        WorkerChannel {
            worker,
            name: name.into(),
            _value: PhantomData,
        }
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends a value; waits while the channel is full.
    pub async fn put(&self, value: T) -> Result<()> {
        let value = encode_value(&value)?;
        let rx = self.worker.request(|id| ToHost::ChannelPut {
            id,
            name: self.name.to_string(),
            value,
        })?;
        rx.await.map_err(|_| crate::Error::TerminatedWorker)??;
        Ok(())
    }

    /// Removes and returns the oldest value; waits while the channel is empty.
    pub async fn take(&self) -> Result<T> {
        let rx = self.worker.request(|id| ToHost::ChannelTake {
            id,
            name: self.name.to_string(),
        })?;
        let value = rx.await.map_err(|_| crate::Error::TerminatedWorker)??;
        self.worker.decode(reply_bytes(&value))
    }

    /// Whether [`take`](WorkerChannel::take) would return at once.
    pub async fn is_ready(&self) -> Result<bool> {
        let rx = self.worker.request(|id| ToHost::ChannelIsReady {
            id,
            name: self.name.to_string(),
        })?;
        let value = rx.await.map_err(|_| crate::Error::TerminatedWorker)??;
        self.worker.decode(reply_bytes(&value))
    }
}
