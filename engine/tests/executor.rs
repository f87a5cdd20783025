//! The CPU executor: feed validation, kernel errors, and arena reuse across
//! runs, feeds and plans.

use graft_engine::ir::{DType, Graph, ValueId};
use graft_engine::{compile, compile_training, CpuExecutor, EngineError, Feeds, Plan, Tensor};

fn f32s(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed) * 1.3).sin())
        .collect()
}

/// `loss = cross_entropy(embedding(table, ids)·Wᵀ, labels)`, table trainable.
struct EmbedModel {
    plan: Plan,
    ids: ValueId,
    labels: ValueId,
    table: ValueId,
    w: ValueId,
}

fn embed_model(training: bool) -> EmbedModel {
    let mut g = Graph::new();
    let ids = g.input("ids", &[3], DType::I32);
    let labels = g.input("labels", &[3], DType::I32);
    let _unused = g.input("unused", &[7], DType::F32);
    let table = g.param("table", &[10, 4], DType::F32, true);
    let w = g.param("w", &[5, 4], DType::F32, false);
    let x = g.embedding(table, ids).unwrap();
    let logits = g.linear(x, w, None).unwrap();
    let loss = g.cross_entropy(logits, labels).unwrap();
    let plan = if training {
        compile_training(g, loss, &[]).unwrap()
    } else {
        compile(g, &[loss]).unwrap()
    };
    EmbedModel {
        plan,
        ids,
        labels,
        table,
        w,
    }
}

struct Data {
    ids: Tensor,
    labels: Tensor,
    table: Tensor,
    w: Tensor,
}

fn data(ids: &[i32], labels: &[i32]) -> Data {
    Data {
        ids: Tensor::from_i32(&[3], ids).unwrap(),
        labels: Tensor::from_i32(&[3], labels).unwrap(),
        table: Tensor::from_f32(&[10, 4], &f32s(40, 0.1)).unwrap(),
        w: Tensor::from_f32(&[5, 4], &f32s(20, 0.7)).unwrap(),
    }
}

fn bind<'a>(m: &EmbedModel, d: &'a Data) -> Feeds<'a> {
    let mut f = Feeds::new();
    f.bind(m.ids, &d.ids)
        .bind(m.labels, &d.labels)
        .bind(m.table, &d.table)
        .bind(m.w, &d.w);
    f
}

#[test]
fn an_unbound_input_is_named() {
    let m = embed_model(true);
    let d = data(&[1, 2, 3], &[0, 1, 2]);
    let mut feeds = Feeds::new();
    feeds
        .bind(m.ids, &d.ids)
        .bind(m.table, &d.table)
        .bind(m.w, &d.w);
    match CpuExecutor::new().run(&m.plan, &feeds) {
        Err(EngineError::Unbound(name)) => assert_eq!(name, "labels"),
        other => panic!("expected Unbound(labels), got {other:?}"),
    }
    // A leaf the plan does not read ("unused") need not be bound.
    assert!(CpuExecutor::new().run(&m.plan, &bind(&m, &d)).is_ok());
}

#[test]
fn a_wrongly_typed_feed_is_named() {
    let m = embed_model(false);
    let d = data(&[1, 2, 3], &[0, 1, 2]);
    let bad_shape = Tensor::from_f32(&[4, 5], &f32s(20, 0.7)).unwrap();
    let mut feeds = bind(&m, &d);
    feeds.bind(m.w, &bad_shape);
    match CpuExecutor::new().run(&m.plan, &feeds) {
        Err(EngineError::Feed { name, want, got }) => {
            assert_eq!(name, "w");
            assert!(
                want.contains("[5, 4]") && got.contains("[4, 5]"),
                "{want} / {got}"
            );
        }
        other => panic!("expected a Feed error, got {other:?}"),
    }
    let bad_dtype = d.w.to_dtype(DType::BF16).unwrap();
    let mut feeds = bind(&m, &d);
    feeds.bind(m.w, &bad_dtype);
    match CpuExecutor::new().run(&m.plan, &feeds) {
        Err(EngineError::Feed { name, want, got }) => {
            assert_eq!(name, "w");
            assert!(
                want.contains("f32") && got.contains("bf16"),
                "{want} / {got}"
            );
        }
        other => panic!("expected a Feed error, got {other:?}"),
    }
}

