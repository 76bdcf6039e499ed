//! The gdb remote stub (`run --gdb ADDR [--gdb-wait]`, vmm/src/gdb) driven by Debian's
//! own gdb (GNU gdb 13, `/usr/bin/gdb`, batch mode) against Debian's servers under
//! assure-vmm, the way an operator would debug a live appliance:
//!
//! - lighttpd: attach to the running server, threads, backtraces, shared libraries (from the
//!   image's root as gdb's sysroot), registers (`fs_base` too), a read of unmapped memory
//!   (an error, and the session goes on), a breakpoint hit by a real curl request, a single
//!   step, a watchpoint on a global lighttpd updates once a second, the `monitor` commands,
//!   and `detach`: the request held at the breakpoint is then answered in full, and the
//!   guest is stopped (does not answer) while gdb sits at a prompt.
//! - redis: several threads (main and bio threads, with their names), a breakpoint on
//!   `processCommand` hit by a PING, switching threads; after `detach` the PING is answered.
//! - A rescue point and a gdb breakpoint on one address: the breakpoint is hit by every
//!   request, and a fault injected below the rescue point while gdb is attached is still
//!   rescued (lighttpd answers 400, a recovery event) and the next request is served.
//! - `--gdb-wait` (on a Unix socket): the guest does not run (its port does not accept)
//!   until gdb attaches; gdb finds it at ld.so's entry point; after `detach` it serves.
//! - Hostile or broken clients: garbage, bad checksums, truncated and huge packets, an
//!   absurd memory read; gdb's `kill` (refused: the stub detaches instead) and a gdb that
//!   dies with breakpoints and watchpoints inserted. The server must serve on, and a real
//!   gdb must still be able to attach afterwards.
//!
//! gdb's stdout and stderr go into one pipe, so its output is read in the order written;
//! `echo @@NAME@@` lines mark where the output of a command of interest starts. Every gdb
//! run, client and wait is bounded in time; all traffic is on 127.0.0.1. When an assertion
//! fails, the message holds gdb's whole output and the tail of the VMM's log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::resp::{read_crlf, read_resp, resp, Resp};
use common::*;
use serde_json::Value;

/// Debian's gdb.
const GDB: &str = "/usr/bin/gdb";

/// Bound of one whole gdb run.
const GDB_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound of a client request that waits while gdb holds the guest at a breakpoint.
const HELD_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// What gdb prints when it detaches.
const DETACHED: &str = "[Inferior 1 (process 1) detached]";

// ---------------------------------------------------------------------------------------
// A server image under the VMM with the gdb stub
// ---------------------------------------------------------------------------------------

/// A copy of a server image running under assure-vmm with `--gdb 127.0.0.1:0`.
struct Debuggee {
    srv: Server,
    /// The stub's address as gdb's `target remote` takes it.
    gdb_at: String,
    rootfs: PathBuf,
    /// The server's executable, as a path in the guest.
    program: &'static str,
    tmp: TempDir,
}

impl Debuggee {
    /// Start image `name` (executable `program`, listening on `guest_port`) with the stub on
    /// a port the system chooses (read back from the VMM's "listening" line, so no other
    /// process can take it in between). `extra` gets the temporary directory (for files
    /// the run needs) and returns more VMM arguments.
    fn start(
        name: &str,
        program: &'static str,
        guest_port: u16,
        extra: impl FnOnce(&Path) -> Vec<String>,
    ) -> Debuggee {
        require_kvm();
        let (tmp, dir) = copy_image(name);
        let rootfs = rootfs_of(&dir);
        let mut args = vec!["--gdb".to_string(), "127.0.0.1:0".to_string()];
        args.extend(extra(tmp.path()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let srv = start_vmm(&dir, guest_port, &args);
        let gdb_at = stub_address(&srv, Duration::from_secs(10));
        assert!(
            gdb_at.starts_with("127.0.0.1:") && !gdb_at.ends_with(":0"),
            "the stub must report the port it listens on, not {gdb_at:?}"
        );
        Debuggee {
            srv,
            gdb_at,
            rootfs,
            program,
            tmp,
        }
    }

    /// gdb attached to this server, running `commands`.
    fn gdb(&self, commands: &[String]) -> Gdb {
        Gdb::start(&self.rootfs, self.program, &self.gdb_at, commands)
    }

    fn ctx<'a>(&'a self, gdb: &'a GdbOutput) -> Ctx<'a> {
        Ctx {
            gdb: Some(gdb),
            srv: &self.srv,
        }
    }
}

/// The address in the VMM's `assure-vmm: gdb stub listening on ADDR` line (bounded wait).
fn stub_address(srv: &Server, timeout: Duration) -> String {
    const LINE: &str = "assure-vmm: gdb stub listening on ";
    let deadline = Instant::now() + timeout;
    loop {
        let log = srv.stderr_text();
        if let Some(rest) = log.lines().find_map(|l| l.strip_prefix(LINE)) {
            // "... on unix:/p/g.sock (the guest waits for gdb)"
            let addr = rest.split(" (").next().unwrap_or(rest).trim();
            return addr.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no {LINE:?} line within {timeout:?}; log:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// lighttpd's index page as the image holds it (what `GET /` must answer, byte-exact).
fn index_page(rootfs: &Path) -> Vec<u8> {
    std::fs::read(rootfs.join("var/www/html/index.html")).expect("the image's index.html")
}

/// `GET url` with curl, allowed `timeout` (the request may wait at a breakpoint).
fn curl_within(url: &str, timeout: Duration) -> Reply {
    let secs = timeout.as_secs().max(1).to_string();
    // curl takes the last --max-time given: this one, not curl_args' default.
    curl_args(&["--max-time", &secs, url])
}

/// The last 150 lines of a log, each cut to 300 characters (a hostile client's packets
/// can be logged whole).
fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(150);
    lines[from..]
        .iter()
        .map(|l| {
            let mut end = l.len().min(300);
            while !l.is_char_boundary(end) {
                end -= 1;
            }
            l[..end].to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Debian's gdb in batch mode
// ---------------------------------------------------------------------------------------

/// A running gdb: `-nx -batch`, the image's root as sysroot, the server's executable as
/// the file, `target remote` to the stub, then the test's commands. Killed on drop.
struct Gdb {
    child: Child,
    /// Output lines (stdout and stderr, in order) with the time each arrived.
    lines: Arc<Mutex<Vec<(Duration, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    cmdline: String,
}

/// A finished gdb run.
struct GdbOutput {
    status: Option<ExitStatus>,
    lines: Vec<(Duration, String)>,
    cmdline: String,
}

impl Gdb {
    fn start(rootfs: &Path, program: &str, target: &str, commands: &[String]) -> Gdb {
        let root = path_str(rootfs);
        let mut all = vec![
            format!("set sysroot {root}"),
            format!("file {root}{program}"),
        ];
        all.push(format!("target remote {target}"));
        all.extend(commands.iter().cloned());
        Gdb::run(all)
    }

    /// gdb with nothing of the image on the host: it reads the executable and the
    /// libraries from the guest through the stub (host I/O, sysroot `target:`).
    fn start_remote_only(target: &str, commands: &[String]) -> Gdb {
        let mut all = vec![format!("target remote {target}")];
        all.extend(commands.iter().cloned());
        Gdb::run(all)
    }

    fn run(commands: Vec<String>) -> Gdb {
        let mut all: Vec<String> = vec![
            "set pagination off".into(),
            "set confirm off".into(),
            "set width 0".into(),
            // Never ask a debuginfod server over the network.
            "set debuginfod enabled off".into(),
        ];
        all.extend(commands);
        // One pipe for stdout and stderr: gdb writes errors and `monitor` replies to
        // stderr, and the markers must come out in order with them.
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut cmd = Command::new(GDB);
        cmd.args(["-nx", "-batch"]);
        for c in &all {
            cmd.arg("-ex").arg(c);
        }
        cmd.stdin(Stdio::null())
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer);
        let cmdline = format!("{cmd:?}");
        let started = Instant::now();
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {GDB} ({e}): Debian's gdb package must be installed")
        });
        // The Command holds the pipe's write end: drop it, or the reader never sees EOF.
        drop(cmd);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            while r
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if let Ok(mut v) = sink.lock() {
                    v.push((started.elapsed(), line));
                }
                buf.clear();
            }
        });
        Gdb {
            child,
            lines,
            reader: Some(reader),
            started,
            cmdline,
        }
    }

    fn snapshot(&self) -> GdbOutput {
        GdbOutput {
            status: None,
            lines: self.lines.lock().map(|v| v.clone()).unwrap_or_default(),
            cmdline: self.cmdline.clone(),
        }
    }

    /// Wait (bounded) until gdb has printed a line containing `needle`; on a timeout or
    /// gdb's exit, the output so far.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(), GdbOutput> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.snapshot().at(needle).is_some() {
                return Ok(());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                // Let the reader take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(self.snapshot());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for gdb to exit (killed after `timeout` since it started; the output then says
    /// so and `status` is None).
    fn finish(mut self, timeout: Duration) -> GdbOutput {
        let deadline = self.started + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    self.child.kill().ok();
                    self.child.wait().ok();
                    break None;
                }
            }
        };
        if let Some(r) = self.reader.take() {
            r.join().ok();
        }
        let mut out = self.snapshot();
        if status.is_none() {
            out.lines.push((
                self.started.elapsed(),
                format!("<<< gdb killed: still running after {timeout:?} >>>"),
            ));
        }
        out.status = status;
        out
    }
}

