//! Debian packages through apt: the runtime dependency closure (`apt-cache depends`, parsed
//! by a pure function), candidate versions (`apt-cache show`), and a download cache filled
//! by `apt-get download`. Nothing is installed on the host and no maintainer script runs.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::ImageError;

/// The architecture of the guest (the VMM runs x86-64 code only).
pub const ARCH: &str = "amd64";

/// One alternative of a dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alt {
    name: String,
    /// A virtual package (`<name>` in apt-cache's output): only its providers exist.
    is_virtual: bool,
    /// Packages that provide `name` (the indented lines apt-cache prints under it).
    providers: Vec<String>,
}

/// `Depends` / `PreDepends` relations of every package in `apt-cache depends --recurse`
/// output: per package, a list of groups, each satisfied by any one of its alternatives.
#[derive(Debug, Default, Clone)]
pub struct DependsGraph {
    deps: HashMap<String, Vec<Vec<Alt>>>,
}

/// The packages an image needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// Selected packages, sorted.
    pub packages: Vec<String>,
    /// Dependencies left out because every alternative was excluded: (package, dependency).
    pub dropped: Vec<(String, String)>,
}

/// A package name without an architecture qualifier that means "this architecture".
fn normalize(name: &str) -> String {
    match name.rsplit_once(':') {
        Some((base, "any" | "native" | ARCH)) => base.to_string(),
        _ => name.to_string(),
    }
}

