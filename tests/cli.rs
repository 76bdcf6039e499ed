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
