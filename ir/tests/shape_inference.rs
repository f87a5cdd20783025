//! Shape and dtype inference: every op accepts the shapes it documents and
//! answers anything else with a clear `IrError::Shape` naming the op (never a
//! panic).

use graft_ir::{Activation, AttentionSpec, DType, Graph, IrError, Op, RopeSpec, TypeInfo, ValueId};
use proptest::prelude::*;
use std::sync::Arc;

use DType::{BF16, F16, F32, I32, U32};

fn t(shape: &[usize], dtype: DType) -> TypeInfo {
    TypeInfo::new(shape.to_vec(), dtype)
}

/// 4 query heads over 2 kv heads of dim 2: q is `[T, 8]`, k/v are `[T, 4]`.
fn attn() -> AttentionSpec {
    AttentionSpec {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 2,
        scale: 0.5,
        window: Some(3),
    }
}

/// 2 heads of dim 4: x is `[T, 8]`.
fn rope_spec() -> RopeSpec {
    RopeSpec {
        n_heads: 2,
        head_dim: 4,
        inv_freq: Arc::from(vec![1.0f32, 0.01]),
    }
}

fn rope(spec: RopeSpec) -> Op {
    Op::Rope {
        spec,
        inverse: false,
    }
}

/// `(op, inputs, expected outputs)` for well-typed calls of every op.
fn valid_cases() -> Vec<(Op, Vec<TypeInfo>, Vec<TypeInfo>)> {
    let mm = |ta, tb| Op::MatMul { ta, tb };
    let q = t(&[5, 8], F32);
    let kv = t(&[5, 4], F32);
    let seg = t(&[5], I32);
    let lse = t(&[5, 4], F32);
    vec![
        (
            Op::Fill {
                value: 1.0,
                shape: vec![2, 3],
                dtype: BF16,
            },
            vec![],
            vec![t(&[2, 3], BF16)],
        ),
        (
            mm(false, false),
            vec![t(&[2, 3], F32), t(&[3, 4], F32)],
            vec![t(&[2, 4], F32)],
        ),
        (
            mm(false, true),
            vec![t(&[2, 3], F32), t(&[4, 3], F32)],
            vec![t(&[2, 4], F32)],
        ),
        (
            mm(true, false),
            vec![t(&[3, 2], F32), t(&[3, 4], F32)],
            vec![t(&[2, 4], F32)],
        ),
        (
            mm(true, true),
            vec![t(&[3, 2], BF16), t(&[4, 3], BF16)],
            vec![t(&[2, 4], BF16)],
        ),
        (
            Op::AddBias,
            vec![t(&[2, 3], F32), t(&[3], F32)],
            vec![t(&[2, 3], F32)],
        ),
        (Op::SumRows, vec![t(&[2, 3], F16)], vec![t(&[3], F16)]),
        (
            Op::Add,
            vec![t(&[2, 3], F32), t(&[2, 3], F32)],
            vec![t(&[2, 3], F32)],
        ),
        (
            Op::Mul,
            vec![t(&[7], BF16), t(&[7], BF16)],
            vec![t(&[7], BF16)],
        ),
        (Op::Scale(0.5), vec![t(&[5], F16)], vec![t(&[5], F16)]),
        (
            Op::Cast(BF16),
            vec![t(&[2, 3], F32)],
            vec![t(&[2, 3], BF16)],
        ),
        (
            Op::Embedding,
            vec![t(&[10, 4], F32), t(&[3], I32)],
            vec![t(&[3, 4], F32)],
        ),
        (
            Op::Embedding,
            vec![t(&[10, 4], BF16), t(&[3], U32)],
            vec![t(&[3, 4], BF16)],
        ),
        (
            Op::EmbeddingGrad { vocab: 10 },
            vec![t(&[3, 4], F32), t(&[3], I32)],
            vec![t(&[10, 4], F32)],
        ),
        (
            Op::RmsNorm {
                eps: 1e-6,
                unit_offset: true,
            },
            vec![t(&[3, 4], F32), t(&[4], F32)],
            vec![t(&[3, 4], F32)],
        ),
        (
            Op::RmsNormGradInput {
                eps: 1e-6,
                unit_offset: false,
            },
            vec![t(&[3, 4], F32), t(&[4], F32), t(&[3, 4], F32)],
            vec![t(&[3, 4], F32)],
        ),
        (
            Op::RmsNormGradWeight { eps: 1e-6 },
            vec![t(&[3, 4], F32), t(&[3, 4], F32)],
            vec![t(&[4], F32)],
        ),
        (
            rope(rope_spec()),
            vec![t(&[3, 8], F32), t(&[3], I32)],
            vec![t(&[3, 8], F32)],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), kv.clone(), kv.clone(), seg.clone()],
            vec![q.clone(), lse.clone()],
        ),
        (
            Op::AttentionGrad(attn()),
            vec![
                q.clone(),
                kv.clone(),
                kv.clone(),
                seg.clone(),
                q.clone(),
                lse.clone(),
                q.clone(),
            ],
            vec![q.clone(), kv.clone(), kv.clone()],
        ),
        (
            Op::GatedAct(Activation::Silu),
            vec![t(&[3, 4], F32), t(&[3, 4], F32)],
            vec![t(&[3, 4], F32)],
        ),
        (
            Op::GatedActGrad(Activation::GeluTanh),
            vec![t(&[3, 4], F32), t(&[3, 4], F32), t(&[3, 4], F32)],
            vec![t(&[3, 4], F32), t(&[3, 4], F32)],
        ),
        (
            Op::CrossEntropy { ignore_index: -100 },
            vec![t(&[3, 7], BF16), t(&[3], I32)],
            vec![t(&[1], F32)],
        ),
        (
            Op::CrossEntropyGrad { ignore_index: -100 },
            vec![t(&[3, 7], F32), t(&[3], I32), t(&[1], F32)],
            vec![t(&[3, 7], F32)],
        ),
        (
            Op::Dropout { p: 0.1 },
            vec![t(&[3, 4], F32), t(&[1], U32)],
            vec![t(&[3, 4], F32)],
        ),
    ]
}