impl Drop for Gdb {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl GdbOutput {
    fn text(&self) -> String {
        let mut s = String::new();
        for (_, l) in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// When the first line containing `needle` arrived (since gdb started).
    fn at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// The lines after the marker `@@name@@` up to the next marker (or the end).
    fn section(&self, name: &str) -> Option<String> {
        let marker = format!("@@{name}@@");
        let start = self.lines.iter().position(|(_, l)| l.trim() == marker)?;
        let body: Vec<&str> = self.lines[start + 1..]
            .iter()
            .map(|(_, l)| l.as_str())
            .take_while(|l| !l.starts_with("@@"))
            .collect();
        Some(body.join("\n"))
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .count()
    }
}

/// Commands as owned strings.
fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A register's value in `info registers` output (`rip  0x5555...  0x5555... <fn+2>`).
fn register(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        if w.next() != Some(name) {
            return None;
        }
        let v = w.next()?.strip_prefix("0x")?;
        u64::from_str_radix(v, 16).ok()
    })
}

/// The address in gdb's `Breakpoint N at 0x...` line.
fn breakpoint_address(text: &str, n: u32) -> Option<u64> {
    let prefix = format!("Breakpoint {n} at 0x");
    text.lines().find_map(|l| {
        let hex = l.strip_prefix(&prefix)?;
        let hex = hex.split(|c: char| !c.is_ascii_hexdigit()).next()?;
        u64::from_str_radix(hex, 16).ok()
    })
}

/// The number after `what` (`Old value = 1795354977`).
fn value_after(text: &str, what: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(what)?.trim().parse().ok())
}

/// Guest thread ids in `info threads` output (`Thread 1.<tid> (name)`).
fn thread_ids(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            let rest = &l[l.find("Thread 1.")? + "Thread 1.".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A `monitor` command's JSON reply in section `name`.
fn monitor_json(out: &GdbOutput, name: &str) -> Result<Value, String> {
    let text = out
        .section(name)
        .ok_or_else(|| format!("no @@{name}@@ section"))?;
    serde_json::from_str(text.trim()).map_err(|e| format!("`{name}` is not JSON ({e}): {text}"))
}

// ---------------------------------------------------------------------------------------
// Failure messages with the whole story
// ---------------------------------------------------------------------------------------

/// What a failed assertion prints: gdb's whole output and the VMM's log.
struct Ctx<'a> {
    gdb: Option<&'a GdbOutput>,
    srv: &'a Server,
}

impl Ctx<'_> {
    fn fail(&self, msg: &str) -> ! {
        let gdb = match self.gdb {
            Some(g) => format!("--- gdb (exit {:?}): {}\n{}", g.status, g.cmdline, g.text()),
            None => String::new(),
        };
        panic!(
            "{msg}\n{gdb}--- VMM log (tail):\n{}",
            log_tail(&self.srv.stderr_text())
        );
    }

    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(&msg());
        }
    }

    /// gdb's output contains `needle` (`why` says what it shows).
    fn has(&self, needle: &str, why: &str) {
        let found = self.gdb.is_some_and(|g| g.at(needle).is_some());
        self.check(found, || format!("gdb's output lacks {needle:?}: {why}"));
    }

    /// The VMM's log contains `needle`.
    fn has_log(&self, needle: &str) {
        let log = self.srv.stderr_text();
        self.check(log.contains(needle), || {
            format!("the VMM log lacks {needle:?}")
        });
    }

    /// gdb ran to its end (exit 0, not killed at the time limit) and detached.
    fn detached(&self) {
        let ok = self
            .gdb
            .is_some_and(|g| g.status.is_some_and(|s| s.success()));
        self.check(ok, || "gdb did not run to its end".into());
        self.has(DETACHED, "the session ends by detaching");
    }

    /// `reply` is lighttpd's index page, whole.
    fn page(&self, reply: &Reply, want: &[u8], what: &str) {
        self.check(reply.status == 200 && reply.body == want, || {
            format!(
                "{what}: expected 200 and the {}-byte index page, got {} with {:?}",
                want.len(),
                reply.status,
                String::from_utf8_lossy(&reply.body)
            )
        });
    }
}

/// The VMM still runs (it serves on after every session).
fn still_running(srv: &mut Server, gdb: Option<&GdbOutput>) {
    if !srv.is_running() {
        Ctx { gdb, srv }.fail("the VMM exited");
    }
}

