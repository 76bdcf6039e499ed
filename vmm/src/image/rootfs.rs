//! The root file system of an image: a host directory that every operation treats as `/`.
//!
//! All writes the builder makes go through `openat2(RESOLVE_IN_ROOT)` on a directory fd of
//! the root, so a symlink shipped by a package (`/var/run -> /run`, or an absolute
//! `/lib64/ld-linux-x86-64.so.2`) is followed inside the root, never to the host. Packages
//! are unpacked with tar, which follows existing directory symlinks as the host sees them;
//! so after each package its absolute symlinks (and relative ones that climb above `/`) are
//! rewritten as relative symlinks that mean the same inside the root and stay inside it on
//! the host.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{elf, Endianness};

use super::spec::User;
use super::ImageError;

/// Users of Debian's base-passwd that servers look up: (name, uid, gid, home, shell).
pub const BASE_USERS: &[(&str, u32, u32, &str, &str)] = &[
    ("root", 0, 0, "/root", "/bin/sh"),
    ("daemon", 1, 1, "/usr/sbin", "/usr/sbin/nologin"),
    ("bin", 2, 2, "/bin", "/usr/sbin/nologin"),
    ("sys", 3, 3, "/dev", "/usr/sbin/nologin"),
    ("www-data", 33, 33, "/var/www", "/usr/sbin/nologin"),
    ("nobody", 65534, 65534, "/nonexistent", "/usr/sbin/nologin"),
];

/// Groups of Debian's base-passwd that servers look up: (name, gid).
pub const BASE_GROUPS: &[(&str, u32)] = &[
    ("root", 0),
    ("daemon", 1),
    ("bin", 2),
    ("sys", 3),
    ("adm", 4),
    ("tty", 5),
    ("www-data", 33),
    ("nogroup", 65534),
];

/// First uid/gid of the spec's system users (Debian's dynamic system range is 100-999).
const FIRST_SYSTEM_ID: u32 = 100;

/// Where ld.so looks for libraries without an ld.so.cache (Debian's system search path).
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];