/// `(op, inputs)` that are ill-typed: wrong shapes, ranks or dtypes.
fn invalid_cases() -> Vec<(Op, Vec<TypeInfo>)> {
    let mm = |ta, tb| Op::MatMul { ta, tb };
    let rms = Op::RmsNorm {
        eps: 1e-6,
        unit_offset: false,
    };
    let rms_gi = Op::RmsNormGradInput {
        eps: 1e-6,
        unit_offset: false,
    };
    let rms_gw = Op::RmsNormGradWeight { eps: 1e-6 };
    let ce = Op::CrossEntropy { ignore_index: -100 };
    let ce_g = Op::CrossEntropyGrad { ignore_index: -100 };
    let q = t(&[5, 8], F32);
    let kv = t(&[5, 4], F32);
    let seg = t(&[5], I32);
    let lse = t(&[5, 4], F32);
    let attn_with = |f: fn(&mut AttentionSpec)| {
        let mut s = attn();
        f(&mut s);
        Op::Attention(s)
    };
    let rope_with = |f: fn(&mut RopeSpec)| {
        let mut s = rope_spec();
        f(&mut s);
        rope(s)
    };
    let good_attn = || vec![q.clone(), kv.clone(), kv.clone(), seg.clone()];
    let attn_grad = |i: usize, bad: TypeInfo| {
        let mut ins = vec![
            q.clone(),
            kv.clone(),
            kv.clone(),
            seg.clone(),
            q.clone(),
            lse.clone(),
            q.clone(),
        ];
        ins[i] = bad;
        (Op::AttentionGrad(attn()), ins)
    };
    vec![
        // MatMul: inner dims, the transpose flags, dtypes, ranks.
        (mm(false, false), vec![t(&[2, 3], F32), t(&[4, 4], F32)]),
        (mm(true, false), vec![t(&[2, 3], F32), t(&[3, 4], F32)]),
        (mm(false, true), vec![t(&[2, 3], F32), t(&[3, 4], F32)]),
        (mm(false, false), vec![t(&[2, 3], F32), t(&[3, 4], BF16)]),
        (mm(false, false), vec![t(&[3], F32), t(&[3, 4], F32)]),
        (mm(false, false), vec![t(&[2, 3], F32), t(&[2, 3, 4], F32)]),
        (mm(false, false), vec![t(&[2, 3], I32), t(&[3, 4], I32)]),
        // AddBias / SumRows.
        (Op::AddBias, vec![t(&[2, 3], F32), t(&[2], F32)]),
        (Op::AddBias, vec![t(&[2, 3], F32), t(&[3], BF16)]),
        (Op::AddBias, vec![t(&[3], F32), t(&[3], F32)]),
        (Op::AddBias, vec![t(&[2, 3], I32), t(&[3], I32)]),
        (Op::SumRows, vec![t(&[3], F32)]),
        (Op::SumRows, vec![t(&[2, 3], U32)]),
        // Elementwise.
        (Op::Add, vec![t(&[2, 3], F32), t(&[3, 2], F32)]),
        (Op::Add, vec![t(&[2, 3], F32), t(&[2, 3], BF16)]),
        (Op::Add, vec![t(&[2, 3], I32), t(&[2, 3], I32)]),
        (Op::Mul, vec![t(&[4], F32), t(&[5], F32)]),
        (Op::Mul, vec![t(&[4], U32), t(&[4], U32)]),
        (Op::Scale(2.0), vec![t(&[4], I32)]),
        (Op::Cast(BF16), vec![t(&[4], I32)]),
        (Op::Cast(I32), vec![t(&[4], F32)]),
        // Embedding.
        (Op::Embedding, vec![t(&[10, 4], F32), t(&[3], F32)]),
        (Op::Embedding, vec![t(&[10, 4], F32), t(&[3, 1], I32)]),
        (Op::Embedding, vec![t(&[10, 4], F32), t(&[], I32)]),
        (Op::Embedding, vec![t(&[10], F32), t(&[3], I32)]),
        (Op::Embedding, vec![t(&[10, 4], I32), t(&[3], I32)]),
        (
            Op::EmbeddingGrad { vocab: 10 },
            vec![t(&[3, 4], F32), t(&[2], I32)],
        ),
        (
            Op::EmbeddingGrad { vocab: 10 },
            vec![t(&[4], F32), t(&[4], I32)],
        ),
        (
            Op::EmbeddingGrad { vocab: 10 },
            vec![t(&[3, 4], I32), t(&[3], I32)],
        ),
        // RmsNorm and its gradients.
        (rms.clone(), vec![t(&[3, 4], F32), t(&[3], F32)]),
        (rms.clone(), vec![t(&[3, 4], F32), t(&[4], BF16)]),
        (rms.clone(), vec![t(&[4], F32), t(&[4], F32)]),
        (rms.clone(), vec![t(&[3, 4], I32), t(&[4], I32)]),
        (
            rms_gi.clone(),
            vec![t(&[3, 4], F32), t(&[4], F32), t(&[4, 3], F32)],
        ),
        (
            rms_gi.clone(),
            vec![t(&[3, 4], F32), t(&[3], F32), t(&[3, 4], F32)],
        ),
        (
            rms_gi.clone(),
            vec![t(&[3, 4], F32), t(&[4], BF16), t(&[3, 4], F32)],
        ),
        (
            rms_gi.clone(),
            vec![t(&[4], F32), t(&[4], F32), t(&[4], F32)],
        ),
        (
            rms_gi.clone(),
            vec![t(&[3, 4], I32), t(&[4], I32), t(&[3, 4], I32)],
        ),
        (rms_gw.clone(), vec![t(&[3, 4], F32), t(&[3, 5], F32)]),
        (rms_gw.clone(), vec![t(&[3, 4], F32), t(&[3, 4], BF16)]),
        (rms_gw.clone(), vec![t(&[4], F32), t(&[4], F32)]),
        (rms_gw.clone(), vec![t(&[3, 4], I32), t(&[3, 4], I32)]),
        // Rope.
        (rope(rope_spec()), vec![t(&[3, 6], F32), t(&[3], I32)]),
        (rope(rope_spec()), vec![t(&[3, 8], F32), t(&[4], I32)]),
        (rope(rope_spec()), vec![t(&[3, 8], F32), t(&[3], F32)]),
        (rope(rope_spec()), vec![t(&[8], F32), t(&[3], I32)]),
        (rope(rope_spec()), vec![t(&[3, 8], I32), t(&[3], I32)]),
        (
            rope_with(|s| s.inv_freq = Arc::from(vec![1.0f32])),
            vec![t(&[3, 8], F32), t(&[3], I32)],
        ),
        (
            rope_with(|s| {
                s.head_dim = 3;
                s.inv_freq = Arc::from(vec![1.0f32]);
            }),
            vec![t(&[3, 6], F32), t(&[3], I32)],
        ),
        // Attention.
        (
            Op::Attention(attn()),
            vec![q.clone(), t(&[5, 8], F32), t(&[5, 8], F32), seg.clone()],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), kv.clone(), t(&[5, 2], F32), seg.clone()],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), t(&[4, 4], F32), t(&[4, 4], F32), seg.clone()],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), t(&[5, 4], BF16), t(&[5, 4], BF16), seg.clone()],
        ),
        (
            Op::Attention(attn()),
            vec![
                t(&[5, 8], I32),
                t(&[5, 4], I32),
                t(&[5, 4], I32),
                seg.clone(),
            ],
        ),
        (
            Op::Attention(attn()),
            vec![t(&[], F32), kv.clone(), kv.clone(), seg.clone()],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), kv.clone(), kv.clone(), t(&[4], I32)],
        ),
        (
            Op::Attention(attn()),
            vec![q.clone(), kv.clone(), kv.clone(), t(&[5], F32)],
        ),
        (attn_with(|s| s.n_kv_heads = 3), good_attn()),
        (attn_with(|s| s.n_kv_heads = 0), good_attn()),
        (attn_with(|s| s.window = Some(0)), good_attn()),
        attn_grad(5, t(&[5, 2], F32)),
        attn_grad(5, t(&[5, 4], BF16)),
        attn_grad(4, t(&[5, 4], F32)),
        attn_grad(6, t(&[5, 8], BF16)),
        attn_grad(3, t(&[6], I32)),
        // Gated activations.
        (
            Op::GatedAct(Activation::Silu),
            vec![t(&[3, 4], F32), t(&[3, 5], F32)],
        ),
        (
            Op::GatedAct(Activation::GeluTanh),
            vec![t(&[3, 4], F32), t(&[3, 4], F16)],
        ),
        (
            Op::GatedAct(Activation::Silu),
            vec![t(&[3, 4], I32), t(&[3, 4], I32)],
        ),
        (
            Op::GatedActGrad(Activation::Silu),
            vec![t(&[3, 4], F32), t(&[3, 4], F32), t(&[4, 3], F32)],
        ),
        (
            Op::GatedActGrad(Activation::Silu),
            vec![t(&[3, 4], I32), t(&[3, 4], I32), t(&[3, 4], I32)],
        ),
        // Cross-entropy.
        (ce.clone(), vec![t(&[3, 7], F32), t(&[3], U32)]),
        (ce.clone(), vec![t(&[3, 7], F32), t(&[4], I32)]),
        (ce.clone(), vec![t(&[7], F32), t(&[7], I32)]),
        (ce.clone(), vec![t(&[3, 7], I32), t(&[3], I32)]),
        (
            ce_g.clone(),
            vec![t(&[3, 7], F32), t(&[3], I32), t(&[2], F32)],
        ),
        (
            ce_g.clone(),
            vec![t(&[3, 7], F32), t(&[3], I32), t(&[1], BF16)],
        ),
        (
            ce_g.clone(),
            vec![t(&[3, 7], F32), t(&[2], I32), t(&[1], F32)],
        ),
        (
            ce_g.clone(),
            vec![t(&[3, 7], I32), t(&[3], I32), t(&[1], F32)],
        ),
        // Dropout.
        (Op::Dropout { p: 1.0 }, vec![t(&[3, 4], F32), t(&[1], U32)]),
        (Op::Dropout { p: -0.1 }, vec![t(&[3, 4], F32), t(&[1], U32)]),
        (
            Op::Dropout { p: f32::NAN },
            vec![t(&[3, 4], F32), t(&[1], U32)],
        ),
        (Op::Dropout { p: 0.1 }, vec![t(&[3, 4], F32), t(&[1], I32)]),
        (Op::Dropout { p: 0.1 }, vec![t(&[3, 4], F32), t(&[2], U32)]),
        (Op::Dropout { p: 0.1 }, vec![t(&[3, 4], I32), t(&[1], U32)]),
    ]
}

