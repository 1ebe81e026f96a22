//! Checkpoints on the local S3 server: push an HF-style folder, resume an interrupted push,
//! pull it whole (and resume a killed pull), partial pulls (globs, tensor-parallel slices),
//! full remote verification, hostile manifests and failing stores, retention, and Python
//! `safetensors` loading what was pulled.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::fault::{Calls, FaultAction, FaultRule, Faults};
use object_store::ObjectStoreExt;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use shardrop::checkpoint::admin::{gc, list, verify};
use shardrop::checkpoint::pull::{Located, PullOptions, locate, pull, tp_dim};
use shardrop::checkpoint::push::{PushOptions, push};
use shardrop::checkpoint::{CkptError, HF_INDEX, MANIFEST_CODEC, Manifest};
use shardrop::format::codec::{CodecParams, ModelSpec};
use shardrop::format::envelope::{Compression, EnvelopeBuilder, Kind};
use shardrop::format::layout;
use shardrop::identity::Identity;
use shardrop::round::registry::{Job, Participant, Registry, Role};
use shardrop::store::hooked::Op;
use shardrop::store::{S3Options, Target};

const MIB: u64 = 1 << 20;

/// (name, dtype, shape) of the test model; every dtype numpy can load.
fn tensors_a() -> Vec<(&'static str, Dtype, Vec<usize>)> {
    vec![
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            vec![2048, 2048],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            Dtype::F16,
            vec![2048, 2048],
        ),
        ("model.embed_tokens.weight", Dtype::F32, vec![4096, 2560]),
        ("model.norm.weight", Dtype::F32, vec![2560]),
        ("step", Dtype::I64, vec![1]),
    ]
}

fn tensors_b() -> Vec<(&'static str, Dtype, Vec<usize>)> {
    vec![
        ("lm_head.weight", Dtype::F16, vec![1000, 256]),
        (
            "model.layers.0.mlp.down_proj.weight",
            Dtype::F32,
            vec![512, 1024],
        ),
    ]
}

fn write_st(
    path: &Path,
    spec: &[(&str, Dtype, Vec<usize>)],
    seed: u64,
) -> BTreeMap<String, Vec<u8>> {
    let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = spec
        .iter()
        .enumerate()
        .map(|(i, (n, d, s))| {
            let len = s.iter().product::<usize>() * (d.bitsize() / 8);
            (
                n.to_string(),
                *d,
                s.clone(),
                common::noise(len, seed + i as u64),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    data.into_iter().map(|(n, _, _, b)| (n, b)).collect()
}

/// An HF-style model folder; returns the tensors' bytes by name.
fn model_folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut all = write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        &tensors_a(),
        1,
    );
    all.extend(write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &tensors_b(),
        100,
    ));
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "llama", "hidden_size": 2560}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), br#"{"version": "1.0"}"#).unwrap();
    std::fs::write(dir.join(HF_INDEX), b"{\"stale\": true}").unwrap();
    all
}

fn read_folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(HF_INDEX)).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for (name, file) in index["weight_map"].as_object().unwrap() {
        let bytes = std::fs::read(dir.join(file.as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        out.insert(name.clone(), st.tensor(name).unwrap().data().to_vec());
    }
    out
}

/// Retries on: a store reusing a connection it just closed is normal weather for a client
/// doing many parallel uploads (the failing-store cases below inject their faults above the
/// retry layer).
fn opts() -> S3Options {
    S3Options {
        max_retries: Some(3),
        timeout: Some(std::time::Duration::from_secs(20)),
        ..Default::default()
    }
}

struct World {
    reg: Registry,
    agg: Identity,
    area: Target,
}

async fn world(root: &Target) -> World {
    let operator = Identity::generate();
    let agg = Identity::generate();
    let mut reg = Registry::new(
        "ckpt-test",
        &operator.peer_id(),
        0,
        60,
        5,
        ModelSpec::default(),
        CodecParams::default(),
    );
    let area = root.join("agg");
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &agg.peer_id(),
        area.url(),
    ));
    let url = reg.create(&root.join("op"), &operator).await.unwrap();
    let (reg, _) = Registry::load(&url, &opts(), Some(operator.peer_id()))
        .await
        .unwrap();
    World { reg, agg, area }
}

