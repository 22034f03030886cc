//! Any bytes into the MILBlob v2 reader, at the offset the first 8 bytes name and at 64.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let offset = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) % 4096);
    let _ = ane_mil::blob::read_blob(data, offset);
    let _ = ane_mil::blob::read_blob(data, 64);
});
