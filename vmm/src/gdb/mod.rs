//! A gdb remote stub for the sandbox (`run --gdb ADDR`), built on the gdbstub crate.
//!
//! One session at a time, on its own thread. While gdb has the target stopped, the
//! session holds the world stopped (every runner parked, see
//! [`crate::checkpoint::world`]); registers are the parked threads' states, memory is read
//! and written by guest virtual address through the VMM's address space. Breakpoints go
//! into the same breakpoint table as rescue points ([`crate::rescue`]), so one address can
//! be both. Watchpoints are page guards ([`crate::mm::Guard`]): the access faults, the
//! instruction is single-stepped with the page opened, and gdb is told after it
//! completed. Single steps use KVM's single-step trap.
//!
//! A session ends on detach, on a closed connection, or on a protocol error from a
//! malformed or hostile client; in every case gdb's breakpoints and watchpoints are
//! removed and the guest runs on.

mod arch;
mod debugger;
mod host_io;
mod libraries;
mod monitor;
mod target;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::{run_blocking, DisconnectReason, GdbStubBuilder};

pub use debugger::{Debugger, Stop, StopEvent, WatchKind, Watchpoint};

use crate::sandbox::Shared;
use target::{SandboxTarget, StopReason};

/// Largest packet gdb may send (it is told, in `qSupported`'s PacketSize).
const PACKET_BUFFER: usize = 64 * 1024;
/// How long a new connection may stay silent before it is dropped.
const FIRST_PACKET_TIMEOUT_MS: i32 = 10_000;

/// Errors of the gdb stub.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// A bad `--gdb` address.
    #[error("bad gdb address {0:?}: expected HOST:PORT or unix:PATH")]
    BadAddress(String),
    /// The listening socket could not be set up.
    #[error("cannot listen for gdb on {what}: {source}")]
    Listen {
        /// The address.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The world could not be stopped.
    #[error("cannot stop the sandbox: {0}")]
    Stop(String),
    /// The guest ended.
    #[error("the guest ended")]
    GuestEnded,
}

/// Where the stub listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = GdbError;

    fn from_str(s: &str) -> Result<Endpoint, GdbError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(GdbError::BadAddress(s.into()));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        s.parse()
            .map(Endpoint::Tcp)
            .map_err(|_| GdbError::BadAddress(s.into()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound gdb listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `endpoint` (a stale Unix socket file is replaced).
    pub fn bind(endpoint: &Endpoint) -> Result<Listener, GdbError> {
        let err = |source| GdbError::Listen {
            what: endpoint.to_string(),
            source,
        };
        match endpoint {
            Endpoint::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp).map_err(err),
            Endpoint::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(p).map_err(err)?;
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(err)
            }
        }
    }

    /// The address it listens on (with the port the system chose, for port 0).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Packets are small and answered one by one.
                s.set_nodelay(true)?;
                Ok(Conn::new(Stream::Tcp(s)))
            }
            Listener::Unix(l, _) => Ok(Conn::new(Stream::Unix(l.accept()?.0))),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A gdb connection, buffered both ways: gdbstub reads and writes one byte at a time, and
