//! Interrupting a vCPU thread: a real-time host signal whose handler sets the thread's
//! `immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost, and which makes
//! a blocking host syscall return EINTR (the handler is installed without SA_RESTART).

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, Ordering};

/// The signal used for kicks.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

static HANDLER_INSTALLED: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_kick(_: libc::c_int) {
    // Async-signal-safe: one thread-local read and one byte store.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, registered by
        // `register_immediate_exit` and cleared before the mapping goes away.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Install the kick handler (once per process).
pub fn install() {
    if !HANDLER_INSTALLED.load(Ordering::SeqCst).is_null() {
        return;
    }
    // SAFETY: a plain handler without SA_RESTART; sigaction struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
    }
    HANDLER_INSTALLED.store(std::ptr::dangling_mut(), Ordering::SeqCst);
}

/// Register the calling thread's `immediate_exit` byte (null to unregister).
pub fn register_immediate_exit(p: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

/// A handle to interrupt one host thread.
#[derive(Debug, Clone, Copy)]
pub struct Kicker {
    thread: libc::pthread_t,
}

impl Kicker {
    /// The calling thread.
    pub fn current() -> Kicker {
        Kicker {
            // SAFETY: pthread_self cannot fail.
            thread: unsafe { libc::pthread_self() },
        }
    }

    /// Interrupt it.
    pub fn kick(&self) {
        // SAFETY: the thread is alive while it is registered in the process's thread table
        // (it removes itself under the process lock before exiting).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}

// SAFETY: a pthread_t is an opaque id, usable from any thread.
unsafe impl Send for Kicker {}
// SAFETY: as above.
unsafe impl Sync for Kicker {}
