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

use ane_engine::driver_plan::MIN_LAST_AXIS;
use ane_engine::reference::ReferenceEngine;
use ane_engine::surface::{self, Surface, SPATIAL_MULTIPLE};
use ane_engine::{Engine as _, WeightFile};
use ane_mil::build::{Layout, TiledShape};
use ane_mil::{build, text, Program, ValueType};

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
    /// 2 row tiles and 2 contraction slices, each padded to a multiple of 32 as the planner does.
    TokensMatmul,
    /// `build::tiled_matmul` as used for a pack of experts (`ane_plan::moe`, `GGML_ANE_MOE=on`):
    /// 4 experts as the batch, each with its own n activation columns, token-major.
    ExpertPack,
    /// `build::conv_matmul_q8_0`: the weight kept as Q8_0 blocks through
    /// `constexpr_blockwise_shift_scale` (k must be a multiple of 32), random blocks.
    #[value(name = "q8-0-matmul")]
    Q8_0Matmul,
    /// `build::conv_matmul_q4_0`: the weight kept as Q4_0 blocks (int4), random blocks.
    #[value(name = "q4-0-matmul")]
    Q4_0Matmul,
    /// With `--shape`: the plugin's shape-shared program (`build::tiled_matmul` as the planner
    /// tiles it for an M4, `--layout`, `--tiles`, `--k-chunks`). Not listed by `--list-forms`.
    #[value(hide = true)]
    Shared,
    /// With `--shape`: the weights baked in as a constant (`build::conv_matmul`). Not listed.
    #[value(hide = true)]
    Baked,
    /// The shape-shared program with int8 weights and fp16 block scales as inputs, dequantized
    /// in the program (`build::tiled_matmul_int8`, the planner's token-major tiling for an M4 with
    /// rows rounded to 64 bytes; k a multiple of 32). Not listed: Core ML takes int8 model inputs
    /// only from specification 10 (macOS 26), which `ane_coreml` does not write, so the listed
    /// forms' Core ML step would refuse it; `cargo xtask test` validates its MIL on its own.
    #[value(hide = true)]
    Int8Input,
}

/// The MIL text dialect (`ane_mil::text::Dialect`, probed on a Mac: `ane doctor`'s `probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DialectArg {
    /// `program(1.3)`, `ios18`, `string("x")`: what the driver sends first.
    #[default]
    Shorthand,
    /// `program(1.0)`, `ios16`, `tensor<string, []>("x")`: the other form of the probe.
    Verbose,
}

/// Where the shared form's tokens sit (`GGML_ANE_LAYOUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// Token-major activations and outputs (the plugin's default).
    Tokens,
    /// Channel-first activations and outputs.
    Channels,
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
                // The weights' last axis: at least the driver's shortest (MIN_LAST_AXIS).
                k_chunk: k.div_ceil(2).max(MIN_LAST_AXIS),
                n,
                layout: build::Layout::Channels,
            }),
            Form::TokensMatmul => build::tiled_matmul(build::TiledShape {
                heads: 1,
                tiles: 2,
                k_chunks: 2,
                // Both are a last axis here (`b_w`, `y`; `a_x`): padded to whole 64-byte rows
                // as the planner pads them, so the reference engine runs it.
                m_tile: m
                    .div_ceil(2)
                    .next_multiple_of(SPATIAL_MULTIPLE)
                    .max(MIN_LAST_AXIS),
                k_chunk: k
                    .div_ceil(2)
                    .next_multiple_of(SPATIAL_MULTIPLE)
                    .max(MIN_LAST_AXIS),
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
            // The planner's padding of one expert, 4 of them as the batch.
            Form::ExpertPack => build::tiled_matmul(build::TiledShape {
                heads: 4,
                ..planner_shape(k, m, n, Layout::Tokens)
            }),
            Form::Q8_0Matmul => build::conv_matmul_q8_0(k, m, n),
            Form::Q4_0Matmul => build::conv_matmul_q4_0(k, m, n),
            Form::Baked => build::conv_matmul(k, m, n),
            Form::Shared => build::tiled_matmul(planner_shape(k, m, n, Layout::default())),
            Form::Int8Input => build::tiled_matmul_int8(int8_shape(k, m, n)),
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
        matches!(self, Form::ConvMatmul | Form::Baked) || self.quant().is_some()
    }
}

