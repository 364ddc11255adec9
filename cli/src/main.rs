//! The `malt` command line, and the worker host every wasm worker runs.

mod repl;
mod values;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use malt::{DirGrant, Error, Worker, WorkerBuilder};

const EXIT_CODES: &str = "\
EXIT CODES:
  0  success
  1  the guest raised an error, trapped, or hit a limit
  2  usage error (bad flags, bad JSON arguments)
  3  the worker or component could not start or load
  4  interrupted or timed out
  5  the worker died, or another error
  malt run exits with the program's status when it ran: 0, or 1 for any
  failure (WASI 0.2 commands report only success or failure)";

/// Run code in sandboxed malt workers: WebAssembly components with
/// Malt's call/eval/interrupt model. Everything is denied unless granted:
/// no files, no environment, no network, no stdin.
#[derive(Parser)]
#[command(name = "malt", version = version(), about, long_about, after_help = EXIT_CODES)]
struct Cli {
    /// Print results and errors as JSON on stdout (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// malt's version and the wasmtime it runs guests with.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| format!("{} (wasmtime {})", malt::VERSION, malt::WASMTIME_VERSION))
}

/// Sandbox and limit flags shared by every command that runs a guest.
#[derive(Args, Clone, Default)]
struct Sandbox {
    /// Cap on the guest's memory, e.g. 64M, 1G (default 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Wall-clock limit per call, e.g. 500ms, 2s, 1m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Instruction budget per call (fuel metering).
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Grant a directory: HOST[::GUEST][:ro] (repeatable; read-write unless :ro).
    #[arg(long = "dir", value_name = "HOST[::GUEST][:ro]", value_parser = parse_dir)]
    dirs: Vec<DirGrant>,
    /// Environment variable for the guest, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Allow network access (not supported: malt workers have no network).
    #[arg(long)]
    allow_net: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate code in a fresh sandboxed worker and print its value.
    #[command(after_help = "EXAMPLES:
  malt eval 'let x = 20; x * 2 + 2'
  echo '[1, 2, 3].len()' | malt eval -
  malt eval --file script.rhai --timeout 2s --memory 64M
  malt --json eval 'throw \"boom\"'")]
    Eval {
        /// The code (words are joined with spaces); `-` reads stdin.
        code: Vec<String>,
        /// Read the code from a file.
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// A guest component (default: the built-in script guest).
        #[arg(long, short, conflicts_with = "native")]
        guest: Option<PathBuf>,
        /// Use a native worker (a process running the script guest
        /// natively: faster to start, no wasm sandbox).
        #[arg(long)]
        native: bool,
        #[command(flatten)]
        sandbox: Sandbox,
    },
    /// Call a guest function with JSON arguments and print its value as JSON.
    #[command(after_help = "EXAMPLES:
  malt call guest.wasm add 1 2
  malt call script abs -- -5
  malt call --native ./my-native-guest fib 50
  malt call guest.wasm greet '\"world\"' '{\"loud\": true}'")]
    Call {
        /// The guest component, or `script` for the built-in script guest;
        /// with --native, a native worker program (or `script`).
        guest: String,
        /// Run the guest in a native worker.
        #[arg(long)]
        native: bool,
        /// The function.
        function: String,
        /// Arguments, each one JSON value.
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        #[command(flatten)]
        sandbox: Sandbox,
    },
    /// Run a WASI command (a component, or a WASI preview 1 module) in the sandbox.
    #[command(after_help = "EXAMPLES:
  malt run hello.wasm
  malt run hello-wasip1.wasm     (a core module: wasm32-wasip1, TinyGo, Zig)
  malt run tool.wasm --dir ./data::/data:ro -- --input /data/x.txt")]
    Run {
        /// The command: a component, or a WASI preview 1 core module.
        guest: PathBuf,
        /// Arguments for the program (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
        /// Let the program read this process's stdin.
        #[arg(long)]
        stdin: bool,
        #[command(flatten)]
        sandbox: Sandbox,
    },
    /// An interactive session in one worker (Ctrl-C interrupts, Ctrl-D exits).
    #[command(after_help = "KEYS:
  Ctrl-C   interrupt the running evaluation (the session stays)
  Ctrl-D   stop the worker and exit
  A line with unclosed brackets, or ending in \\, continues on the next.")]
    Repl {
        /// A guest component (default: the built-in script guest).
        #[arg(conflicts_with = "native")]
        guest: Option<PathBuf>,
        /// Use a native worker (the script guest natively, no wasm sandbox).
        #[arg(long)]
        native: bool,
        #[command(flatten)]
        sandbox: Sandbox,
    },
    /// Show a component's imports and exports, and whether it is a malt guest.
    #[command(after_help = "EXAMPLES:
  malt inspect guest.wasm
  malt --json inspect guest.wasm")]
    Inspect {
        /// The component.
        guest: PathBuf,
    },
    /// Precompile a component into the artifact cache (or a file).
    #[command(after_help = "EXAMPLES:
  malt compile guest.wasm
  malt compile guest.wasm -o guest.cwasm")]
    Compile {
        /// The component.
        guest: PathBuf,
        /// Write the artifact here instead of the cache.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Compile for fuel metering (as `--fuel` needs).
        #[arg(long)]
        fuel: bool,
    },
}

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit `{unit}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64M, 1G, 1048576)"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("unknown unit `{unit}` (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_dir(s: &str) -> Result<DirGrant, String> {
    let (spec, read_only) = match s.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (host, guest) = match spec.split_once("::") {
        Some((h, g)) => (h, g),
        None => (spec, spec),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("`{s}`: expected HOST[::GUEST][:ro]"));
    }
    Ok(DirGrant {
        host: host.to_string(),
        guest: guest.to_string(),
        read_only,
    })
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}`: expected KEY=VALUE")),
    }
}

