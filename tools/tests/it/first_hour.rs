//! What a newcomer runs in the first hour of a run (#31), as the README has them run it.

use crate::common::{Run, json, ok_json, p, start_and_kill};

/// Right after `run init`, before window 0 has closed: `aggregate --once` and `validate
/// --once` (a CronJob's first tick) have nothing to do, say so and when, and exit 0;
/// `aggregate --follow` waits for window 0 instead of stopping; and catch-up from genesis
/// with window 0 not aggregated names the command that publishes it.
#[test]
fn jobs_started_before_the_first_close_wait_or_say_so_and_catch_up_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("store").display().to_string();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "first-hour", 60, &agg_key, &[]);
    let val_key = run.new_validator(dir);
    // Which window is open, and how long it has, by the store's clock and by this machine's.
    let by_store = ok_json(run.run(&[
        "run",
        "window",
        "--registry",
        &run.reg,
        "--key",
        p(&val_key),
        "--json",
    ]));
    assert_eq!(
        (by_store["window"].as_u64(), by_store["clock"].as_str()),
        (Some(0), Some("store")),
        "{by_store}"
    );
    let to_close = by_store["secs_to_close"].as_f64().unwrap();
    assert!(to_close > 0.0 && to_close <= 62.0, "{by_store}");
    let by_local = ok_json(run.run(&["run", "window", "--registry", &run.reg, "--json"]));
    assert_eq!(
        (by_local["window"].as_u64(), by_local["clock"].as_str()),
        (Some(0), Some("local")),
        "{by_local}"
    );
    for (cmd, key) in [("aggregate", &agg_key), ("validate", &val_key)] {
        let once = ok_json(run.run(&[
            cmd,
            "--registry",
            &run.reg,
            "--key",
            p(key),
            "--once",
            "--json",
        ]));
        assert!(once["window"].is_null(), "{cmd}: {once}");
        let secs = once["first_close_in_secs"].as_f64().unwrap();
        assert!(secs > 0.0 && secs <= 62.0, "{cmd}: {once}");
    }
    let follow = [
        "aggregate",
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--follow",
    ];
    assert!(
        !start_and_kill(&follow, &run.env(), 3000),
        "aggregate --follow stopped before window 0 closed"
    );
    // Ctrl-C: the shell's 130 and a line saying what to do, not a silent death.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shardrop"))
        .args(follow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(
        said.contains("shardrop: interrupted:") && said.contains("run the same command again"),
        "{said}"
    );
    let out = run.run(&[
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&dir.join("model.safetensors")),
        "--from-window",
        "genesis",
        "--through",
        "0",
        p(&dir.join("theta.safetensors")),
        "--json",
    ]);
    let doc = json(&out);
    assert_eq!(doc["class"], "not_found", "{doc}");
    let error = doc["error"].as_str().unwrap();
    assert!(
        error.contains("shardrop aggregate --window 0") && error.contains("--wait"),
        "{error}"
    );
}

/// A wrong registry URL says what is there instead: the store's runs (a wrong run name),
/// that the store holds none, or that it cannot be listed (a wrong bucket); a URL that is not
/// a registry's is refused before anything is fetched (no retries of a server's 500).
#[test]
fn a_wrong_registry_url_names_what_is_there_instead() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("store").display().to_string();
    let run = Run::init(dir, &base, "urls", 60, &dir.join("agg.key"), &[]);
    let err = |url: &str| {
        let out = crate::common::shardrop(&["run", "show", "--registry", url, "--json"]);
        assert_eq!(out.status.code(), Some(1));
        json(&out)
    };
    let wrong_run = run.reg.replace("/runs/urls/", "/runs/nope/");
    let doc = err(&wrong_run);
    assert_eq!(doc["class"], "not_found", "{doc}");
    let msg = doc["error"].as_str().unwrap();
    assert!(
        msg.contains("holds 1 run(s)") && msg.contains(&run.reg),
        "{msg}"
    );
    let doc = err(&format!("{base}/elsewhere/runs/urls/registry"));
    assert!(
        doc["error"].as_str().unwrap().contains("holds no run"),
        "{doc}"
    );
    let doc = err(run.reg.trim_end_matches("/registry"));
    assert_eq!(doc["class"], "caller", "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("ends in /runs/RUN/registry"),
        "{doc}"
    );
    // A bucket that does not exist, on the local S3 server.
    if let Some(s3) = crate::common::s3_base("first-hour", "urls") {
        let bucket = s3.trim_start_matches("s3://").split('/').next().unwrap();
        let doc = err(&format!(
            "{}/runs/r/registry",
            s3.replace(bucket, "no-such-bucket-shardrop")
        ));
        let msg = doc["error"].as_str().unwrap();
        assert!(
            msg.contains("cannot be listed") && msg.contains("bucket name"),
            "{msg}"
        );
    }
}

