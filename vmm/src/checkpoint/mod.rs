//! Checkpoint and rollback of a whole running sandbox.
//!
//! A checkpoint is three things taken while every guest thread is stopped at a consistent
//! point ([`world`]): guest memory, incrementally ([`memory`]); every thread's vCPU state
//! and kernel-side thread state; and the process's kernel-side state kept by the VMM (memory
//! map, fds, epoll interest sets, signal state, timers: [`crate::process::ProcessCheckpoint`]).
//! Checkpoints form a stack: any live one can be rolled back to (newer ones are dropped) or
//! released (its undo log merges into the next older one).
//!
//! Host effects that cannot be undone are deferred while a checkpoint is live: a closed fd
//! stays open on the host as long as a checkpoint holds it, and really closes when the last
//! checkpoint that holds it is released. Connections accepted since a checkpoint are closed
//! by a rollback to it.

pub mod memory;
pub mod world;

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::process::{self, Process, ProcessCheckpoint};
use crate::runner::Runner;
use crate::sandbox::Shared;
use crate::vcpu::{CpuState, Vcpu};
use memory::MemoryCheckpoints;
use world::{Ack, Order, StopError, ThreadState};

/// Most checkpoints live at once.
pub const MAX_LIVE: usize = 64;

/// Errors of checkpoint operations (answered to the operator; the sandbox goes on).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Threads could not be stopped.
    #[error(transparent)]
    Stop(#[from] StopError),
    /// The memory engine failed.
    #[error(transparent)]
    Memory(#[from] memory::MemoryCheckpointError),
    /// No such checkpoint.
    #[error("no live checkpoint {0}")]
    NoSuchCheckpoint(u64),
    /// There is nothing to roll back to.
    #[error("no live checkpoint to roll back to")]
    NothingLive,
    /// Too many live checkpoints.
    #[error("{MAX_LIVE} checkpoints are live: release one first")]
    TooMany,
    /// A vCPU could not be read or loaded.
    #[error("vCPU state: {0}")]
    Cpu(String),
    /// A forked child's sandbox has no checkpoint engine of its own.
    #[error("checkpoints are not available in a forked child")]
    ForkedChild,
    /// The operator may not release a checkpoint an open rescue window owns.
    #[error(
        "checkpoint {0} belongs to an open rescue window (released when its function returns)"
    )]
    OwnedByWindow(u64),
}

/// Times of one operation, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    /// Stopping every thread (kick, park, CPU state capture).
    pub stop: f64,
    /// Reading KVM's dirty log and the VMM's own write record.
    pub dirty_log: f64,
    /// The memory part (dirty log included).
    pub memory: f64,
    /// Thread states: taken (checkpoint) or loaded and acknowledged (rollback).
    pub cpu: f64,
    /// The VMM-side process state.
    pub vmm: f64,
    /// Letting the threads go on.
    pub resume: f64,
    /// The whole operation.
    pub total: f64,
}

/// Answer to `checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointReport {
    /// Its id.
    pub id: u64,
    /// Pages written since the previous checkpoint.
    pub dirty_pages: u64,
    /// Threads captured.
    pub threads: usize,
    /// Digest of the captured state, if asked for.
    pub digest: Option<String>,
    /// What a rollback to it cannot put back (AF_UNIX sockets, pipes to the outside...).
    pub not_kept: Vec<String>,
    /// Times.
    pub timing_us: Timing,
}

/// Answer to `rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RollbackReport {
    /// The checkpoint now in force.
    pub id: u64,
    /// Pages written back.
    pub restored_pages: u64,
    /// Threads after the rollback.
    pub threads: usize,
    /// Threads that existed only after the checkpoint and were ended.
    pub threads_ended: usize,
    /// Threads that had exited since and were started again.
    pub threads_revived: usize,
    /// Shadow-MMU invalidations for page tables that changed.
    pub invalidations: u64,
    /// Digest of the restored state (computed before the guest runs), if asked for.
    pub digest: Option<String>,
    /// Times.
    pub timing_us: Timing,
}

/// Answer to `digest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DigestReport {
    /// The digest.
    pub digest: String,
    /// Threads included.
    pub threads: usize,
}

/// One live checkpoint, in `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LiveCheckpoint {
    /// Id.
    pub id: u64,
    /// Seconds since it was taken.
    pub age_seconds: f64,
    /// Bytes of its undo log.
    pub undo_bytes: u64,
    /// Threads it holds.
    pub threads: usize,
}

