//! The round: `run init|add|show`, `publish`, `aggregate`, `apply`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use shardrop::format::codec::{Dense, EfState, dense_to_safetensors, model_of};
use shardrop::format::layout;
use shardrop::identity::PeerId;
use shardrop::round::RoundError;
use shardrop::round::aggregate::{aggregate_commit, aggregate_part, aggregate_window_opts};
use shardrop::round::outer::{OptimizerKind, OuterState, ScheduleKind, Setting};
#[cfg(feature = "cuda")]
use shardrop::round::publish::{PublishOptions, publish_opts};
use shardrop::round::publish::{Update, clock, publish, wait_for_window};
use shardrop::round::registry::{
    AggForm, AggregateSpec, Credentials, Job, Participant, Registry, RegistryError, Role,
};
use shardrop::round::replay::{ApplyOptions, apply_aggregates_opts};
use shardrop::round::window::store_now_ms;
use shardrop::store;

use super::grad::CodecArgs;
use super::{Ctx, keys};
use crate::out;

#[derive(Subcommand)]
pub enum RunCommand {
    /// Create a run and its signed registry.
    Init(Box<InitArgs>),
    /// Add a participant (operator only; compare-and-swap on the registry).
    Add(AddArgs),
    /// Print a registry after verifying it, with the history of its settings.
    Show(ShowArgs),
    /// Change the outer optimizer, its learning rate or schedule, or beta from a window that
    /// has not opened yet (operator only; compare-and-swap on the registry). Flags not given
    /// keep the value in force at that window.
    Set(Box<SetArgs>),
    /// The window open now and the seconds to its deadline and close (by the store's clock
    /// with --key, else by this machine's).
    Window(WindowArgs),
}

#[derive(Args)]
pub struct WindowArgs {
    /// The run's registry URL.
    #[arg(long)]
    registry: String,
    /// A participant's key: the time is its own store's clock (the one publishes and
    /// verdicts use); without it, this machine's clock.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Print only the open window's number (for scripts: W=$(shardrop run window ... --number));
    /// before the run starts, exit 1 saying when window 0 opens.
    #[arg(long)]
    number: bool,
}

/// The outer optimizer and beta, as `run init` and `run set` take them.
#[derive(Args)]
pub struct OuterArgs {
    /// sgd (θ ← θ − lr·a), momentum (heavy ball) or nesterov (DiLoCo's outer step).
    #[arg(long, value_parser = ["sgd", "momentum", "nesterov"])]
    outer_optimizer: Option<String>,
    /// Base outer learning rate (init default: 1).
    #[arg(long)]
    outer_lr: Option<f32>,
    /// μ of momentum and nesterov (default 0.9 when switching to them).
    #[arg(long)]
    momentum: Option<f32>,
    /// The rate over windows after any warm-up.
    #[arg(long, value_parser = ["constant", "linear", "cosine"])]
    lr_schedule: Option<String>,
    /// Windows of linear warm-up.
    #[arg(long)]
    warmup_windows: Option<u64>,
    /// Windows of linear or cosine decay after the warm-up.
    #[arg(long)]
    decay_windows: Option<u64>,
    /// The rate at the end of the decay, as a fraction of the base rate.
    #[arg(long)]
    final_lr_ratio: Option<f32>,
    /// The window the schedule counts from (default: the setting's first window when a
    /// schedule flag is given, else the schedule in force keeps its origin).
    #[arg(long)]
    schedule_origin: Option<u64>,
    /// Error-feedback decay miners use (init default: 0.9).
    #[arg(long)]
    beta: Option<f32>,
}

impl OuterArgs {
    /// `base` (the setting in force) with these flags applied, from `from_window` on: the
    /// flags parsed here, the rule applied by the library.
    fn over(&self, base: Setting, from_window: u64) -> anyhow::Result<Setting> {
        let change = shardrop::round::outer::SettingChange {
            optimizer: (self.outer_optimizer.as_deref())
                .map(|k| {
                    OptimizerKind::parse(k).ok_or_else(|| {
                        crate::out::usage(format!(
                            "--outer-optimizer {k:?}: expected sgd, momentum or nesterov"
                        ))
                    })
                })
                .transpose()?,
            lr: self.outer_lr,
            momentum: self.momentum,
            schedule: (self.lr_schedule.as_deref())
                .map(|k| {
                    ScheduleKind::parse(k).ok_or_else(|| {
                        crate::out::usage(format!(
                            "--lr-schedule {k:?}: expected constant, linear or cosine"
                        ))
                    })
                })
                .transpose()?,
            warmup: self.warmup_windows,
            decay: self.decay_windows,
            final_ratio: self.final_lr_ratio,
            origin: self.schedule_origin,
            beta: self.beta,
        };
        Ok(change.over(&base, from_window))
    }
}

