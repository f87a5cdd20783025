//! The AMX micro-kernel (Intel's tile matrix unit, Sapphire Rapids and
//! later): a 32×32 tile of `c` in four 16×16 f32 tile registers, each step
//! of 32 k one `tdpbf16ps` per register (16×16×32 multiply-adds of bf16
//! pairs each), from two A tiles (16 rows × 16 pairs, contiguous
//! in the tiled A panel) and two B tiles (16 steps × 16 columns of the B
//! panel). On such CPUs `vdpbf16ps` issues at a quarter of the FMA rate
//! (measured here: 1.24 G/s against 5.34 G/s per core, scripts/dpbf16_rate.rs), so AMX, not
//! AVX512-BF16, is their bf16 path.
//!
//! Rust has no stable AMX intrinsics: the instructions are inline
//! assembly. The tile registers are not the compiler's to allocate, so they
//! keep their contents from one `asm!` block to the next; each kernel call
//! loads its own tile configuration.

use super::block::Micro;
use super::operand::Pair;
use std::arch::asm;
use std::sync::OnceLock;

const MR: usize = 32;
const NR: usize = 32;
/// Pairs per tile row (64 bytes): the k depth of one tile multiply is 32.
const TILE_STEPS: usize = 16;

/// 1024 k per block: an A panel is 32 rows × 512 pairs = 64 KiB and a B
/// slab 512 × 512 pairs = 1 MiB, both in L2, which feeds the tile loads
/// nearly as fast as L1 does (scripts/amx_rate.rs); what a deeper block
/// saves is the load and store of the 32×32 f32 tile of `c` per block,
/// which misses every cache and costs more than the multiplies.
pub(super) static MICRO: Micro<Pair> = Micro {
    mr: MR,
    nr: NR,
    kc: 1024,
    mc: 32 * MR,
    nc: 16 * NR,
    step_align: TILE_STEPS,
    a_tiled: true,
    kernel,
    rows_kernel: Some(rows_kernel),
    rows_align: 64,
    // Tile loads from L2 run nearly at L1 speed (see kc above): no limit.
    rows_per_set: usize::MAX,
    setup: Some(load_tile_config),
};

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the
/// tile registers (Linux asks each process to request them), requested
/// once: the missing piece, if any.
pub(super) fn missing() -> Option<&'static str> {
    static MISSING: OnceLock<Option<&'static str>> = OnceLock::new();
    *MISSING.get_or_init(|| {
        use std::arch::x86_64::__cpuid_count;
        let leaf7 = __cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        if !(tile && bf16) {
            return Some("amx-bf16");
        }
        if !is_x86_feature_detected!("avx512f") {
            return Some("avx512f");
        }
        request_tile_data().err()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> Result<(), &'static str> {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only grants this process the
    // right to use the AMX tile state; it reads and writes no memory.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    match ret {
        0 => Ok(()),
        _ => Err("amx (the kernel refused the tile state: arch_prctl ARCH_REQ_XCOMP_PERM)"),
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> Result<(), &'static str> {
    Err("amx (enabled by Graft on Linux only)")
}

/// The tile configuration (palette 1): tmm0–3 the four 16×16 f32 C tiles,
/// tmm4–5 the A tiles, tmm6–7 the B tiles, all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Loads the tile configuration into this thread's tile state, where it
/// stays for every later kernel call on the thread: nothing else in the
/// process configures tiles.
///
/// # Safety
/// The CPU has AMX and the process its tile state ([`missing`] is `None`).
unsafe fn load_tile_config() {
    // SAFETY: the caller's contract; `CONFIG` is a valid palette-1 config.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
}

/// See [`super::block::Kernel`] for the contract (the tile configuration
/// loaded on this thread by [`load_tile_config`]); `steps` is a multiple of
/// 16 and the A panel tiled (`Micro::a_tiled`): each block of 16 steps is
/// 32 rows of 64 bytes, the two A tiles of that block one after the other.
unsafe fn kernel(
    steps: usize,
    a: *const Pair,
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let row = TILE_STEPS * 4;
    // SAFETY: the caller's contract; a tiled panel's tile rows are 64 bytes
    // apart, its blocks 32 such rows.
    unsafe { tiles(steps, a.cast(), (row, MR * row), b, c, ldc, accumulate) }
}

/// See [`super::block::RowsKernel`] for the contract (and [`kernel`]'s): the
/// A tiles loaded straight from 32 stored rows `lda` bf16 apart.
unsafe fn rows_kernel(
    steps: usize,
    a: *const u16,
    lda: usize,
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract; a block of 16 steps is 64 bytes of
    // each row.
    unsafe {
        tiles(
            steps,
            a.cast(),
            (lda * 2, TILE_STEPS * 4),
            b,
            c,
            ldc,
            accumulate,
        )
    }
}

/// The kernel over A tiles whose rows are `a_row` bytes apart, a block of
/// 16 steps `a_block` bytes after the previous one.
#[inline(always)]
unsafe fn tiles(
    steps: usize,
    a: *const u8,
    (a_row, a_block): (usize, usize),
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(steps.is_multiple_of(TILE_STEPS));
    let (sb, sc) = (NR * 4, ldc * 4);
    // SAFETY: the caller's contract (see `Kernel`): the CPU has AMX, the
    // process its tile state (checked by `missing` before this path is
    // taken) and this thread the tile configuration (the task's setup);
    // the four C tiles (rows 0..32, columns 0..32 of the tile at `c`), the
    // two A tiles (rows 0..16 and 16..32, 16 pairs per block) and the two B
    // tiles (16 steps, columns 0..16 and 16..32) lie inside the operands.
    unsafe {
        let c1 = c.add(16 * ldc);
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c0} + {sc}]",
                "tileloadd tmm1, [{c0} + {sc} + 64]",
                "tileloadd tmm2, [{c1} + {sc}]",
                "tileloadd tmm3, [{c1} + {sc} + 64]",
                c0 = in(reg) c, c1 = in(reg) c1, sc = in(reg) sc,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for blk in 0..steps / TILE_STEPS {
            let (a0, b0) = (a.add(blk * a_block), b.add(blk * TILE_STEPS * NR));
            asm!(
                "tileloadd tmm4, [{a0} + {sa}]",
                "tileloadd tmm5, [{a1} + {sa}]",
                "tileloadd tmm6, [{b0} + {sb}]",
                "tileloadd tmm7, [{b1} + {sb}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a0.add(16 * a_row), sa = in(reg) a_row,
                b0 = in(reg) b0, b1 = in(reg) b0.add(16), sb = in(reg) sb,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {sc}], tmm0",
            "tilestored [{c0} + {sc} + 64], tmm1",
            "tilestored [{c1} + {sc}], tmm2",
            "tilestored [{c1} + {sc} + 64], tmm3",
            c0 = in(reg) c, c1 = in(reg) c1, sc = in(reg) sc,
            options(nostack),
        );
    }
}
