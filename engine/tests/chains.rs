//! The elementwise-chain fusion (`passes::fuse_elementwise`, run on the CPU
//! by `chain::run_cpu`): random graphs of the elementwise glue (casts
//! between f32, bf16 and f16, add, mul, scale, scale by a scalar, dropout,
//! per-column multiply, DoRA's combine) on random shapes compute the same
//! bits fused as unfused, with intermediate values kept as outputs now and
//! then (a kept value is never absorbed), and their generated CUDA sources
//! name every input.

use graft_engine::ir::{DType, Graph, Op, ValueId};
use graft_engine::rng::Rng;
use graft_engine::{compile_with, CompileOptions, CpuExecutor, Feeds, Plan, Tensor};
use proptest::prelude::*;

const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

struct Case {
    g: Graph,
    feeds: Vec<(ValueId, Tensor)>,
    outputs: Vec<ValueId>,
}

/// A random graph over `floats` (each op's operands drawn from earlier
/// values, casts to any of `floats`).
fn random_graph(m: usize, n: usize, ops: usize, seed: u64, floats: &[DType]) -> Case {
    let mut r = Rng::new(seed);
    let mut g = Graph::new();
    let mut feeds = Vec::new();
    let mut leaf = |g: &mut Graph, r: &mut Rng, name: &str, shape: &[usize], dtype: DType| {
        let count: usize = shape.iter().product();
        let data: Vec<f32> = (0..count).map(|_| r.uniform(-2.0, 2.0)).collect();
        let t = Tensor::from_f32(shape, &data)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let v = g.input(name, shape, dtype);
        feeds.push((v, t));
        v
    };
    let mut pool: Vec<ValueId> = (0..3)
        .map(|i| {
            let d = floats[r.next_u64() as usize % floats.len()];
            leaf(&mut g, &mut r, &format!("x{i}"), &[m, n], d)
        })
        .collect();
    let s = leaf(&mut g, &mut r, "s", &[1], DType::F32);
    let scale = leaf(&mut g, &mut r, "scale", &[n], DType::F32);
    let cols: Vec<ValueId> = floats
        .iter()
        .map(|&d| leaf(&mut g, &mut r, &format!("v{d}"), &[n], d))
        .collect();
    let seed_v = g.input("seed", &[1], DType::U32);
    feeds.push((
        seed_v,
        Tensor::from_u32(&[1], &[r.next_u64() as u32]).unwrap(),
    ));
    let mut outputs = Vec::new();
    for _ in 0..ops {
        let pick = |r: &mut Rng, pool: &[ValueId]| pool[(r.next_u64() as usize) % pool.len()];
        let a = pick(&mut r, &pool);
        let da = g.dtype(a);
        let as_a = |g: &mut Graph, v: ValueId| match g.dtype(v) == da {
            true => v,
            false => g.cast(v, da).unwrap(),
        };
        let y = match r.next_u64() % 8 {
            0 => g
                .cast(a, floats[r.next_u64() as usize % floats.len()])
                .unwrap(),
            1 => {
                let b = pick(&mut r, &pool);
                let b = as_a(&mut g, b);
                g.add(a, b).unwrap()
            }
            2 => {
                let b = pick(&mut r, &pool);
                let b = as_a(&mut g, b);
                g.mul(a, b).unwrap()
            }
            3 => g.scale(a, r.uniform(-1.5, 1.5)).unwrap(),
            4 => g.apply(Op::ScaleBy, &[a, s]).unwrap()[0],
            5 => g.dropout(a, seed_v, r.uniform(0.0, 0.6)).unwrap(),
            6 => {
                let v = cols[floats.iter().position(|&d| d == da).unwrap()];
                g.mul_cols(a, v).unwrap()
            }
            _ => {
                let b = pick(&mut r, &pool);
                let lora = match g.dtype(b) {
                    DType::F32 => b,
                    _ => g.cast(b, DType::F32).unwrap(),
                };
                g.dora_combine(a, lora, scale).unwrap()
            }
        };
        pool.push(y);
        if r.next_u64().is_multiple_of(4) {
            outputs.push(y);
        }
    }
    outputs.push(*pool.last().unwrap());
    Case { g, feeds, outputs }
}

fn run(c: &Case, fuse: bool) -> (Plan, Vec<Tensor>) {
    let opts = CompileOptions {
        fuse,
        ..Default::default()
    };
    let plan = compile_with(c.g.clone(), &c.outputs, &opts).unwrap();
    let mut feeds = Feeds::new();
    for (v, t) in &c.feeds {
        feeds.bind(*v, t);
    }
    let out = CpuExecutor::new().run(&plan, &feeds).unwrap();
    (plan, out)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fused_chains_compute_the_unfused_bits(
        m in 1usize..40, n in 1usize..300, ops in 1usize..14, seed: u64
    ) {
        let c = random_graph(m, n, ops, seed, &FLOATS);
        let (plan, fused) = run(&c, true);
        let (_, plain) = run(&c, false);
        for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
            prop_assert_eq!(f.dtype(), p.dtype());
            let (fb, pb) = (f.to_f32_vec().unwrap(), p.to_f32_vec().unwrap());
            prop_assert!(fb.iter().all(|x| x.is_finite()), "output {} not finite", i);
            let differ = fb.iter().zip(&pb).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            prop_assert_eq!(differ, 0, "output {}: {} values differ\n{}", i, differ, plan.dump());
        }
        // Every chain's generated CUDA source reads every input it takes.
        let g = plan.graph();
        for &n in plan.schedule() {
            if let Op::Elementwise(p) = &g.node(n).op {
                let dtypes: Vec<DType> = g.node(n).inputs.iter().map(|&i| g.dtype(i)).collect();
                if dtypes.contains(&DType::F16) || p.out == DType::F16
                    || p.code.iter().any(|i| matches!(i, graft_engine::ir::Instr::Round(_, DType::F16)))
                {
                    continue; // the GPU's chains take f32 and bf16 only
                }
                let (name, src) = graft_engine::chain::kernel_name(p, &dtypes).unwrap();
                let head = format!("void {name}(");
                prop_assert!(src.contains(&head), "{}", src);
                for i in 0..dtypes.len() {
                    prop_assert!(src.contains(&format!("in{i}")), "input {} unread:\n{}", i, src);
                }
            }
        }
    }
}

