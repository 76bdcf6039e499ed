//! Futexes of one guest process. Waiters sleep on a condition variable tied to the process
//! lock, so the value check, the queueing and the wake-up are all serialized by that lock
//! and no wake-up can be lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar};

/// One thread waiting on a futex word.
#[derive(Debug)]
pub struct Waiter {
    /// Guest thread id.
    pub tid: i32,
    /// FUTEX_BITSET mask.
    pub bitset: u32,
    /// Set by a wake (under the process lock).
    pub woken: AtomicBool,
    /// Set when a signal must interrupt the wait.
    pub interrupted: AtomicBool,
    /// Notified on wake and on interrupt.
    pub cv: Condvar,
}

impl Waiter {
    /// A waiter for `tid` with `bitset`.
    pub fn new(tid: i32, bitset: u32) -> Arc<Waiter> {
        Arc::new(Waiter {
            tid,
            bitset,
            woken: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            cv: Condvar::new(),
        })
    }

    /// Interrupt the wait (a signal arrived).
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// Waiters by guest virtual address of the futex word.
#[derive(Debug, Default)]
pub struct FutexTable {
    queues: HashMap<u64, VecDeque<Arc<Waiter>>>,
}

impl FutexTable {
    /// Queue `w` on `addr`.
    pub fn enqueue(&mut self, addr: u64, w: Arc<Waiter>) {
        self.queues.entry(addr).or_default().push_back(w);
    }

    /// Remove `w` from `addr`'s queue (after a timeout or an interruption).
    pub fn remove(&mut self, addr: u64, w: &Arc<Waiter>) {
        if let Some(q) = self.queues.get_mut(&addr) {
            q.retain(|x| !Arc::ptr_eq(x, w));
            if q.is_empty() {
                self.queues.remove(&addr);
            }
        }
    }

    /// Wake up to `n` waiters on `addr` whose bitset intersects `bitset`.
    pub fn wake(&mut self, addr: u64, n: u32, bitset: u32) -> u32 {
        let Some(q) = self.queues.get_mut(&addr) else {
            return 0;
        };
        let mut woken = 0;
        q.retain(|w| {
            if woken < n && w.bitset & bitset != 0 {
                w.woken.store(true, Ordering::SeqCst);
                w.cv.notify_all();
                woken += 1;
                false
            } else {
                true
            }
        });
        if q.is_empty() {
            self.queues.remove(&addr);
        }
        woken
    }

    /// Wake up to `n_wake` waiters on `from` and move up to `n_move` of the rest to `to`.
    pub fn requeue(&mut self, from: u64, to: u64, n_wake: u32, n_move: u32) -> u32 {
        let woken = self.wake(from, n_wake, u32::MAX);
        let mut moved = Vec::new();
        if let Some(q) = self.queues.get_mut(&from) {
            while moved.len() < n_move as usize {
                match q.pop_front() {
                    Some(w) => moved.push(w),
                    None => break,
                }
            }
            if q.is_empty() {
                self.queues.remove(&from);
            }
        }
        let n = moved.len() as u32;
        for w in moved {
            self.enqueue(to, w);
        }
        woken + n
    }

    /// Number of waiters on `addr`.
    pub fn waiters(&self, addr: u64) -> usize {
        self.queues.get(&addr).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_respects_count_and_bitset() {
        let mut t = FutexTable::default();
        let a = Waiter::new(1, 0b01);
        let b = Waiter::new(2, 0b10);
        let c = Waiter::new(3, u32::MAX);
        t.enqueue(0x1000, a.clone());
        t.enqueue(0x1000, b.clone());
        t.enqueue(0x1000, c.clone());
        assert_eq!(t.wake(0x1000, 1, 0b10), 1);
        assert!(b.woken.load(Ordering::SeqCst) && !a.woken.load(Ordering::SeqCst));
        assert_eq!(t.wake(0x1000, 10, u32::MAX), 2);
        assert_eq!(t.waiters(0x1000), 0);
        assert_eq!(t.wake(0x2000, 1, u32::MAX), 0);
    }

    #[test]
    fn requeue_moves_the_rest() {
        let mut t = FutexTable::default();
        for tid in 0..4 {
            t.enqueue(0x10, Waiter::new(tid, u32::MAX));
        }
        assert_eq!(t.requeue(0x10, 0x20, 1, 2), 3);
        assert_eq!(t.waiters(0x10), 1);
        assert_eq!(t.waiters(0x20), 2);
        let w = Waiter::new(9, u32::MAX);
        t.enqueue(0x30, w.clone());
        t.remove(0x30, &w);
        assert_eq!(t.waiters(0x30), 0);
    }
}
