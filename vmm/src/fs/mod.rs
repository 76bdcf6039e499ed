//! The guest's view of the file system: every path resolves inside the sandbox's root
//! directory, and `/proc/self` is the guest's, not the VMM's.
//!
//! Resolution uses `openat2(RESOLVE_IN_ROOT)`: the host kernel walks the path with the root
//! directory as `/`, so `..`, absolute symlinks and relative symlinks all stay inside, even
//! if the tree changes during the walk. Magic links (`/proc/...` of the host) are refused.

pub mod procfs;
pub mod removals;

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::errno::Errno;

/// Devices every container runtime provides. They are served from the host's harmless
/// devices of the same name whatever the image holds; no other host device is reachable.
const STANDARD_DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// `Some("null")` for `/dev/null` (after lexical normalization), and so on.
pub fn standard_device(abs: &str) -> Option<&'static str> {
    let norm = normalize(abs);
    let name = norm.strip_prefix("/dev/")?;
    STANDARD_DEVICES.iter().copied().find(|d| *d == name)
}

fn open_device(dev: &str, flags: i32) -> Result<OwnedFd, Errno> {
    // Creation flags mean nothing for an existing device; O_DIRECTORY fails as it would.
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC)) | libc::O_CLOEXEC;
    let path = CString::new(format!("/dev/{dev}")).map_err(|_| Errno::ENOENT)?;
    // SAFETY: a fixed NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How often an open is retried when the host's confined walk raced a rename (EAGAIN).
const OPENAT2_RETRIES: u32 = 1000;

/// `openat2(dirfd, path, how)`. With RESOLVE_IN_ROOT or RESOLVE_BENEATH the kernel answers
/// EAGAIN when a rename or mount anywhere on the host raced the walk of a `..`, and asks the
/// caller to retry: this does, so the guest never sees that EAGAIN (open(2) has none).
pub fn openat2(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    how: &libc::open_how,
) -> Result<OwnedFd, Errno> {
    let mut attempts = 0;
    loop {
        // SAFETY: valid fd and NUL-terminated path; `how` lives across the call and its size
        // is passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a new fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = Errno::last();
        attempts += 1;
        if e != Errno::EAGAIN || attempts >= OPENAT2_RETRIES {
            return Err(e);
        }
    }
}

/// Longest path the guest may pass (Linux's PATH_MAX, including the NUL).
pub const PATH_MAX: usize = 4096;

/// Errors setting up the guest's file system view.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The root directory cannot be opened.
    #[error("cannot open root directory {path}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Root directory and working directory of one sandbox.
#[derive(Debug)]
pub struct FsContext {
    root: OwnedFd,
    root_host: PathBuf,
    cwd: String,
    /// Unlinks deferred while a checkpoint is live.
    pub removals: removals::Removals,
}

/// Lexically normalise an absolute guest path: collapse `//`, `.` and `..` (at `/`, `..`
/// stays at `/`). Used only to recognise emulated trees such as `/proc/self`; real
/// resolution is left to the kernel.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

