//! The x86-64 Linux register set as gdb knows it: the core, SSE, Linux (`orig_rax`),
//! segment-base (`fs_base`, `gs_base`) and AVX (upper halves of YMM) features, in gdb's
//! own register numbering, converted to and from a vCPU's [`CpuState`].

use gdbstub::arch::{Arch, Registers};

use crate::vcpu::CpuState;

/// x86-64 with the Linux features gdb's amd64-linux target uses.
#[derive(Debug)]
pub enum X86_64Linux {}

impl Arch for X86_64Linux {
    type Usize = u64;
    type Registers = Regs;
    type RegId = ();
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// One thread's registers, in gdb's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Regs {
    /// rax rbx rcx rdx rsi rdi rbp rsp r8..r15 (gdb's order, not the hardware's).
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub eflags: u32,
    /// cs ss ds es fs gs.
    pub segments: [u32; 6],
    /// st0..st7, 80 bits each.
    pub st: [[u8; 10]; 8],
    /// fctrl fstat ftag fiseg fioff foseg fooff fop.
    pub fpu: [u32; 8],
    /// xmm0..xmm15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// The syscall number of an interrupted call (-1: none).
    pub orig_rax: u64,
    /// FS base (thread pointer of glibc).
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// Upper halves of ymm0..ymm15.
    pub ymmh: [u128; 16],
}

/// Byte offsets in the (standard-format) XSAVE image.
mod xsave {
    pub const FCW: usize = 0;
    pub const FSW: usize = 2;
    pub const FTW: usize = 4;
    pub const FOP: usize = 6;
    pub const FIP: usize = 8;
    pub const FDP: usize = 16;
    pub const MXCSR: usize = 24;
    pub const ST: usize = 32;
    pub const XMM: usize = 160;
    pub const YMMH: usize = 576;
}

