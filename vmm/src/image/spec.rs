//! The image spec: `images/NAME.toml`, parsed and validated.
//!
//! Parsing is strict (unknown fields are errors, so a typo is never silently ignored) and
//! every error names the spec file and the field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::ImageError;

/// One server image, as written in `images/NAME.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// One line saying what the image serves.
    pub description: String,
    /// Debian packages to unpack (with their runtime dependency closure).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Packages left out of the closure, in addition to [`DEFAULT_EXCLUDES`].
    #[serde(default)]
    pub exclude: Vec<String>,
    /// argv of the server inside the guest; `command[0]` is a guest path or a PATH name.
    pub command: Vec<String>,
    /// Environment of the server (`K=V`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of the server (a guest path).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Ports the server listens on.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// How to tell that the server is up.
    #[serde(default)]
    pub health: Option<Health>,
    /// Files written into the root file system (configuration, content).
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Directories created in the root file system.
    #[serde(default)]
    pub dirs: Vec<DirEntry>,
    /// Host files copied into the root file system.
    #[serde(default)]
    pub local_files: Vec<LocalFile>,
    /// System users the packages' maintainer scripts would have created.
    #[serde(default)]
    pub users: Vec<User>,
}

/// Packages that only maintainer scripts or an init system use: a server never runs them,
/// and leaving them out keeps perl, systemd and debconf out of every image. A spec that
/// names one of them in `packages` still gets it.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    // System users are created by postinst scripts; the builder writes /etc/passwd itself.
    "adduser",
    "passwd",
    // Configuration questions asked by maintainer scripts.
    "debconf",
    "cdebconf",
    "debconf-2.0",
    "ucf",
    // Package management.
    "dpkg",
    "install-info",
    // Init integration: init scripts, service units, the init system itself.
    "init-system-helpers",
    "lsb-base",
    "sysvinit-utils",
    "systemd",
    "systemd-sysv",
    // The builder lays out the merged /usr itself.
    "usrmerge",
    "usr-is-merged",
];

/// A port the server listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The port inside the guest.
    pub guest: u16,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// How to tell that the server is up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Health {
    /// An HTTP GET of `path` on 127.0.0.1:`port` answers with a 2xx or 3xx status.
    Http {
        /// Guest port.
        port: u16,
        /// Request path.
        #[serde(default = "default_http_path")]
        path: String,
    },
    /// 127.0.0.1:`port` accepts a TCP connection.
    Tcp {
        /// Guest port.
        port: u16,
    },
    /// A program (argv inside the image) exits with status 0.
    Command {
        /// argv.
        argv: Vec<String>,
    },
}

fn default_http_path() -> String {
    "/".into()
}

