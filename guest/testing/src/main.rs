//! The test guest as a native worker program (the wasm build of the same
//! guest is the library).

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    malt_test_guest::serve_native()
}

#[cfg(target_arch = "wasm32")]
fn main() {
    eprintln!("for wasm, malt-test-guest is the library (a component), not this program");
    std::process::exit(2);
}
