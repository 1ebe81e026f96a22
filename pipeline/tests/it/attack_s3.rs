//! Holding under attack (issue 14) on the local S3 servers: decompression bombs refused on
//! the header, the copy rule on a store with 1-second timestamps (moto: a same-second
//! copier with a ground lower peer id, a griefer re-signing the victim's sections over a
//! damaged body), idempotent publish after a kill at each step, and registry reads that
//! never report tampering while the registry is being replaced.

use crate::common;

use crate::common::{update, wait_closed};

use object_store::ObjectStoreExt;
use shardrop::format::codec::{self, CodecParams, EfState};
use shardrop::format::envelope::{
    EnvelopeBuilder, Expect, Kind, Limits, RemoteEnvelope, read_all_sections,
};
use shardrop::format::layout;
use shardrop::identity::Identity;
use shardrop::round::RoundError;
use shardrop::round::aggregate::{AggregateOptions, aggregate_window_opts};
use shardrop::round::publish::{
    COMMIT_CODEC, COMMITMENT_META, SALT_META, Update, commitment, content_hash, publish,
    shard_builder,
};
use shardrop::round::registry::{Job, Participant, Registry, Role};
use shardrop::round::window::store_now_ms;
use shardrop::store::{S3Options, Target, put_create};

fn s3_opts() -> S3Options {
    S3Options {
        max_retries: Some(1),
        timeout: Some(std::time::Duration::from_secs(10)),
        ..Default::default()
    }
}

/// A run in `root` whose miners are `miners` (name, key), each in its own area.
async fn new_run(
    root: &Target,
    s3: &S3Options,
    run: &str,
    window_secs: u64,
    grace_secs: u64,
    aggregator: &Identity,
    miners: &[(&str, &Identity)],
) -> Registry {
    let operator = Identity::generate();
    let now = store_now_ms(&root.join("op"), "clock").await.unwrap();
    let mut reg = Registry::new(
        run,
        &operator.peer_id(),
        now,
        window_secs,
        grace_secs,
        codec::model_of(&update(0.0)).unwrap(),
        CodecParams {
            chunk: 256,
            k: 8,
            ..CodecParams::default()
        },
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        root.join("agg").url(),
    ));
    for (name, id) in miners {
        reg.participants.push(Participant::new(
            Role::Miner,
            &id.peer_id(),
            root.join(name).url(),
        ));
    }
    let url = reg.create(&root.join("op"), &operator).await.unwrap();
    Registry::load(&url, s3, Some(operator.peer_id()))
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bomb_is_refused_on_its_header() {
    let Some(root) = common::s3("bomb") else {
        return;
    };
    let s3 = s3_opts();
    let aggregator = Identity::generate();
    let (honest, bomber, sly) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let reg = new_run(
        &root,
        &s3,
        "bomb",
        4,
        2,
        &aggregator,
        &[("honest", &honest), ("bomber", &bomber), ("sly", &sly)],
    )
    .await;
    let w = 0;
    publish(
        Job::new(&reg, &honest, &s3),
        Some(w),
        Update::file(&update(1.0), &mut EfState::default()),
    )
    .await
    .unwrap();
    // 64 MiB of zeros, honestly declared: a few KB stored, 64 MiB claimed for two small
    // tensors whose encoding with the run's codec takes a few KB.
    let bomb = shard_builder(
        &reg,
        &reg.run,
        w,
        &[("t00000-00001".into(), vec![0u8; 64 << 20])],
    )
    .unwrap()
    .sign(&bomber)
    .unwrap();
    assert!(bomb.len() < 1 << 20);
    let area = root.join("bomber");
    put_create(
        &area,
        &area.path(&layout::grad(&reg.run, w, &bomber.peer_id())),
        &bomb,
    )
    .await
    .unwrap();
    // A subtler one: under the whole model's bound, but claiming for the small tensor alone
    // more than its encoding can take.
    let whole = codec::section_raw_bound(&reg.model.tensors, &reg.codec);
    let one = codec::section_raw_bound(&reg.model.tensors[1..2], &reg.codec);
    assert!(one + 100 < whole);
    let sly_shard = shard_builder(
        &reg,
        &reg.run,
        w,
        &[("t00001-00001".into(), vec![0u8; (one + 50) as usize])],
    )
    .unwrap()
    .sign(&sly)
    .unwrap();
    let area = root.join("sly");
    put_create(
        &area,
        &area.path(&layout::grad(&reg.run, w, &sly.peer_id())),
        &sly_shard,
    )
    .await
    .unwrap();
    wait_closed(&reg, &root.join("agg"), w).await;
    let agg = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    assert_eq!(agg.accepted, 1);
    let rows = common::ledger(&root.join("agg"), &reg, w).await;
    // Both refused from the header (before: fetched, inflated, then `section_malformed`).
    let row = &rows[&bomber.peer_id().to_string()];
    assert_eq!(row.reason, "over_limit", "{row:?}");
    assert!(row.detail.contains("67108864"), "{}", row.detail);
    let row = &rows[&sly.peer_id().to_string()];
    assert_eq!(row.reason, "section_size", "{row:?}");
    assert!(row.detail.contains("t00001-00001"), "{}", row.detail);
}