fn join<T>(h: std::thread::JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

// ---------------------------------------------------------------------------------------
// lighttpd: inspect, break, step, watch, monitor, detach
// ---------------------------------------------------------------------------------------

#[test]
fn lighttpd_attach_inspect_break_step_watch_monitor_and_detach() {
    let d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let page = index_page(&d.rootfs);
    let url = d.srv.url("/");
    let mut commands = cmds(&[
        "echo @@threads@@\\n",
        "info threads",
        "echo @@bt@@\\n",
        "bt",
        "echo @@libs@@\\n",
        "info sharedlibrary",
        "echo @@fs@@\\n",
        "info registers fs_base",
        // An error must not end the session: the next command still runs.
        "echo @@unmapped@@\\n",
        "x/x 0x10",
        "print 6*7",
        "echo @@break@@\\n",
        "break http_request_headers_process",
        // The test's client starts at @@go@@; its request reaches the breakpoint.
        "echo @@go@@\\n",
        "continue",
        "echo @@hit@@\\n",
        "bt",
    ]);
    // The whole guest is stopped at the prompt: another request is not answered.
    commands.push(format!(
        "shell curl -s -o /dev/null --max-time 2 -w 'held:%{{http_code}}\\n' {url}"
    ));
    commands.extend(cmds(&[
        "echo @@step@@\\n",
        "info registers rip",
        "stepi",
        "info registers rip",
        "x/i $pc",
        "delete",
        // lighttpd sets this global to the time, once a second.
        "watch *(long*)&log_epoch_secs",
        "echo @@watch@@\\n",
        "continue",
        "delete",
        "echo @@status@@\\n",
        "monitor status",
        "echo @@checkpoint@@\\n",
        "monitor checkpoint",
        "echo @@rescue@@\\n",
        "monitor rescue",
        "echo @@events@@\\n",
        "monitor events 5",
        "echo @@help@@\\n",
        "monitor help",
        "echo @@detach@@\\n",
        "detach",
    ]));
    let mut gdb = d.gdb(&commands);
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out)
            .fail("gdb did not reach the breakpoint's `continue`");
    }
    let client_url = url.clone();
    let client = std::thread::spawn(move || curl_within(&client_url, HELD_CLIENT_TIMEOUT));
    let out = gdb.finish(GDB_TIMEOUT);
    let reply = join(client);
    let c = d.ctx(&out);
    c.detached();

    // Threads and the stack of the idle server.
    let threads = out.section("threads").unwrap_or_default();
    let tids = thread_ids(&threads);
    c.check(tids.len() == 1 && threads.contains("(lighttpd)"), || {
        format!("one lighttpd thread expected: {threads}")
    });
    c.check(threads.contains("epoll_wait"), || {
        "the idle server waits in epoll_wait".into()
    });
    let bt = out.section("bt").unwrap_or_default();
    c.check(
        bt.contains("fdevent_poll") && bt.contains("main ()"),
        || format!("the idle stack runs from main through fdevent_poll: {bt}"),
    );

    // Shared libraries, found in the image's root (the sysroot), symbols read.
    let libs = out.section("libs").unwrap_or_default();
    let root = path_str(&d.rootfs);
    for lib in ["/libc.so.6", "/ld-linux-x86-64.so.2", "/mod_accesslog.so"] {
        let found = libs
            .lines()
            .any(|l| l.contains(&root) && l.ends_with(lib) && l.contains("Yes"));
        c.check(found, || {
            format!("{lib} under {root}, symbols read: {libs}")
        });
    }

    // The thread pointer is set (glibc's TLS).
    let fs = register(&out.section("fs").unwrap_or_default(), "fs_base");
    c.check(fs.is_some_and(|v| v != 0), || format!("fs_base: {fs:?}"));

    // Unmapped memory: gdb's usual error, and the session goes on.
    let unmapped = out.section("unmapped").unwrap_or_default();
    c.check(
        unmapped.contains("Cannot access memory at address 0x10"),
        || format!("reading 0x10: {unmapped}"),
    );
    c.check(unmapped.contains("$1 = 42"), || {
        "the command after the failed read must run".into()
    });

    // The breakpoint, hit by the client's request, at the address gdb set it.
    let bp = breakpoint_address(&out.section("break").unwrap_or_default(), 1);
    let hit = out.section("hit").unwrap_or_default();
    c.has(
        "Breakpoint 1, 0x",
        "the request must stop at http_request_headers_process",
    );
    c.check(
        hit.contains("connection_state_machine") && hit.contains("main ()"),
        || format!("the request's stack: {hit}"),
    );
    c.check(hit.contains("held:000"), || {
        format!("while gdb holds the guest, a second request must not be answered: {hit}")
    });

    // One instruction step: the pc moves forward a few bytes, still in the function.
    let step = out.section("step").unwrap_or_default();
    let rips: Vec<u64> = step
        .lines()
        .filter(|l| l.starts_with("rip "))
        .filter_map(|l| register(l, "rip"))
        .collect();
    c.check(rips.len() == 2, || format!("two rip values: {step}"));
    c.check(bp.is_some() && Some(rips[0]) == bp, || {
        format!("stopped at the breakpoint {bp:x?}: rip {:#x}", rips[0])
    });
    c.check(rips[1] > rips[0] && rips[1] - rips[0] <= 15, || {
        format!(
            "stepi moves rip by one instruction: {:#x} -> {:#x}",
            rips[0], rips[1]
        )
    });
    c.check(
        step.contains("=> 0x") && step.contains("<http_request_headers_process+"),
        || format!("x/i $pc inside the function: {step}"),
    );

    // The watchpoint: lighttpd's clock ticks by about a second, within a few seconds.
    let watch = out.section("watch").unwrap_or_default();
    c.has(
        "Hardware watchpoint 2: *(long*)&log_epoch_secs",
        "the watchpoint is set",
    );
    let old = value_after(&watch, "Old value =");
    let new = value_after(&watch, "New value =");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    c.check(
        matches!((old, new), (Some(o), Some(n)) if n > o && n - o <= 5 && (n - now).abs() < 600),
        || format!("log_epoch_secs must tick forward, near the time {now}: {old:?} -> {new:?}"),
    );
    let took = out
        .at("@@watch@@")
        .zip(out.at("New value ="))
        .map(|(a, b)| b - a);
    c.check(took.is_some_and(|t| t < Duration::from_secs(10)), || {
        format!("the watchpoint must trigger within about a second, took {took:?}")
    });

    // The monitor: status, a checkpoint of the stopped guest, rescue state, events, help.
    let status = monitor_json(&out, "status").unwrap_or_else(|e| c.fail(&e));
    let live: Vec<u64> = status["threads"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    c.check(status["pid"].as_u64().is_some() && live == tids, || {
        format!("monitor status: the threads gdb lists ({tids:?}) and a pid: {status}")
    });
    let cp = monitor_json(&out, "checkpoint").unwrap_or_else(|e| c.fail(&e));
    c.check(cp["id"].as_u64().is_some(), || {
        format!("monitor checkpoint: an id: {cp}")
    });
    let rescue = monitor_json(&out, "rescue").unwrap_or_else(|e| c.fail(&e));
    c.check(rescue["points"].is_array(), || {
        format!("monitor rescue: {rescue}")
    });
    let events = monitor_json(&out, "events").unwrap_or_else(|e| c.fail(&e));
    c.check(events["events"].is_array(), || {
        format!("monitor events 5: {events}")
    });
    let help = out.section("help").unwrap_or_default();
    c.check(
        help.contains("assure-vmm monitor commands") && help.contains("checkpoint"),
        || format!("monitor help: {help}"),
    );

    // After detach: the held request was answered in full, and the server serves on.
    c.page(&reply, &page, "the request held at the breakpoint");
    c.page(&curl(&url), &page, "a request after detach");
    let by_name = curl(&d.srv.url("/index.html"));
    c.page(&by_name, &page, "GET /index.html after detach");
    let mut srv = d.srv;
    still_running(&mut srv, Some(&out));
    eprintln!(
        "lighttpd session: {:?} in gdb; watchpoint after {took:?}",
        out.lines.last().map(|(t, _)| *t)
    );
}

// ---------------------------------------------------------------------------------------
// redis: threads, a breakpoint hit by a PING, switching threads
// ---------------------------------------------------------------------------------------