/// The `checkpoints` part of `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckpointStatus {
    /// Live checkpoints, oldest first.
    pub live: Vec<LiveCheckpoint>,
    /// Bytes of the mirror holding data.
    pub mirror_bytes: u64,
    /// Bytes in all undo logs.
    pub undo_bytes: u64,
    /// Bytes of page buffers kept for reuse.
    pub pool_bytes: u64,
    /// Bound on the undo logs.
    pub limit_bytes: u64,
    /// Most live checkpoints.
    pub max_live: usize,
    /// Checkpoints taken.
    pub taken: u64,
    /// Rollbacks done.
    pub rollbacks: u64,
    /// Checkpoints released.
    pub releases: u64,
}

#[derive(Debug)]
struct Checkpoint {
    id: u64,
    /// A rescue window's checkpoint: output is held and input journaled while it lives.
    window: bool,
    /// The rescue windows open when it was taken (its own included): a rollback to it
    /// opens them again, since their functions run again.
    windows: crate::rescue::WindowsSnapshot,
    taken_at: Instant,
    process: ProcessCheckpoint,
    threads: BTreeMap<i32, ThreadState>,
    /// vCPUs created when it was taken (their supervisor blocks exist in its memory).
    vcpus: u64,
}

/// The checkpoints of one sandbox.
#[derive(Debug, Default)]
pub struct Checkpoints {
    memory: Option<MemoryCheckpoints>,
    live: Vec<Checkpoint>,
    /// Window checkpoints whose function returned, kept while a newer live checkpoint
    /// holds that window open (a rollback to it would run the function again).
    closed: std::collections::BTreeSet<u64>,
    next_id: u64,
    taken: u64,
    rollbacks: u64,
    releases: u64,
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

impl Checkpoints {
    /// What `status` reports.
    pub fn status(&self) -> CheckpointStatus {
        let usage = self
            .memory
            .as_ref()
            .map(MemoryCheckpoints::usage)
            .unwrap_or_default();
        CheckpointStatus {
            live: self
                .live
                .iter()
                .enumerate()
                .map(|(i, c)| LiveCheckpoint {
                    id: c.id,
                    age_seconds: c.taken_at.elapsed().as_secs_f64(),
                    undo_bytes: self.memory.as_ref().map_or(0, |m| m.level_bytes(i)),
                    threads: c.threads.len(),
                })
                .collect(),
            mirror_bytes: usage.mirror_bytes,
            undo_bytes: usage.undo_bytes,
            pool_bytes: usage.pool_bytes,
            limit_bytes: usage.limit_bytes,
            max_live: MAX_LIVE,
            taken: self.taken,
            rollbacks: self.rollbacks,
            releases: self.releases,
        }
    }

    fn index_of(&self, id: u64) -> Result<usize, CheckpointError> {
        self.live
            .iter()
            .position(|c| c.id == id)
            .ok_or(CheckpointError::NoSuchCheckpoint(id))
    }
}

/// Digest of a stopped sandbox: all guest memory in use, every thread's registers and the
/// VMM-side memory map, break and fd numbers.
fn digest(p: &Process, threads: &BTreeMap<i32, CpuState>) -> String {
    let mut h = twox_hash::XxHash3_64::with_seed(0);
    let ram = p.mm.ram();
    let frames = ram.high_water() / crate::memory::PAGE_SIZE;
    let mut page = vec![0u8; crate::memory::PAGE_SIZE as usize];
    for i in 0..frames {
        ram.read_phys(i * crate::memory::PAGE_SIZE, &mut page);
        h.write(&page);
    }
    for (tid, cpu) in threads {
        h.write(&tid.to_le_bytes());
        h.write(&cpu.digest_bytes());
    }
    for v in p.mm.vmas() {
        h.write(&v.start.to_le_bytes());
        h.write(&v.end.to_le_bytes());
        h.write(format!("{:?}", v.prot).as_bytes());
    }
    h.write(&p.mm.current_brk().to_le_bytes());
    for (fd, slot) in p.fds.iter() {
        h.write(&fd.to_le_bytes());
        h.write(&[u8::from(slot.cloexec)]);
    }
    format!("{:016x}", h.finish())
}

fn engine(shared: &Shared) -> std::sync::MutexGuard<'_, Checkpoints> {
    shared.checkpoints.lock().unwrap_or_else(|e| e.into_inner())
}

