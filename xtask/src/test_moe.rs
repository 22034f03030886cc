//! `cargo xtask test` step `moe`: mixture-of-experts matmuls on the device.
//!
//! `GGML_ANE_MOE=on test-backend-ops -b ANE -o MUL_MAT_ID` on the reference engine (minimum batch 1, so every
//! case is offered to the plugin): every claimed case must pass against the CPU backend, and the
//! plugin must claim at least [`MIN_CLAIMED`] of the suite's 945 cases (issue 16). The stats line
//! says how many MUL_MAT_ID nodes and expert products the device computed and how many expert
//! products its guard sent to the CPU (inputs beyond fp16's range).

use std::process::Command;
use std::time::Duration;

use crate::llama;
use crate::test::{self, stat, OpsCounts, Prereqs};
use crate::util::{self, Result};

/// Cases the plugin must claim (it claims all 945 of b11434's, measured).
const MIN_CLAIMED: usize = 800;

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    let res = util::run_logged(
        Command::new(llama::bin("test-backend-ops"))
            .args(["-b", "ANE", "-o", "MUL_MAT_ID", "-j", "2"])
            .env("GGML_BACKEND_PATH", &plugin)
            .env("GGML_ANE_ENGINE", "reference")
            .env("GGML_ANE_MIN_BATCH", "1")
            .env("GGML_ANE_MOE", "on")
            .env("GGML_ANE_STATS", "json"),
        "test-backend-ops-mul-mat-id",
        Duration::from_secs(45 * 60),
    )?;
    let c = OpsCounts::parse(&res.stdout);
    let all = format!("{}{}", res.stdout, res.stderr);
    let summary = format!(
        "test-backend-ops MUL_MAT_ID {}; {} MUL_MAT_ID nodes, {} expert products, {} by the CPU (guard) ({:.0}s)",
        c.summary(),
        stat(&all, "mul_mat_id_ops"),
        stat(&all, "mul_mat_id_experts"),
        stat(&all, "fallback_cpu_backend"),
        res.elapsed.as_secs_f64()
    );
    println!("{summary}");
    test::ops_verdict_at_least(&c, &res, &summary, 0, MIN_CLAIMED)?;
    Ok(summary)
}
