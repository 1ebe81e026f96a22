//! Readers' merge of an agg-v2 aggregate: fetch the listed shards' sections, check them
//! against the signed list, and merge them tensor by tensor exactly as agg-v1's aggregator
//! did (f32 zeros, `acc += weight · value` in peer order, two roundings).
//!
//! Two stages, so a bad window never touches parameters:
//! 1. **fetch**: open every listed shard (the aggregator's copy, or the miner's object for
//!    form `reference`), require its signed section table to equal the list's, and stream
//!    each needed section through its blake3 check into a spool folder on disk. Only the
//!    sections holding the tensors the caller wants are fetched (one rank of a sharded model
//!    fetches only its own).
//! 2. **merge**: walk the wanted tensors in model order, keeping per shard the decoded
//!    section that holds the current one; decode every shard's values from the spool and
//!    accumulate. The caller gets one finished tensor at a time (or, for the validator, one
//!    slab of chunks of it: `Spooled::slab`).
//!
//! Memory: the largest tensor's accumulator plus one decoded section per accepted shard
//! (≤ 16 MiB of payload each by the codec's packing), whatever the model's size. At 72 B
//! parameters and 20 peers: a 1 GiB accumulator (a 242 M-element tensor) + 20 × 16 MiB.
//! Disk: the wanted part of the accepted shards.

use crate::round::RoundReason;
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;

use futures::StreamExt;

use crate::format::codec::{self, CodecLimits, EncodedTensor};
use crate::format::envelope::{EnvelopeError, Expect, Kind, RemoteEnvelope, stream_section};
use crate::identity::PeerId;
use crate::round::RoundError;
use crate::round::accepted::{AcceptedList, ListedSection, MergedObject};
use crate::round::registry::{AggForm, Registry, Role};
use crate::round::verdict::shard_limits;
use crate::store::{S3Options, Target};

/// Shards fetched at once in the fetch stage.
const FETCH_CONCURRENCY: usize = 8;

/// A window's listed shards (or its merged tensor), every wanted section verified and
/// spooled to disk.
pub struct Spooled {
    window: u64,
    /// Per accepted shard: its weight and its sections (name, tensor range, spool file).
    shards: Vec<SpooledShard>,
    /// Form `merged`: the spooled agg-v1 tensor section of each wanted tensor, by index.
    merged: Option<Vec<Option<PathBuf>>>,
    _dir: tempfile::TempDir,
}

/// What a reader of a [`Spooled`] window keeps between tensors: per shard its decoded
/// current section (name, tensors by name); for form `merged`, the current tensor.
pub struct Loaded {
    sections: Vec<Option<(String, BTreeMap<String, EncodedTensor>)>>,
    tensor: Option<(usize, Vec<f32>)>,
}

impl Loaded {
    fn new(shards: usize) -> Loaded {
        Loaded {
            sections: vec![None; shards],
            tensor: None,
        }
    }
}

struct SpooledShard {
    weight: f32,
    sections: Vec<(String, Range<usize>, Option<PathBuf>)>,
}

/// The tensors `tAAAAA-BBBBB` names, as a range (`None` when the name is not one).
fn section_range(name: &str) -> Option<Range<usize>> {
    crate::round::verdict::section_range(name)
        .filter(|(a, b)| a <= b)
        .map(|(a, b)| a..b + 1)
}

/// A listed object or section could not be read: gone (`agg_source_missing`), not what the
/// list says (`agg_section_mismatch`, naming the envelope's reason), or a store error.
fn unlisted(
    e: EnvelopeError,
    object: &str,
    w: u64,
    who: &str,
    gone: String,
    mismatch: String,
) -> RoundError {
    match e {
        EnvelopeError::NotFound { .. } => {
            refused(object, RoundReason::AggSourceMissing.code(), w, who, gone)
        }
        e if e.rejection().is_some() => refused(
            object,
            RoundReason::AggSectionMismatch.code(),
            w,
            who,
            format!("{mismatch}: {e}"),
        ),
        e => e.into(),
    }
}