/// The engine for a runner: it must never block on the engine while a stop holding it
/// waits for that runner to park, so it only tries (and parks or retries on `Busy`).
fn engine_for(
    shared: &Shared,
    runner: bool,
) -> Result<std::sync::MutexGuard<'_, Checkpoints>, CheckpointError> {
    if !runner {
        return Ok(engine(shared));
    }
    match shared.checkpoints.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Ok(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Err(StopError::Busy.into()),
    }
}

fn refuse_in_child(shared: &Shared) -> Result<(), CheckpointError> {
    if shared.forked_child.load(Ordering::SeqCst) {
        return Err(CheckpointError::ForkedChild);
    }
    Ok(())
}

/// Take a checkpoint of the running sandbox.
pub(crate) fn checkpoint(
    shared: &Shared,
    want_digest: bool,
) -> Result<CheckpointReport, CheckpointError> {
    checkpoint_as(shared, want_digest, None, None)
}

/// [`checkpoint`], taken by a runner itself (`me`: its thread id and state, see
/// [`world::World::stop_as`]); `window`: the rescue window of thread `me` it opens (its
/// checkpoint id is filled in): output is held and input journaled while it lives.
pub(crate) fn checkpoint_as(
    shared: &Shared,
    want_digest: bool,
    me: Option<(i32, ThreadState)>,
    window: Option<crate::rescue::Window>,
) -> Result<CheckpointReport, CheckpointError> {
    let caller = me.as_ref().map(|(t, _)| *t);
    refuse_in_child(shared)?;
    let t0 = Instant::now();
    shared.world.arm();
    let mut engine = engine_for(shared, me.is_some())?;
    if engine.live.len() >= MAX_LIVE {
        return Err(CheckpointError::TooMany);
    }
    let stopped = shared.world.stop_as(&shared.proc, me)?;
    let stop_us = stopped.stop_us;
    let t_cpu = Instant::now();
    let threads = stopped
        .threads()
        .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
    let cpu_us = us(t_cpu);
    let mut p = process::lock(&shared.proc);
    let vm = shared.vm.lock().unwrap_or_else(|e| e.into_inner());
    if engine.memory.is_none() {
        // The undo logs may hold at most as much as guest memory.
        engine.memory = Some(MemoryCheckpoints::new(p.mm.ram(), p.mm.ram().size())?);
    }
    let Some(mem) = engine.memory.as_mut() else {
        unreachable!("created above")
    };
    let work = mem.checkpoint(&vm.vm, p.mm.ram_mut())?;
    drop(vm);
    let t_vmm = Instant::now();
    let process = p.checkpoint();
    p.fs.removals.set_active(true);
    let vmm_us = us(t_vmm);
    let cpus: BTreeMap<i32, CpuState> = threads.iter().map(|(t, s)| (*t, s.cpu.clone())).collect();
    let digest = want_digest.then(|| digest(&p, &cpus));
    engine.next_id += 1;
    engine.taken += 1;
    let id = engine.next_id;
    let is_window = window.is_some();
    if let (Some(mut w), Some(tid)) = (window, caller) {
        w.checkpoint = id;
        p.rescue.push_window(tid, w);
        p.fds.journal_open(id);
    }
    let windows = p.rescue.windows_snapshot();
    drop(p);
    let n_threads = threads.len();
    let not_kept = process.not_kept().to_vec();
    engine.live.push(Checkpoint {
        id,
        window: is_window,
        windows,
        taken_at: Instant::now(),
        process,
        threads,
        vcpus: shared.next_vcpu_id.load(Ordering::SeqCst),
    });
    let t_resume = Instant::now();
    stopped.resume();
    let resume_us = us(t_resume);
    Ok(CheckpointReport {
        id,
        dirty_pages: work.dirty_pages,
        threads: n_threads,
        digest,
        not_kept,
        timing_us: Timing {
            stop: stop_us,
            dirty_log: work.dirty_log_us,
            memory: work.total_us,
            cpu: cpu_us,
            vmm: vmm_us,
            resume: resume_us,
            total: us(t0),
        },
    })
}

