//! Baked compressed-weight programs through the reference engine, against an f64 oracle on real
//! ggml Q8_0/Q4_0 blocks.

use super::*;
use crate::ffi::GGML_TYPE_F32;
use crate::ggml::TypeInfo;
use crate::matmul::{compute, KernelCache, Operand};
use crate::support::TensorDesc;
use crate::test_util::{rand_vec, Device, F32_INFO};
use ane_engine::reference::ReferenceEngine;
use ane_engine::Chip;
use ane_engine::Engine;

/// `rows x k` weights as ggml blocks (Q8_0: f16 d + 32 i8; Q4_0: f16 d + 16 bytes, element j in
/// the low nibble of byte j and j + 16 in the high one, value (q - 8) d), and their values in f64.
fn blocks(kind: QuantKind, rows: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f64>) {
    let nb = rows * k / 32;
    let r = rand_vec(nb * 33, seed);
    let (mut raw, mut w) = (Vec::new(), Vec::new());
    for b in 0..nb {
        let d = f16::from_f32(r[b * 33] / 32.0);
        raw.extend(d.to_le_bytes());
        let q: Vec<i32> = r[b * 33 + 1..(b + 1) * 33]
            .iter()
            .map(|v| match kind {
                QuantKind::Q8_0 => (v * 127.0).round() as i32,
                QuantKind::Q4_0 => ((v + 1.0) * 8.0).floor().clamp(0.0, 15.0) as i32,
            })
            .collect();
        match kind {
            QuantKind::Q8_0 => {
                raw.extend(q.iter().map(|&v| v as i8 as u8));
                w.extend(q.iter().map(|&v| d.to_f64() * v as f64));
            }
            QuantKind::Q4_0 => {
                raw.extend((0..16).map(|j| (q[j] | (q[j + 16] << 4)) as u8));
                w.extend(q.iter().map(|&v| d.to_f64() * (v - 8) as f64));
            }
        }
    }
    (raw, w)
}

struct Rig(Device);

impl std::ops::Deref for Rig {
    type Target = Device;
    fn deref(&self) -> &Device {
        &self.0
    }
}

impl Rig {
    fn new(max_programs: usize, compressed: bool) -> Self {
        Rig(Device::new(
            ReferenceEngine::new(Chip::M4.limits()),
            KernelCache::new(max_programs).compressed(compressed),
        ))
    }

    /// Every weight `(kind, raw, rows)` times `x` (`[k, n]`, token-major like ggml's src1) as one
    /// group (fused when more than one); returns each dst (`[n][rows]`).
    fn run(
        &self,
        ws: &[(QuantKind, &[u8], usize)],
        x: &[f32],
        k: usize,
        n: usize,
    ) -> Vec<Vec<f32>> {
        let mut dsts: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; w.2 * n]).collect();
        let members = ws
            .iter()
            .zip(dsts.iter_mut())
            .map(|(&(kind, raw, rows), d)| {
                let (ty, bs) = match kind {
                    QuantKind::Q8_0 => (GGML_TYPE_Q8_0, 34),
                    QuantKind::Q4_0 => (GGML_TYPE_Q4_0, 18),
                };
                let row = k / 32 * bs;
                let info = TypeInfo {
                    blck_size: 32,
                    type_size: bs,
                    to_float: None,
                };
                Member {
                    src0: unsafe {
                        Operand::of_bytes(
                            TensorDesc {
                                ty,
                                ne: [k as i64, rows as i64, 1, 1],
                                nb: [bs, row, row * rows, row * rows],
                            },
                            raw,
                            &info,
                        )
                    },
                    src0_info: info,
                    dst: unsafe {
                        Operand::of_f32_mut(
                            TensorDesc::contiguous(GGML_TYPE_F32, 4, [rows as i64, n as i64, 1, 1]),
                            d,
                        )
                    },
                }
            })
            .collect();
        let group = Group {
            src1: unsafe {
                Operand::of_f32(
                    TensorDesc::contiguous(GGML_TYPE_F32, 4, [k as i64, n as i64, 1, 1]),
                    x,
                )
            },
            src1_info: F32_INFO,
            members,
            weights: true,
            speculative: 0,
        };
        compute(&self.cx(), &group);
        dsts
    }
}

/// Each output in f64, with the sum of the magnitudes of its terms (the scale of the fp16
/// rounding error of the activations).
fn oracle(w: &[f64], x: &[f32], k: usize, rows: usize, n: usize) -> Vec<(f64, f64)> {
    let mut out = vec![(0.0, 0.0); rows * n];
    for j in 0..n {
        for i in 0..rows {
            let terms = (0..k).map(|kk| w[i * k + kk] * x[j * k + kk] as f64);
            out[j * rows + i] = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
        }
    }
    out
}

