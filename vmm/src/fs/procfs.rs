//! Emulated `/proc` entries of the guest process.
//!
//! The guest never sees the VMM's `/proc`: every path under `/proc` is answered here, from
//! the VMM's record of the guest (its address space, fds, argv...). Only the entries
//! programs commonly read exist; anything else is `ENOENT`. Generated files are snapshots
//! taken at open time, served from a sealed, read-only memfd so the ordinary read path
//! works; directories are snapshots of `linux_dirent64` records in a memfd, served by
//! `getdents64`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::errno::Errno;
use crate::fd::FileKind;
use crate::mm::{Prot, Vma, VmaKind};
use crate::process::Process;

/// `st_dev` of emulated entries (procfs is an anonymous device on Linux too).
pub const PROC_DEV: u64 = 0x16;
/// `f_type` of procfs.
pub const PROC_SUPER_MAGIC: i64 = 0x9fa0;
/// Most symlink hops one lookup follows (Linux's MAXSYMLINKS).
const MAX_HOPS: usize = 40;

/// What `/proc` shows: the process and the calling thread.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The guest process.
    pub proc: &'a Process,
    /// The calling thread's id (`/proc/thread-self`).
    pub tid: i32,
    /// The calling thread's blocked signals (`SigBlk`).
    pub sigmask: u64,
}

/// A symbolic link of `/proc` and what following it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Another `/proc` path, relative to `/proc` (`self` → `1234`).
    Proc(String),
    /// A guest path inside the root (`exe`, `cwd`, `root`).
    Guest(String),
    /// The object behind an open guest fd (`fd/N`), which may have no path at all.
    Fd(i32),
}

/// Generated file contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    /// `maps`.
    Maps,
    /// `cmdline`.
    Cmdline,
    /// `environ`.
    Environ,
    /// `auxv`.
    Auxv,
    /// `status`.
    Status,
    /// `<pid>/stat`.
    Stat,
    /// `statm`.
    Statm,
    /// `comm`.
    Comm,
    /// `mountinfo`.
    MountInfo,
    /// `mounts`.
    Mounts,
    /// `/proc/meminfo`, from the guest's memory.
    MemInfo,
    /// A host file shown as is (`/proc/cpuinfo`...).
    Host(&'static str),
    /// The host kernel release.
    OsRelease,
    /// A random UUID per read.
    Uuid,
    /// Fixed text.
    Const(&'static str),
}

/// What a `/proc` path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A generated file.
    File(Gen),
    /// A symbolic link.
    Link(Link),
}

/// An entry of the emulated `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Canonical path (`/proc/1234/maps`).
    pub path: String,
    /// What it is.
    pub node: Node,
}

/// The outcome of a lookup that started in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// An emulated entry.
    Entry(Entry),
    /// The walk left `/proc` (through `..`, `exe`, `cwd`, `root`, or a directory fd) for
    /// this absolute guest path, to be resolved in the root.
    Outside(String),
    /// Following `fd/N` reached the object of this guest fd.
    Fd(i32),
}

/// If walking `abs` lexically enters `/proc`, the components after it (raw, with any `..`
/// still in them: the walk in [`resolve`] gives `..` its meaning).
pub fn proc_suffix(abs: &str) -> Option<Vec<&str>> {
    let comps: Vec<&str> = abs.split('/').collect();
    let mut depth: Vec<&str> = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        match *c {
            "" | "." => {}
            ".." => {
                depth.pop();
            }
            c => {
                depth.push(c);
                if depth == ["proc"] {
                    return Some(comps[i + 1..].to_vec());
                }
            }
        }
    }
    None
}

/// Directories of `/proc/sys` and the files in them.
const SYS_FILES: &[(&str, Gen)] = &[
    ("sys/kernel/hostname", Gen::Const("assure\n")),
    ("sys/kernel/domainname", Gen::Const("(none)\n")),
    ("sys/kernel/osrelease", Gen::OsRelease),
    ("sys/kernel/ostype", Gen::Const("Linux\n")),
    ("sys/kernel/pid_max", Gen::Const("4194304\n")),
    ("sys/kernel/threads-max", Gen::Const("4096\n")),
    ("sys/kernel/ngroups_max", Gen::Const("65536\n")),
    ("sys/kernel/random/uuid", Gen::Uuid),
    (
        "sys/kernel/random/boot_id",
        Gen::Host("/proc/sys/kernel/random/boot_id"),
    ),
    ("sys/vm/overcommit_memory", Gen::Const("0\n")),
    ("sys/vm/max_map_count", Gen::Const("65530\n")),
    ("sys/net/core/somaxconn", Gen::Const("4096\n")),
    ("sys/fs/nr_open", Gen::Const("1048576\n")),
    ("sys/fs/file-max", Gen::Const("9223372036854775807\n")),
];

