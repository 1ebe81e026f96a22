//! `shardrop bench round`: one window with many miners through a real store. Reports the
//! time from the window's close (by the store's clock) to the aggregate being published,
//! bytes moved and peak memory, against the transfer limit measured in the same run: a
//! plain parallel download of the same shard objects with the same concurrency. The
//! validator then scores the same window (`shardrop validate --evaluator none`, its own
//! process): its time and peak memory.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use object_store::ObjectStoreExt;
use rayon::prelude::*;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::format::codec::{CodecParams, EfState, EncodeOptions, encode_update, model_of};
use shardrop::format::layout;
use shardrop::identity::Identity;
use shardrop::round::publish::{clock, shard_builder};
use shardrop::round::registry::{AggForm, AggregateSpec, Participant, Registry, Role};
use shardrop::round::replay::{Fetched, apply_aggregates, fetch_aggregate};
use shardrop::round::window::store_now_ms;
use shardrop::store::{self, put_create};

use crate::cmd::Ctx;

#[derive(Args)]
pub struct RoundBench {
    /// Store URL [default: $SHARDROP_TEST_S3, else a temporary folder].
    #[arg(long)]
    store: Option<String>,
    /// Miners publishing into the window.
    #[arg(long, default_value_t = 64)]
    miners: usize,
    /// Model parameters (suffixes K, M allowed), split over 8 tensors.
    #[arg(long, default_value = "100M", value_parser = parse_count)]
    params: u64,
    /// Miners fetched at once (`aggregate --concurrency`).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// agg-v2's form (`run init --agg-form`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "shards", "merged", "reference"])]
    form: String,
    /// Also aggregate the same window as agg-v1 (side by side: its merged size, time and
    /// memory, and the parameters after apply compared bit for bit).
    #[arg(long)]
    with_v1: bool,
    /// Another `shardrop` binary (an earlier build) whose `validate` scores the same window
    /// side by side as the baseline: its time and peak memory, and its table compared with
    /// this build's.
    #[arg(long)]
    baseline_bin: Option<std::path::PathBuf>,
}

/// Runs the real `shardrop aggregate` as its own process (it reports its peak memory).
fn aggregate_process(
    reg_url: &str,
    key_file: &std::path::Path,
    concurrency: usize,
) -> anyhow::Result<(f64, serde_json::Value)> {
    job_process(None, "aggregate", &[], reg_url, key_file, concurrency)
}

/// Runs `shardrop <command> … --window 0 --json` as its own process (`bin`, or this one):
/// its wall time and its JSON (with its peak memory).
fn job_process(
    bin: Option<&std::path::Path>,
    command: &str,
    extra: &[&str],
    reg_url: &str,
    key_file: &std::path::Path,
    concurrency: usize,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let exe = match bin {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?,
    };
    let out = std::process::Command::new(exe)
        .args([
            command,
            "--registry",
            reg_url,
            "--key",
            &key_file.display().to_string(),
            "--window",
            "0",
            "--json",
        ])
        .args(["--concurrency", &concurrency.to_string()])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let (peak, out) = watch_peak(out)?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        anyhow::bail!(
            "shardrop {command} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut json: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{command} --json output"))?;
    // A build that does not report its own peak gets the sampled one.
    if json["peak_rss_mib"].is_null() {
        json["peak_rss_mib"] = peak.into();
    }
    Ok((secs, json))
}

/// Waits for `child`, sampling its peak resident memory (`/proc/PID/status` VmHWM, every
/// 20 ms: growth in its last 20 ms may be missed) while its output is collected.
fn watch_peak(mut child: std::process::Child) -> anyhow::Result<(f64, std::process::Output)> {
    use std::io::Read;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let pid = child.id().to_string();
    let mut peak = 0f64;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        peak = peak.max(crate::out::peak_rss_mib_of(&pid).unwrap_or(0.0));
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("reading a child's output failed"))
    };
    Ok((
        peak,
        std::process::Output {
            status,
            stdout: join(out)?,
            stderr: join(err)?,
        },
    ))
}

