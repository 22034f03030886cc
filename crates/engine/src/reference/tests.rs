//! Reference-engine tests: numerics against an f64 oracle, and every ANE rule it enforces.

use super::*;
use crate::surface::{alloc_size, request_alloc_size, MIN_SURFACE_BYTES};
use crate::Chip;
use ane_mil::build::{conv_matmul, dyn_matmul, weights_blob_fp16, WEIGHT_PATH};
use half::f16;

fn engine() -> ReferenceEngine {
    ReferenceEngine::new(Chip::M4.limits())
}

/// Deterministic values in [-1, 1) that differ per index, so transposes and swaps show.
fn values(n: usize, seed: u64) -> Vec<f16> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// out[m][n] = sum_k w[m][k] x[k][n], in f64.
fn oracle(w: &[f16], x: &[f16], k: usize, m: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for mi in 0..m {
        for ni in 0..n {
            out[mi * n + ni] = (0..k)
                .map(|ki| w[mi * k + ki].to_f64() * x[ki * n + ni].to_f64())
                .sum();
        }
    }
    out
}

fn assert_close(got: &[f16], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - w).abs() <= 1e-3 * w.abs().max(1.0),
            "element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn conv_matmul_matches_oracle() {
    let (k, m, n) = (96, 80, 64);
    let e = engine();
    let w = values(m * k, 1);
    let x = values(k * n, 2);
    let mil = ane_mil::text::emit(&conv_matmul(k, m, n));
    let id = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: weights_blob_fp16(&w),
            }],
        )
        .unwrap();
    let size = request_alloc_size(&[k * n * 2, m * n * 2]);
    let mut xs = Surface::new(size);
    xs.fp16_mut(k * n).copy_from_slice(&x);
    let mut ys = Surface::new(size);
    e.evaluate(id, &[&xs], &mut [&mut ys]).unwrap();
    assert_close(ys.fp16(m * n), &oracle(&w, &x, k, m, n));
    let c = e.counters();
    assert_eq!((c.compiles, c.loads, c.evaluations, c.loaded), (1, 1, 1, 1));
    e.unload(id);
    assert_eq!(e.counters().loaded, 0);
    assert!(matches!(
        e.evaluate(id, &[&xs], &mut [&mut ys]),
        Err(EngineError::UnknownProgram(_))
    ));
}

#[test]
fn dyn_matmul_binds_inputs_alphabetically() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let id = e
        .compile(&ane_mil::text::emit(&dyn_matmul(k, m, n)), &[])
        .unwrap();
    let w = values(m * k, 3);
    let x = values(k * n, 4);
    let size = request_alloc_size(&[k * n * 2, m * k * 2, m * n * 2]);
    let (mut a, mut b, mut y) = (Surface::new(size), Surface::new(size), Surface::new(size));
    a.fp16_mut(k * n).copy_from_slice(&x); // a_x
    b.fp16_mut(m * k).copy_from_slice(&w); // b_w
    e.evaluate(id, &[&a, &b], &mut [&mut y]).unwrap();
    assert_close(y.fp16(m * n), &oracle(&w, &x, k, m, n));
    // Swapped surfaces bind to the wrong parameters: the result must differ (silently, as on the chip).
    let mut y2 = Surface::new(size);
    e.evaluate(id, &[&b, &a], &mut [&mut y2]).unwrap();
    assert_ne!(y.fp16(m * n), y2.fp16(m * n));
}

#[test]
fn surface_rules_are_enforced() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let id = e
        .compile(&ane_mil::text::emit(&dyn_matmul(k, m, n)), &[])
        .unwrap();
    let size = alloc_size(k * n * 2);
    let a = Surface::new(size);
    let b = Surface::new(size + 128);
    let mut y = Surface::new(size);
    let err = e.evaluate(id, &[&a, &b], &mut [&mut y]).unwrap_err();
    assert!(
        matches!(err, EngineError::Surface(ref m) if m.contains("equal")),
        "{err}"
    );
    let small = Surface::new(MIN_SURFACE_BYTES - 128);
    let mut ys = Surface::new(MIN_SURFACE_BYTES - 128);
    let err = e
        .evaluate(id, &[&small, &small], &mut [&mut ys])
        .unwrap_err();
    assert!(matches!(err, EngineError::Surface(_)), "{err}");
    let err = e.evaluate(id, &[&a], &mut [&mut y]).unwrap_err();
    assert!(
        matches!(err, EngineError::Surface(ref m) if m.contains("inputs")),
        "{err}"
    );
}