/// a syscall (and, with TCP_NODELAY, a segment) per byte would make large replies (host
/// I/O, memory) crawl.
#[derive(Debug)]
struct Conn {
    stream: Stream,
    /// Bytes received and not yet taken.
    input: std::collections::VecDeque<u8>,
    /// Bytes of the reply being written, sent at `flush`.
    output: Vec<u8>,
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 4096;

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            input: std::collections::VecDeque::new(),
            output: Vec::new(),
        }
    }

    fn fd(&self) -> RawFd {
        match &self.stream {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match &mut self.stream {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    /// Has a byte been received and not taken yet?
    fn buffered(&self) -> bool {
        !self.input.is_empty()
    }

    /// Read what the socket has (blocking until something, or end of stream: an error).
    fn fill(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; READ_CHUNK];
        let n = loop {
            match self.stream().read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.input.extend(&buf[..n]);
        Ok(())
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.output.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.output.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        let out = std::mem::take(&mut self.output);
        let r = self.stream().write_all(&out);
        self.output = out;
        self.output.clear();
        r?;
        self.stream().flush()
    }
}

impl ConnectionExt for Conn {
    fn read(&mut self) -> Result<u8, Self::Error> {
        if self.input.is_empty() {
            // Whatever gdbstub wrote so far answers what it read so far.
            Connection::flush(self)?;
            self.fill()?;
        }
        self.input
            .pop_front()
            .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        if let Some(b) = self.input.front() {
            return Ok(Some(*b));
        }
        let mut fds = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack; no wait.
        let n = unsafe { libc::poll(&mut fds, 1, 0) };
        if n <= 0 {
            return Ok(None);
        }
        self.fill()?;
        Ok(self.input.front().copied())
    }
}

/// The blocking event loop: wait for gdb's bytes or a thread's report, whichever first.
enum EventLoop<'a> {
    #[allow(dead_code)]
    Never(std::marker::PhantomData<&'a ()>),
}

type WaitError = run_blocking::WaitForStopReasonError<GdbError, std::io::Error>;

impl<'a> run_blocking::BlockingEventLoop for EventLoop<'a> {
    type Target = SandboxTarget<'a>;
    type Connection = Conn;
    type StopReason = StopReason;

    fn wait_for_stop_reason(
        target: &mut SandboxTarget<'a>,
        conn: &mut Conn,
    ) -> Result<run_blocking::Event<StopReason>, WaitError> {
        if target.is_stopped() {
            target.resume_world();
        }
        let debug = &target.shared.debug;
        // The ack of the resume packet, before waiting.
        Connection::flush(conn).map_err(WaitError::Connection)?;
        if conn.buffered() {
            let byte = conn.read().map_err(WaitError::Connection)?;
            return Ok(run_blocking::Event::IncomingData(byte));
        }
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: conn.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: debug.wake_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds on the stack.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(WaitError::Connection(e));
            }
            if fds[1].revents != 0 {
                if let Some(outcome) = debug.ended() {
                    return Ok(run_blocking::Event::TargetStopped(SandboxTarget::ended(
                        outcome,
                    )));
                }
                match target.halt() {
                    Ok(()) => {}
                    Err(GdbError::GuestEnded) => {
                        // The end is recorded before stops fail with it.
                        debug.drain_wakeups();
                        let outcome = debug
                            .ended()
                            .unwrap_or(crate::sandbox::RunOutcome::Killed(libc::SIGKILL));
                        return Ok(run_blocking::Event::TargetStopped(SandboxTarget::ended(
                            outcome,
                        )));
                    }
                    Err(e) => return Err(WaitError::Target(e)),
                }
                // Every report so far is taken below, and none can come while the world
                // is stopped: no wake-up is left over for an event already taken.
                debug.drain_wakeups();
                let events = debug.take_events();
                tracing::debug!(?events, "gdb: stopped");
                match events.first() {
                    Some(ev) => {
                        if events.len() > 1 {
                            tracing::debug!(
                                dropped = events.len() - 1,
                                "gdb: simultaneous stops of other threads are reported when they recur"
                            );
                        }
                        let reason = target.stop_reason(ev.tid, ev.stop);
                        return Ok(run_blocking::Event::TargetStopped(reason));
                    }
                    None => {
                        // Nothing to report (a wake-up that raced with the last
                        // stop): run on as gdb asked, steps and holds included.
                        target.apply_resume();
                        continue;
                    }
                }
            }
            if fds[0].revents != 0 {
                let byte = conn.read().map_err(WaitError::Connection)?;
                return Ok(run_blocking::Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut SandboxTarget<'a>) -> Result<Option<StopReason>, GdbError> {
        target.halt()?;
        Ok(Some(target.interrupted()))
    }
}

/// Serve gdb sessions on `listener`, one after another, for the life of the sandbox. With
/// `wait`, the first guest thread is held before its first instruction until a session
/// stops it.
pub(crate) fn spawn(shared: Arc<Shared>, listener: Listener, wait: bool) -> std::io::Result<()> {
    if wait {
        let pid = crate::process::lock(&shared.proc).pid;
        shared.debug.attach();
        shared.debug.hold(&[pid]);
    }
    // With --gdb-wait, until a session has attached, a connection that ends without one
    // (silent, garbage) leaves the guest held.
    let mut waiting = wait;
    std::thread::Builder::new()
        .name("gdb".into())
        .spawn(move || loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "gdb: accept failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            tracing::info!(on = %listener.local(), "gdb: session begins");
            let mut attached = false;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                session(&shared, conn, &mut attached)
            }));
            let ended = match outcome {
                Ok(Ok(reason)) => reason,
                Ok(Err(e)) => format!("ended by an error: {e}"),
                Err(_) => "ended by an internal error".into(),
            };
            let guest_ended = shared.debug.ended().is_some();
            waiting &= !attached;
            // However the session ended, nothing of gdb's stays behind.
            release(&shared, waiting);
            if waiting {
                tracing::info!("gdb: session {ended}; the guest still waits for gdb");
                continue;
            }
            tracing::info!("gdb: session {ended}; the guest runs on");
            if guest_ended {
                return;
            }
        })
        .map(|_| ())
}

