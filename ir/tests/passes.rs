//! Passes: dead-code elimination and the liveness-based memory plan.

use graft_ir::passes::{live_schedule, place_in_place, plan_memory, MemoryPlan};
use graft_ir::{AttentionSpec, DType, Graph, NodeId, Op, Source, ValueId};
use proptest::prelude::*;
use std::collections::HashSet;

const ALIGN: usize = 64;

fn padded(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN).max(1) * ALIGN
}

fn producer_step(g: &Graph, schedule: &[NodeId], v: ValueId) -> Option<usize> {
    g.producer(v)
        .and_then(|n| schedule.iter().position(|&s| s == n))
}

/// Every node whose output the `outputs` transitively depend on.
fn ancestors(g: &Graph, outputs: &[ValueId]) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<ValueId> = outputs.to_vec();
    while let Some(v) = stack.pop() {
        if let Some(n) = g.producer(v) {
            if seen.insert(n) {
                stack.extend(g.node(n).inputs.iter().copied());
            }
        }
    }
    seen
}

/// The schedule is exactly the ancestors of the outputs, in increasing
/// recording order, and every input is produced before it is read.
fn check_schedule(g: &Graph, schedule: &[NodeId], outputs: &[ValueId]) {
    let want = ancestors(g, outputs);
    let got: HashSet<NodeId> = schedule.iter().copied().collect();
    assert_eq!(got.len(), schedule.len(), "a node is scheduled twice");
    assert_eq!(
        got, want,
        "the schedule is not the set of nodes the outputs need"
    );
    assert!(
        schedule.windows(2).all(|w| w[0] < w[1]),
        "not in recording order: {schedule:?}"
    );
    for (step, &n) in schedule.iter().enumerate() {
        for &i in &g.node(n).inputs {
            if g.producer(i).is_some() {
                let p = producer_step(g, schedule, i).expect("an input's producer is scheduled");
                assert!(
                    p < step,
                    "%{} is read at step {step} but produced at step {p}",
                    i.0
                );
            }
        }
    }
}

/// Live range `[definition step, last use]` of every value the schedule
/// computes; outputs live to the end.
fn live_ranges(
    g: &Graph,
    schedule: &[NodeId],
    outputs: &[ValueId],
) -> Vec<(ValueId, usize, usize)> {
    let mut ranges = Vec::new();
    for (step, &n) in schedule.iter().enumerate() {
        for &o in &g.node(n).outputs {
            let mut last = step;
            for (s, &m) in schedule.iter().enumerate() {
                if g.node(m).inputs.contains(&o) {
                    last = last.max(s);
                }
            }
            if outputs.contains(&o) {
                last = schedule.len();
            }
            ranges.push((o, step, last));
        }
    }
    ranges
}

fn check_memory(g: &Graph, schedule: &[NodeId], outputs: &[ValueId], plan: &MemoryPlan) {
    let ranges = live_ranges(g, schedule, outputs);
    assert_eq!(
        plan.offsets.len(),
        ranges.len(),
        "exactly the computed values get an offset"
    );
    let mut total = 0;
    for &(v, _, _) in &ranges {
        let off = plan
            .offset(v)
            .unwrap_or_else(|| panic!("%{} has no offset", v.0));
        let bytes = g.ty(v).bytes();
        assert_eq!(off % ALIGN, 0, "%{} at unaligned offset {off}", v.0);
        assert!(
            off + padded(bytes) <= plan.peak_bytes,
            "%{} lies past the arena",
            v.0
        );
        total += padded(bytes);
    }
    for v in 0..g.values().len() {
        let v = ValueId(v as u32);
        if !matches!(g.value(v).source, Source::Node { .. }) {
            assert_eq!(
                plan.offset(v),
                None,
                "leaf %{} must live outside the arena",
                v.0
            );
        }
    }
    assert_eq!(plan.total_bytes, total);
    assert!(
        plan.peak_bytes <= plan.total_bytes,
        "peak {} > total {}",
        plan.peak_bytes,
        plan.total_bytes
    );

    // Values live at the same time never share a byte (padding included).
    for (i, &(a, a0, a1)) in ranges.iter().enumerate() {
        for &(b, b0, b1) in &ranges[i + 1..] {
            if a0 <= b1 && b0 <= a1 {
                let (oa, ob) = (plan.offsets[&a], plan.offsets[&b]);
                let (ea, eb) = (oa + padded(g.ty(a).bytes()), ob + padded(g.ty(b).bytes()));
                assert!(
                    ea <= ob || eb <= oa,
                    "%{} [{oa}, {ea}) live {a0}..={a1} overlaps %{} [{ob}, {eb}) live {b0}..={b1}",
                    a.0,
                    b.0
                );
            }
        }
    }
    // And the arena holds at least what is live at the busiest step.
    for step in 0..schedule.len() {
        let live: usize = ranges
            .iter()
            .filter(|&&(_, d, l)| d <= step && step <= l)
            .map(|&(v, _, _)| padded(g.ty(v).bytes()))
            .sum();
        assert!(
            plan.peak_bytes >= live,
            "step {step}: {live} bytes live but peak is {}",
            plan.peak_bytes
        );
    }
}

