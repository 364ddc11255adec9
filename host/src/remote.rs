//! What a host on another machine needs: the component by content (looked
//! up in that machine's artifact cache, fetched from the manager only when
//! missing) and a watch on the link (a manager silent for too long is
//! gone: the host exits rather than outlive it).

use std::io::Read;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::*;
use malt_protocol::{ArtifactIdentity, DirGrant, GuestSpec};

/// What a component store is asked: the component a manager named by
/// hash, and how to get its bytes if the store lacks it.
#[doc(hidden)]
pub struct ComponentRequest<'a> {
    /// SHA-256 of the component, lowercase hex (not yet checked: the
    /// store checks the bytes it fetches against it).
    pub sha256: &'a str,
    /// Its size as the manager announced it.
    pub size: u64,
    /// Whether the artifact must meter fuel.
    pub fuel: bool,
    /// The guest's directory grants (a store refuses one that reaches
    /// its cache).
    pub dirs: &'a [DirGrant],
    /// Asks the manager for the bytes (once).
    pub fetch: &'a mut dyn FnMut() -> Result<Vec<u8>, String>,
}

/// Finds or makes the sealed artifact of a component: its path and the
/// identity of the checked file. `malt-rt` registers its artifact cache.
#[doc(hidden)]
pub type ComponentStore = fn(ComponentRequest<'_>) -> Result<(String, ArtifactIdentity), String>;

static STORE: OnceLock<ComponentStore> = OnceLock::new();

/// Registers the store a host uses for [`GuestSpec::Component`]; the first
/// registration wins.
#[doc(hidden)]
pub fn set_component_store(store: ComponentStore) {
    let _ = STORE.set(store);
}

/// Turns a component named by hash into an artifact this host can load,
/// fetching the bytes from the manager over the stream if need be.
pub(crate) fn resolve_component(
    config: &HostConfig,
    input: &mut impl Read,
    output: &mut impl Write,
) -> Result<GuestSpec, String> {
    let GuestSpec::Component { sha256, size } = &config.guest else {
        return Ok(config.guest.clone());
    };
    let store = STORE.get().ok_or(
        "this host program has no artifact cache to compile a component with (use a \
         program that links malt-rt, such as the malt CLI)",
    )?;
    let mut fetch = || -> Result<Vec<u8>, String> {
        if *size > config.max_frame as u64 {
            return Err(format!(
                "the component ({size} bytes) is over the frame cap ({} bytes)",
                config.max_frame
            ));
        }
        let ask = protocol::encode(&FromHost::NeedComponent {
            sha256: sha256.clone(),
        });
        output
            .write_all(&ask)
            .and_then(|()| output.flush())
            .map_err(|e| format!("asking for the component: {e}"))?;
        let body = protocol::read_frame(input, config.max_frame)
            .map_err(|e| format!("receiving the component: {e}"))?;
        match protocol::decode::<ToHost>(&body) {
            Ok(ToHost::Component(bytes)) if bytes.len() as u64 == *size => Ok(bytes),
            Ok(ToHost::Component(bytes)) => Err(format!(
                "the component sent is {} bytes, {size} were announced",
                bytes.len()
            )),
            Ok(other) => Err(format!("expected the component, got {other:?}")),
            Err(e) => Err(format!("receiving the component: {e}")),
        }
    };
    let (path, identity) = store(ComponentRequest {
        sha256,
        size: *size,
        fuel: config.fuel.is_some(),
        dirs: &config.dirs,
        fetch: &mut fetch,
    })?;
    Ok(GuestSpec::Artifact {
        path,
        identity: Some(identity),
    })
}

/// A reader that notes when it last got bytes: the heartbeat watchdog's
/// evidence that the manager is alive (a large frame still arriving
/// counts). It notes nothing until the watchdog starts: a host without
/// heartbeats pays nothing per read.
pub(crate) struct Heard<R> {
    inner: R,
    link: std::sync::Arc<Link>,
}

/// What a [`Heard`] reader and its [`Watch`] share.
struct Link {
    epoch: Instant,
    /// Milliseconds since `epoch` when bytes last arrived.
    last: AtomicU64,
    watched: std::sync::atomic::AtomicBool,
}

impl Link {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl<R> Heard<R> {
    pub fn new(inner: R) -> (Self, Watch) {
        let link = std::sync::Arc::new(Link {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            watched: std::sync::atomic::AtomicBool::new(false),
        });
        (
            Heard {
                inner,
                link: link.clone(),
            },
            Watch { link },
        )
    }
}

impl<R: Read> Read for Heard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 && self.link.watched.load(Ordering::Relaxed) {
            self.link.last.store(self.link.now(), Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// The other end of [`Heard`]: how long the manager has been silent.
pub(crate) struct Watch {
    link: std::sync::Arc<Link>,
}

impl Watch {
    fn silence(&self) -> Duration {
        let now = self.link.now();
        Duration::from_millis(now.saturating_sub(self.link.last.load(Ordering::Relaxed)))
    }

    /// Starts noting reads, silent since now.
    fn start(&self) {
        self.link.last.store(self.link.now(), Ordering::Relaxed);
        self.link.watched.store(true, Ordering::Relaxed);
    }

    /// Watches the link on a thread of its own: a host process whose
    /// manager has been silent for [`protocol::HEARTBEAT_MISSES`]
    /// heartbeat intervals exits (the link is dead, or the manager is).
    pub fn spawn(self, interval: Duration) {
        self.start();
        let limit = interval * protocol::HEARTBEAT_MISSES;
        let _ = std::thread::Builder::new()
            .name("malt-heartbeat".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let silence = self.silence();
                    if silence >= limit {
                        eprintln!(
                            "malt host: no word from the manager for {:.1} s (heartbeat every \
                             {interval:?}): the link is dead, exiting",
                            silence.as_secs_f64()
                        );
                        // Not `Shared::exit`: a guest thread blocked
                        // writing to the dead link holds the stream's lock.
                        std::process::exit(exit::LINK_LOST);
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_notes_each_read_with_bytes() {
        let (mut reader, watch) = Heard::new(&b"abc"[..]);
        watch.start();
        std::thread::sleep(Duration::from_millis(30));
        assert!(watch.silence() >= Duration::from_millis(30));
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        assert!(watch.silence() < Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(30));
        // End of stream is no sign of life.
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        assert!(watch.silence() >= Duration::from_millis(30));
    }

    fn config(guest: GuestSpec) -> HostConfig {
        HostConfig {
            version: PROTOCOL_VERSION,
            malt_version: protocol::MALT_VERSION.into(),
            name: "test".into(),
            guest,
            memory_limit: 1 << 20,
            interrupt_grace: Duration::from_millis(100),
            call_timeout: None,
            start_timeout: Duration::from_secs(1),
            max_frame: 1 << 20,
            fuel: None,
            output_limit: 1 << 20,
            env: Vec::new(),
            dirs: Vec::new(),
            heartbeat: None,
            warm_up: None,
            rollback: false,
        }
    }

    // One test: the store is registered once per process.
    #[test]
    fn a_component_by_hash_is_fetched_through_the_store() {
        let config = config(GuestSpec::Component {
            sha256: "ab".repeat(32),
            size: 3,
        });
        let err = resolve_component(&config, &mut &b""[..], &mut Vec::new()).unwrap_err();
        assert!(err.contains("no artifact cache"), "{err}");

        set_component_store(|request| {
            let bytes = (request.fetch)()?;
            assert_eq!(bytes, b"xyz");
            Ok((format!("/cache/{}", request.sha256), identity()))
        });
        fn identity() -> ArtifactIdentity {
            ArtifactIdentity {
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
            }
        }
        let sent = protocol::encode(&ToHost::Component(b"xyz".to_vec()));
        let mut asked = Vec::new();
        let spec = resolve_component(&config, &mut &sent[..], &mut asked).unwrap();
        assert_eq!(
            spec,
            GuestSpec::Artifact {
                path: format!("/cache/{}", "ab".repeat(32)),
                identity: Some(identity()),
            }
        );
        let body = protocol::read_frame(&mut &asked[..], 1 << 20).unwrap();
        assert_eq!(
            protocol::decode::<FromHost>(&body).unwrap(),
            FromHost::NeedComponent {
                sha256: "ab".repeat(32)
            }
        );

        // Bytes of another size than announced are refused.
        let short = protocol::encode(&ToHost::Component(b"xy".to_vec()));
        let err = resolve_component(&config, &mut &short[..], &mut Vec::new()).unwrap_err();
        assert!(err.contains("2 bytes, 3 were announced"), "{err}");
    }
}
