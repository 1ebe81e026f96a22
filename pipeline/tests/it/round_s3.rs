//! A full round on the local S3 server: several miners (honest, late, forged, a copier that
//! re-signs another's update as its own, a missing one, one whose bucket is unreachable),
//! the aggregator's ledger, and the aggregate checked against an independent dense mean.

use crate::common;

use crate::common::update;

use std::collections::BTreeMap;

use object_store::ObjectStoreExt;
use shardrop::format::codec::{self, CodecLimits, CodecParams, EfState};
use shardrop::format::envelope::{
    Compression, Expect, Kind, Limits, RemoteEnvelope, read_all_sections,
};
use shardrop::format::layout;
use shardrop::format::tables::read_ledger;
use shardrop::identity::Identity;
use shardrop::round::RoundError;
use shardrop::round::aggregate::{
    AggregateOptions, aggregate_commit, aggregate_part, aggregate_window_opts,
};
use shardrop::round::publish::{Update, clock, codec_header, publish, shard_builder};
use shardrop::round::registry::{Credentials, Job, Participant, Registry, Role};
use shardrop::round::replay::apply_aggregates;
use shardrop::round::window::store_now_ms;
use shardrop::store::{S3Options, Target, put_create};

fn opts() -> S3Options {
    S3Options {
        max_retries: Some(0),
        timeout: Some(std::time::Duration::from_secs(5)),
        ..Default::default()
    }
}

