//! `shardrop bench round`: one window with many miners through a real store. Reports the
//! time from the window's close (by the store's clock) to the aggregate being published,
//! bytes moved and peak memory, against the transfer limit measured in the same run: a
//! plain parallel download of the same shard objects with the same concurrency.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::codec::{CodecParams, EfState, EncodeOptions, encode_update, model_of};
use shardrop::exchange::{clock, shard_builder};
use shardrop::identity::Identity;
use shardrop::layout;
use shardrop::registry::{Participant, Registry, Role};
use shardrop::store::{self, put_create};
use shardrop::window::store_now_ms;

use super::Ctx;

#[derive(Args)]
pub struct RoundBench {
    /// Store URL [default: $SHARDROP_TEST_S3, else a temporary folder].
    #[arg(long)]
    store: Option<String>,
    #[arg(long, default_value_t = 64)]
    miners: usize,
    /// Model parameters (suffixes K, M allowed), split over 8 tensors.
    #[arg(long, default_value = "100M", value_parser = parse_count)]
    params: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

fn parse_count(s: &str) -> Result<u64, String> {
    let (n, m) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1_000),
        Some('M' | 'm') => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    n.parse::<u64>().map(|v| v * m).map_err(|e| e.to_string())
}

fn update(names: &[String], per: usize, seed: u64) -> anyhow::Result<Vec<u8>> {
    let bufs: Vec<Vec<u8>> = names
        .par_iter()
        .enumerate()
        .map(|(t, _)| {
            let mut x = (seed * 1000 + t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut out = Vec::with_capacity(per * 4);
            for _ in 0..per {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = (((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 1e-3;
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        })
        .collect();
    let views = names
        .iter()
        .zip(&bufs)
        .map(|(n, b)| {
            TensorView::new(Dtype::F32, vec![per / 1024, 1024], b).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(safetensors::serialize(views, None)?)
}

pub async fn round_bench(ctx: &Ctx, a: RoundBench) -> anyhow::Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let url = a
        .store
        .clone()
        .or_else(|| std::env::var("SHARDROP_TEST_S3").ok())
        .unwrap_or_else(|| tmp.path().display().to_string());
    let run = format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let root = store::open(&url, &ctx.s3)?.join(&run);
    let per = ((a.params / 8) as usize).div_ceil(4096) * 4096;
    let names: Vec<String> = (0..8).map(|i| format!("layer.{i}.weight")).collect();
    let model = model_of(&update(&names, 4096, 0)?)?;
    let mut model = model;
    for t in &mut model.tensors {
        t.shape = vec![(per / 1024) as u64, 1024];
    }
    let operator = Identity::generate();
    let aggregator = Identity::generate();
    let miners: Vec<Identity> = (0..a.miners).map(|_| Identity::generate()).collect();
    let mut reg = Registry::new(
        &run,
        &operator.peer_id(),
        0,
        1,
        0,
        model,
        CodecParams::default(),
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        root.join("aggregator").url(),
    ));
    // Publish every miner's shard for window 0.
    let first = store_now_ms(&root, "clock").await?;
    let mut shard_bytes = 0u64;
    let publish_started = Instant::now();
    for (i, m) in miners.iter().enumerate() {
        let area = root.join(&format!("miner-{i}"));
        let upd = tokio::task::block_in_place(|| update(&names, per, i as u64 + 1))?;
        let opts = EncodeOptions {
            params: reg.codec,
            beta: reg.beta,
            section_bytes: 16 << 20,
        };
        let enc =
            tokio::task::block_in_place(|| encode_update(&upd, &mut EfState::default(), &opts))?;
        let signed = shard_builder(&reg, &run, 0, &enc.sections)?.sign(m)?;
        shard_bytes += signed.len();
        put_create(
            &area,
            &area.path(&layout::grad(&run, 0, &m.peer_id())),
            &signed,
        )
        .await?;
        reg.participants
            .push(Participant::new(Role::Miner, &m.peer_id(), area.url()));
    }
    let publish_secs = publish_started.elapsed().as_secs_f64();
    // Window 0 spans exactly the publishing, and closes a second later.
    let now = store_now_ms(&root, "clock").await?;
    reg.genesis_ms = first.saturating_sub(1000);
    reg.window_secs = (now - reg.genesis_ms) / 1000 + 1;
    let reg_url = reg.create(&root.join("operator"), &operator).await?;
    let (reg, _) = Registry::load(&reg_url, &ctx.s3, Some(operator.peer_id())).await?;
    let closes = clock(&reg).closes(0);
    loop {
        let now = store_now_ms(&root, "clock").await?;
        if now >= closes {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(closes - now + 10)).await;
    }
    // The aggregation: the real `shardrop aggregate` command as its own process, which
    // reports its peak resident memory.
    let key_file = tmp.path().join("aggregator.key");
    aggregator.save_new(&key_file)?;
    let t = Instant::now();
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "aggregate",
            "--registry",
            &reg_url,
            "--key",
            &key_file.display().to_string(),
            "--window",
            "0",
            "--json",
        ])
        .args(["--concurrency", &a.concurrency.to_string()])
        .output()?;
    let agg_secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        anyhow::bail!(
            "shardrop aggregate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agg: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("aggregate --json output")?;
    let after = store_now_ms(&root, "clock").await?;
    // The transfer limit: the same objects, a plain parallel download.
    let paths: Vec<_> = miners
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let area = root.join(&format!("miner-{i}"));
            let p = area.path(&layout::grad(&run, 0, &m.peer_id()));
            (area, p)
        })
        .collect();
    let (downloaded, download_secs) = super::bench::plain_download(
        paths.into_iter().map(|(area, p)| (area, p, None)).collect(),
        a.concurrency,
    )
    .await?;
    Ok(serde_json::json!({
        "store": root.url(), "miners": a.miners, "params": per as u64 * 8, "accepted": agg["accepted"],
        "shard_bytes_total": shard_bytes, "shard_bytes_each": shard_bytes / a.miners.max(1) as u64,
        "aggregate_bytes": agg["bytes"], "publish_seconds": publish_secs,
        "aggregate_seconds": agg_secs, "close_to_published_ms": after.saturating_sub(closes),
        "plain_download_seconds": download_secs, "plain_download_bytes": downloaded,
        "ratio_to_transfer_limit": agg_secs / download_secs,
        "aggregate_peak_rss_mib": agg["peak_rss_mib"],
        "accumulator_mib": (per * 8 * 4) as f64 / (1 << 20) as f64,
    }))
}
