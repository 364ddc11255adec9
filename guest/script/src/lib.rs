//! malt's default guest: a persistent [Rhai](https://rhai.rs) session.
//!
//! The same [`Session`] serves two builds:
//!
//! - for `wasm32-wasip2` it is a component implementing the `malt:worker`
//!   world (`wit/`), embedded in the `malt` binary and run by wasmtime;
//! - natively it is linked into the `malt` binary and served by a native
//!   worker process.
//!
//! What the session needs from its worker (interrupt flag, sleep, worker
//! channels) comes through the [`Host`] trait, so the Rhai code is written
//! once for both.

#![deny(missing_docs)]

use std::rc::Rc;

use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Position, Scope};

/// What a worker's host offers the session: the `host` interface of the
/// `malt:worker` WIT world.
pub trait Host {
    /// True once the manager asked to interrupt the request now running.
    fn interrupted(&self) -> bool;
    /// Sleep for `ms` milliseconds; false when an interrupt cut it short.
    fn sleep(&self, ms: u64) -> bool;
    /// Append a MessagePack value to a worker channel (blocks while full).
    fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String>;
    /// Take the oldest MessagePack value of a worker channel (blocks while empty).
    fn channel_take(&self, name: &str) -> Result<Vec<u8>, String>;
    /// Whether a take on the channel would not block.
    fn channel_is_ready(&self, name: &str) -> bool;
}

/// How often (in Rhai operations) a running script polls for an interrupt.
/// Measured: polling every ~1000 operations costs 0-2% and stops a busy
/// loop within ~65 µs.
const POLL_EVERY_OPS: u64 = 1024;

/// Limits that make most runaway scripts fail with a clean error (state
/// kept) instead of exhausting the worker's memory cap (state lost).
pub mod limits {
    /// Longest string a script may build, in bytes.
    pub const MAX_STRING_SIZE: usize = 16 << 20;
    /// Most elements in one array or bytes in one blob.
    pub const MAX_ARRAY_SIZE: usize = 16 << 20;
    /// Most entries in one object map.
    pub const MAX_MAP_SIZE: usize = 1 << 20;
    /// Deepest chain of nested function calls.
    pub const MAX_CALL_LEVELS: usize = 64;
    /// Deepest expression nesting at global level and inside functions.
    pub const MAX_EXPR_DEPTH: usize = 64;
    /// Most variables a session may hold.
    pub const MAX_VARIABLES: usize = 100_000;
}

/// A persistent Rhai session: variables and functions defined by one
/// [`eval`](Session::eval) stay visible to later evals and calls.
pub struct Session {
    engine: Engine,
    scope: Scope<'static>,
    /// Every function defined so far, merged into one function-only AST.
    functions: AST,
    /// Snippets compiled before, by their text, the most recently used
    /// last: a notebook re-runs its cells, a judge or a service sends the
    /// same code again, and parsing is most of a small eval.
    compiled: Vec<(Option<String>, AST)>,
}

/// Compiled snippets kept.
const COMPILED_KEPT: usize = 64;
/// Longest snippet kept compiled (a long one is rarely sent twice, and its
/// parse is small beside its run).
const COMPILED_MAX_LEN: usize = 4 << 10;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn runtime_error(message: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message.into()),
        Position::NONE,
    ))
}

fn interrupted_error() -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from("interrupted"),
        Position::NONE,
    ))
}

fn seconds_to_ms(seconds: f64) -> RhaiResult<u64> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(runtime_error(format!(
            "sleep: seconds must be a finite number >= 0, got {seconds}"
        )));
    }
    Ok((seconds * 1000.0).round().min(u64::MAX as f64) as u64)
}

/// Encodes a script value as MessagePack (maps keep their field names).
///
/// Only data crosses: functions, closures and other engine objects are
/// refused rather than sent as their name, as Rhai's serde support would.
pub fn encode(value: &Dynamic) -> Result<Vec<u8>, String> {
    check_sendable(value, 0)?;
    rmp_serde::to_vec_named(value)
        .map_err(|e| format!("cannot send a value of type {}: {e}", value.type_name()))
}