/// A miner's store the aggregator cannot read (its credentials for that store are wrong, or
/// not set) is never a silent success: each such miner is named on stderr with what the store
/// said, the JSON lists it under `unread`, and unset `<PREFIX>AWS_*` credentials are warned of.
#[test]
fn miners_the_aggregator_cannot_read_are_named_not_only_counted() {
    let Some(base) = crate::common::s3_base("first-hour", "unread") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = Run::init(dir, &base, "unread", 3, &agg_key, &[]);
    let m1 = run.new_miner(dir, "m1");
    let mut peers = Vec::new();
    for (name, prefix) in [("broken", "BROKEN_"), ("unset", "UNSET_")] {
        let key = dir.join(format!("{name}.key"));
        let id = ok_json(crate::common::shardrop(&[
            "keygen",
            "--out",
            p(&key),
            "--json",
        ]));
        let peer = id["peer_id"].as_str().unwrap().to_string();
        run.add_with("miner", &peer, name, &["--credentials-env-prefix", prefix]);
        peers.push(peer);
    }
    let update = dir.join("u.safetensors");
    crate::common::write_update(&update, 1.0);
    let state = dir.join("m1-state");
    ok_json(run.run(&run.publish_args(p(&m1), p(&update), p(&state))));
    let out = crate::common::shardrop_env(
        &[
            "aggregate",
            "--registry",
            &run.reg,
            "--key",
            p(&agg_key),
            "--window",
            "0",
        ],
        &[
            ("BROKEN_AWS_ACCESS_KEY_ID", "not-a-key"),
            ("BROKEN_AWS_SECRET_ACCESS_KEY", "not-a-secret"),
        ],
    );
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        crate::common::stderr(&out),
    );
    // The aggregate is published (one miner cannot hold a window hostage), and says so.
    assert!(out.status.success(), "{se}");
    assert!(so.contains("1 accepted"), "{so}");
    let warned: Vec<&str> = se
        .lines()
        .filter(|l| l.starts_with("shardrop: warning: window 0: left out of the aggregate"))
        .collect();
    assert!(
        warned.iter().any(|l| l.contains(&peers[0])),
        "the broken miner is not named: {se}"
    );
    assert!(
        se.contains("UNSET_AWS_ACCESS_KEY_ID and UNSET_AWS_SECRET_ACCESS_KEY are not set"),
        "{se}"
    );
}

/// Two publishers on one state folder: the second is told it is a `conflict` (another
/// publisher holds it), by the CLI as by the Python package, not a store or disk error.
#[test]
fn a_held_state_folder_is_a_conflict_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("store").display().to_string();
    let run = Run::init(dir, &base, "locked", 60, &dir.join("agg.key"), &[]);
    let key = run.new_miner(dir, "m1");
    let update = dir.join("u.safetensors");
    crate::common::write_update(&update, 1.0);
    let state = dir.join("state");
    // The first waits for window 3 (minutes away), holding the folder.
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_shardrop"))
        .args([
            "publish",
            "--registry",
            &run.reg,
            "--key",
            p(&key),
            p(&update),
            "--state",
            p(&state),
            "--window",
            "3",
            "--wait",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut doc = serde_json::Value::Null;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let out = run.run(&run.publish_args(p(&key), p(&update), p(&state)));
        doc = json(&out);
        if doc["class"] == "conflict" {
            assert_eq!(out.status.code(), Some(1));
            break;
        }
    }
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(doc["class"], "conflict", "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("another publisher"),
        "{doc}"
    );
}
