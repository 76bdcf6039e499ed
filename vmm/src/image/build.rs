//! Building an image: spec → package closure → cached .debs → root file system → manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::apt::{self, PackageInfo};
use super::manifest::{self, Manifest, ProgramSummary};
use super::rootfs::{self, Flock, RootDir};
use super::spec::Spec;
use super::ImageError;

/// Where specs are read and images written.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Directory of the `NAME.toml` specs.
    pub images_dir: PathBuf,
    /// Output directory: `OUT/NAME/` per image.
    pub out: PathBuf,
    /// Cache of downloaded .debs (default `OUT/.debs`).
    pub cache: Option<PathBuf>,
    /// Rebuild even if the image is up to date.
    pub force: bool,
    /// Run `apt-get update` (once) when apt does not know a package or cannot fetch it.
    pub apt_update: bool,
}

impl BuildOptions {
    /// The .deb cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.clone().unwrap_or_else(|| self.out.join(".debs"))
    }
}

/// What `build` did.
#[derive(Debug, Clone)]
pub enum BuildOutcome {
    /// The image was (re)built.
    Built {
        /// The image directory.
        dir: PathBuf,
        /// Its manifest.
        manifest: Box<Manifest>,
    },
    /// Nothing changed since the last build.
    UpToDate {
        /// The image directory.
        dir: PathBuf,
    },
}

/// Guest paths removed after unpacking: documentation no server reads.
const PRUNED: &[&str] = &[
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/info",
    "/usr/share/lintian",
];

/// A host file to copy into the root.
struct Local {
    to: String,
    from: PathBuf,
    content: Vec<u8>,
    mode: u32,
    sha256: String,
}

