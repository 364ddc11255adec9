//! Values (MessagePack) as the manager and the script guest decode them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    malt::__fuzz::values(data);
});
