//! Worker channels: named FIFO queues kept by the host.
//!
//! The guest side blocks (on its own thread) while a queue is full or
//! empty; the manager side never blocks a host thread: its pending puts and
//! takes wait in the channel and are answered when they can complete.
//! Guest sleeps wait on the same condition variable, so one `wake_all`
//! cuts every blocking host call short on an interrupt.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Control, Shared};

/// Capacity of a channel the guest uses before the manager opened it.
pub const DEFAULT_CAPACITY: usize = 32;

/// Most channels one worker may hold.
pub const MAX_CHANNELS: usize = 4096;

#[derive(Default)]
struct Chan {
    queue: VecDeque<Vec<u8>>,
    capacity: usize,
    /// Manager takes waiting for a value, by request id.
    takers: VecDeque<u64>,
    /// Manager puts waiting for room.
    putters: VecDeque<(u64, Vec<u8>)>,
}

impl Chan {
    fn new(capacity: usize) -> Self {
        Chan {
            capacity,
            ..Chan::default()
        }
    }

    /// Moves values to waiting takers and waiting puts into free room,
    /// answering the manager requests that complete.
    fn pump(&mut self, shared: &Shared) {
        loop {
            let mut progressed = false;
            while !self.takers.is_empty() && !self.queue.is_empty() {
                let (id, value) = (self.takers.pop_front(), self.queue.pop_front());
                shared.reply(id.unwrap_or_default(), Ok(value));
                progressed = true;
            }
            while self.queue.len() < self.capacity && !self.putters.is_empty() {
                if let Some((id, value)) = self.putters.pop_front() {
                    self.queue.push_back(value);
                    shared.reply(id, Ok(None));
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Channels {
    map: Mutex<HashMap<String, Chan>>,
    changed: Condvar,
}

type Map<'a> = MutexGuard<'a, HashMap<String, Chan>>;

fn entry<'m>(map: &'m mut Map<'_>, name: &str, capacity: usize) -> Result<&'m mut Chan, String> {
    if !map.contains_key(name) {
        if map.len() >= MAX_CHANNELS {
            return Err(format!(
                "too many worker channels (the limit is {MAX_CHANNELS})"
            ));
        }
        map.insert(name.to_string(), Chan::new(capacity));
    }
    Ok(map.get_mut(name).expect("inserted above"))
}

impl Channels {
    fn lock(&self) -> Map<'_> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every blocked guest call so it can see an interrupt.
    pub fn wake_all(&self) {
        let _map = self.lock();
        self.changed.notify_all();
    }

    /// Creates a channel unless it exists (an existing one keeps its capacity).
    pub fn open(&self, name: &str, capacity: usize) -> Result<(), String> {
        if capacity == 0 {
            return Err("a worker channel needs a capacity of at least 1".into());
        }
        entry(&mut self.lock(), name, capacity).map(|_| ())
    }

    pub fn is_ready(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|c| !c.queue.is_empty())
    }

    pub fn manager_put(&self, shared: &Shared, id: u64, name: &str, value: Vec<u8>) {
        let mut map = self.lock();
        match entry(&mut map, name, DEFAULT_CAPACITY) {
            Ok(chan) => {
                chan.putters.push_back((id, value));
                chan.pump(shared);
                self.changed.notify_all();
            }
            Err(e) => shared.reply(id, Err(malt_protocol::Failure::Invalid(e))),
        }
    }

    pub fn manager_take(&self, shared: &Shared, id: u64, name: &str) {
        let mut map = self.lock();
        match entry(&mut map, name, DEFAULT_CAPACITY) {
            Ok(chan) => {
                chan.takers.push_back(id);
                chan.pump(shared);
                self.changed.notify_all();
            }
            Err(e) => shared.reply(id, Err(malt_protocol::Failure::Invalid(e))),
        }
    }

    /// Guest side: blocks while the channel is full.
    pub fn guest_put(&self, shared: &Shared, name: &str, value: Vec<u8>) -> Result<(), String> {
        let mut map = self.lock();
        loop {
            if shared.control.interrupted() {
                return Err("interrupted".into());
            }
            let chan = entry(&mut map, name, DEFAULT_CAPACITY)?;
            if chan.queue.len() < chan.capacity {
                chan.queue.push_back(value);
                chan.pump(shared);
                self.changed.notify_all();
                return Ok(());
            }
            map = self.changed.wait(map).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Guest side: blocks while the channel is empty.
    pub fn guest_take(&self, shared: &Shared, name: &str) -> Result<Vec<u8>, String> {
        let mut map = self.lock();
        loop {
            if shared.control.interrupted() {
                return Err("interrupted".into());
            }
            let chan = entry(&mut map, name, DEFAULT_CAPACITY)?;
            if let Some(value) = chan.queue.pop_front() {
                chan.pump(shared);
                self.changed.notify_all();
                return Ok(value);
            }
            map = self.changed.wait(map).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Guest side: sleeps unless interrupted; false when cut short.
    pub fn sleep(&self, control: &Control, duration: Duration) -> bool {
        let deadline = Instant::now().checked_add(duration);
        let mut map = self.lock();
        loop {
            if control.interrupted() {
                return false;
            }
            let now = Instant::now();
            map = match deadline {
                Some(d) if now >= d => return true,
                Some(d) => {
                    self.changed
                        .wait_timeout(map, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(map).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}