#[test]
fn dce_drops_unused_branches_and_keeps_producers_in_order() {
    let mut g = Graph::new();
    let x = g.input("x", &[4], DType::F32);
    let y = g.input("y", &[4], DType::F32);
    let a = g.scale(x, 2.0).unwrap(); // node 0
    let dead = g.mul(x, y).unwrap(); // node 1: unused
    let b = g.add(a, y).unwrap(); // node 2
    let _dead2 = g.scale(dead, 3.0).unwrap(); // node 3: unused
    let c = g.mul(b, a).unwrap(); // node 4
    let _after = g.scale(c, 1.0).unwrap(); // node 5: downstream of the output, unused
    let s = live_schedule(&g, &[c]);
    assert_eq!(s, vec![NodeId(0), NodeId(2), NodeId(4)]);
    check_schedule(&g, &s, &[c]);

    // Asking for a dead value revives exactly its chain.
    let s = live_schedule(&g, &[c, _dead2]);
    assert_eq!(
        s,
        vec![NodeId(0), NodeId(1), NodeId(2), NodeId(3), NodeId(4)]
    );

    // Leaves and nothing need no nodes.
    assert!(live_schedule(&g, &[x]).is_empty());
    assert!(live_schedule(&g, &[]).is_empty());
}

#[test]
fn dce_keeps_a_multi_output_node_when_one_output_is_used() {
    let mut g = Graph::new();
    let spec = AttentionSpec {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 2,
        scale: 1.0,
        window: None,
    };
    let q = g.input("q", &[3, 4], DType::F32);
    let kv = g.input("kv", &[3, 2], DType::F32);
    let seg = g.input("seg", &[3], DType::I32);
    let outs = g.apply(Op::Attention(spec), &[q, kv, kv, seg]).unwrap();
    let lse_only = g.scale(outs[1], 1.0).unwrap();
    let out_only = g.scale(outs[0], 1.0).unwrap();
    assert_eq!(live_schedule(&g, &[lse_only]), vec![NodeId(0), NodeId(1)]);
    assert_eq!(live_schedule(&g, &[out_only]), vec![NodeId(0), NodeId(2)]);

    // The unread lse still gets its own bytes: the kernel writes it.
    let s = live_schedule(&g, &[out_only]);
    let plan = plan_memory(&g, &s, &[out_only]);
    check_memory(&g, &s, &[out_only], &plan);
}

#[test]
fn a_long_chain_reuses_two_buffers() {
    let mut g = Graph::new();
    let x = g.input("x", &[256], DType::F32);
    let mut v = x;
    for i in 0..100 {
        v = g.scale(v, 1.0 + i as f32).unwrap();
    }
    let s = live_schedule(&g, &[v]);
    assert_eq!(s.len(), 100);
    let plan = plan_memory(&g, &s, &[v]);
    check_memory(&g, &s, &[v], &plan);
    assert_eq!(plan.total_bytes, 100 * 1024);
    // Each step reads one buffer and writes the other.
    assert_eq!(plan.peak_bytes, 2 * 1024);
}

#[test]
fn kept_values_are_never_reused() {
    let mut g = Graph::new();
    let x = g.input("x", &[100], DType::F32); // 400 bytes, padded to 448
    let mut chain = Vec::new();
    let mut v = x;
    for _ in 0..10 {
        v = g.scale(v, 0.5).unwrap();
        chain.push(v);
    }
    let s = live_schedule(&g, &chain);
    let plan = plan_memory(&g, &s, &chain);
    check_memory(&g, &s, &chain, &plan);
    assert_eq!(plan.peak_bytes, plan.total_bytes);
    assert_eq!(plan.total_bytes, 10 * 448);
}

/// One op of a random DAG: `kind` picks Add/Mul/Scale/Cast, `a` and `b`
/// pick operands (from anywhere, or among the most recent values for chains).
#[derive(Clone, Debug)]
struct Step {
    kind: u8,
    a: usize,
    b: usize,
}

