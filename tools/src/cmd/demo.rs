//! The main job on an embedded default: a local folder store, keys made on the spot.
//!
//! Miners train the same small model (a linear map learned from noisy samples, each miner on
//! its own data) for a few inner steps per window, and publish the pseudo-gradient
//! θ_start − θ_end through the real publish path (encode, sign, create-only put into their
//! own area). After each window closes, the aggregator verifies and merges through the same
//! code as `shardrop aggregate`, and every miner applies the signed aggregate through the
//! same code as `shardrop apply`. One miner is a copier: it re-signs another miner's update
//! as its own; the ledger must catch it. The demo fails loudly if the held-out loss does not
//! fall or the copier is not caught.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use object_store::ObjectStoreExt;
use shardrop::aggregate::{aggregate_window, apply_aggregates};
use shardrop::codec::{CodecParams, EfState, IndexEncoding, ScaleMode, ValueFormat};
use shardrop::envelope::{Expect, Limits, RemoteEnvelope, read_all_sections};
use shardrop::evaluate::{Evaluator, ReferenceEvaluator};
use shardrop::exchange::{publish, shard_builder};
use shardrop::identity::Identity;
use shardrop::layout;
use shardrop::refmodel::{LinearTask, TENSOR};
use shardrop::registry::{Participant, Registry, Role};
use shardrop::score::{ValidateOptions, validate_window};
use shardrop::store::{self, Target, put_create};
use shardrop::tables::read_ledger;
use shardrop::window::store_now_ms;

use super::Ctx;
use crate::out;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for keys, the local store and the summary.
    #[arg(long, default_value = "./shardrop-demo")]
    dir: PathBuf,
    /// Store URL (default: DIR/store, a local folder).
    #[arg(long)]
    store: Option<String>,
    /// Honest miners (a copier is added).
    #[arg(long, default_value_t = 4)]
    miners: usize,
    /// Windows to train.
    #[arg(long, default_value_t = 6)]
    windows: u64,
    /// Window length in seconds.
    #[arg(long, default_value_t = 2)]
    window_secs: u64,
}

