//! The window budget under faulty stores (issue 14): 64 miners on the local S3 server, of
//! whom 6 have buckets that accept connections and never answer, 6 answer every request with
//! 503, 6 refuse connections, and 4 truncate or damage what they serve. The aggregator must
//! finish the window within its budget, record the silent ones as `store_error` (timeout),
//! and aggregate the rest. The faulty endpoints run in the test process; the round runs in
//! a child process whose environment points those miners' credential prefixes at them.

use crate::common;

use object_store::ObjectStoreExt;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::format::codec::{self, CodecParams, EfState};
use shardrop::format::layout;
use shardrop::identity::Identity;
use shardrop::round::aggregate::{AggregateOptions, aggregate_window_opts};
use shardrop::round::publish::{Update, publish};
use shardrop::round::registry::{Credentials, Job, Participant, Registry, Role};
use shardrop::round::window::store_now_ms;
use shardrop::store::S3Options;
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

/// Runs `test` of this binary in a child process whose environment points the credential
/// prefixes `SHARDROP_<NAME>_` at the endpoints (tests never change their own environment),
/// with `flag` set so the child runs the round instead of starting endpoints again.
async fn in_child(test: &str, flag: &str, endpoints: &[(&str, u16)]) {
    let envs = endpoints.iter().map(|(name, port)| {
        (
            format!("SHARDROP_{name}_AWS_ENDPOINT_URL"),
            format!("http://127.0.0.1:{port}"),
        )
    });
    let passed = common::run_alone(
        module_path!(),
        test,
        envs.chain([(flag.to_string(), "1".to_string())]),
    )
    .await;
    assert!(passed, "{test}: the round in the child process failed");
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
        in_child(
            "a_window_ends_within_its_budget_whatever_the_stores_do",
            CHILD,
            &endpoints,
        )
        .await;
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
                Update::file(&update(j as f32), &mut EfState::default()),
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
    let on = AggregateOptions::default().with_budget(Some(std::time::Duration::from_secs(4)));
    // A liveness guard, not a speed claim: without a budget this window took minutes.
    let started = std::time::Instant::now();
    let agg = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        aggregate_window_opts(Job::new(&reg, &aggregator, &s3), w, &on),
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

/// A proxy in front of the real S3 server that serves the first `free` bytes of each
/// connection's responses at full speed (the 64 KiB header read gets through), then either
/// trickles one byte a second (`trickle`) or stops sending while keeping the connection
/// open: the miner whose store answers its header read and then never finishes the body.
async fn slow_proxy(upstream: std::net::SocketAddr, free: usize, trickle: bool) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = ur.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut chunk = &buf[..n];
                    let fast = free.saturating_sub(sent).min(chunk.len());
                    if cw.write_all(&chunk[..fast]).await.is_err() {
                        return;
                    }
                    sent += fast;
                    chunk = &chunk[fast..];
                    for b in chunk {
                        if !trickle {
                            // Hold the connection, send nothing more.
                            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                        }
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        if cw.write_all(std::slice::from_ref(b)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// About 90 KB of shard at chunk 256, k 128: more than the 64 KiB header read, so the body
/// needs the reads a slow store holds back.
fn big_update(seed: f32) -> Vec<u8> {
    // Noise (xorshift), so zstd cannot shrink the shard below the header read.
    let mut x = (seed.to_bits() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let w: Vec<u8> = (0..1usize << 18)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
        })
        .collect();
    let views = vec![("w", TensorView::new(Dtype::F32, vec![1 << 18], &w).unwrap())];
    safetensors::serialize(views, None).unwrap()
}

/// One window of 20 miners, the first `slow` of them behind a trickling or stalling proxy
/// (alternately), aggregated in `form` with a 4 s budget. Returns how many honest shards
/// were lost, and checks that the slow ones are `store_error` timeouts.
async fn slow_window(
    root: &shardrop::store::Target,
    s3: &S3Options,
    form: shardrop::round::registry::AggForm,
    slow: usize,
) -> usize {
    let operator = Identity::generate();
    let aggregator = Identity::generate();
    let miners: Vec<Identity> = (0..20).map(|_| Identity::generate()).collect();
    let now = store_now_ms(&root.join("op"), "clock").await.unwrap();
    let mut reg = Registry::new(
        "slow",
        &operator.peer_id(),
        now,
        6,
        2,
        codec::model_of(&big_update(0.0)).unwrap(),
        CodecParams {
            chunk: 256,
            k: 128,
            ..CodecParams::default()
        },
    );
    reg.aggregate = shardrop::round::registry::AggregateSpec::v2(form);
    reg.participants.push(Participant::new(
        Role::Aggregator,
        &aggregator.peer_id(),
        root.join("agg").url(),
    ));
    let validator = Identity::generate();
    reg.participants.push(Participant::new(
        Role::Validator,
        &validator.peer_id(),
        root.join("val").url(),
    ));
    for (j, m) in miners.iter().enumerate() {
        let mut p = Participant::new(Role::Miner, &m.peer_id(), root.join(&format!("m{j}")).url());
        if j < slow {
            let kind = if j % 2 == 0 { "TRICKLE" } else { "STALL" };
            p.credentials = Credentials::EnvPrefix {
                prefix: format!("SHARDROP_{kind}_"),
            };
        }
        reg.participants.push(p);
    }
    let url = reg.create(&root.join("op"), &operator).await.unwrap();
    let (reg, _) = Registry::load(&url, s3, None).await.unwrap();
    let (reg_r, s3_r) = (&reg, s3);
    // Every miner publishes through the real server; only readers go through the proxies.
    let plain = S3Options::default();
    let plain = &plain;
    futures::future::try_join_all(miners.iter().enumerate().map(|(j, m)| async move {
        let mut reg_plain = reg_r.clone();
        for p in reg_plain.participants.iter_mut() {
            p.credentials = Credentials::Ambient;
        }
        publish(
            Job::new(&reg_plain, m, plain),
            Some(0),
            Update::file(&big_update(j as f32), &mut EfState::default()),
        )
        .await
    }))
    .await
    .unwrap();
    common::wait_closed(&reg, &root.join("agg"), 0).await;
    let on = AggregateOptions::default().with_budget(Some(std::time::Duration::from_secs(4)));
    let agg = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        aggregate_window_opts(Job::new(reg_r, &aggregator, s3_r), 0, &on),
    )
    .await
    .expect("the aggregator did not finish the window")
    .unwrap();
    let rows = common::ledger(&root.join("agg"), &reg, 0).await;
    let mut lost = 0;
    for (j, m) in miners.iter().enumerate() {
        let r = &rows[&m.peer_id().to_string()];
        if j < slow {
            assert_eq!(
                (r.verdict.as_str(), r.reason.as_str()),
                ("error", "store_error"),
                "{form:?}: slow miner {j}: {r:?}"
            );
        } else if r.verdict != "accepted" {
            eprintln!("{form:?}, {slow} slow: honest miner {j} lost: {r:?}");
            lost += 1;
        }
    }
    assert_eq!(agg.accepted + lost, 20 - slow, "{agg:?}");
    // The validator on the same window, with the same budget, loses no honest shard either.
    let opts = shardrop::round::score::ValidateOptions {
        budget: Some(std::time::Duration::from_secs(4)),
        concurrency: 16,
        ..Default::default()
    };
    let v = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        shardrop::round::score::validate_window(Job::new(reg_r, &validator, s3_r), 0, None, &opts),
    )
    .await
    .expect("the validator did not finish the window")
    .unwrap();
    for (j, m) in miners.iter().enumerate().skip(slow) {
        let r = v
            .rows
            .iter()
            .find(|r| r.peer == m.peer_id().to_string())
            .unwrap();
        if r.verdict.as_str() != "accepted" {
            eprintln!("{form:?}, {slow} slow: the validator lost honest miner {j}: {r:?}");
            lost += 1;
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_miner_costs_only_itself_in_every_form() {
    const CHILD: &str = "SHARDROP_SLOW_ENDPOINTS";
    if std::env::var(CHILD).is_err() {
        if common::s3("slow").is_none() {
            return;
        }
        let upstream: std::net::SocketAddr = std::env::var("AWS_ENDPOINT_URL")
            .unwrap()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        // 64 KiB of header read plus HTTP's own headers get through; the body does not.
        let free = (64 << 10) + 4096;
        let endpoints = [
            ("TRICKLE", slow_proxy(upstream, free, true).await),
            ("STALL", slow_proxy(upstream, free, false).await),
        ];
        in_child(
            "a_slow_miner_costs_only_itself_in_every_form",
            CHILD,
            &endpoints,
        )
        .await;
        return;
    }
    use shardrop::round::registry::AggForm;
    let s3 = S3Options {
        max_retries: Some(8),
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    };
    let s3 = &s3;
    let trials: Vec<(AggForm, usize)> = [
        AggForm::Auto,
        AggForm::Shards,
        AggForm::Merged,
        AggForm::Reference,
    ]
    .into_iter()
    .flat_map(|f| [1, 3, 6].map(|k| (f, k)))
    .collect();
    let lost = futures::future::join_all(trials.iter().map(|&(form, slow)| async move {
        let root = common::s3(&format!("slow-{}-{slow}", form.name())).unwrap();
        slow_window(&root, s3, form, slow).await
    }))
    .await;
    for (&(form, slow), &l) in trials.iter().zip(&lost) {
        common::report(
            &format!(
                "{slow} slow of 20 miners, form {}: honest shards kept",
                form.name()
            ),
            1,
            usize::from(l == 0),
        );
    }
    assert!(
        lost.iter().all(|&l| l == 0),
        "honest shards lost: {trials:?} {lost:?}"
    );
}
