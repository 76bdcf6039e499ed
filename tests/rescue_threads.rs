//! Rescue points in a multi-threaded server: Debian's memcached 1.6.18 (images/out/memcached,
//! 4 worker threads) under assure-vmm with faults injected below a rescue point while
//! several clients, each on its own connection (memcached hands connections to its worker
//! threads round-robin), store and read values of their own.
//!
//! The points and injection sites come from docs/debian-rescue-points.md ("memcached"). The
//! binary is stripped without symbols, so both are `.eh_frame` offsets:
//!
//! - `limited_get` (`0x10970`) returns NULL: `process_get_command` counts a miss and the
//!   client reads `END` (a miss). Faults go into `item_get` (`0x19a00`), which a SET/GET
//!   workload reaches only from `limited_get`, once per GET.
//! - `item_alloc` (`0x199f0`) returns NULL: `process_update_command` answers
//!   `SERVER_ERROR out of memory storing object` and swallows the value. Faults go into
//!   `do_item_alloc` (`0x17300`), which `item_alloc` tail-calls, once per SET.
//!
//! Both points are in the rescue file of both load tests, so every SET and every GET opens
//! a window (a checkpoint of the whole sandbox) while the other worker threads go on
//! serving other clients; one test injects into GETs, the other into SETs. What the
//! clients must see: every reply byte-exact (values of 1 byte to 60 KB, every byte value,
//! so that I/O spans several reads and writes; some requests pipelined); a faulted request
//! gets the server's own answer (a miss, or the SERVER_ERROR) and never a wrong value; no
//! connection fails, and no byte is lost, duplicated or reordered (each connection ends
//! with a `version` round trip and nothing after it). At the end: the VMM still runs, the
//! recovery events name the point, no checkpoint or window is left open, every key stored
//! reads back exact on a new connection, and memcached's own counters (`stats`: hits,
//! misses, sets, out-of-memory stores) equal what the clients saw: each request ran exactly
//! once in the history that survived the rollbacks. The companion tests run the same
//! injections without the rescue file: the first fault ends the run (exit 139, a `crash`
//! event).
//!
//! Loads are bounded in count and in time; all traffic is on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::resp::short;
use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// The rescue points and injections (docs/debian-rescue-points.md, "memcached")
// ---------------------------------------------------------------------------------------

/// Both rescue points, by `.eh_frame` offset in /usr/bin/memcached (no symbols).
const RESCUE: &str = "\
[[rescue]]
name = \"limited_get\"
offset = 0x10970
return = \"null\"
max_recoveries_per_minute = 100000

[[rescue]]
name = \"item_alloc\"
offset = 0x199f0
return = \"null\"
max_recoveries_per_minute = 100000
";

/// `item_get`, below `limited_get` only (for SET/GET): faults GETs.
const INJECT_GET: &str = "+0x19a00:nth=5:every=9:kind=segv";
/// `do_item_alloc`, below `item_alloc` only (for SET/GET): faults SETs.
const INJECT_SET: &str = "+0x17300:nth=4:every=7:kind=segv";

/// memcached's answer to a SET whose `item_alloc` returned NULL.
const SET_REFUSED: &[u8] = b"SERVER_ERROR out of memory storing object";

/// Client threads, each on its own connection, and keys per client.
const CLIENTS: usize = 10;
const KEYS: usize = 40;
/// Bound of one client's whole run, and of one reply.
const LOAD_LIMIT: Duration = Duration::from_secs(150);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// memcached under the VMM
// ---------------------------------------------------------------------------------------

struct Memcached {
    srv: Server,
    events: PathBuf,
    control: PathBuf,
    _tmp: TempDir,
}