/// Streams section `name` of `env` through its blake3 check and decompression into `file`.
async fn spool(
    target: &Target,
    env: &RemoteEnvelope,
    name: &str,
    file: &std::path::Path,
    limits: &crate::format::envelope::Limits,
    w: u64,
    who: &str,
) -> Result<(), RoundError> {
    let io = |e: std::io::Error| RoundError::io(file, e);
    let sink = std::io::BufWriter::new(std::fs::File::create(file).map_err(io)?);
    match stream_section(target.store.as_ref(), env, name, sink, limits).await {
        Ok(mut out) => std::io::Write::flush(&mut out).map_err(io),
        Err(e) => Err(unlisted(
            e,
            &env.object,
            w,
            who,
            format!("section {name} is gone"),
            format!("section {name} does not match its listed hash"),
        )),
    }
}

/// The rejection a reader reports for a listed shard: names the peer, window and object.
fn refused(object: &str, reason: &'static str, w: u64, peer: &str, what: String) -> RoundError {
    RoundError::Rejected {
        object: object.to_string(),
        reason,
        detail: format!("window {w}: peer {peer}: {what}"),
    }
}

/// Where a listed shard is read from: the aggregator's store, or the miner's.
fn source(
    reg: &Registry,
    s3: &S3Options,
    list: &AcceptedList,
    peer: &str,
) -> Result<Target, RoundError> {
    match list.form {
        AggForm::Reference => {
            let p = reg
                .with_role(Role::Miner)
                .into_iter()
                .find(|m| m.peer == peer)
                .ok_or_else(|| RoundError::Internal(format!("{peer} is not a miner")))?;
            Ok(reg.open_store(p, s3)?)
        }
        _ => Ok(reg.aggregator(s3)?.1),
    }
}

/// Opens one listed shard and checks that its signed section table is the list's.
async fn open_listed(
    reg: &Registry,
    s3: &S3Options,
    list: &AcceptedList,
    j: usize,
) -> Result<(Target, RemoteEnvelope), RoundError> {
    let a = &list.accepted[j];
    let w = list.window;
    let target = source(reg, s3, list, &a.peer)?;
    let path = target.path(&a.object);
    let object = target.url_of(&path);
    let peer = PeerId::parse(&a.peer).map_err(|e| RoundError::Internal(e.to_string()))?;
    let expect = Expect::in_window(Kind::Grad, peer, &reg.run, w);
    let env = match RemoteEnvelope::open(
        target.store.as_ref(),
        &path,
        &object,
        &shard_limits(reg),
        &expect,
    )
    .await
    {
        Ok(env) => env,
        Err(e) => {
            return Err(unlisted(
                e,
                &object,
                w,
                &a.peer,
                "the listed shard is gone".into(),
                "the object is not the listed shard".into(),
            ));
        }
    };
    let table: Vec<ListedSection> = env.sections().iter().map(ListedSection::from).collect();
    if table != a.sections {
        let which = table
            .iter()
            .zip(&a.sections)
            .find(|(x, y)| x != y)
            .map_or_else(
                || {
                    format!(
                        "{} sections, the list has {}",
                        table.len(),
                        a.sections.len()
                    )
                },
                |(x, y)| {
                    format!(
                        "section {} has hash {}, the list says {} ({})",
                        x.name, x.hash, y.hash, y.name
                    )
                },
            );
        return Err(refused(
            &object,
            RoundReason::AggSectionMismatch.code(),
            w,
            &a.peer,
            format!("the shard changed: {which}"),
        ));
    }
    Ok((target, env))
}

