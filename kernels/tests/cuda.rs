//! The CUDA kernels: every source compiles for sm_80 and sm_90 with NVRTC
//! (no GPU needed), and on a GPU every kernel matches the CPU reference.
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
                    if matches!(name, "nf4_gemm" | "attention") {
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
        // The whole weight dequantized (the executor's path to cuBLAS):
        // bit for bit the CPU's dequantized values rounded to bf16.
        let mut wd = s
            .clone_htod(&vec![bf16::from_f32(f32::NAN); n * k])
            .unwrap();
        gemm.dequantize(&dw, &mut wd).unwrap();
        let got: Vec<bf16> = s.clone_dtoh(&wd).unwrap();
        // And in f32 (f32 compute): the CPU's values unrounded.
        let mut wd32 = s.clone_htod(&vec![f32::NAN; n * k]).unwrap();
        gemm.dequantize(&dw, &mut wd32).unwrap();
        let got32: Vec<f32> = s.clone_dtoh(&wd32).unwrap();
        let mut row = vec![0f32; k];
        let (mut differ, mut differ32) = (0, 0);
        for (o, (got_row, got32_row)) in got.chunks(k).zip(got32.chunks(k)).enumerate() {
            wv.dequantize_into(o * k, &mut row);
            differ += got_row
                .iter()
                .zip(&row)
                .filter(|(g, w)| g.to_bits() != bf16::from_f32(**w).to_bits())
                .count();
            differ32 += got32_row
                .iter()
                .zip(&row)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
        }
        eprintln!(
            "nf4 dequantize n={n} k={k}: {differ} bf16 and {differ32} f32 values differ from the CPU's"
        );
        assert_eq!((differ, differ32), (0, 0), "nf4 dequantize n={n} k={k}");
    }
}