impl Memcached {
    /// A copy of the memcached image under the VMM, with the rescue file if `rescue`.
    fn start(rescue: bool, inject: &str) -> Memcached {
        require_kvm();
        let (tmp, dir) = copy_image("memcached");
        let events = tmp.path().join("events.jsonl");
        let control = tmp.path().join("ctl.sock");
        let mut extra: Vec<String> = vec![
            "--events".into(),
            path_str(&events),
            "--control".into(),
            path_str(&control),
            "--inject".into(),
            inject.into(),
        ];
        if rescue {
            let file = tmp.path().join("rescue.toml");
            std::fs::write(&file, RESCUE).expect("write rescue file");
            extra.push("--rescue".into());
            extra.push(path_str(&file));
        }
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let srv = start_vmm(&dir, 11211, &args);
        Memcached {
            srv,
            events,
            control,
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

    /// A control request (`assure-vmm ctl PATH ARGS`), as JSON (Null if it failed).
    fn ctl(&self, args: &[&str]) -> Value {
        let mut c = Command::new(vmm_bin());
        c.arg("ctl").arg(&self.control).args(args);
        let out = std::thread::spawn(move || c.output());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !out.is_finished() {
            return Value::Null;
        }
        match out.join() {
            Ok(Ok(o)) => serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// For messages: the VMM's live checkpoints, open windows, point counters and
    /// injections, the events other than recoveries, the last recoveries, the log's tail.
    fn context(&mut self) -> String {
        let mut running = self.srv.is_running();
        let (status, rescue) = if running {
            (self.ctl(&["status"]), self.ctl(&["rescue"]))
        } else {
            (Value::Null, Value::Null)
        };
        if status.is_null() {
            // The control socket did not answer: the run may be ending.
            std::thread::sleep(Duration::from_secs(1));
            running = self.srv.is_running();
        }
        let exit = match self.srv.child.try_wait() {
            Ok(Some(st)) => format!(" (exit {})", shell_code(st)),
            _ => String::new(),
        };
        let points: Vec<Value> = rescue["points"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| serde_json::json!({"name": p["name"], "stats": p["stats"]}))
                    .collect()
            })
            .unwrap_or_default();
        let evs = self.events();
        let others: Vec<String> = evs
            .iter()
            .filter(|e| e["event"] != "recovery")
            .take(5)
            .map(|e| e.to_string())
            .collect();
        let recs: Vec<String> = evs
            .iter()
            .filter(|e| e["event"] == "recovery")
            .map(|e| {
                format!(
                    "tid {} checkpoint {} point {} rollback {} us",
                    e["tid"], e["checkpoint"], e["rescue_point"], e["rollback_us"]
                )
            })
            .collect();
        let log = self.srv.stderr_text();
        let mut start = log.len().saturating_sub(4000);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "VMM running: {running}{exit}\ncheckpoints: {}\nwindows: {}\npoints: {}\ninjections: {}\n\
             {} recoveries, the last: {:#?}\nother events: {others:#?}\n--- log tail:\n{}",
            status["checkpoints"],
            rescue["windows"],
            Value::Array(points),
            rescue["injections"],
            recs.len(),
            &recs[recs.len().saturating_sub(8)..],
            &log[start..]
        )
    }

    /// The VMM runs, no crash or quarantine event, at least `min` recoveries, all of
    /// `point` by SIGSEGV with the error value NULL (0). Returns their number.
    fn check_recovered(&mut self, point: &str, min: usize) -> usize {
        assert!(
            self.srv.is_running(),
            "memcached: the VMM exited under injected faults with rescue points; {}",
            self.context()
        );
        let evs = self.events();
        let bad: Vec<&Value> = evs
            .iter()
            .filter(|e| e["event"] == "crash" || e["event"] == "quarantine")
            .collect();
        assert!(bad.is_empty(), "crash or quarantine events: {bad:#?}");
        let rec = self.recoveries();
        assert!(
            rec.len() >= min,
            "{} recovery events, expected at least {min}; {}",
            rec.len(),
            self.context()
        );
        for e in &rec {
            assert_eq!(e["rescue_point"], point, "a recovery of another point: {e}");
            assert_eq!(e["signal"], 11, "recovery event {e}");
            let v = &e["error_value"];
            assert!(
                v.as_i64() == Some(0) || v.as_str() == Some("0"),
                "error value NULL (0): {e}"
            );
        }
        rec.len()
    }

    /// Once the load is over, no window is open and no checkpoint is live: every window
    /// closed, and its checkpoint was released (else output stays held).
    fn check_nothing_open(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.ctl(&["status"]);
            let rescue = self.ctl(&["rescue"]);
            let live = status["checkpoints"]["live"].as_array().map(Vec::len);
            let windows = rescue["windows"].as_object().map(|w| w.len());
            if live == Some(0) && windows == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "checkpoints still live or windows open with the load over; {}",
                self.context()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The text protocol, on a connection that keeps what it has received
// ---------------------------------------------------------------------------------------

/// What went wrong on a connection.
#[derive(Debug)]
enum Fail {
    /// Bytes that are not the answer: always a failure of the test.
    Wrong(String),
    /// The connection failed (reset, EOF, timeout): with what was received of the reply.
    Io(String),
}

/// A client connection: its own receive buffer, so that a failure can say which bytes of
/// the reply it had.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    /// Bytes received so far on this connection.
    received: u64,
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        s.set_nodelay(true).ok();
        Ok(Conn {
            s,
            buf: Vec::new(),
            received: 0,
        })
    }

    fn send(&mut self, what: &str, b: &[u8]) -> Result<(), Fail> {
        self.s
            .write_all(b)
            .map_err(|e| Fail::Io(format!("{what}: sending {} bytes: {e}", b.len())))
    }

    fn fill(&mut self, what: &str) -> Result<(), Fail> {
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) => Err(Fail::Io(format!(
                "{what}: connection closed after {} bytes; {} bytes of the reply: {}",
                self.received,
                self.buf.len(),
                short(&self.buf)
            ))),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.received += n as u64;
                Ok(())
            }
            Err(e) => Err(Fail::Io(format!(
                "{what}: {e} after {} bytes on the connection; {} bytes of the reply: {}",
                self.received,
                self.buf.len(),
                short(&self.buf)
            ))),
        }
    }

    /// One line, without its CRLF.
    fn line(&mut self, what: &str) -> Result<Vec<u8>, Fail> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 1024 {
                return Err(Fail::Wrong(format!(
                    "{what}: no CRLF in {}",
                    short(&self.buf)
                )));
            }
            self.fill(what)?;
        }
    }

    /// Exactly `n` bytes.
    fn bytes(&mut self, what: &str, n: usize) -> Result<Vec<u8>, Fail> {
        while self.buf.len() < n {
            self.fill(what)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A `version` round trip, then nothing more: no stray byte left on the connection.
    fn finish(&mut self, what: &str) -> Result<(), Fail> {
        self.send(what, b"version\r\n")?;
        let v = self.line(what)?;
        if !v.starts_with(b"VERSION 1.6.") {
            return Err(Fail::Wrong(format!("{what}: version: {}", short(&v))));
        }
        self.s
            .set_read_timeout(Some(Duration::from_millis(300)))
            .ok();
        let mut extra = [0u8; 256];
        let tail = match self.s.read(&mut extra) {
            Ok(n) => extra[..n].to_vec(),
            Err(_) => Vec::new(),
        };
        if !self.buf.is_empty() || !tail.is_empty() {
            let mut all = self.buf.clone();
            all.extend_from_slice(&tail);
            return Err(Fail::Wrong(format!(
                "{what}: bytes after the last reply: {}",
                short(&all)
            )));
        }
        Ok(())
    }
}

fn key(tag: &str, t: usize, j: usize) -> String {
    format!("rt:{tag}:{t}:{j}")
}

fn flags(t: usize, j: usize) -> u32 {
    (t * 1000 + j) as u32
}

/// The value of key (t, j): every byte value; even keys 1 to 3,000 bytes, odd ones 20 to
/// 60 KB (several reads and writes each way).
fn value(t: usize, j: usize) -> Vec<u8> {
    let n = if j.is_multiple_of(2) {
        1 + (t * 131 + j * 977) % 3_000
    } else {
        20_000 + (t * 7_919 + j * 104_729) % 40_001
    };
    pseudo_random(((t as u64) << 20) | j as u64 | 0x5eed_0000_0000, n)
}

fn set_request(tag: &str, t: usize, j: usize) -> Vec<u8> {
    let v = value(t, j);
    let mut req = format!("set {} {} 0 {}\r\n", key(tag, t, j), flags(t, j), v.len()).into_bytes();
    req.extend_from_slice(&v);
    req.extend_from_slice(b"\r\n");
    req
}

fn get_request(tag: &str, t: usize, j: usize) -> Vec<u8> {
    format!("get {}\r\n", key(tag, t, j)).into_bytes()
}

/// The answer to a SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetReply {
    Stored,
    /// The rescue point's `SERVER_ERROR out of memory storing object`.
    Refused,
}

