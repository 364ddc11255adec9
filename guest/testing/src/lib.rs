//! A guest for malt's tests, written straight against the WIT world: it
//! does what a well-behaved guest must not (spin without polling for
//! interrupts, trap, allocate without end), so the tests can check that
//! the host copes.
//!
//! Functions (`call` by name, MessagePack arguments):
//! - `add(a, b)`: a + b;
//! - `echo(bytes)`: returns its argument;
//! - `spin()`: loops forever and never polls `interrupted`;
//! - `panic(message)`: panics (a trap, since guests abort on panic);
//! - `alloc(mib)`: allocates and touches `mib` MiB, returns the count;
//! - `bytes(n)`: returns n bytes;
//! - `print(text)`: prints to stdout and returns nothing.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    path: "../../wit",
    world: "worker",
});

struct TestGuest;

fn args<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("bad arguments: {e}"))
}

fn value<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(v).map_err(|e| e.to_string())
}

impl Guest for TestGuest {
    fn call(name: String, a: Vec<u8>) -> Result<Vec<u8>, String> {
        match name.as_str() {
            "add" => {
                let (x, y): (i64, i64) = args(&a)?;
                value(&(x + y))
            }
            "echo" => {
                let (b,): (serde_bytes::ByteBuf,) = args(&a)?;
                value(&b)
            }
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "panic" => {
                let (m,): (String,) = args(&a)?;
                panic!("{m}");
            }
            "alloc" => {
                let (mib,): (usize,) = args(&a)?;
                let mut keep = Vec::new();
                for _ in 0..mib {
                    keep.push(vec![1u8; 1 << 20]);
                }
                value(&keep.len())
            }
            "bytes" => {
                let (n,): (usize,) = args(&a)?;
                value(&serde_bytes::ByteBuf::from(vec![7u8; n]))
            }
            "print" => {
                let (t,): (String,) = args(&a)?;
                println!("{t}");
                value(&())
            }
            other => Err(format!("no function named {other}")),
        }
    }

    fn eval(_code: String) -> Result<Vec<u8>, String> {
        Err("this guest cannot evaluate code".into())
    }
}

export!(TestGuest);
