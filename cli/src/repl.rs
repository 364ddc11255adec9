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

/// The guest language, for when an input is complete.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Rhai, or any guest: brackets decide.
    Script,
    /// Python: brackets, and an indented block goes on until an empty
    /// line (as in `python3`'s own REPL).
    Python,
}

/// Whether the input so far is complete: brackets balanced (outside
/// strings and, in Python, comments), no trailing backslash, and in
/// Python no block still open.
fn complete(code: &str, language: Language) -> bool {
    if code.trim_end().ends_with('\\') {
        return false;
    }
    let python = language == Language::Python;
    let mut depth = 0i64;
    let mut in_string: Option<char> = None;
    let mut in_comment = false;
    let mut escaped = false;
    for c in code.chars() {
        if in_comment {
            in_comment = c != '\n';
            continue;
        }
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
            '\'' if python => in_string = Some(c),
            '#' if python => in_comment = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    if depth > 0 || in_string.is_some() {
        return false;
    }
    if python {
        // A compound statement (or a decorator) opens a block that ends
        // at an empty line.
        let opens_block = code.lines().any(|line| {
            let line = line.split('#').next().unwrap_or("").trim_end();
            line.ends_with(':') || line.trim_start().starts_with('@')
        });
        return !opens_block || code.ends_with('\n');
    }
    true
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

pub fn run(
    runtime: tokio::runtime::Runtime,
    builder: WorkerBuilder,
    language: Language,
) -> anyhow::Result<()> {
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
                if continued || !complete(&buffer, language) {
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
        Err(Error::Interrupted {
            rolled_back: true, ..
        }) => println!(
            "{}",
            paint(
                "33",
                "interrupted: the guest did not stop in time and was rolled back to before this input"
            )
        ),
        Err(Error::Interrupted {
            state_lost: false, ..
        }) => {
            println!("{}", paint("33", "interrupted (the session is intact)"));
        }
        Err(Error::Interrupted {
            state_lost: true, ..
        }) => println!(
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
    use super::{Language, complete};

    #[test]
    fn continuation() {
        let script = |code| complete(code, Language::Script);
        assert!(script("1 + 1"));
        assert!(!script("fn f(x) {"));
        assert!(script("fn f(x) {\n x }"));
        assert!(script(r#"print("{")"#));
        assert!(!script("let x = 1 + \\"));
    }

    #[test]
    fn python_blocks_go_on_until_an_empty_line() {
        let python = |code| complete(code, Language::Python);
        assert!(python("1 + 1"));
        assert!(!python("def f(x):"));
        assert!(!python("def f(x):\n    return x"));
        assert!(python("def f(x):\n    return x\n"));
        assert!(!python("@cache"));
        assert!(!python("x = [1,\n"));
        assert!(python("x = [1,\n 2]"));
        assert!(python("s = 'a:'"));
        assert!(python("y = 1  # (not a bracket: a comment"));
        assert!(!python("s = \"abc"));
    }
}