#[derive(Args)]
pub struct SetArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// The operator's key.
    #[arg(long)]
    key: PathBuf,
    /// The first window the new setting applies to (it must not have opened yet by the
    /// store's clock), or `next`: the window after the current one.
    #[arg(long)]
    from_window: String,
    #[command(flatten)]
    outer: OuterArgs,
}

#[derive(Args)]
pub struct InitArgs {
    /// The run's name: its objects go under runs/RUN/ in every participant's store.
    #[arg(long)]
    run: String,
    /// The operator's key: it signs the registry.
    #[arg(long)]
    key: PathBuf,
    /// The operator's store; the registry goes to runs/RUN/registry under it.
    #[arg(long)]
    store: String,
    /// A safetensors file with the model's tensors (names, shapes and dtypes are used).
    #[arg(long)]
    model: PathBuf,
    /// RFC 3339 time, or `now` (the store's clock).
    #[arg(long, default_value = "now")]
    genesis: String,
    /// Seconds per window: miners publish within it, readers start after its close.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Seconds after a window's deadline a shard still counts (clock skew, slow puts); the
    /// window closes at deadline + grace.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    #[command(flatten)]
    codec: CodecArgs,
    #[command(flatten)]
    outer: OuterArgs,
    /// The aggregate format: agg-v2 (a signed verdict naming the accepted shards; readers
    /// merge them) or agg-v1 (one object with the merged tensors).
    #[arg(long, default_value = "agg-v2", value_parser = ["agg-v1", "agg-v2"])]
    aggregate: String,
    /// agg-v2 only: `auto` (per window, copies of the shards or the merged tensor, whichever
    /// is smaller, in the aggregator's store), `shards`, `merged`, or `reference` (readers
    /// fetch from the miners' stores).
    #[arg(long, default_value = "auto", value_parser = ["auto", "shards", "merged", "reference"])]
    agg_form: String,
}

#[derive(Args)]
pub struct AddArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// The operator's key (only the operator may change the registry).
    #[arg(long)]
    key: PathBuf,
    /// The participant's role.
    #[arg(long, value_parser = ["miner", "aggregator", "validator"])]
    role: String,
    /// The participant's peer id (what `shardrop keygen` printed on its machine).
    #[arg(long)]
    peer: String,
    /// The participant's store URL.
    #[arg(long)]
    store: String,
    /// Readers take credentials for this store from PREFIXAWS_ACCESS_KEY_ID etc.
    #[arg(long)]
    credentials_env_prefix: Option<String>,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// Require this operator key.
    #[arg(long)]
    operator: Option<String>,
}

#[derive(Args)]
pub struct PublishArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// The miner's key.
    #[arg(long)]
    key: PathBuf,
    /// Default: the current window by the store's clock.
    #[arg(long)]
    window: Option<u64>,
    /// Wait (by the store's clock) for the window to open instead of refusing it; without
    /// --window, for the run's first window when it has not started.
    #[arg(long)]
    wait: bool,
    /// The pseudo-gradient (θ_start − θ_end) as safetensors.
    update: PathBuf,
    /// Error-feedback state folder.
    #[arg(long)]
    state: PathBuf,
    /// Where to encode: cpu, cuda or cuda:N (GPU builds; the shard's bytes are the same;
    /// falls back to the CPU, saying why).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
pub struct AggregateArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Split merge: be worker I of K (0-based), checking and merging only its tensors.
    #[arg(
        long,
        value_name = "I/K",
        requires = "window",
        conflicts_with = "commit"
    )]
    part: Option<String>,
    /// Split merge: once all K parts exist, publish the ledger and the aggregate.
    #[arg(long, value_name = "K", requires = "window")]
    commit: Option<usize>,
    /// Where the weighted merge runs: cpu, cuda or cuda:N (GPU builds; the aggregate's
    /// bytes are the same; falls back to the CPU, saying why).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// What every per-window job (aggregator, validator) takes: whose key, which run, which
