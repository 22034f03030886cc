//! `cargo xtask test` step `moe`: mixture-of-experts matmuls on the device.
//!
//! `GGML_ANE_MOE=on test-backend-ops -b ANE -o MUL_MAT_ID` on the reference engine (minimum batch 1, so every
//! case is offered to the plugin): every claimed case must pass against the CPU backend, and the
//! plugin must claim at least [`MIN_CLAIMED`] of the suite's 945 cases (issue 16). The stats line
//! says how many MUL_MAT_ID nodes and expert products the device computed and how many expert
//! products its guard sent to the CPU (inputs beyond fp16's range). Then a tiny generated MoE
//! model (`models::moe`: 8 experts, 2 used, q8_0) gives CPU-only llama.cpp's greedy text with
//! `GGML_ANE_MOE=on`, with MUL_MAT_ID nodes offloaded. Both runs must use packs of experts
//! (`ane_plan::moe`); experts that do not pack (odd row counts) go one per dispatch.

use std::time::Duration;

use crate::llama;
use crate::test::{self, stat, Prereqs};
use crate::util::{self, Result};

/// Cases the plugin must claim (it claims all 945 of b11434's, measured).
const MIN_CLAIMED: usize = 800;

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let (c, res) = test::backend_ops(
        &llama::API3,
        &plugin,
        &["-o", "MUL_MAT_ID", "-j", "2"],
        &[("GGML_ANE_MOE", "on"), ("GGML_ANE_STATS", "json")],
        "test-backend-ops-mul-mat-id",
    )?;
    let all = format!("{}{}", res.stdout, res.stderr);
    let summary = format!(
        "test-backend-ops MUL_MAT_ID {}; {} MUL_MAT_ID nodes, {} expert products, {} pack dispatches, {} by the CPU (guard) ({:.0}s)",
        c.summary(),
        stat(&all, "mul_mat_id_ops"),
        stat(&all, "mul_mat_id_experts"),
        stat(&all, "mul_mat_id_packs"),
        stat(&all, "fallback_cpu_backend"),
        res.elapsed.as_secs_f64()
    );
    println!("{summary}");
    test::ops_verdict_at_least(&c, &res, &summary, 0, MIN_CLAIMED)?;
    if stat(&all, "mul_mat_id_packs") == 0 {
        return Err(format!("{summary}: no expert pack ran; {}", res.where_logged()).into());
    }
    let graphs = graph_cases(&plugin)?;
    let text = moe_text(&plugin)?;
    let plan = moe_plan()?;
    Ok(format!("{summary}; {graphs}; {text}; {plan}"))
}

/// The suite's MUL_MAT_ID graph cases: `MUL_MAT_ID_W4A8`/`_W4A4` (one MUL_MAT_ID each: must all
/// be claimed and pass) and `MUL_MAT_ID_FUSION`/`_SHARED` (graphs that also hold ADD, MUL or GLU
/// nodes; test-backend-ops runs a graph only on a backend that supports every node, so the plugin,
/// which claims matmuls only, is reported "not supported" there and none may fail).
fn graph_cases(plugin: &std::path::Path) -> Result<String> {
    let (c, res) = test::backend_ops(
        &llama::API3,
        plugin,
        &[
            "-o",
            "MUL_MAT_ID_W4A8,MUL_MAT_ID_W4A4,MUL_MAT_ID_FUSION,MUL_MAT_ID_SHARED",
        ],
        &[("GGML_ANE_MOE", "on"), ("GGML_ANE_STATS", "json")],
        "test-backend-ops-mul-mat-id-graphs",
    )?;
    let summary = format!("MUL_MAT_ID graph cases {}", c.summary());
    println!("{summary}");
    test::ops_verdict_at_least(&c, &res, &summary, 0, MIN_GRAPH_CLAIMED)?;
    Ok(summary)
}

/// W4A8 and W4A4 cases of b11434 (all claimed, measured).
const MIN_GRAPH_CLAIMED: usize = 6;

/// `ane plan --model` on the tiny MoE model reads its experts from the GGUF and plans packs: 8
/// experts of 64 x 128 (one pack), 2 MoE layers.
fn moe_plan() -> Result<String> {
    util::run(util::cargo().args(["build", "--release", "-p", "ane-cli"]))?;
    let model = crate::models::moe()?;
    let out = util::read(
        std::process::Command::new(util::abs("target/release/ane"))
            .args(["plan", "--json", "--model"])
            .arg(&model),
    )?;
    let json = out
        .lines()
        .find(|l| l.starts_with('['))
        .ok_or_else(|| format!("ane plan --model (MoE): no JSON rows:\n{out}"))?;
    // The first row is the uniform routing's.
    let first = json.split("},{").next().unwrap_or(json);
    let num = |key: &str| crate::test::json_u64(first, key).unwrap_or(0);
    let ok = first.contains("\"routing\":\"uniform\"")
        && first.contains("\"pack\":[8,8]")
        && num("layers") == 2
        && num("dispatches_per_layer") >= 3;
    if !ok {
        return Err(
            format!("ane plan --model on the tiny MoE model: unexpected plan {first}").into(),
        );
    }
    Ok(format!(
        "ane plan --model reads its experts: packs of 8, {} dispatches per MoE layer (one expert each: {})",
        num("dispatches_per_layer"),
        num("dispatches_per_layer_single")
    ))
}

/// Greedy text of the tiny MoE model with the plugin (MoE on) against CPU-only.
fn moe_text(plugin: &std::path::Path) -> Result<String> {
    let model = crate::models::moe()?;
    let timeout = Duration::from_secs(300);
    let cpu = test::run_completion(
        &mut test::completion(&model, None, 24, &[]),
        "moe-text-cpu",
        timeout,
    )?;
    let ane = test::run_completion(
        test::completion(&model, Some(plugin), 24, &[])
            .env("GGML_ANE_STATS", "json")
            .env("GGML_ANE_MOE", "on"),
        "moe-text-ane",
        timeout,
    )?;
    for (what, run) in [("CPU-only", &cpu), ("with the plugin", &ane)] {
        if !run.success() {
            return Err(format!(
                "tiny MoE llama-completion {what} {}:\n{}\n{}",
                run.status_text(),
                run.stderr_tail(15),
                run.where_logged()
            )
            .into());
        }
    }
    let (c, a) = (test::generated(&cpu.stdout), test::generated(&ane.stdout));
    if c.trim().is_empty() || c != a {
        return Err(format!(
            "tiny MoE greedy text differs\n  cpu: {c:?}\n  ane: {a:?}\n{}",
            ane.where_logged()
        )
        .into());
    }
    let (ops, experts, packs) = (
        stat(&ane.stderr, "mul_mat_id_ops"),
        stat(&ane.stderr, "mul_mat_id_experts"),
        stat(&ane.stderr, "mul_mat_id_packs"),
    );
    if ops == 0 || packs == 0 {
        return Err(format!(
            "tiny MoE: {ops} MUL_MAT_IDs offloaded, {packs} expert packs (want both > 0); {}",
            ane.where_logged()
        )
        .into());
    }
    Ok(format!(
        "tiny MoE (8 experts, 2 used, q8_0): text identical, {ops} MUL_MAT_IDs ({experts} expert products, {packs} pack dispatches) offloaded"
    ))
}
