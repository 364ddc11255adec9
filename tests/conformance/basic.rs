//! Malt's `test/basic.jl`: worker management, calling functions,
//! evaluating expressions, async calls and `remote_do`.

use std::collections::BTreeMap;

use malt::Error;
use serde::{Deserialize, Serialize};

use crate::common::{Kind, finishes};
use crate::{conformance_both, conformance_ssh};

conformance_both!(
    worker_management,
    stop_while_a_call_runs_fails_the_call,
    calls_on_a_stopped_worker_fail,
    call_functions,
    evaluate_expressions_with_persistent_state,
    async_calls_resolve_in_order,
    remote_call_wait_and_remote_do,
    structured_values_round_trip,
    many_requests_in_flight,
    workers_are_isolated_from_each_other,
    no_inherited_environment,
    env_is_explicit,
);

conformance_ssh!(
    worker_management,
    stop_while_a_call_runs_fails_the_call,
    call_functions,
    evaluate_expressions_with_persistent_state,
    remote_call_wait_and_remote_do,
    structured_values_round_trip,
    many_requests_in_flight,
    no_inherited_environment,
);

async fn worker_management(kind: Kind) {
    let w = kind.spawn().await;
    assert!(w.is_running());
    assert!(w.pid() > 0);
    assert!(
        w.stop().await.unwrap(),
        "stop on a running worker returns true"
    );
    assert!(!w.is_running());
    assert!(
        !w.stop().await.unwrap(),
        "stop on a stopped worker returns false"
    );
    assert!(w.wait().await.is_some());
}

async fn stop_while_a_call_runs_fails_the_call(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let long = w.remote_eval::<()>(r#"channel_put("started", 1); sleep(1000); 1"#);
    // Make sure the sleep has started before stopping.
    assert_eq!(finishes("start", started.take()).await.unwrap(), 1);
    let stopped = finishes("stop", w.stop()).await.unwrap();
    assert!(stopped);
    let err = finishes("the pending call", long).await.unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
}

async fn calls_on_a_stopped_worker_fail(kind: Kind) {
    let w = kind.spawn().await;
    w.stop().await.unwrap();
    let err = w.remote_call_fetch::<i64>("abs", (-1,)).await.unwrap_err();
    assert!(matches!(err, Error::TerminatedWorker), "{err:?}");
    assert!(
        w.remote_eval_fetch::<i64>("1")
            .await
            .unwrap_err()
            .is_terminated()
    );
    assert!(w.remote_do("abs", (1,)).unwrap_err().is_terminated());
    assert!(w.interrupt().unwrap_err().is_terminated());
    assert!(
        w.worker_channel::<i64>("c", 1)
            .await
            .unwrap_err()
            .is_terminated()
    );
}

async fn call_functions(kind: Kind) {
    let w = kind.spawn().await;
    // Built-in functions are callable by name...
    assert_eq!(w.remote_call_fetch::<i64>("abs", (-5,)).await.unwrap(), 5);
    // ...and so are functions defined by an eval.
    w.remote_eval_wait(kind.code(
        "fn add(a, b) { a + b } fn hello() { \"hi\" }",
        "def add(a, b):\n    return a + b\ndef hello():\n    return 'hi'",
    ))
    .await
    .unwrap();
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(), 3);
    assert_eq!(
        w.remote_call_fetch::<f64>("add", (1.5, 2.0)).await.unwrap(),
        3.5
    );
    assert_eq!(
        w.remote_call_fetch::<String>("hello", ()).await.unwrap(),
        "hi"
    );
    // A single non-tuple argument is one argument.
    assert_eq!(w.remote_call_fetch::<i64>("abs", -7).await.unwrap(), 7);
    w.stop().await.unwrap();
}

async fn evaluate_expressions_with_persistent_state(kind: Kind) {
    let w = kind.spawn().await;
    assert_eq!(w.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
    w.remote_eval_wait(kind.code("let x = 40;", "x = 40"))
        .await
        .unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("x + 2").await.unwrap(), 42);
    w.remote_eval_wait("x += 1;").await.unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("x").await.unwrap(), 41);
    // A function may use one defined in an earlier eval.
    w.remote_eval_wait(kind.code("fn double(n) { n * 2 }", "def double(n):\n    return n * 2"))
        .await
        .unwrap();
    w.remote_eval_wait(kind.code(
        "fn quad(n) { double(double(n)) }",
        "def quad(n):\n    return double(double(n))",
    ))
    .await
    .unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("quad(x)").await.unwrap(), 164);
    assert_eq!(w.remote_call_fetch::<i64>("quad", (2,)).await.unwrap(), 8);
    // Unit is nil, which decodes as () or Option::None.
    w.remote_eval_fetch::<()>(kind.code("let y = 1;", "y = 1"))
        .await
        .unwrap();
    assert_eq!(
        w.remote_eval_fetch::<Option<i64>>(kind.code("()", "None"))
            .await
            .unwrap(),
        None
    );
    w.stop().await.unwrap();
}

async fn async_calls_resolve_in_order(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code("let log = []; fn record(n) { log.push(n); n }", "log = []"))
        .await
        .unwrap();
    // remote_call returns a handle already sent: all three are in flight
    // before any is awaited, and the guest runs them in arrival order.
    let a = w.remote_eval::<i64>(kind.code(
        "sleep(0.05); log.push(1); 1",
        "sleep(0.05); log.append(1); 1",
    ));
    let b = w.remote_eval::<i64>(kind.code("log.push(2); 2", "log.append(2); 2"));
    let c = w.remote_eval::<Vec<i64>>(kind.code("log.push(3); log", "log.append(3); log"));
    // Awaiting out of order changes nothing.
    assert_eq!(c.await.unwrap(), vec![1, 2, 3]);
    assert_eq!(b.await.unwrap(), 2);
    assert_eq!(a.await.unwrap(), 1);
    w.stop().await.unwrap();
}

