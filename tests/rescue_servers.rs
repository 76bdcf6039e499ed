//! Rescue points in Debian's lighttpd and redis-server under assure-vmm, with faults
//! injected below them while clients run (`run --rescue FILE --inject SPEC --events FILE`).
//!
//! The points and injection sites come from docs/debian-rescue-points.md:
//!
//! - lighttpd 1.4.69: `http_request_parse_target` returns 400 (lighttpd answers `400 Bad
//!   Request` and closes that connection); faults go into `burl_normalize`, which only it
//!   calls, once per request (0 calls at start-up).
//! - redis 7.0.15: `lookupCommandLogic` returns NULL (redis answers `-ERR unknown command
//!   'SET', ...` and the connection goes on); faults go into `dictFetchValue`, which a
//!   SET/GET workload reaches only from `lookupCommandLogic`, once per command (1 call at
//!   start-up).
//!
//! Each test runs a copy of the image (`images/out/NAME`, scripts/setup.sh) with a free
//! host port and checks: the VMM is still running at the end; the events file holds the
//! recovery events, naming the rescue point, one per error response the clients saw; every
//! response to a healthy request is byte-exact (lighttpd: files of known content; redis:
//! SET/GET round trips of distinct keys and values, a value whose SET got the rescue's error
//! reply must be absent). The companion tests run the same injection without the rescue
//! file: the guest's crash ends the run (exit 128 + signal, a `crash` event).
//!
//! The two main load tests run Debian's own load generators against the same server while
//! the checking clients run: `wrk` (lighttpd) and `redis-benchmark` (redis), started first
//! and run again until the checking clients are done. The injected function is called once
//! per request of anyone, so which requests fault depends on the interleaving: the
//! checking clients' error answers are then at most the recoveries, not all of them, and
//! the rest is accounted to the load generator:
//!
//! - wrk counts the 400s ("Non-2xx or 3xx responses") and keeps going; its 400s, its socket
//!   errors and the checking clients' 400s together are at most the recoveries, and at
//!   least the recoveries less the requests wrk still had in flight when a run stopped.
//! - redis-benchmark 7.0 exits 1 at the first error reply it reads ("Error from server:
//!   ERR unknown command 'SET' ..."), so under a fault every 9 commands each run ends
//!   after a few dozen commands at its first rescued one; each such end is one more
//!   recovery. The SET/GET calls in `INFO commandstats` beyond the checking clients'
//!   correct answers are redis-benchmark's. The injection has a `count`: once the load is
//!   over, PINGs use up the remaining faults and one whole redis-benchmark run must then
//!   succeed (exit 0, a SET and a GET rate).
//!
//! Loads are bounded in count and in time; all traffic is on 127.0.0.1.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::resp::*;
use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// A server image under the VMM with a rescue file and injections
// ---------------------------------------------------------------------------------------

/// lighttpd's rescue point (`hang` adds a hang timeout).
fn lighttpd_rescue(hang_timeout_ms: Option<u64>) -> String {
    let mut s = String::from(
        "[[rescue]]\n\
         name = \"parse_target\"\n\
         function = \"http_request_parse_target\"\n\
         return = 400\n\
         max_recoveries_per_minute = 100000\n",
    );
    if let Some(ms) = hang_timeout_ms {
        s.push_str(&format!("hang_timeout_ms = {ms}\n"));
    }
    s
}

/// redis's rescue point. `binary` is left out: the executable is /usr/bin/redis-server, a
/// symlink to redis-check-rdb.
fn redis_rescue() -> String {
    "[[rescue]]\n\
     name = \"lookup_command\"\n\
     function = \"lookupCommandLogic\"\n\
     return = \"null\"\n\
     max_recoveries_per_minute = 100000\n"
        .into()
}

struct Rescued {
    srv: Server,
    name: String,
    events: PathBuf,
    _tmp: TempDir,
}

impl Rescued {
    /// A copy of image `name` (its root first changed by `prepare`) under the VMM, its
    /// `guest_port` on a free host port, with `rescue` as the rescue file (if any) and
    /// `injects` as `--inject` specs.
    fn start(
        name: &str,
        guest_port: u16,
        rescue: Option<&str>,
        injects: &[&str],
        prepare: impl FnOnce(&Path),
    ) -> Rescued {
        require_kvm();
        let (tmp, dir) = copy_image(name);
        prepare(&rootfs_of(&dir));
        let events = tmp.path().join("events.jsonl");
        let mut extra: Vec<String> = vec!["--events".into(), path_str(&events)];
        if let Some(text) = rescue {
            let file = tmp.path().join("rescue.toml");
            std::fs::write(&file, text).expect("write rescue file");
            extra.push("--rescue".into());
            extra.push(path_str(&file));
        }
        for i in injects {
            extra.push("--inject".into());
            extra.push((*i).into());
        }
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let srv = start_vmm(&dir, guest_port, &args);
        Rescued {
            srv,
            name: name.into(),
            events,
            _tmp: tmp,
        }
    }

    fn port(&self) -> u16 {
        self.srv.port
    }

