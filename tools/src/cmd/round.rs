//! The round: `run init|add|show`, `publish`, `aggregate`, `apply`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use shardrop::aggregate::{
    aggregate_commit, aggregate_part, aggregate_window_on, apply_aggregates_cached,
};
use shardrop::codec::{Dense, EfState, dense_to_safetensors, model_of};
use shardrop::exchange::{clock, publish_with};
use shardrop::identity::PeerId;
use shardrop::layout;
use shardrop::registry::{
    AggForm, AggregateSpec, Credentials, Job, Participant, Registry, RegistryError, Role,
};
use shardrop::store::{self, StoreError};
use shardrop::window::store_now_ms;

use super::grad::CodecArgs;
use super::{Ctx, keys};
use crate::out;

#[derive(Subcommand)]
pub enum RunCommand {
    /// Create a run and its signed registry.
    Init(InitArgs),
    /// Add a participant (operator only; compare-and-swap on the registry).
    Add(AddArgs),
    /// Print a registry after verifying it.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct InitArgs {
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
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    #[command(flatten)]
    codec: CodecArgs,
    #[arg(long, default_value_t = 0.9)]
    beta: f32,
    #[arg(long, default_value_t = 1.0)]
    outer_lr: f32,
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
    #[arg(long)]
    registry: String,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, value_parser = ["miner", "aggregator", "validator"])]
    role: String,
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
    #[arg(long)]
    registry: String,
    /// Require this operator key.
    #[arg(long)]
    operator: Option<String>,
}

#[derive(Args)]
pub struct PublishArgs {
    #[arg(long)]
    registry: String,
    /// The miner's key.
    #[arg(long)]
    key: PathBuf,
    /// Default: the current window by the store's clock.
    #[arg(long)]
    window: Option<u64>,
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
    #[arg(long)]
    pub registry: String,
    /// The job's own key (its role is looked up in the registry).
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long, conflicts_with_all = ["once", "follow"])]
    pub window: Option<u64>,
    /// The newest closed window (for cron).
    #[arg(long, conflicts_with = "follow")]
    pub once: bool,
    /// Every window, forever.
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
pub async fn start_job(
    ctx: &Ctx,
    a: &JobArgs,
    role: Role,
) -> anyhow::Result<(shardrop::identity::Identity, Registry, u64)> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let me = id.peer_id();
    let entry = reg.participant(&me, role).with_context(|| {
        format!(
            "{me} is not a{} {} of run {}",
            if role == Role::Aggregator { "n" } else { "" },
            role.name(),
            reg.run
        )
    })?;
    let target = reg.open_store(entry, &ctx.s3)?;
    let w = match (a.window, a.once || a.follow) {
        (Some(w), _) => w,
        (None, true) => {
            let now = store_now_ms(&target, &layout::clock_probe(&reg.run, &me)).await?;
            clock(&reg)
                .newest_closed(now)
                .context("no window has closed yet")?
        }
        (None, false) => bail!("give --window W, --once or --follow"),
    };
    Ok((id, reg, w))
}

#[derive(Args)]
pub struct PrefetchArgs {
    #[arg(long)]
    registry: String,
    /// The window whose shards to fetch (it may still be open: what is there is fetched).
    #[arg(long)]
    window: u64,
    /// The cache folder (sections named by their blake3); give it to `apply --prefetched`.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn prefetch_cmd(ctx: &Ctx, a: PrefetchArgs) -> anyhow::Result<()> {
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let got = shardrop::merge::prefetch(&reg, &ctx.s3, a.window, &a.dir, &|_| true, a.concurrency)
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
    /// Output: the dense f32 state.
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
        RunCommand::Init(a) => init(ctx, a).await,
        RunCommand::Add(a) => add(ctx, a).await,
        RunCommand::Show(a) => show(ctx, a).await,
    }
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
            .with_context(|| format!("--genesis {:?}", a.genesis))?
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
    reg.beta = a.beta;
    reg.outer_lr = a.outer_lr;
    reg.aggregate = match a.aggregate.as_str() {
        "agg-v1" => AggregateSpec::default(),
        _ => AggregateSpec::v2(AggForm::parse(&a.agg_form).context("--agg-form")?),
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
    let role = Role::parse(&a.role).context("--role")?;
    store::open(&a.store, &ctx.s3)?;
    // Compare-and-swap: an operator racing another edit reads the new version and applies
    // the addition to it (a lost race is retried, never reported as tampering).
    let mut attempt = 0;
    let reg = loop {
        attempt += 1;
        let (mut reg, etag) = Registry::load(&a.registry, &ctx.s3, Some(id.peer_id())).await?;
        if reg.participant(&peer, role).is_some() {
            bail!(
                "{}: {peer} is already a {} of run {}",
                a.registry,
                a.role,
                reg.run
            );
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
        match reg.update(&a.registry, &ctx.s3, etag, &id).await {
            Ok(()) => break reg,
            Err(RegistryError::Store(StoreError::Precondition { .. })) if attempt < 8 => {
                tracing::info!(attempt, "the registry changed since it was read; retrying");
            }
            Err(RegistryError::Store(StoreError::Precondition { object })) => bail!(
                "{object}: lost the compare-and-swap race {attempt} times (other edits keep landing); retry"
            ),
            Err(e) => return Err(e.into()),
        }
    };
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
        "run {} (revision {}), operator {}\ngenesis {} ms, windows of {} s, grace {} s\nmodel: {} tensors; codec C={} k={} {} {:?} indices; beta {}; outer lr {}\n",
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
        reg.beta,
        reg.outer_lr
    );
    for p in &reg.participants {
        text += &format!("  {:<10} {} {}\n", p.role.name(), p.peer, p.store);
    }
    out::emit(ctx, &serde_json::to_value(&reg)?, &text);
    Ok(())
}

