//! `ckpt ls`, `ckpt verify`, `ckpt gc`.

use std::collections::BTreeMap;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::pull::{Located, fetch_manifest};
use super::push::read_latest;
use super::{CkptError, HF_INDEX, Manifest};
use crate::checkpoint::BadObject;
use crate::format::layout;
use crate::identity::PeerId;
use crate::store::{StoreError, Target, list_all};

/// One checkpoint as `ckpt ls` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CkptInfo {
    /// Its step.
    pub step: u64,
    /// A verified manifest exists (the checkpoint is complete).
    pub complete: bool,
    /// The last window in its parameters.
    pub window: Option<u64>,
    /// The previous checkpoint's step.
    pub parent: Option<u64>,
    /// Shard files.
    pub shards: usize,
    /// Tensors.
    pub tensors: usize,
    /// Bytes of shards and small files.
    pub bytes: u64,
    /// `LATEST` points here.
    pub latest: bool,
    /// Why a manifest that is there could not be used.
    pub problem: Option<String>,
}

/// Every object under the run's checkpoint folder, grouped by step (one LIST).
async fn objects_by_step(
    target: &Target,
    run: &str,
) -> Result<BTreeMap<u64, Vec<Path>>, CkptError> {
    let root = target.path(&layout::ckpt_root(run));
    let metas = list_all(target, &root).await?;
    let mut by: BTreeMap<u64, Vec<Path>> = BTreeMap::new();
    let depth = root.parts().count();
    for m in metas {
        let step = m
            .location
            .parts()
            .nth(depth)
            .and_then(|p| p.as_ref().parse::<u64>().ok());
        if let Some(s) = step {
            by.entry(s).or_default().push(m.location);
        }
    }
    Ok(by)
}

