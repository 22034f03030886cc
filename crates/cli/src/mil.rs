//! `ane mil`: writes a program form from `ane_mil::build` as MIL text, so the forms can be read,
//! diffed and fed to the validator without running the backend.
//!
//! Baked-weight forms get a `weights/weight.bin` of deterministic pseudo-random fp16 values: the
//! validator needs a real file to check the blob, and a fixed seed makes the output reproducible
//! for CI and for `--eval` comparisons.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use half::f16;

use ane_mil::{build, text, Program};

/// Program forms `ane mil` can emit.
// Every form is a matmul; the prefix is the part that differs, and it is also the CLI name.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Form {
    /// 1x1 conv with the weight baked in as a BLOBFILE (`build::conv_matmul`).
    ConvMatmul,
    /// matmul with the weight as a second runtime input (`build::dyn_matmul`).
    DynMatmul,
    /// The planner's shape-shared form (`build::tiled_matmul`), here with M cut in 2 row tiles and
    /// K in 2 contraction slices (m and k must be even).
    TiledMatmul,
    /// `build::tiled_matmul` as used for attention: 2 independent heads.
    HeadsMatmul,
    /// `build::tiled_matmul` with token-major activations (`Layout::Tokens`, `GGML_ANE_LAYOUT=tokens`),
    /// 2 row tiles and 2 contraction slices.
    TokensMatmul,
    /// `build::conv_matmul_q8_0`: the weight kept as Q8_0 blocks through
    /// `constexpr_blockwise_shift_scale` (k must be a multiple of 32), random blocks.
    #[value(name = "q8-0-matmul")]
    Q8_0Matmul,
    /// `build::conv_matmul_q4_0`: the weight kept as Q4_0 blocks (int4), random blocks.
    #[value(name = "q4-0-matmul")]
    Q4_0Matmul,
}

impl Form {
    fn name(self) -> String {
        self.to_possible_value()
            .expect("no skipped variants")
            .get_name()
            .to_string()
    }

    fn program(self, k: usize, m: usize, n: usize) -> Program {
        match self {
            Form::ConvMatmul => build::conv_matmul(k, m, n),
            Form::DynMatmul => build::dyn_matmul(k, m, n),
            Form::TiledMatmul => build::tiled_matmul(build::TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 2,
                m_tile: m.div_ceil(2),
                k_chunk: k.div_ceil(2),
                n,
                layout: build::Layout::Channels,
            }),
            Form::TokensMatmul => build::tiled_matmul(build::TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 2,
                m_tile: m.div_ceil(2),
                k_chunk: k.div_ceil(2),
                n,
                layout: build::Layout::Tokens,
            }),
            Form::HeadsMatmul => build::tiled_matmul(build::TiledShape {
                heads: 2,
                tiles: 1,
                k_chunks: 1,
                m_tile: m,
                k_chunk: k,
                n,
                layout: build::Layout::Channels,
            }),
            Form::Q8_0Matmul => build::conv_matmul_q8_0(k, m, n),
            Form::Q4_0Matmul => build::conv_matmul_q4_0(k, m, n),
        }
    }

    /// The ggml block type of a compressed-weight form.
    fn quant(self) -> Option<build::QuantKind> {
        match self {
            Form::Q8_0Matmul => Some(build::QuantKind::Q8_0),
            Form::Q4_0Matmul => Some(build::QuantKind::Q4_0),
            _ => None,
        }
    }

    /// Whether the form reads `@model_path/weights/weight.bin`.
    fn has_weights(self) -> bool {
        matches!(self, Form::ConvMatmul) || self.quant().is_some()
    }
}

/// Arguments of `ane mil`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the form names, one per line, and exit.
    #[arg(long, exclusive = true)]
    pub list_forms: bool,
    /// Which program to emit.
    #[arg(long, value_enum, required_unless_present = "list_forms")]
    pub form: Option<Form>,
    /// Inner (contracted) dimension.
    #[arg(long, required_unless_present = "list_forms", value_parser = clap::value_parser!(u32).range(1..))]
    pub k: Option<u32>,
    /// Output rows (weight rows).
    #[arg(long, required_unless_present = "list_forms", value_parser = clap::value_parser!(u32).range(1..))]
    pub m: Option<u32>,
    /// Output columns (tokens).
    #[arg(long, required_unless_present = "list_forms", value_parser = clap::value_parser!(u32).range(1..))]
    pub n: Option<u32>,
    /// Write DIR/model.mil (and DIR/weights/weight.bin for baked forms) instead of printing.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Runs `ane mil`.
