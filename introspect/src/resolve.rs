//! Finding a function's entry point in a loaded module.
//!
//! Rescue points and fault injections name a function as a symbol
//! (`memcpy`, `libc.so.6!memcpy`, `memcpy@@GLIBC_2.14`) or as an offset from
//! the module's load bias (`lighttpd+0x1234`, `+0x1234` for the executable),
//! the form `assure-vmm functions` prints. [`parse_function_spec`] parses
//! the text and [`Module::resolve_function`] turns a spec into a guest
//! address.

use std::fmt;

use object::elf;
use object::read::elf::{ElfFile64, Sym};
use object::{Endianness, SymbolIndex};

use crate::module::Module;

/// How a function is named inside one module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FunctionSpec {
    /// A function symbol from `.symtab` or `.dynsym`, optionally with a
    /// symbol version (`name@VER` or `name@@VER`).
    Symbol(String),
    /// An offset from the module's load bias, i.e. the function's ELF
    /// virtual address (`binary+0x1234` as `assure-vmm functions` prints).
    /// It must be the start of an `.eh_frame` FDE or of a function symbol.
    Offset(u64),
}

impl fmt::Display for FunctionSpec {
    /// `name` or `+0x1234`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FunctionSpec::Symbol(s) => f.write_str(s),
            FunctionSpec::Offset(o) => write!(f, "+{o:#x}"),
        }
    }
}

/// A function found in a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFunction {
    /// Guest virtual address of the first instruction.
    pub entry: u64,
    /// One past the last byte (guest address), from the symbol size or the
    /// `.eh_frame` FDE, if known.
    pub end: Option<u64>,
    /// The symbol as requested or found at the entry, else `module+0xoff`.
    pub name: String,
    /// The module's name.
    pub module: String,
}

/// Errors from parsing or resolving a function spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The text is not one of the accepted forms.
    #[error(
        "bad function `{spec}`: {reason} (expected SYMBOL, MODULE!SYMBOL, MODULE+0xHEX or +0xHEX)"
    )]
    BadSpec {
        /// The text given.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No function symbol of that name (and version) exists.
    #[error("no function symbol `{symbol}` in {module}")]
    NoSuchSymbol {
        /// Module searched.
        module: String,
        /// Symbol requested.
        symbol: String,
    },
    /// Several unrelated functions have that name (e.g. `static` functions
    /// of different source files).
    #[error("function symbol `{symbol}` is ambiguous in {module}: defined at {candidates}; name one as {module}+0xOFFSET")]
    Ambiguous {
        /// Module searched.
        module: String,
        /// Symbol requested.
        symbol: String,
        /// The definitions, as `module+0xoff` separated by commas.
        candidates: String,
    },
    /// The symbol is a GNU indirect function: its address is the resolver
    /// that picks an implementation at load time, not the function itself.
    #[error("`{symbol}` in {module} is an IFUNC (its address is the resolver, not the function); name the implementation the process uses instead")]
    Ifunc {
        /// Module searched.
        module: String,
        /// Symbol requested.
        symbol: String,
    },
    /// The offset lies outside the module's loaded span.
    #[error("{module}+{offset:#x} is outside the module (it spans +{lo:#x}..+{hi:#x})")]
    OutsideModule {
        /// Module searched.
        module: String,
        /// Offset requested.
        offset: u64,
        /// Lowest offset of the PT_LOAD span.
        lo: u64,
        /// One past the highest offset of the span.
        hi: u64,
    },
    /// The offset is not where a function starts.
    #[error("{module}+{offset:#x} is not the start of a function; {hint}")]
    NotFunctionStart {
        /// Module searched.
        module: String,
        /// Offset requested.
        offset: u64,
        /// Offset of the nearest function start below, if any.
        before: Option<u64>,
        /// Offset of the nearest function start above, if any.
        after: Option<u64>,
        /// The nearest starts in words (or why there are none).
        hint: String,
    },
}

