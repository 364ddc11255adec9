//! A WASI command for `malt run` tests: `cat FILE...` prints files,
//! `write FILE TEXT` writes one, `env NAME` prints a variable, `exit N`
//! exits with N, `spin` never returns; no arguments prints a greeting.

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => println!("hello from a malt command"),
        Some("cat") => {
            for path in &args[1..] {
                match std::fs::read_to_string(path) {
                    Ok(text) => print!("{text}"),
                    Err(e) => {
                        eprintln!("cannot read {path}: {e}");
                        std::process::exit(3);
                    }
                }
            }
        }
        Some("write") => {
            let result =
                std::fs::File::create(&args[1]).and_then(|mut f| f.write_all(args[2].as_bytes()));
            if let Err(e) = result {
                eprintln!("cannot write {}: {e}", args[1]);
                std::process::exit(3);
            }
        }
        Some("env") => println!(
            "{}",
            std::env::var(&args[1]).unwrap_or_else(|_| "<unset>".into())
        ),
        Some("exit") => std::process::exit(args[1].parse().unwrap_or(1)),
        Some("spin") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some(other) => {
            eprintln!("unknown command {other}");
            std::process::exit(2);
        }
    }
}
