//! The CLI as a user runs it: keygen, sign, verify, inspect, get and demo, against a local
//! folder and the real S3 server; every rejection reason through `shardrop verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{json, shardrop, stderr};

use object_store::{ObjectStoreExt, PutPayload};
use serde_json::Value;
use shardrop::store::{self, S3Options};

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Store roots to run against: always a local folder, and the S3 server when the test run
/// has one (required under tools/test and CI).
fn roots(tmp: &Path, name: &str) -> Vec<String> {
    let mut v = vec![format!("file://{}", tmp.join("store").display())];
    match std::env::var("SHARDROP_TEST_S3") {
        Ok(s3) => v.push(format!("{s3}/{}", unique(name))),
        Err(_) if std::env::var("SHARDROP_S3_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("SHARDROP_TEST_S3 missing")
        }
        Err(_) => eprintln!("no S3 server: only the local folder is tested"),
    }
    v
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = shardrop(&["keygen", "--out", key.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["key_file"], key.to_str().unwrap());
    (key, j["peer_id"].as_str().unwrap().to_string())
}

#[test]
fn keygen_writes_0600_refuses_overwrite_and_loose_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (key, peer) = keygen(tmp.path(), "k");
    assert_eq!(peer.len(), 64);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = shardrop(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let input = tmp.path().join("a.txt");
    std::fs::write(&input, "x").unwrap();
    let to = format!("file://{}/o", tmp.path().display());
    let out = shardrop(&[
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--kind",
        "blob",
        "--run",
        "r",
        input.to_str().unwrap(),
        "--to",
        &to,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "names the file and the fix: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "errors are one line: {err}");
}

#[test]
fn sign_verify_inspect_get_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, peer) = keygen(tmp.path(), "miner.key");
    let a = tmp.path().join("update.bin");
    let b = tmp.path().join("notes.txt");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 27) as u8)
        .collect();
    std::fs::write(&a, &data).unwrap();
    std::fs::write(&b, "window 9 notes\n").unwrap();
    for root in roots(tmp.path(), "cli-roundtrip") {
        let url = format!("{root}/runs/r1/grads/0000000009/{peer}.grad");
        let sign = |extra: &[&str]| {
            let mut args = vec![
                "sign",
                "--key",
                key.to_str().unwrap(),
                "--kind",
                "grad",
                "--run",
                "r1",
                "--window",
                "9",
                "--clock-ms",
                "1000",
                "--json",
            ];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[a.to_str().unwrap(), b.to_str().unwrap(), "--to", &url]);
            shardrop(&args)
        };
        let out = sign(&[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let j = json(&out);
        assert_eq!(j["outcome"], "created");
        assert_eq!(j["raw_bytes"], 3_000_000 + 15);
        assert!(
            sign(&[]).status.success(),
            "a retry with identical bytes succeeds"
        );
        assert_eq!(json(&sign(&[]))["outcome"], "already_identical");
        let conflict = sign(&["--meta", "x=y"]);
        assert_eq!(conflict.status.code(), Some(1));
        assert!(
            stderr(&conflict).contains("already exists"),
            "{}",
            stderr(&conflict)
        );

        let v = shardrop(&[
            "verify", &url, "--signer", &peer, "--run", "r1", "--window", "9", "--kind", "grad",
            "--json",
        ]);
        assert!(v.status.success(), "{}", stderr(&v));
        let vj = json(&v);
        assert_eq!(vj["valid"], true);
        assert_eq!(vj["signer"], peer);
        assert_eq!(vj["sections"], 2);

        let i = shardrop(&["inspect", &url, "--json", "--deep"]);
        let ij = json(&i);
        assert_eq!(ij["valid"], true);
        assert_eq!(ij["header"]["sections"][0]["name"], "update.bin");
        let text = shardrop(&["inspect", &url]);
        assert!(String::from_utf8_lossy(&text.stdout).contains("notes.txt"));

        let out_dir = tmp.path().join(unique("out"));
        let g = shardrop(&["get", &url, out_dir.to_str().unwrap(), "--signer", &peer]);
        assert!(g.status.success(), "{}", stderr(&g));
        assert_eq!(std::fs::read(out_dir.join("update.bin")).unwrap(), data);
        assert_eq!(
            std::fs::read_to_string(out_dir.join("notes.txt")).unwrap(),
            "window 9 notes\n"
        );
        let one = tmp.path().join(unique("one"));
        let g = shardrop(&["get", &url, one.to_str().unwrap(), "--section", "notes.txt"]);
        assert!(g.status.success(), "{}", stderr(&g));
        let names: Vec<_> = std::fs::read_dir(&one)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["notes.txt"]);
    }
}

