//! `cargo xtask`: the project's automation, written in Rust so it runs
//! wherever cargo does.
//!
//! Testing a ggml backend plugin needs more than `cargo test`: a llama.cpp
//! build with its test tools, a Python venv with coremltools (the MIL
//! validator) and gguf (model writer), tiny GGUF models, and scripted runs of
//! `test-backend-ops` and `llama-completion`. Each task is one module; `main`
//! parses the command line (see `flags`), moves to the workspace root and
//! hands off. `.ci/run` and README.md call these same commands.

mod bench_fallback;
mod check_apple;
mod demo;
mod exit_drain;
mod flags;
mod llama;
mod models;
mod test;
mod test_contexts;
mod test_fuzz;
mod test_gpu;
mod test_host2;
mod test_metal;
mod test_moe;
mod test_overflow;
mod test_placement;
mod test_plan;
mod test_real;
mod test_sched;
mod test_server;
mod test_split;
mod test_staging;
mod tidy;
mod tools;
mod util;
mod venv;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cmd = match flags::parse(std::env::args().skip(1)) {
        Ok(cmd) => cmd,
        Err(msg) => {
            eprintln!("error: {msg}\n\n{}", flags::HELP);
            return ExitCode::from(2);
        }
    };
    let root = util::project_root();
    if let Err(e) = std::env::set_current_dir(&root) {
        eprintln!("error: cannot enter {}: {e}", root.display());
        return ExitCode::FAILURE;
    }
    let result = match cmd {
        flags::Cmd::Help => {
            println!("{}", flags::HELP);
            Ok(())
        }
        flags::Cmd::Llama { force } => llama::run(force)
            .and_then(|_| llama::build(&llama::API2, force))
            .map(|_| ()),
        flags::Cmd::Venv => venv::run().map(|_| ()),
        flags::Cmd::Models => models::run()
            .and_then(|_| models::gemma())
            .and_then(|_| models::smollm2_as("Q8_0"))
            .and_then(|_| models::smollm2_as("F16"))
            .map(|_| ()),
        flags::Cmd::Demo { model } => demo::run(model.as_deref()),
        flags::Cmd::BenchFallback => demo::build_plugin()
            .and_then(|p| bench_fallback::run(&p))
            .map(|s| println!("{s}")),
        flags::Cmd::Test(opts) => test::run(&opts),
        flags::Cmd::CheckApple => check_apple::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask error: {e}");
            ExitCode::FAILURE
        }
    }
}
