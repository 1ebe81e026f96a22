//! The main job on an embedded default: a local folder store, keys made on the spot.
//!
//! Honest miners train the reference task (`shardrop::refmodel`: a linear map learned from
//! noisy samples, each miner on its own data) for a few inner steps per window and publish
//! the pseudo-gradient θ_start − θ_end through the real publish path. After each window
//! closes (by the store's clock) the aggregator and the validator run through the same code
//! as `shardrop aggregate` and `shardrop validate`, and every miner applies the signed
//! aggregate as `shardrop apply` does, with the run's explicit outer optimizer (Nesterov
//! momentum), whose learning rate the operator lowers once mid-run as `shardrop run set`
//! does. Every second window the aggregator pushes a checkpoint (parameters and momentum) as
//! `shardrop ckpt push` does. One adversary cycles through copying another
//! miner's shard, sending noise and publishing late; a late joiner bootstraps from the latest
//! checkpoint in the last window, replays the aggregates since, and must then hold exactly
//! the same parameters as everyone else. The demo fails loudly if the held-out loss does not
//! fall, the adversary is not caught, or the late joiner does not match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use object_store::ObjectStoreExt;
use shardrop::checkpoint::pull::{PullOptions, locate, pull};
use shardrop::checkpoint::push::{PushOptions, push};
use shardrop::format::codec::{EfState, EncodeOptions, encode_update};
use shardrop::format::envelope::{
    Expect, Limits, RemoteEnvelope, SignedEnvelope, read_all_sections,
};
use shardrop::format::layout;
use shardrop::format::tables::{LedgerRow, ScoreRow, read_ledger};
use shardrop::identity::Identity;
use shardrop::refmodel::ReferenceEvaluator;
use shardrop::refmodel::{LinearTask, TENSOR};
use shardrop::round::aggregate::{Aggregated, aggregate_window};
use shardrop::round::evaluate::Evaluator;
use shardrop::round::outer::{OptimizerKind, Outer, OuterState, Schedule, Setting};
use shardrop::round::publish::{Update, publish, shard_builder};
use shardrop::round::registry::{Job, Participant, Registry, Role};
use shardrop::round::replay::{ApplyOptions, apply_aggregates_opts};
use shardrop::round::score::{ValidateOptions, Validated, validate_window};
use shardrop::round::verdict::LedgerReason;
use shardrop::round::verdict::wait_for_close;
use shardrop::round::window::store_now_ms;
use shardrop::store::{self, Target, put_create};

use super::Ctx;
use crate::out;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for keys, the local store, the chart and the summary.
    #[arg(long, default_value = "./shardrop-demo")]
    dir: PathBuf,
    /// Store URL (default: DIR/store, a local folder).
    #[arg(long)]
    store: Option<String>,
    /// Honest miners (an adversary and a late joiner come on top).
    #[arg(long, default_value_t = 4)]
    miners: usize,
    /// Windows to train (at least 3).
    #[arg(long, default_value_t = 6)]
    windows: u64,
    /// Window length in seconds. Default: 3 on a local folder, 6 on a bucket, whose
    /// `last_modified` has whole seconds only (a publish commits, then waits for the next
    /// whole second before its shard: 3-s windows failed 3 runs in 4 there).
    #[arg(long)]
    window_secs: Option<u64>,
}

fn load_or_make(path: &Path) -> anyhow::Result<Identity> {
    if path.exists() {
        return Ok(Identity::load(path)?);
    }
    let id = Identity::generate();
    id.save_new(path)?;
    Ok(id)
}

/// What the adversary does in a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Attack {
    Copy,
    Noise,
    Late,
}

impl Attack {
    /// As the summary's JSON names it.
    fn name(self) -> &'static str {
        match self {
            Attack::Copy => "copy",
            Attack::Noise => "noise",
            Attack::Late => "late",
        }
    }

    fn of(w: u64) -> Attack {
        [Attack::Copy, Attack::Noise, Attack::Late][(w % 3) as usize]
    }
}

/// The copier's move: fetch a victim's published sections and re-sign them as its own.
async fn copy_as_own(
    reg: &Registry,
    victim: (&Identity, &Target),
    copier: (&Identity, &Target),
    w: u64,
) -> anyhow::Result<()> {
    let path = victim
        .1
        .path(&layout::grad(&reg.run, w, &victim.0.peer_id()));
    let env = RemoteEnvelope::open(
        victim.1.store.as_ref(),
        &path,
        "victim",
        &Limits::default(),
        &Expect::default(),
    )
    .await?;
    let secs = read_all_sections(victim.1.store.as_ref(), &env, &Limits::default()).await?;
    let named: Vec<(String, Vec<u8>)> = env
        .sections()
        .iter()
        .map(|e| e.name.clone())
        .zip(secs)
        .collect();
    let signed = shard_builder(reg, &reg.run, w, &named)?.sign(copier.0)?;
    put_create(
        copier.1,
        &copier
            .1
            .path(&layout::grad(&reg.run, w, &copier.0.peer_id())),
        &signed,
    )
    .await?;
    Ok(())
}

