//! End-to-end tests against real binaries built with the host gcc.
//!
//! `fixtures/callchain.c` is compiled static (ET_EXEC, bias 0) and
//! static-pie (ET_DYN, loaded at a runtime base), plus stripped copies. The
//! program dumps its registers and stack from inside `gamma`; the tests replay
//! that dump through the unwinder.

use std::path::{Path, PathBuf};
use std::process::Command;

use introspect::{Frame, Module, ModuleError, Symbolizer, UnwindRegs, UnwindStop};

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/callchain.c");
const DUMP_MAGIC: u64 = 0x0050_4d55_4452_5449;

/// Which flavour of the fixture to build.
#[derive(Clone, Copy, Debug)]
enum Link {
    Static,
    StaticPie,
    /// A shared library exporting the fixture's functions via `.dynsym`.
    Shared,
}

/// A compiled fixture: the binary, its stripped copy, and their directory.
struct Fixture {
    _dir: tempfile::TempDir,
    exe: PathBuf,
    stripped: PathBuf,
}

impl Fixture {
    fn build(link: Link) -> Fixture {
        let dir = tempfile::tempdir().expect("create temp dir");
        let exe = dir.path().join("callchain");
        let stripped = dir.path().join("callchain.stripped");
        let link_flags: &[&str] = match link {
            Link::Static => &["-static", "-no-pie"],
            Link::StaticPie => &["-static-pie", "-fPIE"],
            Link::Shared => &["-shared", "-fPIC"],
        };
        let status = Command::new("gcc")
            .args(["-O1", "-g", "-fno-builtin", "-fasynchronous-unwind-tables"])
            .args(link_flags)
            .arg("-o")
            .arg(&exe)
            .arg(SOURCE)
            .status()
            .expect("run gcc (the tests need a host C compiler with static glibc)");
        assert!(status.success(), "gcc failed for {link:?}");
        let status = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&exe)
            .status()
            .expect("run strip");
        assert!(status.success(), "strip failed");
        Fixture {
            _dir: dir,
            exe,
            stripped,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.exe).expect("read fixture")
    }

    fn stripped_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.stripped).expect("read stripped fixture")
    }

    /// Run the fixture and parse the dump it writes.
    fn run(&self) -> Dump {
        let path = self.exe.with_extension("dump");
        let status = Command::new(&self.exe)
            .arg(&path)
            .status()
            .expect("run fixture");
        assert!(status.success(), "fixture exited with {status}");
        Dump::parse(&path)
    }
}

/// Registers and stack captured inside `gamma`.
struct Dump {
    regs: UnwindRegs,
    main_addr: u64,
    stack_base: u64,
    stack: Vec<u8>,
}

impl Dump {
    fn parse(path: &Path) -> Dump {
        let raw = std::fs::read(path).expect("read dump");
        let word = |i: usize| {
            let bytes = raw.get(i * 8..i * 8 + 8).expect("dump header truncated");
            u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
        };
        assert_eq!(word(0), DUMP_MAGIC, "bad dump magic");
        let stack_len = usize::try_from(word(11)).expect("stack length fits usize");
        let stack = raw.get(96..).expect("dump has stack bytes").to_vec();
        assert_eq!(stack.len(), stack_len, "stack copy truncated");
        Dump {
            regs: UnwindRegs {
                rip: word(1),
                rsp: word(2),
                rbp: word(3),
                rbx: word(4),
                r12: word(5),
                r13: word(6),
                r14: word(7),
                r15: word(8),
            },
            main_addr: word(9),
            stack_base: word(10),
            stack,
        }
    }

    /// Guest-memory reader backed by the stack copy only.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(offset) = addr.checked_sub(self.stack_base) else {
            return false;
        };
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match offset
            .checked_add(buf.len())
            .and_then(|end| self.stack.get(offset..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn symbol_names(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            let sym = f.symbol.as_deref().unwrap_or("??");
            sym.split('+').next().unwrap_or(sym).to_owned()
        })
        .collect()
}

fn load(bytes: &[u8], bias: u64) -> Module {
    Module::from_elf("callchain", bytes, bias).expect("fixture parses")
}

fn addr_of(module: &Module, name: &str) -> u64 {
    module
        .symbol_address(name)
        .unwrap_or_else(|| panic!("symbol {name} missing"))
}

