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
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::aggregate::{aggregate_window, apply_aggregates};
use shardrop::codec::{CodecParams, EfState, IndexEncoding, ScaleMode, ValueFormat};
use shardrop::envelope::{Expect, Limits, RemoteEnvelope, read_all_sections};
use shardrop::exchange::{publish, shard_builder};
use shardrop::identity::Identity;
use shardrop::layout;
use shardrop::registry::{Participant, Registry, Role};
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

const D_IN: usize = 128;
const D_OUT: usize = 32;

/// xorshift + Box–Muller-free bell curve: deterministic, dependency-free data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = |s: u64| ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
        (u(self.0) + u(self.0.rotate_left(21)) + u(self.0.rotate_left(42))) * 2.0
    }
}

fn true_map() -> Vec<f32> {
    let mut r = Rng(0xA11CE);
    (0..D_IN * D_OUT).map(|_| r.next()).collect()
}

fn sample(r: &mut Rng, a: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..D_IN).map(|_| r.next()).collect();
    let y = (0..D_OUT)
        .map(|o| (0..D_IN).map(|i| a[o * D_IN + i] * x[i]).sum::<f32>() + 0.01 * r.next())
        .collect();
    (x, y)
}

fn loss(w: &[f32], batch: &[(Vec<f32>, Vec<f32>)]) -> f64 {
    let mut s = 0f64;
    for (x, y) in batch {
        for o in 0..D_OUT {
            let p: f32 = (0..D_IN).map(|i| w[o * D_IN + i] * x[i]).sum();
            s += ((p - y[o]) as f64).powi(2);
        }
    }
    s / batch.len() as f64
}

/// `steps` SGD steps of mean squared error on this miner's data for this window.
fn train(w: &mut [f32], miner: usize, window: u64, a: &[f32], steps: usize) {
    let mut r = Rng(0x5EED ^ ((miner as u64 + 1) << 32) ^ (window + 1));
    let lr = 0.02f32;
    for _ in 0..steps {
        let batch: Vec<_> = (0..8).map(|_| sample(&mut r, a)).collect();
        let mut g = vec![0f32; w.len()];
        for (x, y) in &batch {
            for o in 0..D_OUT {
                let p: f32 = (0..D_IN).map(|i| w[o * D_IN + i] * x[i]).sum();
                let e = 2.0 * (p - y[o]) / batch.len() as f32;
                for i in 0..D_IN {
                    g[o * D_IN + i] += e * x[i];
                }
            }
        }
        for (wi, gi) in w.iter_mut().zip(&g) {
            *wi -= lr * gi;
        }
    }
}

fn as_safetensors(name: &str, w: &[f32]) -> anyhow::Result<Vec<u8>> {
    let raw: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(safetensors::serialize(
        vec![(name, TensorView::new(Dtype::F32, vec![D_OUT, D_IN], &raw)?)],
        None,
    )?)
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
    let miners: Vec<Identity> = (0..=a.miners)
        .map(|i| key(&format!("miner-{i}")))
        .collect::<Result<_, _>>()?;
    let copier_ix = a.miners; // the last one
    let started = std::time::Instant::now();
    let now = store_now_ms(&root, "clock/demo").await?;
    let run = format!("demo-{now}");
    let a_true = true_map();
    let theta0 = vec![0f32; D_IN * D_OUT];
    let model = shardrop::codec::model_of(&as_safetensors("linear.weight", &theta0)?)?;
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
    for (i, m) in miners.iter().enumerate() {
        reg.participants.push(Participant::new(
            Role::Miner,
            &m.peer_id(),
            area(&format!("miner-{i}")).url(),
        ));
    }
    let reg_url = reg.create(&area("operator"), &operator).await?;
    let (reg, _) = Registry::load(&reg_url, &ctx.s3, Some(operator.peer_id())).await?;

    let mut eval_rng = Rng(0xE7A1);
    let held_out: Vec<_> = (0..256).map(|_| sample(&mut eval_rng, &a_true)).collect();
    let mut theta = theta0.clone();
    let mut states: Vec<EfState> = (0..a.miners).map(|_| EfState::default()).collect();
    let first_loss = loss(&theta, &held_out);
    let mut table = format!(
        "run {run}: {} miners + 1 copier, {} windows of {} s, store {}\n\n{:>6} {:>12} {:>10} {:>7} {:>8} {:>9}  {}\n{:>6} {:>12.4}\n",
        a.miners,
        a.windows,
        a.window_secs,
        root.url(),
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
            let mut local = theta.clone();
            train(&mut local, i, w, &a_true, 20);
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(s, e)| s - e).collect();
            let p = publish(
                &reg,
                &miners[i],
                &ctx.s3,
                Some(w),
                &as_safetensors("linear.weight", &delta)?,
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
        if copier_row.is_some_and(|r| r.reason == "duplicate") {
            copier_caught += 1;
        }
        // Everyone applies the signed aggregate (catch-up of one window).
        let mut t: BTreeMap<String, Vec<f32>> =
            [("linear.weight".to_string(), theta.clone())].into();
        apply_aggregates(&reg, &ctx.s3, &mut t, w, w).await?;
        theta = t.remove("linear.weight").context("model tensor")?;
        let l = loss(&theta, &held_out);
        table += &format!(
            "{:>6} {:>12.4} {:>10} {:>6.1}x {:>8} {:>9}  {:?}\n",
            w,
            l,
            bytes,
            dense as f64 / bytes as f64,
            agg.accepted,
            agg.rejected,
            agg.reasons
        );
        windows.push(serde_json::json!({
            "window": w, "loss": l, "bytes": bytes, "dense_bytes": dense, "accepted": agg.accepted,
            "rejected": agg.rejected, "reasons": agg.reasons, "aggregate": agg.object,
        }));
    }
    let final_loss = loss(&theta, &held_out);
    let learned = final_loss < first_loss * 0.5;
    table += &format!(
        "\nheld-out loss {first_loss:.4} -> {final_loss:.4} ({}); copier caught as duplicate in {copier_caught} of {} windows; {:.1} s\nkeys in {}, registry {reg_url}\n",
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
