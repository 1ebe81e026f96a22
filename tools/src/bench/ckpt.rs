//! `shardrop bench ckpt`: push and pull of one checkpoint through a real S3 store, timed
//! side by side on the same data in the same run against rclone, the AWS CLI, a Python
//! baseline (boto3 download + `safetensors` load) and a raw parallel ranged GET of the same
//! bytes (no verification, nothing written: the transfer limit).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use object_store::ObjectStoreExt;
use rayon::prelude::*;
use shardrop::format::codec::{CodecParams, ModelSpec};
use shardrop::format::layout;
use shardrop::identity::Identity;
use shardrop::round::registry::{Participant, Registry, Role};
use shardrop::store;

use crate::cmd::Ctx;
use crate::cmd::parse_size;

#[derive(Args)]
pub struct CkptBench {
    /// An S3 store URL [default: $SHARDROP_TEST_S3]; credentials from AWS_* (rclone and the
    /// AWS CLI get the same).
    #[arg(long)]
    store: Option<String>,
    /// Checkpoint size (f16 tensors of 64 MiB; numpy, for the Python baseline, has no bf16).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    size: u64,
    /// Ranged GETs in flight for shardrop pull and the raw GET baseline.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Python with boto3 and safetensors [env: SHARDROP_PYTHON, default python3].
    #[arg(long)]
    python: Option<String>,
    /// Skip the baselines whose tool is missing instead of failing.
    #[arg(long)]
    allow_missing: bool,
}

const TENSOR: u64 = 64 << 20;

