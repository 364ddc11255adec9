//! Malt's `test/exceptions.jl`: remote failures and their messages.

use malt::Error;

use crate::common::Kind;
use crate::{conformance_both, conformance_ssh};

conformance_both!(
    thrown_errors_become_remote_exceptions,
    script_errors_carry_the_guest_message,
    async_handles_fail_with_the_remote_exception,
    worker_is_responsive_after_an_error,
    a_value_that_does_not_decode_is_a_decode_error,
    values_that_cannot_be_sent_fail_cleanly,
    a_deeply_nested_value_is_refused_not_a_crash,
);

conformance_ssh!(
    thrown_errors_become_remote_exceptions,
    worker_is_responsive_after_an_error,
);

async fn thrown_errors_become_remote_exceptions(kind: Kind) {
    let w = kind.spawn().await;
    let err = w
        .remote_eval_fetch::<()>(kind.code(
            r#"throw "it went wrong""#,
            "raise RuntimeError('it went wrong')",
        ))
        .await
        .unwrap_err();
    let Error::Remote(e) = &err else {
        panic!("expected a remote exception, got {err:?}")
    };
    assert!(e.message.contains("it went wrong"), "{}", e.message);
    assert_eq!(e.worker, w.name());
    // Display reads like Malt's.
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("Remote exception from {}:", w.name())),
        "{shown}"
    );
    assert!(shown.contains("it went wrong"), "{shown}");
    w.stop().await.unwrap();
}

async fn script_errors_carry_the_guest_message(kind: Kind) {
    let w = kind.spawn().await;
    let cases = [
        ("undefined_variable + 1", "undefined_variable"),
        (kind.code("let x = ;", "x = "), "Syntax"),
        ("1 / 0", "Division by zero"),
        (r#"no_such_fn(1)"#, "no_such_fn"),
    ];
    for (code, expected) in cases {
        let err = w.remote_eval_fetch::<i64>(code).await.unwrap_err();
        let remote = err.as_remote().unwrap_or_else(|| panic!("{code}: {err:?}"));
        assert!(
            remote
                .message
                .to_lowercase()
                .contains(&expected.to_lowercase()),
            "{code}: {}",
            remote.message
        );
    }
    let err = w
        .remote_call_fetch::<i64>("no_such_fn", (1,))
        .await
        .unwrap_err();
    assert!(
        err.as_remote().unwrap().message.contains("no_such_fn"),
        "{err}"
    );
    w.stop().await.unwrap();
}

async fn async_handles_fail_with_the_remote_exception(kind: Kind) {
    let w = kind.spawn().await;
    let handle = w.remote_eval::<i64>(kind.code(r#"throw "later""#, "raise ValueError('later')"));
    let ok = w.remote_eval::<i64>("5");
    // Unlike Malt (TaskFailedException wrapping), the handle yields the
    // RemoteException itself.
    let err = handle.await.unwrap_err();
    assert!(err.as_remote().unwrap().message.contains("later"));
    assert_eq!(ok.await.unwrap(), 5);
    w.stop().await.unwrap();
}

async fn worker_is_responsive_after_an_error(kind: Kind) {
    let w = kind.spawn().await;
    w.remote_eval_wait(kind.code("let kept = 3;", "kept = 3"))
        .await
        .unwrap();
    for _ in 0..3 {
        let throw = kind.code(r#"throw "x""#, "raise KeyError('x')");
        assert!(w.remote_eval_fetch::<i64>(throw).await.is_err());
    }
    assert_eq!(w.remote_eval_fetch::<i64>("kept").await.unwrap(), 3);
    assert!(w.is_running());
    w.stop().await.unwrap();
}

async fn a_value_that_does_not_decode_is_a_decode_error(kind: Kind) {
    let w = kind.spawn().await;
    let err = w
        .remote_eval_fetch::<i64>(r#""not a number""#)
        .await
        .unwrap_err();
    let Error::Decode {
        type_name, worker, ..
    } = &err
    else {
        panic!("expected a decode error, got {err:?}")
    };
    assert_eq!(*type_name, "i64");
    assert_eq!(worker, w.name());
    let err = w
        .remote_eval_fetch::<Vec<String>>("[1, 2]")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    // The worker is unaffected.
    assert_eq!(w.remote_eval_fetch::<i64>("2").await.unwrap(), 2);
    w.stop().await.unwrap();
}

async fn values_that_cannot_be_sent_fail_cleanly(kind: Kind) {
    let w = kind.spawn().await;
    // A closure has no MessagePack form.
    let closure = kind.code("|x| x + 1", "lambda x: x + 1");
    let err = w.remote_eval_fetch::<i64>(closure).await.unwrap_err();
    let message = &err.as_remote().expect("a remote error").message;
    assert!(message.contains("cannot send"), "{message}");
    // A map with a non-string key cannot be a Rhai value (Python takes
    // it: its `len` is 1).
    let mut map = std::collections::HashMap::new();
    map.insert(1u32, 2u32);
    let len = w.remote_call_fetch::<i64>("len", (map,)).await;
    match kind {
        Kind::Python => assert_eq!(len.unwrap(), 1),
        _ => assert!(len.unwrap_err().as_remote().is_some()),
    }
    assert_eq!(w.remote_eval_fetch::<i64>("1").await.unwrap(), 1);
    w.stop().await.unwrap();
}

async fn a_deeply_nested_value_is_refused_not_a_crash(kind: Kind) {
    // Found by fuzzing the value decoder: without a nesting limit, a value
    // nested thousands deep overflows a stack when encoded or decoded
    // (the manager's own decoder is tested in protocol::tests).
    let w = kind.spawn().await;
    // The script guest refuses to send such a value...
    let code = kind.code(
        "let a = []; for i in 0..2000 { a = [a]; } a",
        "a = []\nfor i in range(2000):\n    a = [a]\na",
    );
    let err = w.remote_eval_fetch::<rmpv::Value>(code).await.unwrap_err();
    let message = &err.as_remote().expect("refused by the guest").message;
    assert!(message.contains("nested more than"), "{message}");
    // Shallow nesting is fine.
    let v: serde_json::Value = w.remote_eval_fetch("[[[[1]]]]").await.unwrap();
    assert_eq!(v.to_string(), "[[[[1]]]]");
    assert!(w.is_running());
    w.stop().await.unwrap();
}