/// window(s).
#[derive(Args)]
pub struct JobArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    pub registry: String,
    /// The job's own key (its role is looked up in the registry).
    #[arg(long)]
    pub key: PathBuf,
    /// The window to do; with --follow, the first one.
    #[arg(long, conflicts_with = "once", required_unless_present_any = ["once", "follow"])]
    pub window: Option<u64>,
    /// The newest closed window (for cron).
    #[arg(long, conflicts_with = "follow")]
    pub once: bool,
    /// Every window, forever, from --window (default: the newest closed one; before any
    /// has closed, waits for window 0), each as soon as it closes. The aggregator publishes
    /// an empty aggregate for a window with no shard, so catch-up has no hole; the
    /// validator publishes each window's scores and weights.
    #[arg(long)]
    pub follow: bool,
    /// Miners fetched at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds after the window's close by which every read must end, whatever the miners'
    /// stores do; a miner not read by then is recorded as `store_error` (timeout). Default:
    /// the run's window length.
    #[arg(long)]
    pub budget_secs: Option<u64>,
}

impl JobArgs {
    pub fn budget(&self) -> Option<std::time::Duration> {
        self.budget_secs.map(std::time::Duration::from_secs)
    }
}

/// A job's start: its key and registry, checked to hold `role`, and the first window to do
/// (`--window`, or the newest closed one by the store's clock).
/// The key, the registry and the first window of an aggregator's or a validator's job:
/// `--window W`, or the newest closed window. Before any window has closed, `--follow`
/// starts at window 0 (the job waits for its close) and `--once` has nothing to do: it says
/// so, with when window 0 closes, and `None` tells the caller to exit 0 (a CronJob started
/// right after `run init` is not a failure).
pub async fn start_job(
    ctx: &Ctx,
    a: &JobArgs,
    role: Role,
) -> anyhow::Result<Option<(shardrop::identity::Identity, Registry, u64)>> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let me = id.peer_id();
    let target = reg.own_store(&id, role, &ctx.s3)?;
    let w = match (a.window, a.once || a.follow) {
        (Some(w), _) => w,
        (None, true) => {
            let now = store_now_ms(&target, &layout::clock_probe(&reg.run, &me)).await?;
            match (clock(&reg).newest_closed(now), a.follow) {
                (Some(w), _) => w,
                (None, true) => 0,
                (None, false) => {
                    let secs = clock(&reg).closes(0).saturating_sub(now) as f64 / 1000.0;
                    out::emit(
                        ctx,
                        &serde_json::json!({"window": null, "run": reg.run, "first_close_in_secs": secs}),
                        &format!(
                            "run {}: no window has closed yet (window 0 closes in {secs:.0} s by the store's clock); nothing to do (--follow waits for it)",
                            reg.run
                        ),
                    );
                    return Ok(None);
                }
            }
        }
        (None, false) => return Err(out::usage("give --window W, --once or --follow")),
    };
    Ok(Some((id, reg, w)))
}

#[derive(Args)]
pub struct PrefetchArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// The window whose shards to fetch (it may still be open: what is there is fetched).
    #[arg(long)]
    window: u64,
    /// The cache folder (sections named by their blake3); give it to `apply --prefetched`.
    #[arg(long)]
    dir: PathBuf,
    /// Miners' shards fetched at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn prefetch_cmd(ctx: &Ctx, a: PrefetchArgs) -> anyhow::Result<()> {
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let got =
        shardrop::round::merge::prefetch(&reg, &ctx.s3, a.window, &a.dir, &|_| true, a.concurrency)
            .await?;
    out::emit(
        ctx,
        &serde_json::json!({"window": a.window, "dir": a.dir.display().to_string(), "prefetched": got}),
        &format!(
            "window {}: {} shard(s), {} section(s) fetched ({} bytes), {} already there, {} miner(s) skipped",
            a.window, got.shards, got.sections, got.bytes, got.cached, got.skipped
        ),
    );
    Ok(())
}

