#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
//! The window budget under faulty stores (issue 14): 64 miners on the local S3 server, of
//! whom 6 have buckets that accept connections and never answer, 6 answer every request with
//! 503, 6 refuse connections, and 4 truncate or damage what they serve. The aggregator must
//! finish the window within its budget, record the silent ones as `store_error` (timeout),
//! and aggregate the rest. The faulty endpoints run in the test process; the round runs in
//! a child process whose environment points those miners' credential prefixes at them.

mod common;

use object_store::ObjectStoreExt;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::aggregate::{MergeOn, aggregate_window_on};
use shardrop::codec::{self, CodecParams, EfState};
use shardrop::exchange::publish;
use shardrop::identity::Identity;
use shardrop::layout;
use shardrop::registry::{Credentials, Job, Participant, Registry, Role};
use shardrop::store::S3Options;
use shardrop::window::store_now_ms;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn update(seed: f32) -> Vec<u8> {
    let w: Vec<u8> = (0..2048)
        .flat_map(|i| (((i as f32) * 0.37 + seed).sin() * 0.01).to_le_bytes())
        .collect();
    let views = vec![("w", TensorView::new(Dtype::F32, vec![2048], &w).unwrap())];
    safetensors::serialize(views, None).unwrap()
}

/// A listener that accepts and then says nothing, forever.
async fn hanging() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    port
}

/// A server that answers every request with 503.
async fn unavailable() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                    if s.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A port nothing listens on.
fn refusing() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_ends_within_its_budget_whatever_the_stores_do() {
    const CHILD: &str = "SHARDROP_BUDGET_ENDPOINTS";
    if std::env::var(CHILD).is_err() {
        // The faulty endpoints live here; the round runs in a child process of this test
        // binary whose environment names them (tests never change their own environment).
        if common::s3("budget").is_none() {
            return;
        }
        let endpoints = [
            ("HANG", hanging().await),
            ("BUSY", unavailable().await),
            ("DOWN", refusing()),
        ];
        let status = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_window_ends_within_its_budget_whatever_the_stores_do",
                "--nocapture",
            ])
            .envs(endpoints.map(|(name, port)| {
                (
                    format!("SHARDROP_{name}_AWS_ENDPOINT_URL"),
                    format!("http://127.0.0.1:{port}"),
                )
            }))
            .env(CHILD, "1")
            .status()
            .await
            .unwrap();
        assert!(status.success(), "the round in the child process failed");
        return;
    }
    let Some(root) = common::s3("budget") else {
        return;
    };
    // Generous per-request timeouts and retries, as in production: only the budget ends
    // the window.
    let s3 = S3Options {
        max_retries: Some(8),
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    };
    let operator = Identity::generate();
    let aggregator = Identity::generate();
    let miners: Vec<Identity> = (0..64).map(|_| Identity::generate()).collect();
    // Miner j: 0..6 hang, 6..12 busy, 12..18 down, 18..20 truncated, 20..22 damaged, rest honest.
    let fault_of = |j: usize| match j {
        0..6 => Some("HANG"),
        6..12 => Some("BUSY"),
        12..18 => Some("DOWN"),
        _ => None,
    };
    let now = store_now_ms(&root.join("op"), "clock").await.unwrap();
    let mut reg = Registry::new(
        "budget",
        &operator.peer_id(),
        now,
        6,
        2,
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
    for (j, m) in miners.iter().enumerate() {
        let mut p = Participant::new(Role::Miner, &m.peer_id(), root.join(&format!("m{j}")).url());
        if let Some(f) = fault_of(j) {
            p.credentials = Credentials::EnvPrefix {
                prefix: format!("SHARDROP_{f}_"),
            };
        }
        reg.participants.push(p);
    }
    let url = reg.create(&root.join("op"), &operator).await.unwrap();
    let (reg, _) = Registry::load(&url, &s3, None).await.unwrap();
    let w = 0;
    let (reg_r, s3_r) = (&reg, &s3);
    futures::future::try_join_all((18..64).map(|j| {
        let m = &miners[j];
        async move {
            publish(
                Job::new(reg_r, m, s3_r),
                Some(w),
                &update(j as f32),
                &mut EfState::default(),
            )
            .await
        }
    }))
    .await
    .unwrap();
    // Truncated and damaged shards, served by the real server.
    for (j, m) in miners.iter().enumerate().take(22).skip(18) {
        let area = root.join(&format!("m{j}"));
        let path = area.path(&layout::grad(&reg.run, w, &m.peer_id()));
        let mut bytes = area
            .store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        if j < 20 {
            bytes.truncate(bytes.len() - 10);
        } else {
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
        }
        area.store.put(&path, bytes.into()).await.unwrap();
    }
    common::wait_closed(&reg, &root.join("agg"), w).await;
    let on = MergeOn::default().with_budget(Some(std::time::Duration::from_secs(4)));
    // A liveness guard, not a speed claim: without a budget this window took minutes.
    let started = std::time::Instant::now();
    let agg = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        aggregate_window_on(Job::new(&reg, &aggregator, &s3), w, 16, &on),
    )
    .await
    .expect("the aggregator did not finish the window")
    .unwrap();
    eprintln!(
        "budget: window aggregated {:.1} s after its close with a 4 s budget",
        started.elapsed().as_secs_f64()
    );
    let rows = common::ledger(&root.join("agg"), &reg, w).await;
    assert_eq!(agg.accepted, 42, "{agg:?} {rows:?}");
    for (j, m) in miners.iter().enumerate() {
        let r = &rows[&m.peer_id().to_string()];
        let want = match j {
            0..18 => ("error", "store_error"),
            18..20 => ("rejected", "truncated"),
            20..22 => ("rejected", "section_hash_mismatch"),
            _ => ("accepted", ""),
        };
        assert_eq!(
            (r.verdict.as_str(), r.reason.as_str()),
            want,
            "miner {j}: {r:?}"
        );
        if j < 6 {
            assert!(r.detail.contains("timeout"), "miner {j}: {}", r.detail);
        }
    }
}