/// Files at the top of `/proc`.
const TOP_FILES: &[(&str, Gen)] = &[
    ("cpuinfo", Gen::Host("/proc/cpuinfo")),
    ("meminfo", Gen::MemInfo),
    ("stat", Gen::Host("/proc/stat")),
    ("version", Gen::Host("/proc/version")),
    ("uptime", Gen::Host("/proc/uptime")),
    ("loadavg", Gen::Host("/proc/loadavg")),
    ("mounts", Gen::Mounts),
];

/// Files of `/proc/<pid>` (and of `/proc/<pid>/task/<tid>`).
const PROCESS_FILES: &[(&str, Gen)] = &[
    ("maps", Gen::Maps),
    ("cmdline", Gen::Cmdline),
    ("environ", Gen::Environ),
    ("auxv", Gen::Auxv),
    ("status", Gen::Status),
    ("stat", Gen::Stat),
    ("statm", Gen::Statm),
    ("comm", Gen::Comm),
    ("cgroup", Gen::Const("0::/\n")),
    ("mountinfo", Gen::MountInfo),
    ("mounts", Gen::Mounts),
    ("oom_score_adj", Gen::Const("0\n")),
];

fn lookup_file(table: &[(&str, Gen)], name: &str) -> Option<Node> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, g)| Node::File(*g))
}

/// A guest fd number as it appears in `/proc/self/fd` (no sign, no leading zeros).
fn parse_fd(s: &str) -> Option<i32> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// The node at `comps` (relative to `/proc`, canonical: no `.`, `..` or links inside).
pub fn node_at(v: &View<'_>, comps: &[&str]) -> Option<Node> {
    let pid = v.proc.pid.to_string();
    match comps {
        [] => Some(Node::Dir),
        ["self"] => Some(Node::Link(Link::Proc(pid))),
        ["thread-self"] => Some(Node::Link(Link::Proc(format!("{pid}/task/{}", v.tid)))),
        [p, rest @ ..] if *p == pid => process_node(v, rest, true),
        ["sys", ..] => {
            let joined = comps.join("/");
            if let Some(n) = lookup_file(SYS_FILES, &joined) {
                return Some(n);
            }
            let prefix = format!("{joined}/");
            SYS_FILES
                .iter()
                .any(|(p, _)| p.starts_with(&prefix))
                .then_some(Node::Dir)
        }
        [name] => lookup_file(TOP_FILES, name),
        _ => None,
    }
}

fn process_node(v: &View<'_>, comps: &[&str], top: bool) -> Option<Node> {
    match comps {
        [] | ["fd"] => Some(Node::Dir),
        ["task"] if top => Some(Node::Dir),
        ["task", t, rest @ ..] if top && *t == v.tid.to_string() => process_node(v, rest, false),
        ["fd", n] => {
            let fd = parse_fd(n)?;
            v.proc.fds.slot(i64::from(fd)).ok()?;
            Some(Node::Link(Link::Fd(fd)))
        }
        ["exe"] => Some(Node::Link(Link::Guest(crate::fs::normalize(&v.proc.exe)))),
        ["cwd"] => Some(Node::Link(Link::Guest(v.proc.fs.cwd().to_string()))),
        ["root"] => Some(Node::Link(Link::Guest("/".into()))),
        [name] => lookup_file(PROCESS_FILES, name),
        _ => None,
    }
}

/// Names and `d_type`s of the directory at `comps` (without `.` and `..`).
pub fn list(v: &View<'_>, comps: &[&str]) -> Vec<(String, u8)> {
    let pid = v.proc.pid.to_string();
    let mut names: Vec<String> = Vec::new();
    match comps {
        [] => {
            names.extend(["self", "thread-self", pid.as_str(), "sys"].map(String::from));
            names.extend(TOP_FILES.iter().map(|(n, _)| n.to_string()));
        }
        ["sys", ..] => {
            let prefix = format!("{}/", comps.join("/"));
            for (p, _) in SYS_FILES {
                if let Some(rest) = p.strip_prefix(&prefix) {
                    let first = rest.split('/').next().unwrap_or(rest).to_string();
                    if !names.contains(&first) {
                        names.push(first);
                    }
                }
            }
        }
        [_, rest @ ..] => match rest {
            [.., "fd"] => names.extend(v.proc.fds.iter().map(|(fd, _)| fd.to_string())),
            [.., "task"] => names.push(v.tid.to_string()),
            _ => {
                names.extend(["fd", "exe", "cwd", "root"].map(String::from));
                if rest.is_empty() {
                    names.push("task".into());
                }
                names.extend(PROCESS_FILES.iter().map(|(n, _)| n.to_string()));
            }
        },
    }
    names
        .into_iter()
        .filter_map(|n| {
            let mut c = comps.to_vec();
            c.push(&n);
            let t = match node_at(v, &c)? {
                Node::Dir => libc::DT_DIR,
                Node::File(_) => libc::DT_REG,
                Node::Link(_) => libc::DT_LNK,
            };
            Some((n, t))
        })
        .collect()
}