#[derive(Args)]
pub struct ApplyArgs {
    /// The run's registry URL (what `shardrop run init` printed: …/runs/RUN/registry).
    #[arg(long)]
    registry: String,
    /// Base model holding θ after window --from-window: a safetensors file, or a folder
    /// (a pulled checkpoint: every *.safetensors in it).
    #[arg(long)]
    from: PathBuf,
    /// The last window already in the base, or `genesis` for the run's initial model
    /// (every window from 0 is applied). Default for a pulled checkpoint folder: the window
    /// its manifest names.
    #[arg(long, value_parser = parse_from_window)]
    from_window: Option<FromWindow>,
    /// Last window to apply.
    #[arg(long)]
    through: u64,
    /// A folder `shardrop prefetch` filled: agg-v2 sections found there (and verifying
    /// against the signed list) are not fetched again.
    #[arg(long)]
    prefetched: Option<PathBuf>,
    /// Wait up to SECS for each aggregate that is not there yet (the aggregator may still
    /// be merging it) instead of failing at once.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    /// The outer optimizer's momentum (safetensors): read if the file exists (it must hold
    /// the state after --from-window), written back after --through. Needed once the run
    /// uses momentum or nesterov. A pulled checkpoint folder as --from holds the momentum
    /// after its window in its momentum-*.safetensors shards: that is read instead.
    #[arg(long, value_name = "PATH")]
    optimizer_state: Option<PathBuf>,
    /// Output: the dense f32 parameters.
    out: PathBuf,
}

/// Where a base model stands: before window 0, or after window W.
#[derive(Clone, Copy, Debug)]
pub enum FromWindow {
    Genesis,
    After(u64),
}

fn parse_from_window(s: &str) -> Result<FromWindow, String> {
    match s {
        "genesis" => Ok(FromWindow::Genesis),
        _ => s
            .parse()
            .map(FromWindow::After)
            .map_err(|_| format!("{s:?}: expected a window number or `genesis`")),
    }
}

pub async fn run_cmd(ctx: &Ctx, cmd: RunCommand) -> anyhow::Result<()> {
    match cmd {
        RunCommand::Init(a) => init(ctx, *a).await,
        RunCommand::Add(a) => add(ctx, a).await,
        RunCommand::Show(a) => show(ctx, a).await,
        RunCommand::Set(a) => set(ctx, *a).await,
        RunCommand::Window(a) => window(ctx, a).await,
    }
}

/// `run window`: where the run's clock stands.
async fn window(ctx: &Ctx, a: WindowArgs) -> anyhow::Result<()> {
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let (now, by) = match &a.key {
        Some(k) => {
            let id = keys::load(k)?;
            let me = id.peer_id();
            let role = [Role::Miner, Role::Aggregator, Role::Validator]
                .into_iter()
                .find(|r| reg.participant(&me, *r).is_some())
                .ok_or_else(|| RegistryError::NotRegistered {
                    peer: me,
                    role: Role::Miner,
                    run: reg.run.clone(),
                })?;
            let target = reg.own_store(&id, role, &ctx.s3)?;
            let now = store_now_ms(&target, &layout::clock_probe(&reg.run, &me)).await?;
            (now, "store")
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            (now, "local")
        }
    };
    let clk = clock(&reg);
    let open = clk.window_at(now);
    let secs = |t: u64| (t as f64 - now as f64) / 1000.0;
    let json = serde_json::json!({
        "run": reg.run, "clock": by, "now_ms": now, "window": open,
        "secs_to_deadline": open.map(|w| secs(clk.deadline(w))),
        "secs_to_close": open.map(|w| secs(clk.closes(w))),
        "newest_closed": clk.newest_closed(now),
        "secs_to_start": if open.is_none() { Some(secs(clk.start(0))) } else { None },
    });
    let text = match open {
        Some(w) => format!(
            "run {}: window {w} is open; its deadline is in {:.1} s and it closes (deadline + grace) in {:.1} s ({} clock)",
            reg.run,
            secs(clk.deadline(w)),
            secs(clk.closes(w)),
            by
        ),
        None => format!(
            "run {}: not started; window 0 opens in {:.1} s ({} clock)",
            reg.run,
            secs(clk.start(0)),
            by
        ),
    };
    if a.number {
        let w = open.with_context(|| {
            format!(
                "run {}: not started; window 0 opens in {:.1} s",
                reg.run,
                secs(clk.start(0))
            )
        })?;
        println!("{w}");
        return Ok(());
    }
    out::emit(ctx, &json, &text);
    Ok(())
}