#[test]
fn out_of_range_ids_are_kernel_errors_not_panics() {
    for training in [false, true] {
        let m = embed_model(training);
        let mut ex = CpuExecutor::new();
        for bad in [10, 99, -1] {
            let d = data(&[1, bad, 3], &[0, 1, 2]);
            match ex.run(&m.plan, &bind(&m, &d)) {
                Err(EngineError::Kernel { op, msg }) => {
                    assert_eq!(op, "embedding");
                    assert!(
                        msg.contains(&bad.to_string()) && msg.contains("position 1"),
                        "{msg}"
                    );
                }
                other => panic!("id {bad}: expected a Kernel error, got {other:?}"),
            }
        }
        let d = data(&[1, 2, 3], &[0, 5, -100]);
        match ex.run(&m.plan, &bind(&m, &d)) {
            Err(EngineError::Kernel { op, msg }) => {
                // Training with a frozen head: the loss with its gradient.
                let want = if training {
                    "linear_cross_entropy"
                } else {
                    "cross_entropy"
                };
                assert_eq!(op, want);
                assert!(msg.contains("label 5"), "{msg}");
            }
            other => panic!("label 5: expected a Kernel error, got {other:?}"),
        }
        // The executor is still usable after an error.
        let d = data(&[1, 2, 3], &[0, 4, -100]);
        let out = ex.run(&m.plan, &bind(&m, &d)).unwrap();
        assert!(out[0].as_f32().unwrap()[0].is_finite());
    }
}

/// Inputs `x`, `y` `[4,6]` and a frozen `w` `[5,6]`:
/// `a = x+y; b = a*x; c = b/2; d = c+a; e = d*d; f = e·wᵀ`, outputs `[f, c]`.
fn elementwise_plan() -> (Plan, [ValueId; 3]) {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 6], DType::F32);
    let y = g.input("y", &[4, 6], DType::F32);
    let w = g.param("w", &[5, 6], DType::F32, false);
    let a = g.add(x, y).unwrap();
    let b = g.mul(a, x).unwrap();
    let c = g.scale(b, 0.5).unwrap();
    let d = g.add(c, a).unwrap();
    let e = g.mul(d, d).unwrap();
    let f = g.linear(e, w, None).unwrap();
    (compile(g, &[f, c]).unwrap(), [x, y, w])
}

fn elementwise_reference(x: &[f32], y: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let c: Vec<f32> = x.iter().zip(y).map(|(x, y)| (x + y) * x * 0.5).collect();
    let e: Vec<f32> = c
        .iter()
        .zip(x.iter().zip(y))
        .map(|(c, (x, y))| (c + x + y) * (c + x + y))
        .collect();
    let mut f = vec![0f32; 4 * 5];
    for i in 0..4 {
        for j in 0..5 {
            f[i * 5 + j] = (0..6).map(|k| e[i * 6 + k] * w[j * 6 + k]).sum();
        }
    }
    (f, c)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
}

#[test]
fn outputs_are_correct_across_runs_feeds_and_plans_sharing_an_arena() {
    let (plan, [x, y, w]) = elementwise_plan();
    // The plan does reuse memory, so stale bytes could show if it went wrong.
    assert!(
        plan.peak_bytes() < plan.memory().total_bytes,
        "{}",
        plan.dump()
    );

    let wt = Tensor::from_f32(&[5, 6], &f32s(30, 2.0)).unwrap();
    let feeds_for = |seed: f32| {
        (
            Tensor::from_f32(&[4, 6], &f32s(24, seed)).unwrap(),
            Tensor::from_f32(&[4, 6], &f32s(24, seed + 0.5)).unwrap(),
        )
    };
    let (x1, y1) = feeds_for(0.0);
    let (x2, y2) = feeds_for(3.0);
    let run = |ex: &mut CpuExecutor, xt: &Tensor, yt: &Tensor| {
        let mut feeds = Feeds::new();
        feeds.bind(x, xt).bind(y, yt).bind(w, &wt);
        ex.run(&plan, &feeds).unwrap()
    };
    let check = |out: &[Tensor], xt: &Tensor, yt: &Tensor| {
        let (f, c) = elementwise_reference(
            xt.as_f32().unwrap(),
            yt.as_f32().unwrap(),
            wt.as_f32().unwrap(),
        );
        assert_eq!(out[0].shape(), &[4, 5]);
        assert_eq!(out[1].shape(), &[4, 6]);
        assert!(
            close(out[0].as_f32().unwrap(), &f),
            "f: {:?} vs {f:?}",
            out[0].as_f32()
        );
        assert!(
            close(out[1].as_f32().unwrap(), &c),
            "c: {:?} vs {c:?}",
            out[1].as_f32()
        );
    };

    let mut ex = CpuExecutor::new();
    let first = run(&mut ex, &x1, &y1);
    check(&first, &x1, &y1);
    let second = run(&mut ex, &x1, &y1);
    assert_eq!(first[0].bytes(), second[0].bytes());
    assert_eq!(first[1].bytes(), second[1].bytes());
    let other = run(&mut ex, &x2, &y2);
    check(&other, &x2, &y2);
    assert_ne!(other[0].bytes(), first[0].bytes());
    let again = run(&mut ex, &x1, &y1);
    assert_eq!(again[0].bytes(), first[0].bytes());

    // A bigger plan on the same executor leaves its bytes in the arena; the
    // small plan must not read any of them.
    let mut g = Graph::new();
    let z = g.input("z", &[32, 32], DType::F32);
    let s = g.scale(z, 3.0).unwrap();
    let s = g.mul(s, z).unwrap();
    let s = g.add(s, z).unwrap();
    let big = compile(g, &[s]).unwrap();
    assert!(big.peak_bytes() > plan.peak_bytes());
    let zt = Tensor::from_f32(&[32, 32], &f32s(1024, 9.0)).unwrap();
    let mut feeds = Feeds::new();
    feeds.bind(z, &zt);
    ex.run(&big, &feeds).unwrap();
    let after = run(&mut ex, &x2, &y2);
    check(&after, &x2, &y2);
    assert_eq!(after[0].bytes(), other[0].bytes());
}

