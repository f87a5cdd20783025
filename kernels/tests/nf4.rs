//! NF4 dequantization and the products that dequantize as they go (the
//! reference kernel, and the blocked GEMM on every path this CPU has)
//! against dequantize-then-multiply in f64, on random shapes (ragged K
//! against the block size, M = 1, partial nested blocks, several k blocks
//! and B slabs).

mod common;

use common::nf4::Parts;
use common::*;
use graft_kernels::bf16;
use graft_kernels::gemm::{nf4_gemm_on, Path};
use graft_kernels::nf4::{dynamic_map_signed, nf4_matmul};
use proptest::prelude::*;

fn reference(a: &[f64], w: &[f64], m: usize, n: usize, k: usize, tb: bool) -> Vec<f64> {
    let (inner, outer) = if tb { (k, n) } else { (n, k) };
    let mut out = vec![0.0; m * outer];
    for i in 0..m {
        for j in 0..outer {
            out[i * outer + j] = (0..inner)
                .map(|p| a[i * inner + p] * if tb { w[j * k + p] } else { w[p * k + j] })
                .sum();
        }
    }
    out
}

fn block() -> impl Strategy<Value = usize> {
    prop_oneof![Just(32usize), Just(64), Just(128)]
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn dequantize_matches_the_definition(rows in 1usize..40, cols in 1usize..300, block in block(), seed in any::<u64>(), start in 0usize..1000) {
        let p = Parts::random(rows, cols, block, seed);
        let full = p.dequantized();
        let start = start % full.len();
        let mut got = vec![f32::NAN; full.len() - start];
        p.view().dequantize_into(start, &mut got);
        prop_assert_eq!(&got[..], &full[start..]);
    }

    #[test]
    fn products_match_dequantize_then_multiply(m in 1usize..24, n in 1usize..48, k in 1usize..200, block in block(), seed in any::<u64>(), tb in any::<bool>()) {
        let p = Parts::random(n, k, block, seed);
        let w64: Vec<f64> = p.dequantized().iter().map(|&v| v as f64).collect();
        let inner = if tb { k } else { n };
        let a = Gen::new(seed ^ 1).vec(m * inner, -1.0, 1.0);
        let want = reference(&to_f64(&a), &w64, m, n, k, tb);
        let mut got = nan_buf::<f32>(want.len());
        nf4_matmul(&a, &p.view(), m, tb, false, &mut got);
        check("f32 compute", &got, &want, 1e-5)?;

        // bf16 compute: the same product of bf16-rounded operands.
        let round = |v: f64| bf16::from_f32(v as f32).to_f32() as f64;
        let w16: Vec<f64> = w64.iter().map(|&v| round(v)).collect();
        let a16: Vec<bf16> = to_elem(&a);
        let want16 = reference(&to_f64(&a16), &w16, m, n, k, tb);
        let mut got16 = nan_buf::<bf16>(want16.len());
        nf4_matmul(&a16, &p.view(), m, tb, true, &mut got16);
        // Only the output's own bf16 rounding separates the two.
        check("bf16 compute", &got16, &want16, 5e-3)?;
    }
}

