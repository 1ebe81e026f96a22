//! `ckpt push|pull|ls|verify|gc`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use shardrop::checkpoint::admin::{gc, list, verify};
use shardrop::checkpoint::pull::{PullOptions, locate, pull};
use shardrop::checkpoint::push::{PushOptions, push};
use shardrop::identity::PeerId;
use shardrop::round::registry::{Job, Registry, Role};

use super::{Ctx, keys, parse_size};
use crate::out;

#[derive(Subcommand)]
pub enum CkptCommand {
    /// Pack safetensors (files or an HF model folder) into shards and push them with a signed manifest.
    Push(PushArgs),
    /// Fetch and verify a checkpoint into an HF-loadable folder (resumable).
    Pull(PullArgs),
    /// List a run's checkpoints.
    Ls(LsArgs),
    /// Verify every byte of a checkpoint in the store; report every bad object.
    Verify(VerifyArgs),
    /// Delete old checkpoints and the per-window objects older than the oldest kept one.
    Gc(GcArgs),
}

impl CkptCommand {
    /// What to tell a user who interrupted this command (Ctrl-C): where its work is kept.
    pub fn interrupted_hint(&self) -> Option<String> {
        match self {
            CkptCommand::Pull(a) => Some(format!(
                "the chunks already verified are kept in {}/.shardrop-partial: run the same command again to resume (only missing chunks are fetched; chunks that were in flight, up to --concurrency x 16 MiB, are fetched again)",
                a.out.display()
            )),
            CkptCommand::Push(_) => Some(
                "shards already uploaded stay (create-only) and LATEST has not moved: run the same command again to resume".into(),
            ),
            _ => None,
        }
    }
}

#[derive(Args)]
pub struct PushArgs {
    /// Safetensors files, or one Hugging Face model folder.
    #[arg(required = true)]
    src: Vec<PathBuf>,
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// The aggregator's key (checkpoints go into its store).
    #[arg(long)]
    key: PathBuf,
    /// The checkpoint's step (its folder name; LATEST moves only to a larger one).
    #[arg(long)]
    step: u64,
    /// The last window whose aggregate these parameters include (catch-up starts after it).
    #[arg(long)]
    window: Option<u64>,
    /// Target shard size (a tensor larger than this gets a shard of its own).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    shard_size: u64,
    /// Shards uploaded at once (each in 4 parallel multipart parts).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Push tensors that are not the run's model (by default the folder must hold exactly the
    /// run's tensors and shapes, plus optional outer_momentum.* buffers; else exit 3,
    /// model_mismatch, and LATEST does not move).
    #[arg(long)]
    any_model: bool,
}

/// Where a checkpoint is and who signed it.
#[derive(Args)]
pub struct From {
    /// `latest` (needs --registry) or a manifest URL (…/runs/RUN/ckpt/STEP/manifest).
    what: String,
    /// The run's registry: the signer must be its aggregator (needed for `latest`).
    #[arg(
        long,
        required_unless_present = "signer",
        required_if_eq("what", "latest")
    )]
    registry: Option<String>,
    /// Or the signer's peer id (a manifest URL without the registry).
    #[arg(long)]
    signer: Option<String>,
}

#[derive(Args)]
pub struct PullArgs {
    #[command(flatten)]
    from: From,
    /// The folder to write (created if missing; nothing is written outside it).
    out: PathBuf,
    /// Only tensors matching these globs (ranged reads of the shards).
    #[arg(long, num_args = 1..)]
    tensors: Vec<String>,
    /// This rank's tensor-parallel slice (0-based, with --tp-size): each 2-D tensor is cut
    /// into --tp-size parts along the dimension schemas/checkpoint.md names (1 for
    /// row-parallel layers such as o_proj and down_proj, else 0) and only this part is
    /// fetched where it can be.
    #[arg(long, requires = "tp_size")]
    tp_rank: Option<u64>,
    /// The number of tensor-parallel ranks (with --tp-rank).
    #[arg(long, requires = "tp_rank")]
    tp_size: Option<u64>,
    /// Ranged GETs in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// OUT holds files no earlier pull of this run wrote: move them into
    /// OUT/.shardrop-displaced/ first (without it such a folder is refused, so a loader never
    /// reads a stale file beside the checkpoint's).
    #[arg(long)]
    force: bool,
    /// Leave out the outer optimizer's momentum (the momentum-*.safetensors shards): for a
    /// model to evaluate or fine-tune. A peer that replays aggregates with a momentum
    /// optimizer needs them (apply --from OUT reads them).
    #[arg(long)]
    without_momentum: bool,
}

