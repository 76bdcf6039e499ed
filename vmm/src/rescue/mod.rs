//! Rescue points: error virtualization at the hypervisor level (ASSURE).
//!
//! A rescue point is a function with an error path the server already handles well. The
//! VMM owns a breakpoint on its first instruction: the one-byte `out dx, al` ([`BP_BYTE`]),
//! which exits to the VMM from user mode like the syscall path does, without the CPU
//! exception an int3 would raise (several times as costly on page-table based KVM). When a
//! thread enters it, the VMM may open a
//! *window*: a checkpoint of the whole sandbox ([`crate::checkpoint`]), with the thread at
//! the function's entry. A breakpoint on the return address closes the window when the
//! function returns (the checkpoint is released and held output goes out). If the thread
//! crashes or hangs while the window is open, the sandbox is rolled back to the window's
//! checkpoint and the thread is made to return the point's error value to its caller, as
//! if the function had executed `ret` with that value in RAX.
//!
//! This module keeps the VMM-side state: the points and their policies, fault injections,
//! the breakpoints with their step-over slots (`[assure-xol]` pages) and every thread's
//! open windows. The runner ([`crate::runner`]) drives it from breakpoint exits and crashes; the
//! watchdog ([`watchdog`]) recovers windows that stay open too long.
//!
//! The breakpoint bytes live in guest memory, which checkpoints capture and rollbacks put
//! back; the VMM's table is the truth, and [`RescueState::restore_windows`] rewrites memory
//! to match it.

pub mod spec;
pub mod watchdog;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use introspect::decode::{self, Branch, StepOver};
use kvm_bindings::kvm_regs;
use serde::Serialize;

use crate::mm::{AddressSpace, Contents, Placement, Prot, VmaKind};
use spec::{ErrorValue, FaultKind, InjectSpec, RescueSpec};

/// The breakpoint instruction: `out dx, al`. Every port is open at CPL3 (see the
/// supervisor's TSS), so it always exits; the VMM tells its own from a guest's port access
/// by the address.
pub const BP_BYTE: u8 = 0xee;

/// Most breakpoints (entries, injections and return sites) in one process.
const MAX_BREAKPOINTS: usize = 4096;

/// Bytes of a step-over page.
const XOL_PAGE: u64 = 4096;
/// Slot 0 of every step-over page is `jmp $`: where an injected hang spins.
const HANG_STUB: [u8; 2] = [0xeb, 0xfe];
/// The reach of a rel32 displacement, with room for the slot itself.
const REACH: u64 = (1 << 31) - 2 * XOL_PAGE;

/// Errors of rescue-point management (answered to the operator; the guest goes on).
#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    /// A bad spec.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// The function cannot be found in its module.
    #[error("{what}: {reason}")]
    Resolve {
        /// The point or injection.
        what: String,
        /// Why.
        reason: String,
    },
    /// The function's first instruction cannot be stepped over.
    #[error("{what} at {addr:#x}: cannot place a breakpoint: {reason}")]
    Breakpoint {
        /// The point or injection.
        what: String,
        /// Where.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// No such rescue point.
    #[error("no rescue point named {0:?}")]
    NoSuchPoint(String),
}

/// Counters of one rescue point.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PointStats {
    /// Times a thread entered the function.
    pub entries: u64,
    /// Windows opened.
    pub windows: u64,
    /// Windows closed by the function's return.
    pub commits: u64,
    /// Entries without a window because of the policy (sampling, interval).
    pub sampled_out: u64,
    /// Entries without a window because no checkpoint could be taken at that moment.
    pub skipped: u64,
    /// Crashes and hangs recovered.
    pub recoveries: u64,
    /// Of which hangs.
    pub hangs: u64,
    /// The point was quarantined (too many recoveries per minute).
    pub quarantined: bool,
    /// Mean cost of opening a window (the checkpoint), in microseconds.
    pub mean_window_us: f64,
    /// Mean cost of its parts: stopping, memory, CPU state, VMM state.
    pub mean_parts_us: [f64; 4],
    /// Mean pages written since the previous checkpoint, per window.
    pub mean_dirty_pages: f64,
}

#[derive(Debug)]
struct Point {
    spec: RescueSpec,
    /// Its entry, once its module is loaded.
    entry: Option<u64>,
    /// `function (module)` as resolved.
    resolved: Option<String>,
    /// Why it could not be placed, if so.
    problem: Option<String>,
    stats: PointStats,
    last_window: Option<Instant>,
    recent_recoveries: VecDeque<Instant>,
}

#[derive(Debug)]
struct Inject {
    spec: InjectSpec,
    entry: Option<u64>,
    problem: Option<String>,
    calls: u64,
    fired: u64,
}

impl Inject {
    /// Count a call; does it fault?
    fn call(&mut self) -> bool {
        self.calls += 1;
        let s = &self.spec;
        if s.count > 0 && self.fired >= s.count {
            return false;
        }
        let fires = self.calls == s.nth
            || (s.every > 0 && self.calls > s.nth && (self.calls - s.nth).is_multiple_of(s.every));
        if fires {
            self.fired += 1;
        }
        fires
    }
}

#[derive(Debug)]
struct Breakpoint {
    /// The displaced instruction's bytes (its first byte is under the breakpoint).
    original: Vec<u8>,
    step: StepOver,
    /// Its step-over slot.
    slot: u64,
    entries: Vec<usize>,
    injects: Vec<usize>,
    /// Open windows returning here.
    return_refs: u32,
    /// A debugger's breakpoint (gdb's `Z0`/`Z1`) is here too.
    debug: bool,
    /// The breakpoint is in guest memory.
    installed: bool,
}