/// One peer's catch-up of window 0 onto θ = 0, in this process: its time, and the bytes a
/// reader fetches (the aggregate, then every listed shard's head and sections: for agg-v2
/// the listed objects whole).
async fn apply_once(
    reg: &Registry,
    s3: &store::S3Options,
) -> anyhow::Result<(f64, u64, BTreeMap<String, Vec<f32>>)> {
    let (_, target) = reg.aggregator(s3)?;
    let agg = target
        .store
        .head(&target.path(&layout::agg(&reg.run, 0)))
        .await?;
    let mut fetched = agg.size;
    if let Fetched::Listed(list) = fetch_aggregate(reg, s3, 0).await? {
        if let Some(m) = &list.merged {
            fetched += target.store.head(&target.path(&m.object)).await?.size;
        }
        for a in list.accepted.iter().filter(|_| list.merged.is_none()) {
            let src = match list.form {
                AggForm::Reference => {
                    let m = reg
                        .with_role(Role::Miner)
                        .into_iter()
                        .find(|m| m.peer == a.peer)
                        .context("listed peer")?;
                    reg.open_store(m, s3)?
                }
                _ => target.clone(),
            };
            fetched += src.store.head(&src.path(&a.object)).await?.size;
        }
    }
    let mut theta: BTreeMap<String, Vec<f32>> = reg
        .model
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                vec![0f32; t.shape.iter().product::<u64>() as usize],
            )
        })
        .collect();
    let t = Instant::now();
    apply_aggregates(reg, s3, &mut theta, 0, 0).await?;
    Ok((t.elapsed().as_secs_f64(), fetched, theta))
}

