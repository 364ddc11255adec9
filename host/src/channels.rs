//! Worker channels: named FIFO queues kept by the host.
//!
//! The guest side blocks (on its own thread) while a queue is full or
//! empty; the manager side never blocks a host thread: its pending puts and
//! takes wait in the channel and are answered when they can complete.
//! Guest sleeps wait on the same condition variable, so one `wake_all`
//! cuts every blocking host call short on an interrupt.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Control, Shared};
use malt_protocol::MAX_CHANNEL_CAPACITY;

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
                let len = value.as_ref().map_or(0, Vec::len);
                shared.channels.bytes.fetch_sub(len, Ordering::Relaxed);
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

pub(crate) struct Channels {
    map: Mutex<HashMap<String, Chan>>,
    changed: Condvar,
    /// Bytes of every value held, queued or waiting to be put: they live
    /// in the host's memory, so they count against the worker's memory
    /// limit like the guest's own memory does.
    bytes: AtomicUsize,
    byte_limit: usize,
}

type Map<'a> = MutexGuard<'a, HashMap<String, Chan>>;

/// One channel as [`Channels::export`] gives it: name, capacity, values,
/// waiting manager takes (request ids), waiting manager puts.
pub(crate) type ChannelState = (
    String,
    u64,
    Vec<serde_bytes::ByteBuf>,
    Vec<u64>,
    Vec<(u64, serde_bytes::ByteBuf)>,
);

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

impl Default for Channels {
    fn default() -> Self {
        Channels::new(usize::MAX)
    }
}

impl Channels {
    /// Channels holding at most `byte_limit` bytes of values in all.
    pub fn new(byte_limit: usize) -> Self {
        Channels {
            map: Mutex::default(),
            changed: Condvar::new(),
            bytes: AtomicUsize::new(0),
            byte_limit,
        }
    }

