//! The `malt` command line, and the worker host every wasm worker runs.

mod args;
mod commands;
mod map;
mod repl;
mod report;
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

use args::*;
use commands::*;
use report::*;

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
        #[arg(long, short, conflicts_with_all = ["native", "python"])]
        guest: Option<PathBuf>,
        /// Use a native worker (a process running the script guest
        /// natively: faster to start, no wasm sandbox).
        #[arg(long, conflicts_with = "python")]
        native: bool,
        /// Evaluate Python (CPython in the wasm sandbox; build the guest
        /// once with `malt build-python`).
        #[arg(long)]
        python: bool,
        #[command(flatten)]
        sandbox: Sandbox,
        #[command(flatten)]
        remote: Remote,
    },
    /// Call a guest function with JSON arguments and print its value as JSON.
    #[command(after_help = "EXAMPLES:
  malt call guest.wasm add 1 2
  malt call script abs -- -5
  malt call --native ./my-native-guest fib 50
  malt call guest.wasm greet '\"world\"' '{\"loud\": true}'")]
    Call {
        /// The guest component, or `script` for the built-in script guest;
        /// with --native, a native worker program (or `script`); with
        /// --python, a Python file defining the function.
        guest: String,
        /// Run the guest in a native worker.
        #[arg(long, conflicts_with = "python")]
        native: bool,
        /// GUEST is a Python file: run it in a Python session, then call.
        #[arg(long)]
        python: bool,
        /// The function.
        function: String,
        /// Arguments, each one JSON value.
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        #[command(flatten)]
        sandbox: Sandbox,
        #[command(flatten)]
        remote: Remote,
    },
    /// Call a function once per line of JSON input, across a pool of workers.
    #[command(
        after_help = "Each input line is a JSON array of arguments; each output line is
the JSON result, or {\"error\": ...} for that input, in input order.
Exits 1 if any input failed.

EXAMPLES:
  malt map guest.wasm add --workers 4 < inputs.jsonl > outputs.jsonl
  malt map script square --setup 'fn square(x) { x * x }' < numbers.jsonl"
    )]
    Map {
        /// The guest component, or `script` for the built-in script guest;
        /// with --native, a native worker program (or `script`).
        guest: String,
        /// The function.
        function: String,
        /// Run the guests in native workers.
        #[arg(long)]
        native: bool,
        /// How many workers (default: the number of CPUs).
        #[arg(long, short = 'j', value_name = "N")]
        workers: Option<usize>,
        /// Code every worker evaluates first (repeatable), e.g. the function.
        #[arg(long, value_name = "CODE")]
        setup: Vec<String>,
        /// Run an input again on another worker if its worker dies, up to N
        /// times (for functions safe to repeat).
        #[arg(long, value_name = "N", default_value_t = 0)]
        retries: u32,
        #[command(flatten)]
        sandbox: Sandbox,
        #[command(flatten)]
        remote: Remote,
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
        #[arg(conflicts_with_all = ["native", "python"])]
        guest: Option<PathBuf>,
        /// Use a native worker (the script guest natively, no wasm sandbox).
        #[arg(long, conflicts_with = "python")]
        native: bool,
        /// A Python session (blocks go on until an empty line).
        #[arg(long)]
        python: bool,
        #[command(flatten)]
        sandbox: Sandbox,
        #[command(flatten)]
        remote: Remote,
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
    /// Build the Python guest component and compile it into the cache (needs componentize-py 0.25.1).
    #[command(
        name = "build-python",
        after_help = "EXAMPLES:
  pip install componentize-py==0.25.1 && malt build-python
  malt build-python -o python.wasm && MALT_PYTHON_COMPONENT=python.wasm malt eval --python '1 + 1'"
    )]
    BuildPython {
        /// Where to write it (default: where `--python` looks).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Whether the command line asks for a worker in a host process of this
/// program: a guess from the words alone (a wrong guess costs one process
/// that waits in vain, or nothing gained).
fn starts_a_host() -> bool {
    // What follows `--` is a value, not a flag.
    let words: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .collect();
    let command = words.iter().find(|a| !a.starts_with('-'));
    let elsewhere = words
        .iter()
        .any(|a| a == "--native" || a.starts_with("--ssh") || a == "--help" || a == "-h");
    !elsewhere && command.is_some_and(|c| ["eval", "call", "map", "repl"].contains(&c.as_str()))
}

fn run(cli: Cli, early: Option<tokio::runtime::Runtime>) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    let runtime = || match early {
        Some(rt) => Ok(rt),
        None => runtime(),
    };
    match cli.command {
        Command::Eval {
            code,
            file,
            guest,
            native,
            python,
            sandbox,
            remote,
        } => {
            let code = read_code(&code, file.as_deref())?;
            let base = match python {
                true => Worker::python(),
                false => builder_for(guest.as_deref(), native),
            };
            let builder = remote.apply(sandbox.apply(base, native)?);
            runtime()?.block_on(eval(json, &code, builder))?;
        }
        Command::Call {
            guest,
            native,
            python,
            function,
            args,
            sandbox,
            remote,
        } => {
            let (base, module) = match python {
                true => {
                    let source = std::fs::read_to_string(&guest)
                        .with_context(|| format!("cannot read the Python file {guest}"))?;
                    (Worker::python(), Some((guest.clone(), source)))
                }
                false => (builder_for(Some(Path::new(&guest)), native), None),
            };
            let builder = remote.apply(sandbox.apply(base, native)?);
            runtime()?.block_on(call(json, builder, module, &function, &args))?
        }
        Command::Map {
            guest,
            function,
            native,
            workers,
            setup,
            retries,
            sandbox,
            remote,
        } => {
            let builder =
                remote.apply(sandbox.apply(builder_for(Some(Path::new(&guest)), native), native)?);
            let workers = workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            if workers == 0 {
                return Err(args::usage("--workers must be at least 1"));
            }
            let options = map::MapOptions {
                function,
                workers,
                setup,
                retries,
            };
            let failed = runtime()?.block_on(map::map(builder, options))?;
            return Ok(if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
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
            python,
            sandbox,
            remote,
        } => {
            let (base, language) = match python {
                true => (Worker::python(), repl::Language::Python),
                false => (
                    builder_for(guest.as_deref(), native),
                    repl::Language::Script,
                ),
            };
            let builder = remote.apply(sandbox.apply(base, native)?);
            repl::run(runtime()?, builder, language)?;
        }
        Command::Inspect { guest } => inspect(json, &guest)?,
        Command::Compile {
            guest,
            output,
            fuel,
        } => compile(json, &guest, output.as_deref(), fuel)?,
        Command::BuildPython { output } => {
            let path = malt::python::build_component(output.as_deref())?;
            if json {
                println!("{}", serde_json::json!({ "component": path }));
            } else {
                println!("{}", path.display());
            }
        }
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
    // The worker's host process starts before the arguments are parsed,
    // and so runs meanwhile: forked from this process while it has one
    // thread (no exec), else started ahead.
    let early = match starts_a_host() && !malt::fork_host_ahead() {
        true => runtime().ok().inspect(|rt| {
            let _in = rt.enter();
            Worker::script().start_host_ahead();
        }),
        false => None,
    };
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli, early) {
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
