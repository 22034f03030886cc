//! Test step `overflow`: the ANE computes in fp16, whose range ends at 65504, while the CPU
//! keeps f32 activations. A tiny f32 model built with `--overflow-gain 400` (by
//! `scripts/make_tiny_llama.py`) has FFN activations beyond that range; with the plugin, the
//! numeric guard must catch them and send those MUL_MATs to the CPU path, so that the greedy text
//! equals the CPU-only run and the stats show guard trips as well as offloaded ops.

use std::process::Command;
use std::time::Duration;

use crate::test::{completion, generated, run_completion, stats_field_max, Prereqs};
use crate::util::{self, abs, bail, Result};

/// A tiny f32 model whose layer-0 FFN hidden state exceeds 65504 (`--overflow-gain 400`): the
/// CPU keeps f32 activations, the ANE would see inf. With the plugin, the numeric guard must send
/// those MUL_MATs to the CPU path and the greedy text must equal the CPU-only run.
pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let python = pre.python()?;
    let model = abs("target/models/tiny-llama-overflow-f32.gguf");
    std::fs::create_dir_all(abs("target/models"))?;
    util::run(
        Command::new(&python)
            .arg(abs("scripts/make_tiny_llama.py"))
            .arg(&model)
            .args(["--dtype", "f32", "--seed", "0", "--overflow-gain", "400"]),
    )?;
    let timeout = Duration::from_secs(300);
    let cpu = run_completion(
        &mut completion(&model, None, 24, &[]),
        "overflow-cpu",
        timeout,
    )?;
    let ane = run_completion(
        completion(&model, Some(&plugin), 24, &[]).env("GGML_ANE_STATS", "json"),
        "overflow-ane",
        timeout,
    )?;
    for (name, r) in [("CPU-only", &cpu), ("plugin", &ane)] {
        if !r.success() {
            bail!(
                "{name} llama-completion {}:\n{}\n{}",
                r.status_text(),
                r.stderr_tail(15),
                r.where_logged()
            );
        }
    }
    let (cpu_text, ane_text) = (generated(&cpu.stdout), generated(&ane.stdout));
    println!("overflow CPU: {cpu_text:?}\noverflow ANE: {ane_text:?}");
    if cpu_text.trim().is_empty() || cpu_text != ane_text {
        bail!(
            "greedy output differs or is empty\n  cpu: {cpu_text:?}\n  ane: {ane_text:?}\n{}",
            ane.where_logged()
        );
    }
    let stat = |key: &str| stats_field_max(&ane.stderr, key).unwrap_or(0);
    let (trips, offloaded) = (stat("guard_trips"), stat("ops_offloaded"));
    if trips == 0 || offloaded == 0 {
        bail!(
            "expected guard trips and offloaded ops, got guard_trips {trips}, ops_offloaded \
             {offloaded}\n{}",
            ane.where_logged()
        );
    }
    Ok(format!(
        "text identical to CPU; guard trips {trips}, ops offloaded {offloaded}"
    ))
}