/// Send PING on `s` and read the reply line (bounded by the socket's read timeout).
fn ping(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let line = read_crlf(&mut r)?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn redis_connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(HELD_CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// The dynamic symbols the redis test sets breakpoints on exist in the image's binary.
fn require_symbols(binary: &Path, names: &[&str]) {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(binary)
        .output()
        .expect("run nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    for n in names {
        assert!(
            text.lines().any(|l| l.split_whitespace().last() == Some(n)),
            "{} has no dynamic symbol {n}",
            binary.display()
        );
    }
}

#[test]
fn redis_threads_breakpoint_on_a_command_and_thread_switch() {
    let d = Debuggee::start("redis", "/usr/bin/redis-server", 6379, |_| vec![]);
    require_symbols(
        &d.rootfs.join("usr/bin/redis-server"),
        &["processCommand", "main"],
    );
    let mut gdb = d.gdb(&cmds(&[
        "echo @@threads@@\\n",
        "info threads",
        "break processCommand",
        // The test's client sends its PING at @@go@@.
        "echo @@go@@\\n",
        "continue",
        "echo @@hit@@\\n",
        "bt",
        "echo @@threads-at-hit@@\\n",
        "info threads",
        "echo @@thread2@@\\n",
        "thread 2",
        "bt",
        "echo @@back@@\\n",
        "thread 1",
        "detach",
    ]));
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out)
            .fail("gdb did not reach the breakpoint's `continue`");
    }
    let port = d.srv.port;
    let client = std::thread::spawn(move || -> std::io::Result<(TcpStream, String)> {
        let mut s = redis_connect(port)?;
        let reply = ping(&mut s)?;
        Ok((s, reply))
    });
    let out = gdb.finish(GDB_TIMEOUT);
    let first = join(client);
    let c = d.ctx(&out);
    c.detached();

    // The main thread and the background threads, each with its own id and name.
    let threads = out.section("threads").unwrap_or_default();
    let mut tids = thread_ids(&threads);
    let n = tids.len();
    tids.sort_unstable();
    tids.dedup();
    c.check(n >= 2 && tids.len() == n, || {
        format!("redis runs several threads with distinct ids: {threads}")
    });
    c.check(
        threads.contains("(redis-server)") && threads.contains("(bio_"),
        || format!("thread names (redis-server, bio_*): {threads}"),
    );

    // The PING stops the main thread in processCommand.
    c.has("Breakpoint 1, 0x", "the PING must reach the breakpoint");
    c.has(
        "in processCommand ()",
        "the breakpoint is in processCommand",
    );
    let hit = out.section("hit").unwrap_or_default();
    c.check(
        hit.contains("processCommand") && hit.contains("main ()"),
        || format!("the command's stack: {hit}"),
    );
    let at_hit = out.section("threads-at-hit").unwrap_or_default();
    c.check(
        at_hit
            .lines()
            .any(|l| l.starts_with('*') && l.contains("processCommand")),
        || format!("the current thread is the one at the breakpoint: {at_hit}"),
    );

    // Another thread's registers and stack.
    let t2 = out.section("thread2").unwrap_or_default();
    c.check(t2.contains("[Switching to thread 2 (Thread 1."), || {
        format!("thread 2: {t2}")
    });
    c.check(t2.lines().any(|l| l.starts_with("#1 ")), || {
        format!("thread 2's backtrace has frames: {t2}")
    });
    c.check(
        out.section("back")
            .is_some_and(|b| b.contains("[Switching to thread 1 (Thread 1.")),
        || "back to thread 1".into(),
    );

    // After detach the held PING is answered, and the connection and redis go on.
    let (mut s, reply) = first.unwrap_or_else(|e| c.fail(&format!("the held PING failed: {e}")));
    c.check(reply == "+PONG", || format!("the held PING: {reply:?}"));
    let again = ping(&mut s);
    c.check(matches!(&again, Ok(r) if r == "+PONG"), || {
        format!("a second PING on that connection: {again:?}")
    });
    let fresh = redis_connect(port).and_then(|mut s| ping(&mut s));
    c.check(matches!(&fresh, Ok(r) if r == "+PONG"), || {
        format!("a PING on a new connection: {fresh:?}")
    });
    eprintln!(
        "redis session: {} threads; {:?} in gdb",
        n,
        out.lines.last().map(|(t, _)| *t)
    );
}

// ---------------------------------------------------------------------------------------
// A rescue point and a gdb breakpoint on one address
// ---------------------------------------------------------------------------------------

/// lighttpd's rescue point, as tests/rescue_servers.rs has it: a fault below
/// `http_request_parse_target` makes it return 400.
const LIGHTTPD_RESCUE: &str = "[[rescue]]\n\
     name = \"parse_target\"\n\
     function = \"http_request_parse_target\"\n\
     return = 400\n\
     max_recoveries_per_minute = 100000\n";

#[test]
fn breakpoint_and_rescue_point_on_one_address_both_work() {
    // burl_normalize is called once per request, only from http_request_parse_target:
    // the 2nd request faults there, below the rescue point, while gdb is attached.
    let d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |tmp| {
        let rescue = tmp.join("rescue.toml");
        std::fs::write(&rescue, LIGHTTPD_RESCUE).expect("write rescue file");
        vec![
            "--rescue".into(),
            path_str(&rescue),
            "--inject".into(),
            "burl_normalize:nth=2:kind=segv:count=1".into(),
            "--events".into(),
            path_str(&tmp.join("events.jsonl")),
        ]
    });
    let events_file = d.tmp.path().join("events.jsonl");
    let page = index_page(&d.rootfs);
    let url = d.srv.url("/");
    // Three requests, one after the other: each stops at the breakpoint (the rescue
    // point's entry); the 2nd faults after it and is rescued.
    let mut gdb = d.gdb(&cmds(&[
        "break http_request_parse_target",
        "echo @@go@@\\n",
        "continue",
        "echo @@hit1@@\\n",
        "bt 3",
        "continue",
        "echo @@hit2@@\\n",
        "bt 3",
        // The 2nd request faults after this breakpoint and is rescued (400); the client
        // then sends the 3rd.
        "continue",
        "echo @@hit3@@\\n",
        "bt 3",
        "info breakpoints",
        "echo @@events@@\\n",
        "monitor events 5",
        "echo @@rescue@@\\n",
        "monitor rescue",
        "echo @@detach@@\\n",
        "detach",
    ]));
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out)
            .fail("gdb did not reach the breakpoint's `continue`");
    }
    let client_url = url.clone();
    let client = std::thread::spawn(move || {
        (0..3)
            .map(|_| curl_within(&client_url, HELD_CLIENT_TIMEOUT))
            .collect::<Vec<Reply>>()
    });
    let out = gdb.finish(GDB_TIMEOUT);
    let replies = join(client);
    let c = d.ctx(&out);
    c.detached();

    // gdb's breakpoint: hit by each of the three requests, at the rescue point's function.
    c.check(out.count("Breakpoint 1, ") == 3, || {
        "each of the 3 requests must stop at the breakpoint".into()
    });
    for n in 1..=3 {
        let hit = out.section(&format!("hit{n}")).unwrap_or_default();
        c.check(
            hit.contains("#0  0x") && hit.contains("in http_request_parse_target ()"),
            || format!("request {n} at the breakpoint: {hit}"),
        );
    }
    c.has(
        "breakpoint already hit 3 times",
        "info breakpoints counts 3 hits",
    );

    // The rescue point: the 2nd request's fault was rescued while gdb was attached.
    let events = monitor_json(&out, "events").unwrap_or_else(|e| c.fail(&e));
    let recovered = events["events"].as_array().is_some_and(|a| {
        a.iter()
            .any(|e| e["event"] == "recovery" && e["rescue_point"] == "parse_target")
    });
    c.check(recovered, || {
        format!("monitor events: a recovery at parse_target: {events}")
    });
    let rescue = monitor_json(&out, "rescue").unwrap_or_else(|e| c.fail(&e));
    let point = &rescue["points"][0];
    c.check(
        point["name"] == "parse_target" && point["stats"]["recoveries"] == 1,
        || format!("monitor rescue: one recovery at parse_target: {rescue}"),
    );

    // What the client saw: the page, the rescue point's 400, the page.
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    c.check(statuses == [200, 400, 200], || {
        format!("request statuses {statuses:?}, expected [200, 400, 200]")
    });
    c.page(&replies[0], &page, "request 1");
    c.page(&replies[2], &page, "request 3");
    let recoveries: Vec<Value> = read_events(&events_file)
        .into_iter()
        .filter(|e| e["event"] == "recovery")
        .collect();
    c.check(
        recoveries.len() == 1
            && recoveries[0]["rescue_point"] == "parse_target"
            && recoveries[0]["signal"] == 11,
        || format!("one SIGSEGV recovery in the events file: {recoveries:#?}"),
    );
    let crashes = read_events(&events_file)
        .into_iter()
        .filter(|e| e["event"] == "crash")
        .count();
    c.check(crashes == 0, || "no crash event".into());

    // After detach: served.
    c.page(&curl(&url), &page, "a request after detach");
}

