//! bugsrv (a static C HTTP server with real bug classes) under assure-vmm, driven by curl.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn bugsrv_root(binary: &Path) -> TempDir {
    let root = root_with("bugsrv", binary, "bugsrv");
    std::fs::create_dir_all(root.path().join("www")).expect("docroot");
    std::fs::write(root.path().join("www/hello.txt"), "a file in the docroot\n").expect("file");
    std::fs::write(root.path().join("secret.txt"), "outside the docroot\n").expect("file");
    root
}

fn start(root: &TempDir, extra: &[&str]) -> Server {
    Server::start(
        root.path(),
        extra,
        &["/bugsrv", "-p", "0", "-d", "/www"],
        "bugsrv: listening on",
    )
}

#[test]
fn serves_correct_bodies_and_status_codes() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let srv = start(&root, &[]);
    let r = curl(&srv.url("/"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"hello from bugsrv\n"[..])
    );
    let r = curl(&srv.url("/echo?msg=assure"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"assure"[..]));
    let r = curl_args(&["--data-binary", "posted body bytes", &srv.url("/echo")]);
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"posted body bytes"[..])
    );
    let r = curl(&srv.url("/big?n=3000000"));
    assert_eq!(r.status, 200);
    assert!(
        r.body == big_pattern(3_000_000),
        "3 MB body must be byte-exact"
    );
    let r = curl(&srv.url("/file/hello.txt"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"a file in the docroot\n"[..])
    );
    assert_eq!(curl(&srv.url("/file/missing.txt")).status, 404);
    assert_eq!(
        curl_args(&["--path-as-is", &srv.url("/file/../secret.txt")]).status,
        403
    );
    assert_eq!(curl(&srv.url("/no/such/route")).status, 404);
    let r = curl(&srv.url("/bug/div?d=4"));
    assert_eq!(r.status, 200, "a healthy division");
    assert!(
        String::from_utf8_lossy(&r.body).contains("25"),
        "100/4: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let reply = raw_request(srv.port, b"THIS IS NOT HTTP\r\n\r\n");
    assert!(
        reply.starts_with(b"HTTP/1.1 400") || reply.starts_with(b"HTTP/1.0 400"),
        "malformed request gets the server's own 400, got {:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[test]
fn a_thousand_sequential_and_fifty_concurrent_requests() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let mut srv = start(&root, &[]);
    // One curl process fetching 1,000 URLs sequentially over one connection.
    let urls: Vec<String> = (0..1000)
        .map(|i| srv.url(&format!("/echo?msg=req{i}")))
        .collect();
    let mut args: Vec<&str> = vec!["-s", "-S", "--max-time", "120", "-w", "|%{http_code}\n"];
    args.extend(urls.iter().map(String::as_str));
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1000, "1,000 responses");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("req{i}|200"), "response {i}");
    }
    let replies = {
        let base = srv.url("/big?n=20000");
        concurrently(50, move |_| curl(&base))
    };
    for r in &replies {
        assert_eq!(r.status, 200);
        assert!(
            r.body == big_pattern(20000),
            "concurrent body must be byte-exact"
        );
    }
    let count = curl(&srv.url("/count"));
    assert_eq!(
        String::from_utf8_lossy(&count.body).trim(),
        "1050",
        "every request was served once"
    );
    assert!(srv.is_running());
}

fn crash_case(binary: &Path, route: &str, signal: i32, function: &str, symbols: bool) {
    let root = bugsrv_root(binary);
    let events = root.path().join("events.jsonl");
    let events_arg = events.to_str().expect("utf-8 path").to_string();
    let mut srv = start(&root, &["--events", &events_arg]);
    assert_eq!(curl(&srv.url("/")).status, 200);
    let r = curl(&srv.url(route));
    assert_eq!(r.status, 0, "{route}: no response, the server died");
    let st = srv.wait(Duration::from_secs(30));
    assert_eq!(
        shell_code(st),
        128 + signal,
        "{route}: exit status 128+signal; stderr:\n{}",
        srv.stderr_text()
    );
    let evs = read_events(&events);
    let crash = evs
        .iter()
        .find(|e| e["event"] == "crash")
        .unwrap_or_else(|| panic!("{route}: crash event in {evs:?}"));
    assert_eq!(crash["signal"], signal, "{route}: {crash}");
    let bt: Vec<String> = crash["backtrace"]
        .as_array()
        .expect("backtrace")
        .iter()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    if symbols {
        let in_bt = bt
            .iter()
            .any(|f| f.contains(&format!(" {function}+")) || f.contains(&format!(" {function} ")));
        assert!(in_bt, "{route}: {function} in backtrace {bt:#?}");
        if signal != libc::SIGABRT {
            let f = crash["function"].as_str().unwrap_or_default();
            assert!(
                f.starts_with(function),
                "{route}: faulting function {f} should be {function}"
            );
        }
        // A smashed stack cannot be unwound past the frame whose return address was
        // overwritten; every other bug has the request handler below it.
        if function != "bug_stack_smash" {
            assert!(
                bt.iter().any(|f| f.contains(" process_request")),
                "{route}: the request handler is on the stack: {bt:#?}"
            );
        }
    } else {
        assert!(
            !bt.is_empty(),
            "{route}: a backtrace by address even without symbols"
        );
        // No symbol: the function is named as a rescue-point spec would name it, by its
        // `.eh_frame` start.
        let want = format!(
            "bugsrv+{:#x}+",
            function_start(&guest_tools::bugsrv(), function)
        );
        let f = crash["function"].as_str().unwrap_or_default();
        assert!(
            f.starts_with(&want),
            "{route}: {f} should start with {want}"
        );
        assert!(bt[0].contains(&want), "{route}: {bt:#?}");
    }
}

#[test]
fn each_bug_class_ends_the_run_with_its_signal_and_function() {
    require_kvm();
    let bin = guest_tools::bugsrv();
    crash_case(&bin, "/bug/null", 11, "bug_null_deref", true);
    crash_case(&bin, "/bug/div?d=0", 8, "bug_divide", true);
    crash_case(&bin, "/bug/heap", 6, "bug_heap_overflow", true);
    crash_case(&bin, "/bug/stack?n=200", 6, "bug_stack_smash", true);
    crash_case(&bin, "/bug/abort", 6, "bug_assert", true);
}

#[test]
fn stripped_server_runs_and_its_crashes_are_exact() {
    require_kvm();
    let bin = guest_tools::bugsrv_stripped();
    crash_case(&bin, "/bug/null", 11, "bug_null_deref", false);
    crash_case(&bin, "/bug/div?d=0", 8, "bug_divide", false);
}

#[test]
fn an_infinite_loop_hangs_the_guest_but_not_the_vmm() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let mut srv = start(&root, &[]);
    let r = curl_args(&["--max-time", "2", &srv.url("/bug/loop")]);
    assert_eq!(r.status, 0, "no response from a looping handler");
    assert_eq!(
        curl_args(&["--max-time", "2", &srv.url("/")]).status,
        0,
        "the single-threaded server is stuck"
    );
    assert!(srv.is_running(), "the VMM is alive");
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(srv.child.id() as i32, libc::SIGTERM) };
    let st = srv.wait(Duration::from_secs(10));
    assert_eq!(shell_code(st), 128 + 15);
}

#[test]
fn shutdown_gives_the_guest_exit_status() {
    require_kvm();
    let root = bugsrv_root(&guest_tools::bugsrv());
    let mut srv = start(&root, &[]);
    assert_eq!(curl(&srv.url("/shutdown")).body, b"bye\n");
    assert_eq!(shell_code(srv.wait(Duration::from_secs(10))), 0);
}
