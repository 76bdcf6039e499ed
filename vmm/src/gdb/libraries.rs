//! The list of loaded objects for gdb (`qXfer:libraries-svr4:read`), read from the
//! dynamic linker's own `r_debug`/`link_map` chain in guest memory, as gdbserver does.

use crate::process::Process;

const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;
const PT_DYNAMIC: u32 = 2;
const PT_PHDR: u32 = 6;
const DT_NULL: u64 = 0;
const DT_DEBUG: u64 = 21;
/// Bounds against a corrupt or hostile chain.
const MAX_OBJECTS: usize = 1024;
const MAX_NAME: usize = 4096;
const MAX_DYNAMIC: u64 = 512;

fn word(p: &mut Process, addr: u64) -> Option<u64> {
    p.mm.read_obj::<u64>(addr).ok()
}

/// The address of the executable's `r_debug` (its DT_DEBUG entry, which ld.so fills in).
fn r_debug(p: &mut Process) -> Option<u64> {
    let aux = |k: u64| p.auxv.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
    let (phdr, phnum) = (aux(AT_PHDR)?, aux(AT_PHNUM)?.min(128));
    let mut dynamic = None;
    let mut bias = None;
    for i in 0..phnum {
        let at = phdr.wrapping_add(i * 56);
        let p_type = p.mm.read_obj::<u32>(at).ok()?;
        let vaddr = word(p, at.wrapping_add(16))?;
        match p_type {
            PT_PHDR => bias = Some(phdr.wrapping_sub(vaddr)),
            PT_DYNAMIC => dynamic = Some(vaddr),
            _ => {}
        }
    }
    let dynamic = dynamic?.wrapping_add(bias.unwrap_or(0));
    for i in 0..MAX_DYNAMIC {
        // Addresses read from guest memory: never trusted not to wrap.
        let entry = dynamic.wrapping_add(i * 16);
        let tag = word(p, entry)?;
        if tag == DT_NULL {
            return None;
        }
        if tag == DT_DEBUG {
            return word(p, entry.wrapping_add(8)).filter(|v| *v != 0);
        }
    }
    None
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `<library-list-svr4>` document for the process as it is now (empty before ld.so
/// has set up its list).
pub fn svr4_xml(p: &mut Process) -> String {
    let mut out = String::from("<library-list-svr4 version=\"1.0\"");
    let Some(map) = r_debug(p).and_then(|r| word(p, r.wrapping_add(8))) else {
        return out + "/>";
    };
    out.push_str(&format!(" main-lm=\"{map:#x}\">"));
    let mut lm = map;
    let mut seen = std::collections::HashSet::new();
    // The first entry is the executable itself, which gdb knows already.
    let mut first = true;
    while lm != 0 && seen.len() < MAX_OBJECTS && seen.insert(lm) {
        let (Some(l_addr), Some(l_name), Some(l_ld), Some(next)) = (
            word(p, lm),
            word(p, lm.wrapping_add(8)),
            word(p, lm.wrapping_add(16)),
            word(p, lm.wrapping_add(24)),
        ) else {
            break;
        };
        let name = p.mm.read_cstring(l_name, MAX_NAME).unwrap_or_default();
        if !first && !name.is_empty() {
            out.push_str(&format!(
                "<library name=\"{}\" lm=\"{lm:#x}\" l_addr=\"{l_addr:#x}\" l_ld=\"{l_ld:#x}\" lmid=\"0x0\"/>",
                escape(&String::from_utf8_lossy(&name))
            ));
        }
        first = false;
        lm = next;
    }
    out + "</library-list-svr4>"
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_escaped_for_xml() {
        assert_eq!(super::escape("/a<b>&\"c"), "/a&lt;b&gt;&amp;&quot;c");
    }
}