/// The GEMV of generation's few rows against the CPU's `nf4_matmul` on the
/// same weights: 1 to 8 rows, weight rows not a multiple of a block's 8
/// warps; bf16 x (bf16 compute) to f32 and bf16 outputs, f32 x (f32
/// compute) to f32; scaled, and added to what the output held (beta 1).
/// Nine rows are refused, and f32 x to a bf16 output.
#[test]
fn nf4_gemv_matches_the_cpu_reference() {
    use graft_kernels::cuda::NF4_GEMV_MAX_M;
    let Some(gpu) = gpu() else { return };
    let gemm = Nf4Gemm::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(11);
    for (m, n, k) in [(1, 37, 64), (3, 200, 2112), (8, 1000, 576), (5, 4096, 4096)] {
        let w: Vec<f32> = (0..n * k).map(|_| r.uniform(-0.05, 0.05)).collect();
        let p = quantize(&w, 64).unwrap();
        let wv = p.view(n, k);
        let dw = DeviceNf4::upload(&gpu, &wv).unwrap();
        let x: Vec<bf16> = to_elem(&r.vec(m * k, -1.0, 1.0));
        let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut prod = vec![0f32; m * n];
        nf4_matmul(&x32, &wv, m, true, true, &mut prod);
        let xd = s.clone_htod(&x).unwrap();
        let prior = r.vec(m * n, -1.0, 1.0);
        let (scale, what) = (0.5f32, format!("nf4 gemv m={m} n={n} k={k}"));
        // f32 out, beta 0 over NaN (not read), then beta 1.
        for beta in [0.0f32, 1.0] {
            let y0 = if beta == 0.0 {
                vec![f32::NAN; m * n]
            } else {
                prior.clone()
            };
            let want: Vec<f64> = prod
                .iter()
                .zip(&prior)
                .map(|(&p, &y)| (scale * p) as f64 + if beta == 0.0 { 0.0 } else { y as f64 })
                .collect();
            let mut yd = s.clone_htod(&y0).unwrap();
            gemm.gemv(&xd, &dw, m, scale, beta, &mut yd).unwrap();
            let e = rel_l2(&s.clone_dtoh(&yd).unwrap(), &want);
            eprintln!("{what} f32 beta={beta}: rel L2 vs CPU {e:.2e}");
            assert!(e < 1e-5, "{what} f32 beta={beta}: {e}");
        }
        let want: Vec<f64> = prod.iter().map(|&p| (scale * p) as f64).collect();
        let mut yd = s
            .clone_htod(&vec![bf16::from_f32(f32::NAN); m * n])
            .unwrap();
        gemm.gemv(&xd, &dw, m, scale, 0.0, &mut yd).unwrap();
        let e = rel_l2(&s.clone_dtoh(&yd).unwrap(), &want);
        eprintln!("{what} bf16: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-2, "{what} bf16: {e}");
        // f32 compute: f32 x against the CPU's f32 product (weights
        // unrounded), added to what y held.
        let x32 = r.vec(m * k, -1.0, 1.0);
        let mut prod32 = vec![0f32; m * n];
        nf4_matmul(&x32, &wv, m, true, false, &mut prod32);
        let want: Vec<f64> = prod32
            .iter()
            .zip(&prior)
            .map(|(&p, &y)| (scale * p) as f64 + y as f64)
            .collect();
        let mut yd = s.clone_htod(&prior).unwrap();
        gemm.gemv(&s.clone_htod(&x32).unwrap(), &dw, m, scale, 1.0, &mut yd)
            .unwrap();
        let e = rel_l2(&s.clone_dtoh(&yd).unwrap(), &want);
        eprintln!("{what} f32 x: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what} f32 x: {e}");
    }
    // f32 x writes f32 y only.
    let w1 = quantize(&vec![0.01f32; 64 * 64], 64).unwrap();
    let dw1 = DeviceNf4::upload(&gpu, &w1.view(64, 64)).unwrap();
    let e = gemm
        .gemv(
            &s.clone_htod(&[0f32; 64]).unwrap(),
            &dw1,
            1,
            1.0,
            0.0,
            &mut s.clone_htod(&[bf16::ZERO; 64]).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("f32 x writes f32 y"), "{e}");
    let w = quantize(&vec![0.01f32; 64 * 64], 64).unwrap();
    let dw = DeviceNf4::upload(&gpu, &w.view(64, 64)).unwrap();
    let m = NF4_GEMV_MAX_M + 1;
    let xd = s.clone_htod(&vec![bf16::ZERO; m * 64]).unwrap();
    let mut yd = s.clone_htod(&vec![0f32; m * 64]).unwrap();
    let e = gemm
        .gemv(&xd, &dw, m, 1.0, 0.0, &mut yd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("up to 8"), "{e}");
}

/// The NF4 GEMM's epilogue (LoRA term, addend, column scale; each alone
/// and all together) against the CPU's bf16 `gemm_sum` of the same terms,
/// forward and input gradient, ranks below, at and past one 16-rank
/// staging round.
#[test]
fn nf4_gemm_epilogue_matches_the_cpu_gemm_sum() {
    use graft_kernels::cuda::{LoraTerm, Nf4Epilogue};
    use graft_kernels::gemm::{gemm_sum, Epilogue, Operand, Term};
    let Some(gpu) = gpu() else { return };
    let gemm = Nf4Gemm::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut g = Gen::new(9);
    // rsLoRA's 16/√r: a scale that is not a power of two, so rounding the
    // factor before or after scaling it differs.
    let scale = 16.0 / 20f32.sqrt();
    // An odd width (scalar stores; an input gradient whose X rows are not
    // 16-byte runs).
    for (m, n, k, r) in [
        (37, 201, 192, 4),
        (300, 384, 320, 16),
        (513, 1000, 1024, 20),
    ] {
        let w: Vec<f32> = (0..n * k).map(|_| g.uniform(-0.05, 0.05)).collect();
        let p = quantize(&w, 64).unwrap();
        let wv = p.view(n, k);
        let dw = DeviceNf4::upload(&gpu, &wv).unwrap();
        for tb in [true, false] {
            let (inner, width) = if tb { (k, n) } else { (n, k) };
            let x: Vec<bf16> = to_elem(&g.vec(m * inner, -1.0, 1.0));
            let la = g.vec(m * r, -1.0, 1.0);
            // lora_B [width, r] in the forward, lora_A [r, width] in the input gradient.
            let lb = g.vec(width * r, -0.5, 0.5);
            let add: Vec<bf16> = to_elem(&g.vec(m * width, -1.0, 1.0));
            let cs = g.vec(width, 0.5, 1.5);
            let (xd, lad, lbd, addd, csd) = (
                s.clone_htod(&x).unwrap(),
                s.clone_htod(&la).unwrap(),
                s.clone_htod(&lb).unwrap(),
                s.clone_htod(&add).unwrap(),
                s.clone_htod(&cs).unwrap(),
            );
            for (with_lora, with_add, with_scale) in [
                (true, false, false),
                (false, true, false),
                (false, false, true),
                (true, true, true),
            ] {
                let mut terms = vec![Term {
                    a: Operand::Bf16(&x),
                    b: Operand::Nf4(&wv),
                    k: inner,
                    ta: false,
                    tb,
                    scale: 1.0,
                }];
                if with_lora {
                    terms.push(Term {
                        a: Operand::F32(&la),
                        b: Operand::F32(&lb),
                        k: r,
                        ta: false,
                        tb,
                        scale,
                    });
                }
                let mut want = vec![bf16::from_f32(f32::NAN); m * width];
                gemm_sum(
                    &terms,
                    with_add.then_some(Operand::Bf16(&add)),
                    with_scale.then_some(Epilogue::ScaleCols(&cs)),
                    &mut want,
                    (m, width),
                    true,
                );
                let epi = Nf4Epilogue {
                    lora: with_lora.then_some(LoraTerm {
                        a: &lad,
                        b: &lbd,
                        r,
                        scale,
                    }),
                    addend: with_add.then_some(&addd),
                    col_scale: with_scale.then_some(&csd),
                };
                let mut yd = s
                    .clone_htod(&vec![bf16::from_f32(f32::NAN); m * width])
                    .unwrap();
                gemm.run_fused(&xd, &dw, m, tb, &epi, &mut yd).unwrap();
                let got: Vec<bf16> = s.clone_dtoh(&yd).unwrap();
                let e = rel_l2(&got, &to_f64(&want));
                let what = format!(
                    "nf4 gemm epilogue m={m} n={n} k={k} r={r} tb={tb} lora={with_lora} addend={with_add} scale={with_scale}"
                );
                eprintln!("{what}: rel L2 vs CPU {e:.2e}");
                assert!(e < 1e-2, "{what}: rel L2 {e}");
            }
            // A LoRA factor of the wrong length is refused, naming it.
            let epi = Nf4Epilogue {
                lora: Some(LoraTerm {
                    a: &lad,
                    b: &lbd,
                    r: r + 1,
                    scale: 1.0,
                }),
                ..Nf4Epilogue::default()
            };
            let mut yd = s.alloc_zeros::<bf16>(m * width).unwrap();
            let e = gemm.run_fused(&xd, &dw, m, tb, &epi, &mut yd).unwrap_err();
            assert!(e.to_string().contains("LoRA a"), "{e}");
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

/// RMSNorm (both gain forms) forward, input and weight gradients, RoPE and its
/// inverse, SwiGLU / GeGLU forward and backward, on ragged shapes: each
/// against the CPU reference on the same inputs, bf16 and f32 (full
/// fine-tuning's). The bound is 1e-2 relative L2 for bf16 outputs (one bf16
/// rounding is 2^-9 relative), 1e-5 for f32.
#[test]
fn row_kernels_match_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    row_kernels_case::<bf16>(&gpu, 1e-2);
    row_kernels_case::<f32>(&gpu, 1e-5);
}

fn row_kernels_case<T: graft_kernels::Elem + graft_kernels::cuda::DeviceElem>(
    gpu: &Gpu,
    bound: f64,
) {
    use graft_kernels::activation::{gated_act, gated_act_grad, Act};
    use graft_kernels::cuda::RowKernels;
    use graft_kernels::norm::{rms_norm, rms_norm_grad_input, rms_norm_grad_weight};
    use graft_kernels::rope::rope;
    let k = RowKernels::new(gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(11);
    let nan = |n: usize| nan_buf::<T>(n);
    let ty = type_label::<T>();
    let check = |what: String, got: &[T], want: &[T]| {
        let e = rel_l2(got, &to_f64(want));
        eprintln!("{what} {ty}: rel L2 vs CPU {e:.2e}");
        assert!(e < bound, "{what} {ty}: rel L2 {e}");
    };
    for (rows, h) in [(1, 1), (3, 37), (17, 256), (64, 1000), (5, 4096)] {
        let x: Vec<T> = to_elem(&r.vec(rows * h, -2.0, 2.0));
        let w: Vec<T> = to_elem(&r.vec(h, -1.0, 1.0));
        let dy: Vec<T> = to_elem(&r.vec(rows * h, -1.0, 1.0));
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
        let mut want = nan(h);
        rms_norm_grad_weight(&x, &dy, 1e-6, &mut want);
        let mut rd = s.clone_htod(&vec![f32::NAN; rows]).unwrap();
        let mut dwd = s.clone_htod(&nan(h)).unwrap();
        k.rms_norm_grad_weight(&xd, &dyd, 1e-6, &mut rd, &mut dwd)
            .unwrap();
        check(
            format!("rms_norm_grad_weight {rows}x{h}"),
            &s.clone_dtoh(&dwd).unwrap(),
            &want,
        );
    }
    for (tokens, heads, half) in [(1, 1, 1), (7, 3, 8), (129, 8, 64), (300, 2, 32)] {
        let x: Vec<T> = to_elem(&r.vec(tokens * heads * 2 * half, -2.0, 2.0));
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
        let g: Vec<T> = to_elem(&r.vec(n, -6.0, 6.0));
        let u: Vec<T> = to_elem(&r.vec(n, -2.0, 2.0));
        let dy: Vec<T> = to_elem(&r.vec(n, -1.0, 1.0));
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

/// The logits' gradient alone (the unfused cross-entropy's backward, as
/// f32 steps record it) against the CPU's `cross_entropy_grad`, f32 logits
/// (bound 1e-5) and bf16 (1e-2), `dloss` read on the device, some rows
/// ignored; every output starts as NaN.
#[test]
fn cross_entropy_grad_alone_matches_the_cpu_reference() {
    use graft_kernels::cuda::{DeviceIds, LossKernels};
    use graft_kernels::loss::cross_entropy_grad;
    let Some(gpu) = gpu() else { return };
    let k = LossKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(23);
    let (ignore, dloss) = (-100, 0.7f32);
    for (rows, vocab) in [(1, 1), (5, 7), (64, 1000), (9, 32_001)] {
        let labels: Vec<i32> = (0..rows)
            .map(|i| {
                if i % 4 == 3 {
                    ignore
                } else {
                    r.below(vocab) as i32
                }
            })
            .collect();
        let dev = DeviceIds::upload(&gpu, &labels).unwrap();
        let x32 = r.vec(rows * vocab, -4.0, 4.0);
        let dl = s.clone_htod(&[dloss]).unwrap();
        let what = format!("cross_entropy_grad {rows}x{vocab}");
        let mut want = nan_buf::<f32>(rows * vocab);
        cross_entropy_grad(&x32, &labels, ignore, dloss, &mut want).unwrap();
        let mut got = s.clone_htod(&nan_buf::<f32>(rows * vocab)).unwrap();
        k.grad(
            &s.clone_htod(&x32).unwrap(),
            dev.view(),
            ignore,
            &dl,
            &mut got,
        )
        .unwrap();
        let e = rel_l2(&s.clone_dtoh(&got).unwrap(), &to_f64(&want));
        eprintln!("{what} f32: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what} f32: {e}");
        let xb: Vec<bf16> = to_elem(&x32);
        let mut want = nan_buf::<bf16>(rows * vocab);
        cross_entropy_grad(&xb, &labels, ignore, dloss, &mut want).unwrap();
        let mut got = s.clone_htod(&nan_buf::<bf16>(rows * vocab)).unwrap();
        k.grad(
            &s.clone_htod(&xb).unwrap(),
            dev.view(),
            ignore,
            &dl,
            &mut got,
        )
        .unwrap();
        let e = rel_l2(&s.clone_dtoh(&got).unwrap(), &to_f64(&want));
        eprintln!("{what} bf16: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-2, "{what} bf16: {e}");
    }
}

/// Cross-entropy forward and gradient in one kernel, on ragged vocabularies
/// (1 to Llama 3's 128,256, mostly not multiples of the 256-thread block),
/// rows with ignored labels (an ignore index outside the vocabulary and one
/// inside it), wide logits, and no counted row at all: the mean loss and
/// per-row losses (f32, bound 1e-5 relative to losses of at least 1) and the
/// bf16 gradient (bound 1e-2) against the CPU reference. Bad labels are
/// refused on the host.
#[test]
fn cross_entropy_matches_the_cpu_reference() {
    use graft_kernels::cuda::{DeviceIds, LossKernels};
    use graft_kernels::loss::{cross_entropy, cross_entropy_grad};
    let Some(gpu) = gpu() else { return };
    let k = LossKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(17);
    // (rows, vocab, 1 in `skip` rows ignored (0: none), ignore index, dloss, logit range)
    for (rows, vocab, skip, ignore, dloss, range) in [
        (1, 1, 0, -100, 1.0, 4.0),
        (3, 2, 0, -100, 1.0, 4.0),
        (5, 7, 2, -100, 0.5, 4.0),
        (17, 255, 3, -100, 1.0, 4.0),
        (64, 1000, 4, 3, 1.0, 4.0),
        (33, 32_001, 5, -100, 2.0, 30.0),
        (300, 5000, 3, -100, 1.0, 8.0),
        (4, 128_256, 2, -100, 1.0, 4.0),
        (6, 50, 1, -100, 1.0, 4.0),
    ] {
        let what = format!("cross_entropy {rows}x{vocab} ignore={ignore} dloss={dloss}");
        let logits: Vec<bf16> = to_elem(&r.vec(rows * vocab, -range, range));
        let mut labels: Vec<i32> = (0..rows)
            .map(|_| match skip > 0 && r.below(skip) == 0 {
                true => ignore,
                false => r.below(vocab) as i32,
            })
            .collect();
        if skip != 1 && labels.iter().all(|&l| l == ignore) {
            labels[0] = 0.max(ignore + 1) % vocab as i32;
        }
        let counted = labels.iter().filter(|&&l| l != ignore).count();
        let want_loss = cross_entropy(&logits, &labels, ignore).unwrap();
        let mut want_grad = nan_buf::<bf16>(rows * vocab);
        cross_entropy_grad(&logits, &labels, ignore, dloss, &mut want_grad).unwrap();
        let want_rows: Vec<f64> = (0..rows)
            .map(|t| match labels[t] == ignore {
                true => 0.0,
                false => cross_entropy(&logits[t * vocab..][..vocab], &labels[t..=t], ignore)
                    .unwrap() as f64,
            })
            .collect();

        let ids = DeviceIds::upload(&gpu, &labels).unwrap();
        let ld = s.clone_htod(&logits).unwrap();
        let mut dd = s.clone_htod(&nan_buf::<bf16>(rows * vocab)).unwrap();
        let mut rl = s.clone_htod(&nan_buf::<f32>(rows)).unwrap();
        let mut lo = s.clone_htod(&[f32::NAN]).unwrap();
        k.cross_entropy(&ld, ids.view(), ignore, dloss, &mut dd, &mut rl, &mut lo)
            .unwrap();
        let got_loss = s.clone_dtoh(&lo).unwrap()[0];
        let e = rel_l2(&s.clone_dtoh(&dd).unwrap(), &to_f64(&want_grad));
        eprintln!("{what} dlogits: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-2, "{what} dlogits: rel L2 {e}");
        // A loss is `lse − x[label]`, exact to about an ulp of lse on either
        // side: relative to losses of at least 1 (a small loss is a
        // cancellation, e.g. 2 classes with the label far ahead).
        let floor = (rows as f64).sqrt();
        let e = rel_l2_floor(&s.clone_dtoh(&rl).unwrap(), &want_rows, floor);
        eprintln!("{what} row losses: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what} row losses: rel L2 {e}");
        if counted == 0 {
            eprintln!("{what} mean loss: {got_loss} (CPU {want_loss}; nothing counted)");
            assert!(
                got_loss.is_nan() && want_loss.is_nan(),
                "{what}: {got_loss}"
            );
        } else {
            let e = rel_l2_floor(&[got_loss], &[want_loss as f64], 1.0);
            eprintln!("{what} mean loss {got_loss}: rel L2 vs CPU {e:.2e}");
            assert!(e < 1e-5, "{what} mean loss: {got_loss} vs {want_loss}");
        }
        // The loss alone (eval plans), of the same bf16 logits and of f32
        // ones, against the CPU's: the same value up to summation order.
        let logits32: Vec<f32> = r.vec(rows * vocab, -range, range);
        let want32 = cross_entropy(&logits32, &labels, ignore).unwrap();
        let l32 = s.clone_htod(&logits32).unwrap();
        for (kind, want) in [("bf16", want_loss), ("f32", want32)] {
            let mut rl = s.clone_htod(&nan_buf::<f32>(rows)).unwrap();
            let mut lo = s.clone_htod(&[f32::NAN]).unwrap();
            match kind {
                "bf16" => k.loss_only(&ld, ids.view(), ignore, &mut rl, &mut lo),
                _ => k.loss_only(&l32, ids.view(), ignore, &mut rl, &mut lo),
            }
            .unwrap();
            let got = s.clone_dtoh(&lo).unwrap()[0];
            if counted == 0 {
                assert!(got.is_nan(), "{what} {kind} loss alone: {got}");
                continue;
            }
            let e = rel_l2_floor(&[got], &[want as f64], 1.0);
            eprintln!("{what} {kind} loss alone {got}: rel L2 vs CPU {e:.2e}");
            assert!(e < 1e-5, "{what} {kind} loss alone: {got} vs {want}");
        }
    }
    // A label outside the vocabulary that is not the ignore index.
    let (rows, vocab) = (3, 10);
    let ld = s.clone_htod(&nan_buf::<bf16>(rows * vocab)).unwrap();
    let mut dd = s.clone_htod(&nan_buf::<bf16>(rows * vocab)).unwrap();
    let mut rl = s.clone_htod(&nan_buf::<f32>(rows)).unwrap();
    let mut lo = s.clone_htod(&[f32::NAN]).unwrap();
    for bad in [10, -1] {
        let ids = DeviceIds::upload(&gpu, &[0, bad, -100]).unwrap();
        let e = k
            .cross_entropy(&ld, ids.view(), -100, 1.0, &mut dd, &mut rl, &mut lo)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("label {bad} at position 1")), "{e}");
    }
}

/// Embedding lookup (bf16, and f32 bit for bit) and gradient (f32 sums of bf16 rows,
/// many repeated ids, most rows of the table untouched and so zero) against
/// the CPU reference; out-of-range ids are refused on the host.
#[test]
fn embedding_matches_the_cpu_reference() {
    use graft_kernels::cuda::{DeviceIds, EmbeddingKernels};
    use graft_kernels::embedding::{embedding, embedding_grad};
    let Some(gpu) = gpu() else { return };
    let k = EmbeddingKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(19);
    // (vocab, h, tokens, distinct ids drawn from)
    for (vocab, h, tokens, distinct) in [
        (1, 1, 1, 1),
        (7, 3, 20, 3),
        (1000, 37, 300, 1000),
        (32_000, 256, 513, 40),
        (50, 4096, 64, 50),
        (128_256, 64, 2048, 128_256),
        (10, 300, 1000, 1),
    ] {
        let what = format!("embedding vocab={vocab} h={h} tokens={tokens}");
        let pool: Vec<i32> = (0..distinct).map(|_| r.below(vocab) as i32).collect();
        let ids: Vec<i32> = (0..tokens).map(|_| pool[r.below(distinct)]).collect();
        let table: Vec<bf16> = to_elem(&r.vec(vocab * h, -1.0, 1.0));
        let dy: Vec<bf16> = to_elem(&r.vec(tokens * h, -1.0, 1.0));
        let dev = DeviceIds::upload(&gpu, &ids).unwrap();

        let mut want = nan_buf::<bf16>(tokens * h);
        embedding(&table, &ids, h, &mut want).unwrap();
        let td = s.clone_htod(&table).unwrap();
        let mut yd = s.clone_htod(&nan_buf::<bf16>(tokens * h)).unwrap();
        k.embedding(&td, dev.view(), h, &mut yd).unwrap();
        let e = rel_l2(&s.clone_dtoh(&yd).unwrap(), &to_f64(&want));
        eprintln!("{what} forward: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-2, "{what} forward: rel L2 {e}");
        // f32 rows (full fine-tuning's): a copy, bit for bit.
        let table32: Vec<f32> = table.iter().map(|v| v.to_f32()).collect();
        let mut want32 = nan_buf::<f32>(tokens * h);
        embedding(&table32, &ids, h, &mut want32).unwrap();
        let mut yd32 = s.clone_htod(&nan_buf::<f32>(tokens * h)).unwrap();
        k.embedding(&s.clone_htod(&table32).unwrap(), dev.view(), h, &mut yd32)
            .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&s.clone_dtoh(&yd32).unwrap()),
            bits(&want32),
            "{what} f32 forward"
        );

        let dy32: Vec<f32> = dy.iter().map(|v| v.to_f32()).collect();
        let mut want = nan_buf::<f32>(vocab * h);
        embedding_grad(&dy32, &ids, h, &mut want).unwrap();
        let dyd = s.clone_htod(&dy).unwrap();
        let mut dtd = s.clone_htod(&nan_buf::<f32>(vocab * h)).unwrap();
        k.embedding_grad(&dyd, &dev, h, &mut dtd).unwrap();
        let e = rel_l2(&s.clone_dtoh(&dtd).unwrap(), &to_f64(&want));
        eprintln!("{what} gradient: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what} gradient: rel L2 {e}");
        // From f32 rows (full fine-tuning's): the CPU's order of f32 sums,
        // so bit for bit.
        let mut dtd32 = s.clone_htod(&nan_buf::<f32>(vocab * h)).unwrap();
        k.embedding_grad(&s.clone_htod(&dy32).unwrap(), &dev, h, &mut dtd32)
            .unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&dtd32).unwrap()),
            bits(&want),
            "{what} f32 gradient"
        );
        // Other ids of the same count, refilled in place.
        let mut dev = dev;
        let ids2: Vec<i32> = ids.iter().rev().map(|&i| (i + 1) % vocab as i32).collect();
        dev.update(&gpu, &ids2).unwrap();
        let mut want2 = nan_buf::<f32>(vocab * h);
        embedding_grad(&dy32, &ids2, h, &mut want2).unwrap();
        k.embedding_grad(&s.clone_htod(&dy32).unwrap(), &dev, h, &mut dtd32)
            .unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&dtd32).unwrap()),
            bits(&want2),
            "{what} f32 gradient after DeviceIds::update"
        );
    }
    let (vocab, h) = (5, 8);
    let td = s.clone_htod(&nan_buf::<bf16>(vocab * h)).unwrap();
    let mut dtd = s.clone_htod(&nan_buf::<f32>(vocab * h)).unwrap();
    let mut yd = s.clone_htod(&nan_buf::<bf16>(3 * h)).unwrap();
    let dyd = s.clone_htod(&nan_buf::<bf16>(3 * h)).unwrap();
    for bad in [5, -1] {
        let ids = DeviceIds::upload(&gpu, &[0, 4, bad]).unwrap();
        let want = format!("token id {bad} at position 2");
        let e = k
            .embedding(&td, ids.view(), h, &mut yd)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&want), "{e}");
        let e = k
            .embedding_grad(&dyd, &ids, h, &mut dtd)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&want), "{e}");
    }
}

