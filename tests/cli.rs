//! The command line: clear errors for bad input, exit statuses, the syscall table.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn vmm(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args);
    let (st, out, err) = run_bounded(cmd, Duration::from_secs(30));
    (shell_code(st), out, err)
}

#[test]
fn bad_flags_are_usage_errors() {
    let (code, _, err) = vmm(&["run", "--mem", "lots", "--", "/x"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid size"), "{err}");
    let (code, _, err) = vmm(&["run", "--env", "NOEQUALS", "--", "/x"]);
    assert_eq!(code, 2);
    assert!(err.contains("KEY=VALUE"), "{err}");
    let (code, _, err) = vmm(&["run", "--no-such-flag", "--", "/x"]);
    assert_eq!(code, 2);
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, _, _) = vmm(&["run"]);
    assert_eq!(code, 2, "a program is required");
}

#[test]
fn unusable_inputs_are_clear_errors() {
    require_kvm();
    let root = TempDir::new("cli");
    std::fs::write(root.path().join("notelf"), "#!/bin/sh\necho hi\n").expect("file");
    let r = root.path().to_str().expect("utf-8");
    let (code, _, err) = vmm(&["run", "--root", r, "--", "/missing"]);
    assert_eq!(code, 125);
    assert!(
        err.contains("cannot read /missing") || err.contains("not found"),
        "{err}"
    );
    let (code, _, err) = vmm(&["run", "--root", r, "--", "missing-in-path"]);
    assert_eq!(code, 125);
    assert!(err.contains("not found in the guest root"), "{err}");
    let (code, _, err) = vmm(&["run", "--root", r, "--", "/notelf"]);
    assert_eq!(code, 125);
    assert!(err.contains("not an x86-64 ELF"), "{err}");
    let (code, _, err) = vmm(&["run", "--root", "/no/such/dir", "--", "/x"]);
    assert_eq!(code, 125);
    assert!(err.contains("cannot open root directory"), "{err}");
    let (code, _, err) = vmm(&["run", "--root", r, "--mem", "1M", "--", "/x"]);
    assert_eq!(code, 125);
    assert!(err.contains("guest memory size"), "{err}");
}

#[test]
fn the_syscall_table_is_printed() {
    let (code, out, _) = vmm(&["syscalls"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["0", "read", "supported"]), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(" execve ") && l.contains("refused")),
        "{out}"
    );
}

#[test]
fn a_guest_writing_into_a_closed_pipe_dies_of_sigpipe_and_the_vmm_exits() {
    require_kvm();
    // The guest's stdout and stderr and the VMM's own stderr are one pipe whose reader goes
    // away: the guest must die of SIGPIPE and the VMM must not hang or die of its own logs.
    let bb = deb_file("busybox-static", "bin/busybox");
    let root = root_with("sigpipe", &bb, "busybox");
    let mut fds = [0i32; 2];
    // Close-on-exec, so no child (this VMM or one of a concurrent test) keeps the read end.
    // SAFETY: pipe2() fills two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: the fds were just created and are owned here.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let write2 = write_end.try_clone().expect("dup");
    let mut child = Command::new(vmm_bin())
        .arg("run")
        .arg("--root")
        .arg(root.path())
        .args(["--", "/busybox", "yes", "assure"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::from(write2))
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&read_end), &mut line)
        .expect("a line");
    assert_eq!(line.trim(), "assure");
    drop(read_end);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("the VMM hung after its output pipe closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(shell_code(status), 128 + 13, "the guest died of SIGPIPE");
}

#[test]
fn the_control_socket_answers_status_and_survives_garbage() {
    require_kvm();
    let root = root_with("ctl", &guest_tools::bugsrv(), "bugsrv");
    let sock = root.path().join("ctl.sock");
    let sock_arg = sock.to_str().expect("utf-8").to_string();
    let srv = Server::start(
        root.path(),
        &["--control", &sock_arg],
        &["/bugsrv", "-p", "0"],
        "bugsrv: listening on",
    );
    let (code, out, err) = vmm(&["ctl", &sock_arg, "status"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON status");
    assert_eq!(status["ok"], true);
    assert_eq!(status["program"], "/bugsrv");
    assert_eq!(
        status["pid"].as_i64(),
        Some(i64::from(srv.child.id() as i32)),
        "the guest pid is the VMM's"
    );
    assert_eq!(status["threads"].as_array().map(Vec::len), Some(1));
    assert!(status["memory_used_bytes"].as_u64().is_some_and(|m| m > 0));
    // Hostile clients: garbage, an unknown command, a huge line, a client that goes away.
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        s.write_all(b"garbage\n{\"cmd\":\"reboot\"}\n")
            .expect("send");
        let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).expect("answer");
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON answer");
            assert_eq!(v["ok"], false, "{line}");
        }
        s.write_all(&vec![b'x'; 200_000]).ok();
    }
    drop(std::os::unix::net::UnixStream::connect(&sock));
    assert_eq!(curl(&srv.url("/")).status, 200, "the sandbox keeps serving");
    let (code, _, _) = vmm(&["ctl", &sock_arg, "status"]);
    assert_eq!(code, 0, "and keeps answering");
    let (code, _, err) = vmm(&["ctl", "/nonexistent/ctl.sock", "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot talk to"), "{err}");
}

/// `assure-vmm functions` lists a stripped binary's functions from `.eh_frame`: the
/// request parser of the stripped bugsrv is there, at the address the unstripped build's
/// symbol table gives it, without a name.
#[test]
fn functions_of_a_stripped_binary_come_from_eh_frame() {
    let with = guest_tools::BUGSRV;
    let stripped = guest_tools::BUGSRV_STRIPPED;
    let (code, out, err) = vmm(&["functions", with, "--match", "process_request"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.ends_with(" process_request"))
        .unwrap_or_else(|| panic!("process_request not listed: {out}"));
    let mut fields = line.split_whitespace();
    let (addr, size) = (
        fields.next().expect("address"),
        fields.next().expect("size"),
    );
    assert!(size.parse::<u64>().is_ok_and(|s| s > 16), "{line}");
    let (code, out, err) = vmm(&["functions", stripped]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l == format!("{addr} {size} ?")),
        "the stripped build lists {addr} {size} without a name: {}",
        &out[..out.len().min(400)]
    );
    assert!(err.contains("functions ("), "{err}");
    // Not an ELF file: a clear error naming it.
    let dir = TempDir::new("functions");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not an ELF file\n").expect("write");
    let text = text.to_string_lossy().into_owned();
    let (code, _, err) = vmm(&["functions", &text]);
    assert_eq!(code, 1);
    assert!(err.contains(&text), "{err}");
}