/// Stage 1: opens every listed shard, checks its table against the list, and spools the
/// sections that hold a wanted tensor (blake3-checked and decompressed on the way).
pub async fn fetch_listed(
    reg: &Registry,
    s3: &S3Options,
    list: &AcceptedList,
    want: &(dyn Fn(usize) -> bool + Sync),
    cache: Option<&std::path::Path>,
) -> Result<Spooled, RoundError> {
    let dir = tempfile::Builder::new()
        .prefix("shardrop-merge-")
        .tempdir()
        .map_err(|e| RoundError::io(&std::env::temp_dir(), e))?;
    let root = dir.path().to_path_buf();
    if let Some(m) = &list.merged {
        let files = fetch_merged(reg, s3, list, m, want, &root).await?;
        let spooled = Spooled {
            window: list.window,
            shards: Vec::new(),
            merged: Some(files),
            _dir: dir,
        };
        spot_check_merged(reg, s3, list, want, cache, &spooled).await?;
        return Ok(spooled);
    }
    let limits = shard_limits(reg);
    let fetched: Vec<Result<SpooledShard, RoundError>> =
        futures::stream::iter((0..list.accepted.len()).map(|j| {
            let (root, limits) = (&root, &limits);
            async move {
                let a = &list.accepted[j];
                let (target, env) = open_listed(reg, s3, list, j).await?;
                let mut sections = Vec::with_capacity(a.sections.len());
                for s in &a.sections {
                    let range = section_range(&s.name).ok_or_else(|| {
                        refused(
                            &env.object,
                            RoundReason::AggVerdict.code(),
                            list.window,
                            &a.peer,
                            format!("section {:?} is not named for a tensor range", s.name),
                        )
                    })?;
                    if !range.clone().any(want) {
                        sections.push((s.name.clone(), range, None));
                        continue;
                    }
                    let file = root.join(format!("{j:05}-{}", s.name));
                    if let Some(entry) = env.sections().iter().find(|e| e.name == s.name)
                        && from_cache(cache, entry, limits, &file)
                    {
                        sections.push((s.name.clone(), range, Some(file)));
                        continue;
                    }
                    spool(&target, &env, &s.name, &file, limits, list.window, &a.peer).await?;
                    sections.push((s.name.clone(), range, Some(file)));
                }
                Ok(SpooledShard {
                    weight: a.weight,
                    sections,
                })
            }
        }))
        .buffered(FETCH_CONCURRENCY)
        .collect()
        .await;
    Ok(Spooled {
        window: list.window,
        shards: fetched.into_iter().collect::<Result<_, _>>()?,
        merged: None,
        _dir: dir,
    })
}

/// Form `merged`: opens the merged object (signed by the aggregator), requires its section
/// table to be the list's, and spools the wanted tensors' sections.
async fn fetch_merged(
    reg: &Registry,
    s3: &S3Options,
    list: &AcceptedList,
    m: &MergedObject,
    want: &(dyn Fn(usize) -> bool + Sync),
    root: &std::path::Path,
) -> Result<Vec<Option<PathBuf>>, RoundError> {
    let w = list.window;
    let (agg_id, target) = reg.aggregator(s3)?;
    let path = target.path(&m.object);
    let object = target.url_of(&path);
    let expect = Expect::in_window(Kind::Blob, agg_id, &reg.run, w);
    let who = "the aggregator";
    let limits = crate::format::agg_tensor::agg_limits(&reg.model);
    let env = RemoteEnvelope::open(target.store.as_ref(), &path, &object, &limits, &expect)
        .await
        .map_err(|e| {
            unlisted(
                e,
                &object,
                w,
                who,
                "the merged object is gone".into(),
                "not the listed merged object".into(),
            )
        })?;
    let table: Vec<ListedSection> = env.sections().iter().map(ListedSection::from).collect();
    let names: Vec<String> = (0..reg.model.tensors.len())
        .map(|i| format!("t{i:05}"))
        .collect();
    if table != m.sections || table.iter().map(|x| &x.name).ne(names.iter()) {
        return Err(refused(
            &object,
            RoundReason::AggSectionMismatch.code(),
            w,
            who,
            "its section table is not the list's (one tNNNNN per model tensor)".into(),
        ));
    }
    let mut files = vec![None; names.len()];
    for (i, name) in names.iter().enumerate().filter(|(i, _)| want(*i)) {
        let file = root.join(name);
        spool(&target, &env, name, &file, &limits, w, who).await?;
        files[i] = Some(file);
    }
    Ok(files)
}

