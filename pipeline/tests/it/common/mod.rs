#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
//! Shared test setup: the S3 target from `tools/s3-server env`, under a fresh prefix.
#![allow(dead_code)]

use shardrop::store::{self, S3Options, Target};

pub mod fault;
mod report;
#[allow(unused_imports)] // not every test binary writes to the chaos report
pub use report::report;

/// A unique prefix per call, so tests never see each other's objects.
pub fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The local S3-compatible server started by `tools/test`, or `None` when this run has none.
/// With `SHARDROP_S3_REQUIRED=1` (set by `tools/test` and CI) a missing server fails the test
/// instead of skipping it.
pub fn s3(name: &str) -> Option<Target> {
    match std::env::var("SHARDROP_TEST_S3") {
        Ok(url) => Some(
            store::open(&format!("{url}/{}", unique(name)), &S3Options::default())
                .expect("open S3 test store"),
        ),
        Err(_) => {
            if std::env::var("SHARDROP_S3_REQUIRED").is_ok_and(|v| v == "1") {
                panic!(
                    "SHARDROP_TEST_S3 is not set but SHARDROP_S3_REQUIRED=1: start it with tools/s3-server"
                );
            }
            eprintln!("skipping the S3 part of {name}: no SHARDROP_TEST_S3 (run tools/test)");
            None
        }
    }
}

/// The moto server started by `tools/test` (atomic conditional writes, `last_modified` in
/// whole seconds), with the credentials a registry names by the prefix `MOTO_PREFIX`.
/// `None` when this run has none; `SHARDROP_MOTO_REQUIRED=1` makes that a failure.
pub fn moto(name: &str) -> Option<Target> {
    match std::env::var("SHARDROP_TEST_MOTO") {
        Ok(url) => Some(
            store::open(&format!("{url}/{}", unique(name)), &moto_options())
                .expect("open moto test store"),
        ),
        Err(_) => {
            if std::env::var("SHARDROP_MOTO_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("SHARDROP_TEST_MOTO is not set but SHARDROP_MOTO_REQUIRED=1");
            }
            eprintln!("skipping the moto part of {name}: no SHARDROP_TEST_MOTO (run tools/test)");
            None
        }
    }
}

/// The registry credentials prefix that reaches the moto server.
pub const MOTO_PREFIX: &str = "SHARDROP_MOTO_";

pub fn moto_options() -> S3Options {
    let var = |n: &str| std::env::var(format!("{MOTO_PREFIX}{n}")).ok();
    S3Options {
        endpoint: var("AWS_ENDPOINT_URL"),
        region: var("AWS_REGION"),
        access_key_id: var("AWS_ACCESS_KEY_ID"),
        secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
        allow_http: Some(true),
        timeout: Some(std::time::Duration::from_secs(10)),
        max_retries: Some(2),
    }
}

pub fn local(dir: &std::path::Path) -> Target {
    store::open(&dir.display().to_string(), &S3Options::default()).expect("open local store")
}

pub fn memory(name: &str) -> Target {
    store::open(&format!("memory://{}", unique(name)), &S3Options::default())
        .expect("open memory store")
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a Python script (`$SHARDROP_PYTHON`, else `python3`) with these arguments and parses
/// its standard output as JSON. `None` when Python or its packages are missing and the run
/// does not require them (`SHARDROP_NUMPY_REQUIRED=1`, set by `tools/test`, makes that fail).
pub fn python_json(
    what: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> Option<serde_json::Value> {
    let python = std::env::var("SHARDROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let got = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output();
    let required = std::env::var("SHARDROP_NUMPY_REQUIRED").is_ok_and(|v| v == "1");
    match got {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).expect("JSON")),
        other => {
            assert!(!required, "{what} failed: {other:?}");
            eprintln!("skipping {what}: {other:?}");
            None
        }
    }
}

/// Flips one bit of a stored object at `at` (a byte offset, or the middle when `None`): what
/// a damaged or tampered object looks like to a reader.
pub async fn flip_bit(target: &Target, path: &object_store::path::Path, at: Option<usize>) {
    use object_store::ObjectStoreExt;
    let mut b = target
        .store
        .get(path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let i = at.unwrap_or(b.len() / 2);
    b[i] ^= 1;
    target.store.put(path, b.into()).await.unwrap();
}

/// The round tests' update: `w` 60×100 and `b` 100, f32, different per seed.
pub fn update(seed: f32) -> Vec<u8> {
    use safetensors::{Dtype, tensor::TensorView};
    let w: Vec<u8> = (0..6000)
        .flat_map(|i| (((i as f32) * 0.37 + seed).sin() * 0.01).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..100)
        .flat_map(|i| (((i as f32) * 1.3 + seed).cos() * 0.02).to_le_bytes())
        .collect();
    let views = vec![
        ("w", TensorView::new(Dtype::F32, vec![60, 100], &w).unwrap()),
        ("b", TensorView::new(Dtype::F32, vec![100], &b).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// Waits until window `w` of `reg` has closed by the clock of the store behind `t`.
pub async fn wait_closed(reg: &shardrop::round::registry::Registry, t: &Target, w: u64) {
    let closes = shardrop::round::publish::clock(reg).closes(w);
    loop {
        let now = shardrop::round::window::store_now_ms(t, "clock")
            .await
            .unwrap();
        if now >= closes {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(closes - now + 20)).await;
    }
}

/// The ledger the aggregator (whose area is `agg`) wrote for window `w`, by peer.
pub async fn ledger(
    agg: &Target,
    reg: &shardrop::round::registry::Registry,
    w: u64,
) -> std::collections::BTreeMap<String, shardrop::format::tables::LedgerRow> {
    use object_store::ObjectStoreExt;
    let bytes = agg
        .store
        .get(&agg.path(&shardrop::format::layout::ledger(&reg.run, w)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    shardrop::format::tables::read_ledger(bytes)
        .unwrap()
        .into_iter()
        .map(|r| (r.peer.clone(), r))
        .collect()
}

/// Runs test `test` of `module` (the caller's `module_path!()`) of this binary alone in a
/// child process, with `envs` added to its environment: for a test that measures the whole
/// process, or whose set-up goes through the environment (which tests never change for
/// themselves). Returns whether it passed.
pub async fn run_alone(
    module: &str,
    test: &str,
    envs: impl IntoIterator<Item = (String, String)>,
) -> bool {
    // The test's name in this binary: its module path without the crate's (`budget_s3::…`).
    let module = module.split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::{test}");
    tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--nocapture"])
        .envs(envs)
        .status()
        .await
        .unwrap()
        .success()
}
