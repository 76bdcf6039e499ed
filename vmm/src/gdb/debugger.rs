//! The runner-facing half of the debugger: what a gdb session asked of the vCPU threads
//! (which to single-step, which addresses to watch) and what they report back (a
//! breakpoint, a finished step, a watched access).
//!
//! A runner that meets a debugger event records it here, is *held* (it runs no more guest
//! code) and wakes the session thread through an eventfd. The session stops the world
//! ([`crate::checkpoint::world`]), which parks every runner, the held ones included, and
//! reports the first event to gdb: all-stop mode, as gdb expects from a Linux target.
//! Other threads' breakpoint events of the same moment are dropped: those threads sit on
//! their breakpoint and meet it again when resumed (what gdbserver does too).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

/// What kind of access a watchpoint catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// Writes.
    Write,
    /// Reads.
    Read,
    /// Both.
    Access,
}

/// A watched range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchpoint {
    /// First byte.
    pub addr: u64,
    /// Length in bytes (1 to 8, as gdb asks for x86).
    pub len: u64,
    /// Which accesses.
    pub kind: WatchKind,
}

impl Watchpoint {
    /// Does an access of `size` bytes at `addr` (a write if `write`) touch this range?
    fn caught(&self, addr: u64, size: u64, write: bool) -> bool {
        let kind_matches = match self.kind {
            WatchKind::Write => write,
            WatchKind::Read => !write,
            WatchKind::Access => true,
        };
        kind_matches
            && addr < self.addr.saturating_add(self.len)
            && addr.saturating_add(size.max(1)) > self.addr
    }
}

/// Why a thread stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// It reached a debugger's breakpoint (RIP on it, not yet executed).
    Breakpoint,
    /// A single step finished.
    DoneStep,
    /// A signal is about to be delivered to it (a fault, at the faulting instruction).
    Signal(i32),
    /// An instruction accessed a watched range (after it completed).
    Watch {
        /// The watchpoint's kind.
        kind: WatchKind,
        /// The watchpoint's address.
        addr: u64,
    },
}

/// A thread's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopEvent {
    /// Thread id.
    pub tid: i32,
    /// What happened.
    pub stop: Stop,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<StopEvent>,
    held: BTreeSet<i32>,
    /// Threads to single-step, with the RIP their step began at.
    steps: BTreeMap<i32, u64>,
    /// The signal gdb resumed each named thread with (`None`: without one).
    resume_signals: BTreeMap<i32, Option<i32>>,
    watches: Vec<Watchpoint>,
    /// Addresses gdb placed as hardware breakpoints (reported as such).
    hw_breakpoints: BTreeSet<u64>,
    /// How the guest ended, while a session was attached.
    ended: Option<crate::sandbox::RunOutcome>,
}

/// The debugger state shared by the gdb session and the vCPU threads.
#[derive(Debug)]
pub struct Debugger {
    attached: AtomicBool,
    /// The session holds the world stopped (the rescue watchdog waits meanwhile).
    world_stopped: AtomicBool,
    inner: Mutex<Inner>,
    wake: EventFd,
    /// Signalled when a session ends.
    detached: Condvar,
}

