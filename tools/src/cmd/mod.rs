//! Subcommands.

mod ckpt;
mod demo;
pub(crate) mod device;
pub(crate) mod grad;
mod keys;
mod object;
mod round;
mod validate;

use clap::Subcommand;
use shardrop::store::S3Options;

/// Byte sizes for flags: 2GiB, 512MiB, 1G, 100M, 4096 (K/M/G/T are binary, as are KB/MB…).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    Ok((n * mul as f64) as u64)
}

/// Free bytes on the file system holding `dir` (None when it cannot be asked).
pub fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    fs4::available_space(dir).ok()
}

/// What every command gets besides its own arguments.
pub struct Ctx {
    pub json: bool,
    pub s3: S3Options,
}

#[derive(Subcommand)]
pub enum Command {
    /// Make an ed25519 key file (mode 0600) and print its peer id.
    Keygen(keys::KeygenArgs),
    /// Sign files as the sections of one envelope and put it, create-only, at a URL.
    Sign(object::SignArgs),
    /// Fetch and fully verify an envelope; exit 3 with the reason if it is rejected.
    Verify(object::VerifyArgs),
    /// Print an envelope's header and section table, saying what is wrong if anything.
    Inspect(object::InspectArgs),
    /// Verify an envelope and write its decompressed sections into a folder.
    Get(object::GetArgs),
    /// The gradient codec: encode an update, decode sections.
    #[command(subcommand)]
    Grad(grad::GradCommand),
    /// A run and its signed registry.
    #[command(subcommand)]
    Run(round::RunCommand),
    /// Encode, sign and publish a miner's update for a window into its own store.
    Publish(round::PublishArgs),
    /// Verify and merge a window's shards; publish the ledger and the signed aggregate.
    Aggregate(round::AggregateArgs),
    /// Catch up: replay aggregates onto a base model.
    Apply(round::ApplyArgs),
    /// Fetches a window's shards from the miners' stores before its aggregate exists, so
    /// `apply --prefetched DIR` then reads the accepted ones from disk (agg-v2).
    Prefetch(round::PrefetchArgs),
    /// Score every miner of a window; publish the score table and signed weights.
    Validate(validate::ValidateArgs),
    /// Read a validator's published scores.
    #[command(subcommand)]
    Scores(validate::ScoresCommand),
    /// Sharded checkpoints: push, pull, ls, verify, gc.
    #[command(subcommand)]
    Ckpt(ckpt::CkptCommand),
    /// Benchmarks with baselines measured side by side.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Run the demonstration on a local folder store: no server, no keys to make by hand.
    Demo(demo::DemoArgs),
}

impl Command {
    /// What to tell a user who interrupted this command (Ctrl-C): every command is safe to
    /// run again (create-only puts, idempotent jobs, resumable pushes and pulls).
    pub fn interrupted_hint(&self) -> String {
        match self {
            Command::Ckpt(c) => c.interrupted_hint(),
            _ => None,
        }
        .unwrap_or_else(|| {
            "nothing half-written is left under a final name: run the same command again".into()
        })
    }
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen(a) => keys::keygen(ctx, a),
        Command::Sign(a) => object::sign(ctx, a).await,
        Command::Verify(a) => object::verify(ctx, a).await,
        Command::Inspect(a) => object::inspect(ctx, a).await,
        Command::Get(a) => object::get(ctx, a).await,
        Command::Grad(c) => grad::run(ctx, c).await,
        Command::Run(c) => round::run_cmd(ctx, c).await,
        Command::Publish(a) => round::publish_cmd(ctx, a).await,
        Command::Aggregate(a) => round::aggregate_cmd(ctx, a).await,
        Command::Apply(a) => round::apply_cmd(ctx, a).await,
        Command::Prefetch(a) => round::prefetch_cmd(ctx, a).await,
        Command::Validate(a) => validate::validate_cmd(ctx, a).await,
        Command::Scores(c) => validate::scores_cmd(ctx, c).await,
        Command::Ckpt(c) => ckpt::run(ctx, c).await,
        Command::Bench(c) => crate::bench::run(ctx, c).await,
        Command::Demo(a) => demo::demo(ctx, a).await,
    }
}
