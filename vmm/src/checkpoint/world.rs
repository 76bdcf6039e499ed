//! Stopping every guest thread at a consistent point.
//!
//! A thread blocked in a wait that has no effect until it returns (a futex wait, a sleep,
//! `epoll_wait`, `poll`, `select`, `pause`) is already at a consistent point: it registers
//! itself as *waiting*, with its registers as they were at the syscall (rewound to issue the
//! call again), before it blocks. A stop counts it as stopped without waking it (waking an
//! idle thread costs as much as the whole checkpoint); it read its own XSAVE image before
//! it began to wait (once checkpoints are in use). If its wait ends during the stop, it
//! waits for the resume before touching any state; if a rollback gives it an order, it is
//! woken, drops its call's result and carries out the order.
//!
//! A coordinator (the thread serving the control socket) asks for a stop; every vCPU thread
//! is kicked out of `KVM_RUN`, out of a blocking host call (which then returns EINTR, and
//! the runner re-issues the guest's syscall after the stop instead of returning EINTR to
//! it) or out of a futex or signal wait. Each runner parks at the top of its loop, where
//! the guest state is complete (no syscall half done, no lock held), and deposits its CPU
//! state. When all live runners are parked, the coordinator owns the sandbox: it may read
//! and rewrite memory and process state, and give each parked runner an order (continue,
//! load this state, or exit). Runners apply their orders on their own threads, acknowledge,
//! and run on when the coordinator resumes the world.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::process::{self, Process, Thread};
use crate::vcpu::CpuState;

/// How long a stop may take before it is abandoned (a thread that never parks is a bug, but
/// it must not hang the operator's console).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often threads that have not parked yet are kicked again (a kick that lands between
/// a runner's check and its blocking call is lost).
const REKICK: Duration = Duration::from_millis(2);
/// How long the coordinator watches for the last thread to park before it sleeps: parking
/// takes tens of microseconds, and a sleeping coordinator takes about as long again to be
/// woken. Bounded, and only while a stop is in progress.
const SPIN: Duration = Duration::from_micros(300);

/// Errors of a stop.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// Another stop is in progress.
    #[error("the sandbox is already stopped by another request")]
    Busy,
    /// The guest ended while it was being stopped.
    #[error("the guest ended")]
    Ended,
    /// Some thread did not reach a stopping point.
    #[error("threads {0:?} did not stop within {STOP_TIMEOUT:?}")]
    Timeout(Vec<i32>),
}

/// A parked thread's complete state.
#[derive(Debug, Clone)]
pub struct ThreadState {
    /// Its vCPU's registers.
    pub cpu: CpuState,
    /// Its kernel-side state.
    pub thread: Thread,
    /// The syscall that last returned EINTR (for SA_RESTART).
    pub interrupted_syscall: Option<(u64, u64)>,
    /// A call stopped at its boundary: (syscall instruction address, number, absolute end
    /// of its timeout), so that its re-issue waits only for what was left.
    pub stopped_call: Option<(u64, u64, std::time::Instant)>,
}

/// What a parked runner does when the world resumes.
#[derive(Debug)]
pub enum Order {
    /// Take this thread state; load its registers into the vCPU if `load_cpu` (they differ
    /// from what the vCPU holds); report the vCPU state read back from KVM if `verify`.
    Restore {
        /// The state.
        state: Box<ThreadState>,
        /// Load the registers.
        load_cpu: bool,
        /// Read them back.
        verify: bool,
    },
    /// End (its thread does not exist in the restored state).
    Exit,
}

/// What a runner reports after carrying out an order.
#[derive(Debug)]
pub enum Ack {
    /// Done; with the state now loaded in its vCPU, read back from KVM, if asked.
    Restored(Option<Box<CpuState>>),
    /// Loading failed.
    Failed(String),
    /// It is exiting.
    Exiting,
}