/// Roll the sandbox back to checkpoint `id` (the newest if `None`).
pub(crate) fn rollback(
    shared: &std::sync::Arc<Shared>,
    id: Option<u64>,
    want_digest: bool,
) -> Result<RollbackReport, CheckpointError> {
    rollback_as(
        shared,
        id,
        want_digest,
        None,
        &mut |_, _| {},
        &mut |_, _| {},
    )
    .map(|(r, _)| r)
}

/// A change to a thread's state as the rollback loads it (a rescued thread returns its
/// error value instead of running its function again). Called once per thread of the
/// checkpoint, before the state is given to the thread.
pub(crate) type Adjust<'a> = dyn FnMut(i32, &mut ThreadState) + 'a;

/// A look at the stopped sandbox before it is rolled back (to describe a hung thread).
pub(crate) type Observe<'a> = dyn FnMut(&Process, &BTreeMap<i32, ThreadState>) + 'a;

/// [`rollback`], by a runner itself (`me`, see [`world::World::stop_as`]) and/or with
/// thread states adjusted. Returns, besides the report, the state the calling runner must
/// load itself (`None` if it does not exist in the checkpoint: it must end).
pub(crate) fn rollback_as(
    shared: &std::sync::Arc<Shared>,
    id: Option<u64>,
    want_digest: bool,
    me: Option<(i32, ThreadState)>,
    adjust: &mut Adjust<'_>,
    observe: &mut Observe<'_>,
) -> Result<(RollbackReport, Option<ThreadState>), CheckpointError> {
    refuse_in_child(shared)?;
    let t0 = Instant::now();
    let mut engine = engine_for(shared, me.is_some())?;
    let caller = me.as_ref().map(|(t, _)| *t);
    let k = match id {
        Some(id) => engine.index_of(id)?,
        None => engine
            .live
            .len()
            .checked_sub(1)
            .ok_or(CheckpointError::NothingLive)?,
    };
    let stopped = shared.world.stop_as(&shared.proc, me)?;
    let stop_us = stopped.stop_us;
    let parked_states = stopped
        .threads()
        .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
    let parked: Vec<i32> = parked_states.keys().copied().collect();
    let mut p = process::lock(&shared.proc);
    observe(&p, &parked_states);
    let target = &engine.live[k];
    let target_id = target.id;
    let then = target.process.mm().ram().clone();
    let vcpus_then = target.vcpus;
    let Some(mem) = engine.memory.as_mut() else {
        return Err(CheckpointError::NothingLive);
    };
    let work = {
        let vm = shared.vm.lock().unwrap_or_else(|e| e.into_inner());
        mem.rollback(&vm.vm, p.mm.ram_mut(), k, &then)?
    };
    engine.live.truncate(k + 1);
    // From here on guest memory is the checkpoint's: a failure that leaves threads with
    // other registers must end the run, never let it go on half restored.
    let fatal = |e: CheckpointError| {
        shared.finish(Err(crate::sandbox::SandboxError::GuestFatal(format!(
            "rollback failed after restoring memory: {e}"
        ))));
        e
    };
    let t_vmm = Instant::now();
    let target = &engine.live[k];
    p.restore(&target.process);
    // Windows opened after the target are gone with it; breakpoints and their step-over
    // pages are the VMM's, whatever memory now holds.
    {
        let pm = &mut *p;
        pm.rescue.restore_windows(&target.windows, &mut pm.mm);
        // Pages a debugger watches stay watched.
        pm.mm.reapply_guards();
    }
    // Windows that returned after the target was taken are open again.
    let reopened = target.windows.checkpoints();
    let live_windows: Vec<u64> = engine
        .live
        .iter()
        .filter(|c| c.window)
        .map(|c| c.id)
        .collect();
    if target.window {
        p.fds.journal_rollback(target_id, &live_windows);
    } else {
        p.fds.journal_discard_after(target_id);
    }
    // vCPUs created since the checkpoint still exist; their supervisor blocks (TSS, ring-0
    // stacks) were just rolled out of memory: put them back (no-op for the others).
    let vcpus_now = shared.next_vcpu_id.load(Ordering::SeqCst);
    for id in vcpus_then.min(vcpus_now)..vcpus_now {
        if let Err(e) = p.mm.install_vcpu(id) {
            tracing::warn!(vcpu = id, error = %e, "cannot reinstall a vCPU's supervisor block");
        }
    }
    let vmm_us = us(t_vmm);
    // Threads: those parked and in the checkpoint load its state; those not in it end;
    // those only in it start again on a pooled (or new) vCPU.
    let t_cpu = Instant::now();
    let mut orders = BTreeMap::new();
    let mut ended = 0;
    let mut caller_state = None;
    let mut states: BTreeMap<i32, ThreadState> = target.threads.clone();
    for (tid, st) in states.iter_mut() {
        adjust(*tid, st);
    }
    for tid in &parked {
        match states.get(tid) {
            Some(state) if Some(*tid) == caller => caller_state = Some(state.clone()),
            Some(state) => {
                let unchanged = parked_states
                    .get(tid)
                    .is_some_and(|now| now.cpu.same_as(&state.cpu));
                orders.insert(
                    *tid,
                    Order::Restore {
                        state: Box::new(state.clone()),
                        load_cpu: !unchanged,
                        verify: want_digest,
                    },
                );
            }
            None => {
                orders.insert(*tid, Order::Exit);
                ended += 1;
            }
        }
    }
    let mut restored_cpus: BTreeMap<i32, CpuState> = BTreeMap::new();
    let mut revived = Vec::new();
    for (tid, state) in &states {
        if parked.contains(tid) {
            continue;
        }
        let mut vcpu = take_vcpu(shared, &mut p).map_err(fatal)?;
        vcpu.restore_state(&state.cpu)
            .map_err(|e| fatal(CheckpointError::Cpu(e.to_string())))?;
        if want_digest {
            let readback = vcpu
                .read_back_state()
                .map_err(|e| fatal(CheckpointError::Cpu(e.to_string())))?;
            restored_cpus.insert(*tid, readback);
        }
        revived.push(Runner::revive(shared.clone(), vcpu, state));
    }
    let n_revived = revived.len();
    drop(p);
    let acks = stopped.execute(orders);
    for (tid, ack) in acks {
        match ack {
            Ack::Restored(Some(cpu)) => {
                restored_cpus.insert(tid, *cpu);
            }
            Ack::Restored(None) => {}
            Ack::Failed(e) => {
                return Err(fatal(CheckpointError::Cpu(format!("thread {tid}: {e}"))))
            }
            Ack::Exiting => {}
        }
    }
    for runner in revived {
        runner.spawn().map_err(|e| {
            fatal(CheckpointError::Cpu(format!(
                "cannot start a thread again: {e}"
            )))
        })?;
    }
    let cpu_us = us(t_cpu);
    let digest = want_digest.then(|| digest(&process::lock(&shared.proc), &restored_cpus));
    let threads = target.threads.len();
    engine.rollbacks += 1;
    engine
        .closed
        .retain(|c| *c < target_id && !reopened.contains(c));
    let t_resume = Instant::now();
    stopped.resume();
    let resume_us = us(t_resume);
    // Closed windows kept for checkpoints the rollback dropped can go now.
    for c in collect_closed(shared, &mut engine) {
        c.finish(caller.is_some());
    }
    Ok((
        RollbackReport {
            id: target_id,
            restored_pages: work.restored_pages,
            threads,
            threads_ended: ended,
            threads_revived: n_revived,
            invalidations: work.invalidations,
            digest,
            timing_us: Timing {
                stop: stop_us,
                dirty_log: work.dirty_log_us,
                memory: work.total_us,
                cpu: cpu_us,
                vmm: vmm_us,
                resume: resume_us,
                total: us(t0),
            },
        },
        caller_state,
    ))
}

