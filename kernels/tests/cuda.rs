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
