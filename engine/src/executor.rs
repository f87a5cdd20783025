//! The CPU executor: runs a plan's schedule over one arena, calling the
//! kernels (the blocked SIMD GEMM for f32 matmuls, the reference kernels
//! for everything else).

use crate::plan::Plan;
use crate::profile::OpProfile;
use crate::tensor::Tensor;
use crate::EngineError;
use graft_ir::{Activation, DType, NodeId, Op, Source, TypeInfo, ValueId};
use graft_kernels::activation::{self, Act};
use graft_kernels::attention::{self, AttnShape};
use graft_kernels::{
    bf16, dora, elementwise as ew, embedding, f16, gemm, loss, norm, rope, update, Elem,
};
use std::collections::HashMap;
use std::time::Instant;

/// The inputs and parameters bound for one run, by value id.
#[derive(Default)]
pub struct Feeds<'a> {
    map: HashMap<ValueId, Bound<'a>>,
}

/// A bound tensor: read only, or lent exclusively so that the plan may
/// update it in place (LOMO's fused updates).
enum Bound<'a> {
    Shared(&'a Tensor),
    Exclusive {
        ptr: *mut u8,
        len: usize,
        shape: Vec<usize>,
        dtype: DType,
        _lent: std::marker::PhantomData<&'a mut Tensor>,
    },
}

impl<'a> Feeds<'a> {
    pub fn new() -> Self {
        Feeds::default()
    }
    pub fn bind(&mut self, v: ValueId, t: &'a Tensor) -> &mut Self {
        self.map.insert(v, Bound::Shared(t));
        self
    }
    /// Binds `t` for the plan to update in place (a mapped tensor is copied
    /// into owned memory first).
    pub fn bind_mut(&mut self, v: ValueId, t: &'a mut Tensor) -> &mut Self {
        let (shape, dtype) = (t.shape().to_vec(), t.dtype());
        let b = t.bytes_mut();
        let (ptr, len) = (b.as_mut_ptr(), b.len());
        // The plan writes through `ptr`: no stamp names what it will hold.
        t.mark_volatile();
        self.map.insert(
            v,
            Bound::Exclusive {
                ptr,
                len,
                shape,
                dtype,
                _lent: std::marker::PhantomData,
            },
        );
        self
    }
    /// A tensor bound read-only.
    pub fn get(&self, v: ValueId) -> Option<&'a Tensor> {
        match self.map.get(&v)? {
            Bound::Shared(t) => Some(*t),
            Bound::Exclusive { .. } => None,
        }
    }
    /// Shape, dtype and bytes of whatever is bound to `v`, and whether it
    /// may be written.
    pub(crate) fn view(&self, v: ValueId) -> Option<(&[usize], DType, *mut u8, usize, bool)> {
        Some(match self.map.get(&v)? {
            Bound::Shared(t) => {
                let b = t.bytes();
                (t.shape(), t.dtype(), b.as_ptr() as *mut u8, b.len(), false)
            }
            Bound::Exclusive {
                ptr,
                len,
                shape,
                dtype,
                ..
            } => (shape.as_slice(), *dtype, *ptr, *len, true),
        })
    }
}

/// Runs plans on the CPU. Keeps its arena between runs, so a training loop
/// allocates it once.
#[derive(Default)]
pub struct CpuExecutor {
    arena: Vec<u64>,
    profile: Option<OpProfile>,
}

/// Bytes of one value during a run: a leaf's tensor or an arena range.
struct Slot {
    ptr: *mut u8,
    len: usize,
}

