//! `ane`: the project's command-line tool.
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function, so adding
//! one (`doctor`, `bench`, `plan`) means one new module and one new enum variant here, without
//! touching the others.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod bench_host;
mod bench_moe;
mod bench_split;
mod doctor;
mod doctor_commands;
mod doctor_coreml;
mod mil;
mod plan;
mod plan_moe;
mod probe;

/// Tools for the ggml Apple Neural Engine backend.
#[derive(Debug, Parser)]
#[command(name = "ane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Emit one of the MIL program forms the backend compiles (text, and weights for baked forms).
    Mil(mil::Args),
    /// Check whether the ANE works here and how fast and accurate it is; `--json` for a report.
    /// Ends with the llama.cpp command lines that fit this machine (JSON `commands`).
    Doctor(doctor::Args),
    /// Time MUL_MAT shapes on the engine against a CPU f32 product measured in the same run
    /// (`ane bench host`: host conversion throughput; `ane bench split`: the device beside a GPU).
    Bench(bench::Args),
    /// What a model's prefill would compile and dispatch (same planner as the plugin).
    Plan(plan::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Mil(args) => mil::run(&args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Bench(args) => match &args.what {
            Some(bench::What::Host(h)) => bench_host::run(h),
            Some(bench::What::Moe(m)) => bench_moe::run(m),
            Some(bench::What::Split(s)) => bench_split::run(s),
            None => bench::run(&args),
        },
        Command::Plan(args) => plan::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