fn infer(op: &Op, ins: &[TypeInfo]) -> Result<Vec<TypeInfo>, IrError> {
    let refs: Vec<&TypeInfo> = ins.iter().collect();
    op.infer(&refs)
}

/// The error must be a shape error that names the op and says something;
/// returns what is wrong with it otherwise.
fn clear_error(op: &Op, res: Result<Vec<TypeInfo>, IrError>, ins: &[TypeInfo]) -> Option<String> {
    match res {
        Err(IrError::Shape { op: name, msg }) => {
            let shown = IrError::Shape {
                op: name,
                msg: msg.clone(),
            }
            .to_string();
            if name != op.name() || msg.trim().is_empty() || !shown.starts_with(op.name()) {
                return Some(format!("{op:?} on {ins:?}: unclear error `{shown}`"));
            }
            None
        }
        Err(other) => Some(format!(
            "{op:?} on {ins:?}: expected a shape error, got {other:?}"
        )),
        Ok(outs) => Some(format!(
            "{op:?} accepted ill-typed inputs {ins:?} (inferred {outs:?})"
        )),
    }
}

#[test]
fn valid_inputs_infer_the_documented_outputs() {
    for (op, ins, want) in valid_cases() {
        assert_eq!(
            ins.len(),
            op.arity(),
            "table row for {op:?} has the wrong arity"
        );
        let got = infer(&op, &ins).unwrap_or_else(|e| panic!("{op:?} rejected {ins:?}: {e}"));
        assert_eq!(got, want, "{op:?} on {ins:?}");
    }
}

