//! Where a plan's time goes: the executor's wall time per kind of node (the
//! op's label, with fusion groups spelled out, and its first output's
//! shape), summed over every node of that kind and every run. One layer's
//! nodes of a model share their kinds with every other layer's, so a step of
//! a few hundred nodes reads as a table of a few dozen rows.

use graft_ir::{Graph, Node};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Time spent in one kind of node.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op's label and its first output's dtype and shape, e.g.
    /// `matmul_sum[nf4ᵀ + mm + mm | bf16→bf16] bf16[1024, 2816]`.
    pub kind: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Per-kind totals, gathered by [`crate::CpuExecutor::profile_ops`].
#[derive(Clone, Debug, Default)]
pub struct OpProfile {
    by_kind: HashMap<String, (u64, Duration)>,
}

impl OpProfile {
    pub(crate) fn record(&mut self, g: &Graph, node: &Node, took: Duration) {
        let out = node.outputs[0];
        let kind = format!("{} {}{:?}", node.op.label(), g.dtype(out), g.shape(out));
        let e = self.by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += took;
    }

    /// Every kind, the most time first.
    pub fn rows(&self) -> Vec<OpTime> {
        let mut rows: Vec<OpTime> = self
            .by_kind
            .iter()
            .map(|(kind, &(calls, t))| OpTime {
                kind: kind.clone(),
                calls,
                seconds: t.as_secs_f64(),
            })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.kind.cmp(&b.kind)));
        rows
    }

    /// The total time in nodes.
    pub fn seconds(&self) -> f64 {
        self.by_kind.values().map(|(_, t)| t.as_secs_f64()).sum()
    }

    /// A table of the `top` kinds with the most time, and the rest summed.
    pub fn table(&self, top: usize) -> String {
        let rows = self.rows();
        let total = self.seconds().max(f64::MIN_POSITIVE);
        let mut s = format!(
            "{:>9} {:>6} {:>7}  op (first output)\n",
            "seconds", "share", "calls"
        );
        let mut line = |seconds: f64, calls: u64, kind: &str| {
            let share = 100.0 * seconds / total;
            let _ = writeln!(s, "{seconds:>9.3} {share:>5.1}% {calls:>7}  {kind}");
        };
        for r in rows.iter().take(top) {
            line(r.seconds, r.calls, &r.kind);
        }
        if rows.len() > top {
            let rest = &rows[top..];
            let kinds = format!("{} other kinds", rest.len());
            line(
                rest.iter().map(|r| r.seconds).sum(),
                rest.iter().map(|r| r.calls).sum(),
                &kinds,
            );
        }
        line(total, rows.iter().map(|r| r.calls).sum(), "total");
        s
    }
}
