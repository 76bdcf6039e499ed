//! ELF loading, as Linux's `binfmt_elf` does it: PT_LOAD segments of the executable (at
//! its address, or at the PIE base), the PT_INTERP interpreter from the root file system,
//! the break after the executable, and the initial stack with argv, envp and auxv.

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

use crate::arch::x86_64::layout;
use crate::errno::Errno;
use crate::fs::FsContext;
use crate::memory::PAGE_SIZE;
use crate::mm::{AddressSpace, Contents, Placement, Prot, VmaKind};

/// Largest executable or interpreter we read.
const MAX_IMAGE_SIZE: u64 = 1 << 30;

/// Errors of loading a program.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read inside the root.
    #[error("cannot read {path} in the guest root: {errno}")]
    Read {
        /// Guest path.
        path: String,
        /// Why.
        errno: Errno,
    },
    /// Not an ELF file we can run.
    #[error("{path}: not an x86-64 ELF executable ({why})")]
    Format {
        /// Guest path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// Mapping failed (guest memory too small, overlapping segments).
    #[error("{path}: cannot map segments: {errno}")]
    Map {
        /// Guest path.
        path: String,
        /// Why.
        errno: Errno,
    },
}

/// One ELF image placed in guest memory.
#[derive(Debug, Clone)]
pub struct LoadedElf {
    /// Guest path.
    pub path: String,
    /// The file's bytes (kept for symbolization).
    pub bytes: std::sync::Arc<[u8]>,
    /// What was added to the file's virtual addresses.
    pub bias: u64,
    /// Biased entry point.
    pub entry: u64,
    /// Biased address of the program headers in memory.
    pub phdr: u64,
    /// Number of program headers.
    pub phnum: u64,
    /// One past the highest biased address of any segment.
    pub end: u64,
}

/// The result of loading a program.
#[derive(Debug)]
pub struct LoadedProgram {
    /// The executable.
    pub exe: LoadedElf,
    /// Its interpreter, for dynamic executables.
    pub interp: Option<LoadedElf>,
    /// Where the first instruction is (the interpreter's entry if there is one).
    pub start_rip: u64,
    /// Initial stack pointer (points at argc).
    pub start_rsp: u64,
    /// The auxiliary vector given to the program.
    pub auxv: Vec<(u64, u64)>,
}

fn format_err(path: &str, why: impl Into<String>) -> LoadError {
    LoadError::Format {
        path: path.into(),
        why: why.into(),
    }
}

struct Segment {
    vaddr: u64,
    memsz: u64,
    offset: u64,
    filesz: u64,
    prot: Prot,
}

struct ParsedElf {
    is_dyn: bool,
    entry: u64,
    phoff: u64,
    phnum: u64,
    phdr_vaddr: Option<u64>,
    interp: Option<String>,
    segments: Vec<Segment>,
}

fn parse(path: &str, data: &[u8]) -> Result<ParsedElf, LoadError> {
    let header = elf::FileHeader64::<Endianness>::parse(data)
        .map_err(|e| format_err(path, e.to_string()))?;
    let endian = header
        .endian()
        .map_err(|e| format_err(path, e.to_string()))?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err(format_err(path, "machine is not x86-64"));
    }
    let is_dyn = match header.e_type(endian) {
        elf::ET_EXEC => false,
        elf::ET_DYN => true,
        t => return Err(format_err(path, format!("ELF type {t} is not executable"))),
    };
    let phdrs = header
        .program_headers(endian, data)
        .map_err(|e| format_err(path, e.to_string()))?;
    let mut segments = Vec::new();
    let mut interp = None;
    let mut phdr_vaddr = None;
    for ph in phdrs {
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                let flags = ph.p_flags(endian).0;
                let mut prot = 0u64;
                if flags & elf::PF_R.0 != 0 {
                    prot |= libc::PROT_READ as u64;
                }
                if flags & elf::PF_W.0 != 0 {
                    prot |= libc::PROT_WRITE as u64;
                }
                if flags & elf::PF_X.0 != 0 {
                    prot |= libc::PROT_EXEC as u64;
                }
                let seg = Segment {
                    vaddr: ph.p_vaddr(endian),
                    memsz: ph.p_memsz(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                    prot: Prot::from_bits(prot).unwrap_or(Prot::READ),
                };
                if seg.filesz > seg.memsz
                    || seg
                        .offset
                        .checked_add(seg.filesz)
                        .is_none_or(|e| e > data.len() as u64)
                    || seg.vaddr % PAGE_SIZE != seg.offset % PAGE_SIZE
                    || seg
                        .vaddr
                        .checked_add(seg.memsz)
                        .is_none_or(|e| e > layout::USER_END)
                {
                    return Err(format_err(path, "malformed PT_LOAD segment"));
                }
                segments.push(seg);
            }
            elf::PT_INTERP => {
                let raw = ph
                    .data(endian, data)
                    .map_err(|_| format_err(path, "bad PT_INTERP"))?;
                let s = raw.split(|&b| b == 0).next().unwrap_or_default();
                interp = Some(
                    String::from_utf8(s.to_vec()).map_err(|_| format_err(path, "bad PT_INTERP"))?,
                );
            }
            elf::PT_PHDR => phdr_vaddr = Some(ph.p_vaddr(endian)),
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(format_err(path, "no PT_LOAD segment"));
    }
    Ok(ParsedElf {
        is_dyn,
        entry: header.e_entry(endian),
        phoff: header.e_phoff(endian),
        phnum: u64::from(header.e_phnum(endian)),
        phdr_vaddr,
        interp,
        segments,
    })
}

