//! The chaos suite (issue 14), through the CLI against the local S3 servers: every writing
//! command killed at pseudo-random points and rerun (the rerun must finish with the bytes an
//! uninterrupted run writes, and nothing partial may ever be visible), and racing writers on
//! moto, whose conditional writes are atomic. Each scenario appends `scenario, trials, held,
//! failed` to the chaos report that `tools/test` prints; any failed trial fails the test.
//! Faulty and hostile miners' stores are the library's `budget_s3` and `attack_s3` tests.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{
    Run, delays, ok_json, p, report, shardrop, start_and_kill, stderr, write_update,
};

fn s3_base(name: &str) -> Option<String> {
    common::s3_base("chaos", name)
}

/// The moto server's base URL and the environment that reaches it.
fn moto_base(name: &str) -> Option<(String, Vec<(&'static str, String)>)> {
    let Ok(url) = std::env::var("SHARDROP_TEST_MOTO") else {
        assert!(
            std::env::var("SHARDROP_MOTO_REQUIRED").is_err(),
            "SHARDROP_TEST_MOTO missing"
        );
        return None;
    };
    let var = |n: &str| std::env::var(format!("SHARDROP_MOTO_{n}")).unwrap();
    let env = vec![
        ("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL")),
        ("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY")),
        ("AWS_REGION", var("AWS_REGION")),
        ("AWS_ALLOW_HTTP", "true".into()),
    ];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Some((format!("{url}/{name}-{}-{nanos}", std::process::id()), env))
}

fn borrow<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Publish killed at random points, on S3: each rerun leaves the uninterrupted state.
#[test]
fn publish_killed_at_random_points_on_s3() {
    let Some(base) = s3_base("publish") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = Run::init(dir, &base, "chaos-publish", 300, &dir.join("agg.key"), &[]);
    let update = dir.join("update.safetensors");
    write_update(&update, 7.0);
    let reference = run.new_miner(dir, "ref");
    let ref_state = dir.join("ref-state");
    ok_json(run.run(&run.publish_args(p(&reference), p(&update), p(&ref_state))));
    let want = std::fs::read(ref_state.join("error-feedback.safetensors")).unwrap();
    let kills = delays(14, 10, 2500);
    let mut held = 0;
    for (i, ms) in kills.iter().enumerate() {
        let key = run.new_miner(dir, &format!("m{i}"));
        let state = dir.join(format!("state-{i}"));
        let args = run.publish_args(p(&key), p(&update), p(&state));
        start_and_kill(&args, &[], *ms);
        let rerun = run.run(&args);
        let same = rerun.status.success()
            && std::fs::read(state.join("error-feedback.safetensors")).ok() == Some(want.clone());
        let clean = std::fs::read_dir(&state)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.'));
        if same && clean {
            held += 1;
        } else {
            eprintln!("publish killed after {ms} ms: {}", stderr(&rerun));
        }
    }
    report(
        "publish killed at a random point, rerun (S3)",
        kills.len(),
        held,
    );
    assert_eq!(held, kills.len());
}

/// aggregate and validate killed at random points of a closed window: never a partial or
/// invalid object, and the final rerun writes the same bytes as any other run would
/// (`already_published` after completion proves the create-only put found identical bytes).
#[test]
fn aggregate_and_validate_killed_at_random_points_on_s3() {
    let Some(base) = s3_base("agg") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "chaos-agg", 4, &agg_key, &[]);
    let val_key = run.new_validator(dir);
    let miners: Vec<_> = (0..4)
        .map(|i| run.new_miner(dir, &format!("m{i}")))
        .collect();
    let children: Vec<_> = miners
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let update = dir.join(format!("u{i}.safetensors"));
            write_update(&update, i as f32);
            Command::new(env!("CARGO_BIN_EXE_shardrop"))
                .args(run.publish_args(p(key), p(&update), p(&dir.join(format!("s{i}")))))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let agg_url = format!("{base}/agg/runs/chaos-agg/aggs/0000000000.agg");
    let job = |what: &str, key: &Path| {
        let mut v: Vec<String> = vec![
            what.into(),
            "--registry".into(),
            run.reg.clone(),
            "--key".into(),
            p(key).into(),
            "--window".into(),
            "0".into(),
            "--json".into(),
        ];
        if what == "validate" {
            v.extend(["--evaluator".into(), "none".into()]);
        }
        v
    };
    let mut trials = 0;
    let mut held = 0;
    for (what, key) in [("aggregate", &agg_key), ("validate", &val_key)] {
        let args = job(what, key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The first kills land while the job waits for the window to close, the later ones
        // in the middle of its reads and writes.
        for ms in delays(if what == "aggregate" { 1 } else { 2 }, 6, 9000) {
            trials += 1;
            start_and_kill(&args, &[], ms);
            // Whatever is visible is whole: the aggregate verifies, or is not there.
            let v = shardrop(&["verify", &agg_url, "--json"]);
            let whole = v.status.success() || stderr(&v).contains("not found");
            held += usize::from(whole);
            if !whole {
                eprintln!("{what} killed after {ms} ms left: {}", stderr(&v));
            }
        }
        trials += 1;
        let done = ok_json(shardrop(&args));
        let again = ok_json(shardrop(&args));
        held += usize::from(again["already_published"] == true && done.is_object());
    }
    report(
        "aggregate / validate killed at a random point, rerun byte-identical (S3)",
        trials,
        held,
    );
    assert_eq!(held, trials);
}