/// Puts `sections` re-signed by `by` as its own shard for `w` (revealing `salt`, the
/// victim's), with a commit naming them (the strongest copier: it commits, with a
/// commitment that verifies for its own key, the moment it has seen the content).
#[allow(clippy::too_many_arguments)]
async fn copy_as(
    reg: &Registry,
    by: &Identity,
    area: &Target,
    w: u64,
    named: &[(String, Vec<u8>)],
    salt: &str,
    damage: bool,
) {
    let signed = shard_builder(reg, &reg.run, w, named)
        .unwrap()
        .meta(SALT_META, salt)
        .sign(by)
        .unwrap();
    let content = content_hash(signed.header.sections.iter());
    put_commit(reg, by, area, w, &commitment(&by.peer_id(), salt, &content)).await;
    let mut bytes = signed.to_vec().unwrap();
    if damage {
        // The same signed section table over a damaged body: `section_hash_mismatch`.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
    }
    area.store
        .put(
            &area.path(&layout::grad(&reg.run, w, &by.peer_id())),
            bytes.into(),
        )
        .await
        .unwrap();
}

/// Puts `by`'s commit for `w` naming `commitment`.
async fn put_commit(reg: &Registry, by: &Identity, area: &Target, w: u64, commitment: &str) {
    let commit = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(COMMIT_CODEC, Default::default())
        .meta(COMMITMENT_META, commitment)
        .sign(by)
        .unwrap()
        .to_vec()
        .unwrap();
    area.store
        .put(
            &area.path(&layout::grad_commit(&reg.run, w, &by.peer_id())),
            commit.into(),
        )
        .await
        .unwrap();
}