#[test]
fn training_outputs_are_stable_across_runs_and_feeds() {
    let m = embed_model(true);
    let d1 = data(&[1, 2, 1], &[0, 1, 2]);
    let d2 = data(&[7, 0, 9], &[4, -100, 3]);
    let mut ex = CpuExecutor::new();
    let a = ex.run(&m.plan, &bind(&m, &d1)).unwrap();
    let b = ex.run(&m.plan, &bind(&m, &d2)).unwrap();
    let a2 = ex.run(&m.plan, &bind(&m, &d1)).unwrap();
    let b_fresh = CpuExecutor::new().run(&m.plan, &bind(&m, &d2)).unwrap();
    assert_eq!(a.len(), 2, "[loss, d table]");
    for (x, y) in a.iter().zip(&a2) {
        assert_eq!(x.bytes(), y.bytes());
    }
    for (x, y) in b.iter().zip(&b_fresh) {
        assert_eq!(x.bytes(), y.bytes());
    }
    // The table gradient is zero exactly on the rows no id selects.
    let grad = |out: &[Tensor]| out[1].as_f32().unwrap().to_vec();
    let rows_touched = |g: &[f32]| {
        (0..10)
            .filter(|r| g[r * 4..r * 4 + 4].iter().any(|v| *v != 0.0))
            .collect::<Vec<_>>()
    };
    assert_eq!(rows_touched(&grad(&a)), vec![1, 2]);
    assert_eq!(
        rows_touched(&grad(&b)),
        vec![7, 9],
        "row 0 is read only by an ignored label"
    );
}

#[test]
fn compile_errors_are_reported() {
    let mut g = Graph::new();
    let logits = g.param("logits", &[2, 3], DType::F32, false);
    let labels = g.input("labels", &[2], DType::I32);
    let loss = g.cross_entropy(logits, labels).unwrap();
    assert!(matches!(
        compile(g.clone(), &[ValueId(99)]),
        Err(EngineError::Compile(_))
    ));
    assert!(matches!(
        compile_training(g.clone(), ValueId(99), &[]),
        Err(EngineError::Ir(_))
    ));
    assert!(matches!(
        compile_training(g.clone(), logits, &[]),
        Err(EngineError::Ir(_))
    ));
    match compile_training(g, loss, &[]) {
        Err(EngineError::Compile(msg)) => assert!(msg.contains("nothing to train"), "{msg}"),
        other => panic!("expected a Compile error, got {other:?}"),
    }
}

