//! Escape attempts from guest code in a wasm worker: each is refused with
//! a clear error, and the worker still answers afterwards.

use malt::{Error, Worker};

use crate::guests::test_guest;

fn refused(result: Result<impl std::fmt::Debug, Error>, what: &str) -> String {
    match result {
        Err(Error::Remote(e)) => e.message,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_filesystem_is_closed_by_default() {
    let w = Worker::wasm(test_guest()).spawn().await.unwrap();
    for path in ["/etc/passwd", "/proc/self/environ", "../../etc/passwd", "."] {
        let message = refused(w.remote_call_fetch::<String>("read", (path,)).await, path);
        assert!(message.contains("read"), "{message}");
    }
    let message = refused(
        w.remote_call_fetch::<()>("write", ("/tmp/x", "x")).await,
        "write",
    );
    assert!(message.contains("write /tmp/x"), "{message}");
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 1)).await.unwrap(), 2);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn a_granted_directory_and_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inside.txt"), "ok").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), dir.path().join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();

    let w = Worker::wasm(test_guest())
        .dir_read_only(dir.path(), "/data")
        .spawn()
        .await
        .unwrap();
    assert_eq!(
        w.remote_call_fetch::<String>("read", ("/data/inside.txt",))
            .await
            .unwrap(),
        "ok"
    );
    for path in [
        "/data/../secret.txt",
        "/data/link",
        "/data/etc/passwd",
        "/data/../../etc/passwd",
    ] {
        refused(w.remote_call_fetch::<String>("read", (path,)).await, path);
    }
    // Read-only means read-only.
    let message = refused(
        w.remote_call_fetch::<()>("write", ("/data/new.txt", "x"))
            .await,
        "write",
    );
    assert!(message.contains("write /data/new.txt"), "{message}");
    assert!(!dir.path().join("new.txt").exists());
    w.stop().await.unwrap();

    // Read-write allows writes inside, still nothing outside.
    let w = Worker::wasm(test_guest())
        .dir(dir.path(), "/data")
        .spawn()
        .await
        .unwrap();
    w.remote_call_fetch::<()>("write", ("/data/new.txt", "x"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("new.txt")).unwrap(),
        "x"
    );
    refused(
        w.remote_call_fetch::<()>("write", ("/data/../escape.txt", "x"))
            .await,
        "escape",
    );
    refused(
        w.remote_call_fetch::<()>("write", ("/data/link", "overwritten"))
            .await,
        "symlink",
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
        "secret"
    );
    w.stop().await.unwrap();
}

#[tokio::test]
async fn no_environment_no_network_no_processes() {
    // A variable the manager has (set by whoever started the tests;
    // setting one here would race the other tests' threads).
    assert!(std::env::var_os("PATH").is_some(), "the manager has a PATH");
    let w = Worker::wasm(test_guest())
        .env("GRANTED", "yes")
        .spawn()
        .await
        .unwrap();
    let secret: Option<String> = w.remote_call_fetch("env_var", ("PATH",)).await.unwrap();
    assert_eq!(secret, None);
    let granted: Option<String> = w.remote_call_fetch("env_var", ("GRANTED",)).await.unwrap();
    assert_eq!(granted.as_deref(), Some("yes"));
    for addr in ["127.0.0.1:22", "127.0.0.1:80"] {
        let message = refused(w.remote_call_fetch::<()>("connect", (addr,)).await, addr);
        assert!(message.contains("connect"), "{message}");
    }
    let message = refused(
        w.remote_call_fetch::<Option<i32>>("spawn", ("/bin/sh",))
            .await,
        "spawn",
    );
    assert!(message.contains("spawn /bin/sh"), "{message}");
    assert_eq!(w.remote_call_fetch::<i64>("add", (2, 3)).await.unwrap(), 5);
    w.stop().await.unwrap();
}

