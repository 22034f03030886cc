//! Throughput of `ActRound::apply` (activation rounding as the CPU backend does it) against a
//! plain f32 -> fp16 conversion of the same rows: `cargo run --release -p ane-convert --example
//! act_round_speed`.
use std::time::Instant;

use ane_convert::act_round::ActRound;

fn main() {
    let (n, k) = (512usize, 4096usize);
    let src: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.01)
        .collect();
    let mut out = vec![half::f16::ZERO; n * k];
    let t = Instant::now();
    ane_convert::f32_to_f16(&src, &mut out).unwrap();
    let base = t.elapsed().as_secs_f64() * 1e3;
    println!("f32 -> fp16 of {n}x{k}: {base:.2} ms");
    for mode in [ActRound::Q8_0, ActRound::Q8K, ActRound::Bf16] {
        let mut rows = src.clone();
        let t = Instant::now();
        for r in rows.chunks_exact_mut(k) {
            mode.apply(r);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "{mode:?} rounding of {n}x{k}: {ms:.2} ms ({:.1}x the fp16 conversion)",
            ms / base
        );
    }
}