/// AdamW (three steps, both branches of ATen's lerp, with and without
/// weight decay) and LOMO's SGD (clipping, coefficient, weight decay, and
/// the squared gradient norm reduced on the device) on f32 parameters of
/// ragged sizes, against the CPU's `adamw_update` and `sgd_update`: the
/// parameters, their change, the moments and the norm, bound 1e-5 (the
/// arithmetic is the CPU's operation by operation, so 0 is expected).
#[test]
fn optimizer_updates_match_the_cpu_reference() {
    use graft_kernels::cuda::UpdateKernels;
    use graft_kernels::update::{adamw_update, sgd_update, AdamWStep};
    let Some(gpu) = gpu() else { return };
    let k = UpdateKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(23);
    let close = |what: String, got: &[f32], want: &[f64]| {
        let e = rel_l2(got, want);
        eprintln!("{what}: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what}: rel L2 {e}");
    };
    // The parameters, and their change from `p0` (small beside them).
    let close_params = |what: &str, got: &[f32], want: &[f32], p0: &[f32]| {
        let change = |p: &[f32]| -> Vec<f32> { p.iter().zip(p0).map(|(a, b)| a - b).collect() };
        close(format!("{what} p"), got, &to_f64(want));
        close(
            format!("{what} p change"),
            &change(got),
            &to_f64(&change(want)),
        );
    };
    for n in [1, 1000, 70_001, 1_000_003] {
        for (beta1, beta2, wd) in [(0.9, 0.999, 0.01), (0.3, 0.99, 0.0)] {
            let what = format!("adamw n={n} beta1={beta1} wd={wd}");
            let p0 = r.vec(n, -1.0, 1.0);
            let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
            let mut pd = s.clone_htod(&p0).unwrap();
            let mut md = s.clone_htod(&m).unwrap();
            let mut vd = s.clone_htod(&v).unwrap();
            for t in 1..=3 {
                let g = r.vec(n, -0.5, 0.5);
                let st = AdamWStep::new(1e-2 * t as f64, beta1, beta2, 1e-8, wd, t);
                adamw_update(&mut p, &g, &mut m, &mut v, &st);
                let gd = s.clone_htod(&g).unwrap();
                k.adamw(&mut pd, &gd, &mut md, &mut vd, &st).unwrap();
            }
            let got = s.clone_dtoh(&pd).unwrap();
            close_params(&what, &got, &p, &p0);
            close(
                format!("{what} m"),
                &s.clone_dtoh(&md).unwrap(),
                &to_f64(&m),
            );
            close(
                format!("{what} v"),
                &s.clone_dtoh(&vd).unwrap(),
                &to_f64(&v),
            );
        }
        for (lr, coef, wd, clip) in [
            (0.01f32, 1.0f32, 0.0f32, 0.0f32),
            (0.05, 0.3, 0.01, 0.0),
            (0.02, 0.7, 0.1, 0.5),
        ] {
            let what = format!("sgd n={n} lr={lr} coef={coef} wd={wd} clip={clip}");
            let p0 = r.vec(n, -1.0, 1.0);
            let g = r.vec(n, -2.0, 2.0);
            let mut p = p0.clone();
            let sq = sgd_update(&mut p, &g, lr, coef, wd, clip);
            let mut pd = s.clone_htod(&p0).unwrap();
            let gd = s.clone_htod(&g).unwrap();
            let (lrd, cd) = (s.clone_htod(&[lr]).unwrap(), s.clone_htod(&[coef]).unwrap());
            let mut sqd = s.clone_htod(&[f32::NAN]).unwrap();
            k.sgd(&mut pd, &gd, &lrd, &cd, wd, clip, &mut sqd).unwrap();
            let got = s.clone_dtoh(&pd).unwrap();
            close_params(&what, &got, &p, &p0);
            close(
                format!("{what} squared grad norm"),
                &s.clone_dtoh(&sqd).unwrap(),
                &[sq],
            );
        }
    }
}

