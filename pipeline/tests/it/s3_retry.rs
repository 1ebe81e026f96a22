//! Transient S3 failures are retried with backoff: a proxy on 127.0.0.1 answers the first
//! requests with 503 Slow Down (as R2 and S3 do under load) and then forwards to the real
//! server. With retries on, the caller never sees the 503s; with retries off, it does.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use object_store::{ObjectStoreExt, PutPayload};
use shardrop::store::{self, S3Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts the proxy; returns its endpoint and the count of 503s it sent.
async fn flaky_proxy(upstream: String, failures: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            if counter.fetch_add(1, Ordering::SeqCst) < failures {
                // Read the request head, answer 503 and close.
                let mut buf = [0u8; 4096];
                let _ = client.read(&mut buf).await;
                let _ = client
                    .write_all(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let _ = client.shutdown().await;
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (format!("http://{addr}"), sent)
}

#[tokio::test]
async fn slow_down_answers_are_retried() {
    let Some(_) = common::s3("retry") else { return };
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let upstream = endpoint.trim_start_matches("http://").to_string();
    let bucket_url = format!(
        "{}/{}",
        std::env::var("SHARDROP_TEST_S3").unwrap(),
        common::unique("retry")
    );

    let (proxy, sent) = flaky_proxy(upstream.clone(), 3).await;
    let opts = S3Options {
        endpoint: Some(proxy),
        max_retries: Some(5),
        ..Default::default()
    };
    let t = store::open(&bucket_url, &opts).unwrap();
    t.store
        .put(&t.path("obj"), PutPayload::from_static(b"survives"))
        .await
        .unwrap();
    assert_eq!(
        t.store
            .get(&t.path("obj"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        &b"survives"[..]
    );
    assert!(
        sent.load(Ordering::SeqCst) >= 3,
        "the proxy really failed requests"
    );

    let (proxy, _) = flaky_proxy(upstream, 1).await;
    let opts = S3Options {
        endpoint: Some(proxy),
        max_retries: Some(0),
        ..Default::default()
    };
    let t = store::open(&bucket_url, &opts).unwrap();
    let err = t.store.get(&t.path("obj")).await.unwrap_err();
    assert!(
        err.to_string().contains("503") || err.to_string().to_lowercase().contains("slow"),
        "{err}"
    );
}
