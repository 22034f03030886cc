//! The host conversion benchmark behind `ane bench host`: every conversion at one buffer size,
//! against memcpy and against ggml's own path, measured in one process.
//!
//! Definitions (per row):
//! - `bytes`: size of the larger buffer of the conversion: the f32 side for activations and
//!   outputs, the fp16 destination for weights (the f32 source for F32 weights), either side of
//!   the fp16 transpose (`transpose_f16`: a square matrix, 4096 x 4096 = 32 MiB when `bytes` is
//!   64 MiB).
//! - `gbps`: bytes read plus bytes written, divided by the best time of several runs, in GB/s (1e9).
//! - `ratio_to_memcpy`: `gbps` over memcpy's (`copy_from_slice` of `bytes` bytes, which reads and
//!   writes `bytes` each), measured first in the same run: 1.0 means as fast as memory allows.
//! - `speedup_vs_ggml`: ggml's time over ours for the same data, `None` without libggml-base. The
//!   ggml path is what the plugin did before this crate: `to_float` into an f32 buffer (one
//!   4096-element row at a time, so it stays in cache), then `ggml_fp32_to_fp16_row`; for
//!   activations and outputs it is `ggml_fp32_to_fp16_row` / `ggml_fp16_to_fp32_row` on the
//!   contiguous buffer, without the layout transform we do in the same pass.

use std::hint::black_box;
use std::time::Instant;

use half::f16;

use crate::ggml::GgmlBase;
use crate::types::{self, GGML_TYPE_F32};
use crate::{
    act_f32_to_f16_transposed, block_layout, out_f16_to_f32_transposed, row_to_f16, transpose_f16,
};

/// One row of the host benchmark (see the module doc for the definitions).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HostBenchRow {
    /// `memcpy`; `act_f32_to_f16` and `out_f16_to_f32` (the plugin's default token-major layout: row
    /// conversions); `act_channels_*` and `out_channels_*` (channel-first, `GGML_ANE_LAYOUT=channels`:
    /// with the transpose; also at plugin-sized shapes); `transpose_f16` (weight staging); or a
    /// ggml type name (`q4_K`).
    pub name: String,
    /// Size of the larger buffer, bytes.
    pub bytes: usize,
    /// Bytes read + written per second, 1e9.
    pub gbps: f64,
    /// `gbps` / memcpy's `gbps`.
    pub ratio_to_memcpy: f64,
    /// ggml's time / ours; `None` when libggml-base was not given.
    pub speedup_vs_ggml: Option<f64>,
}

/// Elements per weight row in the benchmark (a typical hidden size; every block size divides it).
const ROW: usize = 4096;

/// Best wall time of `f` in seconds: one warm-up run, then at least 5 runs and 0.3 s.
fn best_time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 5 || (start.elapsed().as_secs_f64() < 0.3 && runs < 10_000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

/// Deterministic pseudo-random fill (xorshift), so runs compare the same data.
fn fill_bytes(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn fill_f32(buf: &mut [f32], seed: u64) {
    let mut x = seed | 1;
    for v in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0;
    }
}

/// Byte offsets of the fp16 scale fields in one block, so random blocks decode to finite values.
fn scale_offsets(ty: i32) -> &'static [usize] {
    match ty {
        types::GGML_TYPE_Q4_0
        | types::GGML_TYPE_Q5_0
        | types::GGML_TYPE_Q8_0
        | types::GGML_TYPE_IQ4_NL
        | types::GGML_TYPE_IQ4_XS => &[0],
        types::GGML_TYPE_Q4_1
        | types::GGML_TYPE_Q5_1
        | types::GGML_TYPE_Q4_K
        | types::GGML_TYPE_Q5_K => &[0, 2],
        types::GGML_TYPE_Q2_K => &[80, 82],
        types::GGML_TYPE_Q3_K => &[108],
        types::GGML_TYPE_Q6_K => &[208],
        _ => &[],
    }
}