/// A valid, well-formed update pointing nowhere, ten times an honest update's size.
fn noise(len: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Loss and bytes per window as a two-panel SVG, each with its axes, five labelled ticks on
/// the value axis, the window under each point and bar, and each value written beside it,
/// so numbers can be read off the chart, not only its shape.
fn chart(windows: &[(u64, f64, u64)], first_loss: f64) -> String {
    let (w, h, left, pad) = (680.0, 220.0, 70.0, 40.0);
    let n = windows.len().max(1) as f64;
    let x = |i: f64| left + (w - left - pad) * (i + 0.5) / (n + 1.0);
    let max_loss = first_loss.max(windows.iter().map(|r| r.1).fold(0.0, f64::max));
    let max_bytes = windows.iter().map(|r| r.2).max().unwrap_or(1).max(1) as f64;
    let (top, bottom) = (pad, h - pad);
    let ly = |l: f64| top + (bottom - top) * (1.0 - l / max_loss);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
"##,
        2.0 * h
    );
    // One panel's frame: title, value axis with ticks, window axis.
    let panel = |svg: &mut String, y0: f64, title: &str, max: f64, unit: &str| {
        *svg += &format!(
            "<text x=\"{left}\" y=\"{:.1}\" font-size=\"13\">{title}</text>\n",
            y0 + 22.0
        );
        *svg += &format!(
            "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#333\"/>\n<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
            y0 + top,
            y0 + bottom,
            y0 + bottom,
            w - pad,
            y0 + bottom
        );
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let y = y0 + top + (bottom - top) * (1.0 - k as f64 / 4.0);
            *svg += &format!(
                "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}{unit}</text>\n",
                left,
                w - pad,
                left - 6.0,
                y + 4.0
            );
        }
        *svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">window</text>\n",
            (left + w - pad) / 2.0,
            y0 + h - 6.0
        );
    };
    panel(
        &mut svg,
        0.0,
        "held-out loss (at the start, then after each window's aggregate)",
        max_loss,
        "",
    );
    let mut pts = format!("{:.1},{:.1}", x(0.0), ly(first_loss));
    let mut labels = vec![("start".to_string(), x(0.0), ly(first_loss), first_loss)];
    for (i, r) in windows.iter().enumerate() {
        let (px, py) = (x(i as f64 + 1.0), ly(r.1));
        pts += &format!(" {px:.1},{py:.1}");
        labels.push((r.0.to_string(), px, py, r.1));
    }
    svg += &format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{pts}\"/>\n"
    );
    for (name, px, py, v) in &labels {
        svg += &format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"#1f77b4\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.1}</text>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{name}</text>\n",
            py - 7.0,
            bottom + 14.0
        );
    }
    panel(
        &mut svg,
        h,
        "bytes published per window (all miners' shards)",
        max_bytes,
        " B",
    );
    for (i, r) in windows.iter().enumerate() {
        let bh = (bottom - top) * r.2 as f64 / max_bytes;
        let cx = x(i as f64 + 1.0);
        svg += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"20\" height=\"{bh:.1}\" fill=\"#ff7f0e\"/>\n<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            cx - 10.0,
            h + bottom - bh,
            h + bottom - bh - 4.0,
            r.2,
            h + bottom + 14.0,
            r.0
        );
    }
    svg + "</svg>\n"
}

/// Everyone taking part, with keys that persist in DIR/keys between runs.
struct Cast {
    operator: Identity,
    aggregator: Identity,
    validator: Identity,
    honest: Vec<Identity>,
    adversary: Identity,
    joiner: Identity,
}

impl Cast {
    fn load_or_make(keys_dir: &Path, miners: usize) -> anyhow::Result<Cast> {
        std::fs::create_dir_all(keys_dir)
            .with_context(|| format!("{}: cannot create", keys_dir.display()))?;
        let key = |name: &str| load_or_make(&keys_dir.join(format!("{name}.key")));
        Ok(Cast {
            operator: key("operator")?,
            aggregator: key("aggregator")?,
            validator: key("validator")?,
            honest: (0..miners)
                .map(|i| key(&format!("miner-{i}")))
                .collect::<Result<_, _>>()?,
            adversary: key("adversary")?,
            joiner: key("late-joiner")?,
        })
    }