#[test]
fn symbols_of_static_binary() {
    let fx = Fixture::build(Link::Static);
    let module = load(&fx.bytes(), 0);
    assert_eq!(module.name(), "callchain");

    let beta = addr_of(&module, "beta");
    assert!(module.contains(beta));
    assert!(
        module.symbol_count() > 100,
        "static glibc has many functions"
    );

    let hit = module.symbol_at(beta + 3).expect("beta+3 resolves");
    assert_eq!((hit.module, hit.name, hit.offset), ("callchain", "beta", 3));
    assert_eq!(hit.to_string(), "beta+0x3");
    assert_eq!(
        module.symbol_at(beta).map(|h| h.to_string()).as_deref(),
        Some("beta")
    );
    for name in ["alpha", "gamma", "main", "_start", "__libc_start_main"] {
        let addr = addr_of(&module, name);
        let hit = module.symbol_at(addr).expect("symbol resolves to itself");
        assert_eq!(hit.offset, 0, "{name}");
        // Aliases may share the address; the hit must be at it either way.
        assert_eq!(module.symbol_address(hit.name), Some(addr), "{name}");
    }
    assert!(module.symbol_address("no_such_function").is_none());
    assert!(module.symbol_at(module.start() - 1).is_none());
    assert!(module.symbol_at(module.end()).is_none());
    assert!(!module.contains(module.end()));
}

#[test]
fn size_zero_symbol_fallback_respects_fde_bounds() {
    let fx = Fixture::build(Link::Static);
    let module = load(&fx.bytes(), 0);
    let bare = addr_of(&module, "bare_asm");

    // Inside bare_asm's FDE: attributed to the unsized symbol.
    let hit = module.symbol_at(bare + 2).expect("inside bare_asm's FDE");
    assert_eq!(hit.to_string(), "bare_asm+0x2");

    // The following anonymous FDE starts after bare_asm: not attributed.
    let fdes = module.functions_from_eh_frame();
    let anon = fdes
        .iter()
        .find(|f| f.start == bare + 4)
        .expect("anonymous FDE right after bare_asm");
    assert!(module.symbol_at(anon.start + 1).is_none());
}

#[test]
fn stripped_binary_keeps_eh_frame_functions() {
    let fx = Fixture::build(Link::Static);
    let full = load(&fx.bytes(), 0);
    let stripped = load(&fx.stripped_bytes(), 0);
    let beta = addr_of(&full, "beta");

    assert_eq!(stripped.symbol_count(), 0);
    assert!(stripped.symbol_address("beta").is_none());
    assert!(stripped.symbol_at(beta + 3).is_none());

    let ranges = stripped.functions_from_eh_frame();
    assert!(
        ranges.windows(2).all(|w| w[0].start <= w[1].start),
        "sorted"
    );
    assert!(ranges.iter().all(|r| r.start < r.end));
    let beta_range = ranges
        .iter()
        .find(|r| r.start == beta)
        .expect("an FDE starts at beta");
    assert!(beta_range.contains(beta + 3));
    assert_eq!(ranges, full.functions_from_eh_frame());
}

/// Run the fixture, backtrace its dump and check the call chain.
/// Returns the dump, the runtime load bias and the frames.
fn check_backtrace(fx: &Fixture, expect_pie: bool) -> (Dump, u64, Vec<Frame>) {
    let dump = fx.run();
    let unbiased = load(&fx.bytes(), 0);
    let bias = dump.main_addr.wrapping_sub(addr_of(&unbiased, "main"));
    if expect_pie {
        assert_ne!(bias, 0, "static-pie should be loaded away from 0");
        assert_eq!(bias % 4096, 0, "load bias is page aligned");
        assert!(
            !unbiased.contains(dump.regs.rip),
            "unbiased module must not match"
        );
    } else {
        assert_eq!(bias, 0, "ET_EXEC runs at its link address");
    }

    let mut symbolizer = Symbolizer::default();
    symbolizer.add(load(&fx.bytes(), bias));
    let module = symbolizer
        .module_for(dump.regs.rip)
        .expect("rip is in the module");
    assert_eq!(module.bias(), bias);
    let gamma = module.symbol_address("gamma").expect("gamma");
    assert!(dump.regs.rip > gamma);

    let bt = symbolizer.backtrace_detailed(&dump.regs, &mut |a, b| dump.read(a, b), 64);
    let names = symbol_names(&bt.frames);
    assert_eq!(
        names.get(..4),
        Some(&["gamma", "beta", "alpha", "main"].map(String::from)[..]),
        "frames: {:?}",
        bt.frames
    );
    // glibc's _start marks the return address undefined: a clean end.
    assert_eq!(
        names.last().map(String::as_str),
        Some("_start"),
        "{names:?}"
    );
    assert_eq!(bt.stop, UnwindStop::EndOfStack);

    assert_eq!(bt.frames[0].pc, dump.regs.rip);
    assert!(bt
        .frames
        .iter()
        .all(|f| f.module.as_deref() == Some("callchain")));
    // Caller frames report the return address itself, which follows the
    // call, so their offsets are non-zero.
    assert!(bt.frames[1..]
        .iter()
        .all(|f| f.symbol.as_deref().is_some_and(|s| s.contains("+0x"))));

    // The plain API returns the same frames.
    let plain = symbolizer.backtrace(&dump.regs, &mut |a, b| dump.read(a, b), 64);
    assert_eq!(plain, bt.frames);
    (dump, bias, bt.frames)
}