/// A file written into the root file system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Absolute guest path.
    pub path: String,
    /// Contents.
    pub content: String,
    /// Permission bits (default 0644).
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A directory created in the root file system: `"/run"` or `{ path = "/tmp", mode = "1777" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits (default 0755).
    pub mode: Option<Mode>,
}

/// A host file copied into the root file system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// `guest-tools:NAME` (a program built by the guest-tools crate) or a host path
    /// (relative paths are relative to the spec's directory).
    pub from: String,
    /// Absolute guest path.
    pub to: String,
    /// Permission bits (default: those of the host file).
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A system user (and its group of the same name).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User and group name.
    pub name: String,
    /// Home directory (default `/nonexistent`).
    #[serde(default)]
    pub home: Option<String>,
}

/// Permission bits, written in the spec as an octal string (`"0644"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal mode string such as \"0644\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mode, E> {
                match u32::from_str_radix(s, 8) {
                    Ok(m) if m <= 0o7777 && !s.is_empty() => Ok(Mode(m)),
                    _ => Err(E::custom(format!(
                        "invalid mode {s:?}: expected an octal mode string such as \"0644\""
                    ))),
                }
            }
            // An integer is ambiguous (644 or 0o644?), so it is refused with a hint.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                Err(E::custom(format!(
                    "invalid mode {v}: write the mode as an octal string such as \"0644\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DirEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            path: String,
            #[serde(default)]
            mode: Option<Mode>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DirEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path string or a table { path = \"...\", mode = \"0755\" }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DirEntry, E> {
                Ok(DirEntry {
                    path: s.to_string(),
                    mode: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DirEntry, A::Error> {
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(DirEntry {
                    path: f.path,
                    mode: f.mode,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether `name` is a valid image name (also the spec's file stem).
pub fn valid_image_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name.len() <= 64
}

/// Whether `name` is a valid Debian package name (Debian policy 5.6.1).
pub fn valid_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
        && name.len() <= 32
}

/// Check that `p` is an absolute, normalized guest path (no `.`, `..` or empty components)
/// other than `/`.
pub fn check_guest_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} is not an absolute path"));
    }
    if p.contains('\0') {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    let rest = &p[1..];
    if rest.is_empty() {
        return Err("the root directory itself is not allowed here".into());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "{p:?} is not a normalized path (no empty, \".\" or \"..\" components, no trailing /)"
        ));
    }
    Ok(())
}

/// `K=V` with a non-empty key and no NUL.
fn check_env(kv: &str) -> Result<(), String> {
    match kv.split_once('=') {
        Some((k, _)) if !k.is_empty() && !kv.contains('\0') => Ok(()),
        _ => Err(format!("{kv:?} is not KEY=VALUE")),
    }
}

impl Spec {
    /// Parse and validate the text of a spec; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Spec, ImageError> {
        let spec: Spec = toml::from_str(text).map_err(|e| ImageError::Spec {
            file: file.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        spec.validate().map_err(|msg| ImageError::Spec {
            file: file.to_path_buf(),
            msg,
        })?;
        Ok(spec)
    }

    /// Read `DIR/NAME.toml`.
    pub fn load(images_dir: &Path, name: &str) -> Result<Spec, ImageError> {
        let (_, spec) = Self::load_with_text(images_dir, name)?;
        Ok(spec)
    }

    /// Read `DIR/NAME.toml`, returning its text too (it is hashed into the manifest).
    pub fn load_with_text(images_dir: &Path, name: &str) -> Result<(String, Spec), ImageError> {
        if !valid_image_name(name) {
            return Err(ImageError::InvalidName(name.to_string()));
        }
        let file = spec_path(images_dir, name);
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::UnknownImage {
                    name: name.to_string(),
                    dir: images_dir.to_path_buf(),
                    known: list_specs(images_dir).unwrap_or_default(),
                })
            }
            Err(source) => {
                return Err(ImageError::Io {
                    what: "cannot read image spec",
                    path: file,
                    source,
                })
            }
        };
        let spec = Spec::parse(&text, &file)?;
        Ok((text, spec))
    }

    /// Semantic checks serde cannot express; the error names the field.
    fn validate(&self) -> Result<(), String> {
        let field = |name: String, msg: String| format!("field `{name}`: {msg}");
        if self.description.trim().is_empty() {
            return Err(field("description".into(), "must not be empty".into()));
        }
        for (i, p) in self.packages.iter().enumerate() {
            if !valid_package_name(p) {
                return Err(field(
                    format!("packages[{i}]"),
                    format!("{p:?} is not a Debian package name"),
                ));
            }
        }
        for (i, p) in self.exclude.iter().enumerate() {
            if !valid_package_name(p) {
                return Err(field(
                    format!("exclude[{i}]"),
                    format!("{p:?} is not a Debian package name"),
                ));
            }
            if self.packages.contains(p) {
                return Err(field(
                    format!("exclude[{i}]"),
                    format!("{p:?} is also listed in `packages`"),
                ));
            }
        }
        match self.command.first() {
            None => return Err(field("command".into(), "must name a program".into())),
            Some(c) if c.is_empty() => {
                return Err(field("command[0]".into(), "must not be empty".into()))
            }
            Some(_) => {}
        }
        if let Some(i) = self.command.iter().position(|a| a.contains('\0')) {
            return Err(field(format!("command[{i}]"), "contains a NUL byte".into()));
        }
        for (i, kv) in self.env.iter().enumerate() {
            check_env(kv).map_err(|m| field(format!("env[{i}]"), m))?;
        }
        if let Some(w) = &self.workdir {
            if w != "/" {
                check_guest_path(w).map_err(|m| field("workdir".into(), m))?;
            }
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.guest == 0 {
                return Err(field(format!("ports[{i}].guest"), "must not be 0".into()));
            }
            if self.ports[..i].contains(p) {
                return Err(field(
                    format!("ports[{i}]"),
                    format!("port {} is listed twice", p.guest),
                ));
            }
        }
        match &self.health {
            Some(Health::Http { port, path }) => {
                if *port == 0 {
                    return Err(field("health.port".into(), "must not be 0".into()));
                }
                if !path.starts_with('/') {
                    return Err(field(
                        "health.path".into(),
                        format!("{path:?} must start with /"),
                    ));
                }
            }
            Some(Health::Tcp { port }) if *port == 0 => {
                return Err(field("health.port".into(), "must not be 0".into()))
            }
            Some(Health::Command { argv }) if argv.first().is_none_or(|a| a.is_empty()) => {
                return Err(field("health.argv".into(), "must name a program".into()))
            }
            _ => {}
        }
        let mut targets: Vec<&str> = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            check_guest_path(&f.path).map_err(|m| field(format!("files[{i}].path"), m))?;
            if targets.contains(&f.path.as_str()) {
                return Err(field(
                    format!("files[{i}].path"),
                    format!("{:?} is written twice", f.path),
                ));
            }
            targets.push(&f.path);
        }
        for (i, l) in self.local_files.iter().enumerate() {
            check_guest_path(&l.to).map_err(|m| field(format!("local_files[{i}].to"), m))?;
            if targets.contains(&l.to.as_str()) {
                return Err(field(
                    format!("local_files[{i}].to"),
                    format!("{:?} is written twice", l.to),
                ));
            }
            targets.push(&l.to);
            match l.from.strip_prefix("guest-tools:") {
                Some(name) if name.is_empty() || name.contains('/') => {
                    return Err(field(
                        format!("local_files[{i}].from"),
                        format!("{:?} does not name a guest-tools program", l.from),
                    ))
                }
                None if l.from.is_empty() => {
                    return Err(field(
                        format!("local_files[{i}].from"),
                        "must not be empty".into(),
                    ))
                }
                _ => {}
            }
        }
        for (i, d) in self.dirs.iter().enumerate() {
            check_guest_path(&d.path).map_err(|m| field(format!("dirs[{i}]"), m))?;
        }
        for (i, u) in self.users.iter().enumerate() {
            if !valid_user_name(&u.name) {
                return Err(field(
                    format!("users[{i}].name"),
                    format!("{:?} is not a valid user name", u.name),
                ));
            }
            if super::rootfs::BASE_USERS.iter().any(|b| b.0 == u.name)
                || super::rootfs::BASE_GROUPS.iter().any(|g| g.0 == u.name)
                || self.users[..i].iter().any(|o| o.name == u.name)
            {
                return Err(field(
                    format!("users[{i}].name"),
                    format!("user {:?} already exists", u.name),
                ));
            }
            if let Some(h) = &u.home {
                check_guest_path(h).map_err(|m| field(format!("users[{i}].home"), m))?;
            }
        }
        Ok(())
    }

    /// Every excluded package: the defaults and the spec's own, minus the spec's packages.
    pub fn effective_excludes(&self) -> Vec<String> {
        let mut all: Vec<String> = DEFAULT_EXCLUDES
            .iter()
            .map(|s| s.to_string())
            .chain(self.exclude.iter().cloned())
            .filter(|p| !self.packages.contains(p))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// `DIR/NAME.toml`.
pub fn spec_path(images_dir: &Path, name: &str) -> PathBuf {
    images_dir.join(format!("{name}.toml"))
}

/// Names of the specs in `dir` (sorted).
pub fn list_specs(dir: &Path) -> Result<Vec<String>, ImageError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        what: "cannot read the images directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".toml")?;
            valid_image_name(stem).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Spec, String> {
        Spec::parse(text, Path::new("images/t.toml")).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
description = "lighttpd serving /var/www/html"
packages = ["lighttpd"]
exclude = ["perl"]
command = ["/usr/sbin/lighttpd", "-D", "-f", "/etc/lighttpd/lighttpd.conf"]
env = ["TZ=UTC"]
workdir = "/var/www"
ports = [{ guest = 8080, protocol = "tcp" }, { guest = 8443 }]
health = { kind = "http", port = 8080 }
dirs = ["/var/log/lighttpd", { path = "/tmp", mode = "1777" }]
users = [{ name = "redis", home = "/var/lib/redis" }, { name = "memcache" }]

[[files]]
path = "/etc/lighttpd/lighttpd.conf"
content = "server.port = 8080\n"

[[files]]
path = "/var/www/html/index.html"
content = "hello\n"
mode = "0600"

[[local_files]]
from = "guest-tools:bugsrv"
to = "/usr/sbin/bugsrv"
"#;

    #[test]
    fn a_full_spec_parses() {
        let s = parse(GOOD).expect("good spec");
        assert_eq!(s.packages, ["lighttpd"]);
        assert_eq!(s.command[0], "/usr/sbin/lighttpd");
        assert_eq!(
            s.ports,
            [
                Port {
                    guest: 8080,
                    protocol: Protocol::Tcp
                },
                Port {
                    guest: 8443,
                    protocol: Protocol::Tcp
                }
            ]
        );
        assert_eq!(
            s.health,
            Some(Health::Http {
                port: 8080,
                path: "/".into()
            })
        );
        assert_eq!(s.files[1].mode, Some(Mode(0o600)));
        assert_eq!(s.files[0].mode, None);
        assert_eq!(
            s.dirs,
            [
                DirEntry {
                    path: "/var/log/lighttpd".into(),
                    mode: None
                },
                DirEntry {
                    path: "/tmp".into(),
                    mode: Some(Mode(0o1777))
                }
            ]
        );
        assert_eq!(s.local_files[0].from, "guest-tools:bugsrv");
        assert_eq!(s.users[0].home.as_deref(), Some("/var/lib/redis"));
        assert_eq!(s.workdir.as_deref(), Some("/var/www"));
        let ex = s.effective_excludes();
        assert!(ex.contains(&"perl".to_string()) && ex.contains(&"adduser".to_string()));
    }

    #[test]
    fn health_kinds_parse() {
        let base = "description = \"x\"\ncommand = [\"/x\"]\n";
        let s = parse(&format!("{base}health = {{ kind = \"tcp\", port = 6379 }}")).expect("tcp");
        assert_eq!(s.health, Some(Health::Tcp { port: 6379 }));
        let s = parse(&format!(
            "{base}health = {{ kind = \"command\", argv = [\"/usr/bin/redis-cli\", \"ping\"] }}"
        ))
        .expect("command");
        assert_eq!(
            s.health,
            Some(Health::Command {
                argv: vec!["/usr/bin/redis-cli".into(), "ping".into()]
            })
        );
    }

    #[test]
    fn a_package_listed_explicitly_is_never_excluded() {
        let s = parse("description = \"x\"\ncommand = [\"/x\"]\npackages = [\"perl\", \"dpkg\"]")
            .expect("spec");
        assert!(!s.effective_excludes().contains(&"dpkg".to_string()));
    }

    /// Each bad spec and the words its error must contain (the file is always named).
    #[test]
    fn bad_specs_name_the_file_and_the_field() {
        let base = "description = \"x\"\ncommand = [\"/x\"]\n";
        let cases: &[(String, &[&str])] = &[
            ("command = [\"/x\"]".into(), &["missing field `description`"]),
            (format!("{base}pacakges = [\"x\"]"), &["unknown field `pacakges`"]),
            (
                "description = \"x\"\ncommand = []".into(),
                &["field `command`", "must name a program"],
            ),
            (
                "description = \"\"\ncommand = [\"/x\"]".into(),
                &["field `description`", "empty"],
            ),
            (
                format!("{base}packages = [\"Bad_Name\"]"),
                &["field `packages[0]`", "\"Bad_Name\""],
            ),
            (
                format!("{base}packages = [\"perl\"]\nexclude = [\"perl\"]"),
                &["field `exclude[0]`", "also listed"],
            ),
            (format!("{base}env = [\"NOEQUALS\"]"), &["field `env[0]`", "KEY=VALUE"]),
            (format!("{base}workdir = \"rel\""), &["field `workdir`", "absolute"]),
            (format!("{base}ports = [{{ guest = 0 }}]"), &["field `ports[0].guest`"]),
            (
                format!("{base}ports = [{{ guest = 70000 }}]"),
                &["70000", "line 3"],
            ),
            (
                format!("{base}ports = [{{ guest = 80, protocol = \"sctp\" }}]"),
                &["sctp", "tcp", "udp"],
            ),
            (
                format!("{base}ports = [{{ guest = 80 }}, {{ guest = 80 }}]"),
                &["field `ports[1]`", "twice"],
            ),
            (
                format!("{base}health = {{ kind = \"smtp\", port = 25 }}"),
                &["smtp", "http"],
            ),
            (
                format!("{base}health = {{ kind = \"http\", port = 80, path = \"x\" }}"),
                &["field `health.path`"],
            ),
            (
                format!("{base}health = {{ kind = \"tcp\", port = 80, paht = \"/\" }}"),
                &["paht"],
            ),
            (
                format!("{base}[[files]]\npath = \"etc/x\"\ncontent = \"\""),
                &["field `files[0].path`", "absolute"],
            ),
            (
                format!("{base}[[files]]\npath = \"/etc/../x\"\ncontent = \"\""),
                &["field `files[0].path`", "normalized"],
            ),
            (
                format!("{base}[[files]]\npath = \"/etc/x\"\ncontent = \"\"\nmode = 644"),
                &["octal string", "line 6"],
            ),
            (
                format!("{base}[[files]]\npath = \"/etc/x\"\ncontent = \"\"\nmode = \"0x44\""),
                &["invalid mode \"0x44\""],
            ),
            (format!("{base}[[files]]\npath = \"/etc/x\""), &["missing field `content`"]),
            (
                format!("{base}dirs = [{{ path = \"/run\", mdoe = \"0755\" }}]"),
                &["unknown field `mdoe`"],
            ),
            (format!("{base}dirs = [\"/\"]"), &["field `dirs[0]`", "root directory"]),
            (
                format!("{base}local_files = [{{ from = \"guest-tools:\", to = \"/x\" }}]"),
                &["field `local_files[0].from`"],
            ),
            (
                format!("{base}[[files]]\npath = \"/x\"\ncontent = \"\"\n[[local_files]]\nfrom = \"a\"\nto = \"/x\""),
                &["field `local_files[0].to`", "twice"],
            ),
            (
                format!("{base}users = [{{ name = \"root\" }}]"),
                &["field `users[0].name`", "already exists"],
            ),
            (
                format!("{base}users = [{{ name = \"adm\" }}]"),
                &["field `users[0].name`", "already exists"],
            ),
            (
                format!("{base}users = [{{ name = \"Bad User\" }}]"),
                &["field `users[0].name`"],
            ),
            ("description = \"x\"\ncommand = [\"/x\"".into(), &["line 2"]),
        ];
        for (text, words) in cases {
            let err = match parse(text) {
                Ok(s) => panic!("accepted a bad spec:\n{text}\n{s:?}"),
                Err(e) => e,
            };
            assert!(err.starts_with("images/t.toml: "), "{err}");
            for w in *words {
                assert!(err.contains(w), "error for\n{text}\nlacks {w:?}:\n{err}");
            }
        }
    }

    #[test]
    fn names_and_paths() {
        assert!(valid_image_name("nginx-light"));
        assert!(!valid_image_name("../x"));
        assert!(!valid_image_name(""));
        assert!(!valid_image_name("Nginx"));
        assert!(valid_package_name("libstdc++6"));
        assert!(valid_package_name("libevent-2.1-7"));
        assert!(!valid_package_name("x"));
        assert!(check_guest_path("/etc/x.conf").is_ok());
        assert!(check_guest_path("/etc//x").is_err());
        assert!(check_guest_path("/etc/x/").is_err());
        assert!(check_guest_path("/etc/./x").is_err());
    }

    #[test]
    fn the_repository_specs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        let names = list_specs(&dir).expect("images dir");
        for want in [
            "bugsrv",
            "lighttpd",
            "memcached",
            "mosquitto",
            "nginx-light",
            "redis",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "images/{want}.toml missing"
            );
        }
        for n in &names {
            let s = Spec::load(&dir, n).unwrap_or_else(|e| panic!("{e}"));
            assert!(!s.ports.is_empty(), "{n}: no ports");
            assert!(s.health.is_some(), "{n}: no health check");
        }
    }
}
