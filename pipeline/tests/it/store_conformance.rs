//! One store conformance suite, run against memory, a local folder and the real S3 server.
//! It pins every store behaviour shardrop relies on.

use crate::common;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use shardrop::store::{PutOutcome, SINGLE_PUT_MAX, StoreError, Target, put_cas, put_create};

async fn suite(t: &Target) {
    let s = t.store.as_ref();
    let p = |k: &str| t.path(k);

    // put, get, ranged get
    let data = common::noise(100_000, 1);
    s.put(&p("a/one"), PutPayload::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(
        s.get(&p("a/one")).await.unwrap().bytes().await.unwrap(),
        data
    );
    assert_eq!(
        s.get_range(&p("a/one"), 1000..1010).await.unwrap(),
        &data[1000..1010]
    );
    let clamped = s
        .get_opts(
            &p("a/one"),
            object_store::GetOptions::new()
                .with_range(Some(object_store::GetRange::Bounded(99_990..200_000))),
        )
        .await
        .unwrap();
    assert_eq!(
        clamped.meta.size, 100_000,
        "a ranged GET reports the whole object's size"
    );
    assert_eq!(
        clamped.bytes().await.unwrap(),
        &data[99_990..],
        "a range past the end is clamped"
    );

    // head: size, last_modified, etag
    let meta = s.head(&p("a/one")).await.unwrap();
    assert_eq!(meta.size, 100_000);
    assert!(meta.last_modified.timestamp() > 1_600_000_000);
    assert!(
        meta.e_tag.is_some(),
        "stores must give ETags (compare-and-swap needs them)"
    );

    // list by prefix (segment-wise: a/ does not match ab/)
    s.put(&p("a/two"), PutPayload::from_static(b"2"))
        .await
        .unwrap();
    s.put(&p("ab/three"), PutPayload::from_static(b"3"))
        .await
        .unwrap();
    let mut listed: Vec<String> = s
        .list(Some(&p("a")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, vec![p("a/one").to_string(), p("a/two").to_string()]);
    let delim = s.list_with_delimiter(Some(&t.prefix)).await.unwrap();
    assert_eq!(delim.common_prefixes.len(), 2);

    // create-only put refused when the object exists
    let create = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let err = s
        .put_opts(&p("a/one"), PutPayload::from_static(b"x"), create.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::AlreadyExists { .. }),
        "{err}"
    );
    assert_eq!(
        s.get(&p("a/one")).await.unwrap().bytes().await.unwrap(),
        data,
        "refused put changed nothing"
    );

    // shardrop's put_create: identical retry succeeds, different bytes refused (small and large)
    let small = Bytes::from_static(b"final object");
    assert_eq!(
        put_create(t, &p("c/small"), small.as_ref()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        put_create(t, &p("c/small"), small.as_ref()).await.unwrap(),
        PutOutcome::AlreadyIdentical
    );
    let e = put_create(t, &p("c/small"), b"final objecT".as_ref())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    let large = common::noise(SINGLE_PUT_MAX as usize + 3_000_000, 2);
    assert_eq!(
        put_create(t, &p("c/large"), large.as_slice())
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        s.head(&p("c/large")).await.unwrap().size,
        large.len() as u64
    );
    assert_eq!(
        put_create(t, &p("c/large"), large.as_slice())
            .await
            .unwrap(),
        PutOutcome::AlreadyIdentical
    );
    let mut altered = large.clone();
    altered[SINGLE_PUT_MAX as usize + 5] ^= 1;
    assert!(matches!(
        put_create(t, &p("c/large"), altered.as_slice()).await,
        Err(StoreError::Conflict { .. })
    ));

    // compare-and-swap on the ETag
    let e1 = put_cas(t, &p("ptr"), Bytes::from_static(b"v1"), None)
        .await
        .unwrap();
    assert!(matches!(
        put_cas(t, &p("ptr"), Bytes::from_static(b"v1b"), None).await,
        Err(StoreError::Precondition { .. })
    ));
    let cur = s.head(&p("ptr")).await.unwrap().e_tag;
    assert!(
        e1.is_none() || e1 == cur,
        "the ETag returned by a put is the object's"
    );
    let e2 = put_cas(t, &p("ptr"), Bytes::from_static(b"v2"), cur.clone())
        .await
        .unwrap();
    let stale = put_cas(t, &p("ptr"), Bytes::from_static(b"v3"), cur.clone()).await;
    assert!(
        matches!(stale, Err(StoreError::Precondition { .. })),
        "a stale ETag must lose: {stale:?}"
    );
    assert_eq!(
        s.get(&p("ptr")).await.unwrap().bytes().await.unwrap(),
        &b"v2"[..]
    );
    let now = s.head(&p("ptr")).await.unwrap().e_tag;
    assert_ne!(now, cur);
    if e2.is_some() {
        assert_eq!(e2, now);
    }

    // multipart of 64 MiB
    let part = 16 << 20;
    let big = common::noise(64 << 20, 3);
    let upload = s.put_multipart(&p("m/big")).await.unwrap();
    let mut w = WriteMultipart::new_with_chunk_size(upload, part);
    for chunk in big.chunks(part) {
        w.wait_for_capacity(4).await.unwrap();
        w.write(chunk);
    }
    w.finish().await.unwrap();
    assert_eq!(s.head(&p("m/big")).await.unwrap().size, 64 << 20);
    let at = (40 << 20) + 17;
    assert_eq!(
        s.get_range(&p("m/big"), at..at + 4096).await.unwrap(),
        &big[at as usize..at as usize + 4096]
    );

    // delete
    s.delete(&p("m/big")).await.unwrap();
    assert!(matches!(
        s.head(&p("m/big")).await,
        Err(object_store::Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn memory_store_conforms() {
    suite(&common::memory("conf")).await;
}

#[tokio::test]
async fn local_folder_conforms() {
    let dir = tempfile::tempdir().unwrap();
    suite(&common::local(dir.path())).await;
}

#[tokio::test]
async fn s3_server_conforms() {
    if let Some(t) = common::s3("conformance") {
        suite(&t).await;
    }
}

#[tokio::test]
async fn concurrent_cas_on_a_local_folder_has_one_winner_per_version() {
    // The folder CAS is built by shardrop (advisory lock + ETag check), so race it.
    let dir = tempfile::tempdir().unwrap();
    let t = common::local(dir.path());
    let path = t.path("LATEST");
    put_cas(&t, &path, Bytes::from_static(b"0"), None)
        .await
        .unwrap();
    let etag = t.store.head(&path).await.unwrap().e_tag;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (t, path, etag) = (t.clone(), path.clone(), etag.clone());
        tasks.push(tokio::spawn(async move {
            put_cas(&t, &path, Bytes::from(format!("{i}")), etag)
                .await
                .is_ok()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += task.await.unwrap() as u32;
    }
    assert_eq!(
        wins, 1,
        "exactly one writer may move a pointer from one version"
    );
}
