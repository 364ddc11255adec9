//! `malt repl`: an interactive session in one worker.
//!
//! Line editing and history come from rustyline. At the prompt Ctrl-C
//! clears the line and Ctrl-D exits; while code runs, Ctrl-C (SIGINT, the
//! terminal is back in cooked mode then) interrupts the evaluation and the
//! session goes on.

use std::io::IsTerminal;

use malt::{Error, WorkerBuilder};
use rustyline::error::ReadlineError;

const PROMPT: &str = "malt> ";
const CONTINUE: &str = "....> ";

/// Whether the input so far is complete: brackets balanced (outside
/// strings) and no trailing backslash.
fn complete(code: &str) -> bool {
    if code.trim_end().ends_with('\\') {
        return false;
    }
    let mut depth = 0i64;
    let mut in_string: Option<char> = None;
    let mut escaped = false;
    for c in code.chars() {
        if let Some(q) = in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => in_string = None,
                _ => {}
            }
            continue;
        }
        match c {
            '"' | '`' => in_string = Some(c),
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    depth <= 0 && in_string.is_none()
}

fn paint(code: &str, text: &str) -> String {
    let color = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

pub fn run(runtime: tokio::runtime::Runtime, builder: WorkerBuilder) -> anyhow::Result<()> {
    let worker = runtime.block_on(builder.spawn())?;
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = malt::cache_dir().join("repl_history");
    let _ = editor.load_history(&history);
    println!(
        "malt {} — {}. Ctrl-C interrupts, Ctrl-D exits.",
        env!("CARGO_PKG_VERSION"),
        worker.name()
    );

    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() { PROMPT } else { CONTINUE };
        match editor.readline(prompt) {
            Ok(line) => {
                let trimmed = line.trim_end();
                let continued = trimmed.ends_with('\\');
                if !buffer.is_empty() {
                    buffer.push('\n');
                }
                buffer.push_str(trimmed.strip_suffix('\\').unwrap_or(&line));
                if continued || !complete(&buffer) {
                    continue;
                }
                let code = std::mem::take(&mut buffer);
                if code.trim().is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(code.as_str());
                runtime.block_on(evaluate(&worker, &code));
                if !worker.is_running() {
                    println!("{}", paint("31", "the worker has terminated; exiting"));
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                let _ = runtime.block_on(worker.stop());
                return Err(e.into());
            }
        }
    }
    let _ = std::fs::create_dir_all(malt::cache_dir());
    let _ = editor.save_history(&history);
    runtime.block_on(worker.stop())?;
    Ok(())
}

async fn evaluate(worker: &malt::Worker, code: &str) {
    let mut pending = worker.remote_eval::<rmpv::Value>(code);
    let result = tokio::select! {
        result = &mut pending => result,
        _ = tokio::signal::ctrl_c() => {
            let _ = worker.interrupt();
            pending.await
        }
    };
    match result {
        Ok(rmpv::Value::Nil) => {}
        Ok(value) => println!("{}", crate::values::to_json(&value)),
        Err(Error::Interrupted { state_lost: false }) => {
            println!("{}", paint("33", "interrupted (the session is intact)"));
        }
        Err(Error::Interrupted { state_lost: true }) => println!(
            "{}",
            paint(
                "33",
                "interrupted: the guest did not stop in time and was restarted; its state was lost"
            )
        ),
        Err(e) => println!("{} {e}", paint("31", "error:")),
    }
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn continuation() {
        assert!(complete("1 + 1"));
        assert!(!complete("fn f(x) {"));
        assert!(complete("fn f(x) {\n x }"));
        assert!(complete(r#"print("{")"#));
        assert!(!complete("let x = 1 + \\"));
    }
}
