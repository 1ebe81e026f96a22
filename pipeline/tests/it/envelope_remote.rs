//! Envelopes through real stores: the head costs one small ranged GET, one section costs one
//! ranged GET of exactly its bytes, and store faults surface as errors, never as accepted data.

use crate::common;

use std::sync::Arc;

use crate::common::fault::{Calls, FaultAction, FaultRule, Faults};
use object_store::{ObjectStoreExt, PutPayload};
use shardrop::format::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, Limits, Reason, RemoteEnvelope,
    stream_section, verify_sections,
};
use shardrop::identity::Identity;
use shardrop::store::metrics::Metrics;
use shardrop::store::{Op, Target, put_create};

fn id() -> Identity {
    Identity::from_seed([11; 32])
}

fn envelope(big: usize) -> shardrop::format::envelope::SignedEnvelope {
    EnvelopeBuilder::new(Kind::Grad, "remote")
        .window(3)
        .section("big.bin", &common::noise(big, 5), Compression::Zstd)
        .unwrap()
        .section("small.txt", b"just a few bytes", Compression::None)
        .unwrap()
        .sign(&id())
        .unwrap()
}

fn expect() -> Expect {
    Expect {
        signer: Some(id().peer_id()),
        run: Some("remote".into()),
        kind: Some(Kind::Grad),
        window: Some(3),
        step: None,
    }
}

async fn open(t: &Target, key: &str) -> Result<RemoteEnvelope, EnvelopeError> {
    let path = t.path(key);
    RemoteEnvelope::open(
        t.store.as_ref(),
        &path,
        &t.url_of(&path),
        &Limits::default(),
        &expect(),
    )
    .await
}

