//! The guest's file-descriptor table. Guest fd numbers are allocated as Linux does (lowest
//! free number) and map to host fds the VMM owns; the VMM's own fds (KVM, the root
//! directory, the control socket...) are never in this table, so the guest cannot name them.
//!
//! # Checkpoints
//!
//! [`FdTable::checkpoint`] keeps the table as it is (clones of the `Arc`s of its open files)
//! and [`FdTable::restore`] puts it back. Three things make that more than a copy:
//!
//! - **Deferred close.** While a checkpoint holds an open file, a guest `close` of its last
//!   fd does not close the host fd; it closes when the checkpoint is released (or stays
//!   open, and comes back into the table, if the checkpoint is restored). Files opened
//!   after the checkpoint (connections accepted since, say) leave the table on restore and
//!   close when nothing else holds them.
//! - **Epoll interest lists** are host kernel state. Linux takes a file off every interest
//!   list when the file is released; a host fd a checkpoint keeps open is not released,
//!   so the close paths call [`FdTable::forget_file`], which removes it explicitly. Each
//!   epoll instance keeps a shadow of its interest list (maintained by
//!   [`OpenFile::epoll_ctl`], only after the host call succeeded), and a restore
//!   reconciles each restored instance with its checkpointed shadow (DEL, ADD, MOD).
//! - **File offsets** are shared host state of an open file: a checkpoint saves the offset
//!   of every regular file and a restore seeks back to it.
//! - **Pipe and eventfd contents** are host kernel state too. A pipe whose two ends are
//!   both the guest's (a thread-wakeup pipe, as memcached uses) is read out at a checkpoint
//!   and written back at once, keeping a copy; a restore drains it and writes the copy
//!   back. An eventfd's counter is read from `/proc/self/fdinfo` and set back the same way.
//!   Without this, a wake-up byte written since the checkpoint would still be in the pipe
//!   after a rollback, pointing the guest at work its restored memory does not have.
//! - **TCP connections with traffic since the checkpoint** cannot be put back: the peer has
//!   seen bytes the restored server has not sent yet, or sent bytes it has already read.
//!   Each open file records the checkpoint epoch of its last transfer; a restore shuts
//!   such connections down (both directions), so the peer sees a closed connection, never
//!   a wrong byte, and the server meets EOF and closes it through its own error path.
//! - **Rescue windows** (`crate::journal`): while a window checkpoint is live, output to
//!   peers outside is held and input recorded, so a restore of a window's checkpoint shuts
//!   down only the connections that carried a transfer the journal did not keep (each
//!   file also records the epoch of its last such transfer); the others survive, and
//!   [`FdTable::journal_rollback`] then drops their held output and queues their input
//!   for replay. Connections accepted since the window leave the table but stay open
//!   (the journal holds them) to be accepted again. A restore of an operator checkpoint
//!   also discards the journal entries newer than it.
//!
//! Known limits: whether an `EPOLLONESHOT` entry has fired (and is disarmed) is not
//! visible from user space, so a restore re-arms every one-shot entry (and re-checks
//! every edge-triggered one), as they are at a checkpoint taken while the guest waits;
//! the contents of files written since a checkpoint are not undone here, nor is data a
//! socket or pipe delivered since; directory read positions are not saved. A file whose
//! last guest fd closes while it is in flight in an `SCM_RIGHTS` message is taken off the
//! interest lists (Linux keeps it there until the message is received and closed).

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::errno::{check, Errno};

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
    /// For [`FileKind::Epoll`]: the interest list as the VMM set it on the host.
    epoll: Option<Mutex<Interests>>,
    /// How many shadow interest lists name this file (never fewer than do): at 0, closing
    /// its last fd has no interest list to update.
    watched: AtomicUsize,
    /// What the host file is (for what a checkpoint keeps of it), learnt once: a file's
    /// type never changes, and a checkpoint must not fstat every socket each time.
    host_type: std::sync::OnceLock<HostType>,
    /// The I/O epoch of its last transfer (0: none): see [`FdTable::note_io`].
    last_io: std::sync::atomic::AtomicU64,
    /// The I/O epoch of its last transfer that the journal did not keep (0: none): a
    /// rollback to a window older than it shuts the connection down.
    pub(crate) last_raw_io: std::sync::atomic::AtomicU64,
    /// Its held output, recorded input... (`journal.rs`), once it has any.
    pub(crate) journal: std::sync::OnceLock<crate::journal::FileJournal>,
    /// How its traffic is journaled, once that is definite.
    pub(crate) journal_class: std::sync::OnceLock<crate::journal::Class>,
}

/// Bumped by every checkpoint; a file's `last_io` at or above a checkpoint's epoch had
/// traffic since that checkpoint.
static IO_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The current I/O epoch (journal entries are stamped with it).
pub(crate) fn io_epoch_now() -> u64 {
    IO_EPOCH.load(Ordering::SeqCst)
}

impl OpenFile {
    /// Wrap a host fd. An [`FileKind::Epoll`] file starts with an empty interest list.
    pub fn new(host: OwnedFd, kind: FileKind, guest_path: Option<String>) -> OpenFile {
        OpenFile {
            host,
            kind,
            guest_path,
            epoll: (kind == FileKind::Epoll).then(|| Mutex::new(Interests::default())),
            watched: AtomicUsize::new(0),
            host_type: std::sync::OnceLock::new(),
            last_io: std::sync::atomic::AtomicU64::new(0),
            last_raw_io: std::sync::atomic::AtomicU64::new(0),
            journal: std::sync::OnceLock::new(),
            journal_class: std::sync::OnceLock::new(),
        }
    }

    /// Is it a regular file?
    fn is_regular(&self) -> bool {
        self.host_type() == HostType::Regular
    }