/// Arguments of `ane mil`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the form names, one per line, and exit.
    #[arg(long, exclusive = true)]
    pub list_forms: bool,
    /// Which program to emit. Also `shared` (the plugin's shape-shared program as the planner
    /// tiles it, see `--layout`, `--tiles`, `--k-chunks`; the default with `--coreml`) and `baked`
    /// (fp16 weights baked in, the doctor's canary), left out of `--list-forms`.
    #[arg(long, value_enum, required_unless_present_any = ["list_forms", "coreml"])]
    pub form: Option<Form>,
    /// Inner (contracted) dimension.
    #[arg(long, required_unless_present_any = ["list_forms", "shape"], conflicts_with = "shape", value_parser = clap::value_parser!(u32).range(1..))]
    pub k: Option<u32>,
    /// Output rows (weight rows).
    #[arg(long, required_unless_present_any = ["list_forms", "shape"], conflicts_with = "shape", value_parser = clap::value_parser!(u32).range(1..))]
    pub m: Option<u32>,
    /// Output columns (tokens).
    #[arg(long, required_unless_present_any = ["list_forms", "shape"], conflicts_with = "shape", value_parser = clap::value_parser!(u32).range(1..))]
    pub n: Option<u32>,
    /// `MxKxN` (weight rows x contraction x tokens), instead of `--m --k --n`.
    #[arg(long, value_parser = parse_shape)]
    pub shape: Option<(usize, usize, usize)>,
    /// Write a Core ML package (`OUT.mlpackage`: Manifest.json, the mlProgram protobuf, weights)
    /// instead of printing MIL text; `--form` defaults to `shared`.
    #[arg(long, value_name = "OUT.mlpackage")]
    pub coreml: Option<PathBuf>,
    /// `--form shared`: where tokens sit in activations and outputs (default `tokens`, the
    /// plugin's default `GGML_ANE_LAYOUT`).
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
    /// `--form shared`: row tiles (default: the planner's for an M4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub tiles: Option<u32>,
    /// `--form shared`: contraction slices (default: the planner's for an M4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub k_chunks: Option<u32>,
    /// With `--coreml`: read the package back, check it gives the same IR, and run the read-back
    /// program and the MIL text on the reference engine with the same inputs: outputs must be
    /// bit-identical.
    #[arg(long, requires = "coreml")]
    pub verify: bool,
    /// The MIL text dialect (default `shorthand`); programs using an iOS18 op (compressed
    /// weights) cannot be written in `verbose`.
    #[arg(long, value_enum, default_value = "shorthand")]
    pub dialect: DialectArg,
    /// Write DIR/model.mil (and DIR/weights/weight.bin for baked forms) instead of printing.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Runs `ane mil`.
pub fn run(args: &Args) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if args.list_forms {
        for form in Form::value_variants() {
            if !form.to_possible_value().is_some_and(|v| v.is_hide_set()) {
                writeln!(stdout, "{}", form.name())?;
            }
        }
        return Ok(());
    }
    // clap enforces presence (`--form` or `--coreml`, `--shape` or all of `--k --m --n`); the
    // expect documents that.
    let form = args.form.unwrap_or(Form::Shared);
    let dims = |d: Option<u32>| d.expect("clap requires --k/--m/--n") as usize;
    let (k, m, n) = match args.shape {
        Some((m, k, n)) => (k, m, n),
        None => (dims(args.k), dims(args.m), dims(args.n)),
    };
    let program = program_for(form, k, m, n, args)?;
    let weights = if form.has_weights() {
        Some(weights_file(form, k, m)?)
    } else {
        None
    };
    if let Some(pkg) = &args.coreml {
        if pkg.extension().is_none_or(|e| e != "mlpackage") {
            anyhow::bail!(
                "--coreml {}: the package must be named *.mlpackage (Core ML recognises a \
                 package by its extension)",
                pkg.display()
            );
        }
        let model = ane_coreml::to_model(&program)?;
        let files: Vec<(&str, &[u8])> = weights
            .iter()
            .map(|w| (build::WEIGHT_PATH, w.as_slice()))
            .collect();
        ane_coreml::package::write(pkg, &model, &files)?;
        if args.verify {
            let summary = verify_package(pkg, &program, &files)?;
            writeln!(stdout, "{}: {summary}", pkg.display())?;
        }
    }
    let mil = match args.dialect {
        DialectArg::Shorthand => text::emit(&program),
        DialectArg::Verbose => text::emit_in(&program, text::Dialect::Verbose)?,
    };
    if args.coreml.is_some() && args.out.is_none() {
        return Ok(());
    }
    let Some(dir) = &args.out else {
        stdout.write_all(mil.as_bytes())?;
        return Ok(());
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mil_path = dir.join("model.mil");
    fs::write(&mil_path, mil).with_context(|| format!("writing {}", mil_path.display()))?;
    if let Some(blob) = weights {
        let wdir = dir.join("weights");
        fs::create_dir_all(&wdir).with_context(|| format!("creating {}", wdir.display()))?;
        let wpath = wdir.join("weight.bin");
        fs::write(&wpath, blob).with_context(|| format!("writing {}", wpath.display()))?;
    }
    Ok(())
}

