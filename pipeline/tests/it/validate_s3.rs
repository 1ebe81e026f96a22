//! The validator on the local S3 server: honest miners training the reference task, a
//! copier, a miner sending noise and an absent miner, over three windows. The copier and the
//! noise miner must end with zero weight and the honest miners with all of it; an evaluator
//! that fails for one miner must not cost that miner anything; a rerun must give the same
//! table; the tables must be readable by pyarrow.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use object_store::ObjectStoreExt;
use shardrop::format::codec::EfState;
use shardrop::format::envelope::{Expect, Limits, RemoteEnvelope, read_all_sections};
use shardrop::format::layout;
use shardrop::format::tables::{ScoreRow, scores_schema};
use shardrop::identity::Identity;
use shardrop::refmodel::ReferenceEvaluator;
use shardrop::refmodel::{LinearTask, TENSOR};
use shardrop::round::aggregate::{AggregateOptions, aggregate_window_opts};
use shardrop::round::evaluate::{CommandEvaluator, Evaluator};
use shardrop::round::publish::{Update, publish, shard_builder};
use shardrop::round::registry::{Job, Participant, Registry, Role};
use shardrop::round::replay::apply_aggregates;
use shardrop::round::score::{
    OnEvalError, ValidateOptions, read_scored_window, scored_windows, validate_window,
};
use shardrop::round::window::store_now_ms;
use shardrop::store::{S3Options, put_create};

fn opts() -> S3Options {
    S3Options {
        max_retries: Some(0),
        timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    }
}

fn row<'a>(rows: &'a [ScoreRow], id: &Identity) -> &'a ScoreRow {
    let p = id.peer_id().to_string();
    rows.iter().find(|r| r.peer == p).expect("a row per miner")
}

