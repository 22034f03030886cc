//! Criterion benches of the host conversions at an in-cache size (1 MiB) and a DRAM size (64 MiB
//! of f32 / fp16 output). `cargo bench -p ane-convert`; `ane bench host` gives the one-table view.

use std::hint::black_box;

use ane_convert::{
    act_f32_to_f16_transposed, block_layout, f16_to_f32, f32_to_f16, out_f16_to_f32_transposed,
    row_to_f16, types,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;

const SIZES: [usize; 2] = [1 << 20, 64 << 20];

fn activations(c: &mut Criterion) {
    let mut g = c.benchmark_group("act_channels_f32_to_f16");
    g.sample_size(10);
    for bytes in SIZES {
        let k = 4096;
        let n = bytes / 4 / k;
        let src: Vec<f32> = (0..n * k).map(|i| (i % 1000) as f32 * 0.01).collect();
        let mut dst = vec![f16::ZERO; n * k];
        g.throughput(Throughput::Bytes((n * k * 6) as u64));
        g.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter(|| act_f32_to_f16_transposed(black_box(&src), n, k, k, &mut dst, n).unwrap())
        });
    }
    g.finish();
}

fn outputs(c: &mut Criterion) {
    let mut g = c.benchmark_group("out_channels_f16_to_f32");
    g.sample_size(10);
    for bytes in SIZES {
        let m = 4096;
        let n = bytes / 4 / m;
        let src: Vec<f16> = (0..n * m)
            .map(|i| f16::from_f32((i % 1000) as f32))
            .collect();
        let mut dst = vec![0f32; n * m];
        g.throughput(Throughput::Bytes((n * m * 6) as u64));
        g.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter(|| out_f16_to_f32_transposed(black_box(&src), m, n, n, &mut dst, m).unwrap())
        });
    }
    g.finish();
}

fn weights(c: &mut Criterion) {
    let mut g = c.benchmark_group("weights_to_f16");
    g.sample_size(10);
    for &(ty, name) in types::SUPPORTED.iter() {
        let (qk, bs) = block_layout(ty).unwrap();
        // 1 MiB of fp16 output: in-cache speed of the decoder itself.
        let n = 512 * 1024;
        let mut src: Vec<u8> = (0..n / qk * bs).map(|i| (i * 37 % 251) as u8).collect();
        if ty == types::GGML_TYPE_F32 {
            for (i, b) in src.chunks_exact_mut(4).enumerate() {
                b.copy_from_slice(&(i as f32 * 0.001).to_le_bytes());
            }
        }
        let mut dst = vec![f16::ZERO; n];
        g.throughput(Throughput::Bytes((src.len() + n * 2) as u64));
        g.bench_function(name, |b| {
            b.iter(|| row_to_f16(ty, black_box(&src), &mut dst).unwrap())
        });
    }
    g.finish();
}

/// The default token-major layout: activations and outputs are row conversions.
fn token_major(c: &mut Criterion) {
    for bytes in SIZES {
        let n = bytes / 4;
        let src: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.01).collect();
        let mut h = vec![f16::ZERO; n];
        let mut g = c.benchmark_group("act_f32_to_f16");
        g.sample_size(10)
            .throughput(Throughput::Bytes((n * 6) as u64));
        g.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter(|| f32_to_f16(black_box(&src), &mut h).unwrap())
        });
        g.finish();
        let mut out = vec![0f32; n];
        let mut g = c.benchmark_group("out_f16_to_f32");
        g.sample_size(10)
            .throughput(Throughput::Bytes((n * 6) as u64));
        g.bench_function(BenchmarkId::from_parameter(bytes), |b| {
            b.iter(|| f16_to_f32(black_box(&h), &mut out).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, token_major, activations, outputs, weights);
criterion_main!(benches);