impl FsContext {
    /// Use `root` (a host directory) as the guest's `/`, with `/` as the working directory.
    pub fn new(root: &Path) -> Result<Self, FsError> {
        let root_host = root.canonicalize().map_err(|source| FsError::Root {
            path: root.into(),
            source,
        })?;
        let c =
            CString::new(root_host.as_os_str().as_encoded_bytes()).map_err(|_| FsError::Root {
                path: root.into(),
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        // SAFETY: `c` is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(FsError::Root {
                path: root.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(FsContext {
            root,
            removals: removals::Removals::new(&root_host),
            root_host,
            cwd: "/".into(),
        })
    }

    /// Host path of the root directory.
    pub fn root_host_path(&self) -> &Path {
        &self.root_host
    }

    /// The guest's working directory (absolute guest path).
    pub fn cwd(&self) -> &str {
        &self.cwd
    }

    /// Set the working directory (an absolute, already resolved guest path).
    pub fn set_cwd(&mut self, cwd: String) {
        self.cwd = cwd;
    }

    /// Make `path` absolute: relative paths are taken relative to `base` (the working
    /// directory or a directory fd's guest path). `/proc/self/root` and `/proc/self/cwd` are
    /// replaced by what they point to where the walk goes through them, as the kernel would
    /// follow those magic links.
    pub fn absolute(&self, base: Option<&str>, path: &[u8]) -> Result<String, Errno> {
        if path.is_empty() {
            return Err(Errno::ENOENT);
        }
        if path.len() >= PATH_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let path = std::str::from_utf8(path).map_err(|_| Errno::ENOENT)?;
        let mut abs = if path.starts_with('/') {
            path.to_string()
        } else {
            let base = base.unwrap_or(&self.cwd);
            format!("{}/{}", base.trim_end_matches('/'), path)
        };
        // Follow the two magic links that lead back into the guest's own tree, component by
        // component as the kernel would, so `/proc/self/root/..` is `/`.
        for _ in 0..8 {
            match self.follow_proc_self_link(&abs) {
                Some(next) => abs = next,
                None => break,
            }
        }
        Ok(abs)
    }

    /// If walking `abs` goes through `/proc/self/root` or `/proc/self/cwd`, the path with
    /// that prefix replaced by the link's target; the rest is kept as given. A link that is
    /// the last component is left alone: whether to follow it (open) or not (readlink,
    /// lstat) is the caller's call, and the emulated /proc answers both.
    fn follow_proc_self_link(&self, abs: &str) -> Option<String> {
        let comps: Vec<&str> = abs.split('/').collect();
        let mut stack: Vec<&str> = Vec::new();
        for (i, c) in comps.iter().enumerate() {
            match *c {
                "" | "." => continue,
                ".." => {
                    stack.pop();
                }
                c => stack.push(c),
            }
            // /dev's standard links are the same on every Linux system, whether or not the
            // image has a /dev: they always lead to the guest's own fds.
            let dev_link = match stack.as_slice() {
                ["dev", "stdin"] => Some("/proc/self/fd/0"),
                ["dev", "stdout"] => Some("/proc/self/fd/1"),
                ["dev", "stderr"] => Some("/proc/self/fd/2"),
                ["dev", "fd"] => Some("/proc/self/fd"),
                _ => None,
            };
            if let Some(target) = dev_link {
                let rest = comps[i + 1..].join("/");
                return Some(if rest.is_empty() {
                    target.to_string()
                } else {
                    format!("{target}/{rest}")
                });
            }
            let target = match stack.as_slice() {
                ["proc", "self", "root"] => "/",
                ["proc", "self", "cwd"] => self.cwd.as_str(),
                _ => continue,
            };
            if i + 1 == comps.len() {
                return None;
            }
            let rest = comps[i + 1..].join("/");
            return Some(format!("{}/{}", target.trim_end_matches('/'), rest));
        }
        None
    }

    /// Open an absolute guest path inside the root. `flags` are the guest's open flags;
    /// `O_CLOEXEC` is always set on the host side (the guest's close-on-exec bit lives in the
    /// fd table).
    pub fn open(&self, abs: &str, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
        if let Some(dev) = standard_device(abs) {
            return open_device(dev, flags);
        }
        self.open_with(
            abs,
            flags,
            mode,
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        )
    }

    fn open_with(&self, abs: &str, flags: i32, mode: u32, resolve: u64) -> Result<OwnedFd, Errno> {
        let rel = abs.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        let c = CString::new(rel).map_err(|_| Errno::ENOENT)?;
        // SAFETY: open_how is plain data; all-zero is a valid value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode & 0o7777)
        } else {
            0
        };
        how.resolve = resolve;
        openat2(self.root.as_raw_fd(), &c, &how)
    }

    /// Open the directory that contains the last component of `abs`, for the `*at` calls
    /// that act on a name without following it (unlink, mkdir, lstat, readlink, ...).
    /// Returns the directory (O_PATH) and the last component (`.` for `/`).
    pub fn open_parent(&self, abs: &str) -> Result<(OwnedFd, CString), Errno> {
        let trimmed = abs.trim_end_matches('/');
        let (dir, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => ("", trimmed),
        };
        let name = if name.is_empty() { "." } else { name };
        let dirfd = self.open(
            if dir.is_empty() { "/" } else { dir },
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let name = CString::new(name).map_err(|_| Errno::ENOENT)?;
        Ok((dirfd, name))
    }

    /// Follow the symbolic links of `abs` one component at a time, inside the root, and if
    /// the walk enters `/proc`, return the path from there on (`/dev/stdout` →
    /// `/proc/self/fd/1`). The kernel's walk cannot do this (the root's own `/proc`, if any,
    /// is not the guest's), so callers use it when that walk failed or ended in the host's
    /// procfs. `None` if the walk never reaches `/proc`.
    pub fn path_through_proc(&self, abs: &str, follow_last: bool) -> Option<String> {
        let mut done: Vec<String> = Vec::new();
        let mut todo: VecDeque<String> = abs.split('/').map(String::from).collect();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "" | "." => continue,
                // `done` has no links in it, so `..` is lexical here.
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            if done.is_empty() && c == "proc" {
                let rest: Vec<String> = todo.into_iter().collect();
                return Some(format!("/proc/{}", rest.join("/")));
            }
            // A trailing `/` leaves an empty component: it forces following.
            if todo.is_empty() && !follow_last {
                return None;
            }
            let dir = self
                .open(
                    &format!("/{}", done.join("/")),
                    libc::O_PATH | libc::O_DIRECTORY,
                    0,
                )
                .ok()?;
            let name = CString::new(c.as_str()).ok()?;
            let mut buf = vec![0u8; PATH_MAX];
            // SAFETY: valid dirfd and name; the buffer is ours and its length is passed.
            let n = unsafe {
                libc::readlinkat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                if Errno::last() != Errno::EINVAL {
                    return None;
                }
                done.push(c);
                continue;
            }
            hops += 1;
            if hops > 40 {
                return None;
            }
            buf.truncate(n as usize);
            let target = String::from_utf8(buf).ok()?;
            if target.starts_with('/') {
                done.clear();
            }
            for t in target.split('/').rev() {
                todo.push_front(t.to_string());
            }
        }
        None
    }

    /// Guest path of an open host fd (from the kernel's own record of it), if it lies
    /// inside the root.
    pub fn guest_path_of(&self, fd: RawFd) -> Option<String> {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        let rel = target.strip_prefix(&self.root_host).ok()?;
        Some(format!("/{}", rel.to_string_lossy()))
    }

    /// Read a whole file by absolute guest path (loader and interpreter), bounded.
    pub fn read_file(&self, abs: &str, max: u64) -> Result<Vec<u8>, Errno> {
        use std::io::Read;
        let fd = self.open(abs, libc::O_RDONLY, 0)?;
        let mut f = std::fs::File::from(fd);
        let len = f.metadata().map_err(Errno::from)?.len();
        if len > max {
            return Err(Errno::EFBIG);
        }
        let mut v = Vec::with_capacity(len as usize);
        f.read_to_end(&mut v).map_err(Errno::from)?;
        Ok(v)
    }
}

/// Is `fd` on a procfs (the host's: the guest's /proc is emulated, so an object there was
/// reached by a walk that must be redone by the VMM)?
pub fn on_host_procfs(fd: RawFd) -> bool {
    // SAFETY: statfs is plain data; fstatfs fills it from a valid fd.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::fstatfs(fd, &mut sf) == 0 && sf.f_type == procfs::PROC_SUPER_MAGIC }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_devices_are_served_and_nothing_else() {
        assert_eq!(standard_device("/dev/null"), Some("null"));
        assert_eq!(standard_device("/dev/./urandom"), Some("urandom"));
        assert_eq!(standard_device("/dev/sda"), None);
        assert_eq!(standard_device("/dev/kvm"), None);
        assert_eq!(standard_device("/devnull"), None);
        let fs = FsContext::new(&std::env::temp_dir()).expect("root");
        assert!(fs.open("/dev/null", libc::O_WRONLY, 0).is_ok());
        assert_eq!(
            fs.open("/dev/kvm", libc::O_RDWR, 0).map(|_| ()),
            Err(Errno::ENOENT)
        );
    }