impl DependsGraph {
    /// Parse the output of `apt-cache depends --recurse --no-recommends ...`.
    ///
    /// The format: a package name at column 0 (`<name>` for a virtual package), then its
    /// relations as `  Kind: target` lines (`Kind` is Depends, PreDepends, Recommends, ...;
    /// a `|` in column 1 instead of a space ORs the line with the next one; `<target>` is a
    /// virtual package), each followed by the packages that provide the target, indented by
    /// four spaces. Only Depends and PreDepends matter at run time (Pre-Depends must be
    /// unpacked before the package, so they are certainly needed).
    pub fn parse(text: &str) -> DependsGraph {
        let mut deps: HashMap<String, Vec<Vec<Alt>>> = HashMap::new();
        let mut current: Option<String> = None;
        let mut group: Vec<Alt> = Vec::new();
        // Whether the last relation line was a Depends/PreDepends (provider lines attach to
        // it) and whether it was ORed with the next.
        let mut last_relevant = false;
        let mut last_or = false;
        let close = |deps: &mut HashMap<String, Vec<Vec<Alt>>>,
                     current: &Option<String>,
                     group: &mut Vec<Alt>| {
            if let (Some(pkg), false) = (current, group.is_empty()) {
                deps.entry(pkg.clone())
                    .or_default()
                    .push(std::mem::take(group));
            }
            group.clear();
        };
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if !line.starts_with(' ') {
                // A new package header.
                close(&mut deps, &current, &mut group);
                last_relevant = false;
                last_or = false;
                let name = line.trim();
                if name.starts_with('<') {
                    current = None;
                } else {
                    let n = normalize(name);
                    deps.entry(n.clone()).or_default();
                    current = Some(n);
                }
                continue;
            }
            if let Some(provider) = line.strip_prefix("    ") {
                if last_relevant {
                    let idx = if last_or {
                        group.len().checked_sub(1)
                    } else {
                        // The group was closed already; the provider belongs to its last alt.
                        None
                    };
                    let target = match idx {
                        Some(i) => group.get_mut(i),
                        None => current
                            .as_ref()
                            .and_then(|c| deps.get_mut(c))
                            .and_then(|groups| groups.last_mut())
                            .and_then(|g| g.last_mut()),
                    };
                    if let Some(alt) = target {
                        let p = normalize(provider.trim());
                        if !alt.providers.contains(&p) {
                            alt.providers.push(p);
                        }
                    }
                }
                continue;
            }
            // A relation: "  Kind: target" or " |Kind: target".
            let or = line.as_bytes().get(1) == Some(&b'|');
            let Some((kind, target)) = line[2.min(line.len())..].split_once(':') else {
                continue;
            };
            let target = target.trim();
            let relevant = matches!(kind.trim(), "Depends" | "PreDepends");
            if relevant {
                let (is_virtual, name) = match target.strip_prefix('<') {
                    Some(v) => (true, v.trim_end_matches('>')),
                    None => (false, target),
                };
                group.push(Alt {
                    name: normalize(name),
                    is_virtual,
                    providers: Vec::new(),
                });
                if !or {
                    close(&mut deps, &current, &mut group);
                }
            } else {
                // OR chains never mix kinds: a Recommends line ends any open group.
                close(&mut deps, &current, &mut group);
            }
            last_relevant = relevant;
            last_or = or;
        }
        close(&mut deps, &current, &mut group);
        DependsGraph { deps }
    }

    /// Whether apt knows `pkg` as a real package.
    pub fn contains(&self, pkg: &str) -> bool {
        self.deps.contains_key(pkg)
    }

    /// The closure of `roots` under Depends/PreDepends, choosing for each dependency the
    /// first alternative that is not excluded (for a virtual package: its first provider),
    /// unless an alternative is already selected. Roots are always selected. A dependency
    /// whose every alternative is excluded is dropped and reported; one with no
    /// alternative at all (a virtual package nothing provides) is an error.
    pub fn closure(&self, roots: &[String], exclude: &[String]) -> Result<Closure, ImageError> {
        let unknown: Vec<String> = roots
            .iter()
            .filter(|r| !self.contains(r))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(ImageError::PackageNotFound {
                packages: unknown,
                hint: String::new(),
            });
        }
        let excluded = |p: &str| exclude.iter().any(|e| e == p) && !roots.iter().any(|r| r == p);
        let mut selected: BTreeSet<String> = roots.iter().cloned().collect();
        let mut queue: VecDeque<String> = roots.iter().cloned().collect();
        let mut dropped = Vec::new();
        while let Some(pkg) = queue.pop_front() {
            for group in self.deps.get(&pkg).map(Vec::as_slice).unwrap_or(&[]) {
                let mut candidates: Vec<&str> = Vec::new();
                let mut any_excluded = false;
                for alt in group {
                    if excluded(&alt.name) {
                        any_excluded = true;
                        continue;
                    }
                    if alt.is_virtual {
                        for p in &alt.providers {
                            if excluded(p) {
                                any_excluded = true;
                            } else {
                                candidates.push(p);
                            }
                        }
                    } else {
                        candidates.push(&alt.name);
                    }
                }
                if candidates.iter().any(|c| selected.contains(*c)) {
                    continue;
                }
                let describe = || {
                    group
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" | ")
                };
                match candidates.first() {
                    Some(c) => {
                        selected.insert(c.to_string());
                        queue.push_back(c.to_string());
                    }
                    None if any_excluded => dropped.push((pkg.clone(), describe())),
                    None => {
                        return Err(ImageError::Unsatisfiable {
                            package: pkg.clone(),
                            dependency: describe(),
                        })
                    }
                }
            }
        }
        dropped.sort();
        dropped.dedup();
        Ok(Closure {
            packages: selected.into_iter().collect(),
            dropped,
        })
    }
}

/// The candidate version of a package, as `apt-cache show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    /// Package name.
    pub name: String,
    /// Version (with epoch).
    pub version: String,
    /// Architecture (`amd64` or `all`).
    pub arch: String,
    /// SHA-256 of the .deb, lowercase hex.
    pub sha256: String,
    /// Size of the .deb in bytes.
    pub size: u64,
}

impl PackageInfo {
    /// The file name `apt-get download` gives the .deb (the epoch colon is quoted).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

/// Parse `apt-cache show --no-all-versions` output into one entry per package (the first
/// stanza of a package wins).
pub fn parse_show(text: &str) -> BTreeMap<String, PackageInfo> {
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for line in stanza.lines() {
            if line.starts_with(' ') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.entry(k).or_insert(v.trim());
            }
        }
        let get = |k: &str| fields.get(k).map(|v| v.to_string());
        if let (Some(name), Some(version), Some(arch), Some(sha256)) = (
            get("Package"),
            get("Version"),
            get("Architecture"),
            get("SHA256"),
        ) {
            let size = get("Size").and_then(|s| s.parse().ok()).unwrap_or(0);
            out.entry(name.clone()).or_insert(PackageInfo {
                name,
                version,
                arch,
                sha256,
                size,
            });
        }
    }
    out
}

