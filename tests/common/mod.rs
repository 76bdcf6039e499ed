//! Shared helpers of the integration tests: the assure-vmm binary, guest roots, servers
//! started under the VMM, and real clients.
#![allow(dead_code)]

pub mod resp;

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use assure_vmm::image::Manifest;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The assure-vmm binary under test.
pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_assure-vmm"))
}

/// Fail (never skip) when KVM is not usable: these tests exist to run on KVM.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(ok, "/dev/kvm is missing or not accessible: the integration tests need KVM (run them as a user with access to /dev/kvm)");
}

/// A fresh temporary directory (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "assure-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A guest root containing `binary` at `/name`.
pub fn root_with(tag: &str, binary: &Path, name: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::copy(binary, dir.path().join(name)).expect("copy guest binary into root");
    dir
}

/// Run a program under the VMM to completion (bounded by `timeout`).
pub fn run_vmm(root: &Path, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run").arg("--root").arg(root).arg("--").args(args);
    run_bounded(cmd, timeout)
}

/// Run a command to completion with a time limit; kills it and fails the test on timeout.
pub fn run_bounded(cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let (st, out, err) = run_bounded_bytes(cmd, timeout);
    (st, String::from_utf8_lossy(&out).into_owned(), err)
}

/// [`run_bounded`], with stdout as bytes.
pub fn run_bounded_bytes(mut cmd: Command, timeout: Duration) -> (ExitStatus, Vec<u8>, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd:?} ({e}); scripts/setup.sh installs the test clients")
        });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).ok();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("command timed out after {timeout:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status,
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default(),
    )
}

/// A server running under the VMM; killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Start `args` under the VMM and wait for a stdout line containing `ready` followed by
    /// `127.0.0.1:PORT`.
    pub fn start(root: &Path, extra_vmm_args: &[&str], args: &[&str], ready: &str) -> Server {
        let mut cmd = Command::new(vmm_bin());
        cmd.arg("run")
            .arg("--root")
            .arg(root)
            .args(extra_vmm_args)
            .arg("--")
            .args(args);
        Self::start_cmd(cmd, ready)
    }

    pub fn start_cmd(mut cmd: Command, ready: &str) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let err_buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let eb = err_buf.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut b) = eb.lock() {
                    b.push_str(&line);
                    b.push('\n');
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line.contains(&ready) {
                    let port = line
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                    tx.send(port).ok();
                }
                line.clear();
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(p)) => p,
            other => {
                child.kill().ok();
                child.wait().ok();
                let err = err_buf.lock().map(|s| s.clone()).unwrap_or_default();
                panic!("server did not become ready ({other:?}); stderr:\n{err}");
            }
        };
        Server {
            child,
            port,
            stderr: err_buf,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Wait for the server to exit (bounded).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                panic!(
                    "server did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Result of one curl request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// GET `url` with the real curl client (bounded time).
pub fn curl(url: &str) -> Reply {
    curl_args(&[url])
}

/// curl with extra arguments; the last is usually the URL.
pub fn curl_args(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("run curl (install curl)");
    let mut body = out.stdout;
    let pos = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[pos + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(pos);
    Reply { status: code, body }
}

/// Exit code as a shell shows it (128 + signal for a signal death of the VMM itself).
pub fn shell_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Events written by `--events FILE`.
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// A Debian package's file unpacked by scripts/setup.sh (fails clearly if it has not run).
pub fn deb_file(pkg: &str, rel: &str) -> PathBuf {
    let base = std::env::var_os("ASSURE_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/deps"));
    let p = base.join(pkg).join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it fetches Debian's {pkg})",
        p.display()
    );
    p
}

/// A currently free TCP port on 127.0.0.1 (for servers that cannot report their port).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up by default), where the clients'
    // own source ports come from: a port from there may be taken again by a client
    // connection before the server binds it. A process-wide counter never hands out the
    // same port twice to tests running in parallel; a port something else holds (or a
    // connection in TIME_WAIT on it) fails the trial bind and is skipped.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 64) * 150;
    for _ in 0..12_000 {
        let port = (20_000 + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between 20000 and 31999");
}

/// Wait until 127.0.0.1:port accepts connections.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Send raw bytes to 127.0.0.1:port and read the reply until the peer closes (bounded).
pub fn raw_request(port: u16, req: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    s.write_all(req).expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok();
    out
}

/// Run `f` on `n` threads at once and collect the results.
pub fn concurrently<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let f = f.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                f(i)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect()
}

/// The byte pattern bugsrv's /big route sends.
pub fn big_pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// Server images (built by scripts/setup.sh into images/out) under the VMM
// ---------------------------------------------------------------------------------------

pub fn images_out() -> PathBuf {
    workspace().join("images/out")
}

/// A copy of the built image `name` in a fresh temporary directory: (the temp dir, the
/// image directory holding manifest.json and rootfs/).
pub fn copy_image(name: &str) -> (TempDir, PathBuf) {
    let src = images_out().join(name);
    assert!(
        src.join("manifest.json").is_file(),
        "image {name} is not built in {}: run scripts/setup.sh (it builds the images with \
         `assure-vmm image build`)",
        images_out().display()
    );
    copy_dir(&src, name)
}

/// `cp -a SRC TMP/NAME` into a fresh temporary directory.
pub fn copy_dir(src: &Path, name: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(&format!("srv-{name}"));
    let dst = tmp.path().join(name);
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&dst)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} {}", src.display(), dst.display());
    (tmp, dst)
}

