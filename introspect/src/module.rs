//! One loaded ELF image: load span, function symbols and `.eh_frame` index.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use gimli::UnwindSection;
use gimli::{BaseAddresses, CieOrFde, EhFrame, EhFrameHdr, EndianSlice, LittleEndian, Pointer};
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, Sym};
use object::{Endian, Endianness, Object, ObjectSection};

/// How far past a size-0 symbol an address may lie and still be attributed
/// to it when no `.eh_frame` entry says where the function ends.
const UNSIZED_SYMBOL_REACH: u64 = 64 * 1024;

/// How many preceding symbols (or FDEs) a lookup inspects for an enclosing
/// range. Nested/overlapping ranges are rare, and the bound keeps each lookup
/// O(log n) even on hostile symbol tables.
const OVERLAP_SCAN: usize = 16;

/// Errors from parsing an ELF image into a [`Module`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// The bytes are not a well-formed 64-bit ELF file.
    #[error("malformed or unsupported ELF file: {0}")]
    Parse(#[from] object::Error),
    /// The ELF file is for another architecture.
    #[error("unsupported ELF machine {0:#x} (only x86-64 is supported)")]
    UnsupportedMachine(u16),
    /// The ELF file is big-endian, which x86-64 never is.
    #[error("big-endian ELF files are not supported")]
    BigEndian,
    /// Nothing of the file would be mapped, so no address can belong to it.
    #[error("ELF file has no non-empty PT_LOAD segment")]
    NoLoadSegments,
    /// A segment's end or the biased span does not fit in 64 bits.
    #[error("load span {start:#x}+{len:#x} with bias {bias:#x} overflows the address space")]
    AddressOverflow {
        /// Lowest unbiased PT_LOAD address.
        start: u64,
        /// Length of the span (possibly saturated when the overflow is in the segment itself).
        len: u64,
        /// The load bias that was requested.
        bias: u64,
    },
}

/// A function symbol resolved for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolHit<'a> {
    /// Name of the module that contains the address.
    pub module: &'a str,
    /// Symbol name (not demangled).
    pub name: &'a str,
    /// Distance of the address from the symbol's start.
    pub offset: u64,
}

impl fmt::Display for SymbolHit<'_> {
    /// Formats as `name+0x1f`, or just `name` at offset 0.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.offset == 0 {
            f.write_str(self.name)
        } else {
            write!(f, "{}+{:#x}", self.name, self.offset)
        }
    }
}

/// Half-open PC range `[start, end)` of one `.eh_frame` FDE, biased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FunctionRange {
    /// First address covered.
    pub start: u64,
    /// One past the last address covered.
    pub end: u64,
}

impl FunctionRange {
    /// Whether `addr` lies in `[start, end)`.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// A function symbol; the name lives in `Module::names`.
#[derive(Debug, Clone)]
struct Symbol {
    /// Biased start address.
    addr: u64,
    size: u64,
    /// Lower sorts first among symbols at the same address (preferred alias).
    rank: u8,
    name: Range<usize>,
}

/// One FDE of the `.eh_frame` index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FdeEntry {
    /// Biased `[start, end)`.
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Offset of the FDE inside `.eh_frame`.
    pub(crate) offset: usize,
}

/// Where a section lives in the file and in guest memory.
#[derive(Debug, Clone)]
struct SectionRef {
    file: Range<usize>,
    /// Biased virtual address.
    addr: u64,
}

/// One loaded ELF image (executable, interpreter, or library) in guest
/// virtual memory.
///
/// All addresses taken and returned are guest virtual addresses, i.e. ELF
/// virtual addresses plus the load bias.
pub struct Module {
    name: String,
    path: Option<String>,
    /// The whole ELF file, kept so CFI can be parsed on demand.
    data: Arc<[u8]>,
    bias: u64,
    start: u64,
    end: u64,
    /// Sorted by (addr, rank, name), deduplicated.
    symbols: Vec<Symbol>,
    /// All symbol names back to back; one allocation instead of one per symbol.
    names: String,
    eh_frame: Option<SectionRef>,
    eh_frame_hdr: Option<SectionRef>,
    text_addr: Option<u64>,
    /// Sorted by (start, end).
    fdes: Vec<FdeEntry>,
}

