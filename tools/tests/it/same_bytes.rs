//! Same bytes on any machine (issue 28), through the CLI against the local S3 server: in
//! every aggregate form (agg-v2 `auto`, `shards`, `merged`, `reference`, and agg-v1), a
//! window with a clipped shard, an empty window and a window whose every shard is rejected
//! are aggregated with 1 thread and `--concurrency 1`, then again with 2, 3 and 8 threads
//! and other concurrencies, and as a split merge of two workers on different thread counts:
//! every rerun must find the ledger, list and merged objects already there byte for byte (a
//! create-only put of other bytes is a conflict, exit 1). The validator's table and weights
//! likewise (1, 2, 3 and 8 threads); `apply` through the empty and the rejected window gives
//! the same parameters and momentum file, byte for byte, on 1, 2, 3 and 8 threads and in two
//! processes.

use crate::common;

use std::path::Path;
use std::process::Output;

use crate::common::{Run, ok_json, p, shardrop, shardrop_env, stderr};

/// The test's model: `w` 1024×1024 and `b` 64, values of many magnitudes, so that 32,768 kept
/// values per shard sum differently in another order (a small model hid rayon's
/// thread-dependent split). `scale` makes a shard an outlier.
fn write_scaled(path: &Path, seed: f32, scale: f32) {
    let tensor = |n: usize, f: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let x = i as f32;
                let v = ((x * 0.37 + seed * f).sin() * (1.0 + (i % 613) as f32 * 0.731)) * 0.01;
                (v * scale).to_le_bytes()
            })
            .collect()
    };
    let (w, b) = (tensor(1024 * 1024, 1.0), tensor(64, 1.3));
    let views = vec![
        (
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1024, 1024], &w)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], &b).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// One command with `RAYON_NUM_THREADS` set.
fn on_threads(run: &Run, threads: &str, args: &[&str]) -> Output {
    let mut env = run.env();
    env.push(("RAYON_NUM_THREADS", threads));
    shardrop_env(args, &env)
}

fn aggregate(run: &Run, key: &Path, w: u64, threads: &str, conc: &str, extra: &[&str]) -> Output {
    let ws = w.to_string();
    let mut args = vec![
        "aggregate",
        "--registry",
        &run.reg,
        "--key",
        p(key),
        "--window",
        &ws,
        "--concurrency",
        conc,
        "--json",
    ];
    args.extend_from_slice(extra);
    on_threads(run, threads, &args)
}

