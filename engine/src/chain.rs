//! An elementwise chain (`Op::Elementwise`, a `graft_ir::Program`) on both
//! devices: the CPU interprets it, each instruction over a block of
//! elements at a time; the GPU compiles the CUDA source written here from
//! it (NVRTC, cached by the source's hash). Both compute every instruction
//! in f32 with the unfused ops' roundings, so a chain gives the bits its
//! ops gave one by one.

use graft_ir::{DType, Instr, Operand, Program, TypeInfo};
use graft_kernels::elementwise::dropout_keep;
use graft_kernels::simd::vectorized;
use graft_kernels::{bf16, f16, Elem};
use rayon::prelude::*;

/// Elements each instruction runs over at a time.
const LANES: usize = 256;
/// Elements per parallel task (a chain's elements are independent).
const CHUNK: usize = 1 << 14;

/// An input as the interpreter reads it.
#[derive(Clone, Copy)]
enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    U32(&'a [u32]),
}

/// `y[j] = x[at(j)]` widened to f32, one match per block of elements.
#[inline(always)]
fn gather(x: Input, y: &mut [f32], at: impl Fn(usize) -> usize) {
    match x {
        Input::F32(v) => y.iter_mut().enumerate().for_each(|(j, y)| *y = v[at(j)]),
        Input::Bf16(v) => y
            .iter_mut()
            .enumerate()
            .for_each(|(j, y)| *y = v[at(j)].to_f32()),
        Input::F16(v) => y
            .iter_mut()
            .enumerate()
            .for_each(|(j, y)| *y = v[at(j)].to_f32()),
        Input::U32(v) => y
            .iter_mut()
            .enumerate()
            .for_each(|(j, y)| *y = v[at(j)] as f32),
    }
}

/// Runs program `p` on the CPU: `ins` its inputs' bytes with their types,
/// `out` the output's bytes.
pub(crate) fn run_cpu(
    p: &Program,
    ins: &[&[u8]],
    tys: &[&TypeInfo],
    out: &mut [u8],
) -> Result<(), String> {
    let inputs: Vec<Input> = ins
        .iter()
        .zip(tys)
        .map(|(b, t)| {
            Ok(match t.dtype {
                DType::F32 => Input::F32(bytemuck::cast_slice(b)),
                DType::BF16 => Input::Bf16(bytemuck::cast_slice(b)),
                DType::F16 => Input::F16(bytemuck::cast_slice(b)),
                DType::U32 => Input::U32(bytemuck::cast_slice(b)),
                other => return Err(format!("an elementwise chain does not read {other}")),
            })
        })
        .collect::<Result<_, String>>()?;
    let full = p
        .inputs
        .iter()
        .position(|o| *o == Operand::Full)
        .ok_or("a chain without a full-shaped input")?;
    let cols = tys[full].shape.last().copied().unwrap_or(1).max(1);
    match p.out {
        DType::F32 => run_typed(p, &inputs, cols, bytemuck::cast_slice_mut::<_, f32>(out)),
        DType::BF16 => run_typed(p, &inputs, cols, bytemuck::cast_slice_mut::<_, bf16>(out)),
        DType::F16 => run_typed(p, &inputs, cols, bytemuck::cast_slice_mut::<_, f16>(out)),
        other => return Err(format!("an elementwise chain does not write {other}")),
    }
    Ok(())
}

fn run_typed<O: Elem>(p: &Program, inputs: &[Input], cols: usize, out: &mut [O]) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut regs = vec![[0f32; LANES]; p.code.len()];
            vectorized(
                #[inline(always)]
                || {
                    for (b, block) in chunk.chunks_mut(LANES).enumerate() {
                        run_block(p, inputs, cols, c * CHUNK + b * LANES, &mut regs, block);
                    }
                },
            )
        });
}

