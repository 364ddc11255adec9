//! Malt's `test/starting.jl`: start failures are clear and fast.

use malt::{Error, Worker};

use crate::common::finishes;

fn write_temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("malt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

async fn spawn_error(builder: malt::WorkerBuilder) -> String {
    let err = finishes("spawn", builder.spawn()).await.unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    err.to_string()
}

#[tokio::test]
async fn missing_module_path() {
    let msg = spawn_error(Worker::wasm("/no/such/module.wasm")).await;
    assert!(msg.contains("/no/such/module.wasm"), "{msg}");
    assert!(msg.contains("No such file"), "{msg}");
}

#[tokio::test]
async fn not_wasm_at_all() {
    let path = write_temp("text.wasm", b"this is not wasm");
    let msg = spawn_error(Worker::wasm(&path)).await;
    assert!(msg.contains("not a WebAssembly file"), "{msg}");
}

#[tokio::test]
async fn a_core_module_is_not_a_component() {
    let module = wat::parse_str("(module (func (export \"call\")))").unwrap();
    let path = write_temp("core.wasm", &module);
    let msg = spawn_error(Worker::wasm(&path)).await;
    assert!(
        msg.contains("core WebAssembly module, not a component"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_component_of_another_world() {
    let empty = wat::parse_str("(component)").unwrap();
    let path = write_temp("empty-component.wasm", &empty);
    let msg = spawn_error(Worker::wasm(&path)).await;
    assert!(
        msg.contains("does not implement the malt:worker world"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_component_with_unknown_imports() {
    let c =
        wat::parse_str(r#"(component (import "acme:thing/api" (instance (export "f" (func)))))"#)
            .unwrap();
    let path = write_temp("imports.wasm", &c);
    let msg = spawn_error(Worker::wasm(&path)).await;
    assert!(msg.contains("imports cannot be satisfied"), "{msg}");
    assert!(msg.contains("acme:thing/api"), "{msg}");
}

#[tokio::test]
async fn truncated_component() {
    let guest = std::fs::read(crate::common::test_guest()).unwrap();
    let path = write_temp("truncated.wasm", &guest[..guest.len() / 2]);
    let msg = spawn_error(Worker::wasm(&path)).await;
    assert!(msg.contains("cannot compile"), "{msg}");
}

#[tokio::test]
async fn a_missing_host_program() {
    let msg = spawn_error(Worker::script().host_program("/no/such/malt")).await;
    assert!(msg.contains("/no/such/malt"), "{msg}");
}

#[tokio::test]
async fn a_host_program_that_is_not_a_host() {
    // `true` exits at once without speaking the protocol.
    let msg = spawn_error(Worker::script().host_program("/bin/true")).await;
    assert!(msg.contains("exited during startup"), "{msg}");
}

#[tokio::test]
async fn a_granted_directory_that_does_not_exist() {
    let msg = spawn_error(Worker::script().dir("/no/such/dir", "data")).await;
    assert!(msg.contains("/no/such/dir"), "{msg}");
}

#[tokio::test]
async fn a_native_program_that_is_not_a_host() {
    let msg = spawn_error(Worker::native_program("/bin/true")).await;
    assert!(msg.contains("exited during startup"), "{msg}");
}

/// A fake host program: answers the handshake with `hello` (already a
/// frame), then waits.
fn fake_host(name: &str, hello: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let frame = write_temp(&format!("{name}.frame"), hello);
    let script = write_temp(
        name,
        format!("#!/bin/sh\ncat '{}'\nexec sleep 30\n", frame.display()).as_bytes(),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test]
async fn a_host_of_another_version_is_refused() {
    use malt::protocol::{FromHost, PROTOCOL_VERSION, encode};
    let hello = encode(&FromHost::Hello {
        version: PROTOCOL_VERSION,
        malt_version: "0.0.1".into(),
        kind: malt::protocol::GuestKind::Wasm,
        pid: 1,
        hardening: None,
    });
    let host = fake_host("old-host", &hello);
    let msg = spawn_error(Worker::script().host_program(&host)).await;
    // Both versions are named, never a silent mix.
    assert!(msg.contains("version mismatch"), "{msg}");
    assert!(msg.contains("malt 0.0.1"), "{msg}");
    assert!(msg.contains(&format!("malt {}", malt::VERSION)), "{msg}");
}

#[tokio::test]
async fn a_host_program_that_speaks_no_protocol() {
    // Not a malt host at all: the error says what was expected.
    let host = fake_host("not-a-host", b"hello, world\n");
    let msg = spawn_error(Worker::script().host_program(&host)).await;
    assert!(msg.contains("is") && msg.contains("a malt host?"), "{msg}");
    assert!(msg.contains(malt::VERSION), "{msg}");
}

#[tokio::test]
async fn in_process_is_for_wasm_guests() {
    let msg = spawn_error(Worker::native().in_process()).await;
    assert!(msg.contains("wasm guests only"), "{msg}");
}

/// The launchers for here: in-process and a local process, the last one
/// given wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_launchers_choose_the_kind_of_worker() {
    use malt::{Launcher, WorkerKind};
    let cases = [
        (
            Worker::script().launcher(Launcher::in_process()),
            WorkerKind::InProcess,
        ),
        (
            Worker::script().launcher(Launcher::local()),
            WorkerKind::Wasm,
        ),
        (
            Worker::script().in_process().launcher(Launcher::local()),
            WorkerKind::Wasm,
        ),
        (
            Worker::script()
                .launcher(Launcher::command(["/nonexistent/malt"]))
                .in_process(),
            WorkerKind::InProcess,
        ),
    ];
    for (builder, kind) in cases {
        let w = builder.spawn().await.unwrap();
        assert_eq!(w.kind(), kind);
        assert_eq!(w.remote_eval_fetch::<i64>("6 * 7").await.unwrap(), 42);
        match kind {
            WorkerKind::InProcess => assert_eq!(w.pid(), std::process::id()),
            _ => assert_ne!(w.pid(), std::process::id()),
        }
        w.stop().await.unwrap();
    }
}