fn check_sendable(value: &Dynamic, depth: usize) -> Result<(), String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!(
            "cannot send a value nested more than {MAX_VALUE_DEPTH} levels deep"
        ));
    }
    if value.is_unit()
        || value.is_bool()
        || value.is_int()
        || value.is_float()
        || value.is_string()
        || value.is_char()
        || value.is_blob()
    {
        return Ok(());
    }
    if let Some(items) = value.read_lock::<rhai::Array>() {
        return items.iter().try_for_each(|v| check_sendable(v, depth + 1));
    }
    if let Some(map) = value.read_lock::<rhai::Map>() {
        return map.values().try_for_each(|v| check_sendable(v, depth + 1));
    }
    Err(format!(
        "cannot send a value of type {}: only data (unit, bool, int, float, string, char, blob, array, map) crosses to the manager",
        value.type_name()
    ))
}

/// Deepest nesting a decoded value may have (deeper input is an error,
/// not a stack overflow).
pub const MAX_VALUE_DEPTH: usize = 128;

/// Decodes a MessagePack value into a script value.
pub fn decode(bytes: &[u8]) -> Result<Dynamic, String> {
    use serde::Deserialize;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_VALUE_DEPTH);
    Dynamic::deserialize(&mut de).map_err(|e| format!("malformed MessagePack value: {e}"))
}

impl Session {
    /// Creates a session whose built-ins reach the given host.
    pub fn new(host: Rc<dyn Host>) -> Self {
        let mut engine = Engine::new();
        engine
            .set_max_string_size(limits::MAX_STRING_SIZE)
            .set_max_array_size(limits::MAX_ARRAY_SIZE)
            .set_max_map_size(limits::MAX_MAP_SIZE)
            .set_max_call_levels(limits::MAX_CALL_LEVELS)
            .set_max_expr_depths(limits::MAX_EXPR_DEPTH, limits::MAX_EXPR_DEPTH)
            .set_max_variables(limits::MAX_VARIABLES);

        let h = host.clone();
        engine.on_progress(move |ops| {
            (ops % POLL_EVERY_OPS == 0 && h.interrupted()).then(|| Dynamic::from("interrupted"))
        });
        // print/debug go to the worker's stdout/stderr, which the host
        // forwards to the manager as output frames.
        engine.on_print(|s| println!("{s}"));
        engine.on_debug(|s, _, _| eprintln!("{s}"));

        let h = host.clone();
        let sleep = move |ms: u64| -> RhaiResult<()> {
            if h.sleep(ms) {
                Ok(())
            } else {
                Err(interrupted_error())
            }
        };
        let s = sleep.clone();
        engine.register_fn("sleep", move |secs: f64| s(seconds_to_ms(secs)?));
        engine.register_fn("sleep", move |secs: i64| sleep(seconds_to_ms(secs as f64)?));

        let h = host.clone();
        engine.register_fn("channel_put", move |name: &str, value: Dynamic| {
            let bytes = encode(&value).map_err(runtime_error)?;
            h.channel_put(name, bytes)
                .map_err(|e| channel_error(&*h, e))
        });
        let h = host.clone();
        engine.register_fn("channel_take", move |name: &str| -> RhaiResult<Dynamic> {
            let bytes = h.channel_take(name).map_err(|e| channel_error(&*h, e))?;
            decode(&bytes).map_err(runtime_error)
        });
        let h = host;
        engine.register_fn("channel_is_ready", move |name: &str| {
            h.channel_is_ready(name)
        });
        // Only variables the manager granted exist: workers inherit none.
        engine.register_fn("env", |name: &str| -> Dynamic {
            std::env::var(name)
                .map(Dynamic::from)
                .unwrap_or(Dynamic::UNIT)
        });

        Session {
            engine,
            scope: Scope::new(),
            functions: AST::empty(),
            compiled: Vec::new(),
        }
    }