async fn head_and_section_reads(t: Target) {
    let signed = envelope(2 << 20);
    put_create(&t, &t.path("x.grad"), &signed).await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let watched = t.wrap(Arc::clone(&metrics));
    let env = open(&watched, "x.grad").await.unwrap();
    let first = metrics.get(Op::Get);
    assert_eq!(first.requests, 1, "the head must come with one GET");
    assert!(
        first.bytes <= 64 << 10,
        "the head GET fetched {} bytes",
        first.bytes
    );
    let small = stream_section(
        watched.store.as_ref(),
        &env,
        "small.txt",
        Vec::new(),
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(small, b"just a few bytes");
    let after = metrics.get(Op::Get);
    assert_eq!(after.requests, 2);
    assert_eq!(
        after.bytes - first.bytes,
        16,
        "one section read fetches exactly that section"
    );
    verify_sections(watched.store.as_ref(), &env, &Limits::default(), &|_| {})
        .await
        .unwrap();
    assert_eq!(
        metrics.get(Op::Get).requests,
        3,
        "all sections come in one ranged GET"
    );
}

#[tokio::test]
async fn remote_reads_fetch_only_what_they_need_memory() {
    head_and_section_reads(common::memory("remote")).await;
}

#[tokio::test]
async fn remote_reads_fetch_only_what_they_need_s3() {
    if let Some(t) = common::s3("remote") {
        head_and_section_reads(t).await;
    }
}

async fn hostile_objects(t: Target) {
    let good = envelope(10_000).to_vec().unwrap();
    t.store
        .put(
            &t.path("cut.grad"),
            PutPayload::from(good[..good.len() - 10].to_vec()),
        )
        .await
        .unwrap();
    let e = open(&t, "cut.grad").await.unwrap_err();
    assert_eq!(e.rejection().unwrap().reason, Reason::Truncated, "{e}");
    assert!(
        e.to_string().contains("cut.grad"),
        "errors name the object: {e}"
    );
    t.store
        .put(&t.path("empty.grad"), PutPayload::from_static(b""))
        .await
        .unwrap();
    assert_eq!(
        open(&t, "empty.grad")
            .await
            .unwrap_err()
            .rejection()
            .unwrap()
            .reason,
        Reason::NotEnvelope
    );
    assert!(matches!(
        open(&t, "missing.grad").await,
        Err(EnvelopeError::NotFound { .. })
    ));
    // A header over 64 KiB needs a second ranged GET and still verifies.
    let mut b = EnvelopeBuilder::new(Kind::Grad, "remote").window(3);
    for i in 0..1500 {
        b = b
            .section(
                &format!("section-number-{i:05}"),
                format!("payload {i}").as_bytes(),
                Compression::None,
            )
            .unwrap();
    }
    let many = b.sign(&id()).unwrap();
    assert!(many.head.len() > 64 << 10);
    put_create(&t, &t.path("many.grad"), &many).await.unwrap();
    let env = open(&t, "many.grad").await.unwrap();
    let s = stream_section(
        t.store.as_ref(),
        &env,
        "section-number-01234",
        Vec::new(),
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(s, b"payload 1234");
    verify_sections(t.store.as_ref(), &env, &Limits::default(), &|_| {})
        .await
        .unwrap();
}

#[tokio::test]
async fn hostile_objects_memory() {
    hostile_objects(common::memory("hostile")).await;
}

#[tokio::test]
async fn hostile_objects_s3() {
    if let Some(t) = common::s3("hostile") {
        hostile_objects(t).await;
    }
}

#[tokio::test]
async fn injected_faults_are_errors_not_data() {
    let t = common::memory("faults");
    put_create(&t, &t.path("x.grad"), &envelope(300_000))
        .await
        .unwrap();
    // A body cut short mid-section: the reader says truncated, never returns partial data.
    let faults = Arc::new(Faults::new(
        7,
        vec![FaultRule {
            op: Some(Op::Get),
            path_contains: None,
            calls: Calls::Nth(vec![2]),
            action: FaultAction::Truncate(1000),
        }],
    ));
    let f = t.wrap(Arc::clone(&faults));
    let env = open(&f, "x.grad").await.unwrap();
    let e = stream_section(
        f.store.as_ref(),
        &env,
        "big.bin",
        Vec::new(),
        &Limits::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.rejection().map(|r| r.reason),
        Some(Reason::Truncated),
        "{e}"
    );
    assert_eq!(faults.injected(), 1);
    // A failed request is a store error (retryable), not a verdict on the object.
    let f = t.wrap(Arc::new(Faults::new(
        7,
        vec![FaultRule {
            op: Some(Op::Get),
            path_contains: Some("x.grad".into()),
            calls: Calls::Nth(vec![1]),
            action: FaultAction::Fail,
        }],
    )));
    let e = open(&f, "x.grad").await.unwrap_err();
    assert!(
        e.rejection().is_none(),
        "a store failure must not be recorded as a rejection: {e}"
    );
    assert!(
        open(&f, "x.grad").await.is_ok(),
        "the second call is not faulted"
    );
    // A create-only put retries a failed request itself (safe: a landed attempt would be
    // found identical); when every attempt fails it leaves nothing behind, and a later
    // call creates the object.
    let once = t.wrap(Arc::new(Faults::new(
        1,
        vec![FaultRule {
            op: Some(Op::Put),
            path_contains: None,
            calls: Calls::Nth(vec![1]),
            action: FaultAction::Fail,
        }],
    )));
    let signed = envelope(1000);
    assert!(
        put_create(&once, &once.path("z.grad"), &signed)
            .await
            .is_ok()
    );
    let f = t.wrap(Arc::new(Faults::new(
        1,
        vec![FaultRule {
            op: Some(Op::Put),
            path_contains: None,
            calls: Calls::Nth(vec![1, 2, 3, 4]),
            action: FaultAction::Fail,
        }],
    )));
    assert!(put_create(&f, &f.path("y.grad"), &signed).await.is_err());
    assert!(f.store.head(&f.path("y.grad")).await.is_err());
    assert!(put_create(&f, &f.path("y.grad"), &signed).await.is_ok());
    // Delays slow calls down without changing results; probabilistic faults are seeded.
    let f = t.wrap(Arc::new(Faults::new(
        3,
        vec![FaultRule {
            op: None,
            path_contains: None,
            calls: Calls::Probability(1.0),
            action: FaultAction::Delay(std::time::Duration::from_millis(5)),
        }],
    )));
    assert!(open(&f, "x.grad").await.is_ok());
    let count = |seed| {
        let faults = Faults::new(
            seed,
            vec![FaultRule {
                op: None,
                path_contains: None,
                calls: Calls::Probability(0.5),
                action: FaultAction::Fail,
            }],
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let t2 = t.wrap(Arc::new(faults));
        (0..40)
            .map(|_| rt.block_on(async { t2.store.head(&t2.path("x.grad")).await.is_err() }))
            .collect::<Vec<_>>()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| count(9));
        let b = s.spawn(|| count(9));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a, b, "the same seed replays the same faults");
    assert!(a.iter().any(|x| *x) && a.iter().any(|x| !*x));
}

#[tokio::test]
async fn metrics_count_puts_and_lists() {
    let t = common::memory("metrics");
    let m = Arc::new(Metrics::default());
    let w = t.wrap(Arc::clone(&m));
    put_create(&w, &w.path("a"), b"12345".as_ref())
        .await
        .unwrap();
    let _ = futures::TryStreamExt::try_collect::<Vec<_>>(w.store.list(Some(&w.prefix)))
        .await
        .unwrap();
    let snap = m.snapshot();
    assert_eq!(snap["put"].requests, 1);
    assert_eq!(snap["put"].bytes, 5);
    assert_eq!(snap["list"].requests, 1);
}
