//! `shardrop bench codec --device cuda:N`: the GPU codec on a device-resident update,
//! against (a) a device-to-device copy of the same buffer (the memory-bandwidth limit) and
//! (b) a PyTorch implementation of the same algorithm on the same GPU and the same data,
//! in the same invocation. Also checks the GPU's bytes against the CPU codec's on a prefix
//! and against PyTorch's exact variant on the whole update.

use std::time::Instant;

use anyhow::{Context, bail};
use shardrop::format::codec::gpu::{DeviceTensor, Gpu};
use shardrop::format::codec::{
    CodecParams, EncodedTensor, InDtype, IndexEncoding, ScaleMode, TensorInput, ValueFormat,
    encode_tensor,
};

use super::codec::CodecBench;

/// The PyTorch baseline, embedded so that a binary carried to a GPU machine has it.
const TORCH_SCRIPT: &str = include_str!("../../codec_torch.py");
const SEED: u32 = 1;
/// Elements checked against the CPU codec (the CPU is the slow side).
const CPU_CHECK: usize = 1 << 24;

/// Best wall time of `reps` runs (after one untimed warm-up), each after `setup`, both
/// given the buffer `b` the run works on.
fn best<B>(
    reps: usize,
    gpu: &Gpu,
    b: &mut B,
    mut setup: impl FnMut(&mut B) -> anyhow::Result<()>,
    mut f: impl FnMut(&mut B) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for rep in 0..=reps.max(1) {
        setup(b)?;
        gpu.synchronize()?;
        let t = Instant::now();
        f(b)?;
        gpu.synchronize()?;
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

pub fn gpu_codec_bench(
    gpu: &Gpu,
    a: &CodecBench,
    p: &CodecParams,
) -> anyhow::Result<serde_json::Value> {
    let dtype = match a.dtype.as_str() {
        "bf16" => InDtype::Bf16,
        _ => InDtype::F32,
    };
    let bytes = a.size as usize;
    let n = bytes / dtype.size();
    if n == 0 || !n.is_multiple_of(p.chunk as usize) {
        bail!(
            "--size must be a positive multiple of the chunk size in {} elements",
            a.dtype
        );
    }
    let s = gpu.stream().clone();
    let mut input = s.alloc_zeros::<u8>(n * dtype.size())?;
    gpu.fill_bench(&mut input, dtype, SEED)?;
    let mut state = s.alloc_zeros::<f32>(n)?;
    let shape = [n as u64];
    let tensor = |data| DeviceTensor {
        name: "bench",
        shape: &shape,
        dtype,
        data,
    };

    // Encode from a zero error-feedback buffer each time (the first result is kept).
    let mut first: Option<EncodedTensor> = None;
    let encode_s = best(
        a.reps,
        gpu,
        &mut state,
        |st| Ok(s.memset_zeros(st)?),
        |st| {
            let t = gpu.encode_tensor(&tensor(input.as_view()), st, a.beta, p)?;
            first.get_or_insert(t);
            Ok(())
        },
    )?;
    let first = first.context("no encode ran")?;
    let sparse_bytes = first.payload_bytes();

    let mut copy = s.alloc_zeros::<u8>(input.len())?;
    let copy_s = best(
        a.reps,
        gpu,
        &mut copy,
        |_| Ok(()),
        |c| Ok(s.memcpy_dtod(&input, c)?),
    )?;
    drop(copy);

    let mut dense = s.alloc_zeros::<f32>(n)?;
    let decode_s = best(
        a.reps,
        gpu,
        &mut dense,
        |d| Ok(s.memset_zeros(d)?),
        |d| Ok(gpu.accumulate(&first, d, 1.0)?),
    )?;
    drop(dense);

    // The CPU codec on a prefix of the same data: bytes and error feedback must match.
    let m = n.min(CPU_CHECK) / p.chunk as usize * p.chunk as usize;
    let prefix = s.clone_dtoh(&input.slice(..m * dtype.size()))?;
    let mut cpu_state = vec![0f32; m];
    let pshape = [m as u64];
    let cpu = encode_tensor(
        &TensorInput {
            name: "bench",
            shape: &pshape,
            dtype,
            data: &prefix,
        },
        &mut cpu_state,
        a.beta,
        p,
    )?;
    let mut dev_state = s.alloc_zeros::<f32>(m)?;
    let dev = gpu.encode_tensor(
        &DeviceTensor {
            name: "bench",
            shape: &pshape,
            dtype,
            data: input.slice(..m * dtype.size()),
        },
        &mut dev_state,
        a.beta,
        p,
    )?;
    let dev_state = s.clone_dtoh(&dev_state)?;
    let cpu_parity = cpu == dev
        && dev_state
            .iter()
            .zip(&cpu_state)
            .all(|(x, y)| x.to_bits() == y.to_bits());
    drop((input, state));

    let gbps = |secs: f64| bytes as f64 / secs / 1e9;
    let mut report = serde_json::json!({
        "device": gpu.describe(), "dtype": a.dtype, "elements": n, "size_bytes": bytes,
        "params": p, "beta": a.beta, "reps": a.reps,
        "kept": first.kept(), "sparse_bytes_to_host": sparse_bytes,
        "encode_s": encode_s, "encode_gbps": gbps(encode_s),
        "copy_s": copy_s, "copy_gbps": gbps(copy_s), "encode_vs_copy": copy_s / encode_s,
        "decode_s": decode_s, "decode_gbps_f32_out": n as f64 * 4.0 / decode_s / 1e9,
        "cpu_parity_elements": m, "cpu_parity": cpu_parity,
    });
    report["torch"] = if a.no_numpy {
        serde_json::json!({"skipped": "--no-numpy"})
    } else {
        torch_baseline(a, p, n, &first, encode_s)
            .unwrap_or_else(|e| serde_json::json!({"skipped": format!("{e:#}")}))
    };
    Ok(report)
}

fn torch_baseline(
    a: &CodecBench,
    p: &CodecParams,
    n: usize,
    ours: &EncodedTensor,
    ours_s: f64,
) -> anyhow::Result<serde_json::Value> {
    if p.values == ValueFormat::Bf16 || p.scales == ScaleMode::Tensor {
        bail!("the PyTorch baseline implements integer values with per-chunk scales");
    }
    let python = a.python_or_default();
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("codec_torch.py");
    std::fs::write(&script, TORCH_SCRIPT)?;
    let out_dir = dir.path().join("out");
    let indices = if p.indices == IndexEncoding::Compact {
        "compact"
    } else {
        "packed"
    };
    let output = std::process::Command::new(&python)
        .arg(&script)
        .args(["--n", &n.to_string(), "--dtype", &a.dtype])
        .args(["--seed", &SEED.to_string(), "--chunk", &p.chunk.to_string()])
        .args([
            "--k",
            &p.k.to_string(),
            "--bits",
            &p.values.bits().to_string(),
        ])
        .args(["--indices", indices, "--beta", &a.beta.to_string()])
        .args(["--reps", &a.reps.to_string(), "--device", &a.device])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !output.status.success() {
        bail!(
            "{python} codec_torch.py: {}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&output.stdout).context("torch output")?;
    let read = |f: &str| std::fs::read(out_dir.join(f)).with_context(|| f.to_string());
    let scales: Vec<u8> = ours.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let identical = read("idx.bin")? == ours.idx
        && read("val.bin")? == ours.val
        && read("scale.bin")? == scales;
    let exact = r["exact_s"].as_f64().context("exact_s")?;
    let topk = r["topk_s"].as_f64().context("topk_s")?;
    Ok(serde_json::json!({
        "version": r["torch"], "gpu": r["gpu"], "exact_s": exact, "topk_s": topk,
        "speedup_vs_exact": exact / ours_s, "speedup_vs_topk": topk / ours_s,
        "speedup_vs_fastest": exact.min(topk) / ours_s,
        "exact_identical_bytes": identical,
    }))
}

pub fn render(r: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{:.2}", x * 1e3));
    let mut t = format!(
        "GPU codec bench on {}: {} {} elements ({} MiB), C={} k={} {} {} indices; {} sparse bytes to the host\n",
        r["device"].as_str().unwrap_or("?"),
        r["elements"],
        r["dtype"].as_str().unwrap_or(""),
        r["size_bytes"].as_u64().unwrap_or(0) >> 20,
        r["params"]["chunk"],
        r["params"]["k"],
        r["params"]["values"].as_str().unwrap_or(""),
        r["params"]["indices"].as_str().unwrap_or(""),
        r["sparse_bytes_to_host"]
    );
    t += &format!(
        "device-to-device copy   {:>8} ms  {:>8} GB/s\n",
        ms(&r["copy_s"]),
        f(&r["copy_gbps"])
    );
    t += &format!(
        "encode (shardrop)       {:>8} ms  {:>8} GB/s  = {} of copy bandwidth\n",
        ms(&r["encode_s"]),
        f(&r["encode_gbps"]),
        f(&r["encode_vs_copy"])
    );
    t += &format!(
        "decode + accumulate     {:>8} ms  {:>8} GB/s of f32 output\n",
        ms(&r["decode_s"]),
        f(&r["decode_gbps_f32_out"])
    );
    let tr = &r["torch"];
    if let Some(why) = tr["skipped"].as_str() {
        t += &format!("PyTorch baseline skipped: {why}\n");
    } else {
        t += &format!(
            "PyTorch {} exact top-k {:>8} ms (shardrop {}x faster; same bytes: {})\n",
            tr["version"].as_str().unwrap_or("?"),
            ms(&tr["exact_s"]),
            f(&tr["speedup_vs_exact"]),
            tr["exact_identical_bytes"]
        );
        t += &format!(
            "PyTorch torch.topk      {:>8} ms (shardrop {}x faster)\n",
            ms(&tr["topk_s"]),
            f(&tr["speedup_vs_topk"])
        );
    }
    t += &format!(
        "CPU codec parity on the first {} elements: {}\n",
        r["cpu_parity_elements"], r["cpu_parity"]
    );
    t
}