/// The program `form` stands for at `k x m x n`, after checking what its builder would panic on
/// and what the plugin never dispatches, so bad arguments are an error message.
fn program_for(form: Form, k: usize, m: usize, n: usize, args: &Args) -> Result<Program> {
    if form != Form::Shared {
        for (given, flag) in [
            (args.layout.is_some(), "--layout"),
            (args.tiles.is_some(), "--tiles"),
            (args.k_chunks.is_some(), "--k-chunks"),
        ] {
            if given {
                anyhow::bail!(
                    "{flag} applies to --form shared only, not to --form {}",
                    form.name()
                );
            }
        }
    }
    if (form.quant().is_some() || form == Form::Int8Input)
        && !k.is_multiple_of(build::QuantKind::BLOCK)
    {
        anyhow::bail!(
            "--form {} needs k (= {k}) to be a multiple of 32, one ggml block",
            form.name()
        );
    }
    Ok(match form {
        Form::Shared => build::tiled_matmul(shared_shape(
            k,
            m,
            n,
            match args.layout.unwrap_or(LayoutArg::Tokens) {
                LayoutArg::Tokens => Layout::Tokens,
                LayoutArg::Channels => Layout::Channels,
            },
            args.tiles.map(|t| t as usize),
            args.k_chunks.map(|c| c as usize),
        )?),
        f => f.program(k, m, n),
    })
}

/// The deterministic `weight.bin` of a baked form.
fn weights_file(form: Form, k: usize, m: usize) -> Result<Vec<u8>> {
    let seed = 0x5eed_0000 ^ (m * k) as u64;
    Ok(match form.quant() {
        Some(kind) => {
            if !k.is_multiple_of(build::QuantKind::BLOCK) {
                anyhow::bail!("--form {} needs k to be a multiple of 32", form.name());
            }
            build::weights_blob_quant(kind, &pseudo_random_blocks(kind, m * k, seed), m, k)
        }
        None => build::weights_blob_fp16(&pseudo_random_weights(m * k, seed)),
    })
}

/// `MxKxN` as `(m, k, n)`, each at least 1.
fn parse_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.parse::<usize>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("`{s}` is not MxKxN with positive integers"))?;
    match dims[..] {
        [m, k, n] => Ok((m, k, n)),
        _ => Err(format!("`{s}` is not MxKxN")),
    }
}

/// The planner's tiling of an `m x k` weight at `n` tokens for an M4 (`ane_plan::Planner::tile`).
fn planner_shape(k: usize, m: usize, n: usize, layout: Layout) -> TiledShape {
    ane_plan::Planner {
        layout,
        ..ane_plan::Planner::new(ane_engine::Chip::M4.limits())
    }
    .tile(k, m, n)
}

/// The planner's token-major tiling of an `m x k` weight at `n` tokens for an M4, with rows per
/// tile rounded up to whole 64-byte int8 rows: the shape of [`build::tiled_matmul_int8`].
pub fn int8_shape(k: usize, m: usize, n: usize) -> TiledShape {
    planner_shape(k, m, n, Layout::Tokens).for_int8()
}