/// The run's checkpoints in this store, oldest first, each manifest verified.
pub async fn list(target: &Target, run: &str, signer: &PeerId) -> Result<Vec<CkptInfo>, CkptError> {
    let latest = read_latest(target, run, signer).await?.map(|(l, _)| l.step);
    let mut out = Vec::new();
    for (step, objects) in objects_by_step(target, run).await? {
        let manifest_path = target.path(&layout::ckpt_manifest(run, step));
        let mut info = CkptInfo {
            step,
            complete: false,
            window: None,
            parent: None,
            shards: 0,
            tensors: 0,
            bytes: 0,
            latest: latest == Some(step),
            problem: None,
        };
        if objects.contains(&manifest_path) {
            let loc = Located {
                target: target.clone(),
                run: run.to_string(),
                step,
                signer: *signer,
            };
            match fetch_manifest(&loc).await {
                Ok((m, _, _)) => {
                    info.complete = true;
                    info.window = m.window;
                    info.parent = m.parent;
                    info.shards = m.shards.len();
                    info.tensors = m.tensors.len();
                    info.bytes = m.total_bytes();
                }
                Err(e) => info.problem = Some(e.to_string()),
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// What `ckpt verify` checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifyReport {
    /// The manifest's URL.
    pub manifest: String,
    /// The checkpoint's step.
    pub step: u64,
    /// Shard files checked chunk by chunk.
    pub shards: usize,
    /// Small files checked whole.
    pub files: usize,
    /// Bytes read and hashed.
    pub bytes: u64,
    /// Every problem found, one per bad object.
    pub bad: Vec<String>,
}

/// Streams one shard, checking size, chunk hashes, the whole hash and that its safetensors
/// header places every tensor where the manifest says.
async fn verify_shard(loc: &Located, m: &Manifest, k: usize) -> Result<(), BadObject> {
    let s = &m.shards[k];
    let path = loc
        .target
        .path(&layout::ckpt_object(&m.run, m.step, &s.file));
    let url = loc.target.url_of(&path);
    let got = loc
        .target
        .store
        .get(&path)
        .await
        .map_err(|e| BadObject(format!("{url}: {}", StoreError::from_store(&url, e))))?;
    if got.meta.size != s.size {
        return Err(BadObject(format!(
            "{url}: {} bytes, the manifest says {}",
            got.meta.size, s.size
        )));
    }
    let mut stream = got.into_stream();
    let mut whole = blake3::Hasher::new();
    let mut chunk = Vec::with_capacity(m.chunk_bytes as usize);
    let mut head = Vec::new();
    let mut c = 0usize;
    let mut seen = 0u64;
    let mut bad_chunks = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece =
            piece.map_err(|e| BadObject(format!("{url}: {}", StoreError::from_store(&url, e))))?;
        seen += piece.len() as u64;
        whole.update(&piece);
        if head.len() < 1 << 20 {
            head.extend_from_slice(&piece[..piece.len().min((1 << 20) - head.len())]);
        }
        let mut rest: &[u8] = &piece;
        while !rest.is_empty() {
            let take = rest.len().min(m.chunk_bytes as usize - chunk.len());
            chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if chunk.len() as u64 == m.chunk_bytes {
                if s.chunks.get(c).map(String::as_str)
                    != Some(blake3::hash(&chunk).to_hex().as_str())
                {
                    bad_chunks.push(c);
                }
                chunk.clear();
                c += 1;
            }
        }
    }
    if !chunk.is_empty()
        && s.chunks.get(c).map(String::as_str) != Some(blake3::hash(&chunk).to_hex().as_str())
    {
        bad_chunks.push(c);
    }
    if seen != s.size {
        return Err(BadObject(format!(
            "{url}: the body ended after {seen} of {} bytes",
            s.size
        )));
    }
    if !bad_chunks.is_empty() || whole.finalize().to_hex().as_str() != s.blake3 {
        return Err(BadObject(format!(
            "{url}: content differs from the manifest (chunks {bad_chunks:?})"
        )));
    }
    // The shard's own header must agree with the manifest's tensor map.
    let n = head
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(u64::MAX);
    let header: serde_json::Value = head
        .get(8..8usize.saturating_add(n as usize))
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| BadObject(format!("{url}: safetensors header unreadable")))?;
    for t in m.tensors.iter().filter(|t| t.shard == k) {
        let h = &header[&t.name];
        let off = [
            t.begin.checked_sub(8 + n).unwrap_or(u64::MAX),
            t.end.checked_sub(8 + n).unwrap_or(u64::MAX),
        ];
        if h["dtype"] != t.dtype.as_str()
            || h["shape"] != serde_json::json!(t.shape)
            || h["data_offsets"] != serde_json::json!(off)
        {
            return Err(BadObject(format!(
                "{url}: tensor {} is not where the manifest puts it",
                t.name
            )));
        }
    }
    Ok(())
}

/// Full remote verification: the manifest, every shard byte, every small file, the index.
pub async fn verify(loc: &Located, concurrency: usize) -> Result<VerifyReport, CkptError> {
    let (m, _, murl) = fetch_manifest(loc).await?;
    let results: Vec<Result<(), BadObject>> =
        futures::stream::iter((0..m.shards.len()).map(|k| verify_shard(loc, &m, k)))
            .buffered(concurrency.max(1))
            .collect()
            .await;
    let mut bad: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|b| b.0))
        .collect();
    for f in &m.files {
        let path = loc.target.path(&layout::ckpt_file(&m.run, m.step, &f.file));
        let url = loc.target.url_of(&path);
        match loc.target.store.get(&path).await {
            Ok(g) => match g.bytes().await {
                Ok(b) if blake3::hash(&b).to_hex().as_str() == f.blake3 => {}
                Ok(_) => bad.push(format!("{url}: content differs from the manifest")),
                Err(e) => bad.push(format!("{url}: {}", StoreError::from_store(&url, e))),
            },
            Err(e) => bad.push(format!("{url}: {}", StoreError::from_store(&url, e))),
        }
    }
    let ipath = loc
        .target
        .path(&layout::ckpt_object(&m.run, m.step, HF_INDEX));
    if let Err(e) = loc.target.store.head(&ipath).await {
        let url = loc.target.url_of(&ipath);
        bad.push(format!("{url}: {}", StoreError::from_store(&url, e)));
    }
    Ok(VerifyReport {
        manifest: murl,
        step: m.step,
        shards: m.shards.len(),
        files: m.files.len(),
        bytes: m.total_bytes(),
        bad,
    })
}