#[test]
fn axis_limit_depends_on_chip() {
    let mil = ane_mil::text::emit(&dyn_matmul(64, 16385, 64));
    let m1 = ReferenceEngine::new(Chip::M1.limits());
    let err = m1.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(ref m) if m.contains("16384")),
        "{err}"
    );
    assert!(engine().compile(&mil, &[]).is_ok());
}

#[test]
fn loaded_program_budget() {
    let e = ReferenceEngine::new(ChipLimits {
        max_axis: 65536,
        max_loaded_programs: 2,
    });
    let mil = ane_mil::text::emit(&dyn_matmul(64, 64, 64));
    let a = e.compile(&mil, &[]).unwrap();
    let _b = e.compile(&mil, &[]).unwrap();
    assert!(matches!(
        e.compile(&mil, &[]),
        Err(EngineError::Budget { loaded: 2, max: 2 })
    ));
    e.unload(a);
    assert!(e.compile(&mil, &[]).is_ok());
    assert_eq!(e.counters().loaded_peak, 2);
}

#[test]
fn weight_file_errors_name_the_problem() {
    let (k, m, n) = (64, 64, 64);
    let e = engine();
    let mil = ane_mil::text::emit(&conv_matmul(k, m, n));
    let err = e.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Weights(ref s) if s.contains("no weight file")),
        "{err}"
    );
    let short = weights_blob_fp16(&values(m * k - 1, 5));
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: short,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Weights(_)), "{err}");
    let mut bad = weights_blob_fp16(&values(m * k, 5));
    bad[64] ^= 0xff; // sentinel
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: bad,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::Weights(_)), "{err}");
}

#[test]
fn rejects_unknown_ops_and_bad_text() {
    let e = engine();
    assert!(matches!(
        e.compile("program(1.3) nonsense", &[]),
        Err(EngineError::Parse(_))
    ));
    let mil = ane_mil::text::emit(&dyn_matmul(64, 64, 64)).replace("reshape(", "softplus(");
    let err = e.compile(&mil, &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(_) | EngineError::Parse(_)),
        "{err}"
    );
}

#[test]
fn driver_plan_rules_fail_on_the_reference_engine() {
    let e = engine();
    // Row rule: 80 fp16 columns are 160-byte rows.
    let err = e
        .compile(&ane_mil::text::emit(&dyn_matmul(64, 64, 80)), &[])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(ref m) if m.contains("row rule")),
        "{err}"
    );
    // Shortest last axis: 32 fp16 columns are 64-byte rows, but fail at load on the ANE.
    let err = e
        .compile(&ane_mil::text::emit(&dyn_matmul(64, 64, 32)), &[])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Compile(ref m) if m.contains("last axis below 64")),
        "{err}"
    );
    // A BLOBFILE escaping the model directory.
    let mil = ane_mil::text::emit(&conv_matmul(64, 64, 64))
        .replace(WEIGHT_PATH, "@model_path/../weight.bin");
    let err = e
        .compile(
            &mil,
            &[WeightFile {
                path: "@model_path/../weight.bin".into(),
                bytes: weights_blob_fp16(&values(64 * 64, 1)),
            }],
        )
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Weights(ref m) if m.contains("..")),
        "{err}"
    );
}