#[test]
fn a_leaf_can_be_an_output() {
    let mut g = Graph::new();
    let x = g.input("x", &[3], DType::F32);
    let y = g.scale(x, 2.0).unwrap();
    let plan = compile(g, &[x, y]).unwrap();
    assert_eq!(plan.leaves(), vec![x]);
    let xt = Tensor::from_f32(&[3], &[1.0, -2.0, 0.5]).unwrap();
    let mut feeds = Feeds::new();
    feeds.bind(x, &xt);
    let out = CpuExecutor::new().run(&plan, &feeds).unwrap();
    assert_eq!(out[0].as_f32().unwrap(), &[1.0, -2.0, 0.5]);
    assert_eq!(out[1].as_f32().unwrap(), &[2.0, -4.0, 1.0]);
}

/// A parameter (or frozen weight) of `dtype` with deterministic values.
fn leaf(
    g: &mut Graph,
    feeds: &mut Vec<(ValueId, Tensor)>,
    name: &str,
    shape: &[usize],
    dtype: DType,
    trainable: bool,
) -> ValueId {
    let id = g.param(name, shape, dtype, trainable);
    let n = shape.iter().product();
    let data: Vec<f32> = f32s(n, feeds.len() as f32 * 1.7)
        .iter()
        .map(|x| x * 0.8)
        .collect();
    // Values exactly representable in bf16, so both dtypes start from the same weights.
    let data = Tensor::from_f32(shape, &data)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    feeds.push((id, data.to_dtype(dtype).unwrap()));
    id
}

/// RMSNorm -> GQA attention (query through trainable low-rank factors) ->
/// SwiGLU -> head -> cross-entropy, all stored in `dtype`.
fn block(dtype: DType) -> (Plan, Vec<(ValueId, Tensor)>) {
    use graft_engine::ir::{Activation, AttentionSpec};
    let (t, k, heads, d, f, v) = (6, 8, 2, 4, 6, 5);
    let mut g = Graph::new();
    let mut feeds = Vec::new();
    let x = leaf(&mut g, &mut feeds, "x", &[t, k], dtype, false);
    let norm = leaf(&mut g, &mut feeds, "norm", &[k], dtype, true);
    let a = leaf(&mut g, &mut feeds, "a", &[2, k], dtype, true);
    let b = leaf(&mut g, &mut feeds, "b", &[heads * d, 2], dtype, true);
    let wk = leaf(&mut g, &mut feeds, "wk", &[d, k], dtype, false);
    let wv = leaf(&mut g, &mut feeds, "wv", &[d, k], dtype, false);
    let wg = leaf(&mut g, &mut feeds, "wg", &[f, heads * d], dtype, false);
    let wu = leaf(&mut g, &mut feeds, "wu", &[f, heads * d], dtype, false);
    let wo = leaf(&mut g, &mut feeds, "wo", &[v, f], dtype, false);
    let seg = g.input("seg", &[t], DType::I32);
    let labels = g.input("labels", &[t], DType::I32);
    feeds.push((seg, Tensor::from_i32(&[t], &[0, 0, 0, 1, 1, 1]).unwrap()));
    feeds.push((
        labels,
        Tensor::from_i32(&[t], &[1, 4, -100, 0, 2, 3]).unwrap(),
    ));

    let xn = g.rms_norm(x, norm, 1e-6, false).unwrap();
    let q = g.linear(xn, a, None).unwrap();
    let q = g.linear(q, b, None).unwrap();
    let kh = g.linear(xn, wk, None).unwrap();
    let vh = g.linear(xn, wv, None).unwrap();
    let spec = AttentionSpec {
        n_heads: heads,
        n_kv_heads: 1,
        head_dim: d,
        scale: 0.5,
        window: Some(4),
    };
    let att = g.attention(q, kh, vh, seg, spec).unwrap();
    let gate = g.linear(att, wg, None).unwrap();
    let up = g.linear(att, wu, None).unwrap();
    let act = g.gated_act(Activation::Silu, gate, up).unwrap();
    let logits = g.linear(act, wo, None).unwrap();
    let logits = g.cast(logits, DType::F32).unwrap();
    let loss = g.cross_entropy(logits, labels).unwrap();
    (compile_training(g, loss, &[]).unwrap(), feeds)
}

