//! Output commit and input replay for rescue windows.
//!
//! A rescue window is a checkpoint the sandbox may be rolled back to. Bytes the guest sends
//! to a peer outside the sandbox cannot be taken back, so while a window is live they are
//! *held*: queued on their open file, in order, and reported written to the guest. They go
//! out when no live window can undo them any more (the *commit*, [`FdTable::journal_release`]
//! returns it as a [`Commit`] to flush without the process lock), and a rollback that undoes
//! them drops them. Bytes the guest receives meanwhile are *recorded*; a rollback queues
//! what it undid for *replay*, and reads serve the replay queue before the host (and say
//! so to poll, select and epoll). Connections accepted in a window are recorded on their
//! listener and, after a rollback to before them, are accepted again (same socket, same
//! peer). A client served in a window that was rolled back sees one answer: nothing lost,
//! nothing twice, no reset.
//!
//! # Where things live
//!
//! - Per open file (`FileJournal`, in [`OpenFile`], behind its own mutex: commits write
//!   without the process lock): held output, recorded and replayed input, recorded and
//!   queued accepts. Keyed by the open file, not the guest fd, since a rollback changes
//!   which fd names what.
//! - Per table ([`Journal`], in [`FdTable`]): the live windows, the files with journal state
//!   (held by `Arc`: held output and re-acceptable connections outlive a guest `close`), the
//!   memory budget and the early-commit flag.
//!
//! Every entry is stamped with the I/O epoch it happened at (`fd.rs`: bumped by every
//! checkpoint); a window is known by the I/O epoch of its checkpoint. So "tagged with a live
//! window >= w" is "stamped at or after w's checkpoint", and operator checkpoints, which
//! are not windows, use the same stamps ([`FdTable::restore`] discards what is newer).
//!
//! # Order of held output
//!
//! A file's queue is written front first by whoever holds its *flush token* (a flag in its
//! state): a [`Commit`] being flushed, a background flusher thread, or a guest write that
//! must go out behind it. `committed` counts the entries at the front that no live window
//! can undo; only those are written. Once a file has held output, later writes queue behind
//! it or wait until it is written, even after the windows close. Whoever lets the token go
//! with committed entries left makes sure someone else will write them (a flusher thread).
//! A peer that reads nothing for 10 s gets its connection shut down (the guest was already
//! told the bytes were written): a warning says so.
//!
//! # What is journaled
//!
//! TCP connections, UDP sockets (datagrams keep their boundaries and addresses), AF_UNIX
//! stream sockets whose peer is another process, and pipes/FIFOs whose other end is not in
//! the guest's table. Reads and writes through read/readv/write/writev, recv*/send* (with no
//! control data), accept/accept4, shutdown (SHUT_WR/SHUT_RDWR are held in order with the
//! data).
//!
//! Not journaled, and why: regular files (their contents are not undone by a rollback
//! either), pipes and socket pairs with both ends in the guest (nothing leaves the sandbox;
//! holding would only block the guest's own reader), AF_UNIX datagram and seqpacket
//! sockets, ttys. Output that cannot be held (control data such as SCM_RIGHTS, MSG_OOB and
//! other unusual flags, sendfile to a socket, SHUT_RD) is written at once, behind what is
//! held, which then goes out too; and the file is marked so that a rollback to a window
//! older than it shuts the connection down, as for operator checkpoints. The same happens
//! to a file whose journal would pass the budget (64 MiB per sandbox by default, held,
//! recorded and replayed bytes together).
//!
//! Known limits: after a held SHUT_RD/SHUT_RDWR the guest can still read until the shutdown
//! is committed; a FIFO whose other end the guest opens after its first journaled transfer
//! is still taken for one with an end outside; a TCP connection from the guest to itself is
//! journaled like any other; bytes the guest changes in its read buffer while another of its
//! threads is reading into it can be recorded as changed.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::errno::{check, Errno};
use crate::fd::{io_epoch_now, FdTable, HostType, OpenFile};
use crate::syscalls::{SysResult, SyscallCtx};

/// Default bound of the bytes held, recorded and queued for replay in one sandbox.
pub const DEFAULT_LIMIT: usize = 64 << 20;
/// What one entry costs beyond its bytes (its header, queue slot and a datagram's address,
/// at most 128 bytes), so that a guest writing one byte at a time cannot make the VMM
/// allocate more than the budget says.
const ENTRY_COST: usize = 256;
/// A peer that reads none of the held output for this long has its connection shut down.
#[cfg(not(test))]
const FLUSH_STALL: Duration = Duration::from_secs(10);
/// (Shorter in unit tests, which wait for it.)
#[cfg(test)]
const FLUSH_STALL: Duration = Duration::from_millis(300);
/// Most background flusher threads at a time (each writes one file, at most `FLUSH_STALL`
/// without progress).
const MAX_FLUSHERS: usize = 256;
/// A pipe write of at most this many bytes never blocks when poll says it is writable.
const PIPE_BUF: usize = 4096;

/// Why held output or a journal entry was given up (logged; the guest was told its I/O
/// succeeded, so nothing here reaches it).
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The peer read nothing for `FLUSH_STALL` (10 s).
    #[error(
        "the peer of host fd {fd} read none of the held output for {secs} s: connection shut down"
    )]
    Stalled {
        /// Host fd.
        fd: RawFd,
        /// Seconds waited.
        secs: u64,
    },
    /// The host refused the held output (the peer is gone).
    #[error("writing held output to host fd {fd}: {errno}")]
    Write {
        /// Host fd.
        fd: RawFd,
        /// The host's error.
        errno: Errno,
    },
    /// The budget is spent: this file is no longer journaled in the live windows.
    #[error("journal budget of {limit} bytes spent: host fd {fd} is no longer journaled (a rollback shuts it down)")]
    OverBudget {
        /// Host fd.
        fd: RawFd,
        /// The budget.
        limit: usize,
    },
    /// A rollback named a window the journal was never told about.
    #[error("rollback to window {0}, which was never opened: nothing replayed")]
    UnknownWindow(u64),
    /// No flusher thread could be started.
    #[error(
        "no flusher for host fd {0}: its committed output waits for the guest's next use of it"
    )]
    NoFlusher(RawFd),
}

/// How a file's traffic is journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A byte stream to a peer outside: TCP, AF_UNIX stream.
    Stream,
    /// UDP: one entry per datagram, with its address.
    Datagram,
    /// A pipe or FIFO whose other end is outside the guest.
    Pipe,
    /// Not journaled.
    No,
}

// ---------------------------------------------------------------------------------------
// Per-call record for `FdTable::note_io`.

thread_local! {
    /// What the current data syscall did: 0 nothing yet, 1 all of it journaled, 2 some of
    /// it not. Reset by every data syscall, read by `note_io` right after it.
    static CALL: Cell<u8> = const { Cell::new(0) };
}

/// A data syscall starts.
pub(crate) fn begin_call() {
    CALL.set(0);
}

fn call_journaled() {
    if CALL.get() == 0 {
        CALL.set(1);
    }
}

fn call_unjournaled() {
    CALL.set(2);
}

/// Whether every transfer of the call that just ended was journaled (then a rollback to a
/// window need not shut its file down). Resets the record.
pub(crate) fn take_call_journaled() -> bool {
    CALL.replace(0) == 1
}

// ---------------------------------------------------------------------------------------
// Budget and entries.

#[derive(Debug)]
struct Budget {
    used: AtomicUsize,
    limit: AtomicUsize,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    fn reserve(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            })
            .ok();
    }
}

/// Output the guest asked for.
pub(crate) enum Out {
    /// Stream bytes.
    Data(Vec<u8>),
    /// One datagram, to `to` (a host sockaddr) or the connected peer.
    Datagram { bytes: Vec<u8>, to: Option<Vec<u8>> },
    /// shutdown(how).
    Shutdown(i32),
}

impl Out {
    /// Its bytes (a datagram's address is in [`ENTRY_COST`]).
    fn len(&self) -> usize {
        match self {
            Out::Data(b) | Out::Datagram { bytes: b, .. } => b.len(),
            Out::Shutdown(_) => 0,
        }
    }
}

/// One held entry: what, when (I/O epoch) and how much of it is written.
struct Held {
    io: u64,
    out: Out,
    done: usize,
}

impl Held {
    fn cost(&self) -> usize {
        ENTRY_COST + self.out.len()
    }

    fn shuts_writes(&self) -> bool {
        matches!(self.out, Out::Shutdown(how) if how != libc::SHUT_RD)
    }
}

/// Bytes received (recorded, or queued for replay).
struct Chunk {
    io: u64,
    bytes: Vec<u8>,
    /// A datagram's source (host sockaddr).
    from: Option<Vec<u8>>,
    datagram: bool,
}

impl Chunk {
    fn cost(&self) -> usize {
        ENTRY_COST + self.bytes.len() + self.from.as_ref().map_or(0, Vec::len)
    }
}

/// A connection accepted on a listener, with its peer's address (host sockaddr).
struct Accepted {
    io: u64,
    conn: Arc<OpenFile>,
    addr: Vec<u8>,
}

impl Accepted {
    fn cost(&self) -> usize {
        ENTRY_COST + self.addr.len()
    }
}

/// One open file's journal.
pub(crate) struct FileJournal {
    state: Mutex<FileState>,
    budget: Arc<Budget>,
}

impl std::fmt::Debug for FileJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("FileJournal")
            .field("held", &st.out.len())
            .field("committed", &st.committed)
            .field("recorded", &st.recorded.len())
            .field("replay", &st.replay.len())
            .field("accepted", &st.accepted.len())
            .field("accept_queue", &st.accept_queue.len())
            .finish()
    }
}

impl FileJournal {
    fn lock(&self) -> MutexGuard<'_, FileState> {
        // Every update leaves the state consistent: a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct FileState {
    /// Held output, oldest first.
    out: VecDeque<Held>,
    /// `out[..committed]` can no longer be undone: it is written in order.
    committed: usize,
    /// The flush token: someone is writing the committed entries (and has taken the front
    /// one out of `out`).
    flushing: bool,
    /// Commits and flusher threads that will write this file's committed entries.
    commits_pending: usize,
    /// A held shutdown of the write side: later writes fail with EPIPE, as on Linux.
    wr_shut: bool,
    /// The peer is gone (found by a flush): later writes fail with this.
    broken: Option<Errno>,
    /// Input received while windows were live, oldest first.
    recorded: VecDeque<Chunk>,
    /// Input to serve before the host's, oldest first; `replay_skip` bytes of the front
    /// (stream) chunk were served.
    replay: VecDeque<Chunk>,
    replay_skip: usize,
    /// Connections accepted while windows were live, oldest first.
    accepted: VecDeque<Accepted>,
    /// Connections to accept again before the host's.
    accept_queue: VecDeque<Accepted>,
    /// Journaling of this file stopped in the live windows (budget, output that could not
    /// be held): a rollback to them shuts it down.
    stopped: bool,
    /// Shut down by a rollback: nothing more to hold, flush or replay.
    dead: bool,
    /// Epoll instances that reported its replay readiness since the last rollback (for
    /// edge-triggered and one-shot entries, which report it once).
    reported: Vec<usize>,
}

