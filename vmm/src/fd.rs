//! The guest's file-descriptor table. Guest fd numbers are allocated as Linux does (lowest
//! free number) and map to host fds the VMM owns; the VMM's own fds (KVM, the root
//! directory, the control socket...) are never in this table, so the guest cannot name them.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::errno::Errno;

/// Default RLIMIT_NOFILE soft limit, as a Linux shell gives.
pub const DEFAULT_NOFILE: u64 = 1024;
/// Hard limit of guest fds.
pub const MAX_NOFILE: u64 = 1 << 20;

/// What an open file is, where the VMM must treat it specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Anything the host kernel handles alone: files, directories, pipes, sockets, eventfds.
    Host,
    /// An epoll instance: its interest list names guest fds, translated on `epoll_ctl`.
    Epoll,
    /// A snapshot of generated content (`/proc/self/maps`...), kept in a memfd.
    Generated,
}

/// An open file description (shared by dup'ed fds, like Linux's `struct file`).
#[derive(Debug)]
pub struct OpenFile {
    host: OwnedFd,
    /// Kind.
    pub kind: FileKind,
    /// Guest path it was opened by, for `/proc/self/fd` and `*at` calls relative to it.
    pub guest_path: Option<String>,
}

impl OpenFile {
    /// Wrap a host fd.
    pub fn new(host: OwnedFd, kind: FileKind, guest_path: Option<String>) -> OpenFile {
        OpenFile {
            host,
            kind,
            guest_path,
        }
    }
    /// The host fd.
    pub fn host_fd(&self) -> RawFd {
        self.host.as_raw_fd()
    }
}

/// One slot of the table.
#[derive(Debug, Clone)]
pub struct FdSlot {
    /// The description.
    pub file: Arc<OpenFile>,
    /// FD_CLOEXEC.
    pub cloexec: bool,
}

/// Guest fd → open file.
#[derive(Debug, Default)]
pub struct FdTable {
    slots: Vec<Option<FdSlot>>,
    limit: u64,
}

impl FdTable {
    /// An empty table with the default limit.
    pub fn new() -> FdTable {
        FdTable {
            slots: Vec::new(),
            limit: DEFAULT_NOFILE,
        }
    }

    /// RLIMIT_NOFILE (soft).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Change RLIMIT_NOFILE.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.min(MAX_NOFILE);
    }

    fn index(fd: i64) -> Result<usize, Errno> {
        usize::try_from(fd).map_err(|_| Errno::EBADF)
    }

    /// The slot of `fd`.
    pub fn slot(&self, fd: i64) -> Result<&FdSlot, Errno> {
        self.slots
            .get(Self::index(fd)?)
            .and_then(Option::as_ref)
            .ok_or(Errno::EBADF)
    }

    /// The open file of `fd`.
    pub fn get(&self, fd: i64) -> Result<Arc<OpenFile>, Errno> {
        self.slot(fd).map(|s| s.file.clone())
    }

    /// The host fd behind `fd`.
    pub fn host_fd(&self, fd: i64) -> Result<RawFd, Errno> {
        self.slot(fd).map(|s| s.file.host_fd())
    }

    /// Install at the lowest free number `>= min`.
    pub fn insert_from(
        &mut self,
        min: u64,
        file: Arc<OpenFile>,
        cloexec: bool,
    ) -> Result<i32, Errno> {
        if min >= self.limit {
            return Err(Errno::EINVAL);
        }
        let start = min as usize;
        let free = (start..self.limit as usize)
            .find(|&i| self.slots.get(i).is_none_or(Option::is_none))
            .ok_or(Errno::EMFILE)?;
        if free >= self.slots.len() {
            self.slots.resize(free + 1, None);
        }
        self.slots[free] = Some(FdSlot { file, cloexec });
        Ok(free as i32)
    }

    /// Install at the lowest free number.
    pub fn insert(&mut self, file: OpenFile, cloexec: bool) -> Result<i32, Errno> {
        self.insert_from(0, Arc::new(file), cloexec)
    }

    /// Install at exactly `fd` (dup2/dup3), replacing what was there; returns the replaced
    /// slot so the caller decides when it is closed.
    pub fn insert_at(
        &mut self,
        fd: i64,
        file: Arc<OpenFile>,
        cloexec: bool,
    ) -> Result<Option<FdSlot>, Errno> {
        let i = Self::index(fd)?;
        if i as u64 >= self.limit {
            return Err(Errno::EBADF);
        }
        if i >= self.slots.len() {
            self.slots.resize(i + 1, None);
        }
        Ok(self.slots[i].replace(FdSlot { file, cloexec }))
    }

    /// Remove `fd`; the host fd closes when its last guest fd is gone.
    pub fn remove(&mut self, fd: i64) -> Result<FdSlot, Errno> {
        let i = Self::index(fd)?;
        self.slots
            .get_mut(i)
            .and_then(Option::take)
            .ok_or(Errno::EBADF)
    }

    /// Set FD_CLOEXEC.
    pub fn set_cloexec(&mut self, fd: i64, on: bool) -> Result<(), Errno> {
        let i = Self::index(fd)?;
        let slot = self
            .slots
            .get_mut(i)
            .and_then(Option::as_mut)
            .ok_or(Errno::EBADF)?;
        slot.cloexec = on;
        Ok(())
    }

    /// Every open guest fd with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &FdSlot)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as i32, s)))
    }

    /// Host fd → guest fd (first match), for results that name host fds.
    pub fn guest_fd_of_host(&self, host: RawFd) -> Option<i32> {
        self.iter()
            .find(|(_, s)| s.file.host_fd() == host)
            .map(|(g, _)| g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OpenFile {
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        OpenFile::new(f.into(), FileKind::Host, None)
    }

    #[test]
    fn lowest_free_number_is_used() {
        let mut t = FdTable::new();
        assert_eq!(t.insert(devnull(), false), Ok(0));
        assert_eq!(t.insert(devnull(), false), Ok(1));
        t.remove(0).expect("close");
        assert_eq!(t.insert(devnull(), true), Ok(0));
        assert!(t.slot(0).expect("slot").cloexec);
    }

    #[test]
    fn bad_numbers_are_ebadf() {
        let mut t = FdTable::new();
        assert_eq!(t.get(-1).err(), Some(Errno::EBADF));
        assert_eq!(t.get(12345).err(), Some(Errno::EBADF));
        assert_eq!(t.remove(3).err(), Some(Errno::EBADF));
        let f = Arc::new(devnull());
        assert_eq!(t.insert_at(100_000, f, false).err(), Some(Errno::EBADF));
    }

    #[test]
    fn dup_shares_the_description_and_limit_is_enforced() {
        let mut t = FdTable::new();
        t.set_limit(2);
        let a = t.insert(devnull(), false).expect("fd");
        let file = t.get(i64::from(a)).expect("get");
        assert_eq!(t.insert_from(0, file.clone(), false), Ok(1));
        assert_eq!(t.insert_from(0, file, false), Err(Errno::EMFILE));
        assert_eq!(t.host_fd(0), t.host_fd(1));
    }
}