impl CpuExecutor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts (or, with `false`, stops and drops) timing every node this
    /// executor runs, by kind: see [`OpProfile`].
    pub fn profile_ops(&mut self, on: bool) {
        self.profile = on.then(OpProfile::default);
    }

    /// The time per kind of node over every run since [`Self::profile_ops`].
    pub fn op_profile(&self) -> Option<&OpProfile> {
        self.profile.as_ref()
    }

    /// Runs `plan` and returns its outputs as owned tensors, in plan order.
    pub fn run(&mut self, plan: &Plan, feeds: &Feeds) -> Result<Vec<Tensor>, EngineError> {
        let g = plan.graph();
        check_feeds(plan, feeds)?;
        // Eight words more, to start the arena on a cache line: the plan's
        // offsets are cache-line aligned, and AMX reads bf16 rows in place
        // only when they are.
        let words = plan.peak_bytes().div_ceil(8) + 8;
        if self.arena.len() < words {
            // An arena too large for the machine is an error, not an abort.
            self.arena = Vec::new();
            self.arena.try_reserve_exact(words).map_err(|_| {
                EngineError::Memory(format!(
                    "the plan's arena of {:.2} GB could not be allocated",
                    plan.peak_bytes() as f64 / 1e9
                ))
            })?;
            self.arena.resize(words, 0);
        }
        let base = self.arena.as_mut_ptr() as *mut u8;
        let base = base.wrapping_add(base.align_offset(64));
        let slot = |v: ValueId| -> Slot {
            match g.value(v).source {
                Source::Node { .. } => {
                    let off = plan
                        .memory()
                        .offset(v)
                        .expect("every computed value has an offset");
                    // SAFETY: the offset lies within the arena sized to the plan's peak.
                    Slot {
                        ptr: unsafe { base.add(off) },
                        len: g.ty(v).bytes(),
                    }
                }
                _ => {
                    let (_, _, ptr, len, _) = feeds.view(v).expect("leaves checked above");
                    Slot { ptr, len }
                }
            }
        };
        let run_node = |n: NodeId| -> Result<(), EngineError> {
            let node = g.node(n);
            if let Op::SgdUpdate {
                weight_decay,
                clip_value,
            } = &node.op
            {
                let read = |v: ValueId| {
                    let s = slot(v);
                    // SAFETY: as below; these are read only during this node.
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }
                };
                let (p, out) = (slot(node.inputs[0]), slot(node.outputs[0]));
                // SAFETY: the parameter is bound exclusively (checked above)
                // and no other slice of it exists during this node.
                let p = unsafe { std::slice::from_raw_parts_mut(p.ptr, p.len) };
                let sq = update::sgd_update(
                    fm::<f32>(p),
                    f::<f32>(read(node.inputs[1])),
                    f::<f32>(read(node.inputs[2]))[0],
                    f::<f32>(read(node.inputs[3]))[0],
                    *weight_decay,
                    *clip_value,
                );
                // SAFETY: the output's arena range, as for any node.
                let out = unsafe { std::slice::from_raw_parts_mut(out.ptr, out.len) };
                fm::<f32>(out)[0] = sq as f32;
                return Ok(());
            }
            if let Op::AdaLomoUpdate(h) = &node.op {
                let read = |v: ValueId| {
                    let s = slot(v);
                    // SAFETY: read only during this node.
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }
                };
                // SAFETY: parameter and state are bound exclusively (checked
                // above), distinct tensors, and no other slice of them exists now.
                let write = |v: ValueId| {
                    let s = slot(v);
                    unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) }
                };
                let scalar = |i: usize| f::<f32>(read(node.inputs[i]))[0];
                let sq = update::adalomo_update(
                    fm::<f32>(write(node.inputs[0])),
                    f::<f32>(read(node.inputs[1])),
                    fm::<f32>(write(node.inputs[5])),
                    fm::<f32>(write(node.inputs[6])),
                    g.shape(node.inputs[0]).len() == 2,
                    scalar(4) as u64,
                    scalar(2),
                    scalar(3),
                    &adalomo_hyper(h),
                );
                fm::<f32>(write(node.outputs[0]))[0] = sq as f32;
                return Ok(());
            }
            // SAFETY: the memory plan never overlaps a node's outputs with any
            // value live at that node (its inputs included), and leaves are
            // only read. Slices are re-derived per node from the raw base.
            let ins: Vec<&[u8]> = node
                .inputs
                .iter()
                .map(|&i| {
                    let s = slot(i);
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }
                })
                .collect();
            let mut outs: Vec<&mut [u8]> = node
                .outputs
                .iter()
                .map(|&o| {
                    let s = slot(o);
                    unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) }
                })
                .collect();
            let in_tys: Vec<&TypeInfo> = node.inputs.iter().map(|&i| g.ty(i)).collect();
            let ws: &mut [u8] = match plan.memory().workspace(n) {
                // SAFETY: the workspace's arena range is live for this node
                // alone and overlaps none of its inputs and outputs.
                Some((off, len)) => unsafe { std::slice::from_raw_parts_mut(base.add(off), len) },
                None => &mut [],
            };
            let out_dtype = g.dtype(node.outputs[0]);
            if let Op::Elementwise(p) = &node.op {
                return crate::chain::run_cpu(p, &ins, &in_tys, outs[0]).map_err(|msg| {
                    EngineError::Kernel {
                        op: node.op.name(),
                        msg,
                    }
                });
            }
            let main = match &node.op {
                Op::Fill { dtype, .. } => *dtype,
                _ => g.dtype(node.inputs[0]),
            };
            let res = match main {
                DType::F32 => exec::<f32>(&node.op, &ins, &mut outs, ws, &in_tys, out_dtype),
                DType::BF16 => exec::<bf16>(&node.op, &ins, &mut outs, ws, &in_tys, out_dtype),
                DType::F16 => exec::<f16>(&node.op, &ins, &mut outs, ws, &in_tys, out_dtype),
                other => Err(format!("no kernel takes {other} as its main operand")),
            };
            res.map_err(|msg| EngineError::Kernel {
                op: node.op.name(),
                msg,
            })
        };
        for &n in plan.schedule() {
            let node = g.node(n);
            match &mut self.profile {
                Some(p) => {
                    let t0 = Instant::now();
                    run_node(n)?;
                    p.record(g, node, t0.elapsed());
                }
                None => run_node(n)?,
            }
        }
        plan.outputs()
            .iter()
            .map(|&o| {
                let s = slot(o);
                // SAFETY: as above; the run is over and nothing writes any more.
                let b = unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) };
                Tensor::from_bytes(g.shape(o), g.dtype(o), b)
            })
            .collect()
    }
}