/// Form `merged`: the merged object is the aggregator's word for what the listed shards sum
/// to; this reader checks that word on one wanted tensor it picks at random (weighted by
/// size, from this machine's own randomness, so an aggregator cannot know which): it
/// fetches the listed shards' sections holding that tensor, merges them, and requires the
/// merged object's tensor to be the same bits (`agg_merged_mismatch` otherwise), before any
/// parameter changes. An aggregator that falsifies a fraction f of the model's elements is
/// caught by each reader with probability about f per window (a ×1000 object, always), and
/// readers check independently. Cost: one tensor's sections from every listed shard (at
/// 72 B × 20 peers with ~1,000 tensors, ~0.1 % of the shards' bytes on average, the largest
/// tensor's share at worst) and that tensor's accumulator.
async fn spot_check_merged(
    reg: &Registry,
    s3: &S3Options,
    list: &AcceptedList,
    want: &(dyn Fn(usize) -> bool + Sync),
    cache: Option<&std::path::Path>,
    merged: &Spooled,
) -> Result<(), RoundError> {
    use rand::Rng;
    let numel = |i: usize| reg.model.tensors[i].shape.iter().product::<u64>();
    let wanted: Vec<usize> = (0..reg.model.tensors.len()).filter(|&i| want(i)).collect();
    let total: u64 = wanted.iter().map(|&i| numel(i)).sum();
    if total == 0 || list.accepted.is_empty() {
        return Ok(());
    }
    let mut at = rand::rng().random_range(0..total);
    let Some(&t) = wanted.iter().find(|&&i| {
        if at < numel(i) {
            return true;
        }
        at -= numel(i);
        false
    }) else {
        return Ok(());
    };
    let one = |i: usize| i == t;
    let shards_view = AcceptedList {
        form: crate::round::registry::AggForm::Shards,
        merged: None,
        ..list.clone()
    };
    let from_shards = Box::pin(fetch_listed(reg, s3, &shards_view, &one, cache)).await?;
    let bits_of = |spooled: &Spooled| -> Result<Vec<u32>, RoundError> {
        let mut bits = Vec::new();
        spooled.merge(reg, &one, |_, acc| {
            bits = acc.iter().map(|v| v.to_bits()).collect();
            Ok(())
        })?;
        Ok(bits)
    };
    let (want_bits, got_bits) = (bits_of(&from_shards)?, bits_of(merged)?);
    if let Some(k) =
        (0..want_bits.len().max(got_bits.len())).find(|&k| want_bits.get(k) != got_bits.get(k))
    {
        let object = list
            .merged
            .as_ref()
            .map_or(String::new(), |m| m.object.clone());
        return Err(RoundError::Rejected {
            object,
            reason: RoundReason::AggMergedMismatch.code(),
            detail: format!(
                "window {}: the merged object's tensor {:?} is not what the listed shards sum to (first difference at element {k}); nothing was applied",
                list.window, reg.model.tensors[t].name
            ),
        });
    }
    Ok(())
}