pub fn run(args: &Args) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if args.list_forms {
        for form in Form::value_variants() {
            writeln!(stdout, "{}", form.name())?;
        }
        return Ok(());
    }
    // clap enforces presence; the expects document that.
    let form = args.form.expect("clap requires --form");
    let dims = |d: Option<u32>| d.expect("clap requires --k/--m/--n") as usize;
    let (k, m, n) = (dims(args.k), dims(args.m), dims(args.n));
    let mil = text::emit(&form.program(k, m, n));
    let Some(dir) = &args.out else {
        stdout.write_all(mil.as_bytes())?;
        return Ok(());
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mil_path = dir.join("model.mil");
    fs::write(&mil_path, mil).with_context(|| format!("writing {}", mil_path.display()))?;
    if form.has_weights() {
        let wdir = dir.join("weights");
        fs::create_dir_all(&wdir).with_context(|| format!("creating {}", wdir.display()))?;
        let wpath = wdir.join("weight.bin");
        let seed = 0x5eed_0000 ^ (m * k) as u64;
        let blob = match form.quant() {
            Some(kind) => {
                if !k.is_multiple_of(build::QuantKind::BLOCK) {
                    anyhow::bail!("--form {} needs k to be a multiple of 32", form.name());
                }
                build::weights_blob_quant(kind, &pseudo_random_blocks(kind, m * k, seed), m, k)
            }
            None => build::weights_blob_fp16(&pseudo_random_weights(m * k, seed)),
        };
        fs::write(&wpath, blob).with_context(|| format!("writing {}", wpath.display()))?;
    }
    Ok(())
}

/// `len` fp16 values in [-1, 1), from a fixed-seed SplitMix64 stream (no dependency needed for
/// numbers that only have to be reproducible, not good).
pub fn pseudo_random_weights(len: usize, seed: u64) -> Vec<f16> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 random bits -> [-1, 1), exactly representable in f32 before the fp16 rounding.
            f16::from_f32(((z >> 40) as f32) / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Raw ggml blocks of `kind` for `len` weights (a multiple of 32): scales `d` in [-1/64, 1/64)
/// from [`pseudo_random_weights`], quant bytes from the same stream.
pub fn pseudo_random_blocks(kind: build::QuantKind, len: usize, seed: u64) -> Vec<u8> {
    let nb = len / build::QuantKind::BLOCK;
    let qbytes = kind.block_bytes() - 2;
    let d = pseudo_random_weights(nb, seed);
    let q = pseudo_random_weights(nb * qbytes, seed ^ 0xb10c);
    let mut out = Vec::with_capacity(nb * kind.block_bytes());
    for (b, d) in d.iter().enumerate() {
        out.extend_from_slice(&f16::from_f32(d.to_f32() / 64.0).to_le_bytes());
        // The fp16 bits of a value in [-1, 1) carry enough randomness in their low byte.
        out.extend(q[b * qbytes..(b + 1) * qbytes].iter().map(|v| {
            let bits = v.to_bits();
            (bits ^ (bits >> 8)) as u8
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_deterministic_and_in_range() {
        let a = pseudo_random_weights(100, 7);
        assert_eq!(a, pseudo_random_weights(100, 7));
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(&v.to_f32())));
        assert!(a.iter().any(|v| v.to_f32() < 0.0) && a.iter().any(|v| v.to_f32() > 0.0));
    }

    #[test]
    fn form_names_are_kebab_case() {
        let names: Vec<String> = Form::value_variants().iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "conv-matmul",
                "dyn-matmul",
                "tiled-matmul",
                "heads-matmul",
                "tokens-matmul",
                "q8-0-matmul",
                "q4-0-matmul"
            ]
        );
    }
}