/// Walk `comps` (what follows `/proc/`) the way the kernel would: `..` climbs (out of
/// `/proc` to `/`), links are followed except a final one when `follow_last` is false, and a
/// trailing `/` forces following.
pub fn resolve(v: &View<'_>, comps: &[&str], follow_last: bool) -> Result<Resolved, Errno> {
    let mut cur: Vec<String> = Vec::new();
    let mut node = Node::Dir;
    let mut todo: VecDeque<String> = comps.iter().map(|s| s.to_string()).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "" | "." => {
                if node != Node::Dir {
                    return Err(Errno::ENOTDIR);
                }
                continue;
            }
            ".." => {
                if cur.pop().is_none() {
                    let rest: Vec<String> = todo.into_iter().collect();
                    return Ok(Resolved::Outside(format!("/{}", rest.join("/"))));
                }
                node = Node::Dir;
                continue;
            }
            _ => {}
        }
        if node != Node::Dir {
            return Err(Errno::ENOTDIR);
        }
        cur.push(c);
        let refs: Vec<&str> = cur.iter().map(String::as_str).collect();
        node = node_at(v, &refs).ok_or(Errno::ENOENT)?;
        let Node::Link(link) = &node else {
            continue;
        };
        if todo.is_empty() && !follow_last {
            break;
        }
        hops += 1;
        if hops > MAX_HOPS {
            return Err(Errno::ELOOP);
        }
        match link.clone() {
            Link::Proc(target) => {
                cur.clear();
                node = Node::Dir;
                for t in target.split('/').rev() {
                    todo.push_front(t.to_string());
                }
            }
            Link::Guest(path) => return Ok(Resolved::Outside(join_rest(&path, todo))),
            Link::Fd(fd) if todo.is_empty() => return Ok(Resolved::Fd(fd)),
            Link::Fd(fd) => {
                // Walking through a directory fd: continue at its path in the root.
                let file = v.proc.fds.get(i64::from(fd)).map_err(|_| Errno::ENOENT)?;
                let path = file_guest_path(v.proc, &file).ok_or(Errno::ENOTDIR)?;
                return Ok(Resolved::Outside(join_rest(&path, todo)));
            }
        }
    }
    Ok(Resolved::Entry(Entry {
        path: format!("/proc/{}", cur.join("/"))
            .trim_end_matches('/')
            .to_string(),
        node,
    }))
}

fn join_rest(base: &str, rest: VecDeque<String>) -> String {
    if rest.is_empty() {
        return base.to_string();
    }
    let rest: Vec<String> = rest.into_iter().collect();
    format!("{}/{}", base.trim_end_matches('/'), rest.join("/"))
}

/// The node of an emulated path given as text (for open files that remember theirs).
pub fn node_of_path(v: &View<'_>, path: &str) -> Option<Node> {
    let rest = proc_suffix(path)?;
    match resolve(v, &rest, false).ok()? {
        Resolved::Entry(e) => Some(e.node),
        _ => None,
    }
}

/// Guest path of an open file: where the kernel says it is now (renames included), else
/// where it was opened.
pub fn file_guest_path(p: &Process, file: &crate::fd::OpenFile) -> Option<String> {
    if file.kind == FileKind::Generated {
        return file.guest_path.clone();
    }
    p.fs.guest_path_of(file.host_fd())
        .or_else(|| file.guest_path.clone())
}