/// The host path of a guest-tools program: `$ASSURE_GUEST_TOOLS_DIR/NAME` if that variable
/// is set, else what `guest-tools path NAME` prints, for the guest-tools program that cargo
/// builds next to this assure-vmm binary.
pub fn guest_tool_path(name: &str) -> Result<PathBuf, ImageError> {
    let err = |detail: String| ImageError::GuestTools {
        name: name.to_string(),
        detail,
    };
    if let Some(dir) = std::env::var_os("ASSURE_GUEST_TOOLS_DIR") {
        let p = Path::new(&dir).join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(err(format!(
                "ASSURE_GUEST_TOOLS_DIR={} has no file {name}",
                Path::new(&dir).display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|e| err(format!("no current executable: {e}")))?;
    let tool = exe
        .parent()
        .map(|d| d.join("guest-tools"))
        .unwrap_or_default();
    if !tool.is_file() {
        return Err(err(format!(
            "set ASSURE_GUEST_TOOLS_DIR to the directory that holds it, or build the workspace \
             (`cargo build --workspace`) so that the guest-tools program sits next to {}",
            exe.display()
        )));
    }
    let out = std::process::Command::new(&tool)
        .args(["path", name])
        .output()
        .map_err(|e| err(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.is_file() {
        Ok(p)
    } else {
        Err(err(format!(
            "{} names {}, which does not exist (build the workspace)",
            tool.display(),
            p.display()
        )))
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { what, path, source }
}

fn load_locals(spec: &Spec, spec_dir: &Path) -> Result<Vec<Local>, ImageError> {
    let mut out = Vec::new();
    for l in &spec.local_files {
        let from = match l.from.strip_prefix("guest-tools:") {
            Some(name) => guest_tool_path(name)?,
            None => spec_dir.join(&l.from),
        };
        let content = std::fs::read(&from).map_err(io_err("cannot read local file", &from))?;
        let host_mode = std::fs::metadata(&from)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o644);
        let sha256 = apt::hex(&Sha256::digest(&content));
        out.push(Local {
            to: l.to.clone(),
            from,
            content,
            mode: l.mode.map(|m| m.0).unwrap_or(host_mode),
            sha256,
        });
    }
    Ok(out)
}

/// The hash that decides whether an image must be rebuilt.
fn build_hash(spec_text: &str, pkgs: &[PackageInfo], locals: &[Local]) -> String {
    let mut h = Sha256::new();
    h.update(format!("assure-vmm image format {}\n", manifest::FORMAT));
    h.update(spec_text.as_bytes());
    h.update(b"\n--packages--\n");
    for p in pkgs {
        h.update(format!(
            "{} {} {} {}\n",
            p.name, p.version, p.arch, p.sha256
        ));
    }
    h.update(b"--local files--\n");
    for l in locals {
        h.update(format!("{} {}\n", l.to, l.sha256));
    }
    apt::hex(&h.finalize())
}

/// Whether the error may go away after `apt-get update`.
fn stale_lists(e: &ImageError) -> bool {
    matches!(
        e,
        ImageError::PackageNotFound { .. } | ImageError::Fetch { .. }
    )
}

/// Add what was tried to an apt error.
fn with_hint(e: ImageError, hint: &str) -> ImageError {
    match e {
        ImageError::PackageNotFound { packages, hint: h } => ImageError::PackageNotFound {
            packages,
            hint: format!("{h}{hint}"),
        },
        ImageError::Fetch { packages, detail } => ImageError::Fetch {
            packages,
            detail: format!("{detail}{hint}"),
        },
        other => other,
    }
}

/// Packages of the spec's closure with their candidate versions.
fn resolve(
    spec: &Spec,
    cache: &Path,
    progress: &dyn Fn(String),
) -> Result<Vec<PackageInfo>, ImageError> {
    if spec.packages.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(cache).map_err(io_err("cannot create the package cache", cache))?;
    let closure = apt::resolve(cache, &spec.packages, &spec.effective_excludes())?;
    for (pkg, dep) in &closure.dropped {
        tracing::debug!(package = %pkg, dependency = %dep, "excluded dependency left out");
    }
    let infos = apt::show(cache, &closure.packages)?;
    progress(format!(
        "{} packages in the closure of {} ({} dependencies excluded)",
        infos.len(),
        spec.packages.join(", "),
        closure.dropped.len()
    ));
    Ok(infos.into_values().collect())
}

/// Build (or find up to date) the image `name`.
pub fn build(name: &str, opts: &BuildOptions) -> Result<BuildOutcome, ImageError> {
    let started = Instant::now();
    let progress = |msg: String| eprintln!("[image {name}] {msg}");
    let (text, spec) = Spec::load_with_text(&opts.images_dir, name)?;
    std::fs::create_dir_all(&opts.out).map_err(io_err("cannot create", &opts.out))?;
    // Two builds of the same image would race on its directory.
    let _lock = Flock::exclusive(&opts.out.join(format!(".{name}.lock")))?;
    let dir = opts.out.join(name);
    let locals = load_locals(&spec, &opts.images_dir)?;
    let cache = opts.cache_dir();
    // SAFETY: geteuid has no preconditions.
    let can_update = opts.apt_update && unsafe { libc::geteuid() } == 0;
    let mut updated = false;
    let (pkgs, hash, debs) = loop {
        let attempt = (|| {
            let pkgs = resolve(&spec, &cache, &progress)?;
            let hash = build_hash(&text, &pkgs, &locals);
            if !opts.force {
                if let Ok(m) = Manifest::load(&dir) {
                    if m.build_hash == hash && m.rootfs_in(&dir).is_dir() {
                        return Ok(None);
                    }
                }
            }
            let (debs, _) = apt::fetch(&cache, &pkgs, &progress)?;
            Ok(Some((pkgs, hash, debs)))
        })();
        match attempt {
            Ok(Some(r)) => break r,
            Ok(None) => {
                progress(format!("up to date ({})", dir.display()));
                return Ok(BuildOutcome::UpToDate { dir });
            }
            Err(e) if stale_lists(&e) && !updated && can_update => {
                progress(format!("{e}; running apt-get update"));
                if let Err(u) = apt::update() {
                    return Err(with_hint(e, &format!(" (apt-get update failed: {u})")));
                }
                updated = true;
            }
            Err(e) if stale_lists(&e) && updated => {
                return Err(with_hint(e, " (after apt-get update)"))
            }
            Err(e) if stale_lists(&e) => {
                return Err(with_hint(
                    e,
                    " (the package lists may be stale: run `apt-get update` as root, \
                     or build as root without --no-apt-update)",
                ))
            }
            Err(e) => return Err(e),
        }
    };

    let staging = opts.out.join(format!(".{name}.building"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err("cannot remove", &staging))?;
    }
    let rootfs_host = staging.join("rootfs");
    std::fs::create_dir_all(&rootfs_host).map_err(io_err("cannot create", &rootfs_host))?;
    let root = RootDir::open(&rootfs_host).map_err(io_err("cannot open", &rootfs_host))?;
    let guest_err = |what: &'static str, guest: &str| {
        let path = PathBuf::from(guest);
        move |source| ImageError::Io { what, path, source }
    };
    rootfs::usr_merge(&root).map_err(io_err("cannot lay out merged /usr in", &rootfs_host))?;
    if !debs.is_empty() {
        progress(format!("unpacking {} packages", debs.len()));
    }
    for deb in &debs {
        rootfs::unpack(&root, deb)?;
    }
    for p in PRUNED {
        root.remove_tree(p).map_err(guest_err("cannot remove", p))?;
    }
    rootfs::write_base_files(&root).map_err(io_err("cannot write base files in", &rootfs_host))?;
    rootfs::write_accounts(&root, &spec.users).map_err(guest_err("cannot write", "/etc/passwd"))?;
    for d in &spec.dirs {
        root.mkdir_p(&d.path, d.mode.map(|m| m.0))
            .map_err(guest_err("cannot create directory", &d.path))?;
    }
    for f in &spec.files {
        root.write_file(
            &f.path,
            f.content.as_bytes(),
            f.mode.map(|m| m.0).unwrap_or(0o644),
        )
        .map_err(guest_err("cannot write", &f.path))?;
    }
    for l in &locals {
        root.write_file(&l.to, &l.content, l.mode)
            .map_err(guest_err("cannot write", &l.to))?;
        tracing::debug!(from = %l.from.display(), to = %l.to, "local file copied");
    }

    let verify = |detail: String| ImageError::Verify {
        name: name.to_string(),
        detail,
    };
    let program = rootfs::check_program(&root, &spec.command[0]).map_err(verify)?;
    if let Some(w) = &spec.workdir {
        if !root.is_dir(w) {
            return Err(verify(format!(
                "the workdir {w} is not a directory in the root file system (add it to `dirs`)"
            )));
        }
    }
    if let Some(super::Health::Command { argv }) = &spec.health {
        if rootfs::find_program(&root, &argv[0]).is_none() {
            return Err(verify(format!(
                "the health check program {} is not in the root file system",
                argv[0]
            )));
        }
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let m = Manifest {
        format: manifest::FORMAT,
        name: name.to_string(),
        description: spec.description.clone(),
        rootfs: PathBuf::from("rootfs"),
        command: spec.command.clone(),
        env: spec.env.clone(),
        workdir: spec.workdir.clone(),
        ports: spec.ports.clone(),
        health: spec.health.clone(),
        packages: pkgs
            .iter()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect::<BTreeMap<_, _>>(),
        local_files: locals
            .iter()
            .map(|l| (l.to.clone(), l.sha256.clone()))
            .collect(),
        program: ProgramSummary {
            path: program.path,
            interp: program.interp,
            libraries: program.libraries,
        },
        build_hash: hash,
        built_at: manifest::rfc3339(now),
        builder: env!("CARGO_PKG_VERSION").to_string(),
    };
    m.save(&staging)?;

    // Replace the previous build only now that the new one is complete.
    if dir.exists() {
        let old = opts.out.join(format!(".{name}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err("cannot remove", &old))?;
        }
        std::fs::rename(&dir, &old).map_err(io_err("cannot move aside", &dir))?;
        std::fs::remove_dir_all(&old).map_err(io_err("cannot remove", &old))?;
    }
    std::fs::rename(&staging, &dir).map_err(io_err("cannot move into place", &staging))?;
    progress(format!(
        "built {} in {:.1} s: {} packages, {:.1} MB, command {}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        pkgs.len(),
        tree_size(&dir.join("rootfs")) as f64 / 1e6,
        m.program.path
    ));
    Ok(BuildOutcome::Built {
        dir,
        manifest: Box::new(m),
    })
}

/// Bytes of regular files under `dir` (symlinks not followed).
pub fn tree_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