#[test]
fn backtrace_static_exec() {
    let fx = Fixture::build(Link::Static);
    check_backtrace(&fx, false);
}

#[test]
fn backtrace_static_pie_with_bias() {
    let fx = Fixture::build(Link::StaticPie);
    check_backtrace(&fx, true);
}

#[test]
fn backtrace_of_stripped_binary_has_same_pcs() {
    let fx = Fixture::build(Link::StaticPie);
    let (dump, bias, frames) = check_backtrace(&fx, true);
    let mut symbolizer = Symbolizer::default();
    symbolizer.add(load(&fx.stripped_bytes(), bias));
    let stripped = symbolizer.backtrace(&dump.regs, &mut |a, b| dump.read(a, b), 64);
    let pcs = |f: &[Frame]| f.iter().map(|f| f.pc).collect::<Vec<_>>();
    assert_eq!(pcs(&stripped), pcs(&frames));
    assert!(stripped.iter().all(|f| f.symbol.is_none()));
    assert!(stripped
        .iter()
        .all(|f| f.module.as_deref() == Some("callchain")));
}

#[test]
fn backtrace_limits_and_stops() {
    let fx = Fixture::build(Link::Static);
    let dump = fx.run();
    let mut symbolizer = Symbolizer::default();
    symbolizer.add(load(&fx.bytes(), 0));
    let mut read = |a: u64, b: &mut [u8]| dump.read(a, b);

    assert!(symbolizer.backtrace(&dump.regs, &mut read, 0).is_empty());
    let bt = symbolizer.backtrace_detailed(&dump.regs, &mut read, 2);
    assert_eq!(bt.frames.len(), 2);
    assert_eq!(bt.stop, UnwindStop::FrameLimit);

    // PC outside every module: one frame, no symbol.
    let regs = UnwindRegs {
        rip: 0x10,
        ..dump.regs
    };
    let bt = symbolizer.backtrace_detailed(&regs, &mut read, 64);
    assert_eq!(bt.frames.len(), 1);
    assert_eq!(bt.frames[0].symbol, None);
    assert_eq!(bt.stop, UnwindStop::NoModule(0x10));

    // PC 0 ends immediately.
    let regs = UnwindRegs {
        rip: 0,
        ..dump.regs
    };
    let bt = symbolizer.backtrace_detailed(&regs, &mut read, 64);
    assert!(bt.frames.is_empty());
    assert_eq!(bt.stop, UnwindStop::ZeroPc);

    // Stack unreadable: the first frame is reported, then unwinding stops.
    let bt = symbolizer.backtrace_detailed(&dump.regs, &mut |_, _| false, 64);
    assert_eq!(bt.frames.len(), 1);
    assert!(
        matches!(bt.stop, UnwindStop::UnreadableMemory(_)),
        "{:?}",
        bt.stop
    );

    // An rbp below rsp inside beta's body gives a CFA below the stack
    // pointer, which must stop instead of walking backwards.
    let full = symbolizer.backtrace(&dump.regs, &mut read, 64);
    let in_beta = full[1].pc;
    let regs = UnwindRegs {
        rip: in_beta,
        rsp: 0x10_0000,
        rbp: 0x8000,
        ..dump.regs
    };
    let bt = symbolizer.backtrace_detailed(
        &regs,
        &mut |_, b| {
            b.fill(0x41);
            true
        },
        64,
    );
    assert_eq!(bt.frames.len(), 1);
    assert_eq!(bt.stop, UnwindStop::NoProgress);
}