/// The text of the `/proc/self/fd/N` link.
pub fn fd_link_text(p: &Process, fd: i32) -> Option<String> {
    let file = p.fds.get(i64::from(fd)).ok()?;
    match file.kind {
        FileKind::Generated => return file.guest_path.clone(),
        FileKind::Epoll => return Some("anon_inode:[eventpoll]".into()),
        FileKind::Host => {}
    }
    if let Some(path) = p.fs.guest_path_of(file.host_fd()) {
        return Some(path);
    }
    let host = std::fs::read_link(format!("/proc/self/fd/{}", file.host_fd())).ok()?;
    let host = host.to_string_lossy().into_owned();
    // pipe:[...], socket:[...], anon_inode:..., memfds and terminals say nothing about the
    // host; a file outside the root (a redirected stdio) is not named.
    if !host.starts_with('/') || host.starts_with("/memfd:") || host.starts_with("/dev/") {
        Some(host)
    } else {
        Some(
            file.guest_path
                .clone()
                .unwrap_or_else(|| "anon_inode:[outside-root]".into()),
        )
    }
}

/// The text of a link.
pub fn link_text(p: &Process, link: &Link) -> Option<String> {
    match link {
        Link::Proc(t) | Link::Guest(t) => Some(t.clone()),
        Link::Fd(fd) => fd_link_text(p, *fd),
    }
}

/// Contents of a generated file.
pub fn contents(v: &View<'_>, g: Gen) -> Vec<u8> {
    let p = v.proc;
    match g {
        Gen::Maps => format_maps(p.mm.vmas()).into_bytes(),
        Gen::Cmdline => nul_joined(&p.argv),
        Gen::Environ => nul_joined(&p.envp),
        Gen::Auxv => p
            .auxv
            .iter()
            .flat_map(|(k, val)| k.to_le_bytes().into_iter().chain(val.to_le_bytes()))
            .collect(),
        Gen::Status => status(v).into_bytes(),
        Gen::Stat => stat_line(v).into_bytes(),
        Gen::Statm => {
            let (size, rss) = (vm_size(p) / 4096, rss_bytes(p) / 4096);
            format!("{size} {rss} 0 0 0 {rss} 0\n").into_bytes()
        }
        Gen::Comm => format!("{}\n", comm(p)).into_bytes(),
        Gen::MountInfo => {
            let (fstype, (major, minor)) = root_fs(p);
            format!(
                "1 0 {major}:{minor} / / rw,relatime shared:1 - {fstype} /dev/root rw\n\
                 2 1 0:{PROC_DEV} / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
            )
            .into_bytes()
        }
        Gen::Mounts => {
            let (fstype, _) = root_fs(p);
            format!(
                "/dev/root / {fstype} rw,relatime 0 0\n\
                 proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
            )
            .into_bytes()
        }
        Gen::MemInfo => meminfo(p).into_bytes(),
        Gen::Host(path) => std::fs::read(path).unwrap_or_default(),
        Gen::OsRelease => format!("{}\n", host_release()).into_bytes(),
        Gen::Uuid => uuid().into_bytes(),
        Gen::Const(s) => s.as_bytes().to_vec(),
    }
}

/// File-system type name and device of the root directory, for the mount tables. The
/// source is named `/dev/root` (not `rootfs`, which tools such as df skip).
fn root_fs(p: &Process) -> (&'static str, (u32, u32)) {
    let Ok(fd) = p.fs.open("/", libc::O_PATH | libc::O_DIRECTORY, 0) else {
        return ("rootfs", (0, 0));
    };
    // SAFETY: plain data filled by the kernel from a valid fd.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, pointers to locals.
    let ok = unsafe {
        libc::fstatfs(fd.as_raw_fd(), &mut sf) == 0 && libc::fstat(fd.as_raw_fd(), &mut st) == 0
    };
    if !ok {
        return ("rootfs", (0, 0));
    }
    let fstype = match sf.f_type {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlay",
        0x2fc1_2fc1 => "zfs",
        0x6573_5546 => "fuse",
        0x6969 => "nfs",
        _ => "rootfs",
    };
    (fstype, (libc::major(st.st_dev), libc::minor(st.st_dev)))
}

fn nul_joined(items: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    out
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, Copy)]
pub struct MapsLine<'a> {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Protection.
    pub prot: Prot,
    /// MAP_SHARED.
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Device (major, minor).
    pub dev: (u32, u32),
    /// Inode.
    pub inode: u64,
    /// Path or `[heap]`/`[stack]`.
    pub name: Option<&'a str>,
}

/// Format a maps line as Linux does (the name starts at column 73).
pub fn maps_line(l: &MapsLine<'_>) -> String {
    let MapsLine {
        start,
        end,
        prot,
        shared,
        offset,
        dev,
        inode,
        name,
    } = *l;
    let mut line = format!(
        "{start:08x}-{end:08x} {}{} {offset:08x} {:02x}:{:02x} {inode} ",
        prot.maps_string(),
        if shared { 's' } else { 'p' },
        dev.0,
        dev.1
    );
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        while line.len() < 72 {
            line.push(' ');
        }
        line.push(' ');
        line.push_str(name);
    }
    line.push('\n');
    line
}