impl FileState {
    /// Nothing that a window, a reader or the table still needs (committed output has its
    /// own writer, which holds the file).
    fn settled(&self) -> bool {
        self.out.len() == self.committed
            && self.recorded.is_empty()
            && self.accepted.is_empty()
            && self.replay.is_empty()
            && self.accept_queue.is_empty()
    }

    /// Queue `out` (its cost already reserved). `committed`: behind committed entries only,
    /// and committed itself.
    fn push_out(&mut self, budget: &Budget, io: u64, out: Out, committed: bool) {
        // Consecutive stream writes of one epoch share an entry (fewer, larger sends); the
        // back entry is committed exactly when all are.
        let back_committed = self.committed == self.out.len();
        if let (Out::Data(bytes), Some(back)) = (&out, self.out.back_mut()) {
            if let Out::Data(prev) = &mut back.out {
                if back.io == io && back_committed == committed {
                    prev.extend_from_slice(bytes);
                    budget.release(ENTRY_COST);
                    return;
                }
            }
        }
        self.out.push_back(Held { io, out, done: 0 });
        if committed {
            self.committed += 1;
        }
    }

    fn clear_out(&mut self, budget: &Budget) {
        for h in self.out.drain(..) {
            budget.release(h.cost());
        }
        self.committed = 0;
        self.wr_shut = false;
    }

    fn clear_input(&mut self, budget: &Budget) {
        for c in self.recorded.drain(..) {
            budget.release(c.cost());
        }
        self.clear_replay(budget);
        for a in self.accepted.drain(..).chain(self.accept_queue.drain(..)) {
            budget.release(a.cost());
        }
    }

    fn clear_replay(&mut self, budget: &Budget) {
        for c in self.replay.drain(..) {
            budget.release(c.cost());
        }
        self.replay_skip = 0;
    }

    /// Drop the served part of the front replay chunk.
    fn trim_replay_front(&mut self, budget: &Budget) {
        if self.replay_skip == 0 {
            return;
        }
        if let Some(front) = self.replay.front_mut() {
            let skip = self.replay_skip.min(front.bytes.len());
            front.bytes.drain(..skip);
            budget.release(skip);
        }
        self.replay_skip = 0;
    }

    /// Up to `want` bytes of replay: across stream chunks, or one datagram (cut to `want`).
    /// Consumed unless `peek`.
    fn take_replay(&mut self, budget: &Budget, want: usize, peek: bool) -> Option<Served> {
        let front = self.replay.front()?;
        if front.datagram {
            let full = front.bytes.len();
            let served = Served {
                bytes: front.bytes[..full.min(want)].to_vec(),
                from: front.from.clone(),
                full,
                datagram: true,
            };
            if !peek {
                if let Some(c) = self.replay.pop_front() {
                    budget.release(c.cost());
                }
            }
            return Some(served);
        }
        let avail: usize = self
            .replay
            .iter()
            .take_while(|c| !c.datagram)
            .map(|c| c.bytes.len())
            .sum::<usize>()
            .saturating_sub(self.replay_skip);
        let mut bytes = Vec::with_capacity(want.min(avail));
        let mut skip = self.replay_skip;
        let mut used_chunks = 0;
        for c in self.replay.iter().take_while(|c| !c.datagram) {
            let rest = c.bytes.get(skip..).unwrap_or_default();
            let take = rest.len().min(want - bytes.len());
            bytes.extend_from_slice(&rest[..take]);
            if take < rest.len() {
                skip += take;
                break;
            }
            skip = 0;
            used_chunks += 1;
            if bytes.len() == want {
                break;
            }
        }
        if !peek {
            for _ in 0..used_chunks {
                if let Some(c) = self.replay.pop_front() {
                    budget.release(c.cost());
                }
            }
            self.replay_skip = skip;
        }
        let full = bytes.len();
        Some(Served {
            bytes,
            from: None,
            full,
            datagram: false,
        })
    }
}

/// Bytes served from a replay queue.
#[derive(Debug)]
pub(crate) struct Served {
    /// What the guest gets.
    pub bytes: Vec<u8>,
    /// A datagram's source (host sockaddr).
    pub from: Option<Vec<u8>>,
    /// A datagram's full length (more than `bytes` when cut).
    pub full: usize,
    /// One datagram.
    pub datagram: bool,
}

// ---------------------------------------------------------------------------------------
// The table's part.

/// The journal of one fd table: live windows, files with journal state, budget.
#[derive(Debug)]
pub struct Journal {
    /// Live windows: (epoch, I/O epoch of its checkpoint), by epoch.
    windows: Vec<(u64, u64)>,
    /// Files with journal state, by identity.
    files: HashMap<usize, Arc<OpenFile>>,
    budget: Arc<Budget>,
    /// Held output was written early (a reader would have waited for it).
    early_commit: bool,
    /// The thread whose syscall runs now has a window open: only then is held output
    /// committed early. Other threads' clients wait for the windows to close instead
    /// (windows are short), so that no window has to give up a connection.
    may_commit_early: bool,
    /// The I/O epoch of the newest checkpoint of the table (what `journal_open` names).
    last_checkpoint_io: AtomicU64,
}

impl Default for Journal {
    fn default() -> Journal {
        Journal {
            windows: Vec::new(),
            files: HashMap::new(),
            budget: Arc::new(Budget::new(DEFAULT_LIMIT)),
            early_commit: false,
            may_commit_early: true,
            last_checkpoint_io: AtomicU64::new(0),
        }
    }
}

fn key(f: &Arc<OpenFile>) -> usize {
    Arc::as_ptr(f) as usize
}

impl Journal {
    /// A checkpoint of the table began I/O epoch `io`.
    pub(crate) fn checkpoint_taken(&self, io: u64) {
        self.last_checkpoint_io.store(io, Ordering::Relaxed);
    }

    /// Is `io` the I/O epoch of a live window's checkpoint?
    pub(crate) fn is_window(&self, io: u64) -> bool {
        self.windows.iter().any(|w| w.1 == io)
    }

    /// The oldest live window's I/O epoch: entries stamped at or after it can be undone.
    fn floor(&self) -> Option<u64> {
        self.windows.iter().map(|w| w.1).min()
    }

    fn register(&mut self, f: &Arc<OpenFile>) {
        self.files.entry(key(f)).or_insert_with(|| Arc::clone(f));
    }

    /// Bytes in use (held, recorded, queued), entry costs included.
    pub fn used(&self) -> usize {
        self.budget.used.load(Ordering::Relaxed)
    }
}

/// Mark `f` as having had traffic no window can undo from now on.
fn mark_raw(f: &OpenFile) {
    f.last_raw_io.store(io_epoch_now(), Ordering::Relaxed);
}

/// A write to journal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteReq {
    /// Bytes (0 for a shutdown).
    pub len: usize,
    /// It can be held (plain data, or SHUT_WR/SHUT_RDWR).
    pub holdable: bool,
    /// MSG_DONTWAIT.
    pub dontwait: bool,
    /// It is a shutdown.
    pub shutdown: bool,
}

/// What a write does, decided under the process lock.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteStep {
    /// Held (or queued behind held output): report this count written.
    Held(usize),
    /// Write it to the host as usual.
    Direct,
    /// Write the committed output first (without the process lock), then decide again.
    Drain {
        /// The guest must not block: try once.
        nonblock: bool,
    },
    /// Fail with this.
    Fail(Errno),
}

/// What a read does, decided under the process lock.
#[derive(Debug)]
pub(crate) enum ReadStep {
    /// Read the host.
    Host,
    /// Served from the replay queue (`journaled`: recorded again for the live windows).
    Served(Served, bool),
    /// Write this file's held output first (no flusher thread could take it), then read
    /// the host.
    Drain,
}

impl FdTable {
    /// A window checkpoint `epoch` was taken (epochs increase). From now on, while any
    /// window is live, output is held and input recorded.
    pub fn journal_open(&mut self, epoch: u64) {
        let io = match self.journal.last_checkpoint_io.load(Ordering::Relaxed) {
            0 => io_epoch_now(),
            io => io,
        };
        if !self.journal.windows.iter().any(|w| w.0 == epoch) {
            self.journal.windows.push((epoch, io));
            self.journal.windows.sort_unstable();
        }
    }

    /// Any live window?
    pub fn journal_active(&self) -> bool {
        !self.journal.windows.is_empty()
    }

    /// Whether the thread whose syscall runs now has a rescue window open (set before
    /// each syscall): only its waits commit held output early.
    pub fn set_may_commit_early(&mut self, yes: bool) {
        self.journal.may_commit_early = yes;
    }

    /// Was held output written early since the last call (a guest read or wait on a file
    /// that held output would have blocked)? A rollback shuts that connection down (its
    /// bytes cannot be taken back); the windows stay open.
    pub fn take_early_commit(&mut self) -> bool {
        std::mem::take(&mut self.journal.early_commit)
    }

    /// Bound the bytes held, recorded and queued for replay (default [`DEFAULT_LIMIT`]).
    pub fn set_journal_limit(&mut self, bytes: usize) {
        self.journal.budget.limit.store(bytes, Ordering::Relaxed);
    }

    /// The journal (for its figures).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Window `epoch` closed (its checkpoint released); `live` are the windows still live.
    /// Returns the held output no live window can undo any more, to be flushed by the
    /// caller after it drops the process lock.
    pub fn journal_release(&mut self, epoch: u64, live: &[u64]) -> Commit {
        self.journal
            .windows
            .retain(|&(e, _)| e != epoch && live.contains(&e));
        self.settle()
    }

    /// Commit what no live window can undo; forget records no window can replay.
    fn settle(&mut self) -> Commit {
        let floor = self.journal.floor();
        let undoable = |io: u64| floor.is_some_and(|f| io >= f);
        let mut commit = Commit::default();
        let mut gone = Vec::new();
        let mut dropped = Vec::new();
        for (&k, f) in &self.journal.files {
            let Some(fj) = f.journal.get() else {
                gone.push(k);
                continue;
            };
            let mut st = fj.lock();
            // Undoable entries are a suffix (a window opened later than an entry is newer
            // than every window live when it was made), so this is the releasable prefix.
            let more = st
                .out
                .iter()
                .skip(st.committed)
                .take_while(|h| !undoable(h.io))
                .count();
            if more > 0 {
                st.committed += more;
                st.commits_pending += 1;
                commit.files.push(Arc::clone(f));
            }
            while st.recorded.front().is_some_and(|c| !undoable(c.io)) {
                if let Some(c) = st.recorded.pop_front() {
                    fj.budget.release(c.cost());
                }
            }
            while st.accepted.front().is_some_and(|a| !undoable(a.io)) {
                if let Some(a) = st.accepted.pop_front() {
                    fj.budget.release(a.cost());
                    dropped.push(a.conn);
                }
            }
            if floor.is_none() {
                st.stopped = false;
            }
            if st.settled() {
                gone.push(k);
            }
        }
        for k in gone {
            self.journal.files.remove(&k);
        }
        // Closed here (outside any file's lock) if nothing else holds them.
        drop(dropped);
        commit
    }