/// Parse `SYMBOL`, `MODULE!SYMBOL`, `MODULE+0xHEX` or `+0xHEX`.
///
/// Returns the module name, if one is given (`None` means the executable for
/// offsets and is up to the caller for symbols), and the spec. Module names
/// are file names such as `libc.so.6` or `lighttpd` (see
/// [`Module::matches_name`]); they may contain `+` (`libstdc++.so.6+0x10`).
pub fn parse_function_spec(text: &str) -> Result<(Option<String>, FunctionSpec), ResolveError> {
    let spec = text.trim();
    let bad = |reason| ResolveError::BadSpec {
        spec: text.to_string(),
        reason,
    };
    if spec.is_empty() {
        return Err(bad("empty"));
    }
    if spec.chars().any(char::is_whitespace) {
        return Err(bad("contains whitespace"));
    }
    if let Some((module, symbol)) = spec.split_once('!') {
        if module.is_empty() {
            return Err(bad("empty module name before `!`"));
        }
        return Ok((Some(module.to_string()), symbol_spec(symbol).map_err(bad)?));
    }
    if let Some(hex) = spec.strip_prefix('+') {
        return Ok((None, FunctionSpec::Offset(parse_hex(hex).map_err(bad)?)));
    }
    if let Some((module, hex)) = spec.rsplit_once('+') {
        if module.is_empty() {
            return Err(bad("empty module name before `+`"));
        }
        let offset = parse_hex(hex).map_err(bad)?;
        return Ok((Some(module.to_string()), FunctionSpec::Offset(offset)));
    }
    Ok((None, symbol_spec(spec).map_err(bad)?))
}

fn symbol_spec(symbol: &str) -> Result<FunctionSpec, &'static str> {
    if symbol.is_empty() {
        return Err("empty symbol name");
    }
    if symbol.contains(['!', '+']) {
        return Err("a symbol name cannot contain `!` or `+` (SYMBOL+OFFSET is not supported)");
    }
    if symbol.starts_with('@') || symbol.ends_with('@') {
        return Err("misplaced `@` (versions are written name@VER or name@@VER)");
    }
    Ok(FunctionSpec::Symbol(symbol.to_string()))
}

fn parse_hex(text: &str) -> Result<u64, &'static str> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .ok_or("an offset must be hexadecimal with a 0x prefix")?;
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("bad hexadecimal offset");
    }
    u64::from_str_radix(digits, 16).map_err(|_| "offset does not fit in 64 bits")
}

/// Split `name@VER` / `name@@VER` into (name, version, is default version).
fn split_version(name: &str) -> (&str, Option<(&str, bool)>) {
    match name.split_once('@') {
        None => (name, None),
        Some((bare, rest)) => match rest.strip_prefix('@') {
            Some(ver) => (bare, Some((ver, true))),
            None => (bare, Some((rest, false))),
        },
    }
}

/// One definition of a function symbol, read from the ELF file.
#[derive(Debug)]
struct Definition {
    /// Biased address.
    addr: u64,
    size: u64,
    local: bool,
    /// Symbol version and whether it is the default (`@@`) one.
    version: Option<(String, bool)>,
    ifunc: bool,
}

impl Definition {
    /// 2: explicit default version, 1: unversioned, 0: non-default version.
    fn default_rank(&self) -> u8 {
        match self.version {
            Some((_, true)) => 2,
            None => 1,
            Some((_, false)) => 0,
        }
    }
}

impl Module {
    /// Whether `name` names this module: equal to the module's name or to
    /// the last component of its name or path (`libc.so.6` matches
    /// `/usr/lib/x86_64-linux-gnu/libc.so.6`). A name containing `/` must
    /// equal the whole name or path.
    pub fn matches_name(&self, name: &str) -> bool {
        if name.is_empty() {
            return false;
        }
        let last = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
        [Some(self.name()), self.path()]
            .into_iter()
            .flatten()
            .any(|mine| mine == name || (!name.contains('/') && last(mine) == name))
    }

