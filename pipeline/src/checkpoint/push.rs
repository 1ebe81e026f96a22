//! `ckpt push`: pack, hash, upload, sign the manifest, move `LATEST`.

use crate::checkpoint::CkptReason;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::StreamExt;

use super::packing::{
    Inventory, PlannedShard, ShardHashes, ShardSource, hash_shard, inventory, plan,
};
use super::{
    CkptError, FileEntry, HF_INDEX, Latest, MANIFEST_CODEC, MANIFEST_FORMAT, Manifest,
    POINTER_CODEC, ShardEntry, TensorEntry, io_err,
};
use crate::format::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, RemoteEnvelope,
};
use crate::format::layout;
use crate::identity::{Identity, PeerId};
use crate::round::registry::{Job, Role};
use crate::store::{self, PutOutcome, StoreError, Target};

/// What to push.
#[derive(Clone, Debug)]
pub struct PushOptions {
    /// The checkpoint's step.
    pub step: u64,
    /// The last window whose aggregate is in these parameters.
    pub window: Option<u64>,
    /// Target shard size in bytes (a tensor larger than this gets a shard of its own).
    pub shard_size: u64,
    /// Shards uploaded at once (each in parallel multipart parts).
    pub concurrency: usize,
    /// Push tensors that are not the run's model (`--any-model`); by default the folder must
    /// hold exactly the run's tensors, with their shapes, plus optional `outer_momentum.*`
    /// buffers of those tensors.
    pub any_model: bool,
}

/// The pushed tensors against the run's model: every model tensor once with its shape, and
/// nothing else but `outer_momentum.<name>` buffers of model tensors (same shape). The first
/// difference is named, with the shape the run expects.
fn check_model(
    reg: &crate::round::registry::Registry,
    tensors: &[super::packing::SrcTensor],
) -> Result<(), CkptError> {
    use crate::round::outer::MOMENTUM_PREFIX;
    let bad = |m: String| {
        CkptError::ModelMismatch(format!(
            "{m}: the folder is not run {}'s model (give the run's model, or --any-model to push it anyway)",
            reg.run
        ))
    };
    let model: std::collections::BTreeMap<&str, &crate::format::codec::TensorSpec> = reg
        .model
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for t in tensors {
        let model_name = t.name.strip_prefix(MOMENTUM_PREFIX).unwrap_or(&t.name);
        match model.get(model_name) {
            None => {
                return Err(bad(format!(
                    "tensor {:?} is not in the run's model",
                    t.name
                )));
            }
            Some(spec) if spec.shape != t.shape => {
                return Err(bad(format!(
                    "tensor {:?} has shape {:?}, the run's model {:?}",
                    t.name, t.shape, spec.shape
                )));
            }
            Some(_) if t.name.starts_with(MOMENTUM_PREFIX) && t.dtype != "F32" => {
                // A replay reads momentum as f32 (`round.md`, "State"): anything else
                // would be refused by every peer that pulls it.
                return Err(bad(format!(
                    "momentum buffer {:?} is {}, not F32",
                    t.name, t.dtype
                )));
            }
            Some(_) => {}
        }
        if !t.name.starts_with(MOMENTUM_PREFIX) {
            seen.insert(t.name.as_str());
        }
    }
    match reg
        .model
        .tensors
        .iter()
        .find(|t| !seen.contains(t.name.as_str()))
    {
        Some(t) => Err(bad(format!(
            "tensor {:?} {:?} of the run's model is missing",
            t.name, t.shape
        ))),
        None => Ok(()),
    }
}

/// What a push did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pushed {
    /// The manifest's URL.
    pub manifest: String,
    /// The step.
    pub step: u64,
    /// The last window in the parameters.
    pub window: Option<u64>,
    /// The previous checkpoint, recorded in the manifest.
    pub parent: Option<u64>,
    /// Shard files.
    pub shards: usize,
    /// Tensors.
    pub tensors: usize,
    /// Small files.
    pub files: usize,
    /// Bytes of shards and small files.
    pub bytes: u64,
    /// Shards found already uploaded with the same bytes (a resumed push).
    pub skipped_shards: usize,
    /// The manifest was already there, identical (a rerun of a finished push).
    pub already_published: bool,
    /// `LATEST` now points here (false when it already pointed at a newer step).
    pub latest: bool,
}