#[test]
fn symbolizer_routes_addresses_to_modules() {
    let fx_static = Fixture::build(Link::Static);
    let fx_pie = Fixture::build(Link::StaticPie);
    let pie_bias = 0x7f12_3400_0000;

    let mut symbolizer = Symbolizer::new();
    symbolizer.add(load(&fx_static.bytes(), 0));
    symbolizer.add(Module::from_elf("pie", &fx_pie.bytes(), pie_bias).expect("pie parses"));
    assert_eq!(symbolizer.modules().len(), 2);

    let static_beta = addr_of(&symbolizer.modules()[0], "beta");
    let pie_beta = symbolizer
        .modules()
        .iter()
        .find(|m| m.name() == "pie")
        .and_then(|m| m.symbol_address("beta"))
        .expect("pie beta");
    assert!(pie_beta > pie_bias);

    let hit = symbolizer.symbolize(pie_beta + 5).expect("pie symbol");
    assert_eq!((hit.module, hit.name, hit.offset), ("pie", "beta", 5));
    let hit = symbolizer
        .symbolize(static_beta + 5)
        .expect("static symbol");
    assert_eq!((hit.module, hit.name), ("callchain", "beta"));
    assert!(symbolizer.symbolize(0x1000).is_none());
    assert_eq!(
        symbolizer.module_for(pie_beta).map(Module::name),
        Some("pie")
    );

    // munmap of the library.
    symbolizer.remove_containing(pie_beta);
    assert!(symbolizer.module_for(pie_beta).is_none());
    assert_eq!(symbolizer.modules().len(), 1);
    symbolizer.remove_containing(pie_beta); // already gone: no-op
    assert_eq!(symbolizer.modules().len(), 1);

    // A new image mapped over an old one replaces it.
    let replacement = Module::from_elf("replacement", &fx_static.bytes(), 0)
        .expect("parses")
        .with_path("/bin/replacement");
    symbolizer.add(replacement);
    assert_eq!(symbolizer.modules().len(), 1);
    let module = symbolizer.module_for(static_beta).expect("replacement");
    assert_eq!(module.name(), "replacement");
    assert_eq!(module.path(), Some("/bin/replacement"));
}

#[test]
fn garbage_is_an_error() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut random = vec![0u8; 4096];
    rng.fill(&mut random);
    let mut elf_magic = random.clone();
    elf_magic[..4].copy_from_slice(b"\x7fELF");
    for bytes in [&[][..], b"\x7fELF", &random, &elf_magic] {
        assert!(Module::from_elf("junk", bytes, 0).is_err());
    }

    // A real but 32-bit or non-x86 header is rejected with a clear error.
    let fx = Fixture::build(Link::Static);
    let mut bytes = fx.bytes();
    bytes[18] = 0xb7; // e_machine = EM_AARCH64
    bytes[19] = 0;
    assert!(matches!(
        Module::from_elf("arm", &bytes, 0),
        Err(ModuleError::UnsupportedMachine(0xb7))
    ));
}

/// Exercise every query on a module that parsed from damaged input.
fn poke(module: &Module) {
    let start = module.start();
    let _ = module.symbol_at(start);
    let _ = module.symbol_at(start.wrapping_add(0x1234));
    let _ = module.symbol_address("main");
    let ranges = module.functions_from_eh_frame();
    let mut symbolizer = Symbolizer::default();
    symbolizer.add(Module::from_elf("again", module.elf_bytes(), module.bias()).expect("reparse"));
    let mut rng = XorShift(7);
    for range in ranges.iter().take(50) {
        let regs = UnwindRegs {
            rip: range.start,
            rsp: 0x7fff_0000_0000,
            ..UnwindRegs::default()
        };
        let bt = symbolizer.backtrace(
            &regs,
            &mut |_, b| {
                rng.fill(b);
                true
            },
            32,
        );
        assert!(bt.len() <= 32);
    }
}

#[test]
fn truncated_elf_never_panics() {
    let fx = Fixture::build(Link::Static);
    let bytes = fx.bytes();
    let mut cut = 0;
    while cut < bytes.len() {
        if let Ok(module) = Module::from_elf("cut", &bytes[..cut], 0) {
            let _ = module.symbol_at(module.start());
            let _ = module.functions_from_eh_frame();
        }
        cut += if cut < 256 { 1 } else { 4093 };
    }
}