/// AdaLomo on the GPU against the CPU's `adalomo_update`: matrices of
/// ragged shapes (factored second moment: 1×1, a row, a column, 37×70,
/// 300×4097) and vectors (full second moment), three steps each with
/// clipping, a coefficient and weight decay, then a measuring step at
/// lr 0 that must leave the parameter and the state bit for bit. Bound
/// 1e-5 on the parameters, their change, the state and the squared
/// gradient norm (both sum the means and norms in f64, in different orders).
#[test]
fn adalomo_matches_the_cpu_reference() {
    use graft_kernels::cuda::UpdateKernels;
    use graft_kernels::update::{adalomo_update, AdaLomo};
    let Some(gpu) = gpu() else { return };
    let k = UpdateKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(31);
    let close = |what: String, got: &[f32], want: &[f32]| {
        let e = rel_l2(got, &to_f64(want));
        eprintln!("{what}: rel L2 vs CPU {e:.2e}");
        assert!(e < 1e-5, "{what}: rel L2 {e}");
    };
    let shapes: [(usize, usize, bool); 8] = [
        (1, 1, true),
        (1, 513, true),
        (700, 1, true),
        (37, 70, true),
        (300, 4097, true),
        (1, 1, false),
        (1, 1000, false),
        (1, 70_001, false),
    ];
    for (rows, cols, factored) in shapes {
        let n = rows * cols;
        let h = AdaLomo {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: if factored { 0.01 } else { 0.0 },
            clip_value: if factored { 0.3 } else { 0.0 },
        };
        let (rn, cn) = if factored { (rows, cols) } else { (n, 1) };
        let p0 = r.vec(n, -1.0, 1.0);
        let (mut p, mut row, mut col) = (p0.clone(), vec![0f32; rn], vec![0f32; cn]);
        let mut pd = s.clone_htod(&p).unwrap();
        let mut rowd = s.clone_htod(&row).unwrap();
        let mut cold = s.clone_htod(&col).unwrap();
        let shape = factored.then_some((rows, cols));
        for t in 1..=4u64 {
            let what = format!("adalomo {rows}x{cols} factored={factored} t={t}");
            let (lr, coef) = (
                if t == 4 { 0.0 } else { 0.05f32 },
                if t == 2 { 0.6f32 } else { 1.0 },
            );
            let g = r.vec(n, -0.5, 0.5);
            let before = (p.clone(), row.clone(), col.clone());
            let sq = adalomo_update(&mut p, &g, &mut row, &mut col, factored, t, lr, coef, &h);
            let gd = s.clone_htod(&g).unwrap();
            let scalars = [lr, coef, t as f32].map(|x| s.clone_htod(&[x]).unwrap());
            let mut sqd = s.clone_htod(&[f32::NAN]).unwrap();
            let before_d = (
                s.clone_dtoh(&pd).unwrap(),
                s.clone_dtoh(&rowd).unwrap(),
                s.clone_dtoh(&cold).unwrap(),
            );
            k.adalomo(
                &mut pd,
                &gd,
                &mut rowd,
                &mut cold,
                shape,
                (&scalars[0], &scalars[1], &scalars[2]),
                &h,
                &mut sqd,
            )
            .unwrap();
            let got = s.clone_dtoh(&pd).unwrap();
            close(
                format!("{what} squared grad norm"),
                &s.clone_dtoh(&sqd).unwrap(),
                &[sq as f32],
            );
            if lr == 0.0 {
                let state = (s.clone_dtoh(&rowd).unwrap(), s.clone_dtoh(&cold).unwrap());
                assert_eq!(got, before_d.0, "{what}: lr 0 changed the parameter");
                assert_eq!(
                    state,
                    (before_d.1, before_d.2),
                    "{what}: lr 0 changed the state"
                );
                assert_eq!((&p, &row, &col), (&before.0, &before.1, &before.2));
                continue;
            }
            close(format!("{what} p"), &got, &p);
            let change =
                |q: &[f32]| -> Vec<f32> { q.iter().zip(&before.0).map(|(a, b)| a - b).collect() };
            close(format!("{what} p change"), &change(&got), &change(&p));
            close(format!("{what} row"), &s.clone_dtoh(&rowd).unwrap(), &row);
            if factored {
                close(format!("{what} col"), &s.clone_dtoh(&cold).unwrap(), &col);
            }
        }
    }
}

