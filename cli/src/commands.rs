//! The commands that run guests: eval, call, run, inspect, compile.

use super::*;

pub(crate) fn read_code(code: &[String], file: Option<&Path>) -> anyhow::Result<String> {
    match (file, code) {
        (Some(f), []) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
        }
        (None, [dash]) if dash == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            Ok(s)
        }
        (None, []) => Err(usage("nothing to evaluate: give CODE, `-` or --file")),
        (None, words) => Ok(words.join(" ")),
        (Some(_), _) => Err(usage("give either CODE or --file, not both")),
    }
}

pub(crate) fn builder_for(guest: Option<&Path>, native: bool) -> WorkerBuilder {
    let script = guest.is_none_or(|g| g == Path::new("script"));
    match (guest, native) {
        (_, true) if script => Worker::native(),
        (Some(g), true) => Worker::native_program(g),
        (Some(g), false) if !script => Worker::wasm(g),
        _ => Worker::script(),
    }
}

/// Prints a value: JSON, or `{"value": ...}` with --json.
pub(crate) fn print_value(json: bool, value: &rmpv::Value) {
    let value = values::to_json(value);
    if json {
        println!("{}", serde_json::json!({ "value": value }));
    } else {
        println!("{value}");
    }
}

/// Shows a spinner on stderr while `work` runs, if it takes more than a
/// moment and stderr is a terminal.
pub(crate) fn with_spinner<T>(label: &str, work: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let done = Arc::new(AtomicBool::new(false));
    let spinner = {
        let (done, label) = (done.clone(), label.to_string());
        std::thread::spawn(move || {
            let start = Instant::now();
            let frames = ['|', '/', '-', '\\'];
            let mut shown = false;
            let mut i = 0;
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                if start.elapsed() > Duration::from_millis(300) {
                    eprint!(
                        "\r{} {label} ({:.1}s)",
                        frames[i % 4],
                        start.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                    shown = true;
                    i += 1;
                }
            }
            if shown {
                eprint!("\r\x1b[K");
            }
        })
    };
    let result = work();
    done.store(true, Ordering::Release);
    let _ = spinner.join();
    result
}

pub(crate) async fn eval(json: bool, code: &str, builder: WorkerBuilder) -> anyhow::Result<()> {
    let worker = builder.spawn().await?;
    let result = worker.remote_eval_fetch::<rmpv::Value>(code).await;
    end_one_shot(&worker);
    print_value(json, &result?);
    Ok(())
}

/// Ends a one-shot's worker. Not waited for: its process is killed, and
/// gone with this one at the latest; waiting would add the millisecond
/// it takes the kernel to unmap its memory.
fn end_one_shot(worker: &malt::Worker) {
    worker.kill();
}

/// `malt call`; `module` is a Python file (name, source) to run in the
/// session first.
pub(crate) async fn call(
    json: bool,
    builder: WorkerBuilder,
    module: Option<(String, String)>,
    function: &str,
    args: &[String],
) -> anyhow::Result<()> {
    let args = args
        .iter()
        .map(|a| {
            serde_json::from_str::<serde_json::Value>(a)
                .map_err(|e| usage(format!("argument `{a}` is not a JSON value: {e}")))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let worker = builder.spawn().await?;
    if let Some((name, source)) = module
        && let Err(e) = worker
            .remote_call_wait("__malt_load__", (name, source))
            .await
    {
        let _ = worker.stop().await;
        return Err(e.into());
    }
    let result = worker
        .remote_call_fetch::<rmpv::Value>(function, args)
        .await;
    end_one_shot(&worker);
    print_value(json, &result?);
    Ok(())
}

pub(crate) fn inspect(json: bool, guest: &Path) -> anyhow::Result<()> {
    let info = with_spinner("compiling", || malt::tools::inspect(guest))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("{}", info.path.display());
    println!("  size:          {} bytes", info.size);
    println!("  sha256:        {}", info.sha256);
    println!(
        "  format:        {}",
        if info.core_module {
            "core module (WASI preview 1)"
        } else {
            "component"
        }
    );
    println!("  malt guest:    {}", yes(info.is_worker));
    println!("  WASI command:  {}", yes(info.is_command));
    println!(
        "  cache:         {} {}",
        if info.was_cached {
            "cached"
        } else {
            "compiled now"
        },
        info.artifact.display()
    );
    for (title, items) in [("imports", &info.imports), ("exports", &info.exports)] {
        println!("  {title}:");
        for item in items {
            if item.members.is_empty() {
                println!("    {} ({})", item.name, item.kind);
            } else {
                println!(
                    "    {} ({}): {}",
                    item.name,
                    item.kind,
                    item.members.join(", ")
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn compile(
    json: bool,
    guest: &Path,
    output: Option<&Path>,
    fuel: bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let malt::tools::Compiled {
        artifact: path,
        was_cached,
    } = with_spinner(&format!("compiling {}", guest.display()), || {
        malt::tools::compile(guest, output, fuel)
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "artifact": path,
                "was_cached": was_cached,
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    } else if was_cached {
        println!("already cached: {}", path.display());
    } else {
        println!(
            "compiled in {:.2}s: {}",
            start.elapsed().as_secs_f64(),
            path.display()
        );
    }
    Ok(())
}

pub(crate) fn run_command(
    guest: &Path,
    args: Vec<String>,
    stdin: bool,
    sandbox: &Sandbox,
) -> anyhow::Result<i32> {
    sandbox.check()?;
    let options = malt::tools::RunOptions {
        args,
        env: sandbox.env.clone(),
        dirs: sandbox.dirs.clone(),
        memory_limit: sandbox.memory,
        timeout: sandbox.timeout,
        fuel: sandbox.fuel,
        inherit_stdin: stdin,
        harden: true,
        require_hardening: sandbox.strict,
    };
    Ok(malt::tools::run(guest, &options)?)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // `main` restores SIGPIPE's default (to end quietly when our own
        // reader goes away); the runtime's threads write to workers, and a
        // worker that died must be an error there, not our death.
        .on_thread_start(block_sigpipe)
        .build()
        .context("cannot start the async runtime")
}

/// Makes a write to a closed pipe fail with `EPIPE` on this thread (and
/// the threads it starts) instead of raising SIGPIPE.
pub(crate) fn block_sigpipe() {
    // SAFETY: sigemptyset/sigaddset on a local set, then pthread_sigmask
    // on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
