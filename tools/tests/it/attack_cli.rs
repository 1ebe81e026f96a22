//! Issue 14 through the CLI as a user runs it: publish killed at every step and rerun,
//! racing `run add`, the window-0 aggregate applied to the genesis model, size limits of
//! `get` and `grad decode`, and secrets that never reach the terminal.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{Run, ok_json, p, shardrop, stderr, write_update};
use serde_json::Value;

/// A run on a local folder store under `dir` (grace 2 s) with an aggregator.
fn init_run(dir: &Path, name: &str, window_secs: u64, agg_key: &Path) -> Run {
    Run::init(
        dir,
        &format!("file://{}/{name}", dir.display()),
        name,
        window_secs,
        agg_key,
        &[],
    )
}

fn add(run: &Run, _dir: &Path, _name: &str, role: &str, peer: &str, area: &str) {
    run.add(role, peer, area);
}

fn publish_args<'a>(run: &'a Run, key: &'a str, update: &'a str, state: &'a str) -> Vec<&'a str> {
    run.publish_args(key, update, state)
}

#[test]
fn publish_killed_at_any_point_reruns_to_the_same_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = init_run(dir, "kills", 120, &dir.join("agg.key"));
    let update = dir.join("update.safetensors");
    write_update(&update, 3.0);
    // Kill delays spread over a publish (encode, commit, the one-second wait, the put, the
    // state save), each on its own miner so every trial starts from nothing.
    let delays_ms = [0u64, 5, 20, 60, 150, 300, 600, 900, 1100, 1300, 1600, 2500];
    let mut miners = Vec::new();
    for i in 0..=delays_ms.len() {
        let key = dir.join(format!("m{i}.key"));
        let id = ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
        add(
            &run,
            dir,
            "kills",
            "miner",
            id["peer_id"].as_str().unwrap(),
            &format!("m{i}"),
        );
        miners.push(key);
    }
    // Uninterrupted reference.
    let ref_state = dir.join("state-ref");
    let reference = ok_json(shardrop(&publish_args(
        &run,
        p(&miners[0]),
        p(&update),
        p(&ref_state),
    )));
    let want = std::fs::read(ref_state.join("error-feedback.safetensors")).unwrap();
    let mut killed_mid_publish = 0;
    for (i, delay) in delays_ms.iter().enumerate() {
        let key = &miners[i + 1];
        let state = dir.join(format!("state-{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardrop"))
            .args(publish_args(&run, p(key), p(&update), p(&state)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*delay));
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed_mid_publish += usize::from(!status.success());
        let again = ok_json(shardrop(&publish_args(&run, p(key), p(&update), p(&state))));
        // Exactly the state one uninterrupted publish leaves (window recorded, residual once).
        assert_eq!(
            std::fs::read(state.join("error-feedback.safetensors")).unwrap(),
            want,
            "kill after {delay} ms"
        );
        // The stored object's real size, and nothing left behind in the state folder.
        assert_eq!(again["bytes"], reference["bytes"], "kill after {delay} ms");
        let mut left: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["error-feedback.safetensors"],
            "kill after {delay} ms"
        );
        // A further rerun encodes nothing and changes nothing.
        let third = ok_json(shardrop(&publish_args(&run, p(key), p(&update), p(&state))));
        assert_eq!(third["already_published"], true);
        assert_eq!(
            std::fs::read(state.join("error-feedback.safetensors")).unwrap(),
            want
        );
    }
    // The trials did interrupt publishes (not all finished before the kill).
    assert!(killed_mid_publish > 0);
}

#[test]
fn racing_run_add_all_land() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = init_run(dir, "race", 60, &dir.join("agg.key"));
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
    let children: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            Command::new(env!("CARGO_BIN_EXE_shardrop"))
                .args([
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
                    &format!("file://{}/race/r{i}", dir.display()),
                ])
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
    let shown = ok_json(shardrop(&["run", "show", "--registry", &run.reg, "--json"]));
    let listed: Vec<&str> = shown["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["peer"].as_str().unwrap())
        .collect();
    for peer in &peers {
        assert!(listed.contains(&peer.as_str()), "{peer} lost: {listed:?}");
    }
}