fn read_set(c: &mut Conn, k: &str) -> Result<SetReply, Fail> {
    let what = format!("set {k}");
    let line = c.line(&what)?;
    if line == b"STORED" {
        Ok(SetReply::Stored)
    } else if line == SET_REFUSED {
        Ok(SetReply::Refused)
    } else {
        Err(Fail::Wrong(format!("{what}: {}", short(&line))))
    }
}

/// The answer to a GET of key (t, j): Some(()) for exactly its value and flags (the only
/// value it can have), None for a miss (`END`).
fn read_get(c: &mut Conn, tag: &str, t: usize, j: usize) -> Result<Option<()>, Fail> {
    let k = key(tag, t, j);
    let what = format!("get {k}");
    let line = c.line(&what)?;
    if line == b"END" {
        return Ok(None);
    }
    let want = value(t, j);
    let head = format!("VALUE {k} {} {}", flags(t, j), want.len());
    if line != head.as_bytes() {
        return Err(Fail::Wrong(format!(
            "{what}: {} instead of {head:?}",
            short(&line)
        )));
    }
    let data = c.bytes(&what, want.len() + 2)?;
    if data[..want.len()] != want[..] || &data[want.len()..] != b"\r\n" {
        let at = data.iter().zip(&want).position(|(a, b)| a != b);
        return Err(Fail::Wrong(format!(
            "{what}: {} value bytes differ from the stored ones (first at {at:?})",
            want.len()
        )));
    }
    let end = c.line(&what)?;
    if end != b"END" {
        return Err(Fail::Wrong(format!(
            "{what}: {} instead of END",
            short(&end)
        )));
    }
    Ok(Some(()))
}