    /// `code` compiled, from the snippets compiled before if it is one.
    /// Compiled without the session's scope: with it, the optimizer would
    /// fold the constants the scope holds now into a tree kept for later,
    /// when they may have been shadowed.
    fn compiled<'a>(
        engine: &Engine,
        compiled: &'a mut Vec<(Option<String>, AST)>,
        code: &str,
    ) -> Result<&'a AST, String> {
        match compiled
            .iter()
            .position(|(text, _)| text.as_deref() == Some(code))
        {
            Some(at) => {
                let hit = compiled.remove(at);
                compiled.push(hit);
            }
            None => {
                let ast = engine
                    .compile(code)
                    .map_err(|e| format!("syntax error: {e}"))?;
                // A long one gets no name, and goes at the next miss.
                compiled.retain(|(text, _)| text.is_some());
                if compiled.len() >= COMPILED_KEPT {
                    compiled.remove(0);
                }
                let text = (code.len() <= COMPILED_MAX_LEN).then(|| code.to_string());
                compiled.push((text, ast));
            }
        }
        Ok(&compiled.last().expect("just pushed").1)
    }

    /// Evaluates `code` in the session and returns its value as MessagePack.
    pub fn eval(&mut self, code: &str) -> Result<Vec<u8>, String> {
        let ast = Self::compiled(&self.engine, &mut self.compiled, code)?;
        // Functions become part of the session before the code runs, so
        // a script may call a function it defines further down.
        let defined = ast.clone_functions_only();
        let program = self.functions.merge(ast);
        self.functions.combine(defined);
        let value: Dynamic = self
            .engine
            .eval_ast_with_scope(&mut self.scope, &program)
            .map_err(|e| describe(&e))?;
        encode(&value)
    }

    /// Calls the function `name` (defined by an earlier eval, or built in)
    /// with MessagePack-encoded `args` (an array) and returns its value.
    pub fn call(&mut self, name: &str, args: &[u8]) -> Result<Vec<u8>, String> {
        let args = match decode(args)? {
            value if value.is_array() => value.into_array().unwrap_or_default(),
            value if value.is_unit() => Vec::new(),
            value => vec![value],
        };
        let options = CallFnOptions::new()
            .eval_ast(false)
            .rewind_scope(true)
            .in_all_namespaces(true);
        let value: Dynamic = self
            .engine
            .call_fn_with_options(options, &mut self.scope, &self.functions, name, args)
            .map_err(|e| describe(&e))?;
        encode(&value)
    }
}

fn channel_error(host: &dyn Host, message: String) -> Box<EvalAltResult> {
    if host.interrupted() {
        interrupted_error()
    } else {
        runtime_error(message)
    }
}