/// Decodes a prefetched section (its stored bytes, in `cache/<blake3>`) into `out`, if the
/// cache has it and it verifies (hash, size, decompression limits). Anything else, a
/// missing or damaged file included, is a miss: the caller reads the store.
fn from_cache(
    cache: Option<&std::path::Path>,
    entry: &crate::format::envelope::SectionEntry,
    limits: &crate::format::envelope::Limits,
    out: &std::path::Path,
) -> bool {
    let Some(path) = cache.map(|c| c.join(&entry.hash)) else {
        return false;
    };
    // Only a regular file of exactly the listed length, never through a link or a FIFO: a
    // poisoned folder is a miss, not a hang or an 8 GiB read.
    let input = match crate::files::open_regular(&path, entry.len) {
        Ok((f, len)) if len == entry.len => f,
        Ok(_) => return false,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "prefetched section refused; reading the store");
            return false;
        }
    };
    let mut input = std::io::Read::take(input, entry.len);
    let Ok(sink) = std::fs::File::create(out) else {
        return false;
    };
    let mut v =
        crate::format::envelope::SectionVerifier::new(entry, limits, std::io::BufWriter::new(sink));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => v.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    match v.finish() {
        Ok(mut w) => std::io::Write::flush(&mut w).is_ok(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = ?e, "prefetched section does not verify; reading the store");
            false
        }
    }
}

/// What `prefetch` fetched.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Prefetched {
    /// Miners whose shard was found and opened.
    pub shards: usize,
    /// Sections written to the cache.
    pub sections: usize,
    /// Sections already there.
    pub cached: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Miners whose shard could not be read (missing, refused, unreachable).
    pub skipped: usize,
}

/// Fetches every registered miner's shard of window `w` from the miners' own stores into
/// `cache` (stored section bytes, named by their blake3), before the aggregate exists: a
/// reader that later finds a listed section there (and it verifies) does not fetch it
/// again. Nothing here is trusted: `fetch_listed` checks every cached byte against the
/// signed list. Only sections holding a wanted tensor are fetched.
pub async fn prefetch(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
    cache: &std::path::Path,
    want: &(dyn Fn(usize) -> bool + Sync),
    concurrency: usize,
) -> Result<Prefetched, RoundError> {
    std::fs::create_dir_all(cache)
        .map_err(|e| RoundError::Caller(format!("{}: {e}", cache.display())))?;
    let miners = reg.with_role(Role::Miner);
    let each: Vec<Result<Prefetched, RoundError>> = futures::stream::iter(miners.iter().map(|m| async move {
        let mut got = Prefetched::default();
        let Ok(peer) = PeerId::parse(&m.peer) else {
            got.skipped = 1;
            return Ok(got);
        };
        let Ok(target) = reg.open_store(m, s3) else {
            got.skipped = 1;
            return Ok(got);
        };
        let path = target.path(&crate::format::layout::grad(&reg.run, w, &peer));
        let object = target.url_of(&path);
        let expect = Expect::in_window(Kind::Grad, peer, &reg.run, w);
        let env = match RemoteEnvelope::open(target.store.as_ref(), &path, &object, &shard_limits(reg), &expect).await {
            Ok(env) => env,
            Err(e) => {
                tracing::info!(object = %object, error = %e, "not prefetched");
                got.skipped = 1;
                return Ok(got);
            }
        };
        got.shards = 1;
        let start = env.head.body_start();
        for e in env.sections() {
            let wanted = section_range(&e.name).is_some_and(|r| r.clone().any(want));
            let file = cache.join(&e.hash);
            if !wanted || !crate::format::envelope::is_ident(&e.hash) {
                continue;
            }
            if file.exists() {
                got.cached += 1;
                continue;
            }
            use object_store::ObjectStoreExt;
            let range = start + e.offset..start + e.offset + e.len;
            let bytes = match target.store.get_range(&path, range).await {
                Ok(b) => b,
                Err(err) => {
                    tracing::info!(object = %object, section = %e.name, error = %err, "section not prefetched");
                    continue;
                }
            };
            if blake3::hash(&bytes).to_hex().as_str() != e.hash {
                continue;
            }
            // A fresh temporary file (created exclusively, so never through a link planted
            // at a predictable name: the hash is public in the miner's header), renamed over.
            crate::files::write_replace(cache, &file, &bytes)
                .map_err(|err| RoundError::io(&file, err))?;
            got.sections += 1;
            got.bytes += bytes.len() as u64;
        }
        Ok(got)
    }))
    .buffer_unordered(concurrency.max(1))
    .collect()
    .await;
    let mut total = Prefetched::default();
    for p in each {
        let p = p?;
        total.shards += p.shards;
        total.sections += p.sections;
        total.cached += p.cached;
        total.bytes += p.bytes;
        total.skipped += p.skipped;
    }
    Ok(total)
}