    /// Find the entry point of a function of this module.
    ///
    /// A symbol is looked up in `.symtab` and `.dynsym`; a bare name also
    /// matches versioned definitions (`memcpy` matches `memcpy@@GLIBC_2.14`),
    /// preferring global over local and default over older versions. An
    /// offset must be where an `.eh_frame` FDE or a function symbol starts;
    /// otherwise the error names the nearest function starts.
    pub fn resolve_function(&self, spec: &FunctionSpec) -> Result<ResolvedFunction, ResolveError> {
        match spec {
            FunctionSpec::Symbol(symbol) => self.resolve_symbol(symbol),
            FunctionSpec::Offset(offset) => self.resolve_offset(*offset),
        }
    }

    fn resolve_symbol(&self, symbol: &str) -> Result<ResolvedFunction, ResolveError> {
        let (bare, wanted) = split_version(symbol);
        let mut defs = self.definitions(bare);
        if let Some((ver, _)) = wanted {
            // `@` and `@@` both select the version; the default flag is not
            // part of the identity.
            defs.retain(|d| d.version.as_ref().is_some_and(|(v, _)| v == ver));
            let addrs: Vec<u64> = defs.iter().map(|d| d.addr).collect();
            let mut all = self.definitions(bare);
            all.retain(|d| addrs.contains(&d.addr));
            defs = all;
        }
        let no_such = || ResolveError::NoSuchSymbol {
            module: self.name().to_string(),
            symbol: symbol.to_string(),
        };
        if defs.is_empty() {
            return Err(no_such());
        }

        // Narrow to one address: global before local, then by version.
        let distinct = |defs: &[Definition]| {
            let mut a: Vec<u64> = defs.iter().map(|d| d.addr).collect();
            a.sort_unstable();
            a.dedup();
            a
        };
        let mut addrs = distinct(&defs);
        if addrs.len() > 1 {
            let global: Vec<u64> = addrs
                .iter()
                .copied()
                .filter(|&a| defs.iter().any(|d| d.addr == a && !d.local))
                .collect();
            if !global.is_empty() {
                addrs = global;
            }
        }
        if addrs.len() > 1 {
            let rank = |a: u64| {
                defs.iter()
                    .filter(|d| d.addr == a)
                    .map(Definition::default_rank)
                    .max()
                    .unwrap_or(0)
            };
            let best = addrs.iter().map(|&a| rank(a)).max().unwrap_or(0);
            addrs.retain(|&a| rank(a) == best);
        }
        let entry = match addrs.as_slice() {
            [one] => *one,
            [] => return Err(no_such()),
            many => {
                let candidates = many
                    .iter()
                    .map(|a| format!("{}+{:#x}", self.name(), a.wrapping_sub(self.bias())))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ResolveError::Ambiguous {
                    module: self.name().to_string(),
                    symbol: symbol.to_string(),
                    candidates,
                });
            }
        };
        let at_entry = || defs.iter().filter(move |d| d.addr == entry);
        if at_entry().any(|d| d.ifunc) {
            return Err(ResolveError::Ifunc {
                module: self.name().to_string(),
                symbol: symbol.to_string(),
            });
        }
        let size = at_entry().map(|d| d.size).max().unwrap_or(0);
        let end = if size > 0 {
            entry.checked_add(size)
        } else {
            self.fde_containing(entry).map(|f| f.end)
        };
        Ok(ResolvedFunction {
            entry,
            end,
            name: symbol.to_string(),
            module: self.name().to_string(),
        })
    }

    /// Every defined function symbol whose name without version is `bare`,
    /// from `.symtab` (versions embedded in names) and `.dynsym` (versions
    /// from `.gnu.version`).
    fn definitions(&self, bare: &str) -> Vec<Definition> {
        let mut out = Vec::new();
        // The bytes parsed when the module was built; failure here is only
        // possible if that changed, and then nothing is found.
        let Ok(file) = ElfFile64::<Endianness>::parse(self.elf_bytes()) else {
            return out;
        };
        let endian = file.endian();
        let versions = file
            .elf_section_table()
            .versions(endian, file.data())
            .ok()
            .flatten();
        let tables = [
            (file.elf_symbol_table(), false),
            (file.elf_dynamic_symbol_table(), true),
        ];
        for (table, dynamic) in tables {
            for (index, sym) in table.enumerate() {
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
                let name = String::from_utf8_lossy(raw);
                let (name_bare, embedded) = split_version(&name);
                if name_bare != bare {
                    continue;
                }
                let version = match (embedded, dynamic, &versions) {
                    (Some((v, default)), _, _) => Some((v.to_string(), default)),
                    (None, true, Some(vt)) => dynsym_version(vt, endian, index),
                    _ => None,
                };
                out.push(Definition {
                    addr: value.wrapping_add(self.bias()),
                    size: sym.st_size(endian),
                    local: sym.st_bind() == elf::STB_LOCAL,
                    version,
                    ifunc: kind == elf::STT_GNU_IFUNC,
                });
            }
        }
        out
    }

    fn resolve_offset(&self, offset: u64) -> Result<ResolvedFunction, ResolveError> {
        let bias = self.bias();
        let module = self.name().to_string();
        let entry = bias.wrapping_add(offset);
        if !self.contains(entry) {
            return Err(ResolveError::OutsideModule {
                module,
                offset,
                lo: self.start().wrapping_sub(bias),
                hi: self.end().wrapping_sub(bias),
            });
        }
        let fdes = self.fde_index();
        let fde = fdes
            .get(fdes.partition_point(|f| f.start < entry))
            .filter(|f| f.start == entry);
        let symbol = self
            .symbol_at(entry)
            .filter(|h| h.offset == 0)
            .map(|h| h.name.to_string());
        let symbol_starts_here = self.symbol_starts().any(|a| a == entry);
        if fde.is_none() && !symbol_starts_here {
            return Err(self.not_function_start(offset, entry));
        }
        let end = match fde {
            Some(f) => Some(f.end),
            None => self.fde_containing(entry).map(|f| f.end),
        };
        // A sized symbol at the entry is at least as precise as the FDE.
        let end = match (self.symbol_size_at(entry), end) {
            (Some(size), None) => entry.checked_add(size),
            (_, end) => end,
        };
        Ok(ResolvedFunction {
            entry,
            end,
            name: symbol.unwrap_or_else(|| format!("{module}+{offset:#x}")),
            module,
        })
    }

    /// Size of the best sized symbol starting at `addr`.
    fn symbol_size_at(&self, addr: u64) -> Option<u64> {
        let hit = self.symbol_at(addr).filter(|h| h.offset == 0)?;
        let def = self.definitions(hit.name);
        def.iter()
            .filter(|d| d.addr == addr && d.size > 0)
            .map(|d| d.size)
            .max()
    }

    fn not_function_start(&self, offset: u64, entry: u64) -> ResolveError {
        let bias = self.bias();
        let starts = self
            .fde_index()
            .iter()
            .map(|f| f.start)
            .chain(self.symbol_starts());
        let mut before: Option<u64> = None;
        let mut after: Option<u64> = None;
        for s in starts {
            if s < entry && before.is_none_or(|b| s > b) {
                before = Some(s);
            }
            if s > entry && after.is_none_or(|a| s < a) {
                after = Some(s);
            }
        }
        let describe = |addr: u64| {
            let mut text = format!("{}+{:#x}", self.name(), addr.wrapping_sub(bias));
            if let Some(hit) = self.symbol_at(addr).filter(|h| h.offset == 0) {
                text.push_str(&format!(" ({})", hit.name));
            }
            text
        };
        let hint = match (before, after) {
            (None, None) => {
                "the module has no .eh_frame function list or function symbols".to_string()
            }
            (b, a) => {
                let mut parts = Vec::new();
                if let Some(b) = b {
                    parts.push(format!("{} before", describe(b)));
                }
                if let Some(a) = a {
                    parts.push(format!("{} after", describe(a)));
                }
                format!("nearest function starts: {}", parts.join(", "))
            }
        };
        ResolveError::NotFunctionStart {
            module: self.name().to_string(),
            offset,
            before: before.map(|b| b.wrapping_sub(bias)),
            after: after.map(|a| a.wrapping_sub(bias)),
            hint,
        }
    }
}