    /// Short names for the report, by peer id.
    fn names(&self) -> BTreeMap<String, String> {
        let mut names: BTreeMap<String, String> = self
            .honest
            .iter()
            .enumerate()
            .map(|(i, m)| (m.peer_id().to_string(), format!("miner-{i}")))
            .collect();
        names.insert(self.adversary.peer_id().to_string(), "adversary".into());
        names.insert(self.joiner.peer_id().to_string(), "late-joiner".into());
        names
    }
}

/// Creates the run's registry (one store area per participant) and loads it back verified.
async fn create_run(
    ctx: &Ctx,
    root: &Target,
    cast: &Cast,
    task: &LinearTask,
    window_secs: u64,
) -> anyhow::Result<(Registry, String)> {
    let now = store_now_ms(root, "clock/demo").await?;
    let mut reg = Registry::new(
        &format!("demo-{now}"),
        &cast.operator.peer_id(),
        now,
        window_secs,
        // A window's publishes start after the previous window closed and was aggregated;
        // a grace of one window leaves them the commit's second and the upload.
        window_secs.max(2),
        task.model_spec(),
        shardrop::refmodel::codec_params(),
    );
    // An explicit outer optimizer: Nesterov momentum μ = 0.5 at rate 1, whose first step is
    // lr·(1 + μ) = 1.5× the aggregate (plain SGD at rate 1 steps 1×).
    let first = demo_setting(0, 1.0);
    reg.outer_lr = first.outer.lr;
    reg.settings = vec![first];
    for (role, id, name) in [
        (Role::Aggregator, &cast.aggregator, "aggregator"),
        (Role::Validator, &cast.validator, "validator"),
        (Role::Miner, &cast.adversary, "adversary"),
        (Role::Miner, &cast.joiner, "late-joiner"),
    ] {
        reg.participants
            .push(Participant::new(role, &id.peer_id(), root.join(name).url()));
    }
    for (i, m) in cast.honest.iter().enumerate() {
        reg.participants.push(Participant::new(
            Role::Miner,
            &m.peer_id(),
            root.join(&format!("miner-{i}")).url(),
        ));
    }
    let reg_url = reg.create(&root.join("operator"), &cast.operator).await?;
    let (reg, _) = Registry::load(&reg_url, &ctx.s3, Some(cast.operator.peer_id())).await?;
    Ok((reg, reg_url))
}

/// The demo run's outer optimizer from window `from` on, at rate `lr`.
fn demo_setting(from: u64, lr: f32) -> Setting {
    Setting {
        from_window: from,
        outer: Outer {
            optimizer: OptimizerKind::Nesterov,
            lr,
            momentum: 0.5,
            schedule: Schedule::default(),
        },
        beta: 0.9,
    }
}

/// What the late joiner's bootstrap found.
#[derive(serde::Serialize)]
struct Joined {
    joined_window: u64,
    checkpoint_step: u64,
    checkpoint_window: Option<u64>,
    replayed: u64,
    matches: bool,
}

/// The late joiner bootstraps as `shardrop ckpt pull` and `shardrop apply` do: the latest
/// checkpoint, then the aggregates since; its parameters must equal everyone's `theta`.
async fn late_join(
    ctx: &Ctx,
    reg: &Registry,
    out_dir: &Path,
    theta: &[f32],
    outer: &OuterState,
    w: u64,
) -> anyhow::Result<(Vec<f32>, OuterState, Joined)> {
    let loc = locate("latest", Some(reg), None, &ctx.s3).await?;
    // The folder is the demo's own: an earlier demo's joiner pulled another run there.
    match std::fs::remove_dir_all(out_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(
                anyhow::Error::new(e).context(format!("{}: cannot clear", out_dir.display()))
            );
        }
        _ => {}
    }
    let opts = PullOptions {
        concurrency: 8,
        ..Default::default()
    };
    let pulled = pull(&loc, out_dir, &opts, &|_| {}).await?;
    // The checkpoint holds the parameters and, in shards of its own, the momentum, as
    // `apply --from DIR` reads them.
    let (mut base, _) = super::round::load_base(out_dir)?;
    OuterState::take_from(&mut base);
    let mut state = shardrop::checkpoint::read_momentum(out_dir, Some(&reg.model))?.state;
    let mut t: BTreeMap<String, Vec<f32>> = base.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let from = pulled.window.map_or(0, |x| x + 1);
    let opts = ApplyOptions::default();
    let replayed =
        apply_aggregates_opts(reg, &ctx.s3, &mut t, &mut state, from, w - 1, &opts).await?;
    let mine = t
        .remove(TENSOR)
        .context("checkpoint lacks the model tensor")?;
    let same = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    let matches = same(&mine, theta)
        && state.momentum.keys().eq(outer.momentum.keys())
        && state
            .momentum
            .iter()
            .all(|(k, m)| same(m, &outer.momentum[k]));
    let joined = Joined {
        joined_window: w,
        checkpoint_step: pulled.step,
        checkpoint_window: pulled.window,
        replayed: replayed as u64,
        matches,
    };
    Ok((mine, state, joined))
}

