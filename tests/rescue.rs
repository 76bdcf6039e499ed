//! Rescue points on bugsrv (a C HTTP server with real bug classes, stripped like Debian's
//! binaries): every bug class, triggered again and again while healthy clients run, is
//! rolled back to the request handler's rescue point, which returns -1, and the server
//! answers 500 by its own error path. Healthy clients get every byte right; the server
//! never restarts. Without the rescue point the same request ends the run.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn bugsrv_root(binary: &Path) -> TempDir {
    let root = root_with("rescue", binary, "bugsrv");
    std::fs::create_dir_all(root.path().join("www")).expect("docroot");
    std::fs::write(root.path().join("www/hello.txt"), "a file in the docroot\n").expect("file");
    root
}

/// `process_request`'s offset in the stripped binary, found the way an operator would:
/// `assure-vmm functions` on a build with symbols (a static executable's load bias is 0).
fn process_request_offset() -> u64 {
    function_start(&guest_tools::bugsrv(), "process_request")
}

fn write_rescue(root: &TempDir, body: &str) -> String {
    let path = root.path().join("rescue.toml");
    std::fs::write(&path, body).expect("rescue file");
    path.to_str().expect("utf-8").to_string()
}

fn start(root: &TempDir, extra: &[&str]) -> Server {
    Server::start(
        root.path(),
        extra,
        &["/bugsrv", "-p", "0", "-d", "/www"],
        "bugsrv: listening on",
    )
}

/// One HTTP/1.1 response on a keep-alive connection: (status, body); None if the
/// connection closed first.
fn read_response(s: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
        if buf.len() > 16 << 10 {
            return None;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, body))
}

/// Healthy keep-alive clients: each sends `/echo?msg=...` with a unique message and checks
/// the body byte for byte. Returns (requests done, failures as text).
fn healthy_clients(
    port: u16,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, Vec<String>)>> {
    (0..n)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut done = 0u64;
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(240);
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20))).ok();
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let msg = format!("client{c}-request{done}-{}", "x".repeat(c * 7 % 50));
                    let req = format!("GET /echo?msg={msg} HTTP/1.1\r\nHost: t\r\n\r\n");
                    if s.write_all(req.as_bytes()).is_err() {
                        failures.push(format!("client {c}: write failed after {done}"));
                        break;
                    }
                    match read_response(&mut s) {
                        Some((200, body)) if body == msg.as_bytes() => done += 1,
                        other => {
                            failures.push(format!(
                                "client {c} request {done}: {:?}",
                                other.map(|(st, b)| (st, String::from_utf8_lossy(&b).to_string()))
                            ));
                            break;
                        }
                    }
                }
                (done, failures)
            })
        })
        .collect()
}

