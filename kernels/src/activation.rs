//! Gated activations `act(gate)·up` (SwiGLU, GeGLU-tanh), forward and backward.

use crate::math::exp;
use crate::simd::vectorized;
use crate::Elem;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// SiLU's value and derivative at `g`.
#[inline(always)]
fn silu(g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-g));
    (g * s, s * (1.0 + g * (1.0 - s)))
}

/// GeLU (tanh approximation)'s value and derivative at `g`. tanh through
/// [`exp`]: libm's `tanhf` is a call, which keeps the loop scalar.
#[inline(always)]
fn gelu_tanh(g: f32) -> (f32, f32) {
    let u = SQRT_2_OVER_PI * (g + GELU_C * g * g * g);
    let t = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g);
    (
        0.5 * g * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * du,
    )
}

/// Which activation a gated kernel applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    GeluTanh,
}

/// `y = act(gate)·up`.
pub fn gated_act<T: Elem>(kind: Act, gate: &[T], up: &[T], y: &mut [T]) {
    // One loop per activation: a `match` inside would keep it scalar.
    match kind {
        Act::Silu => gated_act_by(silu, gate, up, y),
        Act::GeluTanh => gated_act_by(gelu_tanh, gate, up, y),
    }
}

fn gated_act_by<T: Elem>(
    act: impl Fn(f32) -> (f32, f32) + Sync,
    gate: &[T],
    up: &[T],
    y: &mut [T],
) {
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((y, gate), up)| {
            vectorized(
                #[inline(always)]
                || {
                    for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
                        *y = T::from_f32(act(g.to_f32()).0 * u.to_f32());
                    }
                },
            )
        });
}

/// `dgate = dy·up·act'(gate)`, `dup = dy·act(gate)`.
pub fn gated_act_grad<T: Elem>(
    kind: Act,
    gate: &[T],
    up: &[T],
    dy: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) {
    match kind {
        Act::Silu => gated_act_grad_by(silu, gate, up, dy, dgate, dup),
        Act::GeluTanh => gated_act_grad_by(gelu_tanh, gate, up, dy, dgate, dup),
    }
}

fn gated_act_grad_by<T: Elem>(
    act: impl Fn(f32) -> (f32, f32) + Sync,
    gate: &[T],
    up: &[T],
    dy: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) {
    let ins = gate
        .par_chunks(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK));
    let outs = dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK));
    ins.zip(outs).for_each(|(((gate, up), dy), (dgate, dup))| {
        // Zipped, not indexed: bounds checks would keep the loop scalar.
        let ins = gate.iter().zip(up).zip(dy);
        vectorized(
            #[inline(always)]
            || {
                for (((g, u), d), (dg, du)) in ins.zip(dgate.iter_mut().zip(dup.iter_mut())) {
                    let (a, da) = act(g.to_f32());
                    let d = d.to_f32();
                    *dg = T::from_f32(d * u.to_f32() * da);
                    *du = T::from_f32(d * a);
                }
            },
        )
    });
}