/// Remove gdb's breakpoints and watch guards and let every thread run (but the first,
/// held for `--gdb-wait` if `keep_waiting`).
fn release(shared: &Arc<Shared>, keep_waiting: bool) {
    let stopped = shared.world.stop(&shared.proc).ok();
    target::remove_debug_state(shared);
    if keep_waiting {
        let pid = crate::process::lock(&shared.proc).pid;
        shared.debug.reset_waiting(pid);
    } else {
        shared.debug.detach();
    }
    drop(stopped);
    shared.world.notify();
    crate::rescue::watchdog::wake(shared);
}

/// One gdb session; how it ended.
fn session(shared: &Arc<Shared>, mut conn: Conn, attached: &mut bool) -> Result<String, String> {
    // gdb speaks first (`+`, `$qSupported...`) at once; a connection that says nothing
    // does not get to stop the guest.
    let mut first = libc::pollfd {
        fd: conn.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let ready = unsafe { libc::poll(&mut first, 1, FIRST_PACKET_TIMEOUT_MS) };
    if ready <= 0 {
        return Err(format!(
            "no packet within {} s of connecting",
            FIRST_PACKET_TIMEOUT_MS / 1000
        ));
    }
    // gdb's first byte is an ack, a packet or an interrupt; anything else is not gdb.
    match conn.peek() {
        Ok(Some(b'+' | b'$' | 0x03)) => {}
        Ok(Some(b)) => return Err(format!("not the gdb protocol (first byte {b:#04x})")),
        Ok(None) | Err(_) => return Err("closed before its first packet".into()),
    }
    shared.debug.attach();
    let mut target = SandboxTarget::new(shared);
    // The first guest thread may be a moment from starting (`--gdb-wait`): gdb needs a
    // thread to attach to.
    for _ in 0..100 {
        target.halt().map_err(|e| e.to_string())?;
        if target.has_threads() {
            break;
        }
        target.resume_world();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    *attached = true;
    shared.debug.take_events();
    // A fixed packet buffer: a client cannot make the VMM grow it without bound.
    let mut buffer = vec![0u8; PACKET_BUFFER];
    let stub = match GdbStubBuilder::new(conn)
        .with_packet_buffer(&mut buffer)
        .build()
    {
        Ok(s) => s,
        Err(e) => return Err(format!("cannot start the stub: {e}")),
    };
    let result = stub.run_blocking::<EventLoop<'_>>(&mut target);
    if target.is_stopped() {
        // Deadlines move past the stop; `release` then removes what gdb placed.
        target.resume_world();
    }
    match result {
        Ok(DisconnectReason::Disconnect) => Ok("detached".into()),
        Ok(DisconnectReason::Kill) => {
            // A self-healing appliance does not let a debugger kill the server it keeps.
            Ok("ended: gdb asked to kill the guest, which the stub refuses; detached".into())
        }
        Ok(DisconnectReason::TargetExited(code)) => Ok(format!("ended: the guest exited ({code})")),
        Ok(DisconnectReason::TargetTerminated(sig)) => {
            Ok(format!("ended: the guest was killed by signal {}", sig.0))
        }
        Err(e) => Err(format!("protocol or connection error: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "127.0.0.1:1234".parse::<Endpoint>().expect("tcp"),
            Endpoint::Tcp("127.0.0.1:1234".parse().expect("addr"))
        );
        assert_eq!(
            "unix:/run/g.sock".parse::<Endpoint>().expect("unix"),
            Endpoint::Unix("/run/g.sock".into())
        );
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("localhost".parse::<Endpoint>().is_err());
        assert!("127.0.0.1:99999".parse::<Endpoint>().is_err());
    }
}