/// Output of a finished command.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// apt's binary package cache, kept in the image cache directory. Without it (container
/// images disable /var/cache/apt/pkgcache.bin) every apt-cache call re-reads all package
/// lists, about a second each; apt revalidates it against the lists itself.
fn pkgcache_option(cache: &Path) -> String {
    format!(
        "Dir::Cache::pkgcache={}",
        cache.join("apt-pkgcache.bin").display()
    )
}

/// Run an apt tool; `cache` (the .deb cache directory) also holds apt's binary cache.
fn run(
    tool: &'static str,
    args: &[&str],
    cwd: Option<&Path>,
    cache: Option<&Path>,
) -> Result<Output, ImageError> {
    let mut cmd = Command::new(tool);
    if let Some(c) = cache {
        cmd.arg("-o").arg(pkgcache_option(c));
    }
    cmd.args(args)
        .stdin(Stdio::null())
        // apt's output must be parseable: no translations.
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ImageError::ToolMissing { tool, source }
        } else {
            ImageError::Command {
                command: tool.to_string(),
                detail: source.to_string(),
            }
        }
    })?;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// apt's error lines (`E: ...`), or the whole stderr if there are none.
fn apt_errors(stderr: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("E:")).collect();
    if errors.is_empty() {
        stderr.trim().to_string()
    } else {
        errors.join("; ")
    }
}

/// Resolve the closure of `roots` with apt's package lists.
pub fn resolve(cache: &Path, roots: &[String], exclude: &[String]) -> Result<Closure, ImageError> {
    let mut args = vec![
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
    ];
    args.extend(roots.iter().map(String::as_str));
    let out = run("apt-cache", &args, None, Some(cache))?;
    // apt-cache depends fails only when it knows none of the roots; unknown ones are
    // found missing by `closure`.
    if !out.ok && !out.stderr.contains("No packages found") {
        return Err(ImageError::Command {
            command: "apt-cache depends".into(),
            detail: apt_errors(&out.stderr),
        });
    }
    DependsGraph::parse(&out.stdout).closure(roots, exclude)
}

/// Candidate versions of `packages`.
pub fn show(
    cache: &Path,
    packages: &[String],
) -> Result<BTreeMap<String, PackageInfo>, ImageError> {
    let mut args = vec!["show", "--no-all-versions"];
    args.extend(packages.iter().map(String::as_str));
    let out = run("apt-cache", &args, None, Some(cache))?;
    let infos = parse_show(&out.stdout);
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| !infos.contains_key(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ImageError::PackageNotFound {
            packages: missing,
            hint: String::new(),
        });
    }
    Ok(infos)
}

