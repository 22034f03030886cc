//! Bad input (issue 6): the GGUF reader returns errors, never panics and never allocates what a
//! header merely claims, on any bytes. The stable-toolchain twin of the `fuzz/` gguf target.

use ane_plan::gguf::Gguf;
use proptest::prelude::*;

fn s(out: &mut Vec<u8>, v: &str) {
    out.extend((v.len() as u64).to_le_bytes());
    out.extend(v.as_bytes());
}

/// A small valid header: three metadata values (string, u32, string array) and one tensor.
fn sample() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    s(&mut b, "a");
    s(&mut b, "b");
    s(&mut b, "blk.0.attn_q.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(128u64.to_le_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b
}

#[test]
fn the_sample_parses() {
    assert!(Gguf::parse(&sample()).is_ok());
}

#[test]
fn huge_claimed_counts_and_lengths_are_errors() {
    let base = sample();
    // tensor count, kv count, first key length, array length: each set to 2^62.
    let array_len_at = base
        .windows(8)
        .position(|w| w == 2u64.to_le_bytes())
        .expect("array length");
    for at in [8, 16, 24, array_len_at] {
        let mut b = base.clone();
        b[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(Gguf::parse(&b).is_err(), "field at {at}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Gguf::parse(&b);
        let mut g = b"GGUF\x03\0\0\0".to_vec();
        g.extend(&b);
        let _ = Gguf::parse(&g);
    }

    #[test]
    fn edited_headers_never_panic(
        edits in prop::collection::vec((0usize..1000, any::<u8>()), 1..8),
        cut in 0usize..1000,
    ) {
        let mut b = sample();
        let len = b.len();
        for (i, v) in edits {
            b[i % len] = v;
        }
        b.truncate(len / 2 + cut % (len / 2 + 1));
        let _ = Gguf::parse(&b);
    }
}
