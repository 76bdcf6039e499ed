//! Process semantics, compared with the same program run natively: memory protection and
//! unmapping take effect at once (no stale translation survives in KVM's shadow MMU),
//! fork/wait, signal delivery and return, demand paging.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn compare(case: &str) {
    require_kvm();
    let bin = guest_tools::abi();
    let native = Command::new(&bin).arg(case).output().expect("run natively");
    assert!(native.status.success(), "native run of abi {case} failed");
    let root = root_with("abi", &bin, "abi");
    let (st, out, err) = run_vmm(root.path(), &["/abi", case], Duration::from_secs(60));
    assert_eq!(
        shell_code(st),
        0,
        "abi {case} under assure-vmm; stderr:\n{err}"
    );
    let native = String::from_utf8_lossy(&native.stdout);
    assert!(!native.trim().is_empty());
    assert_eq!(out, native, "abi {case}: guest output differs from native");
}

#[test]
fn memory_protection_and_unmapping_take_effect_at_once() {
    compare("mm");
}

#[test]
fn fork_and_wait_match_linux() {
    compare("fork");
}

#[test]
fn signal_handlers_run_and_return_with_the_context_intact() {
    compare("signals");
}

#[test]
fn demand_paging_and_brk() {
    compare("demand");
}

#[test]
fn threads_share_memory_and_synchronize() {
    compare("threads");
}

#[test]
fn an_operator_sigterm_reaches_the_guest_handler() {
    require_kvm();
    let root = root_with("abi-term", &guest_tools::abi(), "abi");
    let mut srv = {
        let mut cmd = std::process::Command::new(vmm_bin());
        cmd.arg("run")
            .arg("--root")
            .arg(root.path())
            .args(["--", "/abi", "wait-term"]);
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("ready line");
        assert_eq!(line.trim(), "ready");
        (child, out)
    };
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(srv.0.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut srv.1, &mut rest).expect("output");
    let status = srv.0.wait().expect("wait");
    assert_eq!(
        rest.trim(),
        "wait-term.handled=1",
        "the guest's handler ran"
    );
    assert_eq!(shell_code(status), 0, "and the guest exited cleanly");
}