/// A vCPU for a thread that comes back: from the pool of exited threads' vCPUs, or new.
fn take_vcpu(shared: &Shared, p: &mut Process) -> Result<Vcpu, CheckpointError> {
    if let Some(v) = shared
        .vcpu_pool
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
    {
        return Ok(v);
    }
    let id = shared.next_vcpu_id.fetch_add(1, Ordering::SeqCst);
    if id >= crate::arch::x86_64::layout::MAX_VCPUS {
        return Err(CheckpointError::Cpu("no vCPU left for a thread".into()));
    }
    p.mm.install_vcpu(id)
        .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
    let h = shared.vm.lock().unwrap_or_else(|e| e.into_inner());
    Vcpu::new(&h.kvm, &h.vm, id, p.mm.page_table_root())
        .map_err(|e| CheckpointError::Cpu(e.to_string()))
}

/// Release checkpoint `id` (the operator's: a checkpoint an open rescue window owns is
/// refused).
pub(crate) fn release(shared: &Shared, id: u64) -> Result<(), CheckpointError> {
    let mut engine = engine(shared);
    let i = engine.index_of(id)?;
    if engine.live[i].window {
        return Err(CheckpointError::OwnedByWindow(id));
    }
    let done = release_at(shared, &mut engine, i);
    drop(engine);
    done.finish(false);
    Ok(())
}