    fn events(&self) -> Vec<Value> {
        read_events(&self.events)
    }

    fn recoveries(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == "recovery")
            .collect()
    }

    /// Wait (at most `timeout`) until the events file holds a recovery: the load started
    /// before it has reached the injected function.
    fn wait_for_a_recovery(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.recoveries().is_empty() {
            assert!(
                Instant::now() < deadline && self.srv.is_running(),
                "{}: no recovery event within {timeout:?} of load; {}",
                self.name,
                self.context()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// For messages: the events other than recoveries, and the log's tail.
    fn context(&self) -> String {
        let others: Vec<String> = self
            .events()
            .into_iter()
            .filter(|e| e["event"] != "recovery")
            .map(|e| e.to_string())
            .take(5)
            .collect();
        let log = self.srv.stderr_text();
        let mut start = log.len().saturating_sub(3000);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "{}: other events: {others:#?}\n--- log tail:\n{}",
            self.name,
            &log[start..]
        )
    }

    /// The VMM is still running, its events hold no crash and no quarantine, and at least
    /// `min` recoveries name `point` with the signal `signal` (if given). Returns the
    /// recovery events.
    fn check_recovered(&mut self, point: &str, min: usize, signal: Option<i64>) -> Vec<Value> {
        assert!(
            self.srv.is_running(),
            "{}: the VMM exited under injected faults with a rescue point; {}",
            self.name,
            self.context()
        );
        let evs = self.events();
        let bad: Vec<&Value> = evs
            .iter()
            .filter(|e| e["event"] == "crash" || e["event"] == "quarantine")
            .collect();
        assert!(
            bad.is_empty(),
            "{}: crash or quarantine events: {bad:#?}",
            self.name
        );
        let rec = self.recoveries();
        assert!(
            rec.len() >= min,
            "{}: {} recovery events, expected at least {min}; {}",
            self.name,
            rec.len(),
            self.context()
        );
        for e in &rec {
            assert_eq!(
                e["rescue_point"], point,
                "{}: a recovery that does not name the rescue point: {e}",
                self.name
            );
            if let Some(sig) = signal {
                assert_eq!(e["signal"], sig, "{}: recovery event {e}", self.name);
            }
        }
        rec
    }

    /// The run must end by the guest's crash: exit 128 + `signal`, a `crash` event with it,
    /// and no recovery.
    fn check_crashed(&mut self, signal: i32, timeout: Duration) {
        let st = self.srv.wait(timeout);
        assert_eq!(
            shell_code(st),
            128 + signal,
            "{}: without a rescue point the injected fault must end the run; {}",
            self.name,
            self.context()
        );
        let evs = self.events();
        let crash = evs
            .iter()
            .find(|e| e["event"] == "crash")
            .unwrap_or_else(|| panic!("{}: no crash event in {evs:#?}", self.name));
        assert_eq!(crash["signal"], signal, "{}: {crash}", self.name);
        assert!(
            !evs.iter().any(|e| e["event"] == "recovery"),
            "{}: a recovery without a rescue point: {evs:#?}",
            self.name
        );
    }
}

/// The event's `error_value` is the integer `v`.
fn error_value_is(e: &Value, v: i64) -> bool {
    e["error_value"].as_i64() == Some(v)
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )?;
    // Longer than any hang timeout used here: a hung request is answered after it.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Seen {
    /// Correct responses to healthy requests.
    ok: u64,
    /// The rescue point's error response (lighttpd's 400, redis's unknown command).
    rescued: u64,
    /// Connections that failed (reset, EOF, timeout, refused).
    errors: u64,
    error_examples: Vec<String>,
    /// Wrong responses: always a failure.
    wrong: Vec<String>,
}