fn one_form(format: &str, form: Option<&str>) {
    let label = form.unwrap_or(format);
    let Some(base) = common::s3_base("same", label) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let mut extra = vec![
        "--aggregate",
        format,
        "--outer-optimizer",
        "nesterov",
        "--outer-lr",
        "0.7",
    ];
    if let Some(f) = form {
        extra.extend(["--agg-form", f]);
    }
    write_scaled(&dir.join("model.safetensors"), 0.0, 0.0);
    let run = Run::init_with(dir, &base, label, 6, &agg_key, &[], &extra);
    let miners: Vec<(std::path::PathBuf, String)> = (0..4)
        .map(|i| {
            let key = dir.join(format!("m{i}.key"));
            let id = ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
            let peer = id["peer_id"].as_str().unwrap().to_string();
            run.add("miner", &peer, &format!("m{i}"));
            (key, peer)
        })
        .collect();
    let val_key = run.new_validator(dir);
    // Window 0: four shards, one fifty times the others' norm (clipped at ratio 3 of the
    // median with 4 accepted).
    std::thread::scope(|s| {
        for (i, (key, _)) in miners.iter().enumerate() {
            let (run, dir) = (&run, dir);
            s.spawn(move || {
                let update = dir.join(format!("u{i}.safetensors"));
                write_scaled(&update, i as f32 * 3.0, if i == 2 { 50.0 } else { 1.0 });
                let state = dir.join(format!("s{i}"));
                let mut args = run.publish_args(p(key), p(&update), p(&state));
                args.push("--wait");
                ok_json(run.run(&args));
            });
        }
    });
    // Window 2: two miners sign junk for it ahead of time (rejected: early, and no codec);
    // window 1 stays empty.
    let junk = dir.join("t00000-00001");
    std::fs::write(&junk, b"not a section").unwrap();
    for (i, (key, peer)) in miners.iter().enumerate().take(2) {
        let to = format!("{base}/m{i}/runs/{label}/grads/0000000002/{peer}.grad");
        ok_json(shardrop(&[
            "sign",
            "--key",
            p(key),
            "--kind",
            "grad",
            "--run",
            label,
            "--window",
            "2",
            "--to",
            &to,
            p(&junk),
            "--json",
        ]));
    }
    let expect = [(4, 0), (0, 0), (0, 2)];
    for (w, &(accepted, rejected)) in expect.iter().enumerate() {
        let first = ok_json(aggregate(&run, &agg_key, w as u64, "1", "1", &[]));
        assert_eq!(first["accepted"], accepted, "{label} window {w}: {first}");
        assert_eq!(first["rejected"], rejected, "{label} window {w}: {first}");
        if w == 0 {
            assert!(first.to_string().contains("clipped"), "{label}: {first}");
        }
        for (threads, conc) in [("2", "4"), ("3", "16"), ("8", "2")] {
            let again = aggregate(&run, &agg_key, w as u64, threads, conc, &[]);
            assert!(
                again.status.success(),
                "{label} window {w} on {threads} threads, concurrency {conc}: {}",
                stderr(&again)
            );
            let again = ok_json(again);
            assert_eq!(again["already_published"], true, "{label} {w}: {again}");
        }
        // The split merge, its two workers on different thread counts.
        std::thread::scope(|s| {
            let parts: Vec<_> = [("0/2", "3"), ("1/2", "8")]
                .into_iter()
                .map(|(part, threads)| {
                    let (run, agg_key) = (&run, &agg_key);
                    s.spawn(move || {
                        aggregate(run, agg_key, w as u64, threads, "4", &["--part", part])
                    })
                })
                .collect();
            for h in parts {
                let out = h.join().unwrap();
                assert!(out.status.success(), "{label} {w} part: {}", stderr(&out));
            }
        });
        let commit = ok_json(aggregate(
            &run,
            &agg_key,
            w as u64,
            "2",
            "3",
            &["--commit", "2"],
        ));
        assert_eq!(commit["already_published"], true, "{label} {w}: {commit}");
    }
    // The validator's table and weights, for the clipped and the empty window.
    for w in ["0", "1"] {
        let mut outs = Vec::new();
        for (threads, conc) in [("1", "1"), ("2", "4"), ("8", "16"), ("3", "2")] {
            outs.push(ok_json(on_threads(
                &run,
                threads,
                &[
                    "validate",
                    "--registry",
                    &run.reg,
                    "--key",
                    p(&val_key),
                    "--window",
                    w,
                    "--evaluator",
                    "none",
                    "--concurrency",
                    conc,
                    "--json",
                ],
            )));
        }
        assert!(
            outs[1..].iter().all(|o| o["already_published"] == true),
            "{label} window {w}: {outs:?}"
        );
    }
    // Apply through the empty and the rejected window: the same bits on any thread count,
    // and the momentum file has one byte form.
    let model = dir.join("model.safetensors");
    let applied: Vec<(Vec<u8>, Vec<u8>)> = ["1", "2", "3", "8", "1"]
        .iter()
        .enumerate()
        .map(|(i, threads)| {
            let out = dir.join(format!("theta-{i}.safetensors"));
            let state = dir.join(format!("momentum-{i}.safetensors"));
            ok_json(on_threads(
                &run,
                threads,
                &[
                    "apply",
                    "--registry",
                    &run.reg,
                    "--from",
                    p(&model),
                    "--from-window",
                    "genesis",
                    "--through",
                    "2",
                    "--optimizer-state",
                    p(&state),
                    p(&out),
                    "--json",
                ],
            ));
            (std::fs::read(&out).unwrap(), std::fs::read(&state).unwrap())
        })
        .collect();
    assert!(
        applied[0].0 != std::fs::read(&model).unwrap(),
        "{label}: nothing applied"
    );
    for (i, a) in applied.iter().enumerate().skip(1) {
        assert!(
            a.0 == applied[0].0,
            "{label}: parameters of apply {i} differ"
        );
        assert!(
            a.1 == applied[0].1,
            "{label}: momentum file of apply {i} differs"
        );
    }
}

#[test]
fn every_form_writes_the_same_bytes_on_any_thread_count_and_applies_empty_windows() {
    let forms = [
        ("agg-v2", Some("auto")),
        ("agg-v2", Some("shards")),
        ("agg-v2", Some("merged")),
        ("agg-v2", Some("reference")),
        ("agg-v1", None),
    ];
    std::thread::scope(|s| {
        let runs: Vec<_> = forms
            .iter()
            .map(|&(format, form)| s.spawn(move || one_form(format, form)))
            .collect();
        for r in runs {
            r.join().unwrap();
        }
    });
}
