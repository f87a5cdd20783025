//! `gemm::gemm_sum_on` (the fused sum of products behind the fusion pass's
//! matmul groups) on every path this CPU supports against the f64 sum of
//! the products: one to three terms of independent k, transposes and scales,
//! operands stored as f32, bf16 or NF4 (the LoRA linear: an NF4 base plus
//! a scaled f32 low-rank product) or mixed bf16 and f32 (the adapter's
//! products with activations read where they lie), with or without an addend (a residual),
//! f32 or bf16 compute, f32 or bf16 output.

mod common;

use common::nf4::Parts;
use common::*;
use graft_kernels::bf16;
use graft_kernels::gemm::{gemm_sum_on, Epilogue, Operand, Path, Term};
use graft_kernels::rope::RopeTable;
use proptest::prelude::*;

/// How one term's operands are stored.
#[derive(Clone, Copy, Debug)]
enum Kind {
    F32,
    Bf16,
    /// An f32 `a` with an NF4 `b` (a weight `W[n, k]` when `tb`).
    Nf4,
    /// A bf16 `a` with an f32 `b`, and the other way round: LoRA's products
    /// of bf16 activations with f32 adapters, read as they are stored.
    Bf16F32,
    F32Bf16,
}

/// One term's data, owned, and what the kernel should see of it.
struct Data {
    k: usize,
    ta: bool,
    tb: bool,
    scale: f32,
    kind: Kind,
    a: Vec<f32>,
    a16: Vec<bf16>,
    b: Vec<f32>,
    b16: Vec<bf16>,
    nf4: Option<Parts>,
}

impl Data {
    fn random(m: usize, n: usize, spec: (usize, bool, bool, f32, Kind), seed: u64) -> Data {
        let (k, ta, tb, scale, kind) = spec;
        let mut rng = Gen::new(seed);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        // NF4 rows are the stored rows of op(b): n when tb, else k.
        let nf4 = matches!(kind, Kind::Nf4).then(|| {
            let (rows, cols) = if tb { (n, k) } else { (k, n) };
            Parts::random(rows, cols, 64, seed ^ 7)
        });
        Data {
            k,
            ta,
            tb,
            scale,
            kind,
            a16: to_elem(&a),
            b16: to_elem(&b),
            a,
            b,
            nf4,
        }
    }

    /// The kernel's term; `nf4` is this data's view (borrowed by the term).
    fn term<'a>(&'a self, nf4: Option<&'a graft_kernels::nf4::Nf4<'a>>) -> Term<'a> {
        let (a, b) = match self.kind {
            Kind::F32 => (Operand::F32(&self.a), Operand::F32(&self.b)),
            Kind::Bf16 => (Operand::Bf16(&self.a16), Operand::Bf16(&self.b16)),
            Kind::Nf4 => (
                Operand::F32(&self.a),
                Operand::Nf4(nf4.expect("an NF4 term")),
            ),
            Kind::Bf16F32 => (Operand::Bf16(&self.a16), Operand::F32(&self.b)),
            Kind::F32Bf16 => (Operand::F32(&self.a), Operand::Bf16(&self.b16)),
        };
        Term {
            a,
            b,
            k: self.k,
            ta: self.ta,
            tb: self.tb,
            scale: self.scale,
        }
    }

    /// op(a)·scale and op(b) as the kernel multiplies them (rounded to bf16
    /// after the scale when `bf16`), in f64.
    fn operands(&self, bf16: bool) -> (Vec<f64>, Vec<f64>) {
        let round = |v: f32| if bf16 { bf16_round(v) } else { v };
        let (a, b): (Vec<f32>, Vec<f32>) = match self.kind {
            Kind::F32 => (self.a.clone(), self.b.clone()),
            Kind::Bf16 => (
                self.a16.iter().map(|v| v.to_f32()).collect(),
                self.b16.iter().map(|v| v.to_f32()).collect(),
            ),
            Kind::Nf4 => (self.a.clone(), self.nf4.as_ref().unwrap().dequantized()),
            Kind::Bf16F32 => (
                self.a16.iter().map(|v| v.to_f32()).collect(),
                self.b.clone(),
            ),
            Kind::F32Bf16 => (
                self.a.clone(),
                self.b16.iter().map(|v| v.to_f32()).collect(),
            ),
        };
        (
            a.iter().map(|&v| round(v * self.scale) as f64).collect(),
            b.iter().map(|&v| round(v) as f64).collect(),
        )
    }
}

fn bf16_round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::F32),
        Just(Kind::Bf16),
        Just(Kind::Nf4),
        Just(Kind::Bf16F32),
        Just(Kind::F32Bf16)
    ]
}

fn term_spec(max_k: usize) -> impl Strategy<Value = (usize, bool, bool, f32, Kind)> {
    (
        dim(max_k),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(1.0f32), -2.0f32..2.0],
        kind(),
    )
}