/// The kernels' AdaLomo hyperparameters of the IR's spec.
pub(crate) fn adalomo_hyper(h: &graft_ir::AdaLomoSpec) -> update::AdaLomo {
    update::AdaLomo {
        eps1: h.eps1,
        eps2: h.eps2,
        clip_threshold: h.clip_threshold,
        decay_rate: h.decay_rate,
        weight_decay: h.weight_decay,
        clip_value: h.clip_value,
    }
}

/// Fails unless every leaf of `plan` is bound with the declared shape and
/// dtype, and every parameter the plan updates in place is bound for it.
pub(crate) fn check_feeds(plan: &Plan, feeds: &Feeds) -> Result<(), EngineError> {
    let g = plan.graph();
    for leaf in plan.leaves() {
        let name = g.leaf_name(leaf).unwrap_or("?");
        let (shape, dtype, ..) = feeds
            .view(leaf)
            .ok_or_else(|| EngineError::Unbound(name.to_string()))?;
        let ty = g.ty(leaf);
        if shape != ty.shape.as_slice() || dtype != ty.dtype {
            return Err(EngineError::Feed {
                name: name.to_string(),
                want: format!("{} {:?}", ty.dtype, ty.shape),
                got: format!("{dtype} {shape:?}"),
            });
        }
    }
    for &n in plan.schedule() {
        let node = g.node(n);
        for &i in node.op.in_place_inputs() {
            let target = node.inputs[i];
            if !feeds.view(target).is_some_and(|v| v.4) {
                return Err(EngineError::Compile(format!(
                    "`{}` is updated in place by the plan ({}): bind it with Feeds::bind_mut",
                    g.leaf_name(target).unwrap_or("?"),
                    node.op.name()
                )));
            }
        }
    }
    Ok(())
}

fn f<T: bytemuck::Pod>(b: &[u8]) -> &[T] {
    bytemuck::cast_slice(b)
}
fn fm<T: bytemuck::Pod>(b: &mut [u8]) -> &mut [T] {
    bytemuck::cast_slice_mut(b)
}

pub(crate) fn act(a: Activation) -> Act {
    match a {
        Activation::Silu => Act::Silu,
        Activation::GeluTanh => Act::GeluTanh,
    }
}

pub(crate) fn attn_shape(spec: &graft_ir::AttentionSpec, tokens: usize) -> AttnShape {
    AttnShape {
        tokens,
        n_heads: spec.n_heads,
        n_kv_heads: spec.n_kv_heads,
        head_dim: spec.head_dim,
        scale: spec.scale,
        window: spec.window,
    }
}

fn cast_to<T: Elem + bytemuck::Pod>(x: &[T], to: DType, y: &mut [u8]) -> Result<(), String> {
    match to {
        DType::F32 => ew::cast(x, fm::<f32>(y)),
        DType::BF16 => ew::cast(x, fm::<bf16>(y)),
        DType::F16 => ew::cast(x, fm::<f16>(y)),
        other => return Err(format!("cannot cast to {other}")),
    }
    Ok(())
}