impl Breakpoint {
    fn wanted(&self) -> bool {
        !self.entries.is_empty() || !self.injects.is_empty() || self.return_refs > 0 || self.debug
    }
}

#[derive(Debug)]
struct XolPage {
    addr: u64,
    image: Vec<u8>,
    used: usize,
}

/// One open window of a thread.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Index of its rescue point.
    #[serde(skip)]
    pub point: usize,
    /// The point's name.
    pub name: String,
    /// Its checkpoint.
    pub checkpoint: u64,
    /// RSP at the function's entry (pointing at the return address).
    pub entry_rsp: u64,
    /// Where the function returns to.
    pub return_to: u64,
    /// When it opened.
    #[serde(skip)]
    pub opened: Instant,
    /// When it counts as hung.
    #[serde(skip)]
    pub deadline: Option<Instant>,
}

/// The open windows of every thread, as a checkpoint keeps them.
#[derive(Debug, Clone, Default)]
pub struct WindowsSnapshot(BTreeMap<i32, Vec<Window>>);

impl WindowsSnapshot {
    /// The checkpoints of the windows it holds.
    pub fn checkpoints(&self) -> Vec<u64> {
        self.0.values().flatten().map(|w| w.checkpoint).collect()
    }
}

/// What a breakpoint hit asks of the runner.
#[derive(Debug)]
pub struct Hit {
    /// The thread's registers after the displaced instruction (or a fault address).
    pub stepped: Result<kvm_regs, u64>,
    /// Rescue points entered here.
    pub entries: Vec<usize>,
    /// Injections whose call this is, that fault now.
    pub faults: Vec<(usize, FaultKind)>,
    /// A return site of some window.
    pub is_return: bool,
}

/// Rescue points, injections, breakpoints and windows of one process.
#[derive(Debug, Default)]
pub struct RescueState {
    points: Vec<Point>,
    injects: Vec<Inject>,
    bps: BTreeMap<u64, Breakpoint>,
    /// The original byte of every address ever patched (a rollback may bring back a breakpoint
    /// the VMM has since removed).
    originals: BTreeMap<u64, u8>,
    xol: Vec<XolPage>,
    windows: BTreeMap<i32, Vec<Window>>,
    /// Guest path of the executable (module of points that name none).
    exe: String,
}

/// A rescue point as `rescue` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PointReport {
    /// Label.
    pub name: String,
    /// As specified.
    pub location: String,
    /// Where it was placed.
    pub resolved: Option<String>,
    /// Entry address.
    pub entry: Option<u64>,
    /// Why it is not placed, if so.
    pub problem: Option<String>,
    /// Error value.
    pub error_value: String,
    /// Policy.
    pub policy: spec::Policy,
    /// Counters.
    pub stats: PointStats,
}

/// An injection as `rescue` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct InjectReport {
    /// As specified.
    pub spec: String,
    /// Entry address.
    pub entry: Option<u64>,
    /// Why it is not placed, if so.
    pub problem: Option<String>,
    /// Calls seen.
    pub calls: u64,
    /// Faults injected.
    pub fired: u64,
}

/// Answer to `rescue`.
#[derive(Debug, Clone, Serialize)]
pub struct RescueReport {
    /// Points.
    pub points: Vec<PointReport>,
    /// Injections.
    pub injections: Vec<InjectReport>,
    /// Open windows by thread.
    pub windows: BTreeMap<i32, Vec<Window>>,
    /// Breakpoints in guest memory.
    pub breakpoints: usize,
}

impl RescueState {
    /// Rescue state for the executable at guest path `exe`.
    pub fn new(exe: &str) -> RescueState {
        RescueState {
            exe: exe.to_string(),
            ..Default::default()
        }
    }