#[test]
fn corrupted_elf_never_panics() {
    for link in [Link::Static, Link::StaticPie] {
        let fx = Fixture::build(link);
        let original = fx.bytes();
        let file = object::File::parse(&*original).expect("fixture parses with object");
        use object::{Object, ObjectSection};
        let mut regions: Vec<(usize, usize)> = vec![(0, 64), (64, 64 + 13 * 56)];
        for name in [
            ".eh_frame",
            ".eh_frame_hdr",
            ".symtab",
            ".strtab",
            ".dynsym",
        ] {
            if let Some((off, len)) = file.section_by_name(name).and_then(|s| s.file_range()) {
                regions.push((off as usize, (off + len) as usize));
            }
        }
        // Section header table.
        let shoff = u64::from_le_bytes(original[40..48].try_into().expect("8 bytes")) as usize;
        regions.push((shoff, original.len()));

        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        for (lo, hi) in regions {
            let hi = hi.min(original.len());
            for round in 0..40 {
                let mut bytes = original.clone();
                // Mostly sparse corruption, sometimes a whole scrambled block.
                if round % 10 == 0 {
                    rng.fill(&mut bytes[lo..hi]);
                } else {
                    for _ in 0..8 {
                        let at = lo + (rng.next() as usize) % (hi - lo).max(1);
                        if let Some(b) = bytes.get_mut(at) {
                            *b = rng.next() as u8;
                        }
                    }
                }
                if let Ok(module) = Module::from_elf("corrupt", &bytes, 0x5555_0000_0000) {
                    poke(&module);
                }
            }
        }
    }
}

#[test]
fn scrambled_eh_frame_still_terminates() {
    let fx = Fixture::build(Link::Static);
    let dump = fx.run();
    let mut bytes = fx.bytes();
    let (off, len) = {
        use object::{Object, ObjectSection};
        let file = object::File::parse(&*bytes).expect("parse");
        file.section_by_name(".eh_frame")
            .and_then(|s| s.file_range())
            .expect(".eh_frame present")
    };
    let (off, len) = (off as usize, len as usize);
    // Keep the first CIE intact so FDE parsing gets past it, then scramble.
    XorShift(99).fill(&mut bytes[off + 64..off + len]);
    let module = Module::from_elf("scrambled", &bytes, 0).expect("headers intact");
    let mut symbolizer = Symbolizer::default();
    symbolizer.add(module);
    let frames = symbolizer.backtrace(&dump.regs, &mut |a, b| dump.read(a, b), 1000);
    assert!(frames.len() <= 1000);
}

#[test]
fn garbage_stack_memory_terminates() {
    let fx = Fixture::build(Link::Static);
    let module = load(&fx.bytes(), 0);
    let gamma = addr_of(&module, "gamma");
    let alpha = addr_of(&module, "alpha");
    let mut symbolizer = Symbolizer::default();
    symbolizer.add(module);

    // Random memory everywhere.
    let mut rng = XorShift(42);
    let regs = UnwindRegs {
        rip: gamma,
        rsp: 0x7ffd_0000_0000,
        rbp: 0x7ffd_0000_0100,
        ..UnwindRegs::default()
    };
    for _ in 0..200 {
        let bt = symbolizer.backtrace(
            &regs,
            &mut |_, b| {
                rng.fill(b);
                true
            },
            10_000,
        );
        assert!(!bt.is_empty() && bt.len() <= 10_000);
    }

    // A stack full of one valid return address: every frame unwinds
    // "successfully", so only the frame limit or the end of the readable
    // region can stop it.
    // Any address inside alpha's body works: the CFI there is CFA = rsp+16.
    let inside_alpha = alpha + 8;
    let base = 0x7ffd_0000_0000u64;
    let stack_len = 64 * 1024;
    let regs = UnwindRegs {
        rip: gamma,
        rsp: base,
        ..UnwindRegs::default()
    };
    let mut read = |addr: u64, buf: &mut [u8]| {
        if addr < base || addr.saturating_add(buf.len() as u64) > base + stack_len {
            return false;
        }
        let word = inside_alpha.to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = word[(addr as usize + i) % 8];
        }
        true
    };
    let bt = symbolizer.backtrace_detailed(&regs, &mut read, 100_000);
    assert!(bt.frames.len() <= 100_000);
    assert!(
        matches!(
            bt.stop,
            UnwindStop::UnreadableMemory(_) | UnwindStop::FrameLimit | UnwindStop::NoUnwindInfo(_)
        ),
        "{:?}",
        bt.stop
    );
    let bt = symbolizer.backtrace_detailed(&regs, &mut read, 100);
    assert_eq!(bt.frames.len(), 100);
    assert_eq!(bt.stop, UnwindStop::FrameLimit);
}