impl Sandbox {
    fn check(&self) -> anyhow::Result<()> {
        if self.allow_net {
            return Err(usage(
                "--allow-net: network access is not supported; malt workers have no network",
            ));
        }
        Ok(())
    }

    fn apply(&self, mut builder: WorkerBuilder, native: bool) -> anyhow::Result<WorkerBuilder> {
        self.check()?;
        if native {
            for (flag, given) in [
                ("--memory", self.memory.is_some()),
                ("--fuel", self.fuel.is_some()),
                ("--dir", !self.dirs.is_empty()),
            ] {
                if given {
                    return Err(usage(format!(
                        "{flag} is a wasm sandbox limit; a native worker has none (drop --native)"
                    )));
                }
            }
        }
        if let Some(bytes) = self.memory {
            builder = builder.memory_limit(bytes);
        }
        if let Some(t) = self.timeout {
            builder = builder.call_timeout(t);
        }
        if let Some(f) = self.fuel {
            builder = builder.fuel(f);
        }
        for (k, v) in &self.env {
            builder = builder.env(k, v);
        }
        for d in &self.dirs {
            builder = if d.read_only {
                builder.dir_read_only(&d.host, d.guest.clone())
            } else {
                builder.dir(&d.host, d.guest.clone())
            };
        }
        // One worker, so its output goes to ours as is.
        Ok(builder.prefix_output(false))
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Usage>().is_some() {
        return 2;
    }
    match error.downcast_ref::<Error>() {
        Some(
            Error::Remote(_)
            | Error::Trap { .. }
            | Error::LimitExceeded { .. }
            | Error::Decode { .. },
        ) => 1,
        Some(Error::Encode(_) | Error::Invalid { .. }) => 2,
        Some(Error::Spawn { .. } | Error::Component(_) | Error::Io { .. }) => 3,
        Some(Error::Interrupted { .. } | Error::Timeout) => 4,
        _ => 5,
    }
}

fn error_kind(error: &anyhow::Error) -> &'static str {
    if error.downcast_ref::<Usage>().is_some() {
        return "usage";
    }
    match error.downcast_ref::<Error>() {
        Some(Error::Remote(_)) => "remote",
        Some(Error::Trap { .. }) => "trap",
        Some(Error::LimitExceeded { .. }) => "limit",
        Some(Error::Decode { .. }) => "decode",
        Some(Error::Spawn { .. }) => "spawn",
        Some(Error::Component(_) | Error::Io { .. }) => "component",
        Some(Error::Interrupted { .. }) => "interrupted",
        Some(Error::Timeout) => "timeout",
        Some(Error::TerminatedWorker) => "terminated",
        _ => "error",
    }
}

