//! The CUDA kernels: every source compiles for sm_80 and sm_90 with NVRTC
//! (no GPU needed), and on a GPU the NF4 GEMM matches the CPU reference.
//! Without a driver the GPU tests say so and skip; without NVRTC the compile
//! test skips too, unless GRAFT_REQUIRE_NVRTC=1 (CI sets it).
#![cfg(feature = "cuda")]

mod common;

use common::*;
use graft_kernels::bf16;
use graft_kernels::cuda::{compile_ptx, DeviceNf4, Gpu, GpuError, Nf4Gemm, ARCHS, SOURCES};
use graft_kernels::nf4::{nf4_matmul, quantize};

#[test]
fn every_source_compiles_for_every_arch_with_tensor_cores() {
    for (name, src) in SOURCES {
        for arch in ARCHS {
            match compile_ptx(name, src, arch) {
                Ok(ptx) => {
                    assert!(ptx.contains(&format!(".target {arch}")), "{name} {arch}");
                    // scripts/cuda-resources.sh reads the PTX from here.
                    if let Some(dir) = std::env::var_os("GRAFT_PTX_DIR") {
                        std::fs::write(
                            std::path::Path::new(&dir).join(format!("{name}.{arch}.ptx")),
                            &ptx,
                        )
                        .unwrap();
                    }
                    if name == "nf4_gemm" {
                        assert!(
                            ptx.contains("mma.sync.aligned.m16n8k16"),
                            "{name}: no tensor-core mma"
                        );
                    }
                }
                Err(GpuError::NoNvrtc) if std::env::var("GRAFT_REQUIRE_NVRTC").is_err() => {
                    eprintln!("SKIPPED: {}", GpuError::NoNvrtc);
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIPPED (no usable GPU): {e}");
            None
        }
    }
}

#[test]
fn nf4_gemm_matches_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let gemm = Nf4Gemm::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(5);
    // Ragged M and N against the 128 tiles; K a multiple of 64.
    for (m, n, k) in [
        (1, 64, 64),
        (37, 200, 192),
        (128, 128, 512),
        (300, 384, 320),
        (513, 1000, 1024),
    ] {
        let w: Vec<f32> = (0..n * k).map(|_| r.uniform(-0.05, 0.05)).collect();
        let p = quantize(&w, 64).unwrap();
        let wv = p.view(n, k);
        let dw = DeviceNf4::upload(&gpu, &wv).unwrap();
        for tb in [true, false] {
            let (inner, width) = if tb { (k, n) } else { (n, k) };
            let x: Vec<bf16> = to_elem(&r.vec(m * inner, -1.0, 1.0));
            let mut want = vec![bf16::from_f32(f32::NAN); m * width];
            nf4_matmul(&x, &wv, m, tb, true, &mut want);
            let xd = s.clone_htod(&x).unwrap();
            // Poisoned output: every element must be written.
            let mut yd = s
                .clone_htod(&vec![bf16::from_f32(f32::NAN); m * width])
                .unwrap();
            gemm.run(&xd, &dw, m, tb, &mut yd).unwrap();
            let got: Vec<bf16> = s.clone_dtoh(&yd).unwrap();
            let e = rel_l2(&got, &to_f64(&want));
            eprintln!("nf4 gemm m={m} n={n} k={k} tb={tb}: rel L2 vs CPU {e:.2e}");
            assert!(e < 1e-2, "m={m} n={n} k={k} tb={tb}: rel L2 {e}");
        }
    }
}

#[test]
fn unsupported_weights_are_refused_clearly() {
    let Some(gpu) = gpu() else { return };
    let p = quantize(&vec![0.5; 4 * 96], 32).unwrap();
    let e = DeviceNf4::upload(&gpu, &p.view(4, 96))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("block 64") && e.contains("block 32"), "{e}");
}

