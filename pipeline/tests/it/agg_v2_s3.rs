//! agg-v2 on the local S3 server: the same windows aggregated as agg-v1, agg-v2 (copies)
//! and agg-v2 (by reference) leave bit-identical parameters after `apply` — with a clipped
//! outlier, a duplicate, several sections per shard and a split merge — and every new kind
//! of bad input stops the reader, naming it, before any parameter changes.

use crate::common;

use std::collections::BTreeMap;

use object_store::ObjectStoreExt;
use shardrop::format::codec::{self, CodecParams, EfState, EncodeOptions};
use shardrop::format::envelope::{
    Compression, EnvelopeBuilder, Expect, Kind, Limits, RemoteEnvelope,
};
use shardrop::format::layout;
use shardrop::format::tables::read_ledger;
use shardrop::identity::Identity;
use shardrop::round::RoundError;
use shardrop::round::accepted::{AcceptedList, LIST_SECTION};
use shardrop::round::aggregate::{
    AGG_V2_CODEC, AggregateOptions, aggregate_commit, aggregate_part, aggregate_window_opts,
};
use shardrop::round::merge::prefetch;
use shardrop::round::publish::{PublishOptions, Update, clock, publish_opts, shard_builder};
use shardrop::round::registry::{AggForm, AggregateSpec, Job, Participant, Registry, Role};
use shardrop::round::replay::{
    ApplyOptions, Fetched, apply_aggregates, apply_aggregates_opts, fetch_aggregate,
};
use shardrop::round::score::reference::{self, SparseUpdate};
use shardrop::round::score::{ValidateOptions, validate_window};
use shardrop::round::window::store_now_ms;
use shardrop::store::{S3Options, Target, put_create};