/// The victim's shard as it becomes visible: its sections and the salt it reveals.
async fn read_victim(
    reg: &Registry,
    area: &Target,
    victim: &Identity,
    w: u64,
) -> (Vec<(String, Vec<u8>)>, String) {
    let path = area.path(&layout::grad(&reg.run, w, &victim.peer_id()));
    let env = loop {
        match RemoteEnvelope::open(
            area.store.as_ref(),
            &path,
            "victim",
            &Limits::default(),
            &Expect::default(),
        )
        .await
        {
            Ok(env) => break env,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let secs = read_all_sections(area.store.as_ref(), &env, &Limits::default())
        .await
        .unwrap();
    let named = env
        .sections()
        .iter()
        .map(|s| s.name.clone())
        .zip(secs)
        .collect();
    (named, env.head.header.meta[SALT_META].clone())
}

/// The attack the commitment stops: poll the victim's commit, put one naming the same
/// value within the same second, then re-sign the victim's shard (its salt included) the
/// moment it is visible. With commits that named the content in clear this forced a tie
/// on a whole-second store, and the victim lost its weight.
async fn mimic(
    reg: &Registry,
    by: &Identity,
    own: &Target,
    victim_area: &Target,
    victim: &Identity,
    w: u64,
) {
    let cpath = victim_area.path(&layout::grad_commit(&reg.run, w, &victim.peer_id()));
    let seen = loop {
        if let Ok(c) = RemoteEnvelope::open(
            victim_area.store.as_ref(),
            &cpath,
            "commit",
            &Limits::small_object(),
            &Expect::default(),
        )
        .await
        {
            break c.head.header.meta[COMMITMENT_META].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    put_commit(reg, by, own, w, &seen).await;
    let (named, salt) = read_victim(reg, victim_area, victim, w).await;
    let signed = shard_builder(reg, &reg.run, w, &named)
        .unwrap()
        .meta(SALT_META, &salt)
        .sign(by)
        .unwrap();
    own.store
        .put(
            &own.path(&layout::grad(&reg.run, w, &by.peer_id())),
            signed.to_vec().unwrap().into(),
        )
        .await
        .unwrap();
}

/// Someone whose peer id sorts before `than`'s (ground, as an attacker would).
fn lower_than(than: &Identity) -> Identity {
    loop {
        let id = Identity::generate();
        if id.peer_id().to_string() < than.peer_id().to_string() {
            return id;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_rule_holds_with_one_second_timestamps() {
    let Some(root) = common::moto("copy-rule") else {
        return;
    };
    let s3 = common::moto_options();
    let aggregator = Identity::generate();
    const PAIRS: usize = 3;
    let victims: Vec<Identity> = (0..PAIRS).map(|_| Identity::generate()).collect();
    let copiers: Vec<Identity> = victims.iter().map(lower_than).collect();
    let griefers: Vec<Identity> = victims.iter().map(lower_than).collect();
    let mimics: Vec<Identity> = victims.iter().map(lower_than).collect();
    let names: Vec<String> = (0..PAIRS)
        .flat_map(|i| {
            [
                format!("victim{i}"),
                format!("copier{i}"),
                format!("griefer{i}"),
                format!("mimic{i}"),
            ]
        })
        .collect();
    let ids: Vec<&Identity> = (0..PAIRS)
        .flat_map(|i| [&victims[i], &copiers[i], &griefers[i], &mimics[i]])
        .collect();
    let miners: Vec<(&str, &Identity)> = names.iter().map(|n| n.as_str()).zip(ids).collect();
    let reg = new_run(&root, &s3, "copy-rule", 8, 3, &aggregator, &miners).await;
    let w = 0;
    let (reg_r, s3_r, root_r) = (&reg, &s3, &root);
    // Each victim publishes while its mimic watches its commit.
    futures::future::join_all(victims.iter().enumerate().map(|(i, v)| {
        let mimic_id = &mimics[i];
        async move {
            let own = root_r.join(&format!("mimic{i}"));
            let victim_area = root_r.join(&format!("victim{i}"));
            let (u, mut st) = (update(i as f32), EfState::default());
            let (published, ()) = tokio::join!(
                publish(Job::new(reg_r, v, s3_r), Some(w), Update::file(&u, &mut st)),
                mimic(reg_r, mimic_id, &own, &victim_area, v, w)
            );
            published.unwrap();
        }
    }))
    .await;
    for i in 0..PAIRS {
        // Each reads the victim's shard as soon as it is visible and republishes it.
        let area = root.join(&format!("victim{i}"));
        let (named, salt) = read_victim(&reg, &area, &victims[i], w).await;
        let c = root.join(&format!("copier{i}"));
        let g = root.join(&format!("griefer{i}"));
        copy_as(&reg, &copiers[i], &c, w, &named, &salt, false).await;
        copy_as(&reg, &griefers[i], &g, w, &named, &salt, true).await;
    }
    wait_closed(&reg, &root.join("agg"), w).await;
    aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(8),
    )
    .await
    .unwrap();
    let rows = common::ledger(&root.join("agg"), &reg, w).await;
    let held = (0..PAIRS)
        .filter(|&i| {
            let v = &rows[&victims[i].peer_id().to_string()];
            let m = &rows[&mimics[i].peer_id().to_string()];
            v.verdict.as_str() == "accepted" && m.detail.contains(&victims[i].peer_id().to_string())
        })
        .count();
    common::report(
        "commitment copier (same-second commit, whole-second store): victim keeps its weight",
        PAIRS,
        held,
    );
    for i in 0..PAIRS {
        let v = &rows[&victims[i].peer_id().to_string()];
        let c = &rows[&copiers[i].peer_id().to_string()];
        let g = &rows[&griefers[i].peer_id().to_string()];
        assert_eq!(
            (v.verdict.as_str(), v.reason.as_str()),
            ("accepted", ""),
            "victim {i}: {v:?}"
        );
        assert_eq!(c.reason, "duplicate", "copier {i}: {c:?}");
        assert!(
            c.detail.contains(&victims[i].peer_id().to_string()),
            "{}",
            c.detail
        );
        assert_eq!(g.reason, "section_hash_mismatch", "griefer {i}: {g:?}");
        let m = &rows[&mimics[i].peer_id().to_string()];
        assert_eq!(m.reason, "duplicate", "mimic {i}: {m:?}");
        assert!(
            m.detail.contains(&victims[i].peer_id().to_string()),
            "the victim must win outright, not tie: {}",
            m.detail
        );
        // The scenario really is a same-second race at this store's resolution.
        assert_eq!(
            v.last_modified_ms.unwrap() % 1000,
            0,
            "moto reports whole seconds"
        );
    }
}

/// A commit made before its window opened counts for nothing: an attacker who can predict a
/// victim's update (here: the same update from a fresh state) commits to its content during
/// the previous window, then republishes the victim's shard under its own key once it is
/// visible. With such commits counting, its commit was the earliest and it won (1 of 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_from_before_the_window_counts_for_nothing() {
    let Some(root) = common::moto("early-commit") else {
        return;
    };
    let s3 = common::moto_options();
    let aggregator = Identity::generate();
    let victim = Identity::generate();
    let early = lower_than(&victim);
    let miners = [("victim", &victim), ("early", &early)];
    let reg = new_run(&root, &s3, "early-commit", 6, 3, &aggregator, &miners).await;
    let w = 1;
    // The attacker predicts the victim's content and commits to it in window 0.
    let predicted = codec::encode_update(
        &update(7.0),
        &mut EfState::default(),
        &shardrop::round::publish::encode_options(&reg, w),
    )
    .unwrap();
    let builder = shard_builder(&reg, &reg.run, w, &predicted.sections).unwrap();
    let content = content_hash(builder.section_entries());
    let salt = "11".repeat(32);
    let own = root.join("early");
    put_commit(
        &reg,
        &early,
        &own,
        w,
        &commitment(&early.peer_id(), &salt, &content),
    )
    .await;
    let opens = shardrop::round::publish::clock(&reg).start(w);
    loop {
        let now = store_now_ms(&own, "clock").await.unwrap();
        if now >= opens + 50 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(opens + 60 - now)).await;
    }
    publish(
        Job::new(&reg, &victim, &s3),
        Some(w),
        Update::file(&update(7.0), &mut EfState::default()),
    )
    .await
    .unwrap();
    let (named, _) = read_victim(&reg, &root.join("victim"), &victim, w).await;
    let signed = shard_builder(&reg, &reg.run, w, &named)
        .unwrap()
        .meta(SALT_META, &salt)
        .sign(&early)
        .unwrap();
    assert_eq!(
        content_hash(signed.header.sections.iter()),
        content,
        "the prediction held"
    );
    own.store
        .put(
            &own.path(&layout::grad(&reg.run, w, &early.peer_id())),
            signed.to_vec().unwrap().into(),
        )
        .await
        .unwrap();
    wait_closed(&reg, &root.join("agg"), w).await;
    aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        w,
        &AggregateOptions::default().with_concurrency(4),
    )
    .await
    .unwrap();
    let rows = common::ledger(&root.join("agg"), &reg, w).await;
    let v = &rows[&victim.peer_id().to_string()];
    let e = &rows[&early.peer_id().to_string()];
    let held = v.verdict.as_str() == "accepted" && e.reason == "duplicate";
    common::report(
        "commit put before its window (predicted content): the victim keeps its place",
        1,
        usize::from(held),
    );
    assert_eq!(
        (v.verdict.as_str(), v.reason.as_str()),
        ("accepted", ""),
        "{v:?}"
    );
    assert_eq!(e.reason, "duplicate", "{e:?}");
    assert!(
        e.detail.contains(&victim.peer_id().to_string()),
        "{}",
        e.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_idempotent_after_a_kill_at_each_step() {
    let Some(root) = common::s3("idempotent") else {
        return;
    };
    let s3 = s3_opts();
    let aggregator = Identity::generate();
    let (reference, killed, stale) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let reg = new_run(
        &root,
        &s3,
        "idempotent",
        60,
        5,
        &aggregator,
        &[
            ("reference", &reference),
            ("killed", &killed),
            ("stale", &stale),
        ],
    )
    .await;
    let w = 0;
    let u = update(5.0);
    // Uninterrupted.
    let mut want = EfState::default();
    publish(
        Job::new(&reg, &reference, &s3),
        Some(w),
        Update::file(&u, &mut want),
    )
    .await
    .unwrap();
    assert_eq!(want.window, Some(w));

    // Killed after the put, before the state was saved: the rerun starts from the old state,
    // finds its shard and ends with exactly the uninterrupted state.
    let mut first = EfState::default();
    let p1 = publish(
        Job::new(&reg, &killed, &s3),
        Some(w),
        Update::file(&u, &mut first),
    )
    .await
    .unwrap();
    let mut rerun = EfState::default();
    let p2 = publish(
        Job::new(&reg, &killed, &s3),
        Some(w),
        Update::file(&u, &mut rerun),
    )
    .await
    .unwrap();
    assert!(p2.already_published);
    assert_eq!(rerun, want);
    assert_eq!(first, want);
    // Killed after the save: the rerun encodes nothing and leaves the state alone.
    let mut saved = first.clone();
    let p3 = publish(
        Job::new(&reg, &killed, &s3),
        Some(w),
        Update::file(&u, &mut saved),
    )
    .await
    .unwrap();
    assert!(p3.already_published);
    assert_eq!(saved, want);
    // Every report gives the stored object's real size.
    let area = root.join("killed");
    let path = area.path(&layout::grad(&reg.run, w, &killed.peer_id()));
    let size = area.store.head(&path).await.unwrap().size;
    assert_eq!((p1.bytes, p2.bytes, p3.bytes), (size, size, size));
    // The saved state survives a restart, window included.
    let dir = tempfile::tempdir().unwrap();
    saved.save(dir.path()).unwrap();
    assert_eq!(EfState::load(dir.path()).unwrap(), want);
    // Another update from the old state while the first shard is stored: refused, state kept.
    let mut old = EfState::default();
    let refused = publish(
        Job::new(&reg, &killed, &s3),
        Some(w),
        Update::file(&update(6.0), &mut old),
    )
    .await;
    assert!(
        matches!(&refused, Err(RoundError::Conflict { detail: m, .. }) if m.contains("different shard")),
        "{refused:?}"
    );
    assert_eq!(old, EfState::default());

    // Killed after a commit, before the shard: a stale commit (another content) is replaced.
    let sarea = root.join("stale");
    let junk = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(COMMIT_CODEC, Default::default())
        .meta(COMMITMENT_META, "00")
        .sign(&stale)
        .unwrap()
        .to_vec()
        .unwrap();
    let cpath = sarea.path(&layout::grad_commit(&reg.run, w, &stale.peer_id()));
    sarea.store.put(&cpath, junk.into()).await.unwrap();
    let mut st = EfState::default();
    publish(
        Job::new(&reg, &stale, &s3),
        Some(w),
        Update::file(&u, &mut st),
    )
    .await
    .unwrap();
    assert_eq!(st, want);
    let commit = RemoteEnvelope::open(
        sarea.store.as_ref(),
        &cpath,
        "commit",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    let shard = RemoteEnvelope::open(
        sarea.store.as_ref(),
        &sarea.path(&layout::grad(&reg.run, w, &stale.peer_id())),
        "shard",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        commit.head.header.meta.get(COMMITMENT_META),
        Some(&commitment(
            &stale.peer_id(),
            &shard.head.header.meta[SALT_META],
            &content_hash(shard.sections().iter())
        ))
    );
}

#[test]
fn state_folder_lock_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    // A killed save's temporary file, and a link planted where the state goes.
    std::fs::write(dir.path().join(".error-feedback.tmpXYZ"), b"junk").unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join(codec::STATE_FILE)).unwrap();
    let lock = codec::lock_dir(dir.path()).unwrap();
    assert!(!dir.path().join(".error-feedback.tmpXYZ").exists());
    // A second publisher on the same folder is refused while the first holds it.
    assert!(codec::lock_dir(dir.path()).is_err());
    // Loading never reads through the link; saving replaces the link, never its target.
    assert!(EfState::load(dir.path()).is_err());
    let st = EfState {
        window: Some(3),
        ..EfState::default()
    };
    st.save(dir.path()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert_eq!(EfState::load(dir.path()).unwrap(), st);
    drop(lock);
    assert!(codec::lock_dir(dir.path()).is_ok());
}

/// Readers of the registry while its operator replaces it: never a tamper reason.
async fn registry_reads_while_replaced(root: Target, s3: S3Options) {
    let aggregator = Identity::generate();
    let operator = Identity::generate();
    let now = store_now_ms(&root.join("op"), "clock").await.unwrap();
    let mut reg = Registry::new(
        "torn",
        &operator.peer_id(),
        now,
        60,
        5,
        codec::model_of(&update(0.0)).unwrap(),
        CodecParams::default(),
    );
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        root.join("agg").url(),
    ));
    let url = reg.create(&root.join("op"), &operator).await.unwrap();
    let writer = {
        let (url, s3) = (url.clone(), s3.clone());
        tokio::spawn(async move {
            for _ in 0..25 {
                let (mut r, etag) = Registry::load(&url, &s3, None).await.unwrap();
                // A bigger registry each time, so versions differ in size and content.
                r.participants.push(Participant::new(
                    Role::Miner,
                    &Identity::generate().peer_id(),
                    format!("memory://m{}", r.revision),
                ));
                r.update(&url, &s3, etag, &operator).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        match Registry::load(&url, &s3, None).await {
            Ok(_) => reads += 1,
            Err(e) => panic!("read {reads} failed while the registry was replaced: {e}"),
        }
    }
    writer.await.unwrap();
    assert!(reads > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_reads_are_consistent_on_s3s() {
    if let Some(root) = common::s3("torn") {
        registry_reads_while_replaced(root, s3_opts()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_reads_are_consistent_on_moto() {
    if let Some(root) = common::moto("torn") {
        registry_reads_while_replaced(root, common::moto_options()).await;
    }
}

/// Multipart uploads in progress under `prefix` on the moto server (its S3 listing API).
async fn open_uploads(prefix: &str) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoint = std::env::var("SHARDROP_MOTO_AWS_ENDPOINT_URL").unwrap();
    let host = endpoint.trim_start_matches("http://").to_string();
    let bucket = std::env::var("SHARDROP_TEST_MOTO")
        .unwrap()
        .trim_start_matches("s3://")
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
    let req = format!(
        "GET /{bucket}?uploads&prefix={prefix} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.matches("<UploadId>").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_multipart_uploads_are_aborted() {
    let Some(root) = common::moto("multipart") else {
        return;
    };
    use object_store::multipart::MultipartStore;
    // What a push killed mid-upload leaves: an open upload with a part, and its journal.
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(std::env::var("SHARDROP_MOTO_AWS_ENDPOINT_URL").unwrap())
        .with_bucket_name(
            std::env::var("SHARDROP_TEST_MOTO")
                .unwrap()
                .trim_start_matches("s3://"),
        )
        .with_access_key_id("moto")
        .with_secret_access_key("moto")
        .with_region("us-east-1")
        .with_allow_http(true)
        .build()
        .unwrap();
    let orphan = |name: &str| {
        let path = root.path(name);
        let raw = &raw;
        let root = &root;
        async move {
            let id = raw.create_multipart(&path).await.unwrap();
            raw.put_part(&path, &id, 0, vec![7u8; 5 << 20].into())
                .await
                .unwrap();
            root.store
                .put(
                    &shardrop::store::upload_journal(&path),
                    id.into_bytes().into(),
                )
                .await
                .unwrap();
            path
        }
    };
    let prefix = root.prefix.to_string();
    let big = orphan("big.bin").await;
    orphan("abandoned/other.bin").await;
    assert_eq!(open_uploads(&prefix).await, 2);
    // The rerun of the same upload aborts the orphan before its own.
    let body = common::noise(40 << 20, 3);
    put_create(&root, &big, &body[..]).await.unwrap();
    assert_eq!(root.store.head(&big).await.unwrap().size, 40 << 20);
    assert_eq!(open_uploads(&prefix).await, 1);
    // `ckpt gc`'s sweep aborts what nobody reruns.
    let n = shardrop::store::abort_orphaned_uploads(&root, "", std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(open_uploads(&prefix).await, 0);
    assert!(
        root.store
            .head(&shardrop::store::upload_journal(&big))
            .await
            .is_err()
    );
}