    /// The sandbox was rolled back to window `epoch` (after [`FdTable::restore`] of its
    /// checkpoint); `live` are the live windows now (`epoch` among them). Held output since
    /// the window is dropped, input since is queued for replay ahead of what is queued, and
    /// connections accepted since are queued on their listener to be accepted again.
    pub fn journal_rollback(&mut self, epoch: u64, live: &[u64]) {
        let Some(io_w) = self
            .journal
            .windows
            .iter()
            .find(|w| w.0 == epoch)
            .map(|w| w.1)
        else {
            tracing::warn!(error = %JournalError::UnknownWindow(epoch), "journal");
            self.journal.windows.retain(|w| live.contains(&w.0));
            return;
        };
        self.journal.windows.retain(|w| live.contains(&w.0));
        let mut reachable: HashSet<usize> = self.iter().map(|(_, s)| key(&s.file)).collect();
        let mut to_shut = Vec::new();
        for f in self.journal.files.values() {
            let Some(fj) = f.journal.get() else { continue };
            let mut st = fj.lock();
            if st.dead {
                st.clear_out(&fj.budget);
                st.clear_input(&fj.budget);
                continue;
            }
            // Output since the window never happened.
            while st.out.len() > st.committed && st.out.back().is_some_and(|h| h.io >= io_w) {
                if let Some(h) = st.out.pop_back() {
                    fj.budget.release(h.cost());
                }
            }
            st.wr_shut = st.out.iter().any(Held::shuts_writes);
            // Input since is read again, before anything already queued.
            let at = st
                .recorded
                .iter()
                .position(|c| c.io >= io_w)
                .unwrap_or(st.recorded.len());
            let mut again = st.recorded.split_off(at);
            if !again.is_empty() {
                st.trim_replay_front(&fj.budget);
                again.append(&mut st.replay);
                st.replay = again;
            }
            // Connections accepted since are accepted again, first.
            let at = st
                .accepted
                .iter()
                .position(|a| a.io >= io_w)
                .unwrap_or(st.accepted.len());
            let mut requeue = VecDeque::new();
            for a in st.accepted.split_off(at) {
                if a.conn.last_raw_io.load(Ordering::Relaxed) >= io_w {
                    // It carried traffic the journal could not keep: the peer sees a
                    // closed connection, as for an operator checkpoint.
                    fj.budget.release(a.cost());
                    to_shut.push(a.conn);
                } else {
                    requeue.push_back(a);
                }
            }
            requeue.append(&mut st.accept_queue);
            st.accept_queue = requeue;
            reachable.extend(st.accept_queue.iter().map(|a| key(&a.conn)));
            st.reported.clear();
        }
        // A file the guest can no longer name (opened since the window, not queued to be
        // accepted) will never be read again: its replay goes.
        for (k, f) in &self.journal.files {
            if reachable.contains(k) {
                continue;
            }
            if let Some(fj) = f.journal.get() {
                fj.lock().clear_replay(&fj.budget);
            }
        }
        for c in &to_shut {
            // SAFETY: shutdown on a host socket the journal holds; no memory effects.
            unsafe { libc::shutdown(c.host_fd(), libc::SHUT_RDWR) };
            self.journal_kill(c);
        }
        drop(to_shut);
        self.prune();
    }

    /// A rollback to operator checkpoint `epoch` (not a window): windows newer than it are
    /// gone. (What the journal held or recorded since it was discarded by
    /// [`FdTable::restore`], which knows the checkpoint.)
    pub fn journal_discard_after(&mut self, epoch: u64) {
        self.journal.windows.retain(|w| w.0 <= epoch);
        if !self.journal_active() {
            // Dropped unflushed: flusher threads write it.
            drop(self.settle());
        }
    }

    /// Restore of an operator checkpoint that began I/O epoch `io`: entries since never
    /// happened, windows opened since are gone. (Connections with traffic since are shut
    /// down by the restore.)
    pub(crate) fn journal_discard_since(&mut self, io: u64) {
        self.journal.windows.retain(|w| w.1 < io);
        let mut reachable: HashSet<usize> = self.iter().map(|(_, s)| key(&s.file)).collect();
        let mut dropped = Vec::new();
        for f in self.journal.files.values() {
            let Some(fj) = f.journal.get() else { continue };
            let mut st = fj.lock();
            while st.out.len() > st.committed && st.out.back().is_some_and(|h| h.io >= io) {
                if let Some(h) = st.out.pop_back() {
                    fj.budget.release(h.cost());
                }
            }
            st.wr_shut = st.out.iter().any(Held::shuts_writes);
            while st.recorded.back().is_some_and(|c| c.io >= io) {
                if let Some(c) = st.recorded.pop_back() {
                    fj.budget.release(c.cost());
                }
            }
            while st.accepted.back().is_some_and(|a| a.io >= io) {
                if let Some(a) = st.accepted.pop_back() {
                    fj.budget.release(a.cost());
                    dropped.push(a.conn);
                }
            }
            reachable.extend(st.accept_queue.iter().map(|a| key(&a.conn)));
            st.reported.clear();
        }
        for (k, f) in &self.journal.files {
            if !reachable.contains(k) {
                if let Some(fj) = f.journal.get() {
                    fj.lock().clear_replay(&fj.budget);
                }
            }
        }
        drop(dropped);
        self.prune();
    }

    /// `f` was shut down by a rollback: its journal is over.
    pub(crate) fn journal_kill(&mut self, f: &Arc<OpenFile>) {
        if let Some(fj) = f.journal.get() {
            let mut st = fj.lock();
            st.dead = true;
            st.clear_out(&fj.budget);
            st.clear_input(&fj.budget);
        }
    }

    /// `files` lost their last guest fd. With no live window nobody can read their replay
    /// any more; committed output they hold still goes out.
    pub(crate) fn journal_closed(&mut self, files: &[Arc<OpenFile>]) {
        if self.journal.files.is_empty() || self.journal_active() {
            return;
        }
        for f in files {
            if let Some(fj) = f.journal.get() {
                let mut st = fj.lock();
                st.clear_replay(&fj.budget);
                for a in st.accept_queue.drain(..) {
                    fj.budget.release(a.cost());
                }
                ensure_writer(f, fj, st);
            }
        }
        self.prune();
    }

    fn prune(&mut self) {
        self.journal
            .files
            .retain(|_, f| f.journal.get().is_some_and(|fj| !fj.lock().settled()));
    }

    /// How `f`'s traffic is journaled (learnt once it is definite).
    pub(crate) fn journal_class(&self, f: &OpenFile) -> Class {
        if let Some(c) = f.journal_class.get() {
            return *c;
        }
        let (class, definite) = classify(self, f);
        if definite {
            f.journal_class.set(class).ok();
        }
        class
    }

