//! Packing: a block of `op(a)` or `op(b)` copied into the panel layout the
//! micro-kernels read, whatever the transpose flags, with zero padding past
//! the matrix edge so that every micro-kernel call sees a full tile.

/// Packs rows `i0..i0+rows` and columns `p0..p0+kc` of `op(a)` (`a` is
/// `[m,k]`, or `[k,m]` when `ta`) into `dst` (`kc·mr` floats), p-major:
/// `dst[p·mr + i] = op(a)[i0+i, p0+p]`, rows past `rows` zero.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_a(
    a: &[f32],
    dst: &mut [f32],
    m: usize,
    k: usize,
    ta: bool,
    (i0, rows): (usize, usize),
    (p0, kc): (usize, usize),
    mr: usize,
) {
    debug_assert_eq!(dst.len(), kc * mr);
    if ta {
        // Row p of `a` holds op(a)[.., p]: a contiguous copy per p.
        for (p, d) in dst.chunks_exact_mut(mr).enumerate() {
            let src = &a[(p0 + p) * m + i0..][..rows];
            d[..rows].copy_from_slice(src);
            d[rows..].fill(0.0);
        }
    } else {
        // Read each row of `a` contiguously, write it with stride mr.
        for i in 0..rows {
            let src = &a[(i0 + i) * k + p0..][..kc];
            for (d, &v) in dst[i..].iter_mut().step_by(mr).zip(src) {
                *d = v;
            }
        }
        if rows < mr {
            for d in dst.chunks_exact_mut(mr) {
                d[rows..].fill(0.0);
            }
        }
    }
}

/// Packs rows `p0..p0+kc` and columns `j0..j0+cols` of `op(b)` (`b` is
/// `[k,n]`, or `[n,k]` when `tb`) into `dst` as panels of nr columns, each
/// p-major (`kc·nr` floats): `dst[q·kc·nr + p·nr + j] = op(b)[p0+p, j0+q·nr+j]`,
/// columns past `cols` zero. A whole slab at once, so that each row of `b`
/// is read in one contiguous run (a panel at a time would stride across
/// `kc` rows, and pages, per 32 floats).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_b(
    b: &[f32],
    dst: &mut [f32],
    k: usize,
    n: usize,
    tb: bool,
    (p0, kc): (usize, usize),
    (j0, cols): (usize, usize),
    nr: usize,
) {
    let panel = kc * nr;
    debug_assert_eq!(dst.len(), cols.div_ceil(nr) * panel);
    if tb {
        // Row j of `b` holds op(b)[.., j]: transpose a panel in 16×nr
        // blocks, so the destination block being filled stays in L1.
        const P_BLOCK: usize = 16;
        for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
            let cols_q = nr.min(cols - q * nr);
            for pb in (0..kc).step_by(P_BLOCK) {
                let len = P_BLOCK.min(kc - pb);
                let block = &mut d[pb * nr..(pb + len) * nr];
                for j in 0..cols_q {
                    let src = &b[(j0 + q * nr + j) * k + p0 + pb..][..len];
                    for (o, &v) in block[j..].iter_mut().step_by(nr).zip(src) {
                        *o = v;
                    }
                }
                if cols_q < nr {
                    for o in block.chunks_exact_mut(nr) {
                        o[cols_q..].fill(0.0);
                    }
                }
            }
        }
    } else {
        for p in 0..kc {
            let src = &b[(p0 + p) * n + j0..][..cols];
            for (q, s) in src.chunks(nr).enumerate() {
                let o = &mut dst[q * panel + p * nr..][..nr];
                o[..s.len()].copy_from_slice(s);
                o[s.len()..].fill(0.0);
            }
        }
    }
}