/// `apt-get update` (once per build, when the package lists do not know a package).
pub fn update() -> Result<(), ImageError> {
    let out = run("apt-get", &["update", "-q"], None, None)?;
    if out.ok {
        Ok(())
    } else {
        Err(ImageError::Command {
            command: "apt-get update".into(),
            detail: apt_errors(&out.stderr),
        })
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the cache holds `pkg`'s .deb with the right checksum.
fn cached(cache: &Path, pkg: &PackageInfo) -> bool {
    let path = cache.join(pkg.deb_file_name());
    matches!(sha256_file(&path), Ok(sum) if sum == pkg.sha256)
}

/// The .debs of `pkgs` in `cache`, downloading those that are missing or damaged. Returns
/// their paths and how many were downloaded.
pub fn fetch(
    cache: &Path,
    pkgs: &[PackageInfo],
    progress: &dyn Fn(String),
) -> Result<(Vec<PathBuf>, usize), ImageError> {
    if pkgs.is_empty() {
        return Ok((Vec::new(), 0));
    }
    // Builds of several images share the cache: one apt-get at a time writes to it.
    let _lock = super::rootfs::Flock::exclusive(&cache.join(".lock"))?;
    let missing: Vec<&PackageInfo> = pkgs.iter().filter(|p| !cached(cache, p)).collect();
    if !missing.is_empty() {
        let bytes: u64 = missing.iter().map(|p| p.size).sum();
        progress(format!(
            "downloading {} of {} packages ({:.1} MB; {} cached)",
            missing.len(),
            pkgs.len(),
            bytes as f64 / 1e6,
            pkgs.len() - missing.len()
        ));
        for p in &missing {
            // A damaged file would make apt-get skip the download.
            std::fs::remove_file(cache.join(p.deb_file_name())).ok();
        }
        let specs: Vec<String> = missing
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect();
        let mut args = vec!["download", "-q"];
        // As root, apt drops to the _apt user, which cannot write to a cache in a user's
        // tree; it then warns and downloads as root anyway. Ask for that directly.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            args.extend(["-o", "APT::Sandbox::User=root"]);
        }
        args.extend(specs.iter().map(String::as_str));
        let out = run("apt-get", &args, Some(cache), Some(cache))?;
        let still: Vec<String> = missing
            .iter()
            .filter(|p| !cached(cache, p))
            .map(|p| p.name.clone())
            .collect();
        if !out.ok || !still.is_empty() {
            let detail = apt_errors(&out.stderr);
            if detail.contains("Unable to locate package") || detail.contains("was not found") {
                return Err(ImageError::PackageNotFound {
                    packages: still,
                    hint: format!(" ({detail})"),
                });
            }
            return Err(ImageError::Fetch {
                packages: still,
                detail: if detail.is_empty() {
                    "the downloaded file does not match the archive's checksum".into()
                } else {
                    detail
                },
            });
        }
    } else {
        progress(format!("{} packages, all cached", pkgs.len()));
    }
    let paths = pkgs.iter().map(|p| cache.join(p.deb_file_name())).collect();
    Ok((paths, missing.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn defaults() -> Vec<String> {
        s(super::super::spec::DEFAULT_EXCLUDES)
    }

    /// Real output of `apt-cache depends --recurse --no-recommends --no-suggests
    /// --no-conflicts --no-breaks --no-replaces --no-enhances memcached` on bookworm.
    const MEMCACHED: &str = include_str!("testdata/memcached.depends");
    /// The same for lighttpd (alternatives `media-types | mime-support` and
    /// `systemd-sysv | lsb-base`).
    const LIGHTTPD: &str = include_str!("testdata/lighttpd.depends");

    #[test]
    fn memcached_closure_without_maintainer_script_tools() {
        let g = DependsGraph::parse(MEMCACHED);
        let mut ex = defaults();
        ex.push("perl".into());
        let c = g.closure(&s(&["memcached"]), &ex).expect("closure");
        assert_eq!(
            c.packages,
            s(&[
                "gcc-12-base",
                "libc6",
                "libdb5.3",
                "libevent-2.1-7",
                "libgcc-s1",
                "libsasl2-2",
                "libsasl2-modules-db",
                "libssl3",
                "memcached",
            ])
        );
        // perl and perl:any (virtual, provided by perl: the same name once the
        // architecture qualifier is dropped) are gone.
        assert!(c.dropped.contains(&("memcached".into(), "perl".into())));
        assert!(!c.packages.iter().any(|p| p.starts_with("perl")));
        assert!(c
            .dropped
            .contains(&("memcached".into(), "init-system-helpers".into())));
    }

    #[test]
    fn everything_is_followed_without_excludes() {
        let g = DependsGraph::parse(MEMCACHED);
        let c = g.closure(&s(&["memcached"]), &[]).expect("closure");
        // Pre-Depends are followed (dpkg pre-depends on its libraries).
        for p in [
            "perl",
            "dpkg",
            "libzstd1",
            "tar",
            "adduser",
            "init-system-helpers",
        ] {
            assert!(c.packages.iter().any(|x| x == p), "{p} missing: {c:?}");
        }
        // `usrmerge | usr-is-merged`: the first alternative is chosen, not both.
        assert!(c.packages.iter().any(|x| x == "usrmerge"));
        assert!(!c.packages.iter().any(|x| x == "usr-is-merged"));
        // Virtual packages never appear themselves.
        assert!(c
            .packages
            .iter()
            .all(|p| !p.contains(':') && !p.contains('<')));
        assert!(c.dropped.is_empty());
    }

    #[test]
    fn alternatives_fall_through_excluded_ones() {
        let g = DependsGraph::parse(LIGHTTPD);
        let c = g.closure(&s(&["lighttpd"]), &defaults()).expect("closure");
        // systemd-sysv is excluded, so `systemd-sysv | lsb-base` falls to lsb-base, which
        // is excluded too: dropped. media-types is the first of `media-types | mime-support`.
        assert!(c.packages.iter().any(|p| p == "media-types"));
        assert!(!c.packages.iter().any(|p| p == "mime-support"));
        assert!(!c
            .packages
            .iter()
            .any(|p| p.starts_with("systemd") || p == "perl"));
        assert!(c
            .dropped
            .contains(&("lighttpd".into(), "systemd-sysv | lsb-base".into())));
        assert_eq!(
            c.packages,
            s(&[
                "gcc-12-base",
                "libc6",
                "libcrypt1",
                "libgcc-s1",
                "libnettle8",
                "libpcre2-8-0",
                "libxxhash0",
                "lighttpd",
                "media-types",
            ])
        );
        // Excluding the first alternative selects the second.
        let mut ex = defaults();
        ex.push("media-types".into());
        let c = g.closure(&s(&["lighttpd"]), &ex).expect("closure");
        assert!(c.packages.iter().any(|p| p == "mime-support"));
    }

    #[test]
    fn an_already_selected_alternative_satisfies_a_group() {
        let text = "a\n |Depends: x\n  Depends: y\n  Depends: b\nb\n  Depends: y\nx\ny\n";
        let g = DependsGraph::parse(text);
        let c = g.closure(&s(&["a", "y"]), &[]).expect("closure");
        assert_eq!(c.packages, s(&["a", "b", "y"]));
    }

    #[test]
    fn virtual_packages_pick_one_provider() {
        let text = "a\n  Depends: <v>\n    p1\n    p2\n  Recommends: r\n  PreDepends: c\n<v>\np1\np2\nc\nr\n";
        let g = DependsGraph::parse(text);
        let c = g.closure(&s(&["a"]), &[]).expect("closure");
        assert_eq!(c.packages, s(&["a", "c", "p1"]));
        let c = g.closure(&s(&["a"]), &s(&["p1"])).expect("closure");
        assert_eq!(c.packages, s(&["a", "c", "p2"]));
        // Excluding the virtual name itself drops the dependency.
        let c = g.closure(&s(&["a"]), &s(&["v"])).expect("closure");
        assert_eq!(c.packages, s(&["a", "c"]));
        assert_eq!(c.dropped, vec![("a".to_string(), "v".to_string())]);
    }

    #[test]
    fn unknown_roots_and_unprovided_virtuals_are_errors() {
        let g = DependsGraph::parse("a\n  Depends: <nothing>\n");
        let e = g.closure(&s(&["a"]), &[]).expect_err("unsatisfiable");
        assert!(e.to_string().contains("a depends on nothing"), "{e}");
        let e = g.closure(&s(&["zz", "a"]), &[]).expect_err("unknown");
        assert!(e.to_string().contains("zz"), "{e}");
    }

    #[test]
    fn architecture_qualifiers() {
        let text = "a\n  Depends: b:any\n  Depends: c:amd64\nb\nc\n";
        let g = DependsGraph::parse(text);
        let c = g.closure(&s(&["a"]), &[]).expect("closure");
        assert_eq!(c.packages, s(&["a", "b", "c"]));
    }

    #[test]
    fn show_output_and_deb_names() {
        let text = "Package: redis-tools\nVersion: 5:7.0.15-1~deb12u10\nArchitecture: amd64\n\
                    Description: x\n more text: with colon\nSize: 991988\n\
                    SHA256: f791cfcbf3054832bd6e786546acb0d4e046888f8e63bcf567c1c65fbfaf69e2\n\n\
                    Package: libc6\nVersion: 2.36-9+deb12u14\nArchitecture: amd64\nSize: 10\n\
                    SHA256: 00\n\n";
        let m = parse_show(text);
        assert_eq!(m.len(), 2);
        let r = &m["redis-tools"];
        assert_eq!(r.size, 991988);
        assert_eq!(
            r.deb_file_name(),
            "redis-tools_5%3a7.0.15-1~deb12u10_amd64.deb"
        );
        assert_eq!(
            m["libc6"].deb_file_name(),
            "libc6_2.36-9+deb12u14_amd64.deb"
        );
    }
}