fn load_or_make(path: &std::path::Path) -> anyhow::Result<Identity> {
    if path.exists() {
        return Ok(Identity::load(path)?);
    }
    let id = Identity::generate();
    id.save_new(path)?;
    Ok(id)
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

pub async fn demo(ctx: &Ctx, a: DemoArgs) -> anyhow::Result<()> {
    if a.miners < 2 || a.windows < 2 {
        bail!("--miners and --windows must be at least 2");
    }
    let keys_dir = a.dir.join("keys");
    std::fs::create_dir_all(&keys_dir)
        .with_context(|| format!("{}: cannot create", keys_dir.display()))?;
    let store_url = match &a.store {
        Some(u) => u.clone(),
        None => std::path::absolute(a.dir.join("store"))?
            .display()
            .to_string(),
    };
    let root = store::open(&store_url, &ctx.s3)?;
    let key = |name: &str| load_or_make(&keys_dir.join(format!("{name}.key")));
    let operator = key("operator")?;
    let aggregator = key("aggregator")?;
    let validator = key("validator")?;
    let miners: Vec<Identity> = (0..=a.miners)
        .map(|i| key(&format!("miner-{i}")))
        .collect::<Result<_, _>>()?;
    let copier_ix = a.miners; // the last one
    let started = std::time::Instant::now();
    let now = store_now_ms(&root, "clock/demo").await?;
    let run = format!("demo-{now}");
    let task = LinearTask::standard();
    let model = task.model_spec();
    let mut reg = Registry::new(
        &run,
        &operator.peer_id(),
        now,
        a.window_secs,
        1,
        model,
        CodecParams {
            chunk: 1024,
            k: 48,
            values: ValueFormat::Int4,
            scales: ScaleMode::Chunk,
            indices: IndexEncoding::Compact,
        },
    );
    let area = |name: &str| root.join(name);
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        area("aggregator").url(),
    ));
    reg.participants.push(Participant::new(
        Role::Validator,
        &validator.peer_id(),
        area("validator").url(),
    ));
    for (i, m) in miners.iter().enumerate() {
        reg.participants.push(Participant::new(
            Role::Miner,
            &m.peer_id(),
            area(&format!("miner-{i}")).url(),
        ));
    }
    let reg_url = reg.create(&area("operator"), &operator).await?;
    let (reg, _) = Registry::load(&reg_url, &ctx.s3, Some(operator.peer_id())).await?;

    let held_out = task.held_out();
    let mut theta = task.init();
    let mut states: Vec<EfState> = (0..a.miners).map(|_| EfState::default()).collect();
    let first_loss = task.loss(&theta, &held_out);
    let mut evaluator = ReferenceEvaluator::new(task.clone(), std::time::Duration::from_secs(10));
    let names: BTreeMap<String, String> = miners
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let n = if i == copier_ix {
                "copier".to_string()
            } else {
                format!("miner-{i}")
            };
            (m.peer_id().to_string(), n)
        })
        .collect();
    let say = |text: &str| {
        if !ctx.json {
            use std::io::Write;
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    };
    say(&format!(
        "run {run}: {} miners + 1 copier, {} windows of {} s, store {}\n\n",
        a.miners,
        a.windows,
        a.window_secs,
        root.url()
    ));
    let mut table = format!(
        "{:>6} {:>12} {:>10} {:>7} {:>8} {:>9}  {}\n{:>6} {:>12.4}\n",
        "window",
        "eval loss",
        "bytes",
        "ratio",
        "accepted",
        "rejected",
        "reasons",
        "start",
        first_loss
    );
    let mut windows = Vec::new();
    let mut copier_caught = 0;
    for w in 0..a.windows {
        // Miners train from the shared θ and publish θ_start − θ_end.
        let mut bytes = 0u64;
        let mut dense = 0u64;
        for i in 0..a.miners {
            let delta = task.pseudo_gradient(&theta, i as u64, w, 20);
            let p = publish(
                &reg,
                &miners[i],
                &ctx.s3,
                Some(w),
                &task.to_safetensors(&delta)?,
                &mut states[i],
            )
            .await?;
            bytes += p.bytes;
            dense += p.dense_bytes;
        }
        copy_as_own(
            &reg,
            (&miners[0], &area("miner-0")),
            (&miners[copier_ix], &area(&format!("miner-{copier_ix}"))),
            w,
        )
        .await?;
        // The aggregator waits for the window to close by the store's clock, then merges.
        let agg = aggregate_window(&reg, &aggregator, &ctx.s3, w, 8).await?;
        let agg_area = area("aggregator");
        let ledger = read_ledger(
            agg_area
                .store
                .get(&agg_area.path(&layout::ledger(&run, w)))
                .await?
                .bytes()
                .await?,
        )?;
        let copier_row = ledger
            .iter()
            .find(|r| r.peer == miners[copier_ix].peer_id().to_string());
        let scored = validate_window(
            &reg,
            &validator,
            &ctx.s3,
            w,
            Some(&mut evaluator as &mut dyn Evaluator),
            &ValidateOptions::default(),
        )
        .await?;
        let copier_score = scored
            .rows
            .iter()
            .find(|r| r.peer == miners[copier_ix].peer_id().to_string());
        if copier_row.is_some_and(|r| r.reason == "duplicate")
            && copier_score.is_some_and(|r| r.copier && r.weight == 0.0)
        {
            copier_caught += 1;
        }
        // Everyone applies the signed aggregate (catch-up of one window).
        let mut t: BTreeMap<String, Vec<f32>> = [(TENSOR.to_string(), theta.clone())].into();
        apply_aggregates(&reg, &ctx.s3, &mut t, w, w).await?;
        theta = t.remove(TENSOR).context("model tensor")?;
        let l = task.loss(&theta, &held_out);
        let line = format!(
            "{:>6} {:>12.4} {:>10} {:>6.1}x {:>8} {:>9}  {:?}\n",
            w,
            l,
            bytes,
            dense as f64 / bytes as f64,
            agg.accepted,
            agg.rejected,
            agg.reasons
        );
        table += &line;
        let weights: BTreeMap<&str, f64> = scored
            .rows
            .iter()
            .map(|r| (names.get(&r.peer).map_or("?", |n| n.as_str()), r.weight))
            .collect();
        // The live view: the window's line, then its scores as the validator published them.
        let mut rows = scored.rows.clone();
        for r in &mut rows {
            r.peer = names.get(&r.peer).cloned().unwrap_or_default();
            if let Some(n) = r.nearest.as_ref().and_then(|n| names.get(n)) {
                r.nearest = Some(n.clone());
            }
        }
        say(&format!(
            "window {w}: eval loss {l:.4}, {bytes} bytes published ({:.1}x smaller), {} accepted, {} rejected {:?}\nvalidator ({}):\n{}\n",
            dense as f64 / bytes as f64,
            agg.accepted,
            agg.rejected,
            agg.reasons,
            scored.evaluator,
            super::validate::format_rows(&rows, false)
        ));
        windows.push(serde_json::json!({
            "window": w, "loss": l, "bytes": bytes, "dense_bytes": dense, "accepted": agg.accepted,
            "rejected": agg.rejected, "reasons": agg.reasons, "aggregate": agg.object,
            "scores": scored.scores, "weights": weights,
        }));
    }
    let final_loss = task.loss(&theta, &held_out);
    let learned = final_loss < first_loss * 0.5;
    table += &format!(
        "\nheld-out loss {first_loss:.4} -> {final_loss:.4} ({}); copier caught (ledger: duplicate; validator: copier, weight 0) in {copier_caught} of {} windows; {:.1} s\nkeys in {}, registry {reg_url}\n",
        if learned { "learned" } else { "DID NOT LEARN" },
        a.windows,
        started.elapsed().as_secs_f64(),
        keys_dir.display()
    );
    let summary = serde_json::json!({
        "ok": learned && copier_caught == a.windows, "run": run, "registry": reg_url, "store": root.url(),
        "keys": keys_dir.display().to_string(), "initial_loss": first_loss, "final_loss": final_loss,
        "windows": windows, "copier": {"peer": miners[copier_ix].peer_id().to_string(), "caught_windows": copier_caught},
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        a.dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    out::emit(ctx, &summary, &table);
    if !learned {
        bail!(
            "training through the pipeline did not reduce the held-out loss ({first_loss:.4} -> {final_loss:.4})"
        );
    }
    if copier_caught != a.windows {
        bail!(
            "the copier was caught in only {copier_caught} of {} windows",
            a.windows
        );
    }
    Ok(())
}