    /// Any point or injection at all (else nothing here costs anything).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.injects.is_empty()
    }

    /// Any breakpoint at all (a rescue point's, an injection's, a return site's or a
    /// debugger's).
    pub fn has_breakpoints(&self) -> bool {
        !self.bps.is_empty()
    }

    /// Place (`on`) or remove a debugger's breakpoint at `addr`. It shares the table with
    /// rescue points, so one address may be both; the byte in memory stays until no role
    /// wants it.
    pub fn set_debug_breakpoint(
        &mut self,
        addr: u64,
        on: bool,
        mm: &mut AddressSpace,
    ) -> Result<(), RescueError> {
        if on {
            self.breakpoint(addr, mm)?.debug = true;
            if !self.install(addr, mm) {
                if let Some(bp) = self.bps.get_mut(&addr) {
                    bp.debug = false;
                }
                return Err(RescueError::Breakpoint {
                    what: format!("{addr:#x}"),
                    addr,
                    reason: "not in executable memory".into(),
                });
            }
        } else if let Some(bp) = self.bps.get_mut(&addr) {
            bp.debug = false;
            self.uninstall_unwanted(addr, mm);
        }
        Ok(())
    }

    /// Is a debugger's breakpoint in memory at `addr`?
    pub fn debug_breakpoint_at(&self, addr: u64) -> bool {
        self.bps.get(&addr).is_some_and(|b| b.debug && b.installed)
    }

    /// Remove every debugger's breakpoint (the debugger detached).
    pub fn clear_debug_breakpoints(&mut self, mm: &mut AddressSpace) {
        let addrs: Vec<u64> = self
            .bps
            .iter()
            .filter(|(_, b)| b.debug)
            .map(|(a, _)| *a)
            .collect();
        for addr in addrs {
            if let Some(bp) = self.bps.get_mut(&addr) {
                bp.debug = false;
            }
            self.uninstall_unwanted(addr, mm);
        }
    }

    /// Show `buf` (guest memory read at `addr`) as the program's own code: the original
    /// byte wherever a breakpoint of the VMM's is in memory.
    pub fn hide_breakpoints(&self, addr: u64, buf: &mut [u8]) {
        let end = addr.saturating_add(buf.len() as u64);
        for (a, bp) in self.bps.range(addr..end) {
            if bp.installed {
                if let (Some(b), Some(orig)) =
                    (buf.get_mut((a - addr) as usize), bp.original.first())
                {
                    *b = *orig;
                }
            }
        }
    }

    /// Is `rip` inside a step-over page (a displaced instruction or its jump back)?
    pub fn in_step_over_page(&self, rip: u64) -> bool {
        self.xol
            .iter()
            .any(|p| rip >= p.addr && rip < p.addr + XOL_PAGE)
    }

    /// Add rescue points (names must be new). They are placed when their module is loaded.
    pub fn add_points(&mut self, specs: Vec<RescueSpec>) -> Result<(), RescueError> {
        for s in &specs {
            if self.points.iter().any(|p| p.spec.name == s.name) {
                return Err(spec::SpecError::Invalid {
                    name: s.name.clone(),
                    reason: "a rescue point with this name exists".into(),
                }
                .into());
            }
        }
        for spec in specs {
            self.points.push(Point {
                spec,
                entry: None,
                resolved: None,
                problem: None,
                stats: PointStats::default(),
                last_window: None,
                recent_recoveries: VecDeque::new(),
            });
        }
        Ok(())
    }

    /// Add a fault injection.
    pub fn add_inject(&mut self, spec: InjectSpec) {
        self.injects.push(Inject {
            spec,
            entry: None,
            problem: None,
            calls: 0,
            fired: 0,
        });
    }

    /// Change a point's policy: `enabled` (also lifts a quarantine).
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<(), RescueError> {
        let p = self
            .points
            .iter_mut()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| RescueError::NoSuchPoint(name.to_string()))?;
        p.spec.policy.enabled = enabled;
        if enabled {
            p.stats.quarantined = false;
            p.recent_recoveries.clear();
        }
        Ok(())
    }

    fn module_matches(&self, wanted: Option<&str>, m: &introspect::Module) -> bool {
        match wanted {
            Some(name) => m.matches_name(name),
            None => m.path() == Some(self.exe.as_str()),
        }
    }

    /// Place the points and injections that name module `m` (just loaded); errors are
    /// kept per point (the `rescue` listing shows them) and logged.
    pub fn on_module(&mut self, m: &introspect::Module, mm: &mut AddressSpace) {
        let mut wanted: Vec<(u64, Option<usize>, Option<usize>)> = Vec::new();
        for i in 0..self.points.len() {
            let p = &self.points[i];
            if p.entry.is_some() || !self.module_matches(p.spec.location.module.as_deref(), m) {
                continue;
            }
            match m.resolve_function(&p.spec.location.function) {
                Ok(r) => {
                    let p = &mut self.points[i];
                    p.entry = Some(r.entry);
                    p.resolved = Some(format!("{} ({})", r.name, r.module));
                    wanted.push((r.entry, Some(i), None));
                }
                Err(e) => {
                    tracing::warn!(point = %self.points[i].spec.name, error = %e, "rescue point not placed");
                    self.points[i].problem = Some(e.to_string());
                }
            }
        }
        for i in 0..self.injects.len() {
            let j = &self.injects[i];
            if j.entry.is_some() || !self.module_matches(j.spec.location.module.as_deref(), m) {
                continue;
            }
            match m.resolve_function(&j.spec.location.function) {
                Ok(r) => {
                    self.injects[i].entry = Some(r.entry);
                    wanted.push((r.entry, None, Some(i)));
                }
                Err(e) => {
                    tracing::warn!(inject = %self.injects[i].spec, error = %e, "fault injection not placed");
                    self.injects[i].problem = Some(e.to_string());
                }
            }
        }
        for (addr, point, inject) in wanted {
            let what = match (point, inject) {
                (Some(i), _) => self.points[i].spec.name.clone(),
                (_, Some(i)) => self.injects[i].spec.to_string(),
                _ => continue,
            };
            match self.breakpoint(addr, mm) {
                Ok(bp) => {
                    if let Some(i) = point {
                        bp.entries.push(i);
                    }
                    if let Some(i) = inject {
                        bp.injects.push(i);
                    }
                    tracing::info!(%what, addr = format_args!("{addr:#x}"), "breakpoint placed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "breakpoint not placed");
                    match (point, inject) {
                        (Some(i), _) => {
                            self.points[i].entry = None;
                            self.points[i].problem = Some(e.to_string());
                        }
                        (_, Some(i)) => {
                            self.injects[i].entry = None;
                            self.injects[i].problem = Some(e.to_string());
                        }
                        _ => {}
                    }
                }
            }
        }
        self.install_pending(mm);
    }

    /// The breakpoint at `addr`, created (with its step-over slot) if new. Not installed
    /// yet: see [`RescueState::install_pending`].
    fn breakpoint(
        &mut self,
        addr: u64,
        mm: &mut AddressSpace,
    ) -> Result<&mut Breakpoint, RescueError> {
        if !self.bps.contains_key(&addr) {
            let bad = |reason: String| RescueError::Breakpoint {
                what: format!("{addr:#x}"),
                addr,
                reason,
            };
            // Return sites come from guest stacks: a hostile guest must not make the table
            // (and the step-over pages) grow without bound.
            if self.bps.len() >= MAX_BREAKPOINTS {
                return Err(bad(format!("{MAX_BREAKPOINTS} breakpoints are placed")));
            }
            let mut code = [0u8; 16];
            let mut n = 0;
            // The instruction may end a page before an unmapped one: read what is there.
            while n < code.len() && mm.peek(addr + n as u64, &mut code[n..n + 1]) {
                n += 1;
            }
            if n == 0 {
                return Err(bad("not mapped".into()));
            }
            let slot = self.alloc_slot(addr, mm).map_err(bad)?;
            let (len, step) =
                decode::plan(&code[..n], addr, slot).map_err(|e| bad(e.to_string()))?;
            if let StepOver::OutOfLine { bytes } = &step {
                self.write_slot(slot, bytes, mm).map_err(bad)?;
            }
            self.bps.insert(
                addr,
                Breakpoint {
                    original: code[..len].to_vec(),
                    step,
                    slot,
                    entries: Vec::new(),
                    injects: Vec::new(),
                    return_refs: 0,
                    debug: false,
                    installed: false,
                },
            );
        }
        self.bps
            .get_mut(&addr)
            .ok_or_else(|| RescueError::Breakpoint {
                what: format!("{addr:#x}"),
                addr,
                reason: "vanished".into(),
            })
    }

    /// A step-over slot within rel32 reach of `addr`.
    fn alloc_slot(&mut self, addr: u64, mm: &mut AddressSpace) -> Result<u64, String> {
        let slots = (XOL_PAGE as usize) / decode::SLOT_SIZE;
        if let Some(page) = self
            .xol
            .iter_mut()
            .find(|p| p.used < slots && p.addr.abs_diff(addr) < REACH)
        {
            let slot = page.addr + (page.used * decode::SLOT_SIZE) as u64;
            page.used += 1;
            return Ok(slot);
        }
        let at = mm
            .find_free_near(addr, XOL_PAGE, REACH)
            .ok_or("no free address within 2 GiB for a step-over page")?;
        let mut image = vec![0xccu8; XOL_PAGE as usize];
        image[..HANG_STUB.len()].copy_from_slice(&HANG_STUB);
        map_xol(mm, at, &image)?;
        self.xol.push(XolPage {
            addr: at,
            image,
            used: 2,
        });
        Ok(at + decode::SLOT_SIZE as u64)
    }

    fn write_slot(&mut self, slot: u64, bytes: &[u8], mm: &mut AddressSpace) -> Result<(), String> {
        let page = self
            .xol
            .iter_mut()
            .find(|p| slot >= p.addr && slot < p.addr + XOL_PAGE)
            .ok_or("slot outside the step-over pages")?;
        let off = (slot - page.addr) as usize;
        let end = off + bytes.len();
        if end > page.image.len() {
            return Err("slot overflows its page".into());
        }
        page.image[off..end].copy_from_slice(bytes);
        mm.patch(slot, bytes)
            .map_err(|e| format!("cannot write the slot: {e}"))
    }

    /// Write every wanted breakpoint whose code is mapped executable into memory
    /// (after the module's text is mapped: ld.so maps a library's header first and its
    /// text over it).
    pub fn install_pending(&mut self, mm: &mut AddressSpace) {
        let addrs: Vec<u64> = self.bps.keys().copied().collect();
        for addr in addrs {
            self.install(addr, mm);
        }
    }

    /// Write the breakpoint at `addr` if it is wanted, not in memory yet, and its code is
    /// mapped executable with the byte its slot was planned for. True if it is in memory.
    fn install(&mut self, addr: u64, mm: &mut AddressSpace) -> bool {
        let Some(bp) = self.bps.get_mut(&addr) else {
            return false;
        };
        if bp.installed || !bp.wanted() {
            return bp.installed;
        }
        if !mm.vma_at(addr).is_some_and(|v| v.prot.exec()) {
            return false;
        }
        let mut first = [0u8; 1];
        if !mm.peek(addr, &mut first) || first[0] != bp.original[0] {
            // Not the code the slot was planned for (yet): leave it.
            return false;
        }
        if mm.patch(addr, &[BP_BYTE]).is_ok() {
            self.originals.entry(addr).or_insert(bp.original[0]);
            bp.installed = true;
        }
        bp.installed
    }

    /// Remove the breakpoint at `addr` if nothing wants it any more.
    fn uninstall_unwanted(&mut self, addr: u64, mm: &mut AddressSpace) {
        if let Some(bp) = self.bps.get_mut(&addr) {
            if bp.installed && !bp.wanted() && mm.patch(addr, &bp.original[..1]).is_ok() {
                bp.installed = false;
            }
        }
    }

    /// The guest executed a breakpoint at `addr`: ours? Then what to do. `regs`: the thread's
    /// user registers with RIP = `addr`; `seg`: its FS and GS bases.
    pub fn hit(
        &mut self,
        addr: u64,
        regs: &kvm_regs,
        seg: (u64, u64),
        mm: &mut AddressSpace,
    ) -> Option<Hit> {
        let bp = self.bps.get(&addr)?;
        if !bp.installed {
            // Removed meanwhile (the byte is the original again): run it as it is.
            return Some(Hit {
                stepped: Ok(*regs),
                entries: Vec::new(),
                faults: Vec::new(),
                is_return: false,
            });
        }
        let stepped = step_over(bp, regs, seg, mm);
        let entries = bp.entries.clone();
        let is_return = bp.return_refs > 0;
        let mut faults = Vec::new();
        for i in bp.injects.clone() {
            if let Some(j) = self.injects.get_mut(i) {
                if j.call() {
                    faults.push((i, j.spec.kind));
                }
            }
        }
        for &i in &entries {
            if let Some(p) = self.points.get_mut(i) {
                p.stats.entries += 1;
            }
        }
        Some(Hit {
            stepped,
            entries,
            faults,
            is_return,
        })
    }

    /// Should an entry of point `i` open a window now (policy, sampling, quarantine)?
    pub fn wants_window(&mut self, i: usize, now: Instant) -> bool {
        let Some(p) = self.points.get_mut(i) else {
            return false;
        };
        let pol = &p.spec.policy;
        if !pol.enabled || p.stats.quarantined {
            return false;
        }
        let sampled = pol.every <= 1 || p.stats.entries.saturating_sub(1).is_multiple_of(pol.every);
        let spaced = pol.min_interval_ms == 0
            || p.last_window.is_none_or(|t| {
                now.duration_since(t) >= Duration::from_millis(pol.min_interval_ms)
            });
        if !(sampled && spaced) {
            p.stats.sampled_out += 1;
            return false;
        }
        true
    }

    /// A window of point `i` could not be opened after all.
    pub fn window_skipped(&mut self, i: usize) {
        if let Some(p) = self.points.get_mut(i) {
            p.stats.skipped += 1;
        }
    }

    /// Count a reference to the return site `addr` (installing its breakpoint).
    pub fn hold_return_site(
        &mut self,
        addr: u64,
        mm: &mut AddressSpace,
    ) -> Result<(), RescueError> {
        // The return address comes from the guest's stack: only executable code gets a
        // breakpoint (and a step-over slot).
        if !mm.vma_at(addr).is_some_and(|v| v.prot.exec()) {
            return Err(RescueError::Breakpoint {
                what: "return site".into(),
                addr,
                reason: "not in executable memory".into(),
            });
        }
        self.breakpoint(addr, mm)?.return_refs += 1;
        if self.install(addr, mm) {
            Ok(())
        } else {
            self.drop_return_site(addr, mm);
            Err(RescueError::Breakpoint {
                what: "return site".into(),
                addr,
                reason: "not in executable memory".into(),
            })
        }
    }

    /// Drop a reference taken by [`RescueState::hold_return_site`].
    pub fn drop_return_site(&mut self, addr: u64, mm: &mut AddressSpace) {
        if let Some(bp) = self.bps.get_mut(&addr) {
            bp.return_refs = bp.return_refs.saturating_sub(1);
        }
        self.uninstall_unwanted(addr, mm);
    }

    /// Record the window thread `tid` opens (with the checkpoint being taken for it).
    pub fn push_window(&mut self, tid: i32, mut w: Window) {
        let now = Instant::now();
        if let Some(p) = self.points.get_mut(w.point) {
            w.name = p.spec.name.clone();
            w.opened = now;
            w.deadline = (p.spec.policy.hang_timeout_ms > 0)
                .then(|| now + Duration::from_millis(p.spec.policy.hang_timeout_ms));
        }
        self.windows.entry(tid).or_default().push(w);
    }

    /// A window of point `i` opened; its checkpoint took `timing` and `dirty_pages`.
    pub fn note_window_opened(
        &mut self,
        i: usize,
        now: Instant,
        timing: &crate::checkpoint::Timing,
        dirty_pages: u64,
    ) {
        let Some(p) = self.points.get_mut(i) else {
            return;
        };
        p.stats.windows += 1;
        p.last_window = Some(now);
        let n = p.stats.windows as f64;
        let mean = |m: &mut f64, x: f64| *m += (x - *m) / n;
        mean(&mut p.stats.mean_window_us, timing.total);
        mean(&mut p.stats.mean_dirty_pages, dirty_pages as f64);
        let parts = [timing.stop, timing.memory, timing.cpu, timing.vmm];
        for (m, x) in p.stats.mean_parts_us.iter_mut().zip(parts) {
            mean(m, x);
        }
    }

    /// The open windows, for a checkpoint.
    pub fn windows_snapshot(&self) -> WindowsSnapshot {
        WindowsSnapshot(self.windows.clone())
    }

    /// After a rollback: the windows open at the checkpoint are open again (their
    /// functions run again, their hang timeouts start again); guest memory gets the VMM's
    /// breakpoints (return sites included) and step-over pages back.
    pub fn restore_windows(&mut self, snapshot: &WindowsSnapshot, mm: &mut AddressSpace) {
        let now = Instant::now();
        self.windows = snapshot.0.clone();
        for w in self.windows.values_mut().flatten() {
            let timeout = w.deadline.map(|d| d.saturating_duration_since(w.opened));
            w.opened = now;
            w.deadline = timeout.map(|t| now + t);
        }
        for bp in self.bps.values_mut() {
            bp.return_refs = 0;
        }
        let sites: Vec<u64> = self
            .windows
            .values()
            .flatten()
            .map(|w| w.return_to)
            .collect();
        for site in sites {
            if let Some(bp) = self.bps.get_mut(&site) {
                bp.return_refs += 1;
            }
        }
        self.resync(mm);
    }

    /// Thread `tid`'s windows whose function has returned, judged by its stack pointer
    /// `rsp`: at a return site (`at_entry` false) a window has returned when RSP is above
    /// its entry RSP; at a function entry (`at_entry` true) a window whose entry RSP is not
    /// below RSP was left without returning (longjmp). Their checkpoints, innermost first.
    pub fn finished_windows(&self, tid: i32, rsp: u64, at_entry: bool) -> Vec<u64> {
        let Some(ws) = self.windows.get(&tid) else {
            return Vec::new();
        };
        ws.iter()
            .rev()
            .take_while(|w| {
                if at_entry {
                    w.entry_rsp <= rsp
                } else {
                    w.entry_rsp < rsp
                }
            })
            .map(|w| w.checkpoint)
            .collect()
    }

    /// The checkpoints of thread `tid`'s windows.
    pub fn window_ids(&self, tid: i32) -> Vec<u64> {
        self.windows
            .get(&tid)
            .map(|ws| ws.iter().map(|w| w.checkpoint).collect())
            .unwrap_or_default()
    }

    /// Remove thread `tid`'s window with checkpoint `id`, if open (`returned`: its function
    /// returned, as opposed to being rescued or its thread ending). True if it was open.
    pub fn remove_window(
        &mut self,
        tid: i32,
        id: u64,
        returned: bool,
        mm: &mut AddressSpace,
    ) -> bool {
        let Some(ws) = self.windows.get_mut(&tid) else {
            return false;
        };
        let Some(k) = ws.iter().position(|w| w.checkpoint == id) else {
            return false;
        };
        let w = ws.remove(k);
        if ws.is_empty() {
            self.windows.remove(&tid);
        }
        if returned {
            if let Some(p) = self.points.get_mut(w.point) {
                p.stats.commits += 1;
            }
        }
        self.drop_return_site(w.return_to, mm);
        true
    }

    /// Stop watching thread `tid`'s window `id` for a hang (its recovery failed: it is
    /// not tried again and again).
    pub fn clear_deadline(&mut self, tid: i32, id: u64) {
        if let Some(w) = self
            .windows
            .get_mut(&tid)
            .and_then(|ws| ws.iter_mut().find(|w| w.checkpoint == id))
        {
            w.deadline = None;
        }
    }

    /// Has thread `tid` a window open?
    pub fn has_window(&self, tid: i32) -> bool {
        self.windows.contains_key(&tid)
    }

    /// The window a crash of thread `tid` at stack pointer `rsp` rolls back to: its
    /// innermost window whose frame is still on the stack.
    pub fn window_for_crash(&self, tid: i32, rsp: u64) -> Option<Window> {
        self.windows
            .get(&tid)?
            .iter()
            .rev()
            .find(|w| w.entry_rsp >= rsp)
            .cloned()
    }

    /// Move every open window's hang deadline `by` later (the guest was stopped that long
    /// by a debugger: its time did not run).
    pub fn postpone_deadlines(&mut self, by: Duration) {
        for w in self.windows.values_mut().flatten() {
            if let Some(d) = w.deadline.as_mut() {
                *d += by;
                w.opened += by;
            }
        }
    }

    /// The open window with the earliest hang deadline: (thread, window).
    pub fn next_deadline(&self) -> Option<(i32, Window)> {
        self.windows
            .iter()
            .flat_map(|(t, ws)| ws.iter().map(move |w| (*t, w)))
            .filter(|(_, w)| w.deadline.is_some())
            .min_by_key(|(_, w)| w.deadline)
            .map(|(t, w)| (t, w.clone()))
    }

    /// Count a recovery of point `i` at `now`; false if that exceeds the point's limit
    /// per minute: the point is then quarantined (no more windows; the crash goes on).
    pub fn admit_recovery(&mut self, i: usize, now: Instant, hang: bool) -> bool {
        let Some(p) = self.points.get_mut(i) else {
            return false;
        };
        while p
            .recent_recoveries
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            p.recent_recoveries.pop_front();
        }
        if p.recent_recoveries.len() >= p.spec.policy.max_recoveries_per_minute as usize {
            p.stats.quarantined = true;
            return false;
        }
        p.recent_recoveries.push_back(now);
        p.stats.recoveries += 1;
        if hang {
            p.stats.hangs += 1;
        }
        true
    }

    /// The error value and name of point `i`.
    pub fn point_info(&self, i: usize) -> Option<(ErrorValue, String, u32)> {
        self.points.get(i).map(|p| {
            (
                p.spec.error_value,
                p.spec.name.clone(),
                p.spec.policy.max_recoveries_per_minute,
            )
        })
    }

    /// A fault at the start of a step-over slot is a fault of the displaced instruction:
    /// its original address (the guest, its handler and backtraces see that one).
    pub fn original_of_slot(&self, rip: u64) -> Option<u64> {
        if !self
            .xol
            .iter()
            .any(|p| rip >= p.addr && rip < p.addr + XOL_PAGE)
        {
            return None;
        }
        self.bps
            .iter()
            .find(|(_, b)| b.slot == rip && matches!(b.step, StepOver::OutOfLine { .. }))
            .map(|(a, _)| *a)
    }

    /// Where an injected hang spins (slot 0 of a step-over page).
    pub fn hang_stub(&self) -> Option<u64> {
        self.xol.first().map(|p| p.addr)
    }

    /// Make guest memory match the table: step-over pages mapped with their slots, an
    /// breakpoint byte where a breakpoint is wanted, the original byte where none is.
    pub fn resync(&mut self, mm: &mut AddressSpace) {
        for page in &self.xol {
            let ours = mm
                .vma_at(page.addr)
                .is_some_and(|v| v.kind == VmaKind::Breakpoints);
            if !ours {
                if let Err(e) = map_xol(mm, page.addr, &page.image) {
                    tracing::warn!(addr = format_args!("{:#x}", page.addr), error = %e, "cannot map a step-over page again");
                }
                continue;
            }
            let mut now = vec![0u8; page.image.len()];
            if !mm.peek(page.addr, &mut now) || now != page.image {
                mm.patch(page.addr, &page.image).ok();
            }
        }
        for (addr, bp) in self.bps.iter_mut() {
            let want_breakpoint = bp.wanted();
            let want = if want_breakpoint {
                BP_BYTE
            } else {
                bp.original[0]
            };
            let mut cur = [0u8; 1];
            let mapped = mm.vma_at(*addr).is_some_and(|v| v.prot.exec());
            if !mapped || !mm.peek(*addr, &mut cur) {
                bp.installed = false;
                continue;
            }
            if cur[0] != want && (cur[0] == BP_BYTE || cur[0] == bp.original[0]) {
                mm.patch(*addr, &[want]).ok();
            }
            bp.installed = want_breakpoint && (cur[0] == want || cur[0] == bp.original[0]);
        }
        for (addr, orig) in &self.originals {
            if self.bps.get(addr).is_some_and(|b| b.wanted()) {
                continue;
            }
            let mut cur = [0u8; 1];
            if mm.peek(*addr, &mut cur) && cur[0] == BP_BYTE && *orig != BP_BYTE {
                mm.patch(*addr, &[*orig]).ok();
            }
        }
        self.install_pending(mm);
    }

    /// What `rescue` reports.
    pub fn report(&self) -> RescueReport {
        RescueReport {
            points: self
                .points
                .iter()
                .map(|p| PointReport {
                    name: p.spec.name.clone(),
                    location: p.spec.location.to_string(),
                    resolved: p.resolved.clone(),
                    entry: p.entry,
                    problem: p.problem.clone(),
                    error_value: p.spec.error_value.to_string(),
                    policy: p.spec.policy.clone(),
                    stats: p.stats.clone(),
                })
                .collect(),
            injections: self
                .injects
                .iter()
                .map(|j| InjectReport {
                    spec: j.spec.to_string(),
                    entry: j.entry,
                    problem: j.problem.clone(),
                    calls: j.calls,
                    fired: j.fired,
                })
                .collect(),
            windows: self.windows.clone(),
            breakpoints: self.bps.values().filter(|b| b.installed).count(),
        }
    }
}

