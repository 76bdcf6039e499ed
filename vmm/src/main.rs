//! `assure-vmm`: run an unmodified Linux server in a KVM process VM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use assure_vmm::{report, report_raw};

use assure_vmm::image;
use assure_vmm::sandbox::{Sandbox, SandboxConfig};
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
    /// Build, list and inspect server images (docs/images.md).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print the syscall compatibility table.
    Syscalls,
    /// List the functions of an x86-64 ELF file (a server binary or a library), from its
    /// `.eh_frame` (which stripped binaries keep) and named from `.symtab`/`.dynsym` where
    /// a symbol starts there: `OFFSET SIZE NAME`, `?` for a function only `.eh_frame`
    /// knows (name it `FILE+OFFSET`).
    Functions {
        /// The ELF file on the host.
        file: PathBuf,
        /// Only functions whose name contains this text.
        #[arg(long = "match", value_name = "TEXT")]
        matching: Option<String>,
    },
    /// Talk to a running sandbox through its control socket (`run --control PATH`).
    Ctl {
        /// The control socket.
        path: PathBuf,
        /// The command.
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// The sandbox's state: pid, threads, memory, mappings, fds, syscalls, uptime, and the
    /// live checkpoints.
    Status,
    /// Take a checkpoint of the running sandbox; prints its id and costs.
    Checkpoint {
        /// Also print a digest of the captured memory and registers.
        #[arg(long)]
        digest: bool,
    },
    /// Roll the sandbox back to a live checkpoint (the newest if no ID is given).
    Rollback {
        /// Checkpoint id.
        id: Option<u64>,
        /// Also print a digest of the restored state (equal to the checkpoint's).
        #[arg(long)]
        digest: bool,
    },
    /// Release a checkpoint (deferred closes then happen).
    Release {
        /// Checkpoint id.
        id: u64,
    },
    /// Print a digest of the running sandbox's memory, registers and VMM state.
    Digest,
    /// List rescue points (placement, policy, counters), fault injections and open windows.
    Rescue,
    /// Add rescue points from a TOML file (as `run --rescue`) to the running sandbox.
    RescueAdd {
        /// The file.
        file: PathBuf,
    },
    /// Enable or disable a rescue point (enabling also lifts a quarantine).
    RescueEnable {
        /// The point's name.
        name: String,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Add a fault injection (as `run --inject`).
    Inject {
        /// `FUNCTION:nth=N:kind=segv|abort|hang[:every=M][:count=C]`.
        spec: String,
    },
    /// Print the most recent events (recoveries, quarantines, crashes).
    Events {
        /// How many.
        #[arg(long, default_value_t = 20)]
        last: usize,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build images from their specs (IMAGES_DIR/NAME.toml) into OUT/NAME/; an image that
    /// is up to date (same spec, same package versions) is not rebuilt.
    Build {
        /// Image names (spec file names without .toml).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[command(flatten)]
        dirs: ImageDirs,
        /// Cache of downloaded Debian packages, shared by all images [default: OUT/.debs].
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force: bool,
        /// Never run `apt-get update` (by default it runs once, as root, when apt does not
        /// know a package or cannot fetch it).
        #[arg(long)]
        no_apt_update: bool,
    },
    /// List the image specs and whether each is built.
    List {
        #[command(flatten)]
        dirs: ImageDirs,
    },
    /// Show an image's spec and build.
    Show {
        /// Image name.
        name: String,
        #[command(flatten)]
        dirs: ImageDirs,
        /// Print the built image's manifest.json instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct ImageDirs {
    /// Directory of the image specs.
    #[arg(long, value_name = "DIR", default_value = "images")]
    images_dir: PathBuf,
    /// Directory of the built images.
    #[arg(long, value_name = "DIR", default_value = "images/out")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Host directory that becomes the guest's root file system.
    #[arg(long, default_value = "/", conflicts_with = "image")]
    root: PathBuf,
    /// Run a built image: NAME (IMAGES_OUT/NAME/manifest.json) or a DIR holding
    /// manifest.json (a value with a '/' or starting with '.'). Its root, command, env and
    /// workdir are used; arguments after `--` are appended to its command, or replace it if
    /// the first one is an absolute path.
    #[arg(long, value_name = "NAME|DIR")]
    image: Option<String>,
    /// Where `--image NAME` finds built images.
    #[arg(long, value_name = "DIR", default_value = "images/out")]
    images_out: PathBuf,
    /// Remap a port: the guest's bind() to port GUEST binds port HOST on the host
    /// (repeatable).
    #[arg(long = "port", value_name = "GUEST=HOST", value_parser = parse_port_map)]
    port: Vec<(u16, u16)>,
    /// At exit, print per-syscall counts and time (calls, errors, total, mean, p50, p99).
    #[arg(long)]
    stats: bool,
    /// Serve the control socket here (JSON lines; `assure-vmm ctl PATH ...`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Guest memory size (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    mem: u64,
    /// Extra environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<String>,
    /// Append every event (crash, recovery, quarantine, exit) to this file as JSON lines.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Rescue points (a TOML file of `[[rescue]]` entries, docs/rescue-points.md); repeatable.
    #[arg(long = "rescue", value_name = "FILE", value_parser = parse_rescue_file)]
    rescue: Vec<Vec<assure_vmm::rescue::spec::RescueSpec>>,
    /// Make a function fault: `FUNCTION:nth=N:kind=segv|abort|hang[:every=M][:count=C]`,
    /// FUNCTION being `SYMBOL`, `MODULE!SYMBOL`, `MODULE+0xOFF` or `+0xOFF`; repeatable.
    #[arg(long = "inject", value_name = "SPEC", value_parser = parse_inject)]
    inject: Vec<assure_vmm::rescue::spec::InjectSpec>,
    /// Serve the gdb remote protocol on HOST:PORT or unix:PATH (docs/gdb.md).
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    gdb: Option<assure_vmm::gdb::Endpoint>,
    /// With --gdb: hold the guest before its first instruction until gdb attaches.
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
    /// The program (a path inside the root, or a name looked up in the guest's PATH) and its
    /// arguments.
    #[arg(
        required_unless_present = "image",
        last = true,
        value_name = "PROGRAM [ARGS]..."
    )]
    program: Vec<String>,
}

fn parse_rescue_file(s: &str) -> Result<Vec<assure_vmm::rescue::spec::RescueSpec>, String> {
    assure_vmm::rescue::spec::read_rescue_file(std::path::Path::new(s)).map_err(|e| e.to_string())
}

fn parse_inject(s: &str) -> Result<assure_vmm::rescue::spec::InjectSpec, String> {
    assure_vmm::rescue::spec::parse_inject(s).map_err(|e| e.to_string())
}

fn parse_port_map(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(format!("invalid port {p:?} in {s:?}: expected 1-65535")),
    };
    match s.split_once('=') {
        Some((g, h)) => Ok((port(g)?, port(h)?)),
        None => Err(format!("invalid port remap {s:?}: expected GUEST=HOST")),
    }
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
            report!("assure-vmm: invalid --log-level {l:?}: {e}; using \"info\"");
            EnvFilter::new("info")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        // A log write that fails (stderr closed by its reader) is dropped; reporting it
        // would panic.
        .log_internal_errors(false)
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

/// `assure-vmm image ...`: image errors exit with 1.
fn image_command(cmd: ImageCommand) -> ExitCode {
    let result = match cmd {
        ImageCommand::Build {
            names,
            dirs,
            cache,
            force,
            no_apt_update,
        } => {
            let opts = image::BuildOptions {
                images_dir: dirs.images_dir,
                out: dirs.out,
                cache,
                force,
                apt_update: !no_apt_update,
            };
            names
                .iter()
                .try_for_each(|name| image::build(name, &opts).map(|_| ()))
        }
        ImageCommand::List { dirs } => {
            image::list(&dirs.images_dir, &dirs.out).map(|text| print!("{text}"))
        }
        ImageCommand::Show { name, dirs, json } => {
            if json {
                image::open(&name, &dirs.out).map(|img| println!("{}", img.manifest.to_json()))
            } else {
                image::show(&name, &dirs.images_dir, &dirs.out).map(|text| print!("{text}"))
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report!("assure-vmm: {e}");
            ExitCode::from(1)
        }
    }
}

/// The sandbox configuration of `run`: from `--root` and the program, or from an image's
/// manifest (its root, command, env and workdir; arguments after `--` are appended to its
/// command, or replace it when the first is an absolute path; `--env` overrides).
fn run_config(args: RunArgs) -> Result<SandboxConfig, ExitCode> {
    let Some(reference) = args.image else {
        let mut program = args.program.into_iter();
        let Some(name) = program.next() else {
            report!("assure-vmm: no program given");
            return Err(ExitCode::from(2));
        };
        return Ok(SandboxConfig {
            root: args.root,
            mem_size: args.mem,
            program: name,
            args: program.collect(),
            env: args.env,
            events: args.events,
            workdir: None,
            port_map: args.port,
            control: args.control,
            rescue: args.rescue.into_iter().flatten().collect(),
            injects: args.inject,
        });
    };
    let img = image::open(&reference, &args.images_out).map_err(|e| {
        report!("assure-vmm: {e}");
        ExitCode::from(125)
    })?;
    let mut command = img.manifest.command.clone();
    match args.program.first() {
        Some(first) if first.starts_with('/') => command = args.program.clone(),
        _ => command.extend(args.program.iter().cloned()),
    }
    let mut command = command.into_iter();
    let Some(program) = command.next() else {
        report!("assure-vmm: image {reference} has an empty command");
        return Err(ExitCode::from(125));
    };
    let mut env = img.manifest.env.clone();
    for kv in args.env {
        let key = kv.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    Ok(SandboxConfig {
        root: img.rootfs,
        mem_size: args.mem,
        program,
        args: command.collect(),
        env,
        events: args.events,
        workdir: img.manifest.workdir.clone(),
        port_map: args.port,
        control: args.control,
        rescue: args.rescue.into_iter().flatten().collect(),
        injects: args.inject,
    })
}

/// `assure-vmm functions`: one line per `.eh_frame` function range.
fn list_functions(file: &std::path::Path, matching: Option<&str>) -> Result<(), String> {
    use std::io::Write as _;
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let name = file
        .file_name()
        .map_or_else(|| "elf".into(), |n| n.to_string_lossy().into_owned());
    let module = introspect::Module::from_elf(name, &bytes, 0)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut out = std::io::stdout().lock();
    let (mut shown, mut unnamed) = (0usize, 0usize);
    for f in module.functions_from_eh_frame() {
        let name = module
            .symbol_at(f.start)
            .filter(|h| h.offset == 0)
            .map(|h| h.name.to_string());
        if let Some(m) = matching {
            if !name.as_deref().is_some_and(|n| n.contains(m)) {
                continue;
            }
        }
        unnamed += usize::from(name.is_none());
        shown += 1;
        // A closed pipe (`| head`) ends the listing, not the program with a panic.
        if writeln!(
            out,
            "{:#x} {} {}",
            f.start,
            f.end - f.start,
            name.as_deref().unwrap_or("?")
        )
        .is_err()
        {
            return Ok(());
        }
    }
    report!("{shown} functions ({unnamed} without a name)");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    match cli.command {
        Command::Ctl { path, command } => {
            let line = match command {
                CtlCommand::Status => serde_json::json!({"cmd": "status"}),
                CtlCommand::Checkpoint { digest } => {
                    serde_json::json!({"cmd": "checkpoint", "digest": digest})
                }
                CtlCommand::Rollback { id, digest } => match id {
                    Some(id) => serde_json::json!({"cmd": "rollback", "id": id, "digest": digest}),
                    None => serde_json::json!({"cmd": "rollback", "digest": digest}),
                },
                CtlCommand::Release { id } => serde_json::json!({"cmd": "release", "id": id}),
                CtlCommand::Digest => serde_json::json!({"cmd": "digest"}),
                CtlCommand::Rescue => serde_json::json!({"cmd": "rescue"}),
                CtlCommand::RescueAdd { file } => match std::fs::read_to_string(&file) {
                    Ok(toml) => serde_json::json!({"cmd": "rescue-add", "toml": toml}),
                    Err(e) => {
                        report!("assure-vmm: cannot read {}: {e}", file.display());
                        return ExitCode::from(2);
                    }
                },
                CtlCommand::RescueEnable { name, state } => {
                    serde_json::json!({"cmd": "rescue-enable", "name": name, "enabled": state == "on"})
                }
                CtlCommand::Inject { spec } => serde_json::json!({"cmd": "inject", "spec": spec}),
                CtlCommand::Events { last } => serde_json::json!({"cmd": "events", "last": last}),
            }
            .to_string();
            let line = line.as_str();
            match assure_vmm::control::request(&path, line) {
                Ok(v) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
                    );
                    if v["ok"] == true {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    report!("assure-vmm: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Syscalls => {
            print_syscalls();
            ExitCode::SUCCESS
        }
        Command::Functions { file, matching } => match list_functions(&file, matching.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report!("assure-vmm: {e}");
                ExitCode::from(1)
            }
        },
        Command::Image(cmd) => image_command(cmd),
        Command::Run(args) => {
            let stats = args.stats;
            let gdb = args.gdb.clone().map(|e| (e, args.gdb_wait));
            let cfg = match run_config(args) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            let mut sandbox = match Sandbox::new(&cfg) {
                Ok(sb) => sb,
                Err(e) => {
                    report!("assure-vmm: {e}");
                    return ExitCode::from(125);
                }
            };
            if stats {
                sandbox.enable_stats();
            }
            if let Some((endpoint, wait)) = gdb {
                let listener = match assure_vmm::gdb::Listener::bind(&endpoint) {
                    Ok(l) => l,
                    Err(e) => {
                        report!("assure-vmm: {e}");
                        return ExitCode::from(2);
                    }
                };
                let at = listener.local();
                if let Err(e) = sandbox.serve_gdb(listener, wait) {
                    report!("assure-vmm: {e}");
                    return ExitCode::from(125);
                }
                report!(
                    "assure-vmm: gdb stub listening on {at}{}",
                    if wait {
                        " (the guest waits for gdb)"
                    } else {
                        ""
                    }
                );
            }
            let result = sandbox.run();
            if let Some(report) = sandbox.stats_report() {
                report_raw!("{report}");
            }
            match result {
                Ok(outcome) => ExitCode::from(outcome.exit_code().clamp(0, 255) as u8),
                Err(e) => {
                    report!("assure-vmm: {e}");
                    ExitCode::from(125)
                }
            }
        }
    }
}