/// Send one bad request on its own connection: the server's own 500 (or a closed
/// connection) is the right answer.
fn bad_request(srv: &Server, route: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap_or_else(|e| {
        panic!(
            "{route}: cannot connect ({e}); assure-vmm's log:\n{}",
            srv.stderr_text()
        )
    });
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let req = format!("GET {route} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    read_response(&mut s).map(|(st, _)| st)
}

#[test]
fn every_bug_class_is_rescued_a_hundred_times_while_healthy_clients_run() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv_stripped());
    let rescue = write_rescue(
        &root,
        &format!(
            "[[rescue]]\nname = \"request\"\noffset = {:#x}\nreturn = -1\n\
             hang_timeout_ms = 200\nmax_recoveries_per_minute = 100000\n",
            process_request_offset()
        ),
    );
    let events = root.path().join("events.jsonl");
    let events_arg = events.to_str().expect("utf-8").to_string();
    let mut srv = start(&root, &["--rescue", &rescue, "--events", &events_arg]);
    let pid = srv.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = healthy_clients(srv.port, 16, stop.clone());
    let classes = [
        "/bug/null",
        "/bug/div?d=0",
        "/bug/heap",
        "/bug/stack?n=200",
        "/bug/abort",
        "/bug/loop",
    ];
    let answered = AtomicU64::new(0);
    for route in classes {
        for i in 0..100 {
            let st = bad_request(&srv, route);
            assert!(
                st == Some(500) || st.is_none(),
                "{route} #{i}: the server's own error (500) or a closed connection, got {st:?}"
            );
            if st == Some(500) {
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }
        assert!(srv.is_running(), "{route}: the server runs on");
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let (done, failures) = c.join().expect("client thread");
        assert!(failures.is_empty(), "healthy client failed: {failures:?}");
        assert!(done > 0, "every healthy client was served");
        total += done;
    }
    assert!(srv.is_running(), "the server never restarted");
    assert_eq!(srv.child.id(), pid);
    assert_eq!(
        answered.load(Ordering::SeqCst),
        600,
        "bugsrv answers 500 when process_request returns -1"
    );
    let evs = read_events(&events);
    let recoveries: Vec<_> = evs.iter().filter(|e| e["event"] == "recovery").collect();
    assert_eq!(recoveries.len(), 600, "one recovery per bad request");
    assert!(evs.iter().all(|e| e["event"] != "crash"), "no crash event");
    for e in &recoveries {
        assert_eq!(e["rescue_point"], "request");
        assert_eq!(e["error_value"], -1);
        assert!(
            !e["backtrace"].as_array().expect("backtrace").is_empty(),
            "{e}"
        );
    }
    let signals = |sig: i64| recoveries.iter().filter(|e| e["signal"] == sig).count();
    assert_eq!(signals(11), 100, "NULL dereferences");
    assert_eq!(signals(8), 100, "divisions by zero");
    assert_eq!(
        signals(6),
        300,
        "heap check, stack protector and assert aborts"
    );
    assert_eq!(signals(0), 100, "hangs");
    let mut us: Vec<f64> = recoveries
        .iter()
        .filter(|e| e["signal"] != 0)
        .filter_map(|e| e["recovery_us"].as_f64())
        .collect();
    us.sort_by(f64::total_cmp);
    eprintln!(
        "{total} healthy requests byte-exact; recovery median {:.0} µs, p90 {:.0} µs",
        us[us.len() / 2],
        us[us.len() * 9 / 10]
    );
}

#[test]
fn without_the_rescue_point_the_same_bug_ends_the_run() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv_stripped());
    let rescue = write_rescue(
        &root,
        &format!(
            "[[rescue]]\nname = \"request\"\noffset = {:#x}\nreturn = -1\nenabled = false\n",
            process_request_offset()
        ),
    );
    let mut srv = start(&root, &["--rescue", &rescue]);
    assert_eq!(bad_request(&srv, "/echo?msg=a"), Some(200));
    assert_eq!(bad_request(&srv, "/bug/null"), None);
    let st = srv.wait(Duration::from_secs(30));
    assert_eq!(shell_code(st), 128 + 11, "{}", srv.stderr_text());
}

