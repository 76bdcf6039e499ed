//! A hostile guest: bad pointers, absurd lengths, fds it does not own, unknown syscalls and
//! path escapes. Each ABI case must give exactly the result Linux gives (the same program
//! run natively), no path may lead outside the root, and the VMM must survive.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The fixture hostile.c documents: a root with data.txt, dir/ and escaping symlinks, and
/// secret.txt in the root's parent.
fn fixture() -> (TempDir, std::path::PathBuf) {
    let base = TempDir::new("hostile");
    let root = base.path().join("root");
    std::fs::create_dir_all(root.join("dir")).expect("dir");
    std::fs::write(root.join("data.txt"), "hello\n").expect("data");
    std::fs::write(base.path().join("secret.txt"), "SECRET\n").expect("secret");
    let link = |target: &str, at: &str| {
        std::os::unix::fs::symlink(target, root.join(at)).expect("symlink")
    };
    link("/../../secret.txt", "link_abs");
    link("../secret.txt", "link_rel");
    link("../../../secret.txt", "dir/link_up");
    link("link_loop", "link_loop");
    std::fs::copy(guest_tools::hostile(), root.join("hostile")).expect("copy");
    (base, root)
}

fn parse(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run_native(root: &Path) -> BTreeMap<String, String> {
    let out = // The built binary, not the copy in the root: executing a file just written races with
    // other test threads' forks (ETXTBSY).
    Command::new(guest_tools::hostile())
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("native hostile");
    assert!(out.status.success(), "native run failed");
    parse(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn every_abi_case_gets_the_errno_linux_gives() {
    require_kvm();
    let (_base, root) = fixture();
    let native = run_native(&root);
    let (st, out, err) = run_vmm(&root, &["/hostile"], Duration::from_secs(60));
    assert_eq!(
        shell_code(st),
        0,
        "the hostile guest ran to its end; stderr:\n{err}"
    );
    let guest = parse(&out);
    // The native count of foreign fds depends on what the launcher leaks (cargo passes its
    // jobserver fds); the guest's must be 0 whatever the VMM holds, checked below.
    let abi: Vec<&String> = native
        .keys()
        .filter(|k| k.starts_with("abi.") && *k != "abi.foreign_fds")
        .collect();
    assert!(abi.len() >= 30, "the program probes many cases: {abi:?}");
    let mut mismatches = Vec::new();
    for k in abi {
        if guest.get(k) != native.get(k) {
            mismatches.push(format!(
                "{k}: native {:?}, guest {:?}",
                native.get(k),
                guest.get(k)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "results differ from Linux:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        guest.get("abi.foreign_fds").map(String::as_str),
        Some("0"),
        "the VMM's own fds are unreachable"
    );
}

#[test]
fn no_path_leads_outside_the_root() {
    require_kvm();
    let (_base, root) = fixture();
    let (st, out, err) = run_vmm(&root, &["/hostile"], Duration::from_secs(60));
    assert_eq!(shell_code(st), 0, "stderr:\n{err}");
    let guest = parse(&out);
    let jail: Vec<(&String, &String)> = guest
        .iter()
        .filter(|(k, _)| k.starts_with("jail."))
        .collect();
    assert!(jail.len() >= 12, "all confinement cases ran: {jail:?}");
    for (k, v) in &jail {
        assert!(!v.contains("SECRET"), "{k} escaped the root: {v}");
    }
    let expect = |k: &str, v: &str| assert_eq!(guest.get(k).map(String::as_str), Some(v), "{k}");
    for k in [
        "jail.dotdot",
        "jail.root_dotdot",
        "jail.deep_dotdot",
        "jail.link_abs",
        "jail.link_rel",
        "jail.link_up",
        "jail.proc_root",
        "jail.proc_cwd",
        "jail.dirfd_dotdot",
        "jail.chdir_dotdot",
    ] {
        expect(k, "ENOENT");
    }
    expect("jail.link_loop", "ELOOP");
    expect("jail.exe", "/hostile");
}

#[test]
fn the_vmm_survives_a_stripped_hostile_guest_twice() {
    require_kvm();
    let (_base, root) = fixture();
    std::fs::copy(guest_tools::hostile_stripped(), root.join("hostile")).expect("copy");
    for _ in 0..2 {
        let (st, out, err) = run_vmm(&root, &["/hostile"], Duration::from_secs(60));
        assert_eq!(shell_code(st), 0, "stderr:\n{err}");
        assert!(out.lines().count() >= 40);
    }
}