async fn init(ctx: &Ctx, a: InitArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let target = store::open(&a.store, &ctx.s3)?;
    let model_bytes =
        std::fs::read(&a.model).with_context(|| format!("{}: cannot read", a.model.display()))?;
    let model = model_of(&model_bytes).with_context(|| a.model.display().to_string())?;
    let genesis_ms = if a.genesis == "now" {
        store_now_ms(&target, &layout::clock_probe(&a.run, &id.peer_id())).await?
    } else {
        chrono::DateTime::parse_from_rfc3339(&a.genesis)
            .map_err(|e| {
                out::usage(format!(
                    "--genesis {:?}: {e} (RFC 3339, or `now`)",
                    a.genesis
                ))
            })?
            .timestamp_millis()
            .max(0) as u64
    };
    let mut reg = Registry::new(
        &a.run,
        &id.peer_id(),
        genesis_ms,
        a.window_secs,
        a.grace_secs,
        model,
        a.codec.params()?,
    );
    let first = a.outer.over(reg.setting_at(0), 0)?;
    if let Some(p) = first.problem() {
        bail!("the outer optimizer: {p}");
    }
    // The legacy fields mirror window 0's setting, for readers of older builds' listings.
    reg.beta = first.beta;
    reg.outer_lr = first.outer.lr;
    reg.settings = vec![first];
    reg.aggregate = match a.aggregate.as_str() {
        "agg-v1" => AggregateSpec::default(),
        _ => AggregateSpec::v2(AggForm::parse(&a.agg_form).ok_or_else(|| {
            out::usage(format!(
                "--agg-form {:?}: expected shards, merged or auto",
                a.agg_form
            ))
        })?),
    };
    let url = reg.create(&target, &id).await?;
    out::emit(
        ctx,
        &serde_json::json!({"registry": url, "run": reg.run, "operator": reg.operator, "genesis_ms": genesis_ms, "tensors": reg.model.tensors.len()}),
        &format!("run {} created; registry at {url}", reg.run),
    );
    Ok(())
}

async fn add(ctx: &Ctx, a: AddArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let peer = PeerId::parse(&a.peer)?;
    let role = Role::parse(&a.role).ok_or_else(|| {
        out::usage(format!(
            "--role {:?}: expected miner, aggregator or validator",
            a.role
        ))
    })?;
    store::open(&a.store, &ctx.s3)?;
    // Compare-and-swap: an operator racing another edit reads the new version and applies
    // the addition to it (a lost race is retried, never reported as tampering).
    let reg = Registry::revise(&a.registry, &ctx.s3, &id, |reg| {
        if reg.participant(&peer, role).is_some() {
            return Err(RegistryError::Invalid {
                object: a.registry.clone(),
                reason: format!("{peer} is already a {} of run {}", a.role, reg.run),
            });
        }
        reg.participants.push(Participant {
            role,
            peer: peer.to_string(),
            store: a.store.clone(),
            credentials: match &a.credentials_env_prefix {
                Some(prefix) => Credentials::EnvPrefix {
                    prefix: prefix.clone(),
                },
                None => Credentials::Ambient,
            },
        });
        Ok(())
    })
    .await?;
    out::emit(
        ctx,
        &serde_json::json!({"registry": a.registry, "revision": reg.revision, "participants": reg.participants.len()}),
        &format!(
            "added {} {peer} ({} participants, revision {})",
            a.role,
            reg.participants.len(),
            reg.revision
        ),
    );
    Ok(())
}