fn push_opts(step: u64, window: Option<u64>) -> PushOptions {
    PushOptions {
        step,
        window,
        // These tests exercise the checkpoint machinery on made-up folders; the model check
        // is `tools/tests/it/ckpt_cli.rs`'s.
        any_model: true,
        shard_size: 20 * MIB,
        concurrency: std::env::var("SHARDROP_TEST_PUSH_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
    }
}

fn pull_opts() -> PullOptions {
    PullOptions {
        concurrency: 8,
        ..Default::default()
    }
}

fn python_check(out: &Path, src: &Path) -> Option<serde_json::Value> {
    let script = r#"
import json, os, sys
import numpy as np
from safetensors.numpy import load_file
out, src = sys.argv[1], sys.argv[2]
index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
wm = index["weight_map"]
seen = {}
for f in sorted(set(wm.values())):
    for name, arr in load_file(os.path.join(out, f)).items():
        assert wm[name] == f, (name, wm[name], f)
        seen[name] = arr
assert set(seen) == set(wm), "index and files disagree"
ref = {}
for f in os.listdir(src):
    if f.endswith(".safetensors"):
        ref.update(load_file(os.path.join(src, f)))
same = all(np.array_equal(seen[n], ref[n], equal_nan=False) or seen[n].tobytes() == ref[n].tobytes() for n in seen)
print(json.dumps({"tensors": len(seen), "files": len(set(wm.values())), "same": same,
                  "config": open(os.path.join(out, "config.json")).read()}))
"#;
    common::python_json(
        "python safetensors loading the pull",
        script,
        &[out.as_os_str(), src.as_os_str()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_resume_pull_partial_verify_and_python_loads_it() {
    let Some(root) = common::s3("ckpt") else {
        return;
    };
    let s3 = opts();
    let w = world(&root).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let tensors = model_folder(&src);
    let quiet = |_: u64| {};

    // An interrupted push: the shards of a first attempt are there, its manifest is not.
    let first = push(
        Job::new(&w.reg, &w.agg, &s3),
        std::slice::from_ref(&src),
        &push_opts(10, Some(9)),
        &quiet,
    )
    .await
    .unwrap();
    assert!(first.shards >= 3, "{first:?}");
    assert!(first.latest && first.skipped_shards == 0 && !first.already_published);
    for key in [
        layout::ckpt_manifest(&w.reg.run, 10),
        layout::ckpt_latest(&w.reg.run),
    ] {
        w.area.store.delete(&w.area.path(&key)).await.unwrap();
    }
    w.area
        .store
        .delete(
            &w.area
                .path(&layout::ckpt_object(&w.reg.run, 10, "00001.safetensors")),
        )
        .await
        .unwrap();
    let resumed = push(
        Job::new(&w.reg, &w.agg, &s3),
        std::slice::from_ref(&src),
        &push_opts(10, Some(9)),
        &quiet,
    )
    .await
    .unwrap();
    assert_eq!(
        resumed.skipped_shards,
        first.shards - 1,
        "only the missing shard is uploaded"
    );
    assert!(resumed.latest);
    // A rerun of a finished push changes nothing.
    let again = push(
        Job::new(&w.reg, &w.agg, &s3),
        std::slice::from_ref(&src),
        &push_opts(10, Some(9)),
        &quiet,
    )
    .await
    .unwrap();
    assert!(again.already_published && again.skipped_shards == first.shards);

    // Pull `latest` through the registry, whole.
    let loc = locate("latest", Some(&w.reg), None, &s3).await.unwrap();
    assert_eq!(loc.step, 10);
    let out = tmp.path().join("out");
    let p = pull(&loc, &out, &pull_opts(), &quiet).await.unwrap();
    assert_eq!(p.reused_bytes, 0);
    assert_eq!(read_folder(&out), tensors);
    assert!(
        std::fs::read_to_string(out.join("config.json"))
            .unwrap()
            .contains("llama")
    );
    assert!(!out.join(".shardrop-partial").exists());
    if let Some(py) = python_check(&out, &src) {
        assert_eq!(py["tensors"], tensors.len());
        assert_eq!(py["same"], true, "{py}");
        assert!(py["config"].as_str().unwrap().contains("llama"));
    }

    // Resume: one shard damaged, one deleted, and one killed half-way (its first chunk in the
    // partial folder, no final file): only what is missing or wrong is fetched.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("shardrop-manifest.json")).unwrap())
            .unwrap();
    let m: Manifest = serde_json::from_value(m["manifest"].clone()).unwrap();
    let big = m
        .shards
        .iter()
        .position(|s| s.chunks.len() >= 3)
        .expect("a multi-chunk shard");
    let others: Vec<usize> = (0..m.shards.len()).filter(|&k| k != big).collect();
    let (damaged, deleted) = (others[0], others[1]);
    let mut b = std::fs::read(out.join(&m.shards[damaged].file)).unwrap();
    b[100] ^= 0xff;
    std::fs::write(out.join(&m.shards[damaged].file), b).unwrap();
    std::fs::remove_file(out.join(&m.shards[deleted].file)).unwrap();
    let big_file = out.join(&m.shards[big].file);
    let full = std::fs::read(&big_file).unwrap();
    std::fs::remove_file(&big_file).unwrap();
    std::fs::create_dir_all(out.join(".shardrop-partial")).unwrap();
    let mut part = full.clone();
    part[m.chunk_bytes as usize..].fill(0);
    std::fs::write(
        out.join(".shardrop-partial")
            .join(format!("{}.part", m.shards[big].file)),
        part,
    )
    .unwrap();
    let p = pull(&loc, &out, &pull_opts(), &quiet).await.unwrap();
    let want = m.shards[damaged].size + m.shards[deleted].size + m.shards[big].size - m.chunk_bytes;
    assert_eq!(p.fetched_bytes, want, "{p:?}");
    assert_eq!(read_folder(&out), tensors);

    // Partial pulls: globs fetch only those tensors' bytes.
    let sub = tmp.path().join("sub");
    let po = PullOptions {
        tensors: vec!["model.layers.*".into(), "lm_head.weight".into()],
        ..pull_opts()
    };
    let p = pull(&loc, &sub, &po, &quiet).await.unwrap();
    let got = read_folder(&sub);
    let expect: BTreeMap<String, Vec<u8>> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.") || *n == "lm_head.weight")
        .map(|(n, b)| (n.clone(), b.clone()))
        .collect();
    assert_eq!(got, expect);
    // Only those tensors' bytes (and the small files) are fetched.
    let small: u64 = m.files.iter().map(|f| f.size).sum();
    assert_eq!(
        p.fetched_bytes,
        expect.values().map(|b| b.len() as u64).sum::<u64>() + small
    );
    let bad_glob = PullOptions {
        tensors: vec!["nope.*".into()],
        ..pull_opts()
    };
    assert!(
        pull(&loc, &tmp.path().join("none"), &bad_glob, &quiet)
            .await
            .is_err()
    );

    // Tensor parallelism: rank 1 of 2.
    let tp = tmp.path().join("tp");
    let po = PullOptions {
        tensors: vec![
            "model.layers.0.*".into(),
            "model.norm.weight".into(),
            "model.embed_tokens.weight".into(),
        ],
        tp: Some((1, 2)),
        ..pull_opts()
    };
    let p = pull(&loc, &tp, &po, &quiet).await.unwrap();
    // The embedding's half (20 MiB of 40) comes from the two 16 MiB chunks that hold it, not
    // the whole tensor; the small projections are fetched whole and cut.
    let small: u64 = m.files.iter().map(|f| f.size).sum();
    let whole_small = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    .iter()
    .map(|n| tensors[*n].len() as u64)
    .sum::<u64>();
    assert!(
        p.fetched_bytes <= small + whole_small + 2 * m.chunk_bytes,
        "{p:?}"
    );
    assert!(
        p.fetched_bytes < small + whole_small + tensors["model.embed_tokens.weight"].len() as u64
    );
    let got = read_folder(&tp);
    let spec: BTreeMap<&str, (Dtype, Vec<usize>)> = tensors_a()
        .into_iter()
        .chain(tensors_b())
        .map(|(n, d, s)| (n, (d, s)))
        .collect();
    for (name, bytes) in &got {
        let (d, shape) = &spec[name.as_str()];
        let src = &tensors[name];
        let expect: Vec<u8> =
            match tp_dim(name, &shape.iter().map(|&x| x as u64).collect::<Vec<_>>()) {
                None => src.clone(),
                Some(0) => {
                    let row = shape[1] * (d.bitsize() / 8);
                    let half = shape[0] / 2;
                    src[half * row..2 * half * row].to_vec()
                }
                Some(_) => {
                    let row = shape[1] * (d.bitsize() / 8);
                    let half = shape[1] / 2 * (d.bitsize() / 8);
                    src.chunks_exact(row)
                        .flat_map(|r| r[half..2 * half].to_vec())
                        .collect()
                }
            };
        assert_eq!(bytes, &expect, "{name}");
    }
    assert_eq!(
        got.len(),
        5,
        "q, o and down projections, the norm and the embedding"
    );

    // Full remote verification: clean, then two bad shards are both reported.
    assert!(verify(&loc, 4).await.unwrap().bad.is_empty());
    let k0 = w
        .area
        .path(&layout::ckpt_object(&w.reg.run, 10, &m.shards[0].file));
    common::flip_bit(&w.area, &k0, Some(10)).await;
    let k1 = w
        .area
        .path(&layout::ckpt_object(&w.reg.run, 10, &m.shards[1].file));
    w.area.store.delete(&k1).await.unwrap();
    let r = verify(&loc, 4).await.unwrap();
    assert_eq!(r.bad.len(), 2, "{:?}", r.bad);
    assert!(r.bad.iter().any(|b| b.contains(&m.shards[0].file)));
    assert!(r.bad.iter().any(|b| b.contains(&m.shards[1].file)));

    // A pull of the damaged checkpoint names the objects and leaves no final file.
    let broken = tmp.path().join("broken");
    let e = pull(&loc, &broken, &pull_opts(), &quiet).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&m.shards[0].file) && msg.contains(&m.shards[1].file),
        "{msg}"
    );
    assert!(!broken.join(&m.shards[0].file).exists());
    assert!(!broken.join(&m.shards[1].file).exists());
    // A later checkpoint names 10 as its parent; rerunning it after LATEST moved to it
    // (a cron retry, or a kill after the pointer moved) succeeds with the same parent.
    let next = push(
        Job::new(&w.reg, &w.agg, &s3),
        std::slice::from_ref(&src),
        &push_opts(12, Some(11)),
        &quiet,
    )
    .await
    .unwrap();
    assert_eq!(next.parent, Some(10));
    let retried = push(
        Job::new(&w.reg, &w.agg, &s3),
        std::slice::from_ref(&src),
        &push_opts(12, Some(11)),
        &quiet,
    )
    .await
    .unwrap();
    assert!(retried.already_published, "{retried:?}");
    assert_eq!(retried.parent, Some(10));
    common::report(
        "ckpt push rerun after success (a parent, LATEST moved)",
        1,
        1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_failing_stores_links_and_retention() {
    let Some(root) = common::s3("ckpt-bad") else {
        return;
    };
    let s3 = opts();
    let w = world(&root).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_st(&src.join("m.safetensors"), &tensors_b(), 7);
    let quiet = |_: u64| {};
    for (step, window) in [(1, 1), (2, 5), (3, 8)] {
        push(
            Job::new(&w.reg, &w.agg, &s3),
            std::slice::from_ref(&src),
            &push_opts(step, Some(window)),
            &quiet,
        )
        .await
        .unwrap();
    }
    let loc = locate("latest", Some(&w.reg), None, &s3).await.unwrap();
    assert_eq!(loc.step, 3);
    // The URL form needs to know the signer; a stranger's key is refused.
    let url = w
        .area
        .url_of(&w.area.path(&layout::ckpt_manifest(&w.reg.run, 2)));
    assert!(locate(&url, None, None, &s3).await.is_err());
    let by_url = locate(&url, Some(&w.reg), None, &s3).await.unwrap();
    assert_eq!((by_url.step, by_url.run.as_str()), (2, w.reg.run.as_str()));
    let stranger = Located {
        signer: Identity::generate().peer_id(),
        ..by_url.clone()
    };
    let e = pull(&stranger, &tmp.path().join("x"), &pull_opts(), &quiet)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("manifest"), "{e}");

    // A store that fails mid-download: a clear error naming the object, no final file; the
    // rerun completes.
    let faulty = Located {
        target: loc.target.wrap(Arc::new(Faults::new(
            1,
            vec![FaultRule {
                op: Some(Op::Get),
                path_contains: Some(".safetensors".into()),
                calls: Calls::Nth(vec![1]),
                action: FaultAction::Truncate(1000),
            }],
        ))),
        ..loc.clone()
    };
    let out = tmp.path().join("out");
    let e = pull(&faulty, &out, &pull_opts(), &quiet).await.unwrap_err();
    assert!(e.to_string().contains("00000.safetensors"), "{e}");
    assert!(!out.join("00000.safetensors").exists());
    pull(&loc, &out, &pull_opts(), &quiet).await.unwrap();
    assert!(out.join("00000.safetensors").exists());

    // A link in OUT is never written through.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let linked = tmp.path().join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(&victim, linked.join("00000.safetensors")).unwrap();
    assert!(pull(&loc, &linked, &pull_opts(), &quiet).await.is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    // ... nor through a link planted at any other path a pull writes: the partial shard, the
    // resume state, the HF index, the local manifest.
    for planted in [
        ".shardrop-partial/00000.safetensors.part",
        ".shardrop-pull.json",
        shardrop::checkpoint::HF_INDEX,
        shardrop::checkpoint::LOCAL_MANIFEST,
    ] {
        let out = tmp
            .path()
            .join(format!("planted-{}", planted.replace('/', "_")));
        let at = out.join(planted);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &at).unwrap();
        let _ = pull(&loc, &out, &pull_opts(), &quiet).await;
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"keep",
            "written through {planted}"
        );
        for entry in std::fs::read_dir(&out).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.file_type().is_symlink() {
                assert_eq!(
                    entry.file_name().to_string_lossy(),
                    planted,
                    "a link moved to a shard's name"
                );
            }
        }
    }

    // Nor through a hard link at the partial shard's name (O_NOFOLLOW cannot see one).
    let out = tmp.path().join("planted-hardlink");
    let at = out.join(".shardrop-partial/00000.safetensors.part");
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::hard_link(&victim, &at).unwrap();
    let e = pull(&loc, &out, &pull_opts(), &quiet).await.unwrap_err();
    assert!(e.to_string().contains("hard link"), "{e}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"keep",
        "written through a hard link"
    );
    common::report("ckpt pull: hard link at the partial shard's name", 1, 1);

    // A validly signed manifest that names paths outside OUT, or a tensor past its shard.
    let (m, _, _) = shardrop::checkpoint::pull::fetch_manifest(&loc)
        .await
        .unwrap();
    for (step, evil) in [
        (20u64, {
            let mut m = m.clone();
            m.files.push(shardrop::checkpoint::FileEntry {
                file: "../../escape.txt".into(),
                size: 1,
                blake3: "00".into(),
            });
            m
        }),
        (21, {
            let mut m = m.clone();
            m.shards[0].file = "/etc/passwd".into();
            m
        }),
        (22, {
            let mut m = m.clone();
            m.tensors[0].end = m.shards[0].size + 8;
            m
        }),
    ] {
        let mut evil = evil;
        evil.step = step;
        let signed = EnvelopeBuilder::new(Kind::Manifest, &w.reg.run)
            .step(step)
            .window(8)
            .codec(MANIFEST_CODEC, Default::default())
            .section(
                "manifest.json",
                &serde_json::to_vec(&evil).unwrap(),
                Compression::Zstd,
            )
            .unwrap()
            .sign(&w.agg)
            .unwrap();
        shardrop::store::put_create(
            &w.area,
            &w.area.path(&layout::ckpt_manifest(&w.reg.run, step)),
            &signed,
        )
        .await
        .unwrap();
        let l = Located {
            step,
            ..loc.clone()
        };
        let dir = tmp.path().join(format!("evil-{step}"));
        let e = pull(&l, &dir, &pull_opts(), &quiet).await.unwrap_err();
        assert!(matches!(e, CkptError::Rejected { .. }), "{e}");
        assert!(!tmp.path().join("escape.txt").exists());
    }

    // ls: three complete checkpoints, LATEST on 3, the hostile ones reported as bad.
    let infos = list(&w.area, &w.reg.run, &w.agg.peer_id()).await.unwrap();
    let complete: Vec<u64> = infos
        .iter()
        .filter(|i| i.complete)
        .map(|i| i.step)
        .collect();
    assert_eq!(complete, [1, 2, 3]);
    assert!(infos.iter().find(|i| i.step == 3).unwrap().latest);
    assert_eq!(infos.iter().filter(|i| i.problem.is_some()).count(), 3);

    // Retention: keep 2. Per-window objects before window 5 (step 2's) go too.
    let agg = |wi: u64| w.area.path(&layout::agg(&w.reg.run, wi));
    for wi in [3, 4, 5, 6] {
        w.area
            .store
            .put(&agg(wi), b"x".to_vec().into())
            .await
            .unwrap();
    }
    let dry = gc(&w.area, &w.reg.run, &w.agg.peer_id(), 2, true)
        .await
        .unwrap();
    assert!(dry.deleted_objects > 0);
    assert!(
        w.area.store.head(&agg(3)).await.is_ok(),
        "a dry run deletes nothing"
    );
    let r = gc(&w.area, &w.reg.run, &w.agg.peer_id(), 2, false)
        .await
        .unwrap();
    assert_eq!(r.kept, [2, 3]);
    assert!(r.deleted_checkpoints.contains(&1));
    assert_eq!(r.windows_before, Some(5));
    assert!(w.area.store.head(&agg(3)).await.is_err() && w.area.store.head(&agg(4)).await.is_err());
    assert!(w.area.store.head(&agg(5)).await.is_ok() && w.area.store.head(&agg(6)).await.is_ok());
    let after = list(&w.area, &w.reg.run, &w.agg.peer_id()).await.unwrap();
    let complete: Vec<u64> = after
        .iter()
        .filter(|i| i.complete)
        .map(|i| i.step)
        .collect();
    assert_eq!(complete, [2, 3]);
    assert!(
        pull(&loc, &tmp.path().join("after-gc"), &pull_opts(), &quiet)
            .await
            .is_ok()
    );
    let _: PathBuf = out;
}
