//! What bounds the AMX micro-kernel (kernels/src/gemm/amx.rs) on one core:
//! its 2×2-tile step (two A and two B tile loads, four `tdpbf16ps`) with the
//! operands in L1, in L2 or beyond, with and without a `ldtilecfg` per call,
//! at several k per call, and with the 32×32 f32 tile of C loaded and
//! stored from a matrix far larger than the caches. Each variant runs in
//! turn for 15 rounds and its best is printed, so a slow phase of a shared
//! host hits every variant alike. Operands are 64-byte aligned, as packed
//! panels are; one variant shows what a misaligned A and B cost.
//!
//! Run: `rustc -O -C target-cpu=native scripts/amx_rate.rs -o /tmp/amx_rate && /tmp/amx_rate`
//! (Linux on a CPU with AMX-BF16.)

use std::arch::asm;
use std::time::Instant;

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

/// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
fn request_tiles() {
    let ret: i64;
    unsafe {
        asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64, in("rsi") 18i64,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    assert_eq!(ret, 0, "the kernel refused the AMX tile state");
}

const MR: usize = 32;
const NR: usize = 32;
const TS: usize = 16;

/// Graft's kernel: `steps` pairs of k over a tiled A panel and a B panel.
unsafe fn kernel(steps: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, acc: bool, cfg: bool) {
    let (sa, sb, sc) = (TS * 4, NR * 4, ldc * 4);
    let c1 = c.add(16 * ldc);
    if cfg {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    }
    if acc {
        asm!("tileloadd tmm0, [{c0} + {sc}]", "tileloadd tmm1, [{c0} + {sc} + 64]",
            "tileloadd tmm2, [{c1} + {sc}]", "tileloadd tmm3, [{c1} + {sc} + 64]",
            c0 = in(reg) c, c1 = in(reg) c1, sc = in(reg) sc, options(nostack, readonly));
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    for blk in (0..steps).step_by(TS) {
        let (a0, b0) = (a.add(blk * MR), b.add(blk * NR));
        asm!("tileloadd tmm4, [{a0} + {sa}]", "tileloadd tmm5, [{a1} + {sa}]",
            "tileloadd tmm6, [{b0} + {sb}]", "tileloadd tmm7, [{b1} + {sb}]",
            "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a0.add(16 * TS), sa = in(reg) sa,
            b0 = in(reg) b0, b1 = in(reg) b0.add(16), sb = in(reg) sb, options(nostack, readonly));
    }
    asm!("tilestored [{c0} + {sc}], tmm0", "tilestored [{c0} + {sc} + 64], tmm1",
        "tilestored [{c1} + {sc}], tmm2", "tilestored [{c1} + {sc} + 64], tmm3",
        c0 = in(reg) c, c1 = in(reg) c1, sc = in(reg) sc, options(nostack));
}

/// The multiplies alone: the unit's peak.
unsafe fn multiplies_only(n: usize) {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    for _ in 0..n {
        asm!("tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
    }
}

/// A 64-byte-aligned buffer of `n` values, for the whole run.
fn aligned<T: Copy>(v: T, n: usize) -> &'static mut [T] {
    let b = vec![v; n + 64].leak();
    let off = b.as_ptr().align_offset(64);
    &mut b[off..off + n]
}

struct Variants(Vec<(String, f64, f64)>);

impl Variants {
    /// Times `f` (`flops` of work) and keeps the best time under `name`.
    fn time(&mut self, name: String, flops: f64, mut f: impl FnMut()) {
        let t = Instant::now();
        f();
        let s = t.elapsed().as_secs_f64();
        match self.0.iter_mut().find(|e| e.0 == name) {
            Some(e) => e.2 = e.2.min(s),
            None => self.0.push((name, flops, s)),
        }
    }
}

fn main() {
    request_tiles();
    let kc = 256; // pairs: 512 k
    let a = aligned(0x3f80_3f80u32, MR * 2048 * 4);
    let b = aligned(0x3f80_3f80u32, NR * 256 * 64);
    let c = aligned(0f32, 1024 * 1024);
    let far = aligned(0f32, 4096 * 4096);
    let calls = 4000;
    let per_call = |pairs: usize| 2.0 * (MR * NR * 2 * pairs) as f64;
    let mut v = Variants(Vec::new());
    for _round in 0..15 {
        let tdp = 2.0 * 16.0 * 16.0 * 32.0;
        v.time("multiplies only".into(), 4.0 * 400_000.0 * tdp, || unsafe { multiplies_only(400_000) });
        for (cfg, acc) in [(true, true), (false, true), (true, false), (false, false)] {
            let name = format!("A, B in L1, 512 k, ldtilecfg {cfg}, load C {acc}");
            v.time(name, per_call(kc) * calls as f64, || unsafe {
                for i in 0..calls {
                    kernel(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr().add((i % 4) * 32), 1024, acc, cfg);
                }
            });
        }
        v.time("as above, A and B 4 bytes off a cache line".into(), per_call(kc) * calls as f64, || unsafe {
            for i in 0..calls {
                kernel(kc, a.as_ptr().add(1), b.as_ptr().add(1), c.as_mut_ptr().add((i % 4) * 32), 1024, true, false);
            }
        });
        for np in [4usize, 16, 32, 64] {
            let name = format!("A in L1, B over {} KiB, 512 k", np * 32);
            v.time(name, per_call(kc) * calls as f64, || unsafe {
                for i in 0..calls {
                    let bp = b.as_ptr().add((i % np) * kc * NR);
                    kernel(kc, a.as_ptr(), bp, c.as_mut_ptr().add((i % np) * 32 % 1024), 1024, true, true);
                }
            });
        }
        for np in [4usize, 16, 32] {
            let name = format!("A over {} KiB, B in L1, 512 k", np * 32);
            v.time(name, per_call(kc) * calls as f64, || unsafe {
                for i in 0..calls {
                    let ap = a.as_ptr().add((i % np) * kc * MR);
                    kernel(kc, ap, b.as_ptr(), c.as_mut_ptr().add(((i % np) * 32 % 992) * 1024), 1024, true, true);
                }
            });
        }
        v.time("A, B in L1, C tiles of a 64 MiB matrix".into(), per_call(kc) * calls as f64, || unsafe {
            for i in 0..calls {
                let r = ((i * 32) / 4096 * 32) % 4064;
                kernel(kc, a.as_ptr(), b.as_ptr(), far.as_mut_ptr().add(r * 4096 + (i * 32) % 4096), 4096, true, true);
            }
        });
        for pairs in [32usize, 64, 128, 512, 1024] {
            let name = format!("A, B in L1/L2, {} k per call", 2 * pairs);
            v.time(name, per_call(pairs) * calls as f64, || unsafe {
                for i in 0..calls {
                    kernel(pairs, a.as_ptr(), b.as_ptr(), c.as_mut_ptr().add((i % 4) * 32), 1024, true, true);
                }
            });
        }
    }
    for (name, flops, s) in &v.0 {
        println!("{name:48} {:8.1} GFLOP/s (1 core)", flops / s / 1e9);
    }
}
