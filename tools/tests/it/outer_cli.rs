//! Training semantics through the CLI against the local S3 server (issue 17): an explicit
//! outer optimizer, a setting changed mid-run with `run set`, rounds mapped onto windows
//! with `publish --wait`, an empty window, the genesis base, momentum carried by
//! `--optimizer-state`, and every new refusal's reason code with exit 3.

use crate::common;

use std::path::Path;
use std::process::Output;

use crate::common::{Run, json, ok_json, p, shardrop, stderr, tensors, write_update};

fn s3_base(name: &str) -> Option<String> {
    common::s3_base("outer", name)
}

/// The command was refused with exit 3 and this reason code in its JSON document.
fn refused(out: &Output, reason: &str) {
    assert_eq!(out.status.code(), Some(3), "{}", stderr(out));
    let doc = json(out);
    assert_eq!(doc["reason"], reason, "{doc}");
    assert_eq!(doc["class"], "refused", "{doc}");
}

#[test]
fn a_nesterov_run_changed_mid_run_replays_exactly_across_an_empty_window() {
    let Some(base) = s3_base("nesterov") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "outer", 4, &agg_key, &[]);
    let miners: Vec<_> = (0..2)
        .map(|i| run.new_miner(dir, &format!("m{i}")))
        .collect();
    let val_key = run.new_validator(dir);
    let set = |args: &[&str]| {
        let mut v = vec!["run", "set", "--registry", &run.reg, "--key", &run.op_key];
        v.extend_from_slice(args);
        v.push("--json");
        run.run(&v)
    };
    // Window 0 is open: a setting can only change from a window that has not opened.
    refused(
        &set(&["--from-window", "0", "--outer-lr", "2"]),
        "window_not_future",
    );
    let next = ok_json(set(&[
        "--from-window",
        "next",
        "--outer-optimizer",
        "nesterov",
        "--outer-lr",
        "0.7",
    ]));
    assert_eq!(next["setting"]["outer"]["momentum"], 0.9, "{next}");
    let nesterov_from = next["from_window"].as_u64().unwrap();
    let last = nesterov_from + 3;
    let empty = nesterov_from + 1;
    let changed = nesterov_from + 2;
    let model = dir.join("model.safetensors");
    for w in 0..=last {
        if w != empty {
            for (i, key) in miners.iter().enumerate() {
                let update = dir.join(format!("u{i}-{w}.safetensors"));
                write_update(&update, (i * 10) as f32 + w as f32);
                let state = dir.join(format!("s{i}"));
                let ws = w.to_string();
                let out = ok_json(run.run(&[
                    "publish",
                    "--registry",
                    &run.reg,
                    "--key",
                    p(key),
                    p(&update),
                    "--state",
                    p(&state),
                    "--window",
                    &ws,
                    "--wait",
                    "--json",
                ]));
                assert_eq!(out["window"], w);
            }
        }
        if w == nesterov_from {
            // The operator halves the rate from a later window, while the run goes on.
            let half = ok_json(set(&[
                "--from-window",
                &changed.to_string(),
                "--outer-lr",
                "0.35",
            ]));
            assert_eq!(half["setting"]["outer"]["optimizer"], "nesterov");
        }
        let agg = ok_json(run.run(&[
            "aggregate",
            "--registry",
            &run.reg,
            "--key",
            p(&agg_key),
            "--window",
            &w.to_string(),
            "--json",
        ]));
        let expect = if w == empty { 0 } else { 2 };
        assert_eq!(agg["accepted"], expect, "{agg}");
    }
    // The validator scores the empty window as it is: every miner missing, no failure.
    let scored = ok_json(run.run(&[
        "validate",
        "--registry",
        &run.reg,
        "--key",
        p(&val_key),
        "--window",
        &empty.to_string(),
        "--evaluator",
        "none",
        "--json",
    ]));
    assert_eq!(scored["window"], empty, "{scored}");
    let rows = scored["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{scored}");
    assert!(rows.iter().all(|r| r["verdict"] == "missing"), "{scored}");
    // A publish for a closed window, and for one far ahead without --wait.
    let update = dir.join("late.safetensors");
    write_update(&update, 99.0);
    let pub_at = |w: &str, state: &str| {
        run.run(&[
            "publish",
            "--registry",
            &run.reg,
            "--key",
            p(&miners[0]),
            p(&update),
            "--state",
            p(&dir.join(state)),
            "--window",
            w,
            "--json",
        ])
    };
    refused(&pub_at("0", "fresh-a"), "window_closed");
    refused(&pub_at("100000", "fresh-b"), "window_not_open");

    let shown = ok_json(run.run(&["run", "show", "--registry", &run.reg, "--json"]));
    let settings = shown["settings"].as_array().unwrap();
    let firsts: Vec<u64> = settings
        .iter()
        .map(|s| s["from_window"].as_u64().unwrap())
        .collect();
    assert_eq!(firsts, [0, nesterov_from, changed], "{shown}");
    let text = run.run(&["run", "show", "--registry", &run.reg]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!(
            "from window {changed}: nesterov lr 0.35 momentum 0.9"
        )),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    let apply = |from: &Path, from_window: &str, through: u64, state: Option<&Path>, out: &Path| {
        let t = through.to_string();
        let mut v = vec![
            "apply",
            "--registry",
            &run.reg,
            "--from",
            p(from),
            "--from-window",
            from_window,
            "--through",
            &t,
            "--json",
        ];
        if let Some(s) = state {
            v.extend(["--optimizer-state", p(s)]);
        }
        v.push(p(out));
        run.run(&v)
    };
    // The whole run from the genesis model in one replay.
    let (whole, whole_state) = (dir.join("whole.safetensors"), dir.join("whole.opt"));
    ok_json(apply(&model, "genesis", last, Some(&whole_state), &whole));
    // Without a place for the momentum, the replay is refused rather than lost.
    refused(
        &apply(&model, "genesis", last, None, &dir.join("x.safetensors")),
        "optimizer_state_missing",
    );
    // Window by window, as a miner does every round, carrying the state file.
    let stepwise_state = dir.join("step.opt");
    let mut prev = model.clone();
    let mut from = "genesis".to_string();
    let mut after_empty = Vec::new();
    for w in 0..=last {
        let out = dir.join(format!("theta-{w}.safetensors"));
        ok_json(apply(&prev, &from, w, Some(&stepwise_state), &out));
        std::fs::copy(&stepwise_state, dir.join(format!("state-{w}"))).unwrap();
        if w + 1 == empty || w == empty {
            after_empty.push((tensors(&out), tensors(&stepwise_state)));
        }
        prev = out;
        from = w.to_string();
    }
    assert_eq!(
        tensors(&prev),
        tensors(&whole),
        "stepwise and whole replays differ"
    );
    assert_eq!(tensors(&stepwise_state), tensors(&whole_state));
    // The empty window changed nothing: no step, no momentum decay.
    assert_eq!(
        after_empty[0], after_empty[1],
        "the empty window moved something"
    );
    assert_ne!(tensors(&prev), tensors(&model), "nothing was applied");
    // A checkpoint after window `changed` (parameters and momentum, as the README's
    // aggregator pushes them): the momentum lands in files of its own, and a replay from the
    // pulled folder reads it and ends where the whole replay ended.
    let (ck, t_last) = (changed.to_string(), last.to_string());
    ok_json(run.run(&[
        "ckpt",
        "push",
        p(&dir.join(format!("theta-{changed}.safetensors"))),
        p(&dir.join(format!("state-{changed}"))),
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--step",
        "100",
        "--window",
        &ck,
        "--json",
    ]));
    let pulled = dir.join("pulled");
    let pull = |out: &Path, extra: &[&str]| {
        let mut v = vec![
            "ckpt",
            "pull",
            "latest",
            p(out),
            "--registry",
            &run.reg,
            "--json",
        ];
        v.extend(extra);
        ok_json(run.run(&v))
    };
    pull(&pulled, &[]);
    let names: Vec<String> = tensors(&pulled.join("00000.safetensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| !n.starts_with("outer_momentum.")),
        "the model's shard holds {names:?}"
    );
    assert_eq!(
        tensors(&pulled.join("momentum-00000.safetensors")),
        tensors(&dir.join(format!("state-{changed}")))
    );
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pulled.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut listed: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
    listed.sort();
    assert_eq!(listed, names.iter().collect::<Vec<_>>());
    let (resumed, resumed_state) = (dir.join("resumed.safetensors"), dir.join("resumed.opt"));
    let mut v = vec![
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&pulled),
        "--through",
        &t_last,
        "--optimizer-state",
        p(&resumed_state),
        "--json",
    ];
    v.push(p(&resumed));
    ok_json(run.run(&v));
    assert_eq!(
        tensors(&resumed),
        tensors(&whole),
        "replay from the checkpoint"
    );
    assert_eq!(tensors(&resumed_state), tensors(&whole_state));
    // Pulled without momentum: no momentum file, and a replay that needs it is refused.
    let lean = dir.join("lean");
    pull(&lean, &["--without-momentum"]);
    assert!(!lean.join("momentum-00000.safetensors").exists());
    assert!(lean.join("00000.safetensors").exists());
    let (lean_opt, lean_out) = (dir.join("lean.opt"), dir.join("lean.safetensors"));
    let mut v = vec![
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&lean),
        "--through",
        &t_last,
        "--optimizer-state",
        p(&lean_opt),
        "--json",
    ];
    v.push(p(&lean_out));
    refused(&run.run(&v), "optimizer_state_missing");
    // Window `changed` ran at the halved rate: with m' = μ·m + a, the step is
    // lr·(a + μ·m'), so lr = −Δθ / (a + μ·m') where that is large.
    let f32s = |path: &Path, name: &str| -> Vec<f32> {
        let bytes = tensors(path)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let before = dir.join(format!("theta-{}.safetensors", changed - 1));
    let after = dir.join(format!("theta-{changed}.safetensors"));
    let m0 = f32s(
        &dir.join(format!("state-{}", changed - 1)),
        "outer_momentum.w",
    );
    let m1 = f32s(&dir.join(format!("state-{changed}")), "outer_momentum.w");
    let (t0, t1) = (f32s(&before, "w"), f32s(&after, "w"));
    let mut rates = Vec::new();
    for i in 0..t0.len() {
        let a = m1[i] as f64 - 0.9 * m0[i] as f64;
        let g = a + 0.9 * m1[i] as f64;
        if g.abs() > 1e-4 {
            rates.push(-(t1[i] as f64 - t0[i] as f64) / g);
        }
    }
    assert!(rates.len() > 100, "too few moved elements: {}", rates.len());
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    assert!(
        (median - 0.35).abs() < 0.01,
        "window {changed} ran at rate {median}, not 0.35"
    );
    // A state file of another window is refused, not silently used.
    refused(
        &apply(
            &dir.join("theta-0.safetensors"),
            "0",
            1,
            Some(&whole_state),
            &dir.join("y.safetensors"),
        ),
        "optimizer_state_window",
    );
    // A base that is not the run's model (a tensor missing) is refused with its code, as
    // the Python package refuses it, before anything is fetched.
    let partial = dir.join("partial.safetensors");
    let b: Vec<u8> = vec![0; 64 * 4];
    let views = vec![(
        "b",
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], &b).unwrap(),
    )];
    std::fs::write(&partial, safetensors::serialize(views, None).unwrap()).unwrap();
    refused(
        &apply(&partial, "genesis", 1, None, &dir.join("z.safetensors")),
        "model_mismatch",
    );
    // Not registered: a refusal with its own code.
    let stranger = dir.join("stranger.key");
    ok_json(shardrop(&["keygen", "--out", p(&stranger), "--json"]));
    let out = run.run(&[
        "publish",
        "--registry",
        &run.reg,
        "--key",
        p(&stranger),
        p(&update),
        "--state",
        p(&dir.join("stranger-state")),
        "--json",
    ]);
    refused(&out, "not_registered");
    // The same refusal, class and exit code from every command that acts in a role.
    for args in [
        vec!["aggregate", "--window", "0", "--registry", &run.reg],
        vec!["validate", "--window", "0", "--registry", &run.reg],
        vec![
            "ckpt",
            "push",
            "--step",
            "1",
            "--registry",
            &run.reg,
            p(&model),
        ],
        vec!["ckpt", "gc", "--keep", "1", &run.reg],
    ] {
        let mut v = args.clone();
        v.extend(["--key", p(&stranger), "--json"]);
        refused(&run.run(&v), "not_registered");
    }
}