/// Thread `tid`'s rescue windows with checkpoints `ids` close (`returned`: their functions
/// returned; else they were rescued, or the thread ended). Windows no longer open (a
/// rollback took them away meanwhile) are left alone. Each checkpoint is released as soon
/// as no newer live checkpoint holds its window open. `runner`: called by a runner
/// (`Busy` rather than block, see [`engine_for`]; held output that a peer does not take at
/// once is left to a flusher thread).
pub(crate) fn close_windows(
    shared: &Shared,
    tid: i32,
    ids: &[u64],
    returned: bool,
    runner: bool,
) -> Result<(), CheckpointError> {
    let mut engine = engine_for(shared, runner)?;
    {
        let mut p = process::lock(&shared.proc);
        let pm = &mut *p;
        for id in ids {
            if pm.rescue.remove_window(tid, *id, returned, &mut pm.mm)
                && engine.live.iter().any(|c| c.id == *id && c.window)
            {
                engine.closed.insert(*id);
            }
        }
    }
    let done = collect_closed(shared, &mut engine);
    drop(engine);
    for d in done {
        d.finish(runner);
    }
    Ok(())
}

/// Release every closed window checkpoint that no newer live checkpoint holds open.
fn collect_closed(shared: &Shared, engine: &mut Checkpoints) -> Vec<Released> {
    let mut done = Vec::new();
    loop {
        let next = engine.closed.iter().copied().find(|id| {
            !engine
                .live
                .iter()
                .any(|c| c.id > *id && c.windows.checkpoints().contains(id))
        });
        let Some(id) = next else { break };
        engine.closed.remove(&id);
        if let Ok(i) = engine.index_of(id) {
            done.push(release_at(shared, engine, i));
        }
    }
    done
}

/// What a release leaves to do once the engine is unlocked.
struct Released {
    commit: Option<crate::journal::Commit>,
    checkpoint: Checkpoint,
}

impl Released {
    /// Drop the checkpoint (deferred closes happen) and write the committed output,
    /// without any lock. A runner must not block on a slow peer (a stop may be waiting for
    /// it): what the peer does not take at once is left to a flusher thread.
    fn finish(self, runner: bool) {
        drop(self.checkpoint);
        if let Some(c) = self.commit {
            if runner {
                c.flush_or_defer();
            } else {
                c.flush();
            }
        }
    }
}

/// Remove live checkpoint `i` (only bookkeeping: no thread needs to stop).
fn release_at(shared: &Shared, engine: &mut Checkpoints, i: usize) -> Released {
    let ck = engine.live.remove(i);
    if let Some(mem) = engine.memory.as_mut() {
        mem.release(i);
    }
    engine.releases += 1;
    // Unlinks no live checkpoint can bring back happen now.
    let mut p = process::lock(&shared.proc);
    let oldest = engine.live.first().map(|c| c.process.removals_position());
    p.fs.removals.forget_before(oldest);
    p.fs.removals.set_active(oldest.is_some());
    // Output no live window can undo any more goes out.
    let commit = ck.window.then(|| {
        let live: Vec<u64> = engine
            .live
            .iter()
            .filter(|c| c.window)
            .map(|c| c.id)
            .collect();
        p.fds.journal_release(ck.id, &live)
    });
    drop(p);
    Released {
        commit,
        checkpoint: ck,
    }
}

/// Digest of the running sandbox (stopped for the time it takes).
pub(crate) fn digest_now(shared: &Shared) -> Result<DigestReport, CheckpointError> {
    let stopped = shared.world.stop(&shared.proc)?;
    let threads = stopped
        .threads()
        .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
    let cpus: BTreeMap<i32, CpuState> = threads.iter().map(|(t, s)| (*t, s.cpu.clone())).collect();
    let d = digest(&process::lock(&shared.proc), &cpus);
    stopped.resume();
    Ok(DigestReport {
        digest: d,
        threads: cpus.len(),
    })
}
