//! A wasm component as a guest, run by wasmtime on the host's guest thread.
//!
//! The guest thread owns the `Store` and uses wasmtime's sync API. The
//! other threads never touch the store: a kill sets a flag and bumps the
//! engine's epoch, which traps the running wasm code within microseconds.
//! Any trap poisons the whole store, so after one the guest gets a fresh
//! store and instance (from the pre-instantiated component: ~50 µs).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::{GuestContext, GuestError, Shared, StartFailed, Work};
use malt_protocol::FatalKind;
use malt_protocol::{GuestSpec, HostConfig, Stream};

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "worker",
    });
}

use bindings::Worker as Bindings;
use bindings::WorkerPre as BindingsPre;

/// The engine configuration shared by the compiler (manager side) and
/// every host: an artifact only loads into an engine configured alike.
///
/// Fuel metering changes the generated code, so a worker with a fuel
/// limit runs an artifact compiled for it.
pub fn engine_config(fuel: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.consume_fuel(fuel);
    config
}

/// Per-store state.
pub(crate) struct State {
    /// The host services: the one implementation every backend uses.
    services: GuestContext,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The WIT imports, adapted to the host services.
impl bindings::malt::worker::host::Host for State {
    fn interrupted(&mut self) -> bool {
        self.services.interrupted()
    }

    fn sleep(&mut self, ms: u64) -> bool {
        self.services.sleep(Duration::from_millis(ms))
    }

    fn channel_put(&mut self, name: String, value: Vec<u8>) -> Result<(), String> {
        self.services.channel_put(&name, value)
    }

    fn channel_take(&mut self, name: String) -> Result<Vec<u8>, String> {
        self.services.channel_take(&name)
    }

    fn channel_is_ready(&mut self, name: String) -> bool {
        self.services.channel_is_ready(&name)
    }
}

/// Enforces the memory cap and remembers whether the guest hit it, so a
/// trap that follows can be reported as the limit it is.
struct Limiter {
    memory_limit: usize,
    memory_hit: bool,
}

/// Most elements in one wasm table.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Guest output, forwarded as output frames.
#[derive(Clone)]
struct FrameOutput {
    shared: Arc<Shared>,
    stream: Stream,
}

impl IsTerminal for FrameOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for FrameOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for FrameOutput {
    async fn ready(&mut self) {}
}

/// Largest write the guest is offered at once.
const OUTPUT_PERMIT: usize = 64 << 10;

impl OutputStream for FrameOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.shared.output(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_PERMIT)
    }
}

impl tokio::io::AsyncWrite for FrameOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.shared.output(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

pub(crate) struct WasmGuest {
    engine: Engine,
    pre: BindingsPre<State>,
    config: Arc<HostConfig>,
    shared: Arc<Shared>,
    store: Store<State>,
    bindings: Bindings,
}

impl WasmGuest {
    /// Loads the precompiled component and instantiates it.
    pub(crate) fn load(config: &HostConfig, shared: Arc<Shared>) -> Result<Self, StartFailed> {
        let GuestSpec::Artifact { path } = &config.guest else {
            return Err("not a wasm guest".into());
        };
        let engine = Engine::new(&engine_config(config.fuel.is_some()))
            .map_err(|e| format!("cannot create the wasm engine: {e:#}"))?;
        // SAFETY: artifacts come from malt's private (0700) cache or a file
        // the manager's user chose; deserialize checks the header, the
        // wasmtime version and the engine configuration.
        let component = unsafe { Component::deserialize_file(&engine, path) }.map_err(|e| {
            StartFailed::new(
                FatalKind::ArtifactLoad,
                format!("cannot load the compiled component {path}: {e:#}"),
            )
        })?;
        Self::instantiate_component(config, shared, engine, component)
            .map_err(|e| format!("{e:#}").into())
    }

    fn instantiate_component(
        config: &HostConfig,
        shared: Arc<Shared>,
        engine: Engine,
        component: Component,
    ) -> wasmtime::Result<Self> {
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Bindings::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            e.context("the component's imports cannot be satisfied (does it target the malt:worker world?)")
        })?;
        let pre = BindingsPre::new(pre)
            .map_err(|e| e.context("the component does not implement the malt:worker world"))?;
        let config = Arc::new(config.clone());
        let (store, bindings) = instantiate(&engine, &pre, &config, &shared)?;
        Ok(WasmGuest {
            engine,
            pre,
            config,
            shared,
            store,
            bindings,
        })
    }

    /// What the timer thread calls to kill the running request: the
    /// epoch bump traps the wasm code (the kill flag set before makes the
    /// epoch callback refuse to extend the deadline).
    pub fn killer(&self) -> super::Killer {
        let engine = self.engine.clone();
        Box::new(move |_, _| engine.increment_epoch())
    }

    fn reset(&mut self) -> wasmtime::Result<()> {
        let (store, bindings) = instantiate(&self.engine, &self.pre, &self.config, &self.shared)?;
        self.store = store;
        self.bindings = bindings;
        Ok(())
    }
}