    fn journal_state<'a>(&self, f: &'a OpenFile) -> &'a FileJournal {
        f.journal.get_or_init(|| FileJournal {
            state: Mutex::new(FileState::default()),
            budget: Arc::clone(&self.journal.budget),
        })
    }

    /// Decide a write of `req` to `file`; `make` gives the bytes, only if they are held.
    pub(crate) fn journal_write(
        &mut self,
        file: &Arc<OpenFile>,
        req: WriteReq,
        make: impl FnOnce(Class) -> Out,
    ) -> WriteStep {
        let active = self.journal_active();
        if !active && file.journal.get().is_none() {
            return WriteStep::Direct;
        }
        let class = self.journal_class(file);
        // A zero-length stream write moves nothing: no order to keep.
        if class == Class::No
            || req.holdable && !req.shutdown && req.len == 0 && class != Class::Datagram
        {
            return WriteStep::Direct;
        }
        let fj = self.journal_state(file);
        let mut st = fj.lock();
        if st.dead {
            return WriteStep::Direct;
        }
        if let Some(e) = st.broken {
            return WriteStep::Fail(e);
        }
        if !req.shutdown && st.wr_shut {
            return WriteStep::Fail(Errno::EPIPE);
        }
        let cost = req.len.saturating_add(ENTRY_COST);
        if active && !st.stopped {
            if req.holdable && peer_gone(file.host_fd()) {
                // Nothing can reach the peer any more: the host gives the guest its error.
                return WriteStep::Direct;
            }
            if req.holdable {
                if fj.budget.reserve(cost) {
                    let out = make(class);
                    st.push_out(&fj.budget, io_epoch_now(), out, false);
                    if req.shutdown {
                        st.wr_shut = st.out.back().is_some_and(Held::shuts_writes);
                    }
                    drop(st);
                    self.journal.register(file);
                    return WriteStep::Held(req.len);
                }
                stop_journaling(&mut st, fj, file);
            }
            if !req.holdable || st.stopped {
                // Written directly, behind what is held, which goes out first and can no
                // longer be undone: a rollback to the live windows shuts the file down.
                st.committed = st.out.len();
                mark_raw(file);
            }
        }
        if st.out.is_empty() && !st.flushing {
            return WriteStep::Direct;
        }
        // Output is queued ahead: go behind it (someone writes both), or write it first.
        let nonblock = req.dontwait || is_nonblocking(file.host_fd());
        if nonblock && req.holdable && st.committed == st.out.len() && fj.budget.reserve(cost) {
            let out = make(class);
            st.push_out(&fj.budget, io_epoch_now(), out, true);
            if req.shutdown {
                st.wr_shut = st.out.back().is_some_and(Held::shuts_writes);
            }
            ensure_writer(file, fj, st);
            return WriteStep::Held(req.len);
        }
        st.committed = st.out.len();
        WriteStep::Drain { nonblock }
    }

    /// Decide a read of up to `want` bytes (`want > 0`) from `file`.
    pub(crate) fn journal_read(
        &mut self,
        file: &Arc<OpenFile>,
        want: usize,
        peek: bool,
    ) -> ReadStep {
        let Some(fj) = file.journal.get() else {
            return ReadStep::Host;
        };
        let active = self.journal_active();
        let mut st = fj.lock();
        if let Some(served) = st.take_replay(&fj.budget, want, peek) {
            // Served bytes may be rolled back again: recorded again.
            let journaled = if peek {
                true
            } else if active && !st.stopped {
                let ok = record(
                    &mut st,
                    &fj.budget,
                    &served.bytes,
                    served.from.as_deref(),
                    served.datagram,
                );
                if !ok {
                    stop_journaling(&mut st, fj, file);
                }
                ok
            } else {
                false
            };
            drop(st);
            if journaled && !peek {
                self.journal.register(file);
            }
            return ReadStep::Served(served, journaled);
        }
        let holds = !peek && !st.dead && !st.out.is_empty();
        drop(st);
        if holds && !readable_now(file.host_fd()) && self.journal_early_commit(file) {
            return ReadStep::Drain;
        }
        ReadStep::Host
    }

    /// `n` bytes were read from the host on `file` (`bytes` gives them); recorded if
    /// windows are live. Returns whether the read is journaled.
    pub(crate) fn journal_record(
        &mut self,
        file: &Arc<OpenFile>,
        n: usize,
        from: Option<&[u8]>,
        bytes: impl FnOnce() -> Vec<u8>,
    ) -> bool {
        if !self.journal_active() || n == 0 {
            return false;
        }
        let class = self.journal_class(file);
        if class == Class::No {
            return false;
        }
        let fj = self.journal_state(file);
        let mut st = fj.lock();
        if st.stopped || st.dead {
            return false;
        }
        let ok = record(
            &mut st,
            &fj.budget,
            &bytes(),
            from,
            class == Class::Datagram,
        );
        if !ok {
            stop_journaling(&mut st, fj, file);
        }
        drop(st);
        if ok {
            self.journal.register(file);
        }
        ok
    }

    /// The guest is about to wait for input on `file`, which holds output: its peer may be
    /// waiting for that output. Commit it now (the windows can no longer undo it, which
    /// [`FdTable::take_early_commit`] tells) and have a flusher thread write it. Returns
    /// true if no thread could take it: the caller must drain it itself.
    pub(crate) fn journal_early_commit(&mut self, file: &Arc<OpenFile>) -> bool {
        if !self.journal.may_commit_early {
            return false;
        }
        let Some(fj) = file.journal.get() else {
            return false;
        };
        let mut st = fj.lock();
        if st.dead || st.out.is_empty() {
            return false;
        }
        if st.committed < st.out.len() {
            st.committed = st.out.len();
            self.journal.early_commit = true;
            // A rollback to a live window would make the guest send it again.
            mark_raw(file);
        }
        !ensure_writer(file, fj, st)
    }

    /// A connection to accept again on `listener`, with its peer's address.
    pub(crate) fn journal_take_accept(
        &mut self,
        listener: &Arc<OpenFile>,
    ) -> Option<(Arc<OpenFile>, Vec<u8>)> {
        let fj = listener.journal.get()?;
        let mut st = fj.lock();
        let a = st.accept_queue.pop_front()?;
        fj.budget.release(a.cost());
        Some((a.conn, a.addr))
    }

    /// Put back a connection taken by [`FdTable::journal_take_accept`] (the accept failed).
    pub(crate) fn journal_unaccept(
        &mut self,
        listener: &Arc<OpenFile>,
        conn: Arc<OpenFile>,
        addr: Vec<u8>,
    ) {
        let fj = self.journal_state(listener);
        let a = Accepted { io: 0, conn, addr };
        // Given back what it had: no check against the budget.
        let cost = a.cost();
        fj.budget.used.fetch_add(cost, Ordering::AcqRel);
        fj.lock().accept_queue.push_front(a);
        self.journal.register(listener);
    }

    /// `conn` was accepted on `listener` from `addr` (host sockaddr): recorded if windows
    /// are live, to be accepted again after a rollback to before it.
    pub(crate) fn journal_note_accept(
        &mut self,
        listener: &Arc<OpenFile>,
        conn: &Arc<OpenFile>,
        addr: &[u8],
    ) {
        if !self.journal_active() || self.journal_class(conn) != Class::Stream {
            return;
        }
        let fj = self.journal_state(listener);
        let a = Accepted {
            io: io_epoch_now(),
            conn: Arc::clone(conn),
            addr: addr.to_vec(),
        };
        if !fj.budget.reserve(a.cost()) {
            // A rollback closes it, as before journaling.
            tracing::warn!(error = %JournalError::OverBudget {
                fd: listener.host_fd(),
                limit: fj.budget.limit.load(Ordering::Relaxed),
            }, "journal");
            return;
        }
        fj.lock().accepted.push_back(a);
        self.journal.register(listener);
    }

    /// Are there files with journal state (else no readiness or early commit to look for)?
    pub(crate) fn journal_pending(&self) -> bool {
        !self.journal.files.is_empty()
    }

    /// The files with journal state.
    pub(crate) fn journal_files(&self) -> impl Iterator<Item = &Arc<OpenFile>> {
        self.journal.files.values()
    }
}

/// The budget is spent: `file` is journaled no more in the live windows (a rollback to
/// them shuts it down), and what it recorded is of no use.
fn stop_journaling(st: &mut FileState, fj: &FileJournal, file: &OpenFile) {
    tracing::warn!(error = %JournalError::OverBudget {
        fd: file.host_fd(),
        limit: fj.budget.limit.load(Ordering::Relaxed),
    }, "journal");
    st.stopped = true;
    for c in st.recorded.drain(..) {
        fj.budget.release(c.cost());
    }
    mark_raw(file);
}

/// Record `bytes` received; false if over budget.
fn record(
    st: &mut FileState,
    budget: &Budget,
    bytes: &[u8],
    from: Option<&[u8]>,
    datagram: bool,
) -> bool {
    if bytes.is_empty() && !datagram {
        return true;
    }
    let io = io_epoch_now();
    if !datagram {
        if let Some(back) = st.recorded.back_mut().filter(|c| !c.datagram && c.io == io) {
            if !budget.reserve(bytes.len()) {
                return false;
            }
            back.bytes.extend_from_slice(bytes);
            return true;
        }
    }
    let c = Chunk {
        io,
        bytes: bytes.to_vec(),
        from: from.map(<[u8]>::to_vec),
        datagram,
    };
    if !budget.reserve(c.cost()) {
        return false;
    }
    st.recorded.push_back(c);
    true
}

/// Readable from the journal (replay data, connections to accept again)?
pub(crate) fn readable(f: &OpenFile) -> bool {
    f.journal.get().is_some_and(|fj| {
        let st = fj.lock();
        !st.replay.is_empty() || !st.accept_queue.is_empty()
    })
}

/// Does `f` hold output (whose peer may be waiting for it)?
pub(crate) fn holds_output(f: &OpenFile) -> bool {
    f.journal.get().is_some_and(|fj| {
        let st = fj.lock();
        !st.dead && (!st.out.is_empty() || st.flushing)
    })
}

/// Bytes of replay data waiting (for FIONREAD).
pub(crate) fn replay_len(f: &OpenFile) -> usize {
    f.journal.get().map_or(0, |fj| {
        let st = fj.lock();
        st.replay
            .iter()
            .map(|c| c.bytes.len())
            .sum::<usize>()
            .saturating_sub(st.replay_skip)
    })
}

/// Epoll instance `ep` may report `f`'s journal readiness now: always for a level-triggered
/// entry, once per rollback for an edge-triggered or one-shot one (`once`). Records it.
pub(crate) fn epoll_may_report(f: &OpenFile, ep: usize, once: bool) -> bool {
    let Some(fj) = f.journal.get() else {
        return false;
    };
    let mut st = fj.lock();
    if !once {
        return true;
    }
    if st.reported.contains(&ep) {
        return false;
    }
    st.reported.push(ep);
    true
}

/// Epoll instance `ep` re-armed its entry for `f` (ADD/MOD): it may report again.
pub(crate) fn epoll_rearmed(f: &OpenFile, ep: usize) {
    if let Some(fj) = f.journal.get() {
        fj.lock().reported.retain(|&e| e != ep);
    }
}

/// Make sure committed entries in `st` will be written: by the token holder, a pending
/// commit, or a new flusher thread. Returns false if none could be found.
fn ensure_writer(
    file: &Arc<OpenFile>,
    fj: &FileJournal,
    mut st: MutexGuard<'_, FileState>,
) -> bool {
    if st.committed == 0 || st.flushing || st.commits_pending > 0 {
        return true;
    }
    st.commits_pending += 1;
    drop(st);
    if spawn_flusher(Arc::clone(file)) {
        return true;
    }
    let mut st = fj.lock();
    st.commits_pending = st.commits_pending.saturating_sub(1);
    tracing::warn!(error = %JournalError::NoFlusher(file.host_fd()), "journal");
    false
}

