//! `shardrop grad encode|decode`: the codec for training loops that write safetensors.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use shardrop::format::codec::{
    CodecLimits, CodecParams, Dense, EfState, EncodeOptions, IndexEncoding, ScaleMode, ValueFormat,
    accumulate_section, dense_to_safetensors, model_of,
};
use shardrop::format::envelope::{Expect, Limits, MAGIC, read_all_sections};

use super::Ctx;
use crate::out;

#[derive(Subcommand)]
pub enum GradCommand {
    /// Compress an update (safetensors: f32, bf16 or f16) into section files, advancing the
    /// error-feedback state.
    Encode(EncodeArgs),
    /// Decode section files, a section folder or a gradient envelope into dense f32.
    Decode(DecodeArgs),
}

/// Codec parameters as flags (shared by grad encode and bench codec).
#[derive(Args, Clone, Debug)]
pub struct CodecArgs {
    /// Chunk size C (power of two, 64..65536).
    #[arg(long, default_value_t = 4096)]
    pub chunk: u32,
    /// Values kept per chunk.
    #[arg(long, conflicts_with = "density")]
    pub k: Option<u32>,
    /// Fraction kept per chunk (k = round(density * C)); default k = 64 at C = 4096.
    #[arg(long)]
    pub density: Option<f64>,
    /// How each kept value is stored: bf16, or int8/int4/int2 with a scale per chunk or
    /// tensor (int2: 2 bits a value, 10.25 bits per kept value with its index).
    #[arg(long, default_value = "int2", value_parser = ["bf16", "int8", "int4", "int2"])]
    pub values: String,
    /// How the kept positions are stored: packed (log2 C bits each) or compact (the codec's
    /// shorter form, `schemas/gradient.md`).
    #[arg(long, default_value = "compact", value_parser = ["packed", "compact"])]
    pub indices: String,
    /// Scale per chunk or per tensor (integer value formats).
    #[arg(long, default_value = "chunk", value_parser = ["chunk", "tensor"])]
    pub scales: String,
}

impl CodecArgs {
    pub fn params(&self) -> anyhow::Result<CodecParams> {
        let k = match (self.k, self.density) {
            (Some(k), _) => k,
            (None, Some(d)) => CodecParams::k_for_density(self.chunk, d),
            (None, None) => CodecParams::k_for_density(self.chunk, 64.0 / 4096.0),
        };
        let p = CodecParams {
            chunk: self.chunk,
            k,
            values: ValueFormat::parse(&self.values).ok_or_else(|| {
                crate::out::usage(format!(
                    "--values {:?}: expected int2, int4, int8 or bf16",
                    self.values
                ))
            })?,
            scales: if self.scales == "tensor" {
                ScaleMode::Tensor
            } else {
                ScaleMode::Chunk
            },
            indices: if self.indices == "packed" {
                IndexEncoding::Packed
            } else {
                IndexEncoding::Compact
            },
        };
        p.validate()?;
        Ok(p)
    }
}