/// The WASI context every guest gets: nothing but what was granted. No
/// stdin, no network, no arguments; only the granted environment
/// variables and directories.
pub fn sandbox(config: &HostConfig) -> wasmtime::Result<WasiCtxBuilder> {
    let mut wasi = WasiCtxBuilder::new();
    wasi.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for (k, v) in &config.env {
        wasi.env(k, v);
    }
    for dir in &config.dirs {
        let perms = if dir.read_only {
            wasmtime_wasi::FsPerms::ReadOnly
        } else {
            wasmtime_wasi::FsPerms::ReadWrite
        };
        wasi.preopened_dir(&dir.host, &dir.guest, perms)
            .map_err(|e| e.context(format!("cannot open the granted directory {}", dir.host)))?;
    }
    Ok(wasi)
}

fn instantiate(
    engine: &Engine,
    pre: &BindingsPre<State>,
    config: &HostConfig,
    shared: &Arc<Shared>,
) -> wasmtime::Result<(Store<State>, Bindings)> {
    let mut wasi = sandbox(config)?;
    wasi.stdout(FrameOutput {
        shared: shared.clone(),
        stream: Stream::Stdout,
    })
    .stderr(FrameOutput {
        shared: shared.clone(),
        stream: Stream::Stderr,
    });
    let state = State {
        services: GuestContext::new(shared.clone()),
        wasi: wasi.build(),
        table: ResourceTable::new(),
        limiter: Limiter {
            memory_limit: usize::try_from(config.memory_limit).unwrap_or(usize::MAX),
            memory_hit: false,
        },
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    let control = shared.clone();
    // The epoch only moves when the timer kills a request; the flag makes
    // sure a late bump can never hit the request that follows.
    store.epoch_deadline_callback(move |_| {
        if control.control.killed() {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Continue(1))
        }
    });
    store.set_epoch_deadline(1);
    if let Some(fuel) = config.fuel {
        // Instantiation runs guest code too.
        store.set_fuel(fuel)?;
    }
    let bindings = pre.instantiate(&mut store)?;
    Ok((store, bindings))
}

impl super::Guest for WasmGuest {
    fn run(&mut self, work: &Work) -> Result<Vec<u8>, GuestError> {
        self.store.data_mut().limiter.memory_hit = false;
        self.store.set_epoch_deadline(1);
        if let Some(fuel) = self.config.fuel {
            self.store
                .set_fuel(fuel)
                .expect("fuel is enabled in the engine of a worker with a fuel limit");
        }
        let result = match work {
            Work::Call { name, args } => self.bindings.call_call(&mut self.store, name, args),
            Work::Eval { code } => self.bindings.call_eval(&mut self.store, code),
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(GuestError::Error(message)),
            Err(trap) => {
                let memory_limit_hit = self.store.data().limiter.memory_hit;
                let out_of_fuel =
                    trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel);
                let message = describe_trap(&trap);
                if let Err(e) = self.reset() {
                    // A store that instantiated once instantiates again;
                    // if not, nothing can be served any more.
                    eprintln!("malt host: cannot reset the guest after a trap: {e:#}");
                    std::process::exit(1);
                }
                Err(GuestError::Trap {
                    message,
                    memory_limit_hit,
                    out_of_fuel,
                })
            }
        }
    }
}

fn describe_trap(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}