/// Raw ggml blocks (Q8_0: fp16 d + 32 i8; Q4_0: fp16 d + 16 bytes, element j in the low nibble
/// of byte j and j + 16 in the high one, value (q - 8) d) for an `[m, k]` weight, with the ggml
/// dequantization (fp32 product rounded to fp16) next to them. Scales include zero, negative and
/// subnormal values; quants cover the full range.
fn ggml_blocks(
    kind: ane_mil::build::QuantKind,
    m: usize,
    k: usize,
    seed: u64,
) -> (Vec<u8>, Vec<f16>) {
    use ane_mil::build::QuantKind;
    let nb = m * k / 32;
    let bytes: Vec<u8> = values(nb * 32, seed)
        .iter()
        .map(|v| (v.to_bits() ^ (v.to_bits() >> 7)) as u8)
        .collect();
    let scales = values(nb, seed ^ 0x5ca1e);
    let (mut raw, mut deq) = (Vec::new(), Vec::new());
    for b in 0..nb {
        let d = match b % 7 {
            0 => f16::ZERO,
            1 => f16::from_bits(0x0123), // subnormal
            _ => f16::from_f32(scales[b].to_f32() / 16.0),
        };
        raw.extend(d.to_le_bytes());
        let q = &bytes[b * 32..(b + 1) * 32];
        match kind {
            QuantKind::Q8_0 => {
                raw.extend_from_slice(q);
                deq.extend(
                    q.iter()
                        .map(|&v| f16::from_f32(d.to_f32() * (v as i8) as f32)),
                );
            }
            QuantKind::Q4_0 => {
                let nib: Vec<u8> = q.iter().map(|v| v & 0x0f).collect();
                raw.extend((0..16).map(|j| nib[j] | (nib[j + 16] << 4)));
                deq.extend(
                    nib.iter()
                        .map(|&v| f16::from_f32(d.to_f32() * (v as f32 - 8.0))),
                );
            }
        }
    }
    (raw, deq)
}

/// Compiles `mil` with `weights`, evaluates it on `x` (`[1, k, 1, n]`) and returns `[1, m, 1, n]`.
fn run_conv(
    e: &ReferenceEngine,
    mil: &str,
    weights: Vec<u8>,
    x: &[f16],
    m: usize,
    n: usize,
) -> Vec<f16> {
    let id = e
        .compile(
            mil,
            &[WeightFile {
                path: WEIGHT_PATH.into(),
                bytes: weights,
            }],
        )
        .unwrap();
    let size = request_alloc_size(&[x.len() * 2, m * n * 2]);
    let mut xs = Surface::new(size);
    xs.fp16_mut(x.len()).copy_from_slice(x);
    let mut ys = Surface::new(size);
    e.evaluate(id, &[&xs], &mut [&mut ys]).unwrap();
    e.unload(id);
    ys.fp16(m * n).to_vec()
}

#[test]
fn compressed_forms_equal_fp16_conv_on_dequantized_weights() {
    use ane_mil::build::{conv_matmul_quant, weights_blob_quant, QuantKind};
    let (k, m, n) = (128, 48, 64);
    let e = engine();
    let x = values(k * n, 9);
    for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
        let (raw, deq) = ggml_blocks(kind, m, k, 3);
        let quant = run_conv(
            &e,
            &ane_mil::text::emit(&conv_matmul_quant(kind, k, m, n)),
            weights_blob_quant(kind, &raw, m, k),
            &x,
            m,
            n,
        );
        let dense = run_conv(
            &e,
            &ane_mil::text::emit(&conv_matmul(k, m, n)),
            weights_blob_fp16(&deq),
            &x,
            m,
            n,
        );
        let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&quant), bits(&dense), "{kind:?}");
        assert_close(&quant, &oracle(&deq, &x, k, m, n));
    }
    assert_eq!(e.counters().loaded, 0);
}

#[test]
fn blockwise_shift_scale_checks_ranks_and_offsets() {
    use ane_mil::build::{conv_matmul_q4_0, weights_blob_q4_0, QuantKind};
    let (k, m, n) = (64, 16, 64);
    let (raw, _) = ggml_blocks(QuantKind::Q4_0, m, k, 5);
    let good = ane_mil::text::emit(&conv_matmul_q4_0(k, m, n));
    let w = || {
        vec![WeightFile {
            path: WEIGHT_PATH.into(),
            bytes: weights_blob_q4_0(&raw, m, k),
        }]
    };
    let e = engine();
    e.unload(e.compile(&good, &w()).unwrap());
    // Scale of lower rank than the data: rejected as coremltools does.
    let bad = good.replace(
        "tensor<fp16, [16, 2, 1, 1]> W_s = const()[name = string(\"W_s\"), val = tensor<fp16, [16, 2, 1, 1]>",
        "tensor<fp16, [16, 2, 1]> W_s = const()[name = string(\"W_s\"), val = tensor<fp16, [16, 2, 1]>",
    );
    assert_ne!(bad, good);
    let err = e.compile(&bad, &w()).unwrap_err().to_string();
    assert!(err.contains("same rank"), "{err}");
    // The data declared int8 while the blob holds int4: the blob check names it.
    let bad = good.replace("tensor<int4,", "tensor<int8,");
    assert!(e.compile(&bad, &w()).is_err());
}