impl fmt::Debug for Module {
    // Manual impl: the derived one would print the whole ELF file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("bias", &format_args!("{:#x}", self.bias))
            .field("range", &format_args!("{:#x}..{:#x}", self.start, self.end))
            .field("symbols", &self.symbols.len())
            .field("fdes", &self.fdes.len())
            .finish_non_exhaustive()
    }
}

impl Module {
    /// Parse an ELF file's bytes.
    ///
    /// `load_bias` is what the loader added to the ELF's virtual addresses
    /// (0 for `ET_EXEC`). It is applied modulo 2^64, so a library loaded below
    /// its link address can pass the two's complement of the difference.
    ///
    /// Malformed symbol tables or `.eh_frame` data do not fail the parse; the
    /// module then just knows fewer symbols or unwind entries.
    pub fn from_elf(
        name: impl Into<String>,
        bytes: &[u8],
        load_bias: u64,
    ) -> Result<Module, ModuleError> {
        let file = ElfFile64::<Endianness>::parse(bytes)?;
        let endian = file.endian();
        if !endian.is_little_endian() {
            return Err(ModuleError::BigEndian);
        }
        let machine = file.elf_header().e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(ModuleError::UnsupportedMachine(machine.0));
        }

        let (start, end) = load_span(&file, load_bias)?;
        let (symbols, names) = collect_symbols(&file, load_bias);
        let cfi = locate_cfi(&file, bytes, load_bias);