/// A LoRA branch's glue in a training step: `cast(dropout(cast(x)))` added
/// to the base output, with the intermediate kept once as an output: one
/// chain in the first case, two around the kept value in the second.
#[test]
fn a_chain_forms_and_stops_at_kept_values() {
    let mut g = Graph::new();
    let x = g.input("x", &[5, 7], DType::BF16);
    let base = g.input("base", &[5, 7], DType::BF16);
    let seed = g.input("seed", &[1], DType::U32);
    let xf = g.cast(x, DType::F32).unwrap();
    let d = g.dropout(xf, seed, 0.25).unwrap();
    let db = g.cast(d, DType::BF16).unwrap();
    let y = g.add(base, db).unwrap();
    for (outputs, chains, nodes) in [(vec![y], 1, 1), (vec![y, d], 2, 2)] {
        let plan = compile_with(
            g.clone(),
            &outputs,
            &CompileOptions {
                fuse: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plan.fusion().chains, chains, "{}", plan.dump());
        assert_eq!(plan.schedule().len(), nodes, "{}", plan.dump());
    }
}

/// On a GPU: random graphs of f32 and bf16 values (the GPU's chains take no
/// f16) through the GPU executor, against the CPU's bits: the chains as
/// generated kernels, the lone elementwise ops left unfused on
/// elementwise.cu's. Skips with a message where no GPU is usable.
#[cfg(feature = "cuda")]
#[test]
fn gpu_chains_compute_the_cpu_bits() {
    use graft_engine::{gpu_unsupported, GpuExecutor};
    let mut gpu = match GpuExecutor::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED (no usable GPU): {e}");
            return;
        }
    };
    let mut r = Rng::new(99);
    let (mut ran, mut chains) = (0, 0);
    for case in 0..100u64 {
        let (m, n) = (
            1 + r.next_u64() as usize % 300,
            1 + r.next_u64() as usize % 200,
        );
        let c = random_graph(m, n, 1 + case as usize % 13, r.next_u64(), &FLOATS[..2]);
        let (plan, cpu) = run(&c, true);
        assert!(gpu_unsupported(&plan).is_empty(), "{}", plan.dump());
        let mut feeds = Feeds::new();
        for (v, t) in &c.feeds {
            feeds.bind(*v, t);
        }
        let got = gpu.run(&plan, &feeds).unwrap();
        for (i, (g, w)) in got.iter().zip(&cpu).enumerate() {
            let (gb, wb) = (g.to_f32_vec().unwrap(), w.to_f32_vec().unwrap());
            let differ = gb
                .iter()
                .zip(&wb)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "case {case} output {i}:\n{}", plan.dump());
        }
        ran += 1;
        chains += plan.fusion().chains;
    }
    eprintln!("{ran} graphs on the GPU, {chains} chains: the CPU's bits");
    assert!(chains >= 50, "{ran} graphs, {chains} chains");
}

/// A hand-built program that reads a seed from a float, or loads the u32
/// seed as a value, is refused when recorded, naming the input: never a
/// panic at run time.
#[test]
fn a_malformed_program_is_refused_when_recorded() {
    use graft_engine::ir::{Instr, Operand, Program};
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3], DType::F32);
    let f = g.input("f", &[1], DType::F32);
    let seed = g.input("seed", &[1], DType::U32);
    let program = |code: Vec<Instr>| Program {
        inputs: vec![Operand::Full, Operand::Scalar],
        code,
        out: DType::F32,
        ops: vec!["dropout"],
    };
    let float_seed = program(vec![
        Instr::Load(0),
        Instr::Dropout {
            x: 0,
            seed: 1,
            p: 0.5,
        },
    ]);
    let e = g.apply(Op::Elementwise(float_seed), &[x, f]).unwrap_err();
    assert!(e.to_string().contains("seed"), "{e}");
    let loads_seed = program(vec![Instr::Load(0), Instr::Load(1), Instr::Add(0, 1)]);
    let e = g
        .apply(Op::Elementwise(loads_seed), &[x, seed])
        .unwrap_err();
    assert!(e.to_string().contains("loads input 1"), "{e}");
    let later = program(vec![Instr::Add(0, 1), Instr::Load(0)]);
    let e = g.apply(Op::Elementwise(later), &[x, f]).unwrap_err();
    assert!(e.to_string().contains("later register"), "{e}");
}
