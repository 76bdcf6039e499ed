//! The hang watchdog: a window open longer than its point's `hang_timeout_ms` is a hang.
//! The watchdog thread sleeps until the earliest deadline (woken when a window opens), then
//! rolls the sandbox back to that window with the hung thread returning its error value,
//! exactly as a crash would be rescued, but from outside the thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::checkpoint::world::{StopError, ThreadState};
use crate::checkpoint::{self, CheckpointError};
use crate::events::{self, RecoveryEvent};
use crate::process::{self, Process};
use crate::sandbox::Shared;
use crate::signal::SigInfo;

use super::spec::ErrorValue;
use super::Window;

/// How long the watchdog retries a rollback while other stops are under way.
const BUSY_RETRY: Duration = Duration::from_secs(10);

/// The watchdog's wake-up: a generation bumped whenever a window opens.
#[derive(Debug, Default)]
pub struct Watch {
    generation: Mutex<u64>,
    cv: Condvar,
    ended: AtomicBool,
}

impl Watch {
    /// The sandbox ended: the watchdog stops.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        self.cv.notify_all();
    }
}

/// A window opened (its deadline may be the next).
pub(crate) fn wake(shared: &Shared) {
    let mut g = shared
        .watch
        .generation
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *g += 1;
    shared.watch.cv.notify_all();
}

/// Start the watchdog thread of a sandbox.
pub(crate) fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("rescue-watchdog".into())
        .spawn(move || run(&shared))
        .map(|_| ())
}

fn run(shared: &Arc<Shared>) {
    loop {
        let seen = *shared
            .watch
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shared.watch.ended.load(Ordering::SeqCst) {
            return;
        }
        // While gdb holds the sandbox stopped no time passes for the guest: its session
        // postpones every deadline by the stop when it resumes, and wakes this thread.
        let next = if shared.debug.world_stopped() {
            None
        } else {
            process::lock(&shared.proc).rescue.next_deadline()
        };
        let now = Instant::now();
        let wait = match next {
            Some((tid, w)) if w.deadline.is_some_and(|d| d <= now) => {
                recover_hang(shared, tid, &w);
                continue;
            }
            Some((_, w)) => w.deadline.map(|d| d - now),
            None => None,
        };
        let g = shared
            .watch
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *g != seen {
            continue;
        }
        match wait {
            Some(t) => drop(shared.watch.cv.wait_timeout(g, t)),
            None => drop(shared.watch.cv.wait(g)),
        }
    }
}

/// The change a rescue makes to thread `tid`'s state in the window's checkpoint: return
/// `value` to the function's caller, as `ret` would.
pub(crate) fn error_return(
    tid: i32,
    window: &Window,
    value: ErrorValue,
) -> impl FnMut(i32, &mut ThreadState) {
    let (return_to, sp) = (window.return_to, window.entry_rsp.wrapping_add(8));
    move |t, st| {
        if t != tid {
            return;
        }
        st.cpu.regs.rip = return_to;
        st.cpu.regs.rsp = sp;
        if let ErrorValue::Int(v) = value {
            st.cpu.regs.rax = v as u64;
        }
        st.interrupted_syscall = None;
        st.stopped_call = None;
    }
}

/// Window `w` of thread `tid` passed its deadline: roll back and return the error value.
fn recover_hang(shared: &Arc<Shared>, tid: i32, w: &Window) {
    let t0 = Instant::now();
    let (value, name, max, timeout) = {
        let mut p = process::lock(&shared.proc);
        let Some((value, name, max)) = p.rescue.point_info(w.point) else {
            return;
        };
        let timeout = w
            .deadline
            .map_or(0, |d| d.duration_since(w.opened).as_millis());
        if !p.rescue.admit_recovery(w.point, t0, true) {
            // Quarantined: the thread hangs on, as it would without assure-vmm; its window
            // closes so nothing is held for it.
            let crash = hang_description(&p, tid, None, timeout);
            drop(p);
            shared
                .events()
                .quarantine(&events::QuarantineEvent::new(crash, name, max));
            checkpoint::close_windows(shared, tid, &[w.checkpoint], false, false).ok();
            return;
        }
        (value, name, max, timeout)
    };
    let _ = max;
    let mut crash = None;
    let mut adjust = error_return(tid, w, value);
    let outcome = loop {
        let mut observe = |p: &Process, states: &BTreeMap<i32, ThreadState>| {
            crash = Some(hang_description(p, tid, states.get(&tid), timeout));
        };
        match checkpoint::rollback_as(
            shared,
            Some(w.checkpoint),
            false,
            None,
            &mut adjust,
            &mut observe,
        ) {
            Err(CheckpointError::Stop(StopError::Busy)) if t0.elapsed() < BUSY_RETRY => {
                std::thread::sleep(Duration::from_micros(200));
            }
            other => break other,
        }
    };
    let report = match outcome {
        Ok((r, _)) => r,
        Err(e) => {
            // The window closed meanwhile (returned or rolled back), or the sandbox could
            // not be stopped: it is not watched any more.
            tracing::warn!(tid, checkpoint = w.checkpoint, error = %e, "hang recovery not done");
            process::lock(&shared.proc)
                .rescue
                .clear_deadline(tid, w.checkpoint);
            return;
        }
    };
    // The function returned its error value: its window closes.
    checkpoint::close_windows(shared, tid, &[w.checkpoint], false, false).ok();
    let Some(crash) = crash else { return };
    shared.events().recovery(&RecoveryEvent {
        crash,
        rescue_point: name,
        checkpoint: w.checkpoint,
        error_value: value.to_json(),
        restored_pages: report.restored_pages,
        rollback_us: report.timing_us.total,
        recovery_us: t0.elapsed().as_secs_f64() * 1e6,
    });
}

fn hang_description(
    p: &Process,
    tid: i32,
    state: Option<&ThreadState>,
    timeout_ms: u128,
) -> events::CrashEvent {
    let info = SigInfo {
        signo: 0,
        code: 0,
        addr: 0,
        pid: 0,
        uid: 0,
        trapno: 0,
        err: 0,
    };
    let regs = state.map(|s| s.cpu.regs).unwrap_or_default();
    let mut e = crate::runner::describe_crash(
        p,
        tid,
        &info,
        &regs,
        &format!("hang (window open longer than {timeout_ms} ms)"),
        None,
    );
    e.signal_name = "none".into();
    e
}

/// A thread ended: its windows close (their checkpoints are released).
pub(crate) fn thread_gone(shared: &Shared, tid: i32) {
    let ids = process::lock(&shared.proc).rescue.window_ids(tid);
    checkpoint::close_windows(shared, tid, &ids, false, false).ok();
}