pub async fn publish_cmd(ctx: &Ctx, a: PublishArgs) -> anyhow::Result<()> {
    let id = keys::load(&a.key)?;
    let (reg, _) = Registry::load(&a.registry, &ctx.s3, None).await?;
    let update =
        std::fs::read(&a.update).with_context(|| format!("{}: cannot read", a.update.display()))?;
    let _lock = shardrop::codec::lock_dir(&a.state)
        .with_context(|| format!("{}: cannot lock the state folder", a.state.display()))?;
    let mut state = EfState::load(&a.state)
        .with_context(|| format!("{}: cannot load state", a.state.display()))?;
    let before = state.window;
    let chosen = super::device::choose(&a.device)?;
    let started = std::time::Instant::now();
    let p = publish_with(
        Job::new(&reg, &id, &ctx.s3),
        a.window,
        &update,
        &mut state,
        |u, st, o| chosen.encode_update(u, st, o),
    )
    .await?;
    if state.window != before {
        state
            .save(&a.state)
            .with_context(|| format!("{}: cannot save state", a.state.display()))?;
    }
    let mut json = serde_json::to_value(&p)?;
    json["seconds"] = started.elapsed().as_secs_f64().into();
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
    let (id, mut reg, mut w) = start_job(ctx, &a.job, Role::Aggregator).await?;
    let concurrency = a.job.concurrency;
    let chosen = super::device::choose(&a.device)?;
    let device = chosen.report();
    let on = chosen.merge_on().with_budget(a.job.budget());
    if let Some(part) = &a.part {
        let (i, k) = part
            .split_once('/')
            .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
            .with_context(|| format!("--part {part:?}: expected I/K"))?;
        let tensors =
            aggregate_part(Job::new(&reg, &id, &ctx.s3), w, i, k, concurrency, &on).await?;
        out::emit(
            ctx,
            &serde_json::json!({"window": w, "part": i, "parts": k, "tensors": tensors, "peak_rss_mib": crate::out::peak_rss_mib(), "device": device["device"], "device_fallback": device["device_fallback"]}),
            &format!("window {w}: part {i}/{k} merged {tensors} tensor(s)"),
        );
        return Ok(());
    }
    loop {
        let r = match a.commit {
            Some(k) => aggregate_commit(Job::new(&reg, &id, &ctx.s3), w, k, concurrency).await?,
            None => aggregate_window_on(Job::new(&reg, &id, &ctx.s3), w, concurrency, &on).await?,
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
    shardrop::codec::dense_from_safetensors(&bytes).with_context(|| path.display().to_string())
}

/// A base model from a file or a pulled checkpoint folder, and the folder's window.
fn load_base(path: &std::path::Path) -> anyhow::Result<(Dense, Option<u64>)> {
    if !path.is_dir() {
        return Ok((load_dense(path)?, None));
    }
    let mut base = Dense::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
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
    let (base, ckpt_window) = load_base(&a.from)?;
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
    for t in &reg.model.tensors {
        match base.get(&t.name) {
            Some((shape, _)) if *shape == t.shape => {}
            _ => bail!(
                "{}: tensor {:?} {:?} of the run's model is missing or has another shape",
                a.from.display(),
                t.name,
                t.shape
            ),
        }
    }
    let shapes: BTreeMap<String, Vec<u64>> = base
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    let mut theta: BTreeMap<String, Vec<f32>> =
        base.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let applied = apply_aggregates_cached(
        &reg,
        &ctx.s3,
        &mut theta,
        first,
        a.through,
        a.prefetched.as_deref(),
    )
    .await?;
    let dense: Dense = theta
        .into_iter()
        .map(|(k, v)| (k.clone(), (shapes[&k].clone(), v)))
        .collect();
    std::fs::write(&a.out, dense_to_safetensors(&dense)?)
        .with_context(|| format!("{}: cannot write", a.out.display()))?;
    out::emit(
        ctx,
        &serde_json::json!({"out": a.out.display().to_string(), "applied": applied, "from_window": from_window, "through": a.through}),
        &format!(
            "applied {applied} aggregate(s) (windows {first}..={}) -> {}",
            a.through,
            a.out.display()
        ),
    );
    Ok(())
}