/// Decodes a published shard independently of the aggregator: dense f64 per tensor.
async fn decode_shard(
    t: &Target,
    reg: &Registry,
    w: u64,
    id: &Identity,
) -> BTreeMap<String, Vec<f64>> {
    let path = t.path(&layout::grad(&reg.run, w, &id.peer_id()));
    let env = RemoteEnvelope::open(
        t.store.as_ref(),
        &path,
        "shard",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    let secs = read_all_sections(t.store.as_ref(), &env, &Limits::default())
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for s in secs {
        for tensor in codec::read_section(&s, None, &CodecLimits::default()).unwrap() {
            let (idx, val) = codec::to_sparse(&tensor).unwrap();
            let mut d = vec![0f64; tensor.numel() as usize];
            for (i, v) in idx.iter().zip(val) {
                d[*i as usize] = v as f64;
            }
            out.insert(tensor.name.clone(), d);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_round_on_s3() {
    let Some(root) = common::s3("round") else {
        return;
    };
    let s3 = opts();
    let operator = Identity::generate();
    let aggregator = Identity::generate();
    let [
        honest_a,
        honest_b,
        late,
        forged,
        copier,
        absent,
        unreachable,
    ] = std::array::from_fn(|_| Identity::generate());
    let area = |name: &str| root.join(name);
    let model = codec::model_of(&update(0.0)).unwrap();
    let reg = Registry::new(
        "round-test",
        &operator.peer_id(),
        store_now_ms(&area("op"), "clock").await.unwrap(),
        3,
        2,
        model,
        CodecParams {
            chunk: 256,
            k: 8,
            ..CodecParams::default()
        },
    );
    let reg_url = reg.create(&area("op"), &operator).await.unwrap();
    let part = |role, id: &Identity, name: &str| Participant {
        role,
        peer: id.peer_id().to_string(),
        store: area(name).url(),
        credentials: Credentials::Ambient,
    };
    let (mut r, etag) = Registry::load(&reg_url, &s3, Some(operator.peer_id()))
        .await
        .unwrap();
    r.participants
        .push(part(Role::Aggregator, &aggregator, "agg"));
    for (id, name) in [
        (&honest_a, "a"),
        (&honest_b, "b"),
        (&late, "late"),
        (&forged, "forged"),
        (&copier, "copier"),
        (&absent, "absent"),
    ] {
        r.participants.push(part(Role::Miner, id, name));
    }
    let mut dead = part(Role::Miner, &unreachable, "dead");
    dead.credentials = Credentials::EnvPrefix {
        prefix: "SHARDROP_DEAD_".into(),
    };
    r.participants.push(dead);
    // `tools/test` points this prefix at a closed port (tests never change the environment).
    assert!(
        std::env::var("SHARDROP_DEAD_AWS_ENDPOINT_URL").is_ok(),
        "run under tools/test: SHARDROP_DEAD_AWS_ENDPOINT_URL names an unreachable endpoint"
    );
    r.update(&reg_url, &s3, etag.clone(), &operator)
        .await
        .unwrap();
    // A second edit from the same (now stale) version loses the compare-and-swap.
    let mut stale = r.clone();
    assert!(stale.update(&reg_url, &s3, etag, &operator).await.is_err());
    // Someone else's key cannot pass for the operator.
    assert!(
        Registry::load(&reg_url, &s3, Some(aggregator.peer_id()))
            .await
            .is_err()
    );
    let (reg, _) = Registry::load(&reg_url, &s3, Some(operator.peer_id()))
        .await
        .unwrap();
    assert_eq!(reg.participants.len(), 8);

    // Window 0: honest miners publish through the real path.
    let w = 0;
    for (id, seed) in [(&honest_a, 1.0), (&honest_b, 2.0)] {
        let mut st = EfState::default();
        let p = publish(
            Job::new(&reg, id, &s3),
            Some(w),
            Update::file(&update(seed), &mut st),
        )
        .await
        .unwrap();
        assert!(!p.already_published);
        assert!(p.ratio > 10.0);
        // A retry after a "lost response" re-encodes from the old state: accepted as done.
        let mut again = EfState::default();
        assert!(
            publish(
                Job::new(&reg, id, &s3),
                Some(w),
                Update::file(&update(seed), &mut again)
            )
            .await
            .unwrap()
            .already_published
        );
    }
    // The forger writes into its own area a shard signed by someone else's key.
    let sign_sections = |id: &Identity, sections: &[(String, Vec<u8>)]| {
        shard_builder(&reg, &reg.run, w, sections)
            .unwrap()
            .sign(id)
            .unwrap()
    };
    let enc = codec::encode_update(
        &update(3.0),
        &mut EfState::default(),
        &codec::EncodeOptions {
            params: reg.codec,
            beta: reg.beta,
            section_bytes: 1 << 20,
        },
    )
    .unwrap();
    let forged_area = area("forged");
    put_create(
        &forged_area,
        &forged_area.path(&layout::grad(&reg.run, w, &forged.peer_id())),
        &sign_sections(&honest_a, &enc.sections),
    )
    .await
    .unwrap();
    // The copier takes A's published sections and re-signs them as its own, later.
    let a_area = area("a");
    let a_env = RemoteEnvelope::open(
        a_area.store.as_ref(),
        &a_area.path(&layout::grad(&reg.run, w, &honest_a.peer_id())),
        "a",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    let a_secs = read_all_sections(a_area.store.as_ref(), &a_env, &Limits::default())
        .await
        .unwrap();
    let named: Vec<(String, Vec<u8>)> = a_env
        .sections()
        .iter()
        .map(|s| s.name.clone())
        .zip(a_secs)
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let copier_area = area("copier");
    put_create(
        &copier_area,
        &copier_area.path(&layout::grad(&reg.run, w, &copier.peer_id())),
        &sign_sections(&copier, &named),
    )
    .await
    .unwrap();

    // After the window closes: publishing is refused, and a shard put anyway is late.
    let clk = clock(&reg);
    loop {
        let now = store_now_ms(&area("late"), "clock").await.unwrap();
        if now >= clk.closes(w) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(clk.closes(w) - now + 20)).await;
    }
    let refused = publish(
        Job::new(&reg, &late, &s3),
        Some(w),
        Update::file(&update(4.0), &mut EfState::default()),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(RoundError::Refused { reason: shardrop::round::RoundReason::WindowClosed, ref detail }) if detail.contains("closed")
        ),
        "{refused:?}"
    );
    let enc = codec::encode_update(
        &update(4.0),
        &mut EfState::default(),
        &codec::EncodeOptions {
            params: reg.codec,
            beta: reg.beta,
            section_bytes: 1 << 20,
        },
    )
    .unwrap();
    let late_area = area("late");
    put_create(
        &late_area,
        &late_area.path(&layout::grad(&reg.run, w, &late.peer_id())),
        &sign_sections(&late, &enc.sections),
    )
    .await
    .unwrap();

    let r1 = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    assert_eq!(
        (r1.accepted, r1.rejected, r1.missing, r1.errors),
        (2, 3, 1, 1),
        "{r1:?}"
    );
    let agg_area = area("agg");
    let ledger = read_ledger(
        agg_area
            .store
            .get(&agg_area.path(&layout::ledger(&reg.run, w)))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let reason = |id: &Identity| {
        ledger
            .iter()
            .find(|r| r.peer == id.peer_id().to_string())
            .map(|r| (r.verdict.to_string(), r.reason.clone()))
            .unwrap()
    };
    assert_eq!(reason(&honest_a), ("accepted".into(), String::new()));
    assert_eq!(reason(&honest_b), ("accepted".into(), String::new()));
    assert_eq!(reason(&late), ("rejected".into(), "late".into()));
    assert_eq!(
        reason(&forged),
        ("rejected".into(), "unexpected_signer".into())
    );
    assert_eq!(reason(&copier), ("rejected".into(), "duplicate".into()));
    assert_eq!(reason(&absent), ("missing".into(), "missing".into()));
    assert_eq!(reason(&unreachable), ("error".into(), "store_error".into()));
    assert_eq!(ledger.len(), 7, "every registered miner has a row");
    assert!(
        ledger
            .iter()
            .filter(|r| r.verdict == "accepted")
            .all(|r| (r.weight - 0.5).abs() < 1e-9)
    );

    // The aggregate equals the mean of the two accepted shards, decoded independently.
    let da = decode_shard(&a_area, &reg, w, &honest_a).await;
    let db = decode_shard(&area("b"), &reg, w, &honest_b).await;
    let mut theta: BTreeMap<String, Vec<f32>> = reg
        .model
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                vec![0f32; t.shape.iter().product::<u64>() as usize],
            )
        })
        .collect();
    // Catch-up of window 0 onto θ = 0 with outer_lr 1 gives θ = −aggregate.
    assert_eq!(
        apply_aggregates(&reg, &s3, &mut theta, 0, 0).await.unwrap(),
        1
    );
    for (name, got) in &theta {
        for (i, g) in got.iter().enumerate() {
            let want = (da[name][i] + db[name][i]) / 2.0;
            assert!(
                (-*g as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name}[{i}]: {g} vs {want}"
            );
        }
    }
    // A rerun (as after a crash) gives the same bytes.
    let before = agg_area
        .store
        .get(&agg_area.path(&layout::agg(&reg.run, w)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r2 = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    assert!(r2.already_published);
    // The split merge (`schemas/round.md`): K workers each check and merge only their tensors, and the
    // commit publishes the same aggregate, byte for byte (its create-only put finds the
    // single-process object identical), and the same ledger.
    let ledger_path = agg_area.path(&layout::ledger(&reg.run, w));
    let ledger_before = agg_area
        .store
        .get(&ledger_path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let cpu = AggregateOptions::default().with_concurrency(4);
    for k in [2usize, 3] {
        let workers =
            (0..k).map(|i| aggregate_part(Job::new(&reg, &aggregator, &s3), w, i, k, &cpu));
        let (parts, commit) = tokio::join!(
            futures::future::join_all(workers),
            aggregate_commit(Job::new(&reg, &aggregator, &s3), w, k, &cpu)
        );
        let merged: usize = parts.into_iter().map(|p| p.unwrap()).sum();
        assert_eq!(merged, reg.model.tensors.len());
        let c = commit.unwrap();
        assert!(
            c.already_published,
            "K={k}: the committed aggregate differs from the single-process one"
        );
        assert_eq!((c.accepted, c.rejected, c.missing, c.errors), (2, 3, 1, 1));
        let after = read_ledger(
            agg_area
                .store
                .get(&ledger_path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        let before = read_ledger(ledger_before.clone()).unwrap();
        assert_eq!(after.len(), before.len());
        for (a, b) in after.iter().zip(&before) {
            assert_eq!(a, b, "K={k}: ledger row differs");
        }
    }
    assert_eq!(
        agg_area
            .store
            .get(&agg_area.path(&layout::agg(&reg.run, w)))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        before
    );

    // Window 1 is empty: the aggregate says so; catch-up over it changes nothing, and a
    // missing aggregate (window 2) stops catch-up naming the window.
    let r = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        1,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    assert_eq!(r.accepted, 0);
    let snapshot = theta.clone();
    assert_eq!(
        apply_aggregates(&reg, &s3, &mut theta, 1, 1).await.unwrap(),
        1
    );
    assert_eq!(theta, snapshot);
    let e = apply_aggregates(&reg, &s3, &mut theta, 1, 2)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("window 2"), "{e}");
}

/// Each kind of hostile shard ends in the ledger with its own reason, and the honest shard
/// is still merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_shards_get_ledger_reasons() {
    let Some(root) = common::s3("hostile-round") else {
        return;
    };
    let s3 = opts();
    let operator = Identity::generate();
    let aggregator = Identity::generate();
    let names = [
        "honest",
        "replay",
        "other_run",
        "truncated",
        "bomb",
        "nan",
        "out_of_range",
        "wrong_shape",
    ];
    let ids: Vec<Identity> = names.iter().map(|_| Identity::generate()).collect();
    let area = |name: &str| root.join(name);
    let mut reg = Registry::new(
        "hostile",
        &operator.peer_id(),
        store_now_ms(&area("op"), "clock").await.unwrap(),
        3,
        2,
        codec::model_of(&update(0.0)).unwrap(),
        CodecParams {
            chunk: 256,
            k: 8,
            indices: codec::IndexEncoding::Packed,
            ..CodecParams::default()
        },
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        area("agg").url(),
    ));
    for (id, n) in ids.iter().zip(names) {
        reg.participants
            .push(Participant::new(Role::Miner, &id.peer_id(), area(n).url()));
    }
    reg.create(&area("op"), &operator).await.unwrap();
    let w = 0;
    let opts_enc = codec::EncodeOptions {
        params: reg.codec,
        beta: reg.beta,
        section_bytes: 1 << 20,
    };
    let encoded = |seed: f32| {
        codec::encode_update(&update(seed), &mut EfState::default(), &opts_enc)
            .unwrap()
            .sections
    };
    let signed = |id: &Identity, run: &str, window: u64, sections: &[(String, Vec<u8>)]| {
        shard_builder(&reg, run, window, sections)
            .unwrap()
            .sign(id)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    // Re-encodes a section after `f` edits its first tensor.
    let edited = |seed: f32, f: &dyn Fn(&mut codec::EncodedTensor)| {
        let mut secs = encoded(seed);
        let mut ts = codec::read_section(&secs[0].1, None, &CodecLimits::default()).unwrap();
        f(&mut ts[0]);
        secs[0].1 = codec::write_section(&ts).unwrap();
        secs
    };
    let put = |i: usize, bytes: Vec<u8>| {
        let t = area(names[i]);
        let path = t.path(&layout::grad(&reg.run, w, &ids[i].peer_id()));
        async move {
            object_store::ObjectStoreExt::put(t.store.as_ref(), &path, bytes.into())
                .await
                .unwrap()
        }
    };
    publish(
        Job::new(&reg, &ids[0], &s3),
        Some(w),
        Update::file(&update(1.0), &mut EfState::default()),
    )
    .await
    .unwrap();
    // A shard signed for another window, replayed under this window's key.
    put(1, signed(&ids[1], &reg.run, 7, &encoded(2.0))).await;
    put(2, signed(&ids[2], "another-run", w, &encoded(3.0))).await;
    let whole = signed(&ids[3], &reg.run, w, &encoded(4.0));
    put(3, whole[..whole.len() - 100].to_vec()).await;
    // A bomb: a zstd section that inflates far past the raw length its header declares.
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 19).unwrap();
    let h = shardrop::format::envelope::Header {
        body_len: bomb.len() as u64,
        clock_ms: 0,
        codec: codec::SECTION_CODEC.into(),
        codec_params: codec_header(&reg),
        kind: "grad".into(),
        meta: Default::default(),
        raw_len: 1000,
        run: reg.run.clone(),
        sections: vec![shardrop::format::envelope::SectionEntry {
            compression: Compression::Zstd,
            hash: blake3::hash(&bomb).to_hex().to_string(),
            len: bomb.len() as u64,
            name: "t00000-00001".into(),
            offset: 0,
            raw_len: 1000,
        }],
        signer: ids[4].peer_id().to_string(),
        step: None,
        window: Some(w),
    };
    put(
        4,
        shardrop::format::envelope::assemble_raw(
            Kind::Grad.code(),
            &h.to_canonical(),
            &bomb,
            &ids[4],
        ),
    )
    .await;
    put(
        5,
        signed(
            &ids[5],
            &reg.run,
            w,
            &edited(5.0, &|t| t.scales[0] = 0x7FC0),
        ),
    )
    .await;
    put(
        6,
        signed(
            &ids[6],
            &reg.run,
            w,
            &edited(6.0, &|t| {
                // The last chunk of "b" (100 elements, one chunk) gets index 200 >= 100.
                let mut block = vec![0u8; t.idx.len()];
                let idx: Vec<u32> = (0..7).chain([200]).collect();
                let mut bits = 0u64;
                let mut nbits = 0;
                let mut pos = 0;
                for i in idx {
                    bits |= (i as u64) << nbits;
                    nbits += 8;
                    while nbits >= 8 {
                        block[pos] = bits as u8;
                        bits >>= 8;
                        nbits -= 8;
                        pos += 1;
                    }
                }
                t.idx = block;
            }),
        ),
    )
    .await;
    put(
        7,
        signed(
            &ids[7],
            &reg.run,
            w,
            &edited(7.0, &|t| t.shape = vec![50, 2]),
        ),
    )
    .await;

    let r = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    let agg_area = area("agg");
    let ledger = read_ledger(
        agg_area
            .store
            .get(&agg_area.path(&layout::ledger(&reg.run, w)))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let reason = |i: usize| {
        ledger
            .iter()
            .find(|row| row.peer == ids[i].peer_id().to_string())
            .map(|row| row.reason.clone())
            .unwrap()
    };
    let want = [
        "",
        "wrong_window",
        "wrong_run",
        "truncated",
        "section_size",
        "non_finite",
        "index_out_of_range",
        "shape_mismatch",
    ];
    for (i, expected) in want.iter().enumerate() {
        assert_eq!(reason(i), *expected, "{}", names[i]);
    }
    assert_eq!(r.accepted, 1);
    assert_eq!(r.rejected, 7);
}