/// The plugin's program shape for an `m x k` weight at `n` tokens: the planner's tiling for an M4
/// (`ane_plan::Planner::tile`), with the tile and slice counts overridden if given (rows per tile
/// and the slice length then follow the planner's rounding rules).
///
/// # Errors
///
/// What the plugin never dispatches: `n` not a multiple of 32 (its column buckets are), fewer
/// tiles or slices than the chip's axis limit needs, or so many that a whole tile or slice would
/// be padding.
pub fn shared_shape(
    k: usize,
    m: usize,
    n: usize,
    layout: Layout,
    tiles: Option<usize>,
    k_chunks: Option<usize>,
) -> Result<TiledShape> {
    let limits = ane_engine::Chip::M4.limits();
    if !n.is_multiple_of(SPATIAL_MULTIPLE) || n > limits.max_axis {
        anyhow::bail!(
            "--form shared: n = {n} is not a column bucket of the plugin (a multiple of \
             {SPATIAL_MULTIPLE} up to {})",
            limits.max_axis
        );
    }
    let mut s = planner_shape(k, m, n, layout);
    if let Some(t) = tiles {
        if t < s.tiles {
            anyhow::bail!(
                "--tiles {t}: m = {m} needs at least {} row tiles (axis limit {})",
                s.tiles,
                limits.max_axis
            );
        }
        s.tiles = t;
        s.m_tile = match layout {
            Layout::Channels => m.div_ceil(t),
            Layout::Tokens => m
                .div_ceil(t)
                .next_multiple_of(SPATIAL_MULTIPLE)
                .max(MIN_LAST_AXIS),
        };
        if (t - 1) * s.m_tile >= m {
            anyhow::bail!(
                "--tiles {t}: with {} rows per tile the last tile of m = {m} would be all padding",
                s.m_tile
            );
        }
    }
    if let Some(c) = k_chunks {
        if c < s.k_chunks {
            anyhow::bail!(
                "--k-chunks {c}: k = {k} needs at least {} slices (axis limit {})",
                s.k_chunks,
                limits.max_axis
            );
        }
        s.k_chunks = c;
        s.k_chunk = k
            .div_ceil(c)
            .next_multiple_of(SPATIAL_MULTIPLE)
            .max(MIN_LAST_AXIS);
        if (c - 1) * s.k_chunk >= k {
            anyhow::bail!(
                "--k-chunks {c}: with slices of {} the last slice of k = {k} would be all padding",
                s.k_chunk
            );
        }
    }
    Ok(s)
}

/// Runs `mil` on the reference engine with deterministic inputs; the fp16 bits of each output.
pub fn run_reference(mil: &str, weights: &[WeightFile]) -> Result<Vec<Vec<u16>>> {
    let program = text::parse(mil)?;
    let main = program.function("main").context("no function main")?;
    let engine = ReferenceEngine::new(ane_engine::Chip::M4.limits());
    engine.use_own_surfaces(false);
    let id = engine.compile(mil, weights)?;
    // The engine binds in alphabetical order of the names.
    let mut ins: Vec<(String, ValueType)> = main.inputs.clone();
    ins.sort_by(|a, b| a.0.cmp(&b.0));
    let mut outs: Vec<(String, ValueType)> = main
        .outputs
        .iter()
        .map(|o| {
            (
                o.clone(),
                main.value_type(o).cloned().expect("typed output"),
            )
        })
        .collect();
    outs.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes: Vec<usize> = ins
        .iter()
        .chain(&outs)
        .map(|(_, t)| t.byte_size())
        .collect();
    let alloc = surface::request_alloc_size(&bytes);
    let inputs: Vec<Surface> = ins
        .iter()
        .enumerate()
        .map(|(i, (_, t))| {
            let mut s = Surface::new(alloc);
            let vals = pseudo_random_weights(t.numel(), 0x1234 + i as u64);
            s.fp16_mut(t.numel()).copy_from_slice(&vals);
            s
        })
        .collect();
    let mut outputs: Vec<Surface> = outs.iter().map(|_| Surface::new(alloc)).collect();
    {
        let in_refs: Vec<&Surface> = inputs.iter().collect();
        let mut out_refs: Vec<&mut Surface> = outputs.iter_mut().collect();
        engine.evaluate(id, &in_refs, &mut out_refs)?;
    }
    Ok(outputs
        .iter()
        .zip(&outs)
        .map(|(s, (_, t))| s.fp16(t.numel()).iter().map(|h| h.to_bits()).collect())
        .collect())
}