fn image_bytes(cpu: &CpuState) -> Vec<u8> {
    cpu.xsave
        .region
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn store_image(cpu: &mut CpuState, bytes: &[u8]) {
    for (w, chunk) in cpu.xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le_u128(b: &[u8], at: usize) -> u128 {
    let mut v = [0u8; 16];
    v.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(v)
}

impl Regs {
    /// The registers of a thread whose vCPU state is `cpu`.
    pub fn from_cpu(cpu: &CpuState) -> Regs {
        let r = &cpu.regs;
        let s = &cpu.sregs;
        let img = image_bytes(cpu);
        let mut st = [[0u8; 10]; 8];
        for (i, reg) in st.iter_mut().enumerate() {
            reg.copy_from_slice(&img[xsave::ST + 16 * i..xsave::ST + 16 * i + 10]);
        }
        // FXSAVE keeps an abridged tag (one bit per register: valid or empty); gdb shows
        // the full one (two bits: 00 valid, 11 empty).
        let abridged = img[xsave::FTW];
        let ftag = (0..8).fold(0u32, |t, i| {
            t | if abridged & (1 << i) != 0 {
                0
            } else {
                3 << (2 * i)
            }
        });
        let fip = u64::from_le_bytes(img[xsave::FIP..xsave::FIP + 8].try_into().unwrap_or([0; 8]));
        let fdp = u64::from_le_bytes(img[xsave::FDP..xsave::FDP + 8].try_into().unwrap_or([0; 8]));
        Regs {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            eflags: r.rflags as u32,
            segments: [
                u32::from(s.cs.selector),
                u32::from(s.ss.selector),
                u32::from(s.ds.selector),
                u32::from(s.es.selector),
                u32::from(s.fs.selector),
                u32::from(s.gs.selector),
            ],
            st,
            fpu: [
                le16(&img, xsave::FCW),
                le16(&img, xsave::FSW),
                ftag,
                0,
                fip as u32,
                0,
                fdp as u32,
                le16(&img, xsave::FOP),
            ],
            xmm: std::array::from_fn(|i| le_u128(&img, xsave::XMM + 16 * i)),
            mxcsr: u32::from_le_bytes(
                img[xsave::MXCSR..xsave::MXCSR + 4]
                    .try_into()
                    .unwrap_or([0; 4]),
            ),
            orig_rax: u64::MAX,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            ymmh: std::array::from_fn(|i| le_u128(&img, xsave::YMMH + 16 * i)),
        }
    }

    /// Write these registers into `cpu`. Segment selectors stay the VMM's (user mode
    /// needs its own); everything else, FS and GS bases included, is taken.
    pub fn store(&self, cpu: &mut CpuState) {
        let g = &self.gpr;
        let r = &mut cpu.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = self.rip;
        // Reserved bit 1 is always set; the rest is the program's.
        r.rflags = u64::from(self.eflags) | 2;
        cpu.sregs.fs.base = self.fs_base;
        cpu.sregs.gs.base = self.gs_base;
        let mut img = image_bytes(cpu);
        for (i, reg) in self.st.iter().enumerate() {
            img[xsave::ST + 16 * i..xsave::ST + 16 * i + 10].copy_from_slice(reg);
        }
        img[xsave::FCW..xsave::FCW + 2].copy_from_slice(&(self.fpu[0] as u16).to_le_bytes());
        img[xsave::FSW..xsave::FSW + 2].copy_from_slice(&(self.fpu[1] as u16).to_le_bytes());
        img[xsave::FTW] = (0..8).fold(0u8, |t, i| {
            t | if (self.fpu[2] >> (2 * i)) & 3 == 3 {
                0
            } else {
                1 << i
            }
        });
        img[xsave::FOP..xsave::FOP + 2].copy_from_slice(&(self.fpu[7] as u16).to_le_bytes());
        for (i, x) in self.xmm.iter().enumerate() {
            img[xsave::XMM + 16 * i..xsave::XMM + 16 * i + 16].copy_from_slice(&x.to_le_bytes());
        }
        img[xsave::MXCSR..xsave::MXCSR + 4].copy_from_slice(&self.mxcsr.to_le_bytes());
        for (i, y) in self.ymmh.iter().enumerate() {
            img[xsave::YMMH + 16 * i..xsave::YMMH + 16 * i + 16].copy_from_slice(&y.to_le_bytes());
        }
        store_image(cpu, &img);
    }

    /// Every register's bytes, in gdb's numbering order (little-endian).
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REGS_BYTES);
        for v in &self.gpr {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.rip.to_le_bytes());
        out.extend_from_slice(&self.eflags.to_le_bytes());
        for v in &self.segments {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for st in &self.st {
            out.extend_from_slice(st);
        }
        for v in &self.fpu {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.xmm {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.mxcsr.to_le_bytes());
        out.extend_from_slice(&self.orig_rax.to_le_bytes());
        out.extend_from_slice(&self.fs_base.to_le_bytes());
        out.extend_from_slice(&self.gs_base.to_le_bytes());
        for v in &self.ymmh {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// Bytes of a `g` packet's payload.
const REGS_BYTES: usize = 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 3 * 8 + 16 * 16;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ()> {
        if self.0.len() < N {
            return Err(());
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().map_err(|_| ())
    }
    fn u32(&mut self) -> Result<u32, ()> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, ()> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn u128(&mut self) -> Result<u128, ()> {
        self.take::<16>().map(u128::from_le_bytes)
    }
}

impl Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        for b in self.bytes() {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        // gdb sends all registers it knows; a shorter packet (an older gdb without the
        // AVX feature) keeps the rest.
        if bytes.len() < REGS_BYTES - 16 * 16 {
            return Err(());
        }
        let mut r = Reader(bytes);
        for v in &mut self.gpr {
            *v = r.u64()?;
        }
        self.rip = r.u64()?;
        self.eflags = r.u32()?;
        for v in &mut self.segments {
            *v = r.u32()?;
        }
        for st in &mut self.st {
            *st = r.take::<10>()?;
        }
        for v in &mut self.fpu {
            *v = r.u32()?;
        }
        for v in &mut self.xmm {
            *v = r.u128()?;
        }
        self.mxcsr = r.u32()?;
        self.orig_rax = r.u64()?;
        self.fs_base = r.u64()?;
        self.gs_base = r.u64()?;
        for v in &mut self.ymmh {
            match r.u128() {
                Ok(x) => *v = x,
                Err(()) => break,
            }
        }
        Ok(())
    }
}

/// gdb's amd64-linux features with explicit register numbers (the order of `g`).
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<osabi>GNU/Linux</osabi>
<feature name="org.gnu.gdb.i386.core">
  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>
  <reg name="rax" bitsize="64" type="int64" regnum="0"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="rcx" bitsize="64" type="int64"/>
  <reg name="rdx" bitsize="64" type="int64"/>
  <reg name="rsi" bitsize="64" type="int64"/>
  <reg name="rdi" bitsize="64" type="int64"/>
  <reg name="rbp" bitsize="64" type="data_ptr"/>
  <reg name="rsp" bitsize="64" type="data_ptr"/>
  <reg name="r8" bitsize="64" type="int64"/>
  <reg name="r9" bitsize="64" type="int64"/>
  <reg name="r10" bitsize="64" type="int64"/>
  <reg name="r11" bitsize="64" type="int64"/>
  <reg name="r12" bitsize="64" type="int64"/>
  <reg name="r13" bitsize="64" type="int64"/>
  <reg name="r14" bitsize="64" type="int64"/>
  <reg name="r15" bitsize="64" type="int64"/>
  <reg name="rip" bitsize="64" type="code_ptr"/>
  <reg name="eflags" bitsize="32" type="i386_eflags"/>
  <reg name="cs" bitsize="32" type="int32"/>
  <reg name="ss" bitsize="32" type="int32"/>
  <reg name="ds" bitsize="32" type="int32"/>
  <reg name="es" bitsize="32" type="int32"/>
  <reg name="fs" bitsize="32" type="int32"/>
  <reg name="gs" bitsize="32" type="int32"/>
  <reg name="st0" bitsize="80" type="i387_ext"/>
  <reg name="st1" bitsize="80" type="i387_ext"/>
  <reg name="st2" bitsize="80" type="i387_ext"/>
  <reg name="st3" bitsize="80" type="i387_ext"/>
  <reg name="st4" bitsize="80" type="i387_ext"/>
  <reg name="st5" bitsize="80" type="i387_ext"/>
  <reg name="st6" bitsize="80" type="i387_ext"/>
  <reg name="st7" bitsize="80" type="i387_ext"/>
  <reg name="fctrl" bitsize="32" type="int" group="float"/>
  <reg name="fstat" bitsize="32" type="int" group="float"/>
  <reg name="ftag" bitsize="32" type="int" group="float"/>
  <reg name="fiseg" bitsize="32" type="int" group="float"/>
  <reg name="fioff" bitsize="32" type="int" group="float"/>
  <reg name="foseg" bitsize="32" type="int" group="float"/>
  <reg name="fooff" bitsize="32" type="int" group="float"/>
  <reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
  <vector id="v8bf16" type="bfloat16" count="8"/>
  <vector id="v8h" type="ieee_half" count="8"/>
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v8_bfloat16" type="v8bf16"/><field name="v8_half" type="v8h"/>
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
  </flags>
  <reg name="xmm0" bitsize="128" type="vec128" regnum="40"/>
  <reg name="xmm1" bitsize="128" type="vec128"/>
  <reg name="xmm2" bitsize="128" type="vec128"/>
  <reg name="xmm3" bitsize="128" type="vec128"/>
  <reg name="xmm4" bitsize="128" type="vec128"/>
  <reg name="xmm5" bitsize="128" type="vec128"/>
  <reg name="xmm6" bitsize="128" type="vec128"/>
  <reg name="xmm7" bitsize="128" type="vec128"/>
  <reg name="xmm8" bitsize="128" type="vec128"/>
  <reg name="xmm9" bitsize="128" type="vec128"/>
  <reg name="xmm10" bitsize="128" type="vec128"/>
  <reg name="xmm11" bitsize="128" type="vec128"/>
  <reg name="xmm12" bitsize="128" type="vec128"/>
  <reg name="xmm13" bitsize="128" type="vec128"/>
  <reg name="xmm14" bitsize="128" type="vec128"/>
  <reg name="xmm15" bitsize="128" type="vec128"/>
  <reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.linux">
  <reg name="orig_rax" bitsize="64" type="int" regnum="57"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
  <reg name="fs_base" bitsize="64" type="int"/>
  <reg name="gs_base" bitsize="64" type="int"/>
</feature>
<feature name="org.gnu.gdb.i386.avx">
  <reg name="ymm0h" bitsize="128" type="uint128"/>
  <reg name="ymm1h" bitsize="128" type="uint128"/>
  <reg name="ymm2h" bitsize="128" type="uint128"/>
  <reg name="ymm3h" bitsize="128" type="uint128"/>
  <reg name="ymm4h" bitsize="128" type="uint128"/>
  <reg name="ymm5h" bitsize="128" type="uint128"/>
  <reg name="ymm6h" bitsize="128" type="uint128"/>
  <reg name="ymm7h" bitsize="128" type="uint128"/>
  <reg name="ymm8h" bitsize="128" type="uint128"/>
  <reg name="ymm9h" bitsize="128" type="uint128"/>
  <reg name="ymm10h" bitsize="128" type="uint128"/>
  <reg name="ymm11h" bitsize="128" type="uint128"/>
  <reg name="ymm12h" bitsize="128" type="uint128"/>
  <reg name="ymm13h" bitsize="128" type="uint128"/>
  <reg name="ymm14h" bitsize="128" type="uint128"/>
  <reg name="ymm15h" bitsize="128" type="uint128"/>
</feature>
</target>"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_through_a_g_packet_in_gdbs_order() {
        let mut r = Regs::default();
        r.gpr[0] = 0x1111; // rax
        r.gpr[7] = 0x7fff_0000; // rsp
        r.rip = 0x40_1000;
        r.eflags = 0x246;
        r.fs_base = 0xdead_beef;
        r.xmm[3] = 0x0102_0304;
        r.ymmh[15] = 7;
        let mut bytes = Vec::new();
        r.gdb_serialize(|b| bytes.push(b.expect("every register is known")));
        assert_eq!(bytes.len(), REGS_BYTES);
        // rip is register 16, right after the sixteen general registers.
        assert_eq!(&bytes[128..136], &0x40_1000u64.to_le_bytes());
        // fs_base follows orig_rax, after mxcsr.
        let fs_at = REGS_BYTES - 16 * 16 - 16;
        assert_eq!(&bytes[fs_at..fs_at + 8], &0xdead_beefu64.to_le_bytes());
        let mut back = Regs::default();
        back.gdb_deserialize(&bytes).expect("parses");
        assert_eq!(back, r);
        assert!(back.gdb_deserialize(&bytes[..100]).is_err());
    }

    #[test]
    fn a_cpu_state_converts_both_ways() {
        let mut cpu = CpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Box::default(),
            events: Default::default(),
            xcr0: 0,
        };
        cpu.regs.rbx = 5;
        cpu.regs.rip = 0x1234;
        cpu.sregs.fs.base = 0x7000;
        cpu.xsave.region[40] = 0xabcd; // xmm0, bytes 160..164
        let mut r = Regs::from_cpu(&cpu);
        assert_eq!(r.gpr[1], 5);
        assert_eq!(r.fs_base, 0x7000);
        assert_eq!(r.xmm[0], 0xabcd);
        assert_eq!(r.fpu[2], 0xffff, "no x87 register in use: all empty");
        r.gpr[1] = 6;
        r.xmm[0] = 0x1_0000_0000;
        r.store(&mut cpu);
        assert_eq!(cpu.regs.rbx, 6);
        assert_eq!(cpu.xsave.region[41], 1);
        assert_eq!(cpu.regs.rflags & 2, 2);
    }
}