/// Start a thread that writes `file`'s committed output (it owns one `commits_pending`).
fn spawn_flusher(file: Arc<OpenFile>) -> bool {
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    if RUNNING.fetch_add(1, Ordering::AcqRel) >= MAX_FLUSHERS {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    let spawned = std::thread::Builder::new()
        .name("held-output".into())
        .spawn(move || {
            drain(&file, Mode::Commit);
            RUNNING.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
    spawned.is_ok()
}

// ---------------------------------------------------------------------------------------
// Writing held output.

/// Held output that no live window can undo, to write without the process lock.
#[must_use = "held output goes out when the commit is flushed (a dropped one is given to flusher threads)"]
#[derive(Debug, Default)]
pub struct Commit {
    files: Vec<Arc<OpenFile>>,
}

impl Commit {
    /// Write each file's committed output, in order. A peer that reads none of it for 10 s
    /// has its connection shut down (with a warning). Call without the process lock.
    pub fn flush(mut self) {
        for f in std::mem::take(&mut self.files) {
            drain(&f, Mode::Commit);
        }
    }

    /// Write what each file's peer takes at once, in order, and leave the rest to flusher
    /// threads (same order, same 10 s rule): never blocks, so a thread a world stop may
    /// wait for (a runner) can call it. Call without the process lock.
    pub fn flush_or_defer(mut self) {
        for f in std::mem::take(&mut self.files) {
            drain(&f, Mode::Try);
            hand_over(&f);
        }
    }

    /// Files with output to write.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// Nothing to write?
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        // Not flushed by its caller: flusher threads take it over.
        for f in self.files.drain(..) {
            hand_over(&f);
        }
    }
}

/// A commit lets go of `f`: whatever it leaves committed goes to the token holder, another
/// pending commit, or a new flusher thread.
fn hand_over(f: &Arc<OpenFile>) {
    if let Some(fj) = f.journal.get() {
        let mut st = fj.lock();
        st.commits_pending = st.commits_pending.saturating_sub(1);
        ensure_writer(f, fj, st);
    }
}

/// How a drain waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A commit or flusher thread (owns one `commits_pending`): waits for the peer up to
    /// [`FLUSH_STALL`] without progress, ignores signals.
    Commit,
    /// In a guest syscall that may block: waits, but a signal (a stop) interrupts it.
    Wait,
    /// In a guest syscall that must not block.
    Try,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Nothing committed is left (or the token holder writes it).
    Done,
    /// The peer is not reading ([`Mode::Try`]), or another thread is writing.
    WouldBlock,
    /// A signal interrupted the wait ([`Mode::Wait`]).
    Interrupted,
}

/// Write `file`'s committed output, in order.
pub(crate) fn drain(file: &Arc<OpenFile>, mode: Mode) -> Drained {
    let owns = mode == Mode::Commit;
    let Some(fj) = file.journal.get() else {
        return Drained::Done;
    };
    // Take the flush token.
    loop {
        let mut st = fj.lock();
        if !st.flushing {
            if st.committed == 0 || st.dead {
                if owns {
                    st.commits_pending = st.commits_pending.saturating_sub(1);
                }
                return Drained::Done;
            }
            st.flushing = true;
            break;
        }
        match mode {
            // Its holder writes everything committed before it lets go (or hands it on).
            Mode::Commit => {
                st.commits_pending = st.commits_pending.saturating_sub(1);
                return Drained::Done;
            }
            Mode::Try => return Drained::WouldBlock,
            Mode::Wait => {
                drop(st);
                if nap() {
                    return Drained::Interrupted;
                }
            }
        }
    }
    let fd = file.host_fd();
    let pipe = file.journal_class.get() == Some(&Class::Pipe);
    let mut progress = Instant::now();
    loop {
        let mut held = {
            let mut st = fj.lock();
            let front = if st.committed > 0 && !st.dead {
                st.out.pop_front()
            } else {
                None
            };
            let Some(h) = front else {
                st.committed = 0;
                st.flushing = false;
                if owns {
                    st.commits_pending = st.commits_pending.saturating_sub(1);
                }
                return Drained::Done;
            };
            st.committed -= 1;
            h
        };
        loop {
            match write_held(fd, pipe, &mut held) {
                Ok(finished) => {
                    progress = Instant::now();
                    if finished {
                        fj.budget.release(held.cost());
                        break;
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    if mode == Mode::Try {
                        return put_back(file, fj, held, Drained::WouldBlock);
                    }
                    let left = FLUSH_STALL.saturating_sub(progress.elapsed());
                    if left.is_zero() {
                        // SAFETY: shutdown of a host socket the caller holds open.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                        tracing::warn!(error = %JournalError::Stalled { fd, secs: FLUSH_STALL.as_secs() }, "journal");
                        give_up(file, fj, held, owns, Errno::EPIPE);
                        return Drained::Done;
                    }
                    if wait_writable(fd, left) == Err(Errno::EINTR) && mode == Mode::Wait {
                        return put_back(file, fj, held, Drained::Interrupted);
                    }
                }
                Err(errno) => {
                    tracing::debug!(error = %JournalError::Write { fd, errno }, "journal");
                    give_up(file, fj, held, owns, errno);
                    return Drained::Done;
                }
            }
        }
    }
}

/// A syscall-mode drain stops before the end: the entry goes back to the front and the
/// token is let go, with a writer found for what is left.
fn put_back(file: &Arc<OpenFile>, fj: &FileJournal, held: Held, r: Drained) -> Drained {
    let mut st = fj.lock();
    if st.dead {
        fj.budget.release(held.cost());
    } else {
        st.out.push_front(held);
        st.committed += 1;
    }
    st.flushing = false;
    ensure_writer(file, fj, st);
    r
}

/// The peer is gone or does not read: its held output is dropped; the guest's next write
/// gets `errno`.
fn give_up(file: &OpenFile, fj: &FileJournal, held: Held, owns: bool, errno: Errno) {
    fj.budget.release(held.cost());
    mark_raw(file);
    let mut st = fj.lock();
    st.clear_out(&fj.budget);
    st.broken = Some(if errno == Errno::ECONNRESET {
        errno
    } else {
        Errno::EPIPE
    });
    st.flushing = false;
    if owns {
        st.commits_pending = st.commits_pending.saturating_sub(1);
    }
}

/// Write some of `h` without blocking; Ok(true) when it is all written.
fn write_held(fd: RawFd, pipe: bool, h: &mut Held) -> Result<bool, Errno> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    match &h.out {
        Out::Data(bytes) => {
            let rest = bytes.get(h.done..).unwrap_or_default();
            if rest.is_empty() {
                return Ok(true);
            }
            let n = if pipe {
                // A pipe write of at most PIPE_BUF bytes does not block once poll says
                // writable (a broken pipe polls as ready and the write says EPIPE).
                if !ready_now(fd, libc::POLLOUT) {
                    return Err(Errno::EAGAIN);
                }
                let len = rest.len().min(PIPE_BUF);
                // SAFETY: writes from our buffer to a host fd the caller holds open.
                check(unsafe { libc::write(fd, rest.as_ptr().cast(), len) } as i64)?
            } else {
                // SAFETY: sends from our buffer on a host socket the caller holds open.
                check(unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) } as i64)?
            };
            h.done += n as usize;
            Ok(h.done >= bytes.len())
        }
        Out::Datagram { bytes, to } => {
            let (ptr, len) = to.as_ref().map_or((std::ptr::null(), 0), |t| {
                (
                    t.as_ptr().cast::<libc::sockaddr>(),
                    t.len() as libc::socklen_t,
                )
            });
            // SAFETY: sends one datagram from our buffer to our copy of the address.
            let r =
                unsafe { libc::sendto(fd, bytes.as_ptr().cast(), bytes.len(), flags, ptr, len) };
            check(r as i64)?;
            Ok(true)
        }
        Out::Shutdown(how) => {
            // Its errors (ENOTCONN after a reset) are the peer's state: nothing to report.
            // SAFETY: shutdown of a host socket the caller holds open.
            unsafe { libc::shutdown(fd, *how) };
            Ok(true)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Host queries.

fn poll_one(fd: RawFd, events: i16, ms: i32) -> Result<i16, Errno> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid local pollfd.
    check(i64::from(unsafe { libc::poll(&mut p, 1, ms) }))?;
    Ok(p.revents)
}

fn ready_now(fd: RawFd, events: i16) -> bool {
    poll_one(fd, events, 0).is_ok_and(|r| r != 0)
}

/// Input (or an end of it) is waiting: a read would not block.
fn readable_now(fd: RawFd) -> bool {
    ready_now(fd, libc::POLLIN)
}

/// Writing to `fd` would fail at once: the peer is gone.
fn peer_gone(fd: RawFd) -> bool {
    poll_one(fd, libc::POLLOUT, 0).is_ok_and(|r| r & (libc::POLLERR | libc::POLLHUP) != 0)
}

fn wait_writable(fd: RawFd, left: Duration) -> Result<(), Errno> {
    let ms = left.as_millis().clamp(1, 1000) as i32;
    poll_one(fd, libc::POLLOUT, ms).map(drop)
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL on a host fd the caller holds; no memory effects.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl >= 0 && fl & libc::O_NONBLOCK != 0
}

/// Sleep 1 ms; true if a signal cut it short (a stop wants this thread).
fn nap() -> bool {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    // SAFETY: reads a local timespec; no remainder asked for.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) != 0 }
}

/// Is `fd` a socket of this domain and type?
fn socket_is(fd: RawFd, domains: &[i32], ty: i32) -> bool {
    crate::fd::socket_option(fd, libc::SO_DOMAIN).is_some_and(|d| domains.contains(&d))
        && crate::fd::socket_option(fd, libc::SO_TYPE) == Some(ty)
}

fn connected(fd: RawFd) -> bool {
    let mut addr = [0u8; 128];
    let mut len = addr.len() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes to a local buffer.
    unsafe { libc::getpeername(fd, addr.as_mut_ptr().cast(), &mut len) == 0 }
}

/// The pid of an AF_UNIX socket's peer (as it was at connect time).
fn peer_pid(fd: RawFd) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred to the local.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid != 0).then_some(cred.pid)
}

/// How `f` is journaled, and whether that is definite (a socket not yet connected may
/// become journaled).
fn classify(table: &FdTable, f: &OpenFile) -> (Class, bool) {
    let fd = f.host_fd();
    match f.host_type() {
        HostType::TcpStream => {
            if connected(fd) {
                (Class::Stream, true)
            } else {
                (Class::No, false)
            }
        }
        HostType::UnixSocket => {
            if crate::fd::socket_option(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM) {
                return (Class::No, true);
            }
            match peer_pid(fd) {
                // A socket pair, or a connection to the guest's own listener: both ends are
                // the guest's.
                Some(pid) if pid == std::process::id() as i32 => (Class::No, true),
                Some(_) if connected(fd) => (Class::Stream, true),
                _ => (Class::No, false),
            }
        }
        HostType::Fifo {
            dev,
            ino,
            reads,
            writes,
        } => {
            if reads && writes {
                return (Class::No, true);
            }
            let other_end_inside = table.iter().any(|(_, s)| {
                matches!(s.file.host_type(), HostType::Fifo { dev: d, ino: i, reads: r, writes: w }
                    if d == dev && i == ino && (r && writes || w && reads))
            });
            (
                if other_end_inside {
                    Class::No
                } else {
                    Class::Pipe
                },
                true,
            )
        }
        HostType::Other if socket_is(fd, &[libc::AF_INET, libc::AF_INET6], libc::SOCK_DGRAM) => {
            (Class::Datagram, true)
        }
        _ => (Class::No, true),
    }
}

// ---------------------------------------------------------------------------------------
// Syscall helpers (fs.rs, net.rs, poll.rs).

fn total(iovs: &[libc::iovec]) -> usize {
    iovs.iter().map(|v| v.iov_len).sum()
}

/// The first `n` bytes behind `iovs`.
fn gather(iovs: &[libc::iovec], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for v in iovs {
        let take = v.iov_len.min(n - out.len());
        // SAFETY: host_iovecs/guest_iovecs checked these pointers into guest memory, which
        // stays mapped while the caller holds the process lock.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) });
        if out.len() == n {
            break;
        }
    }
    out
}

/// Copy `data` into `iovs` (which host_iovecs marked written); returns the bytes copied.
fn scatter(iovs: &[libc::iovec], data: &[u8]) -> usize {
    let mut done = 0;
    for v in iovs {
        let take = v.iov_len.min(data.len() - done);
        // SAFETY: as in `gather`; the frames were recorded as written by the VMM when the
        // iovecs were made (guest_writes).
        unsafe {
            std::ptr::copy_nonoverlapping(data[done..].as_ptr(), v.iov_base as *mut u8, take)
        };
        done += take;
        if done == data.len() {
            break;
        }
    }
    done
}

/// `iovs` without their first `n` bytes.
pub(crate) fn advance(iovs: &[libc::iovec], mut n: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovs.len());
    for v in iovs {
        if n >= v.iov_len {
            n -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: stays inside the same iovec.
            iov_base: unsafe { (v.iov_base as *mut u8).add(n) }.cast(),
            iov_len: v.iov_len - n,
        });
        n = 0;
    }
    out
}