    /// Counts `len` more bytes held, unless that passes the limit.
    fn hold(&self, len: usize) -> Result<(), String> {
        let held = self.bytes.load(Ordering::Relaxed);
        if held.saturating_add(len) > self.byte_limit {
            return Err(format!(
                "the worker's channels hold {held} bytes; {len} more would pass the \
                 worker's memory limit ({} bytes)",
                self.byte_limit
            ));
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn lock(&self) -> Map<'_> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The whole state, for a host that hands the stream over to its
    /// snapshot (`rollback`): each channel's name, capacity, values, and
    /// the manager's takes and puts still waiting.
    pub fn export(&self) -> Vec<ChannelState> {
        use serde_bytes::ByteBuf;
        self.lock()
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    c.capacity as u64,
                    c.queue.iter().cloned().map(ByteBuf::from).collect(),
                    c.takers.iter().copied().collect(),
                    c.putters
                        .iter()
                        .map(|(id, v)| (*id, ByteBuf::from(v.clone())))
                        .collect(),
                )
            })
            .collect()
    }

    /// Replaces every channel with `state` (from [`Channels::export`]).
    pub fn import(&self, state: Vec<ChannelState>) {
        let mut map = self.lock();
        map.clear();
        let mut bytes = 0;
        for (name, capacity, queue, takers, putters) in state {
            let chan = Chan {
                queue: queue.into_iter().map(|v| v.into_vec()).collect(),
                capacity: capacity as usize,
                takers: takers.into(),
                putters: putters
                    .into_iter()
                    .map(|(id, v)| (id, v.into_vec()))
                    .collect(),
            };
            bytes += chan.queue.iter().map(Vec::len).sum::<usize>();
            bytes += chan.putters.iter().map(|(_, v)| v.len()).sum::<usize>();
            map.insert(name, chan);
        }
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Holds the channels' lock (taken before a fork, so that no other
    /// thread holds it in the copy), or `None` if another thread has it.
    pub fn try_hold(&self) -> Option<impl Sized + '_> {
        self.map.try_lock().ok()
    }

    /// Wakes every blocked guest call so it can see an interrupt.
    pub fn wake_all(&self) {
        let _map = self.lock();
        self.changed.notify_all();
    }

    /// Creates a channel unless it exists (an existing one keeps its capacity).
    pub fn open(&self, name: &str, capacity: usize) -> Result<(), String> {
        if capacity == 0 || capacity > MAX_CHANNEL_CAPACITY {
            return Err(format!(
                "a worker channel needs a capacity between 1 and {MAX_CHANNEL_CAPACITY}, \
                 got {capacity}"
            ));
        }
        entry(&mut self.lock(), name, capacity).map(|_| ())
    }

    pub fn is_ready(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|c| !c.queue.is_empty())
    }

    pub fn manager_put(&self, shared: &Shared, id: u64, name: &str, value: Vec<u8>) {
        let mut map = self.lock();
        if let Err(message) = self.hold(value.len()) {
            return shared.reply(
                id,
                Err(malt_protocol::Failure::Limit {
                    limit: malt_protocol::Limit::Memory,
                    message,
                }),
            );
        }
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
        // A value must fit in the frame that takes it to the manager.
        if value.len().saturating_add(64) > shared.max_frame {
            return Err(format!(
                "the value is {} bytes, over the worker's {} byte frame cap",
                value.len(),
                shared.max_frame
            ));
        }
        let mut map = self.lock();
        loop {
            if shared.control.interrupted() {
                return Err("interrupted".into());
            }
            let chan = entry(&mut map, name, DEFAULT_CAPACITY)?;
            if chan.queue.len() < chan.capacity {
                self.hold(value.len())?;
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
                self.bytes.fetch_sub(value.len(), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use malt_protocol::{FromHost, read_frame};

    /// A host's shared state whose outgoing frames land in a buffer.
    fn shared() -> (Arc<Shared>, Arc<Mutex<Vec<u8>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        (Shared::for_tests(out.clone()), out)
    }

    /// The replies sent so far: (id, value).
    fn replies(out: &Mutex<Vec<u8>>) -> Vec<(u64, Option<Vec<u8>>)> {
        let bytes = out.lock().unwrap().clone();
        let mut input = &bytes[..];
        let mut replies = Vec::new();
        while let Ok(body) = read_frame(&mut input, 1 << 20) {
            if let Ok(FromHost::Reply { id, result }) = malt_protocol::decode(&body) {
                replies.push((id, result.unwrap().map(|b| b.into_vec())));
            }
        }
        replies
    }

    #[test]
    fn values_held_count_against_the_memory_limit() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let s = Shared::for_tests_holding(out.clone(), 1000);
        s.channels.open("c", 100).unwrap();
        s.channels.guest_put(&s, "c", vec![1; 600]).unwrap();
        let err = s.channels.guest_put(&s, "c", vec![2; 600]).unwrap_err();
        assert!(err.contains("memory limit"), "{err}");
        // A manager's put is refused alike (a Memory limit error).
        s.channels.manager_put(&s, 7, "c", vec![3; 600]);
        let bytes = out.lock().unwrap().clone();
        let body = read_frame(&mut &bytes[..], 1 << 20).unwrap();
        match malt_protocol::decode::<FromHost>(&body).unwrap() {
            FromHost::Reply {
                id: 7,
                result: Err(malt_protocol::Failure::Limit { limit, .. }),
            } => assert_eq!(limit, malt_protocol::Limit::Memory),
            other => panic!("{other:?}"),
        }
        // Taking frees the room, whoever takes.
        assert_eq!(s.channels.guest_take(&s, "c").unwrap().len(), 600);
        s.channels.guest_put(&s, "c", vec![4; 900]).unwrap();
        s.channels.manager_take(&s, 8, "c");
        s.channels.guest_put(&s, "c", vec![5; 900]).unwrap();
    }

    #[test]
    fn capacity_is_checked_both_ways() {
        let ch = Channels::default();
        assert!(ch.open("a", 0).is_err());
        assert!(ch.open("a", MAX_CHANNEL_CAPACITY + 1).is_err());
        assert!(ch.open("a", MAX_CHANNEL_CAPACITY).is_ok());
        // Reopening keeps the first capacity.
        assert!(ch.open("a", 1).is_ok());
    }

    #[test]
    fn a_guest_put_waits_while_the_channel_is_full() {
        let (s, out) = shared();
        s.channels.open("c", 1).unwrap();
        s.channels.guest_put(&s, "c", vec![1]).unwrap();
        let s2 = s.clone();
        let putter = std::thread::spawn(move || s2.channels.guest_put(&s2, "c", vec![2]));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!putter.is_finished(), "the second put waits for room");
        // A take by the manager makes room; the waiting put completes.
        s.channels.manager_take(&s, 10, "c");
        putter.join().unwrap().unwrap();
        assert_eq!(replies(&out), vec![(10, Some(vec![1]))]);
        assert_eq!(s.channels.guest_take(&s, "c").unwrap(), vec![2]);
        assert!(!s.channels.is_ready("c"));
    }

    #[test]
    fn manager_takes_wait_in_order_for_guest_puts() {
        let (s, out) = shared();
        s.channels.manager_take(&s, 1, "q");
        s.channels.manager_take(&s, 2, "q");
        assert!(replies(&out).is_empty(), "nothing to take yet");
        s.channels.guest_put(&s, "q", vec![7]).unwrap();
        s.channels.guest_put(&s, "q", vec![8]).unwrap();
        assert_eq!(replies(&out), vec![(1, Some(vec![7])), (2, Some(vec![8]))]);
    }

    #[test]
    fn manager_puts_wait_for_room_in_order() {
        let (s, out) = shared();
        s.channels.open("q", 1).unwrap();
        s.channels.manager_put(&s, 1, "q", vec![1]);
        s.channels.manager_put(&s, 2, "q", vec![2]);
        assert_eq!(replies(&out), vec![(1, None)], "the second put waits");
        assert_eq!(s.channels.guest_take(&s, "q").unwrap(), vec![1]);
        assert_eq!(replies(&out), vec![(1, None), (2, None)]);
        assert_eq!(s.channels.guest_take(&s, "q").unwrap(), vec![2]);
    }

    #[test]
    fn an_interrupt_wakes_a_blocked_guest_take_and_sleep() {
        let (s, _) = shared();
        assert!(s.control.begin(1, &s.channels));
        let s2 = s.clone();
        let taker = std::thread::spawn(move || s2.channels.guest_take(&s2, "empty"));
        let s3 = s.clone();
        let sleeper =
            std::thread::spawn(move || s3.channels.sleep(&s3.control, Duration::from_secs(600)));
        std::thread::sleep(Duration::from_millis(50));
        s.control.interrupt(1, &s.channels);
        assert_eq!(taker.join().unwrap().unwrap_err(), "interrupted");
        assert!(!sleeper.join().unwrap(), "the sleep was cut short");
    }

    #[test]
    fn the_number_of_channels_is_capped() {
        let ch = Channels::default();
        for i in 0..MAX_CHANNELS {
            ch.open(&i.to_string(), 1).unwrap();
        }
        let err = ch.open("one more", 1).unwrap_err();
        assert!(err.contains("too many"), "{err}");
    }
}