        let mut module = Module {
            name: name.into(),
            path: None,
            data: Arc::from(bytes),
            bias: load_bias,
            start,
            end,
            symbols,
            names,
            eh_frame: cfi.eh_frame,
            eh_frame_hdr: cfi.eh_frame_hdr,
            text_addr: cfi.text_addr,
            fdes: Vec::new(),
        };
        module.fdes = module.build_fde_index();
        Ok(module)
    }

    /// Attach the guest path the image was loaded from (for reports).
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Module {
        self.path = Some(path.into());
        self
    }

    /// The module's name as given to [`Module::from_elf`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest path, if one was attached with [`Module::with_path`].
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The load bias passed to [`Module::from_elf`].
    pub fn bias(&self) -> u64 {
        self.bias
    }

    /// Lowest biased address of the PT_LOAD span.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the highest biased address of the PT_LOAD span.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The raw ELF file.
    pub fn elf_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Whether `addr` is within the module's PT_LOAD span (biased).
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether the module's span intersects `[start, end)`.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }

    /// Number of distinct function symbols known (from `.symtab` and `.dynsym`).
    pub fn symbol_count(&self) -> usize {
        self.symbols.len()
    }

    /// The function symbol containing `addr`.
    ///
    /// A sized symbol must cover the address. A size-0 symbol (typical for
    /// hand-written assembly) is used only if the address falls in the same
    /// `.eh_frame` FDE as the symbol or, when no FDE covers the address,
    /// within 64 KiB of it.
    pub fn symbol_at(&self, addr: u64) -> Option<SymbolHit<'_>> {
        if !self.contains(addr) {
            return None;
        }
        let preceding = &self.symbols[..self.symbols.partition_point(|s| s.addr <= addr)];

        // Closest sized symbol covering addr; among aliases at the same
        // address, the backwards scan ends on the best-ranked one.
        let mut best: Option<&Symbol> = None;
        for sym in preceding.iter().rev().take(OVERLAP_SCAN) {
            if let Some(b) = best {
                if sym.addr != b.addr {
                    break;
                }
            }
            if sym.size > 0 && addr - sym.addr < sym.size {
                best = Some(sym);
            }
        }
        if let Some(sym) = best {
            return Some(self.hit(sym, addr));
        }

        // Fall back to a size-0 symbol at the nearest preceding address.
        let nearest = preceding.last()?.addr;
        let sym = preceding
            .iter()
            .rev()
            .take(OVERLAP_SCAN)
            .take_while(|s| s.addr == nearest)
            .filter(|s| s.size == 0)
            .last()?;
        let plausible = match self.fde_containing(addr) {
            Some(fde) => fde.start <= sym.addr,
            None => addr - sym.addr < UNSIZED_SYMBOL_REACH,
        };
        plausible.then(|| self.hit(sym, addr))
    }

    fn hit(&self, sym: &Symbol, addr: u64) -> SymbolHit<'_> {
        SymbolHit {
            module: &self.name,
            name: self.names.get(sym.name.clone()).unwrap_or(""),
            offset: addr - sym.addr,
        }
    }

    /// Biased address of a function symbol by name (`.symtab` or `.dynsym`).
    ///
    /// Linear in the number of symbols; meant for occasional lookups such as
    /// finding a hook point, not for hot paths.
    pub fn symbol_address(&self, name: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|s| self.names.get(s.name.clone()) == Some(name))
            .map(|s| s.addr)
    }

    /// `[start, end)` of each `.eh_frame` FDE (biased), sorted by start.
    ///
    /// Works on stripped binaries, where it approximates the function list.
    pub fn functions_from_eh_frame(&self) -> Vec<FunctionRange> {
        self.fdes
            .iter()
            .map(|f| FunctionRange {
                start: f.start,
                end: f.end,
            })
            .collect()
    }

    /// The `.eh_frame` index, sorted by (start, end).
    pub(crate) fn fde_index(&self) -> &[FdeEntry] {
        &self.fdes
    }

    /// Start addresses of the function symbols, sorted (aliases repeat).
    pub(crate) fn symbol_starts(&self) -> impl Iterator<Item = u64> + '_ {
        self.symbols.iter().map(|s| s.addr)
    }

    /// The FDE whose range contains `pc`.
    pub(crate) fn fde_containing(&self, pc: u64) -> Option<&FdeEntry> {
        let idx = self.fdes.partition_point(|f| f.start <= pc);
        self.fdes[..idx]
            .iter()
            .rev()
            .take(OVERLAP_SCAN)
            .find(|f| pc < f.end)
    }

    /// The `.eh_frame` section as a gimli reader, if the module has one.
    pub(crate) fn eh_frame(&self) -> Option<EhFrame<EndianSlice<'_, LittleEndian>>> {
        let sect = self.eh_frame.as_ref()?;
        let bytes = self.data.get(sect.file.clone())?;
        let mut eh = EhFrame::new(bytes, LittleEndian);
        eh.set_address_size(8);
        Some(eh)
    }

    /// Base addresses for `DW_EH_PE_*` relative pointers, all biased so that
    /// decoded PCs are guest addresses.
    ///
    /// Absolute (`DW_EH_PE_absptr`) FDE pointers are not biased; x86-64
    /// toolchains emit PC-relative ones for position-independent code, and
    /// absolute ones only appear in ET_EXEC images, whose bias is 0.
    pub(crate) fn bases(&self) -> BaseAddresses {
        let mut bases = BaseAddresses::default();
        if let Some(s) = &self.eh_frame {
            bases = bases.set_eh_frame(s.addr);
        }
        if let Some(s) = &self.eh_frame_hdr {
            bases = bases.set_eh_frame_hdr(s.addr);
        }
        if let Some(text) = self.text_addr {
            bases = bases.set_text(text);
        }
        bases
    }

    /// Index every FDE of `.eh_frame` by PC range.
    fn build_fde_index(&self) -> Vec<FdeEntry> {
        let Some(eh) = self.eh_frame() else {
            return Vec::new();
        };
        let bases = self.bases();
        let mut fdes = Vec::new();
        let mut entries = eh.entries(&bases);
        loop {
            match entries.next() {
                Ok(Some(CieOrFde::Fde(partial))) => {
                    // A bad FDE (e.g. pointing at a missing CIE) is skipped;
                    // the iterator has already moved past it.
                    let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
                        continue;
                    };
                    let start = fde.initial_address();
                    let Some(end) = start.checked_add(fde.len()) else {
                        continue;
                    };
                    if end > start {
                        fdes.push(FdeEntry {
                            start,
                            end,
                            offset: fde.offset(),
                        });
                    }
                }
                Ok(Some(CieOrFde::Cie(_))) => {}
                // A malformed entry length leaves no way to find the next
                // entry, so keep what was indexed so far.
                Ok(None) | Err(_) => break,
            }
        }
        fdes.sort_unstable_by_key(|f| (f.start, f.end));
        fdes
    }
}