/// Map a step-over page at `at` (executable, not writable by the guest).
fn map_xol(mm: &mut AddressSpace, at: u64, image: &[u8]) -> Result<(), String> {
    mm.map(
        Placement::FixedNoReplace(at),
        XOL_PAGE,
        Prot(Prot::READ.0 | libc::PROT_EXEC as u32),
        VmaKind::Breakpoints,
        Some(Contents::Bytes(image)),
    )
    .map(|_| ())
    .map_err(|e| format!("cannot map a step-over page at {at:#x}: {e}"))
}

/// The registers after the instruction displaced by the breakpoint at `regs.rip`: RIP in its
/// slot, or the effect of a branch, emulated. `Err(address)`: the emulation's memory access
/// faults there (the guest would have faulted the same way).
fn step_over(
    bp: &Breakpoint,
    regs: &kvm_regs,
    seg: (u64, u64),
    mm: &mut AddressSpace,
) -> Result<kvm_regs, u64> {
    let mut r = *regs;
    let read = |mm: &mut AddressSpace, a: u64| -> Result<u64, u64> {
        let mut b = [0u8; 8];
        mm.read(a, &mut b).map_err(|_| a)?;
        Ok(u64::from_le_bytes(b))
    };
    let push = |mm: &mut AddressSpace, r: &mut kvm_regs, v: u64| -> Result<(), u64> {
        let sp = r.rsp.wrapping_sub(8);
        mm.write(sp, &v.to_le_bytes()).map_err(|_| sp)?;
        r.rsp = sp;
        Ok(())
    };
    match &bp.step {
        StepOver::OutOfLine { .. } => r.rip = bp.slot,
        StepOver::Emulate(b) => match b {
            Branch::CallDirect { target, return_to } => {
                push(mm, &mut r, *return_to)?;
                r.rip = *target;
            }
            Branch::JmpDirect { target } => r.rip = *target,
            Branch::Conditional {
                cond,
                taken,
                not_taken,
            } => {
                r.rip = if cond.holds(r.rflags, r.rcx) {
                    *taken
                } else {
                    *not_taken
                }
            }
            Branch::CallIndirect { target, return_to } => {
                let t = indirect(target, &r, seg, mm)?;
                push(mm, &mut r, *return_to)?;
                r.rip = t;
            }
            Branch::JmpIndirect { target } => r.rip = indirect(target, &r, seg, mm)?,
            Branch::Ret { pop_extra } => {
                r.rip = read(mm, r.rsp)?;
                r.rsp = r.rsp.wrapping_add(8 + u64::from(*pop_extra));
            }
        },
    }
    Ok(r)
}

