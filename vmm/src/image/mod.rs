//! Server images: a small TOML spec per server (`images/NAME.toml`) becomes a root file
//! system of unpacked Debian packages (their runtime dependency closure, no maintainer
//! scripts) plus the server's configuration, described by a `manifest.json` that
//! `assure-vmm run --image` reads. docs/images.md describes the format and the layout.
//!
//! | module | what |
//! | --- | --- |
//! | `spec` | parsing and validation of the TOML spec |
//! | `apt` | dependency closure (a pure function over `apt-cache depends` output), download cache |
//! | `rootfs` | the root file system: confined writes, merged /usr, unpacking, program checks |
//! | `manifest` | `manifest.json` |
//! | `build` | the build steps |

mod apt;
mod build;
mod manifest;
pub mod rootfs;
mod spec;

use std::path::{Path, PathBuf};

pub use apt::{Closure, DependsGraph};
pub use build::{build, guest_tool_path, BuildOptions, BuildOutcome};
pub use manifest::{Manifest, ProgramSummary};
pub use spec::{
    list_specs, spec_path, valid_image_name, Health, Port, Protocol, Spec, DEFAULT_EXCLUDES,
};

/// Everything that can go wrong with images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A spec that does not parse or validate; `msg` names the field.
    #[error("{}: {msg}", file.display())]
    Spec {
        /// The spec file.
        file: PathBuf,
        /// What is wrong, and where.
        msg: String,
    },
    /// No spec of that name.
    #[error("no image spec {name:?} in {} (known: {})", dir.display(), if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownImage {
        /// Requested name.
        name: String,
        /// The images directory.
        dir: PathBuf,
        /// Specs that exist.
        known: Vec<String>,
    },
    /// A name that cannot be an image name.
    #[error("invalid image name {0:?}: use lowercase letters, digits, '.', '_' and '-'")]
    InvalidName(String),
    /// A host file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A host tool the builder needs is not installed.
    #[error("{tool} is not available ({source}); building images needs apt (apt-cache, apt-get), dpkg-deb and tar")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// A host tool failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command.
        command: String,
        /// Its error output.
        detail: String,
    },
    /// apt does not know these packages.
    #[error("apt does not know the package(s) {}{hint}", packages.join(", "))]
    PackageNotFound {
        /// The packages.
        packages: Vec<String>,
        /// What was tried, what to do.
        hint: String,
    },
    /// Packages that could not be downloaded.
    #[error("cannot fetch the package(s) {}: {detail}", packages.join(", "))]
    Fetch {
        /// The packages.
        packages: Vec<String>,
        /// apt's errors.
        detail: String,
    },
    /// A dependency nothing provides.
    #[error("{package} depends on {dependency}, which no package provides")]
    Unsatisfiable {
        /// The package.
        package: String,
        /// Its dependency (alternatives joined by `|`).
        dependency: String,
    },
    /// A .deb that does not unpack.
    #[error("cannot unpack {}: {detail}", deb.display())]
    Unpack {
        /// The .deb.
        deb: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A `guest-tools:NAME` source that cannot be found.
    #[error("cannot find the guest-tools program {name:?}: {detail}")]
    GuestTools {
        /// The program.
        name: String,
        /// Why, and what to do.
        detail: String,
    },
    /// The built root file system cannot run the command.
    #[error("image {name}: {detail}")]
    Verify {
        /// The image.
        name: String,
        /// What is missing.
        detail: String,
    },
    /// A manifest that cannot be used.
    #[error("{}: {detail}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// `run --image NAME` of an image that was never built.
    #[error("image {name} is not built ({} does not exist): run `assure-vmm image build {name}`", path.display())]
    NotBuilt {
        /// The image.
        name: String,
        /// The manifest that was looked for.
        path: PathBuf,
    },
}

/// A built image, opened for running.
#[derive(Debug, Clone)]
pub struct ImageRef {
    /// The image directory (holding `manifest.json`).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The host path of its root file system.
    pub rootfs: PathBuf,
}