// ---------------------------------------------------------------------------------------
// --gdb-wait: the guest waits for gdb before its first instruction
// ---------------------------------------------------------------------------------------

/// The entry point (e_entry) of ELF file `path`.
fn elf_entry(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() >= 32 && bytes.starts_with(b"\x7fELF") && bytes[4] == 2,
        "{} is not a 64-bit ELF file",
        path.display()
    );
    let mut e = [0u8; 8];
    e.copy_from_slice(&bytes[24..32]);
    u64::from_le_bytes(e)
}

#[test]
fn gdb_wait_holds_the_guest_until_gdb_attaches_on_a_unix_socket() {
    require_kvm();
    let (tmp, dir) = copy_image("lighttpd");
    let rootfs = rootfs_of(&dir);
    let page = index_page(&rootfs);
    let sock = tmp.path().join("gdb.sock");
    let host_port = free_port();
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .arg("--image")
        .arg(&dir)
        .arg("--images-out")
        .arg(images_out())
        .arg("--port")
        .arg(format!("8080={host_port}"))
        .args(["--log-level", "warn", "--gdb"])
        .arg(format!("unix:{}", path_str(&sock)))
        .arg("--gdb-wait")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn assure-vmm");
    let log = capture(&mut child);
    let mut srv = Server {
        child,
        port: host_port,
        stderr: log,
    };
    let at = stub_address(&srv, Duration::from_secs(30));
    let c = Ctx {
        gdb: None,
        srv: &srv,
    };
    c.check(at == format!("unix:{}", path_str(&sock)), || {
        format!("the stub's address: {at}")
    });
    c.has_log("(the guest waits for gdb)");

    // Not a single instruction has run: lighttpd has not bound its port.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        c.check(
            TcpStream::connect(("127.0.0.1", host_port)).is_err(),
            || "the guest ran before gdb attached: its port accepts".into(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    still_running(&mut srv, None);

    // Clients that are not gdb (junk, or a connection closed at once) do not release it.
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &b""[..]] {
        let mut u = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        u.write_all(junk).ok();
        drop(u);
    }
    let c = Ctx {
        gdb: None,
        srv: &srv,
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        c.check(
            TcpStream::connect(("127.0.0.1", host_port)).is_err(),
            || "a client that is not gdb released the waiting guest".into(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let commands = cmds(&[
        "echo @@threads@@\\n",
        "info threads",
        "echo @@rip@@\\n",
        "info registers rip",
        "x/i $pc",
        "info symbol $pc",
        "echo @@detach@@\\n",
        "detach",
    ]);
    let out =
        Gdb::start(&rootfs, "/usr/sbin/lighttpd", &path_str(&sock), &commands).finish(GDB_TIMEOUT);
    let c = Ctx {
        gdb: Some(&out),
        srv: &srv,
    };
    c.detached();
    let threads = out.section("threads").unwrap_or_default();
    c.check(thread_ids(&threads).len() == 1, || {
        format!("one thread before the first instruction: {threads}")
    });
    // The first instruction is ld.so's entry point (at its load bias, page-aligned).
    let interp = rootfs.join("lib64/ld-linux-x86-64.so.2");
    let canon = std::fs::canonicalize(&interp).expect("ld.so in the image");
    c.check(
        canon.starts_with(std::fs::canonicalize(&rootfs).expect("rootfs")),
        || format!("{} resolves outside the image", interp.display()),
    );
    let entry = elf_entry(&canon);
    let text = out.section("rip").unwrap_or_default();
    let rip = register(&text, "rip");
    c.check(
        rip.is_some_and(|r| r > entry && (r - entry).is_multiple_of(0x1000)),
        || format!("rip {rip:x?} must be ld.so's entry {entry:#x} plus its load bias"),
    );
    c.check(text.contains("=> 0x") && text.contains("<_start>"), || {
        format!("x/i $pc at _start: {text}")
    });
    c.check(
        text.contains("_start in section .text of") && text.contains("ld-linux-x86-64.so.2"),
        || format!("info symbol $pc: ld.so's _start: {text}"),
    );

    // Released: lighttpd starts and serves.
    c.check(wait_for_port(host_port, Duration::from_secs(30)), || {
        "the server did not start after detach".into()
    });
    c.page(&curl(&srv.url("/")), &page, "a request after detach");
    still_running(&mut srv, Some(&out));
}

// ---------------------------------------------------------------------------------------
// Hostile and broken clients
// ---------------------------------------------------------------------------------------

/// A gdb remote protocol packet: `$data#checksum`.
fn packet(data: &[u8]) -> Vec<u8> {
    let sum = data.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    let mut p = Vec::with_capacity(data.len() + 4);
    p.push(b'$');
    p.extend_from_slice(data);
    p.extend_from_slice(format!("#{sum:02x}").as_bytes());
    p
}

/// Connect to the stub, send `bytes`, read what comes within `wait` (a reply packet, or
/// nothing: the stub may close, or wait for the rest), then close.
fn raw_session(addr: &str, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to the gdb stub");
    s.set_write_timeout(Some(Duration::from_secs(10))).ok();
    // The stub may close the connection before it read everything: not an error here.
    s.write_all(bytes).ok();
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        // A whole reply packet (`$...#xx`) is all a well-formed request gets.
        if let Some(h) = got.iter().rposition(|&b| b == b'#') {
            if got.contains(&b'$') && got.len() >= h + 3 {
                break;
            }
        }
    }
    got
}

#[test]
fn garbage_on_the_gdb_port_leaves_the_server_and_the_stub_working() {
    let d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let page = index_page(&d.rootfs);
    let c = Ctx {
        gdb: None,
        srv: &d.srv,
    };
    let absurd_read = packet(b"m0,ffffffffffffffff");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", pseudo_random(0x6db, 4096)),
        ("a bad checksum", b"$g#00".to_vec()),
        ("a truncated packet", b"$qSupported:multiprocess+".to_vec()),
        ("a 100000-byte packet", packet(&[b'A'; 100_000])),
        ("a read of 2^64-1 bytes", absurd_read.clone()),
        ("a lone interrupt", b"\x03".to_vec()),
        (
            "junk then a packet",
            [b"\x00\xff+-#$$#".as_slice(), &packet(b"g")].concat(),
        ),
    ];
    for (what, bytes) in &cases {
        let got = raw_session(&d.gdb_at, bytes, Duration::from_secs(1));
        eprintln!(
            "{what}: the stub answered {:?}",
            String::from_utf8_lossy(&got)
        );
        // Between the sessions the guest runs: the server answers.
        c.page(&curl(&d.srv.url("/")), &page, &format!("after {what}"));
        if bytes == &absurd_read {
            // Acknowledged and refused with an error reply, not a crash or a 2^64 buffer.
            c.check(got.starts_with(b"+$E"), || {
                format!(
                    "{what}: expected `+$Exx`, got {:?}",
                    String::from_utf8_lossy(&got)
                )
            });
        }
    }
    // A well-formed question still gets its answer: why the target stopped.
    let got = raw_session(&d.gdb_at, &packet(b"?"), Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got).into_owned();
    c.check(
        text.starts_with("+$T05") || text.starts_with("+$S05"),
        || format!("`?` must be answered with a stop reply, got {text:?}"),
    );

    // And a real gdb attaches and works.
    let out = d
        .gdb(&cmds(&["echo @@threads@@\\n", "info threads", "detach"]))
        .finish(GDB_TIMEOUT);
    let c = d.ctx(&out);
    c.detached();
    let threads = out.section("threads").unwrap_or_default();
    c.check(
        thread_ids(&threads).len() == 1 && threads.contains("(lighttpd)"),
        || format!("info threads after the garbage: {threads}"),
    );
    c.page(&curl(&d.srv.url("/")), &page, "after the gdb session");
    let mut srv = d.srv;
    still_running(&mut srv, Some(&out));
}

#[test]
fn gdb_kill_and_a_gdb_dying_mid_session_leave_the_server_running() {
    let d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let page = index_page(&d.rootfs);
    let url = d.srv.url("/");

    // `kill`: a self-healing appliance refuses; the stub detaches and the guest runs on.
    let out = d
        .gdb(&cmds(&[
            "info threads",
            "echo @@kill@@\\n",
            "kill",
            "info threads",
        ]))
        .finish(GDB_TIMEOUT);
    let c = d.ctx(&out);
    c.check(out.status.is_some_and(|s| s.success()), || {
        "gdb did not run to its end".into()
    });
    c.page(&curl(&url), &page, "after gdb's kill");

    // gdb dies (SIGKILL) while the guest is stopped at a breakpoint with breakpoints and
    // watchpoints inserted in it: the stub must take them all out and let the guest go.
    let mut gdb = d.gdb(&cmds(&[
        "set breakpoint always-inserted on",
        "break http_request_headers_process",
        "echo @@go@@\\n",
        "continue",
        "echo @@hit@@\\n",
        "break connection_state_machine",
        "watch *(long*)&log_epoch_secs",
        "rwatch *(long*)&log_epoch_secs",
        "echo @@dies@@\\n",
        "python import os; os.kill(os.getpid(), 9)",
        "echo @@still-alive@@\\n",
    ]));
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out)
            .fail("gdb did not reach the breakpoint's `continue`");
    }
    let client_url = url.clone();
    let client = std::thread::spawn(move || curl_within(&client_url, HELD_CLIENT_TIMEOUT));
    let out = gdb.finish(GDB_TIMEOUT);
    let reply = join(client);
    let c = d.ctx(&out);
    {
        use std::os::unix::process::ExitStatusExt;
        c.check(out.status.and_then(|s| s.signal()) == Some(9), || {
            "gdb must have died of SIGKILL".into()
        });
    }
    c.has("Breakpoint 1, 0x", "the request stopped at the breakpoint");
    c.has("Hardware read watchpoint 4", "both watchpoints were set");
    c.check(out.at("@@still-alive@@").is_none(), || {
        "gdb did not die".into()
    });
    c.page(&reply, &page, "the request held when gdb died");
    // Nothing of gdb's stays behind: for a few seconds, requests pass the old breakpoint
    // addresses, and in between the thread serving them writes the watched global (once
    // a second) with no guard left to trap it.
    for i in 0..3 {
        c.page(&curl(&url), &page, &format!("request {i} after gdb died"));
        std::thread::sleep(Duration::from_millis(700));
    }

    // A new session attaches as usual.
    let out = d
        .gdb(&cmds(&["echo @@threads@@\\n", "info threads", "detach"]))
        .finish(GDB_TIMEOUT);
    let c = d.ctx(&out);
    c.detached();
    c.check(
        thread_ids(&out.section("threads").unwrap_or_default()).len() == 1,
        || "info threads in the next session".into(),
    );
    c.page(&curl(&url), &page, "after the last session");
    let mut srv = d.srv;
    still_running(&mut srv, Some(&out));
}

