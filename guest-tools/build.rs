//! Compiles the guest programs in `c/` with the host gcc.
//!
//! Every program is linked statically twice: `NAME` with symbols and debug
//! info, and `NAME.stripped` without a symbol table, the way distribution
//! binaries ship. `sysbench` is additionally linked dynamically as
//! `sysbench.dyn`.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A program built from a single C source file.
struct Program {
    name: &'static str,
    source: &'static str,
    /// Also build a dynamically linked `NAME.dyn`.
    dynamic: bool,
}

const PROGRAMS: &[Program] = &[
    Program {
        name: "bugsrv",
        source: "c/bugsrv.c",
        dynamic: false,
    },
    Program {
        name: "hostile",
        source: "c/hostile.c",
        dynamic: false,
    },
    Program {
        name: "sysbench",
        source: "c/sysbench.c",
        dynamic: true,
    },
    Program {
        name: "abi",
        source: "c/abi.c",
        dynamic: false,
    },
    Program {
        name: "dirtier",
        source: "c/dirtier.c",
        dynamic: false,
    },
    Program {
        name: "spinner",
        source: "c/spinner.c",
        dynamic: false,
    },
    Program {
        name: "filer",
        source: "c/filer.c",
        dynamic: false,
    },
    Program {
        name: "asker",
        source: "c/asker.c",
        dynamic: false,
    },
];

const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-fstack-protector-strong",
    // Functions named in crash reports must stay distinct functions.
    "-fno-inline-functions-called-once",
    // Fortified memcpy would catch the stack overflow before the canary.
    "-U_FORTIFY_SOURCE",
];

const GCC: &str = "gcc";
const STRIP: &str = "strip";

fn main() {
    if let Err(message) = run() {
        eprintln!("error: guest-tools: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let c_dir = manifest_dir.join("c");

    println!("cargo:rerun-if-changed=build.rs");
    // The directory catches headers added later; files are listed for clarity.
    println!("cargo:rerun-if-changed=c");
    for program in PROGRAMS {
        println!("cargo:rerun-if-changed={}", program.source);
    }

    check_toolchain()?;

    // Keeps __FILE__ (assert messages) independent of the checkout location.
    let prefix_map = format!("-fmacro-prefix-map={}/=", c_dir.display());

    let mut jobs = Vec::new();
    for program in PROGRAMS {
        let source = manifest_dir.join(program.source);
        let output = out_dir.join(program.name);
        let mut args = vec!["-static".to_owned()];
        args.extend(common_args(&prefix_map, &source, &output));
        jobs.push(spawn_compile(program.name.to_owned(), args)?);

        if program.dynamic {
            let name = format!("{}.dyn", program.name);
            let output = out_dir.join(&name);
            jobs.push(spawn_compile(
                name,
                common_args(&prefix_map, &source, &output),
            )?);
        }
    }

    // Wait for every job so that all compiler errors are reported at once.
    let mut failures = String::new();
    for (name, child) in jobs {
        let output = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {GCC} ({name}): {e}"))?;
        let diagnostics = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            for line in diagnostics.lines() {
                println!("cargo:warning={name}: {line}");
            }
        } else {
            let _ = write!(
                failures,
                "\n--- {GCC} failed for {name} ({}) ---\n{diagnostics}",
                output.status
            );
        }
    }
    if !failures.is_empty() {
        return Err(format!("compiling the guest programs failed:{failures}"));
    }

    for program in PROGRAMS {
        let full = out_dir.join(program.name);
        let stripped = out_dir.join(format!("{}.stripped", program.name));
        let output = command_output(
            Command::new(STRIP)
                .arg("--strip-all")
                .arg("-o")
                .arg(&stripped)
                .arg(&full),
        )?;
        if !output.status.success() {
            return Err(format!(
                "{STRIP} --strip-all {} failed ({}):\n{}",
                full.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set; run through cargo"))
}

fn common_args(prefix_map: &str, source: &Path, output: &Path) -> Vec<String> {
    let mut args: Vec<String> = CFLAGS.iter().map(|s| (*s).to_owned()).collect();
    args.push(prefix_map.to_owned());
    args.push("-o".to_owned());
    args.push(output.display().to_string());
    args.push(source.display().to_string());
    args
}

fn spawn_compile(name: String, args: Vec<String>) -> Result<(String, Child), String> {
    let child = Command::new(GCC)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {GCC} for {name}: {e}"))?;
    Ok((name, child))
}

fn command_output(command: &mut Command) -> Result<Output, String> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))
}

/// Fails with an actionable message unless gcc targets x86-64 and can link
/// statically, and strip is available.
fn check_toolchain() -> Result<(), String> {
    let machine = command_output(Command::new(GCC).arg("-dumpmachine")).map_err(|e| {
        format!("{e}\nThe guest programs need the host C compiler; on Debian/Ubuntu: apt-get install gcc libc6-dev")
    })?;
    let machine = String::from_utf8_lossy(&machine.stdout).trim().to_owned();
    if !machine.starts_with("x86_64-") {
        return Err(format!(
            "{GCC} targets `{machine}`, but the guest programs must be x86-64 Linux executables"
        ));
    }

    // gcc echoes the bare name back when the file is not in its search path.
    let libc = command_output(Command::new(GCC).arg("-print-file-name=libc.a"))?;
    let libc = PathBuf::from(String::from_utf8_lossy(&libc.stdout).trim());
    if !libc.is_absolute() || !libc.is_file() {
        return Err(
            "static libc (libc.a) not found, so the guest programs cannot be linked with -static; \
             on Debian/Ubuntu: apt-get install libc6-dev"
                .to_owned(),
        );
    }

    command_output(Command::new(STRIP).arg("--version")).map_err(|e| {
        format!("{e}\n`{STRIP}` is needed for the .stripped variants; on Debian/Ubuntu: apt-get install binutils")
    })?;
    Ok(())
}