#[test]
fn the_table_covers_every_op() {
    let mut names: Vec<&str> = valid_cases().iter().map(|(op, _, _)| op.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 21, "ops covered: {names:?}");
    let mut bad: Vec<&str> = invalid_cases().iter().map(|(op, _)| op.name()).collect();
    bad.sort_unstable();
    bad.dedup();
    // Fill takes no inputs, so only its arity can be wrong.
    assert_eq!(bad.len(), 20, "ops with ill-typed cases: {bad:?}");
}

#[test]
fn ill_typed_inputs_are_rejected_with_a_clear_error() {
    let mut failures = Vec::new();
    for (op, ins) in invalid_cases() {
        assert_eq!(
            ins.len(),
            op.arity(),
            "table row for {op:?} has the wrong arity"
        );
        let res = infer(&op, &ins);
        failures.extend(clear_error(&op, res, &ins));
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn wrong_arity_is_rejected_for_every_op() {
    for (op, ins, _) in valid_cases() {
        let mut more = ins.clone();
        more.push(t(&[1], F32));
        let res = infer(&op, &more);
        assert!(
            matches!(&res, Err(IrError::Shape { msg, .. }) if msg.contains("takes")),
            "{op:?} with an extra input: {res:?}"
        );
        if !ins.is_empty() {
            let fewer = &ins[..ins.len() - 1];
            let res = infer(&op, fewer);
            assert!(
                matches!(&res, Err(IrError::Shape { msg, .. }) if msg.contains("takes")),
                "{op:?} with a missing input: {res:?}"
            );
        }
    }
}

#[test]
fn graph_apply_checks_and_leaves_the_graph_unchanged_on_error() {
    let mut g = Graph::new();
    let a = g.input("a", &[2, 3], F32);
    let b = g.param("b", &[4, 4], F32, true);
    let (values, nodes) = (g.values().len(), g.nodes().len());
    let err = g.matmul(a, b, false, false).unwrap_err();
    assert!(err.to_string().contains("matmul"), "{err}");
    assert_eq!((g.values().len(), g.nodes().len()), (values, nodes));

    let err = g.add(a, ValueId(99)).unwrap_err();
    assert!(matches!(err, IrError::UnknownValue(ValueId(99))), "{err:?}");
    assert_eq!((g.values().len(), g.nodes().len()), (values, nodes));

    // A well-typed op records one node and its outputs.
    let c = g.param("c", &[3, 4], F32, false);
    let y = g.matmul(a, c, false, false).unwrap();
    assert_eq!(g.shape(y), &[2, 4]);
    assert_eq!(g.nodes().len(), nodes + 1);
    assert_eq!(g.producer(y).map(|n| n.index()), Some(nodes));
}

#[test]
fn set_trainable_only_applies_to_parameters() {
    let mut g = Graph::new();
    let x = g.input("x", &[2], F32);
    let w = g.param("w", &[2], F32, false);
    assert!(!g.is_trainable(w));
    g.set_trainable(w, true).unwrap();
    assert!(g.is_trainable(w));
    assert!(matches!(g.set_trainable(x, true), Err(IrError::NotAParam(v)) if v == x));
    assert!(!g.is_trainable(x));
    assert!(matches!(
        g.set_trainable(ValueId(42), true),
        Err(IrError::UnknownValue(ValueId(42)))
    ));
}

#[test]
fn cast_to_the_same_dtype_records_nothing() {
    let mut g = Graph::new();
    let x = g.input("x", &[2], BF16);
    assert_eq!(g.cast(x, BF16).unwrap(), x);
    assert!(g.nodes().is_empty());
    let y = g.cast(x, F32).unwrap();
    assert_ne!(y, x);
    assert_eq!(g.dtype(y), F32);
}

fn any_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(F32), Just(BF16), Just(F16), Just(I32), Just(U32)]
}

fn any_type() -> impl Strategy<Value = TypeInfo> {
    (proptest::collection::vec(0usize..9, 0..4), any_dtype()).prop_map(|(s, d)| TypeInfo::new(s, d))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the inputs, inference answers (Ok or Err) without panicking,
    /// and whatever it accepts, every op's outputs are sane.
    #[test]
    fn inference_never_panics(ins in proptest::collection::vec(any_type(), 0..8)) {
        let ops = valid_cases().into_iter().map(|(op, _, _)| op);
        for op in ops {
            let arity = op.arity().min(ins.len());
            match infer(&op, &ins[..arity]) {
                Ok(outs) => {
                    prop_assert_eq!(arity, op.arity());
                    prop_assert!(!outs.is_empty());
                }
                Err(e) => {
                    let is_shape = matches!(e, IrError::Shape { .. });
                    prop_assert!(is_shape, "{:?}", e);
                }
            }
        }
    }
}
