//! Bit-exactness against the real thing: every natively converted type, compared with
//! libggml-base's `to_float` followed by `half::f16::from_f32` (round to nearest-even), on blocks
//! made by `ggml_quantize_chunk`, on random raw blocks with edge-value scales, and on every F16/BF16
//! bit pattern and F32 edge values.
//!
//! These tests need libggml-base from the llama.cpp build (`cargo xtask llama`), so they run only
//! with `ANE_GGML_TESTS=1`, which `cargo xtask test` sets after building llama.cpp. With the
//! variable set and the library missing they FAIL, saying how to build it. Without the variable
//! they print that they were not run and pass, so `cargo test --workspace` works on a fresh clone.

use std::sync::OnceLock;

use ane_convert::ggml::GgmlBase;
use ane_convert::types::{self, *};
use ane_convert::{block_layout, row_to_f16, row_to_f16_with, Backend};
use half::f16;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn ggml() -> Option<&'static GgmlBase> {
    if std::env::var("ANE_GGML_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "NOT RUN: the libggml-base comparison needs ANE_GGML_TESTS=1 (`cargo xtask test` sets it)"
        );
        return None;
    }
    static G: OnceLock<GgmlBase> = OnceLock::new();
    Some(G.get_or_init(|| {
        GgmlBase::open_default().unwrap_or_else(|e| {
            panic!(
                "ANE_GGML_TESTS=1 but libggml-base cannot be loaded: {e} (run `cargo xtask llama`)"
            )
        })
    }))
}

/// The quantized types this crate converts natively.
const QUANTS: [i32; 12] = [
    GGML_TYPE_Q4_0,
    GGML_TYPE_Q4_1,
    GGML_TYPE_Q5_0,
    GGML_TYPE_Q5_1,
    GGML_TYPE_Q8_0,
    GGML_TYPE_Q2_K,
    GGML_TYPE_Q3_K,
    GGML_TYPE_Q4_K,
    GGML_TYPE_Q5_K,
    GGML_TYPE_Q6_K,
    GGML_TYPE_IQ4_NL,
    GGML_TYPE_IQ4_XS,
];

fn name(ty: i32) -> &'static str {
    types::SUPPORTED
        .iter()
        .find(|t| t.0 == ty)
        .map(|t| t.1)
        .unwrap_or("?")
}

/// ggml's answer: `to_float` (F32 has none: the values themselves), then `f16::from_f32`.
/// Also checks that ggml's own `ggml_fp32_to_fp16_row` rounds the same way (NaN aside).
fn reference(g: &GgmlBase, ty: i32, src: &[u8], n: usize) -> Vec<f16> {
    let mut f = vec![0f32; n];
    if ty == GGML_TYPE_F32 {
        for (v, b) in f.iter_mut().zip(src.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    } else {
        g.to_float(ty, src, &mut f).unwrap();
    }
    let want: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
    let mut theirs = vec![f16::ZERO; n];
    g.fp32_to_fp16_row(&f, &mut theirs).unwrap();
    for (i, (a, b)) in want.iter().zip(&theirs).enumerate() {
        assert!(
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            "ggml_fp32_to_fp16_row disagrees with round-to-nearest-even at {i}: {:e}",
            f[i]
        );
    }
    want
}

/// Converts with every backend and compares with ggml; returns the number of values compared.
fn check(g: &GgmlBase, ty: i32, src: &[u8], n: usize, what: &str) -> usize {
    let want = reference(g, ty, src, n);
    let mut got = vec![f16::ZERO; n];
    for b in Backend::available() {
        row_to_f16_with(b, ty, src, &mut got).unwrap();
        for (i, (a, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan()),
                "{} ({what}, {b:?}) element {i}: ours {:#06x} ({}), ggml {:#06x} ({})",
                name(ty),
                a.to_bits(),
                a,
                w.to_bits(),
                w
            );
        }
    }
    n
}