#[test]
fn a_bf16_training_plan_tracks_the_f32_one() {
    let (p32, f32_feeds) = block(DType::F32);
    let (p16, bf16_feeds) = block(DType::BF16);
    let run = |plan: &Plan, list: &[(ValueId, Tensor)]| {
        let mut feeds = Feeds::new();
        for (v, t) in list {
            feeds.bind(*v, t);
        }
        CpuExecutor::new().run(plan, &feeds).unwrap()
    };
    let (o32, o16) = (run(&p32, &f32_feeds), run(&p16, &bf16_feeds));
    assert_eq!(o32.len(), 4, "[loss, dnorm, da, db]");
    let l32 = o32[0].as_f32().unwrap()[0];
    let l16 = o16[0].as_f32().unwrap()[0];
    assert!((l32 - l16).abs() < 0.02 * l32.abs(), "{l32} vs {l16}");
    for (a, b) in o32[1..].iter().zip(&o16[1..]) {
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(a.shape(), b.shape());
        let a = a.as_f32().unwrap();
        let b = b.to_f32_vec().unwrap();
        let diff: f32 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        // Every bf16 intermediate rounds, attention's probabilities and
        // score gradients too (as autocast's bf16 attention): 2.7%, 6.5%
        // and 5.0% off here (1.9–4.6% with attention in f32); a wrong
        // gradient is off by its whole size.
        assert!(
            norm > 1e-4 && diff < 0.1 * norm,
            "bf16 gradient off: {diff} vs |g| {norm}"
        );
    }
}

#[test]
fn the_op_profile_counts_every_node_of_every_run_by_kind() {
    let m = embed_model(true);
    let d = data(&[1, 2, 9], &[0, 4, -100]);
    let feeds = bind(&m, &d);
    let mut exec = CpuExecutor::new();
    assert!(exec.op_profile().is_none(), "off unless asked for");
    exec.profile_ops(true);
    for _ in 0..3 {
        exec.run(&m.plan, &feeds).unwrap();
    }
    let p = exec.op_profile().unwrap();
    let rows = p.rows();
    let calls: u64 = rows.iter().map(|r| r.calls).sum();
    assert_eq!(calls, 3 * m.plan.schedule().len() as u64);
    // Each kind once, named by op and first output, the costliest first.
    let g = m.plan.graph();
    for &n in m.plan.schedule() {
        let node = g.node(n);
        let out = node.outputs[0];
        let kind = format!("{} {}{:?}", node.op.label(), g.dtype(out), g.shape(out));
        assert_eq!(rows.iter().filter(|r| r.kind == kind).count(), 1, "{kind}");
    }
    assert!(rows.windows(2).all(|w| w[0].seconds >= w[1].seconds));
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    assert!((p.seconds() - total).abs() < 1e-9 && total > 0.0);
    let table = p.table(2);
    assert!(
        table.contains(&rows[0].kind) && table.contains("total"),
        "{table}"
    );
    assert!(
        table.contains(&format!("{} other kinds", rows.len() - 2)),
        "{table}"
    );
    exec.profile_ops(false);
    assert!(exec.op_profile().is_none());
}

/// A plan whose arena no machine has (an embedding of 2^20 ids into rows
/// of 2^19 f32: 2 TB) is refused by `check_fits` before it runs, and a run
/// of it anyway is an error, not an allocation abort. (The run is skipped
/// where the kernel overcommits memory without limit: the allocation
/// could then succeed and be killed when touched.)
#[test]
fn a_plan_larger_than_the_machine_is_an_error() {
    use graft_engine::{Device, Executor};
    let (n, dim) = (1 << 20, 1 << 19);
    let mut g = Graph::new();
    let ids = g.input("ids", &[n], DType::I32);
    let table = g.param("table", &[2, dim], DType::F32, false);
    let rows = g.embedding(table, ids).unwrap();
    let plan = compile(g, &[rows]).unwrap();
    assert!(plan.peak_bytes() >= n * dim * 4);
    match Executor::new(Device::Cpu).unwrap().check_fits(&plan) {
        Err(EngineError::Memory(m)) => assert!(m.contains("GB available"), "{m}"),
        other => panic!("expected a memory error, got {other:?}"),
    }
    if std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|m| m.trim() == "1") {
        eprintln!("memory overcommitted without limit here: the run is skipped");
        return;
    }
    let (ids_t, table_t) = (
        Tensor::from_i32(&[n], &vec![1; n]).unwrap(),
        Tensor::from_f32(&[2, dim], &vec![0.5; 2 * dim]).unwrap(),
    );
    let mut feeds = Feeds::new();
    feeds.bind(ids, &ids_t).bind(table, &table_t);
    match CpuExecutor::new().run(&plan, &feeds) {
        Err(EngineError::Memory(m)) => assert!(m.contains("could not be allocated"), "{m}"),
        other => panic!("expected a memory error, got {:?}", other.map(|o| o.len())),
    }
}