/// Biased `[start, end)` covering all non-empty PT_LOAD segments.
fn load_span(file: &ElfFile64<'_, Endianness>, bias: u64) -> Result<(u64, u64), ModuleError> {
    let endian = file.endian();
    let mut lo = u64::MAX;
    let mut hi = 0u64;
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) != elf::PT_LOAD || ph.p_memsz(endian) == 0 {
            continue;
        }
        let vaddr = ph.p_vaddr(endian);
        let memsz = ph.p_memsz(endian);
        let end = vaddr
            .checked_add(memsz)
            .ok_or(ModuleError::AddressOverflow {
                start: vaddr,
                len: memsz,
                bias,
            })?;
        lo = lo.min(vaddr);
        hi = hi.max(end);
    }
    if lo >= hi {
        return Err(ModuleError::NoLoadSegments);
    }
    let start = lo.wrapping_add(bias);
    let end = start
        .checked_add(hi - lo)
        .ok_or(ModuleError::AddressOverflow {
            start: lo,
            len: hi - lo,
            bias,
        })?;
    Ok((start, end))
}

/// Function symbols from `.symtab` and `.dynsym`, sorted and deduplicated,
/// plus the string arena holding their names.
fn collect_symbols(file: &ElfFile64<'_, Endianness>, bias: u64) -> (Vec<Symbol>, String) {
    let endian = file.endian();
    let mut symbols = Vec::new();
    let mut names = String::new();
    for table in [file.elf_symbol_table(), file.elf_dynamic_symbol_table()] {
        for sym in table.iter() {
            let kind = sym.st_type();
            if kind != elf::STT_FUNC && kind != elf::STT_GNU_IFUNC {
                continue;
            }
            let value = sym.st_value(endian);
            if sym.st_shndx(endian) == elf::SHN_UNDEF || value == 0 {
                continue;
            }
            let Ok(raw) = table.symbol_name(endian, sym) else {
                continue;
            };
            if raw.is_empty() {
                continue;
            }
            let size = sym.st_size(endian);
            let bind = sym.st_bind();
            // Prefer sized, then global, then weak, then local aliases.
            let bind_rank = if bind == elf::STB_GLOBAL {
                0
            } else if bind == elf::STB_WEAK {
                1
            } else {
                2
            };
            let rank = if size > 0 { bind_rank } else { 3 + bind_rank };
            let begin = names.len();
            names.push_str(&String::from_utf8_lossy(raw));
            symbols.push(Symbol {
                addr: value.wrapping_add(bias),
                size,
                rank,
                name: begin..names.len(),
            });
        }
    }
    let name_of = |s: &Symbol| names.get(s.name.clone()).unwrap_or("");
    // The same symbol usually appears in both tables. Group copies together
    // with the best-ranked first, drop the rest, then order aliases at each
    // address by preference for `symbol_at`.
    symbols
        .sort_unstable_by(|a, b| (a.addr, name_of(a), a.rank).cmp(&(b.addr, name_of(b), b.rank)));
    symbols.dedup_by(|later, kept| later.addr == kept.addr && name_of(later) == name_of(kept));
    symbols
        .sort_unstable_by(|a, b| (a.addr, a.rank, name_of(a)).cmp(&(b.addr, b.rank, name_of(b))));
    symbols.shrink_to_fit();
    names.shrink_to_fit();
    (symbols, names)
}