/// Reads Parquet files with pyarrow; returns its JSON report, or `None` when no Python with
/// pyarrow is available and the run does not require one.
fn pyarrow_read(files: &[std::path::PathBuf]) -> Option<serde_json::Value> {
    let script = r#"
import json, sys
import pyarrow.parquet as pq
out = []
for f in sys.argv[1:]:
    t = pq.read_table(f)
    out.append({"columns": t.schema.names, "types": [str(x) for x in t.schema.types],
                "rows": t.num_rows, "data": t.to_pylist()})
print(json.dumps(out, default=str))
"#;
    common::python_json(
        "pyarrow reading the tables",
        script,
        &files.iter().map(|f| f.as_os_str()).collect::<Vec<_>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_scores_honest_copier_noise_and_absent_miners() {
    let Some(root) = common::s3("validate") else {
        return;
    };
    let s3 = opts();
    let task = LinearTask::standard();
    let [operator, aggregator, validator, validator_b] =
        std::array::from_fn(|_| Identity::generate());
    let honest: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    let [copier, noise, absent, unreachable] = std::array::from_fn(|_| Identity::generate());
    let area = |name: &str| root.join(name);
    let mut reg = Registry::new(
        "validate-test",
        &operator.peer_id(),
        store_now_ms(&area("op"), "clock").await.unwrap(),
        6,
        2,
        task.model_spec(),
        shardrop::refmodel::codec_params(),
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        area("agg").url(),
    ));
    reg.participants.push(Participant::new(
        Role::Validator,
        &validator.peer_id(),
        area("val").url(),
    ));
    reg.participants.push(Participant::new(
        Role::Validator,
        &validator_b.peer_id(),
        area("val-b").url(),
    ));
    let miners: Vec<(&Identity, String)> = honest
        .iter()
        .enumerate()
        .map(|(i, id)| (id, format!("h{i}")))
        .chain([
            (&copier, "copier".to_string()),
            (&noise, "noise".to_string()),
            (&absent, "absent".to_string()),
        ])
        .collect();
    for (id, name) in &miners {
        reg.participants.push(Participant::new(
            Role::Miner,
            &id.peer_id(),
            area(name).url(),
        ));
    }
    // A miner whose bucket cannot be reached: a store failure, recorded, not fatal.
    let mut dead = Participant::new(Role::Miner, &unreachable.peer_id(), area("dead").url());
    dead.credentials = shardrop::round::registry::Credentials::EnvPrefix {
        prefix: "SHARDROP_DEAD_".into(),
    };
    reg.participants.push(dead);
    // `tools/test` points this prefix at a closed port (tests never change the environment).
    assert!(
        std::env::var("SHARDROP_DEAD_AWS_ENDPOINT_URL").is_ok(),
        "run under tools/test: SHARDROP_DEAD_AWS_ENDPOINT_URL names an unreachable endpoint"
    );
    let reg_url = reg.create(&area("op"), &operator).await.unwrap();
    let (reg, _) = Registry::load(&reg_url, &s3, Some(operator.peer_id()))
        .await
        .unwrap();

    let mut reference = ReferenceEvaluator::new(task.clone(), Duration::from_secs(5));
    // Validator B's evaluator fails for the second honest miner in the last window only (a
    // crash in the user's script), and answers for everyone else.
    let failing_peer = honest[1].peer_id().to_string();
    let cmd = format!(
        r#"f() {{ [ -s "$2" ] || exit 9; case "$4:$6" in 2:{failing_peer}) echo boom >&2; exit 3;; esac; echo '{{"loss_before": 2.0, "loss_after": 1.5}}'; }}; f"#
    );
    let mut command = CommandEvaluator::new(&cmd, Duration::from_secs(20)).unwrap();
    let vopts = ValidateOptions::default();
    let mut theta = task.init();
    let mut states = vec![EfState::default(); honest.len() + 1];
    let mut last = None;
    let mut last_b = None;
    let mut prev_b = None;
    for w in 0..3u64 {
        let mut honest_std = 0f64;
        let mut updates = Vec::new();
        for i in 0..honest.len() {
            let g = task.pseudo_gradient(&theta, i as u64, w, 20);
            honest_std =
                (g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
            updates.push(task.to_safetensors(&g).unwrap());
        }
        // Miners publish at once, as separate machines do (each waits a second between its
        // commit and its shard).
        let (reg_r, s3_r) = (&reg, &s3);
        futures::future::try_join_all(
            honest
                .iter()
                .zip(states.iter_mut())
                .zip(&updates)
                .map(|((id, st), u)| {
                    publish(Job::new(reg_r, id, s3_r), Some(w), Update::file(u, st))
                }),
        )
        .await
        .unwrap();
        // The noise miner: a valid, well-formed update that points nowhere.
        let mut x = 0x1234_5678_9abc_def1u64 ^ w;
        let junk: Vec<f32> = (0..theta.len())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0 * honest_std as f32 * 3.5
            })
            .collect();
        let n = states.len() - 1;
        publish(
            Job::new(&reg, &noise, &s3),
            Some(w),
            Update::file(&task.to_safetensors(&junk).unwrap(), &mut states[n]),
        )
        .await
        .unwrap();
        // The copier re-signs honest miner 0's published sections as its own, later.
        let h0 = area("h0");
        let env = RemoteEnvelope::open(
            h0.store.as_ref(),
            &h0.path(&layout::grad(&reg.run, w, &honest[0].peer_id())),
            "h0",
            &Limits::default(),
            &Expect::default(),
        )
        .await
        .unwrap();
        let secs = read_all_sections(h0.store.as_ref(), &env, &Limits::default())
            .await
            .unwrap();
        let named: Vec<(String, Vec<u8>)> = env
            .sections()
            .iter()
            .map(|e| e.name.clone())
            .zip(secs)
            .collect();
        let signed = shard_builder(&reg, &reg.run, w, &named)
            .unwrap()
            .sign(&copier)
            .unwrap();
        let c = area("copier");
        put_create(
            &c,
            &c.path(&layout::grad(&reg.run, w, &copier.peer_id())),
            &signed,
        )
        .await
        .unwrap();

        aggregate_window_opts(
            Job::new(&reg, &aggregator, &s3),
            w,
            &AggregateOptions::default().with_concurrency(8),
        )
        .await
        .unwrap();
        let v = validate_window(
            Job::new(&reg, &validator, &s3),
            w,
            Some(&mut reference as &mut dyn Evaluator),
            &vopts,
        )
        .await
        .unwrap();
        // Window 2's evaluator fails for one miner: by default nothing is published
        // (`eval_failed`, naming it), so the validator's failure costs no miner anything
        // and a rerun may publish; then it publishes with that miner's standing carried.
        if w == 2 {
            let err = validate_window(
                Job::new(&reg, &validator_b, &s3),
                w,
                Some(&mut command as &mut dyn Evaluator),
                &vopts,
            )
            .await
            .unwrap_err();
            let text = err.to_string();
            assert_eq!(
                shardrop::error::Classified::reason(&err),
                Some("eval_failed"),
                "{text}"
            );
            assert!(
                text.contains(&honest[1].peer_id().to_string()) && text.contains("boom"),
                "{text}"
            );
            let entry = reg
                .participant(&validator_b.peer_id(), Role::Validator)
                .unwrap();
            assert_eq!(
                scored_windows(&reg, entry, &s3).await.unwrap(),
                [0, 1],
                "a refused window stores nothing"
            );
        }
        let carry = ValidateOptions {
            on_eval_error: OnEvalError::Carry,
            ..ValidateOptions::default()
        };
        let vb = validate_window(
            Job::new(&reg, &validator_b, &s3),
            w,
            Some(&mut command as &mut dyn Evaluator),
            &carry,
        )
        .await
        .unwrap();
        let mut t: BTreeMap<String, Vec<f32>> = [(TENSOR.to_string(), theta.clone())].into();
        apply_aggregates(&reg, &s3, &mut t, w, w).await.unwrap();
        theta = t.remove(TENSOR).unwrap();
        // Every window on its own already separates them.
        let rows = &v.rows;
        for id in &honest {
            let r = row(rows, id);
            assert_eq!((r.verdict.as_str(), r.copier), ("accepted", false), "{r:?}");
            assert!(r.usefulness.unwrap() > 0.0, "{r:?}");
            assert!(r.weight > 0.0, "{r:?}");
            assert!(r.secs_before_deadline.unwrap() > 0.0);
        }
        let c = row(rows, &copier);
        assert!(c.copier && c.weight == 0.0, "{c:?}");
        assert_eq!(c.reason, "duplicate");
        assert_eq!(
            c.nearest.as_deref(),
            Some(&*honest[0].peer_id().to_string())
        );
        let nz = row(rows, &noise);
        assert_eq!(nz.verdict, "accepted", "the format is valid: {nz:?}");
        assert!(nz.usefulness.unwrap() < 0.0, "{nz:?}");
        assert_eq!((nz.score, nz.weight), (Some(0.0), 0.0), "{nz:?}");
        assert!(nz.agreement.unwrap() < row(rows, &honest[2]).agreement.unwrap());
        let d = row(rows, &unreachable);
        assert_eq!(
            (d.verdict.as_str(), d.reason.as_str()),
            ("error", "store_error")
        );
        assert_eq!((d.score, d.weight), (Some(0.0), 0.0));
        let a = row(rows, &absent);
        assert!(
            !a.present && a.verdict == "missing" && a.weight == 0.0,
            "{a:?}"
        );
        let total: f64 = rows.iter().map(|r| r.weight).sum();
        assert!((total - 1.0).abs() < 1e-9, "weights sum to {total}");
        last = Some(v);
        prev_b = last_b.replace(vb);
    }
    let v = last.unwrap();
    let vb = last_b.unwrap();
    let prev = row(&prev_b.unwrap().rows, &honest[1]).clone();

    // The failing evaluator, carried: recorded, no score, the rating and the weight exactly
    // as they were; the others share the rest.
    let f = row(&vb.rows, &honest[1]);
    assert!(f.eval_error.as_deref().unwrap().contains("boom"), "{f:?}");
    assert_eq!(
        (f.score, f.rating, f.weight),
        (None, prev.rating, prev.weight),
        "{f:?}"
    );
    assert!(prev.rating > 0.0 && f.weight > 0.0, "{f:?}");
    let total_b: f64 = vb.rows.iter().map(|r| r.weight).sum();
    assert!((total_b - 1.0).abs() < 1e-9, "weights sum to {total_b}");
    let ok = row(&vb.rows, &honest[0]);
    assert!(ok.eval_error.is_none() && ok.score == Some(1.0), "{ok:?}");
    assert!(ok.rating > 0.5 && ok.weight > 0.0, "{ok:?}");

    // A rerun of the last window gives the same table and is accepted as already there.
    let again = validate_window(
        Job::new(&reg, &validator, &s3),
        2,
        Some(
            &mut ReferenceEvaluator::new(task.clone(), Duration::from_secs(5))
                as &mut dyn Evaluator,
        ),
        &vopts,
    )
    .await
    .unwrap();
    assert!(again.already_published);
    assert_eq!(again.rows, v.rows);
    // A different judgement of a scored window is refused, not overwritten.
    let err = validate_window(Job::new(&reg, &validator, &s3), 2, None, &vopts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already scored"), "{err}");

    // Readers verify the signed weights against the table.
    let val_entry = reg
        .participant(&validator.peer_id(), Role::Validator)
        .unwrap();
    assert_eq!(
        scored_windows(&reg, val_entry, &s3).await.unwrap(),
        [0, 1, 2]
    );
    let (rows, body) = read_scored_window(&reg, val_entry, &s3, 2).await.unwrap();
    assert_eq!(rows, v.rows);
    assert_eq!(
        body["weights"].as_array().unwrap().len(),
        rows.len(),
        "{body}"
    );
    assert_eq!(
        rows.len(),
        miners.len() + 1,
        "{:?}",
        rows.iter()
            .map(|r| (&r.peer, &r.verdict))
            .collect::<Vec<_>>()
    );
    // A tampered table no longer matches the signed hash.
    let val = area("val");
    let path = val.path(&layout::scores(&reg.run, 1));
    common::flip_bit(&val, &path, None).await;
    let err = read_scored_window(&reg, val_entry, &s3, 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("blake3"), "{err}");

    // pyarrow reads the score table and the ledger with the documented schema.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (store, key, name) in [
        (area("val"), layout::scores(&reg.run, 2), "scores.parquet"),
        (area("agg"), layout::ledger(&reg.run, 2), "ledger.parquet"),
    ] {
        let b = store
            .store
            .get(&store.path(&key))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let f = dir.path().join(name);
        std::fs::write(&f, &b).unwrap();
        files.push(f);
    }
    if let Some(report) = pyarrow_read(&files) {
        let names: Vec<String> = scores_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(report[0]["columns"], serde_json::json!(names));
        assert_eq!(report[0]["rows"], miners.len() + 1);
        let py_total: f64 = report[0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["weight"].as_f64().unwrap())
            .sum();
        assert!((py_total - 1.0).abs() < 1e-9);
        assert_eq!(report[1]["rows"], miners.len() + 1);
        assert!(
            report[1]["columns"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("verdict"))
        );
    }
}
