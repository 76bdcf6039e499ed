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
    assert_eq!(shell_code(st), 0, "abi {case} under assure-vmm; stderr:\n{err}");
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