/// The engine's weight files from `(BLOBFILE path, bytes)` pairs.
fn weight_files<'a>(w: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<WeightFile> {
    w.map(|(path, bytes)| WeightFile {
        path: path.to_string(),
        bytes: bytes.to_vec(),
    })
    .collect()
}

/// Reads `pkg` back and checks it against `program` and its weight files `weights` (what
/// `--out` writes next to the MIL text): the same IR, and bit-identical reference-engine outputs
/// for the read-back program with the package's weight files and for `program`'s MIL text with
/// `weights`, so the package's protobuf and its `weights/` folder are both judged.
///
/// # Errors
///
/// A package that does not read back, a different IR, outputs that differ or are all zero (which
/// would make the comparison prove nothing), or a reference-engine failure.
pub fn verify_package(
    pkg: &std::path::Path,
    program: &Program,
    weights: &[(&str, &[u8])],
) -> Result<String> {
    let read = ane_coreml::package::read(pkg)?;
    let back = ane_coreml::from_model(&read.model)?;
    if back != *program {
        anyhow::bail!(
            "the program read back from {} differs from the one written",
            pkg.display()
        );
    }
    let from_package = weight_files(read.weights.iter().map(|(p, b)| (p.as_str(), b.as_slice())));
    let from_proto = run_reference(&text::emit(&back), &from_package)?;
    let from_text = run_reference(&text::emit(program), &weight_files(weights.iter().copied()))?;
    if from_proto != from_text {
        anyhow::bail!("reference engine outputs differ between the protobuf and the MIL text");
    }
    // fp16 +0 and -0: outputs that are all zero would make "identical" prove nothing.
    if from_text.iter().flatten().all(|&b| b & 0x7fff == 0) {
        anyhow::bail!("reference engine outputs are all zero: the comparison would prove nothing");
    }
    let values: usize = from_text.iter().map(Vec::len).sum();
    Ok(format!(
        "same IR, {} weight file(s), reference outputs bit-identical ({values} fp16 values)",
        from_package.len()
    ))
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

    /// Each Core ML package form reads back to the same IR, and the reference engine gives the same
    /// bits for the read-back program as for the MIL text; a program that differs is caught.
    #[test]
    fn coreml_packages_verify_against_the_text_path() {
        let dir = std::env::temp_dir().join(format!("ane-cli-coreml-{}", std::process::id()));
        let cases = [
            (Form::Baked, Layout::Tokens, None, None),
            (Form::Shared, Layout::Tokens, None, None),
            (Form::Shared, Layout::Tokens, Some(2), Some(2)),
            (Form::Shared, Layout::Channels, Some(3), Some(2)),
            (Form::Q8_0Matmul, Layout::Tokens, None, None),
            (Form::Q4_0Matmul, Layout::Tokens, None, None),
        ];
        for (i, (form, layout, tiles, kc)) in cases.into_iter().enumerate() {
            let (m, k, n) = (96, 128, 64);
            let program = match form {
                Form::Shared => {
                    build::tiled_matmul(shared_shape(k, m, n, layout, tiles, kc).unwrap())
                }
                f => f.program(k, m, n),
            };
            let pkg = dir.join(format!("{i}.mlpackage"));
            let w = form
                .has_weights()
                .then(|| weights_file(form, k, m).unwrap());
            let files: Vec<(&str, &[u8])> = w
                .iter()
                .map(|w| (build::WEIGHT_PATH, w.as_slice()))
                .collect();
            ane_coreml::package::write(&pkg, &ane_coreml::to_model(&program).unwrap(), &files)
                .unwrap();
            let summary = verify_package(&pkg, &program, &files).unwrap();
            assert!(summary.contains("bit-identical"), "{summary}");
            let mut other = program.clone();
            other.functions[0].statements[0].output.push('_');
            assert!(verify_package(&pkg, &other, &files).is_err());
            if let Some(w) = &w {
                // One weight flipped in the package's file: its outputs are no longer the text's.
                let path = pkg.join("Data/com.apple.CoreML/weights/weight.bin");
                let mut bytes = std::fs::read(&path).unwrap();
                let at = build::FIRST_BLOB_OFFSET as usize + 64;
                bytes[at] ^= 0x55;
                std::fs::write(&path, &bytes).unwrap();
                let e = verify_package(&pkg, &program, &files).unwrap_err();
                assert!(e.to_string().contains("differ"), "{e}");
                assert_ne!(&bytes, w);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_shapes_follow_the_planner_and_refuse_what_it_never_makes() {
        let s = shared_shape(128, 96, 32, Layout::Tokens, Some(2), Some(2)).unwrap();
        assert_eq!((s.tiles, s.m_tile, s.k_chunks, s.k_chunk), (2, 64, 2, 64));
        let s = shared_shape(64, 96, 32, Layout::Channels, Some(3), None).unwrap();
        assert_eq!((s.tiles, s.m_tile, s.k_chunks, s.k_chunk), (3, 32, 1, 64));
        // The planner's own tiling beyond the M4's axis limit.
        let s = shared_shape(70_000, 140_000, 64, Layout::Tokens, None, None).unwrap();
        assert_eq!((s.tiles, s.k_chunks), (3, 2));
        let err = |r: Result<TiledShape>| r.unwrap_err().to_string();
        assert!(err(shared_shape(64, 96, 50, Layout::Tokens, None, None)).contains("n = 50"));
        // k = 64 in 3 slices of 32: the third would be padding only.
        assert!(err(shared_shape(64, 96, 32, Layout::Tokens, None, Some(3))).contains("padding"));
        assert!(err(shared_shape(64, 96, 32, Layout::Tokens, Some(4), None)).contains("padding"));
        assert!(
            err(shared_shape(64, 140_000, 32, Layout::Tokens, Some(2), None))
                .contains("at least 3")
        );
    }

    /// `ane mil` as the command line parses it.
    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn run_line(line: &str) -> Result<()> {
        use clap::Parser as _;
        let cli = Cli::try_parse_from(std::iter::once("mil").chain(line.split_whitespace()))?;
        run(&cli.args)
    }

    #[test]
    fn bad_arguments_are_errors_that_say_why() {
        let dir = std::env::temp_dir().join(format!("ane-cli-coreml-args-{}", std::process::id()));
        let pkg = |name: &str| dir.join(name).display().to_string();
        let err = |line: String| run_line(&line).unwrap_err().to_string();
        let ok = pkg("ok.mlpackage");
        assert!(err(format!("--coreml {} --shape 96x64x64", pkg("x.pkg"))).contains(".mlpackage"));
        assert!(err(format!("--coreml {ok} --shape 96x64")).contains("MxKxN"));
        assert!(err(format!(
            "--coreml {ok} --shape 96x64x64 --form baked --tiles 2"
        ))
        .contains("--form shared only"));
        assert!(err(format!(
            "--coreml {ok} --shape 96x64x64 --form conv-matmul --layout channels"
        ))
        .contains("--layout"));
        assert!(
            err(format!("--coreml {ok} --shape 96x48x64 --form q4-0-matmul"))
                .contains("multiple of 32")
        );
        assert!(err(format!("--coreml {ok} --shape 96x64x64 --k 64")).contains("--k"));
        assert!(err("--shape 96x64x64 --verify".to_string()).contains("--coreml"));
        assert!(
            !dir.join("ok.mlpackage").exists(),
            "no package from a refused command"
        );
        // Something at the path that is not a package is not replaced.
        std::fs::create_dir_all(dir.join("keep.mlpackage")).unwrap();
        std::fs::write(dir.join("keep.mlpackage/notes.txt"), "mine").unwrap();
        assert!(err(format!(
            "--coreml {} --shape 96x64x64",
            pkg("keep.mlpackage")
        ))
        .contains("not a Core ML package"));
        assert!(dir.join("keep.mlpackage/notes.txt").is_file());
        // The good line writes a package, and writing it again replaces it.
        for _ in 0..2 {
            run_line(
                format!("--coreml {ok} --shape 96x64x64 --layout channels --tiles 2").as_str(),
            )
            .unwrap();
            assert!(dir.join("ok.mlpackage/Manifest.json").is_file());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("96x64x32"), Ok((96, 64, 32)));
        assert!(parse_shape("96x64").is_err());
        assert!(parse_shape("0x1x1").is_err());
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
                "expert-pack",
                "q8-0-matmul",
                "q4-0-matmul",
                "shared",
                "baked",
                "int8-input"
            ]
        );
    }
}
