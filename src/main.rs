//! The `malt` command line, and the worker host every wasm worker runs.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use malt::{Error, Worker, WorkerBuilder};

/// Run code in sandboxed malt workers.
#[derive(Parser)]
#[command(name = "malt", version, about, long_about = None)]
#[command(
    after_help = "EXIT CODES:\n  0  success\n  1  the guest raised an error\n  2  usage error\n  3  the worker could not start\n  4  interrupted or timed out\n  5  the worker died or another error"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Sandbox {
    /// Cap on the guest's memory, in MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Per-call wall-clock limit, e.g. 500ms, 2s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment variable for the guest, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate code in a fresh sandboxed worker and print its value as JSON.
    #[command(
        after_help = "EXAMPLES:\n  malt eval 'let x = 20; x * 2 + 2'\n  echo '1 + 1' | malt eval -"
    )]
    Eval {
        /// The code; `-` reads it from stdin.
        code: Vec<String>,
        /// Read the code from a file.
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// The guest component (default: the built-in script guest).
        #[arg(long, short)]
        guest: Option<PathBuf>,
        #[command(flatten)]
        sandbox: Sandbox,
    },
    /// Call a guest function with JSON arguments and print its value as JSON.
    #[command(after_help = "EXAMPLES:\n  malt call guest.wasm add 1 2")]
    Call {
        /// The guest component.
        guest: PathBuf,
        /// The function.
        function: String,
        /// Arguments, each a JSON value.
        args: Vec<String>,
        #[command(flatten)]
        sandbox: Sandbox,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit `{unit}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn configure(mut builder: WorkerBuilder, sandbox: &Sandbox) -> anyhow::Result<WorkerBuilder> {
    if let Some(mib) = sandbox.memory {
        builder = builder.memory_limit(mib << 20);
    }
    if let Some(t) = sandbox.timeout {
        builder = builder.call_timeout(t);
    }
    for kv in &sandbox.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env takes KEY=VALUE, got `{kv}`"))?;
        builder = builder.env(k, v);
    }
    Ok(builder)
}

fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Error>() {
        Some(Error::Remote(_) | Error::Trap { .. } | Error::LimitExceeded { .. }) => 1,
        Some(Error::Spawn { .. } | Error::Component(_)) => 3,
        Some(Error::Interrupted { .. } | Error::Timeout) => 4,
        Some(_) => 5,
        None => 2,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Eval {
            code,
            file,
            guest,
            sandbox,
        } => {
            let code = match (file, code.as_slice()) {
                (Some(f), []) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                (None, [dash]) if dash == "-" => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading stdin")?;
                    s
                }
                (None, []) => anyhow::bail!("nothing to evaluate: give CODE, `-` or --file"),
                (None, words) => words.join(" "),
                (Some(_), _) => anyhow::bail!("give either CODE or --file, not both"),
            };
            let builder = match guest {
                Some(g) => Worker::wasm(g),
                None => Worker::script(),
            };
            let worker = configure(builder, &sandbox)?.spawn().await?;
            let value: serde_json::Value = worker.remote_eval_fetch(&code).await?;
            worker.stop().await?;
            println!("{value}");
        }
        Command::Call {
            guest,
            function,
            args,
            sandbox,
        } => {
            let args = args
                .iter()
                .map(|a| {
                    serde_json::from_str(a).with_context(|| format!("argument `{a}` is not JSON"))
                })
                .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
            let worker = configure(Worker::wasm(guest), &sandbox)?.spawn().await?;
            let value: serde_json::Value = worker.remote_call_fetch(&function, args).await?;
            worker.stop().await?;
            println!("{value}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    malt::host::main_if_host();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(5);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
