//! Debian's static busybox httpd (it forks a child per connection) under assure-vmm.

mod common;

use std::time::Duration;

use common::*;

fn busybox_root() -> TempDir {
    let bb = deb_file("busybox-static", "bin/busybox");
    let root = TempDir::new("busybox");
    std::fs::create_dir_all(root.path().join("bin")).expect("bin");
    std::fs::create_dir_all(root.path().join("www/sub")).expect("www");
    std::fs::copy(&bb, root.path().join("bin/busybox")).expect("copy busybox");
    std::fs::write(
        root.path().join("www/index.html"),
        "<h1>busybox under assure-vmm</h1>\n",
    )
    .expect("index");
    std::fs::write(root.path().join("www/sub/page.txt"), "nested page\n").expect("page");
    root
}

struct Httpd {
    _root: TempDir,
    srv: Server,
    big: Vec<u8>,
}

fn start() -> Httpd {
    require_kvm();
    let root = busybox_root();
    // 8 MiB of incompressible bytes, compared byte for byte.
    let mut big = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(root.path().join("www/big.bin"), &big).expect("big");
    let port = free_port();
    let mut cmd = std::process::Command::new(vmm_bin());
    let listen = format!("127.0.0.1:{port}");
    cmd.arg("run").arg("--root").arg(root.path()).args([
        "--",
        "/bin/busybox",
        "httpd",
        "-f",
        "-v",
        "-p",
        &listen,
        "-h",
        "/www",
    ]);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    if !wait_for_port(port, Duration::from_secs(30)) {
        child.kill().ok();
        let out = child.wait_with_output().expect("output");
        panic!(
            "busybox httpd did not listen on {listen}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = child.stderr.take();
    let srv = Server {
        child,
        port,
        stderr: Default::default(),
    };
    if let Some(e) = stderr {
        let buf = srv.stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                if let Ok(mut b) = buf.lock() {
                    b.push_str(&line);
                    b.push('\n');
                }
            }
        });
    }
    Httpd {
        _root: root,
        srv,
        big,
    }
}

#[test]
fn serves_files_byte_exact_with_correct_status() {
    let h = start();
    let r = curl(&h.srv.url("/"));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"<h1>busybox under assure-vmm</h1>\n"[..]),
        "stderr: {}",
        h.srv.stderr_text()
    );
    let r = curl(&h.srv.url("/sub/page.txt"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"nested page\n"[..]));
    let r = curl(&h.srv.url("/big.bin"));
    assert_eq!(r.status, 200);
    assert!(
        r.body == h.big,
        "8 MiB file byte-exact ({} bytes received)",
        r.body.len()
    );
    assert_eq!(curl(&h.srv.url("/missing.html")).status, 404);
}

#[test]
fn a_thousand_sequential_and_fifty_concurrent_requests() {
    let mut h = start();
    for i in 0..1000 {
        let r = curl(&h.srv.url("/sub/page.txt"));
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"nested page\n"[..]),
            "request {i}; stderr: {}",
            h.srv.stderr_text()
        );
    }
    let url = h.srv.url("/index.html");
    for r in concurrently(50, move |_| curl(&url)) {
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"<h1>busybox under assure-vmm</h1>\n"[..])
        );
    }
    assert!(h.srv.is_running(), "the server keeps running");
}
