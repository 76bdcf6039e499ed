//! Server images: `assure-vmm image build` for the bugsrv image (a guest-tools program) and
//! a Debian image (memcached), checked on disk; bugsrv's image run with `run --image`; the
//! CLI's errors. Debian servers are not run under the VMM here.
//!
//! The Debian build needs apt and the network (deb.debian.org); downloaded packages are
//! cached in target/tmp/image-debs across runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use assure_vmm::image::rootfs::{check_program, RootDir, LD_SO};
use assure_vmm::image::Manifest;
use common::*;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::Endianness;

fn images_dir() -> PathBuf {
    workspace().join("images")
}

/// The package cache shared by test runs (a cold download is a few MB per image).
fn deb_cache() -> PathBuf {
    workspace().join("target/tmp/image-debs")
}

/// `assure-vmm ARGS` with the guest-tools programs of this build.
fn vmm_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.env("ASSURE_GUEST_TOOLS_DIR", guest_tools::OUT_DIR)
        .args(args);
    cmd
}

fn vmm(args: &[&str], timeout: Duration) -> (i32, String, String) {
    let (st, out, err) = run_bounded(vmm_cmd(args), timeout);
    (shell_code(st), out, err)
}

fn build(name: &str, out: &Path) -> (i32, String) {
    let images = images_dir();
    let cache = deb_cache();
    let (code, _, err) = vmm(
        &[
            "image",
            "build",
            name,
            "--images-dir",
            images.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--cache",
            cache.to_str().expect("utf-8"),
        ],
        Duration::from_secs(300),
    );
    (code, err)
}

/// PT_INTERP of an ELF file, parsed independently of the builder.
fn interp_of(elf: &[u8]) -> Option<String> {
    let file = ElfFile64::<Endianness>::parse(elf).expect("ELF64");
    file.elf_program_headers().iter().find_map(|ph| {
        ph.interpreter(file.endian(), elf)
            .ok()
            .flatten()
            .map(|i| String::from_utf8_lossy(i).into_owned())
    })
}

#[test]
fn bugsrv_image_builds_and_runs() {
    require_kvm();
    let out = TempDir::new("img-bugsrv");
    let (code, err) = build("bugsrv", out.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("[image bugsrv] built"), "{err}");
    let dir = out.path().join("bugsrv");
    let m = Manifest::load(&dir).expect("manifest");
    assert_eq!(m.name, "bugsrv");
    assert_eq!(m.command[0], "/usr/sbin/bugsrv");
    assert_eq!(m.ports[0].guest, 8082);
    assert!(m.packages.is_empty());
    assert_eq!(m.program.interp, None, "bugsrv is static");
    assert!(m.local_files.contains_key("/usr/sbin/bugsrv"));
    let rootfs = m.rootfs_in(&dir);
    assert_eq!(
        std::fs::read(rootfs.join("usr/sbin/bugsrv")).expect("binary in the image"),
        std::fs::read(guest_tools::bugsrv()).expect("built bugsrv")
    );
    assert!(rootfs.join("srv/www/index.html").is_file());
    assert!(std::fs::read_to_string(rootfs.join("etc/passwd"))
        .expect("passwd")
        .starts_with("root:x:0:0:"));
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        assert_eq!(
            std::fs::read_link(rootfs.join(link)).expect("usr-merge link"),
            Path::new(target)
        );
    }

    // A second build finds it up to date.
    let (code, err) = build("bugsrv", out.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("up to date"), "{err}");

    // Run it by name; `-- -p 0` is appended to the image's command (bugsrv takes the last
    // -p), so the test gets an ephemeral port.
    let mut cmd = vmm_cmd(&[
        "run",
        "--image",
        "bugsrv",
        "--images-out",
        out.path().to_str().expect("utf-8"),
        "--",
        "-p",
        "0",
    ]);
    cmd.current_dir(out.path());
    let srv = Server::start_cmd(cmd, "listening on");
    let r = curl(&srv.url("/file/index.html"));
    assert_eq!(r.status, 200);
    assert!(
        String::from_utf8_lossy(&r.body).contains("Served by bugsrv"),
        "{r:?}"
    );
    drop(srv);

    // And by directory.
    let cmd = vmm_cmd(&[
        "run",
        "--image",
        dir.to_str().expect("utf-8"),
        "--",
        "-p",
        "0",
    ]);
    let srv = Server::start_cmd(cmd, "listening on");
    assert_eq!(curl(&srv.url("/")).status, 200);
}