/// A write the guest asks for, for [`write`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outgoing<'a> {
    /// Its bytes (host iovecs into guest memory).
    pub iovs: &'a [libc::iovec],
    /// Destination (host sockaddr) of a sendto/sendmsg.
    pub to: Option<&'a [u8]>,
    /// It can be held (no control data, no unusual flags).
    pub holdable: bool,
    /// MSG_DONTWAIT.
    pub dontwait: bool,
}

/// Send flags that do not stop a write from being held.
pub(crate) const HOLDABLE_SEND_FLAGS: i32 =
    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE | libc::MSG_CONFIRM | libc::MSG_EOR;

/// Journal a write on `file`: `None` to write directly as before (anything held is out
/// of the way), or the result.
pub(crate) fn write(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    s: Outgoing<'_>,
) -> Option<SysResult> {
    let len = total(s.iovs);
    let req = WriteReq {
        len,
        holdable: s.holdable,
        dontwait: s.dontwait,
        shutdown: false,
    };
    let r = step(ctx, file, req, |class| {
        let bytes = gather(s.iovs, len);
        match class {
            Class::Datagram => Out::Datagram {
                bytes,
                to: s.to.filter(|t| !t.is_empty()).map(<[u8]>::to_vec),
            },
            _ => Out::Data(bytes),
        }
    });
    r.map(|r| r.map(|n| n as u64))
}

/// Journal `shutdown(how)` on `file`: `None` to call the host as before.
pub(crate) fn shutdown(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    how: i32,
) -> Option<SysResult> {
    let req = WriteReq {
        len: 0,
        holdable: how == libc::SHUT_WR || how == libc::SHUT_RDWR,
        dontwait: false,
        shutdown: true,
    };
    step(ctx, file, req, |_| Out::Shutdown(how)).map(|r| r.map(|_| 0))
}

fn step(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    req: WriteReq,
    make: impl FnOnce(Class) -> Out,
) -> Option<Result<usize, Errno>> {
    let mut make = Some(make);
    loop {
        let m = |c| make.take().map_or(Out::Data(Vec::new()), |f| f(c));
        match ctx.proc.fds.journal_write(file, req, m) {
            WriteStep::Direct => {
                call_unjournaled();
                return None;
            }
            WriteStep::Held(n) => {
                call_journaled();
                return Some(Ok(n));
            }
            WriteStep::Fail(e) => return Some(Err(e)),
            WriteStep::Drain { nonblock } => {
                let f = Arc::clone(file);
                let mode = if nonblock { Mode::Try } else { Mode::Wait };
                match ctx.proc.unlocked(|| drain(&f, mode)) {
                    Drained::Done => continue,
                    Drained::WouldBlock => return Some(Err(Errno::EAGAIN)),
                    Drained::Interrupted => return Some(Err(Errno::EINTR)),
                }
            }
        }
    }
}

/// A read the guest asks for, for [`read`] and [`after_read`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Recv {
    /// MSG_PEEK.
    pub peek: bool,
    /// The guest gets the stream's bytes (no MSG_OOB, MSG_ERRQUEUE, MSG_TRUNC discard...).
    pub plain: bool,
}

impl Recv {
    /// A read(2)/readv(2).
    pub(crate) fn plain() -> Recv {
        Recv {
            peek: false,
            plain: true,
        }
    }

    /// recv flags.
    pub(crate) fn flags(flags: i32) -> Recv {
        Recv {
            peek: flags & libc::MSG_PEEK != 0,
            plain: flags & (libc::MSG_OOB | libc::MSG_ERRQUEUE | libc::MSG_TRUNC) == 0,
        }
    }
}

/// Serve a read on `file` into `iovs` from its replay queue: `Some` if served (the bytes
/// are in guest memory), `None` to read the host (then call [`after_read`]).
pub(crate) fn read(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    iovs: &[libc::iovec],
    r: Recv,
) -> Result<Option<Served>, Errno> {
    let want = total(iovs);
    if !r.plain || want == 0 || file.journal.get().is_none() {
        return Ok(None);
    }
    match ctx.proc.fds.journal_read(file, want, r.peek) {
        ReadStep::Host => Ok(None),
        ReadStep::Served(s, journaled) => {
            scatter(iovs, &s.bytes);
            if journaled {
                call_journaled();
            } else {
                call_unjournaled();
            }
            Ok(Some(s))
        }
        ReadStep::Drain => {
            let f = Arc::clone(file);
            match ctx.proc.unlocked(|| drain(&f, Mode::Wait)) {
                Drained::Interrupted => Err(Errno::EINTR),
                _ => Ok(None),
            }
        }
    }
}

/// `n` bytes were read from the host into `iovs` (from `from`, for a datagram): recorded
/// while windows are live.
pub(crate) fn after_read(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    iovs: &[libc::iovec],
    n: usize,
    from: Option<&[u8]>,
    r: Recv,
) {
    if n == 0 {
        return;
    }
    // A peek consumes nothing: nothing to replay.
    let journaled = r.peek
        || r.plain
            && ctx
                .proc
                .fds
                .journal_record(file, n, from, || gather(iovs, n));
    if journaled {
        call_journaled();
    } else {
        call_unjournaled();
    }
}

/// Direct output that cannot be held (sendfile): what is held on `file` goes first.
/// `None` to go on, or the error.
pub(crate) fn direct(ctx: &mut SyscallCtx<'_>, file: &Arc<OpenFile>) -> Option<SysResult> {
    let req = WriteReq {
        len: 0,
        holdable: false,
        dontwait: false,
        shutdown: false,
    };
    step(ctx, file, req, |_| Out::Data(Vec::new())).map(|r| r.map(|n| n as u64))
}

/// Before a wait for input on `files` that would block: commit their held output (their
/// peers may be waiting for it). EINTR if a signal interrupted a drain.
pub(crate) fn early_commit(ctx: &mut SyscallCtx<'_>, files: &[Arc<OpenFile>]) -> Result<(), Errno> {
    for f in files {
        if ctx.proc.fds.journal_early_commit(f) {
            let g = Arc::clone(f);
            if ctx.proc.unlocked(|| drain(&g, Mode::Wait)) == Drained::Interrupted {
                return Err(Errno::EINTR);
            }
        }
    }
    Ok(())
}

/// What the journal adds to an epoll wait.
#[derive(Debug, Default)]
pub(crate) struct EpollScan {
    /// Entries readable from the journal: (events to report, data).
    pub ready: Vec<(u32, u64)>,
    /// One-shot entries among them (disarmed on the host once reported): their files.
    pub oneshot: Vec<Arc<OpenFile>>,
    /// Files that hold output and are watched for input.
    pub waiting: Vec<Arc<OpenFile>>,
}

/// Look at the files with journal state that epoll instance `ep` watches.
pub(crate) fn epoll_scan(table: &FdTable, ep: &Arc<OpenFile>) -> EpollScan {
    let mut scan = EpollScan::default();
    if !table.journal_pending() {
        return scan;
    }
    let ep_key = key(ep);
    let input = (libc::EPOLLIN | libc::EPOLLRDNORM) as u32;
    for f in table.journal_files() {
        let Some((events, data)) = ep.epoll_entry(f) else {
            continue;
        };
        if events & input == 0 {
            continue;
        }
        if readable(f) {
            let oneshot = events & libc::EPOLLONESHOT as u32 != 0;
            let once = oneshot || events & libc::EPOLLET as u32 != 0;
            if epoll_may_report(f, ep_key, once) {
                scan.ready.push((events & input, data));
                if oneshot {
                    scan.oneshot.push(Arc::clone(f));
                }
            }
        } else if holds_output(f) {
            scan.waiting.push(Arc::clone(f));
        }
    }
    scan
}