#[derive(Args)]
pub struct EncodeArgs {
    /// The update (DiLoCo's θ_start − θ_end, or a gradient) as safetensors.
    update: PathBuf,
    /// Folder for the section files (must be empty or absent).
    out: PathBuf,
    /// Folder holding the error-feedback state (created on first use).
    #[arg(long)]
    state: PathBuf,
    #[command(flatten)]
    codec: CodecArgs,
    /// Error-feedback decay beta.
    #[arg(long, default_value_t = 0.9)]
    beta: f32,
    /// Target payload per section, MiB.
    #[arg(long, default_value_t = 16)]
    section_mib: usize,
    /// Where to encode: cpu, cuda or cuda:N (GPU builds; falls back to the CPU, saying why).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
pub struct DecodeArgs {
    /// A section folder, one section file, or a gradient envelope (path or URL).
    input: String,
    /// Dense f32 safetensors output.
    out: PathBuf,
    /// Refuse tensors not in this model (safetensors file; names and shapes are used).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Refuse input whose sections declare more decompressed bytes than this, or whose
    /// tensors would decode to more dense f32 bytes (checked before allocating).
    #[arg(long, default_value = "4GiB", value_parser = super::parse_size)]
    max_bytes: u64,
}

pub async fn run(ctx: &Ctx, cmd: GradCommand) -> anyhow::Result<()> {
    match cmd {
        GradCommand::Encode(a) => encode(ctx, a).await,
        GradCommand::Decode(a) => decode(ctx, a).await,
    }
}

async fn encode(ctx: &Ctx, a: EncodeArgs) -> anyhow::Result<()> {
    let opts = EncodeOptions {
        params: a.codec.params()?,
        beta: a.beta,
        section_bytes: a.section_mib << 20,
    };
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{}: output folder is not empty", a.out.display());
    }
    let update = a.update.clone();
    let state_dir = a.state.clone();
    let out_dir = a.out.clone();
    let device = a.device.clone();
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let chosen = super::device::choose(&device)?;
        let started = Instant::now();
        let bytes =
            std::fs::read(&update).with_context(|| format!("{}: cannot read", update.display()))?;
        let mut state = EfState::load(&state_dir)
            .with_context(|| format!("{}: cannot load state", state_dir.display()))?;
        let encoded = chosen
            .encode_update(&bytes, &mut state, &opts)
            .with_context(|| format!("{}", update.display()))?;
        let encode_secs = started.elapsed().as_secs_f64();
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("{}: cannot create", out_dir.display()))?;
        let mut files = Vec::new();
        let mut zstd_bytes = 0u64;
        for (name, payload) in &encoded.sections {
            let path = out_dir.join(format!("{name}.safetensors"));
            shardrop::files::write_replace_beside(&path, payload)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            zstd_bytes += zstd::bulk::compress(payload, 3)
                .map(|c| c.len() as u64)
                .unwrap_or(payload.len() as u64);
            files.push(path.display().to_string());
        }
        // The state advances only once the sections are safely written: a crash before this
        // point re-encodes the same bytes from the old state.
        state
            .save(&state_dir)
            .with_context(|| format!("{}: cannot save state", state_dir.display()))?;
        let s = encoded.stats;
        let mut report = serde_json::json!({
            "sections": files, "tensors": s.tensors, "elements": s.elements,
            "dense_bytes": s.dense_bytes, "bytes": s.bytes, "zstd_bytes": zstd_bytes,
            "payload_bytes": s.payload_bytes, "kept": s.kept,
            "ratio": s.dense_bytes as f64 / s.bytes.max(1) as f64,
            "wire_ratio": s.dense_bytes as f64 / zstd_bytes.max(1) as f64,
            "bits_per_kept": s.payload_bytes as f64 * 8.0 / s.kept.max(1) as f64,
            "bits_per_kept_with_container": s.bytes as f64 * 8.0 / s.kept.max(1) as f64,
            "density": s.kept as f64 / s.elements.max(1) as f64,
            "params": opts.params, "beta": (opts.beta as f64 * 1e6).round() / 1e6, "encode_seconds": encode_secs,
        });
        if let (Some(r), serde_json::Value::Object(d)) = (report.as_object_mut(), chosen.report()) {
            r.extend(d);
        }
        Ok(report)
    })
    .await??;
    let text = format!(
        "{} tensors, {} elements -> {} kept ({:.2}%), {} bytes ({} after zstd), ratio {:.1}x, {:.2} bits per kept element; {} section file(s) in {} (encoded on {})",
        report["tensors"],
        report["elements"],
        report["kept"],
        report["density"].as_f64().unwrap_or(0.0) * 100.0,
        report["bytes"],
        report["zstd_bytes"],
        report["ratio"].as_f64().unwrap_or(0.0),
        report["bits_per_kept"].as_f64().unwrap_or(0.0),
        report["sections"].as_array().map_or(0, |v| v.len()),
        a.out.display(),
        report["device"].as_str().unwrap_or("?")
    );
    out::emit(ctx, &report, &text);
    Ok(())
}