/// What `ckpt gc` removed (or would, with `dry_run`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct GcReport {
    /// Steps kept.
    pub kept: Vec<u64>,
    /// Steps deleted.
    pub deleted_checkpoints: Vec<u64>,
    /// Windows below this had their aggregates, ledgers, scores and gradients removed.
    pub windows_before: Option<u64>,
    /// Whether a new peer can still catch up from the run's start (`apply --from-window
    /// genesis`): false once any window's aggregate is deleted; peers then bootstrap from a
    /// kept checkpoint.
    pub genesis_catch_up: bool,
    /// Objects deleted in all.
    pub deleted_objects: usize,
    /// Multipart uploads that killed pushes left (journaled over an hour ago), aborted.
    pub aborted_uploads: usize,
    /// Nothing was deleted; the report says what would be.
    pub dry_run: bool,
}

/// Keeps the newest `keep` complete checkpoints (and whatever LATEST names), deletes the
/// rest (manifest first, so a half-deleted checkpoint no longer exists), then deletes this
/// store's per-window objects older than the oldest kept checkpoint's window.
pub async fn gc(
    target: &Target,
    run: &str,
    signer: &PeerId,
    keep: usize,
    dry_run: bool,
) -> Result<GcReport, CkptError> {
    let aborted_uploads = if dry_run {
        0
    } else {
        crate::store::abort_orphaned_uploads(
            target,
            &layout::ckpt_root(run),
            std::time::Duration::from_secs(3600),
        )
        .await?
    };
    let infos = list(target, run, signer).await?;
    let complete: Vec<&CkptInfo> = infos.iter().filter(|i| i.complete).collect();
    let latest = infos.iter().find(|i| i.latest).map(|i| i.step);
    let mut kept: Vec<u64> = complete
        .iter()
        .rev()
        .take(keep)
        .map(|i| i.step)
        .chain(latest)
        .collect();
    kept.sort_unstable();
    kept.dedup();
    let oldest_kept = kept.first().copied();
    // Complete checkpoints not kept, and abandoned pushes older than the oldest kept one.
    let doomed: Vec<u64> = infos
        .iter()
        .filter(|i| !kept.contains(&i.step))
        .filter(|i| i.complete || oldest_kept.is_some_and(|o| i.step < o))
        .map(|i| i.step)
        .collect();
    let by_step = objects_by_step(target, run).await?;
    let mut victims: Vec<Path> = Vec::new();
    for s in &doomed {
        let manifest = target.path(&layout::ckpt_manifest(run, *s));
        let mut objs = by_step.get(s).cloned().unwrap_or_default();
        objs.sort_by_key(|p| *p != manifest);
        victims.extend(objs);
    }
    let windows_before = oldest_kept
        .and_then(|o| infos.iter().find(|i| i.step == o))
        .and_then(|i| i.window);
    if let Some(wb) = windows_before {
        for folder in ["aggs", "ledger", "scores", "weights", "grads", "blobs"] {
            let root = target.path(&layout::run_folder(run, folder));
            let depth = root.parts().count();
            let metas = list_all(target, &root).await?;
            for m in metas {
                let w = m.location.parts().nth(depth).and_then(|p| {
                    let s = p.as_ref().to_string();
                    s.split('.').next().and_then(|n| n.parse::<u64>().ok())
                });
                if w.is_some_and(|w| w < wb) {
                    victims.push(m.location);
                }
            }
        }
    }
    if !dry_run {
        for p in &victims {
            let url = target.url_of(p);
            match target.store.delete(p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StoreError::from_store(&url, e).into()),
            }
        }
    }
    Ok(GcReport {
        kept,
        deleted_checkpoints: doomed,
        windows_before,
        genesis_catch_up: windows_before.is_none_or(|w| w == 0),
        deleted_objects: victims.len(),
        aborted_uploads,
        dry_run,
    })
}
