//! Unlinking a file while a checkpoint is live, deferred.
//!
//! Removing a directory entry cannot be undone once done. While a checkpoint is live, the
//! guest's `unlink` therefore moves the entry (a rename, so the file's inode, contents and
//! open descriptors are untouched) into a *removals* directory next to the guest's root,
//! on the same file system and outside everything the guest can name. A rollback moves the
//! entries removed since its checkpoint back, newest first; once no live checkpoint is
//! older than a removal, the entry is really unlinked. Without a place for the removals
//! directory (a root that is `/`, or whose parent is another file system or read-only),
//! unlinks happen at once, as without checkpoints, and a rollback cannot bring them back
//! (logged once).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::errno::{check, Errno};

/// One deferred unlink.
#[derive(Debug)]
struct Removal {
    /// Position in the log.
    seq: u64,
    /// The directory it was removed from (held open).
    dir: OwnedFd,
    /// Its name there.
    name: CString,
    /// Its name in the removals directory.
    parked_as: CString,
}

/// The log of deferred unlinks of one sandbox.
#[derive(Debug)]
pub struct Removals {
    /// Where the removals directory goes (None: nowhere).
    path: Option<PathBuf>,
    dir: Option<OwnedFd>,
    unavailable_logged: bool,
    log: Vec<Removal>,
    next_seq: u64,
    /// Unlinks are deferred while this is true (a checkpoint is live).
    active: bool,
}

impl Removals {
    /// Deferred unlinks for the guest root `root` (its host path, canonical).
    pub fn new(root: &Path) -> Removals {
        let path = root.parent().and_then(|parent| {
            let name = root.file_name()?.to_string_lossy().into_owned();
            Some(parent.join(format!(".{name}.assure-removed-{}", std::process::id())))
        });
        Removals {
            path,
            dir: None,
            unavailable_logged: false,
            log: Vec::new(),
            next_seq: 0,
            active: false,
        }
    }

    /// Defer unlinks from now on (a checkpoint is live) or not.
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    /// The log position a checkpoint keeps.
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Entries removed, kept for a rollback.
    pub fn pending(&self) -> usize {
        self.log.len()
    }

    fn removals_dir(&mut self) -> Option<&OwnedFd> {
        if self.dir.is_none() {
            let path = self.path.as_ref()?;
            let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
            // SAFETY: a valid C string; mkdir has no memory effects. EEXIST is fine (ours).
            unsafe { libc::mkdir(c.as_ptr(), 0o700) };
            // SAFETY: as above; the result is checked.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                )
            };
            if fd < 0 {
                self.path = None;
                return None;
            }
            // SAFETY: a new fd we own.
            self.dir = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        self.dir.as_ref()
    }