impl Spooled {
    /// Stage 2: merges every wanted tensor in model order and hands each to `sink` as
    /// `(model index, accumulator)`. The accumulator is exactly agg-v1's merged tensor.
    pub fn merge(
        &self,
        reg: &Registry,
        want: &(dyn Fn(usize) -> bool + Sync),
        mut sink: impl FnMut(usize, &[f32]) -> Result<(), RoundError>,
    ) -> Result<(), RoundError> {
        if let Some(files) = &self.merged {
            return self.merged_tensors(reg, files, want, sink);
        }
        let mut loaded = Loaded::new(self.shards.len());
        for i in (0..reg.model.tensors.len()).filter(|&i| want(i)) {
            self.load(reg, &mut loaded, i)?;
            let spec = &reg.model.tensors[i];
            let mut acc = vec![0f32; spec.shape.iter().product::<u64>() as usize];
            for (j, s) in self.shards.iter().enumerate() {
                codec::accumulate(self.tensor(&loaded, j, i, reg)?, &mut acc, s.weight)?;
            }
            sink(i, &acc)?;
        }
        Ok(())
    }

    /// The merged values of tensor `i`'s chunks `chunks` (a slab), exactly the elements
    /// `merge` would produce there: the same `acc += weight · value` per element, in list
    /// order. Tensors must be asked for in ascending order (`loaded` keeps one decoded
    /// section per shard, or, for form `merged`, the current tensor).
    pub fn slab(
        &self,
        reg: &Registry,
        loaded: &mut Loaded,
        i: usize,
        chunks: Range<usize>,
    ) -> Result<Vec<f32>, RoundError> {
        let spec = &reg.model.tensors[i];
        let numel = spec.shape.iter().product::<u64>() as usize;
        let c = reg.codec.chunk as usize;
        let elems = (chunks.start * c).min(numel)..(chunks.end * c).min(numel);
        if let Some(files) = &self.merged {
            if loaded.tensor.as_ref().is_none_or(|(t, _)| *t != i) {
                let mut got = None;
                self.merged_tensors(reg, files, &|k| k == i, |_, acc| {
                    got = Some(acc.to_vec());
                    Ok(())
                })?;
                loaded.tensor = got.map(|acc| (i, acc));
            }
            let acc = loaded.tensor.as_ref().map_or(&[][..], |(_, a)| a);
            return Ok(acc.get(elems).map_or_else(Vec::new, <[f32]>::to_vec));
        }
        self.load(reg, loaded, i)?;
        let mut acc = vec![0f32; elems.len()];
        for (j, s) in self.shards.iter().enumerate() {
            let (idx, val) =
                codec::to_sparse_chunks(self.tensor(loaded, j, i, reg)?, chunks.clone())?;
            for (k, v) in idx.into_iter().zip(val) {
                acc[k as usize] += s.weight * v;
            }
        }
        Ok(acc)
    }

    /// Makes `loaded` hold, for every shard, the decoded section that holds tensor `i`.
    fn load(&self, reg: &Registry, loaded: &mut Loaded, i: usize) -> Result<(), RoundError> {
        for (j, s) in self.shards.iter().enumerate() {
            let Some((name, _, file)) = s.sections.iter().find(|(_, r, _)| r.contains(&i)) else {
                continue;
            };
            if loaded.sections[j].as_ref().is_some_and(|(c, _)| c == name) {
                continue;
            }
            let file = file
                .as_ref()
                .ok_or_else(|| RoundError::Internal(format!("section {name} was not fetched")))?;
            loaded.sections[j] = Some((name.clone(), self.decode(reg, j, file)?));
        }
        Ok(())
    }