/// The whole of `/proc/self/maps` for these VMAs.
pub fn format_maps<'a>(vmas: impl Iterator<Item = &'a Vma>) -> String {
    let mut out = String::new();
    for v in vmas {
        let (shared, offset, name) = match &v.kind {
            VmaKind::Anonymous => (false, 0, None),
            VmaKind::File {
                path,
                offset,
                shared,
            } => (*shared, *offset, Some(path.as_str())),
            VmaKind::Heap => (false, 0, Some("[heap]")),
            VmaKind::Stack => (false, 0, Some("[stack]")),
            VmaKind::Breakpoints => (false, 0, Some("[assure-xol]")),
        };
        out.push_str(&maps_line(&MapsLine {
            start: v.start,
            end: v.end,
            prot: v.prot,
            shared,
            offset,
            dev: (0, 0),
            inode: 0,
            name,
        }));
    }
    out
}

fn comm(p: &Process) -> String {
    let name = p.exe.rsplit('/').next().unwrap_or(&p.exe);
    name.chars().take(15).collect()
}

fn vm_size(p: &Process) -> u64 {
    p.mm.vmas().map(|v| v.end - v.start).sum()
}

fn rss_bytes(p: &Process) -> u64 {
    p.mm.ram().frames_in_use() * crate::memory::PAGE_SIZE
}

fn signal_set(p: &Process, pred: impl Fn(&crate::signal::Dispositions, i32) -> bool) -> u64 {
    (1..=crate::signal::NSIG as i32)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP && pred(&p.signals, s))
        .fold(0, |m, s| m | crate::signal::bit(s))
}

fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn status(v: &View<'_>) -> String {
    let p = v.proc;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let kb = |b: u64| format!("{:>8} kB", b / 1024);
    let fdsize = p
        .fds
        .iter()
        .map(|(fd, _)| fd + 1)
        .max()
        .unwrap_or(0)
        .max(64);
    let stack: u64 =
        p.mm.vmas()
            .filter(|v| v.kind == VmaKind::Stack)
            .map(|v| v.end - v.start)
            .sum();
    let data: u64 =
        p.mm.vmas()
            .filter(|v| v.prot.write() && v.kind != VmaKind::Stack)
            .map(|v| v.end - v.start)
            .sum();
    let ignored = signal_set(p, |d, s| d.get(s).handler == crate::signal::SIG_IGN);
    let caught = signal_set(p, |d, s| d.is_caught(s));
    let cpus = cpu_count();
    let mut s = String::new();
    let _ = write!(
        s,
        "Name:\t{name}\nUmask:\t{umask:04o}\nState:\tR (running)\nTgid:\t{pid}\nNgid:\t0\n\
         Pid:\t{tid}\nPPid:\t0\nTracerPid:\t0\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n\
         Gid:\t{gid}\t{gid}\t{gid}\t{gid}\nFDSize:\t{fdsize}\nGroups:\t\nNStgid:\t{pid}\n\
         NSpid:\t{tid}\nNSpgid:\t{pid}\nNSsid:\t{pid}\nKthread:\t0\nVmPeak:\t{size}\n\
         VmSize:\t{size}\nVmLck:\t{zero}\nVmPin:\t{zero}\nVmHWM:\t{rss}\nVmRSS:\t{rss}\n\
         RssAnon:\t{rss}\nRssFile:\t{zero}\nRssShmem:\t{zero}\nVmData:\t{data}\nVmStk:\t{stk}\n\
         VmExe:\t{zero}\nVmLib:\t{zero}\nVmPTE:\t{zero}\nVmSwap:\t{zero}\n\
         HugetlbPages:\t{zero}\nCoreDumping:\t0\nTHP_enabled:\t1\nThreads:\t1\nSigQ:\t0/4096\n\
         SigPnd:\t{z16}\nShdPnd:\t{z16}\nSigBlk:\t{blk:016x}\nSigIgn:\t{ign:016x}\n\
         SigCgt:\t{cgt:016x}\nCapInh:\t{z16}\nCapPrm:\t{z16}\nCapEff:\t{z16}\nCapBnd:\t{z16}\n\
         CapAmb:\t{z16}\nNoNewPrivs:\t1\nSeccomp:\t0\nSeccomp_filters:\t0\n\
         Cpus_allowed_list:\t0-{lastcpu}\nMems_allowed_list:\t0\n\
         voluntary_ctxt_switches:\t0\nnonvoluntary_ctxt_switches:\t0\n",
        name = comm(p),
        umask = p.umask,
        pid = p.pid,
        tid = p.pid,
        size = kb(vm_size(p)),
        rss = kb(rss_bytes(p)),
        data = kb(data),
        stk = kb(stack),
        zero = kb(0),
        z16 = "0000000000000000",
        blk = v.sigmask,
        ign = ignored,
        cgt = caught,
        lastcpu = cpus.saturating_sub(1),
    );
    s
}

