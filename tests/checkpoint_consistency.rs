//! Checkpoints capture memory and every thread's registers at one instant, and rollbacks
//! restore both, also for threads that never make a syscall (stopped by a kick in the
//! middle of guest code) and for nested checkpoints rolled back out of order.
//!
//! The guest is guest-tools' `spinner`: threads that keep a counter in four pages, in r15
//! and in an SSE register, and print a MISMATCH line whenever they disagree.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Spinner {
    child: Child,
    out: Arc<Mutex<String>>,
    ctl: BufReader<UnixStream>,
    _root: TempDir,
}

impl Spinner {
    fn start(threads: u32) -> Spinner {
        require_kvm();
        let root = root_with("spinner", &guest_tools::spinner(), "spinner");
        let sock = root.path().join("ctl.sock");
        let mut child = Command::new(vmm_bin())
            .arg("run")
            .arg("--root")
            .arg(root.path())
            .arg("--control")
            .arg(&sock)
            .arg("--")
            .arg("/spinner")
            .arg(threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start assure-vmm");
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("output");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !out.lock().expect("output").contains("ready") {
            assert!(Instant::now() < deadline, "spinner did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let stream = UnixStream::connect(&sock).expect("control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Spinner {
            child,
            out,
            ctl: BufReader::new(stream),
            _root: root,
        }
    }

    fn ctl(&mut self, req: Value) -> Value {
        let w = self.ctl.get_mut();
        writeln!(w, "{req}").expect("send request");
        let mut line = String::new();
        self.ctl.read_line(&mut line).expect("read answer");
        let v: Value = serde_json::from_str(&line).expect("JSON answer");
        assert_eq!(v["ok"], true, "{req} answered {v}");
        v
    }

    fn mismatches(&self) -> Vec<String> {
        self.out
            .lock()
            .expect("output")
            .lines()
            .filter(|l| l.starts_with("MISMATCH"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[test]
fn spinning_threads_see_memory_and_registers_of_one_instant_after_every_rollback() {
    let mut sp = Spinner::start(3);
    for cycle in 0..150 {
        let digest = cycle % 5 == 0;
        let cp = sp.ctl(json!({"cmd": "checkpoint", "digest": digest}));
        std::thread::sleep(Duration::from_millis(3));
        let id = cp["id"].as_u64().expect("id");
        let rb = sp.ctl(json!({"cmd": "rollback", "id": id, "digest": digest}));
        if digest {
            assert_eq!(
                rb["digest"], cp["digest"],
                "cycle {cycle}: the restored state hashes differently"
            );
        }
        sp.ctl(json!({"cmd": "release", "id": id}));
    }
    // Let every thread run through its check after the last rollback.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sp.child.try_wait().expect("status").is_none(),
        "the guest ended"
    );
    let bad = sp.mismatches();
    assert!(
        bad.is_empty(),
        "{} rollbacks left memory and registers from different instants, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    let status = sp.ctl(json!({"cmd": "status"}));
    assert_eq!(status["threads"].as_array().map(Vec::len), Some(4));
    assert_eq!(status["checkpoints"]["undo_bytes"], 0);
    assert_eq!(status["checkpoints"]["live"], json!([]));
}

#[test]
fn nested_checkpoints_roll_back_to_any_level_exactly() {
    let mut sp = Spinner::start(2);
    let mut taken = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(20));
        let cp = sp.ctl(json!({"cmd": "checkpoint", "digest": true}));
        taken.push((cp["id"].as_u64().expect("id"), cp["digest"].clone()));
    }
    // Release the second: the first stays reachable through the merged undo log.
    sp.ctl(json!({"cmd": "release", "id": taken[1].0}));
    let status = sp.ctl(json!({"cmd": "status"}));
    assert_eq!(
        status["checkpoints"]["live"].as_array().map(Vec::len),
        Some(3)
    );
    std::thread::sleep(Duration::from_millis(20));
    // Back to the third, then to the first: each hashes as it did when taken.
    let rb = sp.ctl(json!({"cmd": "rollback", "id": taken[2].0, "digest": true}));
    assert_eq!(rb["digest"], taken[2].1);
    std::thread::sleep(Duration::from_millis(20));
    let rb = sp.ctl(json!({"cmd": "rollback", "id": taken[0].0, "digest": true}));
    assert_eq!(rb["digest"], taken[0].1);
    let status = sp.ctl(json!({"cmd": "status"}));
    let live: Vec<u64> = status["checkpoints"]["live"]
        .as_array()
        .expect("live")
        .iter()
        .filter_map(|c| c["id"].as_u64())
        .collect();
    assert_eq!(live, [taken[0].0], "newer checkpoints are gone");
    // The fourth is gone: rolling back to it is an error, and the guest goes on.
    let w = sp.ctl.get_mut();
    writeln!(w, "{}", json!({"cmd": "rollback", "id": taken[3].0})).expect("send");
    let mut line = String::new();
    sp.ctl.read_line(&mut line).expect("answer");
    let v: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains(&taken[3].0.to_string())),
        "{v}"
    );
    sp.ctl(json!({"cmd": "release", "id": taken[0].0}));
    std::thread::sleep(Duration::from_millis(200));
    assert!(sp.mismatches().is_empty(), "{:?}", sp.mismatches());
    let status = sp.ctl(json!({"cmd": "status"}));
    assert_eq!(status["checkpoints"]["undo_bytes"], 0);
}

/// A file the guest unlinks while a checkpoint is live is gone for the guest at once, back
/// after a rollback (with its contents, replacing what the guest created since under that
/// name), and really gone once no checkpoint can bring it back; nothing is left beside the
/// root.
#[test]
fn unlinks_are_deferred_while_a_checkpoint_is_live() {
    require_kvm();
    let base = TempDir::new("unlink");
    let root = base.path().join("root");
    std::fs::create_dir_all(root.join("data")).expect("data");
    std::fs::copy(guest_tools::filer(), root.join("filer")).expect("filer");
    std::fs::write(root.join("data/keep"), b"precious contents").expect("file");
    let sock = base.path().join("ctl.sock");
    // Each line on stdin is a command; "ok" answers each.
    let mut child = Command::new(vmm_bin())
        .arg("run")
        .arg("--root")
        .arg(&root)
        .arg("--control")
        .arg(&sock)
        .arg("--")
        .arg("/filer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start assure-vmm");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut next_line = |out: &mut BufReader<std::process::ChildStdout>| {
        line.clear();
        out.read_line(&mut line).expect("guest output");
        line.trim().to_string()
    };
    assert_eq!(next_line(&mut out), "ready");
    let stream = UnixStream::connect(&sock).expect("control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut ctl = BufReader::new(stream);
    let mut request = |req: Value| -> Value {
        writeln!(ctl.get_mut(), "{req}").expect("send");
        let mut l = String::new();
        ctl.read_line(&mut l).expect("answer");
        let v: Value = serde_json::from_str(&l).expect("JSON");
        assert_eq!(v["ok"], true, "{req}: {v}");
        v
    };
    let keep = root.join("data/keep");
    let cp = request(json!({"cmd": "checkpoint"}));
    let id = cp["id"].as_u64().expect("id");
    writeln!(stdin, "rm /data/keep").expect("command");
    assert_eq!(next_line(&mut out), "ok");
    assert!(!keep.exists(), "the guest's unlink is visible at once");
    writeln!(stdin, "write /data/keep replaced").expect("command");
    assert_eq!(next_line(&mut out), "ok");
    assert_eq!(
        std::fs::read(&keep).expect("new file"),
        b"replaced\n",
        "the guest's unlink and new file are visible at once"
    );
    request(json!({"cmd": "rollback", "id": id}));
    assert_eq!(
        std::fs::read(&keep).expect("file back"),
        b"precious contents",
        "a rollback brings the unlinked file back"
    );
    // The guest, rolled back, reads its next command (the pipe is outside the guest).
    writeln!(stdin, "rm /data/keep").expect("command");
    assert_eq!(next_line(&mut out), "ok");
    assert!(!keep.exists());
    request(json!({"cmd": "release", "id": id}));
    let left: Vec<_> = std::fs::read_dir(base.path())
        .expect("base")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("assure-removed"))
        .collect();
    // The removals directory may stay until the run ends, but empty.
    for d in &left {
        let n = std::fs::read_dir(base.path().join(d)).expect("dir").count();
        assert_eq!(n, 0, "the released unlink is done for good");
    }
    drop(stdin);
    let st = child.wait().expect("wait");
    assert_eq!(st.code(), Some(0), "the guest ends at EOF");
    let left = std::fs::read_dir(base.path())
        .expect("base")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("assure-removed"))
        .count();
    assert_eq!(left, 0, "nothing is left beside the root");
}