// ---------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------

/// Which requests may fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Faults {
    Gets,
    Sets,
}

/// What one client (or all of them) saw.
#[derive(Debug, Default)]
struct Seen {
    stored: u64,
    /// SETs answered with the rescue point's SERVER_ERROR.
    refused: u64,
    /// GETs answered with the exact value.
    hits: u64,
    /// GETs answered `END`.
    misses: u64,
    /// Misses of keys that were stored: GETs the rescue point answered.
    rescued_misses: u64,
    wrong: Vec<String>,
    failed: Vec<String>,
}

impl Seen {
    fn add(&mut self, o: Seen) {
        self.stored += o.stored;
        self.refused += o.refused;
        self.hits += o.hits;
        self.misses += o.misses;
        self.rescued_misses += o.rescued_misses;
        self.wrong.extend(o.wrong);
        self.failed.extend(o.failed);
    }

    fn fail(&mut self, f: Fail) {
        match f {
            Fail::Wrong(s) => self.wrong.push(s),
            Fail::Io(s) => self.failed.push(s),
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} stored, {} refused, {} hits, {} misses ({} of stored keys), {} wrong, {} failed",
            self.stored,
            self.refused,
            self.hits,
            self.misses,
            self.rescued_misses,
            self.wrong.len(),
            self.failed.len()
        )
    }
}

/// One client: SET then GET of each of its keys on one connection (every third pair
/// pipelined in one write), then a `version` round trip. Returns what it saw and which
/// keys it stored.
fn client(port: u16, tag: &str, t: usize, faults: Faults, deadline: Instant) -> (Seen, Vec<bool>) {
    let mut seen = Seen::default();
    let mut stored = vec![false; KEYS];
    let mut c = match Conn::open(port) {
        Ok(c) => c,
        Err(e) => {
            seen.failed.push(format!("client {t}: connect: {e}"));
            return (seen, stored);
        }
    };
    // `j` names the key and its value as well as its `stored` slot.
    #[allow(clippy::needless_range_loop)]
    let run = |c: &mut Conn, seen: &mut Seen, stored: &mut Vec<bool>| -> Result<(), Fail> {
        for j in 0..KEYS {
            if Instant::now() > deadline {
                return Err(Fail::Io(format!("client {t}: out of time at key {j}")));
            }
            let k = key(tag, t, j);
            let pipelined = j % 3 == 2;
            let set = set_request(tag, t, j);
            if pipelined {
                let mut both = set;
                both.extend_from_slice(&get_request(tag, t, j));
                c.send(&k, &both)?;
            } else {
                c.send(&k, &set)?;
            }
            match read_set(c, &k)? {
                SetReply::Stored => {
                    seen.stored += 1;
                    stored[j] = true;
                }
                SetReply::Refused if faults == Faults::Sets => seen.refused += 1,
                SetReply::Refused => {
                    return Err(Fail::Wrong(format!(
                        "client {t}: set {k}: refused, but SETs do not fault here"
                    )))
                }
            }
            if !pipelined {
                c.send(&k, &get_request(tag, t, j))?;
            }
            match read_get(c, tag, t, j)? {
                Some(()) if stored[j] => seen.hits += 1,
                Some(()) => {
                    return Err(Fail::Wrong(format!(
                        "client {t}: get {k}: a value, but its SET was refused"
                    )))
                }
                None if !stored[j] => seen.misses += 1,
                None if faults == Faults::Gets => {
                    seen.misses += 1;
                    seen.rescued_misses += 1;
                }
                None => {
                    return Err(Fail::Wrong(format!(
                        "client {t}: get {k}: a miss after STORED, but GETs do not fault here"
                    )))
                }
            }
        }
        c.finish(&format!("client {t}: the end"))
    };
    if let Err(f) = run(&mut c, &mut seen, &mut stored) {
        seen.fail(match f {
            Fail::Wrong(s) => Fail::Wrong(format!("client {t}: {s}")),
            Fail::Io(s) => Fail::Io(format!("client {t}: {s}")),
        });
    }
    (seen, stored)
}