impl Seen {
    fn add(&mut self, o: Seen) {
        self.ok += o.ok;
        self.rescued += o.rescued;
        self.errors += o.errors;
        for e in o.error_examples {
            if self.error_examples.len() < 10 {
                self.error_examples.push(e);
            }
        }
        for w in o.wrong {
            if self.wrong.len() < 20 {
                self.wrong.push(w);
            }
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_examples.len() < 10 {
            self.error_examples.push(e);
        }
    }

    /// No wrong response and no failed connection; `min_ok` correct responses.
    fn check(&self, what: &str, min_ok: u64) {
        assert!(
            self.wrong.is_empty(),
            "{what}: wrong responses to healthy requests: {:#?}",
            self.wrong
        );
        assert_eq!(
            self.errors, 0,
            "{what}: connections failed (a recovery must not disturb other requests): {:#?}",
            self.error_examples
        );
        assert!(
            self.ok >= min_ok,
            "{what}: only {} correct responses (expected at least {min_ok}): {self:?}",
            self.ok
        );
    }
}

/// Run `threads` client threads at once (each gets its index) and add up what they saw.
fn load(threads: usize, f: impl Fn(usize) -> Seen + Send + Sync + 'static) -> Seen {
    let mut total = Seen::default();
    for s in concurrently(threads, f) {
        total.add(s);
    }
    total
}

// ---------------------------------------------------------------------------------------
// Debian's load generators (wrk, redis-benchmark) next to the checking clients
// ---------------------------------------------------------------------------------------

/// The path of `tool` on PATH; fails (never skips) when it is missing.
fn require_tool(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{tool}` is not installed (Debian package {package}): the load tests run it \
                 against the server next to the checking clients; scripts/setup.sh installs it"
            )
        })
}

/// One finished run of a load generator.
struct ToolRun {
    status: ExitStatus,
    out: String,
    err: String,
    started: Instant,
    ended: Instant,
}

impl ToolRun {
    fn describe(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.status.code(),
            self.ended - self.started,
            self.out,
            self.err
        )
    }
}

/// A load generator run again and again on its own thread until [`Background::finish`]
/// says the checking clients are done: at most `max_runs` runs, none started after
/// `limit`, each bounded by `timeout`. Whether a run's exit is right is for the caller.
struct Background {
    name: &'static str,
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<ToolRun>>,
}

impl Background {
    fn start(
        name: &'static str,
        max_runs: usize,
        limit: Duration,
        timeout: Duration,
        cmd: impl Fn() -> Command + Send + 'static,
    ) -> Background {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let deadline = Instant::now() + limit;
        let thread = std::thread::spawn(move || {
            let mut runs = Vec::new();
            while runs.len() < max_runs && !stop.load(Ordering::SeqCst) && Instant::now() < deadline
            {
                let started = Instant::now();
                // Panics (and so fails the test at `finish`) on a timeout.
                let (status, out, err) = run_bounded(cmd(), timeout);
                runs.push(ToolRun {
                    status,
                    out,
                    err,
                    started,
                    ended: Instant::now(),
                });
            }
            runs
        });
        Background { name, done, thread }
    }

    /// Stop after the current run and return all runs; the last one ended after
    /// `load_ended` (the checking load ran under this one throughout).
    fn finish(self, load_ended: Instant) -> Vec<ToolRun> {
        self.done.store(true, Ordering::SeqCst);
        let runs = match self.thread.join() {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e),
        };
        let name = self.name;
        let last = runs.last().unwrap_or_else(|| panic!("{name} never ran"));
        assert!(
            last.ended >= load_ended,
            "{name}: all {} runs ended before the checking clients were done; last run: {}",
            runs.len(),
            last.describe()
        );
        runs
    }
}

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkReport {
    requests: u64,
    per_second: f64,
    /// "Non-2xx or 3xx responses: N" (only printed when N > 0).
    non_2xx: u64,
    /// The sum of "Socket errors: connect A, read B, write C, timeout D" (idem).
    socket_errors: u64,
}

fn parse_wrk(out: &str) -> WrkReport {
    let num = |s: &str| -> u64 {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("wrk: not a number {s:?} in:\n{out}"))
    };
    let mut r = WrkReport::default();
    let (mut saw_requests, mut saw_rate) = (false, false);
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.per_second = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("wrk: Requests/sec {v:?} in:\n{out}"));
            saw_rate = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = num(v);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 2, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().last().unwrap_or_default();
                r.socket_errors += num(n);
            }
        } else if line.contains(" requests in ") {
            r.requests = num(line.split_whitespace().next().unwrap_or_default());
            saw_requests = true;
        }
    }
    assert!(
        saw_requests && saw_rate,
        "wrk printed no request count or rate:\n{out}"
    );
    r
}

/// The requests per second redis-benchmark's `--csv` output gives for each test:
/// `"test","rps",...` then `"SET","12345.68",...`.
fn parse_redis_benchmark_csv(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .map(|l| {
            l.split(',')
                .map(|f| f.trim().trim_matches('"'))
                .collect::<Vec<_>>()
        })
        .filter(|f| f.len() >= 2 && f[0] != "test")
        .map(|f| {
            let rps = f[1]
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("redis-benchmark: rps {:?} in:\n{out}", f[1]));
            (f[0].to_string(), rps)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// lighttpd: HTTP/1.1 keep-alive, files of known content
// ---------------------------------------------------------------------------------------

/// Files written into the docroot: (URL path, content), all of different sizes.
fn web_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("/rp/a.txt".into(), b"rescue point test file a\n".repeat(7)),
        ("/rp/b.bin".into(), pseudo_random(21, 4_099)),
        ("/rp/c.bin".into(), pseudo_random(22, 33_001)),
        ("/rp/d%20e.bin".into(), pseudo_random(23, 777)),
    ]
}

fn put_web_files(rootfs: &Path) {
    let dir = rootfs.join("var/www/html/rp");
    std::fs::create_dir_all(&dir).expect("docroot dir");
    for (path, data) in web_files() {
        let name = path.trim_start_matches("/rp/").replace("%20", " ");
        std::fs::write(dir.join(name), data).expect("docroot file");
    }
}

/// GET `path` on a keep-alive connection: (status, the server announced a close, body).
fn http_get(
    w: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    path: &str,
) -> std::io::Result<(u16, bool, Vec<u8>)> {
    w.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let line = read_crlf(r)?;
    let sl = String::from_utf8_lossy(&line).into_owned();
    let status = sl
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| wrong(format!("GET {path}: status line {}", short(&line))))?;
    let (mut len, mut close) = (None, false);
    loop {
        let h = read_crlf(r)?;
        if h.is_empty() {
            break;
        }
        let h = String::from_utf8_lossy(&h).to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        } else if let Some(v) = h.strip_prefix("connection:") {
            close = v.trim() == "close";
        }
    }
    let len = len.ok_or_else(|| wrong(format!("GET {path}: no Content-Length")))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((status, close, body))
}

/// One client thread: up to `requests` GETs of the files (round robin from `t`) on
/// keep-alive connections, until `deadline`. 200 must be byte-exact; 400 is the rescue
/// point's answer and must close the connection. With `stop_on_error`, the first failed
/// connection ends it (the server is gone).
fn http_client(port: u16, t: usize, requests: u64, deadline: Instant, stop_on_error: bool) -> Seen {
    let files = web_files();
    let mut seen = Seen::default();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut i = 0u64;
    while i < requests && Instant::now() < deadline {
        if conn.is_none() {
            match connect(port).and_then(|s| Ok((s.try_clone()?, BufReader::new(s)))) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    seen.error(format!("connect: {e}"));
                    if stop_on_error {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let (w, r) = conn.as_mut().expect("connection");
        let (path, want) = &files[(i as usize + t) % files.len()];
        i += 1;
        match http_get(w, r, path) {
            Ok((200, close, body)) => {
                if body == *want {
                    seen.ok += 1;
                } else {
                    seen.wrong.push(format!(
                        "GET {path}: body of {} bytes {} differs from the file ({} bytes)",
                        body.len(),
                        short(&body),
                        want.len()
                    ));
                }
                if close {
                    conn = None;
                }
            }
            Ok((400, close, _)) => {
                seen.rescued += 1;
                if !close {
                    seen.wrong
                        .push(format!("GET {path}: 400 without Connection: close"));
                }
                conn = None;
            }
            Ok((status, _, body)) => {
                seen.wrong
                    .push(format!("GET {path}: status {status}: {}", short(&body)));
                conn = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                seen.wrong.push(e.to_string());
                conn = None;
            }
            Err(e) => {
                seen.error(format!("GET {path}: {e}"));
                conn = None;
                if stop_on_error {
                    break;
                }
            }
        }
    }
    seen
}

fn lighttpd_load(
    port: u16,
    threads: usize,
    per_thread: u64,
    limit: Duration,
    stop_on_error: bool,
) -> Seen {
    let deadline = Instant::now() + limit;
    load(threads, move |t| {
        http_client(port, t, per_thread, deadline, stop_on_error)
    })
}

/// wrk's URL path (the 4 KB file) and connections.
const WRK_PATH: &str = "/rp/b.bin";
const WRK_CONNECTIONS: u64 = 8;

#[test]
fn lighttpd_recovers_from_a_segv_every_7_requests_under_load() {
    let wrk = require_tool("wrk", "wrk");
    let mut s = Rescued::start(
        "lighttpd",
        8080,
        Some(&lighttpd_rescue(None)),
        &["burl_normalize:nth=20:every=7:kind=segv"],
        put_web_files,
    );
    // wrk first (5 s runs, again while the checking clients are not done), then the
    // checking clients once wrk's requests have reached the injection. burl_normalize runs
    // once per request of either, so which requests fault depends on the interleaving:
    // every request is the 7th with the same chance, checked or not.
    let url = format!("http://127.0.0.1:{}{WRK_PATH}", s.port());
    let bench = Background::start(
        "wrk",
        6,
        Duration::from_secs(60),
        Duration::from_secs(30),
        move || {
            let mut c = Command::new(&wrk);
            c.args(["-t2", &format!("-c{WRK_CONNECTIONS}"), "-d5s"])
                .args(["--timeout", "10s", "--latency"])
                .arg(&url);
            c
        },
    );
    s.wait_for_a_recovery(Duration::from_secs(30));
    let seen = lighttpd_load(s.port(), 4, 250, Duration::from_secs(120), false);
    let runs = bench.finish(Instant::now());
    seen.check("lighttpd under wrk, segv every 7 requests", 600);
    let rec = s.check_recovered("parse_target", 50, Some(11));
    for e in &rec {
        assert!(error_value_is(e, 400), "lighttpd: error value 400: {e}");
    }
    for run in &runs {
        assert!(run.status.success(), "wrk failed: {}", run.describe());
    }
    let reports: Vec<WrkReport> = runs.iter().map(|r| parse_wrk(&r.out)).collect();
    for (r, run) in reports.iter().zip(&runs) {
        assert!(
            r.requests > 0 && r.per_second > 0.0 && r.non_2xx < r.requests,
            "wrk: no successful load: {r:?}; {}",
            run.describe()
        );
    }
    let non_2xx: u64 = reports.iter().map(|r| r.non_2xx).sum();
    let socket_errors: u64 = reports.iter().map(|r| r.socket_errors).sum();
    let recoveries = rec.len() as u64;
    let summary = format!(
        "{recoveries} recoveries; checking clients: {seen:?}; wrk: {reports:?}; {}",
        s.context()
    );
    // Only a rescued request is answered 400: the 400s the checking clients saw and those
    // wrk counted are distinct recoveries, and wrk's socket errors (connections closed after
    // a 400) come on top of those at most.
    assert!(
        seen.rescued > 0,
        "lighttpd: none of the checking clients' requests faulted: {summary}"
    );
    assert!(
        seen.rescued + non_2xx + socket_errors <= recoveries,
        "lighttpd: more 400s and failed wrk connections than recoveries: {summary}"
    );
    // And every recovery answered someone: the checking clients read every answer, and wrk
    // counts every answer but those still in flight when a run stops.
    assert!(
        recoveries <= seen.rescued + non_2xx + socket_errors + WRK_CONNECTIONS * runs.len() as u64,
        "lighttpd: recoveries whose answer nobody got: {summary}"
    );
    eprintln!(
        "lighttpd under wrk: {recoveries} recoveries; checking clients {} ok, {} rescued; \
         wrk: {reports:?}",
        seen.ok, seen.rescued
    );
    // Still serving, byte-exact, after the load.
    let after = lighttpd_load(s.port(), 1, 8, Duration::from_secs(30), false);
    assert!(after.wrong.is_empty() && after.errors == 0, "{after:?}");
    assert!(s.srv.is_running(), "lighttpd: {}", s.context());
}

#[test]
fn lighttpd_recovers_from_hangs_after_the_hang_timeout() {
    let mut s = Rescued::start(
        "lighttpd",
        8080,
        Some(&lighttpd_rescue(Some(150))),
        &["burl_normalize:nth=10:every=30:count=5:kind=hang"],
        put_web_files,
    );
    let t0 = Instant::now();
    // 2 x 100 requests: calls 10, 40, 70, 100 and 130 hang.
    let seen = lighttpd_load(s.port(), 2, 100, Duration::from_secs(120), false);
    let took = t0.elapsed();
    seen.check("lighttpd, 5 hangs", 150);
    let rec = s.check_recovered("parse_target", 5, None);
    assert_eq!(rec.len(), 5, "count=5 injections: {rec:#?}");
    for e in &rec {
        let cause = e["cause"].as_str().unwrap_or_default();
        assert!(cause.contains("hang"), "lighttpd: a hang recovery: {e}");
    }
    assert_eq!(seen.rescued, 5, "one 400 per hang: {seen:?}");
    assert!(
        took >= Duration::from_millis(5 * 150),
        "five hangs of 150 ms each cannot be recovered in {took:?}"
    );
}

#[test]
fn lighttpd_without_a_rescue_point_dies_of_the_same_injection() {
    let mut s = Rescued::start(
        "lighttpd",
        8080,
        None,
        &["burl_normalize:nth=20:every=7:kind=segv"],
        put_web_files,
    );
    let seen = lighttpd_load(s.port(), 2, 40, Duration::from_secs(60), true);
    assert!(seen.wrong.is_empty(), "{:#?}", seen.wrong);
    assert_eq!(seen.rescued, 0, "no rescue point, no 400s: {seen:?}");
    assert!(
        seen.ok < 40,
        "the 20th request must have crashed lighttpd: {seen:?}"
    );
    s.check_crashed(11, Duration::from_secs(60));
}

// ---------------------------------------------------------------------------------------
// redis: RESP, SET/GET round trips of distinct keys
// ---------------------------------------------------------------------------------------

/// The reply redis gives when `lookupCommandLogic` returns NULL for `cmd`.
fn is_rescued(r: &Resp, cmd: &str) -> bool {
    matches!(r, Resp::Error(e) if e.starts_with(&format!("ERR unknown command '{cmd}'")))
}

fn redis_key(t: usize, j: usize) -> String {
    format!("rescue:{t}:{j:05}")
}

/// `value-T-J-` then 1..~2 KB of arbitrary bytes (CR, LF, NUL included).
fn redis_value(t: usize, j: usize) -> Vec<u8> {
    let mut v = format!("value-{t}-{j}-").into_bytes();
    v.extend(pseudo_random(
        ((t as u64) << 32) | j as u64,
        1 + (j * 131 + t * 17) % 2048,
    ));
    v
}

struct RedisConn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl RedisConn {
    fn open(port: u16) -> std::io::Result<RedisConn> {
        let s = connect(port)?;
        Ok(RedisConn {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Resp> {
        self.w.write_all(&resp(args))?;
        read_resp(&mut self.r)
    }
}

/// One client thread: SET then GET `keys` distinct keys (one connection, reopened only if
/// it fails), until `deadline`. Returns what it saw and, per key, whether its SET was
/// answered OK (true), rescued (false) or never made (None). With `stop_on_error`, the
/// first failed connection ends it (the server is gone).
fn redis_client(
    port: u16,
    t: usize,
    keys: usize,
    deadline: Instant,
    stop_on_error: bool,
) -> (Seen, Vec<Option<bool>>) {
    let mut seen = Seen::default();
    let mut stored = vec![None; keys];
    let mut conn: Option<RedisConn> = None;
    let mut j = 0;
    while j < keys && Instant::now() < deadline {
        if conn.is_none() {
            match RedisConn::open(port) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    seen.error(format!("connect: {e}"));
                    if stop_on_error {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connection");
        let (key, value) = (redis_key(t, j), redis_value(t, j));
        match c.call(&[b"SET", key.as_bytes(), &value]) {
            Ok(Resp::Simple(s)) if s == "OK" => {
                seen.ok += 1;
                stored[j] = Some(true);
            }
            Ok(r) if is_rescued(&r, "SET") => {
                seen.rescued += 1;
                stored[j] = Some(false);
            }
            Ok(other) => {
                seen.wrong.push(format!("SET {key}: {other:?}"));
                stored[j] = Some(false);
            }
            Err(e) => {
                seen.error(format!("SET {key}: {e}"));
                conn = None;
                j += 1; // its SET may or may not have happened: not checked
                if stop_on_error {
                    break;
                }
                continue;
            }
        }
        match c.call(&[b"GET", key.as_bytes()]) {
            Ok(r) if is_rescued(&r, "GET") => seen.rescued += 1,
            Ok(Resp::Bulk(v)) => {
                let want = (stored[j] == Some(true)).then(|| value.clone());
                if v == want {
                    seen.ok += 1;
                } else {
                    seen.wrong.push(format!(
                        "GET {key} after SET {:?}: {} instead of {}",
                        stored[j],
                        v.as_deref().map(short).unwrap_or_else(|| "nil".into()),
                        want.as_deref().map(short).unwrap_or_else(|| "nil".into())
                    ));
                }
            }
            Ok(other) => seen.wrong.push(format!("GET {key}: {other:?}")),
            Err(e) => {
                seen.error(format!("GET {key}: {e}"));
                conn = None;
                if stop_on_error {
                    break;
                }
            }
        }
        j += 1;
    }
    (seen, stored)
}

/// `threads` clients with `keys` keys each, then every key read again on a new connection
/// (a rescued GET is asked again, up to 5 times). Returns what all of it saw.
fn redis_load(port: u16, threads: usize, keys: usize, limit: Duration) -> Seen {
    let deadline = Instant::now() + limit;
    let results = concurrently(threads, move |t| {
        redis_client(port, t, keys, deadline, false)
    });
    let mut total = Seen::default();
    let mut stored = Vec::new();
    for (seen, st) in results {
        total.add(seen);
        stored.push(st);
    }
    let mut c = RedisConn::open(port).expect("connect to redis for the final check");
    for (t, st) in stored.iter().enumerate() {
        for (j, s) in st.iter().enumerate() {
            let Some(set_ok) = *s else { continue };
            let key = redis_key(t, j);
            let want = set_ok.then(|| redis_value(t, j));
            for attempt in 0.. {
                match c.call(&[b"GET", key.as_bytes()]) {
                    Ok(r) if is_rescued(&r, "GET") && attempt < 5 => total.rescued += 1,
                    Ok(Resp::Bulk(v)) if v == want => {
                        total.ok += 1;
                        break;
                    }
                    Ok(other) => {
                        total.wrong.push(format!(
                            "final GET {key} (SET ok: {set_ok}): {}",
                            match &other {
                                Resp::Bulk(Some(v)) => short(v),
                                o => format!("{o:?}"),
                            }
                        ));
                        break;
                    }
                    Err(e) => panic!("final GET {key}: {e}"),
                }
            }
        }
    }
    total
}

/// redis-benchmark's connections and requests per test and run.
const BENCH_CLIENTS: u64 = 16;
const BENCH_REQUESTS: u64 = 5_000;

fn redis_benchmark(bin: &Path, port: u16) -> Command {
    let mut c = Command::new(bin);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &BENCH_CLIENTS.to_string()])
        .args(["-n", &BENCH_REQUESTS.to_string()])
        .args(["-r", "100000", "-t", "set,get", "--csv"]);
    c
}

/// How a redis-benchmark run ended, and how many times it said its CONFIG GET failed.
#[derive(Debug, PartialEq, Eq)]
enum BenchEnd {
    /// Exit 0, with a SET and a GET rate above 0.
    Finished { config_failed: u64 },
    /// Exit 1 at the first error reply it read, the rescue point's unknown-command reply to
    /// one of its SETs or GETs: redis-benchmark 7.0 ends at any error reply that is not a
    /// cluster redirection (`readHandler`: "Error from server: ...", `exit(1)`).
    Rescued { config_failed: u64 },
}

/// The end of a run, or a failure for any other end. "WARNING: Could not fetch server
/// CONFIG" (not fatal) follows an error reply to its CONFIG GET at the start.
fn redis_benchmark_end(run: &ToolRun) -> BenchEnd {
    let lines: Vec<&str> = run.err.lines().filter(|l| !l.trim().is_empty()).collect();
    let config_failed = lines
        .iter()
        .filter(|l| **l == "WARNING: Could not fetch server CONFIG")
        .count() as u64;
    let rest: Vec<&&str> = lines
        .iter()
        .filter(|l| **l != "WARNING: Could not fetch server CONFIG")
        .collect();
    if run.status.success() {
        let rates = parse_redis_benchmark_csv(&run.out);
        for test in ["SET", "GET"] {
            assert!(
                rates.iter().any(|(t, rps)| t == test && *rps > 0.0),
                "redis-benchmark: no {test} rate: {rates:?}; {}",
                run.describe()
            );
        }
        assert!(rest.is_empty(), "redis-benchmark: {}", run.describe());
        return BenchEnd::Finished { config_failed };
    }
    let rescued = |l: &str| {
        ["SET", "GET"].iter().any(|cmd| {
            l.starts_with(&format!(
                "Error from server: ERR unknown command '{cmd}', with args beginning with: 'key:"
            ))
        })
    };
    assert!(
        run.status.code() == Some(1) && rest.len() == 1 && rescued(rest[0]),
        "redis-benchmark ended otherwise than at a rescued SET or GET: {}",
        run.describe()
    );
    BenchEnd::Rescued { config_failed }
}

/// The `calls` of SET and GET in `INFO commandstats` (asked again when the INFO itself is
/// rescued, at most 5 times): (calls, rescued INFOs).
fn redis_set_get_calls(port: u16) -> (u64, u64) {
    let mut c = RedisConn::open(port).expect("connect to redis for INFO");
    for rescued in 0..6 {
        match c.call(&[b"INFO", b"commandstats"]) {
            Ok(r) if is_rescued(&r, "INFO") && rescued < 5 => continue,
            Ok(Resp::Bulk(Some(text))) => {
                let text = String::from_utf8_lossy(&text).into_owned();
                let calls = |cmd: &str| -> u64 {
                    text.lines()
                        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
                        .and_then(|v| v.split(',').next())
                        .map(|v| v.parse().expect("calls"))
                        .unwrap_or(0)
                };
                return (calls("set") + calls("get"), rescued);
            }
            other => panic!("INFO commandstats: {other:?}"),
        }
    }
    unreachable!()
}

/// PINGs (pipelined, 64 at a time) until `remaining` injected faults are used up, each one
/// a rescued PING (nothing else runs meanwhile). Returns the PINGs sent. Bounded: a fault
/// comes every `every` calls.
fn redis_use_up_faults(port: u16, remaining: u64, every: u64) -> u64 {
    const BATCH: u64 = 64;
    let mut c = RedisConn::open(port).expect("connect to redis");
    let max = remaining * every + 2 * BATCH;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut left, mut sent) = (remaining, 0);
    let batch: Vec<u8> = (0..BATCH).flat_map(|_| resp(&[b"PING"])).collect();
    while left > 0 {
        assert!(
            sent < max && Instant::now() < deadline,
            "{left} of {remaining} injected faults still to come after {sent} PINGs"
        );
        c.w.write_all(&batch).expect("send PINGs");
        for _ in 0..BATCH {
            match read_resp(&mut c.r).expect("PING reply") {
                Resp::Simple(s) if s == "PONG" => {}
                r if is_rescued(&r, "PING") => {
                    assert!(left > 0, "more faults than the injection's count");
                    left -= 1;
                }
                other => panic!("PING: {other:?}"),
            }
        }
        sent += BATCH;
    }
    sent
}

/// The redis load test's injection and its number of faults.
const REDIS_FAULTS: u64 = 1_500;

#[test]
fn redis_recovers_from_a_segv_every_9_commands_under_load() {
    let bench_bin = require_tool("redis-benchmark", "redis-tools");
    let inject = format!("dictFetchValue:nth=30:every=9:count={REDIS_FAULTS}:kind=segv");
    let mut s = Rescued::start(
        "redis",
        6379,
        Some(&redis_rescue()),
        &[inject.as_str()],
        |_| {},
    );
    // redis-benchmark first (SET and GET on random keys `key:NNNNNNNNNNNN`, never a checking
    // client's `rescue:T:J`), run again and again while the checking clients are not done;
    // then the checking clients, once its commands have reached the injection: 8 clients x
    // 100 keys, 1,600 commands, then 800 GETs. dictFetchValue runs once per command of
    // either (twice for redis-benchmark's CONFIG GET at its start), so which commands fault
    // depends on the interleaving. redis-benchmark 7.0 ends at the first error reply it
    // reads: a run ends at its first rescued command (see `BenchEnd`).
    let port = s.port();
    let bench_path = bench_bin.clone();
    let bench = Background::start(
        "redis-benchmark",
        1_000,
        Duration::from_secs(120),
        Duration::from_secs(60),
        move || redis_benchmark(&bench_path, port),
    );
    s.wait_for_a_recovery(Duration::from_secs(30));
    let seen = redis_load(s.port(), 8, 100, Duration::from_secs(180));
    let runs = bench.finish(Instant::now());
    seen.check("redis under redis-benchmark, segv every 9 commands", 1_500);
    let rec = s.check_recovered("lookup_command", 100, Some(11));
    for e in &rec {
        assert!(error_value_is(e, 0), "redis: error value NULL (0): {e}");
    }
    let ends: Vec<BenchEnd> = runs.iter().map(redis_benchmark_end).collect();
    let aborted = ends
        .iter()
        .filter(|e| matches!(e, BenchEnd::Rescued { .. }))
        .count() as u64;
    let config_failed: u64 = ends
        .iter()
        .map(|e| match e {
            BenchEnd::Finished { config_failed } | BenchEnd::Rescued { config_failed } => {
                *config_failed
            }
        })
        .sum();
    let (set_get_calls, info_rescued) = redis_set_get_calls(s.port());
    let recoveries = rec.len() as u64;
    let summary = format!(
        "{recoveries} recoveries; checking clients: {seen:?}; {} redis-benchmark runs, {aborted} \
         ended by a rescued command, {config_failed} CONFIG GETs failed; {set_get_calls} SET/GET \
         calls in all; {}",
        runs.len(),
        s.context()
    );
    // The injection's faults lasted the whole load.
    assert!(
        recoveries < REDIS_FAULTS,
        "redis: raise REDIS_FAULTS: {summary}"
    );
    // Every unknown-command reply the checking clients saw is a recovery, and so is each that
    // ended a redis-benchmark run or failed its CONFIG GET, all distinct.
    assert!(
        seen.rescued > 0 && aborted > 0,
        "redis: the faults must hit both the checking clients and redis-benchmark: {summary}"
    );
    assert!(
        seen.rescued + aborted + config_failed <= recoveries,
        "redis: more rescued replies than recoveries: {summary}"
    );
    // The SETs and GETs redis ran that the checking clients did not see answered correctly
    // are redis-benchmark's (the checking clients saw every answer to theirs).
    assert!(
        set_get_calls > seen.ok,
        "redis: none of redis-benchmark's SETs and GETs ran: {summary}"
    );
    let bench_calls = set_get_calls - seen.ok;

    // Use up the remaining faults, then one whole redis-benchmark run: exit 0, a SET and a
    // GET rate.
    let left = REDIS_FAULTS - s.recoveries().len() as u64;
    let pings = redis_use_up_faults(s.port(), left, 9);
    let last = {
        let started = Instant::now();
        let (status, out, err) = run_bounded(
            redis_benchmark(&bench_bin, s.port()),
            Duration::from_secs(60),
        );
        ToolRun {
            status,
            out,
            err,
            started,
            ended: Instant::now(),
        }
    };
    assert_eq!(
        redis_benchmark_end(&last),
        BenchEnd::Finished { config_failed: 0 },
        "{}",
        last.describe()
    );
    let rec = s.check_recovered("lookup_command", REDIS_FAULTS as usize, Some(11));
    assert_eq!(
        rec.len() as u64,
        REDIS_FAULTS,
        "redis: count={REDIS_FAULTS} faults, each one recovered"
    );
    eprintln!(
        "redis under redis-benchmark: {recoveries} recoveries; checking clients {} ok, {} \
         rescued; redis-benchmark: {} runs, {aborted} ended by a rescued command, \
         {config_failed} CONFIG GETs failed, {bench_calls} SETs and GETs ran ({info_rescued} \
         INFO rescued); then {left} faults used up by {pings} PINGs; a whole run: {:?}",
        seen.ok,
        seen.rescued,
        runs.len(),
        parse_redis_benchmark_csv(&last.out)
    );
}

#[test]
fn redis_recovers_from_abort() {
    let mut s = Rescued::start(
        "redis",
        6379,
        Some(&redis_rescue()),
        &["dictFetchValue:nth=20:every=25:kind=abort"],
        |_| {},
    );
    // 4 clients x 50 keys: 400 commands, then 200 GETs: about 24 faults.
    let seen = redis_load(s.port(), 4, 50, Duration::from_secs(180));
    seen.check("redis, abort every 25 commands", 500);
    let rec = s.check_recovered("lookup_command", 15, Some(6));
    assert_eq!(seen.rescued, rec.len() as u64, "{seen:?}; {}", s.context());
}

#[test]
fn redis_without_a_rescue_point_dies_of_the_same_injection() {
    let mut s = Rescued::start(
        "redis",
        6379,
        None,
        &["dictFetchValue:nth=30:every=9:kind=segv"],
        |_| {},
    );
    let seen = redis_load_until_gone(s.port(), Duration::from_secs(60));
    assert!(seen.wrong.is_empty(), "{:#?}", seen.wrong);
    assert_eq!(
        seen.rescued, 0,
        "no rescue point, no rescued replies: {seen:?}"
    );
    // redis's own SIGSEGV handler logs a crash report and re-raises the signal.
    s.check_crashed(11, Duration::from_secs(120));
}

/// SET/GET on one connection until it fails (at most 200 commands or `limit`).
fn redis_load_until_gone(port: u16, limit: Duration) -> Seen {
    let (seen, _) = redis_client(port, 0, 100, Instant::now() + limit, true);
    assert!(
        seen.ok < 40,
        "about the 29th command after start-up must have crashed redis: {seen:?}"
    );
    seen
}
