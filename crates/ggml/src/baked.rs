//! Compressed weights (`GGML_ANE_WEIGHTS=compressed`): a lone Q8_0 or Q4_0 weight runs a program
//! with the weight baked in, still as ggml's blocks.
//!
//! The program is [`ane_mil::build::conv_matmul_quant`]: the quants and fp16 scales are two blobs
//! of its `weight.bin`, `constexpr_blockwise_shift_scale` expands them (exactly: the result equals
//! ggml's `to_float` rounded to fp16), and a 1x1 conv multiplies the channel-first activations
//! `[1, K, 1, N]` into `[1, M, 1, N]`. The weight lives in the program, so there is one program per
//! weight tensor and column bucket: each costs a compile, out of the ANE's ~119 per process, and a
//! slot of the loaded-program budget, which it shares with the shape-shared programs in
//! [`KernelCache`] (least recently used unloaded first). That suits small models only, which is
//! why it is opt-in; what the ANE does with the compressed form (streams it, or expands it at
//! load as M1/M2 do) is unmeasured.
//!
//! Anything else (fused groups, other types, non-contiguous rows, axes beyond the chip limit, a
//! failed compile or dispatch, a numeric guard trip) returns `false` and the group takes the fp16
//! path, which writes every output.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use ane_convert::types::{GGML_TYPE_Q4_0, GGML_TYPE_Q8_0};
use ane_engine::surface::request_alloc_size;
use ane_engine::{EngineError, WeightFile};
use ane_mil::build::{self, QuantKind};
use half::f16;

use crate::guard;
use crate::matmul::{member_key, Context, Group, Member, ProgramKey};
use crate::stats::add_time;

/// The block type of a weight the baked path takes, if it takes it.
fn kind_of(m: &Member, max_axis: usize) -> Option<QuantKind> {
    let d = &m.src0.desc;
    let kind = match d.ty {
        GGML_TYPE_Q8_0 => QuantKind::Q8_0,
        GGML_TYPE_Q4_0 => QuantKind::Q4_0,
        _ => return None,
    };
    let (k, rows) = (d.ne[0] as usize, d.ne[1] as usize);
    let row_bytes = k / QuantKind::BLOCK * kind.block_bytes();
    let ok = d.ne[2] == 1
        && d.ne[3] == 1
        && k.is_multiple_of(QuantKind::BLOCK)
        && (1..=max_axis).contains(&k)
        && (1..=max_axis).contains(&rows)
        && d.nb[0] == m.src0_info.type_size
        && d.nb[1] == row_bytes
        && !m.src0.is_null();
    ok.then_some(kind)
}

/// Whether a weight could run baked (Q8_0/Q4_0, 2-D, contiguous rows, axes within `max_axis`);
/// whether it does also depends on its group being a single MUL_MAT.
pub(crate) fn may_bake(m: &Member, max_axis: usize) -> bool {
    kind_of(m, max_axis).is_some()
}

/// Computes `g` with a baked compressed-weight program when it qualifies; `false` leaves it to
/// the fp16 path untouched (outputs possibly half written, which that path overwrites).
pub(crate) fn try_compute(cx: &Context<'_>, g: &Group) -> bool {
    let max_axis = cx.engine.limits().max_axis;
    let enabled = cx
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .compressed;
    if !enabled || !g.weights || g.members.len() != 1 {
        return false;
    }
    let m = &g.members[0];
    let Some(kind) = kind_of(m, max_axis) else {
        return false;
    };
    let r = run(cx, g, m, kind);
    match r {
        Ok(()) => {
            cx.stats.ops_offloaded.fetch_add(1, Relaxed);
            true
        }
        Err(e) => {
            if crate::config::Config::get().debug {
                eprintln!("ggml-ane: baked program failed, fp16 path: {e}");
            }
            false
        }
    }
}

/// Every column chunk of `g` through the baked program of its bucket (`m` qualified by
/// [`kind_of`]).
fn run(cx: &Context<'_>, g: &Group, m: &Member, kind: QuantKind) -> Result<(), EngineError> {
    let d = &m.src0.desc;
    let (k, rows) = (d.ne[0] as usize, d.ne[1] as usize);
    let [_, n, ne12, ne13] = g.src1.desc.ne.map(|v| v as usize);
    // src0 is 2-D: every src1 column of every matrix multiplies it.
    let cols: Vec<(usize, usize, usize)> = (0..ne13)
        .flat_map(|i13| (0..ne12).flat_map(move |i12| (0..n).map(move |i1| (i1, i12, i13))))
        .collect();
    let wkey = member_key(m);
    let mut xrow = vec![0f32; k];
    for chunk in cx.planner.col_chunks(cols.len()) {
        let nb = chunk.bucket;
        let cols = &cols[chunk.start..chunk.start + chunk.len];
        let t = Instant::now();
        let size = request_alloc_size(&[k * nb * 2, rows * nb * 2]);
        let (mut x, mut y) = cx
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_pair(cx.engine, size)?;
        let result = (|| {
            {
                let xs = x.fp16_mut(k * nb);
                // Pooled surfaces hold old data: padding columns must be zero.
                xs.fill(f16::ZERO);
                for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
                    g.src1.read_row(&g.src1_info, i1, i12, i13, &mut xrow);
                    if !guard::input_ok(&xrow) {
                        return Err(guard::trip(cx.stats, "src1 out of fp16 range"));
                    }
                    for (ki, &v) in xrow.iter().enumerate() {
                        xs[ki * nb + c] = f16::from_f32(v);
                    }
                }
            }
            add_time(&cx.stats.ns_convert, t.elapsed());
            let t = Instant::now();
            let result = {
                let mut cache = cx.cache.lock().unwrap_or_else(|e| e.into_inner());
                cache
                    .program(
                        cx.engine,
                        ProgramKey::Baked {
                            weight: wkey,
                            n: nb,
                        },
                        cx.stats,
                        || {
                            let ts = Instant::now();
                            let len = rows * k / QuantKind::BLOCK * kind.block_bytes();
                            // `kind_of` checked the rows are contiguous blocks: `len` bytes.
                            let raw = m.src0.bytes(0, len);
                            let blob = build::weights_blob_quant(kind, raw, rows, k);
                            add_time(&cx.stats.ns_stage, ts.elapsed());
                            let mil =
                                ane_mil::text::emit(&build::conv_matmul_quant(kind, k, rows, nb));
                            let file = WeightFile {
                                path: build::WEIGHT_PATH.into(),
                                bytes: blob,
                            };
                            (mil, vec![file])
                        },
                    )
                    .and_then(|id| cx.engine.evaluate(id, &[&x], &mut [&mut y]))
            };
            add_time(&cx.stats.ns_engine, t.elapsed());
            result?;
            cx.stats.dispatches.fetch_add(1, Relaxed);
            let t = Instant::now();
            let ys = y.fp16(rows * nb);
            if !guard::output_ok(ys) {
                return Err(guard::trip(
                    cx.stats,
                    "output non-finite or past the matmul cliff",
                ));
            }
            for mi in 0..rows {
                for (c, &(i1, i12, i13)) in cols.iter().enumerate() {
                    m.dst.put(mi, i1, i12, i13, ys[mi * nb + c].to_f32());
                }
            }
            add_time(&cx.stats.ns_convert, t.elapsed());
            Ok(())
        })();
        let mut pool = cx.scratch.lock().unwrap_or_else(|e| e.into_inner());
        pool.give_pair(x, y);
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