impl Debugger {
    /// A detached debugger.
    pub fn new() -> std::io::Result<Debugger> {
        Ok(Debugger {
            attached: AtomicBool::new(false),
            world_stopped: AtomicBool::new(false),
            inner: Mutex::default(),
            detached: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session stopped the world, or resumed it.
    pub fn set_world_stopped(&self, stopped: bool) {
        self.world_stopped.store(stopped, Ordering::Release);
    }

    /// Does the session hold the world stopped?
    pub fn world_stopped(&self) -> bool {
        self.world_stopped.load(Ordering::Acquire)
    }

    /// Is a gdb session attached? (Cheap: runners check it on every loop.)
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// A session begins. Threads already held (`--gdb-wait`) stay held.
    pub fn attach(&self) {
        let mut s = self.lock();
        let held = std::mem::take(&mut s.held);
        *s = Inner {
            held,
            ..Inner::default()
        };
        drop(s);
        self.attached.store(true, Ordering::Release);
    }

    /// Hold threads `tids` without an event (they run no guest code until the next stop).
    pub fn hold(&self, tids: &[i32]) {
        self.lock().held.extend(tids.iter().copied());
    }

    /// The session ended: nothing is held, stepped or watched any more. Call
    /// [`crate::checkpoint::world::World::notify`] after it, so held threads look again.
    pub fn detach(&self) {
        self.attached.store(false, Ordering::Release);
        self.world_stopped.store(false, Ordering::Release);
        *self.lock() = Inner::default();
        self.detached.notify_all();
    }

    /// A session ended before any attached under `--gdb-wait`: forget it, but stay
    /// attached with only thread `tid` held (never detached in between, so the thread
    /// cannot slip out of its hold).
    pub fn reset_waiting(&self, tid: i32) {
        let mut s = self.lock();
        *s = Inner::default();
        s.held.insert(tid);
        self.world_stopped.store(false, Ordering::Release);
    }

    /// Wait (at most `timeout`) until no session is attached: at the guest's end, so gdb
    /// is told how it ended before the VMM exits.
    pub fn wait_detached(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        while self.attached() {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .detached
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The fd that becomes readable when a thread reports (the session polls it).
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Consume the wake-ups counted so far.
    pub fn drain_wakeups(&self) {
        // Nonblocking: EAGAIN when nothing is counted.
        let _ = self.wake.read();
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::warn!(error = %e, "cannot wake the gdb session");
        }
    }

    /// Thread `tid` met `stop`: record it and hold the thread until the session stops the
    /// world. Nothing happens when no session is attached.
    pub fn report(&self, tid: i32, stop: Stop) {
        if !self.attached() {
            return;
        }
        let mut s = self.lock();
        s.steps.remove(&tid);
        s.events.push(StopEvent { tid, stop });
        s.held.insert(tid);
        drop(s);
        self.wake();
    }

    /// Must thread `tid` stay out of the guest until the next stop?
    pub fn held(&self, tid: i32) -> bool {
        self.attached() && self.lock().held.contains(&tid)
    }

    /// The reports since the last call (the world is stopped: the held threads are parked,
    /// so nothing holds them any more).
    pub fn take_events(&self) -> Vec<StopEvent> {
        let mut s = self.lock();
        s.held.clear();
        std::mem::take(&mut s.events)
    }

    /// Threads to step when the world resumes (tid → RIP the step begins at); the others
    /// continue.
    pub fn set_steps(&self, steps: BTreeMap<i32, u64>) {
        self.lock().steps = steps;
    }

    /// The signals gdb resumes threads with (threads it did not name keep theirs).
    pub fn set_resume_signals(&self, signals: BTreeMap<i32, Option<i32>>) {
        self.lock().resume_signals = signals;
    }

    /// How gdb last resumed thread `tid`: `Some(Some(sig))` with a signal, `Some(None)`
    /// without one, `None` if it did not name the thread.
    pub fn resume_signal(&self, tid: i32) -> Option<Option<i32>> {
        if !self.attached() {
            return None;
        }
        self.lock().resume_signals.get(&tid).copied()
    }

    /// Is thread `tid` single-stepping? Then the RIP its step began at.
    pub fn step_origin(&self, tid: i32) -> Option<u64> {
        if !self.attached() {
            return None;
        }
        self.lock().steps.get(&tid).copied()
    }

    /// Remember that gdb asked for a hardware breakpoint at `addr` (or no longer does).
    pub fn set_hw_breakpoint(&self, addr: u64, on: bool) {
        let mut s = self.lock();
        if on {
            s.hw_breakpoints.insert(addr);
        } else {
            s.hw_breakpoints.remove(&addr);
        }
    }

    /// Was the breakpoint at `addr` placed as a hardware one?
    pub fn is_hw_breakpoint(&self, addr: u64) -> bool {
        self.lock().hw_breakpoints.contains(&addr)
    }

    /// Add a watchpoint; false if it was there already.
    pub fn add_watch(&self, w: Watchpoint) -> bool {
        let mut s = self.lock();
        if s.watches.contains(&w) {
            return false;
        }
        s.watches.push(w);
        true
    }

    /// Remove a watchpoint; false if there was none.
    pub fn remove_watch(&self, w: Watchpoint) -> bool {
        let mut s = self.lock();
        let before = s.watches.len();
        s.watches.retain(|x| *x != w);
        s.watches.len() != before
    }

    /// The watchpoints.
    pub fn watches(&self) -> Vec<Watchpoint> {
        self.lock().watches.clone()
    }

    /// The watchpoint an access of `size` bytes at `addr` (a write if `write`) triggers,
    /// if any.
    pub fn watch_hit(&self, addr: u64, size: u64, write: bool) -> Option<Watchpoint> {
        self.lock()
            .watches
            .iter()
            .find(|w| w.caught(addr, size, write))
            .copied()
    }

    /// The guest ended while attached: the session reports it (an end by a VMM error is
    /// passed as a kill).
    pub fn guest_ended(&self, outcome: crate::sandbox::RunOutcome) {
        if !self.attached() {
            return;
        }
        self.lock().ended = Some(outcome);
        self.wake();
    }

    /// How the guest ended, if it did.
    pub fn ended(&self) -> Option<crate::sandbox::RunOutcome> {
        self.lock().ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_hold_the_thread_until_taken_and_wake_the_session() {
        let d = Debugger::new().expect("eventfd");
        d.report(7, Stop::Breakpoint);
        assert!(!d.held(7), "nothing is held without a session");
        d.attach();
        d.set_steps(BTreeMap::from([(7, 0x1000)]));
        assert_eq!(d.step_origin(7), Some(0x1000));
        d.report(7, Stop::DoneStep);
        assert!(d.held(7));
        assert_eq!(d.step_origin(7), None, "a reported step is over");
        assert_eq!(d.wake.read().expect("woken"), 1);
        let events = d.take_events();
        assert_eq!(
            events,
            vec![StopEvent {
                tid: 7,
                stop: Stop::DoneStep
            }]
        );
        assert!(!d.held(7));
        d.report(8, Stop::Breakpoint);
        d.detach();
        assert!(!d.held(8), "detaching releases every thread");
    }

    #[test]
    fn watchpoints_catch_accesses_of_their_kind_that_overlap_them() {
        let d = Debugger::new().expect("eventfd");
        let w = Watchpoint {
            addr: 0x5000,
            len: 8,
            kind: WatchKind::Write,
        };
        assert!(d.add_watch(w));
        assert!(!d.add_watch(w));
        assert_eq!(d.watch_hit(0x5004, 4, true), Some(w));
        assert_eq!(
            d.watch_hit(0x5004, 4, false),
            None,
            "a read of a write watch"
        );
        assert_eq!(d.watch_hit(0x5008, 8, true), None, "past its end");
        assert_eq!(
            d.watch_hit(0x4ff0, 32, true),
            Some(w),
            "a wide store over it"
        );
        assert_eq!(
            d.watch_hit(0x4ff8, 8, true),
            None,
            "the neighbour just before"
        );
        assert_eq!(d.watch_hit(0x4f00, 64, true), None);
        let r = Watchpoint {
            addr: 0x6000,
            len: 4,
            kind: WatchKind::Read,
        };
        d.add_watch(r);
        assert_eq!(d.watch_hit(0x6000, 1, false), Some(r));
        assert!(d.remove_watch(w));
        assert!(!d.remove_watch(w));
        assert_eq!(d.watch_hit(0x5004, 4, true), None);
    }
}