/// Fields 14, 15 and 22 (utime, stime, starttime) of the VMM's own stat line: the guest's
/// CPU time is the VMM's, and it started when the VMM did.
fn host_times() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Field 3 (state) is the first after the ')'.
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |field: usize| f.get(field - 3).copied().unwrap_or(0);
    (get(14), get(15), get(22))
}

fn stat_line(v: &View<'_>) -> String {
    let p = v.proc;
    let (utime, stime, start) = host_times();
    let ignored = signal_set(p, |d, s| d.get(s).handler == crate::signal::SIG_IGN);
    let caught = signal_set(p, |d, s| d.is_caught(s));
    let pid = p.pid;
    let stack_start =
        p.mm.vmas()
            .find(|v| v.kind == VmaKind::Stack)
            .map_or(0, |v| v.end);
    // Fields 3..=52 after "pid (comm)".
    let fields: Vec<String> = vec![
        "R".into(),
        "0".into(),             // ppid
        pid.to_string(),        // pgrp
        pid.to_string(),        // session
        "0".into(),             // tty_nr
        "-1".into(),            // tpgid
        "4194304".into(),       // flags
        "0".into(),             // minflt
        "0".into(),             // cminflt
        "0".into(),             // majflt
        "0".into(),             // cmajflt
        utime.to_string(),      // utime
        stime.to_string(),      // stime
        "0".into(),             // cutime
        "0".into(),             // cstime
        "20".into(),            // priority
        "0".into(),             // nice
        "1".into(),             // num_threads
        "0".into(),             // itrealvalue
        start.to_string(),      // starttime
        vm_size(p).to_string(), // vsize
        (rss_bytes(p) / 4096).to_string(),
        u64::MAX.to_string(),           // rsslim
        "0".into(),                     // startcode
        "0".into(),                     // endcode
        stack_start.to_string(),        // startstack
        "0".into(),                     // kstkesp
        "0".into(),                     // kstkeip
        "0".into(),                     // signal
        v.sigmask.to_string(),          // blocked
        ignored.to_string(),            // sigignore
        caught.to_string(),             // sigcatch
        "0".into(),                     // wchan
        "0".into(),                     // nswap
        "0".into(),                     // cnswap
        "17".into(),                    // exit_signal
        "0".into(),                     // processor
        "0".into(),                     // rt_priority
        "0".into(),                     // policy
        "0".into(),                     // delayacct_blkio_ticks
        "0".into(),                     // guest_time
        "0".into(),                     // cguest_time
        "0".into(),                     // start_data
        "0".into(),                     // end_data
        p.mm.current_brk().to_string(), // start_brk (approximately)
        "0".into(),                     // arg_start
        "0".into(),                     // arg_end
        "0".into(),                     // env_start
        "0".into(),                     // env_end
        "0".into(),                     // exit_code
    ];
    format!("{pid} ({}) {}\n", comm(p), fields.join(" "))
}

/// `/proc/meminfo` describing the guest's memory, in the kernel's layout.
pub fn meminfo_text(total: u64, used: u64) -> String {
    let free = total.saturating_sub(used);
    let rows: [(&str, u64); 16] = [
        ("MemTotal", total),
        ("MemFree", free),
        ("MemAvailable", free),
        ("Buffers", 0),
        ("Cached", 0),
        ("SwapCached", 0),
        ("Active", used),
        ("Inactive", 0),
        ("SwapTotal", 0),
        ("SwapFree", 0),
        ("Dirty", 0),
        ("AnonPages", used),
        ("Mapped", 0),
        ("Shmem", 0),
        ("CommitLimit", total),
        ("Committed_AS", used),
    ];
    let mut s = String::new();
    for (name, bytes) in rows {
        let _ = writeln!(s, "{:<16}{:>8} kB", format!("{name}:"), bytes / 1024);
    }
    s
}

fn meminfo(p: &Process) -> String {
    meminfo_text(p.mm.ram().size(), rss_bytes(p))
}