/// `nf4_gemm_on` on every supported path: f32 compute against the f64
/// product; bf16 compute (operands rounded to bf16) with f32 storage against
/// the f64 product of the rounded operands, and with bf16 storage against
/// that product rounded to bf16 (see `gemm.rs` for why 1e-3 is tight there).
fn check_gemm_paths(
    m: usize,
    n: usize,
    k: usize,
    block: usize,
    tb: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let p = Parts::random(n, k, block, seed);
    let w64: Vec<f64> = p.dequantized().iter().map(|&v| v as f64).collect();
    let (inner, outer) = if tb { (k, n) } else { (n, k) };
    let a = Gen::new(seed ^ 1).vec(m * inner, -1.0, 1.0);
    let a64 = to_f64(&a);
    let want = reference(&a64, &w64, m, n, k, tb);
    let floor = terms_rss(&a64, &w64, m, inner, outer, false, tb);
    let round = |v: f64| bf16::from_f32(v as f32).to_f32() as f64;
    let a16: Vec<bf16> = to_elem(&a);
    let (a16_64, w16) = (
        to_f64(&a16),
        w64.iter().map(|&v| round(v)).collect::<Vec<_>>(),
    );
    let want16 = reference(&a16_64, &w16, m, n, k, tb);
    let want16_rounded: Vec<f64> = want16.iter().map(|&v| round(v)).collect();
    for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
        let name = path.name();
        let mut got = nan_buf::<f32>(m * outer);
        nf4_gemm_on(path, &a, &p.view(), m, tb, false, &mut got);
        check_floor(&format!("{name} f32"), &got, &want, floor, 1e-5)?;
        let mut got = nan_buf::<f32>(m * outer);
        nf4_gemm_on(path, &a, &p.view(), m, tb, true, &mut got);
        check_floor(&format!("{name} bf16 compute"), &got, &want16, floor, 1e-5)?;
        let mut got16 = nan_buf::<bf16>(m * outer);
        nf4_gemm_on(path, &a16, &p.view(), m, tb, true, &mut got16);
        check_floor(
            &format!("{name} bf16"),
            &got16,
            &want16_rounded,
            floor,
            1e-3,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    // Past one k block (768 pairs' worth for bf16, 384 and 256 for f32) and
    // a few register tiles, ragged everywhere.
    #[test]
    fn gemm_paths_match_dequantize_then_multiply(m in 1usize..40, n in 1usize..80, k in 1usize..900, block in block(), seed in any::<u64>(), tb in any::<bool>()) {
        check_gemm_paths(m, n, k, block, tb, seed)?;
    }
}

/// Past a B slab (640 columns) and the parallel threshold, both layouts.
#[test]
fn gemm_paths_on_a_large_shape() {
    for tb in [true, false] {
        check_gemm_paths(70, 700, 1000, 64, tb, 5).unwrap();
    }
}

#[test]
fn large_shapes_cover_many_tiles_and_nested_blocks() {
    // 4 nested blocks of 256 absmax values, K not a multiple of the block.
    let (m, n, k) = (3, 70, 1000);
    let p = Parts::random(n, k, 64, 7);
    let w64: Vec<f64> = p.dequantized().iter().map(|&v| v as f64).collect();
    for tb in [true, false] {
        let inner = if tb { k } else { n };
        let a = Gen::new(11).vec(m * inner, -1.0, 1.0);
        let mut got = nan_buf::<f32>(m * if tb { n } else { k });
        nf4_matmul(&a, &p.view(), m, tb, false, &mut got);
        let want = reference(&to_f64(&a), &w64, m, n, k, tb);
        assert!(
            rel_l2(&got, &want) < 1e-5,
            "tb={tb}: {}",
            rel_l2(&got, &want)
        );
    }
}

#[test]
fn the_dynamic_map_is_bitsandbytes_signed_map() {
    let map = dynamic_map_signed();
    assert!(map.windows(2).all(|w| w[0] <= w[1]), "sorted");
    assert_eq!(map[255], 1.0);
    assert!(map.contains(&0.0));
    assert!((map[0] + 0.99297).abs() < 1e-5, "{}", map[0]);
}

/// Quantization runs over blocks in parallel: each block's codes are what
/// quantizing that block alone gives (they depend on its values and absmax
/// only), wherever it falls among the runs, the partial last block included.
#[test]
fn quantized_codes_are_block_local_across_parallel_runs() {
    use graft_kernels::nf4::quantize;
    let block = 64;
    let n = block * 1024 * 3 + 777; // three runs and a ragged end
    let x = Gen::new(5).vec(n, -2.0, 2.0);
    let all = quantize(&x, block).unwrap();
    let blocks = n.div_ceil(block);
    for b in [0, 1, 1023, 1024, 2047, 2500, blocks - 2, blocks - 1] {
        let (s, e) = (b * block, ((b + 1) * block).min(n));
        let alone = quantize(&x[s..e], block).unwrap();
        // Two codes per byte; blocks hold an even count of values.
        assert_eq!(
            &all.packed[s / 2..e.div_ceil(2)],
            &alone.packed[..],
            "block {b}"
        );
    }
    assert_eq!(all.absmax.len(), blocks);
}

/// A bf16 or f16 weight (as a checkpoint stores it) quantizes to exactly
/// what its f32 widening does, odd length and partial block included; a
/// non-finite value is reported at its flat index past the first chunk.
#[test]
fn half_precision_weights_quantize_as_their_f32_values() {
    use graft_kernels::f16;
    use graft_kernels::nf4::quantize;
    let n = 64 * 1024 * 2 + 64 * 3 + 33; // two runs of blocks, a ragged end
    let x: Vec<f32> = Gen::new(11).vec(n, -3.0, 3.0);
    let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let wide: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    let (a, b) = (quantize(&h, 64).unwrap(), quantize(&wide, 64).unwrap());
    assert_eq!(
        (a.packed, a.absmax, a.offset),
        (b.packed, b.absmax, b.offset)
    );
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let wide: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    let (a, b) = (quantize(&h, 128).unwrap(), quantize(&wide, 128).unwrap());
    assert_eq!(
        (a.packed, a.absmax, a.offset),
        (b.packed, b.absmax, b.offset)
    );

    let mut bad: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    bad[70_001] = bf16::INFINITY;
    bad[80_000] = bf16::NAN;
    let e = quantize(&bad, 64).unwrap_err().to_string();
    assert!(e.contains("flat index 70001") && e.contains("inf"), "{e}");
}
