//! Bad input (issue 6): the MIL parser and the MILBlob reader return errors, never panic, on any
//! bytes. The stable-toolchain twin of the `fuzz/` targets (`cargo xtask fuzz`): random bytes, and
//! random edits of valid inputs, which get much further into the parsers.

use ane_mil::blob::{read_blob, BlobWriter};
use ane_mil::DType;
use proptest::prelude::*;

fn valid_mil() -> String {
    ane_mil::text::emit(&ane_mil::build::tiled_matmul(ane_plan_free_shape()))
}

/// A small tiled shape, written out so the test does not depend on the planner crate.
fn ane_plan_free_shape() -> ane_mil::build::TiledShape {
    ane_mil::build::TiledShape {
        heads: 1,
        tiles: 2,
        k_chunks: 2,
        m_tile: 32,
        k_chunk: 64,
        n: 64,
        layout: ane_mil::build::Layout::Channels,
    }
}

fn valid_blob() -> Vec<u8> {
    let mut w = BlobWriter::new();
    w.push(DType::Fp16, &[0u8; 64], 0);
    w.push(DType::Fp32, &[1u8; 32], 0);
    w.finish()
}

/// `base` with up to 8 bytes overwritten, a cut, and a splice of random bytes.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (
        prop::collection::vec((0..len, any::<u8>()), 0..8),
        0..=len,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(edits, cut, tail)| {
            let mut b = base.clone();
            for (i, v) in edits {
                b[i] = v;
            }
            b.truncate(cut.max(len / 2));
            b.extend(tail);
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_never_panics_on_random_text(s in ".{0,400}") {
        let _ = ane_mil::text::parse(&s);
    }

    #[test]
    fn parse_never_panics_on_edited_programs(b in mutated(valid_mil().into_bytes())) {
        let _ = ane_mil::text::parse(&String::from_utf8_lossy(&b));
    }

    #[test]
    fn read_blob_never_panics(b in prop::collection::vec(any::<u8>(), 0..400), off in any::<u64>()) {
        let _ = read_blob(&b, off);
        let _ = read_blob(&b, off % 256);
    }

    #[test]
    fn read_blob_never_panics_on_edited_files(b in mutated(valid_blob()), off in 0u64..256) {
        let _ = read_blob(&b, off);
        let _ = read_blob(&b, 64);
    }
}
