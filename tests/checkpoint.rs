//! Checkpoint and rollback of running servers through the control socket (`run --control
//! SOCK`, JSON lines: `checkpoint`, `rollback`, `release`, `digest`, `status`).
//!
//! Each test runs a copy of a server image (`images/out/NAME`, built by scripts/setup.sh)
//! under assure-vmm with `--control` and `--events` in its own temporary directory and a
//! free host port, drives it with its own client over 127.0.0.1 (RESP for redis, HTTP/1.1
//! for lighttpd, the memcached text protocol), and checks:
//!
//! - after a rollback, memory, registers and VMM state are those of the checkpoint (the
//!   digest of the restored state equals the checkpoint's) and clients see the old data;
//! - a thousand checkpoint → rollback → release cycles under load leave the server
//!   answering, every reply correct, and nothing leaked (host fds of the VMM process,
//!   guest memory in use, the checkpoint mirror, undo memory, threads);
//! - control errors are clear and harmless;
//! - a checkpoint that is only released is invisible to clients.
//!
//! What a client may legitimately see during rollbacks: a connection accepted since the
//! checkpoint is closed (EOF or reset), a request in flight may go unanswered (timeout),
//! and a value written after the checkpoint may revert to an older value or vanish. What
//! it must never see: a wrong reply to a request. So every client verifies (a) keys
//! written before the first checkpoint and never changed: always byte-exact, and (b)
//! per-connection request/response consistency: each reply has the shape and the key of
//! its request, and a value a client wrote is one it actually wrote to that key (never a
//! newer one than it wrote, never another key's). Disconnects and timeouts are counted,
//! wrong replies fail the test.
//!
//! Every load is bounded in count and time; all traffic is on 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::resp::*;
use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Message helpers (images and servers under the VMM are in tests/common)
// ---------------------------------------------------------------------------------------

/// The last `n` bytes of a log, for messages.
fn tail(log: &str, n: usize) -> &str {
    let mut start = log.len().saturating_sub(n);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

// ---------------------------------------------------------------------------------------
// A sandbox with a control socket
// ---------------------------------------------------------------------------------------

/// A server under the VMM with `--control SOCK --events FILE` in its temporary directory.
struct Sandbox {
    srv: Server,
    name: String,
    sock: PathBuf,
    events: PathBuf,
    _tmps: Vec<TempDir>,
}

/// What `status` says about resources, for leak checks.
#[derive(Debug, Clone, PartialEq)]
struct Usage {
    pid: i64,
    threads: Vec<i64>,
    memory_used: u64,
    mirror: u64,
    undo: u64,
    live: Vec<Value>,
    taken: u64,
    rollbacks: u64,
    releases: u64,
    uptime: f64,
}

impl Sandbox {
    /// The image `name` (its root file system first changed by `prepare`), with the
    /// guest's `guest_port` on a free host port.
    fn image(name: &str, guest_port: u16, prepare: impl FnOnce(&Path)) -> Sandbox {
        require_kvm();
        let (tmp, dir) = copy_image(name);
        prepare(&rootfs_of(&dir));
        let sock = tmp.path().join("ctl.sock");
        let events = tmp.path().join("events.jsonl");
        let srv = start_vmm(
            &dir,
            guest_port,
            &[
                "--control",
                sock.to_str().expect("utf-8 path"),
                "--events",
                events.to_str().expect("utf-8 path"),
            ],
        );
        Self::ready(srv, name, sock, events, vec![tmp])
    }

    /// The project's static bugsrv (small and quick to start).
    fn bugsrv() -> Sandbox {
        require_kvm();
        let root = root_with("ckpt-bugsrv", &guest_tools::bugsrv(), "bugsrv");
        let tmp = TempDir::new("ckpt-bugsrv-ctl");
        let sock = tmp.path().join("ctl.sock");
        let events = tmp.path().join("events.jsonl");
        let srv = Server::start(
            root.path(),
            &[
                "--control",
                sock.to_str().expect("utf-8 path"),
                "--events",
                events.to_str().expect("utf-8 path"),
            ],
            &["/bugsrv", "-p", "0"],
            "bugsrv: listening on",
        );
        Self::ready(srv, "bugsrv", sock, events, vec![root, tmp])
    }

    fn ready(
        srv: Server,
        name: &str,
        sock: PathBuf,
        events: PathBuf,
        tmps: Vec<TempDir>,
    ) -> Sandbox {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "{name}: no control socket at {}; log:\n{}",
                sock.display(),
                srv.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Sandbox {
            srv,
            name: name.into(),
            sock,
            events,
            _tmps: tmps,
        }
    }

    fn port(&self) -> u16 {
        self.srv.port
    }

    /// For messages: the VMM process's state, the log's error lines (crashes, panics,
    /// the guest's own complaints), then the log's tail.
    fn log(&self) -> String {
        let pid = self.srv.child.id();
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(String::from))
            })
            .map(|c| match c.as_str() {
                "Z" | "X" => format!("VMM process {pid} has EXITED"),
                c => format!("VMM process {pid} is running (state {c})"),
            })
            .unwrap_or_else(|| format!("VMM process {pid} is gone"));
        let log = self.srv.stderr_text();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("ERROR")
                    || l.contains("panicked")
                    || l.contains("crashed")
                    || l.contains("Unexpected")
            })
            .take(40)
            .collect();
        format!(
            "{state}; error lines of the log:\n{}\n--- log tail:\n{}",
            errors.join("\n"),
            tail(&log, 2500)
        )
    }

    /// One request line on a fresh connection; the answer object. (One connection per
    /// request: the sandbox's main thread serves a connection until it closes.)
    fn ctl(&self, req: &Value) -> Value {
        let line = req.to_string();
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!(
                "{}: control request {line}: {what}: {e}; {}",
                self.name,
                self.log()
            )
        };
        let mut s = UnixStream::connect(&self.sock).unwrap_or_else(|e| fail("connect", &e));
        // Generous: a first checkpoint copies all memory in use, a digest hashes it all.
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        s.set_write_timeout(Some(Duration::from_secs(10))).ok();
        s.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| fail("send", &e));
        let mut answer = String::new();
        BufReader::new(&s)
            .read_line(&mut answer)
            .unwrap_or_else(|e| fail("read the answer", &e));
        if answer.is_empty() {
            fail("no answer", &"the socket closed");
        }
        serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| fail(&format!("answer {answer:?}"), &e))
    }

    /// [`Sandbox::ctl`], which must answer `ok: true`.
    fn ok(&self, req: Value) -> Value {
        let a = self.ctl(&req);
        assert_eq!(
            a["ok"],
            true,
            "{}: {req} answered {a}; log:\n{}",
            self.name,
            self.log()
        );
        a
    }

    /// `checkpoint`: the answer (its id is checked to be a number).
    fn checkpoint(&self, digest: bool) -> Value {
        let req = if digest {
            json!({"cmd": "checkpoint", "digest": true})
        } else {
            json!({"cmd": "checkpoint"})
        };
        let a = self.ok(req);
        assert!(
            a["id"].as_u64().is_some(),
            "checkpoint answer without id: {a}"
        );
        a
    }

    fn rollback(&self, id: u64, digest: bool) -> Value {
        let req = if digest {
            json!({"cmd": "rollback", "id": id, "digest": true})
        } else {
            json!({"cmd": "rollback", "id": id})
        };
        let a = self.ok(req);
        assert_eq!(a["id"].as_u64(), Some(id), "rollback answer for {id}: {a}");
        a
    }

    fn release(&self, id: u64) -> Value {
        let a = self.ok(json!({"cmd": "release", "id": id}));
        assert_eq!(a["id"].as_u64(), Some(id), "release answer for {id}: {a}");
        a
    }

    fn status(&self) -> Value {
        self.ok(json!({"cmd": "status"}))
    }

    fn usage(&self) -> Usage {
        let s = self.status();
        let c = &s["checkpoints"];
        let num = |v: &Value, what: &str| -> u64 {
            v.as_u64()
                .unwrap_or_else(|| panic!("{}: status lacks {what}: {s}", self.name))
        };
        let mut threads: Vec<i64> = s["threads"]
            .as_array()
            .unwrap_or_else(|| panic!("status lacks threads: {s}"))
            .iter()
            .map(|t| t.as_i64().expect("tid"))
            .collect();
        threads.sort_unstable();
        Usage {
            pid: s["pid"].as_i64().expect("status.pid"),
            threads,
            memory_used: num(&s["memory_used_bytes"], "memory_used_bytes"),
            mirror: num(&c["mirror_bytes"], "checkpoints.mirror_bytes"),
            undo: num(&c["undo_bytes"], "checkpoints.undo_bytes"),
            live: c["live"]
                .as_array()
                .unwrap_or_else(|| panic!("status lacks checkpoints.live: {s}"))
                .clone(),
            taken: num(&c["taken"], "checkpoints.taken"),
            rollbacks: num(&c["rollbacks"], "checkpoints.rollbacks"),
            releases: num(&c["releases"], "checkpoints.releases"),
            uptime: s["uptime_seconds"].as_f64().expect("status.uptime_seconds"),
        }
    }

    /// Open host fds of the assure-vmm process.
    fn host_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.srv.child.id()))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("{}: /proc/PID/fd of the VMM: {e}", self.name))
    }

    /// The host fd count once it has stopped changing (two equal readings 300 ms apart,
    /// within 10 s).
    fn settled_fds(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.host_fds();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.host_fds();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Wait (up to 10 s) for the host fd count to come back to `want`; the last count.
    fn fds_back_to(&self, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.host_fds();
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The VMM is the same process as at the start, still running, and reported no crash,
    /// internal error or exit.
    fn assert_same_and_healthy(&mut self, first: &Usage) {
        let name = self.name.clone();
        assert!(
            self.srv.is_running(),
            "{name}: the VMM exited; log:\n{}",
            self.log()
        );
        let now = self.usage();
        assert_eq!(now.pid, first.pid, "{name}: the guest pid changed");
        assert_eq!(
            now.pid,
            i64::from(self.srv.child.id() as i32),
            "{name}: the guest pid is the VMM's"
        );
        assert!(
            now.uptime >= first.uptime,
            "{name}: uptime went back from {} to {} s: the sandbox restarted",
            first.uptime,
            now.uptime
        );
        let bad: Vec<Value> = read_events(&self.events)
            .into_iter()
            .filter(|e| matches!(e["event"].as_str(), Some("crash" | "vmm-error" | "exit")))
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: events {bad:?}; log:\n{}",
            self.log()
        );
        let log = self.srv.stderr_text();
        assert!(
            !log.contains("panicked"),
            "{name}: the VMM panicked; log:\n{}",
            tail(&log, 4000)
        );
    }
}