/// Every key stored, read back on a new connection: exactly its value. A miss is a faulted
/// GET (with `Faults::Gets`): asked again, at most 5 times.
fn final_read(port: u16, tag: &str, stored: &[Vec<bool>], faults: Faults) -> Seen {
    let mut seen = Seen::default();
    let mut c = Conn::open(port).expect("connect to memcached for the final read");
    for (t, keys) in stored.iter().enumerate() {
        for (j, _) in keys.iter().enumerate().filter(|(_, s)| **s) {
            let k = key(tag, t, j);
            for attempt in 0.. {
                let r = c
                    .send(&k, &get_request(tag, t, j))
                    .and_then(|_| read_get(&mut c, tag, t, j));
                match r {
                    Ok(Some(())) => {
                        seen.hits += 1;
                        break;
                    }
                    Ok(None) if faults == Faults::Gets && attempt < 5 => {
                        seen.misses += 1;
                        seen.rescued_misses += 1;
                    }
                    Ok(None) => {
                        seen.misses += 1;
                        seen.wrong
                            .push(format!("final read: {k} was stored and is missing"));
                        break;
                    }
                    Err(f) => {
                        seen.fail(f);
                        return seen;
                    }
                }
            }
        }
    }
    if let Err(f) = c.finish("final read: the end") {
        seen.fail(f);
    }
    seen
}