/// The text of a script error as the manager shows it.
fn describe(error: &EvalAltResult) -> String {
    match error {
        // `throw "message"`: the thrown value is the message itself.
        EvalAltResult::ErrorRuntime(value, pos) if value.is_string() => {
            let text = value.clone().into_string().unwrap_or_default();
            if pos.is_none() {
                text
            } else {
                format!("{text} ({pos})")
            }
        }
        EvalAltResult::ErrorTerminated(..) => "interrupted".to_string(),
        other => other.to_string(),
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    //! The wasm32-wasip2 component: the WIT exports on top of [`Session`].

    use std::cell::RefCell;
    use std::rc::Rc;

    wit_bindgen::generate!({
        path: "wit",
        world: "worker",
    });

    use malt::worker::host;

    struct WitHost;

    impl super::Host for WitHost {
        fn interrupted(&self) -> bool {
            host::interrupted()
        }
        fn sleep(&self, ms: u64) -> bool {
            host::sleep(ms)
        }
        fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String> {
            host::channel_put(name, &value)
        }
        fn channel_take(&self, name: &str) -> Result<Vec<u8>, String> {
            host::channel_take(name)
        }
        fn channel_is_ready(&self, name: &str) -> bool {
            host::channel_is_ready(name)
        }
    }

    thread_local! {
        static SESSION: RefCell<Option<super::Session>> = const { RefCell::new(None) };
    }

    fn with_session<T>(f: impl FnOnce(&mut super::Session) -> T) -> T {
        SESSION.with(|cell| {
            let mut slot = cell.borrow_mut();
            f(slot.get_or_insert_with(|| super::Session::new(Rc::new(WitHost))))
        })
    }

    struct Component;

    impl Guest for Component {
        fn call(name: String, args: Vec<u8>) -> Result<Vec<u8>, String> {
            with_session(|s| s.call(&name, &args))
        }
        fn eval(code: String) -> Result<Vec<u8>, String> {
            with_session(|s| s.eval(&code))
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, VecDeque};

    #[derive(Default)]
    struct TestHost {
        interrupt: Cell<bool>,
        channels: RefCell<HashMap<String, VecDeque<Vec<u8>>>>,
    }

    impl Host for TestHost {
        fn interrupted(&self) -> bool {
            self.interrupt.get()
        }
        fn sleep(&self, _ms: u64) -> bool {
            !self.interrupt.get()
        }
        fn channel_put(&self, name: &str, value: Vec<u8>) -> Result<(), String> {
            self.channels
                .borrow_mut()
                .entry(name.into())
                .or_default()
                .push_back(value);
            Ok(())
        }
        fn channel_take(&self, name: &str) -> Result<Vec<u8>, String> {
            self.channels
                .borrow_mut()
                .get_mut(name)
                .and_then(|q| q.pop_front())
                .ok_or_else(|| "empty".to_string())
        }
        fn channel_is_ready(&self, name: &str) -> bool {
            self.channels
                .borrow()
                .get(name)
                .is_some_and(|q| !q.is_empty())
        }
    }

    fn value<T: serde::de::DeserializeOwned>(bytes: Result<Vec<u8>, String>) -> T {
        rmp_serde::from_slice(&bytes.expect("script failed")).expect("decode")
    }

    #[test]
    fn state_and_functions_persist_across_evals() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        s.eval("let x = 40; fn add(a, b) { a + b }").unwrap();
        assert_eq!(value::<i64>(s.eval("add(x, 2)")), 42);
        let args = rmp_serde::to_vec(&(1, 2)).unwrap();
        assert_eq!(value::<i64>(s.call("add", &args)), 3);
    }

    /// A snippet sent again runs from its compiled tree, against the
    /// session as it is now: variables, constants and functions changed
    /// since are seen, and the optimizer folded none of them into it.
    #[test]
    fn a_snippet_sent_again_sees_the_session_as_it_is_now() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        s.eval("let x = 1; const k = 10; fn f() { 100 }").unwrap();
        let snippet = "x + k + f()";
        assert_eq!(value::<i64>(s.eval(snippet)), 111);
        s.eval("x = 2; const k = 20; fn f() { 200 }").unwrap();
        assert_eq!(value::<i64>(s.eval(snippet)), 222);
        assert_eq!(s.compiled.len(), 3, "kept once each");
    }

    /// What is kept is bounded: the oldest go, a long snippet is not kept
    /// (and is not what an empty one finds), a syntax error is not kept.
    #[test]
    fn compiled_snippets_are_bounded() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        for i in 0..COMPILED_KEPT + 10 {
            assert_eq!(value::<i64>(s.eval(&format!("{i} + 0"))), i as i64);
        }
        assert_eq!(s.compiled.len(), COMPILED_KEPT);
        assert_eq!(
            value::<i64>(s.eval("0 + 0")),
            0,
            "an evicted one compiles again"
        );
        let long = format!("{}7", " ".repeat(COMPILED_MAX_LEN));
        assert_eq!(value::<i64>(s.eval(&long)), 7);
        assert_eq!(value::<()>(s.eval("")), ());
        assert!(s.compiled.iter().all(|(text, _)| text.is_some()));
        assert!(s.eval("1 +").is_err());
        assert!(s.eval("1 +").unwrap_err().starts_with("syntax error"));
        assert!(
            s.compiled
                .iter()
                .all(|(text, _)| text.as_deref() != Some("1 +"))
        );
    }

    #[test]
    fn throw_becomes_the_error_message() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        let err = s.eval(r#"throw "boom""#).unwrap_err();
        assert!(err.starts_with("boom"), "{err}");
    }

    #[test]
    fn interrupt_stops_a_busy_loop_and_keeps_state() {
        let host = Rc::new(TestHost::default());
        let mut s = Session::new(host.clone());
        s.eval("let kept = 7;").unwrap();
        host.interrupt.set(true);
        let err = s.eval("loop {}").unwrap_err();
        assert!(err.contains("interrupted"), "{err}");
        host.interrupt.set(false);
        assert_eq!(value::<i64>(s.eval("kept")), 7);
    }

    #[test]
    fn channels_round_trip_values() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        s.eval(r#"channel_put("c", #{a: [1, 2]});"#).unwrap();
        assert!(value::<bool>(s.eval(r#"channel_is_ready("c")"#)));
        assert_eq!(value::<i64>(s.eval(r#"channel_take("c").a[1]"#)), 2);
    }

    #[test]
    fn limits_fail_cleanly() {
        let mut s = Session::new(Rc::new(TestHost::default()));
        let err = s.eval(r#"let s = "x"; loop { s += s; }"#).unwrap_err();
        assert!(err.to_lowercase().contains("too large"), "{err}");
        let err = s.eval("fn f(n) { f(n + 1) } f(0)").unwrap_err();
        assert!(err.to_lowercase().contains("stack overflow"), "{err}");
    }
}
