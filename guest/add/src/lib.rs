//! The smallest malt guest: `add(a, b)`. It calls nothing of the host's
//! (no interrupt polls, no channels), so its component imports WASI
//! only, and any component runtime can run it: malt-bench invokes the
//! same file with `malt call` and with the wasmtime CLI.

use malt_guest::Guest;

fn guest() -> Guest {
    Guest::new().func("add", |(a, b): (i64, i64)| Ok(a + b))
}

malt_guest::guest!(guest);
