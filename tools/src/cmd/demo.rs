//! The demonstration job on an embedded default: a local folder store, keys made on the spot.
//!
//! Today it shows the trust model end to end: three peers each sign and publish an object
//! into their own area, every peer verifies every other peer's object, and a replayed copy
//! (one peer re-publishing another's signed object as its own) is caught. Later stages add
//! training, aggregation, scoring and checkpoints.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use object_store::ObjectStoreExt;
use shardrop::envelope::{
    Compression, EnvelopeBuilder, Expect, Kind, Limits, RemoteEnvelope, verify_sections,
};
use shardrop::identity::Identity;
use shardrop::layout;
use shardrop::store::{self, Target};

use super::Ctx;
use crate::out;

#[derive(Args)]
pub struct DemoArgs {
    /// Folder for keys and the local store.
    #[arg(long, default_value = "./shardrop-demo")]
    dir: PathBuf,
    /// Store URL (default: DIR/store, a local folder).
    #[arg(long)]
    store: Option<String>,
    /// Number of peers.
    #[arg(long, default_value_t = 3)]
    peers: usize,
}

fn load_or_make(path: &std::path::Path) -> anyhow::Result<Identity> {
    if path.exists() {
        return Ok(Identity::load(path)?);
    }
    let id = Identity::generate();
    id.save_new(path)?;
    Ok(id)
}

fn payload(peer: usize, len: usize) -> Vec<u8> {
    // Deterministic bytes (xorshift) so each peer's data differs and reruns are comparable.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (peer as u64 + 1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 16) as u8
        })
        .collect()
}

async fn check(target: &Target, key: &str, expect: &Expect) -> Result<(), String> {
    let path = target.path(key);
    let object = target.url_of(&path);
    let limits = Limits::default();
    let env = RemoteEnvelope::open(target.store.as_ref(), &path, &object, &limits, expect)
        .await
        .map_err(|e| {
            e.rejection()
                .map_or_else(|| e.to_string(), |r| r.reason.code().to_string())
        })?;
    verify_sections(target.store.as_ref(), &env, &limits, &|_| {})
        .await
        .map_err(|e| {
            e.rejection()
                .map_or_else(|| e.to_string(), |r| r.reason.code().to_string())
        })
}

pub async fn demo(ctx: &Ctx, a: DemoArgs) -> anyhow::Result<()> {
    if a.peers < 2 {
        bail!("--peers must be at least 2");
    }
    let keys_dir = a.dir.join("keys");
    std::fs::create_dir_all(&keys_dir)
        .with_context(|| format!("{}: cannot create", keys_dir.display()))?;
    let store_url = match &a.store {
        Some(u) => u.clone(),
        None => a.dir.join("store").display().to_string(),
    };
    let root = store::open(&store_url, &ctx.s3)?;
    let run = format!(
        "demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let window = 0;
    let mut peers = Vec::new();
    for i in 0..a.peers {
        let id = load_or_make(&keys_dir.join(format!("peer-{i}.key")))?;
        let area = root.join(&format!("peer-{i}"));
        peers.push((id, area));
    }
    // 1. Every peer publishes one signed object into its own area.
    let mut published = Vec::new();
    for (i, (id, area)) in peers.iter().enumerate() {
        let msg = format!(
            "hello from peer {i} ({}) in run {run}, window {window}\n",
            id.peer_id()
        );
        let signed = EnvelopeBuilder::new(Kind::Blob, &run)
            .window(window)
            .section("message.txt", msg.as_bytes(), Compression::Zstd)?
            .section("data.bin", &payload(i, 256 << 10), Compression::Zstd)?
            .sign(id)?;
        let key = layout::blob(&run, window, &id.peer_id());
        let path = area.path(&key);
        store::put_create(area, &path, &signed).await?;
        published.push(serde_json::json!({"peer": i, "peer_id": id.peer_id().to_string(), "object": area.url_of(&path), "bytes": signed.len()}));
    }
    // 2. Every peer verifies every other peer's object, expecting its signer, run and window.
    let mut checks = Vec::new();
    let mut text = format!(
        "run {run} on {}\n\n{:<8} {:<8} {:<10} {}\n",
        root.url(),
        "reader",
        "author",
        "verdict",
        "object"
    );
    for (r, _) in peers.iter().enumerate() {
        for (w, (author, area)) in peers.iter().enumerate() {
            if r == w {
                continue;
            }
            let key = layout::blob(&run, window, &author.peer_id());
            let expect = Expect {
                signer: Some(author.peer_id()),
                run: Some(run.clone()),
                kind: Some(Kind::Blob),
                window: Some(window),
                step: None,
            };
            let verdict = check(area, &key, &expect).await;
            text += &format!(
                "peer-{r:<3} peer-{w:<3} {:<10} {}\n",
                verdict.as_ref().map_or_else(|e| e.as_str(), |_| "valid"),
                area.url_of(&area.path(&key))
            );
            checks.push(serde_json::json!({"reader": r, "author": w, "valid": verdict.is_ok(), "reason": verdict.err()}));
        }
    }
    // 3. A replay: the last peer copies the first peer's signed object into its own area as
    //    if it were its own. Readers expect the last peer's key there, so it must fail.
    let (thief, thief_area) = &peers[a.peers - 1];
    let (victim, victim_area) = &peers[0];
    let stolen = victim_area
        .store
        .get(&victim_area.path(&layout::blob(&run, window, &victim.peer_id())))
        .await
        .context("reading the object to replay")?
        .bytes()
        .await?;
    let replay_key = layout::blob(&run, window, &thief.peer_id());
    let replay_path = thief_area.path(&format!("{replay_key}.replayed"));
    store::put_create(thief_area, &replay_path, stolen.as_ref()).await?;
    let expect = Expect {
        signer: Some(thief.peer_id()),
        run: Some(run.clone()),
        kind: Some(Kind::Blob),
        window: Some(window),
        step: None,
    };
    let replay = check(thief_area, &format!("{replay_key}.replayed"), &expect).await;
    let honest_ok = checks.iter().all(|c| c["valid"] == true);
    let replay_caught = replay.is_err();
    text += &format!(
        "\nreplayed copy of peer-0's object published by peer-{}: {}\n",
        a.peers - 1,
        match &replay {
            Err(reason) => format!("rejected ({reason})"),
            Ok(()) => "ACCEPTED (this is a bug)".to_string(),
        }
    );
    text += &format!(
        "\n{} peers, {} objects published, {} cross-verifications {}; keys in {}, store at {}\n",
        a.peers,
        published.len(),
        checks.len(),
        if honest_ok {
            "all valid"
        } else {
            "WITH FAILURES"
        },
        keys_dir.display(),
        root.url()
    );
    let json = serde_json::json!({
        "run": run, "store": root.url(), "keys": keys_dir.display().to_string(),
        "published": published, "checks": checks,
        "replay": {"caught": replay_caught, "reason": replay.err()},
        "ok": honest_ok && replay_caught,
    });
    out::emit(ctx, &json, &text);
    if !honest_ok || !replay_caught {
        bail!("demo failed: honest objects rejected or the replay accepted");
    }
    Ok(())
}