async fn remote_call_wait_and_remote_do(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code("let counter = 0;", "counter = 0"))
        .await
        .unwrap();
    w.remote_eval_wait(kind.code("fn bump(n) { n + 1 }", "def bump(n):\n    return n + 1"))
        .await
        .unwrap();
    // remote_call_wait waits for the call but brings no value back.
    w.remote_call_wait("bump", (1,)).await.unwrap();
    w.remote_eval_wait("counter += 1;").await.unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("counter").await.unwrap(), 1);
    // remote_do returns once sent; requests run in order, so its effect
    // is visible to the next one.
    w.remote_do("print", ("from remote_do",)).unwrap();
    w.remote_eval_wait("counter += 10").await.unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("counter").await.unwrap(), 11);
    // A failing remote_do reports nothing to the caller and does not
    // disturb the worker.
    w.remote_do("no_such_function", ()).unwrap();
    assert_eq!(w.remote_eval_fetch::<i64>("counter").await.unwrap(), 11);
    // A failing remote_call_wait reports its error.
    let err = w
        .remote_call_wait("no_such_function", ())
        .await
        .unwrap_err();
    assert!(err.as_remote().is_some(), "{err:?}");
    w.stop().await.unwrap();
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: i64,
    label: String,
}

async fn structured_values_round_trip(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code(
        "fn shift(p, d) { p.x += d; p.label += \"!\"; p }",
        "def shift(p, d):\n    p['x'] += d\n    p['label'] += '!'\n    return p",
    ))
    .await
    .unwrap();
    let p = Point {
        x: 1,
        y: 2,
        label: "a".into(),
    };
    let q: Point = w.remote_call_fetch("shift", (p, 10)).await.unwrap();
    assert_eq!(
        q,
        Point {
            x: 11,
            y: 2,
            label: "a!".into()
        }
    );
    let list: Vec<i64> = w
        .remote_eval_fetch(kind.code("[1, 2, 3].map(|v| v * v)", "[v * v for v in [1, 2, 3]]"))
        .await
        .unwrap();
    assert_eq!(list, vec![1, 4, 9]);
    let map: BTreeMap<String, bool> = w
        .remote_eval_fetch(kind.code("#{yes: true, no: false}", "{'yes': True, 'no': False}"))
        .await
        .unwrap();
    assert_eq!(map.get("yes"), Some(&true));
    let bytes: serde_bytes::ByteBuf = w.remote_call_fetch("blob", (3, 7)).await.unwrap();
    assert_eq!(bytes.as_ref(), &[7, 7, 7]);
    let text: String = w.remote_eval_fetch(r#""héllo, wörld""#).await.unwrap();
    assert_eq!(text, "héllo, wörld");
    w.stop().await.unwrap();
}

async fn many_requests_in_flight(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code("fn sq(n) { n * n }", "def sq(n):\n    return n * n"))
        .await
        .unwrap();
    let handles: Vec<_> = (0..500i64)
        .map(|i| w.remote_call::<i64>("sq", (i,)))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let i = i as i64;
        assert_eq!(h.await.unwrap(), i * i);
    }
    w.stop().await.unwrap();
}

async fn workers_are_isolated_from_each_other(kind: Kind) {
    let (a, b) = (kind.spawn().await, kind.spawn().await);
    a.remote_eval_wait(kind.code("let secret = 1;", "secret = 1"))
        .await
        .unwrap();
    let err = b.remote_eval_fetch::<i64>("secret").await.unwrap_err();
    assert!(err.as_remote().is_some(), "{err:?}");
    if kind.has_process() {
        assert_ne!(a.pid(), b.pid());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

async fn no_inherited_environment(kind: Kind) {
    // A variable the manager has (set by whoever started the tests;
    // setting one here would race the other tests' threads).
    assert!(std::env::var_os("PATH").is_some(), "the manager has a PATH");
    let w = kind.spawn().await;
    let seen: Option<String> = w.remote_eval_fetch(r#"env("PATH")"#).await.unwrap();
    assert_eq!(
        seen, None,
        "the guest must not see the manager's environment"
    );
    let home: Option<String> = w.remote_eval_fetch(r#"env("HOME")"#).await.unwrap();
    assert_eq!(home, None);
    // Nor does the host process get one (an in-process worker has none;
    // over SSH, the local process is ssh, which needs the user's).
    let environ = if kind.has_process() && kind != Kind::Ssh {
        std::fs::read(format!("/proc/{}/environ", w.pid())).unwrap()
    } else {
        Vec::new()
    };
    assert!(
        environ.is_empty(),
        "host environment: {:?}",
        String::from_utf8_lossy(&environ)
    );
    w.stop().await.unwrap();
}

async fn env_is_explicit(kind: Kind) {
    let w = kind
        .script()
        .env("GREETING", "hello")
        .spawn()
        .await
        .unwrap();
    let seen: Option<String> = w
        .remote_eval_fetch(kind.code(r#"env("GREETING")"#, "import malt; malt.env('GREETING')"))
        .await
        .unwrap();
    assert_eq!(seen.as_deref(), Some("hello"));
    w.stop().await.unwrap();
}