/// Random weights of `ty`, `n` elements: random quants, small finite scales; random finite
/// floats for F32/F16/BF16.
fn weight_data(ty: i32, n: usize) -> Vec<u8> {
    let (qk, bs) = block_layout(ty).expect("supported type");
    let mut buf = vec![0u8; n / qk * bs];
    match ty {
        GGML_TYPE_F32 => {
            let mut f = vec![0f32; n];
            fill_f32(&mut f, 7);
            for (b, v) in buf.chunks_exact_mut(4).zip(&f) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        types::GGML_TYPE_F16 | types::GGML_TYPE_BF16 => {
            fill_bytes(&mut buf, 7);
            // Clear the top exponent bit: finite values only.
            for b in buf.chunks_exact_mut(2) {
                b[1] &= 0xBF;
            }
        }
        _ => {
            fill_bytes(&mut buf, 7);
            let scale = f16::from_f32(0.01).to_le_bytes();
            for block in buf.chunks_exact_mut(bs) {
                for &o in scale_offsets(ty) {
                    block[o..o + 2].copy_from_slice(&scale);
                }
            }
        }
    }
    buf
}

/// Alignment in bytes of the engine-surface side of the transforms in the plugin (surfaces are
/// allocated 128-byte aligned; IOSurfaces page aligned).
const SURFACE_ALIGN: usize = 128;

/// `len` elements of `buf` from its first 128-byte boundary: the side of a transform that is an
/// engine surface is measured as aligned as it is in the plugin; the ggml side stays as allocated.
fn surface_side<T>(buf: &mut [T], len: usize) -> &mut [T] {
    let off = buf.as_ptr().align_offset(SURFACE_ALIGN);
    &mut buf[off..off + len]
}

/// Times the channel-first activation transform of `n` tokens x `k` channels, the destination
/// aligned as a surface; returns the source too (for the ggml comparison) and the best time.
fn time_act(n: usize, k: usize) -> (Vec<f32>, f64) {
    let mut src = vec![0f32; n * k];
    fill_f32(&mut src, 3);
    let mut dst_buf = vec![f16::ZERO; n * k + SURFACE_ALIGN];
    let dst = surface_side(&mut dst_buf, n * k);
    let t = best_time(|| {
        act_f32_to_f16_transposed(black_box(&src), n, k, k, dst, n).expect("shape");
        black_box(&mut *dst);
    });
    (src, t)
}

/// Times the channel-first output transform of `m` channels x `n` tokens, the source aligned as
/// a surface; returns the source values too (for the ggml comparison) and the best time.
fn time_out(m: usize, n: usize) -> (Vec<f16>, f64) {
    let mut raw = vec![0u8; n * m * 2];
    fill_bytes(&mut raw, 5);
    let mut src_buf = vec![f16::ZERO; n * m + SURFACE_ALIGN];
    let src = surface_side(&mut src_buf, n * m);
    for (d, b) in src.iter_mut().zip(raw.chunks_exact(2)) {
        *d = f16::from_bits(u16::from_le_bytes([b[0], b[1] & 0xBF]));
    }
    let src = &*src;
    let mut dst = vec![0f32; n * m];
    let t = best_time(|| {
        out_f16_to_f32_transposed(black_box(src), m, n, n, &mut dst, m).expect("shape");
        black_box(&mut dst);
    });
    (src.to_vec(), t)
}

/// Runs the host benchmark at `bytes` per buffer (use 64 MiB or more for DRAM-bound numbers) and
/// returns one row for memcpy, activations, outputs and every natively converted weight type.
/// With `ggml`, each row also compares against ggml's path in the same process.
///
/// # Panics
/// On allocation failure only; the conversions are called with valid shapes.
pub fn bench_host(bytes: usize, ggml: Option<&GgmlBase>) -> Vec<HostBenchRow> {
    let bytes = bytes.max(64 * 1024);
    let mut rows = Vec::new();

    // memcpy of `bytes`: reads and writes `bytes`.
    let memcpy_gbps = {
        let mut src = vec![0u8; bytes];
        fill_bytes(&mut src, 1);
        let mut dst = vec![0u8; bytes];
        let t = best_time(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        });
        2.0 * bytes as f64 / t / 1e9
    };
    rows.push(HostBenchRow {
        name: "memcpy".into(),
        bytes,
        gbps: memcpy_gbps,
        ratio_to_memcpy: 1.0,
        speedup_vs_ggml: None,
    });
    let mut push = |name: &str, size: usize, traffic: usize, ours: f64, theirs: Option<f64>| {
        let gbps = traffic as f64 / ours / 1e9;
        rows.push(HostBenchRow {
            name: name.to_string(),
            bytes: size,
            gbps,
            ratio_to_memcpy: gbps / memcpy_gbps,
            speedup_vs_ggml: theirs.map(|t| t / ours),
        });
    };

    // Channel-first activations: N tokens x K channels of f32 -> [K][N] fp16.
    {
        let elems = bytes / 4;
        let k = if elems >= ROW * 64 { ROW } else { 256 };
        let n = ((elems / k) & !7).max(8);
        let (src, ours) = time_act(n, k);
        let mut dst = vec![f16::ZERO; n * k];
        let theirs = ggml.map(|g| {
            best_time(|| {
                g.fp32_to_fp16_row(black_box(&src), &mut dst).expect("len");
                black_box(&mut dst);
            })
        });
        let name = "act_channels_f32_to_f16";
        push(name, n * k * 4, n * k * 6, ours, theirs);
    }

    // Channel-first outputs: [M][N] fp16 -> N tokens x M channels of f32.
    {
        let elems = bytes / 4;
        let m = if elems >= ROW * 64 { ROW } else { 256 };
        let n = ((elems / m) & !7).max(8);
        let (src, ours) = time_out(m, n);
        let mut dst = vec![0f32; n * m];
        let theirs = ggml.map(|g| {
            best_time(|| {
                g.fp16_to_fp32_row(black_box(&src), &mut dst).expect("len");
                black_box(&mut dst);
            })
        });
        let name = "out_channels_f16_to_f32";
        push(name, n * m * 4, n * m * 6, ours, theirs);
    }

    // Plugin-like shapes (reported, not the target: 8-28 MiB may sit in a large L3):
    // activations of 512 tokens x 4096 channels, outputs of 14336 channels x 512 tokens.
    {
        let (n, k) = (512, 4096);
        let ours = time_act(n, k).1;
        push("act_channels_n512_k4096", n * k * 4, n * k * 6, ours, None);
        let (m, n) = (14336, 512);
        let ours = time_out(m, n).1;
        push("out_channels_m14336_n512", n * m * 4, n * m * 6, ours, None);
    }

    // The default token-major program layout needs no transpose: activations and outputs are
    // plain row conversions.
    {
        let elems = bytes / 4;
        let mut src = vec![0f32; elems];
        fill_f32(&mut src, 7);
        let mut dst = vec![f16::ZERO; elems];
        let ours = best_time(|| {
            crate::f32_to_f16(black_box(&src), &mut dst).expect("len");
            black_box(&mut dst);
        });
        let theirs = ggml.map(|g| {
            best_time(|| {
                g.fp32_to_fp16_row(black_box(&src), &mut dst).expect("len");
                black_box(&mut dst);
            })
        });
        push("act_f32_to_f16", elems * 4, elems * 6, ours, theirs);
        let src16 = dst.clone();
        let mut out = vec![0f32; elems];
        let ours = best_time(|| {
            crate::f16_to_f32(black_box(&src16), &mut out).expect("len");
            black_box(&mut out);
        });
        let theirs = ggml.map(|g| {
            best_time(|| {
                g.fp16_to_fp32_row(black_box(&src16), &mut out)
                    .expect("len");
                black_box(&mut out);
            })
        });
        push("out_f16_to_f32", elems * 4, elems * 6, ours, theirs);
    }

    // fp16 transpose (staging transposed weights): the largest power-of-two square of fp16 in
    // half of `bytes` (4096 x 4096, 32 MiB, at the default 64 MiB), so both strides are the
    // power of two that makes transposes slow. Traffic is both sides, like memcpy's.
    {
        let side = 1usize << ((bytes / 4).ilog2() / 2);
        let mut raw = vec![0u8; side * side * 2];
        fill_bytes(&mut raw, 9);
        let src: Vec<f16> = raw
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        let mut dst_buf = vec![f16::ZERO; side * side + SURFACE_ALIGN];
        let dst = surface_side(&mut dst_buf, side * side);
        let ours = best_time(|| {
            transpose_f16(black_box(&src), side, side, side, dst, side).expect("shape");
            black_box(&mut *dst);
        });
        push(
            "transpose_f16",
            side * side * 2,
            side * side * 4,
            ours,
            None,
        );
    }

    // Weights: rows of ROW elements to fp16; `bytes` of fp16 output.
    for &(ty, name) in types::SUPPORTED.iter() {
        let (qk, bs) = block_layout(ty).expect("supported");
        let n = ((bytes / 2) / ROW).max(1) * ROW;
        let row_bytes = ROW / qk * bs;
        let src = weight_data(ty, n);
        let mut dst = vec![f16::ZERO; n];
        let ours = best_time(|| {
            for (s, d) in src.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(ROW)) {
                row_to_f16(ty, black_box(s), d).expect("row");
            }
            black_box(&mut dst);
        });
        let theirs = ggml.map(|g| {
            if ty == GGML_TYPE_F32 {
                let f: Vec<f32> = src
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                best_time(|| {
                    g.fp32_to_fp16_row(black_box(&f), &mut dst).expect("len");
                    black_box(&mut dst);
                })
            } else {
                let mut tmp = vec![0f32; ROW];
                best_time(|| {
                    for (s, d) in src.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(ROW)) {
                        g.to_float(ty, black_box(s), &mut tmp).expect("row");
                        g.fp32_to_fp16_row(&tmp, d).expect("len");
                    }
                    black_box(&mut dst);
                })
            }
        });
        let size = (n * 2).max(src.len());
        push(name, size, src.len() + n * 2, ours, theirs);
    }
    rows
}
