//! Write a [malt](../malt) guest in Rust once, and build it two ways:
//!
//! - for `wasm32-wasip2`, as a component implementing the `malt:worker`
//!   world (run it with `Worker::wasm(path)`, sandboxed);
//! - natively, as a worker program (run it with
//!   `Worker::native_program(path)`).
//!
//! ```no_run
//! use malt_guest::Guest;
//!
//! fn guest() -> Guest {
//!     Guest::new()
//!         .func("add", |(a, b): (i64, i64)| Ok(a + b))
//!         .func("greet", |(name,): (String,)| Ok(format!("hello, {name}")))
//! }
//!
//! malt_guest::guest!(guest);
//! ```
//!
//! The crate is then a `cdylib` (the component) and an `rlib` whose
//! `serve_native()` a one-line `main` calls (the native program).
//! Arguments and results are serde types (arguments a tuple); an `Err`
//! becomes a remote exception in the manager; a panic fails the request
//! and resets the guest. Long-running functions poll [`interrupted`] and
//! use [`sleep`] and the channel functions, which an interrupt cuts short.

#![deny(missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde;

type Function = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, String>>;
type Eval = Box<dyn FnMut(&str) -> Result<Vec<u8>, String>>;

/// A guest: named functions, and optionally an evaluator for code.
#[derive(Default)]
pub struct Guest {
    functions: HashMap<String, Function>,
    eval: Option<Eval>,
}

fn encode<R: Serialize>(value: &R) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(value).map_err(|e| format!("cannot encode the result: {e}"))
}

impl Guest {
    /// A guest with no functions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function callable by name. `A` is the argument tuple, e.g.
    /// `(i64, String)` (`()` for none).
    pub fn func<A, R, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned + 'static,
        R: Serialize + 'static,
        F: Fn(A) -> Result<R, String> + 'static,
    {
        let label = name.to_string();
        self.functions.insert(
            name.to_string(),
            Box::new(move |bytes| {
                let args: A = rmp_serde::from_slice(bytes)
                    .or_else(|e| match bytes {
                        // No arguments: an empty array, which `()` reads as nil.
                        [0x90] => rmp_serde::from_slice(&[0xc0]).map_err(|_| e),
                        _ => Err(e),
                    })
                    .map_err(|e| format!("{label}: bad arguments: {e}"))?;
                encode(&f(args)?)
            }),
        );
        self
    }

    /// Sets the evaluator that `remote_eval` calls.
    pub fn eval<R, F>(mut self, mut f: F) -> Self
    where
        R: Serialize + 'static,
        F: FnMut(&str) -> Result<R, String> + 'static,
    {
        self.eval = Some(Box::new(move |code| encode(&f(code)?)));
        self
    }

    /// Calls a function by name with MessagePack arguments.
    pub fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String> {
        match self.functions.get(name) {
            Some(f) => f(args),
            None => Err(format!("no function named {name}")),
        }
    }

    /// Evaluates code, if the guest has an evaluator.
    pub fn evaluate(&mut self, code: &str) -> Result<Vec<u8>, String> {
        match &mut self.eval {
            Some(eval) => eval(code),
            None => Err("this guest cannot evaluate code".into()),
        }
    }
}

/// True once the manager asked to interrupt the request now running.
pub fn interrupted() -> bool {
    imp::interrupted()
}

/// Sleeps; false when an interrupt cut it short.
pub fn sleep(duration: Duration) -> bool {
    imp::sleep(duration)
}

/// Appends a value to a worker channel (waits while full).
pub fn channel_put<T: Serialize>(name: &str, value: &T) -> Result<(), String> {
    imp::channel_put(name, encode(value)?)
}

/// Takes the oldest value of a worker channel (waits while empty).
pub fn channel_take<T: DeserializeOwned>(name: &str) -> Result<T, String> {
    let bytes = imp::channel_take(name)?;
    rmp_serde::from_slice(&bytes).map_err(|e| format!("channel {name}: {e}"))
}

/// Whether a take on the channel would not wait.
pub fn channel_is_ready(name: &str) -> bool {
    imp::channel_is_ready(name)
}

