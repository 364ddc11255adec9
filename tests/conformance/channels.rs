//! Worker channels (Malt's `worker_channel`, `basic.jl`).

use std::time::Duration;

use crate::common::{Kind, finishes};
use crate::{conformance_both, conformance_ssh};

conformance_both!(
    put_take_and_is_ready,
    twice_capacity_through_a_channel,
    guest_and_manager_share_a_queue,
    channels_work_while_the_guest_is_busy,
    two_handles_on_one_queue,
    handle_moves_into_another_task,
    capacity_zero_is_invalid,
    pending_take_fails_when_the_worker_dies,
);

conformance_ssh!(
    put_take_and_is_ready,
    guest_and_manager_share_a_queue,
    channels_work_while_the_guest_is_busy,
    pending_take_fails_when_the_worker_dies,
);

async fn put_take_and_is_ready(kind: Kind) {
    let w = kind.spawn().await;
    let ch = w.worker_channel::<i64>("c", 20).await.unwrap();
    for _ in 0..10 {
        assert!(!ch.is_ready().await.unwrap());
        ch.put(1).await.unwrap();
        assert!(ch.is_ready().await.unwrap());
        assert_eq!(ch.take().await.unwrap(), 1);
        assert!(!ch.is_ready().await.unwrap());
        ch.put(2).await.unwrap();
        ch.put(3).await.unwrap();
        assert_eq!(ch.take().await.unwrap(), 2);
        assert_eq!(ch.take().await.unwrap(), 3);
    }
    w.stop().await.unwrap();
}

async fn twice_capacity_through_a_channel(kind: Kind) {
    // Malt's test: 2 x capacity values through a channel, a taker running
    // concurrently with the putter, so puts must wait for room.
    let w = kind.spawn().await;
    let capacity = 20;
    let ch = w.worker_channel::<i64>("c", capacity).await.unwrap();
    let taker = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2 * capacity {
                got.push(ch.take().await.unwrap());
            }
            got
        })
    };
    for i in 0..2 * capacity as i64 {
        ch.put(i).await.unwrap();
    }
    let got = finishes("taker", taker).await.unwrap();
    assert_eq!(got, (0..2 * capacity as i64).collect::<Vec<_>>());
    w.stop().await.unwrap();
}

async fn guest_and_manager_share_a_queue(kind: Kind) {
    let w = kind.spawn().await;
    let ch = w.worker_channel::<String>("words", 4).await.unwrap();
    w.remote_eval_wait(r#"channel_put("words", "from guest")"#)
        .await
        .unwrap();
    assert_eq!(ch.take().await.unwrap(), "from guest");
    ch.put("from manager".into()).await.unwrap();
    let got: String = w
        .remote_eval_fetch(r#"channel_take("words")"#)
        .await
        .unwrap();
    assert_eq!(got, "from manager");
    assert!(
        !w.remote_eval_fetch::<bool>(r#"channel_is_ready("words")"#)
            .await
            .unwrap()
    );
    w.stop().await.unwrap();
}

async fn channels_work_while_the_guest_is_busy(kind: Kind) {
    // The guest takes requests from one channel and answers on another,
    // inside one long eval: the manager's channel operations are served
    // by the host while the guest runs.
    let w = kind.spawn().await;
    let requests = w.worker_channel::<i64>("requests", 2).await.unwrap();
    let replies = w.worker_channel::<i64>("replies", 2).await.unwrap();
    let server = w.remote_eval::<i64>(kind.code(
        r#"
        let served = 0;
        loop {
            let n = channel_take("requests");
            if n < 0 { break; }
            channel_put("replies", n * 10);
            served += 1;
        }
        served
        "#,
        "served = 0\nwhile True:\n    n = channel_take('requests')\n    if n < 0:\n        break\n    channel_put('replies', n * 10)\n    served += 1\nserved",
    ));
    for i in 1..=50 {
        requests.put(i).await.unwrap();
        assert_eq!(finishes("reply", replies.take()).await.unwrap(), i * 10);
    }
    requests.put(-1).await.unwrap();
    assert_eq!(finishes("server", server).await.unwrap(), 50);
    w.stop().await.unwrap();
}

async fn two_handles_on_one_queue(kind: Kind) {
    let w = kind.spawn().await;
    let a = w.worker_channel::<i64>("shared", 8).await.unwrap();
    let b = w.worker_channel::<i64>("shared", 8).await.unwrap();
    a.put(5).await.unwrap();
    assert!(b.is_ready().await.unwrap());
    assert_eq!(b.take().await.unwrap(), 5);
    w.stop().await.unwrap();
}

async fn handle_moves_into_another_task(kind: Kind) {
    let w = kind.spawn().await;
    let ch = w.worker_channel::<Vec<u8>>("bytes", 1).await.unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..5u8 {
            ch.put(vec![i; 3]).await.unwrap();
        }
    });
    let mut total = 0i64;
    for _ in 0..5 {
        total += w
            .remote_eval_fetch::<i64>(kind.code(
                r#"let b = channel_take("bytes"); b[0] + b[2]"#,
                "b = channel_take('bytes'); b[0] + b[2]",
            ))
            .await
            .unwrap();
    }
    finishes("sender", sender).await.unwrap();
    assert_eq!(total, 2 * (1 + 2 + 3 + 4));
    w.stop().await.unwrap();
}

async fn capacity_zero_is_invalid(kind: Kind) {
    let w = kind.spawn().await;
    let err = w.worker_channel::<i64>("z", 0).await.unwrap_err();
    assert!(matches!(err, malt::Error::Invalid { .. }), "{err:?}");
    w.stop().await.unwrap();
}

async fn pending_take_fails_when_the_worker_dies(kind: Kind) {
    let w = kind.spawn().await;
    let ch = w.worker_channel::<i64>("empty", 1).await.unwrap();
    let take = tokio::spawn(async move { ch.take().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.kill();
    let err = finishes("the pending take", take)
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.is_terminated(), "{err:?}");
}