#[test]
fn every_step_is_logged_and_a_failure_names_its_step() {
    use crate::steps::first_failure;
    let e = engine();
    let mil = ane_mil::text::emit(&dyn_matmul(64, 64, 64));
    let id = e.compile(&mil, &[]).unwrap();
    let size = request_alloc_size(&[64 * 64 * 2]);
    let (x, w) = (Surface::new(size), Surface::new(size));
    let mut y = Surface::new(size);
    e.evaluate(id, &[&x, &w], &mut [&mut y]).unwrap();
    e.unload(id);
    let steps: Vec<&str> = e.steps().iter().map(|r| r.step).collect();
    assert_eq!(steps, ["compile", "load", "evaluate", "unload"]);
    assert!(e.steps().iter().all(|r| r.ok && r.ms >= 0.0));
    assert_eq!(first_failure(&e.steps()), None);

    let faults = crate::reference::faults::FaultSpec {
        load: 1.0,
        ..Default::default()
    };
    let e = ReferenceEngine::with_faults(Chip::M4.limits(), faults);
    assert!(e.compile(&mil, &[]).is_err());
    let f = first_failure(&e.steps()).unwrap();
    assert!(f.starts_with("load: load failed"), "{f}");
}

#[test]
fn probed_forms_are_followed_and_the_report_machines_fail_where_told() {
    use crate::probe::ProbeKind;
    use crate::reference::faults::FaultSpec;
    let (k, m, n) = (64, 128, 64);
    let mil = ane_mil::text::emit(&dyn_matmul(k, m, n));
    let machine = |f: FaultSpec| {
        ReferenceEngine::with_faults(Chip::M4.limits(), f).with_probes(&[
            ProbeKind::MilDialect,
            ProbeKind::SurfaceOrder,
            ProbeKind::CompileCall,
        ])
    };
    // A compiler refusing the shorthand dialect takes the verbose one; iOS18 ops cannot go there.
    let e = machine(FaultSpec {
        shorthand: 1.0,
        ..FaultSpec::default()
    });
    assert!(matches!(e.compile(&mil, &[]), Err(EngineError::Compile(_))));
    e.set_form(ProbeKind::MilDialect, 1);
    let id = e.compile(&mil, &[]).expect("the verbose dialect compiles");
    e.unload(id);
    let q = ane_mil::text::emit(&ane_mil::build::conv_matmul_q8_0(64, 64, 64));
    let err = e.compile(&q, &[]).unwrap_err().to_string();
    assert!(err.contains("constexpr_blockwise_shift_scale"), "{err}");
    // Core ML's compile calls.
    let e = machine(FaultSpec {
        sync_compile: 1.0,
        ..FaultSpec::default()
    });
    assert!(e.compile(&mil, &[]).is_err());
    e.set_form(ProbeKind::CompileCall, 1);
    assert!(e.compile(&mil, &[]).is_ok());
    // Surfaces: equal sizes give zeros on the M1 of issue 47, ordered ones the product; the
    // ordered ones fail where unequal sizes are refused (Orion).
    let w = values(m * k, 3);
    let x = values(k * n, 4);
    let size = request_alloc_size(&[k * n * 2, m * k * 2, m * n * 2]);
    let run = |e: &ReferenceEngine| {
        let id = e.compile(&mil, &[])?;
        let (mut a, mut b, mut y) = (Surface::new(size), Surface::new(size), Surface::new(size));
        a.fp16_mut(k * n).copy_from_slice(&x);
        b.fp16_mut(m * k).copy_from_slice(&w);
        let r = e.evaluate(id, &[&a, &b], &mut [&mut y]);
        e.unload(id);
        r.map(|()| y.fp16(m * n).to_vec())
    };
    let want = oracle(&w, &x, k, m, n);
    let m1 = machine(FaultSpec {
        unordered: 1.0,
        ..FaultSpec::default()
    });
    assert!(
        run(&m1).unwrap().iter().all(|v| v.to_f32() == 0.0),
        "zeros, no error"
    );
    m1.set_form(ProbeKind::SurfaceOrder, 1);
    assert_close(&run(&m1).unwrap(), &want);
    let orion = machine(FaultSpec {
        unequal: 1.0,
        ..FaultSpec::default()
    });
    assert_close(&run(&orion).unwrap(), &want);
    orion.set_form(ProbeKind::SurfaceOrder, 1);
    assert!(matches!(run(&orion), Err(EngineError::Eval(_))));
    // An engine that follows no probe ignores the forms.
    let plain = ReferenceEngine::new(Chip::M4.limits());
    plain.set_form(ProbeKind::MilDialect, 1);
    assert_eq!(plain.form(ProbeKind::MilDialect), 0);
    assert!(plain.probes().is_empty());
}