#[test]
fn injected_faults_below_the_rescue_point_are_rescued_and_quarantine_lets_the_crash_through() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let rescue = write_rescue(
        &root,
        "[[rescue]]\nname = \"request\"\nfunction = \"process_request\"\nreturn = -1\n\
         hang_timeout_ms = 500\nmax_recoveries_per_minute = 9\n",
    );
    let events = root.path().join("events.jsonl");
    let events_arg = events.to_str().expect("utf-8").to_string();
    let control = root.path().join("ctl.sock");
    let control_arg = control.to_str().expect("utf-8").to_string();
    let mut srv = start(
        &root,
        &[
            "--rescue",
            &rescue,
            "--events",
            &events_arg,
            "--control",
            &control_arg,
            "--inject",
            "bug_divide:nth=2:every=3:kind=segv",
        ],
    );
    // Calls 2, 5, 8 of bug_divide fault (segv); the others answer 100/4.
    let mut statuses = Vec::new();
    for _ in 1..=9 {
        statuses.push(bad_request(&srv, "/bug/div?d=4"));
    }
    assert_eq!(
        statuses,
        [200, 500, 200, 200, 500, 200, 200, 500, 200]
            .iter()
            .map(|s| Some(*s))
            .collect::<Vec<_>>()
    );
    // More kinds through the control socket: an abort and a hang.
    for spec in [
        "handle_file.isra.0:nth=1:kind=abort",
        "set_printf.constprop.0:nth=1:kind=hang",
    ] {
        let r = assure_ctl(&control, &["inject", spec]);
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(bad_request(&srv, "/file/hello.txt"), Some(500));
    assert_eq!(bad_request(&srv, "/file/hello.txt"), Some(200));
    // bug_divide's tenth call does not fault; set_printf's first hangs.
    assert_eq!(bad_request(&srv, "/bug/div?d=4"), Some(500));
    assert_eq!(
        bad_request(&srv, "/bug/div?d=4"),
        Some(500),
        "call 11 faults again"
    );
    let list = assure_ctl(&control, &["rescue"]);
    assert_eq!(list["points"][0]["stats"]["recoveries"], 6, "{list}");
    assert_eq!(list["points"][0]["stats"]["hangs"], 1, "{list}");
    assert_eq!(list["injections"].as_array().map(Vec::len), Some(3));
    let evs = assure_ctl(&control, &["events", "--last", "100"]);
    let kinds: Vec<String> = evs["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["event"] == "recovery")
        .map(|e| e["cause"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(kinds.len(), 6, "{evs}");
    assert_eq!(kinds.iter().filter(|k| *k == "injected segv").count(), 4);
    assert!(kinds.iter().any(|k| k == "injected abort"));
    assert!(kinds.iter().any(|k| k.starts_with("hang")));
    // The limit is 9 a minute: three more faults reach it and the tenth is let through.
    let r = assure_ctl(&control, &["inject", "bug_divide:nth=1:every=1:kind=segv"]);
    assert_eq!(r["ok"], true, "{r}");
    for _ in 0..3 {
        assert_eq!(bad_request(&srv, "/bug/div?d=4"), Some(500));
    }
    assert_eq!(bad_request(&srv, "/bug/div?d=4"), None, "quarantined");
    let st = srv.wait(Duration::from_secs(30));
    assert_eq!(shell_code(st), 128 + 11, "{}", srv.stderr_text());
    let evs = read_events(&events);
    assert!(evs
        .iter()
        .any(|e| e["event"] == "quarantine" && e["rescue_point"] == "request"));
    assert!(evs.iter().any(|e| e["event"] == "crash"));
}

#[test]
fn rescue_points_are_added_and_disabled_at_run_time() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let control = root.path().join("ctl.sock");
    let control_arg = control.to_str().expect("utf-8").to_string();
    let mut srv = start(&root, &["--control", &control_arg]);
    let file = root.path().join("more.toml");
    std::fs::write(
        &file,
        "[[rescue]]\nname = \"parse\"\nfunction = \"process_request\"\nreturn = -1\n",
    )
    .expect("file");
    let r = assure_ctl(&control, &["rescue-add", file.to_str().expect("utf-8")]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(bad_request(&srv, "/bug/null"), Some(500));
    let bad = assure_ctl(&control, &["rescue-add", file.to_str().expect("utf-8")]);
    assert_eq!(bad["ok"], false, "a second point with that name is refused");
    let r = assure_ctl(&control, &["rescue-enable", "nosuch", "off"]);
    assert_eq!(r["ok"], false);
    let r = assure_ctl(&control, &["rescue-enable", "parse", "off"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(bad_request(&srv, "/bug/null"), None);
    let st = srv.wait(Duration::from_secs(30));
    assert_eq!(shell_code(st), 128 + 11);
}

#[test]
fn bad_rescue_files_and_injections_are_refused_with_a_clear_error() {
    let root = bugsrv_root(&guest_tools::bugsrv());
    let cases: [(&str, &str); 3] = [
        ("[[rescue]]\nfunction = \"f\"\n", "needs `return`"),
        (
            "[[rescue]]\nfunction = \"f\"\nreturn = 1\nwhen = 2\n",
            "unknown field",
        ),
        ("not toml at all [", "invalid rescue-point spec"),
    ];
    for (body, want) in cases {
        let path = write_rescue(&root, body);
        let (st, _, err) = run_with(&root, &["--rescue", &path]);
        assert_eq!(st.code(), Some(2), "{body}: {err}");
        assert!(err.contains(want), "{body}: {err}");
    }
    let (st, _, err) = run_with(&root, &["--inject", "f:nth=0:kind=segv"]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("nth counts calls from 1"), "{err}");
}

fn run_with(root: &TempDir, flags: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut cmd = std::process::Command::new(vmm_bin());
    cmd.arg("run")
        .arg("--root")
        .arg(root.path())
        .args(flags)
        .args(["--", "/bugsrv", "-p", "0"]);
    run_bounded(cmd, Duration::from_secs(20))
}

fn assure_ctl(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(vmm_bin())
        .arg("ctl")
        .arg(socket)
        .args(args)
        .output()
        .expect("assure-vmm ctl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        serde_json::json!({
            "ok": false,
            "stderr": String::from_utf8_lossy(&out.stderr).to_string(),
        })
    })
}

/// A window that must wait for a peer which needs the window's own held output: the
/// output is released early (the thread waits for input on that connection), so the call
/// completes; a later rollback of that window closes the connection instead of sending the
/// bytes again. The backend sees each query exactly once.
#[test]
fn a_window_waiting_for_its_peer_releases_the_held_output_early() {
    use std::io::BufRead;
    require_kvm();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("backend");
    let backend_port = backend.local_addr().expect("addr").port();
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let seen_by_backend = seen.clone();
    std::thread::spawn(move || {
        for conn in backend.incoming().take(64) {
            let Ok(conn) = conn else { continue };
            conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
            let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
            let mut writer = conn;
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let q = line.trim_end().to_string();
                seen_by_backend.lock().expect("lock").push(q.clone());
                if writer.write_all(format!("re:{q}\n").as_bytes()).is_err() {
                    break;
                }
                line.clear();
            }
        }
    });
    let root = root_with("asker", &guest_tools::asker(), "asker");
    let rescue = write_rescue(
        &root,
        "[[rescue]]\nname = \"ask\"\nfunction = \"ask_backend\"\nreturn = -1\n\
         hang_timeout_ms = 5000\n",
    );
    let events = root.path().join("events.jsonl");
    let events_arg = events.to_str().expect("utf-8").to_string();
    let bport = backend_port.to_string();
    let mut srv = Server::start(
        root.path(),
        &["--rescue", &rescue, "--events", &events_arg],
        &["/asker", "-p", "0", "-b", &bport],
        "asker: listening on",
    );
    let ask = |line: &str| -> (String, Duration) {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", srv.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        s.write_all(format!("{line}\n").as_bytes()).expect("send");
        let mut out = String::new();
        std::io::BufReader::new(s).read_line(&mut out).ok();
        (out.trim_end().to_string(), t0.elapsed())
    };
    let (r, took) = ask("hello");
    assert_eq!(r, "OK re:hello");
    assert!(
        took < Duration::from_secs(4),
        "released early, not after the 5 s hang timeout: {took:?}"
    );
    let (r, _) = ask("crash-1");
    assert_eq!(
        r, "ERROR",
        "rolled back to ask_backend's entry, which returned -1"
    );
    let (r, _) = ask("hello-2");
    assert_eq!(r, "OK re:hello-2");
    assert!(srv.is_running());
    let queries = seen.lock().expect("lock").clone();
    assert_eq!(
        queries,
        ["hello", "crash-1", "hello-2"],
        "each query reached the backend once, the rolled-back one too (never twice)"
    );
    let evs = read_events(&events);
    let rec: Vec<_> = evs.iter().filter(|e| e["event"] == "recovery").collect();
    assert_eq!(rec.len(), 1, "{evs:?}");
    assert_eq!(rec[0]["rescue_point"], "ask");
    assert_eq!(rec[0]["signal"], 11);
}