// ---------------------------------------------------------------------------------------
// No local files (host I/O), and a crash that stops in gdb before its signal
// ---------------------------------------------------------------------------------------

/// gdb given nothing but `target remote` reads the executable and every library from the
/// guest's root through the stub: symbolized backtraces through libc, libraries listed as
/// `target:` paths.
#[test]
fn gdb_reads_the_executable_and_libraries_from_the_guest() {
    let mut d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let gdb = Gdb::start_remote_only(
        &d.gdb_at,
        &cmds(&[
            "echo @@exe@@\\n",
            "info inferiors",
            "echo @@libs@@\\n",
            "info sharedlibrary",
            "echo @@bt@@\\n",
            "bt",
            "echo @@end@@\\n",
            "detach",
        ]),
    );
    let out = gdb.finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    let libs = out.section("libs").unwrap_or_default();
    for lib in [
        "target:/lib/x86_64-linux-gnu/libc.so.6",
        "target:/lib64/ld-linux-x86-64.so.2",
        "target:/usr/lib/lighttpd/mod_accesslog.so",
    ] {
        ctx.check(libs.contains(lib), || {
            format!("{lib} read from the guest: {libs}")
        });
    }
    let exe = out.section("exe").unwrap_or_default();
    ctx.check(exe.contains("/usr/sbin/lighttpd"), || {
        format!("the executable is the guest's: {exe}")
    });
    let bt = out.section("bt").unwrap_or_default();
    ctx.check(
        bt.contains("epoll_wait") && bt.contains("fdevent_poll") && bt.contains("main"),
        || format!("a symbolized backtrace from libc to main: {bt}"),
    );
    ctx.has(DETACHED, "gdb detaches");
    let page = index_page(&d.rootfs);
    let r = curl(&d.srv.url("/"));
    ctx.check(r.status == 200 && r.body == page, || {
        format!("served after detach: {} {:?}", r.status, r.body.len())
    });
    still_running(&mut d.srv, Some(&out));
}

/// A NULL dereference outside any rescue window stops in gdb at the faulting instruction
/// before SIGSEGV is delivered. `signal 0` drops the signal: the instruction runs again and
/// faults again. `continue` then delivers it: the guest dies of it, gdb is told so, and
/// the VMM exits as the guest did (128 + 11).
#[test]
fn a_crash_stops_in_gdb_before_its_signal_and_continue_delivers_it() {
    let mut d = Debuggee::start("bugsrv", "/usr/sbin/bugsrv", 8082, |_| vec![]);
    let url = d.srv.url("/bug/null");
    let client = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        curl_within(&url, HELD_CLIENT_TIMEOUT)
    });
    let gdb = Gdb::start_remote_only(
        &d.gdb_at,
        &cmds(&[
            "continue",
            "echo @@first@@\\n",
            "bt",
            "echo @@again@@\\n",
            "signal 0",
            "echo @@deliver@@\\n",
            "continue",
            "echo @@end@@\\n",
        ]),
    );
    let out = gdb.finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    ctx.check(out.count("Program received signal SIGSEGV") == 2, || {
        "SIGSEGV stops gdb, and again after `signal 0` retried the instruction".into()
    });
    let first = out.section("first").unwrap_or_default();
    ctx.check(
        first.contains("bug_null_deref") && first.contains("handle_bug"),
        || format!("the backtrace of the crash: {first}"),
    );
    let deliver = out.section("deliver").unwrap_or_default();
    ctx.check(
        deliver.contains("Program terminated with signal SIGSEGV"),
        || format!("`continue` delivered the signal and gdb saw the end: {deliver}"),
    );
    let reply = join(client);
    ctx.check(reply.status != 200, || {
        "the crashing request got no page".into()
    });
    let status = d.srv.wait(Duration::from_secs(20));
    let ctx = d.ctx(&out);
    ctx.check(shell_code(status) == 139, || {
        format!("the VMM exits as the guest did (139), not {status:?}")
    });
}