    /// `unlinkat(dir, name, 0)` for the guest: deferred while a checkpoint is live (the
    /// entry moves to the removals directory), done at once otherwise.
    pub fn unlink(&mut self, dir: &OwnedFd, name: &CString) -> Result<(), Errno> {
        let now = || {
            // SAFETY: a valid dirfd and C string.
            check(i64::from(unsafe {
                libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0)
            }))
            .map(|_| ())
        };
        if !self.active {
            return now();
        }
        // unlink's own checks first: a directory is EISDIR, a missing name ENOENT.
        // SAFETY: all-zero bytes are a valid `struct stat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat writes one `struct stat` to the local.
        check(i64::from(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        }))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(Errno::EISDIR);
        }
        let seq = self.next_seq;
        let parked_as = CString::new(format!("{seq}")).map_err(|_| Errno::EINVAL)?;
        let Some(removals) = self.removals_dir().map(AsRawFd::as_raw_fd) else {
            self.log_unavailable();
            return now();
        };
        // SAFETY: valid dirfds and C strings.
        let r =
            unsafe { libc::renameat(dir.as_raw_fd(), name.as_ptr(), removals, parked_as.as_ptr()) };
        if r != 0 {
            let e = Errno::last();
            if e == Errno::EXDEV {
                // The root's parent is another file system: no deferral for this root.
                self.path = None;
                self.dir = None;
                self.log_unavailable();
                return now();
            }
            return Err(e);
        }
        let dir = dir.try_clone().map_err(|_| Errno::EMFILE)?;
        self.next_seq += 1;
        self.log.push(Removal {
            seq,
            dir,
            name: name.clone(),
            parked_as,
        });
        Ok(())
    }

    fn log_unavailable(&mut self) {
        if !self.unavailable_logged {
            self.unavailable_logged = true;
            tracing::warn!(
                "unlinks cannot be deferred for this root (no writable place beside it on \
                 the same file system): a rollback will not bring unlinked files back"
            );
        }
    }

    /// A rollback to a checkpoint taken at `position`: the entries removed since come back,
    /// newest first (replacing what the guest created under the same name since).
    pub fn undo_since(&mut self, position: u64) {
        let Some(removals) = self.dir.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        while self.log.last().is_some_and(|r| r.seq >= position) {
            let Some(r) = self.log.pop() else { break };
            // SAFETY: valid dirfds and C strings.
            let rc = unsafe {
                libc::renameat(
                    removals,
                    r.parked_as.as_ptr(),
                    r.dir.as_raw_fd(),
                    r.name.as_ptr(),
                )
            };
            if rc != 0 {
                tracing::warn!(name = ?r.name, error = %Errno::last(), "cannot bring an unlinked file back");
            }
        }
    }

    /// No live checkpoint is older than `position` (None: none is live): unlink for good
    /// what was removed before it.
    pub fn forget_before(&mut self, position: Option<u64>) {
        let Some(removals) = self.dir.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let keep_from = position.unwrap_or(u64::MAX);
        self.log.retain(|r| {
            if r.seq >= keep_from {
                return true;
            }
            // SAFETY: a valid dirfd and C string.
            unsafe { libc::unlinkat(removals, r.parked_as.as_ptr(), 0) };
            false
        });
    }
}

impl Removals {
    /// The sandbox ends: unlink for good what is still kept, and remove the directory.
    pub fn finish(&mut self) {
        self.active = false;
        self.forget_before(None);
        if let (Some(_), Some(path)) = (self.dir.take(), self.path.as_ref()) {
            std::fs::remove_dir(path).ok();
        }
    }

    /// In a forked child: the log belongs to the parent, which alone may act on it.
    pub fn detach(&mut self) {
        self.log.clear();
        self.dir = None;
        self.path = None;
        self.active = false;
    }
}

impl Drop for Removals {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_fd(p: &Path) -> OwnedFd {
        std::fs::File::open(p).expect("open dir").into()
    }

    #[test]
    fn deferred_unlinks_come_back_newest_first_and_are_forgotten_after() {
        let base = std::env::temp_dir().join(format!("assure-removals-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(&root).expect("root");
        let mut r = Removals::new(&root);
        let dir = dir_fd(&root);
        let name = |s: &str| CString::new(s).expect("name");
        std::fs::write(root.join("a"), b"first").expect("a");
        // Not active: an unlink is immediate.
        r.unlink(&dir, &name("a")).expect("unlink");
        assert!(!root.join("a").exists());
        assert_eq!(r.pending(), 0);

        std::fs::write(root.join("a"), b"old").expect("a");
        std::fs::create_dir(root.join("d")).expect("d");
        r.set_active(true);
        let at_checkpoint = r.position();
        r.unlink(&dir, &name("a")).expect("deferred unlink");
        assert!(!root.join("a").exists(), "the guest sees it gone at once");
        assert_eq!(r.unlink(&dir, &name("d")), Err(Errno::EISDIR));
        assert_eq!(r.unlink(&dir, &name("missing")), Err(Errno::ENOENT));
        // Created again under the same name, then a rollback: the old file comes back.
        std::fs::write(root.join("a"), b"new").expect("a again");
        r.undo_since(at_checkpoint);
        assert_eq!(std::fs::read(root.join("a")).expect("read"), b"old");
        // Removed again and the checkpoint released: really gone, nothing left behind.
        r.unlink(&dir, &name("a")).expect("deferred unlink");
        r.set_active(false);
        r.forget_before(None);
        assert_eq!(r.pending(), 0);
        drop(r);
        assert!(!root.join("a").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&base)
            .expect("base")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "root")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&base).ok();
    }
}