/// Average and maximum of `timing_us.total` over answers, in ms (None if not reported).
fn timing_ms(answers: &[f64]) -> String {
    if answers.is_empty() {
        return "n/a".into();
    }
    let avg = answers.iter().sum::<f64>() / answers.len() as f64 / 1000.0;
    let max = answers.iter().cloned().fold(0.0, f64::max) / 1000.0;
    format!("avg {avg:.2} ms, max {max:.2} ms")
}

// ---------------------------------------------------------------------------------------
// Load clients
// ---------------------------------------------------------------------------------------

/// Why an operation failed.
#[derive(Debug)]
enum OpError {
    /// The connection closed or was reset (expected for connections a rollback closes).
    Closed(String),
    /// No answer in time (a request in flight may be lost to a rollback).
    Timeout(String),
    /// A reply that does not belong to its request, or a wrong value: always a failure.
    Wrong(String),
}

impl From<std::io::Error> for OpError {
    fn from(e: std::io::Error) -> OpError {
        use std::io::ErrorKind::*;
        match e.kind() {
            WouldBlock | TimedOut => OpError::Timeout(e.to_string()),
            InvalidData => OpError::Wrong(e.to_string()),
            _ => OpError::Closed(e.to_string()),
        }
    }
}

/// What one client thread saw.
#[derive(Debug, Default, Clone)]
struct ClientStats {
    ok: u64,
    connections: u64,
    connect_failures: u64,
    disconnects: u64,
    timeouts: u64,
    /// Graceful closes the protocol announced (HTTP `Connection: close`).
    server_closes: u64,
    wrong: u64,
    wrong_examples: Vec<String>,
    error_examples: Vec<String>,
}

impl ClientStats {
    fn add(&mut self, o: &ClientStats) {
        self.ok += o.ok;
        self.connections += o.connections;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.timeouts += o.timeouts;
        self.server_closes += o.server_closes;
        self.wrong += o.wrong;
        for e in &o.wrong_examples {
            if self.wrong_examples.len() < 10 {
                self.wrong_examples.push(e.clone());
            }
        }
        for e in &o.error_examples {
            if self.error_examples.len() < 10 {
                self.error_examples.push(e.clone());
            }
        }
    }
}

/// Client threads running until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    handles: Vec<JoinHandle<ClientStats>>,
}

