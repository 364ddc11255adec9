//! Guests written with the Rust SDK (`guest/sdk`), the same source built
//! as a wasm component and as a native program.

use crate::common::{Kind, finishes, test_guest_worker};
use crate::conformance;

conformance!(
    typed_calls,
    errors_in_arguments_are_remote_exceptions,
    a_panic_fails_the_call_and_resets_the_guest,
    sdk_sleep_is_cut_short_by_an_interrupt,
    sdk_channels,
    a_reply_is_not_held_back_by_the_request_queued_after_it,
);

async fn typed_calls(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    assert_eq!(
        w.remote_call_fetch::<i64>("add", (40, 2)).await.unwrap(),
        42
    );
    let bytes = serde_bytes::ByteBuf::from(vec![1, 2, 3]);
    let back: serde_bytes::ByteBuf = w.remote_call_fetch("echo", (bytes.clone(),)).await.unwrap();
    assert_eq!(back, bytes);
    let err = w.remote_eval_fetch::<i64>("1 + 1").await.unwrap_err();
    assert!(
        err.as_remote().unwrap().message.contains("cannot evaluate"),
        "{err}"
    );
    w.stop().await.unwrap();
}

async fn errors_in_arguments_are_remote_exceptions(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    let err = w
        .remote_call_fetch::<i64>("add", ("one", 2))
        .await
        .unwrap_err();
    let message = &err.as_remote().expect("a remote exception").message;
    assert!(message.contains("add: bad arguments"), "{message}");
    let err = w.remote_call_fetch::<i64>("missing", ()).await.unwrap_err();
    assert!(
        err.as_remote()
            .unwrap()
            .message
            .contains("no function named missing")
    );
    w.stop().await.unwrap();
}

async fn a_panic_fails_the_call_and_resets_the_guest(kind: Kind) {
    let w = test_guest_worker(kind)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let pending = w.remote_call::<i64>("add", (1, 1));
    let err = w
        .remote_call_fetch::<()>("panic", ("at the disco",))
        .await
        .unwrap_err();
    assert!(matches!(err, malt::Error::Trap { .. }), "{err:?}");
    assert_eq!(pending.await.unwrap(), 2);
    assert_eq!(w.remote_call_fetch::<i64>("add", (2, 2)).await.unwrap(), 4);
    assert!(w.is_running());
    w.stop().await.unwrap();
}

async fn sdk_sleep_is_cut_short_by_an_interrupt(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    // A guest that checks `sleep`'s result and returns early: the call
    // succeeds with what the guest returned (it stopped by itself).
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    let napping = w.remote_call::<bool>("nap", (100_000,));
    finishes("the nap to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    let slept_fully = finishes("nap", napping).await.unwrap();
    assert!(!slept_fully);
    assert!(w.remote_call_fetch::<bool>("nap", (1,)).await.unwrap());
    assert_eq!(started.take().await.unwrap(), 1);
    w.stop().await.unwrap();
}

async fn sdk_channels(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    let inbox = w.worker_channel::<i64>("in", 4).await.unwrap();
    let outbox = w.worker_channel::<i64>("out", 4).await.unwrap();
    let relay = w.remote_call::<i64>("relay", ("in", "out"));
    inbox.put(99).await.unwrap();
    assert_eq!(finishes("relay", relay).await.unwrap(), 99);
    assert_eq!(outbox.take().await.unwrap(), 99);
    w.stop().await.unwrap();
}

async fn a_reply_is_not_held_back_by_the_request_queued_after_it(kind: Kind) {
    let w = test_guest_worker(kind).spawn().await.unwrap();
    let started = w.worker_channel::<i64>("started", 1).await.unwrap();
    // Sent together, so the host has the nap queued when the add ends:
    // it holds the add's reply back a moment (replies to queued requests
    // go out in batches), but never until the nap ends.
    let quick = w.remote_call::<i64>("add", (1, 2));
    let napping = w.remote_call::<bool>("nap", (100_000,));
    assert_eq!(finishes("the quick call", quick).await.unwrap(), 3);
    // The nap still runs: an interrupt cuts it short.
    finishes("the nap to start", started.take()).await.unwrap();
    w.interrupt().unwrap();
    assert!(!finishes("nap", napping).await.unwrap());
    w.stop().await.unwrap();
}

/// A native worker's guest can itself start and use workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_workers_in_a_native_guest() {
    let w = test_guest_worker(Kind::Native).spawn().await.unwrap();
    let value: i64 = finishes(
        "nested",
        w.remote_call_fetch("nested", ("let x = 6; x * 7",)),
    )
    .await
    .unwrap();
    assert_eq!(value, 42);
    w.stop().await.unwrap();
}

/// The blocking facade, from a plain thread.
#[test]
fn blocking_facade() {
    use malt::blocking::Worker;
    for builder in [
        Worker::script(),
        Worker::native(),
        Worker::script().in_process(),
    ] {
        let w = builder.spawn().unwrap();
        w.remote_eval_wait("fn add(a, b) { a + b }").unwrap();
        let pending = w.remote_call::<i64>("add", (1, 2));
        assert_eq!(pending.fetch().unwrap(), 3);
        let ch = w.worker_channel::<String>("c", 2).unwrap();
        ch.put("x".into()).unwrap();
        assert!(ch.is_ready().unwrap());
        assert_eq!(
            w.remote_eval_fetch::<String>(r#"channel_take("c")"#)
                .unwrap(),
            "x"
        );
        assert!(w.stop().unwrap());
        assert!(!w.is_running());
    }
}