/// What every step of a demo window shares.
#[derive(Clone, Copy)]
struct Scene<'a> {
    ctx: &'a Ctx,
    reg: &'a Registry,
    root: &'a Target,
    cast: &'a Cast,
    task: &'a LinearTask,
}

/// Every miner's error-feedback state and the parameters it trains from.
struct Miners {
    states: Vec<EfState>,
    adversary: EfState,
    joiner: EfState,
    joiner_theta: Option<Vec<f32>>,
}

/// Publishes window `w`: the honest miners (and the joiner once it has joined) train from
/// the shared θ and publish at once, as separate machines would; the adversary makes its
/// move (a late shard is returned, to be put after the close). Returns the bytes published,
/// their dense size and the late shard.
async fn publish_window(
    scene: &Scene<'_>,
    miners: &mut Miners,
    theta: &[f32],
    w: u64,
) -> anyhow::Result<(u64, u64, Option<SignedEnvelope>)> {
    let Scene {
        ctx,
        reg,
        root,
        cast,
        task,
    } = *scene;
    let attack = Attack::of(w);
    let updates: Vec<Vec<u8>> = (0..cast.honest.len())
        .map(|i| task.to_safetensors(&task.pseudo_gradient(theta, i as u64, w, 20)))
        .collect::<Result<_, _>>()?;
    let honest_all = futures::future::try_join_all(
        cast.honest
            .iter()
            .zip(miners.states.iter_mut())
            .zip(&updates)
            .map(|((m, st), u)| publish(Job::new(reg, m, &ctx.s3), Some(w), Update::file(u, st))),
    );
    let joiner_update = match &miners.joiner_theta {
        Some(jt) => {
            Some(task.to_safetensors(&task.pseudo_gradient(jt, cast.honest.len() as u64, w, 20))?)
        }
        None => None,
    };
    let joiner_fut = publish_if(
        Job::new(reg, &cast.joiner, &ctx.s3),
        w,
        joiner_update.as_deref(),
        &mut miners.joiner,
    );
    let noise_update = match attack {
        Attack::Noise => {
            let honest_delta = task.pseudo_gradient(theta, 0, w, 20);
            let rms = (honest_delta.iter().map(|x| x * x).sum::<f32>() / honest_delta.len() as f32)
                .sqrt();
            let junk = noise(theta.len(), 10.0 * rms * 3f32.sqrt(), w + 7);
            Some(task.to_safetensors(&junk)?)
        }
        _ => None,
    };
    let noise_fut = publish_if(
        Job::new(reg, &cast.adversary, &ctx.s3),
        w,
        noise_update.as_deref(),
        &mut miners.adversary,
    );
    let (published, joined, _) =
        futures::future::try_join3(honest_all, joiner_fut, noise_fut).await?;
    let (mut bytes, mut dense) = (0u64, 0u64);
    for p in published.iter().chain(joined.iter()) {
        bytes += p.bytes;
        dense += p.dense_bytes;
    }
    // The adversary's other moves.
    let late_shard = match attack {
        Attack::Copy => {
            copy_as_own(
                reg,
                (&cast.honest[0], &root.join("miner-0")),
                (&cast.adversary, &root.join("adversary")),
                w,
            )
            .await?;
            None
        }
        Attack::Noise => None,
        Attack::Late => {
            let delta = task.pseudo_gradient(theta, 99, w, 20);
            let opts = EncodeOptions {
                params: reg.codec,
                beta: reg.beta,
                section_bytes: 16 << 20,
            };
            let enc = encode_update(&task.to_safetensors(&delta)?, &mut miners.adversary, &opts)?;
            Some(shard_builder(reg, &reg.run, w, &enc.sections)?.sign(&cast.adversary)?)
        }
    };
    Ok((bytes, dense, late_shard))
}

