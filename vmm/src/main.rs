//! `assure-vmm`: run an unmodified Linux server in a KVM process VM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use assure_vmm::sandbox::{RunOutcome, Sandbox, SandboxConfig};
use assure_vmm::syscalls::{self, Support};

#[derive(Parser, Debug)]
#[command(
    name = "assure-vmm",
    version,
    about = "A self-healing KVM appliance for unmodified Linux servers"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter such as
    /// `assure_vmm=debug,syscall=trace`); RUST_LOG is used when this is not given.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a program in a new sandbox.
    Run(RunArgs),
    /// Print the syscall compatibility table.
    Syscalls,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Host directory that becomes the guest's root file system.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Guest memory size (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Extra environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<String>,
    /// Append every event (crash, exit) to this file as JSON lines.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// The program (a path inside the root, or a name looked up in the guest's PATH) and its
    /// arguments.
    #[arg(required = true, last = true, value_name = "PROGRAM [ARGS]...")]
    program: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (examples: 512M, 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_env(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() && !k.contains('\0') && !s.contains('\0') => {
            Ok(s.to_string())
        }
        _ => Err(format!(
            "invalid environment entry {s:?}: expected KEY=VALUE"
        )),
    }
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|e| {
            eprintln!("assure-vmm: invalid --log-level {l:?}: {e}; using \"info\"");
            EnvFilter::new("info")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn print_syscalls() {
    for def in syscalls::all() {
        let (level, note) = match def.support {
            Support::Full(_) => ("supported", ""),
            Support::Partial(_, n) => ("partial", n),
            Support::Error(_, n) => ("refused", n),
        };
        println!("{:>3} {:<24} {:<10} {}", def.nr, def.name, level, note);
    }
}

/// A forked guest process that died of a signal: the guest parent's wait4 must see exactly
/// that, so this VMM process dies of the same signal (without a core file).
fn die_by_signal(sig: i32) -> ExitCode {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on this process; raise does not return for a fatal signal.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    ExitCode::from((128 + sig).clamp(0, 255) as u8)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    match cli.command {
        Command::Syscalls => {
            print_syscalls();
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let mut program = args.program.into_iter();
            let Some(name) = program.next() else {
                eprintln!("assure-vmm: no program given");
                return ExitCode::from(2);
            };
            let cfg = SandboxConfig {
                port_map: Vec::new(),
                workdir: None,
                root: args.root,
                mem_size: args.mem,
                program: name,
                args: program.collect(),
                env: args.env,
                events: args.events,
            };
            let mut sandbox = match Sandbox::new(&cfg) {
                Ok(sb) => sb,
                Err(e) => {
                    eprintln!("assure-vmm: {e}");
                    return ExitCode::from(125);
                }
            };
            match sandbox.run() {
                Ok(RunOutcome::Killed(sig)) if sandbox.is_forked_child() => die_by_signal(sig),
                Ok(outcome) => ExitCode::from(outcome.exit_code().clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("assure-vmm: {e}");
                    ExitCode::from(125)
                }
            }
        }
    }
}
