//! Paths of the guest programs built by build.rs.
//!
//! The C sources in `c/` are compiled into cargo's `OUT_DIR`, so the paths
//! are fixed at compile time and valid for the build profile that compiled
//! this crate.
//!
//! | name | what it is |
//! |------|------------|
//! | `bugsrv` | event-driven HTTP/1.1 server with reachable crash bugs |
//! | `hostile` | probes the syscall layer with invalid arguments and path escapes |
//! | `sysbench` | syscall, trap and TCP echo micro-benchmarks |
//! | `abi` | process-semantics checks (memory, fork, signals) |
//! | `dirtier` | writes PAGES pages per round forever (bench/checkpoint) |
//! | `spinner` | threads keeping memory and registers in step (checkpoint consistency) |
//! | `filer` | unlinks and writes files on command from stdin (rollback of file operations) |
//! | `asker` | a line server that asks a backend inside its request function (output commit) |
//!
//! Each is a static x86-64 executable with symbols; `NAME.stripped` is the
//! same program without a symbol table, and `sysbench.dyn` is sysbench
//! linked dynamically against the host glibc.

use std::path::PathBuf;

/// Directory that holds every built program.
pub const OUT_DIR: &str = env!("OUT_DIR");

/// Static HTTP server, with symbols.
pub const BUGSRV: &str = concat!(env!("OUT_DIR"), "/bugsrv");
/// Static HTTP server, without a symbol table.
pub const BUGSRV_STRIPPED: &str = concat!(env!("OUT_DIR"), "/bugsrv.stripped");
/// Static syscall-layer prober, with symbols.
pub const HOSTILE: &str = concat!(env!("OUT_DIR"), "/hostile");
/// Static syscall-layer prober, without a symbol table.
pub const HOSTILE_STRIPPED: &str = concat!(env!("OUT_DIR"), "/hostile.stripped");
/// Static micro-benchmarks, with symbols.
pub const SYSBENCH: &str = concat!(env!("OUT_DIR"), "/sysbench");
/// Static micro-benchmarks, without a symbol table.
pub const SYSBENCH_STRIPPED: &str = concat!(env!("OUT_DIR"), "/sysbench.stripped");
/// Dynamically linked micro-benchmarks, with symbols.
pub const SYSBENCH_DYN: &str = concat!(env!("OUT_DIR"), "/sysbench.dyn");

/// Process-semantics checks (memory, fork, signals), with symbols.
pub const ABI: &str = concat!(env!("OUT_DIR"), "/abi");

/// Writes a fixed number of pages per round, forever (`dirtier PAGES [SLEEP_US]`), with
/// symbols.
pub const DIRTIER: &str = concat!(env!("OUT_DIR"), "/dirtier");
/// [`DIRTIER`] without a symbol table.
pub const DIRTIER_STRIPPED: &str = concat!(env!("OUT_DIR"), "/dirtier.stripped");
/// Threads that keep memory, a general register and an SSE register in step, and report
/// any disagreement (`spinner [THREADS]`).
pub const SPINNER: &str = concat!(env!("OUT_DIR"), "/spinner");
/// [`SPINNER`] without a symbol table.
pub const SPINNER_STRIPPED: &str = concat!(env!("OUT_DIR"), "/spinner.stripped");
/// File operations on command from stdin (`rm PATH`, `write PATH TEXT`).
pub const FILER: &str = concat!(env!("OUT_DIR"), "/filer");
/// [`FILER`] without a symbol table.
pub const FILER_STRIPPED: &str = concat!(env!("OUT_DIR"), "/filer.stripped");
/// A line server that waits for a backend inside its rescue point.
pub const ASKER: &str = concat!(env!("OUT_DIR"), "/asker");
/// [`ASKER`] without a symbol table.
pub const ASKER_STRIPPED: &str = concat!(env!("OUT_DIR"), "/asker.stripped");

/// Every program, as `(name, absolute path)`.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("bugsrv", BUGSRV),
    ("bugsrv.stripped", BUGSRV_STRIPPED),
    ("hostile", HOSTILE),
    ("hostile.stripped", HOSTILE_STRIPPED),
    ("sysbench", SYSBENCH),
    ("sysbench.stripped", SYSBENCH_STRIPPED),
    ("sysbench.dyn", SYSBENCH_DYN),
    ("abi", ABI),
    ("dirtier", DIRTIER),
    ("dirtier.stripped", DIRTIER_STRIPPED),
    ("spinner", SPINNER),
    ("spinner.stripped", SPINNER_STRIPPED),
    ("filer", FILER),
    ("filer.stripped", FILER_STRIPPED),
    ("asker", ASKER),
    ("asker.stripped", ASKER_STRIPPED),
];