impl Load {
    /// `n` threads running `f(thread index, stop flag, shared op counter)`.
    fn start<F>(n: usize, f: F) -> Load
    where
        F: Fn(usize, &AtomicBool, &AtomicU64) -> ClientStats + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let f = Arc::new(f);
        let handles = (0..n)
            .map(|i| {
                let (stop, ops, f) = (stop.clone(), ops.clone(), f.clone());
                std::thread::spawn(move || f(i, &stop, &ops))
            })
            .collect();
        Load { stop, ops, handles }
    }

    /// Successful operations so far (all threads).
    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Wait until `n` more operations have succeeded (bounded); panics if they do not.
    fn wait_for_ops(&self, n: u64, what: &str) {
        let start = self.ops();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ops() < start + n {
            assert!(
                Instant::now() < deadline,
                "{what}: the clients made {} of {n} operations in 30 s",
                self.ops() - start
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop the threads and sum what they saw.
    fn stop(mut self) -> ClientStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = ClientStats::default();
        for h in self.handles.drain(..) {
            total.add(&h.join().expect("client thread"));
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The loop of one client thread: connect, run `step(conn, i)` until an error or a close
/// (then reconnect), until `stop`. `step` returns Ok(true) to go on with the connection,
/// Ok(false) when the server announced a close.
fn client_loop<S>(
    port: u16,
    read_timeout: Duration,
    stop: &AtomicBool,
    ops: &AtomicU64,
    mut open: impl FnMut(TcpStream) -> S,
    mut step: impl FnMut(&mut S, u64) -> Result<bool, OpError>,
) -> ClientStats {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut st = ClientStats::default();
    let mut i = 0u64;
    let note = |v: &mut Vec<String>, s: String| {
        if v.len() < 10 {
            v.push(s);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) => {
                st.connect_failures += 1;
                note(&mut st.error_examples, format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        s.set_read_timeout(Some(read_timeout)).ok();
        s.set_write_timeout(Some(read_timeout)).ok();
        s.set_nodelay(true).ok();
        st.connections += 1;
        let mut conn = open(s);
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            match step(&mut conn, i) {
                Ok(keep) => {
                    st.ok += 1;
                    ops.fetch_add(1, Ordering::Relaxed);
                    if !keep {
                        st.server_closes += 1;
                        break;
                    }
                }
                Err(OpError::Closed(e)) => {
                    st.disconnects += 1;
                    note(&mut st.error_examples, format!("op {i}: closed: {e}"));
                    break;
                }
                Err(OpError::Timeout(e)) => {
                    st.timeouts += 1;
                    note(&mut st.error_examples, format!("op {i}: timeout: {e}"));
                    break;
                }
                Err(OpError::Wrong(e)) => {
                    st.wrong += 1;
                    note(&mut st.wrong_examples, format!("op {i}: {e}"));
                    break;
                }
            }
        }
    }
    st
}

/// Keys written once before the first checkpoint and never changed: their values.
const STABLE_KEYS: usize = 200;

fn stable_key(k: usize) -> String {
    format!("stable:{k:04}")
}

/// `stable-K-` then 16..~1.5 KB of arbitrary bytes (CR, LF, NUL included).
fn stable_value(k: usize) -> Vec<u8> {
    let mut v = format!("stable-{k}-").into_bytes();
    v.extend(pseudo_random(7000 + k as u64, 16 + (k * 53) % 1500));
    v
}

/// Keys a client thread rewrites all the time (each thread its own).
const VOL_KEYS: usize = 32;

fn vol_key(t: usize, j: usize) -> String {
    format!("vol:{t}:{j}")
}

/// `vol:T:J:SEQ:` then SEQ % 64 `v`s.
fn vol_value(t: usize, j: usize, seq: u64) -> Vec<u8> {
    let mut v = format!("vol:{t}:{j}:{seq}:").into_bytes();
    v.extend(std::iter::repeat_n(b'v', (seq % 64) as usize));
    v
}

/// A value read back from `vol:T:J`: one this thread wrote to that key (sequence number up
/// to the newest it sent), or an error naming what is wrong.
fn check_vol(t: usize, j: usize, newest: u64, got: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(got);
    let parts: Vec<&str> = text.splitn(5, ':').collect();
    let seq = match parts.as_slice() {
        ["vol", tt, jj, seq, _] if *tt == t.to_string() && *jj == j.to_string() => {
            seq.parse::<u64>().ok()
        }
        _ => None,
    };
    match seq {
        Some(s) if s <= newest && vol_value(t, j, s) == got => Ok(()),
        Some(s) => Err(format!(
            "{}: value with sequence {s}, but the newest written is {newest}: {}",
            vol_key(t, j),
            short(got)
        )),
        None => Err(format!(
            "{}: a value that is not this key's: {}",
            vol_key(t, j),
            short(got)
        )),
    }
}

/// Per-thread record of what was written to each of its volatile keys: the newest
/// sequence number sent (recorded before sending: the server may apply a request whose
/// reply is lost).
struct VolState {
    t: usize,
    seq: u64,
    newest: Vec<Option<u64>>,
}

impl VolState {
    fn new(t: usize) -> VolState {
        VolState {
            t,
            seq: 0,
            newest: vec![None; VOL_KEYS],
        }
    }

    /// The next value to write to key `j`.
    fn next(&mut self, j: usize) -> Vec<u8> {
        self.seq += 1;
        self.newest[j] = Some(self.seq);
        vol_value(self.t, j, self.seq)
    }

    /// Check a GET of key `j`: absent, or a value this thread wrote to it.
    fn check(&self, j: usize, got: Option<&[u8]>) -> Result<(), OpError> {
        match (got, self.newest[j]) {
            (None, _) => Ok(()),
            (Some(v), None) => Err(OpError::Wrong(format!(
                "{} was never written, but GET returned {}",
                vol_key(self.t, j),
                short(v)
            ))),
            (Some(v), Some(n)) => check_vol(self.t, j, n, v).map_err(OpError::Wrong),
        }
    }
}

// ---------------------------------------------------------------------------------------
// redis: RESP over TcpStream
// ---------------------------------------------------------------------------------------

struct Redis {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Redis {
    fn new(s: TcpStream) -> Redis {
        Redis {
            r: BufReader::new(s.try_clone().expect("clone socket")),
            w: s,
        }
    }

    /// A connection for the test's own checks (fails the test if it cannot connect).
    fn connect(port: u16) -> Redis {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.set_write_timeout(Some(Duration::from_secs(30))).ok();
        Redis::new(s)
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Resp> {
        self.w.write_all(&resp(args))?;
        read_resp(&mut self.r)
    }

    /// Send all commands, then read one reply per command.
    fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> std::io::Result<Vec<Resp>> {
        let mut buf = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            buf.extend(resp(&args));
        }
        self.w.write_all(&buf)?;
        cmds.iter().map(|_| read_resp(&mut self.r)).collect()
    }

    /// A call that must succeed (for the test's own checks).
    fn must(&mut self, args: &[&[u8]]) -> Resp {
        let what: Vec<String> = args.iter().map(|a| short(a)).collect();
        self.call(args)
            .unwrap_or_else(|e| panic!("redis {what:?}: {e}"))
    }

    fn dbsize(&mut self) -> i64 {
        match self.must(&[b"DBSIZE"]) {
            Resp::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        }
    }
}

/// SET every stable key (one connection, closed afterwards).
fn redis_seed(port: u16) {
    let mut c = Redis::connect(port);
    let cmds: Vec<Vec<Vec<u8>>> = (0..STABLE_KEYS)
        .map(|k| vec![b"SET".to_vec(), stable_key(k).into_bytes(), stable_value(k)])
        .collect();
    for (k, r) in c.pipeline(&cmds).expect("seed").into_iter().enumerate() {
        assert_eq!(r, Resp::Simple("OK".into()), "SET {}", stable_key(k));
    }
}

/// Every stable key is there with its exact value (a new connection).
fn redis_check_stable(port: u16) {
    let p = redis_stable_problems(port);
    assert!(p.is_empty(), "stable keys on a new connection: {p:#?}");
}

/// What is wrong with the stable keys, read on a new connection (empty: all exact).
fn redis_stable_problems(port: u16) -> Vec<String> {
    let mut c = Redis::connect(port);
    let cmds: Vec<Vec<Vec<u8>>> = (0..STABLE_KEYS)
        .map(|k| vec![b"GET".to_vec(), stable_key(k).into_bytes()])
        .collect();
    let replies = match c.pipeline(&cmds) {
        Ok(r) => r,
        Err(e) => return vec![format!("GET of the stable keys on a new connection: {e}")],
    };
    replies
        .into_iter()
        .enumerate()
        .filter(|(k, r)| *r != Resp::Bulk(Some(stable_value(*k))))
        .map(|(k, r)| format!("{}: {r:?} instead of its value", stable_key(k)))
        .take(10)
        .collect()
}

/// One redis client thread: SET a volatile key; GET a stable key (exact); GET a volatile
/// key (absent or a value this thread wrote to it).
fn redis_client(
    port: u16,
    t: usize,
    read_timeout: Duration,
    stop: &AtomicBool,
    ops: &AtomicU64,
) -> ClientStats {
    let mut vol = VolState::new(t);
    client_loop(port, read_timeout, stop, ops, Redis::new, |c, i| {
        match i % 3 {
            0 => {
                let j = (i / 3) as usize % VOL_KEYS;
                let key = vol_key(t, j);
                let v = vol.next(j);
                match c.call(&[b"SET", key.as_bytes(), &v])? {
                    Resp::Simple(s) if s == "OK" => {}
                    other => return Err(OpError::Wrong(format!("SET {key}: {other:?}"))),
                }
            }
            1 => {
                let k = (t * 37 + i as usize) % STABLE_KEYS;
                let key = stable_key(k);
                match c.call(&[b"GET", key.as_bytes()])? {
                    Resp::Bulk(Some(v)) if v == stable_value(k) => {}
                    Resp::Bulk(Some(v)) => {
                        return Err(OpError::Wrong(format!(
                            "GET {key}: {} instead of its value",
                            short(&v)
                        )))
                    }
                    other => return Err(OpError::Wrong(format!("GET {key}: {other:?}"))),
                }
            }
            _ => {
                let j = (i as usize * 7 + 3) % VOL_KEYS;
                let key = vol_key(t, j);
                match c.call(&[b"GET", key.as_bytes()])? {
                    Resp::Bulk(v) => vol.check(j, v.as_deref())?,
                    other => return Err(OpError::Wrong(format!("GET {key}: {other:?}"))),
                }
            }
        }
        Ok(true)
    })
}

// ---------------------------------------------------------------------------------------
// lighttpd: HTTP/1.1 keep-alive over TcpStream
// ---------------------------------------------------------------------------------------

/// Files written into the docroot of the copy: (URL path, content). Different sizes, so a
/// response that belongs to another request cannot pass.
fn web_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("/ck/a.txt".into(), b"checkpoint test file a\n".repeat(5)),
        ("/ck/b.bin".into(), pseudo_random(11, 10_007)),
        ("/ck/c.bin".into(), pseudo_random(12, 70_001)),
    ]
}

struct Http {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Http {
    fn new(s: TcpStream) -> Http {
        Http {
            r: BufReader::new(s.try_clone().expect("clone socket")),
            w: s,
        }
    }

    /// GET `path` on this connection: (status, the server announced a close, body).
    fn get(&mut self, path: &str) -> std::io::Result<(u16, bool, Vec<u8>)> {
        self.w
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
        let status_line = read_crlf(&mut self.r)?;
        let sl = String::from_utf8_lossy(&status_line).into_owned();
        let status = sl
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| wrong(format!("GET {path}: status line {}", short(&status_line))))?;
        let mut len = None;
        let mut close = false;
        loop {
            let h = read_crlf(&mut self.r)?;
            if h.is_empty() {
                break;
            }
            let h = String::from_utf8_lossy(&h).to_ascii_lowercase();
            if let Some(v) = h.strip_prefix("content-length:") {
                len = Some(
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| wrong(format!("GET {path}: {h}")))?,
                );
            } else if let Some(v) = h.strip_prefix("connection:") {
                close = v.trim() == "close";
            }
        }
        let len = len.ok_or_else(|| wrong(format!("GET {path}: no Content-Length")))?;
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body)?;
        Ok((status, close, body))
    }
}

fn http_client(
    port: u16,
    t: usize,
    read_timeout: Duration,
    stop: &AtomicBool,
    ops: &AtomicU64,
) -> ClientStats {
    let files = web_files();
    client_loop(port, read_timeout, stop, ops, Http::new, |c, i| {
        let (path, want) = &files[(i as usize + t) % files.len()];
        let (status, close, body) = c.get(path)?;
        if status != 200 {
            return Err(OpError::Wrong(format!("GET {path}: status {status}")));
        }
        if body != *want {
            return Err(OpError::Wrong(format!(
                "GET {path}: body of {} bytes differs from the file ({} bytes)",
                body.len(),
                want.len()
            )));
        }
        Ok(!close)
    })
}

/// Each file once, byte-exact, on a new connection.
fn http_check_files(port: u16) {
    let p = http_file_problems(port);
    assert!(p.is_empty(), "the files on a new connection: {p:#?}");
}

/// What is wrong with the files, read on a new connection (empty: all byte-exact).
fn http_file_problems(port: u16) -> Vec<String> {
    let s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return vec![format!("connect: {e}")],
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut c = Http::new(s);
    let mut problems = Vec::new();
    for (path, want) in web_files() {
        match c.get(&path) {
            Ok((200, _, body)) if body == want => {}
            Ok((200, _, body)) => problems.push(format!(
                "GET {path}: body of {} bytes differs from the file ({} bytes)",
                body.len(),
                want.len()
            )),
            Ok((status, _, _)) => problems.push(format!("GET {path}: status {status}")),
            Err(e) => {
                problems.push(format!("GET {path}: {e}"));
                break;
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// memcached: the text protocol over TcpStream
// ---------------------------------------------------------------------------------------

struct Memc {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Memc {
    fn new(s: TcpStream) -> Memc {
        Memc {
            r: BufReader::new(s.try_clone().expect("clone socket")),
            w: s,
        }
    }

    fn connect(port: u16) -> Memc {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to memcached");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.set_write_timeout(Some(Duration::from_secs(30))).ok();
        Memc::new(s)
    }

    fn set(&mut self, key: &str, v: &[u8]) -> std::io::Result<()> {
        let mut req = format!("set {key} 0 0 {}\r\n", v.len()).into_bytes();
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
        self.w.write_all(&req)?;
        let line = read_crlf(&mut self.r)?;
        if line != b"STORED" {
            return Err(wrong(format!("set {key}: {}", short(&line))));
        }
        Ok(())
    }

    fn get(&mut self, key: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.w.write_all(format!("get {key}\r\n").as_bytes())?;
        let line = read_crlf(&mut self.r)?;
        if line == b"END" {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let f: Vec<&str> = text.split(' ').collect();
        let n = match f.as_slice() {
            ["VALUE", k, _flags, n] if *k == key => n.parse::<usize>().ok(),
            _ => None,
        }
        .ok_or_else(|| wrong(format!("get {key}: {}", short(&line))))?;
        let mut data = vec![0u8; n + 2];
        self.r.read_exact(&mut data)?;
        if !data.ends_with(b"\r\n") {
            return Err(wrong(format!("get {key}: value not followed by CRLF")));
        }
        data.truncate(n);
        let end = read_crlf(&mut self.r)?;
        if end != b"END" {
            return Err(wrong(format!("get {key}: {} instead of END", short(&end))));
        }
        Ok(Some(data))
    }
}

fn memc_seed(port: u16) {
    let mut c = Memc::connect(port);
    for k in 0..STABLE_KEYS {
        c.set(&stable_key(k), &stable_value(k))
            .unwrap_or_else(|e| panic!("set {}: {e}", stable_key(k)));
    }
}

/// What is wrong with the stable keys, read on a new connection (empty: all exact).
fn memc_stable_problems(port: u16) -> Vec<String> {
    let mut c = Memc::connect(port);
    let mut problems = Vec::new();
    for k in 0..STABLE_KEYS {
        match c.get(&stable_key(k)) {
            Ok(got) if got.as_deref() == Some(stable_value(k).as_slice()) => {}
            Ok(got) => problems.push(format!(
                "{}: {:?} instead of its value",
                stable_key(k),
                got.as_deref().map(short)
            )),
            Err(e) => {
                problems.push(format!("get {}: {e}", stable_key(k)));
                break;
            }
        }
    }
    problems.truncate(10);
    problems
}

fn memc_client(
    port: u16,
    t: usize,
    read_timeout: Duration,
    stop: &AtomicBool,
    ops: &AtomicU64,
) -> ClientStats {
    let mut vol = VolState::new(t);
    client_loop(port, read_timeout, stop, ops, Memc::new, |c, i| {
        match i % 3 {
            0 => {
                let j = (i / 3) as usize % VOL_KEYS;
                let v = vol.next(j);
                c.set(&vol_key(t, j), &v)?;
            }
            1 => {
                let k = (t * 37 + i as usize) % STABLE_KEYS;
                let got = c.get(&stable_key(k))?;
                if got.as_deref() != Some(stable_value(k).as_slice()) {
                    return Err(OpError::Wrong(format!(
                        "get {}: {:?} instead of its value",
                        stable_key(k),
                        got.as_deref().map(short)
                    )));
                }
            }
            _ => {
                let j = (i as usize * 7 + 3) % VOL_KEYS;
                let got = c.get(&vol_key(t, j))?;
                vol.check(j, got.as_deref())?;
            }
        }
        Ok(true)
    })
}

// ---------------------------------------------------------------------------------------
// Cycles under load, and leak checks
// ---------------------------------------------------------------------------------------

/// Tolerance for guest memory in use and the checkpoint mirror between before and after
/// the cycles: 1 MiB (256 pages). A leak of one page every four of 1,000 cycles exceeds it;
/// the servers' working sets are bounded (fixed key and file sets).
const MEM_TOLERANCE: u64 = 1 << 20;

/// `cycles` times: checkpoint, a pause of `pause`, rollback to it, release it. Checks each
/// answer (and the digests of the cycles that ask for them); returns the
/// `timing_us.total` of the checkpoints and of the rollbacks without digest.
fn run_cycles(sb: &Sandbox, cycles: usize, pause: Duration) -> (Vec<f64>, Vec<f64>) {
    let mut cps = Vec::with_capacity(cycles);
    let mut rbs = Vec::with_capacity(cycles);
    let t0 = Instant::now();
    for c in 0..cycles {
        let step = |req: Value| -> Value {
            let a = sb.ctl(&req);
            assert_eq!(
                a["ok"],
                true,
                "{}: cycle {} of {cycles}: {req} answered {a}; {}",
                sb.name,
                c + 1,
                sb.log()
            );
            a
        };
        // Digests on the first cycles and every 25th: the restored state must hash as
        // the checkpoint's (a page written since and not put back shows here, before it
        // can crash the guest).
        let digest = c < 10 || c % 25 == 0;
        let cp = step(json!({"cmd": "checkpoint", "digest": digest}));
        let id = cp["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("checkpoint answer without id: {cp}"));
        if let Some(t) = cp["timing_us"]["total"].as_f64() {
            if !digest {
                cps.push(t);
            }
        }
        std::thread::sleep(pause);
        let rb = step(json!({"cmd": "rollback", "id": id, "digest": digest}));
        assert_eq!(
            rb["id"].as_u64(),
            Some(id),
            "rollback answer for {id}: {rb}"
        );
        if digest {
            assert!(
                cp["digest"].is_string() && rb["digest"] == cp["digest"],
                "{}: cycle {} of {cycles}: the state restored by the rollback does not hash \
                 as checkpoint {id}: checkpoint {cp}, rollback {rb}; {}",
                sb.name,
                c + 1,
                sb.log()
            );
        }
        if let Some(t) = rb["timing_us"]["total"].as_f64() {
            if !digest {
                rbs.push(t);
            }
        }
        let rl = step(json!({"cmd": "release", "id": id}));
        assert_eq!(rl["id"].as_u64(), Some(id), "release answer for {id}: {rl}");
        if (c + 1) % 250 == 0 {
            eprintln!(
                "[{}] {} cycles in {:.1} s",
                sb.name,
                c + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    (cps, rbs)
}

/// The whole cycle test: a warm-up checkpoint and release with no client connected (then
/// the baseline host fd count), the load started, one warm-up cycle, the baseline usage,
/// `cycles` cycles, then every check.
fn cycles_under_load(
    sb: &mut Sandbox,
    cycles: usize,
    start_load: impl FnOnce() -> Load,
    check_data: impl Fn(u16) -> Vec<String>,
) {
    let name = sb.name.clone();
    let t_start = Instant::now();
    let first = sb.usage();

    // Warm-up with no client: the first checkpoint builds whatever persists (the mirror).
    let cp = sb.checkpoint(false);
    sb.release(cp["id"].as_u64().expect("id"));
    let fds0 = sb.settled_fds();

    let load = start_load();
    load.wait_for_ops(200, &format!("{name} before the cycles"));
    // One full warm-up cycle under load, then the baseline.
    let cp = sb.checkpoint(false);
    let id = cp["id"].as_u64().expect("id");
    std::thread::sleep(Duration::from_millis(3));
    sb.rollback(id, false);
    sb.release(id);
    load.wait_for_ops(200, &format!("{name} after the warm-up cycle"));
    let before = sb.usage();
    assert!(
        before.live.is_empty(),
        "{name}: live checkpoints: {before:?}"
    );
    assert_eq!(before.undo, 0, "{name}: undo bytes with no live checkpoint");

    let ops0 = load.ops();
    let t_cycles = Instant::now();
    let (cps, rbs) = run_cycles(sb, cycles, Duration::from_millis(3));
    let cycles_time = t_cycles.elapsed();
    let ops_during = load.ops() - ops0;
    let after = sb.usage();
    load.wait_for_ops(100, &format!("{name} after the cycles"));
    let stats = load.stop();

    eprintln!(
        "[{name}] {cycles} cycles in {:.1} s; checkpoint {}; rollback {}; client ops during \
         the cycles {ops_during}; clients: {} ok, {} connections, {} disconnects, {} \
         timeouts, {} server closes, {} connect failures, {} wrong; usage before {before:?}, \
         after {after:?}",
        cycles_time.as_secs_f64(),
        timing_ms(&cps),
        timing_ms(&rbs),
        stats.ok,
        stats.connections,
        stats.disconnects,
        stats.timeouts,
        stats.server_closes,
        stats.connect_failures,
        stats.wrong
    );

    // Every check below is collected, then all failures are reported together.
    let mut problems: Vec<String> = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    // The stored data, on a new connection (tells lost data from a confused connection).
    let fresh = check_data(sb.port());
    expect(
        fresh.is_empty(),
        format!("a new connection after the cycles found: {fresh:#?}"),
    );
    // Every reply was right.
    expect(
        stats.wrong == 0,
        format!(
            "{} wrong replies to the clients, e.g. {:#?} (other client errors: {:#?})",
            stats.wrong, stats.wrong_examples, stats.error_examples
        ),
    );
    // The load really ran during the cycles (otherwise the test shows nothing).
    expect(
        ops_during > 0,
        format!(
            "no client operation succeeded during the {cycles} cycles; client errors {:#?}",
            stats.error_examples
        ),
    );
    // The counters saw exactly our cycles.
    let deltas = (
        i128::from(after.taken) - i128::from(before.taken),
        i128::from(after.rollbacks) - i128::from(before.rollbacks),
        i128::from(after.releases) - i128::from(before.releases),
    );
    expect(
        deltas == (cycles as i128, cycles as i128, cycles as i128),
        format!("checkpoints taken, rollbacks, releases during the {cycles} cycles: {deltas:?}"),
    );
    // Nothing live, nothing leaked.
    expect(
        after.live.is_empty(),
        format!("live checkpoints after release: {:?}", after.live),
    );
    expect(
        after.undo == 0,
        format!("undo_bytes {} with no live checkpoint", after.undo),
    );
    expect(
        after.threads.len() == before.threads.len(),
        format!(
            "thread count changed: before {:?}, after {:?}",
            before.threads, after.threads
        ),
    );
    expect(
        after.memory_used.abs_diff(before.memory_used) <= MEM_TOLERANCE,
        format!(
            "guest memory in use {} -> {} bytes (tolerance {MEM_TOLERANCE})",
            before.memory_used, after.memory_used
        ),
    );
    expect(
        after.mirror.abs_diff(before.mirror) <= MEM_TOLERANCE,
        format!(
            "checkpoint mirror {} -> {} bytes (tolerance {MEM_TOLERANCE})",
            before.mirror, after.mirror
        ),
    );
    let fds1 = sb.fds_back_to(fds0);
    expect(
        fds1 == fds0,
        format!(
            "host fds of the VMM process with no client connected: {fds0} before the cycles, \
             {fds1} after (waited 10 s)"
        ),
    );
    let end = sb.usage();
    expect(
        end.live.is_empty() && end.undo == 0,
        format!("at the end: {end:?}"),
    );
    assert!(
        problems.is_empty(),
        "{name}: {} problem(s) after {cycles} cycles under load:\n- {}\n{}",
        problems.len(),
        problems.join("\n- "),
        sb.log()
    );
    sb.assert_same_and_healthy(&first);
    eprintln!(
        "[{name}] test time {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

const BULK_KEYS: usize = 10_000;

fn bulk_key(i: usize) -> Vec<u8> {
    format!("bulk:{i:05}").into_bytes()
}

#[test]
fn redis_rollback_forgets_ten_thousand_keys_and_restores_memory_and_registers_exactly() {
    let t0 = Instant::now();
    let mut sb = Sandbox::image("redis", 6379, |_| {});
    let first = sb.usage();
    let port = sb.port();

    // Known keys, on a connection that then stays open and idle.
    let known: Vec<(String, Vec<u8>)> = (0..5)
        .map(|k| (format!("known:{k}"), stable_value(1000 + k)))
        .collect();
    let mut old = Redis::connect(port);
    for (k, v) in &known {
        assert_eq!(
            old.must(&[b"SET", k.as_bytes(), v]),
            Resp::Simple("OK".into())
        );
    }
    let n0 = old.dbsize();
    assert_eq!(
        n0,
        known.len() as i64,
        "DBSIZE of a fresh redis with the known keys"
    );

    let cp = sb.checkpoint(true);
    let id = cp["id"].as_u64().expect("id");
    let d0 = cp["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("checkpoint with digest:true has no digest: {cp}"))
        .to_string();
    assert!(
        !d0.is_empty() && d0.chars().all(|c| c.is_ascii_hexdigit()),
        "digest {d0:?} is not hex"
    );
    assert!(
        cp["timing_us"]["total"].as_f64().is_some(),
        "timing_us.total: {cp}"
    );

    // 10,000 keys on a new connection, pipelined in batches.
    let mut bulk = Redis::connect(port);
    for batch in (0..BULK_KEYS).collect::<Vec<_>>().chunks(500) {
        let cmds: Vec<Vec<Vec<u8>>> = batch
            .iter()
            .map(|&i| {
                vec![
                    b"SET".to_vec(),
                    bulk_key(i),
                    format!("value-{i}").into_bytes(),
                ]
            })
            .collect();
        for (i, r) in batch
            .iter()
            .zip(bulk.pipeline(&cmds).expect("SET bulk keys"))
        {
            assert_eq!(r, Resp::Simple("OK".into()), "SET bulk:{i}");
        }
    }
    assert_eq!(
        bulk.dbsize(),
        n0 + BULK_KEYS as i64,
        "DBSIZE after the 10,000 SETs"
    );
    assert_eq!(
        bulk.must(&[b"GET", &bulk_key(4321)]),
        Resp::Bulk(Some(b"value-4321".to_vec()))
    );

    let rb = sb.rollback(id, true);
    assert_eq!(
        rb["digest"].as_str(),
        Some(d0.as_str()),
        "the digest of the restored state (memory, registers, VMM state) differs from the \
         checkpoint's: checkpoint {cp}, rollback {rb}"
    );
    assert!(
        rb["restored_pages"].as_u64().is_some_and(|n| n > 0),
        "10,000 SETs dirtied pages, but the rollback restored none: {rb}"
    );
    assert_eq!(
        rb["threads"], cp["threads"],
        "threads after the rollback vs at the checkpoint"
    );

    // The connection accepted after the checkpoint is closed.
    let closed = match bulk.call(&[b"PING"]) {
        Ok(r) => Err(format!("it answered {r:?}")),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("it stayed open and silent ({e})"))
        }
        Err(_) => Ok(()),
    };
    if let Err(why) = closed {
        panic!(
            "the connection accepted since the checkpoint was not closed by the rollback: {why}"
        );
    }

    // New connections see the database as at the checkpoint.
    let mut c = Redis::connect(port);
    assert_eq!(c.dbsize(), n0, "DBSIZE after the rollback");
    for (k, v) in &known {
        assert!(
            c.must(&[b"GET", k.as_bytes()]) == Resp::Bulk(Some(v.clone())),
            "{k} after the rollback"
        );
    }
    for batch in (0..BULK_KEYS).collect::<Vec<_>>().chunks(1000) {
        let cmds: Vec<Vec<Vec<u8>>> = batch
            .iter()
            .map(|&i| vec![b"EXISTS".to_vec(), bulk_key(i)])
            .collect();
        for (i, r) in batch.iter().zip(c.pipeline(&cmds).expect("EXISTS")) {
            assert_eq!(r, Resp::Int(0), "bulk:{i} exists after the rollback");
        }
    }
    // The connection that was open (and idle) at the checkpoint still works.
    assert_eq!(
        old.must(&[b"PING"]),
        Resp::Simple("PONG".into()),
        "the old connection"
    );
    assert!(
        old.must(&[b"GET", known[0].0.as_bytes()]) == Resp::Bulk(Some(known[0].1.clone())),
        "GET on the old connection"
    );
    // And redis goes on working.
    for i in 0..100 {
        let k = format!("after:{i}");
        let v = pseudo_random(i, 100 + i as usize);
        assert_eq!(
            c.must(&[b"SET", k.as_bytes(), &v]),
            Resp::Simple("OK".into())
        );
        assert!(
            c.must(&[b"GET", k.as_bytes()]) == Resp::Bulk(Some(v)),
            "GET {k}"
        );
    }
    assert_eq!(c.dbsize(), n0 + 100);

    sb.release(id);
    let u = sb.usage();
    assert!(
        u.live.is_empty(),
        "live checkpoints after release: {:?}",
        u.live
    );
    assert_eq!(u.undo, 0, "undo_bytes with no live checkpoint");
    sb.assert_same_and_healthy(&first);
    eprintln!(
        "[redis rollback] checkpoint {:?} us, rollback {:?} us (with digests); test {:.1} s",
        cp["timing_us"]["total"],
        rb["timing_us"]["total"],
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn redis_survives_a_thousand_checkpoint_rollback_cycles_under_load() {
    let mut sb = Sandbox::image("redis", 6379, |_| {});
    let port = sb.port();
    redis_seed(port);
    cycles_under_load(
        &mut sb,
        1000,
        || {
            Load::start(4, move |t, stop, ops| {
                redis_client(port, t, Duration::from_secs(2), stop, ops)
            })
        },
        |port| {
            let mut p = redis_stable_problems(port);
            let mut c = Redis::connect(port);
            for i in 0..50u64 {
                let k = format!("final:{i}");
                let v = pseudo_random(i, 200);
                let set = c.call(&[b"SET", k.as_bytes(), &v]);
                let get = c.call(&[b"GET", k.as_bytes()]);
                match (set, get) {
                    (Ok(Resp::Simple(ok)), Ok(Resp::Bulk(Some(g)))) if ok == "OK" && g == v => {}
                    (set, get) => {
                        p.push(format!("SET then GET {k}: {set:?}, {get:?}"));
                        break;
                    }
                }
            }
            p
        },
    );
}

#[test]
fn lighttpd_survives_a_thousand_cycles_under_curl_or_http_load() {
    let mut sb = Sandbox::image("lighttpd", 8080, |rootfs| {
        let docroot = rootfs.join("var/www/html");
        for (path, content) in web_files() {
            let p = docroot.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, content).expect("write docroot file");
        }
    });
    let port = sb.port();
    http_check_files(port);
    cycles_under_load(
        &mut sb,
        1000,
        || {
            Load::start(4, move |t, stop, ops| {
                http_client(port, t, Duration::from_secs(2), stop, ops)
            })
        },
        |port| {
            let mut p = http_file_problems(port);
            let r = curl(&format!("http://127.0.0.1:{port}/ck/c.bin"));
            if r.status != 200 || r.body != web_files()[2].1 {
                p.push(format!(
                    "curl /ck/c.bin: status {}, {} bytes (want 200 and the file's {} bytes)",
                    r.status,
                    r.body.len(),
                    web_files()[2].1.len()
                ));
            }
            p
        },
    );
}

#[test]
fn memcached_threads_roll_back_while_busy() {
    let mut sb = Sandbox::image("memcached", 11211, |_| {});
    let port = sb.port();
    let first = sb.usage();
    memc_seed(port);
    // Six connections: memcached hands connections to its worker threads round-robin.
    let load = Load::start(6, move |t, stop, ops| {
        memc_client(port, t, Duration::from_secs(2), stop, ops)
    });
    load.wait_for_ops(300, "memcached before the cycles");
    let before = sb.usage();
    let t0 = Instant::now();
    let (cps, rbs) = run_cycles(&sb, 200, Duration::from_millis(3));
    let cycles_time = t0.elapsed();
    let after = sb.usage();
    load.wait_for_ops(100, "memcached after the cycles");
    let stats = load.stop();
    eprintln!(
        "[memcached] 200 cycles in {:.1} s; checkpoint {}; rollback {}; clients {stats:?}; \
         threads before {:?} after {:?}",
        cycles_time.as_secs_f64(),
        timing_ms(&cps),
        timing_ms(&rbs),
        before.threads,
        after.threads
    );
    assert!(
        before.threads.len() > 1,
        "memcached runs several threads: {:?}",
        before.threads
    );
    let mut problems: Vec<String> = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    // The stored data on a new connection first (tells lost data from a confused one).
    let fresh = memc_stable_problems(port);
    expect(
        fresh.is_empty(),
        format!("a new connection after the cycles found: {fresh:#?}"),
    );
    expect(
        stats.wrong == 0,
        format!(
            "{} wrong replies to the clients, e.g. {:#?} (other client errors: {:#?})",
            stats.wrong, stats.wrong_examples, stats.error_examples
        ),
    );
    expect(
        after.threads == before.threads,
        format!(
            "status.threads changed: before {:?}, after {:?}",
            before.threads, after.threads
        ),
    );
    expect(
        after.live.is_empty(),
        format!("live checkpoints: {:?}", after.live),
    );
    expect(
        after.undo == 0,
        format!("undo_bytes {} with no live checkpoint", after.undo),
    );
    let mut c = Memc::connect(port);
    let set = c.set("final", b"value after the cycles");
    let get = c.get("final");
    expect(
        set.is_ok() && get.as_ref().ok() == Some(&Some(b"value after the cycles".to_vec())),
        format!("set then get of a new key: {set:?}, {get:?}"),
    );
    assert!(
        problems.is_empty(),
        "memcached: {} problem(s) after 200 cycles under load:\n- {}\n{}",
        problems.len(),
        problems.join("\n- "),
        sb.log()
    );
    sb.assert_same_and_healthy(&first);
}

#[test]
fn control_errors_are_clear_and_harmless() {
    let mut sb = Sandbox::bugsrv();
    let first = sb.usage();
    let fails = |req: Value| -> String {
        let a = sb.ctl(&req);
        assert_eq!(a["ok"], false, "{req} must fail: {a}");
        let e = a["error"].as_str().unwrap_or_default().to_string();
        assert!(!e.is_empty(), "{req}: no error text: {a}");
        e
    };

    for req in [
        json!({"cmd": "rollback", "id": 99999}),
        json!({"cmd": "release", "id": 99999}),
    ] {
        let e = fails(req.clone());
        assert!(
            e.contains("99999"),
            "{req}: the error does not name the id: {e:?}"
        );
    }
    let e = fails(json!({"cmd": "checkpoint", "bogus": 1}));
    assert!(
        e.contains("bogus"),
        "the error does not name the unknown field: {e:?}"
    );
    fails(json!({"cmd": "rollback", "id": "three"}));
    fails(json!({"cmd": "rollback", "id": -1}));
    fails(json!({"cmd": "release"}));
    fails(json!({"cmd": "rollback"})); // no live checkpoint to roll back to

    // Release, then rollback to the released id, and release it again.
    let id = sb.checkpoint(false)["id"].as_u64().expect("id");
    sb.release(id);
    let e = fails(json!({"cmd": "rollback", "id": id}));
    assert!(
        e.contains(&id.to_string()),
        "rollback to released {id}: {e:?}"
    );
    let e = fails(json!({"cmd": "release", "id": id}));
    assert!(e.contains(&id.to_string()), "second release of {id}: {e:?}");

    assert_eq!(
        curl(&sb.srv.url("/")).status,
        200,
        "the server still answers"
    );

    // The CLI.
    let ctl = |args: &[&str]| -> (i32, Value, String) {
        let mut cmd = Command::new(vmm_bin());
        cmd.arg("ctl").arg(&sb.sock).args(args);
        let (st, out, err) = run_bounded(cmd, Duration::from_secs(120));
        let v = serde_json::from_str(&out).unwrap_or(Value::Null);
        (shell_code(st), v, format!("stdout {out:?}, stderr {err:?}"))
    };
    let (code, v, text) = ctl(&["checkpoint"]);
    assert_eq!(code, 0, "ctl checkpoint: {text}");
    let id = v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("ctl checkpoint: no id: {text}"));
    let (code, _, text) = ctl(&["release", &id.to_string()]);
    assert_eq!(code, 0, "ctl release {id}: {text}");
    let (code, v, text) = ctl(&["release", "99999"]);
    assert_ne!(code, 0, "ctl release 99999: {text}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("99999")),
        "ctl release 99999 prints the error: {text}"
    );
    let (code, _, text) = ctl(&["rollback", "99999"]);
    assert_ne!(code, 0, "ctl rollback 99999: {text}");

    // --digest, and rolling back to it: the restored state has the checkpoint's digest.
    let (code, v, text) = ctl(&["checkpoint", "--digest"]);
    assert_eq!(code, 0, "ctl checkpoint --digest: {text}");
    let id = v["id"].as_u64().expect("id");
    let d = v["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("ctl checkpoint --digest: no digest: {text}"))
        .to_string();
    let (code, v, text) = ctl(&["rollback", &id.to_string(), "--digest"]);
    assert_eq!(code, 0, "ctl rollback {id} --digest: {text}");
    assert_eq!(
        v["digest"].as_str(),
        Some(d.as_str()),
        "rollback digest: {text}"
    );
    let (code, v, text) = ctl(&["digest"]);
    assert_eq!(code, 0, "ctl digest: {text}");
    assert!(
        v["digest"].as_str().is_some_and(|d| !d.is_empty()),
        "{text}"
    );
    let (code, _, text) = ctl(&["release", &id.to_string()]);
    assert_eq!(code, 0, "ctl release {id}: {text}");

    assert_eq!(
        curl(&sb.srv.url("/")).status,
        200,
        "the server still answers"
    );
    let u = sb.usage();
    assert!(u.live.is_empty(), "live checkpoints: {:?}", u.live);
    assert_eq!(u.undo, 0);
    sb.assert_same_and_healthy(&first);
}

#[test]
fn checkpoint_then_continue_changes_nothing_visible() {
    let mut sb = Sandbox::image("redis", 6379, |_| {});
    let port = sb.port();
    let first = sb.usage();
    redis_seed(port);
    // A generous timeout: any timeout or disconnect here is a failure.
    let load = Load::start(4, move |t, stop, ops| {
        redis_client(port, t, Duration::from_secs(20), stop, ops)
    });
    load.wait_for_ops(200, "redis before the checkpoints");
    let ops0 = load.ops();
    let mut totals = Vec::new();
    for i in 0..100 {
        let cp = sb.checkpoint(i % 10 == 0);
        if let Some(t) = cp["timing_us"]["total"].as_f64() {
            totals.push(t);
        }
        std::thread::sleep(Duration::from_millis(5));
        sb.release(cp["id"].as_u64().expect("id"));
    }
    let ops_during = load.ops() - ops0;
    load.wait_for_ops(100, "redis after the checkpoints");
    let stats = load.stop();
    eprintln!(
        "[redis checkpoint+release] 100 checkpoints, {}; client ops during them {ops_during}; \
         clients {stats:?}",
        timing_ms(&totals)
    );
    assert_eq!(
        (
            stats.wrong,
            stats.disconnects,
            stats.timeouts,
            stats.connect_failures
        ),
        (0, 0, 0, 0),
        "clients were disturbed (wrong replies, disconnects, timeouts, connect failures): \
         {:#?} {:#?}",
        stats.wrong_examples,
        stats.error_examples
    );
    assert_eq!(stats.connections, 4, "each client kept its one connection");
    assert!(ops_during > 0, "no client operation during the checkpoints");
    let u = sb.usage();
    assert!(u.live.is_empty(), "live checkpoints: {:?}", u.live);
    assert_eq!(u.rollbacks, first.rollbacks, "no rollback happened");
    redis_check_stable(port);
    sb.assert_same_and_healthy(&first);
}
