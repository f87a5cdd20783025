//! Gated activations `act(gate)·up` (SwiGLU, GeGLU-tanh), forward and backward.

use crate::math::exp;
use crate::Elem;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// The activation's value and derivative at `g`.
#[inline]
fn act(kind: Act, g: f32) -> (f32, f32) {
    match kind {
        Act::Silu => {
            let s = 1.0 / (1.0 + exp(-g));
            (g * s, s * (1.0 + g * (1.0 - s)))
        }
        Act::GeluTanh => {
            let u = SQRT_2_OVER_PI * (g + GELU_C * g * g * g);
            let t = u.tanh();
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g);
            (
                0.5 * g * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * du,
            )
        }
    }
}

/// Which activation a gated kernel applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    GeluTanh,
}

pub fn gated_act<T: Elem>(kind: Act, gate: &[T], up: &[T], y: &mut [T]) {
    y.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((y, gate), up)| {
            for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
                *y = T::from_f32(act(kind, g.to_f32()).0 * u.to_f32());
            }
        });
}

pub fn gated_act_grad<T: Elem>(
    kind: Act,
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
        for (((g, u), d), (dg, du)) in ins.zip(dgate.iter_mut().zip(dup.iter_mut())) {
            let (a, da) = act(kind, g.to_f32());
            let d = d.to_f32();
            *dg = T::from_f32(d * u.to_f32() * da);
            *du = T::from_f32(d * a);
        }
    });
}