fn build(shapes: &[Vec<usize>], steps: &[Step], picks: &[usize]) -> (Graph, Vec<ValueId>) {
    let mut g = Graph::new();
    let mut pool: Vec<ValueId> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| g.input(&format!("x{i}"), s, DType::F32))
        .collect();
    let mut computed = Vec::new();
    for st in steps {
        let a = if st.a % 2 == 0 {
            pool[pool.len() - 1 - (st.a / 2) % pool.len().min(3)]
        } else {
            pool[(st.a / 2) % pool.len()]
        };
        let v = match st.kind % 4 {
            0 | 1 => {
                let same: Vec<ValueId> = pool
                    .iter()
                    .copied()
                    .filter(|&p| g.ty(p) == g.ty(a))
                    .collect();
                let b = same[st.b % same.len()];
                if st.kind % 4 == 0 {
                    g.add(a, b).unwrap()
                } else {
                    g.mul(a, b).unwrap()
                }
            }
            2 => g.scale(a, 0.5).unwrap(),
            _ => {
                let to = if g.dtype(a) == DType::F32 {
                    DType::BF16
                } else {
                    DType::F32
                };
                g.cast(a, to).unwrap()
            }
        };
        pool.push(v);
        computed.push(v);
    }
    // The last value (which tends to depend on much of the graph) and a few more.
    let mut outputs = vec![*computed.last().unwrap()];
    outputs.extend(picks.iter().map(|&p| computed[p % computed.len()]));
    outputs.sort();
    outputs.dedup();
    (g, outputs)
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (1usize..200).prop_map(|n| vec![n]),
        (1usize..12, 1usize..40).prop_map(|(m, n)| vec![m, n]),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (any::<u8>(), any::<usize>(), any::<usize>()).prop_map(|(kind, a, b)| Step { kind, a, b })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_dags_schedule_and_plan_soundly(
        shapes in proptest::collection::vec(shape(), 1..4),
        steps in proptest::collection::vec(step(), 1..80),
        picks in proptest::collection::vec(any::<usize>(), 0..5),
    ) {
        let (g, outputs) = build(&shapes, &steps, &picks);
        let schedule = live_schedule(&g, &outputs);
        check_schedule(&g, &schedule, &outputs);
        let plan = plan_memory(&g, &schedule, &outputs);
        check_memory(&g, &schedule, &outputs, &plan);
    }
}

/// An in-place update runs after its gradient's producer and after every
/// other reader of the parameter it writes, and no later: the gradient dies
/// right there instead of living to the end.
#[test]
fn in_place_updates_run_as_early_as_is_safe() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 3], DType::F32);
    let w = g.param("w", &[5, 3], DType::F32, true);
    let v = g.param("v", &[2, 5], DType::F32, true);
    let lr = g.input("lr", &[1], DType::F32);
    let coef = g.input("coef", &[1], DType::F32);
    let h = g.linear(x, w, None).unwrap();
    let y = g.linear(h, v, None).unwrap();
    // Stand-ins for gradients: dv from h, dw from y; then a late reader of w.
    let dv = g.matmul(y, h, true, false).unwrap();
    let dw = g.matmul(h, x, true, false).unwrap();
    let late = g.linear(x, w, None).unwrap();
    let op = Op::SgdUpdate {
        weight_decay: 0.0,
        clip_value: 0.0,
    };
    let uw = g.apply1(op.clone(), &[w, dw, lr, coef]).unwrap();
    let uv = g.apply1(op, &[v, dv, lr, coef]).unwrap();
    let outputs = [uw, uv, late];
    let order = place_in_place(&g, &live_schedule(&g, &outputs));
    let at = |v: ValueId| {
        order
            .iter()
            .position(|&n| n == g.producer(v).unwrap())
            .unwrap()
    };
    // v's update follows its gradient at once; w's waits for the late reader.
    assert_eq!(at(uv), at(dv) + 1, "{order:?}");
    assert_eq!(at(uw), at(late) + 1, "{order:?}");
    assert!(at(uw) > at(dw));
    // Still a topological order of the same nodes.
    assert_eq!(order.len(), live_schedule(&g, &outputs).len());
    for (i, &n) in order.iter().enumerate() {
        for &input in &g.node(n).inputs {
            if let Some(p) = g.producer(input) {
                assert!(order.iter().position(|&m| m == p).unwrap() < i);
            }
        }
    }
}
