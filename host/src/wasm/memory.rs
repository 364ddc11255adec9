//! Finding a guest's linear memory from the host, for interrupts raised
//! in it (see [`MemoryInterrupt`]).
//!
//! The component API gives the host no pointer to a guest's memory, by
//! design; a lazily lifted list does (`WasmList::as_le_slice`): a slice of
//! the guest's memory, wherever the guest put the list. The memory itself
//! is the run of readable and writable mappings around that slice
//! (`/proc/self/maps`, opened before the sandbox closes the filesystem),
//! which must have inaccessible guard mappings right before and after it:
//! the engine reserves a 32-bit memory's whole 4 GiB range up front, with a
//! guard before it, and makes only the memory's current size accessible.
//! So a request can only ever name the guest's own memory, never the
//! host's: the guest may write there anyway. A probe, bytes the guest says
//! lie at an offset, confirms that the run starts where the memory does.
//!
//! The address found stays valid: the memory never moves while it grows,
//! and the host forgets it before the store that owns it is dropped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use wasmtime::component::WasmList;

use super::{State, bindings};
use crate::control::MemoryInterrupt;

/// `/proc/self/maps`, opened once per process before a host's sandbox
/// closes the filesystem (`None`: this process cannot read it). Read with
/// `pread`, so the workers of one process share it.
static MAPS: OnceLock<Option<File>> = OnceLock::new();

/// Opens `/proc/self/maps` if this process has not yet.
pub(super) fn open_maps() {
    MAPS.get_or_init(|| File::open("/proc/self/maps").ok());
}

/// Shortest probe accepted.
const PROBE_MIN: usize = 16;

/// The guest's request, as in the WIT's `use-memory-interrupt`.
#[derive(Clone, Copy)]
pub(crate) struct Request<'a> {
    pub word: u32,
    pub bits: u32,
    pub slot: u32,
    pub value: u32,
    /// The probe as the host was handed it: a slice of the guest's memory.
    pub probe: &'a [u8],
    pub probe_at: u32,
    pub checks: &'a [(u32, u32)],
}

/// The guest asks for interrupts raised in its memory (the WIT's
/// `use-memory-interrupt`). The probe arrives unlifted: where it lies is
/// how the host finds the guest's memory, and only that memory.
pub(super) fn use_memory_interrupt(
    store: wasmtime::StoreContextMut<'_, State>,
    (at, probe, probe_at, checks): (
        bindings::malt::worker::host::MemoryInterrupt,
        WasmList<u8>,
        u32,
        Vec<(u32, u32)>,
    ),
) -> wasmtime::Result<(Result<(), String>,)> {
    let Some(maps) = MAPS.get().and_then(Option::as_ref) else {
        return Ok((Err("this host cannot read its memory map".into()),));
    };
    let request = Request {
        word: at.word,
        bits: at.bits,
        slot: at.slot,
        value: at.value,
        probe: probe.as_le_slice(&store),
        probe_at,
        checks: &checks,
    };
    let found = match locate(maps, &request) {
        Ok(found) => found,
        Err(why) => return Ok((Err(why),)),
    };
    // Not a use of the host that a spare must not make: `State::adopt`
    // hands it on.
    store.data().services.use_memory_interrupt(found);
    Ok((Ok(()),))
}

/// Where the request's words are in this process, or why not.
pub(crate) fn locate(maps: &File, request: &Request<'_>) -> Result<MemoryInterrupt, String> {
    if request.probe.len() < PROBE_MIN {
        return Err(format!("a probe of {PROBE_MIN} bytes or more is needed"));
    }
    if request.value == 0 || request.bits == 0 {
        return Err("the value and the bits must not be zero".into());
    }
    let maps = read_all(maps).map_err(|e| format!("reading the memory map: {e}"))?;
    let (base, end) = memory_around(&parse(&maps), request.probe.as_ptr() as usize)?;
    if bytes_at(base, end, request.probe_at, request.probe.len()) != Some(request.probe) {
        return Err(format!(
            "the probe is not at {:#x} of the memory",
            request.probe_at
        ));
    }
    let word_at = |offset: u32| -> Result<*mut u8, String> {
        if !offset.is_multiple_of(4) {
            return Err(format!("address {offset:#x} is not 4-byte aligned"));
        }
        let bytes = bytes_at(base, end, offset, 4)
            .ok_or_else(|| format!("address {offset:#x} is outside the memory"))?;
        Ok(bytes.as_ptr().cast_mut())
    };
    for &(offset, expected) in request.checks {
        let ptr = word_at(offset)?;
        // SAFETY: inside the guest's memory, aligned; the guest is paused
        // in this host call.
        let found = u32::from_le(unsafe { ptr.cast::<u32>().read_volatile() });
        if found != expected {
            return Err(format!(
                "the word at {offset:#x} is {found:#x}, not {expected:#x}"
            ));
        }
    }
    let (word, slot) = (word_at(request.word)?, word_at(request.slot)?);
    // SAFETY: both are aligned words inside the guest's linear memory,
    // which never moves (see the module doc); the wasm backend forgets
    // them before the store is dropped.
    Ok(unsafe { MemoryInterrupt::new(word, request.bits, slot, request.value) })
}

/// One line of `/proc/self/maps`: where, and what access it allows.
struct Mapping {
    start: usize,
    end: usize,
    /// Readable and writable.
    writable: bool,
    /// No access at all: a guard.
    guard: bool,
}