fn indirect(
    t: &decode::IndirectTarget,
    r: &kvm_regs,
    seg: (u64, u64),
    mm: &mut AddressSpace,
) -> Result<u64, u64> {
    use decode::{Reg64, SegmentBase};
    let reg = |x: Reg64| match x {
        Reg64::Rax => r.rax,
        Reg64::Rcx => r.rcx,
        Reg64::Rdx => r.rdx,
        Reg64::Rbx => r.rbx,
        Reg64::Rsp => r.rsp,
        Reg64::Rbp => r.rbp,
        Reg64::Rsi => r.rsi,
        Reg64::Rdi => r.rdi,
        Reg64::R8 => r.r8,
        Reg64::R9 => r.r9,
        Reg64::R10 => r.r10,
        Reg64::R11 => r.r11,
        Reg64::R12 => r.r12,
        Reg64::R13 => r.r13,
        Reg64::R14 => r.r14,
        Reg64::R15 => r.r15,
    };
    let base = |s: SegmentBase| match s {
        SegmentBase::Fs => seg.0,
        SegmentBase::Gs => seg.1,
    };
    let ea = t.effective_address(reg, base).unwrap_or(0);
    t.resolve(reg, base, |a| {
        let mut b = [0u8; 8];
        mm.read(a, &mut b).ok().map(|()| u64::from_le_bytes(b))
    })
    .ok_or(ea)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::{Location, Policy};

    fn point(name: &str, policy: Policy) -> RescueSpec {
        RescueSpec {
            name: name.into(),
            location: Location {
                module: None,
                function: introspect::FunctionSpec::Symbol(name.into()),
            },
            error_value: ErrorValue::Int(-1),
            policy,
        }
    }

    fn inject(nth: u64, every: u64, count: u64) -> Inject {
        Inject {
            spec: InjectSpec {
                location: Location {
                    module: None,
                    function: introspect::FunctionSpec::Symbol("f".into()),
                },
                nth,
                every,
                count,
                kind: FaultKind::Segv,
            },
            entry: None,
            problem: None,
            calls: 0,
            fired: 0,
        }
    }

    #[test]
    fn injections_fault_on_the_nth_call_then_every_m_up_to_a_count() {
        let fired =
            |mut j: Inject, calls: u64| -> Vec<u64> { (1..=calls).filter(|_| j.call()).collect() };
        assert_eq!(fired(inject(3, 0, 0), 20), [3]);
        assert_eq!(fired(inject(2, 3, 0), 12), [2, 5, 8, 11]);
        assert_eq!(fired(inject(1, 1, 4), 10), [1, 2, 3, 4]);
    }

    #[test]
    fn sampling_and_intervals_decide_which_entries_open_a_window() {
        let mut r = RescueState::new("/srv");
        let every3 = Policy {
            every: 3,
            ..Policy::default()
        };
        let spaced = Policy {
            min_interval_ms: 50,
            ..Policy::default()
        };
        r.add_points(vec![point("a", every3), point("b", spaced)])
            .expect("points");
        let t0 = Instant::now();
        let mut opened = Vec::new();
        for n in 1..=7 {
            r.points[0].stats.entries += 1;
            if r.wants_window(0, t0) {
                opened.push(n);
            }
        }
        assert_eq!(opened, [1, 4, 7]);
        assert_eq!(r.points[0].stats.sampled_out, 4);
        r.points[1].stats.entries += 1;
        assert!(r.wants_window(1, t0));
        r.points[1].last_window = Some(t0);
        r.points[1].stats.entries += 1;
        assert!(!r.wants_window(1, t0 + Duration::from_millis(10)));
        assert!(r.wants_window(1, t0 + Duration::from_millis(60)));
        r.set_enabled("b", false).expect("known point");
        assert!(!r.wants_window(1, t0 + Duration::from_secs(1)));
        assert!(r.set_enabled("nope", true).is_err());
        assert!(
            r.add_points(vec![point("a", Policy::default())]).is_err(),
            "names are unique"
        );
    }

    #[test]
    fn too_many_recoveries_a_minute_quarantine_the_point_until_it_is_enabled_again() {
        let mut r = RescueState::new("/srv");
        let pol = Policy {
            max_recoveries_per_minute: 3,
            ..Policy::default()
        };
        r.add_points(vec![point("p", pol)]).expect("points");
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(r.admit_recovery(0, t0 + Duration::from_secs(i), false));
        }
        assert!(!r.admit_recovery(0, t0 + Duration::from_secs(4), false));
        assert!(r.points[0].stats.quarantined);
        assert!(!r.wants_window(0, t0), "no windows while quarantined");
        // A minute later the old recoveries no longer count, but the quarantine holds
        // until the operator lifts it.
        r.set_enabled("p", true).expect("known point");
        assert!(r.admit_recovery(0, t0 + Duration::from_secs(70), true));
        assert_eq!(r.points[0].stats.recoveries, 4);
        assert_eq!(r.points[0].stats.hangs, 1);
    }

    #[test]
    fn windows_close_by_stack_depth_and_a_crash_finds_the_innermost_live_one() {
        let mut r = RescueState::new("/srv");
        r.add_points(vec![point("p", Policy::default())])
            .expect("points");
        let t0 = Instant::now();
        let w = |checkpoint, entry_rsp| Window {
            point: 0,
            name: String::new(),
            checkpoint,
            entry_rsp,
            return_to: 0,
            opened: t0,
            deadline: None,
        };
        // Recursion: the same function entered at three depths.
        r.push_window(7, w(1, 0x7000));
        let at_two = r.windows_snapshot();
        r.push_window(7, w(2, 0x6000));
        r.push_window(7, w(3, 0x5000));
        assert_eq!(r.window_for_crash(7, 0x4f00).map(|w| w.checkpoint), Some(3));
        assert_eq!(r.window_for_crash(7, 0x5800).map(|w| w.checkpoint), Some(2));
        assert_eq!(r.window_for_crash(8, 0x4f00).map(|w| w.checkpoint), None);
        let mut mm = AddressSpace::new(16 << 20).expect("address space");
        // The innermost returns (RSP = its entry + 8).
        assert_eq!(r.finished_windows(7, 0x5008, false), [3]);
        assert!(r.remove_window(7, 3, true, &mut mm));
        assert!(!r.remove_window(7, 3, true, &mut mm), "closed once");
        // A longjmp out of the second: the next entry at a shallower depth closes it.
        assert_eq!(r.finished_windows(7, 0x6800, true), [2]);
        assert!(r.remove_window(7, 2, true, &mut mm));
        assert_eq!(r.window_ids(7), [1]);
        assert_eq!(r.points[0].stats.commits, 2);
        // A rollback to a checkpoint taken when only the first was open.
        r.restore_windows(&at_two, &mut mm);
        assert_eq!(at_two.checkpoints(), [1]);
        assert_eq!(r.report().windows[&7].len(), 1);
        r.restore_windows(&WindowsSnapshot::default(), &mut mm);
        assert!(r.report().windows.is_empty());
    }
}