/// Whether to color what goes to stderr.
fn color_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn print_error(error: &anyhow::Error) {
    let (start, end) = if color_stderr() {
        ("\x1b[1;31m", "\x1b[0m")
    } else {
        ("", "")
    };
    eprintln!("{start}error:{end} {error:#}");
}

fn read_code(code: &[String], file: Option<&Path>) -> anyhow::Result<String> {
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

fn builder_for(guest: Option<&Path>, native: bool) -> WorkerBuilder {
    let script = guest.is_none_or(|g| g == Path::new("script"));
    match (guest, native) {
        (_, true) if script => Worker::native(),
        (Some(g), true) => Worker::native_program(g),
        (Some(g), false) if !script => Worker::wasm(g),
        _ => Worker::script(),
    }
}

/// Prints a value: JSON, or `{"value": ...}` with --json.
fn print_value(json: bool, value: &rmpv::Value) {
    let value = values::to_json(value);
    if json {
        println!("{}", serde_json::json!({ "value": value }));
    } else {
        println!("{value}");
    }
}

/// Shows a spinner on stderr while `work` runs, if it takes more than a
/// moment and stderr is a terminal.
fn with_spinner<T>(label: &str, work: impl FnOnce() -> T) -> T {
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

async fn eval(json: bool, code: &str, builder: WorkerBuilder) -> anyhow::Result<()> {
    let worker = builder.spawn().await?;
    let result = worker.remote_eval_fetch::<rmpv::Value>(code).await;
    worker.stop().await?;
    print_value(json, &result?);
    Ok(())
}

async fn call(
    json: bool,
    guest: &str,
    native: bool,
    function: &str,
    args: &[String],
    sandbox: &Sandbox,
) -> anyhow::Result<()> {
    let args = args
        .iter()
        .map(|a| {
            serde_json::from_str::<serde_json::Value>(a)
                .map_err(|e| usage(format!("argument `{a}` is not a JSON value: {e}")))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let worker = sandbox
        .apply(builder_for(Some(Path::new(guest)), native), native)?
        .spawn()
        .await?;
    let result = worker
        .remote_call_fetch::<rmpv::Value>(function, args)
        .await;
    worker.stop().await?;
    print_value(json, &result?);
    Ok(())
}

fn inspect(json: bool, guest: &Path) -> anyhow::Result<()> {
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

fn compile(json: bool, guest: &Path, output: Option<&Path>, fuel: bool) -> anyhow::Result<()> {
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

fn run_command(
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
    };
    Ok(malt::tools::run(guest, &options)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    match cli.command {
        Command::Eval {
            code,
            file,
            guest,
            native,
            sandbox,
        } => {
            let code = read_code(&code, file.as_deref())?;
            let builder = sandbox.apply(builder_for(guest.as_deref(), native), native)?;
            runtime()?.block_on(eval(json, &code, builder))?;
        }
        Command::Call {
            guest,
            native,
            function,
            args,
            sandbox,
        } => runtime()?.block_on(call(json, &guest, native, &function, &args, &sandbox))?,
        Command::Run {
            guest,
            args,
            stdin,
            sandbox,
        } => {
            let code = run_command(&guest, args, stdin, &sandbox)?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Command::Repl {
            guest,
            native,
            sandbox,
        } => {
            let builder = sandbox.apply(builder_for(guest.as_deref(), native), native)?;
            repl::run(runtime()?, builder)?;
        }
        Command::Inspect { guest } => inspect(json, &guest)?,
        Command::Compile {
            guest,
            output,
            fuel,
        } => compile(json, &guest, output.as_deref(), fuel)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Started as a worker host, this program never gets here: the malt
    // library serves the protocol before `main`.
    // Like other Unix tools, end quietly when the reader of our output
    // goes away (`malt inspect x | head`) instead of panicking.
    // SAFETY: restoring the default disposition of SIGPIPE has no
    // preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "error": { "kind": error_kind(&e), "message": format!("{e:#}") } })
                );
            } else {
                print_error(&e);
            }
            ExitCode::from(exit_code(&e))
        }
    }
}