#[test]
fn return_address_past_function_end_uses_call_site() {
    let fx = Fixture::build(Link::Static);
    let module = load(&fx.bytes(), 0);
    let gamma = addr_of(&module, "gamma");
    let caller = addr_of(&module, "ends_in_call");
    let fde = module
        .functions_from_eh_frame()
        .into_iter()
        .find(|f| f.start == caller)
        .expect("FDE for ends_in_call");
    // The call to the noreturn `fatal` is the last instruction, so its
    // return address is the FDE's end, outside the function.
    let ret = fde.end;
    assert!(module
        .symbol_at(ret)
        .is_none_or(|h| h.name != "ends_in_call"));

    let mut symbolizer = Symbolizer::default();
    symbolizer.add(module);
    // gamma at entry: CFA = rsp + 8 and the return address is at rsp. The
    // caller's return slot (and everything else) reads as 0.
    let rsp = 0x7ffd_0000_1000u64;
    let regs = UnwindRegs {
        rip: gamma,
        rsp,
        ..UnwindRegs::default()
    };
    let bt = symbolizer.backtrace_detailed(
        &regs,
        &mut |addr, buf| {
            buf.fill(0);
            if addr == rsp {
                buf.copy_from_slice(&ret.to_le_bytes()[..buf.len()]);
            }
            true
        },
        16,
    );
    assert_eq!(bt.frames.len(), 2, "{:?}", bt.frames);
    assert_eq!(bt.frames[1].pc, ret);
    let symbol = bt.frames[1].symbol.as_deref().unwrap_or("");
    assert_eq!(symbol, format!("ends_in_call+{:#x}", ret - caller));
    assert_eq!(bt.stop, UnwindStop::ZeroPc);
}

#[test]
fn shared_library_symbols_survive_strip_via_dynsym() {
    use object::read::elf::{ElfFile64, Sym};
    use object::{elf, Endianness};

    let fx = Fixture::build(Link::Shared);
    let bytes = fx.bytes();
    let bias = 0x7f3c_2a10_0000u64;
    let module = load(&bytes, bias);

    // Expected: distinct (address, name) function symbols over both tables,
    // computed independently with `object`.
    let file = ElfFile64::<Endianness>::parse(&*bytes).expect("parse");
    let endian = file.endian();
    let mut expected = std::collections::BTreeSet::new();
    let mut dynsym_has_beta = false;
    for (is_dyn, table) in [
        (false, file.elf_symbol_table()),
        (true, file.elf_dynamic_symbol_table()),
    ] {
        for sym in table.iter() {
            let is_func = sym.st_type() == elf::STT_FUNC || sym.st_type() == elf::STT_GNU_IFUNC;
            let name = table.symbol_name(endian, sym).expect("name");
            if !is_func || sym.st_shndx(endian) == elf::SHN_UNDEF || sym.st_value(endian) == 0 {
                continue;
            }
            dynsym_has_beta |= is_dyn && name == b"beta";
            expected.insert((sym.st_value(endian) + bias, name.to_vec()));
        }
    }
    assert!(dynsym_has_beta, "beta is exported");
    assert_eq!(module.symbol_count(), expected.len(), "deduplicated");

    let beta = addr_of(&module, "beta");
    assert!(expected.contains(&(beta, b"beta".to_vec())));
    assert_eq!(
        module.symbol_at(beta + 4).map(|h| h.to_string()).as_deref(),
        Some("beta+0x4")
    );

    // `strip` drops .symtab but exported functions remain in .dynsym.
    let stripped = load(&fx.stripped_bytes(), bias);
    assert_eq!(stripped.symbol_address("beta"), Some(beta));
    assert!(stripped.symbol_count() < module.symbol_count());
    assert!(stripped
        .functions_from_eh_frame()
        .iter()
        .any(|f| f.start == beta));
}
