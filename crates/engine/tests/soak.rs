//! Soak (issue 6): 10,000 compile/unload cycles (every 50th also evaluated) on the reference engine with flat memory.
//!
//! The ANE leaks per compile (ane-private-api.md §5.2); the reference engine must not, or the
//! plugin's evict-and-recompile path would grow without bound on Linux too. Its own test binary,
//! so no other test allocates in the process while resident memory is measured.

use ane_engine::reference::ReferenceEngine;
use ane_engine::surface::request_alloc_size;
use ane_engine::{Chip, Engine, Surface};

/// Resident set size in bytes (`/proc/self/statm`, second field, in pages); `None` off Linux.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn ten_thousand_compile_evict_cycles_keep_memory_flat() {
    const CYCLES: usize = 10_000;
    // Far past the per-process compile cap on purpose: this measures memory, not the cap.
    let e = ReferenceEngine::new(Chip::M4.limits()).with_compile_cap(u64::MAX);
    // Two tiny programs, alternated, as an LRU of one would evict them.
    let mils: Vec<String> = [(64, 64, 64), (64, 32, 64)]
        .iter()
        .map(|&(k, m, n)| ane_mil::text::emit(&ane_mil::build::dyn_matmul(k, m, n)))
        .collect();
    let size = request_alloc_size(&[64 * 64 * 2]);
    let (x, w) = (Surface::new(size), Surface::new(size));
    let mut y = Surface::new(size);
    let mut cycle = |i: usize| {
        let id = e.compile(&mils[i % 2], &[]).expect("compiles");
        // Evaluating is the slow part in a debug build; every 50th program is enough to keep
        // the evaluation path (surface binding, interpreter buffers) in the measurement.
        if i.is_multiple_of(50) {
            e.evaluate(id, &[&x, &w], &mut [&mut y]).expect("evaluates");
        }
        e.unload(id);
    };
    // Warm up allocator pools before the first measurement.
    (0..500).for_each(&mut cycle);
    let before = rss_bytes();
    (500..CYCLES).for_each(&mut cycle);
    let after = rss_bytes();
    let c = e.counters();
    assert_eq!(
        (c.compiles, c.unloads, c.loaded),
        (CYCLES as u64, CYCLES as u64, 0)
    );
    match (before, after) {
        (Some(b), Some(a)) => {
            let growth = a.saturating_sub(b);
            println!("soak: RSS {b} -> {a} bytes over {} cycles", CYCLES - 500);
            // One leaked program (parsed MIL + plan) is several KB, so 9,500 leaks would be tens
            // of MB; 2 MB allows allocator noise.
            assert!(growth < 2 << 20, "RSS grew by {growth} bytes");
        }
        _ => println!("soak: no /proc/self/statm here, memory not measured (cycles still ran)"),
    }
}