async fn show(ctx: &Ctx, a: ShowArgs) -> anyhow::Result<()> {
    let operator = a.operator.as_deref().map(PeerId::parse).transpose()?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, operator).await?;
    let mut text = format!(
        "run {} (revision {}), operator {}\ngenesis {} ms, windows of {} s, grace {} s\nmodel: {} tensors; codec C={} k={} {} {:?} indices\n",
        reg.run,
        reg.revision,
        reg.operator,
        reg.genesis_ms,
        reg.window_secs,
        reg.grace_secs,
        reg.model.tensors.len(),
        reg.codec.chunk,
        reg.codec.k,
        reg.codec.values.name(),
        reg.codec.indices,
    );
    text += "settings:\n";
    if reg.settings.first().is_none_or(|s| s.from_window > 0) {
        text += &format!("  from window 0: {}\n", reg.setting_at(0).describe());
    }
    for s in &reg.settings {
        text += &format!("  from window {}: {}\n", s.from_window, s.describe());
    }
    for p in &reg.participants {
        text += &format!("  {:<10} {} {}\n", p.role.name(), p.peer, p.store);
    }
    out::emit(ctx, &out::value_of(&reg)?, &text);
    Ok(())
}

async fn set(ctx: &Ctx, a: SetArgs) -> anyhow::Result<()> {
    let at: Option<u64> = match a.from_window.as_str() {
        "next" => None,
        w => Some(w.parse().map_err(|_| {
            out::usage(format!("--from-window {w:?}: expected a window or `next`"))
        })?),
    };
    let id = keys::load(&a.key)?;
    // Any key reads the registry; `revise` refuses one that is not the operator's.
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let now = reg.clock_at(&a.registry, &ctx.s3, &id.peer_id()).await?;
    let from_window = at.unwrap_or_else(|| reg.next_settable(now));
    let reg = Registry::revise(&a.registry, &ctx.s3, &id, |reg| {
        let setting = a
            .outer
            .over(reg.setting_at(from_window), from_window)
            .map_err(|e| RegistryError::Invalid {
                object: a.registry.clone(),
                reason: format!("{e:#}"),
            })?;
        reg.set_from(setting, now)
    })
    .await?;
    reg.landed_before(&a.registry, &ctx.s3, from_window).await?;
    let s = reg.setting_at(from_window);
    out::emit(
        ctx,
        &serde_json::json!({"registry": a.registry, "revision": reg.revision, "from_window": from_window, "setting": out::value_of(&s)?, "settings": out::value_of(&reg.settings)?}),
        &format!(
            "from window {from_window}: {} (revision {})",
            s.describe(),
            reg.revision
        ),
    );
    Ok(())
}

pub async fn publish_cmd(ctx: &Ctx, a: PublishArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let update =
        std::fs::read(&a.update).with_context(|| format!("{}: cannot read", a.update.display()))?;
    let _lock = shardrop::round::publish::lock_state(&a.state)?;
    let mut state = EfState::load(&a.state)
        .with_context(|| format!("{}: cannot load state", a.state.display()))?;
    let before = state.window;
    let chosen = super::device::choose(&a.device)?;
    let started = std::time::Instant::now();
    let window = match a.wait {
        true => Some(wait_for_window(Job::new(&reg, &id, &ctx.s3), a.window).await?),
        false => a.window,
    };
    let waited = started.elapsed().as_secs_f64();
    let job = Job::new(&reg, &id, &ctx.s3);
    let update = Update::file(&update, &mut state);
    let p = match chosen.codec {
        // The CPU codec encodes from the state read-only and advances it once the shard is
        // stored: no second copy of the state (the GPU path keeps its trial copy).
        super::device::Codec::Cpu => publish(job, window, update).await,
        #[cfg(feature = "cuda")]
        super::device::Codec::Gpu(_) => {
            let mut gpu =
                |u: &[u8], st: &mut EfState, o: &shardrop::format::codec::EncodeOptions| {
                    chosen.encode_update(u, st, o)
                };
            publish_opts(
                job,
                window,
                update,
                PublishOptions {
                    encoder: Some(&mut gpu),
                },
            )
            .await
        }
    }
    .with_context(|| format!("{}: cannot publish", a.update.display()))?;
    if state.window != before {
        state
            .save(&a.state)
            .with_context(|| format!("{}: cannot save state", a.state.display()))?;
    }
    let mut json = serde_json::to_value(&p)?;
    json["seconds"] = started.elapsed().as_secs_f64().into();
    json["waited_seconds"] = waited.into();
    if let (Some(o), serde_json::Value::Object(d)) = (json.as_object_mut(), chosen.report()) {
        o.extend(d);
    }
    let text = format!(
        "{}: window {}, {} bytes ({:.0}x smaller than the {} dense bytes){}",
        p.object,
        p.window,
        p.bytes,
        p.ratio,
        p.dense_bytes,
        if p.already_published {
            " (already published)"
        } else {
            ""
        }
    );
    out::emit(ctx, &json, &text);
    Ok(())
}

