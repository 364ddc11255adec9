//! Python guests: a notebook-like session in the wasm sandbox, its values,
//! errors and interrupts, the standard library, and the sandbox's walls.

#[path = "../support/guests.rs"]
mod guests;

use std::collections::BTreeMap;
use std::time::Duration;

use malt::{Error, Worker, WorkerBuilder};
use serde::{Deserialize, Serialize};

fn python() -> WorkerBuilder {
    Worker::python_component(guests::python_guest())
}

async fn session() -> Worker {
    python().spawn().await.expect("start a Python worker")
}

/// A cell spinning in a one-line loop inside its `try` catches the
/// interrupt (it says on channel `started` when it is inside).
async fn a_spinning_cell_catches_an_interrupt(w: &Worker) {
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let caught = w.remote_eval::<String>(
        "import malt\ntry:\n    malt.channel_put('started', 1)\n    while True: pass\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
    );
    assert_eq!(started.take().await.unwrap(), 1);
    w.interrupt().unwrap();
    assert_eq!(caught.await.unwrap(), "caught");
}

/// A cell stuck inside C, interrupted `after` it started, never reaches
/// a loop jump: it is killed after the grace period, its state lost.
async fn a_c_bound_cell_is_killed(w: &Worker, after: Duration) {
    let running = w.remote_eval::<i64>("sum(range(10 ** 15))");
    tokio::time::sleep(after).await;
    w.interrupt().unwrap();
    let err = running.await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: true,
                ..
            }
        ),
        "{err:?}"
    );
}