/// The process-semantics checker.
pub fn abi() -> PathBuf {
    PathBuf::from(ABI)
}

/// Absolute path of the program called `name`, or `None` for an unknown name.
pub fn path(name: &str) -> Option<PathBuf> {
    PROGRAMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| PathBuf::from(p))
}

/// Names of all programs, in a stable order.
pub fn names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(n, _)| *n)
}

/// The page writer of bench/checkpoint, with symbols.
pub fn dirtier() -> PathBuf {
    PathBuf::from(DIRTIER)
}

/// Path of [`SPINNER`].
pub fn spinner() -> PathBuf {
    PathBuf::from(SPINNER)
}

/// Path of [`FILER`].
pub fn filer() -> PathBuf {
    PathBuf::from(FILER)
}

/// Path of [`ASKER`].
pub fn asker() -> PathBuf {
    PathBuf::from(ASKER)
}

/// Static HTTP server with real bug classes, with symbols.
pub fn bugsrv() -> PathBuf {
    PathBuf::from(BUGSRV)
}

/// [`bugsrv`] without a symbol table.
pub fn bugsrv_stripped() -> PathBuf {
    PathBuf::from(BUGSRV_STRIPPED)
}

/// Static syscall-layer prober, with symbols.
pub fn hostile() -> PathBuf {
    PathBuf::from(HOSTILE)
}

/// [`hostile`] without a symbol table.
pub fn hostile_stripped() -> PathBuf {
    PathBuf::from(HOSTILE_STRIPPED)
}

/// Static micro-benchmarks, with symbols.
pub fn sysbench() -> PathBuf {
    PathBuf::from(SYSBENCH)
}

/// [`sysbench`] without a symbol table.
pub fn sysbench_stripped() -> PathBuf {
    PathBuf::from(SYSBENCH_STRIPPED)
}

/// [`sysbench`] linked dynamically.
pub fn sysbench_dyn() -> PathBuf {
    PathBuf::from(SYSBENCH_DYN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn read_elf(path: &str) -> Vec<u8> {
        fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Whether the ELF file has a section of type SHT_SYMTAB.
    fn has_symtab(elf: &[u8]) -> bool {
        let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&elf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let shoff = usize::try_from(u64_at(0x28)).expect("section header offset");
        let shentsize = usize::from(u16_at(0x3a));
        let shnum = usize::from(u16_at(0x3c));
        (0..shnum).any(|i| u32_at(shoff + i * shentsize + 4) == 2)
    }

    /// Whether the ELF file has a PT_INTERP program header.
    fn has_interp(elf: &[u8]) -> bool {
        let phoff = usize::try_from(u64::from_le_bytes(
            elf[0x20..0x28].try_into().expect("8 bytes"),
        ))
        .expect("program header offset");
        let phentsize = usize::from(u16::from_le_bytes([elf[0x36], elf[0x37]]));
        let phnum = usize::from(u16::from_le_bytes([elf[0x38], elf[0x39]]));
        (0..phnum).any(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes")) == 3
        })
    }

    #[test]
    fn every_program_is_an_x86_64_elf() {
        for (name, path) in PROGRAMS {
            let elf = read_elf(path);
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(elf[4], 2, "{name}: not ELF64");
            assert_eq!(
                u16::from_le_bytes([elf[0x12], elf[0x13]]),
                62,
                "{name}: not x86-64"
            );
        }
    }

    #[test]
    fn stripped_variants_have_no_symtab() {
        for (name, path) in PROGRAMS {
            let elf = read_elf(path);
            assert_eq!(has_symtab(&elf), !name.ends_with(".stripped"), "{name}");
        }
    }

    #[test]
    fn only_dyn_variant_is_dynamic() {
        for (name, path) in PROGRAMS {
            assert_eq!(
                has_interp(&read_elf(path)),
                name.ends_with(".dyn"),
                "{name}"
            );
        }
    }

    #[test]
    fn path_lookup() {
        assert_eq!(path("bugsrv"), Some(bugsrv()));
        assert_eq!(path("sysbench.dyn"), Some(sysbench_dyn()));
        assert_eq!(path("nope"), None);
        assert!(names().all(|n| path(n).is_some_and(|p| p.is_absolute())));
    }
}
