//! Malt's `test/stdout.jl`: guest output reaches the manager.

use malt::Stream;

use crate::common::{Kind, finishes, test_guest_worker};
use crate::{conformance, conformance_python};

conformance!(
    stdout_and_stderr_reach_the_caller,
    printing_cannot_corrupt_the_protocol,
    output_of_a_raw_guest,
    forwarded_output_is_prefixed,
);

conformance_python!(
    stdout_and_stderr_reach_the_caller,
    printing_cannot_corrupt_the_protocol,
    forwarded_output_is_prefixed,
);

async fn stdout_and_stderr_reach_the_caller(kind: Kind) {
    let w = kind.script().monitor_output(false).spawn().await.unwrap();
    let mut output = w.take_output().expect("output is captured");
    assert!(w.take_output().is_none(), "output can be taken once");
    w.remote_eval_wait(kind.code(
        r#"print("hello from the guest"); debug("to stderr");"#,
        "import sys\nprint('hello from the guest'); print('to stderr', file=sys.stderr)",
    ))
    .await
    .unwrap();
    w.stop().await.unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    while let Some(chunk) = finishes("output", output.recv()).await {
        let text = String::from_utf8_lossy(&chunk.data).into_owned();
        match chunk.stream {
            Stream::Stdout => stdout.push_str(&text),
            Stream::Stderr => stderr.push_str(&text),
        }
    }
    assert_eq!(stdout, "hello from the guest\n");
    assert!(stderr.contains("to stderr"), "{stderr}");
}

async fn printing_cannot_corrupt_the_protocol(kind: Kind) {
    let w = kind.script().monitor_output(false).spawn().await.unwrap();
    let mut output = w.take_output().unwrap();
    // Text that looks like frames, binary-ish bytes, and lots of it,
    // interleaved with calls whose values must come back intact.
    let code = kind.code(
        r#"
        for i in 0..200 {
            print("\x04\x00\x00\x00\x81\xa5Hello" + i);
        }
        print("done");
        12345
    "#,
        "for i in range(200):\n    print('\\x04\\x00\\x00\\x00\\x81\\xa5Hello' + str(i))\nprint('done')\n12345",
    );
    for _ in 0..5 {
        assert_eq!(w.remote_eval_fetch::<i64>(code).await.unwrap(), 12345);
    }
    w.stop().await.unwrap();
    let stdout = output.read_to_string(Stream::Stdout).await;
    assert_eq!(stdout.matches("done\n").count(), 5);
    assert_eq!(stdout.lines().count(), 5 * 201);
}

async fn output_of_a_raw_guest(kind: Kind) {
    let w = test_guest_worker(kind)
        .monitor_output(false)
        .spawn()
        .await
        .unwrap();
    let mut output = w.take_output().unwrap();
    w.remote_call_wait("print", ("raw guest says hi",))
        .await
        .unwrap();
    w.stop().await.unwrap();
    assert_eq!(
        output.read_to_string(Stream::Stdout).await,
        "raw guest says hi\n"
    );
}

async fn forwarded_output_is_prefixed(kind: Kind) {
    // Forwarding writes to this process's real stdout/stderr, so run a
    // copy of this test binary as a child (running only the child test)
    // and read what it printed.
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            &format!("output::{kind:?}_child::forwarding_child").to_lowercase(),
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.contains("forwarded line"))
        .unwrap_or_else(|| panic!("no forwarded line in:\n{stdout}"));
    // libtest may print "test name ... " in front of the child's output.
    let prefixed = line
        .split("[worker ")
        .nth(1)
        .unwrap_or_else(|| panic!("no prefix: {line}"));
    let (number, rest) = prefixed.split_once("] ").unwrap();
    assert!(number.parse::<u64>().is_ok(), "{line}");
    assert_eq!(rest, "forwarded line");
    let err_line = stderr
        .lines()
        .find(|l| l.contains("forwarded error"))
        .unwrap_or_else(|| panic!("no forwarded error in:\n{stderr}"));
    assert!(err_line.contains("[worker "), "{err_line}");
    // No color codes when NO_COLOR is set or not on a terminal.
    assert!(!stdout.contains('\x1b'));
}

/// The child side of `forwarded_output_is_prefixed`: prints through a
/// worker with forwarding on (run alone, it checks just that this works).
async fn forwarding_child(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code(
        r#"print("forwarded line"); debug("forwarded error")"#,
        "import sys\nprint('forwarded line'); print('forwarded error', file=sys.stderr)",
    ))
    .await
    .unwrap();
    w.stop().await.unwrap();
}

mod wasm_child {
    #[tokio::test]
    async fn forwarding_child() {
        super::forwarding_child(crate::common::Kind::Wasm).await
    }
}

mod native_child {
    #[tokio::test]
    async fn forwarding_child() {
        super::forwarding_child(crate::common::Kind::Native).await
    }
}

mod nativeprogram_child {
    #[tokio::test]
    async fn forwarding_child() {
        super::forwarding_child(crate::common::Kind::NativeProgram).await
    }
}

mod python_child {
    #[tokio::test]
    async fn forwarding_child() {
        super::forwarding_child(crate::common::Kind::Python).await
    }
}

mod inprocess_child {
    #[tokio::test]
    async fn forwarding_child() {
        super::forwarding_child(crate::common::Kind::InProcess).await
    }
}
