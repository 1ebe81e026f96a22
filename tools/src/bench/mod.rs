//! `shardrop bench`: benchmarks with their baselines measured side by side in the same
//! run, outside the command tree. One file per benchmark (`codec.rs` and, with `cuda`,
//! `gpu.rs`; `round.rs`; `ckpt.rs`), the transfer limit the store benchmarks share in
//! `common.rs`; this file only dispatches and prints.

mod ckpt;
mod codec;
mod common;
#[cfg(feature = "cuda")]
mod gpu;
mod round;

use clap::Subcommand;

use crate::cmd::Ctx;
use crate::out;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Codec throughput vs a memory read pass and numpy.
    Codec(codec::CodecBench),
    /// One window with many miners: aggregation time vs a plain parallel download.
    Round(round::RoundBench),
    /// Checkpoint push and pull vs rclone, the AWS CLI, boto3 + safetensors and raw GETs.
    Ckpt(ckpt::CkptBench),
}

pub async fn run(ctx: &Ctx, cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Codec(a) => {
            let (report, text) = tokio::task::spawn_blocking(move || codec_bench_on(a)).await??;
            out::emit(ctx, &report, &text);
            Ok(())
        }
        BenchCommand::Ckpt(a) => {
            let r = ckpt::ckpt_bench(ctx, a).await?;
            let mut text = format!(
                "checkpoint bench: {:.0} MiB through {}\n{:<6} {:<48} {:>8} {:>9} {:>18}\n",
                r["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                r["store"].as_str().unwrap_or("?"),
                "phase",
                "tool",
                "seconds",
                "MiB/s",
                "shardrop faster by"
            );
            for row in r["rows"].as_array().into_iter().flatten() {
                text += &format!(
                    "{:<6} {:<48} {:>8.2} {:>9.0} {:>17.2}x\n",
                    row["phase"].as_str().unwrap_or(""),
                    row["tool"].as_str().unwrap_or(""),
                    row["seconds"].as_f64().unwrap_or(0.0),
                    row["mib_per_s"].as_f64().unwrap_or(0.0),
                    row["shardrop_speedup"].as_f64().unwrap_or(0.0)
                );
            }
            text += &format!(
                "pull: {:.2}x the fastest baseline's speed; {:.2}x the raw parallel GET's time\n",
                r["pull_vs_fastest_baseline"].as_f64().unwrap_or(0.0),
                r["pull_over_raw_get"].as_f64().unwrap_or(0.0)
            );
            out::emit(ctx, &r, &text);
            Ok(())
        }
        BenchCommand::Round(a) => {
            let r = round::round_bench(ctx, a).await?;
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            let text = format!(
                "round bench: {} miners, {} parameters, {} accepted; shards {:.1} MiB each\n\
                 aggregate (close -> published): {:.2} s   plain parallel download of the same shards: {:.2} s   ratio {:.2}x\n\
                 aggregate object {:.1} MiB; aggregate process peak RSS {:.0} MiB (dense accumulator {:.0} MiB)\n",
                r["miners"],
                r["params"],
                r["accepted"],
                f("shard_bytes_each") / 1048576.0,
                f("aggregate_seconds"),
                f("plain_download_seconds"),
                f("ratio_to_transfer_limit"),
                f("aggregate_bytes") / 1048576.0,
                f("aggregate_peak_rss_mib"),
                f("accumulator_mib")
            );
            out::emit(ctx, &r, &text);
            Ok(())
        }
    }
}

/// The codec bench on the device `--device` resolves to.
fn codec_bench_on(a: codec::CodecBench) -> anyhow::Result<(serde_json::Value, String)> {
    let chosen = crate::cmd::device::choose(&a.device)?;
    #[cfg(feature = "cuda")]
    if let crate::cmd::device::Codec::Gpu(g) = &chosen.codec {
        let r = gpu::gpu_codec_bench(g, &a, &a.codec.params()?)?;
        let text = gpu::render(&r);
        return Ok((r, text));
    }
    let mut r = codec::codec_bench(a)?;
    let mut text = codec::render(&r);
    if let Some(why) = &chosen.fallback {
        text = format!("CPU codec bench (GPU unavailable: {why})\n{text}");
    }
    if let (Some(o), serde_json::Value::Object(d)) = (r.as_object_mut(), chosen.report()) {
        o.extend(d);
    }
    Ok((r, text))
}