/// Map one ELF image. `base` is where an ET_DYN image's lowest segment goes (`None`: anywhere).
fn map_image(
    mm: &mut AddressSpace,
    path: &str,
    data: std::sync::Arc<[u8]>,
    parsed: &ParsedElf,
    base: Option<u64>,
) -> Result<LoadedElf, LoadError> {
    let map_err = |errno| LoadError::Map {
        path: path.into(),
        errno,
    };
    let lo = parsed
        .segments
        .iter()
        .map(|s| s.vaddr & !(PAGE_SIZE - 1))
        .min()
        .unwrap_or(0);
    let hi = parsed
        .segments
        .iter()
        .map(|s| s.vaddr + s.memsz)
        .max()
        .unwrap_or(0);
    let span = hi
        .checked_sub(lo)
        .ok_or_else(|| format_err(path, "segments out of order"))?;
    let bias = if parsed.is_dyn {
        // Reserve the whole span first so the segments land together, like the kernel does.
        let at = match base {
            Some(b) => mm.map(
                Placement::Fixed(b),
                span,
                Prot::NONE,
                VmaKind::Anonymous,
                None,
            ),
            None => mm.map(
                Placement::Hint(0),
                span,
                Prot::NONE,
                VmaKind::Anonymous,
                None,
            ),
        }
        .map_err(map_err)?;
        at - lo
    } else {
        0
    };
    for seg in &parsed.segments {
        let start = (seg.vaddr + bias) & !(PAGE_SIZE - 1);
        let lead = (seg.vaddr + bias) - start;
        let len = lead + seg.memsz;
        let file_start = (seg.offset - lead) as usize;
        let contents = &data[file_start..file_start + (lead + seg.filesz) as usize];
        let kind = VmaKind::File {
            path: path.into(),
            offset: seg.offset - lead,
            shared: false,
        };
        mm.map(
            Placement::Fixed(start),
            len,
            seg.prot,
            kind,
            Some(Contents::Bytes(contents)),
        )
        .map_err(map_err)?;
    }
    // Header values are the file's: add them without wrapping.
    let overflow = || format_err(path, "addresses out of range");
    let phdr = match parsed.phdr_vaddr {
        Some(v) => v.checked_add(bias).ok_or_else(overflow)?,
        None => {
            let first = parsed
                .segments
                .iter()
                .find(|s| s.offset == 0)
                .ok_or_else(|| format_err(path, "program headers not mapped"))?;
            first
                .vaddr
                .checked_add(parsed.phoff)
                .and_then(|a| a.checked_add(bias))
                .ok_or_else(overflow)?
        }
    };
    let entry = parsed.entry.checked_add(bias).ok_or_else(overflow)?;
    Ok(LoadedElf {
        path: path.into(),
        bytes: data.clone(),
        bias,
        entry,
        phdr,
        phnum: parsed.phnum,
        end: hi + bias,
    })
}

/// Values of the auxiliary vector that come from the host.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// CPUID.1:EDX, what Linux reports as AT_HWCAP.
    pub hwcap: u64,
    /// Real user and group ids reported to the guest.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
    /// Minimum signal stack size.
    pub minsigstksz: u64,
}

impl HostFacts {
    /// Facts of the machine we run on.
    pub fn detect() -> HostFacts {
        let hwcap = u64::from(core::arch::x86_64::__cpuid(1).edx);
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        HostFacts {
            hwcap,
            uid: u64::from(uid),
            gid: u64::from(gid),
            minsigstksz: crate::signal::FRAME_RESERVE,
        }
    }
}