/// Causal attention forward and backward against the CPU reference on the
/// same bf16 inputs: ragged lengths (1, under a tile, a tile, several tiles,
/// none a multiple of the dkdv kernel's 32-query steps but one), 4 query
/// heads over 1, 2 and 4 kv heads, head dims 64 and 128, 1 to 3 packed
/// segments, with and without a sliding window. Every output starts as NaN;
/// the bound is 1e-2 relative L2 for out, lse, dq, dk and dv (bf16 outputs,
/// probabilities rounded to bf16 for the products on both sides). The
/// backward takes the GPU forward's own out and lse, as a training step
/// does, runs twice and must be bit-identical. Bad shapes and segments are
/// refused on the host.
#[test]
fn attention_matches_the_cpu_reference() {
    use graft_kernels::attention::AttnShape;
    use graft_kernels::cuda::{AttentionKernels, DeviceSegments};
    let Some(gpu) = gpu() else { return };
    let kern = AttentionKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(29);
    // (tokens, kv heads, head dim, window, segments) over 4 query heads
    for (t, kv, d, window, segments) in [
        (1, 1, 64, None, 1),
        (37, 2, 64, None, 3),
        (96, 2, 32, None, 2),
        (150, 1, 32, Some(40), 3),
        (64, 4, 128, Some(16), 1),
        (130, 1, 128, None, 2),
        (200, 2, 64, Some(50), 3),
        (333, 4, 64, None, 2),
        (257, 1, 128, Some(64), 3),
        (1000, 2, 128, Some(300), 2),
    ] {
        attention_case::<bf16>(&gpu, &kern, &mut r, (t, 4, kv, d, window, segments), 1e-2);
    }

    // Refused on the host, naming the bad value.
    let ok = AttnShape {
        tokens: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    let buf = |n: usize| s.clone_htod(&nan_buf::<bf16>(n)).unwrap();
    let segd = DeviceSegments::upload(&gpu, &[0, 0, 1]).unwrap();
    let (q, kv) = (buf(3 * 256), buf(3 * 128));
    let mut out = buf(3 * 256);
    let mut lse = s.clone_htod(&nan_buf::<f32>(12)).unwrap();
    let mut run = |shape: AttnShape, q: &cudarc::driver::CudaSlice<bf16>| {
        kern.forward(q, &kv, &kv, &segd, shape, &mut out, &mut lse)
            .unwrap_err()
            .to_string()
    };
    for (shape, want) in [
        (AttnShape { head_dim: 96, ..ok }, "head_dim: 96"),
        (
            AttnShape {
                n_kv_heads: 3,
                ..ok
            },
            "4 query heads",
        ),
        (
            AttnShape {
                window: Some(0),
                ..ok
            },
            "window: 0",
        ),
        (
            AttnShape { tokens: 4, ..ok },
            "segments: 3 values, the shape needs 4",
        ),
    ] {
        let e = run(shape, &q);
        assert!(e.contains(want), "{e}");
    }
    let e = run(ok, &buf(5));
    assert!(e.contains("attention q: 5 values"), "{e}");
    let e = DeviceSegments::upload(&gpu, &[3, 3, 4, 3])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("id 3 at position 3"), "{e}");
}

