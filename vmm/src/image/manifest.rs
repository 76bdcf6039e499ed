//! `manifest.json`: what a built image is and how to run it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::{Health, Port};
use super::ImageError;

/// Version of the manifest format (and of the builder's output layout: a change rebuilds).
pub const FORMAT: u32 = 1;

/// The manifest file's name in an image directory.
pub const FILE: &str = "manifest.json";

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of the manifest (`FORMAT`).
    pub format: u32,
    /// Image name (the spec's file stem).
    pub name: String,
    /// The spec's description.
    pub description: String,
    /// The root file system, relative to the manifest's directory (or absolute).
    pub rootfs: PathBuf,
    /// argv of the server.
    pub command: Vec<String>,
    /// Environment (`K=V`).
    pub env: Vec<String>,
    /// Working directory inside the guest.
    pub workdir: Option<String>,
    /// Ports the server listens on (guest side).
    pub ports: Vec<Port>,
    /// Health check.
    pub health: Option<Health>,
    /// Debian packages unpacked, name → version.
    pub packages: BTreeMap<String, String>,
    /// Host files copied in: guest path → SHA-256.
    #[serde(default)]
    pub local_files: BTreeMap<String, String>,
    /// The program `command[0]` resolved to, its loader and libraries (guest paths).
    pub program: ProgramSummary,
    /// SHA-256 over the spec, the package versions and the local files: the image is
    /// rebuilt when it changes.
    pub build_hash: String,
    /// When the image was built (RFC 3339, UTC).
    pub built_at: String,
    /// The assure-vmm version that built it.
    pub builder: String,
}

/// The checked program of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramSummary {
    /// Guest path of the executable.
    pub path: String,
    /// PT_INTERP, for a dynamically linked program.
    pub interp: Option<String>,
    /// Shared libraries it loads at start.
    pub libraries: Vec<String>,
}

impl Manifest {
    /// Read `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, ImageError> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Io {
            what: "cannot read image manifest",
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text, &path)
    }

    /// Parse manifest JSON; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Manifest, ImageError> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| ImageError::Manifest {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(ImageError::Manifest {
                path: path.to_path_buf(),
                detail: format!(
                    "manifest format {} (this assure-vmm reads format {FORMAT}): rebuild the image",
                    m.format
                ),
            });
        }
        if m.command.first().is_none_or(|c| c.is_empty()) {
            return Err(ImageError::Manifest {
                path: path.to_path_buf(),
                detail: "the command is empty".into(),
            });
        }
        Ok(m)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Write `DIR/manifest.json`.
    pub fn save(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(FILE);
        std::fs::write(&path, self.to_json() + "\n").map_err(|source| ImageError::Io {
            what: "cannot write image manifest",
            path,
            source,
        })
    }

    /// The host path of the root file system of the image in `dir`.
    pub fn rootfs_in(&self, dir: &Path) -> PathBuf {
        if self.rootfs.is_absolute() {
            self.rootfs.clone()
        } else {
            dir.join(&self.rootfs)
        }
    }
}

/// RFC 3339 UTC time of a Unix timestamp (no time-zone database needed).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::spec::Protocol;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            name: "memcached".into(),
            description: "memcached on 127.0.0.1:11211".into(),
            rootfs: "rootfs".into(),
            command: vec!["/usr/bin/memcached".into(), "-u".into(), "root".into()],
            env: vec!["TZ=UTC".into()],
            workdir: Some("/var/lib/memcached".into()),
            ports: vec![Port {
                guest: 11211,
                protocol: Protocol::Tcp,
            }],
            health: Some(Health::Tcp { port: 11211 }),
            packages: [("libc6".to_string(), "2.36-9+deb12u10".to_string())].into(),
            local_files: BTreeMap::new(),
            program: ProgramSummary {
                path: "/usr/bin/memcached".into(),
                interp: Some("/lib64/ld-linux-x86-64.so.2".into()),
                libraries: vec!["/lib/x86_64-linux-gnu/libc.so.6".into()],
            },
            build_hash: "ab".repeat(32),
            built_at: rfc3339(0),
            builder: "0.1.0".into(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let json = m.to_json();
        assert!(json.contains("\"kind\": \"tcp\""), "{json}");
        assert!(json.contains("\"protocol\": \"tcp\""), "{json}");
        let back = Manifest::from_json(&json, Path::new("m.json")).expect("parse");
        assert_eq!(back, m);
        let dir = std::env::temp_dir().join(format!("assure-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        m.save(&dir).expect("save");
        assert_eq!(Manifest::load(&dir).expect("load"), m);
        assert_eq!(m.rootfs_in(&dir), dir.join("rootfs"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_manifests_are_named() {
        let e = Manifest::from_json("{}", Path::new("x/manifest.json")).expect_err("empty");
        assert!(
            e.to_string().starts_with("x/manifest.json: missing field"),
            "{e}"
        );
        let mut m = sample();
        m.format = 99;
        let e = Manifest::from_json(&m.to_json(), Path::new("m.json")).expect_err("format");
        assert!(e.to_string().contains("rebuild the image"), "{e}");
        let mut m = sample();
        m.command.clear();
        let e = Manifest::from_json(&m.to_json(), Path::new("m.json")).expect_err("command");
        assert!(e.to_string().contains("command is empty"), "{e}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