/// Open a built image: `reference` is a name (looked up as `IMAGES_OUT/NAME/`) or, if it
/// contains a `/` or starts with `.`, an image directory holding `manifest.json`.
pub fn open(reference: &str, images_out: &Path) -> Result<ImageRef, ImageError> {
    let is_dir = reference.contains('/') || reference.starts_with('.');
    let dir = if is_dir {
        PathBuf::from(reference)
    } else {
        if !valid_image_name(reference) {
            return Err(ImageError::InvalidName(reference.to_string()));
        }
        images_out.join(reference)
    };
    let file = dir.join(manifest::FILE);
    if !file.is_file() {
        if is_dir {
            return Err(ImageError::Manifest {
                path: file,
                detail: "missing: not an image directory".into(),
            });
        }
        return Err(ImageError::NotBuilt {
            name: reference.to_string(),
            path: file,
        });
    }
    let manifest = Manifest::load(&dir)?;
    let rootfs = manifest.rootfs_in(&dir);
    if !rootfs.is_dir() {
        return Err(ImageError::Manifest {
            path: file,
            detail: format!("the root file system {} is missing", rootfs.display()),
        });
    }
    Ok(ImageRef {
        dir,
        manifest,
        rootfs,
    })
}

/// One line per spec in `images_dir`: name, build state, description.
pub fn list(images_dir: &Path, out: &Path) -> Result<String, ImageError> {
    let mut s = String::new();
    for name in list_specs(images_dir)? {
        let (state, desc) = match Spec::load(images_dir, &name) {
            Ok(spec) => {
                let state = match Manifest::load(&out.join(&name)) {
                    Ok(m) => format!("built {}", m.built_at),
                    Err(_) => "not built".to_string(),
                };
                (state, spec.description)
            }
            // The first line of the error (a TOML error shows the line below it).
            Err(e) => (
                "invalid".to_string(),
                e.to_string().lines().next().unwrap_or_default().to_string(),
            ),
        };
        s.push_str(&format!("{name:<14} {state:<30} {desc}\n"));
    }
    Ok(s)
}

/// A human-readable description of the spec `name` and of its build, if any.
pub fn show(name: &str, images_dir: &Path, out: &Path) -> Result<String, ImageError> {
    let spec = Spec::load(images_dir, name)?;
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<12} {v}\n"));
    line("name", name.to_string());
    line("spec", spec_path(images_dir, name).display().to_string());
    line("description", spec.description.clone());
    line("packages", spec.packages.join(" "));
    if !spec.exclude.is_empty() {
        line("exclude", spec.exclude.join(" "));
    }
    line("command", spec.command.join(" "));
    if !spec.env.is_empty() {
        line("env", spec.env.join(" "));
    }
    if let Some(w) = &spec.workdir {
        line("workdir", w.clone());
    }
    let ports: Vec<String> = spec
        .ports
        .iter()
        .map(|p| {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            format!("{}/{proto}", p.guest)
        })
        .collect();
    line("ports", ports.join(" "));
    line(
        "health",
        match &spec.health {
            Some(Health::Http { port, path }) => format!("http GET 127.0.0.1:{port}{path}"),
            Some(Health::Tcp { port }) => format!("tcp connect 127.0.0.1:{port}"),
            Some(Health::Command { argv }) => format!("command {}", argv.join(" ")),
            None => "none".into(),
        },
    );
    let files: Vec<&str> = spec
        .files
        .iter()
        .map(|f| f.path.as_str())
        .chain(spec.local_files.iter().map(|l| l.to.as_str()))
        .collect();
    line("files", files.join(" "));
    let dir = out.join(name);
    match Manifest::load(&dir) {
        Ok(m) => {
            line("built", format!("{} ({})", m.built_at, dir.display()));
            line("rootfs", m.rootfs_in(&dir).display().to_string());
            line(
                "program",
                match &m.program.interp {
                    Some(i) => format!(
                        "{} (loader {i}, {} libraries)",
                        m.program.path,
                        m.program.libraries.len()
                    ),
                    None => format!("{} (static)", m.program.path),
                },
            );
            let pkgs: Vec<String> = m.packages.iter().map(|(n, v)| format!("{n}={v}")).collect();
            line("unpacked", pkgs.join(" "));
        }
        Err(_) => line("built", format!("no (run `assure-vmm image build {name}`)")),
    }
    Ok(s)
}
