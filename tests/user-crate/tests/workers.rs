//! A user's tests: the test harness has no `main` to set anything up in,
//! and the workers still start.

use malt::{Error, Worker};

#[tokio::test]
async fn a_script_worker_from_a_test() {
    let w = Worker::script().spawn().await.unwrap();
    let v: i64 = w.remote_eval_fetch("40 + 2").await.unwrap();
    assert_eq!(v, 42);
    let err = w.remote_eval_fetch::<()>(r#"throw "boom""#).await.unwrap_err();
    assert!(matches!(err, Error::Remote(_)), "{err:?}");
    assert!(w.stop().await.unwrap());
}

#[tokio::test]
async fn a_native_worker_from_a_test() {
    // The native script guest is served by this test binary itself.
    let w = Worker::native().spawn().await.unwrap();
    assert_ne!(w.pid(), std::process::id());
    let v: String = w.remote_eval_fetch(r#""na" + "tive""#).await.unwrap();
    assert_eq!(v, "native");
    w.stop().await.unwrap();
}

#[test]
fn the_blocking_api_from_a_test() {
    let w = malt::blocking::Worker::script().spawn().unwrap();
    let v: i64 = w.remote_call_fetch("max", (3, 9)).unwrap();
    assert_eq!(v, 9);
    w.stop().unwrap();
}

#[tokio::test]
async fn no_malt_binary_is_involved() {
    // The host is this very program, re-executed.
    let w = Worker::script().spawn().await.unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", w.pid())).unwrap();
    assert_eq!(exe, std::env::current_exe().unwrap());
    w.stop().await.unwrap();
}