/// xorshift64 for reproducible data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.unit()).sum::<f32>() - 2.0
    }
}

/// Weight rows as ggml quantizes them, in many value ranges: normal, with outliers, tiny (fp16
/// subnormal scales), huge (near fp16 max), all zero, constant, all negative.
#[test]
fn quantized_by_ggml() {
    let Some(g) = ggml() else { return };
    let n_per_row = 1024;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut total = 0;
    for &ty in &QUANTS {
        let (qk, _) = block_layout(ty).unwrap();
        let mut values = 0;
        for dist in 0..8 {
            let rows = 8;
            let data: Vec<f32> = (0..rows * n_per_row)
                .map(|i| match dist {
                    0 => rng.normal(),
                    1 => rng.normal() * if i % 97 == 0 { 50.0 } else { 0.02 },
                    2 => rng.normal() * 1e-6,
                    3 => rng.normal() * 2e4,
                    4 => 0.0,
                    5 => 0.125,
                    6 => -rng.unit() * 3.0,
                    _ => rng.normal() * 10f32.powi((i / 256 % 9) as i32 - 6),
                })
                .collect();
            let q = g.quantize(ty, &data, n_per_row).unwrap();
            values += check(g, ty, &q, data.len(), &format!("distribution {dist}"));
        }
        eprintln!(
            "{:<7} quantized by ggml: {:>6} blocks, {:>7} values bit-identical",
            name(ty),
            values / qk,
            values
        );
        total += values;
    }
    eprintln!("quantized_by_ggml: {total} values in total");
}

/// Byte offsets of the fp16 fields of one block: (scale, optional min/dmin).
fn half_fields(ty: i32) -> (usize, Option<usize>) {
    match ty {
        GGML_TYPE_Q4_1 | GGML_TYPE_Q5_1 | GGML_TYPE_Q4_K | GGML_TYPE_Q5_K => (0, Some(2)),
        GGML_TYPE_Q2_K => (80, Some(82)),
        GGML_TYPE_Q3_K => (108, None),
        GGML_TYPE_Q6_K => (208, None),
        _ => (0, None),
    }
}

/// fp16 scales at the edges: zeros, the extremes of the normal and subnormal ranges, 1.0,
/// infinities and NaN.
const EDGE_SCALES: [u16; 14] = [
    0x0000, 0x8000, // +-0
    0x7BFF, 0xFBFF, // +-max finite (65504)
    0x0001, 0x8001, // +-smallest subnormal
    0x03FF, 0x83FF, // +-largest subnormal
    0x0400, 0x8400, // +-smallest normal
    0x3C00, // 1.0
    0x7C00, 0xFC00, // +-inf
    0x7E00, // NaN
];

/// Every pair of edge scales (scale x min) on random quants, for every quant type.
#[test]
fn edge_scales() {
    let Some(g) = ggml() else { return };
    let mut rng = Rng(42);
    for &ty in &QUANTS {
        let (qk, bs) = block_layout(ty).unwrap();
        let (d_off, m_off) = half_fields(ty);
        let mins: Vec<Option<u16>> = match m_off {
            Some(_) => EDGE_SCALES.iter().map(|&m| Some(m)).collect(),
            None => vec![None],
        };
        let mut blocks = 0;
        for &d in &EDGE_SCALES {
            for m in &mins {
                let nb = 4;
                let mut src: Vec<u8> = (0..nb * bs).map(|_| rng.next() as u8).collect();
                for b in src.chunks_exact_mut(bs) {
                    b[d_off..d_off + 2].copy_from_slice(&d.to_le_bytes());
                    if let (Some(o), Some(m)) = (m_off, m) {
                        b[o..o + 2].copy_from_slice(&m.to_le_bytes());
                    }
                }
                check(g, ty, &src, nb * qk, &format!("d={d:#06x} m={m:?}"));
                blocks += nb;
            }
        }
        eprintln!(
            "{:<7} edge scales: {blocks:>5} blocks, {:>7} values bit-identical",
            name(ty),
            blocks * qk
        );
    }
}

