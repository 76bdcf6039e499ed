//! Prints where the guest programs were built, for scripts:
//!
//! ```text
//! guest-tools path NAME   absolute path of NAME (exit 2 if unknown)
//! guest-tools list        one "NAME<TAB>PATH" line per program
//! ```

use std::io::{self, Write};
use std::process::ExitCode;

const USAGE: &str = "usage: guest-tools path NAME\n       guest-tools list\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut stdout = io::stdout().lock();

    let written = match args.as_slice() {
        ["path", name] => match guest_tools::path(name) {
            Some(path) => writeln!(stdout, "{}", path.display()),
            None => {
                let known: Vec<&str> = guest_tools::names().collect();
                eprintln!(
                    "guest-tools: unknown program '{name}' (known: {})",
                    known.join(", ")
                );
                return ExitCode::from(2);
            }
        },
        ["list"] => guest_tools::PROGRAMS
            .iter()
            .try_for_each(|(name, path)| writeln!(stdout, "{name}\t{path}")),
        ["-h" | "--help" | "help"] => stdout.write_all(USAGE.as_bytes()),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match written.and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-tools: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}