/// Journal readiness of the files a poll or select asks about (`files[i]` with its poll
/// events): extra revents per entry, and the files that hold output and are waited on
/// for input.
pub(crate) fn poll_scan(
    table: &FdTable,
    files: &[(Option<Arc<OpenFile>>, i16)],
) -> (Vec<i16>, Vec<Arc<OpenFile>>) {
    let mut extra = vec![0i16; files.len()];
    let mut waiting = Vec::new();
    if !table.journal_pending() {
        return (extra, waiting);
    }
    let input = libc::POLLIN | libc::POLLRDNORM;
    for (i, (f, events)) in files.iter().enumerate() {
        let Some(f) = f else { continue };
        if events & input == 0 || f.journal.get().is_none() {
            continue;
        }
        if readable(f) {
            extra[i] = events & input;
        } else if holds_output(f) {
            waiting.push(Arc::clone(f));
        }
    }
    (extra, waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::{FdCheckpoint, FileKind};
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A connected TCP pair on loopback: the guest's side (a host fd) and the peer.
    fn tcp_pair() -> (OwnedFd, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (s.into(), c)
    }

    fn put(t: &mut FdTable, fd: OwnedFd) -> (i64, Arc<OpenFile>) {
        let g = i64::from(
            t.insert(OpenFile::new(fd, FileKind::Host, None), false)
                .expect("insert"),
        );
        (g, t.get(g).expect("get"))
    }

    /// Take a checkpoint and open window `epoch` on it, as the rescue engine does.
    fn window(t: &mut FdTable, epoch: u64) -> FdCheckpoint {
        let ck = t.checkpoint();
        t.journal_open(epoch);
        ck
    }

    fn req(len: usize) -> WriteReq {
        WriteReq {
            len,
            holdable: true,
            dontwait: false,
            shutdown: false,
        }
    }

    /// A guest write as the syscall layer makes it (the bytes given only if held).
    fn write(t: &mut FdTable, f: &Arc<OpenFile>, bytes: &[u8]) -> WriteStep {
        t.journal_write(f, req(bytes.len()), |_| Out::Data(bytes.to_vec()))
    }

    /// A guest read as the syscall layer makes it: replay first, else the host (recorded).
    fn guest_read(t: &mut FdTable, f: &Arc<OpenFile>, want: usize) -> Vec<u8> {
        begin_call();
        match t.journal_read(f, want, false) {
            ReadStep::Served(s, journaled) => {
                assert!(journaled || !t.journal_active());
                call_journaled();
                s.bytes
            }
            _ => {
                let mut buf = vec![0u8; want];
                // SAFETY: reads into a local buffer of `want` bytes.
                let n = unsafe { libc::read(f.host_fd(), buf.as_mut_ptr().cast(), want) };
                assert!(n >= 0, "read: {}", Errno::last());
                buf.truncate(n as usize);
                if t.journal_record(f, buf.len(), None, || buf.clone()) {
                    call_journaled();
                } else {
                    call_unjournaled();
                }
                buf
            }
        }
    }

    /// What the peer has received so far (without waiting).
    fn received_now(c: &mut TcpStream) -> Vec<u8> {
        // Loopback delivers at once; a short pause covers a flusher thread's scheduling.
        std::thread::sleep(Duration::from_millis(50));
        c.set_nonblocking(true).expect("nonblocking");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("peer read: {e}"),
            }
        }
        c.set_nonblocking(false).expect("blocking");
        out
    }

    fn received_exactly(c: &mut TcpStream, n: usize) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; n];
        c.read_exact(&mut buf).expect("peer read");
        buf
    }

    #[test]
    fn held_output_goes_out_when_no_window_can_undo_it_inner_first() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck1 = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"A"), WriteStep::Held(1));
        let _ck2 = window(&mut t, 2);
        assert_eq!(write(&mut t, &f, b"B"), WriteStep::Held(1));
        // Releasing the inner window: window 1 can still undo both.
        let c = t.journal_release(2, &[1]);
        assert!(c.is_empty());
        c.flush();
        assert!(received_now(&mut peer).is_empty());
        assert!(t.journal_active());
        // Releasing the outer one: both go, in order.
        let c = t.journal_release(1, &[]);
        assert_eq!(c.files(), 1);
        c.flush();
        assert_eq!(received_exactly(&mut peer, 2), b"AB");
        assert!(!t.journal_active());
        assert_eq!(t.journal().used(), 0);
        // With no window, writes go to the host.
        assert_eq!(write(&mut t, &f, b"C"), WriteStep::Direct);
    }

    #[test]
    fn releasing_the_outer_window_first_flushes_the_prefix_it_covered() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck1 = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"A1"), WriteStep::Held(2));
        let _ck2 = window(&mut t, 2);
        assert_eq!(write(&mut t, &f, b"B2"), WriteStep::Held(2));
        // Window 1 goes; window 2 can still undo B2, not A1.
        t.journal_release(1, &[2]).flush();
        assert_eq!(received_exactly(&mut peer, 2), b"A1");
        assert!(received_now(&mut peer).is_empty());
        // Written after: tagged with window 2, behind B2.
        assert_eq!(write(&mut t, &f, b"C2"), WriteStep::Held(2));
        t.journal_release(2, &[]).flush();
        assert_eq!(received_exactly(&mut peer, 4), b"B2C2");
        assert_eq!(t.journal().used(), 0);
    }

    #[test]
    fn rollback_drops_held_output_and_replays_input_in_order() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (g, f) = put(&mut t, fd);
        let ck1 = window(&mut t, 1);
        peer.write_all(b"hello world").expect("peer write");
        assert_eq!(guest_read(&mut t, &f, 11), b"hello world");
        t.note_io(g);
        begin_call();
        assert_eq!(write(&mut t, &f, b"answer"), WriteStep::Held(6));
        call_journaled();
        t.note_io(g);

        let report = t.restore(&ck1).expect("restore");
        // Every transfer was journaled: the connection survives.
        assert_eq!(report.connections_shut, 0);
        t.journal_rollback(1, &[1]);
        assert!(readable(&f));
        assert_eq!(replay_len(&f), 11);
        // Partial reads split entries; a peek does not consume.
        assert_eq!(guest_read(&mut t, &f, 5), b"hello");
        match t.journal_read(&f, 100, true) {
            ReadStep::Served(s, _) => assert_eq!(s.bytes, b" world"),
            other => panic!("peek: {other:?}"),
        }
        assert_eq!(guest_read(&mut t, &f, 100), b" world");
        assert!(!readable(&f));
        // What was served is recorded again: a second rollback replays all of it.
        t.restore(&ck1).expect("restore again");
        t.journal_rollback(1, &[1]);
        assert_eq!(guest_read(&mut t, &f, 3), b"hel");
        t.restore(&ck1).expect("restore a third time");
        t.journal_rollback(1, &[1]);
        assert_eq!(guest_read(&mut t, &f, 100), b"hello world");
        // New input follows the replay.
        peer.write_all(b"!").expect("peer write");
        assert_eq!(guest_read(&mut t, &f, 100), b"!");
        // The held answer was dropped: the restored guest answers again, once.
        assert_eq!(write(&mut t, &f, b"answer"), WriteStep::Held(6));
        t.journal_release(1, &[]).flush();
        assert_eq!(received_exactly(&mut peer, 6), b"answer");
        assert!(received_now(&mut peer).is_empty());
        assert_eq!(t.journal().used(), 0);
    }

    #[test]
    fn a_transfer_the_journal_did_not_keep_shuts_the_connection_on_rollback() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (g, f) = put(&mut t, fd);
        let ck1 = window(&mut t, 1);
        // Output that cannot be held (say, with SCM_RIGHTS) is written directly.
        let direct = t.journal_write(
            &f,
            WriteReq {
                holdable: false,
                ..req(1)
            },
            |_| Out::Data(b"x".to_vec()),
        );
        assert_eq!(direct, WriteStep::Direct);
        begin_call();
        call_unjournaled();
        t.note_io(g);
        let report = t.restore(&ck1).expect("restore");
        assert_eq!(report.connections_shut, 1);
        t.journal_rollback(1, &[1]);
        assert!(received_now(&mut peer).is_empty());
        // An operator checkpoint (not a window) shuts down any connection with traffic.
        let (fd, mut peer2) = tcp_pair();
        let (g2, f2) = put(&mut t, fd);
        let ck = t.checkpoint();
        peer2.write_all(b"q").expect("peer write");
        assert_eq!(guest_read(&mut t, &f2, 1), b"q");
        t.note_io(g2);
        let report = t.restore(&ck).expect("restore operator checkpoint");
        assert_eq!(report.connections_shut, 1);
        drop(f);
        let mut b = [0u8; 1];
        peer2
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(peer2.read(&mut b).expect("eof"), 0);
    }

    #[test]
    fn accepted_connections_are_accepted_again_with_their_input() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut t = FdTable::new();
        let (_, listener) = put(&mut t, l.into());
        let ck1 = window(&mut t, 1);
        let mut client = TcpStream::connect(addr).expect("connect");
        client.write_all(b"GET /").expect("client write");
        let mut peer = [0u8; 128];
        let mut plen = peer.len() as libc::socklen_t;
        // SAFETY: accept4 writes at most `plen` bytes of address to a local buffer.
        let fd = unsafe {
            libc::accept4(
                listener.host_fd(),
                peer.as_mut_ptr().cast(),
                &mut plen,
                libc::SOCK_CLOEXEC,
            )
        };
        assert!(fd >= 0, "accept: {}", Errno::last());
        // SAFETY: a new fd we own.
        let (g, conn) = put(&mut t, unsafe { OwnedFd::from_raw_fd(fd) });
        let peer = peer[..plen as usize].to_vec();
        t.journal_note_accept(&listener, &conn, &peer);
        assert_eq!(guest_read(&mut t, &conn, 5), b"GET /");
        t.note_io(g);
        let weak = Arc::downgrade(&conn);
        let host = conn.host_fd();
        drop(conn);

        t.restore(&ck1).expect("restore");
        t.journal_rollback(1, &[1]);
        // The connection left the table but is not closed: it waits on the listener.
        assert_eq!(t.get(g).err(), Some(Errno::EBADF));
        assert!(weak.upgrade().is_some());
        assert!(readable(&listener));
        let (again, addr_again) = t.journal_take_accept(&listener).expect("queued accept");
        assert_eq!(again.host_fd(), host);
        assert_eq!(addr_again, peer);
        assert!(!readable(&listener));
        // Accepted again (a new fd), its input is replayed, and it is recorded again.
        t.insert_from(0, Arc::clone(&again), false)
            .expect("install");
        t.journal_note_accept(&listener, &again, &addr_again);
        assert_eq!(guest_read(&mut t, &again, 100), b"GET /");
        assert_eq!(write(&mut t, &again, b"200"), WriteStep::Held(3));
        t.journal_release(1, &[]).flush();
        assert_eq!(received_exactly(&mut client, 3), b"200");
    }

    #[test]
    fn replay_data_reads_as_ready_to_epoll_and_poll() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        // SAFETY: plain epoll creation.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        // SAFETY: a new fd we own.
        let epg = t
            .insert(
                OpenFile::new_epoll(unsafe { OwnedFd::from_raw_fd(ep) }),
                false,
            )
            .expect("ep");
        let ep = t.get(i64::from(epg)).expect("ep");
        let (_, f) = put(&mut t, fd);
        let et = (libc::EPOLLIN | libc::EPOLLET) as u32;
        ep.epoll_ctl(libc::EPOLL_CTL_ADD, &f, et, 7).expect("add");
        let ck1 = window(&mut t, 1);
        peer.write_all(b"abc").expect("peer write");
        assert_eq!(guest_read(&mut t, &f, 3), b"abc");
        assert!(epoll_scan(&t, &ep).ready.is_empty());
        t.restore(&ck1).expect("restore");
        t.journal_rollback(1, &[1]);
        // Edge-triggered: once per rollback.
        assert_eq!(epoll_scan(&t, &ep).ready, [(libc::EPOLLIN as u32, 7)]);
        assert!(epoll_scan(&t, &ep).ready.is_empty());
        // Re-armed by the guest: again.
        ep.epoll_ctl(libc::EPOLL_CTL_MOD, &f, et, 8).expect("mod");
        assert_eq!(epoll_scan(&t, &ep).ready, [(libc::EPOLLIN as u32, 8)]);
        // Level-triggered: as long as there is replay data.
        ep.epoll_ctl(libc::EPOLL_CTL_MOD, &f, libc::EPOLLIN as u32, 9)
            .expect("mod");
        assert_eq!(epoll_scan(&t, &ep).ready.len(), 1);
        assert_eq!(epoll_scan(&t, &ep).ready.len(), 1);
        // poll/select.
        let asked = [
            (Some(Arc::clone(&f)), libc::POLLIN | libc::POLLOUT),
            (None, libc::POLLIN),
        ];
        let (extra, waiting) = poll_scan(&t, &asked);
        assert_eq!(extra, [libc::POLLIN, 0]);
        assert!(waiting.is_empty());
        assert_eq!(guest_read(&mut t, &f, 10), b"abc");
        assert!(epoll_scan(&t, &ep).ready.is_empty());
        assert_eq!(poll_scan(&t, &asked).0, [0, 0]);
    }

    #[test]
    fn bounds_stop_journaling_and_mark_the_file() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        t.set_journal_limit(4096);
        let (g, f) = put(&mut t, fd);
        let ck1 = window(&mut t, 1);
        // One-byte writes share an entry; the budget bounds them all the same.
        let mut held = 0;
        let step = loop {
            match write(&mut t, &f, b"z") {
                WriteStep::Held(1) => held += 1,
                other => break other,
            }
            assert!(held < 4096, "never bounded");
        };
        assert!(held > 0);
        assert!(t.journal().used() <= 4096);
        // Over budget: what was held goes first (the write waits for it)...
        assert_eq!(step, WriteStep::Drain { nonblock: false });
        assert_eq!(drain(&f, Mode::Wait), Drained::Done);
        assert_eq!(received_exactly(&mut peer, held), vec![b'z'; held]);
        // ...then the write goes directly, and so do later ones.
        assert_eq!(write(&mut t, &f, b"z"), WriteStep::Direct);
        begin_call();
        call_unjournaled();
        t.note_io(g);
        // A big write is never copied: it goes directly.
        assert_eq!(write(&mut t, &f, &vec![0u8; 1 << 20]), WriteStep::Direct);
        // A rollback to the window shuts the connection down.
        let report = t.restore(&ck1).expect("restore");
        assert_eq!(report.connections_shut, 1);
        t.journal_rollback(1, &[1]);
        assert_eq!(t.journal().used(), 0);
        // Input beyond the budget is not recorded either.
        let (fd2, mut peer2) = tcp_pair();
        let (_, f2) = put(&mut t, fd2);
        peer2.write_all(&[1u8; 8192]).expect("peer write");
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        while got.len() < 8192 {
            got.extend(guest_read(&mut t, &f2, 8192 - got.len()));
        }
        assert!(t.journal().used() <= 4096);
        assert!(f2.last_raw_io.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn early_commit_when_a_read_would_block() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck1 = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"request"), WriteStep::Held(7));
        assert!(holds_output(&f));
        assert!(!t.take_early_commit());
        // The guest waits for the answer, which the peer sends only once it has the request.
        assert!(matches!(t.journal_read(&f, 100, false), ReadStep::Host));
        assert!(t.take_early_commit());
        assert!(!t.take_early_commit());
        assert_eq!(received_exactly(&mut peer, 7), b"request");
        // Flushed early: a rollback to the window would send it twice: it shuts the
        // connection down instead.
        assert!(f.last_raw_io.load(Ordering::Relaxed) > 0);
        // Input already waiting: no early commit.
        assert_eq!(write(&mut t, &f, b"more"), WriteStep::Held(4));
        peer.write_all(b"reply").expect("peer write");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(guest_read(&mut t, &f, 5), b"reply");
        assert!(!t.take_early_commit());
        assert!(received_now(&mut peer).is_empty());
        // Poll/epoll: a file that holds output and is waited on for input is reported.
        let asked = [(Some(Arc::clone(&f)), libc::POLLIN)];
        assert_eq!(poll_scan(&t, &asked).1.len(), 1);
        assert!(!t.journal_early_commit(&f));
        assert!(t.take_early_commit());
        assert_eq!(received_exactly(&mut peer, 4), b"more");
    }

    #[test]
    fn writes_after_the_windows_queue_behind_held_output() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck1 = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"first"), WriteStep::Held(5));
        let commit = t.journal_release(1, &[]);
        // Not flushed yet: a nonblocking write goes behind it...
        let nb = WriteReq {
            dontwait: true,
            ..req(6)
        };
        assert_eq!(
            t.journal_write(&f, nb, |_| Out::Data(b"second".to_vec())),
            WriteStep::Held(6)
        );
        // ...a blocking one waits until it is written.
        assert_eq!(
            write(&mut t, &f, b"third"),
            WriteStep::Drain { nonblock: false }
        );
        commit.flush();
        assert_eq!(drain(&f, Mode::Wait), Drained::Done);
        assert_eq!(write(&mut t, &f, b"third"), WriteStep::Direct);
        assert_eq!(received_exactly(&mut peer, 11), b"firstsecond");
        // A held shutdown follows the data, and later writes fail as on Linux.
        let _ck2 = window(&mut t, 2);
        assert_eq!(write(&mut t, &f, b"bye"), WriteStep::Held(3));
        let shut = WriteReq {
            shutdown: true,
            ..req(0)
        };
        assert_eq!(
            t.journal_write(&f, shut, |_| Out::Shutdown(libc::SHUT_WR)),
            WriteStep::Held(0)
        );
        assert_eq!(write(&mut t, &f, b"late"), WriteStep::Fail(Errno::EPIPE));
        t.journal_release(2, &[]).flush();
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut all = Vec::new();
        peer.read_to_end(&mut all).expect("to the end");
        assert_eq!(all, b"bye");
    }

    #[test]
    fn pipes_to_the_outside_are_held_and_inner_pipes_are_not() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and ours; the read end stays outside the table.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut t = FdTable::new();
        let (_, wf) = put(&mut t, w);
        let _ck = window(&mut t, 1);
        assert_eq!(write(&mut t, &wf, b"log line\n"), WriteStep::Held(9));
        assert_eq!(t.journal_class(&wf), Class::Pipe);
        t.journal_release(1, &[]).flush();
        let mut out = [0u8; 9];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::read(r.as_raw_fd(), out.as_mut_ptr().cast(), 9) };
        assert_eq!(n, 9);
        assert_eq!(&out, b"log line\n");
        // Both ends in the guest: not journaled (nothing leaves the sandbox).
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: as above; both ends go into the table.
        let (r2, w2) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        put(&mut t, r2);
        let (_, w2) = put(&mut t, w2);
        let _ck = window(&mut t, 2);
        assert_eq!(write(&mut t, &w2, b"wake"), WriteStep::Direct);
        // Nor a regular file.
        let file = std::fs::File::open("/dev/null").expect("open");
        let (_, dn) = put(&mut t, file.into());
        assert_eq!(write(&mut t, &dn, b"x"), WriteStep::Direct);
    }

    #[test]
    fn udp_datagrams_keep_their_boundaries() {
        let guest = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind");
        guest
            .connect(peer.local_addr().expect("addr"))
            .expect("connect");
        peer.connect(guest.local_addr().expect("addr"))
            .expect("connect");
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, guest.into());
        let ck1 = window(&mut t, 1);
        for d in [&b"one"[..], b"two"] {
            let w = t.journal_write(&f, req(d.len()), |c| {
                assert_eq!(c, Class::Datagram);
                Out::Datagram {
                    bytes: d.to_vec(),
                    to: None,
                }
            });
            assert_eq!(w, WriteStep::Held(3));
        }
        // Input: one datagram, replayed whole, cut to a short buffer.
        peer.send(b"question").expect("peer send");
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 64];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::recv(f.host_fd(), buf.as_mut_ptr().cast(), 64, 0) };
        assert_eq!(n, 8);
        assert!(t.journal_record(&f, 8, Some(b"src"), || buf[..8].to_vec()));
        t.restore(&ck1).expect("restore");
        t.journal_rollback(1, &[1]);
        match t.journal_read(&f, 4, false) {
            ReadStep::Served(s, _) => {
                assert_eq!(
                    (s.bytes.as_slice(), s.full, s.datagram),
                    (&b"ques"[..], 8, true)
                );
                assert_eq!(s.from.as_deref(), Some(&b"src"[..]));
            }
            other => panic!("read: {other:?}"),
        }
        // The datagram was consumed whole; the held ones were dropped by the rollback.
        assert!(!readable(&f));
        assert_eq!(write(&mut t, &f, b"x"), WriteStep::Held(1));
        t.journal_release(1, &[]).flush();
        let mut got = [0u8; 16];
        assert_eq!(peer.recv(&mut got).expect("peer recv"), 1);
    }

    #[test]
    fn an_operator_rollback_discards_what_is_newer() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _w1 = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"kept"), WriteStep::Held(4));
        let op = t.checkpoint();
        let _w3 = window(&mut t, 3);
        assert_eq!(write(&mut t, &f, b"gone"), WriteStep::Held(4));
        // Back to operator checkpoint 2: window 3 is gone, and what followed 2.
        t.restore(&op).expect("restore");
        t.journal_discard_after(2);
        assert!(t.journal_active());
        t.journal_release(1, &[]).flush();
        assert_eq!(received_exactly(&mut peer, 4), b"kept");
        assert!(received_now(&mut peer).is_empty());
        assert_eq!(t.journal().used(), 0);
    }

    #[test]
    fn a_closed_file_with_committed_output_is_still_written() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (g, f) = put(&mut t, fd);
        let ck = window(&mut t, 1);
        assert_eq!(write(&mut t, &f, b"last words"), WriteStep::Held(10));
        let slot = t.remove(g).expect("close");
        t.forget_file(&slot.file);
        drop((slot, f));
        let c = t.journal_release(1, &[]);
        drop(ck);
        // Dropped unflushed: a flusher thread writes it, then the socket closes.
        drop(c);
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut all = Vec::new();
        peer.read_to_end(&mut all).expect("to the end");
        assert_eq!(all, b"last words");
    }

    #[test]
    fn a_deferred_flush_never_blocks_and_keeps_the_order() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck = window(&mut t, 1);
        // More than the socket buffers take while the peer does not read.
        let big: Vec<u8> = (0..8 << 20).map(|i: u32| i as u8).collect();
        assert_eq!(write(&mut t, &f, &big), WriteStep::Held(big.len()));
        let started = Instant::now();
        t.journal_release(1, &[]).flush_or_defer();
        assert!(started.elapsed() < Duration::from_secs(1));
        // Written behind it, in order, by the flusher thread.
        let nb = WriteReq {
            dontwait: true,
            ..req(4)
        };
        let w = t.journal_write(&f, nb, |_| Out::Data(b"tail".to_vec()));
        assert_eq!(w, WriteStep::Held(4));
        let got = received_exactly(&mut peer, big.len() + 4);
        assert!(got[..big.len()] == big[..], "held bytes out of order");
        assert_eq!(&got[big.len()..], b"tail");
    }

    #[test]
    fn a_peer_that_does_not_read_is_shut_down() {
        let (fd, mut peer) = tcp_pair();
        let mut t = FdTable::new();
        let (_, f) = put(&mut t, fd);
        let _ck = window(&mut t, 1);
        let big = vec![7u8; 8 << 20];
        assert_eq!(write(&mut t, &f, &big), WriteStep::Held(big.len()));
        let started = Instant::now();
        t.journal_release(1, &[]).flush();
        // Given up after FLUSH_STALL without progress: the guest's next write fails.
        assert!(started.elapsed() >= FLUSH_STALL);
        assert_eq!(write(&mut t, &f, b"x"), WriteStep::Fail(Errno::EPIPE));
        assert_eq!(t.journal().used(), 0);
        // The peer sees some of it, then the end: never a wrong byte.
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut all = Vec::new();
        peer.read_to_end(&mut all).expect("to the end");
        assert!(all.len() < big.len() && all.iter().all(|&b| b == 7));
    }

    #[test]
    fn iovecs_advance_and_copy() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 3,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 4,
            },
        ];
        assert_eq!(scatter(&iovs, b"abcdef"), 6);
        assert_eq!(gather(&iovs, 5), b"abcde");
        let rest = advance(&iovs, 4);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].iov_len, 3);
        assert_eq!(gather(&rest, 3), b"ef\0");
        assert!(advance(&iovs, 7).is_empty());
        assert_eq!((a, b), (*b"abc", *b"def\0"));
    }
}