    /// What the host file is.
    pub(crate) fn host_type(&self) -> HostType {
        *self.host_type.get_or_init(|| {
            let fd = self.host_fd();
            // SAFETY: all-zero bytes are a valid `struct stat`.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on the host fd we own, writing to a local `struct stat`.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return HostType::Other;
            }
            match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => HostType::Regular,
                libc::S_IFSOCK if is_tcp_stream(fd) => HostType::TcpStream,
                libc::S_IFSOCK if socket_option(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX) => {
                    HostType::UnixSocket
                }
                libc::S_IFIFO => {
                    // SAFETY: F_GETFL on our fd has no memory effects.
                    let mode = unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE;
                    HostType::Fifo {
                        dev: st.st_dev,
                        ino: st.st_ino,
                        reads: mode == libc::O_RDONLY || mode == libc::O_RDWR,
                        writes: mode == libc::O_WRONLY || mode == libc::O_RDWR,
                    }
                }
                _ => match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                    Ok(t) if t.as_os_str() == "anon_inode:[eventfd]" => HostType::EventFd,
                    Ok(t) if t.as_os_str() == "anon_inode:[timerfd]" => HostType::TimerFd,
                    _ => HostType::Other,
                },
            }
        })
    }

    /// Wrap a host epoll fd (with an empty interest list).
    pub fn new_epoll(host: OwnedFd) -> OpenFile {
        OpenFile::new(host, FileKind::Epoll, None)
    }

    /// The host fd.
    pub fn host_fd(&self) -> RawFd {
        self.host.as_raw_fd()
    }

    /// `epoll_ctl(self, op, target, {events, data})` on the host, recorded in this
    /// instance's interest list when the host accepts it. The host validates everything
    /// as Linux does (not an epoll instance, the instance itself, unpollable targets, a
    /// bad `op`, EEXIST, ENOENT, ELOOP...). An epoll fd the VMM did not create (one
    /// received over a socket) has no interest list: the call only goes to the host.
    pub fn epoll_ctl(
        &self,
        op: i32,
        target: &Arc<OpenFile>,
        events: u32,
        data: u64,
    ) -> Result<(), Errno> {
        let fd = target.host_fd();
        let Some(interests) = &self.epoll else {
            return host_epoll_ctl(self.host_fd(), op, fd, events, data);
        };
        // Held across the host call, so the record follows the host's order of calls.
        let mut interests = lock(interests);
        host_epoll_ctl(self.host_fd(), op, fd, events, data)?;
        match op {
            libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD => {
                interests.set(fd, events, data, target);
                // Re-armed: journal readiness may be reported again.
                crate::journal::epoll_rearmed(target, self as *const OpenFile as usize);
            }
            libc::EPOLL_CTL_DEL => {
                interests.remove(fd);
            }
            _ => {}
        }
        Ok(())
    }

    /// This epoll instance's entry for `target` as (events, data), if it watches it.
    pub(crate) fn epoll_entry(&self, target: &Arc<OpenFile>) -> Option<(u32, u64)> {
        let interests = lock(self.epoll.as_ref()?);
        let i = interests.0.get(&target.host_fd())?;
        i.is(target).then_some((i.events, i.data))
    }

    /// Disable this instance's entry for `target` on the host, as a one-shot entry that
    /// fired is (its record is unchanged: the guest re-arms it with MOD, a restore too).
    pub(crate) fn epoll_disarm(&self, target: &Arc<OpenFile>) {
        let Some((_, data)) = self.epoll_entry(target) else {
            return;
        };
        let oneshot = libc::EPOLLONESHOT as u32;
        if let Err(e) = host_epoll_ctl(
            self.host_fd(),
            libc::EPOLL_CTL_MOD,
            target.host_fd(),
            oneshot,
            data,
        ) {
            tracing::debug!(fd = target.host_fd(), %e, "epoll one-shot disarm");
        }
    }

    /// This epoll instance's recorded interest list as (target host fd, events, data),
    /// by host fd; empty for other files. Entries whose file has since closed (which the
    /// host dropped with it) are left out.
    pub fn epoll_interests(&self) -> Vec<(RawFd, u32, u64)> {
        self.epoll.as_ref().map_or_else(Vec::new, |m| {
            lock(m)
                .0
                .iter()
                .filter(|(_, i)| i.target.strong_count() > 0)
                .map(|(&fd, i)| (fd, i.events, i.data))
                .collect()
        })
    }
}

/// Lock, ignoring poisoning (the maps stay consistent: every update is one insert or
/// remove).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Host `epoll_ctl` (`events`/`data` are ignored by DEL).
fn host_epoll_ctl(ep: RawFd, op: i32, target: RawFd, events: u32, data: u64) -> Result<(), Errno> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: `event` is a valid local epoll_event; a bad fd is reported as EBADF.
    check(i64::from(unsafe {
        libc::epoll_ctl(ep, op, target, &mut event)
    }))
    .map(drop)
}

/// Host `EPOLL_CTL_DEL`, where the target being already gone is success.
fn host_epoll_del(ep: RawFd, target: RawFd) -> Result<(), Errno> {
    match host_epoll_ctl(ep, libc::EPOLL_CTL_DEL, target, 0, 0) {
        Err(Errno::ENOENT | Errno::EBADF) => Ok(()),
        r => r,
    }
}

/// Make `target` registered with `events`/`data` on the host, whatever its registration
/// (`registered` says what the shadow believes): MOD or ADD, falling back to DEL + ADD when
/// the host disagrees or cannot MOD (an `EPOLLEXCLUSIVE` entry).
fn host_epoll_set(
    ep: RawFd,
    target: RawFd,
    events: u32,
    data: u64,
    registered: bool,
) -> Result<(), Errno> {
    let op = if registered {
        libc::EPOLL_CTL_MOD
    } else {
        libc::EPOLL_CTL_ADD
    };
    let r = host_epoll_ctl(ep, op, target, events, data);
    let retry = match r {
        Err(Errno::EEXIST) => true,
        Err(Errno::ENOENT | Errno::EINVAL) => registered,
        _ => false,
    };
    if !retry {
        return r;
    }
    // The ADD says whether this worked.
    host_epoll_del(ep, target).ok();
    host_epoll_ctl(ep, libc::EPOLL_CTL_ADD, target, events, data)
}

/// One entry of an epoll instance's interest list.
#[derive(Debug, Clone)]
struct Interest {
    events: u32,
    data: u64,
    /// The registered file; not kept open by the registration (the host drops an entry
    /// when its file is released, and so does this record, lazily).
    target: Weak<OpenFile>,
}

impl Interest {
    fn is(&self, file: &Arc<OpenFile>) -> bool {
        std::ptr::eq(self.target.as_ptr(), Arc::as_ptr(file))
    }
}

fn unwatch(target: &Weak<OpenFile>) {
    if let Some(t) = target.upgrade() {
        t.watched
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            })
            .ok();
    }
}

/// An epoll instance's interest list as the VMM set it on the host, by target host fd
/// (which is what the host keys it by: the open file and its fd).
#[derive(Debug, Default)]
struct Interests(BTreeMap<RawFd, Interest>);