fn vectors() -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/envelope-v1");
    let cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    (dir, cases)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rejection_reason_through_verify_and_get() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, cases) = vectors();
    for root in roots(tmp.path(), "cli-reasons") {
        let target = store::open(&root, &S3Options::default()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for case in cases["cases"].as_array().unwrap() {
            let file = case["file"].as_str().unwrap();
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let path = target.path(file);
            target
                .store
                .put(&path, PutPayload::from(bytes))
                .await
                .unwrap();
            let url = target.url_of(&path);
            let mut flags: Vec<String> = Vec::new();
            let e = &case["expect"];
            for (flag, k) in [
                ("--signer", "signer"),
                ("--run", "run"),
                ("--kind", "kind"),
                ("--window", "window"),
                ("--step", "step"),
            ] {
                match &e[k] {
                    Value::String(s) => flags.extend([flag.to_string(), s.clone()]),
                    Value::Number(n) => flags.extend([flag.to_string(), n.to_string()]),
                    _ => {}
                }
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let mut args = vec!["verify", url.as_str(), "--json"];
            args.extend_from_slice(&flags);
            let out = shardrop(&args);
            let result = case["result"].as_str().unwrap();
            let j = json(&out);
            if result == "valid" {
                assert!(out.status.success(), "{file}: {}", stderr(&out));
            } else {
                assert_eq!(
                    out.status.code(),
                    Some(3),
                    "{file}: rejections exit 3; {}",
                    stderr(&out)
                );
                assert_eq!(j["reason"], result, "{file}");
                assert!(
                    stderr(&out).contains(&url),
                    "{file}: the error names the object"
                );
                seen.insert(result.to_string());
                // get must refuse it too and leave nothing in the output folder.
                let out_dir = tmp.path().join(unique("get"));
                let mut args = vec!["get", url.as_str(), out_dir.to_str().unwrap()];
                args.extend_from_slice(&flags);
                let g = shardrop(&args);
                assert_ne!(g.status.code(), Some(0), "{file}");
                let left: Vec<_> = std::fs::read_dir(&out_dir)
                    .map(|d| d.map(|e| e.unwrap().path()).collect())
                    .unwrap_or_default();
                assert!(left.is_empty(), "{file}: get left {left:?}");
            }
        }
        for r in shardrop::format::envelope::Reason::ALL {
            assert!(seen.contains(r.code()), "no CLI test produces {}", r.code());
        }
        // inspect says what is wrong instead of failing.
        let url = target.url_of(&target.path("section-bitflip.bin"));
        let i = json(&shardrop(&["inspect", &url, "--json", "--deep"]));
        assert_eq!(i["valid"], false);
        assert_eq!(i["problem"]["reason"], "section_hash_mismatch");
        assert_eq!(i["header"]["run"], "golden-run");
        let url = target.url_of(&target.path("bad-magic.bin"));
        let i = json(&shardrop(&["inspect", &url, "--json"]));
        assert_eq!(i["problem"]["reason"], "not_envelope");
    }
}

#[test]
fn demo_runs_through_a_real_bucket() {
    let Ok(s3) = std::env::var("SHARDROP_TEST_S3") else {
        assert!(
            std::env::var("SHARDROP_S3_REQUIRED").is_err(),
            "SHARDROP_TEST_S3 missing"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("{s3}/{}", unique("demo"));
    let out = shardrop(&[
        "demo",
        "--dir",
        tmp.path().to_str().unwrap(),
        "--store",
        &store,
        "--windows",
        "3",
        "--miners",
        "4",
        // A turn (validate, apply, push, publish with the commit's second) takes about 3 s
        // on a loaded machine (two demos run at once here): 5 s windows leave it room.
        "--window-secs",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["ok"], true);
    assert!(j["registry"].as_str().unwrap().starts_with("s3://"));
    assert_eq!(j["late_joiner"]["matches"], true);
    assert_eq!(j["adversary"]["caught_windows"], 3);
}

#[test]
fn demo_trains_through_the_pipeline_on_the_embedded_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = shardrop(&[
        "demo",
        "--dir",
        dir.to_str().unwrap(),
        "--windows",
        "4",
        "--window-secs",
        "3",
        "--miners",
        "3",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["ok"], true);
    let windows = j["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 4);
    assert!(j["final_loss"].as_f64().unwrap() < 0.5 * j["initial_loss"].as_f64().unwrap());
    // The adversary copies, sends noise, publishes late, copies: caught each time.
    let expect = [
        ("copy", "duplicate"),
        ("noise", "clipped"),
        ("late", "late"),
        ("copy", "duplicate"),
    ];
    for (w, (attack, reason)) in windows.iter().zip(expect) {
        assert_eq!(w["adversary"]["attack"], attack);
        assert_eq!(w["adversary"]["reason"], reason, "{w}");
        assert_eq!(w["adversary"]["caught"], true);
        assert_eq!(w["reasons"][reason], 1);
    }
    assert_eq!(j["adversary"]["caught_windows"], 4);
    // The late joiner bootstrapped from the checkpoint of window 1 and replayed window 2.
    let lj = &j["late_joiner"];
    assert_eq!(
        (
            lj["joined_window"].as_u64(),
            lj["checkpoint_window"].as_u64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(
        (lj["replayed"].as_u64(), lj["matches"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(
        windows[3]["accepted"], 4,
        "three miners and the late joiner"
    );
    // The chart can be read: axes, ticks, and every window's loss and bytes written on it.
    let svg = std::fs::read_to_string(dir.join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains(">window</text>"));
    for w in windows {
        let loss = format!(">{:.1}</text>", w["loss"].as_f64().unwrap());
        let bytes = format!(">{}</text>", w["bytes"].as_u64().unwrap());
        assert!(
            svg.contains(&loss) && svg.contains(&bytes),
            "{loss} {bytes}"
        );
    }
    assert!(dir.join("keys/operator.key").exists());
    assert!(dir.join("summary.json").exists());
    // The registry it made verifies from the CLI.
    let reg = j["registry"].as_str().unwrap();
    let show = shardrop(&["run", "show", "--registry", reg, "--json"]);
    assert!(show.status.success(), "{}", stderr(&show));
    assert_eq!(json(&show)["participants"].as_array().unwrap().len(), 7);
    // The score table as a person reads it: a verdict once (`missing`, not
    // `missing:missing`), and what its columns mean.
    let shown = shardrop(&["scores", "show", reg, "--last", "6"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(
        text.contains(" missing ") && !text.contains("missing:missing"),
        "{text}"
    );
    assert!(
        text.contains("(s early: seconds before the deadline"),
        "{text}"
    );
    // The validator's tables, read back and verified from the CLI.
    for w in windows {
        let weights = w["weights"].as_object().unwrap();
        assert_eq!(weights["adversary"], 0.0);
        let total: f64 = weights.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{weights:?}");
    }
    let shown = shardrop(&["scores", "show", reg, "--last", "2", "--json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let shown = json(&shown);
    assert_eq!(shown.as_array().unwrap().len(), 2);
    assert_eq!(shown[1]["window"], 3);
    let rows = shown[1]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let copier = j["adversary"]["peer"].as_str().unwrap();
    let c = rows.iter().find(|r| r["peer"] == copier).unwrap();
    assert_eq!(
        (c["copier"].as_bool(), c["weight"].as_f64()),
        (Some(true), Some(0.0))
    );
    let text = shardrop(&["scores", "show", reg, "--window", "0"]);
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("rejected:duplicate"));
    let honest = rows
        .iter()
        .find(|r| {
            r["peer"] != copier
                && r["present"] == true
                && shown[0]["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["peer"] == r["peer"] && x["present"] == true)
        })
        .unwrap()["peer"]
        .as_str()
        .unwrap()
        .to_string();
    let hist = shardrop(&["scores", "history", reg, "--peer", &honest, "--json"]);
    assert!(hist.status.success(), "{}", stderr(&hist));
    let hist = json(&hist);
    let ratings: Vec<f64> = hist
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rating"].as_f64().unwrap())
        .collect();
    assert_eq!(ratings.len(), 4);
    assert!(
        ratings.iter().all(|r| *r > 0.0) && ratings[3] > ratings[0],
        "{ratings:?}"
    );
    // Rerunning the validator on a scored window gives the same table.
    let vkey = dir.join("keys/validator.key");
    let again = shardrop(&[
        "validate",
        "--registry",
        reg,
        "--key",
        vkey.to_str().unwrap(),
        "--window",
        "2",
        "--json",
    ]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(json(&again)["already_published"], true);
    assert_eq!(json(&again)["rows"], shown[0]["rows"]);
    // The split merge from the CLI: two workers and a commit reproduce window 0's aggregate
    // byte for byte (the commit's create-only put finds the demo's identical object).
    let key = dir.join("keys/aggregator.key");
    let worker = |i: usize| {
        Command::new(env!("CARGO_BIN_EXE_shardrop"))
            .args([
                "aggregate",
                "--registry",
                reg,
                "--key",
                key.to_str().unwrap(),
                "--window",
                "0",
                "--part",
                &format!("{i}/2"),
                // One worker merges on a GPU where there is one (same bytes), else says
                // why not and merges on the CPU.
                "--device",
                if i == 1 { "cuda:0" } else { "cpu" },
                "--json",
            ])
            .spawn()
            .unwrap()
    };
    let (mut w0, mut w1) = (worker(0), worker(1));
    let commit = shardrop(&[
        "aggregate",
        "--registry",
        reg,
        "--key",
        key.to_str().unwrap(),
        "--window",
        "0",
        "--commit",
        "2",
        "--json",
    ]);
    assert!(w0.wait().unwrap().success() && w1.wait().unwrap().success());
    assert!(commit.status.success(), "{}", stderr(&commit));
    let c = json(&commit);
    assert_eq!(
        c["already_published"], true,
        "the split merge must equal the single-process aggregate"
    );
    assert_eq!(c["accepted"], 3);

    // A miner publishing with `--device cuda:0`: on a GPU build with a GPU the shard is
    // encoded there, else the command says why and uses the CPU; either way its sections
    // are the bytes `grad encode` (CPU) makes with the run's codec.
    let run = json(&shardrop(&["run", "show", "--registry", reg, "--json"]));
    let update = dir.join("checkpoint-source/model.safetensors");
    let mkey = dir.join("keys/miner-0.key");
    let publish = shardrop(&[
        "publish",
        "--registry",
        reg,
        "--key",
        mkey.to_str().unwrap(),
        update.to_str().unwrap(),
        "--state",
        tmp.path().join("ef-gpu").to_str().unwrap(),
        "--device",
        "cuda:0",
        "--json",
    ]);
    assert!(publish.status.success(), "{}", stderr(&publish));
    let p = json(&publish);
    assert!(
        p["device"] != "cpu" || p["device_fallback"].as_str().is_some(),
        "{p}"
    );
    let got = tmp.path().join("got");
    let g = shardrop(&["get", p["object"].as_str().unwrap(), got.to_str().unwrap()]);
    assert!(g.status.success(), "{}", stderr(&g));
    let codec = &run["codec"];
    let enc = tmp.path().join("enc");
    let e = shardrop(&[
        "grad",
        "encode",
        update.to_str().unwrap(),
        enc.to_str().unwrap(),
        "--state",
        tmp.path().join("ef-cpu").to_str().unwrap(),
        "--chunk",
        &codec["chunk"].to_string(),
        "--k",
        &codec["k"].to_string(),
        "--values",
        codec["values"].as_str().unwrap(),
        "--indices",
        codec["indices"].as_str().unwrap(),
        "--scales",
        codec["scales"].as_str().unwrap(),
        "--beta",
        &(run["beta"].as_f64().unwrap() as f32).to_string(),
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
    let mut names: Vec<String> = std::fs::read_dir(&got)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for n in names {
        assert_eq!(
            std::fs::read(got.join(&n)).unwrap(),
            std::fs::read(enc.join(format!("{n}.safetensors"))).unwrap(),
            "section {n}"
        );
    }
}

#[test]
fn s3_credentials_from_flags_and_a_secret_file() {
    let Ok(s3) = std::env::var("SHARDROP_TEST_S3") else {
        assert!(
            std::env::var("SHARDROP_S3_REQUIRED").is_err(),
            "SHARDROP_TEST_S3 missing"
        );
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keygen(tmp.path(), "k");
    let input = tmp.path().join("a.txt");
    std::fs::write(&input, "flags").unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(
        &secret,
        format!("{}\n", std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()),
    )
    .unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let url = format!("{s3}/{}/a.blob", unique("flags"));
    let run = |secret: &Path| {
        Command::new(env!("CARGO_BIN_EXE_shardrop"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_ENDPOINT_URL")
            .args([
                "--endpoint",
                &endpoint,
                "--access-key-id",
                &id,
                "--secret-access-key-file",
                secret.to_str().unwrap(),
            ])
            .args([
                "sign",
                "--key",
                key.to_str().unwrap(),
                "--kind",
                "blob",
                "--run",
                "r",
                input.to_str().unwrap(),
                "--to",
                &url,
                "--retries",
                "0",
            ])
            .output()
            .unwrap()
    };
    let out = run(&secret);
    assert!(out.status.success(), "{}", stderr(&out));
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(&wrong);
    assert_eq!(out.status.code(), Some(1), "the server checks signatures");
    assert!(
        !stderr(&out).contains("not-the-secret"),
        "secrets never reach messages"
    );
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&wrong);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}
