//! Frames as a host or a manager reads them: any bytes must give a value
//! or an error, never a panic or an unbounded allocation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    malt::__fuzz::frames(data);
});
