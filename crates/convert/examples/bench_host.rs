//! Prints the host conversion benchmark table (what `ane bench host` shows):
//! `cargo run --release -p ane-convert --example bench_host [MiB] [--json]`.
//! Compares with libggml-base when it is built (`cargo xtask llama`) or `ANE_GGML_BASE` names it.

use ane_convert::ggml::GgmlBase;
use ane_convert::{bench_host, Backend};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let mib: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(64);
    let ggml = match GgmlBase::open_default() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("no ggml comparison: {e}");
            None
        }
    };
    let rows = bench_host(mib << 20, ggml.as_ref());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serialize")
        );
        return;
    }
    println!("backend {:?}, buffers of {mib} MiB", Backend::best());
    println!(
        "{:<16} {:>12} {:>9} {:>10} {:>10}",
        "name", "bytes", "GB/s", "x memcpy", "x ggml"
    );
    for r in rows {
        let vs = r
            .speedup_vs_ggml
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:>12} {:>9.2} {:>10.2} {:>10}",
            r.name, r.bytes, r.gbps, r.ratio_to_memcpy, vs
        );
    }
}