#[test]
fn the_driver_plan_writes_the_dialect_and_sizes_of_the_forms() {
    use crate::driver_plan::DriverPlan;
    use crate::probe::{Forms, ProbeKind, SurfaceOrder};
    let mil = ane_mil::text::emit(&dyn_matmul(64, 128, 64));
    let forms = Forms::default();
    let plan = DriverPlan::new_in(&mil, &[], &forms).unwrap();
    assert_eq!(
        &plan.mil[..],
        mil.as_bytes(),
        "the shorthand is the text as given"
    );
    assert_eq!(plan.order, SurfaceOrder::Equal);
    let (i, o) = plan.surface_sizes();
    assert!(i.iter().chain(&o).all(|&s| s == plan.surface_bytes));
    forms.set(ProbeKind::MilDialect, 1);
    forms.set(ProbeKind::SurfaceOrder, 1);
    let plan = DriverPlan::new_in(&mil, &[], &forms).unwrap();
    let text = std::str::from_utf8(&plan.mil).unwrap();
    assert!(
        text.starts_with("program(1.0)") && text.contains("main<ios16>"),
        "{text}"
    );
    let (i, o) = plan.surface_sizes();
    assert!(
        i[0] < i[1] && crate::surface::is_ordered(&i, &o),
        "{i:?} {o:?}"
    );
    // Host surfaces of one size are copied through those: each need only hold its tensor.
    let s = plan.surface_bytes;
    plan.check_request(&[s, s], &[s]).unwrap();
    assert!(plan.check_request(&[s, 4096], &[s]).is_err());
}

/// Compiles `program` (no weight files), binds `inputs` (raw bytes, in binding order) and
/// returns the first `out_len` fp16 values of its one output.
fn run_inputs(
    e: &ReferenceEngine,
    program: &ane_mil::Program,
    inputs: &[Vec<u8>],
    out_len: usize,
) -> Vec<f16> {
    let id = e.compile(&ane_mil::text::emit(program), &[]).unwrap();
    let mut sizes: Vec<usize> = inputs.iter().map(Vec::len).collect();
    sizes.push(out_len * 2);
    let size = request_alloc_size(&sizes);
    let ins: Vec<Surface> = inputs
        .iter()
        .map(|b| {
            let mut s = Surface::new(size);
            s.bytes_mut()[..b.len()].copy_from_slice(b);
            s
        })
        .collect();
    let mut ys = Surface::new(size);
    e.evaluate(id, &ins.iter().collect::<Vec<_>>(), &mut [&mut ys])
        .unwrap();
    e.unload(id);
    ys.fp16(out_len).to_vec()
}