/// Load `exe` (an absolute guest path) and build its initial stack.
pub fn load(
    mm: &mut AddressSpace,
    fs: &FsContext,
    exe: &str,
    argv: &[String],
    envp: &[String],
    facts: &HostFacts,
) -> Result<LoadedProgram, LoadError> {
    let read = |p: &str| {
        fs.read_file(p, MAX_IMAGE_SIZE)
            .map_err(|errno| LoadError::Read {
                path: p.into(),
                errno,
            })
    };
    let exe_bytes: std::sync::Arc<[u8]> = read(exe)?.into();
    let parsed = parse(exe, &exe_bytes)?;
    let exe_img = map_image(
        mm,
        exe,
        exe_bytes.clone(),
        &parsed,
        parsed.is_dyn.then_some(layout::PIE_BASE),
    )?;
    let brk_start = (exe_img.end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    mm.init_brk(brk_start);
    let interp = match &parsed.interp {
        Some(ipath) => {
            let ibytes: std::sync::Arc<[u8]> = read(ipath)?.into();
            let iparsed = parse(ipath, &ibytes)?;
            if !iparsed.is_dyn || iparsed.interp.is_some() {
                return Err(format_err(
                    ipath,
                    "interpreter must be a position-independent ELF without PT_INTERP",
                ));
            }
            Some(map_image(mm, ipath, ibytes, &iparsed, None)?)
        }
        None => None,
    };
    let start_rip = interp.as_ref().map_or(exe_img.entry, |i| i.entry);
    let auxv_base = vec![
        (libc::AT_PHDR, exe_img.phdr),
        (
            libc::AT_PHENT,
            std::mem::size_of::<elf::ProgramHeader64<Endianness>>() as u64,
        ),
        (libc::AT_PHNUM, exe_img.phnum),
        (libc::AT_PAGESZ, PAGE_SIZE),
        (libc::AT_BASE, interp.as_ref().map_or(0, |i| i.bias)),
        (libc::AT_FLAGS, 0),
        (libc::AT_ENTRY, exe_img.entry),
        (libc::AT_UID, facts.uid),
        (libc::AT_EUID, facts.uid),
        (libc::AT_GID, facts.gid),
        (libc::AT_EGID, facts.gid),
        (libc::AT_SECURE, 0),
        (libc::AT_HWCAP, facts.hwcap),
        (libc::AT_HWCAP2, 0),
        (libc::AT_CLKTCK, 100),
        (libc::AT_MINSIGSTKSZ, facts.minsigstksz),
    ];
    let (start_rsp, auxv) =
        build_stack(mm, exe, argv, envp, auxv_base).map_err(|errno| LoadError::Map {
            path: exe.into(),
            errno,
        })?;
    Ok(LoadedProgram {
        exe: exe_img,
        interp,
        start_rip,
        start_rsp,
        auxv,
    })
}

/// Map the main stack and lay out argc, argv, envp, auxv and their strings at its top.
fn build_stack(
    mm: &mut AddressSpace,
    execfn: &str,
    argv: &[String],
    envp: &[String],
    mut auxv: Vec<(u64, u64)>,
) -> Result<(u64, Vec<(u64, u64)>), Errno> {
    mm.map(
        Placement::Fixed(layout::STACK_TOP - layout::STACK_MAX),
        layout::STACK_MAX,
        Prot::READ_WRITE,
        VmaKind::Stack,
        None,
    )?;
    let mut sp = layout::STACK_TOP;
    let mut push_bytes = |mm: &mut AddressSpace, bytes: &[u8]| -> Result<u64, Errno> {
        sp -= bytes.len() as u64;
        mm.write(sp, bytes)?;
        Ok(sp)
    };
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    // Strings first (highest addresses), then the vectors.
    let execfn_ptr = push_bytes(mm, &cstr(execfn))?;
    let mut env_ptrs = Vec::with_capacity(envp.len());
    for e in envp.iter().rev() {
        env_ptrs.push(push_bytes(mm, &cstr(e))?);
    }
    env_ptrs.reverse();
    let mut arg_ptrs = Vec::with_capacity(argv.len());
    for a in argv.iter().rev() {
        arg_ptrs.push(push_bytes(mm, &cstr(a))?);
    }
    arg_ptrs.reverse();
    let platform_ptr = push_bytes(mm, b"x86_64\0")?;
    let mut random = [0u8; 16];
    getrandom(&mut random);
    let random_ptr = push_bytes(mm, &random)?;
    auxv.push((libc::AT_RANDOM, random_ptr));
    auxv.push((libc::AT_PLATFORM, platform_ptr));
    auxv.push((libc::AT_EXECFN, execfn_ptr));
    auxv.push((libc::AT_NULL, 0));
    let words = 1 + arg_ptrs.len() + 1 + env_ptrs.len() + 1 + auxv.len() * 2;
    let mut table = Vec::with_capacity(words);
    table.push(arg_ptrs.len() as u64);
    table.extend(&arg_ptrs);
    table.push(0);
    table.extend(&env_ptrs);
    table.push(0);
    for (k, v) in &auxv {
        table.push(*k);
        table.push(*v);
    }
    let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_le_bytes()).collect();
    let rsp = (sp - bytes.len() as u64) & !15;
    mm.write(rsp, &bytes)?;
    Ok((rsp, auxv))
}

/// Fill `buf` from the host's random source (best effort: the values only seed the
/// guest's stack protector and pointer guard).
pub fn getrandom(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the remaining length into `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_executable() {
        assert!(matches!(
            parse("/x", b"not an elf"),
            Err(LoadError::Format { .. })
        ));
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        assert!(parse("/x", &hdr).is_err());
    }
}
