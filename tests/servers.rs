//! Debian's servers (lighttpd, nginx, redis, memcached, mosquitto) from their images under
//! assure-vmm, each driven by its real client (curl and wrk, redis-cli and
//! redis-benchmark, memccp and memccat, mosquitto_pub and mosquitto_sub) and compared with
//! the same binary run natively in a chroot of a copy of the image's root file system.
//!
//! The images are built by scripts/setup.sh into `<workspace>/images/out`; every test runs a
//! copy of its image (in a temporary directory), so nothing in images/out is modified.
//! Every load is bounded in count and time, and talks only to 127.0.0.1.

mod common;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assure_vmm::image::Manifest;
use common::*;

// ---------------------------------------------------------------------------------------
// Images, copies, and the servers under the VMM
// ---------------------------------------------------------------------------------------

/// The syscalls the VMM logged as unimplemented (shown with `--nocapture`).
fn report_unimplemented(name: &str, srv: &Server) {
    for l in srv.stderr_text().lines() {
        if l.contains("unimplemented syscall") {
            eprintln!("[{name}] {l}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The same binary natively: chroot into a copy of the root file system
// ---------------------------------------------------------------------------------------

/// A server running natively in a chroot; killed on drop.
struct Native {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Native {
    /// Run `argv` (guest paths) chrooted into `rootfs` with the image's environment and
    /// working directory, and wait for `port`.
    fn start(image_dir: &Path, rootfs: &Path, argv: &[String], port: u16) -> Native {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the native comparison runs the server in a chroot, which needs root (CI runs as root)"
        );
        let m = Manifest::load(image_dir).expect("manifest");
        let root_c = CString::new(rootfs.as_os_str().as_encoded_bytes()).expect("path");
        let wd_c = CString::new(m.workdir.clone().unwrap_or_else(|| "/".into())).expect("wd");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/");
        for kv in &m.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        // SAFETY: only async-signal-safe calls on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(wd_c.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the native server in a chroot");
        let log = capture(&mut child);
        let mut n = Native { child, port, log };
        if !wait_for_port(port, Duration::from_secs(30)) {
            n.child.kill().ok();
            panic!(
                "native {argv:?} did not listen on {port}; log:\n{}",
                n.log.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        n
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A copy of an image directory for the native run: `/dev/null` added (a chroot has no
/// devices; the VMM provides its own), and `edit` applied to the copy's root file system
/// to move the server to another port. (the temp dir, the image dir, its rootfs)
fn native_copy(image_dir: &Path, edit: impl FnOnce(&Path)) -> (TempDir, PathBuf, PathBuf) {
    let name = image_dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let (tmp, dir) = copy_dir(image_dir, &format!("{name}-native"));
    let rootfs = rootfs_of(&dir);
    let null = rootfs.join("dev/null");
    std::fs::remove_file(&null).ok();
    let st = Command::new("mknod")
        .args(["-m", "666"])
        .arg(&null)
        .args(["c", "1", "3"])
        .status()
        .expect("mknod");
    assert!(st.success(), "mknod {}", null.display());
    edit(&rootfs);
    (tmp, dir, rootfs)
}

/// Replace `from` by `to` in a file of the root file system (the file must contain it).
fn edit_file(rootfs: &Path, rel: &str, from: &str, to: &str) {
    let p = rootfs.join(rel);
    let text = std::fs::read_to_string(&p).expect("config file");
    assert!(text.contains(from), "{} lacks {from:?}", p.display());
    std::fs::write(&p, text.replace(from, to)).expect("write config");
}

/// The image's command with `--flag VALUE` replaced.
fn command_with(image_dir: &Path, flag: &str, value: &str) -> Vec<String> {
    let mut argv = Manifest::load(image_dir).expect("manifest").command;
    let i = argv
        .iter()
        .position(|a| a == flag)
        .expect("flag in command");
    argv[i + 1] = value.to_string();
    argv
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// Run a client to completion (bounded); its exit code, stdout (bytes) and stderr.
fn client(cmd: &mut Command, timeout: Duration) -> (i32, Vec<u8>, String) {
    let cmd = std::mem::replace(cmd, Command::new("true"));
    let (status, out, err) = run_bounded_bytes(cmd, timeout);
    (shell_code(status), out, err)
}

#[derive(Debug, PartialEq, Eq)]
struct Http {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// GET with curl: status, Content-Type and body.
fn http_get(port: u16, path: &str) -> Http {
    let url = format!("http://127.0.0.1:{port}{path}");
    let (code, mut out, err) = client(
        Command::new("curl").args([
            "-s",
            "-S",
            "--max-time",
            "60",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{content_type}",
            &url,
        ]),
        Duration::from_secs(90),
    );
    assert_eq!(code, 0, "curl {url}: {err}");
    let pos = out.iter().rposition(|&b| b == b'\n').expect("curl -w line");
    let tail = String::from_utf8_lossy(&out[pos + 1..]).into_owned();
    out.truncate(pos);
    let (status, ctype) = tail.split_once(' ').unwrap_or((&tail, ""));
    Http {
        status: status.parse().expect("status"),
        content_type: ctype.to_string(),
        body: out,
    }
}

/// `wrk -t2 -c10 -d3s URL`: the number of requests, after checking that wrk reports no
/// socket errors and no non-2xx/3xx responses.
fn wrk_clean(port: u16, path: &str) -> u64 {
    let url = format!("http://127.0.0.1:{port}{path}");
    let (code, out, err) = client(
        Command::new("wrk").args(["-t2", "-c10", "-d3s", "--timeout", "5s", &url]),
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "wrk {url}: {out}{err}");
    assert!(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "wrk saw errors:\n{out}"
    );
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{out}"));
    assert!(requests > 0, "wrk made no request:\n{out}");
    requests
}

// ---------------------------------------------------------------------------------------
// Web servers: lighttpd and nginx
// ---------------------------------------------------------------------------------------

/// Files written into the docroot of the copy: (path under the docroot, content).
fn docroot_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("small.txt".into(), b"static file for wrk\n".repeat(200)),
        ("sub/data.bin".into(), pseudo_random(1, 70_001)),
        ("big.bin".into(), pseudo_random(2, 50 * 1024 * 1024)),
    ]
}

/// A web server image: the docroot files byte-exact with curl, 404s, status and
/// Content-Type as the same binary natively, and a clean wrk run.
fn web_server(name: &str, guest_port: u16, conf: &str, listen_from: &str, listen_to: &str) {
    require_kvm();
    let (_tmp, dir) = copy_image(name);
    let rootfs = rootfs_of(&dir);
    let docroot = rootfs.join("var/www/html");
    let files = docroot_files();
    for (rel, content) in &files {
        let p = docroot.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write docroot file");
    }
    let index = std::fs::read(docroot.join("index.html")).expect("index.html");

    // The native copy is made from this one, so it serves the same files.
    let native_port = free_port();
    let (_ntmp, ndir, nrootfs) = native_copy(&dir, |root| {
        edit_file(
            root,
            conf,
            listen_from,
            &listen_to.replace("PORT", &native_port.to_string()),
        )
    });
    let argv = Manifest::load(&ndir).expect("manifest").command;
    let native = Native::start(&ndir, &nrootfs, &argv, native_port);

    let mut srv = start_vmm(&dir, guest_port, &[]);
    let mut paths: Vec<String> = vec!["/".into(), "/index.html".into()];
    paths.extend(files.iter().map(|(rel, _)| format!("/{rel}")));
    paths.extend(["/missing.html", "/sub/missing.bin", "/no/such/dir/"].map(String::from));
    for path in &paths {
        let got = http_get(srv.port, path);
        let want = http_get(native.port, path);
        let expected_body: Option<&[u8]> = match path.as_str() {
            "/" | "/index.html" => Some(&index),
            p => files
                .iter()
                .find(|(rel, _)| p == format!("/{rel}"))
                .map(|(_, c)| c.as_slice()),
        };
        match expected_body {
            Some(body) => {
                assert_eq!(
                    got.status,
                    200,
                    "{name} {path}; log:\n{}",
                    srv.stderr_text()
                );
                assert!(
                    got.body == body,
                    "{name} {path}: body of {} bytes differs from the file ({} bytes)",
                    got.body.len(),
                    body.len()
                );
            }
            None => assert_eq!(got.status, 404, "{name} {path}"),
        }
        assert_eq!(
            (got.status, &got.content_type),
            (want.status, &want.content_type),
            "{name} {path}: as natively"
        );
        if got.status == 200 {
            assert!(got.body == want.body, "{name} {path}: body as natively");
        }
    }

    wrk_clean(srv.port, "/small.txt");
    wrk_clean(srv.port, "/");
    assert_eq!(http_get(srv.port, "/sub/data.bin").body, files[1].1);
    assert!(srv.is_running(), "{name} died; log:\n{}", srv.stderr_text());
    report_unimplemented(name, &srv);
}

#[test]
fn lighttpd_serves_files_byte_exact_as_natively() {
    web_server(
        "lighttpd",
        8080,
        "etc/lighttpd/lighttpd.conf",
        "server.port          = 8080",
        "server.port          = PORT",
    );
}

#[test]
fn nginx_serves_files_byte_exact_as_natively() {
    web_server(
        "nginx-light",
        8081,
        "etc/nginx/nginx.conf",
        "listen 127.0.0.1:8081;",
        "listen 127.0.0.1:PORT;",
    );
}

#[test]
fn nginx_exits_cleanly_on_sigterm_to_the_vmm() {
    require_kvm();
    let (_tmp, dir) = copy_image("nginx-light");
    let mut srv = start_vmm(&dir, 8081, &[]);
    assert_eq!(http_get(srv.port, "/").status, 200);
    // SIGTERM to assure-vmm: the VMM forwards it to the guest, nginx shuts down.
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(srv.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
    let st = srv.wait(Duration::from_secs(30));
    let log = srv.stderr_text();
    assert_eq!(shell_code(st), 0, "nginx's exit status; log:\n{log}");
    assert!(
        log.contains("signal 15 (SIGTERM) received") && log.contains("exit"),
        "nginx saw SIGTERM and exited; log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// redis
// ---------------------------------------------------------------------------------------

/// A redis-cli session (commands on stdin, one per line): its output.
fn redis_cli(port: u16, commands: &str) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli (run scripts/setup.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(commands.as_bytes())
        .expect("write commands");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "redis-cli timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "redis-cli: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn redis_answers_redis_cli_and_redis_benchmark() {
    require_kvm();
    let (_tmp, dir) = copy_image("redis");
    let srv = start_vmm(&dir, 6379, &[]);

    let commands =
        "SET greeting hello\nGET greeting\nINCR counter\nINCR counter\nINCRBY counter 40\n\
                    LPUSH list a b c\nLRANGE list 0 -1\nLLEN list\nDEL greeting counter list\n\
                    EXISTS greeting\nPING\n";
    let expected = "OK\nhello\n1\n2\n42\n3\nc\nb\na\n3\n3\n0\nPONG\n";
    let got = redis_cli(srv.port, commands);
    assert_eq!(got, expected, "log:\n{}", srv.stderr_text());

    // The same session natively.
    let native_port = free_port();
    let (_ntmp, ndir, nrootfs) = native_copy(&dir, |_| {});
    let mut argv = Manifest::load(&ndir).expect("manifest").command;
    argv.extend(["--port".to_string(), native_port.to_string()]);
    let native = Native::start(&ndir, &nrootfs, &argv, native_port);
    assert_eq!(redis_cli(native.port, commands), got, "as natively");
    drop(native);

    // redis-benchmark: four tests of 20,000 requests each, all completed.
    let (code, out, err) = client(
        Command::new("redis-benchmark").args([
            "-h",
            "127.0.0.1",
            "-p",
            &srv.port.to_string(),
            "-q",
            "-n",
            "20000",
            "-t",
            "set,get,incr,lpush",
        ]),
        Duration::from_secs(180),
    );
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "redis-benchmark: {out}{err}");
    assert!(
        !out.to_lowercase().contains("error") && !err.to_lowercase().contains("error"),
        "redis-benchmark reported errors: {out}{err}"
    );
    // -q prints progress lines separated by \r, then "SET: 1234.56 requests per second, ...".
    for test in ["SET", "GET", "INCR", "LPUSH"] {
        let rps = out
            .split(['\r', '\n'])
            .filter_map(|l| l.trim().strip_prefix(&format!("{test}: ")))
            .find_map(|rest| rest.split_once(" requests per second"))
            .and_then(|(n, _)| n.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {test} result in redis-benchmark's output:\n{out}"));
        assert!(rps > 0.0, "{test}: {rps} requests per second");
    }
    // The LPUSH test pushed 20,000 elements onto redis-benchmark's list.
    assert_eq!(redis_cli(srv.port, "LLEN mylist\n").trim(), "20000");
    report_unimplemented("redis", &srv);
}

// ---------------------------------------------------------------------------------------
// memcached
// ---------------------------------------------------------------------------------------

const MEMC_VALUES: usize = 1000;

/// The 1,000 values: lengths 0..~4 KB, arbitrary bytes (CR, LF, NUL included).
fn memc_values() -> Vec<(String, Vec<u8>)> {
    (0..MEMC_VALUES)
        .map(|i| {
            let len = (i * 37) % 4099;
            (
                format!("assure-key-{i:04}"),
                pseudo_random(1000 + i as u64, len),
            )
        })
        .collect()
}

/// Store the values with memccp (key = file name) and read them back with memccat; then
/// read each back with a text-protocol multi-get and compare it byte for byte.
fn memcached_round_trip(
    port: u16,
    values: &[(String, Vec<u8>)],
    files: &Path,
    log: &dyn Fn() -> String,
) {
    let servers = format!("--servers=127.0.0.1:{port}");
    let names: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
    let (code, out, err) = client(
        Command::new("memccp")
            .current_dir(files)
            .arg(&servers)
            .args(&names),
        Duration::from_secs(120),
    );
    assert_eq!(
        code,
        0,
        "memccp: {}{err}; log:\n{}",
        String::from_utf8_lossy(&out),
        log()
    );

    let (code, out, err) = client(
        Command::new("memccat").arg(&servers).args(&names),
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "memccat: {err}; log:\n{}", log());
    let mut expected = Vec::new();
    for (_, v) in values {
        expected.extend_from_slice(v);
        expected.push(b'\n'); // memccat ends each value with a newline
    }
    assert!(
        out == expected,
        "memccat's output differs from the values stored"
    );

    // Each value on its own: `get k1 ... k100` replies VALUE k flags n\r\n<n bytes>\r\n... END.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    for chunk in values.chunks(100) {
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        s.write_all(format!("get {}\r\n", keys.join(" ")).as_bytes())
            .expect("send get");
        for (k, v) in chunk {
            let mut header = String::new();
            r.read_line(&mut header).expect("VALUE line");
            let f: Vec<&str> = header.split_whitespace().collect();
            assert_eq!(f.first(), Some(&"VALUE"), "{k}: {header:?}");
            assert_eq!(f.get(1), Some(&k.as_str()), "{header:?}");
            let n: usize = f.get(3).and_then(|n| n.parse().ok()).expect("length");
            let mut data = vec![0u8; n + 2];
            r.read_exact(&mut data).expect("value bytes");
            assert_eq!(&data[n..], b"\r\n");
            data.truncate(n);
            assert!(
                data == *v,
                "{k}: value of {n} bytes differs from the {} stored",
                v.len()
            );
        }
        let mut end = String::new();
        r.read_line(&mut end).expect("END");
        assert_eq!(end, "END\r\n");
    }
}

#[test]
fn memcached_stores_and_returns_a_thousand_values_byte_exact() {
    require_kvm();
    let values = memc_values();
    let files = TempDir::new("memc-values");
    for (k, v) in &values {
        std::fs::write(files.path().join(k), v).expect("value file");
    }

    let (_tmp, dir) = copy_image("memcached");
    let srv = start_vmm(&dir, 11211, &[]);
    memcached_round_trip(srv.port, &values, files.path(), &|| srv.stderr_text());
    report_unimplemented("memcached", &srv);

    // The same natively.
    let native_port = free_port();
    let (_ntmp, ndir, nrootfs) = native_copy(&dir, |_| {});
    let argv = command_with(&ndir, "-p", &native_port.to_string());
    let native = Native::start(&ndir, &nrootfs, &argv, native_port);
    memcached_round_trip(native.port, &values, files.path(), &|| String::new());
}

// ---------------------------------------------------------------------------------------
// mosquitto
// ---------------------------------------------------------------------------------------

const MQTT_MESSAGES: usize = 1000;

/// mosquitto_pub sends "1".."1000" (QoS 1) and mosquitto_sub -C 1000 must receive exactly
/// those, in order. The subscriber first makes a persistent session (`-c -i ID -E`), so
/// every message published after that is delivered to it, queued or live: no race between
/// the subscription and the first publish.
fn mqtt_round_trip(port: u16, log: &dyn Fn() -> String) {
    let p = port.to_string();
    let id = format!("assure-sub-{}", std::process::id());
    let topic = "assure/test/seq";
    let base = ["-h", "127.0.0.1", "-p", &p, "-q", "1", "-t", topic];
    let (code, _, err) = client(
        Command::new("mosquitto_sub")
            .args(base)
            .args(["-c", "-i", &id, "-E"]),
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "mosquitto_sub -E: {err}; log:\n{}", log());

    let sub_args: Vec<String> = base
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "-c",
                "-i",
                &id,
                "-C",
                &MQTT_MESSAGES.to_string(),
                "-W",
                "60",
            ]
            .map(String::from),
        )
        .collect();
    let sub = std::thread::spawn(move || {
        client(
            Command::new("mosquitto_sub").args(&sub_args),
            Duration::from_secs(90),
        )
    });

    let mut pubc = Command::new("mosquitto_pub")
        .args(base)
        .arg("-l")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (run scripts/setup.sh)");
    let lines: String = (1..=MQTT_MESSAGES).map(|i| format!("msg-{i}\n")).collect();
    pubc.stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("feed mosquitto_pub");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pubc.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            pubc.kill().ok();
            panic!("mosquitto_pub timed out; log:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pub_out = pubc.wait_with_output().expect("output");
    assert!(pub_out.status.success(), "mosquitto_pub: {pub_out:?}");

    let (code, out, err) = sub.join().expect("subscriber");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "mosquitto_sub -C: {err}; log:\n{}", log());
    let got: Vec<&str> = out.lines().collect();
    let want: Vec<String> = (1..=MQTT_MESSAGES).map(|i| format!("msg-{i}")).collect();
    assert_eq!(got.len(), MQTT_MESSAGES, "messages received");
    assert!(got == want, "messages in order, none lost or repeated");
}

#[test]
fn mosquitto_delivers_a_thousand_messages_in_order() {
    require_kvm();
    let (_tmp, dir) = copy_image("mosquitto");
    let srv = start_vmm(&dir, 1883, &[]);
    mqtt_round_trip(srv.port, &|| srv.stderr_text());
    report_unimplemented("mosquitto", &srv);

    let native_port = free_port();
    let (_ntmp, ndir, nrootfs) = native_copy(&dir, |root| {
        edit_file(
            root,
            "etc/mosquitto/mosquitto.conf",
            "listener 1883 127.0.0.1",
            &format!("listener {native_port} 127.0.0.1"),
        )
    });
    let argv = Manifest::load(&ndir).expect("manifest").command;
    let native = Native::start(&ndir, &nrootfs, &argv, native_port);
    mqtt_round_trip(native.port, &|| String::new());
}
