//! `shardrop bench codec`: encode and decode throughput against two baselines measured in
//! the same invocation on the same data: a plain read pass over the buffer (the memory
//! bandwidth limit) and the numpy implementation in tools/codec_numpy.py (which must also
//! produce the same bytes).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use rayon::prelude::*;
use shardrop::format::codec::{
    CodecParams, EncodedTensor, InDtype, ScaleMode, TensorInput, ValueFormat, accumulate,
    encode_tensor, f32_to_bf16,
};

use crate::cmd::grad::CodecArgs;
use crate::cmd::parse_size;

#[derive(Args)]
pub struct CodecBench {
    /// Update size in bytes (of f32 on the CPU; of --dtype on a GPU; K, M, G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub(super) size: u64,
    #[command(flatten)]
    pub(super) codec: CodecArgs,
    /// Error-feedback decay (the run's beta).
    #[arg(long, default_value_t = 0.9)]
    pub(super) beta: f32,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub(super) reps: usize,
    /// Python with numpy (CPU) or PyTorch (GPU) for the baseline [env: SHARDROP_PYTHON,
    /// default python3].
    #[arg(long)]
    pub(super) python: Option<String>,
    /// Skip the numpy / PyTorch baseline.
    #[arg(long)]
    pub(super) no_numpy: bool,
    /// Where to run: cpu, or cuda / cuda:N for the GPU codec against a device copy and
    /// PyTorch (falls back to the CPU bench, saying why, when no GPU is usable).
    #[arg(long, default_value = "cpu")]
    pub(super) device: String,
    /// Element type of the update on a GPU (the CPU bench runs f32 and bf16).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub(super) dtype: String,
}

impl CodecBench {
    pub(super) fn python_or_default(&self) -> String {
        self.python
            .clone()
            .or_else(|| std::env::var("SHARDROP_PYTHON").ok())
            .unwrap_or_else(|| "python3".into())
    }
}

/// Deterministic bell-shaped f32 data, generated in parallel.
fn make_data(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
        let mut x = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for o in out {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = |s: u64| ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            *o = (u(x) + u(x.rotate_left(21)) + u(x.rotate_left(42))) * 1e-3;
        }
    });
    v
}

/// Best time of `reps` runs of `f` on `s`, each after an untimed `setup`; returns the first
/// run's result.
fn best<S, T>(
    reps: usize,
    s: &mut S,
    mut setup: impl FnMut(&mut S),
    mut f: impl FnMut(&mut S) -> T,
) -> anyhow::Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut first = None;
    for _ in 0..reps.max(1) {
        setup(s);
        let t = Instant::now();
        let r = f(s);
        best = best.min(t.elapsed().as_secs_f64());
        if first.is_none() {
            first = Some(r);
        }
    }
    Ok((best, first.context("no repetition ran")?))
}

fn read_pass(bytes: &[u8], reps: usize) -> anyhow::Result<f64> {
    // Sum of u32 words: one read of every byte, vectorised, all cores.
    let (t, _) = best(
        reps,
        &mut (),
        |_| {},
        |_| {
            bytes
                .par_chunks(1 << 20)
                .map(|c| {
                    c.chunks_exact(4)
                        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as u64)
                        .sum::<u64>()
                })
                .sum::<u64>()
        },
    )?;
    Ok(t)
}

struct Side {
    encode_s: f64,
    decode_s: f64,
    first: EncodedTensor,
    state_hash: blake3::Hash,
    dense_hash: blake3::Hash,
}

