//! Any bytes into the GGUF header reader, raw and behind a valid magic and version.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ane_plan::gguf::Gguf::parse(data);
    let mut g = b"GGUF\x03\0\0\0".to_vec();
    g.extend_from_slice(data);
    let _ = ane_plan::gguf::Gguf::parse(&g);
});