pub async fn aggregate_cmd(ctx: &Ctx, a: AggregateArgs) -> anyhow::Result<()> {
    let Some((id, mut reg, mut w)) = start_job(ctx, &a.job, Role::Aggregator).await? else {
        return Ok(());
    };
    let chosen = super::device::choose(&a.device)?;
    let device = chosen.report();
    let on = chosen
        .aggregate_options()
        .with_budget(a.job.budget())
        .with_concurrency(a.job.concurrency);
    if let Some(part) = &a.part {
        let (i, k) = part
            .split_once('/')
            .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
            .ok_or_else(|| out::usage(format!("--part {part:?}: expected I/K")))?;
        let tensors = aggregate_part(Job::new(&reg, &id, &ctx.s3), w, i, k, &on).await?;
        out::emit(
            ctx,
            &serde_json::json!({"window": w, "part": i, "parts": k, "tensors": tensors, "peak_rss_mib": crate::out::peak_rss_mib(), "device": device["device"], "device_fallback": device["device_fallback"]}),
            &format!("window {w}: part {i}/{k} merged {tensors} tensor(s)"),
        );
        return Ok(());
    }
    loop {
        let r = match a.commit {
            Some(k) => aggregate_commit(Job::new(&reg, &id, &ctx.s3), w, k, &on).await?,
            None => aggregate_window_opts(Job::new(&reg, &id, &ctx.s3), w, &on).await?,
        };
        let mut json = serde_json::to_value(&r)?;
        json["peak_rss_mib"] = crate::out::peak_rss_mib().into();
        json["device"] = device["device"].clone();
        json["device_fallback"] = device["device_fallback"].clone();
        let text = format!(
            "window {}: {} accepted, {} rejected, {} missing, {} errors {:?} -> {}{}",
            r.window,
            r.accepted,
            r.rejected,
            r.missing,
            r.errors,
            r.reasons,
            r.object,
            if r.already_published {
                " (already published, identical)"
            } else {
                ""
            }
        );
        out::emit(ctx, &json, &text);
        out::warn_unread(ctx, r.window, &r.unread, "aggregate");
        if !a.job.follow {
            return Ok(());
        }
        w += 1;
        // Participants join between windows: follow the registry too.
        reg = Registry::load(&a.job.registry, &ctx.s3, None).await?.0;
    }
}

/// Loads a safetensors file (f32, bf16 or f16) as f32 tensors with their shapes.
pub fn load_dense(path: &std::path::Path) -> anyhow::Result<Dense> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    shardrop::format::codec::dense_from_safetensors(&bytes)
        .with_context(|| path.display().to_string())
}

/// A base model from a file or a pulled checkpoint folder, and the folder's window.
pub fn load_base(path: &std::path::Path) -> anyhow::Result<(Dense, Option<u64>)> {
    if !path.is_dir() {
        return Ok((load_dense(path)?, None));
    }
    let mut base = Dense::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        // The momentum's own shards are read, checked, by `read_momentum`, never as
        // parameters (nor twice: a 72 B model's momentum is 288 GB).
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("momentum-"))
        })
        .collect();
    files.sort();
    for f in files {
        base.extend(load_dense(&f)?);
    }
    let window = shardrop::checkpoint::LocalManifest::read(path)?.and_then(|l| l.manifest.window);
    Ok((base, window))
}