/// Publishes `update` for window `w` when there is one (the joiner once it has joined, the
/// adversary when it sends noise).
async fn publish_if(
    job: Job<'_>,
    w: u64,
    update: Option<&[u8]>,
    state: &mut EfState,
) -> Result<Option<shardrop::round::publish::Published>, shardrop::round::RoundError> {
    match update {
        Some(u) => publish(job, Some(w), Update::file(u, state))
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// What the aggregator and the validator made of a window, and whether they caught the
/// adversary.
struct Judged {
    agg: Aggregated,
    scored: Validated,
    ledger: Vec<LedgerRow>,
    adversary: LedgerRow,
    adversary_weight: f64,
    caught: bool,
}

/// The aggregator and the validator, as their commands run them, once `w` has closed.
async fn judge(
    scene: &Scene<'_>,
    evaluator: &mut ReferenceEvaluator,
    w: u64,
) -> anyhow::Result<Judged> {
    let Scene {
        ctx,
        reg,
        root,
        cast,
        ..
    } = *scene;
    let agg = aggregate_window(Job::new(reg, &cast.aggregator, &ctx.s3), w).await?;
    let scored = validate_window(
        Job::new(reg, &cast.validator, &ctx.s3),
        w,
        Some(evaluator as &mut dyn Evaluator),
        &ValidateOptions::default(),
    )
    .await?;
    let agg_area = root.join("aggregator");
    let ledger: Vec<LedgerRow> = read_ledger(
        agg_area
            .store
            .get(&agg_area.path(&layout::ledger(&reg.run, w)))
            .await?
            .bytes()
            .await?,
    )?;
    let adv_id = cast.adversary.peer_id().to_string();
    let adversary = ledger
        .iter()
        .find(|r| r.peer == adv_id)
        .context("adversary row")?
        .clone();
    let adv_score = scored
        .rows
        .iter()
        .find(|r| r.peer == adv_id)
        .context("adversary score")?;
    let caught = adv_score.weight == 0.0
        && match Attack::of(w) {
            Attack::Copy => adversary.reason == LedgerReason::Duplicate && adv_score.copier,
            Attack::Noise => adv_score.score == Some(0.0),
            Attack::Late => adversary.reason == LedgerReason::Late,
        };
    let adversary_weight = adv_score.weight;
    Ok(Judged {
        agg,
        scored,
        ledger,
        adversary,
        adversary_weight,
        caught,
    })
}

/// Applies window `w`'s signed aggregate to `theta` and its momentum, as `shardrop apply`
/// does.
async fn apply_one(
    ctx: &Ctx,
    reg: &Registry,
    theta: &mut Vec<f32>,
    outer: &mut OuterState,
    w: u64,
) -> anyhow::Result<()> {
    let mut t: BTreeMap<String, Vec<f32>> = [(TENSOR.to_string(), std::mem::take(theta))].into();
    apply_aggregates_opts(reg, &ctx.s3, &mut t, outer, w, w, &ApplyOptions::default()).await?;
    *theta = t.remove(TENSOR).context("model tensor")?;
    Ok(())
}

/// One window's line of the summary.
#[derive(serde::Serialize)]
struct WindowRow {
    window: u64,
    loss: f64,
    bytes: u64,
    dense_bytes: u64,
    ratio: f64,
    accepted: usize,
    rejected: usize,
    missing: usize,
    reasons: BTreeMap<String, usize>,
    aggregate: String,
    scores: String,
    weights: BTreeMap<String, f64>,
    adversary: AdversaryRow,
    checkpoint_step: Option<u64>,
}

#[derive(serde::Serialize)]
struct AdversaryRow {
    attack: Attack,
    verdict: String,
    reason: String,
    weight: f64,
    caught: bool,
}

/// The demo run, one method per phase: `start` (keys, store, registry), then per window
/// `change_setting` (the operator's mid-run revision), `late_join`, `window` (publish,
/// close, judge, apply) and `checkpoint`, and `finish` (chart, summary, verdict).
struct Demo<'a> {
    ctx: &'a Ctx,
    dir: PathBuf,
    windows: u64,
    root: Target,
    cast: Cast,
    names: BTreeMap<String, String>,
    task: LinearTask,
    held_out: Vec<shardrop::refmodel::Sample>,
    reg: Registry,
    reg_url: String,
    /// Everyone's parameters and outer momentum (the joiner keeps its own in `miners`).
    theta: Vec<f32>,
    outer: OuterState,
    joiner_outer: OuterState,
    miners: Miners,
    evaluator: ReferenceEvaluator,
    first_loss: f64,
    /// From which window the operator lowers the outer learning rate, and when the late
    /// joiner joins.
    change_at: u64,
    join_at: u64,
    rows: Vec<WindowRow>,
    series: Vec<(u64, f64, u64)>,
    caught: u64,
    joined: Option<Joined>,
    checkpoints: Vec<serde_json::Value>,
    started: std::time::Instant,
}

pub async fn demo(ctx: &Ctx, a: DemoArgs) -> anyhow::Result<()> {
    let mut d = Demo::start(ctx, a).await?;
    for w in 0..d.windows {
        // Window w's turn starts once w − 1 has closed (its grace is a window), when w + 1
        // is already open: the change is made at w = change_at − 2, for a window not yet
        // open.
        if w + 2 == d.change_at {
            d.change_setting().await?;
        }
        if w == d.join_at {
            d.late_join(w).await?;
        }
        d.window(w).await?;
    }
    d.finish()
}

impl<'a> Demo<'a> {
    /// Keys (kept in DIR/keys between runs), the store, and a new run's registry.
    async fn start(ctx: &'a Ctx, a: DemoArgs) -> anyhow::Result<Demo<'a>> {
        if a.miners < 2 || a.windows < 3 {
            return Err(crate::out::usage(
                "--miners must be at least 2 and --windows at least 3",
            ));
        }
        let store_url = match &a.store {
            Some(u) => u.clone(),
            None => std::path::absolute(a.dir.join("store"))?
                .display()
                .to_string(),
        };
        let root = store::open(&store_url, &ctx.s3)?;
        let cast = Cast::load_or_make(&a.dir.join("keys"), a.miners)?;
        let started = std::time::Instant::now();
        let task = LinearTask::standard();
        let window_secs = a.window_secs.unwrap_or(match store_url.split_once("://") {
            Some((scheme, _)) if scheme != "file" && scheme != "memory" => 6,
            _ => 3,
        });
        let (reg, reg_url) = create_run(ctx, &root, &cast, &task, window_secs).await?;
        let d = Demo {
            ctx,
            windows: a.windows,
            names: cast.names(),
            held_out: task.held_out(),
            theta: task.init(),
            outer: OuterState::default(),
            joiner_outer: OuterState::default(),
            miners: Miners {
                states: (0..a.miners).map(|_| EfState::default()).collect(),
                adversary: EfState::default(),
                joiner: EfState::default(),
                joiner_theta: None,
            },
            evaluator: ReferenceEvaluator::new(task.clone(), std::time::Duration::from_secs(10)),
            first_loss: 0.0,
            change_at: (a.windows / 2).max(2),
            join_at: a.windows - 1,
            rows: Vec::new(),
            series: Vec::new(),
            caught: 0,
            joined: None,
            checkpoints: Vec::new(),
            started,
            dir: a.dir,
            root,
            cast,
            task,
            reg,
            reg_url,
        };
        let d = Demo {
            first_loss: d.task.loss(&d.theta, &d.held_out),
            ..d
        };
        d.say(&format!(
            "run {}: {} honest miners, an adversary (copy, noise, late in turn) and a late joiner (window {}); {} windows of {} s; store {}\n\n",
            d.reg.run,
            a.miners,
            d.join_at,
            d.windows,
            window_secs,
            d.root.url()
        ));
        Ok(d)
    }

    /// Prints progress (not with `--json`, whose one object comes at the end).
    fn say(&self, text: &str) {
        if !self.ctx.json {
            use std::io::Write;
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    }

    fn name_of(&self, peer: &str) -> String {
        self.names
            .get(peer)
            .cloned()
            .unwrap_or_else(|| peer.to_string())
    }

    /// `shardrop run set --from-window W --outer-lr 0.6`: signed, compare-and-swap, only for
    /// a window that has not opened; every participant then reads the new revision, as
    /// `--follow` jobs do.
    async fn change_setting(&mut self) -> anyhow::Result<()> {
        let (ctx, change_at) = (self.ctx, self.change_at);
        let now = self
            .reg
            .clock_at(&self.reg_url, &ctx.s3, &self.cast.operator.peer_id())
            .await?;
        self.reg = Registry::revise(&self.reg_url, &ctx.s3, &self.cast.operator, |r| {
            r.set_from(demo_setting(change_at, 0.6), now)
        })
        .await?;
        self.say(&format!(
            "operator: outer learning rate 1.0 -> 0.6 from window {change_at} (registry revision {})\n\n",
            self.reg.revision
        ));
        Ok(())
    }

    /// The late joiner bootstraps from the latest checkpoint and the aggregates since.
    async fn late_join(&mut self, w: u64) -> anyhow::Result<()> {
        let (mine, state, joined) = late_join(
            self.ctx,
            &self.reg,
            &self.dir.join("late-joiner"),
            &self.theta,
            &self.outer,
            w,
        )
        .await?;
        self.say(&format!(
            "late joiner: checkpoint step {} (after window {}) + {} aggregate(s) replayed -> parameters {} the others'\n\n",
            joined.checkpoint_step,
            joined
                .checkpoint_window
                .map_or("none".to_string(), |w| w.to_string()),
            joined.replayed,
            if joined.matches {
                "bit-identical to"
            } else {
                "DIFFERENT FROM"
            }
        ));
        self.joined = Some(joined);
        self.miners.joiner_theta = Some(mine);
        self.joiner_outer = state;
        Ok(())
    }

    /// Window `w`: every miner publishes, the window closes, the aggregator and the
    /// validator judge it, everyone applies the signed aggregate, and every second window
    /// the aggregator pushes a checkpoint.
    async fn window(&mut self, w: u64) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let scene = Scene {
            ctx,
            reg: &self.reg,
            root: &self.root,
            cast: &self.cast,
            task: &self.task,
        };
        let (bytes, dense, late_shard) =
            publish_window(&scene, &mut self.miners, &self.theta, w).await?;
        wait_for_close(&self.reg, &self.root, &self.cast.operator.peer_id(), w).await?;
        if let Some(s) = late_shard {
            let adv_area = self.root.join("adversary");
            let key = layout::grad(&self.reg.run, w, &self.cast.adversary.peer_id());
            put_create(&adv_area, &adv_area.path(&key), &s).await?;
        }
        let j = judge(&scene, &mut self.evaluator, w).await?;
        self.caught += j.caught as u64;
        apply_one(ctx, &self.reg, &mut self.theta, &mut self.outer, w).await?;
        if let Some(jt) = self.miners.joiner_theta.as_mut() {
            apply_one(ctx, &self.reg, jt, &mut self.joiner_outer, w).await?;
        }
        let l = self.task.loss(&self.theta, &self.held_out);
        let ckpt = match w % 2 == 1 && w + 1 < self.windows {
            true => Some(self.checkpoint(w).await?),
            false => None,
        };
        let row = window_row(w, l, bytes, dense, &j, ckpt, &|p| self.name_of(p));
        self.say(&format!(
            "window {w}: held-out loss {l:.2}, {bytes} bytes published ({:.1}x smaller than dense), {} accepted{}, {} rejected, {} missing{}; adversary {}: {} ({}){}\nvalidator scores:\n{}\n",
            row.ratio,
            row.accepted,
            match row.reasons.get("clipped") {
                Some(n) => format!(" ({n} clipped: merged at the median norm, its noise cut down)"),
                None => String::new(),
            },
            row.rejected,
            row.missing,
            match row.reasons.is_empty() {
                true => String::new(),
                false => format!(
                    " (reasons: {})",
                    row.reasons
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            row.adversary.attack.name(),
            if j.adversary.reason.is_empty() {
                j.adversary.verdict.to_string()
            } else {
                format!("{}:{}", j.adversary.verdict, j.adversary.reason)
            },
            if j.caught {
                "caught, weight 0"
            } else {
                "NOT CAUGHT"
            },
            ckpt.map_or(String::new(), |s| format!("; checkpoint step {s} pushed")),
            super::validate::format_rows(&named_rows(&j.scored, &|p| self.name_of(p)), false)
        ));
        self.series.push((w, l, bytes));
        self.rows.push(row);
        Ok(())
    }

    /// A checkpoint after window `w`, as `shardrop ckpt push` makes it: the parameters, and
    /// the outer optimizer's momentum beside them as `apply --optimizer-state` writes it
    /// (`outer_momentum.<name>` tensors). Returns its step.
    async fn checkpoint(&mut self, w: u64) -> anyhow::Result<u64> {
        let src = self.dir.join("checkpoint-source");
        std::fs::create_dir_all(&src)?;
        std::fs::write(
            src.join("model.safetensors"),
            self.task.to_safetensors(&self.theta)?,
        )?;
        let shapes = self
            .reg
            .model
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        std::fs::write(
            src.join("outer-state.safetensors"),
            shardrop::round::outer::state_to_safetensors(
                &self.outer,
                &shapes,
                &self.reg.run,
                Some(w),
            )?,
        )?;
        let pushed = push(
            Job::new(&self.reg, &self.cast.aggregator, &self.ctx.s3),
            std::slice::from_ref(&src),
            &PushOptions {
                any_model: false,
                step: w + 1,
                window: Some(w),
                shard_size: 2 << 30,
                concurrency: 4,
            },
            &|_| {},
        )
        .await?;
        self.checkpoints.push(
            serde_json::json!({"step": pushed.step, "window": w, "manifest": pushed.manifest}),
        );
        Ok(pushed.step)
    }

    /// The chart and the summary, then the demo's verdict: it fails loudly if the held-out
    /// loss did not fall, the adversary was not caught every window, or the late joiner
    /// does not match.
    fn finish(self) -> anyhow::Result<()> {
        let Demo {
            ctx,
            dir,
            windows,
            first_loss,
            caught,
            ..
        } = &self;
        let (first_loss, caught, windows) = (*first_loss, *caught, *windows);
        let final_loss = self.task.loss(&self.theta, &self.held_out);
        let learned = final_loss < first_loss * 0.5;
        let joined = self.joined.as_ref().is_some_and(|j| j.matches);
        let chart_path = dir.join("chart.svg");
        std::fs::write(&chart_path, chart(&self.series, first_loss))?;
        let ok = learned && caught == windows && joined;
        let keys_dir = dir.join("keys");
        let summary = serde_json::json!({
            "ok": ok, "run": self.reg.run, "registry": self.reg_url, "store": self.root.url(),
            "keys": keys_dir.display().to_string(), "initial_loss": first_loss, "final_loss": final_loss,
            "windows": self.rows, "adversary": {"peer": self.cast.adversary.peer_id().to_string(), "caught_windows": caught},
            "late_joiner": self.joined, "checkpoints": self.checkpoints,
            "chart": chart_path.display().to_string(), "seconds": self.started.elapsed().as_secs_f64(),
        });
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        let text = format!(
            "{}\nheld-out loss {first_loss:.2} -> {final_loss:.2} ({}); adversary caught in {caught} of {windows} windows; late joiner {}; {} checkpoint(s); {:.1} s\n\
             on disk: store {} · keys {} · registry {}\n         chart {} · summary {} · late joiner's pulled checkpoint {}\n",
            table(first_loss, &self.rows),
            if learned { "learned" } else { "DID NOT LEARN" },
            if joined {
                "matched the others bit for bit"
            } else {
                "DID NOT MATCH"
            },
            self.checkpoints.len(),
            self.started.elapsed().as_secs_f64(),
            self.root.url(),
            keys_dir.display(),
            self.reg_url,
            chart_path.display(),
            dir.join("summary.json").display(),
            dir.join("late-joiner").display(),
        );
        out::emit(ctx, &summary, &text);
        let failed = |m: String| Err(anyhow::Error::new(out::Reported(m)));
        if !learned {
            return failed(format!(
                "training through the pipeline did not reduce the held-out loss ({first_loss:.4} -> {final_loss:.4})"
            ));
        }
        if caught != windows {
            return failed(format!(
                "the adversary was caught in only {caught} of {windows} windows"
            ));
        }
        if !joined {
            return failed(
                "the late joiner's parameters differ from the others' after bootstrapping".into(),
            );
        }
        Ok(())
    }
}

/// The summary row of window `w`.
fn window_row(
    w: u64,
    loss: f64,
    bytes: u64,
    dense: u64,
    j: &Judged,
    ckpt: Option<u64>,
    name_of: &dyn Fn(&str) -> String,
) -> WindowRow {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in &j.ledger {
        if !r.reason.is_empty() {
            *reasons.entry(r.reason.clone()).or_default() += 1;
        }
    }
    WindowRow {
        window: w,
        loss,
        bytes,
        dense_bytes: dense,
        ratio: dense as f64 / bytes.max(1) as f64,
        accepted: j.agg.accepted,
        rejected: j.agg.rejected,
        missing: j.agg.missing,
        reasons,
        aggregate: j.agg.object.clone(),
        scores: j.scored.scores.clone(),
        weights: j
            .scored
            .rows
            .iter()
            .map(|r| (name_of(&r.peer), r.weight))
            .collect(),
        adversary: AdversaryRow {
            attack: Attack::of(w),
            verdict: j.adversary.verdict.to_string(),
            reason: j.adversary.reason.clone(),
            weight: j.adversary_weight,
            caught: j.caught,
        },
        checkpoint_step: ckpt,
    }
}

/// The validator's rows with short names for the report.
fn named_rows(scored: &Validated, name_of: &dyn Fn(&str) -> String) -> Vec<ScoreRow> {
    let mut rows = scored.rows.clone();
    for r in &mut rows {
        r.peer = name_of(&r.peer);
        r.nearest = r.nearest.as_deref().map(|n| {
            if n.starts_with("agg:") {
                n.to_string()
            } else {
                name_of(n)
            }
        });
    }
    rows
}

/// The per-window table of the text report.
fn table(first_loss: f64, windows: &[WindowRow]) -> String {
    let mut table = format!(
        "{:>6} {:>12} {:>9} {:>7} {:>9} {:>9}  {:<7} {}\n{:>6} {:>12.2}\n",
        "window",
        "loss",
        "bytes",
        "ratio",
        "accepted",
        "rejected",
        "attack",
        "caught",
        "start",
        first_loss
    );
    for r in windows {
        let attack = serde_json::to_value(r.adversary.attack).unwrap_or_default();
        table += &format!(
            "{:>6} {:>12.2} {:>9} {:>6.1}x {:>9} {:>9}  {:<7} {}\n",
            r.window,
            r.loss,
            r.bytes,
            r.ratio,
            r.accepted,
            r.rejected,
            attack.as_str().unwrap_or(""),
            r.adversary.caught
        );
    }
    table
}