fn host_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::uname(&mut u) };
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn uuid() -> String {
    let mut b = [0u8; 16];
    // SAFETY: fills a local buffer of the given size.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}\n",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

/// A stable inode number for an emulated path (FNV-1a).
pub fn inode_of(path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h & 0xffff_ffff) | 0x1_0000_0000
}

/// `linux_dirent64` records for a directory listing (`.` and `..` first), each with `d_off`
/// the byte offset of the next record, so `lseek` to a `d_off` resumes there.
pub fn dirents(dir_path: &str, entries: &[(String, u8)]) -> Vec<u8> {
    let parent = match dir_path.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => dir_path[..i].to_string(),
    };
    let mut all: Vec<(String, u8, u64)> = vec![
        (".".into(), libc::DT_DIR, inode_of(dir_path)),
        ("..".into(), libc::DT_DIR, inode_of(&parent)),
    ];
    for (n, t) in entries {
        all.push((n.clone(), *t, inode_of(&format!("{dir_path}/{n}"))));
    }
    let mut out = Vec::new();
    for (name, t, ino) in all {
        let reclen = (19 + name.len() + 1 + 7) & !7;
        let next = (out.len() + reclen) as i64;
        out.extend_from_slice(&ino.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
        out.extend_from_slice(&(reclen as u16).to_le_bytes());
        out.push(t);
        out.extend_from_slice(name.as_bytes());
        out.resize(out.len() + (reclen - 19 - name.len()), 0);
    }
    out
}

/// Put `data` in a sealed memfd and return a read-only descriptor of it (the guest cannot
/// write through it, nor get a writable one back).
pub fn materialize(data: &[u8], extra_flags: i32) -> Result<OwnedFd, Errno> {
    let name = CString::new("assure-proc").map_err(|_| Errno::EINVAL)?;
    // SAFETY: valid NUL-terminated name; the result is checked.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new fd nothing else owns.
    let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut done = 0;
    while done < data.len() {
        // SAFETY: writes from our own buffer within its bounds.
        let n = unsafe {
            libc::write(
                memfd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
            )
        };
        if n < 0 {
            return Err(Errno::last());
        }
        done += n as usize;
    }
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own fd with an integer argument.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Errno::last());
    }
    let path =
        CString::new(format!("/proc/self/fd/{}", memfd.as_raw_fd())).map_err(|_| Errno::EINVAL)?;
    let flags =
        libc::O_RDONLY | libc::O_CLOEXEC | (extra_flags & (libc::O_NONBLOCK | libc::O_PATH));
    // SAFETY: reopening our own memfd through the VMM's procfs; the result is checked.
    let ro = unsafe { libc::open(path.as_ptr(), flags) };
    if ro < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ro) })
}