/// The dynamic loader every x86-64 glibc program names in PT_INTERP.
pub const LD_SO: &str = "/lib64/ld-linux-x86-64.so.2";

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub struct Flock(#[allow(dead_code)] std::fs::File);

impl Flock {
    /// Create `path` if needed and lock it (waits for another holder).
    pub fn exclusive(path: &Path) -> Result<Flock, ImageError> {
        let io_err = |source| ImageError::Io {
            what: "cannot lock",
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(io::Error::last_os_error()));
        }
        Ok(Flock(f))
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Split a guest path into its parent and last component (`("/", "x")` for `/x`).
fn split_parent(guest: &str) -> io::Result<(&str, &str)> {
    let trimmed = guest.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) if !trimmed[i + 1..].is_empty() => {
            Ok((if i == 0 { "/" } else { &trimmed[..i] }, &trimmed[i + 1..]))
        }
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// A root file system being built or inspected.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    host: PathBuf,
}

impl RootDir {
    /// Open an existing directory as a root.
    pub fn open(host: &Path) -> io::Result<RootDir> {
        let host = host.canonicalize()?;
        let c = CString::new(host.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RootDir { fd, host })
    }

    /// The host path of the root.
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    /// `openat2(root, guest, flags, RESOLVE_IN_ROOT)`: symlinks resolve inside the root.
    fn open_in_root(&self, guest: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let rel = guest.trim_start_matches('/');
        let c = cstr(if rel.is_empty() { "." } else { rel })?;
        // SAFETY: open_how is plain data; all-zero is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = if flags & libc::O_CREAT != 0 {
            u64::from(mode)
        } else {
            0
        };
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        crate::fs::openat2(self.fd.as_raw_fd(), &c, &how)
            .map_err(|e| io::Error::from_raw_os_error(e.0))
    }

    /// `stat` of a guest path, following symlinks inside the root.
    pub fn stat(&self, guest: &str) -> io::Result<libc::stat> {
        let fd = self.open_in_root(guest, libc::O_PATH, 0)?;
        fstat(fd.as_raw_fd())
    }

    /// `lstat` of a guest path (the last component is not followed).
    pub fn lstat(&self, guest: &str) -> io::Result<libc::stat> {
        let (parent, name) = split_parent(guest)?;
        let dir = self.open_in_root(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(name)?;
        // SAFETY: zeroed stat is valid plain data; valid dirfd and name.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the kernel writes into `st`.
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    /// Whether a guest path exists as a regular file (symlinks followed inside the root).
    pub fn is_file(&self, guest: &str) -> bool {
        matches!(self.stat(guest), Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG)
    }

    /// Whether a guest path exists as a directory (symlinks followed inside the root).
    pub fn is_dir(&self, guest: &str) -> bool {
        matches!(self.stat(guest), Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR)
    }

    /// The contents of a guest file.
    pub fn read(&self, guest: &str) -> io::Result<Vec<u8>> {
        let fd = self.open_in_root(guest, libc::O_RDONLY, 0)?;
        let mut f = std::fs::File::from(fd);
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// The guest path a guest directory really is at (symlinks resolved inside the root).
    pub fn real_dir(&self, guest: &str) -> io::Result<String> {
        let fd = self.open_in_root(guest, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let host = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let rel = host
            .strip_prefix(&self.host)
            .map_err(|_| io::Error::from_raw_os_error(libc::EXDEV))?;
        let s = rel
            .to_str()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(format!("/{s}"))
    }

    /// `mkdir -p`; the last directory gets `mode` (exactly, whatever the umask) if given.
    /// A dangling symlink on the way (`/var/run -> /run` before `/run` exists) has its
    /// target created, inside the root.
    pub fn mkdir_p(&self, guest: &str, mode: Option<u32>) -> io::Result<()> {
        self.mkdir_p_depth(guest, 0)?;
        let dir = self.open_in_root(guest, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        if let Some(m) = mode {
            fchmod(dir.as_raw_fd(), m)?;
        }
        Ok(())
    }

    fn mkdir_p_depth(&self, guest: &str, depth: u32) -> io::Result<()> {
        // Linux's own limit on symlinks followed in one lookup.
        if depth > 40 {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let mut prefix = String::new();
        for comp in guest.split('/').filter(|c| !c.is_empty()) {
            let parent = if prefix.is_empty() {
                "/".to_string()
            } else {
                prefix.clone()
            };
            let dir = self.open_in_root(&parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let c = cstr(comp)?;
            // SAFETY: valid dirfd and name.
            let r = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
            let exists = r != 0;
            if exists {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            prefix.push('/');
            prefix.push_str(comp);
            if exists && !self.is_dir(&prefix) {
                // Not a directory: a symlink whose target does not exist yet gets it made;
                // anything else fails when it is opened as a directory.
                if let Some(target) = self.read_link(&prefix)? {
                    let base = if target.starts_with('/') {
                        String::new()
                    } else {
                        self.real_dir(&parent)?
                    };
                    let abs = format!("/{}", normalize(&format!("{base}/{target}")).join("/"));
                    self.mkdir_p_depth(&abs, depth + 1)?;
                }
            }
        }
        Ok(())
    }
    /// Remove a guest path's last component if it is not a directory.
    fn unlink_non_dir(&self, dir: &OwnedFd, name: &CString) -> io::Result<()> {
        // SAFETY: valid dirfd and name.
        let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Write a file (parents created), replacing a file or symlink already there.
    pub fn write_file(&self, guest: &str, content: &[u8], mode: u32) -> io::Result<()> {
        let (parent, name) = split_parent(guest)?;
        self.mkdir_p(parent, None)?;
        let dir = self.open_in_root(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(name)?;
        self.unlink_non_dir(&dir, &c)?;
        // SAFETY: valid dirfd and name; O_EXCL|O_NOFOLLOW: a fresh file, never a link.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        io::Write::write_all(&mut f, content)?;
        fchmod(f.as_raw_fd(), mode)
    }

    /// Create a symlink `guest -> target`, replacing a file or symlink already there.
    pub fn symlink(&self, target: &str, guest: &str) -> io::Result<()> {
        let (parent, name) = split_parent(guest)?;
        let dir = self.open_in_root(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(name)?;
        self.unlink_non_dir(&dir, &c)?;
        let t = cstr(target)?;
        // SAFETY: valid strings and dirfd.
        if unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The target of a symlink (`None` if `guest` is not a symlink).
    pub fn read_link(&self, guest: &str) -> io::Result<Option<String>> {
        let st = self.lstat(guest)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Ok(None);
        }
        let (parent, name) = split_parent(guest)?;
        let dir = self.open_in_root(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let c = cstr(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: valid dirfd/name; the buffer is writable for its length.
        let n = unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        String::from_utf8(buf)
            .map(Some)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Remove a directory tree, provided that every component of `guest` is a real
    /// directory (so the host path names the same directory as the guest path).
    pub fn remove_tree(&self, guest: &str) -> io::Result<()> {
        let mut prefix = String::new();
        for comp in guest.split('/').filter(|c| !c.is_empty()) {
            prefix.push('/');
            prefix.push_str(comp);
            let st = match self.lstat(&prefix) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(e),
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
        }
        std::fs::remove_dir_all(self.host.join(prefix.trim_start_matches('/')))
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is valid plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd; the kernel writes into `st`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(fd, mode & 0o7777) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lexically normalize an absolute guest path: `.` dropped, `..` clamped at `/`.
fn normalize(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// A relative symlink target, from directory `from` to `to` (both normalized components).
fn relative(from: &[&str], to: &[&str]) -> String {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<&str> = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// Whether a relative target climbs above `/` from directory depth `depth`.
fn climbs_out(depth: usize, target: &str) -> bool {
    let mut d = depth as isize;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                d -= 1;
                if d < 0 {
                    return true;
                }
            }
            _ => d += 1,
        }
    }
    false
}

/// The in-root rewrite of a symlink at real directory `dir` with `target`, if it needs one.
pub fn rewrite_target(dir: &str, target: &str) -> Option<String> {
    let dir_parts = normalize(dir);
    if target.starts_with('/') {
        return Some(relative(&dir_parts, &normalize(target)));
    }
    if climbs_out(dir_parts.len(), target) {
        let abs = format!("{dir}/{target}");
        return Some(relative(&dir_parts, &normalize(&abs)));
    }
    None
}

/// Merged-/usr layout (Debian bookworm): `/bin`, `/sbin`, `/lib` and `/lib64` are symlinks
/// into `/usr`, made before any package is unpacked so that files packaged under `/lib` land
/// in `/usr/lib` (tar is told to keep directory symlinks).
pub fn usr_merge(root: &RootDir) -> io::Result<()> {
    for dir in ["bin", "sbin", "lib", "lib64"] {
        root.mkdir_p(&format!("/usr/{dir}"), Some(0o755))?;
        root.symlink(&format!("usr/{dir}"), &format!("/{dir}"))?;
    }
    Ok(())
}

/// Unpack a .deb's files into the root (`dpkg-deb --fsys-tarfile | tar -x`), without running
/// any maintainer script, then make its symlinks stay inside the root.
pub fn unpack(root: &RootDir, deb: &Path) -> Result<(), ImageError> {
    let fail = |detail: String| ImageError::Unpack {
        deb: deb.to_path_buf(),
        detail,
    };
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::ToolMissing {
                tool: "dpkg-deb",
                source,
            },
            _ => fail(source.to_string()),
        })?;
    let Some(tar_in) = dpkg.stdout.take() else {
        return Err(fail("no pipe from dpkg-deb".into()));
    };
    // dpkg-deb -x would replace the /lib -> usr/lib symlinks by directories:
    // --keep-directory-symlink is what makes the merged /usr work. Ownership is the
    // builder's (the guest runs with the host's identity anyway).
    let tar = Command::new("tar")
        .args([
            "-x",
            "--keep-directory-symlink",
            "--no-same-owner",
            "-f",
            "-",
            "-C",
        ])
        .arg(root.host_path())
        .stdin(tar_in)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::ToolMissing {
                tool: "tar",
                source,
            },
            _ => fail(source.to_string()),
        })?;
    let dpkg = dpkg.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !dpkg.status.success() {
        return Err(fail(format!(
            "dpkg-deb: {}",
            String::from_utf8_lossy(&dpkg.stderr).trim()
        )));
    }
    if !tar.status.success() {
        return Err(fail(format!(
            "tar: {}",
            String::from_utf8_lossy(&tar.stderr).trim()
        )));
    }
    confine_symlinks(root).map_err(|e| fail(format!("making its symlinks relative: {e}")))
}

/// Rewrite every symlink of the root that is absolute or climbs above `/` as a relative one
/// with the same meaning inside the root. The walk never enters a symlink, so the host path
/// of every directory it visits is that directory's guest path. (A whole walk per package
/// is a few milliseconds, and it does not depend on parsing tar's listing.)
pub fn confine_symlinks(root: &RootDir) -> io::Result<()> {
    let not_utf8 = |p: &Path| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a UTF-8 name", p.display()),
        )
    };
    let mut stack = vec![String::from("/")];
    while let Some(dir) = stack.pop() {
        let host = root.host.join(dir.trim_start_matches('/'));
        for entry in std::fs::read_dir(&host)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| not_utf8(&entry.path()))?;
            let guest = if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(guest);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                let target = target.to_str().ok_or_else(|| not_utf8(&entry.path()))?;
                if let Some(new) = rewrite_target(&dir, target) {
                    root.symlink(&new, &guest)?;
                }
            }
        }
    }
    Ok(())
}

/// `/etc/passwd` and `/etc/group`: base-passwd's users and groups, then the spec's system
/// users (uid = gid from 100 on, in spec order), as maintainer scripts would have added them.
pub fn write_accounts(root: &RootDir, users: &[User]) -> io::Result<()> {
    let mut passwd = String::new();
    let mut group = String::new();
    for (name, uid, gid, home, shell) in BASE_USERS {
        passwd.push_str(&format!("{name}:x:{uid}:{gid}:{name}:{home}:{shell}\n"));
    }
    for (name, gid) in BASE_GROUPS {
        group.push_str(&format!("{name}:x:{gid}:\n"));
    }
    for (i, u) in users.iter().enumerate() {
        let id = FIRST_SYSTEM_ID + i as u32;
        let home = u.home.as_deref().unwrap_or("/nonexistent");
        passwd.push_str(&format!(
            "{0}:x:{id}:{id}::{home}:/usr/sbin/nologin\n",
            u.name
        ));
        group.push_str(&format!("{}:x:{id}:\n", u.name));
    }
    root.write_file("/etc/passwd", passwd.as_bytes(), 0o644)?;
    root.write_file("/etc/group", group.as_bytes(), 0o644)
}

/// Files every image gets: name service configuration and the loopback host names.
pub fn write_base_files(root: &RootDir) -> io::Result<()> {
    root.write_file(
        "/etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n\
          protocols: files\nservices: files\n",
        0o644,
    )?;
    root.write_file(
        "/etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    root.write_file("/etc/hostname", b"assure\n", 0o644)?;
    for (dir, mode) in [
        ("/tmp", 0o1777),
        ("/var/tmp", 0o1777),
        ("/run", 0o755),
        ("/var/log", 0o755),
        ("/root", 0o700),
        ("/dev", 0o755),
        ("/proc", 0o555),
    ] {
        root.mkdir_p(dir, Some(mode))?;
    }
    Ok(())
}

/// What `check_program` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInfo {
    /// The program's guest path.
    pub path: String,
    /// Its PT_INTERP, if dynamically linked.
    pub interp: Option<String>,
    /// Shared libraries found (guest paths), in search order.
    pub libraries: Vec<String>,
}

/// What an ELF file needs at load time.
struct ElfDeps {
    /// PT_INTERP.
    interp: Option<String>,
    /// DT_NEEDED.
    needed: Vec<String>,
    /// DT_RUNPATH and DT_RPATH directories.
    runpath: Vec<String>,
}

/// The PT_INTERP and DT_NEEDED/DT_RUNPATH entries of an ELF file.
fn elf_deps(data: &[u8]) -> Result<ElfDeps, String> {
    let file =
        ElfFile64::<Endianness>::parse(data).map_err(|e| format!("not an ELF64 file: {e}"))?;
    let endian = file.endian();
    if file.elf_header().e_machine.get(endian) != elf::EM_X86_64 {
        return Err("not an x86-64 program".into());
    }
    let mut interp = None;
    for ph in file.elf_program_headers() {
        if let Ok(Some(i)) = ph.interpreter(endian, data) {
            interp = Some(String::from_utf8_lossy(i).into_owned());
        }
    }
    let table = file
        .elf_section_table()
        .dynamic_table(endian, data)
        .map_err(|e| format!("bad dynamic section: {e}"))?;
    let mut needed = Vec::new();
    let mut runpath = Vec::new();
    for d in table.iter() {
        let s = || {
            table
                .string(d)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        match d.tag {
            elf::DT_NEEDED => needed.push(s().map_err(|e| e.to_string())?),
            elf::DT_RUNPATH | elf::DT_RPATH => runpath.extend(
                s().map_err(|e| e.to_string())?
                    .split(':')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    Ok(ElfDeps {
        interp,
        needed,
        runpath,
    })
}

/// Resolve a program name as the VMM does (a path, or a name in the guest PATH).
pub fn find_program(root: &RootDir, program: &str) -> Option<String> {
    if program.contains('/') {
        return root.is_file(program).then(|| program.to_string());
    }
    crate::sandbox::DEFAULT_PATH
        .split(':')
        .map(|d| format!("{d}/{program}"))
        .find(|p| root.is_file(p))
}

/// Check that `program` exists in the root as an x86-64 ELF executable whose interpreter and
/// every shared library it needs (transitively) are in the root too.
pub fn check_program(root: &RootDir, program: &str) -> Result<ProgramInfo, String> {
    let path = find_program(root, program).ok_or_else(|| {
        format!(
            "the command {program} is not in the root file system{}",
            if program.contains('/') {
                String::new()
            } else {
                format!(" (searched {})", crate::sandbox::DEFAULT_PATH)
            }
        )
    })?;
    let data = root
        .read(&path)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    let ElfDeps {
        interp,
        needed,
        runpath,
    } = elf_deps(&data).map_err(|e| format!("{path}: {e}"))?;
    if let Some(i) = &interp {
        if !root.is_file(i) {
            return Err(format!(
                "{path} needs the dynamic loader {i}, which is not in the root file system"
            ));
        }
    }
    let mut libraries: Vec<String> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    // (library name, who needs it, that object's directory, its RUNPATH)
    let mut queue: Vec<(String, String, String, Vec<String>)> = Vec::new();
    let origin = |p: &str| {
        split_parent(p)
            .map(|(d, _)| d.to_string())
            .unwrap_or_default()
    };
    for n in needed {
        queue.push((n, path.clone(), origin(&path), runpath.clone()));
    }
    let mut seen: Vec<String> = Vec::new();
    while let Some((name, by, dir, rpath)) = queue.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let candidates: Vec<String> = if name.contains('/') {
            vec![name.clone()]
        } else {
            rpath
                .iter()
                .map(|r| r.replace("$ORIGIN", &dir).replace("${ORIGIN}", &dir))
                .chain(LIB_DIRS.iter().map(|d| d.to_string()))
                .map(|d| format!("{}/{name}", d.trim_end_matches('/')))
                .collect()
        };
        let Some(found) = candidates.into_iter().find(|c| root.is_file(c)) else {
            missing.push(format!("{name} (needed by {by})"));
            continue;
        };
        let lib = root
            .read(&found)
            .map_err(|e| format!("cannot read {found}: {e}"))?;
        let deps = elf_deps(&lib).map_err(|e| format!("{found}: {e}"))?;
        for m in deps.needed {
            queue.push((m, found.clone(), origin(&found), deps.runpath.clone()));
        }
        libraries.push(found);
    }
    if !missing.is_empty() {
        return Err(format!(
            "shared libraries missing from the root file system: {} (is a package excluded?)",
            missing.join(", ")
        ));
    }
    Ok(ProgramInfo {
        path,
        interp,
        libraries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
    fn tmp(tag: &str) -> Tmp {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "assure-rootfs-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("tmp");
        Tmp(p)
    }

    #[test]
    fn writes_stay_inside_the_root() {
        let t = tmp("confine");
        let outside = tmp("outside");
        let root = RootDir::open(&t.0).expect("root");
        // An absolute symlink to a host directory, as a package might ship.
        std::os::unix::fs::symlink(&outside.0, t.0.join("escape")).expect("symlink");
        root.write_file("/escape/x", b"inside", 0o640)
            .expect("write");
        assert!(!outside.0.join("x").exists(), "a write left the root");
        let host =
            t.0.join(outside.0.strip_prefix("/").expect("abs"))
                .join("x");
        assert_eq!(std::fs::read(&host).expect("inside"), b"inside");
        let st = std::fs::metadata(&host).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o7777,
            0o640
        );
        // A relative symlink that climbs out is clamped at the root too.
        std::os::unix::fs::symlink("../../../../../../..", t.0.join("up")).expect("symlink");
        root.mkdir_p("/up/made", Some(0o1777)).expect("mkdir");
        assert!(root.is_dir("/made"));
        let st = std::fs::metadata(t.0.join("made")).expect("meta");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o7777,
            0o1777
        );
        // Replacing a symlink replaces the link, not its target.
        std::fs::write(outside.0.join("keep"), "host").expect("host file");
        std::os::unix::fs::symlink(outside.0.join("keep"), t.0.join("link")).expect("symlink");
        root.write_file("/link", b"new", 0o644).expect("replace");
        assert_eq!(
            std::fs::read_to_string(outside.0.join("keep")).expect("host"),
            "host"
        );
        assert_eq!(root.read("/link").expect("read"), b"new");
    }

    #[test]
    fn usr_merge_and_loader_resolution() {
        let t = tmp("merge");
        let root = RootDir::open(&t.0).expect("root");
        usr_merge(&root).expect("merge");
        root.write_file(
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            b"x",
            0o755,
        )
        .expect("ld.so");
        // libc6 ships this absolute link; the rewrite keeps its meaning.
        root.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", LD_SO)
            .expect("link");
        assert!(root.is_file(LD_SO));
        root.mkdir_p("/var", None).expect("var");
        root.symlink("/run", "/var/run").expect("var/run");
        root.symlink("../../../../../etc/x", "/var/up")
            .expect("climbing link");
        root.symlink("redis-check-rdb", "/usr/bin/redis-server")
            .expect("plain link");
        confine_symlinks(&root).expect("confine");
        let link = |p: &str| root.read_link(p).expect("readlink");
        assert_eq!(link("/var/run"), Some("../run".into()));
        assert_eq!(link("/var/up"), Some("../etc/x".into()));
        assert_eq!(
            link("/usr/bin/redis-server"),
            Some("redis-check-rdb".into())
        );
        assert_eq!(link("/lib64"), Some("usr/lib64".into()));
        assert_eq!(
            root.read_link("/usr/lib64/ld-linux-x86-64.so.2")
                .expect("readlink"),
            Some("../../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into())
        );
        // Now the host sees the same file as the guest.
        assert!(t.0.join("lib64/ld-linux-x86-64.so.2").is_file());
        assert_eq!(root.real_dir("/lib64").expect("real"), "/usr/lib64");
    }

    #[test]
    fn symlink_rewrites() {
        assert_eq!(
            rewrite_target("/usr/lib64", "/lib/x/ld.so"),
            Some("../../lib/x/ld.so".into())
        );
        assert_eq!(
            rewrite_target("/etc", "/etc/alternatives/x"),
            Some("alternatives/x".into())
        );
        assert_eq!(rewrite_target("/", "/run"), Some("run".into()));
        assert_eq!(rewrite_target("/var", "/"), Some("..".into()));
        assert_eq!(rewrite_target("/usr/bin", "redis-check-rdb"), None);
        assert_eq!(rewrite_target("/usr/bin", "../lib/x"), None);
        assert_eq!(
            rewrite_target("/a", "../../../etc/passwd"),
            Some("../etc/passwd".into())
        );
    }

    #[test]
    fn accounts() {
        let t = tmp("accounts");
        let root = RootDir::open(&t.0).expect("root");
        let users = vec![
            User {
                name: "redis".into(),
                home: Some("/var/lib/redis".into()),
            },
            User {
                name: "memcache".into(),
                home: None,
            },
        ];
        write_accounts(&root, &users).expect("accounts");
        let passwd = String::from_utf8(root.read("/etc/passwd").expect("passwd")).expect("utf8");
        assert!(passwd.starts_with("root:x:0:0:"));
        assert!(passwd.contains("\nnobody:x:65534:65534:"));
        assert!(passwd.contains("\nredis:x:100:100::/var/lib/redis:/usr/sbin/nologin\n"));
        assert!(passwd.contains("\nmemcache:x:101:101::/nonexistent:"));
        let group = String::from_utf8(root.read("/etc/group").expect("group")).expect("utf8");
        assert!(group.contains("\nnogroup:x:65534:\n") && group.contains("\nmemcache:x:101:\n"));
    }

    #[test]
    fn a_static_program_checks_and_a_missing_one_does_not() {
        let t = tmp("prog");
        let root = RootDir::open(&t.0).expect("root");
        let bugsrv = std::fs::read(guest_tools_bugsrv()).expect("bugsrv");
        root.write_file("/usr/sbin/bugsrv", &bugsrv, 0o755)
            .expect("copy");
        let info = check_program(&root, "bugsrv").expect("static program");
        assert_eq!(info.path, "/usr/sbin/bugsrv");
        assert_eq!(info.interp, None);
        let e = check_program(&root, "/usr/sbin/nothere").expect_err("missing");
        assert!(e.contains("not in the root"), "{e}");
        root.write_file("/bin-script", b"#!/bin/sh\n", 0o755)
            .expect("script");
        let e = check_program(&root, "/bin-script").expect_err("not ELF");
        assert!(e.contains("not an ELF64"), "{e}");
    }

    fn guest_tools_bugsrv() -> PathBuf {
        PathBuf::from(guest_tools::BUGSRV)
    }
}