fn run_side(
    data: &[u8],
    dtype: InDtype,
    n: usize,
    p: &CodecParams,
    beta: f32,
    reps: usize,
) -> anyhow::Result<Side> {
    let shape = [n as u64];
    let input = TensorInput {
        name: "bench",
        shape: &shape,
        dtype,
        data,
    };
    let mut state = vec![0f32; n];
    let (encode_s, first) = best(
        reps,
        &mut state,
        |s| s.fill(0.0),
        |s| encode_tensor(&input, s, beta, p),
    )?;
    let first = first?;
    // Every repetition starts from a zero state, so the final state is the first one's.
    let state_hash = blake3::hash(bytes_of(&state));
    let mut dense = vec![0f32; n];
    let (decode_s, r) = best(
        reps,
        &mut dense,
        |d| d.fill(0.0),
        |d| accumulate(&first, d, 1.0),
    )?;
    r?;
    Ok(Side {
        encode_s,
        decode_s,
        state_hash,
        dense_hash: blake3::hash(bytes_of(&dense)),
        first,
    })
}

fn bytes_of(v: &[f32]) -> &[u8] {
    // SAFETY: the pointer and length come from a live `&[f32]` (so the bytes are
    // initialised and borrowed for the result's lifetime), f32 has no padding, and u8 has
    // alignment 1 and accepts any bit pattern.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub(super) fn codec_bench(a: CodecBench) -> anyhow::Result<serde_json::Value> {
    let p = a.codec.params()?;
    let n = (a.size / 4) as usize;
    if n == 0 || !n.is_multiple_of(p.chunk as usize) {
        bail!("--size must be a positive multiple of 4 x chunk bytes");
    }
    let values = make_data(n);
    let f32_bytes = bytes_of(&values).to_vec();
    let gb = |bytes: usize, s: f64| bytes as f64 / s / 1e9;

    let read_f32 = read_pass(&f32_bytes, a.reps)?;
    let f = run_side(&f32_bytes, InDtype::F32, n, &p, a.beta, a.reps)?;
    let bf16_bytes: Vec<u8> = values
        .par_iter()
        .flat_map_iter(|&x| f32_to_bf16(x).to_le_bytes())
        .collect();
    let read_bf16 = read_pass(&bf16_bytes, a.reps)?;
    let b = run_side(&bf16_bytes, InDtype::Bf16, n, &p, a.beta, a.reps)?;
    let kept = f.first.kept();
    let mut report = serde_json::json!({
        "size_bytes": a.size, "elements": n, "threads": rayon::current_num_threads(), "params": p, "beta": a.beta,
        "kept": kept, "payload_bytes": f.first.payload_bytes(),
        "bits_per_kept": f.first.payload_bytes() as f64 * 8.0 / kept as f64,
        "read_pass_gbps": gb(f32_bytes.len(), read_f32),
        "f32": {
            "encode_gbps": gb(f32_bytes.len(), f.encode_s), "decode_gbps": gb(f32_bytes.len(), f.decode_s),
            "encode_vs_read": read_f32 / f.encode_s, "decode_vs_read": read_f32 / f.decode_s,
            "encode_s": f.encode_s, "decode_s": f.decode_s,
        },
        "bf16": {
            "read_pass_gbps": gb(bf16_bytes.len(), read_bf16),
            "encode_gbps": gb(bf16_bytes.len(), b.encode_s), "decode_gbps_f32_out": gb(f32_bytes.len(), b.decode_s),
            "encode_vs_read": read_bf16 / b.encode_s, "decode_vs_read_f32": read_f32 / b.decode_s,
        },
    });
    drop(bf16_bytes);
    report["numpy"] = if a.no_numpy {
        serde_json::json!({"skipped": "--no-numpy"})
    } else {
        match numpy_baseline(&a, &p, n, &f32_bytes, &f) {
            Ok(v) => v,
            Err(e) => serde_json::json!({"skipped": format!("{e:#}")}),
        }
    };
    Ok(report)
}