/// A thread blocked in a wait, as a stop sees it.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// General registers at the syscall, rewound to issue it again.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// Kernel-side thread state at the syscall.
    pub thread: Thread,
    /// As in [`ThreadState`].
    pub interrupted_syscall: Option<(u64, u64)>,
    /// As in [`ThreadState`].
    pub stopped_call: Option<(u64, u64, Instant)>,
    /// Its XSAVE image, read by the thread itself before it waits. (Read through the vCPU
    /// fd from another thread, KVM on this host returns a stale image: measured, it made
    /// restored threads crash.)
    pub xsave: std::sync::Arc<kvm_bindings::kvm_xsave>,
    /// How to wake it: its futex waiter, if it waits on one...
    pub waiter: Option<std::sync::Arc<crate::futex::Waiter>>,
    /// ...and its host thread.
    pub kicker: crate::kick::Kicker,
}

/// How a wait ended, as [`World::leave_wait`] reports it.
#[derive(Debug, Default)]
pub struct LeftWait {
    /// A stop happened during the wait (an EINTR from it is not the guest's).
    pub stopped: bool,
    /// A rollback's order for this thread: drop the call's result, carry it out, then call
    /// [`World::ack_and_wait`].
    pub order: Option<Order>,
    /// The stop that gave the order.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct WorldState {
    stopping: bool,
    /// Counts stops, so a thread waiting for the end of one is not caught by the next.
    generation: u64,
    runners: usize,
    parked: BTreeMap<i32, ThreadState>,
    waiting: BTreeMap<i32, Waiting>,
    orders: BTreeMap<i32, Order>,
    acks: BTreeMap<i32, Ack>,
    /// Waiting threads that took an order and have not acknowledged it yet.
    acks_pending: std::collections::BTreeSet<i32>,
    ended: bool,
}