/// Version of `.dynsym` entry `index`: name and whether it is the default.
fn dynsym_version(
    versions: &object::read::elf::VersionTable<'_, elf::FileHeader64<Endianness>>,
    endian: Endianness,
    index: SymbolIndex,
) -> Option<(String, bool)> {
    let versym = versions.version_index(endian, index);
    let version = versions.version(versym.index()).ok().flatten()?;
    Some((
        String::from_utf8_lossy(version.name()).into_owned(),
        !versym.is_hidden(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    const BIAS: u64 = 0x5555_5555_4000;

    const PROGRAM: &str = r#"
int counter;
__attribute__((noinline)) int add_one(int x) { return x + 1; }
__attribute__((noinline)) static int helper(int x) { counter++; return x * 3; }
__attribute__((noinline)) int twice(int x) { return helper(x) + helper(x + 1); }
int main(int argc, char **argv) { (void)argv; return twice(add_one(argc)) & 1; }
"#;

    const LIBRARY: &str = r#"
__asm__(".symver old_impl, vfunc@VER_1");
__asm__(".symver new_impl, vfunc@@VER_2");
int old_impl(void) { return 1; }
int new_impl(void) { return 2; }
static int ifn_impl(void) { return 7; }
static void *ifn_resolver(void) { return (void *)ifn_impl; }
int ifn(void) __attribute__((ifunc("ifn_resolver")));
int plain(int x) { return x * 2; }
"#;

    const VERSION_SCRIPT: &str =
        "VER_1 { global: vfunc; ifn; plain; local: *; };\nVER_2 { global: vfunc; } VER_1;\n";

    /// Compiled test binaries: (unstripped, stripped).
    struct Built {
        _dir: tempfile::TempDir,
        exe: Vec<u8>,
        exe_stripped: Vec<u8>,
        lib: Vec<u8>,
        lib_stripped: Vec<u8>,
    }

    fn run(cmd: &mut Command) {
        let status = cmd.status().expect("run host toolchain (gcc/strip)");
        assert!(status.success(), "{cmd:?} failed");
    }

    fn compile_and_strip(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let out = dir.join(name);
        let stripped = dir.join(format!("{name}.stripped"));
        run(Command::new("gcc")
            .args(["-O0", "-fasynchronous-unwind-tables"])
            .args(args)
            .arg("-o")
            .arg(&out));
        run(Command::new("strip").arg("-o").arg(&stripped).arg(&out));
        (
            std::fs::read(&out).expect("read binary"),
            std::fs::read(&stripped).expect("read stripped binary"),
        )
    }

    fn build() -> Built {
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write source");
            path.to_string_lossy().into_owned()
        };
        let prog = write("prog.c", PROGRAM);
        let lib = write("lib.c", LIBRARY);
        let map = write("lib.map", VERSION_SCRIPT);
        let (exe, exe_stripped) = compile_and_strip(dir.path(), "prog", &["-fPIE", "-pie", &prog]);
        let script = format!("-Wl,--version-script={map}");
        let (lib, lib_stripped) = compile_and_strip(
            dir.path(),
            "libt.so.1",
            &["-shared", "-fPIC", &script, &lib],
        );
        Built {
            _dir: dir,
            exe,
            exe_stripped,
            lib,
            lib_stripped,
        }
    }

    fn module(name: &str, bytes: &[u8]) -> Module {
        Module::from_elf(name, bytes, BIAS).expect("parse test ELF")
    }

    fn sym(s: &str) -> FunctionSpec {
        FunctionSpec::Symbol(s.to_string())
    }

    #[test]
    fn parses_spec_forms() {
        let p = |t: &str| parse_function_spec(t);
        assert_eq!(p("main"), Ok((None, sym("main"))));
        assert_eq!(
            p(" libc.so.6!memcpy@@GLIBC_2.14 "),
            Ok((Some("libc.so.6".into()), sym("memcpy@@GLIBC_2.14")))
        );
        assert_eq!(
            p("lighttpd+0x1a2B"),
            Ok((Some("lighttpd".into()), FunctionSpec::Offset(0x1a2b)))
        );
        assert_eq!(p("+0x10"), Ok((None, FunctionSpec::Offset(0x10))));
        assert_eq!(
            p("libstdc++.so.6+0x20"),
            Ok((Some("libstdc++.so.6".into()), FunctionSpec::Offset(0x20)))
        );
        assert_eq!(
            p("libstdc++.so.6!_ZNSt6thread4joinEv"),
            Ok((Some("libstdc++.so.6".into()), sym("_ZNSt6thread4joinEv")))
        );
        assert_eq!(p("foo.cold"), Ok((None, sym("foo.cold"))));

        for (bad, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("lighttpd+1234", "0x prefix"),
            ("+0x", "bad hexadecimal"),
            ("+0xzz", "bad hexadecimal"),
            ("+0x10000000000000000", "64 bits"),
            ("!main", "empty module"),
            ("libc.so.6!", "empty symbol"),
            ("libc.so.6!main+0x10", "cannot contain"),
            ("foo bar", "whitespace"),
            ("@VER", "misplaced"),
        ] {
            let err = p(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.contains(why), "{bad:?}: {text}");
            assert!(text.contains("MODULE+0xHEX"), "{text}");
        }
        // Displays round-trip through the parser.
        for spec in [sym("x"), FunctionSpec::Offset(0x42)] {
            assert_eq!(p(&spec.to_string()), Ok((None, spec)));
        }
    }

    #[test]
    fn matches_module_names() {
        let built = build();
        let m = module("libt.so.1", &built.lib).with_path("/usr/lib/x86_64-linux-gnu/libt.so.1");
        assert!(m.matches_name("libt.so.1"));
        assert!(m.matches_name("/usr/lib/x86_64-linux-gnu/libt.so.1"));
        assert!(!m.matches_name("/lib/libt.so.1"));
        assert!(!m.matches_name("libt.so"));
        assert!(!m.matches_name(""));
        let m = module("/opt/bin/prog", &built.exe);
        assert!(m.matches_name("prog"));
        assert!(m.matches_name("/opt/bin/prog"));
        assert!(!m.matches_name("bin/prog"));
    }

    #[test]
    fn resolves_symbols_and_offsets() {
        let built = build();
        let m = module("prog", &built.exe);
        let stripped = module("prog", &built.exe_stripped);
        let add_one = m.symbol_address("add_one").expect("add_one symbol");
        let fde = m
            .functions_from_eh_frame()
            .into_iter()
            .find(|f| f.start == add_one)
            .expect("add_one has an FDE");

        let r = m
            .resolve_function(&sym("add_one"))
            .expect("resolve add_one");
        assert_eq!(r.entry, add_one);
        assert_eq!(r.end, Some(fde.end));
        assert_eq!(r.name, "add_one");
        assert_eq!(r.module, "prog");

        // Local (static) functions are found too.
        let helper = m.resolve_function(&sym("helper")).expect("resolve helper");
        assert!(helper.end.is_some_and(|e| e > helper.entry));

        // By offset, in the unstripped and the stripped binary.
        let offset = add_one - BIAS;
        let r = m
            .resolve_function(&FunctionSpec::Offset(offset))
            .expect("offset");
        assert_eq!(
            (r.entry, r.end, r.name.as_str()),
            (add_one, Some(fde.end), "add_one")
        );
        let r = stripped
            .resolve_function(&FunctionSpec::Offset(offset))
            .expect("stripped offset");
        assert_eq!(r.entry, add_one);
        assert_eq!(r.end, Some(fde.end));
        assert_eq!(r.name, format!("prog+{offset:#x}"));

        // Symbols are gone from the stripped executable.
        assert_eq!(
            stripped.resolve_function(&sym("add_one")),
            Err(ResolveError::NoSuchSymbol {
                module: "prog".into(),
                symbol: "add_one".into()
            })
        );
        let err = m
            .resolve_function(&sym("no_such_function"))
            .expect_err("missing");
        assert_eq!(
            err.to_string(),
            "no function symbol `no_such_function` in prog"
        );
        // Data symbols are not functions.
        assert!(m.resolve_function(&sym("counter")).is_err());
    }

    #[test]
    fn offset_inside_a_function_names_neighbours() {
        let built = build();
        let m = module("prog", &built.exe);
        let stripped = module("prog", &built.exe_stripped);
        let add_one = m.symbol_address("add_one").expect("add_one") - BIAS;
        let twice = m.symbol_address("twice").expect("twice") - BIAS;
        let helper = m.symbol_address("helper").expect("helper") - BIAS;
        // Functions are laid out in source order at -O0.
        assert!(add_one < helper && helper < twice);

        let err = m
            .resolve_function(&FunctionSpec::Offset(add_one + 1))
            .expect_err("mid-function");
        let ResolveError::NotFunctionStart { before, after, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*before, Some(add_one));
        assert_eq!(*after, Some(helper));
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "prog+{:#x} is not the start of a function",
                add_one + 1
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("prog+{add_one:#x} (add_one) before")),
            "{text}"
        );
        assert!(
            text.contains(&format!("prog+{helper:#x} (helper) after")),
            "{text}"
        );

        // Stripped: the same neighbours, without names.
        let err = stripped
            .resolve_function(&FunctionSpec::Offset(add_one + 1))
            .expect_err("mid-function");
        let text = err.to_string();
        assert!(
            text.contains(&format!("prog+{add_one:#x} before")),
            "{text}"
        );
        assert!(text.contains(&format!("prog+{helper:#x} after")), "{text}");

        let err = m
            .resolve_function(&FunctionSpec::Offset(0x4000_0000))
            .expect_err("outside");
        assert!(matches!(err, ResolveError::OutsideModule { .. }), "{err:?}");
        assert!(err.to_string().contains("is outside the module"), "{err}");
    }

    #[test]
    fn symbol_versions_and_ifuncs() {
        let built = build();
        for (bytes, what) in [
            (&built.lib, "unstripped"),
            (&built.lib_stripped, "stripped"),
        ] {
            let m = module("libt.so.1", bytes);
            let resolve = |s: &str| m.resolve_function(&sym(s));
            let new = resolve("vfunc@@VER_2").unwrap_or_else(|e| panic!("{what}: {e}"));
            let old = resolve("vfunc@VER_1").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_ne!(new.entry, old.entry, "{what}");
            // The bare name picks the default version.
            let bare = resolve("vfunc").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(bare.entry, new.entry, "{what}");
            assert!(bare.end.is_some_and(|e| e > bare.entry), "{what}");
            // `@` vs `@@` does not matter when naming a version.
            assert_eq!(resolve("vfunc@VER_2").map(|r| r.entry), Ok(new.entry));
            assert!(matches!(
                resolve("vfunc@VER_9"),
                Err(ResolveError::NoSuchSymbol { .. })
            ));
            let plain = resolve("plain").unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(resolve("plain@@VER_1").map(|r| r.entry), Ok(plain.entry));
            let err = resolve("ifn").expect_err("ifunc");
            assert!(matches!(err, ResolveError::Ifunc { .. }), "{what}: {err:?}");
            assert!(err.to_string().contains("IFUNC"), "{err}");
        }
    }

    #[test]
    fn ambiguous_local_symbols() {
        // Two static functions with the same name in different files.
        let dir = tempfile::tempdir().expect("temp dir");
        let a = dir.path().join("a.c");
        let b = dir.path().join("b.c");
        std::fs::write(
            &a,
            "__attribute__((noinline)) static int dup(int x) { return x + 1; }\n\
             int fa(int x) { return dup(x); }\nint main(void) { return 0; }\n",
        )
        .expect("write a.c");
        std::fs::write(
            &b,
            "__attribute__((noinline)) static int dup(int x) { return x + 2; }\n\
             int fb(int x) { return dup(x); }\n",
        )
        .expect("write b.c");
        let out = dir.path().join("dup");
        run(Command::new("gcc")
            .arg("-O0")
            .arg("-o")
            .arg(&out)
            .arg(&a)
            .arg(&b));
        let m = module("dup", &std::fs::read(&out).expect("read dup"));
        let err = m.resolve_function(&sym("dup")).expect_err("ambiguous");
        assert!(matches!(err, ResolveError::Ambiguous { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("ambiguous in dup: defined at dup+0x"),
            "{text}"
        );
        assert!(text.contains(", dup+0x"), "{text}");
    }
}
