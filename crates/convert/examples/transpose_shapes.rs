//! Activation/output transform speed at 64 MiB for several token counts (diagnostics):
//! `cargo run --release -p ane-convert --example transpose_shapes [--hugepages]`.

use std::time::Instant;

use ane_convert::{act_f32_to_f16_transposed, out_f16_to_f32_transposed};
use half::f16;

fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let elems = 16 << 20;
    let mut src = vec![0f32; elems];
    let mut h = vec![f16::ZERO; elems];
    let mut o = vec![0f32; elems];
    let t = best(|| o.copy_from_slice(&src));
    println!(
        "memcpy 64 MiB: {:.1} GB/s",
        2.0 * 4.0 * elems as f64 / t / 1e9
    );
    for n in [64usize, 512, 2048, 4096, 16384] {
        let k = elems / n;
        src.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        let ta = best(|| act_f32_to_f16_transposed(&src, n, k, k, &mut h, n).unwrap());
        let to = best(|| out_f16_to_f32_transposed(&h, k, n, n, &mut o, k).unwrap());
        let gb = 6.0 * elems as f64 / 1e9;
        println!(
            "N={n:>5} K={k:>6}: act {:.1} GB/s, out {:.1} GB/s",
            gb / ta,
            gb / to
        );
    }
}