    #[test]
    fn normalize_clamps_at_root() {
        assert_eq!(normalize("/a/./b//../../../c"), "/c");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/proc/self/root/.."), "/proc/self");
    }

    #[test]
    fn magic_links_into_the_guest_tree_are_followed() {
        let dir = std::env::temp_dir();
        let fs = FsContext::new(&dir).expect("root");
        assert_eq!(
            fs.absolute(None, b"/proc/self/root/../secret")
                .expect("abs"),
            "/../secret"
        );
        assert_eq!(fs.absolute(Some("/a/b"), b"c").expect("abs"), "/a/b/c");
        // The link itself (readlink, lstat) stays for the emulated /proc.
        assert_eq!(
            fs.absolute(None, b"/proc/self/root").expect("abs"),
            "/proc/self/root"
        );
        assert_eq!(fs.absolute(None, b"/proc/self/cwd/").expect("abs"), "/");
        assert_eq!(fs.absolute(None, b"/proc/self/root/x").expect("abs"), "/x");
        assert_eq!(fs.absolute(None, b""), Err(Errno::ENOENT));
        assert_eq!(fs.absolute(None, &[b'a'; 5000]), Err(Errno::ENAMETOOLONG));
    }

    #[test]
    fn paths_cannot_leave_the_root() {
        let base = std::env::temp_dir().join(format!("assure-fs-test-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("dir")).expect("mkdir");
        std::fs::write(base.join("secret.txt"), "SECRET").expect("secret");
        std::fs::write(root.join("data.txt"), "hello").expect("data");
        std::os::unix::fs::symlink("/../../secret.txt", root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../secret.txt", root.join("rel")).expect("symlink");
        let fs = FsContext::new(&root).expect("root");
        for p in ["/../secret.txt", "/dir/../../secret.txt", "/abs", "/rel"] {
            let r = fs.open(p, libc::O_RDONLY, 0).map(|_| ());
            assert_eq!(r, Err(Errno::ENOENT), "{p} must not escape");
        }
        assert!(fs.open("/dir/../data.txt", libc::O_RDONLY, 0).is_ok());
        let fd = fs.open("/data.txt", libc::O_RDONLY, 0).expect("open");
        assert_eq!(
            fs.guest_path_of(fd.as_raw_fd()).as_deref(),
            Some("/data.txt")
        );
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn links_into_proc_are_found_by_the_walk() {
        let base = std::env::temp_dir().join(format!("assure-fs-walk-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("dev")).expect("mkdir");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink("/proc/self/fd", root.join("dev/fd")).expect("symlink");
        std::os::unix::fs::symlink("fd/1", root.join("dev/stdout")).expect("symlink");
        std::os::unix::fs::symlink("../proc/self/mounts", root.join("etc/mtab")).expect("symlink");
        std::os::unix::fs::symlink("/etc", root.join("etclink")).expect("symlink");
        let fs = FsContext::new(&root).expect("root");
        assert_eq!(
            fs.path_through_proc("/dev/stdout", true).as_deref(),
            Some("/proc/self/fd/1")
        );
        assert_eq!(fs.path_through_proc("/dev/stdout", false), None);
        assert_eq!(
            fs.path_through_proc("/etclink/mtab", true).as_deref(),
            Some("/proc/self/mounts")
        );
        assert_eq!(
            fs.path_through_proc("/dev/fd/", false).as_deref(),
            Some("/proc/self/fd/")
        );
        assert_eq!(fs.path_through_proc("/etc/passwd", true), None);
        assert_eq!(fs.path_through_proc("/missing/x", true), None);
        assert!(on_host_procfs(
            std::fs::File::open("/proc/self/stat")
                .expect("open")
                .as_raw_fd()
        ));
        assert!(!on_host_procfs(fs.root.as_raw_fd()));
        std::fs::remove_dir_all(&base).ok();
    }
}