fn numpy_baseline(
    a: &CodecBench,
    p: &CodecParams,
    n: usize,
    data: &[u8],
    ours: &Side,
) -> anyhow::Result<serde_json::Value> {
    if p.values == ValueFormat::Bf16 || p.scales == ScaleMode::Tensor {
        bail!("the numpy baseline implements integer values with per-chunk scales");
    }
    let python = a.python_or_default();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("codec_numpy.py");
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("update.f32");
    std::fs::write(&input, data)?;
    let out_dir = dir.path().join("out");
    let output = std::process::Command::new(&python)
        .arg(&script)
        .args([
            "--input",
            &input.display().to_string(),
            "--n",
            &n.to_string(),
        ])
        .args([
            "--chunk",
            &p.chunk.to_string(),
            "--k",
            &p.k.to_string(),
            "--bits",
            &p.values.bits().to_string(),
        ])
        .args([
            "--indices",
            if p.indices == shardrop::format::codec::IndexEncoding::Compact {
                "compact"
            } else {
                "packed"
            },
        ])
        .args([
            "--beta",
            &a.beta.to_string(),
            "--reps",
            &a.reps.to_string(),
            "--out",
            &out_dir.display().to_string(),
        ])
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !output.status.success() {
        bail!(
            "{python} {}: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&output.stdout).context("numpy output")?;
    let read = |f: &str| std::fs::read(out_dir.join(f)).with_context(|| f.to_string());
    let scales: Vec<u8> = ours
        .first
        .scales
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let parity = serde_json::json!({
        "indices": read("idx.bin")? == ours.first.idx,
        "values": read("val.bin")? == ours.first.val,
        "scales": read("scale.bin")? == scales,
        "state": blake3::hash(&read("state.bin")?) == ours.state_hash,
        "dense": blake3::hash(&read("dense.bin")?) == ours.dense_hash,
    });
    let enc = r["encode_s"].as_f64().context("encode_s")?;
    let dec = r["decode_s"].as_f64().context("decode_s")?;
    Ok(serde_json::json!({
        "version": r["numpy"], "encode_s": enc, "decode_s": dec,
        "encode_speedup": enc / ours.encode_s, "decode_speedup": dec / ours.decode_s,
        "identical": parity.as_object().is_some_and(|o| o.values().all(|v| v == true)),
        "parity": parity,
    }))
}

pub(super) fn render(r: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    let mut t = format!(
        "codec bench: {} elements ({} MiB f32), {} threads, C={} k={} {} {} indices, {:.2} bits per kept element\n",
        r["elements"],
        r["size_bytes"].as_u64().unwrap_or(0) >> 20,
        r["threads"],
        r["params"]["chunk"],
        r["params"]["k"],
        r["params"]["values"].as_str().unwrap_or(""),
        r["params"]["indices"].as_str().unwrap_or(""),
        r["bits_per_kept"].as_f64().unwrap_or(0.0)
    );
    t += &format!(
        "read pass (f32 buffer)     {:>8} GB/s\n",
        f(&r["read_pass_gbps"])
    );
    t += &format!(
        "encode f32                 {:>8} GB/s  = {} x read pass\n",
        f(&r["f32"]["encode_gbps"]),
        f(&r["f32"]["encode_vs_read"])
    );
    t += &format!(
        "decode f32 (dense accum.)  {:>8} GB/s  = {} x read pass\n",
        f(&r["f32"]["decode_gbps"]),
        f(&r["f32"]["decode_vs_read"])
    );
    t += &format!(
        "read pass (bf16 buffer)    {:>8} GB/s\n",
        f(&r["bf16"]["read_pass_gbps"])
    );
    t += &format!(
        "encode bf16                {:>8} GB/s  = {} x read pass\n",
        f(&r["bf16"]["encode_gbps"]),
        f(&r["bf16"]["encode_vs_read"])
    );
    match r["numpy"].get("skipped") {
        Some(why) => t += &format!("numpy baseline skipped: {}\n", why.as_str().unwrap_or("")),
        None => {
            t += &format!(
                "numpy {}: encode {}x slower, decode {}x slower than shardrop; same bytes: {}\n",
                r["numpy"]["version"].as_str().unwrap_or(""),
                f(&r["numpy"]["encode_speedup"]),
                f(&r["numpy"]["decode_speedup"]),
                r["numpy"]["identical"]
            );
        }
    }
    t
}