/// Located CFI sections, biased.
struct CfiLocation {
    eh_frame: Option<SectionRef>,
    eh_frame_hdr: Option<SectionRef>,
    text_addr: Option<u64>,
}

/// Find `.eh_frame`, `.eh_frame_hdr` and `.text`.
///
/// Section headers are preferred; when they are missing (e.g. `sstrip`ped
/// binaries), `.eh_frame_hdr` comes from `PT_GNU_EH_FRAME` and `.eh_frame`
/// from the pointer in its header.
fn locate_cfi(file: &ElfFile64<'_, Endianness>, bytes: &[u8], bias: u64) -> CfiLocation {
    let section = |name: &str| -> Option<(Range<usize>, u64)> {
        let sect = file.section_by_name(name)?;
        let range = file_range(bytes, sect.file_range()?)?;
        Some((range, sect.address()))
    };
    let text_addr = file
        .section_by_name(".text")
        .map(|s| s.address().wrapping_add(bias));

    let endian = file.endian();
    let hdr = section(".eh_frame_hdr").or_else(|| {
        let ph = file
            .elf_program_headers()
            .iter()
            .find(|ph| ph.p_type(endian) == elf::PT_GNU_EH_FRAME)?;
        let range = file_range(bytes, (ph.p_offset(endian), ph.p_filesz(endian)))?;
        Some((range, ph.p_vaddr(endian)))
    });

    let eh_frame = section(".eh_frame").or_else(|| {
        let (hdr_range, hdr_addr) = hdr.clone()?;
        let hdr_bytes = bytes.get(hdr_range)?;
        let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_addr);
        let parsed = EhFrameHdr::new(hdr_bytes, LittleEndian)
            .parse(&bases, 8)
            .ok()?;
        let Pointer::Direct(addr) = parsed.eh_frame_ptr() else {
            return None;
        };
        // Without a section header the length is unknown: take the rest of
        // the containing segment; the CFI terminator or a parse error ends
        // iteration.
        file.elf_program_headers().iter().find_map(|ph| {
            if ph.p_type(endian) != elf::PT_LOAD {
                return None;
            }
            let delta = addr.checked_sub(ph.p_vaddr(endian))?;
            let len = ph.p_filesz(endian).checked_sub(delta).filter(|&l| l > 0)?;
            let offset = ph.p_offset(endian).checked_add(delta)?;
            Some((file_range(bytes, (offset, len))?, addr))
        })
    });

    let biased = |(file, addr): (Range<usize>, u64)| SectionRef {
        file,
        addr: addr.wrapping_add(bias),
    };
    CfiLocation {
        eh_frame: eh_frame.map(biased),
        eh_frame_hdr: hdr.map(biased),
        text_addr,
    }
}

/// Validate an (offset, size) pair from the ELF file against its length.
fn file_range(bytes: &[u8], (offset, size): (u64, u64)) -> Option<Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    (end <= bytes.len()).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_hit_display() {
        let hit = SymbolHit {
            module: "m",
            name: "beta",
            offset: 0x1f,
        };
        assert_eq!(hit.to_string(), "beta+0x1f");
        assert_eq!(SymbolHit { offset: 0, ..hit }.to_string(), "beta");
    }

    #[test]
    fn function_range_is_half_open() {
        let r = FunctionRange { start: 10, end: 20 };
        assert!(!r.contains(9));
        assert!(r.contains(10));
        assert!(r.contains(19));
        assert!(!r.contains(20));
    }

    #[test]
    fn file_range_rejects_out_of_bounds() {
        let bytes = [0u8; 16];
        assert_eq!(file_range(&bytes, (4, 12)), Some(4..16));
        assert_eq!(file_range(&bytes, (4, 13)), None);
        assert_eq!(file_range(&bytes, (u64::MAX, 2)), None);
        assert_eq!(file_range(&bytes, (1, u64::MAX)), None);
    }
}
