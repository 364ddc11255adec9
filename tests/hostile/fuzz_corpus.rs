//! Replays the fuzz corpus (`fuzz/corpus`) through the decoders on every
//! run, on stable Rust: what a long `cargo fuzz` run found interesting
//! stays covered. Set MALT_WRITE_SEEDS=1 to (re)write the seed inputs.

use std::path::PathBuf;

use malt::protocol::{self, DirGrant, FromHost, GuestSpec, HostConfig, ReplyMode, ToHost};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Valid frames of every kind, the starting points for mutation.
fn seed_frames() -> Vec<Vec<u8>> {
    let config = HostConfig {
        version: protocol::PROTOCOL_VERSION,
        malt_version: protocol::MALT_VERSION.into(),
        name: "worker 1".into(),
        guest: GuestSpec::Artifact {
            path: "/tmp/x.cwasm".into(),
            identity: Some(protocol::ArtifactIdentity {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            }),
        },
        memory_limit: 1 << 20,
        interrupt_grace: std::time::Duration::from_millis(100),
        call_timeout: Some(std::time::Duration::from_secs(1)),
        start_timeout: std::time::Duration::from_secs(5),
        max_frame: 1 << 20,
        fuel: Some(1000),
        output_limit: 1 << 20,
        env: vec![("K".into(), "V".into())],
        dirs: vec![DirGrant {
            host: "/tmp".into(),
            guest: "/t".into(),
            read_only: true,
        }],
        heartbeat: Some(std::time::Duration::from_secs(2)),
        warm_up: None,
        rollback: false,
    };
    let to_host = [
        ToHost::Init(Box::new(config)),
        ToHost::Call {
            id: 1,
            name: "add".into(),
            args: vec![0x92, 1, 2],
            reply: ReplyMode::Value,
        },
        ToHost::Eval {
            id: 2,
            code: "1 + 1".into(),
            reply: ReplyMode::Ack,
        },
        ToHost::Interrupt { up_to: 3 },
        ToHost::ChannelOpen {
            id: 3,
            name: "c".into(),
            capacity: 4,
        },
        ToHost::ChannelPut {
            id: 4,
            name: "c".into(),
            value: vec![0x2a],
        },
        ToHost::ChannelTake {
            id: 5,
            name: "c".into(),
        },
        ToHost::ChannelIsReady {
            id: 6,
            name: "c".into(),
        },
        ToHost::Stop,
        ToHost::Ping,
        ToHost::Component(vec![0, 0x61, 0x73, 0x6d]),
    ];
    let from_host = [
        FromHost::Hello {
            version: protocol::PROTOCOL_VERSION,
            malt_version: protocol::MALT_VERSION.into(),
            kind: malt::protocol::GuestKind::Wasm,
            pid: 42,
            hardening: None,
        },
        FromHost::Reply {
            id: 1,
            result: Ok(Some(serde_bytes::ByteBuf::from(vec![3]))),
        },
        FromHost::Reply {
            id: 2,
            result: Err(protocol::Failure::Remote("boom".into())),
        },
        FromHost::Restart,
        FromHost::Pong,
        FromHost::NeedComponent {
            sha256: "ab".repeat(32),
        },
        FromHost::Output {
            stream: protocol::Stream::Stdout,
            data: b"hi\n".to_vec(),
        },
        FromHost::Fatal {
            kind: protocol::FatalKind::GuestStart,
            message: "bad".into(),
        },
    ];
    to_host
        .iter()
        .map(protocol::encode)
        .chain(from_host.iter().map(protocol::encode))
        .collect()
}

fn seed_values() -> Vec<Vec<u8>> {
    vec![
        rmp_serde::to_vec(&42i64).unwrap(),
        rmp_serde::to_vec(&"text").unwrap(),
        rmp_serde::to_vec(&(1, 2.5, "three", [4u8, 5])).unwrap(),
        rmp_serde::to_vec(&serde_bytes::ByteBuf::from(vec![1, 2, 3])).unwrap(),
        rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("a", vec![1, 2])])).unwrap(),
        vec![0xc1],
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
    ]
}

fn replay(target: &str, seeds: Vec<Vec<u8>>, run: fn(&[u8])) {
    let dir = corpus(target);
    if std::env::var_os("MALT_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
        }
    }
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        run(&bytes);
        // Truncations of every input too: frames cut anywhere.
        for cut in [bytes.len() / 2, bytes.len().saturating_sub(1)] {
            run(&bytes[..cut]);
        }
        count += 1;
    }
    assert!(
        count >= seeds.len(),
        "the {target} corpus has {count} inputs"
    );
    for seed in seeds {
        run(&seed);
    }
}

#[test]
fn frame_decoder_corpus() {
    // Every seed frame must decode as what it is.
    for frame in seed_frames() {
        let body = protocol::read_frame(&mut &frame[..], 1 << 20).unwrap();
        assert!(
            protocol::decode::<ToHost>(&body).is_ok()
                || protocol::decode::<FromHost>(&body).is_ok()
        );
    }
    replay("frame_decoder", seed_frames(), malt::__fuzz::frames);
}

#[test]
fn value_decoder_corpus() {
    replay("value_decoder", seed_values(), malt::__fuzz::values);
}
