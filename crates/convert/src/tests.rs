//! Unit tests that need no llama.cpp: every backend equals the scalar one bit for bit, the layout
//! transforms put every element where the naive loop does, errors on bad shapes. The comparison
//! with ggml itself is in `tests/ggml_base.rs`.

use half::f16;
use proptest::prelude::*;

use super::*;

fn bits(v: &[f16]) -> Vec<u16> {
    v.iter().map(|h| h.to_bits()).collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Any f32 bit pattern, biased towards the interesting ranges of fp16.
fn any_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<u32>().prop_map(f32::from_bits),
        (-70000.0f32..70000.0),
        (-1e-4f32..1e-4),
        // Exactly between two fp16 values, or one f32 ulp either side of it.
        (any::<u16>(), -1i32..=1).prop_map(|(h, d)| {
            let x = f16::from_bits(h & 0x7BFF).to_f32();
            let half_ulp = f32::from_bits((x.to_bits() & 0x7F80_0000).max(0x3380_0000)) / 2048.0;
            f32::from_bits(((x + half_ulp).to_bits() as i32 + d) as u32)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn narrow_backends_agree(v in prop::collection::vec(any_f32(), 0..300)) {
        let want: Vec<u16> = v.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        for b in Backend::available() {
            let mut out = vec![f16::ZERO; v.len()];
            f32_to_f16_with(b, &v, &mut out).unwrap();
            // half's from_f32 keeps NaN payload bits the hardware may not: compare NaN as NaN.
            for (i, (&g, &w)) in bits(&out).iter().zip(&want).enumerate() {
                let both_nan = f16::from_bits(g).is_nan() && f16::from_bits(w).is_nan();
                prop_assert!(g == w || both_nan, "{b:?} at {i}: {:#06x} vs {:#06x} for {:e}", g, w, v[i]);
            }
        }
    }

    #[test]
    fn widen_backends_agree(v in prop::collection::vec(any::<u16>(), 0..300)) {
        let src: Vec<f16> = v.iter().map(|&h| f16::from_bits(h)).collect();
        let want: Vec<f32> = src.iter().map(|h| h.to_f32()).collect();
        for b in Backend::available() {
            let mut out = vec![0f32; v.len()];
            f16_to_f32_with(b, &src, &mut out).unwrap();
            for (g, w) in out.iter().zip(&want) {
                prop_assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
            }
        }
    }

    #[test]
    fn act_layout(n in 1usize..40, k in 1usize..40, extra in 0usize..5, pad in 0usize..9, seed in any::<u64>()) {
        let stride = k + extra;
        let np = n + pad;
        let src: Vec<f32> = (0..(n - 1) * stride + k)
            .map(|i| ((i as u64).wrapping_mul(seed | 1) % 20011) as f32 * 0.37 - 3000.0)
            .collect();
        let mut want = vec![0u16; k * np];
        for i in 0..n {
            for c in 0..k {
                want[c * np + i] = f16::from_f32(src[i * stride + c]).to_bits();
            }
        }
        for b in Backend::available() {
            let mut dst = vec![f16::from_bits(0x7C01); k * np + 3];
            act_f32_to_f16_transposed_with(b, &src, n, k, stride, &mut dst, np).unwrap();
            prop_assert_eq!(&bits(&dst[..k * np]), &want, "{:?}", b);
            prop_assert_eq!(bits(&dst[k * np..]), vec![0x7C01; 3]);
        }
    }

    #[test]
    fn out_layout(m in 1usize..40, n in 1usize..40, pad in 0usize..9, extra in 0usize..5, seed in any::<u64>()) {
        let np = n + pad;
        let stride = m + extra;
        let src: Vec<f16> = (0..m * np)
            .map(|i| f16::from_bits(((i as u64).wrapping_mul(seed | 1) % 0x7C00) as u16))
            .collect();
        let sentinel = -12345.0f32;
        let mut want = vec![sentinel; (n - 1) * stride + m];
        for i in 0..n {
            for c in 0..m {
                want[i * stride + c] = src[c * np + i].to_f32();
            }
        }
        for b in Backend::available() {
            let mut dst = vec![sentinel; (n - 1) * stride + m];
            out_f16_to_f32_transposed_with(b, &src, m, np, n, &mut dst, stride).unwrap();
            prop_assert_eq!(f32_bits(&dst), f32_bits(&want), "{:?}", b);
        }
    }

    #[test]
    fn weight_backends_agree(ty_idx in 0usize..types::SUPPORTED.len(), blocks in 1usize..4, seed in any::<u64>()) {
        let ty = types::SUPPORTED[ty_idx].0;
        let (qk, bs) = block_layout(ty).unwrap();
        // 8 elements at least for the 1-element "blocks" of F32/F16/BF16, plus a ragged tail.
        let n = if qk == 1 { 8 * blocks + 3 } else { qk * blocks };
        let mut x = seed | 1;
        let src: Vec<u8> = (0..n / qk * bs).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
        let mut want = vec![f16::ZERO; n];
        row_to_f16_with(Backend::Scalar, ty, &src, &mut want).unwrap();
        for b in Backend::available() {
            let mut out = vec![f16::ZERO; n];
            row_to_f16_with(b, ty, &src, &mut out).unwrap();
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                prop_assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{:?} {} elem {}: {:#06x} vs {:#06x}", b, types::SUPPORTED[ty_idx].1, i, g.to_bits(), w.to_bits());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every backend puts every bit pattern (NaN payloads, signalling NaNs included) where the
    /// naive double loop does, at any starting offset on either side, and touches nothing else
    /// of `dst` (the gaps between rows and the guard after the end keep their sentinel).
    #[test]
    fn transpose_f16_layout(
        rows in 0usize..70, cols in 0usize..70, src_extra in 0usize..9, dst_extra in 0usize..9,
        src_off in 0usize..17, dst_off in 0usize..17, seed in any::<u64>(),
    ) {
        let (ss, ds) = (cols + src_extra, rows + dst_extra);
        let src_len = if rows == 0 { 0 } else { (rows - 1) * ss + cols };
        let dst_len = if cols == 0 { 0 } else { (cols - 1) * ds + rows };
        let mut x = seed | 1;
        let buf: Vec<f16> = (0..src_off + src_len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f16::from_bits((x >> 48) as u16)
            })
            .collect();
        let src = &buf[src_off..];
        let sentinel = 0x7E5Au16;
        let mut want = vec![sentinel; dst_off + dst_len + 5];
        for r in 0..rows {
            for c in 0..cols {
                want[dst_off + c * ds + r] = src[r * ss + c].to_bits();
            }
        }
        for b in Backend::available() {
            let mut out = vec![f16::from_bits(sentinel); dst_off + dst_len + 5];
            transpose_f16_with(b, src, rows, cols, ss, &mut out[dst_off..dst_off + dst_len], ds)
                .unwrap();
            prop_assert_eq!(&bits(&out), &want, "{:?}", b);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Shapes that take the streaming copy of kernels with non-temporal stores (`dst_stride % 32
    /// == 0`, destination 64-byte aligned, 32-row multiples in a block) next to ones that just
    /// miss it (unaligned by `dst_skew` elements), with full and partial 128-row blocks.
    #[test]
    fn transpose_f16_streaming(
        rows in 1usize..300, cols in 1usize..150, src_extra in 0usize..3, pad in 0usize..2,
        dst_skew in prop_oneof![Just(0usize), 0usize..32], src_off in 0usize..9,
    ) {
        let ss = cols + src_extra;
        let ds = rows.next_multiple_of(32) + 32 * pad;
        let src: Vec<f16> = (0..src_off + (rows - 1) * ss + cols)
            .map(|i| f16::from_bits((i as u64 * 40503 % 65536) as u16))
            .collect();
        let src = &src[src_off..];
        let len = (cols - 1) * ds + rows;
        let sentinel = f16::from_bits(0xFC01);
        let mut buf = vec![sentinel; len + 64 + dst_skew];
        let base = buf.as_ptr().align_offset(128) + dst_skew;
        let mut want = vec![sentinel.to_bits(); buf.len()];
        for r in 0..rows {
            for c in 0..cols {
                want[base + c * ds + r] = src[r * ss + c].to_bits();
            }
        }
        for b in Backend::available() {
            buf.fill(sentinel);
            transpose_f16_with(b, src, rows, cols, ss, &mut buf[base..base + len], ds).unwrap();
            prop_assert_eq!(&bits(&buf), &want, "{:?}", b);
        }
    }
}

/// Shapes spanning several transpose blocks in both directions (the typical staging call: 32
/// rows of a long K into a wide tile, and a tall one), with ragged edges and NaN patterns.
#[test]
fn transpose_f16_multi_block() {
    for (rows, cols, ss, ds) in [
        (32, 4100, 4103, 1024),
        (301, 203, 211, 320),
        (256, 128, 128, 256),
    ] {
        let src: Vec<f16> = (0..(rows - 1) * ss + cols)
            .map(|i| f16::from_bits((i as u64 * 40503 % 65536) as u16))
            .collect();
        for b in Backend::available() {
            let mut dst = vec![f16::from_bits(0xFFFF); (cols - 1) * ds + rows];
            transpose_f16_with(b, &src, rows, cols, ss, &mut dst, ds).unwrap();
            for c in 0..cols {
                for r in 0..ds.min(dst.len() - c * ds) {
                    let want = if r < rows {
                        src[r * ss + c].to_bits()
                    } else {
                        0xFFFF
                    };
                    assert_eq!(
                        dst[c * ds + r].to_bits(),
                        want,
                        "{b:?} {rows}x{cols} at {c} {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn transpose_f16_errors() {
    let s = [f16::ZERO; 64];
    let mut d = [f16::ZERO; 64];
    // Strides smaller than the row they hold.
    assert!(matches!(
        transpose_f16(&s, 4, 8, 7, &mut d, 4),
        Err(ConvertError::Stride { min: 8, got: 7, .. })
    ));
    assert!(matches!(
        transpose_f16(&s, 4, 8, 8, &mut d, 3),
        Err(ConvertError::Stride { min: 4, got: 3, .. })
    ));
    // Short source: 4 rows of 8 at stride 10 need 38 elements.
    assert!(matches!(
        transpose_f16(&s[..37], 4, 8, 10, &mut d, 4),
        Err(ConvertError::Length {
            expected: 38,
            got: 37,
            ..
        })
    ));
    assert!(transpose_f16(&s[..38], 4, 8, 10, &mut d, 4).is_ok());
    // Short destination: 8 rows of 4 at stride 6 need 46 elements.
    assert!(matches!(
        transpose_f16(&s, 4, 8, 8, &mut d[..45], 6),
        Err(ConvertError::Length {
            expected: 46,
            got: 45,
            ..
        })
    ));
    assert!(transpose_f16(&s, 4, 8, 8, &mut d[..46], 6).is_ok());
    // A shape whose span overflows fails the length check instead of wrapping.
    assert!(matches!(
        transpose_f16(&s, usize::MAX / 2, 2, 4, &mut d, usize::MAX / 2),
        Err(ConvertError::Length { .. })
    ));
    // Empty shapes are no-ops on empty buffers, but the strides are still checked.
    assert!(transpose_f16(&[], 0, 5, 5, &mut [], 0).is_ok());
    assert!(transpose_f16(&[], 5, 0, 0, &mut [], 5).is_ok());
    assert!(matches!(
        transpose_f16(&[], 0, 5, 4, &mut [], 0),
        Err(ConvertError::Stride { .. })
    ));
}

#[test]
fn q4_0_nibble_order() {
    // Scale 1.0; byte j holds element j (low nibble) and element j + 16 (high nibble).
    let mut block = vec![0x00, 0x3C];
    block.extend((0..16u8).map(|j| (j & 0xF) | ((15 - j) << 4)));
    let mut out = [f16::ZERO; 32];
    row_to_f16(types::GGML_TYPE_Q4_0, &block, &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j].to_f32(), j as f32 - 8.0);
        assert_eq!(out[j + 16].to_f32(), (15 - j) as f32 - 8.0);
    }
}

#[test]
fn errors() {
    let mut d = [f16::ZERO; 32];
    assert!(matches!(
        row_to_f16(16, &[0; 66], &mut d[..32]),
        Err(ConvertError::UnsupportedType(16))
    ));
    assert!(matches!(
        row_to_f16(types::GGML_TYPE_Q4_0, &[0; 18], &mut d[..16]),
        Err(ConvertError::PartialBlock { .. })
    ));
    assert!(matches!(
        row_to_f16(types::GGML_TYPE_Q4_0, &[0; 17], &mut d),
        Err(ConvertError::Length { .. })
    ));
    assert!(matches!(
        act_f32_to_f16_transposed(&[0.0; 16], 2, 8, 7, &mut d, 2),
        Err(ConvertError::Stride { .. })
    ));
    assert!(matches!(
        act_f32_to_f16_transposed(&[0.0; 16], 2, 8, 8, &mut d[..15], 2),
        Err(ConvertError::Length { .. })
    ));
    let mut o = [0f32; 10];
    assert!(matches!(
        out_f16_to_f32_transposed(&d, 4, 8, 9, &mut o, 4),
        Err(ConvertError::Stride { .. })
    ));
    assert!(supported(types::GGML_TYPE_IQ4_XS) && !supported(16));
    assert_eq!(row_bytes(types::GGML_TYPE_Q6_K, 512), Some(420));
}

#[test]
fn bench_host_rows() {
    let rows = bench_host(256 * 1024, None);
    // memcpy, the two channel-first transposes, the two at plugin shapes, the two token-major
    // copies, the fp16 transpose, one row per weight type.
    assert_eq!(rows.len(), 8 + types::SUPPORTED.len());
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "memcpy",
        "act_f32_to_f16",
        "out_f16_to_f32",
        "act_channels_f32_to_f16",
        "out_channels_f16_to_f32",
        "act_channels_n512_k4096",
        "out_channels_m14336_n512",
        "transpose_f16",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(rows
        .iter()
        .all(|r| r.gbps > 0.0 && r.speedup_vs_ggml.is_none()));
}

/// Shapes spanning several staging blocks in both directions, with ragged edges.
#[test]
fn layouts_multi_block() {
    let (n, k, stride, np) = (203, 300, 301, 208);
    let src: Vec<f32> = (0..(n - 1) * stride + k)
        .map(|i| (i % 4099) as f32 * 0.5)
        .collect();
    let (m, on, ostride) = (150, 270, 153);
    let osrc: Vec<f16> = (0..m * np.max(on + 2))
        .map(|i| f16::from_bits((i % 0x7C00) as u16))
        .collect();
    let onp = np.max(on + 2);
    for b in Backend::available() {
        let mut dst = vec![f16::ONE; k * np];
        act_f32_to_f16_transposed_with(b, &src, n, k, stride, &mut dst, np).unwrap();
        for c in 0..k {
            for i in 0..np {
                let want = if i < n {
                    f16::from_f32(src[i * stride + c])
                } else {
                    f16::ZERO
                };
                assert_eq!(
                    dst[c * np + i].to_bits(),
                    want.to_bits(),
                    "{b:?} act {c} {i}"
                );
            }
        }
        let mut out = vec![-1.0f32; (on - 1) * ostride + m];
        out_f16_to_f32_transposed_with(b, &osrc, m, onp, on, &mut out, ostride).unwrap();
        for i in 0..on {
            for c in 0..ostride.min(out.len() - i * ostride) {
                let want = if c < m {
                    osrc[c * onp + i].to_f32()
                } else {
                    -1.0
                };
                assert_eq!(
                    out[i * ostride + c].to_bits(),
                    want.to_bits(),
                    "{b:?} out {i} {c}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Shapes that take the streaming path of kernels with non-temporal stores (`np % 32 == 0`,
    /// `stride % 16 == 0`, at least 32 tokens and 16 channels past the alignment heads), at every
    /// alignment of source and destination, with ragged heads and tails on both axes.
    #[test]
    fn act_layout_streaming(
        n in 1usize..140, k in 1usize..90, stride_extra in 0usize..3, pad in 0usize..2,
        src_off in 0usize..20, dst_off in 0usize..40, odd_stride in any::<bool>(),
    ) {
        let stride = if odd_stride { k + stride_extra } else { k.next_multiple_of(16) + 16 * stride_extra };
        let np = n.next_multiple_of(32) + 32 * pad;
        let src: Vec<f32> = (0..src_off + (n - 1) * stride + k)
            .map(|i| (i % 30011) as f32 * 0.37 - 5000.0)
            .collect();
        let src = &src[src_off..];
        let mut want = vec![0u16; k * np];
        for i in 0..n {
            for c in 0..k {
                want[c * np + i] = f16::from_f32(src[i * stride + c]).to_bits();
            }
        }
        for b in Backend::available() {
            let mut buf = vec![f16::from_bits(0x7C01); dst_off + k * np + 3];
            act_f32_to_f16_transposed_with(b, src, n, k, stride, &mut buf[dst_off..dst_off + k * np], np).unwrap();
            prop_assert_eq!(&bits(&buf[dst_off..dst_off + k * np]), &want, "{:?}", b);
            prop_assert_eq!(bits(&buf[..dst_off]), vec![0x7C01; dst_off]);
        }
    }

    /// As [`act_layout_streaming`] for outputs (`stride % 16 == 0`, 64 channels and 32 tokens).
    #[test]
    fn out_layout_streaming(
        m in 1usize..200, n in 1usize..80, pad in 0usize..9, stride_extra in 0usize..3,
        dst_off in 0usize..20, odd_stride in any::<bool>(),
    ) {
        let np = n + pad;
        let stride = if odd_stride { m + stride_extra } else { m.next_multiple_of(16) + 16 * stride_extra };
        let src: Vec<f16> = (0..m * np)
            .map(|i| f16::from_bits(((i as u64 * 40503) % 0x7C00) as u16))
            .collect();
        let sentinel = -12345.0f32;
        let len = (n - 1) * stride + m;
        let mut want = vec![sentinel; dst_off + len + 5];
        for i in 0..n {
            for c in 0..m {
                want[dst_off + i * stride + c] = src[c * np + i].to_f32();
            }
        }
        for b in Backend::available() {
            let mut dst = vec![sentinel; dst_off + len + 5];
            out_f16_to_f32_transposed_with(b, &src, m, np, n, &mut dst[dst_off..dst_off + len], stride).unwrap();
            prop_assert_eq!(f32_bits(&dst), f32_bits(&want), "{:?}", b);
        }
    }
}