/// Six tensors of mixed sizes; `scale` makes an outlier.
fn update(seed: f32, scale: f32) -> Vec<u8> {
    use safetensors::{Dtype, tensor::TensorView};
    let sizes = [
        ("a", 3000usize),
        ("b", 17),
        ("c", 5000),
        ("d", 300),
        ("e", 4100),
        ("f", 1),
    ];
    let data: Vec<(String, usize, Vec<u8>)> = sizes
        .iter()
        .map(|(n, len)| {
            let bytes = (0..*len)
                .flat_map(|i| {
                    ((((i as f32) * 0.37 + seed * 1.7).sin() * 0.01
                        + (seed * i as f32).cos() * 0.003)
                        * scale)
                        .to_le_bytes()
                })
                .collect();
            (n.to_string(), *len, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, len, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, vec![*len], b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Small sections, so shards have several and readers walk them piece by piece.
fn small_sections(
    u: &[u8],
    st: &mut EfState,
    o: &EncodeOptions,
) -> Result<codec::EncodedUpdate, RoundError> {
    let mut o = *o;
    o.section_bytes = 200;
    Ok(codec::encode_update(u, st, &o)?)
}

/// One alteration of a valid list.
type Edit = Box<dyn Fn(&mut AcceptedList)>;

fn opts() -> S3Options {
    S3Options {
        max_retries: Some(0),
        timeout: Some(std::time::Duration::from_secs(5)),
        ..Default::default()
    }
}

async fn wait_until(t: &Target, ms: u64) {
    loop {
        let now = store_now_ms(t, "clock").await.unwrap();
        if now >= ms {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(ms - now + 20)).await;
    }
}

fn base(reg: &Registry) -> BTreeMap<String, Vec<f32>> {
    reg.model
        .tensors
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let n = t.shape.iter().product::<u64>() as usize;
            let v = (0..n)
                .map(|i| match i % 7 {
                    0 => -0.0,
                    1 => 0.0,
                    _ => ((i * 31 + k) as f32 * 0.11).sin(),
                })
                .collect();
            (t.name.clone(), v)
        })
        .collect()
}

fn bits(t: &BTreeMap<String, Vec<f32>>) -> BTreeMap<String, Vec<u32>> {
    t.iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Bit equality, reporting the first differing element (not two whole models).
fn same_bits(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{what}: {name}");
        if let Some(i) = (0..x.len()).find(|&i| x[i].to_bits() != y[i].to_bits()) {
            panic!("{what}: {name}[{i}] is {:e} against {:e}", x[i], y[i]);
        }
    }
}

fn reason(e: &RoundError) -> &'static str {
    match e {
        RoundError::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn ledger(t: &Target, reg: &Registry, w: u64) -> Vec<shardrop::format::tables::LedgerRow> {
    let b = t
        .store
        .get(&t.path(&layout::ledger(&reg.run, w)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    read_ledger(b).unwrap()
}

/// A run of `miners` (each in area `m{i}`) with the test model and a small codec; no
/// aggregator yet. Window 0 starts now by the store's clock.
async fn new_run(root: &Target, run: &str, window_secs: u64, miners: &[Identity]) -> Registry {
    let operator = Identity::generate();
    let mut reg = Registry::new(
        run,
        &operator.peer_id(),
        store_now_ms(&root.join("op"), "clock").await.unwrap(),
        window_secs,
        2,
        codec::model_of(&update(0.0, 1.0)).unwrap(),
        CodecParams {
            chunk: 256,
            k: 8,
            ..CodecParams::default()
        },
    );
    // Small sections (`small_sections`), so shards have several: the run says so, as the
    // packing is part of the content rule.
    reg.section_bytes = 200;
    for (i, id) in miners.iter().enumerate() {
        reg.participants.push(Participant::new(
            Role::Miner,
            &id.peer_id(),
            root.join(&format!("m{i}")).url(),
        ));
    }
    reg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agg_v2_applies_bit_identically_to_agg_v1_and_refuses_bad_lists() {
    let Some(root) = common::s3("agg-v2") else {
        return;
    };
    let s3 = opts();
    let area = |name: &str| root.join(name);
    let aggregator = Identity::generate();
    let miners: Vec<Identity> = (0..6).map(|_| Identity::generate()).collect();
    let mut v2 = new_run(&root, "aggv2", 8, &miners).await;
    assert_eq!(
        v2.aggregate,
        AggregateSpec::v2(AggForm::Auto),
        "new runs are agg-v2"
    );
    v2.outer_lr = 0.7;
    let with_agg = |r: &Registry, store: &str, spec: AggregateSpec| {
        let mut r = r.clone();
        r.aggregate = spec;
        r.participants.push(Participant::new(
            Role::Aggregator,
            &aggregator.peer_id(),
            area(store).url(),
        ));
        r
    };
    let v1 = with_agg(&v2, "agg1", AggregateSpec::default());
    let by_ref = with_agg(&v2, "agg3", AggregateSpec::v2(AggForm::Reference));
    let merged = with_agg(&v2, "agg4", AggregateSpec::v2(AggForm::Merged));
    let auto = with_agg(&v2, "agg5", AggregateSpec::v2(AggForm::Auto));
    let v2 = with_agg(&v2, "agg2", AggregateSpec::v2(AggForm::Shards));
    let clk = clock(&v2);

    // Window 0: miners 0-4 publish (4 is a 40x outlier, clipped); miner 5 later re-signs
    // miner 0's sections as its own (a duplicate). Window 1: miners 1 and 2.
    let publish_all = |w: u64, who: Vec<(usize, f32)>| {
        let (v2, s3, miners) = (&v2, &s3, &miners);
        futures::future::join_all(who.into_iter().map(move |(i, scale)| async move {
            let mut st = EfState::default();
            let u = update(i as f32 + 10.0 * w as f32, scale);
            publish_opts(
                Job::new(v2, &miners[i], s3),
                Some(w),
                Update::file(&u, &mut st),
                PublishOptions {
                    encoder: Some(&mut small_sections),
                },
            )
            .await
            .unwrap()
        }))
    };
    let published = publish_all(0, vec![(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 40.0)]).await;
    assert!(published.iter().all(|p| !p.already_published));
    let src = area("m0");
    let env = RemoteEnvelope::open(
        src.store.as_ref(),
        &src.path(&layout::grad(&v2.run, 0, &miners[0].peer_id())),
        "m0",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    assert!(env.sections().len() >= 3, "shards have several sections");
    let secs =
        shardrop::format::envelope::read_all_sections(src.store.as_ref(), &env, &Limits::default())
            .await
            .unwrap();
    let named: Vec<(String, Vec<u8>)> = env
        .sections()
        .iter()
        .map(|s| s.name.clone())
        .zip(secs)
        .collect();
    let copier = area("m5");
    put_create(
        &copier,
        &copier.path(&layout::grad(&v2.run, 0, &miners[5].peer_id())),
        &shard_builder(&v2, &v2.run, 0, &named)
            .unwrap()
            .sign(&miners[5])
            .unwrap(),
    )
    .await
    .unwrap();
    wait_until(&area("op"), clk.start(1)).await;
    publish_all(1, vec![(1, 1.0), (2, 1.0)]).await;
    wait_until(&area("op"), clk.closes(1)).await;

    for reg in [&v1, &v2, &by_ref, &merged, &auto] {
        for w in [0, 1] {
            aggregate_window_opts(
                Job::new(reg, &aggregator, &s3),
                w,
                &AggregateOptions::default().with_concurrency(3),
            )
            .await
            .unwrap();
        }
    }
    let l1 = ledger(&area("agg1"), &v1, 0).await;
    assert_eq!(
        l1,
        ledger(&area("agg2"), &v2, 0).await,
        "same verdicts in both formats"
    );
    assert_eq!(l1, ledger(&area("agg3"), &by_ref, 0).await);
    let count = |r: &str| l1.iter().filter(|x| x.reason == r).count();
    assert_eq!((count("clipped"), count("duplicate")), (1, 1), "{l1:?}");
    let Fetched::Listed(list) = fetch_aggregate(&v2, &s3, 0).await.unwrap() else {
        panic!("agg-v2 expected");
    };
    assert_eq!(list.accepted.len(), 5);
    assert!(list.accepted.windows(2).all(|p| p[0].peer < p[1].peer));
    assert!(matches!(
        fetch_aggregate(&v1, &s3, 0).await.unwrap(),
        Fetched::Merged(_)
    ));

    // The same parameters, bit for bit, in all three; and different from the base.
    let mut thetas = Vec::new();
    for reg in [&v1, &v2, &by_ref, &merged, &auto] {
        let mut t = base(reg);
        assert_eq!(apply_aggregates(reg, &s3, &mut t, 0, 1).await.unwrap(), 2);
        thetas.push(t);
    }
    assert_ne!(bits(&thetas[0]), bits(&base(&v1)));
    same_bits(&thetas[0], &thetas[1], "agg-v1 against agg-v2");
    same_bits(&thetas[0], &thetas[2], "agg-v1 against by-reference");
    same_bits(&thetas[0], &thetas[3], "agg-v1 against merged");
    same_bits(&thetas[0], &thetas[4], "agg-v1 against auto");
    let Fetched::Listed(m) = fetch_aggregate(&merged, &s3, 0).await.unwrap() else {
        panic!("agg-v2 expected");
    };
    assert_eq!((m.form, m.accepted.len()), (AggForm::Merged, 5));
    assert!(m.merged.is_some());
    // The aggregator's own key signs a merged object a thousand times the true merge, and a
    // list naming it: a reader's spot check against the listed shards refuses it.
    let agg4 = area("agg4");
    forge_merged(&merged, &s3, &agg4, &aggregator, 1).await;
    let mut t = base(&merged);
    let e = apply_aggregates(&merged, &s3, &mut t, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_merged_mismatch", "{e}");
    same_bits(&t, &base(&merged), "untouched by a forged merged object");
    common::report(
        "merged object x1000 signed by the aggregator: refused by the reader's spot check",
        1,
        1,
    );
    // A merged object that is not the listed one is refused before anything changes.
    let mobj = agg4.path(&layout::agg_merged(&merged.run, 1));
    let len = agg4.store.head(&mobj).await.unwrap().size as usize;
    common::flip_bit(&agg4, &mobj, Some(len - 1)).await;
    let mut t = base(&merged);
    let e = apply_aggregates(&merged, &s3, &mut t, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_section_mismatch", "{e}");
    same_bits(&t, &base(&merged), "untouched by a damaged merged object");
    agg4.store.delete(&mobj).await.unwrap();
    let e = apply_aggregates(&merged, &s3, &mut t, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_source_missing", "{e}");
    // One rank holding only tensor "c" gets exactly its tensor.
    let mut rank: BTreeMap<String, Vec<f32>> = [("c".to_string(), base(&v2)["c"].clone())].into();
    apply_aggregates(&v2, &s3, &mut rank, 0, 1).await.unwrap();
    same_bits(
        &rank,
        &[("c".to_string(), thetas[1]["c"].clone())].into(),
        "one rank",
    );

    // The split merge publishes the same list, byte for byte.
    for k in [2usize, 3] {
        let cpu = AggregateOptions::default().with_concurrency(3);
        let workers =
            (0..k).map(|i| aggregate_part(Job::new(&v2, &aggregator, &s3), 0, i, k, &cpu));
        let (parts, commit) = tokio::join!(
            futures::future::join_all(workers),
            aggregate_commit(Job::new(&v2, &aggregator, &s3), 0, k, &cpu)
        );
        assert_eq!(parts.into_iter().map(|p| p.unwrap()).sum::<usize>(), 6);
        assert!(commit.unwrap().already_published, "K={k}: the list differs");
    }

    // Bad lists, signed by the aggregator itself, at window 7: each refused with its reason.
    let agg2 = area("agg2");
    let signed_list = |l: &AcceptedList| {
        EnvelopeBuilder::new(Kind::Agg, &v2.run)
            .window(7)
            .codec(AGG_V2_CODEC, Default::default())
            .sections(
                vec![(LIST_SECTION.to_string(), serde_json::to_vec(l).unwrap())],
                Compression::Zstd,
            )
            .unwrap()
            .sign(&aggregator)
            .unwrap()
            .to_vec()
            .unwrap()
    };
    let mut at7 = list.clone();
    at7.window = 7;
    for a in at7.accepted.iter_mut() {
        a.object = a.object.replace("/0000000000/", "/0000000007/");
    }
    let outsider = Identity::generate().peer_id().to_string();
    let cases: Vec<(&str, Edit)> = vec![
        ("agg_verdict", Box::new(|l| l.accepted.swap(0, 1))),
        (
            "agg_verdict",
            Box::new(move |l| l.accepted[0].peer = outsider.clone()),
        ),
        ("agg_verdict", Box::new(|l| l.window = 6)),
        ("agg_verdict", Box::new(|l| l.form = AggForm::Merged)),
        (
            "agg_verdict",
            Box::new(|l| l.accepted[1].object = l.accepted[2].object.clone()),
        ),
        (
            "agg_weights",
            Box::new(|l| {
                let u = l.accepted.iter_mut().find(|a| !a.clipped).unwrap();
                u.weight *= 1.5;
            }),
        ),
        (
            "agg_weights",
            Box::new(|l| {
                let c = l.accepted.iter_mut().find(|a| a.clipped).unwrap();
                c.clipped = false;
            }),
        ),
        ("agg_weights", Box::new(|l| l.accepted.truncate(2))),
    ];
    let key7 = agg2.path(&layout::agg(&v2.run, 7));
    assert!(matches!(
        fetch_aggregate(&v2, &s3, 7).await,
        Err(RoundError::NoAggregate { .. })
    ));
    let good = signed_list(&at7);
    agg2.store.put(&key7, good.into()).await.unwrap();
    assert!(
        matches!(
            fetch_aggregate(&v2, &s3, 7).await.unwrap(),
            Fetched::Listed(_)
        ),
        "the unaltered list passes"
    );
    for (want, edit) in &cases {
        let mut l = at7.clone();
        edit(&mut l);
        agg2.store.put(&key7, signed_list(&l).into()).await.unwrap();
        let e = fetch_aggregate(&v2, &s3, 7).await.err().expect("refused");
        assert_eq!(reason(&e), *want, "{e}");
        assert!(e.to_string().contains("window 7"), "{e}");
    }

    // A consolidated copy whose bytes no longer match its listed hash: refused, naming the
    // peer, and the parameters are untouched.
    let copy = agg2.path(&layout::agg_shard(&v2.run, 1, &miners[2].peer_id()));
    let len = agg2.store.head(&copy).await.unwrap().size as usize;
    common::flip_bit(&agg2, &copy, Some(len - 1)).await;
    let mut t = base(&v2);
    let e = apply_aggregates(&v2, &s3, &mut t, 0, 1).await.unwrap_err();
    assert_eq!(reason(&e), "agg_section_mismatch", "{e}");
    assert!(
        e.to_string().contains(&miners[2].peer_id().to_string())
            && e.to_string().contains("window 1"),
        "{e}"
    );
    let mut fresh = base(&v2);
    apply_aggregates(&v2, &s3, &mut fresh, 0, 0).await.unwrap();
    same_bits(&t, &fresh, "only window 0 was applied");
    // Shards prefetched from the miners before the damage serve the reader instead: each
    // verifies against the signed list. A tampered cache file is a miss, not a verdict.
    let cache = tempfile::tempdir().unwrap();
    let got = prefetch(&v2, &s3, 1, cache.path(), &|_| true, 4)
        .await
        .unwrap();
    assert_eq!((got.shards, got.skipped), (2, 4), "{got:?}");
    let cached = ApplyOptions {
        cache: Some(cache.path()),
        wait: None,
    };
    let mut t = base(&v2);
    let mut outer = Default::default();
    apply_aggregates_opts(&v2, &s3, &mut t, &mut outer, 0, 1, &cached)
        .await
        .unwrap();
    same_bits(&t, &thetas[1], "applied from the prefetched sections");
    // A poisoned folder: links to /dev/zero, FIFOs and oversized files where sections were.
    // Each is a miss (the store serves, and its damaged copy is refused), never a hang.
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        match i % 3 {
            0 => {
                std::fs::remove_file(f).unwrap();
                std::os::unix::fs::symlink("/dev/zero", f).unwrap();
            }
            1 => {
                std::fs::remove_file(f).unwrap();
                let c = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
                // SAFETY: `c` is a NUL-terminated path that outlives the call.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            }
            _ => {
                let mut b = std::fs::read(f).unwrap();
                b.extend(std::iter::repeat_n(0u8, 1 << 20));
                std::fs::write(f, b).unwrap();
            }
        }
    }
    let mut t = base(&v2);
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        apply_aggregates_opts(&v2, &s3, &mut t, &mut Default::default(), 0, 1, &cached),
    )
    .await
    .expect("a poisoned prefetch folder hung the reader")
    .unwrap_err();
    assert_eq!(reason(&e), "agg_section_mismatch", "{e}");
    // Prefetch never writes through a link planted at its temporary name (the section
    // hashes are public in the miners' headers).
    let victim = cache.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    for f in &files {
        let _ = std::fs::remove_file(f);
        let name = f.file_name().unwrap().to_str().unwrap();
        std::os::unix::fs::symlink(&victim, cache.path().join(format!("{name}.part"))).unwrap();
    }
    prefetch(&v2, &s3, 1, cache.path(), &|_| true, 4)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    let mut t = base(&v2);
    apply_aggregates_opts(&v2, &s3, &mut t, &mut Default::default(), 0, 0, &cached)
        .await
        .unwrap();
    common::report(
        "poisoned prefetch folder (links, FIFOs, oversized files, planted .part links)",
        1,
        1,
    );
    for f in std::fs::read_dir(cache.path()).unwrap() {
        let f = f.unwrap().path();
        let mut b = std::fs::read(&f).unwrap();
        b[0] ^= 1;
        std::fs::write(&f, b).unwrap();
    }
    let mut t = base(&v2);
    let e = apply_aggregates_opts(&v2, &s3, &mut t, &mut outer, 1, 1, &cached)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_section_mismatch", "{e}");

    // By reference: a miner replaces its shard (another valid one), then deletes it.
    let m1 = area("m1");
    let key = m1.path(&layout::grad(&v2.run, 1, &miners[1].peer_id()));
    let other = codec::encode_update(
        &update(99.0, 1.0),
        &mut EfState::default(),
        &EncodeOptions {
            params: v2.codec,
            beta: v2.beta,
            section_bytes: 200,
        },
    )
    .unwrap();
    let replaced = shard_builder(&v2, &v2.run, 1, &other.sections)
        .unwrap()
        .sign(&miners[1])
        .unwrap()
        .to_vec()
        .unwrap();
    m1.store.put(&key, replaced.into()).await.unwrap();
    let mut t = base(&by_ref);
    let snapshot = t.clone();
    let e = apply_aggregates(&by_ref, &s3, &mut t, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_section_mismatch", "{e}");
    same_bits(&t, &snapshot, "untouched");
    m1.store.delete(&key).await.unwrap();
    let e = apply_aggregates(&by_ref, &s3, &mut t, 1, 1)
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "agg_source_missing", "{e}");
    assert!(
        e.to_string().contains(&miners[1].peer_id().to_string()),
        "{e}"
    );
    same_bits(&t, &snapshot, "untouched");
    // The consolidated form does not depend on the miner's bucket: window 1 of agg-v1 and
    // the copies of miner 1 are still there (the damaged copy was miner 2's).
    let mut t = base(&v1);
    apply_aggregates(&v1, &s3, &mut t, 0, 1).await.unwrap();
    same_bits(&t, &thetas[0], "agg-v1 after the damage");
}

/// A shard that changes after the aggregator checked its header (here: its copy key already
/// holds another version the miner signed) is `replaced`, and the window goes on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_replaced_after_its_header_was_checked_is_refused() {
    let Some(root) = common::s3("agg-v2-replaced") else {
        return;
    };
    let s3 = opts();
    let area = |name: &str| root.join(name);
    let aggregator = Identity::generate();
    let miners: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
    let mut reg = new_run(&root, "replaced", 6, &miners).await;
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        area("agg").url(),
    ));
    let reg = reg;
    futures::future::join_all(miners.iter().enumerate().map(|(i, id)| {
        let (reg, s3) = (&reg, &s3);
        async move {
            let u = update(i as f32, 1.0);
            publish_opts(
                Job::new(reg, id, s3),
                Some(0),
                Update::file(&u, &mut EfState::default()),
                PublishOptions {
                    encoder: Some(&mut small_sections),
                },
            )
            .await
            .unwrap()
        }
    }))
    .await;
    // Another version of miner 0's shard, validly signed, already at the aggregator's copy key.
    let other = codec::encode_update(
        &update(50.0, 1.0),
        &mut EfState::default(),
        &EncodeOptions {
            params: reg.codec,
            beta: reg.beta,
            section_bytes: 200,
        },
    )
    .unwrap();
    let agg = area("agg");
    put_create(
        &agg,
        &agg.path(&layout::agg_shard(&reg.run, 0, &miners[0].peer_id())),
        &shard_builder(&reg, &reg.run, 0, &other.sections)
            .unwrap()
            .sign(&miners[0])
            .unwrap(),
    )
    .await
    .unwrap();
    wait_until(&area("op"), clock(&reg).closes(0)).await;
    let r = aggregate_window_opts(
        Job::new(&reg, &aggregator, &s3),
        0,
        &AggregateOptions::default().with_concurrency(3),
    )
    .await
    .unwrap();
    assert_eq!((r.accepted, r.rejected), (2, 1), "{r:?}");
    let rows = ledger(&agg, &reg, 0).await;
    let row = rows
        .iter()
        .find(|x| x.peer == miners[0].peer_id().to_string())
        .unwrap();
    assert_eq!(row.reason, "replaced", "{row:?}");
    let Fetched::Listed(list) = fetch_aggregate(&reg, &s3, 0).await.unwrap() else {
        panic!("agg-v2 expected");
    };
    assert!(list.accepted.iter().all(|a| a.peer != row.peer));
    let mut t = base(&reg);
    apply_aggregates(&reg, &s3, &mut t, 0, 0).await.unwrap();
}

/// One miner's published shard of window `w`, decoded whole (the reference's input).
async fn decoded(reg: &Registry, t: &Target, w: u64, id: &Identity) -> SparseUpdate {
    let env = RemoteEnvelope::open(
        t.store.as_ref(),
        &t.path(&layout::grad(&reg.run, w, &id.peer_id())),
        "shard",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    let secs =
        shardrop::format::envelope::read_all_sections(t.store.as_ref(), &env, &Limits::default())
            .await
            .unwrap();
    let tensors: Vec<_> = secs
        .iter()
        .flat_map(|s| {
            codec::read_section(s, Some(&reg.model), &codec::CodecLimits::default()).unwrap()
        })
        .collect();
    SparseUpdate::from_tensors(&reg.model, &tensors).unwrap()
}

/// Re-signs window `w`'s merged object with every value ×1000 (dense agg-v1 sections) and
/// the list naming it, both with the aggregator's key: what a dishonest aggregator can do.
async fn forge_merged(reg: &Registry, s3: &S3Options, agg: &Target, key: &Identity, w: u64) {
    use shardrop::format::agg_tensor::{AGG_CODEC, read_agg_tensor};
    use shardrop::round::accepted::ListedSection;
    use shardrop::round::aggregate::MERGED_CODEC;
    let Fetched::Listed(mut list) = fetch_aggregate(reg, s3, w).await.unwrap() else {
        panic!("agg-v2 expected");
    };
    let mkey = agg.path(&layout::agg_merged(&reg.run, w));
    let env = RemoteEnvelope::open(
        agg.store.as_ref(),
        &mkey,
        "merged",
        &Limits::default(),
        &Expect::default(),
    )
    .await
    .unwrap();
    let secs =
        shardrop::format::envelope::read_all_sections(agg.store.as_ref(), &env, &Limits::default())
            .await
            .unwrap();
    let mut forged = Vec::new();
    for (entry, bytes) in env.sections().iter().zip(secs) {
        let t = read_agg_tensor(&bytes, &reg.model).unwrap();
        let spec = reg.model.tensors.iter().find(|s| s.name == t.name).unwrap();
        let n = spec.shape.iter().product::<u64>() as usize;
        let mut dense = vec![0f32; n];
        for (i, v) in t.entries() {
            dense[i] = v * 1000.0;
        }
        let raw: Vec<u8> = dense.iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        let meta = serde_json::json!({"codec": AGG_CODEC, "name": t.name, "shape": spec.shape, "form": "dense"});
        let info = [("shardrop".to_string(), meta.to_string())].into();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &raw).unwrap();
        forged.push((
            entry.name.clone(),
            safetensors::serialize(vec![(t.name.clone(), view)], Some(info)).unwrap(),
        ));
    }
    let signed = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(MERGED_CODEC, Default::default())
        .clock_ms(clock(reg).closes(w))
        .sections(forged, Compression::Zstd)
        .unwrap()
        .sign(key)
        .unwrap();
    let m = list.merged.as_mut().unwrap();
    m.sections = signed
        .header
        .sections
        .iter()
        .map(ListedSection::from)
        .collect();
    agg.store
        .put(&mkey, signed.to_vec().unwrap().into())
        .await
        .unwrap();
    let signed_list = EnvelopeBuilder::new(Kind::Agg, &reg.run)
        .window(w)
        .codec(AGG_V2_CODEC, Default::default())
        .clock_ms(clock(reg).closes(w))
        .sections(
            vec![(LIST_SECTION.to_string(), serde_json::to_vec(&list).unwrap())],
            Compression::Zstd,
        )
        .unwrap()
        .sign(key)
        .unwrap();
    agg.store
        .put(
            &agg.path(&layout::agg(&reg.run, w)),
            signed_list.to_vec().unwrap().into(),
        )
        .await
        .unwrap();
}

/// The merged tensors of window `w` (agg-v2), by name and as one sparse vector.
async fn merged_window(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
) -> (BTreeMap<String, Vec<f32>>, SparseUpdate) {
    let Fetched::Listed(list) = fetch_aggregate(reg, s3, w).await.unwrap() else {
        panic!("agg-v2 expected");
    };
    let all = |_: usize| true;
    let spooled = shardrop::round::merge::fetch_listed(reg, s3, &list, &all, None)
        .await
        .unwrap();
    let (mut by_name, mut pairs, mut off) = (BTreeMap::new(), Vec::new(), 0u64);
    spooled
        .merge(reg, &all, |i, acc| {
            by_name.insert(reg.model.tensors[i].name.clone(), acc.to_vec());
            pairs.extend(
                acc.iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(k, v)| (off + k as u64, *v)),
            );
            off += acc.len() as u64;
            Ok(())
        })
        .unwrap();
    (by_name, SparseUpdate::from_pairs(pairs))
}

/// The validator streams its statistics section by section and slab by slab; they must be
/// the whole-update reference's (overlap and similarity bit for bit, agreement within f64
/// rounding), whatever form the past aggregate it compares with travels in, and its verdicts
/// must be the aggregator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validator_streams_the_reference_statistics_in_every_format() {
    let Some(root) = common::s3("agg-v2-validate") else {
        return;
    };
    let s3 = opts();
    let area = |name: &str| root.join(name);
    let (aggregator, validator) = (Identity::generate(), Identity::generate());
    let miners: Vec<Identity> = (0..6).map(|_| Identity::generate()).collect();
    let run = new_run(&root, "validate", 8, &miners).await;
    let with = |store: &str, spec: AggregateSpec, val: &str| {
        let mut r = run.clone();
        r.aggregate = spec;
        r.participants.push(Participant::new(
            Role::Aggregator,
            &aggregator.peer_id(),
            area(store).url(),
        ));
        r.participants.push(Participant::new(
            Role::Validator,
            &validator.peer_id(),
            area(val).url(),
        ));
        r
    };
    let regs = [
        with("agg1", AggregateSpec::default(), "val1"),
        with("agg2", AggregateSpec::v2(AggForm::Shards), "val2"),
        with("agg4", AggregateSpec::v2(AggForm::Merged), "val4"),
    ];
    let v2 = &regs[1];
    let clk = clock(v2);
    let publish = |w: u64, i: usize, u: Vec<u8>| {
        let (s3, miners) = (&s3, &miners);
        async move {
            publish_opts(
                Job::new(v2, &miners[i], s3),
                Some(w),
                Update::file(&u, &mut EfState::default()),
                PublishOptions {
                    encoder: Some(&mut small_sections),
                },
            )
            .await
            .unwrap()
        }
    };
    // Window 0: four miners and a 40x outlier (clipped); miner 5 absent.
    futures::future::join_all(
        (0..5).map(|i| publish(0, i, update(i as f32, if i == 4 { 40.0 } else { 1.0 }))),
    )
    .await;
    wait_until(&area("op"), clk.closes(0)).await;
    for reg in &regs {
        aggregate_window_opts(
            Job::new(reg, &aggregator, &s3),
            0,
            &AggregateOptions::default().with_concurrency(3),
        )
        .await
        .unwrap();
    }
    // Window 1: three honest miners; miner 3 re-encodes window 0's aggregate; miner 4, after
    // miner 0, sends miner 0's update scaled (a near copy).
    let (agg0, past) = merged_window(v2, &s3, 0).await;
    let agg0_file = {
        use safetensors::{Dtype, tensor::TensorView};
        let bytes: Vec<(String, Vec<u64>, Vec<u8>)> = v2
            .model
            .tensors
            .iter()
            .map(|t| {
                let b = agg0[&t.name].iter().flat_map(|v| v.to_le_bytes()).collect();
                (t.name.clone(), t.shape.clone(), b)
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| {
                let shape = s.iter().map(|&d| d as usize).collect();
                (n.clone(), TensorView::new(Dtype::F32, shape, b).unwrap())
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    futures::future::join_all(
        (0..3)
            .map(|i| publish(1, i, update(i as f32 + 10.0, 1.0)))
            .chain([publish(1, 3, agg0_file)]),
    )
    .await;
    publish(1, 4, update(10.0, 3.0)).await;
    wait_until(&area("op"), clk.closes(1)).await;
    aggregate_window_opts(
        Job::new(v2, &aggregator, &s3),
        1,
        &AggregateOptions::default().with_concurrency(3),
    )
    .await
    .unwrap();

    let mut tables = Vec::new();
    for reg in &regs {
        let v = validate_window(
            Job::new(reg, &validator, &s3),
            1,
            None,
            &ValidateOptions::default(),
        )
        .await
        .unwrap();
        tables.push(v.rows);
    }
    assert_eq!(tables[0], tables[1], "past aggregate agg-v1 against shards");
    assert_eq!(tables[1], tables[2], "past aggregate shards against merged");
    let rows = &tables[1];
    let ledger = ledger(&area("agg2"), v2, 1).await;
    for r in rows {
        let l = ledger.iter().find(|l| l.peer == r.peer).unwrap();
        assert_eq!((&r.verdict, &r.reason), (&l.verdict, &l.reason), "{r:?}");
    }
    // The reference, from every accepted shard decoded whole.
    let index = |peer: &str| {
        miners
            .iter()
            .position(|m| m.peer_id().to_string() == peer)
            .unwrap()
    };
    let mut ups: Vec<Option<SparseUpdate>> = Vec::new();
    for r in rows {
        let i = index(&r.peer);
        ups.push(match r.verdict.as_str() {
            "accepted" => Some(decoded(v2, &area(&format!("m{i}")), 1, &miners[i]).await),
            _ => None,
        });
    }
    assert_eq!(ups.iter().flatten().count(), 5, "{rows:?}");
    let eligible: Vec<bool> = rows
        .iter()
        .zip(&ups)
        .map(|(r, u)| u.is_some() && !r.copier)
        .collect();
    let len: u64 = v2
        .model
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<u64>())
        .sum();
    let agree = reference::agreement(len as usize, &ups, &eligible);
    let mut seen_agg = false;
    for (k, r) in rows.iter().enumerate() {
        let Some(u) = &ups[k] else { continue };
        match (r.agreement, agree[k]) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{a} vs {b}: {r:?}"),
            (a, b) => assert_eq!(a, b, "{r:?}"),
        }
        let nearest = r.nearest.as_deref().unwrap();
        let (ov, cos) = if nearest == "agg:0" {
            seen_agg = true;
            reference::similarity_to_aggregate(u, &past)
        } else {
            let j = rows.iter().position(|x| x.peer == nearest).unwrap();
            reference::similarity(u, ups[j].as_ref().unwrap())
        };
        assert_eq!(
            (
                r.overlap.unwrap().to_bits(),
                r.similarity.unwrap().to_bits()
            ),
            (ov.to_bits(), cos.to_bits()),
            "{r:?}"
        );
    }
    assert!(seen_agg, "the aggregate's re-encoding is nearest to it");
    let row = |i: usize| {
        rows.iter()
            .find(|r| r.peer == miners[i].peer_id().to_string())
            .unwrap()
    };
    assert!(
        row(3).copier && row(3).nearest.as_deref() == Some("agg:0"),
        "{:?}",
        row(3)
    );
    assert!(row(4).copier, "{:?}", row(4));
    assert_eq!(
        row(4).nearest.as_deref(),
        Some(&*miners[0].peer_id().to_string())
    );
    assert!(
        !row(0).copier,
        "the original, committed first: {:?}",
        row(0)
    );
}