/// f32 attention (the CUDA-core kernels, for full fine-tuning's f32 steps)
/// forward and backward against the CPU's f32 `attention` and
/// `attention_grad`: ragged lengths, GQA and MQA, head dims 32 to 128,
/// segments and windows; every output starts as NaN; the bound is the
/// issue's f32 one, 1e-5 relative L2; the backward runs twice and must be
/// bit-identical.
#[test]
fn f32_attention_matches_the_cpu_reference() {
    use graft_kernels::cuda::AttentionKernels;
    let Some(gpu) = gpu() else { return };
    let kern = AttentionKernels::new(&gpu).unwrap();
    let mut r = Gen::new(37);
    // (tokens, heads, kv heads, head dim, window, segments)
    for case in [
        (1, 4, 2, 64, None, 1),
        (37, 4, 1, 32, Some(9), 3),
        (130, 4, 2, 64, None, 2),
        (257, 8, 2, 128, Some(100), 3),
    ] {
        attention_case::<f32>(&gpu, &kern, &mut r, case, 1e-5);
    }
}

/// The element type's short name (`f32`, `bf16`), for messages.
fn type_label<T>() -> &'static str {
    std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("?")
}

/// An attention shape of `tokens` rows, scaled by 1/√d.
fn attn_shape(
    tokens: usize,
    heads: usize,
    kv: usize,
    d: usize,
    window: Option<usize>,
) -> graft_kernels::attention::AttnShape {
    graft_kernels::attention::AttnShape {
        tokens,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window,
    }
}

/// One shape of the attention tests on rows of `T`: random q, k, v, dout
/// and packed segments; the GPU's forward (out, lse) and backward (dq, dk,
/// dv from the GPU's own out and lse, as a training step does) against the
/// CPU's on the same values within `bound` relative L2, every output first
/// NaN; the backward run twice must be bit-identical.
fn attention_case<T: graft_kernels::Elem + graft_kernels::cuda::DeviceElem>(
    gpu: &Gpu,
    kern: &graft_kernels::cuda::AttentionKernels,
    r: &mut Gen,
    (t, heads, kv, d, window, segments): (usize, usize, usize, usize, Option<usize>, usize),
    bound: f64,
) {
    use graft_kernels::attention::{attention, attention_grad};
    use graft_kernels::cuda::DeviceSegments;
    let s = gpu.stream();
    let ty = type_label::<T>();
    let what = format!(
        "attention {ty} t={t} heads={heads}/{kv} d={d} window={window:?} segments={segments}"
    );
    let shape = attn_shape(t, heads, kv, d, window);
    let mut seg = vec![0i32; t];
    for _ in 1..segments {
        let cut = 1 + r.below(t.max(2) - 1);
        seg[cut.min(t)..].iter_mut().for_each(|x| *x += 1);
    }
    let (qn, kn) = (t * heads * d, t * kv * d);
    let q: Vec<T> = to_elem(&r.vec(qn, -2.0, 2.0));
    let k: Vec<T> = to_elem(&r.vec(kn, -2.0, 2.0));
    let v: Vec<T> = to_elem(&r.vec(kn, -1.0, 1.0));
    let dout: Vec<T> = to_elem(&r.vec(qn, -1.0, 1.0));
    let (mut out, mut lse) = (nan_buf::<T>(qn), nan_buf::<f32>(t * heads));
    attention(&q, &k, &v, &seg, shape, &mut out, &mut lse);
    let (mut dq, mut dk, mut dv) = (nan_buf::<T>(qn), nan_buf::<T>(kn), nan_buf::<T>(kn));
    attention_grad(
        &q, &k, &v, &seg, &out, &lse, &dout, shape, &mut dq, &mut dk, &mut dv,
    );

    let segd = DeviceSegments::upload(gpu, &seg).unwrap();
    let up = |x: &[T]| s.clone_htod(x).unwrap();
    let (qd, kd, vd, dod) = (up(&q), up(&k), up(&v), up(&dout));
    let mut outd = up(&nan_buf::<T>(qn));
    let mut lsed = s.clone_htod(&nan_buf::<f32>(t * heads)).unwrap();
    kern.forward(&qd, &kd, &vd, &segd, shape, &mut outd, &mut lsed)
        .unwrap();
    let close = |name: &str, e: f64| {
        eprintln!("{what} {name}: rel L2 vs CPU {e:.2e}");
        assert!(e < bound, "{what} {name}: rel L2 {e}");
    };
    close("out", rel_l2(&s.clone_dtoh(&outd).unwrap(), &to_f64(&out)));
    close("lse", rel_l2(&s.clone_dtoh(&lsed).unwrap(), &to_f64(&lse)));

    let backward = || {
        let mut delta = s.clone_htod(&nan_buf::<f32>(t * heads)).unwrap();
        let (mut dqd, mut dkd, mut dvd) = (
            up(&nan_buf::<T>(qn)),
            up(&nan_buf::<T>(kn)),
            up(&nan_buf::<T>(kn)),
        );
        kern.backward(
            &qd, &kd, &vd, &segd, &outd, &lsed, &dod, shape, &mut delta, &mut dqd, &mut dkd,
            &mut dvd,
        )
        .unwrap();
        [dqd, dkd, dvd].map(|x| s.clone_dtoh(&x).unwrap())
    };
    let got = backward();
    // dq and dk vanish where a query sees one key (softmax's gradient is
    // zero there): measure them against the incoming gradient's size then,
    // not against a zero reference's rounding noise.
    let floor = 1e-2 * norm(&to_f64(&dout));
    for (name, g, want) in [
        ("dq", &got[0], &dq),
        ("dk", &got[1], &dk),
        ("dv", &got[2], &dv),
    ] {
        close(name, rel_l2_floor(g, &to_f64(want), floor));
    }
    // (Widening to f32 is exact and one-to-one for both types.)
    let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
    let again = backward();
    for i in 0..3 {
        assert_eq!(
            bits(&got[i]),
            bits(&again[i]),
            "{what}: backward output {i} differs between runs"
        );
    }
}

