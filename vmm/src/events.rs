//! Events the sandbox reports: crashes now, recoveries later. Each is printed as a log line
//! and, with `--events FILE`, appended to FILE as one JSON object per line.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::Serialize;

/// Errors of the event sink.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The events file cannot be opened.
    #[error("cannot open events file {path}: {source}")]
    Open {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A CPU exception's details.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExceptionInfo {
    /// Vector number.
    pub vector: u8,
    /// Mnemonic (`#PF`).
    pub name: &'static str,
    /// Error code pushed by the CPU (0 where none).
    pub error_code: u64,
}

/// The guest died of a signal.
#[derive(Debug, Clone, Serialize)]
pub struct CrashEvent {
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// Thread that crashed.
    pub tid: i32,
    /// Signal number Linux would have delivered.
    pub signal: i32,
    /// Its name.
    pub signal_name: String,
    /// si_code.
    pub si_code: i32,
    /// How it came about: "cpu exception", "tgkill", "kill", ...
    pub cause: String,
    /// Instruction pointer.
    pub rip: u64,
    /// Faulting address (CR2 for page faults), if the signal has one.
    pub fault_address: Option<u64>,
    /// The CPU exception, if one caused it.
    pub exception: Option<ExceptionInfo>,
    /// Innermost symbolized function (`name+0xoff`), if known.
    pub function: Option<String>,
    /// Backtrace, innermost first: `0x401234 name+0x14 (module)`.
    pub backtrace: Vec<String>,
}

/// A crash or hang inside a rescue window, recovered: the sandbox rolled back to the
/// window's checkpoint and the function returned its error value.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryEvent {
    /// The crash (signal 0 for a hang), with its backtrace before the rollback.
    #[serde(flatten)]
    pub crash: CrashEvent,
    /// The rescue point whose window was used.
    pub rescue_point: String,
    /// Its checkpoint.
    pub checkpoint: u64,
    /// What the function returned: the integer, or `"void"`.
    pub error_value: serde_json::Value,
    /// Pages written back.
    pub restored_pages: u64,
    /// The rollback, in microseconds.
    pub rollback_us: f64,
    /// From the fault reaching the VMM to the thread ready to run on, in microseconds.
    pub recovery_us: f64,
}

/// A rescue point exceeded its recoveries per minute: it is quarantined and the crash goes
/// on (the server is let to crash, or to hang).
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEvent {
    /// The crash that was not rescued.
    #[serde(flatten)]
    pub crash: CrashEvent,
    /// The point.
    pub rescue_point: String,
    /// Its limit.
    pub max_recoveries_per_minute: u32,
}

impl QuarantineEvent {
    /// For `crash` of point `name` with limit `max`.
    pub fn new(crash: CrashEvent, name: String, max: u32) -> QuarantineEvent {
        QuarantineEvent {
            crash,
            rescue_point: name,
            max_recoveries_per_minute: max,
        }
    }
}

/// Events kept for the console (`events`).
const RECENT: usize = 256;

/// Where events go.
#[derive(Debug, Default)]
pub struct EventSink {
    file: Option<std::fs::File>,
    recent: std::collections::VecDeque<serde_json::Value>,
}

impl EventSink {
    /// Log only, or also append to `path`.
    pub fn new(path: Option<&Path>) -> Result<EventSink, EventError> {
        let file = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    // Explicit: the VMM runs with umask 0 (the guest's umask is emulated).
                    .mode(0o644)
                    .open(p)
                    .map_err(|source| EventError::Open {
                        path: p.display().to_string(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(EventSink {
            file,
            recent: Default::default(),
        })
    }

    /// The most recent events (at most `last`), oldest first.
    pub fn recent(&self, last: usize) -> Vec<serde_json::Value> {
        let skip = self.recent.len().saturating_sub(last);
        self.recent.iter().skip(skip).cloned().collect()
    }

    /// Report a recovery.
    pub fn recovery(&mut self, e: &RecoveryEvent) {
        let c = &e.crash;
        let what = if c.signal == 0 {
            c.cause.clone()
        } else {
            format!("{} ({}) by {}", c.signal_name, c.signal, c.cause)
        };
        tracing::warn!(
            "rescued: {what} at {:#x} in {}; thread {}; rescue point {} returned {} (rollback to checkpoint {} in {:.0} µs, {} pages; recovered in {:.0} µs)",
            c.rip,
            c.function.as_deref().unwrap_or("??"),
            c.tid,
            e.rescue_point,
            e.error_value,
            e.checkpoint,
            e.rollback_us,
            e.restored_pages,
            e.recovery_us
        );
        for (i, f) in c.backtrace.iter().enumerate() {
            tracing::warn!("  #{i} {f}");
        }
        self.write("recovery", e);
    }

    /// Report a quarantine.
    pub fn quarantine(&mut self, e: &QuarantineEvent) {
        tracing::error!(
            "rescue point {} quarantined: more than {} recoveries in a minute; the {} is not rescued",
            e.rescue_point,
            e.max_recoveries_per_minute,
            if e.crash.signal == 0 { "hang" } else { "crash" }
        );
        self.write("quarantine", e);
    }

    /// Report a crash.
    pub fn crash(&mut self, e: &CrashEvent) {
        let place = e.function.as_deref().unwrap_or("??");
        let addr = e
            .fault_address
            .map(|a| format!(", fault address {a:#x}"))
            .unwrap_or_default();
        let exc = e
            .exception
            .as_ref()
            .map(|x| format!(", {} error {:#x}", x.name, x.error_code))
            .unwrap_or_default();
        tracing::error!(
            "guest crashed: {} ({}) by {} at {:#x} in {}{}{}; thread {}",
            e.signal_name,
            e.signal,
            e.cause,
            e.rip,
            place,
            addr,
            exc,
            e.tid
        );
        for (i, f) in e.backtrace.iter().enumerate() {
            tracing::error!("  #{i} {f}");
        }
        self.write("crash", e);
    }

    /// Record an internal error of the VMM (also logged).
    pub fn note(&mut self, message: &str) {
        #[derive(Serialize)]
        struct Note<'a> {
            time: f64,
            message: &'a str,
        }
        tracing::error!("{message}");
        self.write(
            "vmm-error",
            &Note {
                time: now(),
                message,
            },
        );
    }

    /// Report the guest's exit.
    pub fn exit(&mut self, status: i32) {
        #[derive(Serialize)]
        struct Exit {
            time: f64,
            status: i32,
        }
        tracing::info!(status, "guest exited");
        self.write(
            "exit",
            &Exit {
                time: now(),
                status,
            },
        );
    }

    fn write<T: Serialize>(&mut self, kind: &str, payload: &T) {
        #[derive(Serialize)]
        struct Line<'a, T> {
            event: &'a str,
            #[serde(flatten)]
            payload: &'a T,
        }
        let line = Line {
            event: kind,
            payload,
        };
        if let Ok(v) = serde_json::to_value(&line) {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(v);
        }
        let Some(f) = self.file.as_mut() else { return };
        match serde_json::to_string(&line) {
            Ok(mut s) => {
                s.push('\n');
                if let Err(e) = f.write_all(s.as_bytes()) {
                    tracing::warn!(error = %e, "cannot write event");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode event"),
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Mnemonic of an exception vector.
pub fn vector_name(v: u8) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "#??",
    }
}