/// `struct stat` of an emulated entry.
pub fn stat_of(p: &Process, e: &Entry) -> libc::stat {
    // SAFETY: stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let (mode, nlink, size) = match &e.node {
        Node::Dir => (libc::S_IFDIR | 0o555, 2, 0),
        Node::File(_) => (libc::S_IFREG | 0o444, 1, 0),
        Node::Link(l) => (
            libc::S_IFLNK | 0o777,
            1,
            link_text(p, l).map_or(0, |t| t.len() as i64),
        ),
    };
    st.st_dev = PROC_DEV;
    st.st_ino = inode_of(&e.path);
    st.st_mode = mode;
    st.st_nlink = nlink;
    // Entries of the process belong to its user, the rest to root (as on Linux).
    if e.path.starts_with(&format!("/proc/{}", p.pid)) {
        // SAFETY: getuid/getgid cannot fail.
        unsafe {
            st.st_uid = libc::getuid();
            st.st_gid = libc::getgid();
        }
    }
    st.st_size = size;
    st.st_blksize = 1024;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    st.st_atime = now.as_secs() as i64;
    st.st_mtime = st.st_atime;
    st.st_ctime = st.st_atime;
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_suffix_recognises_proc_lexically() {
        assert_eq!(proc_suffix("/proc"), Some(vec![]));
        assert_eq!(proc_suffix("/proc/self/maps"), Some(vec!["self", "maps"]));
        assert_eq!(proc_suffix("//proc//x"), Some(vec!["", "x"]));
        assert_eq!(proc_suffix("/a/../proc/1/.."), Some(vec!["1", ".."]));
        assert_eq!(proc_suffix("/procx/self"), None);
        assert_eq!(proc_suffix("/x/proc/self"), None);
        assert_eq!(proc_suffix("/"), None);
    }

    #[test]
    fn fd_names_are_canonical_numbers() {
        assert_eq!(parse_fd("0"), Some(0));
        assert_eq!(parse_fd("17"), Some(17));
        assert_eq!(parse_fd("017"), None);
        assert_eq!(parse_fd("+1"), None);
        assert_eq!(parse_fd("-1"), None);
        assert_eq!(parse_fd(""), None);
        assert_eq!(parse_fd("99999999999"), None);
    }

    #[test]
    fn maps_lines_match_the_kernel_layout() {
        let named = maps_line(&MapsLine {
            start: 0x5555_5555_4000,
            end: 0x5555_5555_6000,
            prot: Prot::READ,
            shared: false,
            offset: 0,
            dev: (8, 1),
            inode: 1_835_027,
            name: Some("/usr/bin/cat"),
        });
        // A line as Linux prints it, name at column 73.
        assert_eq!(
            named,
            "555555554000-555555556000 r--p 00000000 08:01 1835027                    /usr/bin/cat\n"
        );
        let base = MapsLine {
            start: 0x1000,
            end: 0x2000,
            prot: Prot::READ_WRITE,
            shared: true,
            offset: 0x3000,
            dev: (0, 0),
            inode: 0,
            name: None,
        };
        let anon = maps_line(&base);
        assert_eq!(anon, "00001000-00002000 rw-s 00003000 00:00 0 \n");
        let heap = maps_line(&MapsLine {
            shared: false,
            offset: 0,
            name: Some("[heap]"),
            ..base
        });
        assert_eq!(heap.find("[heap]"), Some(73));
    }

    #[test]
    fn maps_agree_with_the_hosts_own() {
        // Re-format the VMM's own maps lines and compare: same layout as the kernel's.
        let text = std::fs::read_to_string("/proc/self/maps").expect("maps");
        for line in text.lines().take(20) {
            let mut it = line.split_whitespace();
            let range = it.next().expect("range");
            let perms = it.next().expect("perms").as_bytes();
            let offset = u64::from_str_radix(it.next().expect("off"), 16).expect("hex");
            let dev = it.next().expect("dev");
            let inode: u64 = it.next().expect("ino").parse().expect("ino");
            let name: Vec<&str> = it.collect();
            let name = name.join(" ");
            let (s, e) = range.split_once('-').expect("range");
            let (maj, min) = dev.split_once(':').expect("dev");
            let mut prot = 0;
            if perms[0] == b'r' {
                prot |= libc::PROT_READ as u32;
            }
            if perms[1] == b'w' {
                prot |= libc::PROT_WRITE as u32;
            }
            if perms[2] == b'x' {
                prot |= libc::PROT_EXEC as u32;
            }
            if prot == 0 {
                continue; // ---p: x86 has no non-readable-but-accessible pages to compare
            }
            let ours = maps_line(&MapsLine {
                start: u64::from_str_radix(s, 16).expect("hex"),
                end: u64::from_str_radix(e, 16).expect("hex"),
                prot: Prot(prot),
                shared: perms[3] == b's',
                offset,
                dev: (
                    u32::from_str_radix(maj, 16).expect("hex"),
                    u32::from_str_radix(min, 16).expect("hex"),
                ),
                inode,
                name: (!name.is_empty()).then_some(name.as_str()),
            });
            assert_eq!(ours, format!("{line}\n"));
        }
    }

    #[test]
    fn meminfo_uses_the_kernel_layout() {
        let text = meminfo_text(1 << 30, 1 << 20);
        let first = text.lines().next().expect("line");
        assert_eq!(first, "MemTotal:        1048576 kB");
        assert!(text.contains("MemFree:         1047552 kB\n"));
    }

    #[test]
    fn dirents_chain_by_offset() {
        let d = dirents(
            "/proc/1/fd",
            &[
                ("0".into(), libc::DT_LNK),
                ("long-name".into(), libc::DT_REG),
            ],
        );
        let mut off = 0usize;
        let mut names = Vec::new();
        while off < d.len() {
            let reclen = u16::from_le_bytes([d[off + 16], d[off + 17]]) as usize;
            let next = i64::from_le_bytes(d[off + 8..off + 16].try_into().expect("8")) as usize;
            assert_eq!(reclen % 8, 0);
            assert_eq!(next, off + reclen);
            let name = &d[off + 19..off + reclen];
            let end = name.iter().position(|&b| b == 0).expect("nul");
            names.push(String::from_utf8(name[..end].to_vec()).expect("utf8"));
            off = next;
        }
        assert_eq!(names, [".", "..", "0", "long-name"]);
    }

    #[test]
    fn uuid_is_version_4() {
        let u = uuid();
        assert_eq!(u.len(), 37);
        assert_eq!(&u[14..15], "4");
    }
}
