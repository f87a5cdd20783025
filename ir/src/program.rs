//! An elementwise chain as one program (`passes::fuse_elementwise` makes
//! them): straight-line f32 code over element `k` of the output, reading
//! each input at `k`, at `k`'s column, or at 0. Every value an unfused op
//! stored in a narrower dtype is rounded to it (`Instr::Round`), so a chain
//! computes the same bits as its ops one by one. The CPU interprets a
//! program (engine/src/elementwise.rs); the GPU compiles CUDA generated
//! from it.

use crate::dtype::DType;

#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// How each input is read at element `k` of the output.
    pub inputs: Vec<Operand>,
    /// Instruction `i`'s result is register `i`; the last is the output.
    pub code: Vec<Instr>,
    /// The output's dtype (the last register is rounded to it as stored).
    pub out: DType,
    /// The names of the ops it replaces, in order (plan dumps).
    pub ops: Vec<&'static str>,
}

/// How a program reads an input at element `k` of its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// Element `k` of a tensor shaped as the output.
    Full,
    /// Element `k % cols` (`cols`: the output's last dim): a per-column
    /// vector.
    Cols,
    /// Element 0 of a `[1]` tensor: a scalar.
    Scalar,
}

/// One instruction; operands are registers (earlier instructions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Instr {
    /// Input `i` as f32 (a float widened; Dropout reads its u32 seed itself).
    Load(usize),
    Add(usize, usize),
    Mul(usize, usize),
    Scale(usize, f32),
    /// `x·mask/(1-p)`, the mask of element `k` for the seed in input `seed`
    /// (a u32 scalar), as the `dropout` op draws it.
    Dropout {
        x: usize,
        seed: usize,
        p: f32,
    },
    /// Rounded to `dtype` (bf16, f16) and widened back.
    Round(usize, DType),
}

impl Program {
    /// The registers an instruction reads.
    pub fn reads(i: &Instr) -> Vec<usize> {
        match *i {
            Instr::Load(_) => vec![],
            Instr::Add(a, b) | Instr::Mul(a, b) => vec![a, b],
            Instr::Scale(x, _) | Instr::Dropout { x, .. } | Instr::Round(x, _) => vec![x],
        }
    }

    /// Fails unless every register is read after it is written and every
    /// input index exists (a malformed program is a bug in its maker).
    pub fn check(&self) -> Result<(), String> {
        if self.code.is_empty() {
            return Err("a program without instructions".into());
        }
        for (i, ins) in self.code.iter().enumerate() {
            if Self::reads(ins).iter().any(|&r| r >= i) {
                return Err(format!("instruction {i} reads a later register"));
            }
            let input = match *ins {
                Instr::Load(x) => Some(x),
                Instr::Dropout { seed, .. } => Some(seed),
                _ => None,
            };
            if input.is_some_and(|x| x >= self.inputs.len()) {
                return Err(format!(
                    "instruction {i} reads input {input:?} of {}",
                    self.inputs.len()
                ));
            }
        }
        Ok(())
    }
}