/// Within the error of fp16 activations (2^-11 relative per term) and one fp16 output rounding.
fn assert_close(got: &[f32], want: &[(f64, f64)]) {
    for (i, (&g, &(w, mag))) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= mag / 1024.0 + w.abs() / 1024.0 + 1e-6,
            "element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn q8_0_and_q4_0_weights_run_baked_and_match_the_oracle() {
    let (k, rows, n) = (128, 48, 70);
    let x = rand_vec(k * n, 7);
    let rig = Rig::new(8, true);
    for (i, kind) in [QuantKind::Q8_0, QuantKind::Q4_0].into_iter().enumerate() {
        let (raw, w) = blocks(kind, rows, k, 11 + i as u64);
        let want = oracle(&w, &x, k, rows, n);
        for _ in 0..2 {
            let got = rig.run(&[(kind, &raw, rows)], &x, k, n);
            assert_close(&got[0], &want);
        }
    }
    let c = rig.engine.counters();
    assert_eq!(
        (c.compiles, c.evaluations),
        (2, 4),
        "one program per weight and bucket"
    );
    assert_eq!(rig.stats.ops_offloaded.load(Relaxed), 4);
    assert_eq!(rig.stats.cache_hits.load(Relaxed), 2);
    let baked = rig.stats.baked_bytes.load(Relaxed) as usize;
    assert_eq!(
        baked,
        QuantKind::Q8_0.file_bytes(rows, k) + QuantKind::Q4_0.file_bytes(rows, k)
    );
    assert_eq!(
        rig.stats.staged_bytes.load(Relaxed),
        0,
        "nothing staged as fp16"
    );
}

#[test]
fn off_by_default_and_fused_groups_take_the_fp16_path() {
    let (k, rows, n) = (64, 32, 40);
    let x = rand_vec(k * n, 3);
    let (raw, w) = blocks(QuantKind::Q8_0, rows, k, 5);
    let (raw4, w4) = blocks(QuantKind::Q4_0, rows, k, 6);
    for (compressed, fused) in [(false, false), (true, true)] {
        let rig = Rig::new(8, compressed);
        let mut ws = vec![(QuantKind::Q8_0, &raw[..], rows)];
        if fused {
            ws.push((QuantKind::Q4_0, &raw4[..], rows));
        }
        let got = rig.run(&ws, &x, k, n);
        assert_close(&got[0], &oracle(&w, &x, k, rows, n));
        if fused {
            assert_close(&got[1], &oracle(&w4, &x, k, rows, n));
        }
        assert_eq!(rig.stats.baked_bytes.load(Relaxed), 0);
        assert!(rig.stats.staged_bytes.load(Relaxed) > 0);
    }
}

#[test]
fn activations_are_rounded_as_the_cpu_backend_rounds_them() {
    use ane_convert::act_round::ActRound;
    let (k, rows, n) = (64, 32, 40);
    let x = rand_vec(k * n, 3);
    let (raw, w) = blocks(QuantKind::Q8_0, rows, k, 5);
    let mut dev = Device::new(ReferenceEngine::new(Chip::M4.limits()), KernelCache::new(8));
    dev.act_round = true;
    let rig = Rig(dev);
    let got = rig.run(&[(QuantKind::Q8_0, &raw, rows)], &x, k, n);
    // The CPU backend multiplies Q8_0 weights by Q8_0-rounded activations: so does the device.
    let mut xr = x.clone();
    for row in xr.chunks_exact_mut(k) {
        assert!(ActRound::Q8_0.apply(row));
    }
    assert_close(&got[0], &oracle(&w, &xr, k, rows, n));
    // ... and that is not the product with the plain activations.
    let plain = oracle(&w, &x, k, rows, n);
    let off = got[0]
        .iter()
        .zip(&plain)
        .filter(|(g, (w, mag))| (**g as f64 - w).abs() > mag / 1024.0 + w.abs() / 1024.0 + 1e-6)
        .count();
    assert!(off > 0, "no output moved: the activations were not rounded");
}

#[test]
fn baked_programs_share_the_loaded_budget() {
    let (k, rows, n) = (64, 32, 40);
    let x = rand_vec(k * n, 3);
    let rig = Rig::new(2, true);
    let weights: Vec<(Vec<u8>, Vec<f64>)> = (0..4)
        .map(|s| blocks(QuantKind::Q8_0, rows, k, 20 + s))
        .collect();
    for (raw, w) in &weights {
        let got = rig.run(&[(QuantKind::Q8_0, raw, rows)], &x, k, n);
        assert_close(&got[0], &oracle(w, &x, k, rows, n));
        assert!(rig.cache.lock().unwrap().len() <= 2);
    }
    let c = rig.engine.counters();
    assert_eq!((c.compiles, c.loaded, c.loaded_peak), (4, 2, 2));
    assert_eq!(
        rig.stats.baked_bytes.load(Relaxed) as usize,
        2 * QuantKind::Q8_0.file_bytes(rows, k),
        "evicted programs release their bytes"
    );
    // Clearing unloads baked programs and releases their bytes.
    let mut cache = rig.cache.lock().unwrap();
    cache.clear(&rig.engine);
    assert_eq!(cache.baked_bytes, 0);
}