#[derive(Args)]
pub struct LsArgs {
    /// The run's registry URL.
    registry: String,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    from: From,
    /// Shards streamed and checked at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(Args)]
pub struct GcArgs {
    /// The run's registry URL.
    registry: String,
    /// The aggregator's key (gc deletes in its own store only).
    #[arg(long)]
    key: PathBuf,
    /// How many of the newest complete checkpoints to keep (besides whatever LATEST names).
    #[arg(long)]
    keep: usize,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(ctx: &Ctx, c: CkptCommand) -> anyhow::Result<()> {
    match c {
        CkptCommand::Push(a) => push_cmd(ctx, a).await,
        CkptCommand::Pull(a) => pull_cmd(ctx, a).await,
        CkptCommand::Ls(a) => ls_cmd(ctx, a).await,
        CkptCommand::Verify(a) => verify_cmd(ctx, a).await,
        CkptCommand::Gc(a) => gc_cmd(ctx, a).await,
    }
}

async fn push_cmd(ctx: &Ctx, a: PushArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let total: u64 = a.src.iter().map(|p| dir_bytes(p)).sum();
    let bar = out::bytes_bar(ctx, total, "push");
    let started = std::time::Instant::now();
    let opts = PushOptions {
        step: a.step,
        window: a.window,
        shard_size: a.shard_size,
        concurrency: a.concurrency,
        any_model: a.any_model,
    };
    let p = push(Job::new(&reg, &id, &ctx.s3), &a.src, &opts, &|n| bar.inc(n)).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let mut json = serde_json::to_value(&p)?;
    json["seconds"] = secs.into();
    json["mib_per_s"] = (p.bytes as f64 / (1 << 20) as f64 / secs).into();
    out::emit(
        ctx,
        &json,
        &format!(
            "step {}: {} shards, {} tensors, {} files, {:.1} MiB in {secs:.1} s{}{} -> {}{}",
            p.step,
            p.shards,
            p.tensors,
            p.files,
            p.bytes as f64 / (1 << 20) as f64,
            if p.skipped_shards > 0 {
                format!(" ({} shards already there)", p.skipped_shards)
            } else {
                String::new()
            },
            if p.already_published {
                " (already published)"
            } else {
                ""
            },
            p.manifest,
            if p.latest {
                "; LATEST points here"
            } else {
                "; LATEST is newer"
            }
        ),
    );
    Ok(())
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

async fn located(ctx: &Ctx, f: &From) -> anyhow::Result<shardrop::checkpoint::pull::Located> {
    let reg = match &f.registry {
        Some(r) => Some(Registry::load(r, &ctx.s3, None).await?.0),
        None => None,
    };
    let signer = f.signer.as_deref().map(PeerId::parse).transpose()?;
    Ok(locate(&f.what, reg.as_ref(), signer, &ctx.s3).await?)
}

async fn pull_cmd(ctx: &Ctx, a: PullArgs) -> anyhow::Result<()> {
    let loc = located(ctx, &a.from).await?;
    let (m, _, _) = shardrop::checkpoint::pull::fetch_manifest(&loc).await?;
    let bar = out::bytes_bar(ctx, m.total_bytes(), "pull");
    let started = std::time::Instant::now();
    let opts = PullOptions {
        tensors: a.tensors.clone(),
        tp: a.tp_rank.zip(a.tp_size),
        concurrency: a.concurrency,
        force: a.force,
        without_momentum: a.without_momentum,
    };
    let p = pull(&loc, &a.out, &opts, &|n| bar.inc(n)).await?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let mut json = serde_json::to_value(&p)?;
    json["seconds"] = secs.into();
    json["mib_per_s"] = (p.fetched_bytes as f64 / (1 << 20) as f64 / secs).into();
    out::emit(
        ctx,
        &json,
        &format!(
            "step {}: {} files, {} tensors verified into {} ({:.1} MiB fetched, {:.1} MiB already there) in {secs:.1} s",
            p.step,
            p.files,
            p.tensors,
            p.out,
            p.fetched_bytes as f64 / (1 << 20) as f64,
            p.reused_bytes as f64 / (1 << 20) as f64
        ),
    );
    Ok(())
}

async fn ls_cmd(ctx: &Ctx, a: LsArgs) -> anyhow::Result<()> {
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let (peer, target) = reg.aggregator(&ctx.s3)?;
    let infos = list(&target, &reg.run, &peer).await?;
    let mut text = format!(
        "{:>12} {:>8} {:>7} {:>8} {:>12}  status\n",
        "step", "window", "shards", "tensors", "MiB"
    );
    for i in &infos {
        text += &format!(
            "{:>12} {:>8} {:>7} {:>8} {:>12.1}  {}{}\n",
            i.step,
            i.window.map_or("-".into(), |w| w.to_string()),
            i.shards,
            i.tensors,
            i.bytes as f64 / (1 << 20) as f64,
            match (&i.problem, i.complete) {
                (Some(p), _) => format!("BAD MANIFEST: {p}"),
                (None, true) => "complete".into(),
                (None, false) => "incomplete (no manifest)".into(),
            },
            if i.latest { " <- LATEST" } else { "" }
        );
    }
    out::emit(ctx, &serde_json::to_value(&infos)?, text.trim_end());
    Ok(())
}

async fn verify_cmd(ctx: &Ctx, a: VerifyArgs) -> anyhow::Result<()> {
    let loc = located(ctx, &a.from).await?;
    let r = verify(&loc, a.concurrency).await?;
    let text = if r.bad.is_empty() {
        format!(
            "{}: ok ({} shards, {} files, {:.1} MiB verified)",
            r.manifest,
            r.shards,
            r.files,
            r.bytes as f64 / (1 << 20) as f64
        )
    } else {
        format!(
            "{}: {} problem(s)\n  {}",
            r.manifest,
            r.bad.len(),
            r.bad.join("\n  ")
        )
    };
    out::emit(ctx, &serde_json::to_value(&r)?, &text);
    if !r.bad.is_empty() {
        bail!("checkpoint step {} failed verification", r.step);
    }
    Ok(())
}

async fn gc_cmd(ctx: &Ctx, a: GcArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let me = id.peer_id();
    let target = reg.own_store(&id, Role::Aggregator, &ctx.s3)?;
    let r = gc(&target, &reg.run, &me, a.keep, a.dry_run).await?;
    let text = format!(
        "{}kept steps {:?}; deleted checkpoints {:?}{}; {} object(s){}",
        if r.dry_run { "dry run: " } else { "" },
        r.kept,
        r.deleted_checkpoints,
        r.windows_before.map_or(String::new(), |w| format!(
            " and per-window objects before window {w}"
        )),
        r.deleted_objects,
        if r.dry_run {
            " would be deleted"
        } else {
            " deleted"
        }
    );
    let text = match (r.genesis_catch_up, r.windows_before) {
        (false, Some(w)) => format!(
            "{text}\nnote: windows 0..{} {} gone, so catch-up from genesis is no longer possible: new peers start from a kept checkpoint (`shardrop ckpt pull latest`, then `apply --from DIR`)",
            w.saturating_sub(1),
            if r.dry_run { "would be" } else { "are" }
        ),
        _ => text,
    };
    out::emit(ctx, &serde_json::to_value(&r)?, &text);
    Ok(())
}