/// The VMM's resident memory in KiB (`VmRSS` of /proc/PID/status).
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A packet that never ends (64 MiB without its `#`) overflows the stub's fixed packet
/// buffer: the session ends, the VMM's memory does not grow with the packet, and the
/// server serves on; a real gdb attaches afterwards.
#[test]
fn an_endless_packet_ends_the_session_without_growing_the_vmm() {
    let mut d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let pid = d.srv.child.id();
    let before = vm_rss_kib(pid);
    let mut s = TcpStream::connect(&d.gdb_at).expect("connect to the gdb stub");
    s.set_write_timeout(Some(Duration::from_secs(20))).ok();
    let chunk = vec![b'A'; 1 << 20];
    s.write_all(b"+$qSupported:").ok();
    let mut sent = 0usize;
    for _ in 0..64 {
        // The stub closes the connection once its buffer is full: writes then fail.
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    drop(s);
    let after = vm_rss_kib(pid);
    let ctx = Ctx {
        gdb: None,
        srv: &d.srv,
    };
    ctx.check(after < before + 16 * 1024, || {
        format!("VmRSS grew from {before} to {after} KiB after {sent} bytes of one packet")
    });
    let page = index_page(&d.rootfs);
    let r = curl(&d.srv.url("/"));
    ctx.check(r.status == 200 && r.body == page, || {
        format!("served after the endless packet: {}", r.status)
    });
    let gdb = d.gdb(&cmds(&["echo @@threads@@\\n", "info threads", "detach"]));
    let out = gdb.finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    let threads = out.section("threads").unwrap_or_default();
    ctx.check(threads.contains("(lighttpd)"), || {
        format!("a new session attaches: {threads}")
    });
    ctx.has(DETACHED, "gdb detaches");
    still_running(&mut d.srv, Some(&out));
}

/// A connection that says nothing does not stop the guest: gdb speaks first, and the stub
/// stops the sandbox only when it does. The server answers while the silent connection is
/// open, and a real gdb attaches once it is dropped.
#[test]
fn a_silent_connection_does_not_stop_the_guest() {
    let mut d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let silent = TcpStream::connect(&d.gdb_at).expect("connect to the gdb stub");
    std::thread::sleep(Duration::from_millis(500));
    let page = index_page(&d.rootfs);
    let ctx = Ctx {
        gdb: None,
        srv: &d.srv,
    };
    for i in 0..3 {
        let r = curl_within(&d.srv.url("/"), Duration::from_secs(5));
        ctx.check(r.status == 200 && r.body == page, || {
            format!(
                "request {i} while a silent client holds the gdb port: {}",
                r.status
            )
        });
    }
    drop(silent);
    let gdb = d.gdb(&cmds(&["echo @@threads@@\\n", "info threads", "detach"]));
    let out = gdb.finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    let threads = out.section("threads").unwrap_or_default();
    ctx.check(threads.contains("(lighttpd)"), || {
        format!("gdb attaches after the silent client left: {threads}")
    });
    still_running(&mut d.srv, Some(&out));
}

/// Read from `s` until the bytes received contain `want` (bounded); what was received.
fn read_until(s: &mut TcpStream, want: &[u8], timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !got.windows(want.len()).any(|w| w == want) {
        s.set_read_timeout(Some(Duration::from_millis(100))).ok();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    got
}

/// Ctrl-C (the protocol's `\x03`) stops a running guest: after `vCont;c` the server
/// answers; after the interrupt the stub reports SIGINT for a thread (`T02thread:`) and
/// the guest no longer answers; after `D` it answers again.
#[test]
fn ctrl_c_stops_a_running_guest_and_detach_resumes_it() {
    let mut d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let page = index_page(&d.rootfs);
    let ctx = Ctx {
        gdb: None,
        srv: &d.srv,
    };
    let mut s = TcpStream::connect(&d.gdb_at).expect("connect to the gdb stub");
    s.set_write_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(&packet(b"?")).expect("send ?");
    let stop = read_until(&mut s, b"#", Duration::from_secs(10));
    ctx.check(stop.windows(4).any(|w| w == b"$T05"), || {
        format!("attached and stopped: {:?}", String::from_utf8_lossy(&stop))
    });
    s.write_all(b"+").ok();
    s.write_all(&packet(b"vCont;c")).expect("send vCont;c");
    std::thread::sleep(Duration::from_millis(300));
    let r = curl_within(&d.srv.url("/"), Duration::from_secs(10));
    ctx.check(r.status == 200 && r.body == page, || {
        format!("the guest runs after vCont;c: {}", r.status)
    });
    s.write_all(b"\x03").expect("send Ctrl-C");
    let stop = read_until(&mut s, b"#", Duration::from_secs(10));
    let text = String::from_utf8_lossy(&stop).into_owned();
    ctx.check(text.contains("$T02thread:"), || {
        format!("Ctrl-C reports SIGINT for a thread: {text:?}")
    });
    s.write_all(b"+").ok();
    let held = curl_within(&d.srv.url("/"), Duration::from_secs(2));
    ctx.check(held.status != 200, || {
        "the guest must not answer while the stub holds it stopped".into()
    });
    s.write_all(&packet(b"D")).expect("send D");
    let ok = read_until(&mut s, b"$OK#", Duration::from_secs(10));
    ctx.check(ok.windows(4).any(|w| w == b"$OK#"), || {
        format!("detach answered OK: {:?}", String::from_utf8_lossy(&ok))
    });
    drop(s);
    let r = curl_within(&d.srv.url("/"), Duration::from_secs(10));
    ctx.check(r.status == 200 && r.body == page, || {
        format!("the guest runs after detach: {}", r.status)
    });
    still_running(&mut d.srv, None);
}

/// `hbreak` (the same breakpoint engine, reported to gdb as a hardware breakpoint) stops a
/// request, and `rwatch` (a supervisor-only page guard) catches lighttpd's read of
/// `log_epoch_secs` in its main loop, with the value read; after `detach` the held request
/// is answered.
#[test]
fn hardware_breakpoints_and_read_watchpoints() {
    let mut d = Debuggee::start("lighttpd", "/usr/sbin/lighttpd", 8080, |_| vec![]);
    let url = d.srv.url("/");
    let mut gdb = d.gdb(&cmds(&[
        "hbreak http_request_headers_process",
        "echo @@go@@\\n",
        "continue",
        "echo @@hbreak@@\\n",
        "info breakpoints",
        "delete",
        "rwatch *(long*)&log_epoch_secs",
        "continue",
        "echo @@rwatch@@\\n",
        "print $pc",
        "delete",
        "echo @@detach@@\\n",
        "detach",
    ]));
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out).fail("gdb did not reach `continue`");
    }
    let client = std::thread::spawn(move || curl_within(&url, HELD_CLIENT_TIMEOUT));
    let out = gdb.finish(GDB_TIMEOUT);
    let reply = join(client);
    let ctx = d.ctx(&out);
    ctx.has(
        "Hardware assisted breakpoint 1 at",
        "gdb places a hardware breakpoint",
    );
    ctx.has("Breakpoint 1, 0x", "the request stops at the hbreak");
    let hb = out.section("hbreak").unwrap_or_default();
    ctx.check(
        hb.contains("hw breakpoint") && hb.contains("already hit 1 time"),
        || format!("listed as a hit hardware breakpoint: {hb}"),
    );
    ctx.has(
        "Hardware read watchpoint 2: *(long*)&log_epoch_secs",
        "gdb places a read watchpoint",
    );
    let rw = out.section("rwatch").unwrap_or_default();
    let before_rwatch = out
        .lines
        .iter()
        .map(|(_, l)| l.as_str())
        .take_while(|l| !l.contains("@@rwatch@@"))
        .collect::<Vec<_>>()
        .join("\n");
    ctx.check(before_rwatch.contains("Value = "), || {
        "the read watchpoint fires and shows the value read".into()
    });
    ctx.check(rw.contains("$1 = "), || {
        format!("gdb is stopped after it: {rw}")
    });
    ctx.has(DETACHED, "gdb detaches");
    let page = index_page(&d.rootfs);
    ctx.check(reply.status == 200 && reply.body == page, || {
        format!(
            "the held request is answered after detach: {}",
            reply.status
        )
    });
    still_running(&mut d.srv, Some(&out));
}

