//! Liveness-based memory plan: every value computed by the schedule gets an
//! offset in one arena; a buffer is reused once the value in it is dead.
//! Leaves (inputs, parameters) live outside the arena. A node's workspace
//! (`Op::workspace_bytes`) is placed like a value alive during that node
//! only, so the peak counts it too.

use crate::graph::{Graph, NodeId, ValueId};
use std::collections::HashMap;

/// Offsets are aligned to this many bytes (a cache line, and enough for any
/// SIMD load).
pub const ALIGN: usize = 64;

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Byte offset of each value computed by the schedule.
    pub offsets: HashMap<ValueId, usize>,
    /// Byte offset and size of the workspace of each node that has one.
    pub workspaces: HashMap<NodeId, (usize, usize)>,
    /// Arena size: the most bytes live at once (with alignment padding).
    pub peak_bytes: usize,
    /// What the arena would be without reuse, for comparison in reports.
    pub total_bytes: usize,
}

impl MemoryPlan {
    pub fn offset(&self, v: ValueId) -> Option<usize> {
        self.offsets.get(&v).copied()
    }
    /// Where node `n`'s workspace lies: offset and bytes.
    pub fn workspace(&self, n: NodeId) -> Option<(usize, usize)> {
        self.workspaces.get(&n).copied()
    }
}

fn padded(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN).max(1) * ALIGN
}

/// Plans the arena for `schedule`. `keep` values (the plan's outputs) stay
/// live to the end.
pub fn plan_memory(g: &Graph, schedule: &[NodeId], keep: &[ValueId]) -> MemoryPlan {
    // Last step at which each value is read.
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (step, &n) in schedule.iter().enumerate() {
        for &i in &g.node(n).inputs {
            last_use.insert(i, step);
        }
    }
    for &k in keep {
        last_use.insert(k, usize::MAX);
    }

    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, size), sorted by offset
    let mut top = 0usize;
    let mut offsets = HashMap::new();
    let mut workspaces = HashMap::new();
    let mut total = 0usize;
    let mut dying: Vec<Vec<ValueId>> = vec![Vec::new(); schedule.len()];

    for (step, &n) in schedule.iter().enumerate() {
        for &o in &g.node(n).outputs {
            let size = padded(g.ty(o).bytes());
            total += size;
            let off = take(&mut free, &mut top, size);
            offsets.insert(o, off);
            match last_use.get(&o) {
                Some(&usize::MAX) => {}
                Some(&s) => dying[s].push(o),
                // Never read: dead right after it is written.
                None => dying[step].push(o),
            }
        }
        let node = g.node(n);
        let tys: Vec<_> = node.inputs.iter().map(|&i| g.ty(i)).collect();
        let ws = node.op.workspace_bytes(&tys);
        if ws > 0 {
            total += padded(ws);
            workspaces.insert(n, (take(&mut free, &mut top, padded(ws)), ws));
        }
        // Inputs are released only after the outputs (and the workspace)
        // are placed, so no kernel ever writes over a buffer it is reading.
        for v in std::mem::take(&mut dying[step]) {
            give(&mut free, offsets[&v], padded(g.ty(v).bytes()));
        }
        if let Some(&(off, ws)) = workspaces.get(&n) {
            give(&mut free, off, padded(ws));
        }
    }
    let peak = top;
    MemoryPlan {
        offsets,
        workspaces,
        peak_bytes: peak,
        total_bytes: total,
    }
}

/// Best-fit from the free list, else grow the arena.
fn take(free: &mut Vec<(usize, usize)>, top: &mut usize, size: usize) -> usize {
    let best = free
        .iter()
        .enumerate()
        .filter(|(_, &(_, s))| s >= size)
        .min_by_key(|(_, &(_, s))| s)
        .map(|(i, _)| i);
    if let Some(i) = best {
        let (off, s) = free[i];
        if s == size {
            free.remove(i);
        } else {
            free[i] = (off + size, s - size);
        }
        return off;
    }
    // A free block at the very top can be extended instead of wasted.
    if let Some(&(off, s)) = free.last() {
        if off + s == *top {
            free.pop();
            *top = off + size;
            return off;
        }
    }
    let off = *top;
    *top += size;
    off
}

/// Returns a block to the free list, merging it with free neighbours.
fn give(free: &mut Vec<(usize, usize)>, off: usize, size: usize) {
    let pos = free.partition_point(|&(o, _)| o < off);
    free.insert(pos, (off, size));
    if pos + 1 < free.len() && free[pos].0 + free[pos].1 == free[pos + 1].0 {
        free[pos].1 += free[pos + 1].1;
        free.remove(pos + 1);
    }
    if pos > 0 && free[pos - 1].0 + free[pos - 1].1 == free[pos].0 {
        free[pos - 1].1 += free[pos].1;
        free.remove(pos);
    }
}