/// The int8-input probe (`tiled_matmul_int8`) on Q8_0 blocks gives, bit for bit, what the fp16
/// shape-shared program gives on the same blocks dequantized as ggml does and rounded to fp16:
/// the in-program `cast` and block-scale `mul` are exact before their one rounding. Two row tiles
/// and two K slices, with padding in both, and scales that are zero, subnormal and negative.
#[test]
fn int8_input_program_equals_fp16_program_on_dequantized_q8_0() {
    use ane_mil::build::{
        stage_q8_0_int8, tiled_matmul, tiled_matmul_int8, Layout, QuantKind, TiledShape,
    };
    let (m, k, n) = (100, 160, 64);
    let s = TiledShape {
        heads: 1,
        tiles: 2,
        k_chunks: 2,
        m_tile: 64,
        k_chunk: 96,
        n,
        layout: Layout::Tokens,
    };
    let e = engine();
    let (raw, deq) = ggml_blocks(QuantKind::Q8_0, m, k, 11);
    let x = values(k * n, 12);
    // Activations token-major per slice, zero in the padding.
    let mut xin = vec![f16::ZERO; s.x_len()];
    for kk in 0..k {
        for ni in 0..n {
            xin[s.x_index(0, kk / s.k_chunk, kk % s.k_chunk, ni)] = x[kk * n + ni];
        }
    }
    let halves = |v: &[f16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
    let (q, d) = stage_q8_0_int8(&s, &raw, m, k);
    let int8 = run_inputs(
        &e,
        &tiled_matmul_int8(s),
        &[
            halves(&xin),
            q.iter().map(|&v| v as u8).collect(),
            halves(&d),
        ],
        s.y_len(),
    );
    let mut w = vec![f16::ZERO; s.w_len()];
    for r in 0..m {
        for kk in 0..k {
            w[s.w_index(r / s.m_tile, kk / s.k_chunk, r % s.m_tile, kk % s.k_chunk)] =
                deq[r * k + kk];
        }
    }
    let dense = run_inputs(&e, &tiled_matmul(s), &[halves(&xin), halves(&w)], s.y_len());
    let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&int8), bits(&dense));
    // And both are the product: the two slices' partial sums, each rounded once to fp16 (half an
    // ulp of its magnitude), added on the host.
    let want = oracle(&deq, &x, k, m, n);
    for r in 0..m {
        for ni in 0..n {
            let (t, row) = (r / s.m_tile, r % s.m_tile);
            let parts: Vec<f64> = (0..2)
                .map(|c| int8[s.y_index(t, c, row, ni)].to_f64())
                .collect();
            let got: f64 = parts.iter().sum();
            let bound = parts.iter().map(|p| p.abs()).sum::<f64>() * 2f64.powi(-11) + 1e-6;
            let w = want[r * n + ni];
            assert!(
                (got - w).abs() <= bound,
                "row {r} column {ni}: got {got}, want {w}"
            );
        }
    }
    assert!(
        want.iter().any(|v| v.abs() > 0.1),
        "a product that proves something"
    );
    // Bytes: the int8 weights are half the fp16 ones, their scales 1/32 of them.
    let fp16_bytes = w.len() * 2;
    assert_eq!((2 * q.len(), 32 * (d.len() * 2)), (fp16_bytes, fp16_bytes));
}

/// An int8 value where the program wants fp16 is refused at compile, naming the dtypes; int32
/// inputs stay refused (only int8 surfaces are probed), and so does a cast from int32.
#[test]
fn int8_inputs_are_typed() {
    let e = engine();
    let mil = "program(1.3)\n{\n    func main<ios18>(tensor<int8, [1, 64]> a, tensor<fp16, [1, 64]> b) {\n        tensor<fp16, [1, 64]> y = mul(x = a, y = b)[name = string(\"y\")];\n    } -> (y);\n}\n";
    let err = e.compile(mil, &[]).unwrap_err().to_string();
    assert!(err.contains("int8 and fp16"), "{err}");
    let mil = "program(1.3)\n{\n    func main<ios18>(tensor<int32, [1, 64]> a) {\n        string d = const()[name = string(\"d\"), val = string(\"fp16\")];\n        tensor<fp16, [1, 64]> y = cast(dtype = d, x = a)[name = string(\"y\")];\n    } -> (y);\n}\n";
    let err = e.compile(mil, &[]).unwrap_err().to_string();
    assert!(err.contains("must be an fp16/fp32/int8 tensor"), "{err}");
    // ... and so is a cast from an int32 value.
    let ones = vec!["1"; 64].join(", ");
    let mil = format!(
        "program(1.3)\n{{\n    func main<ios18>(tensor<fp16, [1, 64]> a) {{\n        \
         tensor<int32, [1, 64]> c = const()[name = string(\"c\"), val = tensor<int32, [1, 64]>([{ones}])];\n        \
         string d = const()[name = string(\"d\"), val = string(\"fp16\")];\n        \
         tensor<fp16, [1, 64]> y = cast(dtype = d, x = c)[name = string(\"y\")];\n    }} -> (y);\n}}\n"
    );
    let err = e.compile(&mil, &[]).unwrap_err().to_string();
    assert!(err.contains("cast from int32"), "{err}");
}