#[tokio::test]
async fn huge_allocations_deep_recursion_and_endless_output() {
    let w = Worker::script()
        .memory_limit(64 << 20)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let mut output = w.take_output().unwrap();
    w.remote_eval_wait("let kept = 1;").await.unwrap();
    // Rhai's own limits stop these cleanly, state kept.
    for code in [
        "let a = []; a.pad(100000000, 0); a.len()",
        "blob(100000000).len()",
        r#"let s = "x"; loop { s += s; }"#,
        "fn f(n) { f(n + 1) } f(0)",
    ] {
        let err = w.remote_eval_fetch::<()>(code).await.unwrap_err();
        assert!(err.as_remote().is_some(), "{code}: {err:?}");
    }
    assert_eq!(w.remote_eval_fetch::<i64>("kept").await.unwrap(), 1);
    // A raw guest that allocates without end hits the memory cap.
    let raw = Worker::wasm(test_guest())
        .memory_limit(64 << 20)
        .spawn()
        .await
        .unwrap();
    let err = raw
        .remote_call_fetch::<usize>("alloc", (1 << 20,))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                limit: malt::Limit::Memory,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        raw.remote_call_fetch::<i64>("add", (1, 2)).await.unwrap(),
        3
    );
    raw.stop().await.unwrap();
    w.stop().await.unwrap();
    while output.recv().await.is_some() {}

    // Endless output is cut by the per-request output cap, with a notice;
    // the manager never holds more than the cap.
    let w = Worker::script()
        .output_limit(64 << 10)
        .call_timeout(std::time::Duration::from_secs(2))
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let mut output = w.take_output().unwrap();
    let reader = tokio::spawn(async move {
        let (mut total, mut notice) = (0usize, false);
        while let Some(chunk) = output.recv().await {
            let text = String::from_utf8_lossy(&chunk.data);
            if text.contains("output limit") {
                notice = true;
            } else {
                total += chunk.data.len();
            }
        }
        (total, notice)
    });
    let err = w
        .remote_eval_fetch::<()>(r#"loop { print("spam spam spam spam spam spam spam spam"); }"#)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    // The next request may print again.
    w.remote_eval_wait(r#"print("after")"#).await.unwrap();
    w.stop().await.unwrap();
    let (total, notice) = reader.await.unwrap();
    assert!(notice, "a notice says output was cut");
    assert!(total <= (64 << 10) + 64, "{total} bytes of output kept");
}

/// An in-process guest's files are descriptors of the manager's own
/// process: a guest that opens files without end must hit its own cap,
/// not run the manager out of descriptors (which once made the reset
/// after its trap fail, and the manager's process exit).
#[tokio::test]
async fn a_guest_cannot_exhaust_the_managers_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    for in_process in [true, false] {
        let builder = Worker::wasm(test_guest()).dir_read_only(dir.path(), "/d");
        let builder = if in_process {
            builder.in_process()
        } else {
            builder
        };
        let w = builder.spawn().await.unwrap();
        let err = w
            .remote_call_fetch::<usize>("hoard", ("/d/f", 100_000))
            .await
            .expect_err("100 000 open files are refused");
        assert!(
            matches!(err, Error::Trap { .. } | Error::Remote(_)),
            "in-process {in_process}: {err:?}"
        );
        if in_process {
            // Its own cap, long before the process's descriptors run out.
            assert!(err.to_string().contains("resource table"), "{err}");
        }
        // The guest was reset (its handles closed) and the worker answers.
        assert_eq!(w.remote_call_fetch::<i64>("add", (1, 1)).await.unwrap(), 2);
        let opened = w
            .remote_call_fetch::<usize>("hoard", ("/d/f", 100))
            .await
            .unwrap();
        assert_eq!(opened, 100);
        w.stop().await.unwrap();
    }
}

/// A guest that may write where the compiled artifacts live could replace
/// the code every later worker runs (reproduced: a component granted `~`
/// read-write overwrote the script guest's artifact); one that may read
/// there could read the key that seals them. Such a grant is refused,
/// read-write or read-only, whether it contains the cache or lies inside
/// it; a sibling directory is fine.
#[tokio::test]
async fn a_grant_that_could_reach_the_artifact_cache_is_refused() {
    // Make sure the cache exists (the first worker of a run creates it).
    let w = Worker::wasm(test_guest()).spawn().await.unwrap();
    w.stop().await.unwrap();
    let cache = malt::cache_dir();
    let inside = cache.join(format!("grant-test-{}", std::process::id()));
    std::fs::create_dir_all(&inside).unwrap();
    for dir in [
        cache.parent().unwrap().to_path_buf(),
        cache.clone(),
        inside.clone(),
    ] {
        for read_only in [false, true] {
            let builder = Worker::wasm(test_guest());
            let builder = match read_only {
                true => builder.dir_read_only(&dir, "/g"),
                false => builder.dir(&dir, "/g"),
            };
            let err = builder
                .spawn()
                .await
                .expect_err("a grant over the cache is refused");
            let Error::Spawn { message, .. } = &err else {
                panic!("{}: {err:?}", dir.display())
            };
            assert!(message.contains("artifact cache"), "{message}");
        }
    }
    let _ = std::fs::remove_dir(&inside);
    let sibling = tempfile::tempdir().unwrap();
    let w = Worker::wasm(test_guest())
        .dir(sibling.path(), "/g")
        .spawn()
        .await
        .expect("a grant beside the cache is fine");
    assert_eq!(w.remote_call_fetch::<i64>("add", (1, 1)).await.unwrap(), 2);
    w.stop().await.unwrap();
}

/// Grants are opened once: a directory swapped for a symlink after the
/// start (here by the test; a guest could do it through another, writable
/// grant) is not followed when the guest is reset after a trap.
#[tokio::test]
async fn a_reset_does_not_follow_a_swapped_grant() {
    let root = tempfile::tempdir().unwrap();
    let granted = root.path().join("granted");
    std::fs::create_dir(&granted).unwrap();
    std::fs::write(granted.join("f"), "granted").unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("f"), "outside").unwrap();
    for in_process in [false, true] {
        let builder = Worker::wasm(test_guest())
            .dir_read_only(&granted, "/g")
            .monitor_output(false);
        let builder = if in_process {
            builder.in_process()
        } else {
            builder
        };
        let w = builder.spawn().await.unwrap();
        let read = || w.remote_call_fetch::<String>("read", ("/g/f",));
        assert_eq!(read().await.unwrap(), "granted");
        // Swap the granted directory for a symlink to another one.
        let moved = root.path().join(format!("moved-{in_process}"));
        std::fs::rename(&granted, &moved).unwrap();
        std::os::unix::fs::symlink(&outside, &granted).unwrap();
        let err = w
            .remote_call_fetch::<()>("panic", ("reset",))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Trap { .. }), "{err:?}");
        assert_eq!(
            read().await.unwrap(),
            "granted",
            "in-process {in_process}: the reset reopened the directory granted at the start"
        );
        w.stop().await.unwrap();
        // Back as it was, for the next kind.
        std::fs::remove_file(&granted).unwrap();
        std::fs::rename(&moved, &granted).unwrap();
    }
}