/// One case of [`cached_attention_matches_the_cpu_reference`] in `T`.
fn cached_attention_case<T: graft_kernels::Elem + graft_kernels::cuda::DeviceElem>(
    gpu: &Gpu,
    kern: &graft_kernels::cuda::AttentionKernels,
    r: &mut Gen,
    (start, n, heads, kv, d, window): (usize, usize, usize, usize, usize, Option<usize>),
    bound: f64,
) {
    use graft_kernels::attention::attention_cached;
    let s = gpu.stream();
    let ty = type_label::<T>();
    let what = format!(
        "attention_cached {ty} start={start} n={n} heads={heads}/{kv} d={d} window={window:?}"
    );
    let shape = attn_shape(n, heads, kv, d, window);
    let (qn, kn, kw, cap) = (n * heads * d, n * kv * d, kv * d, start + n + 7);
    let q: Vec<T> = to_elem(&r.vec(qn, -2.0, 2.0));
    let k: Vec<T> = to_elem(&r.vec(kn, -2.0, 2.0));
    let v: Vec<T> = to_elem(&r.vec(kn, -1.0, 1.0));
    let mut kc = nan_buf::<T>(cap * kw);
    let mut vc = nan_buf::<T>(cap * kw);
    kc[..start * kw].copy_from_slice(&to_elem::<T>(&r.vec(start * kw, -2.0, 2.0)));
    vc[..start * kw].copy_from_slice(&to_elem::<T>(&r.vec(start * kw, -1.0, 1.0)));
    let mut want = nan_buf::<T>(qn);
    attention_cached(&q, &k, &v, &kc, &vc, start, shape, &mut want);
    let up = |x: &[T]| s.clone_htod(x).unwrap();
    let (qd, kd, vd, kcd, vcd) = (up(&q), up(&k), up(&v), up(&kc), up(&vc));
    let mut outd = up(&nan_buf::<T>(qn));
    kern.cached(&qd, &kd, &vd, &kcd, &vcd, start, shape, &mut outd)
        .unwrap();
    let e = rel_l2(&s.clone_dtoh(&outd).unwrap(), &to_f64(&want));
    eprintln!("{what}: rel L2 vs CPU {e:.2e}");
    assert!(e < bound, "{what}: rel L2 {e}");
}