fn remote_message(err: &Error) -> &str {
    match err {
        Error::Remote(e) => &e.message,
        other => panic!("expected a remote exception, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_definitions_and_returns_trailing_values() {
    let w = session().await;
    assert_eq!(w.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
    // A statement has no value: None.
    let none: Option<i64> = w.remote_eval_fetch("x = 20").await.unwrap();
    assert_eq!(none, None);
    assert_eq!(w.remote_eval_fetch::<i64>("x * 2 + 2").await.unwrap(), 42);
    w.remote_eval_wait("def area(w, h=1):\n    return w * h\n")
        .await
        .unwrap();
    assert_eq!(
        w.remote_call_fetch::<i64>("area", (6, 7)).await.unwrap(),
        42
    );
    assert_eq!(w.remote_call_fetch::<i64>("area", (5,)).await.unwrap(), 5);
    // Built-ins and dotted names are callable too.
    assert_eq!(
        w.remote_call_fetch::<i64>("len", ("four",)).await.unwrap(),
        4
    );
    w.remote_eval_wait("import math").await.unwrap();
    assert_eq!(
        w.remote_call_fetch::<f64>("math.sqrt", (9.0,))
            .await
            .unwrap(),
        3.0
    );
    let err = w.remote_call_fetch::<i64>("nowhere", ()).await.unwrap_err();
    assert!(
        remote_message(&err).contains("'nowhere' is not defined"),
        "{err}"
    );
    w.stop().await.unwrap();
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    name: String,
    tags: Vec<String>,
    score: f64,
    blob: serde_bytes::ByteBuf,
    parent: Option<Box<Record>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_cross_as_messagepack_and_others_are_named() {
    let w = session().await;
    w.remote_eval_wait("def echo(v):\n    return v\n")
        .await
        .unwrap();
    let record = Record {
        name: "é ü".into(),
        tags: vec!["a".into(); 40],
        score: -1.5,
        blob: serde_bytes::ByteBuf::from(vec![0u8, 255, 7]),
        parent: Some(Box::new(Record {
            name: "root".into(),
            tags: vec![],
            score: 0.0,
            blob: serde_bytes::ByteBuf::from(vec![1u8; 70_000]),
            parent: None,
        })),
    };
    let back: Record = w.remote_call_fetch("echo", (&record,)).await.unwrap();
    assert_eq!(back, record);
    for n in [0i64, -1, -33, 127, 128, 65_536, i64::MIN, i64::MAX] {
        assert_eq!(w.remote_call_fetch::<i64>("echo", (n,)).await.unwrap(), n);
    }
    let map: BTreeMap<String, Vec<Option<bool>>> = w
        .remote_eval_fetch("{'k': [True, None, False], 'j': []}")
        .await
        .unwrap();
    assert_eq!(map["k"], [Some(true), None, Some(false)]);
    // A tuple crosses as a list; a set does not cross at all.
    assert_eq!(
        w.remote_eval_fetch::<Vec<i64>>("(1, 2)").await.unwrap(),
        [1, 2]
    );
    let err = w.remote_eval_fetch::<i64>("{1, 2}").await.unwrap_err();
    assert!(remote_message(&err).contains("type set"), "{err}");
    let err = w.remote_eval_fetch::<i64>("2 ** 80").await.unwrap_err();
    assert!(
        remote_message(&err).contains("does not fit in 64 bits"),
        "{err}"
    );
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_goes_to_the_workers_stdout() {
    let w = python().monitor_output(false).spawn().await.unwrap();
    w.remote_eval_wait("print('hello from python')\nimport sys\nprint('oops', file=sys.stderr)")
        .await
        .unwrap();
    let mut out = w.take_output().unwrap();
    w.stop().await.unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    while let Some(chunk) = out.recv().await {
        let text = String::from_utf8_lossy(&chunk.data).into_owned();
        match chunk.stream {
            malt::Stream::Stdout => stdout.push_str(&text),
            malt::Stream::Stderr => stderr.push_str(&text),
        }
    }
    assert_eq!(stdout, "hello from python\n");
    assert_eq!(stderr, "oops\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_tracebacks_of_the_users_frames() {
    let w = session().await;
    w.remote_eval_wait("def inner(x):\n    return 10 / x\n\ndef outer():\n    return inner(0)\n")
        .await
        .unwrap();
    let err = w.remote_call_fetch::<f64>("outer", ()).await.unwrap_err();
    let message = remote_message(&err);
    assert!(
        message.starts_with("Traceback (most recent call last):"),
        "{message}"
    );
    assert!(
        message.contains("in outer") && message.contains("in inner"),
        "{message}"
    );
    assert!(
        message.contains("return 10 / x"),
        "the source line: {message}"
    );
    assert!(
        message.ends_with("ZeroDivisionError: division by zero"),
        "{message}"
    );
    assert!(
        !message.contains("guest.py"),
        "no plumbing frames: {message}"
    );

    let err = w
        .remote_eval_fetch::<i64>("x = (1 +\n  * 2)")
        .await
        .unwrap_err();
    let message = remote_message(&err);
    assert!(message.contains("SyntaxError"), "{message}");
    assert!(message.contains('^'), "the caret: {message}");
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains("Traceback"), "{message}");

    // Deep recursion is a RecursionError, not a crash: the session lives.
    w.remote_eval_wait("kept = 'still here'\ndef down(n):\n    return down(n + 1)\n")
        .await
        .unwrap();
    let err = w.remote_call_fetch::<i64>("down", (0,)).await.unwrap_err();
    assert!(remote_message(&err).contains("RecursionError"), "{err}");
    assert_eq!(
        w.remote_eval_fetch::<String>("kept").await.unwrap(),
        "still here"
    );
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_memory_keeps_the_session() {
    let w = python().memory_limit(96 << 20).spawn().await.unwrap();
    w.remote_eval_wait("kept = [1, 2, 3]").await.unwrap();
    let err = w
        .remote_eval_fetch::<i64>("big = bytearray(512 * 1024 * 1024)")
        .await
        .unwrap_err();
    assert!(remote_message(&err).contains("MemoryError"), "{err}");
    assert_eq!(w.remote_eval_fetch::<i64>("sum(kept)").await.unwrap(), 6);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_raise_keyboard_interrupt_and_keep_the_namespace() {
    let w = python()
        .interrupt_grace(Duration::from_secs(5))
        .spawn()
        .await
        .unwrap();
    w.remote_eval_wait("kept = 41").await.unwrap();
    // This build of CPython takes interrupts in memory, at no cost until
    // one comes (the polling fallback is for layouts it does not know).
    let mode: String = w
        .remote_eval_fetch("import sys; sys.modules['guest'].interrupts")
        .await
        .unwrap();
    assert_eq!(mode, "memory");
    for code in [
        "while True:\n    pass",
        "import time\ntime.sleep(60)",
        "import malt\nmalt.sleep(60)",
        "import malt\nmalt.channel_take('never')",
        "n = 0\nwhile True:\n    n += 1",
        // A loop on one line: no next line to raise on (see guest.py).
        "while True: pass",
    ] {
        let running = w.remote_eval::<i64>(code);
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.interrupt().unwrap();
        let err = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("the interrupt ends it")
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    state_lost: false,
                    ..
                }
            ),
            "{code:?}: {err:?}"
        );
        assert_eq!(
            w.remote_eval_fetch::<i64>("kept + 1").await.unwrap(),
            42,
            "{code:?}: the namespace is intact"
        );
    }
    // Code may catch it, as in Jupyter: in a sleep, a channel take, or any
    // loop (the interrupt is CPython's own asynchronous exception, raised
    // where the code is). Each cell says when it is inside its `try`, so
    // that the interrupt lands there.
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    for code in [
        "import time, malt\ntry:\n    malt.channel_put('started', 1)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
        "import malt\ntry:\n    malt.channel_put('started', 1)\n    while True:\n        pass\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
        "import malt\ndef spin():\n    n = 0\n    for i in range(10 ** 12):\n        n += i\ntry:\n    malt.channel_put('started', 1)\n    spin()\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
        // A loop on one line, and one that only calls C functions.
        "import malt\ntry:\n    malt.channel_put('started', 1)\n    while True: pass\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
        "import malt\ntry:\n    malt.channel_put('started', 1)\n    while True: len('x'); abs(-1)\nexcept KeyboardInterrupt:\n    result = 'caught'\nresult",
        // One interrupt, one exception: the sleep reports it, and nothing
        // is left raised for the loop after it.
        "import time, malt\ntry:\n    malt.channel_put('started', 1)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    pass\nfor i in range(3 * 10 ** 5):\n    pass\n'caught'",
        // Code that goes on after catching it is not interrupted again.
        "import malt\ntry:\n    malt.channel_put('started', 1)\n    while True:\n        pass\nexcept KeyboardInterrupt:\n    pass\nfor i in range(3 * 10 ** 5):\n    pass\n'caught'",
    ] {
        let caught = w.remote_eval::<String>(code);
        assert_eq!(started.take().await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.interrupt().unwrap();
        assert_eq!(caught.await.unwrap(), "caught", "{code}");
    }
    // Code stuck in C (no loop of Python's own to check in) is killed
    // after the grace period, as any guest: its state is lost.
    let stubborn = python()
        .interrupt_grace(Duration::from_millis(300))
        .spawn()
        .await
        .unwrap();
    stubborn.remote_eval_wait("kept = 1").await.unwrap();
    a_c_bound_cell_is_killed(&stubborn, Duration::from_millis(300)).await;
    let gone = stubborn.remote_eval_fetch::<i64>("kept").await.unwrap_err();
    assert!(remote_message(&gone).contains("NameError"), "{gone}");
    w.stop().await.unwrap();
    stubborn.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_library_is_there_at_run_time() {
    let w = session().await;
    let modules = [
        "json",
        "re",
        "math",
        "statistics",
        "datetime",
        "collections",
        "itertools",
        "functools",
        "decimal",
        "fractions",
        "random",
        "textwrap",
        "csv",
        "dataclasses",
        "typing",
        "hashlib",
        "base64",
    ];
    let code = format!(
        "import {}\n[json.dumps({{'a': 1}}), hashlib.sha256(b'x').hexdigest()[:8], \
         str(fractions.Fraction(1, 3) + fractions.Fraction(1, 6)), \
         base64.b64encode(b'malt').decode(), statistics.median([3, 1, 2])]",
        modules.join(", ")
    );
    let out: (String, String, String, String, i64) = w.remote_eval_fetch(&code).await.unwrap();
    assert_eq!(
        out,
        (
            "{\"a\": 1}".into(),
            "2d711642".into(),
            "1/2".into(),
            "bWFsdA==".into(),
            2
        )
    );
    // The rest of the standard library comes from the read-only copy the
    // build writes beside the component.
    let rest: (Vec<String>, String, String, bool) = w
        .remote_eval_fetch(
            "import difflib, fnmatch, shlex, ipaddress, argparse, tomllib, zoneinfo\n\
             (shlex.split('a \"b c\"'), str(ipaddress.ip_address('10.0.0.1') + 1), \
             difflib.__file__, fnmatch.fnmatch('x.py', '*.py'))",
        )
        .await
        .unwrap();
    assert_eq!(
        rest,
        (
            vec!["a".into(), "b c".into()],
            "10.0.0.2".into(),
            "/malt/python-stdlib/difflib.py".into(),
            true
        )
    );
    let err = w
        .remote_eval_fetch::<()>("open('/malt/python-stdlib/difflib.py', 'a')")
        .await
        .unwrap_err();
    assert!(remote_message(&err).contains("Error"), "{err}");
    // Every worker gets its own random seed, not the build's.
    let other = session().await;
    let draw = "import random\nrandom.getrandbits(64)";
    let a: u64 = w.remote_eval_fetch(draw).await.unwrap();
    let b: u64 = other.remote_eval_fetch(draw).await.unwrap();
    assert_ne!(a, b, "two workers drew the same number");
    w.stop().await.unwrap();
    other.stop().await.unwrap();
}

/// An interrupt may come at any moment: in the user's code, in malt's
/// calls (a channel put that is blocked or just returning), in the guest's
/// own lines around them. Wherever it lands the session survives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_at_any_moment_keeps_the_session() {
    let w = session().await;
    w.remote_eval_wait(
        "kept = 41\nimport malt\ndef busy():\n    n = 0\n    while True:\n        malt.channel_put('tick', n)\n        n += 1\n        text = str({'a': [n, n]}) * 3\n        malt.channel_is_ready('tick')\n",
    )
    .await
    .unwrap();
    // A small channel: the guest is often blocked in a put.
    let ticks = w.worker_channel::<i64>("tick", 4).await.unwrap();
    for round in 0..60u32 {
        let running = w.remote_call::<()>("busy", ());
        for _ in 0..round % 9 {
            ticks.take().await.unwrap();
        }
        if round % 3 == 0 {
            tokio::time::sleep(Duration::from_micros(u64::from(round) * 37 % 500)).await;
        }
        w.interrupt().unwrap();
        let err = running.await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    state_lost: false,
                    ..
                }
            ),
            "round {round}: {err:?}"
        );
        while ticks.is_ready().await.unwrap() {
            ticks.take().await.unwrap();
        }
    }
    assert_eq!(w.remote_eval_fetch::<i64>("kept + 1").await.unwrap(), 42);
    w.stop().await.unwrap();
}

/// Guest code can call the host's `use-memory-interrupt` itself: whatever
/// it names, the host writes nowhere but in the guest's own memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_interrupts_cannot_be_aimed_outside_the_guests_memory() {
    let w = session().await;
    w.remote_eval_wait(
        "from wit_world.imports import host\n\
         from componentize_py_types import Err\n\
         import os\n\
         probe = os.urandom(16)\n\
         mine = bytearray(64)\n\
         def ask(word, slot, probe_at=None, checks=()):\n    \
             at = host.MemoryInterrupt(word=word, bits=8, slot=slot, value=1)\n    \
             try:\n        \
                 host.use_memory_interrupt(at, probe, id(probe) + 16 if probe_at is None else probe_at, list(checks))\n        \
                 return 'accepted'\n    \
             except Err as e:\n        \
                 return e.value\n\
         here = (id(mine) + 64) & ~3",
    )
    .await
    .unwrap();
    for (ask, refusal) in [
        // Past the end of the 4 GiB a 32-bit memory can address: the
        // host's own memory, were it not checked.
        ("ask(here, 0xFFFFFFFC)", "outside the memory"),
        ("ask(0xFFFFFFF0, here)", "outside the memory"),
        ("ask(here + 1, here)", "not 4-byte aligned"),
        // A probe said to be where it is not: the memory is not where the
        // guest claims it starts.
        (
            "ask(here, here, probe_at=id(probe) + 20)",
            "probe is not at",
        ),
        ("ask(here, here, checks=[(here, 12345)])", "not 0x3039"),
    ] {
        let answer: String = w.remote_eval_fetch(ask).await.unwrap();
        assert!(answer.contains(refusal), "{ask}: {answer}");
    }
    // Refusals change nothing: interrupts still land in the session.
    a_spinning_cell_catches_an_interrupt(&w).await;
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_holds_for_python() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "granted").unwrap();
    let w = python()
        .dir_read_only(dir.path(), "/data")
        .env("GREETING", "hi")
        .call_timeout(Duration::from_secs(2))
        .spawn()
        .await
        .unwrap();
    let read: String = w
        .remote_eval_fetch("open('/data/in.txt').read()")
        .await
        .unwrap();
    assert_eq!(read, "granted");
    for (code, says) in [
        ("open('/etc/passwd').read()", "FileNotFoundError"),
        ("open('/data/new.txt', 'w')", "Error"),
        (
            "import socket\nsocket.create_connection(('127.0.0.1', 22))",
            "Error",
        ),
        ("import subprocess\nsubprocess.run(['true'])", "Error"),
        (
            "import threading\nthreading.Thread(target=print).start()",
            "Error",
        ),
    ] {
        let err = w.remote_eval_fetch::<String>(code).await.unwrap_err();
        assert!(remote_message(&err).contains(says), "{code}: {err}");
    }
    let env: (Option<String>, Option<String>) = w
        .remote_eval_fetch("import os, malt\n(malt.env('GREETING'), os.environ.get('HOME'))")
        .await
        .unwrap();
    assert_eq!(env, (Some("hi".into()), None));
    // The call timeout stops a runaway loop.
    let err = w
        .remote_eval_fetch::<i64>("while True:\n    pass")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert_eq!(w.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_runs_in_process_and_in_a_pool() {
    let w = python().in_process().spawn().await.unwrap();
    assert_eq!(w.kind(), malt::WorkerKind::InProcess);
    assert_eq!(
        w.remote_eval_fetch::<i64>("sum(range(10))").await.unwrap(),
        45
    );
    // The manager's own process finds this guest's memory among the
    // others' to raise interrupts in it.
    let other = python().in_process().spawn().await.unwrap();
    a_spinning_cell_catches_an_interrupt(&w).await;
    assert_eq!(other.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
    // In-process workers of one component share its engine: a kill (an
    // epoch bump) in one leaves the other's request running.
    other.remote_eval_wait("kept = 1").await.unwrap();
    let busy =
        other.remote_eval::<i64>("n = 0\nfor i in range(2 * 10 ** 6):\n    n += 1\nn + kept");
    let stuck = python()
        .in_process()
        .interrupt_grace(Duration::from_millis(50))
        .spawn()
        .await
        .unwrap();
    a_c_bound_cell_is_killed(&stuck, Duration::from_millis(100)).await;
    assert_eq!(busy.await.unwrap(), 2 * 10_i64.pow(6) + 1);
    stuck.stop().await.unwrap();
    other.stop().await.unwrap();
    w.stop().await.unwrap();
    let pool = malt::Pool::builder(python())
        .size(2)
        .setup("def sq(x):\n    return x * x\n")
        .spawn()
        .await
        .unwrap();
    let squares: Vec<i64> = pool
        .map("sq", (0..100i64).map(|i| (i,)))
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(squares[99], 99 * 99);
    pool.stop().await;
}

/// Everything a worker printed, by stream, once it has stopped.
async fn printed(w: &Worker, code: &str) -> String {
    let mut out = w.take_output().unwrap();
    w.remote_eval_wait(code).await.unwrap();
    w.stop().await.unwrap();
    let mut stdout = String::new();
    while let Some(chunk) = out.recv().await {
        if chunk.stream == malt::Stream::Stdout {
            stdout.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_workers_start_from_spares_that_are_their_own() {
    let first = python().in_process().spawn().await.unwrap();
    first.remote_eval_wait("secret = 41").await.unwrap();
    // A spare is made in the background after a start: wait for a worker
    // that got one (liveness, not speed).
    let before = malt::__testing::spares_taken();
    let mut tries = 0;
    let w = loop {
        let w = python()
            .in_process()
            .monitor_output(false)
            .interrupt_grace(Duration::from_millis(50))
            .spawn()
            .await
            .unwrap();
        if malt::__testing::spares_taken() > before {
            break w;
        }
        w.stop().await.unwrap();
        tries += 1;
        assert!(tries < 200, "no in-process worker started from a spare");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Its session is its own, and made for it alone: the spare's warm-up
    // counted no cell and defined nothing.
    let err = w.remote_eval_fetch::<i64>("1 / 0").await.unwrap_err();
    assert!(remote_message(&err).contains("<cell 1>"), "{err}");
    let seen: (bool, bool) = w
        .remote_eval_fetch("('secret' in globals(), '_warm' in globals())")
        .await
        .unwrap();
    assert_eq!(seen, (false, false));
    let mode: String = w
        .remote_eval_fetch("import sys\nsys.modules['guest'].interrupts")
        .await
        .unwrap();
    assert_eq!(mode, "memory");
    // Interrupts reach it where the spare's warm-up said (in its memory),
    // and kills too; not the worker its spare was made beside.
    a_spinning_cell_catches_an_interrupt(&w).await;
    a_c_bound_cell_is_killed(&w, Duration::from_millis(50)).await;
    assert_eq!(
        first.remote_eval_fetch::<i64>("secret + 1").await.unwrap(),
        42
    );
    // Its output goes to its own handle.
    let out = printed(&w, "print('from the spare')").await;
    assert_eq!(out, "from the spare\n");
    first.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_component_says_what_to_run() {
    let err = Worker::python_component("/nonexistent/malt_python.wasm")
        .spawn()
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("pip install componentize-py==0.25.1")
            && message.contains("malt build-python"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_path_adds_the_users_packages_read_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("grading")).unwrap();
    std::fs::write(
        dir.path().join("grading/__init__.py"),
        "from .rules import grade\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("grading/rules.py"),
        "def grade(score):\n    return 'pass' if score >= 50 else 'fail'\n",
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("helpers.py"), "TWO = 2\n").unwrap();
    let w = python()
        .python_path(dir.path())
        .python_path(other.path())
        .spawn()
        .await
        .unwrap();
    let out: (String, i64) = w
        .remote_eval_fetch("import grading, helpers\n(grading.grade(72), helpers.TWO)")
        .await
        .unwrap();
    assert_eq!(out, ("pass".into(), 2));
    let err = w
        .remote_eval_fetch::<()>("open(grading.__file__, 'a').write('x')")
        .await
        .unwrap_err();
    assert!(remote_message(&err).contains("Error"), "read-only: {err}");
    // Nothing was written into the user's directory (no __pycache__).
    assert!(!dir.path().join("grading/__pycache__").exists());
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_crashes_and_limits_in_a_python_worker() {
    let w = python().fuel(2_000_000_000).spawn().await.unwrap();
    // A channel shared by the manager and the guest.
    let jobs = w.worker_channel::<i64>("jobs", 4).await.unwrap();
    let results = w.worker_channel::<i64>("results", 4).await.unwrap();
    let worker_loop = w.remote_eval::<()>(
        "import malt\nwhile True:\n    n = malt.channel_take('jobs')\n    if n < 0:\n        break\n    malt.channel_put('results', n * n)",
    );
    for n in [3, 4, -1] {
        jobs.put(n).await.unwrap();
    }
    assert_eq!(results.take().await.unwrap(), 9);
    assert_eq!(results.take().await.unwrap(), 16);
    worker_loop.await.unwrap();
    // Threads and processes are not there: clear errors, not traps.
    let err = w
        .remote_eval_fetch::<()>("import threading\nthreading.Thread(target=print).start()")
        .await
        .unwrap_err();
    assert!(remote_message(&err).contains("Error"), "{err}");
    // Fuel stops a runaway request; the worker goes on (fresh state).
    let err = w
        .remote_eval_fetch::<i64>("total = 0\nfor i in range(10 ** 12):\n    total += i")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: malt::Limit::Fuel,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(w.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
    // A host killed under a request: the request fails, the handle says so.
    let pending = w.remote_eval::<()>("import time\ntime.sleep(60)");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill(2) on the worker's own host process.
    unsafe { libc::kill(w.pid() as i32, libc::SIGKILL) };
    let err = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the call ends with its worker")
        .unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
    assert!(!w.is_running());
}

/// With rollback, a cell that has to be killed (stuck in C: no loop jump
/// to take the interrupt at) leaves the namespace as it was before the cell: the
/// cell's own assignments are undone, earlier definitions are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cell_is_rolled_back_with_the_namespace_as_before_it() {
    let w = python()
        .interrupt_grace(Duration::from_millis(200))
        .rollback(true)
        .spawn()
        .await
        .unwrap();
    w.remote_eval_wait("x = 1\ndef double(n):\n    return 2 * n")
        .await
        .unwrap();
    for cell in ["x = 2\nsum(range(10 ** 15))", "x = 3\ny = 10 ** (10 ** 8)"] {
        let running = w.remote_eval::<i64>(cell);
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.interrupt().unwrap();
        let err = tokio::time::timeout(Duration::from_secs(30), running)
            .await
            .expect("the kill ends it")
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    state_lost: false,
                    rolled_back: true
                }
            ),
            "{cell:?}: {err:?}"
        );
        assert_eq!(
            w.remote_eval_fetch::<i64>("x").await.unwrap(),
            1,
            "{cell:?}"
        );
        assert_eq!(
            w.remote_call_fetch::<i64>("double", (21,)).await.unwrap(),
            42
        );
    }
    // The host that took over raises interrupts in CPython's memory too
    // (it found the memory through its own map), and a cell that stops
    // by itself is not rolled back: it keeps what it did.
    let mode: String = w
        .remote_eval_fetch("import sys; sys.modules['guest'].interrupts")
        .await
        .unwrap();
    assert_eq!(mode, "memory");
    a_spinning_cell_catches_an_interrupt(&w).await;
    assert_eq!(
        w.remote_eval_fetch::<String>("result").await.unwrap(),
        "caught"
    );
}
