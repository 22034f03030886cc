//! Test step `sched`: which backend llama.cpp's scheduler gives each graph split, read from
//! `GGML_SCHED_DEBUG=1` output of `llama-completion -v` on the tiny f16 model. The plugin only
//! pays off on large batches, so the prefill graph (64 tokens or more) must have an ANE split and
//! the one-token decode graphs must have none (the plugin's default minimum batch is 64).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::models;
use crate::test::{completion, strip_ansi, Prereqs};
use crate::util::{self, bail, Result};

pub(crate) fn step(pre: &mut Prereqs) -> Result<String> {
    let plugin = pre.plugin()?;
    pre.llama()?;
    pre.models()?;
    let res = util::run_logged(
        completion(&models::path("f16"), Some(&plugin), 4, &["-v"]).env("GGML_SCHED_DEBUG", "1"),
        "sched-debug",
        Duration::from_secs(300),
    )?;
    if !res.success() {
        bail!(
            "llama-completion -v with GGML_SCHED_DEBUG=1 {}:\n{}\n{}",
            res.status_text(),
            res.stderr_tail(15),
            res.where_logged()
        );
    }
    let graphs = SchedGraph::parse(&res.stderr);
    let ctx = || res.where_logged();
    if graphs.is_empty() {
        bail!(
            "no `## SPLIT #` lines on stderr (GGML_SCHED_DEBUG not honoured, or -v lost?); {}",
            ctx()
        );
    }
    let reserves = graphs.iter().filter(|g| g.reserve).count();
    println!("  {reserves} reserve graphs (worst-case sizing), then:");
    for g in graphs.iter().filter(|g| !g.reserve) {
        println!("  {g}");
    }
    let computed = |pred: &dyn Fn(u32) -> bool| {
        graphs
            .iter()
            .filter(|g| !g.reserve && g.n_tokens.is_some_and(pred))
            .collect::<Vec<_>>()
    };
    let prefill = computed(&|n| n >= 64);
    let decode = computed(&|n| n == 1);
    if prefill.is_empty() {
        bail!("no computed graph with n_tokens >= 64 found; {}", ctx());
    }
    if decode.is_empty() {
        bail!("no computed decode graph (n_tokens = 1) found; {}", ctx());
    }
    if let Some(g) = prefill.iter().find(|g| !g.uses_ane()) {
        bail!("prefill graph has no ANE split: {g}; {}", ctx());
    }
    let one_token = graphs.iter().filter(|g| g.n_tokens == Some(1));
    if let Some(g) = one_token.clone().find(|g| g.uses_ane()) {
        bail!("1-token graph has an ANE split: {g}; {}", ctx());
    }
    Ok(format!(
        "{} graphs: prefill {} with ANE splits, {} one-token graph(s) CPU only",
        graphs.len(),
        prefill
            .iter()
            .map(|g| g.n_tokens.unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("/"),
        one_token.count()
    ))
}

/// One graph as `GGML_SCHED_DEBUG=1` prints it (ggml-backend.cpp,
/// `ggml_backend_sched_print_assignments`): lines
/// `## SPLIT #<i>: <backend> # <n> inputs[: [name (size)] ...]`, starting
/// again at `#0` for each graph split. Graph sizes are not printed there, so
/// they come from the surrounding log: llama-context's
/// `graph_reserve: reserving a graph for ubatch with n_tokens = N` precedes a
/// reserve graph, and llama-completion (`-v`) logs `n_past = N` after each
/// decode, so a computed graph's n_tokens is the n_past increase. With
/// `-v`, common_log prefixes each message piece with `0.00.065.179 D `, so
/// a split line can read `## SPLIT #0: CPU # 0 inputs0.00.012.910 D `.
#[derive(Debug, PartialEq)]
struct SchedGraph {
    reserve: bool,
    n_tokens: Option<u32>,
    /// Backend name of each split, in order.
    splits: Vec<String>,
}

impl SchedGraph {
    fn uses_ane(&self) -> bool {
        self.splits.iter().any(|b| b.starts_with("ANE"))
    }

    fn parse(log: &str) -> Vec<SchedGraph> {
        let mut graphs: Vec<SchedGraph> = Vec::new();
        let mut pending_reserve: Option<u32> = None;
        let mut n_past = 0u32;
        // Computed graphs since the last `n_past = ` line.
        let mut pending_sizes: Vec<usize> = Vec::new();
        for raw in log.lines() {
            let line = strip_ansi(raw);
            let line = strip_log_prefix(line.trim());
            if let Some(i) = line.find("reserving a graph for ubatch with n_tokens =") {
                let rest = &line[i + "reserving a graph for ubatch with n_tokens =".len()..];
                pending_reserve = leading_u32(rest);
            } else if let Some(rest) = line.strip_prefix("## SPLIT #") {
                let Some((idx, rest)) = rest.split_once(':') else {
                    continue;
                };
                let backend = rest.split(" # ").next().unwrap_or("").trim().to_string();
                if idx.trim() == "0" || graphs.is_empty() {
                    let reserve = pending_reserve.take();
                    if reserve.is_none() {
                        pending_sizes.push(graphs.len());
                    }
                    graphs.push(SchedGraph {
                        reserve: reserve.is_some(),
                        n_tokens: reserve,
                        splits: Vec::new(),
                    });
                }
                graphs.last_mut().unwrap().splits.push(backend);
            } else if let Some(rest) = line.strip_prefix("n_past = ") {
                if let Some(now) = leading_u32(rest) {
                    let n = now.saturating_sub(n_past);
                    for &g in &pending_sizes {
                        graphs[g].n_tokens = Some(n);
                    }
                    pending_sizes.clear();
                    n_past = now;
                }
            }
        }
        graphs
    }
}

impl std::fmt::Display for SchedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &self.splits {
            *counts.entry(s).or_default() += 1;
        }
        let n = self.n_tokens.map_or("?".to_string(), |n| n.to_string());
        let kind = if self.reserve { "reserve" } else { "compute" };
        let by_backend: Vec<String> = counts.iter().map(|(b, c)| format!("{b} x{c}")).collect();
        write!(
            f,
            "{kind} graph n_tokens={n}: {} splits ({})",
            self.splits.len(),
            by_backend.join(", ")
        )
    }
}

