//! Malt's `test/interrupt.jl`: interrupts in two tiers.

use std::time::Duration;

use malt::Error;

use crate::common::{Kind, finishes};
use crate::{conformance_both, conformance_ssh};

conformance_both!(
    interrupt_a_busy_loop_keeps_state,
    interrupt_a_sleep,
    interrupt_a_blocked_channel_take,
    two_interrupts_in_a_row,
    interrupt_an_idle_worker_is_harmless,
    interrupt_right_after_sending,
    queued_requests_run_after_an_interrupt,
    call_timeout_stops_a_runaway_call,
);

conformance_ssh!(
    interrupt_a_busy_loop_keeps_state,
    interrupt_a_sleep,
    interrupt_a_blocked_channel_take,
    queued_requests_run_after_an_interrupt,
    call_timeout_stops_a_runaway_call,
);

/// Waits until the worker is running the request (it set `started`).
async fn wait_started(w: &malt::Worker, ch: &malt::WorkerChannel<i64>) {
    let _ = w;
    assert_eq!(
        finishes("the request to start", ch.take()).await.unwrap(),
        1
    );
}

async fn interrupt_a_busy_loop_keeps_state(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    w.remote_eval_wait(kind.code("let kept = 42;", "kept = 42"))
        .await
        .unwrap();
    let running = w.remote_eval::<()>(kind.code(
        r#"channel_put("started", 1); loop { kept += 0; }"#,
        "channel_put('started', 1)\nwhile True:\n    kept += 0",
    ));
    wait_started(&w, &started).await;
    w.interrupt().unwrap();
    let err = finishes("the interrupted loop", running).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: false,
                ..
            }
        ),
        "a cooperative stop keeps state: {err:?}"
    );
    assert!(w.is_running());
    assert_eq!(w.remote_eval_fetch::<i64>("kept").await.unwrap(), 42);
    w.stop().await.unwrap();
}

async fn interrupt_a_sleep(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let running = w.remote_eval::<()>(r#"channel_put("started", 1); sleep(1000000)"#);
    wait_started(&w, &started).await;
    w.interrupt().unwrap();
    let err = finishes("the interrupted sleep", running)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(w.remote_eval_fetch::<i64>("1 + 1").await.unwrap(), 2);
    w.stop().await.unwrap();
}

async fn interrupt_a_blocked_channel_take(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let _never = w.worker_channel::<i64>("never", 1).await.unwrap();
    let running = w.remote_eval::<i64>(r#"channel_put("started", 1); channel_take("never")"#);
    wait_started(&w, &started).await;
    w.interrupt().unwrap();
    let err = finishes("the interrupted take", running).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Interrupted {
                state_lost: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(w.remote_eval_fetch::<i64>("3").await.unwrap(), 3);
    w.stop().await.unwrap();
}

async fn two_interrupts_in_a_row(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    for _ in 0..2 {
        let running = w.remote_eval::<()>(kind.code(
            r#"channel_put("started", 1); loop {}"#,
            "channel_put('started', 1)\nwhile True: pass",
        ));
        wait_started(&w, &started).await;
        w.interrupt().unwrap();
        w.interrupt().unwrap();
        let err = finishes("the interrupted loop", running).await.unwrap_err();
        assert!(matches!(err, Error::Interrupted { .. }), "{err:?}");
        assert_eq!(w.remote_eval_fetch::<i64>("7").await.unwrap(), 7);
    }
    w.stop().await.unwrap();
}

async fn interrupt_an_idle_worker_is_harmless(kind: Kind) {
    let w = kind.spawn().await;
    w.interrupt().unwrap();
    // The next request is not hit by an interrupt aimed at nothing.
    assert_eq!(
        w.remote_eval_fetch::<i64>("sleep(0.01); 5").await.unwrap(),
        5
    );
    w.stop().await.unwrap();
}

/// The README's example: no waiting for the request to begin. The
/// interrupt reaches it even if it arrives while the request is queued.
async fn interrupt_right_after_sending(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code("let kept = 42;", "kept = 42"))
        .await
        .unwrap();
    for _ in 0..5 {
        let running =
            w.remote_eval::<()>(kind.code("loop { kept += 0; }", "while True:\n    kept += 0"));
        w.interrupt().unwrap();
        let err = finishes("the interrupted loop", running).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    state_lost: false,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // And a request sent after the interrupt is not hit.
    assert_eq!(w.remote_eval_fetch::<i64>("kept").await.unwrap(), 42);
    w.stop().await.unwrap();
}

async fn queued_requests_run_after_an_interrupt(kind: Kind) {
    let w = kind.spawn().await;
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let running = w.remote_eval::<()>(kind.code(
        r#"channel_put("started", 1); loop {}"#,
        "channel_put('started', 1)\nwhile True: pass",
    ));
    let queued = w.remote_eval::<i64>("10 + 1");
    wait_started(&w, &started).await;
    w.interrupt().unwrap();
    assert!(finishes("loop", running).await.is_err());
    assert_eq!(finishes("queued", queued).await.unwrap(), 11);
    w.stop().await.unwrap();
}

async fn call_timeout_stops_a_runaway_call(kind: Kind) {
    let w = kind
        .script()
        .call_timeout(Duration::from_millis(200))
        .spawn()
        .await
        .unwrap();
    w.remote_eval_wait(kind.code("let kept = 5;", "kept = 5"))
        .await
        .unwrap();
    let runaway = kind.code("loop {}", "while True: pass");
    let err = finishes("timeout", w.remote_eval_fetch::<()>(runaway))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    // The cooperative tier stopped it: state is kept.
    assert_eq!(w.remote_eval_fetch::<i64>("kept").await.unwrap(), 5);
    // A short call is unaffected.
    let short = kind.code("sleep(0.01); 1", "import time; time.sleep(0.01); 1");
    assert_eq!(w.remote_eval_fetch::<i64>(short).await.unwrap(), 1);
    w.stop().await.unwrap();
}