    /// Shard `j`'s tensor `i`, from what `load` put in `loaded`.
    fn tensor<'l>(
        &self,
        loaded: &'l Loaded,
        j: usize,
        i: usize,
        reg: &Registry,
    ) -> Result<&'l EncodedTensor, RoundError> {
        let name = &reg.model.tensors[i].name;
        loaded.sections[j]
            .as_ref()
            .and_then(|(_, ts)| ts.get(name))
            .ok_or_else(|| {
                RoundError::Internal(format!(
                    "window {}: shard {j} has no tensor {name}",
                    self.window
                ))
            })
    }

    /// A fresh [`Loaded`] for this window's slabs.
    pub fn loaded(&self) -> Loaded {
        Loaded::new(self.shards.len())
    }

    /// Form `merged`: each wanted tensor from its agg-v1 section (checked against the model:
    /// finite values, indices in range), expanded to the accumulator it was written from.
    fn merged_tensors(
        &self,
        reg: &Registry,
        files: &[Option<PathBuf>],
        want: &(dyn Fn(usize) -> bool + Sync),
        mut sink: impl FnMut(usize, &[f32]) -> Result<(), RoundError>,
    ) -> Result<(), RoundError> {
        for (i, spec) in reg
            .model
            .tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| want(*i))
        {
            let file = files[i].as_ref().ok_or_else(|| {
                RoundError::Internal(format!("tensor {} was not fetched", spec.name))
            })?;
            let mut bytes = Vec::new();
            std::fs::File::open(file)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| RoundError::io(file, e))?;
            let bad = |detail: String| RoundError::Rejected {
                object: format!("window {} merged t{i:05}", self.window),
                reason: RoundReason::AggSectionMismatch.code(),
                detail,
            };
            let t = crate::format::agg_tensor::read_agg_tensor(&bytes, &reg.model)
                .map_err(|e| bad(format!("window {}: section t{i:05}: {e}", self.window)))?;
            if t.name != spec.name {
                return Err(bad(format!(
                    "window {}: section t{i:05} holds {:?}, not {:?}",
                    self.window, t.name, spec.name
                )));
            }
            let acc = match t.values {
                crate::format::agg_tensor::AggValues::Dense(v) => v,
                crate::format::agg_tensor::AggValues::Sparse(idx, val) => {
                    let mut acc = vec![0f32; spec.shape.iter().product::<u64>() as usize];
                    for (i, v) in idx.into_iter().zip(val) {
                        acc[i as usize] = v;
                    }
                    acc
                }
            };
            sink(i, &acc)?;
        }
        Ok(())
    }

    /// The first `limit` elements of tensor `i` merged (weight × value summed in list
    /// order): a sample of the merged tensor that costs `limit` floats, not the tensor's
    /// size. Only for estimating sizes; `merge` is the exact path.
    pub fn sample(&self, reg: &Registry, i: usize, limit: usize) -> Result<Vec<f32>, RoundError> {
        let chunks = 0..limit.div_ceil(reg.codec.chunk as usize);
        let mut acc = self.slab(reg, &mut self.loaded(), i, chunks)?;
        acc.truncate(limit);
        Ok(acc)
    }

    fn decode(
        &self,
        reg: &Registry,
        j: usize,
        file: &PathBuf,
    ) -> Result<BTreeMap<String, EncodedTensor>, RoundError> {
        let mut bytes = Vec::new();
        std::fs::File::open(file)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| RoundError::io(file, e))?;
        let tensors = codec::read_section(&bytes, Some(&reg.model), &CodecLimits::default())
            .map_err(|e| {
                RoundError::Internal(format!(
                    "window {}: shard {j}: a listed section does not decode: {e}",
                    self.window
                ))
            })?;
        Ok(tensors.into_iter().map(|t| (t.name.clone(), t)).collect())
    }
}