#[test]
fn memcached_image_has_a_consistent_rootfs() {
    let out = TempDir::new("img-memcached");
    let (code, err) = build("memcached", out.path());
    assert_eq!(code, 0, "{err}");
    let dir = out.path().join("memcached");
    let m = Manifest::load(&dir).expect("manifest");
    assert_eq!(m.command[0], "/usr/bin/memcached");
    for p in ["memcached", "libc6", "libevent-2.1-7"] {
        assert!(
            m.packages.contains_key(p),
            "{p} not unpacked: {:?}",
            m.packages
        );
    }
    // Left out: maintainer-script tools and perl (memcached-tool only).
    for p in ["perl", "adduser", "dpkg", "init-system-helpers", "lsb-base"] {
        assert!(!m.packages.contains_key(p), "{p} should be excluded");
    }
    let rootfs = m.rootfs_in(&dir);
    let root = RootDir::open(&rootfs).expect("rootfs");

    // The binary, and its PT_INTERP inside the root: through the guest's eyes (symlinks
    // resolved inside the root) and the host's (the builder made every symlink relative).
    let elf = std::fs::read(rootfs.join("usr/bin/memcached")).expect("memcached binary");
    let interp = interp_of(&elf).expect("memcached is dynamically linked");
    assert_eq!(interp, LD_SO);
    assert_eq!(m.program.interp.as_deref(), Some(LD_SO));
    assert!(
        root.is_file(&interp),
        "{interp} does not resolve inside the root"
    );
    assert!(rootfs.join(interp.trim_start_matches('/')).is_file());
    let ld = std::fs::read_link(rootfs.join("usr/lib64/ld-linux-x86-64.so.2")).expect("link");
    assert!(ld.is_relative(), "{ld:?}");
    // Every library it needs is there.
    let info = check_program(&root, "/usr/bin/memcached").expect("program check");
    for lib in ["libevent-2.1.so.7", "libc.so.6", "libsasl2.so.2"] {
        assert!(
            info.libraries.iter().any(|l| l.ends_with(lib)),
            "{lib}: {:?}",
            info.libraries
        );
    }

    // Configuration and accounts.
    assert!(rootfs.join("etc/memcached.conf").is_file());
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    assert!(passwd.contains("\nmemcache:x:"), "{passwd}");
    assert!(passwd.contains("\nnobody:x:65534:"), "{passwd}");
    assert!(rootfs.join("etc/group").is_file() && rootfs.join("etc/nsswitch.conf").is_file());
    assert!(rootfs.join("var/log/memcached").is_dir());
    assert!(
        !rootfs.join("usr/share/doc").exists(),
        "documentation is pruned"
    );
    assert!(!rootfs.join("usr/bin/perl").exists());

    // The cache is reused: an unchanged image is not rebuilt.
    let (code, err) = build("memcached", out.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("up to date"), "{err}");
    assert!(deb_cache().read_dir().expect("cache").any(|e| e
        .map(|e| e.file_name().to_string_lossy().starts_with("memcached_"))
        .unwrap_or(false)));
}

#[test]
fn image_errors_are_clear() {
    let out = TempDir::new("img-errors");
    let o = out.path().to_str().expect("utf-8");
    let images = images_dir();
    let i = images.to_str().expect("utf-8");

    let (code, _, err) = vmm(
        &["image", "build", "nosuch", "--images-dir", i, "--out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("no image spec \"nosuch\"") && err.contains("memcached"),
        "{err}"
    );

    // A bad spec: the file and the field are named.
    let specs = TempDir::new("img-specs");
    std::fs::write(
        specs.path().join("bad.toml"),
        "description = \"x\"\ncommand = [\"/x\"]\nports = [{ guest = 0 }]\n",
    )
    .expect("spec");
    let s = specs.path().to_str().expect("utf-8");
    let (code, _, err) = vmm(
        &["image", "build", "bad", "--images-dir", s, "--out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.toml") && err.contains("ports[0].guest"),
        "{err}"
    );

    // An unknown package is named (without touching apt's lists).
    std::fs::write(
        specs.path().join("nopkg.toml"),
        "description = \"x\"\ncommand = [\"/x\"]\npackages = [\"no-such-package-assure\"]\n",
    )
    .expect("spec");
    let (code, _, err) = vmm(
        &[
            "image",
            "build",
            "nopkg",
            "--images-dir",
            s,
            "--out",
            o,
            "--no-apt-update",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("apt does not know the package(s) no-such-package-assure"),
        "{err}"
    );

    // A command that is not in the image.
    std::fs::write(
        specs.path().join("nocmd.toml"),
        "description = \"x\"\ncommand = [\"/usr/bin/absent\"]\n",
    )
    .expect("spec");
    let (code, _, err) = vmm(
        &["image", "build", "nocmd", "--images-dir", s, "--out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("/usr/bin/absent is not in the root file system"),
        "{err}"
    );

    let (code, out_text, _) = vmm(
        &["image", "list", "--images-dir", i, "--out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 0);
    for n in [
        "bugsrv",
        "lighttpd",
        "memcached",
        "mosquitto",
        "nginx-light",
        "redis",
    ] {
        assert!(
            out_text
                .lines()
                .any(|l| l.starts_with(n) && l.contains("not built")),
            "{n}: {out_text}"
        );
    }

    // run: --image and --root exclude each other; an unbuilt image is a set-up error.
    let (code, _, err) = vmm(
        &["run", "--image", "memcached", "--root", "/"],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = vmm(
        &["run", "--image", "memcached", "--images-out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 125);
    assert!(
        err.contains("image memcached is not built") && err.contains("image build memcached"),
        "{err}"
    );
    let (code, _, err) = vmm(
        &["run", "--image", "x", "--port", "80", "--images-out", o],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2);
    assert!(err.contains("GUEST=HOST"), "{err}");
}