/// The stop/resume rendezvous of one sandbox's vCPU threads.
#[derive(Debug, Default)]
pub struct World {
    stop_flag: AtomicBool,
    armed: AtomicBool,
    /// Runners parked minus runners live (under the state lock; read without it to spin).
    missing: std::sync::atomic::AtomicIsize,
    state: Mutex<WorldState>,
    cv: Condvar,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, WorldState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checkpoints are in use: threads about to wait register themselves (which costs
    /// them one ioctl per wait, so not before the first checkpoint).
    pub fn arm(&self) {
        self.armed.store(true, Ordering::Release);
    }

    /// See [`World::arm`].
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Is a stop requested? (Cheap: checked by every runner on every loop.)
    pub fn stop_requested(&self) -> bool {
        self.stop_flag.load(Ordering::Acquire)
    }

    /// A runner thread is starting (call before it can park).
    pub fn runner_started(&self) {
        let mut s = self.lock();
        s.runners += 1;
        self.update_missing(&s);
    }

    fn update_missing(&self, s: &WorldState) {
        self.missing.store(
            s.runners as isize - s.parked.len() as isize - s.waiting.len() as isize,
            Ordering::Release,
        );
    }

    fn stopped_count(s: &WorldState) -> usize {
        s.parked.len() + s.waiting.len()
    }

    /// The calling runner (thread `tid`) is about to block in a wait described by `w`.
    pub fn enter_wait(&self, tid: i32, w: Waiting) {
        let mut s = self.lock();
        s.waiting.insert(tid, w);
        self.update_missing(&s);
        drop(s);
        self.cv.notify_all();
    }

    /// The wait of thread `tid` ended. During a stop this waits for the resume, unless a
    /// rollback gives the thread an order, which is returned at once (the thread carries
    /// it out and calls [`World::ack_and_wait`]). Call without the process lock.
    pub fn leave_wait(&self, tid: i32) -> LeftWait {
        let mut s = self.lock();
        let mut left = LeftWait::default();
        loop {
            if let Some(order) = s.orders.remove(&tid) {
                left.stopped = true;
                left.order = Some(order);
                left.generation = s.generation;
                break;
            }
            if !s.stopping {
                break;
            }
            left.stopped = true;
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting.remove(&tid);
        if left.order.is_some() {
            // Counted as stopped until it acknowledges (it runs no guest code meanwhile).
            s.acks_pending.insert(tid);
        }
        self.update_missing(&s);
        left
    }

    /// After carrying out an order taken from [`World::leave_wait`] in stop `generation`:
    /// report it, and wait for the end of that stop (unless the order was to exit). If the
    /// next stop has begun meanwhile, the thread parks for it at the top of its loop.
    pub fn ack_and_wait(&self, tid: i32, ack: Ack, generation: u64) {
        let exiting = matches!(ack, Ack::Exiting);
        let mut s = self.lock();
        s.acks_pending.remove(&tid);
        s.acks.insert(tid, ack);
        self.cv.notify_all();
        while s.stopping && s.generation == generation && !exiting {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Keep the calling runner out of the guest while `held()` is true and no stop is in
    /// progress (a thread that reported a debugger event waits here for the debugger's
    /// stop, then parks for it). Whoever makes `held()` false calls [`World::notify`].
    pub fn hold_until_stop(&self, held: &dyn Fn() -> bool) {
        let mut s = self.lock();
        while !s.stopping && !s.ended && held() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wake threads waiting in [`World::hold_until_stop`] to look again.
    pub fn notify(&self) {
        let _s = self.lock();
        self.cv.notify_all();
    }

    /// A runner thread has ended.
    pub fn runner_ended(&self) {
        let mut s = self.lock();
        s.runners = s.runners.saturating_sub(1);
        self.update_missing(&s);
        drop(s);
        self.cv.notify_all();
    }

    /// The guest ended: a stop in progress gives up.
    pub fn guest_ended(&self) {
        self.lock().ended = true;
        self.cv.notify_all();
    }

    /// Park the calling runner (thread `tid`) with `state` until the world resumes; returns
    /// its order, if any. `apply` carries out an order on the runner's thread and returns
    /// the acknowledgement.
    pub fn park(
        &self,
        tid: i32,
        state: ThreadState,
        apply: &mut dyn FnMut(&Order) -> Ack,
    ) -> Option<Order> {
        let mut s = self.lock();
        s.parked.insert(tid, state);
        self.update_missing(&s);
        self.cv.notify_all();
        let mut taken = None;
        loop {
            if let Some(order) = s.orders.remove(&tid) {
                drop(s);
                let ack = apply(&order);
                s = self.lock();
                let exiting = matches!(order, Order::Exit);
                if let Order::Restore { state, .. } = &order {
                    // Still parked, now with the loaded state: the next stop may begin
                    // before this thread wakes, and must see what its vCPU holds.
                    s.parked.insert(tid, (**state).clone());
                }
                s.acks.insert(tid, ack);
                self.cv.notify_all();
                taken = Some(order);
                if exiting {
                    break;
                }
                continue;
            }
            if !s.stopping {
                break;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked.remove(&tid);
        self.update_missing(&s);
        taken
    }

    /// Stop every runner of `proc`. On success the caller owns the sandbox until it calls
    /// [`Stopped::resume`].
    pub fn stop<'a>(&'a self, proc: &std::sync::Mutex<Process>) -> Result<Stopped<'a>, StopError> {
        self.stop_as(proc, None)
    }

    /// [`World::stop`], called by a runner itself (a thread at a rescue point or crashing in
    /// one): `me` is its thread id and complete state, counted as parked for the stop. Its
    /// orders are not executed by [`Stopped::execute`]: the caller applies them itself.
    pub fn stop_as<'a>(
        &'a self,
        proc: &std::sync::Mutex<Process>,
        me: Option<(i32, ThreadState)>,
    ) -> Result<Stopped<'a>, StopError> {
        let started = Instant::now();
        let me_tid = me.as_ref().map(|(t, _)| *t);
        {
            let mut s = self.lock();
            if s.stopping {
                return Err(StopError::Busy);
            }
            if s.ended {
                return Err(StopError::Ended);
            }
            s.stopping = true;
            s.generation += 1;
            s.acks.clear();
            s.orders.clear();
            if let Some((tid, state)) = me {
                s.parked.insert(tid, state);
                self.update_missing(&s);
            }
        }
        self.stop_flag.store(true, Ordering::Release);
        // Runners held by a debugger ([`World::hold_until_stop`]) wait for this.
        self.cv.notify_all();
        loop {
            let not_parked: Vec<i32> = {
                let s = self.lock();
                if s.ended {
                    drop(s);
                    self.unpark_caller(me_tid);
                    self.finish_resume();
                    return Err(StopError::Ended);
                }
                if Self::stopped_count(&s) >= s.runners {
                    break;
                }
                let parked: Vec<i32> = s.parked.keys().chain(s.waiting.keys()).copied().collect();
                drop(s);
                let p = process::lock(proc);
                p.threads
                    .keys()
                    .copied()
                    .filter(|t| !parked.contains(t))
                    .collect()
            };
            {
                let p = process::lock(proc);
                for tid in &not_parked {
                    if let Some(th) = p.threads.get(tid) {
                        if let Some(w) = &th.waiting {
                            w.interrupt();
                        }
                        if let Some(k) = &th.kicker {
                            k.kick();
                        }
                    }
                }
            }
            if started.elapsed() > STOP_TIMEOUT {
                self.unpark_caller(me_tid);
                self.finish_resume();
                return Err(StopError::Timeout(not_parked));
            }
            let spin_until = Instant::now() + SPIN;
            while self.missing.load(Ordering::Acquire) > 0 && Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            let s = self.lock();
            if Self::stopped_count(&s) < s.runners && !s.ended {
                drop(self.cv.wait_timeout(s, REKICK));
            }
        }
        Ok(Stopped {
            world: self,
            stop_us: started.elapsed().as_secs_f64() * 1e6,
            caller: me_tid,
        })
    }

    fn unpark_caller(&self, tid: Option<i32>) {
        if let Some(tid) = tid {
            let mut s = self.lock();
            s.parked.remove(&tid);
            self.update_missing(&s);
        }
    }

    fn finish_resume(&self) {
        let mut s = self.lock();
        s.stopping = false;
        s.orders.clear();
        self.stop_flag.store(false, Ordering::Release);
        drop(s);
        self.cv.notify_all();
    }
}

/// The world, stopped. Dropping it resumes the world (without orders).
#[derive(Debug)]
pub struct Stopped<'a> {
    world: &'a World,
    /// Microseconds it took to stop.
    pub stop_us: f64,
    /// The runner that stopped the world itself ([`World::stop_as`]).
    caller: Option<i32>,
}

impl Stopped<'_> {
    /// Every stopped thread's state, by tid.
    pub fn threads(&self) -> Result<BTreeMap<i32, ThreadState>, crate::vcpu::VcpuError> {
        let s = self.world.lock();
        let mut out = s.parked.clone();
        for (tid, w) in &s.waiting {
            let cpu = crate::vcpu::CpuState::waiting(&w.regs, &w.sregs, &w.xsave);
            out.insert(
                *tid,
                ThreadState {
                    cpu,
                    thread: w.thread.clone(),
                    interrupted_syscall: w.interrupted_syscall,
                    stopped_call: w.stopped_call,
                },
            );
        }
        Ok(out)
    }

    /// Give parked runners their orders and wait until each has acknowledged. An order
    /// for the calling runner ([`World::stop_as`]) is not given: the caller applies it.
    pub fn execute(&self, mut orders: BTreeMap<i32, Order>) -> BTreeMap<i32, Ack> {
        if let Some(me) = self.caller {
            orders.remove(&me);
        }
        let want: Vec<i32> = orders.keys().copied().collect();
        let mut s = self.world.lock();
        s.acks.clear();
        s.orders = orders;
        // Waiting threads are woken to take their orders.
        for tid in &want {
            if let Some(w) = s.waiting.get(tid) {
                if let Some(waiter) = &w.waiter {
                    waiter.interrupt();
                }
                w.kicker.kick();
            }
        }
        self.world.cv.notify_all();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut next_kick = Instant::now() + REKICK;
        while !want.iter().all(|t| s.acks.contains_key(t)) {
            let now = Instant::now();
            if now >= deadline || s.ended {
                break;
            }
            if now >= next_kick {
                // A kick that landed before the blocking call began is lost: again.
                for tid in &want {
                    if let Some(w) = s.waiting.get(tid) {
                        if let Some(waiter) = &w.waiter {
                            waiter.interrupt();
                        }
                        w.kicker.kick();
                    }
                }
                next_kick = now + REKICK;
            }
            s = self
                .world
                .cv
                .wait_timeout(s, REKICK.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut s.acks)
    }

    /// Let every runner go on.
    pub fn resume(self) {}
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.world.unpark_caller(self.caller);
        self.world.finish_resume();
    }
}