/// One redis command on a new connection; the reply.
fn redis_once(port: u16, args: &[&[u8]]) -> Resp {
    let mut s = redis_connect(port).expect("connect to redis");
    s.write_all(&resp(args)).expect("send");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    read_resp(&mut r).expect("a RESP reply")
}

fn bulk(r: &Resp) -> Option<Vec<u8>> {
    match r {
        Resp::Bulk(b) => b.clone(),
        _ => None,
    }
}

/// `monitor checkpoint` in one gdb session and `monitor rollback ID` in a later one: the
/// write made in between is undone, and redis answers on with the checkpoint's data.
#[test]
fn monitor_checkpoint_and_rollback_undo_a_write() {
    let mut d = Debuggee::start("redis", "/usr/bin/redis-server", 6379, |_| vec![]);
    let port = d.srv.port;
    let set = |v: &[u8]| redis_once(port, &[b"SET", b"key", v]);
    assert!(matches!(set(b"before"), Resp::Simple(ref s) if s == "OK"));
    let out = d
        .gdb(&cmds(&[
            "echo @@ck@@\\n",
            "monitor checkpoint",
            "echo @@end@@\\n",
            "detach",
        ]))
        .finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    let ck = monitor_json(&out, "ck").unwrap_or_else(|e| ctx.fail(&e));
    let id = ck["id"]
        .as_u64()
        .unwrap_or_else(|| ctx.fail(&format!("a checkpoint id: {ck}")));
    ctx.has(DETACHED, "gdb detaches");
    assert!(matches!(set(b"after"), Resp::Simple(ref s) if s == "OK"));
    let now = redis_once(port, &[b"GET", b"key"]);
    ctx.check(bulk(&now).as_deref() == Some(b"after"), || {
        "the write after the checkpoint is there".into()
    });
    let rollback = format!("monitor rollback {id}");
    let out = d
        .gdb(&cmds(&[
            "echo @@rb@@\\n",
            &rollback,
            "echo @@end@@\\n",
            "maint flush register-cache",
            "echo @@threads@@\\n",
            "info threads",
            "detach",
        ]))
        .finish(GDB_TIMEOUT);
    let ctx = d.ctx(&out);
    let rb = monitor_json(&out, "rb").unwrap_or_else(|e| ctx.fail(&e));
    ctx.check(rb["id"].as_u64() == Some(id), || {
        format!("rolled back to {id}: {rb}")
    });
    let threads = out.section("threads").unwrap_or_default();
    ctx.check(threads.contains("(redis-server)"), || {
        format!("threads after the rollback: {threads}")
    });
    ctx.has(DETACHED, "gdb detaches");
    let back = redis_once(port, &[b"GET", b"key"]);
    ctx.check(bulk(&back).as_deref() == Some(b"before"), || {
        "the rollback undid the later write".into()
    });
    still_running(&mut d.srv, Some(&out));
}

// ---------------------------------------------------------------------------------------
// memcached: all-stop with several worker threads at one breakpoint
// ---------------------------------------------------------------------------------------

/// memcached's `limited_get` (no symbol: its `.eh_frame` offset, docs/debian-rescue-points.md)
/// in the PIE executable, which assure-vmm loads at 0x555555554000 (docs/architecture.md).
const MEMCACHED_LIMITED_GET: u64 = 0x5555_5555_4000 + 0x10970;

/// 8 clients on their own connections SET and GET 40 keys each; the number of exact
/// round trips.
fn memcached_clients(port: u16) -> usize {
    let handles: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(HELD_CLIENT_TIMEOUT)).ok();
                let mut w = s.try_clone().expect("clone");
                let mut r = BufReader::new(s);
                let mut ok = 0;
                for j in 0..40 {
                    let (k, v) = (format!("k{i}_{j}"), format!("value {i} {j}"));
                    let set = format!("set {k} 0 0 {}\r\n{v}\r\n", v.len());
                    if w.write_all(set.as_bytes()).is_err() {
                        break;
                    }
                    let Ok(stored) = read_crlf(&mut r) else { break };
                    if stored != b"STORED" {
                        continue;
                    }
                    if w.write_all(format!("get {k}\r\n").as_bytes()).is_err() {
                        break;
                    }
                    let head = read_crlf(&mut r).unwrap_or_default();
                    let data = read_crlf(&mut r).unwrap_or_default();
                    let end = read_crlf(&mut r).unwrap_or_default();
                    let want_head = format!("VALUE {k} 0 {}", v.len());
                    if head == want_head.as_bytes() && data == v.as_bytes() && end == b"END" {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    handles.into_iter().map(join).sum()
}

/// All-stop with several threads: memcached's 4 workers serve 8 clients while gdb stops
/// at `limited_get` 30 times in a row. Hits come from several worker threads (a thread
/// that met the breakpoint while another's stop was reported meets it again when
/// resumed), and once gdb detaches every one of the 320 SET/GET round trips is exact.
#[test]
fn memcached_worker_threads_stop_at_one_breakpoint_and_no_request_is_lost() {
    let mut d = Debuggee::start("memcached", "/usr/bin/memcached", 11211, |_| vec![]);
    let mut commands = vec![
        format!("break *{MEMCACHED_LIMITED_GET:#x}"),
        "echo @@go@@\\n".to_string(),
    ];
    for _ in 0..30 {
        commands.push("continue".into());
        commands.push("printf \"HIT thread %d\\n\", $_thread".into());
    }
    commands.extend(["delete".to_string(), "detach".to_string()]);
    let mut gdb = d.gdb(&commands);
    if let Err(out) = gdb.wait_for("@@go@@", Duration::from_secs(60)) {
        d.ctx(&out).fail("gdb did not reach `continue`");
    }
    let port = d.srv.port;
    let clients = std::thread::spawn(move || memcached_clients(port));
    let out = gdb.finish(GDB_TIMEOUT);
    let exact = join(clients);
    let ctx = d.ctx(&out);
    let hits: Vec<&str> = out
        .lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("HIT thread "))
        .collect();
    ctx.check(hits.len() == 30, || {
        format!("30 stops at the breakpoint, got {}", hits.len())
    });
    let threads: std::collections::BTreeSet<&str> = hits.iter().copied().collect();
    ctx.check(threads.len() >= 2, || {
        format!("stops in several worker threads, got {threads:?}")
    });
    ctx.has(DETACHED, "gdb detaches");
    ctx.check(exact == 320, || {
        format!("320 exact round trips after detach, got {exact}")
    });
    still_running(&mut d.srv, Some(&out));
}