#[test]
fn the_window_zero_aggregate_applies_to_the_genesis_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = init_run(dir, "genesis", 3, &agg_key);
    let mkey = dir.join("m.key");
    let id = ok_json(shardrop(&["keygen", "--out", p(&mkey), "--json"]));
    add(
        &run,
        dir,
        "genesis",
        "miner",
        id["peer_id"].as_str().unwrap(),
        "m",
    );
    let update = dir.join("update.safetensors");
    write_update(&update, 1.0);
    ok_json(shardrop(&publish_args(
        &run,
        p(&mkey),
        p(&update),
        p(&dir.join("state")),
    )));
    let agg = ok_json(shardrop(&[
        "aggregate",
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--window",
        "0",
        "--json",
    ]));
    assert_eq!(agg["accepted"], 1);
    let out = dir.join("theta.safetensors");
    let applied = ok_json(shardrop(&[
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&dir.join("model.safetensors")),
        "--from-window",
        "genesis",
        "--through",
        "0",
        p(&out),
        "--json",
    ]));
    assert_eq!(applied["applied"], 1);
    assert_eq!(applied["from_window"], "genesis");
    // New runs are agg-v2; a peer that prefetched the window's shards applies the same bytes.
    let shown = ok_json(shardrop(&["run", "show", "--registry", &run.reg, "--json"]));
    assert_eq!(shown["aggregate"]["format"], "agg-v2", "{shown}");
    let cache = dir.join("prefetched");
    let pre = ok_json(shardrop(&[
        "prefetch",
        "--registry",
        &run.reg,
        "--window",
        "0",
        "--dir",
        p(&cache),
        "--json",
    ]));
    assert_eq!(pre["prefetched"]["shards"], 1, "{pre}");
    assert!(
        pre["prefetched"]["sections"].as_u64().unwrap() >= 1,
        "{pre}"
    );
    let out2 = dir.join("theta2.safetensors");
    ok_json(shardrop(&[
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&dir.join("model.safetensors")),
        "--from-window",
        "genesis",
        "--through",
        "0",
        p(&out2),
        "--prefetched",
        p(&cache),
        "--json",
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_ne!(
        std::fs::read(&out).unwrap(),
        std::fs::read(dir.join("model.safetensors")).unwrap()
    );
    let bad = shardrop(&[
        "apply",
        "--registry",
        &run.reg,
        "--from",
        p(&out),
        "--from-window",
        "yesterday",
        "--through",
        "0",
        p(&out),
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("genesis"), "{}", stderr(&bad));
}

#[test]
fn get_and_decode_refuse_what_declares_too_much() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = dir.join("k.key");
    ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
    // 8 MiB of zeros: a few KB stored.
    let zeros = dir.join("t00000-00000");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    let url = format!("file://{}/store/bomb.grad", dir.display());
    ok_json(shardrop(&[
        "sign",
        "--key",
        p(&key),
        "--kind",
        "grad",
        "--run",
        "r",
        "--window",
        "0",
        p(&zeros),
        "--to",
        &url,
        "--json",
    ]));
    let out = dir.join("out");
    let got = shardrop(&["get", &url, p(&out), "--max-bytes", "1MiB", "--json"]);
    assert_eq!(got.status.code(), Some(3), "{}", stderr(&got));
    let doc: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(doc["reason"], "over_limit");
    assert!(std::fs::read_dir(&out).map_or(true, |mut d| d.next().is_none()));
    let dec = shardrop(&[
        "grad",
        "decode",
        &url,
        p(&dir.join("dense.safetensors")),
        "--max-bytes",
        "1MiB",
        "--json",
    ]);
    assert_eq!(dec.status.code(), Some(3), "{}", stderr(&dec));
    assert!(!dir.join("dense.safetensors").exists());
    // Within the limit, `get` writes it, replacing a link planted at its name (never
    // writing through it).
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("t00000-00000")).unwrap();
    ok_json(shardrop(&[
        "get",
        &url,
        p(&out),
        "--max-bytes",
        "16MiB",
        "--json",
    ]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let meta = std::fs::symlink_metadata(out.join("t00000-00000")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.len(), 8 << 20);
}

#[test]
fn secrets_never_reach_the_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env_clear: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shardrop"));
        c.args(args);
        if env_clear {
            for (k, _) in std::env::vars() {
                if k.starts_with("AWS_") {
                    c.env_remove(k);
                }
            }
        }
        c.output().unwrap()
    };
    // An endpoint with credentials in it.
    let out = run(
        &[
            "--endpoint",
            "http://AKIDLEAK:hunter2secret@127.0.0.1:9",
            "verify",
            "s3://bucket/key",
        ],
        false,
    );
    assert!(!out.status.success());
    let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(
        !all.contains("hunter2secret") && !all.contains("AKIDLEAK"),
        "{all}"
    );
    assert!(all.contains("carries credentials"), "{all}");
    // A secret pasted where a file name belongs.
    let out = run(
        &[
            "--secret-access-key-file",
            "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
            "keygen",
            "--out",
            "x",
        ],
        false,
    );
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("wJalrXUtnFEMI"), "{}", stderr(&out));
    // No credentials at all: said plainly, no instance-metadata request.
    let out = run(
        &[
            "--endpoint",
            "http://127.0.0.1:9",
            "verify",
            "s3://bucket/key",
        ],
        true,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));
    // A FIFO as a key: refused at once instead of blocking forever.
    let fifo = tmp.path().join("fifo.key");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"x").unwrap();
    let out = run(
        &[
            "sign",
            "--key",
            p(&fifo),
            "--kind",
            "blob",
            "--run",
            "r",
            p(&plain),
            "--to",
            "memory://x/y",
        ],
        false,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a plain file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bomb_costs_the_aggregator_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg_key = dir.join("agg.key");
    let run = init_run(dir, "bomb", 3, &agg_key);
    let honest = run.new_miner(dir, "honest");
    let bomber = run.new_miner(dir, "bomber");
    let update = dir.join("update.safetensors");
    write_update(&update, 1.0);
    ok_json(shardrop(&publish_args(
        &run,
        p(&honest),
        p(&update),
        p(&dir.join("s")),
    )));
    // 256 MiB of zeros as the section for both tensors, with the run's codec in the header.
    let shown = ok_json(shardrop(&["run", "show", "--registry", &run.reg, "--json"]));
    let c = &shown["codec"];
    let section = dir.join("t00000-00001");
    std::fs::write(&section, vec![0u8; 256 << 20]).unwrap();
    let bomber_peer = shown["participants"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|x| x["role"] == "miner")
        .unwrap()["peer"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!(
        "file://{}/bomb/bomber/runs/bomb/grads/0000000000/{bomber_peer}.grad",
        dir.display()
    );
    let signed = ok_json(shardrop(&[
        "sign",
        "--key",
        p(&bomber),
        "--kind",
        "grad",
        "--run",
        "bomb",
        "--window",
        "0",
        "--codec",
        "topk-v1",
        "--codec-param",
        &format!("chunk={}", c["chunk"]),
        "--codec-param",
        &format!("k={}", c["k"]),
        "--codec-param",
        &format!("values={}", c["values"].as_str().unwrap()),
        "--codec-param",
        &format!("scales={}", c["scales"].as_str().unwrap()),
        "--codec-param",
        &format!("indices={}", c["indices"].as_str().unwrap()),
        p(&section),
        "--to",
        &url,
        "--json",
    ]));
    assert!(signed["bytes"].as_u64().unwrap() < 1 << 20);
    let agg = ok_json(shardrop(&[
        "aggregate",
        "--registry",
        &run.reg,
        "--key",
        p(&agg_key),
        "--window",
        "0",
        "--json",
    ]));
    assert_eq!(agg["accepted"], 1, "{agg}");
    assert_eq!(agg["reasons"]["over_limit"], 1, "{agg}");
    // Refused on the header: the aggregator never holds the 256 MiB it claims (before, the
    // section was inflated into memory).
    assert!(agg["peak_rss_mib"].as_f64().unwrap() < 200.0, "{agg}");
    // `grad decode` with the model refuses it too, before decompressing.
    let dec = shardrop(&[
        "grad",
        "decode",
        &url,
        p(&dir.join("dense.safetensors")),
        "--model",
        p(&dir.join("model.safetensors")),
        "--json",
    ]);
    assert_eq!(dec.status.code(), Some(3), "{}", stderr(&dec));
}

#[test]
fn grad_encode_and_decode_never_write_through_links() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let update = dir.join("u.safetensors");
    write_update(&update, 2.0);
    let encode = |out: &Path, state: &Path| {
        ok_json(shardrop(&[
            "grad",
            "encode",
            p(&update),
            p(out),
            "--state",
            p(state),
            "--json",
        ]))
    };
    // Learn the section file names, then plant links at them in a fresh output folder.
    let first = encode(&dir.join("probe"), &dir.join("s0"));
    let names: Vec<String> = first["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            Path::new(x.as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    for n in &names {
        std::os::unix::fs::symlink(&victim, out.join(n)).unwrap();
    }
    // An output folder that is not empty (here: links at the section names) is refused.
    let refused = shardrop(&[
        "grad",
        "encode",
        p(&update),
        p(&out),
        "--state",
        p(&dir.join("s1")),
    ]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let out = dir.join("probe");
    // The decoder's output path, a planted link: replaced, not written through.
    let dense = dir.join("dense.safetensors");
    std::os::unix::fs::symlink(&victim, &dense).unwrap();
    ok_json(shardrop(&["grad", "decode", p(&out), p(&dense), "--json"]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(
        std::fs::symlink_metadata(&dense)
            .unwrap()
            .file_type()
            .is_file()
    );
}