/// memcached's `stats` (asked on a new connection): name -> value.
fn stats(port: u16) -> std::collections::HashMap<String, u64> {
    let mut c = Conn::open(port).expect("connect to memcached for stats");
    c.send("stats", b"stats\r\n").expect("send stats");
    let mut m = std::collections::HashMap::new();
    loop {
        let line = c.line("stats").unwrap_or_else(|f| panic!("stats: {f:?}"));
        if line == b"END" {
            break;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let f: Vec<&str> = text.split(' ').collect();
        if let ["STAT", name, v] = f.as_slice() {
            if let Ok(v) = v.parse::<u64>() {
                m.insert(name.to_string(), v);
            }
        }
    }
    m
}

/// The load test: `CLIENTS` clients at once, then the final read, then the checks.
fn rescued_under_load(faults: Faults) {
    let (tag, inject, point) = match faults {
        Faults::Gets => ("g", INJECT_GET, "limited_get"),
        Faults::Sets => ("s", INJECT_SET, "item_alloc"),
    };
    let mut m = Memcached::start(true, inject);
    let port = m.port();
    let deadline = Instant::now() + LOAD_LIMIT;
    let t0 = Instant::now();
    let results = concurrently(CLIENTS, move |t| client(port, tag, t, faults, deadline));
    let load_time = t0.elapsed();
    let mut seen = Seen::default();
    let mut stored = Vec::new();
    for (s, st) in results {
        seen.add(s);
        stored.push(st);
    }
    let what = format!("memcached, {CLIENTS} clients, faults in {faults:?} ({inject})");
    // Clients first: a failed or wrong reply is the finding; say what the VMM holds.
    if !seen.wrong.is_empty() || !seen.failed.is_empty() {
        let ctx = m.context();
        panic!(
            "{what}: {}\nwrong replies: {:#?}\nfailed connections (a recovery must not \
             disturb other clients): {:#?}\n{ctx}",
            seen.summary(),
            seen.wrong,
            seen.failed
        );
    }
    let fin = final_read(port, tag, &stored, faults);
    if !fin.wrong.is_empty() || !fin.failed.is_empty() {
        let ctx = m.context();
        panic!(
            "{what}: final read: {}\nwrong: {:#?}\nfailed: {:#?}\n{ctx}",
            fin.summary(),
            fin.wrong,
            fin.failed
        );
    }
    let recoveries = m.check_recovered(point, 8) as u64;
    m.check_nothing_open();
    let st = stats(port);
    let stat = |n: &str| -> u64 {
        *st.get(n)
            .unwrap_or_else(|| panic!("memcached stats has no {n}: {st:?}"))
    };
    let keys = (CLIENTS * KEYS) as u64;
    let mut all = Seen::default();
    all.add(Seen {
        stored: seen.stored,
        refused: seen.refused,
        hits: seen.hits,
        misses: seen.misses,
        rescued_misses: seen.rescued_misses,
        ..Seen::default()
    });
    all.add(fin);
    let summary = format!(
        "{what}: load {:.1} s; {recoveries} recoveries; clients: {}; with the final read: {}; \
         stats: cmd_get {} get_hits {} get_misses {} cmd_set {} store_no_memory {}",
        load_time.as_secs_f64(),
        seen.summary(),
        all.summary(),
        stat("cmd_get"),
        stat("get_hits"),
        stat("get_misses"),
        stat("cmd_set"),
        stat("store_no_memory")
    );
    assert_eq!(
        seen.stored + seen.refused,
        keys,
        "every SET answered: {summary}"
    );
    match faults {
        Faults::Gets => {
            assert_eq!(seen.stored, keys, "no SET faults here: {summary}");
            assert!(
                seen.rescued_misses > 0,
                "the faults must hit some clients' GETs: {summary}"
            );
            // A recovery answers one GET with a miss, unless a rollback to an older window
            // of another thread undid its answer too (that GET then ran again and hit).
            assert!(
                all.rescued_misses <= recoveries,
                "more rescued misses than recoveries: {summary}"
            );
        }
        Faults::Sets => {
            assert!(
                seen.refused > 0,
                "the faults must hit some clients' SETs: {summary}"
            );
            assert!(
                seen.refused <= recoveries,
                "more refused SETs than recoveries: {summary}"
            );
            assert_eq!(all.rescued_misses, 0, "no GET faults here: {summary}");
        }
    }
    // Each request ran exactly once in the history that survived the rollbacks: memcached's
    // own counters are what the clients saw.
    assert_eq!(stat("get_hits"), all.hits, "get_hits: {summary}");
    assert_eq!(stat("get_misses"), all.misses, "get_misses: {summary}");
    assert_eq!(stat("cmd_get"), all.hits + all.misses, "cmd_get: {summary}");
    assert_eq!(stat("cmd_set"), seen.stored, "cmd_set: {summary}");
    assert_eq!(
        stat("store_no_memory"),
        seen.refused,
        "store_no_memory: {summary}"
    );
    eprintln!("{summary}");
}

#[test]
fn memcached_rescues_gets_while_other_threads_serve() {
    rescued_under_load(Faults::Gets);
}

#[test]
fn memcached_rescues_sets_while_other_threads_serve() {
    rescued_under_load(Faults::Sets);
}

/// Without the rescue file the same injection ends the run at its first fault: exit 139
/// (SIGSEGV; memcached has no handler for it) and a `crash` event, no recovery.
fn dies_without_rescue(faults: Faults) {
    let (tag, inject) = match faults {
        Faults::Gets => ("g", INJECT_GET),
        Faults::Sets => ("s", INJECT_SET),
    };
    let mut m = Memcached::start(false, inject);
    let (seen, _) = client(
        m.port(),
        tag,
        0,
        faults,
        Instant::now() + Duration::from_secs(60),
    );
    assert!(seen.wrong.is_empty(), "{:#?}", seen.wrong);
    assert_eq!(seen.failed.len(), 1, "the connection fails: {seen:?}");
    assert_eq!(
        seen.refused + seen.rescued_misses,
        0,
        "no rescue point, no rescued answers: {seen:?}"
    );
    let st = m.srv.wait(Duration::from_secs(60));
    assert_eq!(
        shell_code(st),
        139,
        "without a rescue point the injected fault must end the run; {}",
        m.context()
    );
    let evs = m.events();
    let crash = evs
        .iter()
        .find(|e| e["event"] == "crash")
        .unwrap_or_else(|| panic!("no crash event in {evs:#?}"));
    assert_eq!(crash["signal"], 11, "{crash}");
    assert!(
        !evs.iter().any(|e| e["event"] == "recovery"),
        "a recovery without a rescue point: {evs:#?}"
    );
}

#[test]
fn memcached_without_rescue_points_dies_of_the_get_injection() {
    dies_without_rescue(Faults::Gets);
}

#[test]
fn memcached_without_rescue_points_dies_of_the_set_injection() {
    dies_without_rescue(Faults::Sets);
}