fn edge_or_random_scale() -> impl Strategy<Value = u16> {
    prop_oneof![
        prop::sample::select(EDGE_SCALES.to_vec()),
        any::<u16>(),
        // Normal magnitudes a real model has.
        (0x1000u16..0x4C00, any::<bool>()).prop_map(|(h, s)| h | if s { 0x8000 } else { 0 }),
    ]
}

/// Random raw blocks (every bit of the quants, scales and sub-scales random) with the fp16
/// scale fields forced to chosen values: 3000 property cases of 1-3 blocks.
#[test]
fn random_raw_blocks() {
    let Some(g) = ggml() else { return };
    let config = ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let blocks = std::cell::Cell::new(0usize);
    let strategy = (
        prop::sample::select(QUANTS.to_vec()),
        1usize..4,
        any::<u64>(),
        edge_or_random_scale(),
        edge_or_random_scale(),
    );
    TestRunner::new(config)
        .run(&strategy, |(ty, nb, seed, d, m)| {
            let (qk, bs) = block_layout(ty).unwrap();
            let (d_off, m_off) = half_fields(ty);
            let mut rng = Rng(seed | 1);
            let mut src: Vec<u8> = (0..nb * bs).map(|_| rng.next() as u8).collect();
            for b in src.chunks_exact_mut(bs) {
                b[d_off..d_off + 2].copy_from_slice(&d.to_le_bytes());
                if let Some(o) = m_off {
                    b[o..o + 2].copy_from_slice(&m.to_le_bytes());
                }
            }
            check(
                g,
                ty,
                &src,
                nb * qk,
                &format!("random raw block d={d:#06x} m={m:#06x}"),
            );
            blocks.set(blocks.get() + nb);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "random raw blocks: 3000 cases, {} blocks bit-identical",
        blocks.get()
    );
}

/// Every fp16 bit pattern (subnormals, infinities, NaNs included).
#[test]
fn f16_all_patterns() {
    let Some(g) = ggml() else { return };
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let n = check(g, GGML_TYPE_F16, &src, 65536, "all patterns");
    eprintln!("f16     all patterns: {n} values bit-identical");
}

/// Every bf16 bit pattern.
#[test]
fn bf16_all_patterns() {
    let Some(g) = ggml() else { return };
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let n = check(g, GGML_TYPE_BF16, &src, 65536, "all patterns");
    eprintln!("bf16    all patterns: {n} values bit-identical");
}

/// F32 sources: every fp16 value and the f32 values just around each rounding boundary
/// (midpoints and one ulp either side), f32 subnormals, infinities, NaNs, plus random bit
/// patterns.
#[test]
fn f32_edges_and_random() {
    let Some(g) = ggml() else { return };
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::from_bits(0x007F_FFFF),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::MAX,
        f32::MIN,
        65504.0,
        65519.996,
        65520.0,
        -65520.0,
    ];
    for h in 0..0x7C00u16 {
        let x = f16::from_bits(h).to_f32();
        let next = f16::from_bits(h + 1).to_f32();
        let mid = (x as f64 + next as f64) / 2.0;
        let mid = mid as f32; // exact: fp16 midpoints fit in f32
        for v in [
            x,
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            vals.push(v);
            vals.push(-v);
        }
    }
    let mut rng = Rng(7);
    vals.extend((0..1 << 20).map(|_| f32::from_bits(rng.next() as u32)));
    let n = vals.len() & !7;
    let src: Vec<u8> = vals[..n].iter().flat_map(|v| v.to_le_bytes()).collect();
    let count = check(g, GGML_TYPE_F32, &src, n, "edges and random");
    // And a ragged length (tail path).
    check(g, GGML_TYPE_F32, &src[..4 * 13], 13, "ragged");
    eprintln!("f32     edges + random: {count} values bit-identical");
}