/// The program over elements `k0..k0 + out.len()` (at most LANES).
#[inline(always)]
fn run_block<O: Elem>(
    p: &Program,
    inputs: &[Input],
    cols: usize,
    k0: usize,
    regs: &mut [[f32; LANES]],
    out: &mut [O],
) {
    let n = out.len();
    for (r, ins) in p.code.iter().enumerate() {
        let (done, rest) = regs.split_at_mut(r);
        let y = &mut rest[0][..n];
        let reg = |i: usize| &done[i][..n];
        match *ins {
            Instr::Load(i) => match p.inputs[i] {
                Operand::Full => gather(inputs[i], y, |j| k0 + j),
                Operand::Cols => {
                    // Row pieces: no division per element, and each piece
                    // a contiguous (vectorized) widening copy.
                    let (mut at, mut c) = (0, k0 % cols);
                    while at < n {
                        let take = (cols - c).min(n - at);
                        gather(inputs[i], &mut y[at..at + take], |j| c + j);
                        (at, c) = (at + take, 0);
                    }
                }
                Operand::Scalar => gather(inputs[i], y, |_| 0),
            },
            // Zipped, not indexed: no bounds checks, so the loops vectorize.
            Instr::Add(a, b) => y
                .iter_mut()
                .zip(reg(a).iter().zip(reg(b)))
                .for_each(|(y, (a, b))| *y = a + b),
            Instr::Mul(a, b) => y
                .iter_mut()
                .zip(reg(a).iter().zip(reg(b)))
                .for_each(|(y, (a, b))| *y = a * b),
            Instr::Scale(x, s) => y.iter_mut().zip(reg(x)).for_each(|(y, x)| *y = x * s),
            Instr::Dropout { x, seed, p } => {
                let (x, keep_scale) = (reg(x), 1.0 / (1.0 - p));
                let Input::U32(s) = inputs[seed] else {
                    unreachable!("ir::Op::infer checks the seed is u32")
                };
                let s = s[0];
                y.iter_mut().zip(x).enumerate().for_each(|(j, (y, x))| {
                    *y = match dropout_keep(s, k0 + j, p) {
                        true => x * keep_scale,
                        false => 0.0,
                    }
                });
            }
            Instr::Round(x, d) => {
                let x = reg(x);
                match d {
                    DType::BF16 => y
                        .iter_mut()
                        .zip(x)
                        .for_each(|(y, x)| *y = bf16::from_f32(*x).to_f32()),
                    DType::F16 => y
                        .iter_mut()
                        .zip(x)
                        .for_each(|(y, x)| *y = f16::from_f32(*x).to_f32()),
                    _ => y.copy_from_slice(x),
                }
            }
        }
    }
    let last = &regs[p.code.len() - 1];
    out.iter_mut()
        .zip(last)
        .for_each(|(o, v)| *o = O::from_f32(*v));
}

/// The CUDA source of program `p` with inputs of `dtypes`: one kernel
/// `name(in0, in1, .., out, n, cols)`, a grid-stride loop over the output's
/// `n` elements in rows of `cols`. Constants are written as their bits, so
/// the GPU multiplies by exactly the CPU's values.
pub fn cuda_source(p: &Program, dtypes: &[DType], name: &str) -> Result<String, String> {
    let ctype = |d: DType| match d {
        DType::F32 => Ok("float"),
        DType::BF16 => Ok("bf16_t"),
        DType::U32 => Ok("u32"),
        other => Err(format!("the GPU's elementwise chains do not take {other}")),
    };
    let bits = |x: f32| format!("__uint_as_float(0x{:08x}u)", x.to_bits());
    let mut params = Vec::new();
    for (i, &d) in dtypes.iter().enumerate() {
        params.push(format!("const {}* __restrict__ in{i}", ctype(d)?));
    }
    params.push(format!("{}* __restrict__ out", ctype(p.out)?));
    params.push("size_t n".into());
    params.push("size_t cols".into());
    let mut body = String::new();
    if p.inputs.contains(&Operand::Cols) {
        body.push_str("        const size_t col = k % cols;\n");
    }
    for (r, ins) in p.code.iter().enumerate() {
        let e = match *ins {
            Instr::Load(i) => match p.inputs[i] {
                Operand::Full => format!("ld(in{i}, k)"),
                Operand::Cols => format!("ld(in{i}, col)"),
                Operand::Scalar => format!("ld(in{i}, 0)"),
            },
            Instr::Add(a, b) => format!("r{a} + r{b}"),
            Instr::Mul(a, b) => format!("r{a} * r{b}"),
            Instr::Scale(x, s) => format!("r{x} * {}", bits(s)),
            Instr::Dropout { x, seed, p } => format!(
                "dropout_keep(in{seed}[0], k, {}) ? r{x} * {} : 0.0f",
                bits(p),
                bits(1.0 / (1.0 - p))
            ),
            Instr::Round(x, DType::BF16) => format!("bf16_to_f32(f32_to_bf16(r{x}))"),
            Instr::Round(_, d) => return Err(format!("the GPU does not round to {d}")),
        };
        body.push_str(&format!("        const float r{r} = {e};\n"));
    }
    Ok(format!(
        "// Generated by engine/src/chain.rs: {ops}.\nextern \"C\" __global__ void {name}({params}) {{\n    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;\n         k += (size_t)gridDim.x * blockDim.x) {{\n{body}        st(out, k, r{last});\n    }}\n}}\n",
        ops = p.ops.join(" · "),
        params = params.join(", "),
        last = p.code.len() - 1
    ))
}

/// The kernel name of a generated source and the source: the name is the
/// hash of the source written with a placeholder name, so a name is one
/// source.
pub fn kernel_name(p: &Program, dtypes: &[DType]) -> Result<(String, String), String> {
    const PLACEHOLDER: &str = "GRAFT_CHAIN_NAME";
    let src = cuda_source(p, dtypes, PLACEHOLDER)?;
    let name = format!(
        "chain_{:016x}",
        graft_kernels::cache::fnv1a(&[src.as_bytes()])
    );
    Ok((name.clone(), src.replacen(PLACEHOLDER, &name, 1)))
}
