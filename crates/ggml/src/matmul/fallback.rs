//! The CPU path for what the engine did not compute: the host's CPU backend, else the plugin's own
//! loop.

use super::*;

/// The columns of matrix (`i02`, `i03`) one failed dispatch left to the CPU.
pub(super) struct Failed {
    pub(super) i02: usize,
    pub(super) i03: usize,
    pub(super) cols: Vec<(usize, usize, usize)>,
}

/// The CPU path: `parts` of every member, or, when `parts` is empty, every member whole. Through
/// the host's CPU backend ([`crate::host_cpu`]) when it has one and takes the nodes (same kernels
/// and numbers as CPU-only llama.cpp), else the plugin's own f32 loop.
pub(super) fn fallback(cx: &Context<'_>, g: &Group, parts: &[Failed]) {
    let t = Instant::now();
    let views = cpu_views(g, parts);
    let ops: Vec<crate::host_cpu::MatMul> = views.iter().map(|v| v.0).collect();
    let done = cx.host.is_some_and(|h| h.compute(&ops).is_ok());
    if done {
        cx.stats.fallback_cpu_backend.fetch_add(1, Relaxed);
    } else {
        cx.stats.fallback_own.fetch_add(1, Relaxed);
        for (op, wi) in &views {
            own_fallback(op, wi, &g.src1_info);
        }
    }
    add_time(&cx.stats.ns_fallback, t.elapsed());
}

/// The MUL_MATs a fallback computes, as views of the group's operands: whole members, or per
/// failed part one 2-D product for each run of consecutive tokens of one src1 matrix.
pub(super) fn cpu_views(g: &Group, parts: &[Failed]) -> Vec<(crate::host_cpu::MatMul, TypeInfo)> {
    use crate::host_cpu::MatMul;
    let mut ops = Vec::new();
    for m in &g.members {
        if parts.is_empty() {
            let op = MatMul {
                src0: m.src0,
                src1: g.src1,
                dst: m.dst,
            };
            ops.push((op, m.src0_info));
            continue;
        }
        for p in parts {
            let mut rest = &p.cols[..];
            while let Some(&(i1, i12, i13)) = rest.first() {
                let len = rest
                    .iter()
                    .enumerate()
                    .take_while(|&(j, &(a, b, c))| a == i1 + j && b == i12 && c == i13)
                    .count();
                rest = &rest[len..];
                let (w, x, d) = (m.src0.desc, g.src1.desc, m.dst.desc);
                let op = MatMul {
                    src0: m
                        .src0
                        .sub(w.row_offset(0, p.i02, p.i03), [w.ne[0], w.ne[1], 1, 1]),
                    src1: g
                        .src1
                        .sub(x.row_offset(i1, i12, i13), [x.ne[0], len as i64, 1, 1]),
                    dst: m
                        .dst
                        .sub(d.row_offset(i1, i12, i13), [d.ne[0], len as i64, 1, 1]),
                };
                ops.push((op, m.src0_info));
            }
        }
    }
    ops
}

/// The plugin's own CPU loop for one product: f32 accumulation from the original values, weight
/// rows split across threads, each widened once per src1 matrix, src1 widened once.
/// `op` is a valid product ([`crate::host_cpu::MatMul::is_valid`]) whose types `wi` and `xi`
/// describe; each thread writes its own dst rows.
pub(super) fn own_fallback(op: &crate::host_cpu::MatMul, wi: &TypeInfo, xi: &TypeInfo) {
    let (w, x) = (&op.src0.desc, &op.src1.desc);
    let [k, rows, ne02, ne03] = w.ne.map(|v| v as usize);
    let [_, n, ne12, ne13] = x.ne.map(|v| v as usize);
    let (r2, r3) = (ne12 / ne02, ne13 / ne03);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows.div_ceil(16))
        .max(1);
    for i13 in 0..ne13 {
        for i12 in 0..ne12 {
            let mut xs = vec![0f32; n * k];
            for (i1, row) in xs.chunks_exact_mut(k).enumerate() {
                op.src1.read_row(xi, i1, i12, i13, row);
            }
            let xs = &xs;
            let per = rows.div_ceil(threads);
            std::thread::scope(|s| {
                for t in 0..threads {
                    s.spawn(move || {
                        let mut wrow = vec![0f32; k];
                        for r in t * per..((t + 1) * per).min(rows) {
                            op.src0.read_row(wi, r, i12 / r2, i13 / r3, &mut wrow);
                            for (i1, xr) in xs.chunks_exact(k).enumerate() {
                                let acc: f32 = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
                                op.dst.put(r, i1, i12, i13, acc);
                            }
                        }
                    });
                }
            });
        }
    }
}