/// Two validators' rows for the same window agree: every column equal, agreement (and the
/// score and rating made from it) within f64 rounding. An error names the first difference.
/// Where the baseline has no `nearest` (earlier builds screened large windows' pairs with a
/// MinHash sketch and compared none of this miner's), its copy columns are not compared;
/// returns how many rows that was.
fn same_scores(a: &serde_json::Value, b: &serde_json::Value) -> anyhow::Result<usize> {
    let (Some(a), Some(b)) = (a.as_array(), b.as_array()) else {
        anyhow::bail!("validate --json has no rows");
    };
    anyhow::ensure!(a.len() == b.len(), "{} rows against {}", a.len(), b.len());
    let close = ["agreement", "score", "rating", "weight"];
    let mut unscreened = 0;
    for (x, y) in a.iter().zip(b) {
        let (Some(x), Some(y)) = (x.as_object(), y.as_object()) else {
            anyhow::bail!("a row is not an object");
        };
        let screened_out = y["nearest"].is_null() && !x["nearest"].is_null();
        unscreened += usize::from(screened_out);
        for (k, v) in x {
            if screened_out && ["nearest", "overlap", "similarity"].contains(&k.as_str()) {
                continue;
            }
            let w = &y[k];
            let same = match (v.as_f64(), w.as_f64()) {
                (Some(p), Some(q)) if close.contains(&k.as_str()) => (p - q).abs() <= 1e-9,
                _ => v == w,
            };
            anyhow::ensure!(same, "peer {}: {k} is {v} against {w}", x["peer"]);
        }
    }
    Ok(unscreened)
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
    let validator = Identity::generate();
    let baseline_validator = Identity::generate();
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
    reg.participants.push(Participant::new(
        Role::Validator,
        &validator.peer_id(),
        root.join("validator").url(),
    ));
    if a.baseline_bin.is_some() {
        reg.participants.push(Participant::new(
            Role::Validator,
            &baseline_validator.peer_id(),
            root.join("validator-baseline").url(),
        ));
    }
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
    reg.aggregate = AggregateSpec::v2(AggForm::parse(&a.form).context("--form")?);
    let reg_url = reg.create(&root.join("operator"), &operator).await?;
    let v1_url = match a.with_v1 {
        true => {
            // The same run and shards, another operator path and aggregator store.
            let mut v1 = reg.clone();
            v1.aggregate = AggregateSpec::default();
            for p in &mut v1.participants {
                if p.role == Role::Aggregator {
                    p.store = root.join("aggregator-v1").url();
                }
            }
            Some(v1.create(&root.join("operator-v1"), &operator).await?)
        }
        false => None,
    };
    let (reg, _) = Registry::load(&reg_url, &ctx.s3, Some(operator.peer_id())).await?;
    let closes = clock(&reg).closes(0);
    loop {
        let now = store_now_ms(&root, "clock").await?;
        if now >= closes {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(closes - now + 10)).await;
    }
    let key_file = tmp.path().join("aggregator.key");
    aggregator.save_new(&key_file)?;
    let (agg_secs, agg) = aggregate_process(&reg_url, &key_file, a.concurrency)?;
    let after = store_now_ms(&root, "clock").await?;
    let val_key = tmp.path().join("validator.key");
    validator.save_new(&val_key)?;
    let (val_secs, val) = job_process(
        None,
        "validate",
        &["--evaluator", "none"],
        &reg_url,
        &val_key,
        a.concurrency,
    )?;
    let baseline = match &a.baseline_bin {
        Some(bin) => {
            let key = tmp.path().join("validator-baseline.key");
            baseline_validator.save_new(&key)?;
            let (secs, json) = job_process(
                Some(bin),
                "validate",
                &["--evaluator", "none"],
                &reg_url,
                &key,
                a.concurrency,
            )?;
            serde_json::json!({"validate_seconds": secs,
                "validate_peak_rss_mib": json["peak_rss_mib"],
                "rows_agree": true,
                "rows_whose_pairs_the_baseline_screened_out":
                    same_scores(&val["rows"], &json["rows"])?})
        }
        None => serde_json::Value::Null,
    };
    let (accepted_bytes, used_form) = match fetch_aggregate(&reg, &ctx.s3, 0).await? {
        Fetched::Listed(list) => (
            list.accepted
                .iter()
                .flat_map(|x| &x.sections)
                .map(|s| s.len)
                .sum::<u64>(),
            list.form.name(),
        ),
        Fetched::Merged(_) => (0, "agg-v1"),
    };
    let (apply_secs, per_peer, theta) = apply_once(&reg, &ctx.s3).await?;
    let v1 = match &v1_url {
        Some(url) => {
            let (reg1, _) = Registry::load(url, &ctx.s3, Some(operator.peer_id())).await?;
            let (secs, json) = aggregate_process(url, &key_file, a.concurrency)?;
            let (apply1, fetched1, theta1) = apply_once(&reg1, &ctx.s3).await?;
            let same = theta.iter().all(|(k, v)| {
                theta1[k].len() == v.len()
                    && v.iter()
                        .zip(&theta1[k])
                        .all(|(x, y)| x.to_bits() == y.to_bits())
            });
            anyhow::ensure!(same, "agg-v1 and agg-v2 parameters differ after apply");
            serde_json::json!({"aggregate_seconds": secs, "aggregate_bytes": json["bytes"],
                "aggregate_peak_rss_mib": json["peak_rss_mib"], "apply_seconds": apply1,
                "per_peer_download_bytes": fetched1, "params_bit_identical_to_v2": same})
        }
        None => serde_json::Value::Null,
    };
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
    let (downloaded, download_secs) = super::common::plain_download(
        paths.into_iter().map(|(area, p)| (area, p, None)).collect(),
        a.concurrency,
    )
    .await?;
    let min_v1 = v1["per_peer_download_bytes"]
        .as_u64()
        .map_or(accepted_bytes, |b| b.min(accepted_bytes));
    Ok(serde_json::json!({
        "store": root.url(), "miners": a.miners, "params": per as u64 * 8, "accepted": agg["accepted"],
        "format": "agg-v2", "form": a.form, "form_used": used_form,
        "shard_bytes_total": shard_bytes, "shard_bytes_each": shard_bytes / a.miners.max(1) as u64,
        "accepted_section_bytes": accepted_bytes,
        "aggregate_bytes": agg["bytes"], "publish_seconds": publish_secs,
        "aggregate_seconds": agg_secs, "close_to_published_ms": after.saturating_sub(closes),
        "plain_download_seconds": download_secs, "plain_download_bytes": downloaded,
        "ratio_to_transfer_limit": agg_secs / download_secs,
        "aggregate_peak_rss_mib": agg["peak_rss_mib"],
        "aggregate_phase_seconds": agg["phases"],
        "validate_seconds": val_secs, "validate_peak_rss_mib": val["peak_rss_mib"],
        "validate_phase_seconds": val["phases"],
        "validate_baseline": baseline,
        "per_peer_download_bytes": per_peer,
        "per_peer_download_over_accepted": per_peer as f64 / accepted_bytes.max(1) as f64,
        "per_peer_download_over_min_accepted_v1": per_peer as f64 / min_v1.max(1) as f64,
        "apply_seconds": apply_secs,
        "apply_over_plain_download": apply_secs / download_secs,
        "dense_accumulator_mib_v1_would_hold": (per * 8 * 4) as f64 / (1 << 20) as f64,
        "agg_v1": v1,
    }))
}