fn section_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors section files", dir.display());
    }
    Ok(files)
}

async fn load_sections(
    ctx: &Ctx,
    input: &str,
    max_bytes: u64,
    model: Option<&shardrop::format::codec::ModelSpec>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let local = Path::new(input);
    if !input.contains("://") && local.is_dir() {
        return section_files(local)?
            .into_iter()
            .map(|p| {
                Ok((
                    p.display().to_string(),
                    std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?,
                ))
            })
            .collect();
    }
    if !input.contains("://") {
        let bytes = std::fs::read(local).with_context(|| format!("{input}: cannot read"))?;
        if !bytes.starts_with(MAGIC) {
            return Ok(vec![(input.to_string(), bytes)]);
        }
    }
    // A gradient envelope: verified, then every section fetched.
    let (target, env) = super::object::open_verified(ctx, input, &Expect::default()).await?;
    let limits = Limits {
        max_raw_len: max_bytes,
        max_section_raw_len: max_bytes,
        ..Limits::default()
    };
    let object = env.object.clone();
    if env.head.header.raw_len > max_bytes {
        // The header check in `open_verified` used the default limits; this one is ours.
        return Err(super::object::over_limit(
            &object,
            format!(
                "the sections declare {} decompressed bytes, over --max-bytes {max_bytes}",
                env.head.header.raw_len
            ),
        ));
    }
    // With the model and the codec the header names, no section may claim more than the
    // whole model encodes to (checked before anything is decompressed).
    if let (Some(m), Some(params)) = (
        model,
        shardrop::round::publish::codec_of_header(&env.head.header.codec_params),
    ) {
        let bound = shardrop::format::codec::section_raw_bound(&m.tensors, &params);
        if env.head.header.raw_len > bound {
            return Err(super::object::over_limit(
                &object,
                format!(
                    "the sections declare {} decompressed bytes; the model takes at most {bound} with this codec",
                    env.head.header.raw_len
                ),
            ));
        }
    }
    let bufs = read_all_sections(target.store.as_ref(), &env, &limits).await?;
    Ok(env
        .sections()
        .iter()
        .map(|s| format!("{object}#{}", s.name))
        .zip(bufs)
        .collect())
}

async fn decode(ctx: &Ctx, a: DecodeArgs) -> anyhow::Result<()> {
    let model = match &a.model {
        Some(p) => Some(model_of(
            &std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?,
        )?),
        None => None,
    };
    let sections = load_sections(ctx, &a.input, a.max_bytes, model.as_ref()).await?;
    let out_path = a.out.clone();
    let max_bytes = a.max_bytes;
    let n_sections = sections.len();
    let (tensors, elements) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, u64)> {
            let mut dense = Dense::new();
            let limits = CodecLimits {
                max_dense_elements: max_bytes / 4,
                ..CodecLimits::default()
            };
            for (name, bytes) in &sections {
                accumulate_section(&mut dense, bytes, model.as_ref(), &limits, 1.0).map_err(
                    |e| crate::out::Refusal {
                        reason: e.reason(),
                        message: format!("{name}: rejected ({}): {e}", e.reason()),
                    },
                )?;
            }
            let out = dense_to_safetensors(&dense)?;
            shardrop::files::write_replace_beside(&out_path, &out)
                .with_context(|| format!("{}: cannot write", out_path.display()))?;
            Ok((
                dense.len(),
                dense.values().map(|(_, v)| v.len() as u64).sum(),
            ))
        })
        .await??;
    out::emit(
        ctx,
        &serde_json::json!({"out": a.out.display().to_string(), "sections": n_sections, "tensors": tensors, "elements": elements}),
        &format!(
            "decoded {n_sections} section(s): {tensors} tensors, {elements} elements -> {}",
            a.out.display()
        ),
    );
    Ok(())
}