fn make_model(dir: &Path, size: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let n = size.div_ceil(TENSOR) as usize;
    // Two source files, like a two-shard HF folder.
    let per_file = n.div_ceil(2);
    for (f, range) in [(0, 0..per_file), (1, per_file..n)] {
        let bufs: Vec<Vec<u8>> = range
            .clone()
            .into_par_iter()
            .map(|i| {
                let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut v = vec![0u8; TENSOR as usize];
                for c in v.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                v
            })
            .collect();
        let names: Vec<String> = range.map(|i| format!("model.layers.{i}.weight")).collect();
        let views = names
            .iter()
            .zip(&bufs)
            .map(|(name, b)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F16,
                    vec![(TENSOR / 2 / 4096) as usize, 4096],
                    b,
                )
                .map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize_to_file(
            views,
            None,
            &dir.join(format!("model-{:05}-of-00002.safetensors", f + 1)),
        )?;
    }
    std::fs::write(dir.join("config.json"), br#"{"model_type": "bench"}"#)?;
    Ok(())
}

fn timed(what: &str, cmd: &mut Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(secs)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn env(k: &str) -> anyhow::Result<String> {
    std::env::var(k).with_context(|| format!("{k} is not set (the baselines need it)"))
}

/// `s3://bucket/prefix` → (bucket, prefix).
fn split_s3(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .context("--store must be an s3:// URL")?;
    let (b, p) = rest.split_once('/').unwrap_or((rest, ""));
    Ok((b.to_string(), p.trim_end_matches('/').to_string()))
}

/// rclone configured through its environment (a remote named `bench`), against the same
/// endpoint and credentials.
fn rclone() -> anyhow::Result<Command> {
    let mut c = Command::new("rclone");
    // rclone 1.60 cannot combine AWS_CA_BUNDLE with its own transport.
    c.env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
        .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
        .env("RCLONE_CONFIG_BENCH_ENV_AUTH", "false")
        .env(
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID",
            env("AWS_ACCESS_KEY_ID")?,
        )
        .env(
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY",
            env("AWS_SECRET_ACCESS_KEY")?,
        )
        .env("RCLONE_CONFIG_BENCH_ENDPOINT", env("AWS_ENDPOINT_URL")?)
        .env(
            "RCLONE_CONFIG_BENCH_REGION",
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        )
        .args(["--retries", "1"]);
    Ok(c)
}

fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// One measurement: phase (`push`/`pull`), tool, seconds.
type Row = (String, String, f64);

/// A checkpoint pushed by shardrop into a fresh run, and what every tool needs to move it.
struct Setup {
    url: String,
    bucket: String,
    key_prefix: String,
    run: String,
    root: shardrop::store::Target,
    tmp: tempfile::TempDir,
    src: PathBuf,
    bytes: u64,
    reg_url: String,
    key: PathBuf,
    agg: Identity,
    exe: PathBuf,
}

pub async fn ckpt_bench(ctx: &Ctx, a: CkptBench) -> anyhow::Result<serde_json::Value> {
    let b = setup(ctx, &a).await?;
    let missing = |tool: &str| -> anyhow::Result<()> {
        if a.allow_missing {
            eprintln!("bench ckpt: {tool} not found; skipped");
            Ok(())
        } else {
            bail!("{tool} not found (install it, or pass --allow-missing)")
        }
    };
    let mut rows: Vec<Row> = Vec::new();
    push_rows(&b, &mut rows, &missing)?;
    pull_rows(&b, &a, &mut rows, &missing)?;
    let (raw_bytes, raw) = raw_get(&b, a.concurrency).await?;
    rows.push((
        "pull".into(),
        "raw parallel ranged GET (discarded)".into(),
        raw,
    ));
    clean(&b).await?;
    Ok(summary(&b, &rows, raw_bytes, raw))
}

/// A fresh run with one aggregator, its key on disk, and a model of `a.size` bytes.
async fn setup(ctx: &Ctx, a: &CkptBench) -> anyhow::Result<Setup> {
    let url = a
        .store
        .clone()
        .or_else(|| std::env::var("SHARDROP_TEST_S3").ok())
        .context("give --store s3://bucket/prefix (or run under tools/s3-server env)")?;
    let (bucket, prefix) = split_s3(&url)?;
    let run = format!(
        "ckbench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let root = store::open(&url, &ctx.s3)?.join(&run);
    let key_prefix = if prefix.is_empty() {
        run.clone()
    } else {
        format!("{prefix}/{run}")
    };
    let tmp = tempfile::Builder::new()
        .prefix("shardrop-ckbench-")
        .tempdir()?;
    let src = tmp.path().join("src");
    tokio::task::block_in_place(|| make_model(&src, a.size))?;
    let bytes = du(&src);
    let operator = Identity::generate();
    let agg = Identity::generate();
    let mut reg = Registry::new(
        &run,
        &operator.peer_id(),
        0,
        60,
        5,
        ModelSpec::default(),
        CodecParams::default(),
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &agg.peer_id(),
        root.join("agg").url(),
    ));
    let reg_url = reg.create(&root.join("op"), &operator).await?;
    let key = tmp.path().join("agg.key");
    agg.save_new(&key)?;
    Ok(Setup {
        url,
        bucket,
        key_prefix,
        run,
        root,
        src,
        bytes,
        reg_url,
        key,
        agg,
        exe: std::env::current_exe()?,
        tmp,
    })
}

/// shardrop's push, then rclone and the AWS CLI copying the same folder.
fn push_rows(
    b: &Setup,
    rows: &mut Vec<Row>,
    missing: &dyn Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let s = timed(
        "shardrop ckpt push",
        Command::new(&b.exe)
            .args(["ckpt", "push"])
            .arg(&b.src)
            .args([
                "--registry",
                &b.reg_url,
                "--key",
                &b.key.display().to_string(),
                "--step",
                "1",
                "--json",
            ]),
    )?;
    rows.push((
        "push".into(),
        "shardrop ckpt push (hash + sign + verify-ready)".into(),
        s,
    ));
    let remote_copy = |name: &str| format!("{}/copies/{name}", b.key_prefix);
    if have("rclone") {
        let dst = format!("bench:{}/{}", b.bucket, remote_copy("rclone"));
        let s = timed(
            "rclone copy (push)",
            rclone()?
                .args([
                    "copy",
                    "--transfers",
                    "8",
                    "--s3-upload-concurrency",
                    "4",
                    "--s3-chunk-size",
                    "16M",
                ])
                .arg(&b.src)
                .arg(&dst),
        )?;
        rows.push(("push".into(), "rclone copy".into(), s));
    } else {
        missing("rclone")?;
    }
    if have("aws") {
        let s = timed(
            "aws s3 cp (push)",
            Command::new("aws")
                .args([
                    "s3",
                    "cp",
                    "--recursive",
                    "--quiet",
                    "--endpoint-url",
                    &env("AWS_ENDPOINT_URL")?,
                ])
                .arg(&b.src)
                .arg(format!("s3://{}/{}", b.bucket, remote_copy("aws"))),
        )?;
        rows.push(("push".into(), "aws s3 cp --recursive".into(), s));
    } else {
        missing("aws")?;
    }
    Ok(())
}

/// Every tool reads the checkpoint shardrop pushed: shardrop's verified pull, rclone, the
/// AWS CLI, and Python (boto3 download + safetensors load).
fn pull_rows(
    b: &Setup,
    a: &CkptBench,
    rows: &mut Vec<Row>,
    missing: &dyn Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let area = b.root.join("agg");
    let manifest_url = area.url_of(&area.path(&layout::ckpt_manifest(&b.run, 1)));
    let ckpt_prefix = format!("{}/agg/{}", b.key_prefix, layout::ckpt_dir(&b.run, 1));
    let out = b.tmp.path().join("out");
    let s = timed(
        "shardrop ckpt pull",
        Command::new(&b.exe)
            .args(["ckpt", "pull", &manifest_url])
            .arg(&out)
            .args([
                "--registry",
                &b.reg_url,
                "--concurrency",
                &a.concurrency.to_string(),
                "--json",
            ]),
    )?;
    rows.push((
        "pull".into(),
        "shardrop ckpt pull (verified, written)".into(),
        s,
    ));
    let _ = std::fs::remove_dir_all(&out);
    if have("rclone") {
        let s = timed(
            "rclone copy (pull)",
            rclone()?
                .args(["copy", "--transfers", "8", "--multi-thread-streams", "4"])
                .arg(format!("bench:{}/{ckpt_prefix}", b.bucket))
                .arg(&out),
        )?;
        rows.push(("pull".into(), "rclone copy".into(), s));
        let _ = std::fs::remove_dir_all(&out);
    }
    if have("aws") {
        let s = timed(
            "aws s3 cp (pull)",
            Command::new("aws")
                .args([
                    "s3",
                    "cp",
                    "--recursive",
                    "--quiet",
                    "--endpoint-url",
                    &env("AWS_ENDPOINT_URL")?,
                ])
                .arg(format!("s3://{}/{ckpt_prefix}", b.bucket))
                .arg(&out),
        )?;
        rows.push(("pull".into(), "aws s3 cp --recursive".into(), s));
        let _ = std::fs::remove_dir_all(&out);
    }
    let python = a
        .python
        .clone()
        .or_else(|| std::env::var("SHARDROP_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let py_ok = Command::new(&python)
        .args(["-c", "import boto3, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    if py_ok {
        let s = timed(
            "python boto3 + safetensors",
            Command::new(&python)
                .args(["-c", PYTHON_PULL, &b.bucket, &ckpt_prefix])
                .arg(&out),
        )?;
        rows.push((
            "pull".into(),
            "python boto3 download + safetensors load".into(),
            s,
        ));
        let _ = std::fs::remove_dir_all(&out);
    } else {
        missing("python with boto3 and safetensors")?;
    }
    Ok(())
}

/// The Python baseline: download every shard with boto3, then load it with safetensors.
const PYTHON_PULL: &str = r#"
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
from safetensors.numpy import load_file
bucket, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
os.makedirs(out, exist_ok=True)
cfg = TransferConfig(max_concurrency=16, multipart_chunksize=16 * 1024 * 1024)
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"] if o["Key"].endswith(".safetensors")]
n = 0
for k in keys:
    path = os.path.join(out, os.path.basename(k))
    s3.download_file(bucket, k, path, Config=cfg)
    n += len(load_file(path))
print(n)
"#;

/// The transfer limit: the same shard bytes by parallel ranged GETs, discarded. Returns
/// (bytes, seconds).
async fn raw_get(b: &Setup, concurrency: usize) -> anyhow::Result<(u64, f64)> {
    let area = b.root.join("agg");
    let loc = shardrop::checkpoint::pull::Located {
        target: area.clone(),
        run: b.run.clone(),
        step: 1,
        signer: b.agg.peer_id(),
    };
    let (m, _, _) = shardrop::checkpoint::pull::fetch_manifest(&loc).await?;
    let ranges: Vec<_> = m
        .shards
        .iter()
        .flat_map(|s| {
            let p = area.path(&layout::ckpt_object(&b.run, 1, &s.file));
            let area = area.clone();
            (0..s.size)
                .step_by(m.chunk_bytes as usize)
                .map(move |a0| {
                    (
                        area.clone(),
                        p.clone(),
                        Some(a0..(a0 + m.chunk_bytes).min(s.size)),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    super::common::plain_download(ranges, concurrency).await
}

/// Removes everything the benchmark wrote to the bucket.
async fn clean(b: &Setup) -> anyhow::Result<()> {
    for p in ["copies/", "agg/", "op/"] {
        let dir = b.root.path(p);
        let listed: Vec<object_store::ObjectMeta> =
            futures::TryStreamExt::try_collect(b.root.store.list(Some(&dir))).await?;
        for o in listed {
            let _ = b.root.store.delete(&o.location).await;
        }
    }
    Ok(())
}

/// The JSON report: each row with MiB/s and its ratio to shardrop in the same phase.
fn summary(b: &Setup, rows: &[Row], raw_bytes: u64, raw: f64) -> serde_json::Value {
    let mib = b.bytes as f64 / (1 << 20) as f64;
    let get = |phase: &str, name: &str| {
        rows.iter()
            .find(|r| r.0 == phase && r.1.starts_with(name))
            .map(|r| r.2)
    };
    let ours_push = get("push", "shardrop").unwrap_or(f64::NAN);
    let ours_pull = get("pull", "shardrop").unwrap_or(f64::NAN);
    let fastest_other_pull = rows
        .iter()
        .filter(|r| r.0 == "pull" && !r.1.starts_with("shardrop") && !r.1.starts_with("raw"))
        .map(|r| r.2)
        .fold(f64::INFINITY, f64::min);
    let table: Vec<serde_json::Value> = rows
        .iter()
        .map(|(phase, name, s)| {
            let ours = if phase == "push" { ours_push } else { ours_pull };
            serde_json::json!({"phase": phase, "tool": name, "seconds": s, "mib_per_s": mib / s, "shardrop_speedup": s / ours})
        })
        .collect();
    serde_json::json!({
        "store": b.url, "bytes": b.bytes, "raw_get_bytes": raw_bytes, "rows": table,
        "pull_vs_fastest_baseline": fastest_other_pull / ours_pull,
        "pull_over_raw_get": ours_pull / raw,
        "source": b.src.display().to_string(),
    })
}