/// Makes the crate a malt guest: `guest!(make)` where `make: fn() ->
/// Guest`. For wasm it exports the `malt:worker` world; natively it
/// defines `pub fn serve_native()` for the program's `main`.
#[macro_export]
macro_rules! guest {
    ($make:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            fn __malt_guest_new() -> $crate::Guest {
                $make()
            }
            use $crate::wasm::Component as MaltGuestComponent;
    $crate::wasm::export_worker!(MaltGuestComponent with_types_in $crate::wasm);
        };

        /// Serves this guest as a native worker program; call it from `main`.
        #[cfg(not(target_arch = "wasm32"))]
        pub fn serve_native() -> ! {
            $crate::native::serve($make)
        }
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm {
    //! The component side: WIT bindings and the export.

    use std::cell::RefCell;

    wit_bindgen::generate!({
        path: "wit",
        world: "worker",
        pub_export_macro: true,
        export_macro_name: "export_worker",
        default_bindings_module: "malt_guest::wasm",
    });

    unsafe extern "Rust" {
        fn __malt_guest_new() -> crate::Guest;
    }

    thread_local! {
        static GUEST: RefCell<Option<crate::Guest>> = const { RefCell::new(None) };
    }

    fn with_guest<T>(f: impl FnOnce(&mut crate::Guest) -> T) -> T {
        GUEST.with(|cell| {
            let mut slot = cell.borrow_mut();
            // SAFETY: defined by the guest! macro in the component crate.
            f(slot.get_or_insert_with(|| unsafe { __malt_guest_new() }))
        })
    }

    pub struct Component;

    impl Guest for Component {
        fn call(name: String, args: Vec<u8>) -> Result<Vec<u8>, String> {
            with_guest(|g| g.call(&name, &args))
        }
        fn eval(code: String) -> Result<Vec<u8>, String> {
            with_guest(|g| g.evaluate(&code))
        }
    }

    pub(crate) use self::malt::worker::host;
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::wasm::host;
    use std::time::Duration;

    pub fn interrupted() -> bool {
        host::interrupted()
    }
    pub fn sleep(d: Duration) -> bool {
        host::sleep(d.as_millis().min(u64::MAX as u128) as u64)
    }
    pub fn channel_put(name: &str, value: Vec<u8>) -> Result<(), String> {
        host::channel_put(name, &value)
    }
    pub fn channel_take(name: &str) -> Result<Vec<u8>, String> {
        host::channel_take(name)
    }
    pub fn channel_is_ready(name: &str) -> bool {
        host::channel_is_ready(name)
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod native {
    //! The native side: the guest served by malt's host runtime.

    use std::cell::RefCell;

    use malt_host::{GuestContext, NativeGuest};

    thread_local! {
        pub(crate) static CONTEXT: RefCell<Option<GuestContext>> = const { RefCell::new(None) };
    }

    struct Adapter {
        guest: crate::Guest,
    }

    impl NativeGuest for Adapter {
        fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String> {
            self.guest.call(name, args)
        }
        fn eval(&mut self, code: &str) -> Result<Vec<u8>, String> {
            self.guest.evaluate(code)
        }
    }

    /// Serves the guest if started as a worker host; otherwise explains.
    pub fn serve(make: fn() -> crate::Guest) -> ! {
        malt_host::main_if_host_with(move |cx| {
            CONTEXT.with(|c| *c.borrow_mut() = Some(cx));
            Adapter { guest: make() }
        });
        eprintln!(
            "this program is a malt guest: start it from a manager with \
             malt::Worker::native_program(path)"
        );
        std::process::exit(2)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::native::CONTEXT;
    use std::time::Duration;

    fn with<T>(f: impl FnOnce(&malt_host::GuestContext) -> T, outside: T) -> T {
        CONTEXT.with(|c| c.borrow().as_ref().map(f).unwrap_or(outside))
    }

    pub fn interrupted() -> bool {
        with(|cx| cx.interrupted(), false)
    }
    pub fn sleep(d: Duration) -> bool {
        with(|cx| cx.sleep(d), true)
    }
    pub fn channel_put(name: &str, value: Vec<u8>) -> Result<(), String> {
        with(
            |cx| cx.channel_put(name, value.clone()),
            Err("not running in a malt worker".into()),
        )
    }
    pub fn channel_take(name: &str) -> Result<Vec<u8>, String> {
        with(
            |cx| cx.channel_take(name),
            Err("not running in a malt worker".into()),
        )
    }
    pub fn channel_is_ready(name: &str) -> bool {
        with(|cx| cx.channel_is_ready(name), false)
    }
}