pub fn rootfs_of(image_dir: &Path) -> PathBuf {
    Manifest::load(image_dir)
        .expect("image manifest")
        .rootfs_in(image_dir)
}

/// Collect a child's stdout and stderr, line by line, into one buffer.
pub fn capture(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
    let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
    for r in [out, err] {
        let b = buf.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if let Ok(mut b) = b.lock() {
                    b.push_str(&line);
                    b.push('\n');
                }
            }
        });
    }
    buf
}

/// Start the image in `image_dir` under assure-vmm (`--log-level warn`, so unimplemented
/// syscalls are logged) with the guest's `guest_port` remapped to a free host port
/// (`--port GUEST=HOST`), and wait until that port accepts connections. Several copies of
/// one image can run at once. `Server::port` is the host port.
pub fn start_vmm(image_dir: &Path, guest_port: u16, extra: &[&str]) -> Server {
    let host_port = free_port();
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .arg("--image")
        .arg(image_dir)
        .arg("--images-out")
        .arg(images_out())
        .arg("--port")
        .arg(format!("{guest_port}={host_port}"))
        .arg("--log-level")
        .arg("warn")
        .args(extra)
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
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if wait_for_port(host_port, Duration::from_millis(100)) {
            return srv;
        }
        if !srv.is_running() {
            panic!(
                "{} exited before listening; log:\n{}",
                image_dir.display(),
                srv.stderr_text()
            );
        }
    }
    panic!(
        "{} did not listen on 127.0.0.1:{host_port} (--port {guest_port}={host_port}) within \
         60 s; log:\n{}",
        image_dir.display(),
        srv.stderr_text()
    );
}

/// Deterministic bytes (xorshift64*), every byte value included.
pub fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A host path as the UTF-8 text a command line takes.
pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Where function `name` starts in ELF file `binary`, relative to its load bias, as
/// `assure-vmm functions` prints it (the offset a rescue-point file names).
pub fn function_start(binary: &Path, name: &str) -> u64 {
    let out = Command::new(vmm_bin())
        .arg("functions")
        .arg(binary)
        .args(["--match", name])
        .output()
        .expect("assure-vmm functions");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.ends_with(&format!(" {name}")))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    let hex = line.split_whitespace().next().unwrap_or_default();
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex offset")
}