/// The crate's list of block geometries matches ggml's traits table.
#[test]
fn block_layouts_match_ggml() {
    let Some(g) = ggml() else { return };
    for &(ty, nm) in types::SUPPORTED.iter() {
        let t = g.traits(ty).unwrap();
        assert_eq!(t.name, nm);
        assert_eq!(block_layout(ty), Some((t.blck_size, t.type_size)), "{nm}");
        assert_eq!(t.has_to_float, ty != GGML_TYPE_F32, "{nm}");
    }
    // The default backend is one of those compared above.
    let mut out = [f16::ZERO; 32];
    row_to_f16(GGML_TYPE_Q8_0, &[0u8; 34], &mut out).unwrap();
}

/// `from_float` of ggml-cpu's `vec_dot_type`s, from the libggml-cpu beside libggml-base: the
/// quantizer the CPU backend runs on activations, which `ane_convert::act_round` reproduces.
/// ggml-cpu's `from_float` of a type.
type FromFloat = unsafe extern "C" fn(*const f32, *mut u8, i64);

fn cpu_from_float() -> Option<(libloading::Library, Vec<(i32, FromFloat)>)> {
    let base = ggml()?.path().to_path_buf();
    let name = if cfg!(target_vendor = "apple") {
        "libggml-cpu.dylib"
    } else {
        "libggml-cpu.so"
    };
    let path = base.with_file_name(name);
    // SAFETY: loading libggml-cpu runs its static initializers only.
    let lib = unsafe { libloading::Library::new(&path) }.unwrap_or_else(|e| {
        panic!(
            "ANE_GGML_TESTS=1 but {} cannot be loaded: {e}",
            path.display()
        )
    });
    // `struct ggml_type_traits_cpu` starts with `ggml_from_float_t from_float`.
    type Traits =
        unsafe extern "C" fn(i32) -> *const Option<unsafe extern "C" fn(*const f32, *mut u8, i64)>;
    // SAFETY: the prototypes of ggml-cpu.h.
    let fns = unsafe {
        if let Ok(init) = lib.get::<unsafe extern "C" fn()>(b"ggml_cpu_init\0") {
            init();
        }
        let traits: Traits = *lib.get(b"ggml_get_type_traits_cpu\0").unwrap();
        [GGML_TYPE_Q8_0, 9, 15]
            .iter()
            .map(|&ty| (ty, (*traits(ty)).expect("from_float")))
            .collect()
    };
    Some((lib, fns))
}

#[test]
fn activation_rounding_matches_the_cpu_backends_quantizers_byte_for_byte() {
    use ane_convert::act_round::ActRound;
    let Some((_lib, fns)) = cpu_from_float() else {
        return;
    };
    for (ty, from_float) in fns {
        let mode = match ty {
            GGML_TYPE_Q8_0 => ActRound::Q8_0,
            9 => ActRound::Q8_1,
            _ => ActRound::Q8K,
        };
        for seed in 0..40u64 {
            // Rows of 512 with magnitudes from 1e-3 to 1e3, a zero block, and a spike.
            let scale = 10f32.powi((seed % 7) as i32 - 3);
            let mut row: Vec<f32> = (0..512)
                .map(|i| {
                    let h = (i as u64 * 2654435761 + seed * 40503) % 100_003;
                    (h as f32 / 50_001.5 - 1.0) * scale
                })
                .collect();
            if seed % 5 == 0 {
                row[..256].fill(0.0);
            }
            if seed % 3 == 0 {
                row[300] = 40.0 * scale;
            }
            let ours = mode.quantize(&row);
            let mut theirs = vec![0u8; ours.len()];
            // SAFETY: `theirs` holds 512 values of the quantized type.
            unsafe { from_float(row.as_ptr(), theirs.as_mut_ptr(), 512) };
            assert_eq!(ours, theirs, "{mode:?} seed {seed}");
        }
    }
}