/// Reads and verifies a signed one-section JSON object (manifest, pointer).
pub(crate) async fn read_signed_json(
    target: &Target,
    key: &str,
    expect: &Expect,
) -> Result<(RemoteEnvelope, Vec<u8>), EnvelopeError> {
    let (env, sections) = crate::format::envelope::read_signed(
        target,
        key,
        expect,
        &crate::format::envelope::Limits::small_object(),
    )
    .await?;
    Ok((env, sections.into_iter().next().unwrap_or_default()))
}

/// `LATEST` of a run in this store, verified against `signer`, with its ETag.
pub(crate) async fn read_latest(
    target: &Target,
    run: &str,
    signer: &PeerId,
) -> Result<Option<(Latest, Option<String>)>, CkptError> {
    let expect = Expect {
        signer: Some(*signer),
        run: Some(run.to_string()),
        kind: Some(Kind::Pointer),
        window: None,
        step: None,
    };
    match read_signed_json(target, &layout::ckpt_latest(run), &expect).await {
        Ok((env, body)) => {
            let l: Latest = serde_json::from_slice(&body).map_err(|e| CkptError::Rejected {
                object: env.object.clone(),
                reason: CkptReason::PointerMalformed.code(),
                detail: format!("not a LATEST pointer: {e}"),
            })?;
            if env.head.header.step != Some(l.step) {
                return Err(CkptError::Rejected {
                    object: env.object.clone(),
                    reason: CkptReason::PointerMalformed.code(),
                    detail: "the signed step and the pointer disagree".into(),
                });
            }
            Ok(Some((l, env.meta.e_tag.clone())))
        }
        Err(EnvelopeError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Moves `LATEST` to `step` by compare-and-swap, never backwards. Returns whether it moved.
pub(crate) async fn move_latest(
    target: &Target,
    run: &str,
    id: &Identity,
    step: u64,
) -> Result<bool, CkptError> {
    let me = id.peer_id();
    let path = target.path(&layout::ckpt_latest(run));
    for _ in 0..8 {
        let current = read_latest(target, run, &me).await?;
        if let Some((l, _)) = &current
            && l.step >= step
        {
            return Ok(l.step == step);
        }
        let body = serde_json::to_vec(&Latest {
            step,
            manifest: layout::ckpt_manifest(run, step),
        })
        .map_err(|e| CkptError::Internal(e.to_string()))?;
        let signed = EnvelopeBuilder::new(Kind::Pointer, run)
            .step(step)
            .codec(POINTER_CODEC, Default::default())
            .section("pointer.json", &body, Compression::None)?
            .sign(id)?;
        let bytes = signed
            .to_vec()
            .map_err(|e| io_err(std::path::Path::new("LATEST"), e))?;
        match store::put_cas(target, &path, Bytes::from(bytes), current.and_then(|c| c.1)).await {
            Ok(_) => return Ok(true),
            Err(StoreError::Precondition { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CkptError::Conflict {
        object: target.url_of(&path),
        detail: "LATEST kept changing under us; not moved".into(),
    })
}

/// Pushes a checkpoint into the pusher's own store (it must be the run's aggregator).
pub async fn push(
    job: Job<'_>,
    srcs: &[PathBuf],
    opts: &PushOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Pushed, CkptError> {
    let Job { reg, id, .. } = job;
    let target = job.own_store(Role::Aggregator)?;
    let run = reg.run.clone();
    let inv = inventory(srcs)?;
    if !opts.any_model {
        check_model(reg, &inv.tensors)?;
    }
    let shards = plan(&inv, opts.shard_size.max(1));
    let hashes = hash_shards(&inv, &shards)?;
    let me = id.peer_id();
    // A rerun of a push that already committed its manifest (a cron retry, a kill after
    // LATEST moved) must build the same manifest: its parent is the one recorded then, not
    // the LATEST read now (which may be this very step).
    let recorded = {
        let expect = Expect {
            signer: Some(me),
            run: Some(run.clone()),
            kind: Some(Kind::Manifest),
            window: None,
            step: Some(opts.step),
        };
        match read_signed_json(&target, &layout::ckpt_manifest(&run, opts.step), &expect).await {
            Ok((env, body)) => Some(
                serde_json::from_slice::<Manifest>(&body)
                    .map_err(|e| CkptError::Rejected {
                        object: env.object.clone(),
                        reason: CkptReason::ManifestMalformed.code(),
                        detail: format!("the manifest already at this step is not one: {e}"),
                    })?
                    .parent,
            ),
            Err(EnvelopeError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        }
    };
    let parent = match recorded {
        Some(p) => p,
        None => read_latest(&target, &run, &me)
            .await?
            .map(|(l, _)| l.step)
            .filter(|&p| p < opts.step),
    };
    let (manifest, extras) = build_manifest(&run, opts, parent, &inv, &shards, &hashes)?;
    // The data first, then the small files and the index, then the manifest: the commit
    // point.
    let skipped = upload_shards(&target, &run, opts, &inv, &shards, progress).await?;
    for (name, b) in &extras {
        let path = target.path(&layout::ckpt_file(&run, opts.step, name));
        store::put_create(&target, &path, b.as_slice()).await?;
    }
    let all: Vec<&TensorEntry> = manifest.tensors.iter().collect();
    let index = manifest.hf_index(&all, shards.iter().map(|s| (s.file.as_str(), s.size)));
    store::put_create(
        &target,
        &target.path(&layout::ckpt_object(&run, opts.step, HF_INDEX)),
        index.as_slice(),
    )
    .await?;
    let (murl, already) = commit_manifest(&target, id, &run, opts, &manifest).await?;
    let latest = move_latest(&target, &run, id, opts.step).await?;
    Ok(Pushed {
        manifest: murl,
        step: opts.step,
        window: opts.window,
        parent,
        shards: shards.len(),
        tensors: manifest.tensors.len(),
        files: manifest.files.len(),
        bytes: manifest.total_bytes(),
        skipped_shards: skipped,
        already_published: already,
        latest,
    })
}

/// Hashes every planned shard (whole and per chunk, and each tensor's bytes), in parallel
/// over shards, reading the sources once.
fn hash_shards(inv: &Inventory, shards: &[PlannedShard]) -> Result<Vec<ShardHashes>, CkptError> {
    use rayon::prelude::*;
    let quiet = |_: u64| {};
    shards
        .par_iter()
        .map(|s| {
            hash_shard(&ShardSource {
                inv,
                shard: s,
                progress: &quiet,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io_err(std::path::Path::new("checkpoint sources"), e))
}

/// A small file of the checkpoint (config, tokenizer): its name and bytes.
type SmallFile = (String, Vec<u8>);

/// The manifest of a push (validated), and the small files' bytes to upload beside it.
fn build_manifest(
    run: &str,
    opts: &PushOptions,
    parent: Option<u64>,
    inv: &Inventory,
    shards: &[PlannedShard],
    hashes: &[ShardHashes],
) -> Result<(Manifest, Vec<SmallFile>), CkptError> {
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        run: run.to_string(),
        step: opts.step,
        window: opts.window,
        parent,
        chunk_bytes: super::CHUNK,
        shards: Vec::new(),
        tensors: Vec::new(),
        files: Vec::new(),
    };
    for (k, (s, h)) in shards.iter().zip(hashes).enumerate() {
        manifest.shards.push(ShardEntry {
            file: s.file.clone(),
            size: s.size,
            blake3: h.blake3.clone(),
            chunks: h.chunks.clone(),
        });
        for (&(ti, b, e), th) in s.tensors.iter().zip(&h.tensors) {
            let t = &inv.tensors[ti];
            manifest.tensors.push(TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype.clone(),
                shape: t.shape.clone(),
                shard: k,
                begin: b,
                end: e,
                blake3: th.clone(),
            });
        }
    }
    let mut extras = Vec::new();
    for (name, p) in &inv.extras {
        let b = std::fs::read(p).map_err(|e| io_err(p, e))?;
        manifest.files.push(FileEntry {
            file: name.clone(),
            size: b.len() as u64,
            blake3: blake3::hash(&b).to_hex().to_string(),
        });
        extras.push((name.clone(), b));
    }
    manifest.validate()?;
    Ok((manifest, extras))
}

/// Signs and puts the manifest create-only (the commit point). Another signing of the same
/// manifest (only the clock differs) is the same push: `already` is true; a different
/// manifest at that step is a conflict. Returns the manifest's URL and `already`.
async fn commit_manifest(
    target: &Target,
    id: &Identity,
    run: &str,
    opts: &PushOptions,
    manifest: &Manifest,
) -> Result<(String, bool), CkptError> {
    let body = serde_json::to_vec(manifest).map_err(|e| CkptError::Internal(e.to_string()))?;
    let mut b = EnvelopeBuilder::new(Kind::Manifest, run)
        .step(opts.step)
        .codec(MANIFEST_CODEC, Default::default());
    if let Some(w) = opts.window {
        b = b.window(w);
    }
    let signed = b
        .section("manifest.json", &body, Compression::Zstd)?
        .sign(id)?;
    let mkey = layout::ckpt_manifest(run, opts.step);
    let mpath = target.path(&mkey);
    let murl = target.url_of(&mpath);
    let already = match store::put_create(target, &mpath, &signed).await {
        Ok(PutOutcome::Created) => false,
        Ok(PutOutcome::AlreadyIdentical) => true,
        Err(StoreError::Conflict { .. }) => {
            let expect = Expect {
                signer: Some(id.peer_id()),
                run: Some(run.to_string()),
                kind: Some(Kind::Manifest),
                window: None,
                step: Some(opts.step),
            };
            let (_, existing) = read_signed_json(target, &mkey, &expect).await?;
            if existing != body {
                return Err(CkptError::Conflict {
                    object: murl,
                    detail: format!(
                        "a different checkpoint is already published at step {}",
                        opts.step
                    ),
                });
            }
            true
        }
        Err(e) => return Err(e.into()),
    };
    Ok((murl, already))
}

async fn upload_shards(
    target: &Target,
    run: &str,
    opts: &PushOptions,
    inv: &Inventory,
    shards: &[PlannedShard],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<usize, CkptError> {
    let skipped = AtomicU64::new(0);
    let results: Vec<Result<(), CkptError>> = futures::stream::iter(shards.iter().map(|s| {
        let skipped = &skipped;
        async move {
            let path = target.path(&layout::ckpt_object(run, opts.step, &s.file));
            let src = ShardSource {
                inv,
                shard: s,
                progress,
            };
            match store::put_create(target, &path, &src).await {
                Ok(PutOutcome::Created) => {
                    tracing::info!(shard = %s.file, bytes = s.size, "uploaded");
                    Ok(())
                }
                Ok(PutOutcome::AlreadyIdentical) => {
                    tracing::info!(shard = %s.file, "already uploaded with the same bytes");
                    skipped.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(StoreError::Conflict { object }) => Err(CkptError::Conflict {
                    object,
                    detail: format!(
                        "another shard with different bytes is already there (a different checkpoint at step {}?)",
                        opts.step
                    ),
                }),
                Err(e) => Err(e.into()),
            }
        }
    }))
    .buffer_unordered(opts.concurrency.max(1))
    .collect()
    .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(skipped.load(Ordering::Relaxed) as usize)
}