/// A fusion group `epilogue([addend +] Σ scale·op(a)·op(b))` in one
/// [`gemm::gemm_sum`].
#[allow(clippy::too_many_arguments)]
fn matmul_sum(
    terms: &[graft_ir::Product],
    addend: bool,
    epilogue: Option<&graft_ir::Epilogue>,
    bf16_compute: bool,
    ins: &[&[u8]],
    out: &mut [u8],
    tys: &[&TypeInfo],
    out_dtype: DType,
) -> Result<(), String> {
    // NF4 views borrow their bytes: made first, then referenced by the terms.
    let nf4: Vec<Option<graft_kernels::nf4::Nf4>> = terms
        .iter()
        .enumerate()
        .map(|(i, t)| match (t.nf4, tys[2 * i + 1].dtype) {
            (true, DType::Nf4 { block }) => {
                crate::nf4::nf4_view(ins[2 * i + 1], &tys[2 * i + 1].shape, block as usize)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            (true, other) => Err(format!("term {i}: weight is {other}, not nf4")),
            (false, _) => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let dense = |i: usize| -> Result<gemm::Operand, String> {
        Ok(match tys[i].dtype {
            DType::F32 => gemm::Operand::F32(f(ins[i])),
            DType::BF16 => gemm::Operand::Bf16(f(ins[i])),
            DType::F16 => gemm::Operand::F16(f(ins[i])),
            other => return Err(format!("operand {i} is {other}")),
        })
    };
    let mut gterms = Vec::with_capacity(terms.len());
    let (mut m, mut n) = (0, 0);
    for (i, (t, w)) in terms.iter().zip(&nf4).enumerate() {
        let (a, b) = (tys[2 * i].shape.as_slice(), tys[2 * i + 1].shape.as_slice());
        let (rows, k) = if t.ta { (a[1], a[0]) } else { (a[0], a[1]) };
        (m, n) = (rows, if t.tb { b[0] } else { b[1] });
        gterms.push(gemm::Term {
            a: dense(2 * i)?,
            b: match w {
                Some(w) => gemm::Operand::Nf4(w),
                None => dense(2 * i + 1)?,
            },
            k,
            ta: t.ta,
            tb: t.tb,
            scale: t.scale,
        });
    }
    let init = match addend {
        true => Some(dense(2 * terms.len())?),
        false => None,
    };
    // The epilogue's input is the last.
    let last = *ins.last().expect("a group has inputs");
    let table = match epilogue {
        Some(graft_ir::Epilogue::Rope(spec)) => Some((
            f::<i32>(last),
            graft_kernels::rope::RopeTable::new(f(last), &spec.inv_freq, false),
        )),
        _ => None,
    };
    let epi = match (epilogue, &table) {
        (Some(graft_ir::Epilogue::ScaleCols), _) => Some(gemm::Epilogue::ScaleCols(f(last))),
        (_, Some((positions, table))) => Some(gemm::Epilogue::Rope { positions, table }),
        _ => None,
    };
    let (bf, mn) = (bf16_compute, (m, n));
    match out_dtype {
        DType::F32 => gemm::gemm_sum(&gterms, init, epi, fm::<f32>(out), mn, bf),
        DType::BF16 => gemm::gemm_sum(&gterms, init, epi, fm::<bf16>(out), mn, bf),
        DType::F16 => gemm::gemm_sum(&gterms, init, epi, fm::<f16>(out), mn, bf),
        other => return Err(format!("cannot write {other}")),
    }
    Ok(())
}

/// Runs one op whose main float operand has storage type `T`.
fn exec<T: Elem + bytemuck::Pod>(
    op: &Op,
    ins: &[&[u8]],
    outs: &mut [&mut [u8]],
    ws: &mut [u8],
    tys: &[&TypeInfo],
    out_dtype: DType,
) -> Result<(), String> {
    let shapes: Vec<&[usize]> = tys.iter().map(|t| t.shape.as_slice()).collect();
    let e = |err: graft_kernels::IndexError| err.to_string();
    let (o0, rest) = outs.split_first_mut().expect("every op has an output");
    match op {
        Op::Fill { value, .. } => ew::fill(fm::<T>(o0), *value),
        Op::MatMul { ta, tb } => {
            let (a, b) = (shapes[0], shapes[1]);
            let (m, k) = if *ta { (a[1], a[0]) } else { (a[0], a[1]) };
            let n = if *tb { b[0] } else { b[1] };
            // The blocked SIMD GEMM on the CPU's best path (or GRAFT_CPU's).
            gemm::gemm(
                f::<T>(ins[0]),
                f::<T>(ins[1]),
                fm::<T>(o0),
                m,
                k,
                n,
                *ta,
                *tb,
            )
        }
        Op::Nf4MatMul { tb, compute } => {
            let DType::Nf4 { block } = tys[1].dtype else {
                return Err(format!("weight is {}, not nf4", tys[1].dtype));
            };
            let w = crate::nf4::nf4_view(ins[1], &tys[1].shape, block as usize)
                .map_err(|e| e.to_string())?;
            let bf16_compute = *compute == DType::BF16;
            gemm::nf4_gemm(
                f::<T>(ins[0]),
                &w,
                shapes[0][0],
                *tb,
                bf16_compute,
                fm::<T>(o0),
            )
        }
        Op::MatMulSum {
            terms,
            addend,
            compute,
            out,
            epilogue,
        } => {
            let bf16_compute = *compute == DType::BF16;
            let epilogue = epilogue.as_ref();
            matmul_sum(terms, *addend, epilogue, bf16_compute, ins, o0, tys, *out)?
        }
        Op::AddBias => ew::add_bias(f::<T>(ins[0]), f::<T>(ins[1]), fm::<T>(o0)),
        Op::SumRows => ew::sum_rows(f::<T>(ins[0]), fm::<T>(o0)),
        Op::MulCols => ew::mul_cols(f::<T>(ins[0]), f::<T>(ins[1]), fm::<T>(o0)),
        Op::DoraCombine => dora::dora_combine(
            f::<T>(ins[0]),
            f::<f32>(ins[1]),
            f::<f32>(ins[2]),
            fm::<T>(o0),
        ),
        Op::SgdUpdate { .. } | Op::AdaLomoUpdate(_) => {
            return Err("runs in place, before dispatch".into())
        }
        Op::Elementwise(_) => return Err("runs before dispatch (chain::run_cpu)".into()),
        Op::DoraInvNorm { scaling } => {
            let (r, inp) = (shapes[0][0], shapes[0][1]);
            let (a, b, y) = (f::<f32>(ins[0]), f::<f32>(ins[1]), fm::<f32>(o0));
            let dense = |o: usize, buf: &mut [f32], w: &dyn Fn(usize) -> f32| {
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = w(o * inp + i);
                }
            };
            match tys[2].dtype {
                DType::F32 => {
                    let w = f::<f32>(ins[2]);
                    dora::dora_norms(|o, buf| dense(o, buf, &|i| w[i]), a, b, r, *scaling, y)
                }
                DType::BF16 => {
                    let w = f::<bf16>(ins[2]);
                    dora::dora_norms(
                        |o, buf| dense(o, buf, &|i| w[i].to_f32()),
                        a,
                        b,
                        r,
                        *scaling,
                        y,
                    )
                }
                DType::F16 => {
                    let w = f::<f16>(ins[2]);
                    dora::dora_norms(
                        |o, buf| dense(o, buf, &|i| w[i].to_f32()),
                        a,
                        b,
                        r,
                        *scaling,
                        y,
                    )
                }
                DType::Nf4 { block } => {
                    let w = crate::nf4::nf4_view(ins[2], &tys[2].shape, block as usize)
                        .map_err(|e| e.to_string())?;
                    dora::dora_norms(
                        |o, buf| w.dequantize_into(o * inp, buf),
                        a,
                        b,
                        r,
                        *scaling,
                        y,
                    )
                }
                other => return Err(format!("weight is {other}")),
            }
            y.iter_mut().for_each(|n| *n = 1.0 / *n);
        }
        Op::Add => ew::add(f::<T>(ins[0]), f::<T>(ins[1]), fm::<T>(o0)),
        Op::Mul => ew::mul(f::<T>(ins[0]), f::<T>(ins[1]), fm::<T>(o0)),
        Op::Scale(s) => ew::scale(f::<T>(ins[0]), *s, fm::<T>(o0)),
        Op::Cast(_) => cast_to(f::<T>(ins[0]), out_dtype, o0)?,
        Op::Embedding => {
            embedding::embedding(f::<T>(ins[0]), f::<i32>(ins[1]), shapes[0][1], fm::<T>(o0))
                .map_err(e)?
        }
        Op::EmbeddingGrad { .. } => {
            embedding::embedding_grad(f::<T>(ins[0]), f::<i32>(ins[1]), shapes[0][1], fm::<T>(o0))
                .map_err(e)?
        }
        Op::RmsNorm { eps, unit_offset } => norm::rms_norm(
            f::<T>(ins[0]),
            f::<T>(ins[1]),
            *eps,
            *unit_offset,
            fm::<T>(o0),
        ),
        Op::RmsNormGradInput { eps, unit_offset } => norm::rms_norm_grad_input(
            f::<T>(ins[0]),
            f::<T>(ins[1]),
            f::<T>(ins[2]),
            *eps,
            *unit_offset,
            fm::<T>(o0),
        ),
        Op::RmsNormGradWeight { eps } => {
            norm::rms_norm_grad_weight(f::<T>(ins[0]), f::<T>(ins[1]), *eps, fm::<T>(o0))
        }
        Op::Rope { spec, inverse } => rope::rope(
            f::<T>(ins[0]),
            f::<i32>(ins[1]),
            &spec.inv_freq,
            spec.n_heads,
            *inverse,
            fm::<T>(o0),
        ),
        Op::Attention(spec) => attention::attention(
            f::<T>(ins[0]),
            f::<T>(ins[1]),
            f::<T>(ins[2]),
            f::<i32>(ins[3]),
            attn_shape(spec, shapes[0][0]),
            fm::<T>(o0),
            fm::<f32>(rest[0]),
        ),
        Op::AttentionCached(spec) => {
            let start = f::<i32>(ins[5])[0];
            let rows = shapes[3][0];
            if start < 0 || start as usize + shapes[0][0] > rows {
                return Err(format!(
                    "start {start} + {} new tokens exceed the cache of {rows} rows",
                    shapes[0][0]
                ));
            }
            attention::attention_cached(
                f::<T>(ins[0]),
                f::<T>(ins[1]),
                f::<T>(ins[2]),
                f::<T>(ins[3]),
                f::<T>(ins[4]),
                start as usize,
                attn_shape(spec, shapes[0][0]),
                fm::<T>(o0),
            )
        }
        Op::AttentionGrad(spec) => {
            let (dk, dv) = rest.split_at_mut(1);
            attention::attention_grad(
                f::<T>(ins[0]),
                f::<T>(ins[1]),
                f::<T>(ins[2]),
                f::<i32>(ins[3]),
                f::<T>(ins[4]),
                f::<f32>(ins[5]),
                f::<T>(ins[6]),
                attn_shape(spec, shapes[0][0]),
                fm::<T>(o0),
                fm::<T>(dk[0]),
                fm::<T>(dv[0]),
            )
        }
        Op::GatedAct(a) => {
            activation::gated_act(act(*a), f::<T>(ins[0]), f::<T>(ins[1]), fm::<T>(o0))
        }
        Op::GatedActGrad(a) => activation::gated_act_grad(
            act(*a),
            f::<T>(ins[0]),
            f::<T>(ins[1]),
            f::<T>(ins[2]),
            fm::<T>(o0),
            fm::<T>(rest[0]),
        ),
        Op::CrossEntropy { ignore_index } => {
            let l =
                loss::cross_entropy(f::<T>(ins[0]), f::<i32>(ins[1]), *ignore_index).map_err(e)?;
            fm::<f32>(o0)[0] = l;
        }
        Op::CrossEntropyGrad { ignore_index } => {
            let dloss = f::<f32>(ins[2])[0];
            loss::cross_entropy_grad(
                f::<T>(ins[0]),
                f::<i32>(ins[1]),
                *ignore_index,
                dloss,
                fm::<T>(o0),
            )
            .map_err(e)?
        }
        Op::LinearCrossEntropy {
            ignore_index,
            chunk,
        } => {
            let l = loss::linear_cross_entropy(
                f::<T>(ins[0]),
                f::<T>(ins[1]),
                f::<i32>(ins[2]),
                *ignore_index,
                *chunk,
                fm::<T>(rest[0]),
                fm::<T>(ws),
            )
            .map_err(e)?;
            fm::<f32>(o0)[0] = l;
        }
        Op::ScaleBy => ew::scale(f::<T>(ins[0]), f::<f32>(ins[1])[0], fm::<T>(o0)),
        Op::Dropout { p } => ew::dropout(f::<T>(ins[0]), f::<u32>(ins[1])[0], *p, fm::<T>(o0)),
    }
    Ok(())
}
