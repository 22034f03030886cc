//! `ane bench host`: host-side conversion throughput (what the CPU does around every ANE dispatch),
//! against memcpy and against ggml's own two-step path, measured in one run.

use ane_convert::ggml::GgmlBase;
use anyhow::Result;

/// Arguments of `ane bench host`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Buffer size in MiB (targets are stated for 64 MiB or more).
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the host benchmark.
pub fn run(args: &Args) -> Result<()> {
    let ggml = match GgmlBase::open_default() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("ane bench host: libggml-base not loaded ({e}); speedup_vs_ggml omitted");
            None
        }
    };
    let rows = ane_convert::bench_host(args.mib << 20, ggml.as_ref());
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<22} {:>12} {:>8} {:>10} {:>10}",
        "name", "bytes", "GB/s", "x memcpy", "x ggml"
    );
    for r in &rows {
        let g = r
            .speedup_vs_ggml
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<22} {:>12} {:>8.2} {:>10.2} {:>10}",
            r.name, r.bytes, r.gbps, r.ratio_to_memcpy, g
        );
    }
    Ok(())
}