/// ckpt push and pull killed at random points: reruns finish, the checkpoint verifies and the
/// pulled tensors equal the source.
#[test]
fn ckpt_push_and_pull_killed_at_random_points_on_s3() {
    let Some(base) = s3_base("ckpt") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "chaos-ckpt", 60, &agg_key, &[]);
    // 3 tensors of 8 MiB in 8 MiB shards: several objects, parallel uploads.
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let bufs: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            (0..(8usize << 20))
                .map(|j| (j as u8).wrapping_mul(31) ^ i ^ (j >> 13) as u8)
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                format!("layer.{i}.weight"),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![512, 4096], b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        src.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let push = [
        "ckpt",
        "push",
        p(&src),
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--step",
        "3",
        "--window",
        "2",
        "--shard-size",
        "8MiB",
        // A made-up 30 MB folder, to have several shards to kill between; not the run's
        // model.
        "--any-model",
        "--json",
    ];
    let mut trials = 0;
    let mut held = 0;
    for ms in delays(3, 5, 1500) {
        trials += 1;
        start_and_kill(&push, &[], ms);
        // A checkpoint exists only whole: `ckpt verify latest` passes, or there is no LATEST.
        let v = shardrop(&["ckpt", "verify", "latest", "--registry", &run.reg]);
        let whole = v.status.success() || !stderr(&v).contains("rejected");
        held += usize::from(whole);
    }
    trials += 1;
    ok_json(shardrop(&push));
    let v = shardrop(&["ckpt", "verify", "latest", "--registry", &run.reg]);
    held += usize::from(v.status.success());
    let out = dir.join("pulled");
    let pull = [
        "ckpt",
        "pull",
        "latest",
        p(&out),
        "--registry",
        &run.reg,
        "--json",
    ];
    for ms in delays(4, 5, 800) {
        trials += 1;
        start_and_kill(&pull, &[], ms);
        // No file appears under a shard's name unless complete.
        let complete = std::fs::read_dir(&out).map_or(true, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .all(|e| {
                    std::fs::read(e.path())
                        .ok()
                        .and_then(|b| safetensors::SafeTensors::deserialize(&b).ok().map(|_| ()))
                        .is_some()
                })
        });
        held += usize::from(complete);
    }
    trials += 1;
    ok_json(shardrop(&pull));
    let mut got = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".safetensors") {
            let b = std::fs::read(e.path()).unwrap();
            for (n, v) in safetensors::SafeTensors::deserialize(&b).unwrap().tensors() {
                got.insert(n, v.data().to_vec());
            }
        }
    }
    held +=
        usize::from(got.len() == 3 && (0..3).all(|i| got[&format!("layer.{i}.weight")] == bufs[i]));
    report(
        "ckpt push / pull killed at a random point, rerun (S3)",
        trials,
        held,
    );
    assert_eq!(held, trials);
}