fn parse(maps: &[u8]) -> Vec<Mapping> {
    maps.split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?;
            let mut fields = line.split_ascii_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            Some(Mapping {
                start: usize::from_str_radix(start, 16).ok()?,
                end: usize::from_str_radix(end, 16).ok()?,
                writable: perms.starts_with("rw"),
                guard: perms.starts_with("---"),
            })
        })
        .collect()
}

/// The linear memory holding `inside`: its run of adjacent writable
/// mappings (its zeroed pages, its image mapped from the artifact), which
/// must lie between two inaccessible ones, as the engine lays it out.
fn memory_around(maps: &[Mapping], inside: usize) -> Result<(usize, usize), String> {
    let at = maps
        .iter()
        .position(|m| m.start <= inside && inside < m.end && m.writable)
        .ok_or("the probe is in no writable mapping")?;
    let mut first = at;
    while first > 0 && maps[first - 1].writable && maps[first - 1].end == maps[first].start {
        first -= 1;
    }
    let mut last = at;
    while last + 1 < maps.len() && maps[last + 1].writable && maps[last].end == maps[last + 1].start
    {
        last += 1;
    }
    let guarded_before =
        first > 0 && maps[first - 1].guard && maps[first - 1].end == maps[first].start;
    let guarded_after =
        last + 1 < maps.len() && maps[last + 1].guard && maps[last].end == maps[last + 1].start;
    if !(guarded_before && guarded_after) {
        return Err("the probe's mapping is not a guarded linear memory".into());
    }
    Ok((maps[first].start, maps[last].end))
}

fn read_all(file: &File) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 * 1024);
    let mut buf = [0u8; 8192];
    loop {
        let n = file.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The `len` bytes at `offset` from `start`, if they lie before `end`.
fn bytes_at(start: usize, end: usize, offset: u32, len: usize) -> Option<&'static [u8]> {
    let at = start.checked_add(offset as usize)?;
    if at.checked_add(len)? > end {
        return None;
    }
    // SAFETY: [at, at+len) lies in readable mappings of this process. The
    // bytes may change under the slice (another thread's memory); only
    // the guest's, which is paused in the host call that asks, matter.
    Some(unsafe { std::slice::from_raw_parts(at as *const u8, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a linear memory, laid out as the engine does: pages
    /// of no access around readable and writable ones.
    struct Reserved {
        at: *mut u8,
        len: usize,
    }

    impl Reserved {
        fn new(pages: usize) -> (Reserved, *mut u8) {
            let page = 4096;
            let len = (pages + 2) * page;
            // SAFETY: a fresh anonymous mapping, then part of it opened.
            unsafe {
                let at = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(at, libc::MAP_FAILED);
                let memory = at.cast::<u8>().add(page);
                let opened = libc::mprotect(
                    memory.cast(),
                    pages * page,
                    libc::PROT_READ | libc::PROT_WRITE,
                );
                assert_eq!(opened, 0);
                (Reserved { at: at.cast(), len }, memory)
            }
        }
    }

    impl Drop for Reserved {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.at.cast(), self.len) };
        }
    }

    #[test]
    fn only_the_guests_own_memory_is_found_and_written() {
        let (_reserved, memory) = Reserved::new(4);
        let word = |offset: usize| unsafe { memory.add(offset).cast::<u32>().read_volatile() };
        let probe: Vec<u8> = (0..32).map(|i| (i * 37 + 11) as u8).collect();
        // SAFETY: offsets inside the 4 open pages.
        let handed = unsafe {
            // The probe where the guest says it is, and the copy the host
            // is handed, elsewhere in the same memory.
            std::ptr::copy_nonoverlapping(probe.as_ptr(), memory.add(1000), 32);
            std::ptr::copy_nonoverlapping(probe.as_ptr(), memory.add(9000), 32);
            memory.add(2000).cast::<u32>().write(77);
            std::slice::from_raw_parts(memory.add(9000), 32)
        };
        let maps = File::open("/proc/self/maps").unwrap();
        let request = Request {
            word: 3000,
            bits: 0b1000,
            slot: 3004,
            value: 0xabcd,
            probe: handed,
            probe_at: 1000,
            checks: &[(2000, 77)],
        };
        let found = locate(&maps, &request).unwrap();
        found.raise();
        assert_eq!((word(3000), word(3004)), (0b1000, 0xabcd));
        assert!(found.pending() && found.raise_again());
        found.clear();
        assert_eq!((word(3000), word(3004)), (0, 0));
        assert!(
            !found.raise_again(),
            "nothing raised: nothing to raise again"
        );

        let refused = |request: Request<'_>| locate(&maps, &request).unwrap_err();
        assert!(
            refused(Request {
                checks: &[(2000, 78)],
                ..request
            })
            .contains("not 0x4e")
        );
        assert!(
            refused(Request {
                probe_at: 1004,
                ..request
            })
            .contains("probe is not at")
        );
        assert!(
            refused(Request {
                word: 3001,
                ..request
            })
            .contains("aligned")
        );
        // Past the memory's end: into the guard, or the host's memory.
        assert!(
            refused(Request {
                slot: 4 * 4096,
                ..request
            })
            .contains("outside")
        );
        assert!(
            refused(Request {
                slot: u32::MAX - 3,
                ..request
            })
            .contains("outside")
        );
        // A probe handed from the host's own memory names nothing: its
        // mapping is not a guarded memory (the main heap), or one whose
        // start does not hold the probe (a thread's arena between guards).
        let elsewhere = refused(Request {
            probe: &probe,
            ..request
        });
        assert!(
            elsewhere.contains("not a guarded") || elsewhere.contains("probe is not at"),
            "{elsewhere}"
        );
    }
}
