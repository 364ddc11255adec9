//! What one store may use: its linear memories and tables together, and
//! how many instances, memories and tables it may have.
//!
//! wasmtime asks per memory and per table; a component can have many of
//! each (one per core instance), so the caps here are totals: a component
//! with ten memories gets the worker's memory limit once, not ten times.

use wasmtime::ResourceLimiter;

/// Most elements in all of a store's tables together.
pub(super) const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Most core instances, linear memories and tables in one store: far more
/// than a real component has (a Rust or Python guest has a handful).
pub(super) const MAX_INSTANCES: usize = 256;
pub(super) const MAX_MEMORIES: usize = 64;
pub(super) const MAX_TABLES: usize = 256;

/// Enforces the caps and remembers whether the guest hit the memory cap,
/// so a trap that follows can be reported as the limit it is.
pub(super) struct Limiter {
    memory_limit: usize,
    /// Bytes of all linear memories.
    memory_used: usize,
    /// Elements of all tables.
    table_elements: usize,
    pub memory_hit: bool,
}

impl Limiter {
    pub fn new(memory_limit: usize) -> Self {
        Limiter {
            memory_limit,
            memory_used: 0,
            table_elements: 0,
            memory_hit: false,
        }
    }
}

/// `used` after one item grows from `current` to `desired`, if within `cap`.
fn grow(used: usize, current: usize, desired: usize, cap: usize) -> Option<usize> {
    let grown = used.checked_add(desired.checked_sub(current)?)?;
    (grown <= cap).then_some(grown)
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match grow(self.memory_used, current, desired, self.memory_limit) {
            Some(used) => {
                self.memory_used = used;
                Ok(true)
            }
            None => {
                self.memory_hit = true;
                Ok(false)
            }
        }
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match grow(self.table_elements, current, desired, MAX_TABLE_ELEMENTS) {
            Some(used) => {
                self.table_elements = used;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_memory_cap_counts_every_memory_together() {
        let mut l = Limiter::new(100 * MIB);
        // Two memories of 60 MiB each: the second is refused.
        assert!(l.memory_growing(0, 60 * MIB, None).unwrap());
        assert!(!l.memory_hit);
        assert!(!l.memory_growing(0, 60 * MIB, None).unwrap());
        assert!(l.memory_hit, "reported as the memory limit");
        // What is left can still be used, by either memory.
        assert!(l.memory_growing(0, 40 * MIB, None).unwrap());
        assert!(!l.memory_growing(60 * MIB, 61 * MIB, None).unwrap());
    }

    #[test]
    fn growth_counts_only_what_is_added() {
        let mut l = Limiter::new(100 * MIB);
        assert!(l.memory_growing(0, 10 * MIB, None).unwrap());
        for size in (20..=100).step_by(10) {
            assert!(
                l.memory_growing((size - 10) * MIB, size * MIB, None)
                    .unwrap()
            );
        }
        assert!(!l.memory_growing(100 * MIB, 100 * MIB + 1, None).unwrap());
    }

    #[test]
    fn table_elements_are_capped_across_tables() {
        let mut l = Limiter::new(MIB);
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(!l.table_growing(0, 1, None).unwrap());
    }
}
