//! The process's real-time interval timer (`setitimer(ITIMER_REAL)`, `alarm`): a host
//! thread, started on first use, that sleeps until the deadline and then sends SIGALRM to the
//! process like the kernel does.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::process::{self, Process};
use crate::signal::SigInfo;

/// Deadline and reload value of ITIMER_REAL.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Itimer {
    /// When it fires next (None: disarmed).
    pub deadline: Option<Instant>,
    /// Reload interval (zero: one-shot).
    pub interval: Duration,
}

/// The timer of one process.
#[derive(Debug, Default)]
pub struct RealTimer {
    /// Current setting (under the process lock).
    pub itimer: Itimer,
    /// Wakes the timer thread when the setting changes.
    cv: Arc<Condvar>,
    started: bool,
}

impl RealTimer {
    /// Arm (or disarm) the timer; returns the previous setting. `proc` is the process the
    /// thread will signal.
    pub fn set(&mut self, new: Itimer, proc: &Weak<Mutex<Process>>) -> Itimer {
        let old = std::mem::replace(&mut self.itimer, new);
        if new.deadline.is_some() && !self.started {
            let weak = proc.clone();
            let cv = self.cv.clone();
            let spawned = std::thread::Builder::new()
                .name("itimer".into())
                .spawn(move || timer_thread(&weak, &cv));
            self.started = spawned.is_ok();
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the interval timer thread");
            }
        }
        self.cv.notify_all();
        old
    }
}

fn timer_thread(proc: &Weak<Mutex<Process>>, cv: &Condvar) {
    loop {
        let Some(m) = proc.upgrade() else { return };
        let mut p = process::lock(&m);
        let now = Instant::now();
        match p.timer.itimer.deadline {
            Some(d) if d <= now => {
                let interval = p.timer.itimer.interval;
                p.timer.itimer.deadline = (!interval.is_zero()).then(|| d.max(now) + interval);
                // SI_KERNEL-like: a timer expiry, not a kill.
                p.post_signal(None, SigInfo::kernel(libc::SIGALRM));
            }
            // The guard comes back when the wait ends; dropping it releases the lock before the
            // next round takes it again.
            Some(d) => drop(cv.wait_timeout(p, d - now)),
            None => drop(cv.wait(p)),
        }
    }
}