/// Racing writers on moto (atomic conditional writes): `run add`, two aggregators of one
/// window, and pushes of different steps moving LATEST.
#[test]
fn racing_writers_on_moto() {
    let Some((base, env)) = moto_base("race") else {
        return;
    };
    let env_ref = borrow(&env);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "chaos-race", 4, &agg_key, &env_ref);
    let mut trials = 0;
    let mut held = 0;
    // 1. Six operators' edits at once: every one lands.
    let peers: Vec<String> = (0..6)
        .map(|i| {
            ok_json(shardrop(&[
                "keygen",
                "--out",
                p(&dir.join(format!("r{i}.key"))),
                "--json",
            ]))["peer_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let spawn = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_shardrop"))
            .args(args)
            .envs(env_ref.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let adds: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            spawn(
                [
                    "run",
                    "add",
                    "--registry",
                    &run.reg,
                    "--key",
                    &run.op_key,
                    "--role",
                    "miner",
                    "--peer",
                    peer,
                    "--store",
                    &format!("{base}/r{i}"),
                    "--json",
                ]
                .map(String::from)
                .to_vec(),
            )
        })
        .collect();
    let ok_adds = adds
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.success())
        .filter(|ok| *ok)
        .count();
    let shown = ok_json(run.run(&["run", "show", "--registry", &run.reg, "--json"]));
    let listed = shown["participants"].as_array().unwrap().len();
    trials += 1;
    held += usize::from(ok_adds == 6 && listed == 7);

    // 2. Two aggregators of one window at once: both succeed, one aggregate.
    let key = dir.join("r0.key");
    let update = dir.join("u.safetensors");
    write_update(&update, 2.0);
    ok_json(run.run(&run.publish_args(p(&key), p(&update), p(&dir.join("s")))));
    let agg_args: Vec<String> = [
        "aggregate",
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--window",
        "0",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let both: Vec<_> = (0..2).map(|_| spawn(agg_args.clone())).collect();
    let outs: Vec<_> = both
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    trials += 1;
    let all_ok = outs.iter().all(|o| o.status.success());
    let one_created = outs
        .iter()
        .filter_map(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .filter(|j| j["already_published"] == false)
        .count()
        == 1;
    held += usize::from(all_ok && one_created);
    if !(all_ok && one_created) {
        for o in &outs {
            eprintln!("racing aggregate: {}", stderr(o));
        }
    }

    // 3. Pushes of four steps at once: all succeed, LATEST ends at the newest, it verifies.
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_update(&src.join("model.safetensors"), 1.0);
    let pushes: Vec<_> = (1..=4)
        .map(|step| {
            spawn(
                [
                    "ckpt",
                    "push",
                    p(&src),
                    "--registry",
                    &run.reg,
                    "--key",
                    p(&agg_key),
                    "--step",
                    &step.to_string(),
                    "--window",
                    "0",
                    "--json",
                ]
                .map(String::from)
                .to_vec(),
            )
        })
        .collect();
    let pushed = pushes
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .filter(|o| {
            if !o.status.success() {
                eprintln!("racing push: {}", stderr(o));
            }
            o.status.success()
        })
        .count();
    let ls = ok_json(run.run(&["ckpt", "ls", &run.reg, "--json"]));
    let verified = run.run(&["ckpt", "verify", "latest", "--registry", &run.reg]);
    trials += 1;
    let latest_is_4 = ls
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["latest"] == true && c["step"] == 4 && c["complete"] == true);
    held += usize::from(pushed == 4 && verified.status.success() && latest_is_4);
    if !latest_is_4 {
        eprintln!("ckpt ls: {ls}");
    }
    report(
        "racing writers: run add, aggregators, ckpt push (moto)",
        trials,
        held,
    );
    assert_eq!(held, trials);
}

/// The demo through moto, whose timestamps are whole seconds: the copier (which republishes
/// the moment it sees its victim's shard) must be caught every time, the honest miners never.
#[test]
fn demo_through_a_store_with_one_second_timestamps() {
    let Some((base, env)) = moto_base("demo") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = common::shardrop_env(
        &[
            "demo",
            "--dir",
            p(tmp.path()),
            "--store",
            &base,
            "--windows",
            "3",
            "--miners",
            "4",
            // A turn (validate the previous window, apply, push, then publish with moto's
            // whole-second commit wait) takes about 3.5 s on moto on 2 cores: 5 s windows
            // leave it room on a loaded machine.
            "--window-secs",
            "5",
            "--json",
        ],
        &borrow(&env),
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let caught = j["adversary"]["caught_windows"].as_u64().unwrap_or(0) as usize;
    let honest_rejected: u64 = j["windows"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| w["rejected"].as_u64().unwrap_or(0).saturating_sub(1))
                .sum()
        })
        .unwrap_or(u64::MAX);
    report(
        "demo on moto: adversary caught, honest miners accepted (windows)",
        3,
        if honest_rejected == 0 { caught } else { 0 },
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!((caught, honest_rejected), (3, 0), "{j}");
}