pub async fn apply_cmd(ctx: &Ctx, a: ApplyArgs) -> anyhow::Result<()> {
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let (mut base, ckpt_window) = load_base(&a.from)?;
    // A file base may hold momentum beside the parameters (an older checkpoint's layout); a
    // pulled folder's is read, checked, from its own shards below.
    let mut state = OuterState::take_from(&mut base);
    if a.from.is_dir() && !state.momentum.is_empty() {
        // Buffers inside a folder's model shards (an older checkpoint's layout): a pulled
        // folder's are read, checked, below; another folder's are not trusted unchecked.
        state = OuterState::default();
        if !a.from.join(shardrop::checkpoint::LOCAL_MANIFEST).exists() {
            return Err(shardrop::round::RoundError::Caller(format!(
                "{}: holds outer_momentum.* buffers but no {} (not a folder `shardrop ckpt pull` wrote): pull the checkpoint, or give the buffers as a state file (--optimizer-state)",
                a.from.display(),
                shardrop::checkpoint::LOCAL_MANIFEST
            ))
            .into());
        }
    }
    let from = a
        .from_window
        .or(ckpt_window.map(FromWindow::After))
        .with_context(|| {
            format!(
                "{}: give --from-window (the last window already in this base, or genesis)",
                a.from.display()
            )
        })?;
    let first = match from {
        FromWindow::Genesis => 0,
        FromWindow::After(w) => w + 1,
    };
    let from_window = match from {
        FromWindow::Genesis => serde_json::Value::from("genesis"),
        FromWindow::After(w) => w.into(),
    };
    shardrop::round::replay::check_params(
        &reg,
        base.iter()
            .map(|(k, (shape, _))| (k.as_str(), shape.as_slice())),
        shardrop::round::replay::Coverage::All,
    )
    .with_context(|| format!("{}", a.from.display()))?;
    // A checkpoint folder's own momentum is the state after its window; a state file is
    // read only when the folder holds none (it is still written back).
    let mut from_folder = false;
    let pulled = a.from.join(shardrop::checkpoint::LOCAL_MANIFEST).exists();
    let folder = match a.from.is_dir() && pulled {
        true => Some(shardrop::checkpoint::read_momentum(
            &a.from,
            Some(&reg.model),
        )?),
        false => None,
    };
    if let Some(f) = folder.filter(|f| !f.state.momentum.is_empty()) {
        shardrop::round::replay::check_state_window(&reg, Some(&f.run), f.after, first)
            .with_context(|| format!("{}", a.from.display()))?;
        state = f.state;
        from_folder = true;
    }
    if let Some(path) = a
        .optimizer_state
        .as_ref()
        .filter(|p| !from_folder && p.exists())
    {
        let f = shardrop::round::outer::read_state_file(path, Some(&reg.model))?;
        shardrop::round::replay::check_state_window(&reg, Some(&f.run), f.after, first)
            .with_context(|| format!("{}", path.display()))?;
        state = f.state;
    }
    if a.optimizer_state.is_none() && reg.momentum_before(a.through + 1) {
        return Err(RoundError::Refused {
            reason: shardrop::round::RoundReason::OptimizerStateMissing,
            detail: format!(
                "run {}'s outer optimizer keeps momentum by window {}: give --optimizer-state PATH (read if it exists, written back) so the next replay has it",
                reg.run, a.through
            ),
        }
        .into());
    }
    let shapes: BTreeMap<String, Vec<u64>> = base
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    let mut theta: BTreeMap<String, Vec<f32>> =
        base.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let opts = ApplyOptions {
        cache: a.prefetched.as_deref(),
        wait: a.wait.map(std::time::Duration::from_secs),
    };
    let applied = apply_aggregates_opts(
        &reg, &ctx.s3, &mut theta, &mut state, first, a.through, &opts,
    )
    .await?;
    if let Some(path) = &a.optimizer_state {
        let bytes = shardrop::round::outer::state_to_safetensors(
            &state,
            &shapes,
            &reg.run,
            Some(a.through),
        )?;
        shardrop::files::write_replace_beside(path, &bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    let dense: Dense = theta
        .into_iter()
        .map(|(k, v)| (k.clone(), (shapes[&k].clone(), v)))
        .collect();
    std::fs::write(&a.out, dense_to_safetensors(&dense)?)
        .with_context(|| format!("{}: cannot write", a.out.display()))?;
    out::emit(
        ctx,
        &serde_json::json!({"out": a.out.display().to_string(), "applied": applied, "from_window": from_window, "through": a.through, "optimizer_state": a.optimizer_state.as_ref().map(|p| p.display().to_string())}),
        &format!(
            "applied {applied} aggregate(s) (windows {first}..={}) -> {}",
            a.through,
            a.out.display()
        ),
    );
    Ok(())
}