/// The epilogue of a sum, if any.
#[derive(Clone, Copy, Debug)]
enum Then {
    Nothing,
    /// Column scales in [0.5, 2] (DoRA).
    ScaleCols,
    /// RoPE over heads of 128 (n a multiple of 128), else two heads (n a
    /// multiple of 4) or one, positions in 0..300; nothing when n is odd.
    Rope,
}

fn then() -> impl Strategy<Value = Then> {
    prop_oneof![Just(Then::Nothing), Just(Then::ScaleCols), Just(Then::Rope)]
}

/// The epilogue's data, and the f64 reference applying it to `want`: column
/// scales, or the half-split rotation at the f32 angle `p·f` in f64.
struct EpilogueData {
    scales: Vec<f32>,
    positions: Vec<i32>,
    table: Option<RopeTable>,
}

impl EpilogueData {
    fn new(then: Then, m: usize, n: usize, want: &mut [f64], seed: u64) -> EpilogueData {
        let mut rng = Gen::new(seed ^ 0xE91);
        let mut e = EpilogueData {
            scales: Vec::new(),
            positions: Vec::new(),
            table: None,
        };
        match then {
            Then::Nothing => {}
            Then::ScaleCols => {
                e.scales = rng.vec(n, 0.5, 2.0);
                for row in want.chunks_mut(n) {
                    row.iter_mut()
                        .zip(&e.scales)
                        .for_each(|(w, &s)| *w *= s as f64);
                }
            }
            Then::Rope if n % 2 == 1 => {}
            Then::Rope => {
                let head = match n {
                    _ if n.is_multiple_of(128) => 128,
                    _ if n.is_multiple_of(4) => n / 2,
                    _ => n,
                };
                let half = head / 2;
                let inv_freq: Vec<f32> = (0..half)
                    .map(|i| 10000f32.powf(-(i as f32) / half as f32))
                    .collect();
                e.positions = (0..m).map(|_| rng.below(300) as i32).collect();
                for (row, &p) in want.chunks_mut(n).zip(&e.positions) {
                    for h in row.chunks_mut(head) {
                        for (i, &f) in inv_freq.iter().enumerate() {
                            let a = (p as f32 * f) as f64;
                            let (x1, x2) = (h[i], h[i + half]);
                            h[i] = x1 * a.cos() - x2 * a.sin();
                            h[i + half] = x2 * a.cos() + x1 * a.sin();
                        }
                    }
                }
                e.table = Some(RopeTable::new(&e.positions, &inv_freq, false));
            }
        }
        e
    }