impl Interests {
    fn set(&mut self, fd: RawFd, events: u32, data: u64, target: &Arc<OpenFile>) {
        let new = Interest {
            events,
            data,
            target: Arc::downgrade(target),
        };
        match self.0.insert(fd, new) {
            Some(old) if old.is(target) => {}
            old => {
                if let Some(old) = old {
                    unwatch(&old.target);
                }
                target.watched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn remove(&mut self, fd: RawFd) -> Option<Interest> {
        let old = self.0.remove(&fd);
        if let Some(old) = &old {
            unwatch(&old.target);
        }
        old
    }
}

impl Drop for Interests {
    fn drop(&mut self) {
        for i in self.0.values() {
            unwatch(&i.target);
        }
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
    /// Output held and input recorded for rescue windows (`journal.rs`).
    pub(crate) journal: crate::journal::Journal,
}

impl FdTable {
    /// An empty table with the default limit.
    pub fn new() -> FdTable {
        FdTable {
            slots: Vec::new(),
            limit: DEFAULT_NOFILE,
            journal: crate::journal::Journal::default(),
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

    /// How many distinct open files the table holds (dup'ed fds count once).
    pub fn distinct_files(&self) -> usize {
        distinct(self.iter().map(|(_, s)| &s.file)).len()
    }

    /// Call after a close took `file` out of the table (close, dup2/dup3 over an open fd,
    /// close_range): when no slot holds it any more, Linux releases the file, which takes
    /// it off every epoll interest list. A checkpoint may keep the host fd open, so take it
    /// off the lists of this table's epoll instances explicitly. Returns how many entries
    /// were removed.
    pub fn forget_file(&mut self, file: &Arc<OpenFile>) -> usize {
        self.forget_files(std::slice::from_ref(file))
    }

    /// [`FdTable::forget_file`] for several files, with one scan of the table.
    pub fn forget_files(&mut self, files: &[Arc<OpenFile>]) -> usize {
        // Files with journal state (rare) whose last fd this was: the journal lets go of
        // what only a guest fd could use.
        let journaled: Vec<Arc<OpenFile>> = distinct(files.iter())
            .into_iter()
            .filter(|f| f.journal.get().is_some())
            .filter(|f| !self.iter().any(|(_, s)| Arc::ptr_eq(&s.file, f)))
            .cloned()
            .collect();
        if !journaled.is_empty() {
            self.journal_closed(&journaled);
        }
        // A file in no interest list (the usual case) needs no scan.
        let watched: Vec<&Arc<OpenFile>> = distinct(files.iter())
            .into_iter()
            .filter(|f| f.watched.load(Ordering::Relaxed) > 0)
            .collect();
        if watched.is_empty() {
            return 0;
        }
        let candidates: HashSet<*const OpenFile> = watched.iter().map(|f| Arc::as_ptr(f)).collect();
        let mut open = HashSet::new();
        let mut epolls = Vec::new();
        let mut seen = HashSet::new();
        for (_, slot) in self.iter() {
            let p = Arc::as_ptr(&slot.file);
            if candidates.contains(&p) {
                open.insert(p);
            }
            if slot.file.epoll.is_some() && seen.insert(p) {
                epolls.push(&slot.file);
            }
        }
        let gone: Vec<&Arc<OpenFile>> = watched
            .into_iter()
            .filter(|f| !open.contains(&Arc::as_ptr(f)))
            .collect();
        let mut removed = 0;
        for ep in epolls {
            let Some(interests) = &ep.epoll else { continue };
            let mut interests = lock(interests);
            for f in &gone {
                let fd = f.host_fd();
                if interests.0.get(&fd).is_some_and(|i| i.is(f)) {
                    // Nothing to report to the guest, whose close succeeds regardless.
                    if let Err(e) = host_epoll_del(ep.host_fd(), fd) {
                        tracing::debug!(epoll = ep.host_fd(), fd, %e, "epoll DEL on close");
                    }
                    interests.remove(fd);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Keep the table as it is now, for [`FdTable::restore`]. The checkpoint holds every
    /// open file (so their host fds stay open until it is dropped), the offset of every
    /// regular file and the interest list of every epoll instance.
    pub fn checkpoint(&self) -> FdCheckpoint {
        let files = distinct(self.iter().map(|(_, s)| &s.file));
        let mut offsets = Vec::new();
        let mut epolls = Vec::new();
        let mut pipe_ends: BTreeMap<(u64, u64), PipeEnds> = BTreeMap::new();
        let mut eventfds = Vec::new();
        let mut timers = Vec::new();
        for f in &files {
            match f.host_type() {
                HostType::Fifo {
                    dev,
                    ino,
                    reads,
                    writes,
                } => {
                    let ends = pipe_ends.entry((dev, ino)).or_default();
                    if reads && ends.0.is_none() {
                        ends.0 = Some(Arc::clone(f));
                    }
                    if writes && ends.1.is_none() {
                        ends.1 = Some(Arc::clone(f));
                    }
                }
                HostType::EventFd => {
                    if let Some(count) = eventfd_count(f.host_fd()) {
                        eventfds.push((Arc::clone(f), count));
                    }
                }
                HostType::TimerFd => {
                    if let Some(t) = timerfd_setting(f.host_fd()) {
                        timers.push((Arc::clone(f), t));
                    }
                }
                _ => {}
            }
        }
        let mut pipes = Vec::new();
        let mut not_kept = Vec::new();
        let unix = files
            .iter()
            .filter(|f| f.host_type() == HostType::UnixSocket)
            .count();
        if unix > 0 {
            not_kept.push(format!(
                "{unix} AF_UNIX socket(s): data they hold or exchange is not kept"
            ));
        }
        let mut half_pipes = 0;
        for (read, write) in pipe_ends.into_values() {
            let (Some(read), Some(write)) = (read, write) else {
                // One end outside the guest: its contents are not ours to keep.
                half_pipes += 1;
                continue;
            };
            match copy_pipe_contents(&read, &write) {
                Ok(bytes) => pipes.push(SavedPipe { read, write, bytes }),
                Err(e) => tracing::warn!(error = %e, "cannot keep a pipe's contents"),
            }
        }
        if half_pipes > 0 {
            not_kept.push(format!(
                "{half_pipes} pipe(s) with one end outside the guest: data in them is not kept"
            ));
        }
        for f in files {
            if let Some(interests) = &f.epoll {
                let saved = lock(interests)
                    .0
                    .iter()
                    .filter_map(|(&fd, i)| {
                        let target = i.target.upgrade()?;
                        Some((
                            fd,
                            SavedInterest {
                                events: i.events,
                                data: i.data,
                                target,
                            },
                        ))
                    })
                    .collect();
                epolls.push((f.clone(), saved));
            } else if let Some(offset) = f.is_regular().then(|| file_offset(f.host_fd())).flatten()
            {
                offsets.push((f.clone(), offset));
            }
        }
        let io_epoch = IO_EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
        self.journal.checkpoint_taken(io_epoch);
        FdCheckpoint {
            slots: self.slots.clone(),
            limit: self.limit,
            offsets,
            epolls,
            pipes,
            eventfds,
            timers,
            io_epoch,
            not_kept,
        }
    }

    /// A transfer of data happened on `fd` (called after every read, write, send, receive
    /// that moved bytes, right after the call on the same thread). A transfer the journal
    /// did not keep (the call says so, `journal.rs`) also marks the file for rollbacks to
    /// windows.
    pub fn note_io(&self, fd: i64) {
        let journaled = crate::journal::take_call_journaled();
        if let Ok(slot) = self.slot(fd) {
            let now = IO_EPOCH.load(Ordering::Relaxed);
            slot.file.last_io.store(now, Ordering::Relaxed);
            if !journaled {
                slot.file.last_raw_io.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Make the table `ck`'s again: its slots and limit (files opened since leave the
    /// table and close when nothing else holds them: the journal holds connections
    /// accepted in a rescue window), the saved file offsets, and each restored epoll
    /// instance's interest list, on the host and in its record. TCP connections with
    /// traffic since `ck` are shut down; for a live window's checkpoint only those (and
    /// journaled AF_UNIX streams) with traffic the journal did not keep. For an operator
    /// checkpoint, journal entries newer than it are discarded (what
    /// [`FdTable::journal_discard_after`] would do).
    ///
    /// Every step is tried: on error the table is still `ck`'s, and the error names the
    /// first host operation that failed (an epoll entry that could not be set is left
    /// unregistered, and unrecorded).
    pub fn restore(&mut self, ck: &FdCheckpoint) -> Result<RestoreReport, RestoreError> {
        // Files only the current table held close here, which also takes them off the
        // host's interest lists.
        drop(std::mem::replace(&mut self.slots, ck.slots.clone()));
        self.limit = ck.limit;
        let mut report = RestoreReport {
            fds: self.iter().count(),
            ..RestoreReport::default()
        };
        let mut failures = Vec::new();
        for (file, offset) in &ck.offsets {
            // SAFETY: lseek on a host fd the checkpoint holds open.
            match check(unsafe { libc::lseek(file.host_fd(), *offset, libc::SEEK_SET) }) {
                Ok(_) => report.offsets_restored += 1,
                Err(errno) => failures.push(RestoreFailure::Seek {
                    fd: file.host_fd(),
                    offset: *offset,
                    errno,
                }),
            }
        }
        for (ep, saved) in &ck.epolls {
            reconcile_epoll(ep, saved, &mut report, &mut failures);
        }
        for p in &ck.pipes {
            match refill_pipe(&p.read, &p.write, &p.bytes) {
                Ok(()) => report.pipes_restored += 1,
                Err(errno) => failures.push(RestoreFailure::Pipe {
                    fd: p.read.host_fd(),
                    errno,
                }),
            }
        }
        // A rescue window's journal keeps what its files carried since (held output is
        // dropped, input replayed): only a transfer it did not keep needs a shutdown. An
        // operator checkpoint keeps nothing of it.
        let window = self.journal.is_window(ck.io_epoch);
        let mut shut = Vec::new();
        for f in distinct(self.slots.iter().flatten().map(|s| &s.file)) {
            let since = if window { &f.last_raw_io } else { &f.last_io };
            let stream = f.host_type() == HostType::TcpStream
                || window && f.journal_class.get() == Some(&crate::journal::Class::Stream);
            if since.load(Ordering::Relaxed) >= ck.io_epoch && stream {
                // SAFETY: shutdown on a host socket the table holds; no memory effects.
                if unsafe { libc::shutdown(f.host_fd(), libc::SHUT_RDWR) } == 0 {
                    report.connections_shut += 1;
                }
                shut.push(Arc::clone(f));
            }
        }
        for f in &shut {
            self.journal_kill(f);
        }
        if !window {
            self.journal_discard_since(ck.io_epoch);
        }
        for (f, saved) in &ck.timers {
            match set_timerfd(f.host_fd(), saved) {
                Ok(()) => report.timers_restored += 1,
                Err(errno) => failures.push(RestoreFailure::Pipe {
                    fd: f.host_fd(),
                    errno,
                }),
            }
        }
        for (f, count) in &ck.eventfds {
            match set_eventfd_count(f.host_fd(), *count) {
                Ok(()) => report.eventfds_restored += 1,
                Err(errno) => failures.push(RestoreFailure::Pipe {
                    fd: f.host_fd(),
                    errno,
                }),
            }
        }
        let failed = failures.len();
        match failures.into_iter().next() {
            None => Ok(report),
            Some(first) => Err(RestoreError {
                first,
                failed,
                report,
            }),
        }
    }
}

/// The distinct files of `files` (by identity), in first-seen order.
fn distinct<'a>(files: impl Iterator<Item = &'a Arc<OpenFile>>) -> Vec<&'a Arc<OpenFile>> {
    let mut seen = HashSet::new();
    files.filter(|f| seen.insert(Arc::as_ptr(f))).collect()
}

/// The offset of `fd` if it is a regular file (memfds included); `None` for anything else
/// (pipes, sockets, ttys, directories, anonymous inodes...).
fn file_offset(fd: RawFd) -> Option<i64> {
    // SAFETY: lseek that only reads the offset of a host fd we hold.
    check(unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) })
        .ok()
        .map(|o| o as i64)
}

/// Give the host epoll instance `ep` exactly the interest list `saved`, and record it.
fn reconcile_epoll(
    ep: &Arc<OpenFile>,
    saved: &BTreeMap<RawFd, SavedInterest>,
    report: &mut RestoreReport,
    failures: &mut Vec<RestoreFailure>,
) {
    let Some(interests) = &ep.epoll else { return };
    let mut interests = lock(interests);
    let epfd = ep.host_fd();
    let mut fail = |target: RawFd, op: &'static str, errno: Errno| {
        failures.push(RestoreFailure::Epoll {
            epoll: epfd,
            target,
            op,
            errno,
        });
    };
    // Entries the checkpoint did not have. One whose file is gone the host dropped with
    // the file (and its fd number may name another file now): only forget it.
    let current: Vec<RawFd> = interests.0.keys().copied().collect();
    for fd in current {
        let Some(cur) = interests.0.get(&fd) else {
            continue;
        };
        if saved.get(&fd).is_some_and(|s| cur.is(&s.target)) {
            continue;
        }
        let alive = cur.target.strong_count() > 0;
        interests.remove(fd);
        if alive {
            match host_epoll_del(epfd, fd) {
                Ok(()) => report.epoll_removed += 1,
                Err(e) => fail(fd, "DEL", e),
            }
        }
    }
    // Entries to add, change, or re-arm. An unchanged entry is MODified anyway if it is
    // one-shot (it may have fired since) or edge-triggered (an edge may have been
    // consumed since): MOD re-arms it and reports it again if it is ready.
    let rearm = (libc::EPOLLONESHOT | libc::EPOLLET) as u32;
    for (&fd, s) in saved {
        let (registered, counter) = match interests.0.get(&fd) {
            None => (false, &mut report.epoll_added),
            Some(c) if c.events != s.events || c.data != s.data => {
                (true, &mut report.epoll_modified)
            }
            Some(_) if s.events & rearm != 0 => (true, &mut report.epoll_rearmed),
            Some(_) => continue,
        };
        match host_epoll_set(epfd, fd, s.events, s.data, registered) {
            Ok(()) => {
                *counter += 1;
                interests.set(fd, s.events, s.data, &s.target);
            }
            Err(e) => {
                host_epoll_del(epfd, fd).ok();
                interests.remove(fd);
                fail(fd, if registered { "MOD" } else { "ADD" }, e);
            }
        }
    }
}

/// A saved epoll interest-list entry; keeps its file open.
#[derive(Debug, Clone)]
struct SavedInterest {
    events: u32,
    data: u64,
    target: Arc<OpenFile>,
}

/// The fd table at some moment, for [`FdTable::restore`]. Holds every file that was open,
/// so their host fds stay open (guest closes are deferred) until it is dropped.
#[derive(Debug, Clone)]
pub struct FdCheckpoint {
    slots: Vec<Option<FdSlot>>,
    limit: u64,
    /// Regular files and their offsets.
    offsets: Vec<(Arc<OpenFile>, i64)>,
    /// Epoll instances and their interest lists, by target host fd.
    epolls: Vec<(Arc<OpenFile>, BTreeMap<RawFd, SavedInterest>)>,
    /// Pipes with both ends in the guest, and what they held.
    pipes: Vec<SavedPipe>,
    /// Eventfds and their counters.
    eventfds: Vec<(Arc<OpenFile>, u64)>,
    /// Timerfds and their settings.
    timers: Vec<(Arc<OpenFile>, SavedTimer)>,
    /// The I/O epoch this checkpoint began.
    io_epoch: u64,
    /// What this checkpoint cannot put back, for the operator.
    not_kept: Vec<String>,
}

/// The read and write ends of one pipe found in the table.
type PipeEnds = (Option<Arc<OpenFile>>, Option<Arc<OpenFile>>);

/// A pipe's contents at a checkpoint.
#[derive(Debug, Clone)]
struct SavedPipe {
    read: Arc<OpenFile>,
    write: Arc<OpenFile>,
    bytes: Vec<u8>,
}

/// What a host file is, as far as a checkpoint cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostType {
    Regular,
    Fifo {
        dev: u64,
        ino: u64,
        reads: bool,
        writes: bool,
    },
    EventFd,
    TimerFd,
    TcpStream,
    UnixSocket,
    Other,
}

/// A timerfd's setting at a checkpoint: its interval and its next expiry as an instant
/// (time is not rolled back: a restore arms it for what is left until then).
#[derive(Debug, Clone, Copy)]
struct SavedTimer {
    interval: libc::timespec,
    /// None: disarmed.
    expires: Option<std::time::Instant>,
}

fn timespec_duration(t: &libc::timespec) -> std::time::Duration {
    std::time::Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn timerfd_setting(fd: RawFd) -> Option<SavedTimer> {
    // SAFETY: all-zero bytes are a valid `itimerspec`.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: timerfd_gettime writes one `itimerspec` to the local.
    if unsafe { libc::timerfd_gettime(fd, &mut its) } != 0 {
        return None;
    }
    let value = timespec_duration(&its.it_value);
    Some(SavedTimer {
        interval: its.it_interval,
        expires: (!value.is_zero()).then(|| std::time::Instant::now() + value),
    })
}

fn set_timerfd(fd: RawFd, saved: &SavedTimer) -> Result<(), Errno> {
    let value = match saved.expires {
        // A deadline already passed fires at once (1 ns: zero would disarm).
        Some(at) => at
            .saturating_duration_since(std::time::Instant::now())
            .max(std::time::Duration::from_nanos(1)),
        None => std::time::Duration::ZERO,
    };
    let its = libc::itimerspec {
        it_interval: saved.interval,
        it_value: libc::timespec {
            tv_sec: value.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(value.subsec_nanos() as i32),
        },
    };
    // SAFETY: timerfd_settime reads the local `itimerspec`; no old value is asked for.
    check(i64::from(unsafe {
        libc::timerfd_settime(fd, 0, &its, std::ptr::null_mut())
    }))
    .map(|_| ())
}

/// An int-valued `SOL_SOCKET` option of a socket (`SO_DOMAIN`, `SO_TYPE`).
pub(crate) fn socket_option(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int to the local and its length to `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// An AF_INET/AF_INET6 SOCK_STREAM socket?
fn is_tcp_stream(fd: RawFd) -> bool {
    matches!(
        socket_option(fd, libc::SO_DOMAIN),
        Some(libc::AF_INET) | Some(libc::AF_INET6)
    ) && socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Bytes waiting in the pipe behind `fd`.
fn pipe_pending(fd: RawFd) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the local.
    check(i64::from(unsafe {
        libc::ioctl(fd, libc::FIONREAD, &mut n)
    }))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Read exactly the `n` bytes waiting in a pipe (they are there: no blocking).
fn read_pending(fd: RawFd, n: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; n];
    let mut done = 0;
    while done < n {
        // SAFETY: reads into the unfilled tail of a local buffer.
        let r = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), n - done) };
        match check(r as i64) {
            Ok(0) => break,
            Ok(k) => done += k as usize,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Write all of `bytes` to a pipe without blocking (the world is stopped: nobody would
/// drain it). The file's status flags are set back as they were.
fn write_all_nonblocking(fd: RawFd, bytes: &[u8]) -> Result<(), Errno> {
    // SAFETY: F_GETFL/F_SETFL on our fd have no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(i64::from(flags))?;
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    let mut done = 0;
    let mut result = Ok(());
    while done < bytes.len() {
        // SAFETY: writes from a local buffer.
        let r = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        match check(r as i64) {
            Ok(k) => done += k as usize,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    result
}

/// The contents of a pipe, left in place (read out and written back).
fn copy_pipe_contents(read: &OpenFile, write: &OpenFile) -> Result<Vec<u8>, Errno> {
    let n = pipe_pending(read.host_fd())?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let bytes = read_pending(read.host_fd(), n)?;
    write_all_nonblocking(write.host_fd(), &bytes)?;
    Ok(bytes)
}

/// Make a pipe hold exactly `bytes`.
fn refill_pipe(read: &OpenFile, write: &OpenFile, bytes: &[u8]) -> Result<(), Errno> {
    let n = pipe_pending(read.host_fd())?;
    if n > 0 {
        read_pending(read.host_fd(), n)?;
    }
    write_all_nonblocking(write.host_fd(), bytes)
}

/// An eventfd's counter, from `/proc/self/fdinfo` (reading the fd would change it); `None`
/// for a semaphore-mode eventfd, whose counter a read cannot set back in one step.
fn eventfd_count(fd: RawFd) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    if info
        .lines()
        .any(|l| l.starts_with("eventfd-semaphore:") && l.trim_end().ends_with('1'))
    {
        return None;
    }
    let count = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))?;
    u64::from_str_radix(count.trim(), 16).ok()
}

/// Set an eventfd's counter to `count`.
fn set_eventfd_count(fd: RawFd, count: u64) -> Result<(), Errno> {
    let now = eventfd_count(fd).ok_or(Errno::EINVAL)?;
    if now != 0 {
        let mut v = 0u64;
        // SAFETY: an eventfd read writes 8 bytes to the local; the counter is non-zero, so it
        // does not block, and it resets the counter to zero.
        check(unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) } as i64)?;
    }
    if count != 0 {
        write_all_nonblocking(fd, &count.to_ne_bytes())?;
    }
    Ok(())
}

impl FdCheckpoint {
    /// How many guest fds were open.
    pub fn fds(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// What a rollback to it cannot put back (said, never silently skipped).
    pub fn not_kept(&self) -> &[String] {
        &self.not_kept
    }

    /// How many distinct open files it holds.
    pub fn distinct_files(&self) -> usize {
        distinct(self.slots.iter().flatten().map(|s| &s.file)).len()
    }
}

/// What [`FdTable::restore`] did. (Files that closed because only the table held them
/// are not counted: whether anything else holds a file is not known here.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Open guest fds after the restore.
    pub fds: usize,
    /// File offsets set back.
    pub offsets_restored: usize,
    /// Epoll entries added back (their files had closed, or been removed, since).
    pub epoll_added: usize,
    /// Epoll entries removed (added since the checkpoint).
    pub epoll_removed: usize,
    /// Epoll entries whose events or data were set back.
    pub epoll_modified: usize,
    /// Unchanged one-shot or edge-triggered entries re-armed.
    pub epoll_rearmed: usize,
    /// Pipes given back their contents.
    pub pipes_restored: usize,
    /// Eventfds given back their counters.
    pub eventfds_restored: usize,
    /// TCP connections with traffic since the checkpoint, shut down.
    pub connections_shut: usize,
    /// Timerfds set back to their checkpoint's deadline and interval.
    pub timers_restored: usize,
}

/// A host operation of a restore that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestoreFailure {
    /// Setting a file offset back.
    #[error("seeking host fd {fd} back to {offset}: {errno}")]
    Seek {
        /// Host fd.
        fd: RawFd,
        /// The saved offset.
        offset: i64,
        /// The host's error.
        errno: Errno,
    },
    /// Reconciling an epoll interest list.
    #[error("epoll_ctl {op} of host fd {target} on epoll host fd {epoll}: {errno}")]
    Epoll {
        /// Host epoll fd.
        epoll: RawFd,
        /// Host target fd.
        target: RawFd,
        /// "ADD", "MOD" or "DEL".
        op: &'static str,
        /// The host's error.
        errno: Errno,
    },
    /// Giving a pipe, eventfd or timerfd its contents or setting back.
    #[error("restoring the contents of host fd {fd}: {errno}")]
    Pipe {
        /// Host fd.
        fd: RawFd,
        /// The host's error.
        errno: Errno,
    },
}

/// [`FdTable::restore`] completed with failed host operations; the table is the
/// checkpoint's regardless.
#[derive(Debug, Clone, thiserror::Error)]
#[error("fd table restored with {failed} failed host operation(s), the first: {first}")]
pub struct RestoreError {
    /// The first failure.
    pub first: RestoreFailure,
    /// How many host operations failed.
    pub failed: usize,
    /// What was done.
    pub report: RestoreReport,
}

impl RestoreFailure {
    /// The host's error.
    pub fn errno(&self) -> Errno {
        match self {
            RestoreFailure::Seek { errno, .. }
            | RestoreFailure::Epoll { errno, .. }
            | RestoreFailure::Pipe { errno, .. } => *errno,
        }
    }
}

impl From<RestoreError> for Errno {
    /// The first failure's errno (for callers that report restores as an `Errno`).
    fn from(e: RestoreError) -> Errno {
        e.first.errno()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OpenFile {
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        OpenFile::new(f.into(), FileKind::Host, None)
    }

    use std::os::fd::FromRawFd;

    const IN: u32 = libc::EPOLLIN as u32;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the local array.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0, "pipe2: {}", Errno::last());
        // SAFETY: the kernel just returned these fds and nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn new_epoll() -> OpenFile {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0, "epoll_create1: {}", Errno::last());
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        OpenFile::new_epoll(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Install `file` at the lowest free fd; the fd and the file.
    fn put(t: &mut FdTable, file: OpenFile, cloexec: bool) -> (i32, Arc<OpenFile>) {
        let fd = t.insert(file, cloexec).expect("insert");
        (fd, t.get(i64::from(fd)).expect("get"))
    }

    fn host(fd: OwnedFd) -> OpenFile {
        OpenFile::new(fd, FileKind::Host, None)
    }

    fn write_byte(fd: &OwnedFd) {
        // SAFETY: writes one byte from a local to a pipe we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(n, 1, "write: {}", Errno::last());
    }

    /// What the host epoll instance reports now, as (events, data) sorted by data.
    fn ready(ep: &OpenFile) -> Vec<(u32, u64)> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: the buffer holds 8 events; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(ep.host_fd(), evs.as_mut_ptr(), 8, 0) };
        assert!(n >= 0, "epoll_wait: {}", Errno::last());
        let mut out: Vec<(u32, u64)> = evs[..n as usize]
            .iter()
            .map(|e| (e.events, e.u64))
            .collect();
        out.sort_by_key(|&(_, d)| d);
        out
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the fd's flags.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    /// poll(2) revents of `fd`, at once.
    fn revents(fd: &OwnedFd) -> i16 {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid local pollfd; timeout 0.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        assert!(n >= 0, "poll: {}", Errno::last());
        p.revents
    }

    fn offset(f: &OpenFile) -> i64 {
        // SAFETY: reads the offset of a host fd the test holds.
        unsafe { libc::lseek(f.host_fd(), 0, libc::SEEK_CUR) }
    }

    fn read_n(f: &OpenFile, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        // SAFETY: reads at most `n` bytes into a buffer of `n`.
        let got = unsafe { libc::read(f.host_fd(), buf.as_mut_ptr().cast(), n) };
        assert_eq!(got, n as isize, "read: {}", Errno::last());
        buf
    }

    /// A regular file of bytes 0..100, unlinked once open.
    fn temp_file() -> OpenFile {
        use std::io::{Seek, SeekFrom, Write};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "assure-vmm-fd-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create temp file");
        std::fs::remove_file(&path).expect("unlink temp file");
        let bytes: Vec<u8> = (0..100).collect();
        f.write_all(&bytes).expect("write temp file");
        f.seek(SeekFrom::Start(0)).expect("rewind");
        host(f.into())
    }

    #[test]
    fn epoll_ctl_records_only_what_the_host_accepts() {
        let ep = new_epoll();
        let (r, _w) = pipe();
        let target = Arc::new(host(r));
        let fd = target.host_fd();
        assert_eq!(
            ep.epoll_ctl(libc::EPOLL_CTL_MOD, &target, IN, 1),
            Err(Errno::ENOENT)
        );
        assert!(ep.epoll_interests().is_empty());
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &target, IN, 1)
            .expect("add");
        assert_eq!(
            ep.epoll_ctl(libc::EPOLL_CTL_ADD, &target, IN, 2),
            Err(Errno::EEXIST)
        );
        assert_eq!(ep.epoll_interests(), [(fd, IN, 1)]);
        assert_eq!(target.watched.load(Ordering::Relaxed), 1);
        // Regular files cannot be watched (EPERM), a non-epoll fd cannot watch (EINVAL),
        // an instance cannot watch itself (EINVAL), nor an unknown op.
        let file = Arc::new(temp_file());
        assert_eq!(
            ep.epoll_ctl(libc::EPOLL_CTL_ADD, &file, IN, 3),
            Err(Errno::EPERM)
        );
        assert_eq!(
            file.epoll_ctl(libc::EPOLL_CTL_ADD, &target, IN, 3),
            Err(Errno::EINVAL)
        );
        let ep = Arc::new(ep);
        assert_eq!(
            ep.epoll_ctl(libc::EPOLL_CTL_ADD, &ep, IN, 3),
            Err(Errno::EINVAL)
        );
        assert_eq!(ep.epoll_ctl(99, &target, IN, 3), Err(Errno::EINVAL));
        assert_eq!(ep.epoll_interests(), [(fd, IN, 1)]);
        ep.epoll_ctl(libc::EPOLL_CTL_MOD, &target, IN | libc::EPOLLET as u32, 4)
            .expect("mod");
        assert_eq!(ep.epoll_interests(), [(fd, IN | libc::EPOLLET as u32, 4)]);
        ep.epoll_ctl(libc::EPOLL_CTL_DEL, &target, 0, 0)
            .expect("del");
        assert!(ep.epoll_interests().is_empty());
        assert_eq!(target.watched.load(Ordering::Relaxed), 0);
        // Dropping an instance forgets its entries' counts.
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &target, IN, 5)
            .expect("add again");
        assert_eq!(target.watched.load(Ordering::Relaxed), 1);
        drop(ep);
        assert_eq!(target.watched.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn close_of_last_fd_takes_the_file_off_interest_lists() {
        let mut t = FdTable::new();
        let (_, ep) = put(&mut t, new_epoll(), false);
        let (r, w) = pipe();
        let g1 = t.insert(host(r), false).expect("fd");
        let file = t.get(i64::from(g1)).expect("get");
        let g2 = t.insert_from(0, file.clone(), false).expect("dup");
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &file, IN, 7)
            .expect("add");
        write_byte(&w);
        // Closing one of two fds of the file leaves it registered, as on Linux.
        let slot = t.remove(i64::from(g1)).expect("close");
        assert_eq!(t.forget_file(&slot.file), 0);
        assert_eq!(ready(&ep), [(IN, 7)]);
        // dup2 over the other one closes the file's last fd.
        let devnull = std::fs::File::open("/dev/null").expect("open /dev/null");
        let replaced = t
            .insert_at(i64::from(g2), Arc::new(host(devnull.into())), false)
            .expect("dup2")
            .expect("replaced a slot");
        assert_eq!(t.forget_file(&replaced.file), 1);
        // The test still holds the file (as a checkpoint would): the host fd is open and
        // readable, but no longer reported.
        assert!(is_open(file.host_fd()));
        assert_ne!(revents(&w) & libc::POLLOUT, 0);
        assert!(ready(&ep).is_empty());
        assert!(ep.epoll_interests().is_empty());
        // A file in no interest list needs no work.
        assert_eq!(t.forget_files(&[replaced.file, slot.file]), 0);
    }

    #[test]
    fn close_while_checkpoint_live_defers_host_close_and_leaves_epoll() {
        let mut t = FdTable::new();
        let (_, ep) = put(&mut t, new_epoll(), true);
        let (r, w) = pipe();
        let g = t.insert(host(r), false).expect("fd");
        let file = t.get(i64::from(g)).expect("get");
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &file, IN, 7)
            .expect("add");
        write_byte(&w);
        assert_eq!(ready(&ep), [(IN, 7)]);
        let ck = t.checkpoint();
        let hostfd = file.host_fd();
        let weak = Arc::downgrade(&file);
        drop(file);
        // The guest closes its only fd of the pipe.
        let slot = t.remove(i64::from(g)).expect("close");
        assert_eq!(t.forget_files(&[slot.file]), 1);
        // The checkpoint keeps the host fd open: the write end sees no hang-up...
        assert!(is_open(hostfd));
        assert_eq!(revents(&w) & libc::POLLERR, 0);
        // ...but the guest's epoll no longer reports the closed fd.
        assert!(ready(&ep).is_empty());
        assert!(ep.epoll_interests().is_empty());
        assert_eq!(t.distinct_files(), 1);
        assert_eq!(ck.distinct_files(), 2);
        // Releasing the checkpoint closes it: the pipe's write end now reports an error.
        drop(ck);
        assert!(weak.upgrade().is_none());
        assert_ne!(revents(&w) & libc::POLLERR, 0);
    }

    #[test]
    fn restore_reconciles_epoll_interest_lists() {
        let mut t = FdTable::new();
        let epg = t.insert(new_epoll(), false).expect("ep");
        let ep = t.get(i64::from(epg)).expect("ep");
        let (r1, w1) = pipe();
        let g1 = t.insert(host(r1), false).expect("fd");
        let f1 = t.get(i64::from(g1)).expect("get");
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &f1, IN, 7)
            .expect("add 1");
        let ck = t.checkpoint();

        // Since: a second pipe (still held elsewhere after the restore), a third (held by
        // the table only), and the first one's data changed.
        let (r2, w2) = pipe();
        let (_, f2) = put(&mut t, host(r2), false);
        let (r3, w3) = pipe();
        let g3 = t.insert(host(r3), false).expect("fd 3");
        let f3 = t.get(i64::from(g3)).expect("get 3");
        let weak3 = Arc::downgrade(&f3);
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &f2, IN, 8)
            .expect("add 2");
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &f3, IN, 10)
            .expect("add 3");
        drop(f3);
        ep.epoll_ctl(libc::EPOLL_CTL_MOD, &f1, IN, 9)
            .expect("mod 1");
        for w in [&w1, &w2, &w3] {
            write_byte(w);
        }
        assert_eq!(ready(&ep), [(IN, 8), (IN, 9), (IN, 10)]);

        let report = t.restore(&ck).expect("restore");
        assert_eq!(
            report,
            RestoreReport {
                fds: 2,
                offsets_restored: 0,
                epoll_added: 0,
                epoll_removed: 1,
                epoll_modified: 1,
                epoll_rearmed: 0,
                // The pipes' write ends are outside the table: their contents are not kept.
                pipes_restored: 0,
                eventfds_restored: 0,
                connections_shut: 0,
                timers_restored: 0,
            }
        );
        // The table is the checkpoint's: fds opened since are gone, the third pipe closed.
        assert_eq!(t.get(i64::from(g3)).err(), Some(Errno::EBADF));
        assert_eq!(t.iter().map(|(g, _)| g).collect::<Vec<_>>(), [epg, g1]);
        assert!(weak3.upgrade().is_none());
        assert_ne!(revents(&w3) & libc::POLLERR, 0);
        // The second pipe is open and readable but no longer reported; the first reports
        // its checkpointed data.
        assert!(is_open(f2.host_fd()));
        assert_eq!(ready(&ep), [(IN, 7)]);
        assert_eq!(ep.epoll_interests(), [(f1.host_fd(), IN, 7)]);
        // A second restore has nothing to change.
        let again = t.restore(&ck).expect("restore again");
        assert_eq!(
            again.epoll_added + again.epoll_removed + again.epoll_modified,
            0
        );
    }

    #[test]
    fn restore_brings_back_a_closed_fd_and_its_registration() {
        let mut t = FdTable::new();
        let (_, ep) = put(&mut t, new_epoll(), false);
        let (r, w) = pipe();
        let g = t.insert(host(r), true).expect("fd");
        let file = t.get(i64::from(g)).expect("get");
        let hostfd = file.host_fd();
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &file, IN, 7)
            .expect("add");
        drop(file);
        t.set_limit(64);
        let ck = t.checkpoint();
        let slot = t.remove(i64::from(g)).expect("close");
        t.forget_file(&slot.file);
        drop(slot);
        t.set_limit(4096);
        write_byte(&w);
        assert!(ready(&ep).is_empty());

        let report = t.restore(&ck).expect("restore");
        assert_eq!(report.epoll_added, 1);
        assert_eq!(t.limit(), 64);
        assert_eq!(t.host_fd(i64::from(g)), Ok(hostfd));
        assert!(t.slot(i64::from(g)).expect("slot").cloexec);
        assert_eq!(ready(&ep), [(IN, 7)]);
        assert_eq!(ep.epoll_interests(), [(hostfd, IN, 7)]);
    }

    #[test]
    fn restore_rearms_oneshot_entries() {
        let mut t = FdTable::new();
        let (_, ep) = put(&mut t, new_epoll(), false);
        let (r, w) = pipe();
        let (_, file) = put(&mut t, host(r), false);
        let oneshot = IN | libc::EPOLLONESHOT as u32;
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &file, oneshot, 7)
            .expect("add");
        write_byte(&w);
        let ck = t.checkpoint();
        assert_eq!(ready(&ep), [(IN, 7)]);
        // Fired: disarmed until re-armed, though still readable.
        assert!(ready(&ep).is_empty());
        let report = t.restore(&ck).expect("restore");
        assert_eq!(report.epoll_rearmed, 1);
        assert_eq!(report.epoll_modified + report.epoll_added, 0);
        assert_eq!(ready(&ep), [(IN, 7)]);
    }

    #[test]
    fn pipe_and_eventfd_contents_come_back() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and ours.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: plain eventfd creation.
        let efd = unsafe { libc::eventfd(3, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        // SAFETY: a new fd we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let (rfd, wfd, eraw) = (r.as_raw_fd(), w.as_raw_fd(), efd.as_raw_fd());
        let mut t = FdTable::new();
        t.insert(OpenFile::new(r, FileKind::Host, None), false)
            .expect("read end");
        t.insert(OpenFile::new(w, FileKind::Host, None), false)
            .expect("write end");
        t.insert(OpenFile::new(efd, FileKind::Host, None), false)
            .expect("eventfd");
        write_all_nonblocking(wfd, b"wake").expect("write");
        let ck = t.checkpoint();
        // The checkpoint left the contents in place.
        assert_eq!(pipe_pending(rfd), Ok(4));
        assert_eq!(eventfd_count(eraw), Some(3));
        // Since: one byte consumed, two written; the counter drained and bumped.
        assert_eq!(read_pending(rfd, 1), Ok(b"w".to_vec()));
        write_all_nonblocking(wfd, b"xy").expect("write");
        set_eventfd_count(eraw, 7).expect("count");
        let report = t.restore(&ck).expect("restore");
        assert_eq!((report.pipes_restored, report.eventfds_restored), (1, 1));
        assert_eq!(read_pending(rfd, 4), Ok(b"wake".to_vec()));
        assert_eq!(pipe_pending(rfd), Ok(0));
        assert_eq!(eventfd_count(eraw), Some(3));
    }

    #[test]
    fn timerfd_settings_come_back() {
        // SAFETY: plain timerfd creation.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut t = FdTable::new();
        t.insert(OpenFile::new(owned, FileKind::Host, None), false)
            .expect("timerfd");
        let arm = |secs: i64| libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        };
        let set = |its: libc::itimerspec| {
            // SAFETY: timerfd_settime reads the local itimerspec; no old value asked for.
            unsafe { libc::timerfd_settime(fd, 0, &its, std::ptr::null_mut()) }
        };
        assert_eq!(set(arm(100)), 0);
        let ck = t.checkpoint();
        // Disarmed since the checkpoint.
        assert_eq!(set(arm(0)), 0);
        assert!(timerfd_setting(fd).and_then(|s| s.expires).is_none());
        let report = t.restore(&ck).expect("restore");
        assert_eq!(report.timers_restored, 1);
        let left = timerfd_setting(fd)
            .and_then(|s| s.expires)
            .map(|at| at.saturating_duration_since(std::time::Instant::now()))
            .expect("armed again");
        assert!(
            left > std::time::Duration::from_secs(98)
                && left <= std::time::Duration::from_secs(100),
            "{left:?}"
        );
    }

    #[test]
    fn what_a_checkpoint_cannot_keep_is_said() {
        let mut t = FdTable::new();
        assert!(t.checkpoint().not_kept().is_empty());
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two fds into the local array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds are new and ours.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        t.insert(OpenFile::new(a, FileKind::Host, None), false)
            .expect("a");
        t.insert(OpenFile::new(b, FileKind::Host, None), false)
            .expect("b");
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and ours; the write end stays outside the table.
        let (rd, _wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        t.insert(OpenFile::new(rd, FileKind::Host, None), false)
            .expect("read end");
        let said = t.checkpoint().not_kept().join("; ");
        assert!(said.contains("2 AF_UNIX socket"), "{said}");
        assert!(said.contains("1 pipe(s) with one end outside"), "{said}");
    }

    #[test]
    fn restore_resets_file_offsets() {
        let mut t = FdTable::new();
        let g = t.insert(temp_file(), false).expect("fd");
        let file = t.get(i64::from(g)).expect("get");
        // A dup shares the offset (saved once); a pipe has none.
        t.insert_from(0, file.clone(), false).expect("dup");
        let (r, _w) = pipe();
        t.insert(host(r), false).expect("pipe");
        assert_eq!(t.distinct_files(), 2);
        assert_eq!(read_n(&file, 10), (0..10).collect::<Vec<u8>>());
        let ck = t.checkpoint();
        assert_eq!(ck.fds(), 3);
        read_n(&file, 20);
        assert_eq!(offset(&file), 30);
        let report = t.restore(&ck).expect("restore");
        assert_eq!(report.offsets_restored, 1);
        assert_eq!(report.fds, 3);
        assert_eq!(offset(&file), 10);
        assert_eq!(read_n(&file, 1), [10]);
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