/// Generation's attention against the CPU's `attention_cached`: a prompt
/// (start 0), single tokens after it and a few at once, GQA and MQA, head
/// dims 32 to 128, with and without a window; bf16 and f32 rows. The caches
/// are longer than `start` and NaN past it (a read there poisons the
/// result); every output starts as NaN. In bf16 the GPU's products are f32
/// where the CPU rounds probabilities to bf16: the bound is 1e-2 relative
/// L2, as the other attention kernels'; in f32 neither rounds: 1e-5. A
/// cache shorter than `start` is refused.
#[test]
fn cached_attention_matches_the_cpu_reference() {
    use graft_kernels::attention::AttnShape;
    use graft_kernels::cuda::AttentionKernels;
    let Some(gpu) = gpu() else { return };
    let kern = AttentionKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(31);
    // (start, new tokens, heads, kv heads, head dim, window)
    for case in [
        (0, 9, 4, 2, 64, None),
        (9, 1, 4, 2, 64, None),
        (63, 1, 8, 1, 128, None),
        (200, 5, 4, 4, 32, Some(64)),
        (0, 300, 32, 8, 128, None),
        (1500, 1, 32, 8, 128, Some(1024)),
    ] {
        cached_attention_case::<bf16>(&gpu, &kern, &mut r, case, 1e-2);
        cached_attention_case::<f32>(&gpu, &kern, &mut r, case, 1e-5);
    }
    let shape = AttnShape {
        tokens: 1,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    let buf = |n: usize| s.clone_htod(&nan_buf::<bf16>(n)).unwrap();
    let e = kern
        .cached(
            &buf(256),
            &buf(128),
            &buf(128),
            &buf(128 * 4),
            &buf(128 * 4),
            5,
            shape,
            &mut buf(256),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fewer than the 5 cached rows"), "{e}");
}

/// The plan glue of elementwise.cu and DoRA's kernels (dora.cu) against the
/// CPU reference on ragged shapes, f32 and bf16: add, mul, scale, dropout
/// and the per-column multiply (every type pair, and in place) bit for bit;
/// the sum over rows (another order of f32 additions) within 1e-5 (f32) or
/// one bf16 rounding; DoRA's combine bit for bit and its weight norm (dense
/// weights, and NF4 dequantized to bf16 as the executor does) within 1e-5
/// of the CPU's f32 norm (2e-3 for the bf16-rounded NF4 weight).
#[test]
fn elementwise_and_dora_kernels_match_the_cpu_reference() {
    use graft_kernels::cuda::{DeviceElem, DoraKernels, ElementwiseKernels};
    use graft_kernels::{dora, elementwise as ew, Elem};
    let Some(gpu) = gpu() else { return };
    let (k, dk) = (
        ElementwiseKernels::new(&gpu).unwrap(),
        DoraKernels::new(&gpu).unwrap(),
    );
    let nf4 = Nf4Gemm::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(31);
    fn bits<T: Elem>(x: &[T]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }
    fn glue<T: Elem + DeviceElem, V: Elem + DeviceElem>(
        gpu: &Gpu,
        (k, dk): (&ElementwiseKernels, &DoraKernels),
        r: &mut Gen,
        rows: usize,
        cols: usize,
    ) {
        let (s, n) = (gpu.stream(), rows * cols);
        let what = format!("{rows}x{cols} {}", std::any::type_name::<T>());
        let a: Vec<T> = to_elem(&r.vec(n, -3.0, 3.0));
        let b: Vec<T> = to_elem(&r.vec(n, -3.0, 3.0));
        let v: Vec<V> = to_elem(&r.vec(cols, -2.0, 2.0));
        let (ad, bd, vd) = (
            s.clone_htod(&a).unwrap(),
            s.clone_htod(&b).unwrap(),
            s.clone_htod(&v).unwrap(),
        );
        let mut yd = s.clone_htod(&nan_buf::<T>(n)).unwrap();
        let mut want = nan_buf::<T>(n);
        let same = |op: &str, yd: &cudarc::driver::CudaSlice<T>, want: &[T]| {
            let got: Vec<T> = s.clone_dtoh(yd).unwrap();
            assert_eq!(bits(&got), bits(want), "{op} {what}: not the CPU's values");
        };
        k.add(&ad, &bd, &mut yd).unwrap();
        ew::add(&a, &b, &mut want);
        same("add", &yd, &want);
        k.mul(&ad, &bd, &mut yd).unwrap();
        ew::mul(&a, &b, &mut want);
        same("mul", &yd, &want);
        k.scale(&ad, 0.37, &mut yd).unwrap();
        ew::scale(&a, 0.37, &mut want);
        same("scale", &yd, &want);
        let seed = s.clone_htod(&[12345u32]).unwrap();
        k.dropout(&ad, &seed, 0.3, &mut yd).unwrap();
        ew::dropout(&a, 12345, 0.3, &mut want);
        same("dropout", &yd, &want);
        k.mul_cols(&ad, &vd, &mut yd).unwrap();
        // ew::mul_cols's arithmetic, with v in its own type.
        let wide: Vec<T> = a
            .iter()
            .enumerate()
            .map(|(i, x)| T::from_f32(x.to_f32() * v[i % cols].to_f32()))
            .collect();
        same("mul_cols", &yd, &wide);
        // In place, as the column-scale epilogue runs it.
        let mut xd = s.clone_htod(&a).unwrap();
        // SAFETY: a second window over xd's own buffer, alive while xd is.
        let x_in = unsafe { gpu.borrow::<T>(graft_kernels::cuda::device_addr(&xd), n) };
        k.mul_cols(&x_in, &vd, &mut xd).unwrap();
        same("mul_cols in place", &xd, &wide);
        let mut sums = s.clone_htod(&nan_buf::<T>(cols)).unwrap();
        k.sum_rows(&ad, &mut sums).unwrap();
        let mut want_sums = nan_buf::<T>(cols);
        ew::sum_rows(&a, &mut want_sums);
        let got: Vec<T> = s.clone_dtoh(&sums).unwrap();
        let e = rel_l2(&got, &to_f64(&want_sums));
        let tol = if std::mem::size_of::<T>() == 2 {
            8e-3
        } else {
            1e-5
        };
        eprintln!("sum_rows {what}: rel L2 vs CPU {e:.2e}");
        assert!(e < tol, "sum_rows {what}: rel L2 {e}");
        let lora = r.vec(n, -1.0, 1.0);
        let scale = r.vec(cols, 0.5, 2.0);
        let (ld, sd) = (s.clone_htod(&lora).unwrap(), s.clone_htod(&scale).unwrap());
        dk.combine(&ad, &ld, &sd, &mut yd).unwrap();
        dora::dora_combine(&a, &lora, &scale, &mut want);
        same("dora_combine", &yd, &want);
    }
    for (rows, cols) in [(1, 1), (37, 129), (300, 33), (5, 1000), (2048, 96)] {
        glue::<f32, f32>(&gpu, (&k, &dk), &mut r, rows, cols);
        glue::<bf16, bf16>(&gpu, (&k, &dk), &mut r, rows, cols);
        glue::<bf16, f32>(&gpu, (&k, &dk), &mut r, rows, cols);
    }
    // The weight norm: out ragged against the kernel's 8 rows a block.
    for (out, inp, rank, scaling) in [(1, 64, 1, 2.0), (19, 320, 16, 2.0), (1000, 512, 64, 0.5)] {
        let a = r.vec(rank * inp, -0.5, 0.5);
        let b = r.vec(out * rank, -0.5, 0.5);
        let w = r.vec(out * inp, -1.0, 1.0);
        let (ad, bd) = (s.clone_htod(&a).unwrap(), s.clone_htod(&b).unwrap());
        let norm = |row: &(dyn Fn(usize, &mut [f32]) + Sync)| -> Vec<f64> {
            let mut y = vec![0f32; out];
            dora::dora_norms(|o, buf| row(o, buf), &a, &b, rank, scaling, &mut y);
            y.iter().map(|n| 1.0 / *n as f64).collect()
        };
        let check = |what: &str, want: &[f64], got: Vec<f32>, tol: f64| {
            let e = rel_l2(&got, want);
            eprintln!("dora_inv_norm {what} out={out} in={inp} r={rank}: rel L2 vs CPU {e:.2e}");
            assert!(e < tol, "dora_inv_norm {what} out={out}: rel L2 {e}");
        };
        let mut yd = s.clone_htod(&vec![f32::NAN; out]).unwrap();
        dk.inv_norm(&ad, &bd, &s.clone_htod(&w).unwrap(), scaling, &mut yd)
            .unwrap();
        let want = norm(&|o, buf| buf.copy_from_slice(&w[o * inp..(o + 1) * inp]));
        check("f32", &want, s.clone_dtoh(&yd).unwrap(), 1e-5);
        let wb: Vec<bf16> = to_elem(&w);
        dk.inv_norm(&ad, &bd, &s.clone_htod(&wb).unwrap(), scaling, &mut yd)
            .unwrap();
        let want = norm(&|o, buf| {
            buf.iter_mut()
                .zip(&wb[o * inp..(o + 1) * inp])
                .for_each(|(x, w)| *x = w.to_f32())
        });
        check("bf16", &want, s.clone_dtoh(&yd).unwrap(), 1e-5);
        // NF4, as the executor runs it: dequantized to bf16, then the norm.
        let p = quantize(&w, 64).unwrap();
        let wv = p.view(out, inp);
        let dw = DeviceNf4::upload(&gpu, &wv).unwrap();
        let mut wd = s
            .clone_htod(&vec![bf16::from_f32(f32::NAN); out * inp])
            .unwrap();
        nf4.dequantize(&dw, &mut wd).unwrap();
        dk.inv_norm(&ad, &bd, &wd, scaling, &mut yd).unwrap();
        let want = norm(&|o, buf| wv.dequantize_into(o * inp, buf));
        check("nf4", &want, s.clone_dtoh(&yd).unwrap(), 2e-3);
    }
}

/// The device-side gradient handling of a training step against the
/// trainer's host arithmetic: two micro-batches summed with weights
/// (`acc = w·g`, then `acc + w·g`) and the clip (scale, then clamp) bit for
/// bit; the global squared norm of several tensors within 1e-12.
#[test]
fn gradient_accumulation_and_clipping_match_the_cpu() {
    use graft_kernels::cuda::UpdateKernels;
    let Some(gpu) = gpu() else { return };
    let k = UpdateKernels::new(&gpu).unwrap();
    let s = gpu.stream();
    let mut r = Gen::new(41);
    let sizes = [1usize, 1000, 70_001, 16 * 4096];
    let mut host: Vec<Vec<f32>> = Vec::new();
    let mut dev = Vec::new();
    for &n in &sizes {
        let (g0, g1) = (r.vec(n, -2.0, 2.0), r.vec(n, -2.0, 2.0));
        let (w0, w1) = (0.375f32, 0.625f32);
        let mut acc = s.clone_htod(&vec![f32::NAN; n]).unwrap();
        k.accumulate(&mut acc, &s.clone_htod(&g0).unwrap(), w0, true)
            .unwrap();
        k.accumulate(&mut acc, &s.clone_htod(&g1).unwrap(), w1, false)
            .unwrap();
        let want: Vec<f32> = g0.iter().zip(&g1).map(|(a, b)| w0 * a + w1 * b).collect();
        let got: Vec<f32> = s.clone_dtoh(&acc).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "accumulate n={n}: not the host's sums"
        );
        host.push(want);
        dev.push(acc);
    }
    let refs: Vec<&cudarc::driver::CudaSlice<f32>> = dev.iter().collect();
    let sq = k.squared_norm(&refs).unwrap();
    let want: f64 = host
        .iter()
        .flatten()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    let e = ((sq - want) / want).abs();
    eprintln!("squared norm of {} tensors: rel err {e:.2e}", sizes.len());
    assert!(e < 1e-12, "squared norm {sq} vs {want}");
    for (coef, max_value) in [(0.5f32, 0.0f32), (1.0, 0.3), (0.7, 0.2)] {
        for (n, h) in sizes.iter().zip(&host) {
            let mut x = s.clone_htod(h).unwrap();
            k.clip(&mut x, coef, max_value).unwrap();
            let want: Vec<f32> = h
                .iter()
                .map(|&v| {
                    let v = if coef < 1.0 { v * coef } else { v };
                    if max_value > 0.0 {
                        v.clamp(-max_value, max_value)
                    } else {
                        v
                    }
                })
                .collect();
            let got: Vec<f32> = s.clone_dtoh(&x).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "clip n={n} coef={coef} max={max_value}"
            );
        }
    }
}
