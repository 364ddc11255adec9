//! `malt-preinit IN OUT`: runs the script guest component IN once, to
//! the point where its first `eval` has made its script engine, and
//! writes a component OUT whose memory starts there (Wizer's snapshot).
//! Every worker of the script guest then skips making the engine (about
//! a millisecond of its first eval).
//!
//! The initialization is an `eval` of `0`: it defines nothing and prints
//! nothing, and a session that ran it is indistinguishable from a new
//! one. It runs with an empty WASI context (no environment, no files, no
//! clock or randomness the engine keeps) and with every malt import
//! trapping: a guest that reached for the host while it initializes
//! fails the build instead of baking the answer in.

use wasmtime::component::{Component, Instance, Lift, Linker, WasmList};
use wasmtime::error::Context as _;
use wasmtime::{Config, Engine, Result, Store, bail};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

/// The call that initializes the guest (a WAVE function call).
const INIT: &str = r#"eval("0")"#;

struct Ctx {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Ctx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: malt-preinit IN.wasm OUT.wasm");
    };
    let wasm = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let mut wizer = Wizer::new();
    wizer.init_func(INIT);
    let (cx, instrumented) = wizer.instrument_component(&wasm)?;

    let mut config = Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config)?;
    let component = Component::new(&engine, &instrumented).context("compiling the guest")?;
    let mut linker = Linker::<Ctx>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    linker.define_unknown_imports_as_traps(&component)?;
    let mut store = Store::new(
        &engine,
        Ctx {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    let instance = linker.instantiate_async(&mut store, &component).await?;
    let eval = instance
        .get_typed_func::<(String,), (Result<Vec<u8>, String>,)>(&mut store, "eval")
        .context("the guest exports no `eval`")?;
    let (result,) = eval
        .call_async(&mut store, ("0".to_string(),))
        .await
        .context("the initializing eval trapped")?;
    if let Err(e) = result {
        bail!("the initializing eval failed: {e}");
    }
    let snapshot = wizer
        .snapshot_component(
            &cx,
            &mut Access {
                store: &mut store,
                instance,
            },
        )
        .await?;
    std::fs::write(output, snapshot).with_context(|| format!("writing {output}"))?;
    Ok(())
}

/// Wizer reads the instance's state through accessors it exported.
struct Access<'a> {
    store: &'a mut Store<Ctx>,
    instance: Instance,
}

impl Access<'_> {
    async fn call<R: Lift + 'static, R2>(
        &mut self,
        interface: &str,
        func: &str,
        then: impl FnOnce(&mut Store<Ctx>, R) -> R2,
    ) -> R2 {
        let (_, iface) = self
            .instance
            .get_export(&mut *self.store, None, interface)
            .expect("wizer's accessor interface");
        let (_, index) = self
            .instance
            .get_export(&mut *self.store, Some(&iface), func)
            .expect("wizer's accessor");
        let f = self
            .instance
            .get_typed_func::<(), (R,)>(&mut *self.store, index)
            .expect("wizer's accessor type");
        let (ret,) = f
            .call_async(&mut *self.store, ())
            .await
            .expect("accessor call");
        then(&mut *self.store, ret)
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(
        &mut self,
        instance: &str,
        func: &str,
        contents: impl FnOnce(&[u8]) + Send,
    ) {
        self.call(instance, func, |store, list: WasmList<u8>| {
            contents(list.as_le_slice(&store))
        })
        .await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, r| r).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, r: f32| r.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, r: f64| r.to_bits()).await
    }
}
