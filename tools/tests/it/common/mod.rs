#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
//! Helpers the CLI test binaries share: running the built `shardrop`, reading its JSON,
//! killing it part-way, and a small update to publish.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `shardrop` with these arguments (and extra environment) to completion.
pub fn shardrop_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardrop"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run shardrop")
}

pub fn shardrop(args: &[&str]) -> Output {
    shardrop_env(args, &[])
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON document of a successful command (the test fails with its stderr otherwise).
pub fn ok_json(out: impl std::borrow::Borrow<Output>) -> serde_json::Value {
    let out = out.borrow();
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The JSON document on stdout, whatever the exit status.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Starts a command, kills it after `ms` and says whether it had already finished.
pub fn start_and_kill(args: &[&str], env: &[(&str, &str)], ms: u64) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardrop"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn shardrop");
    std::thread::sleep(std::time::Duration::from_millis(ms));
    let finished = matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.kill();
    let _ = child.wait();
    finished
}

/// A safetensors file's tensors (name, bytes), sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A two-tensor f32 update (`w` 64×64, `b` 64), different per seed.
pub fn write_update(path: &Path, seed: f32) {
    let w: Vec<u8> = (0..4096)
        .flat_map(|i| (((i as f32) * 0.37 + seed).sin() * 0.01).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..64)
        .flat_map(|i| (((i as f32) * 1.3 + seed).cos() * 0.02).to_le_bytes())
        .collect();
    let views = vec![
        (
            "w",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 64], &w)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64], &b).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A fresh prefix `<kind>-<name>-<pid>-<nanos>` in the local S3 test server's bucket, or
/// `None` when the server is not configured (which `SHARDROP_S3_REQUIRED` forbids).
pub fn s3_base(kind: &str, name: &str) -> Option<String> {
    match std::env::var("SHARDROP_TEST_S3") {
        Ok(url) => Some(format!(
            "{url}/{kind}-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )),
        Err(_) => {
            assert!(
                std::env::var("SHARDROP_S3_REQUIRED").is_err(),
                "SHARDROP_TEST_S3 missing"
            );
            None
        }
    }
}

/// Deterministic delays in `0..max_ms` (xorshift from `seed`): "random" kill points that
/// a failing run reproduces.
pub fn delays(seed: u64, n: usize, max_ms: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % max_ms
        })
        .collect()
}

#[path = "../../../../pipeline/tests/it/common/report.rs"]
mod chaos_report;
#[allow(unused_imports)] // not every test module writes to the chaos report
pub use chaos_report::report;

/// A run made through the CLI: its registry URL, operator key and the store base its
/// participants' areas live under, with the environment every command gets.
pub struct Run {
    pub reg: String,
    pub op_key: String,
    pub base: String,
    pub env: Vec<(String, String)>,
}

impl Run {
    /// `run init` (window_secs, grace 2 s, chunk 256, k 8; the model is `write_update`'s) in
    /// `base`, keys in `dir`, and an aggregator whose key goes to `agg_key`.
    pub fn init(
        dir: &Path,
        base: &str,
        name: &str,
        window_secs: u64,
        agg_key: &Path,
        env: &[(&str, &str)],
    ) -> Run {
        Run::init_with(dir, base, name, window_secs, agg_key, env, &[])
    }

    /// `init` with more `run init` flags (an aggregate form, an outer optimizer), and the
    /// model at `dir/model.safetensors` if the test wrote one.
    pub fn init_with(
        dir: &Path,
        base: &str,
        name: &str,
        window_secs: u64,
        agg_key: &Path,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Run {
        let op_key = dir.join(format!("{name}-op.key"));
        ok_json(shardrop(&["keygen", "--out", p(&op_key), "--json"]));
        // A test may bring its own model (written there first); the default is
        // `write_update`'s.
        let model = dir.join("model.safetensors");
        if !model.exists() {
            write_update(&model, 0.0);
        }
        let (op_store, secs) = (format!("{base}/op"), window_secs.to_string());
        let mut args = vec![
            "run",
            "init",
            "--run",
            name,
            "--key",
            p(&op_key),
            "--store",
            &op_store,
            "--model",
            p(&model),
            "--window-secs",
            &secs,
            "--grace-secs",
            "2",
            "--chunk",
            "256",
            "--k",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        let reg = ok_json(shardrop_env(&args, env))["registry"]
            .as_str()
            .unwrap()
            .to_string();
        let run = Run {
            reg,
            op_key: p(&op_key).to_string(),
            base: base.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let agg = ok_json(shardrop(&["keygen", "--out", p(agg_key), "--json"]));
        run.add("aggregator", agg["peer_id"].as_str().unwrap(), "agg");
        run
    }

    pub fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        shardrop_env(args, &self.env())
    }

    /// `run add` of `peer` in `role`, its store the area `area` under the run's base.
    pub fn add(&self, role: &str, peer: &str, area: &str) {
        self.add_with(role, peer, area, &[]);
    }

    /// `add` with more `run add` flags (`--credentials-env-prefix P`).
    pub fn add_with(&self, role: &str, peer: &str, area: &str, extra: &[&str]) {
        let store = format!("{}/{area}", self.base);
        let mut args = vec![
            "run",
            "add",
            "--registry",
            &self.reg,
            "--key",
            &self.op_key,
            "--role",
            role,
            "--peer",
            peer,
            "--store",
            &store,
            "--json",
        ];
        args.extend_from_slice(extra);
        ok_json(self.run(&args));
    }

    /// A new key in `dir` registered as a miner with its own area; returns the key path.
    pub fn new_miner(&self, dir: &Path, name: &str) -> std::path::PathBuf {
        let key = dir.join(format!("{name}.key"));
        let id = ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
        self.add("miner", id["peer_id"].as_str().unwrap(), name);
        key
    }

    /// A new key in `dir` registered as the run's validator (area `val`); returns its path.
    pub fn new_validator(&self, dir: &Path) -> std::path::PathBuf {
        let key = dir.join("val.key");
        let id = ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
        self.add("validator", id["peer_id"].as_str().unwrap(), "val");
        key
    }

    pub fn publish_args<'a>(
        &'a self,
        key: &'a str,
        update: &'a str,
        state: &'a str,
    ) -> Vec<&'a str> {
        vec![
            "publish",
            "--registry",
            &self.reg,
            "--key",
            key,
            update,
            "--state",
            state,
            "--window",
            "0",
            "--json",
        ]
    }
}