    fn epilogue(&self) -> Option<Epilogue<'_>> {
        match &self.table {
            Some(table) => Some(Epilogue::Rope {
                positions: &self.positions,
                table,
            }),
            None if !self.scales.is_empty() => Some(Epilogue::ScaleCols(&self.scales)),
            None => None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_sum(
    m: usize,
    n: usize,
    specs: &[(usize, bool, bool, f32, Kind)],
    bf16_compute: bool,
    addend: bool,
    then: Then,
    seed: u64,
) -> Result<(), TestCaseError> {
    let data: Vec<Data> = specs
        .iter()
        .enumerate()
        .map(|(i, &s)| Data::random(m, n, s, seed.wrapping_add(i as u64)))
        .collect();
    let views: Vec<_> = data
        .iter()
        .map(|d| d.nf4.as_ref().map(Parts::view))
        .collect();
    let terms: Vec<Term> = data
        .iter()
        .zip(&views)
        .map(|(d, v)| d.term(v.as_ref()))
        .collect();
    // An addend, stored as bf16 (read exactly).
    let init: Option<Vec<bf16>> = addend.then(|| to_elem(&Gen::new(!seed).vec(m * n, -4.0, 4.0)));
    let mut want = match &init {
        Some(i) => to_f64(i),
        None => vec![0.0f64; m * n],
    };
    let mut rss = norm(&want).powi(2);
    for d in &data {
        let (a, b) = d.operands(bf16_compute);
        let p = matmul_ref(&a, &b, m, d.k, n, d.ta, d.tb);
        want.iter_mut().zip(&p).for_each(|(w, p)| *w += p);
        rss += terms_rss(&a, &b, m, d.k, n, d.ta, d.tb).powi(2);
    }
    // Scales up to 2 scale the rounding errors too; a rotation keeps norms.
    let floor = 2.0 * rss.sqrt();
    let epi = EpilogueData::new(then, m, n, &mut want, seed);
    let want16: Vec<f64> = want.iter().map(|&v| bf16_round(v as f32) as f64).collect();
    for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
        let mut c = nan_buf::<f32>(m * n);
        gemm_sum_on(
            path,
            &terms,
            init.as_deref().map(Operand::Bf16),
            epi.epilogue(),
            &mut c,
            (m, n),
            bf16_compute,
        );
        // As gemm.rs: f32 accumulation error is ~1e-7 of the terms.
        check_floor(&format!("{} f32", path.name()), &c, &want, floor, FWD_TOL)?;
        // A bf16 output: the f64 sum rounded to bf16 (see gemm.rs).
        let mut c16 = nan_buf::<bf16>(m * n);
        gemm_sum_on(
            path,
            &terms,
            init.as_deref().map(Operand::Bf16),
            epi.epilogue(),
            &mut c16,
            (m, n),
            bf16_compute,
        );
        check_floor(&format!("{} bf16", path.name()), &c16, &want16, floor, 1e-3)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn small(m in dim(40), n in dim(70), specs in prop::collection::vec(term_spec(60), 0..=3), bf16_compute: bool, addend: bool, then in then(), seed: u64) {
        check_sum(m, n, &specs, bf16_compute, addend, then, seed)?;
    }
}

proptest! {
    #![proptest_config(config(8))]

    // Past one k block per term and several B panels, past the parallel threshold.
    #[test]
    fn large(m in 1usize..=200, n in 1usize..=300, specs in prop::collection::vec(term_spec(450), 1..=3), bf16_compute: bool, addend: bool, then in then(), seed: u64) {
        check_sum(m, n, &specs, bf16_compute, addend, then, seed)?;
    }
}

/// Epilogues over outputs wider than the drivers' column blocks (2048 to
/// 2560 columns): RoPE's heads of 128 never straddle two blocks, and column
/// scales land on their columns.
#[test]
fn epilogues_across_column_blocks() {
    for then in [Then::Rope, Then::ScaleCols] {
        for bf16_compute in [false, true] {
            let spec = (64, false, true, 1.0, Kind::Bf16);
            check_sum(37, 6144, &[spec], bf16_compute, true, then, 11).unwrap();
        }
    }
}

/// The LoRA linear as the fusion pass emits it: `x·Wᵀ + s·(x·Aᵀ)·Bᵀ` in one
/// call is the two products summed, here with a rank-1 `B·A` that makes the
/// expected value exact to check.
#[test]
fn lora_linear_is_the_two_products_summed() {
    let (m, k, n) = (3, 4, 5);
    let x: Vec<f32> = (0..m * k).map(|i| i as f32).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 3) as f32).collect();
    let ax: Vec<f32> = (0..m).map(|i| i as f32 + 1.0).collect(); // [m, r=1]
    let b: Vec<f32> = (0..n).map(|j| j as f32).collect(); // [n, r=1]
    let terms = [
        Term {
            a: Operand::F32(&x),
            b: Operand::F32(&w),
            k,
            ta: false,
            tb: true,
            scale: 1.0,
        },
        Term {
            a: Operand::F32(&ax),
            b: Operand::F32(&b),
            k: 1,
            ta: false,
            tb: true,
            scale: 0.5,
        },
    ];
    for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
        let mut y = vec![f32::NAN; m * n];
        gemm_sum_on(path, &terms, None, None, &mut y, (m, n), false);
        for i in 0..m {
            for j in 0..n {
                let base: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                let want = base + 0.5 * ax[i] * b[j];
                assert_eq!(y[i * n + j], want, "{} y[{i},{j}]", path.name());
            }
        }
    }
}

proptest! {
    #![proptest_config(config(16))]

    /// Few columns from many rows of a transposed `a` (LoRA's `dB =
    /// 2·dyᵀ·(x·Aᵀ)`) run as the transposed product: bit for bit the sums
    /// of the direct product, which an addend of zeros (exact: `0 + s = s`)
    /// keeps on the direct path. bf16 `a` (dy) with an f32 or bf16 `b`, a
    /// power-of-two scale or another, one or two terms.
    #[test]
    fn narrow_products_of_transposed_a_are_the_direct_sums(
        n in 1usize..=16,
        rows in 4usize..=40,
        k in 1usize..=300,
        b_bf16: bool,
        scale in prop::sample::select(vec![1.0f32, 2.0, 0.3]),
        two: bool,
        seed: u64,
    ) {
        let m = n * rows;
        let mut r = Gen::new(seed);
        let a: Vec<bf16> = (0..k * m).map(|_| bf16::from_f32(r.uniform(-1.0, 1.0))).collect();
        let b: Vec<f32> = (0..k * n).map(|_| r.uniform(-1.0, 1.0)).collect();
        let b16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let term = Term {
            a: Operand::Bf16(&a),
            b: if b_bf16 { Operand::Bf16(&b16) } else { Operand::F32(&b) },
            k,
            ta: true,
            tb: false,
            scale,
        };
        let terms = if two { vec![term, Term { scale: 0.5, ..term }] } else { vec![term] };
        let zeros = vec![0f32; m * n];
        for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
            for bf16_compute in [false, true] {
                let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                gemm_sum_on(path, &terms, None, None, &mut got, (m, n), bf16_compute);
                let init = Some(Operand::F32(&zeros));
                gemm_sum_on(path, &terms, init, None, &mut want, (m, n), bf16_compute);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&got), bits(&want), "{} bf16 {}", path.name(), bf16_compute);
            }
        }
    }
}
