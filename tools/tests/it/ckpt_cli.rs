//! `shardrop ckpt` as a user runs it against the local S3 server: push → kill → resume →
//! ls → pull → kill → resume → verify → corrupt → verify fails → gc --dry-run → apply from
//! the pulled folder.

use std::path::Path;

use crate::common::{json, ok_json, shardrop, start_and_kill, stderr};

use object_store::ObjectStoreExt;
use safetensors::SafeTensors;

fn model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let bufs: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            (0..(16usize << 20))
                .map(|j| ((j / 4) as u8) ^ i.wrapping_mul(37) ^ (j >> 12) as u8 & 0x3f)
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                format!("layer.{i}.weight"),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1024, 4096], b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), b"{\"hidden_size\": 4096}").unwrap();
}

fn tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let b = std::fs::read(&p).unwrap();
            for (n, v) in SafeTensors::deserialize(&b).unwrap().tensors() {
                out.insert(n, v.data().to_vec());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_kill_resume_pull_kill_resume_verify_gc_apply() {
    let s3 = match std::env::var("SHARDROP_TEST_S3") {
        Ok(u) => u,
        Err(_) => {
            assert!(
                std::env::var("SHARDROP_S3_REQUIRED").is_err(),
                "SHARDROP_TEST_S3 missing"
            );
            return;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let base = format!("{s3}/ckpt-cli-{}-{nanos}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).display().to_string();
    let src = tmp.path().join("src");
    model(&src);
    let op = ok_json(shardrop(&["keygen", "--out", &t("op.key"), "--json"]));
    let _ = op;
    let agg = ok_json(shardrop(&["keygen", "--out", &t("agg.key"), "--json"]));
    let reg = ok_json(shardrop(&[
        "run",
        "init",
        "--run",
        "ckcli",
        "--key",
        &t("op.key"),
        "--store",
        &format!("{base}/op"),
        "--model",
        &format!("{}/model.safetensors", src.display()),
        "--json",
    ]))["registry"]
        .as_str()
        .unwrap()
        .to_string();
    ok_json(shardrop(&[
        "run",
        "add",
        "--registry",
        &reg,
        "--key",
        &t("op.key"),
        "--role",
        "aggregator",
        "--peer",
        agg["peer_id"].as_str().unwrap(),
        "--store",
        &format!("{base}/agg"),
        "--json",
    ]));
    let push_args = [
        "ckpt",
        "push",
        src.to_str().unwrap(),
        "--registry",
        &reg,
        "--key",
        &t("agg.key"),
        "--step",
        "5",
        "--window",
        "4",
        "--shard-size",
        "16MiB",
        "--json",
    ];
    start_and_kill(&push_args, &[], 400);
    let pushed = ok_json(shardrop(&push_args));
    assert_eq!(pushed["shards"], 3);
    assert_eq!(pushed["latest"], true);
    let ls = ok_json(shardrop(&["ckpt", "ls", &reg, "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(
        (
            ls[0]["step"].as_u64(),
            ls[0]["complete"].as_bool(),
            ls[0]["latest"].as_bool()
        ),
        (Some(5), Some(true), Some(true))
    );

    // A folder that is not the run's model is refused (exit 3, model_mismatch, naming the
    // tensor and the shape the run expects), and LATEST stays.
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let small = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &small).unwrap();
    std::fs::write(
        wrong.join("model.safetensors"),
        safetensors::serialize([("layer.0.weight".to_string(), view)], None).unwrap(),
    )
    .unwrap();
    let wrong_s = wrong.display().to_string();
    let refused = shardrop(&[
        "ckpt",
        "push",
        &wrong_s,
        "--registry",
        &reg,
        "--key",
        &t("agg.key"),
        "--step",
        "6",
        "--json",
    ]);
    let doc = json(&refused);
    assert_eq!(refused.status.code(), Some(3), "{doc}");
    assert_eq!(doc["reason"], "model_mismatch", "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("[1024, 4096]"),
        "{doc}"
    );
    let ls = ok_json(shardrop(&["ckpt", "ls", &reg, "--json"]));
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");

    let out = t("out");
    let pull_args = ["ckpt", "pull", "latest", &out, "--registry", &reg, "--json"];
    start_and_kill(&pull_args, &[], 300);
    let pulled = ok_json(shardrop(&pull_args));
    assert_eq!(pulled["window"], 4);
    assert_eq!(tensors(Path::new(&out)), tensors(&src));
    assert!(
        pulled["fetched_bytes"].as_u64().unwrap() + pulled["reused_bytes"].as_u64().unwrap()
            >= 48 << 20
    );
    // A folder with a user's own model files is refused, untouched: a loader would read the
    // stale `model.safetensors` beside the new shards. `--force` moves them aside.
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    for f in [
        "model.safetensors",
        "config.json",
        "model.safetensors.index.json",
    ] {
        std::fs::write(mine.join(f), format!("the user's {f}")).unwrap();
    }
    let mine_s = mine.display().to_string();
    let into_mine = [
        "ckpt",
        "pull",
        "latest",
        &mine_s,
        "--registry",
        &reg,
        "--json",
    ];
    let refused = shardrop(&into_mine);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let doc = json(&refused);
    assert_eq!(doc["class"], "caller", "{doc}");
    let error = doc["error"].as_str().unwrap();
    assert!(
        error.contains("model.safetensors") && error.contains("--force"),
        "{error}"
    );
    let mut listed: Vec<String> = std::fs::read_dir(&mine)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let mut forced = into_mine.to_vec();
    forced.push("--force");
    ok_json(shardrop(&forced));
    assert_eq!(tensors(&mine), tensors(&src));
    assert!(!mine.join("model.safetensors").exists());
    let displaced = mine.join(".shardrop-displaced");
    for f in [
        "model.safetensors",
        "config.json",
        "model.safetensors.index.json",
    ] {
        assert_eq!(
            std::fs::read_to_string(displaced.join(f)).unwrap(),
            format!("the user's {f}")
        );
    }
    assert_eq!(
        std::fs::read(mine.join("config.json")).unwrap(),
        std::fs::read(src.join("config.json")).unwrap()
    );
    // An earlier pull of the run is pulled over: the files of the earlier pull that this one
    // does not write go (here a shard name the checkpoint does not have, recorded as ours).
    let lm_path = mine.join("shardrop-manifest.json");
    let mut lm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lm_path).unwrap()).unwrap();
    let mut old_shard = lm["manifest"]["shards"][0].clone();
    old_shard["file"] = "99999.safetensors".into();
    lm["manifest"]["shards"]
        .as_array_mut()
        .unwrap()
        .push(old_shard);
    std::fs::write(&lm_path, serde_json::to_vec(&lm).unwrap()).unwrap();
    std::fs::write(mine.join("99999.safetensors"), b"an old shard").unwrap();
    ok_json(shardrop(&into_mine));
    assert!(!mine.join("99999.safetensors").exists());
    assert_eq!(tensors(&mine), tensors(&src));

    let verified = ok_json(shardrop(&[
        "ckpt",
        "verify",
        "latest",
        "--registry",
        &reg,
        "--json",
    ]));
    assert_eq!(verified["bad"], serde_json::json!([]));

    // Corrupt one shard in the bucket: verify names it and fails.
    let store = shardrop::store::open(&format!("{base}/agg"), &Default::default()).unwrap();
    let key = store.path("runs/ckcli/ckpt/000000000005/00001.safetensors");
    let mut b = store
        .store
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    b[1 << 20] ^= 1;
    store.store.put(&key, b.into()).await.unwrap();
    let bad = shardrop(&["ckpt", "verify", "latest", "--registry", &reg]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("00001.safetensors"));

    let gc = ok_json(shardrop(&[
        "ckpt",
        "gc",
        &reg,
        "--key",
        &t("agg.key"),
        "--keep",
        "1",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(gc["kept"], serde_json::json!([5]));
    assert_eq!(gc["deleted_objects"], 0);
    // Keeping only step 5 (window 4) would delete windows 0..3: gc says genesis catch-up
    // ends.
    assert_eq!(gc["genesis_catch_up"], false, "{gc}");

    // The pulled folder is a catch-up base: its manifest names the window.
    let applied = ok_json(shardrop(&[
        "apply",
        "--registry",
        &reg,
        "--from",
        &out,
        "--through",
        "4",
        &t("theta.safetensors"),
        "--json",
    ]));
    assert_eq!(applied["from_window"], 4);
    assert_eq!(applied["applied"], 0);
    let theta = tensors(tmp.path())
        .into_iter()
        .filter(|(n, _)| n.starts_with("layer."))
        .count();
    assert_eq!(theta, 3);
}