/// RMSNorm (both gain forms) forward and input gradient, RoPE and its
/// inverse, SwiGLU / GeGLU forward and backward, on ragged shapes: each
/// against the CPU reference on the same bf16 inputs. bf16 outputs: the
/// bound is 1e-2 relative L2 (one bf16 rounding is 2^-9 relative).
#[test]
fn row_kernels_match_the_cpu_reference() {
    use graft_kernels::activation::{gated_act, gated_act_grad, Act};
    use graft_kernels::cuda::RowKernels;
    use graft_kernels::norm::{rms_norm, rms_norm_grad_input};
    use graft_kernels::rope::rope;
    let Some(gpu) = gpu() else { return };
    let k = RowKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(11);
    let nan = |n: usize| vec![bf16::from_f32(f32::NAN); n];
    let check = |what: String, got: &[bf16], want: &[bf16]| {
        let e = rel_l2(got, &to_f64(want));
        eprintln!("{what}: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-2, "{what}: rel L2 {e}");
    };
    for (rows, h) in [(1, 1), (3, 37), (17, 256), (64, 1000), (5, 4096)] {
        let x: Vec<bf16> = to_elem(&r.vec(rows * h, -2.0, 2.0));
        let w: Vec<bf16> = to_elem(&r.vec(h, -1.0, 1.0));
        let dy: Vec<bf16> = to_elem(&r.vec(rows * h, -1.0, 1.0));
        let (xd, wd, dyd) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&w).unwrap(),
            s.clone_htod(&dy).unwrap(),
        );
        for unit in [false, true] {
            let mut want = nan(rows * h);
            rms_norm(&x, &w, 1e-6, unit, &mut want);
            let mut yd = s.clone_htod(&nan(rows * h)).unwrap();
            k.rms_norm(&xd, &wd, 1e-6, unit, &mut yd).unwrap();
            check(
                format!("rms_norm {rows}x{h} unit={unit}"),
                &s.clone_dtoh(&yd).unwrap(),
                &want,
            );
            let mut want = nan(rows * h);
            rms_norm_grad_input(&x, &w, &dy, 1e-6, unit, &mut want);
            let mut dxd = s.clone_htod(&nan(rows * h)).unwrap();
            k.rms_norm_grad_input(&xd, &wd, &dyd, 1e-6, unit, &mut dxd)
                .unwrap();
            check(
                format!("rms_norm_grad_input {rows}x{h} unit={unit}"),
                &s.clone_dtoh(&dxd).unwrap(),
                &want,
            );
        }
    }
    for (tokens, heads, half) in [(1, 1, 1), (7, 3, 8), (129, 8, 64), (300, 2, 32)] {
        let x: Vec<bf16> = to_elem(&r.vec(tokens * heads * 2 * half, -2.0, 2.0));
        let pos: Vec<i32> = (0..tokens).map(|t| ((t * 37) % 5000) as i32).collect();
        let inv: Vec<f32> = (0..half)
            .map(|i| 10000f32.powf(-(i as f32) / half as f32))
            .collect();
        let (xd, pd, id) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&pos).unwrap(),
            s.clone_htod(&inv).unwrap(),
        );
        for inverse in [false, true] {
            let mut want = nan(x.len());
            rope(&x, &pos, &inv, heads, inverse, &mut want);
            let mut yd = s.clone_htod(&nan(x.len())).unwrap();
            k.rope(&xd, &pd, &id, heads, inverse, &mut yd).unwrap();
            check(
                format!("rope {tokens}x{heads}x{half} inverse={inverse}"),
                &s.clone_dtoh(&yd).unwrap(),
                &want,
            );
        }
    }
    for n in [1, 1000, 70_001] {
        let g: Vec<bf16> = to_elem(&r.vec(n, -6.0, 6.0));
        let u: Vec<bf16> = to_elem(&r.vec(n, -2.0, 2.0));
        let dy: Vec<bf16> = to_elem(&r.vec(n, -1.0, 1.0));
        let (gd, ud, dyd) = (
            s.clone_htod(&g).unwrap(),
            s.clone_htod(&u).unwrap(),
            s.clone_htod(&dy).unwrap(),
        );
        for a in [Act::Silu, Act::GeluTanh] {
            let mut want = nan(n);
            gated_act(a, &g, &u, &mut want);
            let mut yd = s.clone_htod(&nan(n)).unwrap();
            k.gated_act(a, &gd, &ud, &mut yd).unwrap();
            check(
                format!("gated_act {a:?} n={n}"),
                &s.clone_dtoh(&yd).unwrap(),
                &want,
            );
            let (mut wg, mut wu) = (nan(n), nan(n));
            gated_act_grad(a, &g, &u, &dy, &mut wg, &mut wu);
            let (mut dg, mut du) = (
                s.clone_htod(&nan(n)).unwrap(),
                s.clone_htod(&nan(n)).unwrap(),
            );
            k.gated_act_grad(a, &gd, &ud, &dyd, &mut dg, &mut du)
                .unwrap();
            check(
                format!("gated_act_grad {a:?} dgate n={n}"),
                &s.clone_dtoh(&dg).unwrap(),
                &wg,
            );
            check(
                format!("gated_act_grad {a:?} dup n={n}"),
                &s.clone_dtoh(&du).unwrap(),
                &wu,
            );
        }
    }
}