/// Drop common_log's `-v` prefix `0.00.065.179 D ` (timestamp, level letter).
fn strip_log_prefix(line: &str) -> &str {
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ts), Some(level), rest)
            if ts.starts_with(|c: char| c.is_ascii_digit())
                && ts.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && level.len() == 1
                && level.bytes().all(|b| b.is_ascii_uppercase()) =>
        {
            rest.unwrap_or("").trim_start()
        }
        _ => line,
    }
}

fn leading_u32(s: &str) -> Option<u32> {
    let s = s.trim_start();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_graphs_get_sizes() {
        let log = [
            "0.00.013.033 D graph_reserve: reserving a graph for ubatch with n_tokens =  512, n_seqs =  1, n_outputs =  512",
            "0.00.013.070 D ",
            "## SPLIT #0: CPU # 0 inputs0.00.013.074 D ",
            "## SPLIT #1: ANE # 1 inputs0.00.013.075 D : 0.00.013.076 D [attn_norm-0 (  64K)] 0.00.013.077 D ",
            "0.00.013.111 D graph_reserve: reserving a graph for ubatch with n_tokens =    1, n_seqs =  1, n_outputs =    1",
            "## SPLIT #0: CPU # 0 inputs0.00.013.143 D ",
            "0.00.043.900 D ",
            "## SPLIT #0: CPU # 0 inputs0.00.043.917 D ",
            "## SPLIT #1: \x1b[0mANE # 1 inputs: [attn_norm-0 (  64K)]",
            "## SPLIT #2: CPU # 1 inputs: [ffn_out (  30K)]",
            "0.00.065.179 D n_past = 100",
            "## SPLIT #0: CPU # 0 inputs0.00.065.411 D ",
            "0.00.065.512 D n_past = 101",
            "n_past = 102",
        ]
        .join("\n");
        let g = SchedGraph::parse(&log);
        assert_eq!(g.len(), 4);
        assert!(g[0].reserve && g[0].n_tokens == Some(512) && g[0].uses_ane());
        assert!(g[1].reserve && g[1].n_tokens == Some(1) && !g[1].uses_ane());
        assert!(!g[2].reserve && g[2].n_tokens == Some(100) && g[2].uses_ane());
        assert_eq!(g[2].splits, ["CPU", "ANE", "CPU"]);
        assert!(!g[3].reserve && g[3].n_tokens == Some(1) && !g[3].uses_ane());
    }
}
