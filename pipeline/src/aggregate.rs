//! The aggregator's merge and the catch-up replay.
//!
//! For a closed window the aggregator takes every registered miner's verdict from the
//! shared [`crate::verdict`] pipeline (header pass, range checks, duplicates settled by the
//! miners' commits, outlier norms clipped), and merges the accepted shards as a weighted mean in peer-id order, in f32. It writes the ledger, then publishes
//! the aggregate create-only: the aggregate is the commit point, so no partial aggregate is
//! ever visible, and since every input and the recorded clock are fixed by the window, a
//! rerun (after a crash or not) produces the same bytes.
//!
//! Aggregate body (`agg-v1`): one section per model tensor, `tNNNNN` in model order, each a
//! safetensors file holding the tensor either dense (`NAME`, F32) or sparse (`NAME/idx` U32
//! flat indices ascending, `NAME/val` F32), whichever is smaller.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::accepted::{
    AcceptedList, AcceptedShard, LIST_SECTION, ListedSection, MergedObject, shard_key,
};
use crate::codec::{CodecError, EncodedTensor, ModelSpec, accumulate};
use crate::envelope::read_signed;
use crate::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, Limits, SignedEnvelope,
};
use crate::exchange::{ExchangeError, clock};
use crate::identity::{Identity, PeerId};
use crate::layout;
use crate::merge;
use crate::outer::OuterState;
use crate::registry::{AggForm, AggFormat, Job, Registry, Role};
use crate::store::{self, PutOutcome, S3Options, StoreError, Target};
use crate::tables::ledger_parquet;
use crate::verdict::{
    MinerShard, OpenWindow, RangeCheck, Verdict, Verdicts, check_ranges, consolidate,
    copy_and_check, finalize, open_window,
};

/// The aggregate codec this build writes and reads (`schemas/round.md`).
pub const AGG_CODEC: &str = "agg-v1";
/// The agg-v2 aggregate codec: a signed list of the accepted shards (`accepted`).
pub const AGG_V2_CODEC: &str = "agg-v2";

/// What one aggregation produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Aggregated {
    /// The window merged.
    pub window: u64,
    /// The aggregate's URL.
    pub object: String,
    /// The ledger's URL.
    pub ledger: String,
    /// Shards merged.
    pub accepted: usize,
    /// Shards refused.
    pub rejected: usize,
    /// Miners with no shard.
    pub missing: usize,
    /// Miners whose store could not be read in time.
    pub errors: usize,
    /// The aggregate's stored size.
    pub bytes: u64,
    /// The same aggregate was already there (a rerun).
    pub already_published: bool,
    /// How many shards each reason code was given to.
    pub reasons: BTreeMap<String, usize>,
    /// agg-v2: seconds spent per phase (`header` pass after the close, `copy`, `check`,
    /// `merge` for the merged form's decision and object, `publish`), for benchmarks and
    /// logs; empty for agg-v1.
    pub phases: BTreeMap<String, f64>,
}

fn agg_tensor(name: &str, shape: &[u64], dense: &[f32]) -> Result<Vec<u8>, ExchangeError> {
    let nnz = dense.iter().filter(|&&x| x != 0.0).count();
    let bad = |e: safetensors::SafeTensorError| {
        ExchangeError::Internal(format!("aggregate tensor {name}: {e}"))
    };
    let sparse = nnz * 8 < dense.len() * 4;
    let meta = serde_json::json!({"codec": AGG_CODEC, "name": name, "shape": shape, "form": if sparse { "sparse" } else { "dense" }});
    let info: HashMap<String, String> = [("shardrop".to_string(), meta.to_string())].into();
    if sparse {
        let mut idx = Vec::with_capacity(nnz * 4);
        let mut val = Vec::with_capacity(nnz * 4);
        for (i, &x) in dense.iter().enumerate() {
            if x != 0.0 {
                idx.extend_from_slice(&(i as u32).to_le_bytes());
                val.extend_from_slice(&x.to_le_bytes());
            }
        }
        let views = vec![
            (
                format!("{name}/idx"),
                TensorView::new(Dtype::U32, vec![nnz], &idx).map_err(bad)?,
            ),
            (
                format!("{name}/val"),
                TensorView::new(Dtype::F32, vec![nnz], &val).map_err(bad)?,
            ),
        ];
        safetensors::serialize(views, Some(info)).map_err(bad)
    } else {
        let raw: Vec<u8> = dense.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![(
            name.to_string(),
            TensorView::new(
                Dtype::F32,
                shape.iter().map(|&d| d as usize).collect(),
                &raw,
            )
            .map_err(bad)?,
        )];
        safetensors::serialize(views, Some(info)).map_err(bad)
    }
}

/// Envelope limits for what an aggregator signs for a window (the aggregate, split-merge
/// parts and checks): at most every model tensor dense in f32, plus headers, plus 64 MiB for
/// per-miner check tables. A reader's memory is then bounded by the model, not by the object.
pub fn agg_limits(reg: &Registry) -> Limits {
    let dense: u64 = reg
        .model
        .tensors
        .iter()
        .map(|t| {
            let n = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            n.map_or(u64::MAX, |n| n.saturating_mul(4))
                .saturating_add(4096 + 16 * t.name.len() as u64)
        })
        .fold(0u64, u64::saturating_add);
    let cap = dense.saturating_add(64 << 20);
    Limits {
        max_section_raw_len: cap,
        max_raw_len: cap,
        ..Limits::default()
    }
}

/// One tensor of an aggregate, decoded and checked against the model: every value finite,
/// every index inside the tensor, so that callers can use it without further checks.
pub struct AggTensor {
    /// The model tensor it updates.
    pub name: String,
    /// Its values.
    pub values: AggValues,
}

/// The two forms an aggregate tensor travels in (whichever is smaller).
pub enum AggValues {
    /// Every element, in row-major order.
    Dense(Vec<f32>),
    /// Flat indices ascending and their values.
    Sparse(Vec<u32>, Vec<f32>),
}

impl AggTensor {
    /// `(flat index, value)` of every stored entry (zeros included for the dense form).
    pub fn entries(&self) -> Box<dyn Iterator<Item = (usize, f32)> + '_> {
        match &self.values {
            AggValues::Dense(v) => Box::new(v.iter().copied().enumerate()),
            AggValues::Sparse(i, v) => {
                Box::new(i.iter().map(|&i| i as usize).zip(v.iter().copied()))
            }
        }
    }
}

/// Parses one aggregate tensor section; a malformed one is refused with a codec reason
/// (`section_malformed`, `unknown_tensor`, `non_finite`).
pub fn read_agg_tensor(section: &[u8], model: &ModelSpec) -> Result<AggTensor, CodecError> {
    let st = SafeTensors::deserialize(section)
        .map_err(|e| malformed(format!("not safetensors: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(section).map_err(|e| malformed(e.to_string()))?;
    let meta: serde_json::Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("shardrop"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| malformed("no shardrop metadata".into()))?;
    let name = meta["name"]
        .as_str()
        .ok_or_else(|| malformed("no tensor name".into()))?;
    let spec = model.get(name).ok_or_else(|| CodecError::UnknownTensor {
        tensor: name.to_string(),
    })?;
    let numel = spec.shape.iter().product::<u64>();
    let f32s = |b: &[u8]| -> Result<Vec<f32>, CodecError> {
        let v: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        match v.iter().all(|x| x.is_finite()) {
            true => Ok(v),
            false => Err(CodecError::NonFinite {
                tensor: name.to_string(),
                what: "a value".into(),
            }),
        }
    };
    let values = match meta["form"].as_str() {
        Some("dense") => {
            let t = st.tensor(name).map_err(|e| malformed(e.to_string()))?;
            if t.dtype() != Dtype::F32
                || t.shape().iter().map(|&d| d as u64).collect::<Vec<_>>() != spec.shape
            {
                return Err(malformed(format!(
                    "tensor {name}: dense form has the wrong dtype or shape"
                )));
            }
            AggValues::Dense(f32s(t.data())?)
        }
        Some("sparse") => {
            let idx = st
                .tensor(&format!("{name}/idx"))
                .map_err(|e| malformed(e.to_string()))?;
            let val = st
                .tensor(&format!("{name}/val"))
                .map_err(|e| malformed(e.to_string()))?;
            if idx.dtype() != Dtype::U32 || val.dtype() != Dtype::F32 || idx.shape() != val.shape()
            {
                return Err(malformed(format!(
                    "tensor {name}: sparse form has the wrong dtypes or shapes"
                )));
            }
            let ids: Vec<u32> = idx
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(bad) = ids.iter().find(|&&i| i as u64 >= numel) {
                return Err(malformed(format!(
                    "tensor {name}: index {bad} out of range"
                )));
            }
            if ids.windows(2).any(|p| p[0] >= p[1]) {
                return Err(malformed(format!("tensor {name}: indices not increasing")));
            }
            AggValues::Sparse(ids, f32s(val.data())?)
        }
        _ => return Err(malformed(format!("tensor {name}: unknown form"))),
    };
    Ok(AggTensor {
        name: name.to_string(),
        values,
    })
}

fn malformed(detail: String) -> CodecError {
    CodecError::Malformed(detail)
}

/// Where an aggregator's weighted merge runs. The GPU's decode-and-accumulate is
/// bit-identical to the CPU's, so an aggregate's bytes do not depend on the choice (and a
/// split merge may mix devices).
#[derive(Clone, Default)]
pub struct MergeOn {
    /// The device that merges (the CPU when `None`).
    #[cfg(feature = "cuda")]
    pub gpu: Option<std::sync::Arc<crate::codec::gpu::Gpu>>,
    /// How long after the window's close the reads may take (`window_budget`); None: the
    /// run's window length.
    pub budget: Option<Duration>,
}

impl MergeOn {
    /// The same, with reads of a window ending `budget` after its close.
    pub fn with_budget(mut self, budget: Option<Duration>) -> Self {
        self.budget = budget;
        self
    }
}

/// Merges the tensors of `range` (weighted, in peer-id order) into aggregate sections.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn merge_range(
    reg: &Registry,
    range: Range<usize>,
    weights: &[f32],
    decoded: &[(RangeCheck, Vec<EncodedTensor>)],
    on: &MergeOn,
) -> Result<Vec<(String, Vec<u8>)>, ExchangeError> {
    use rayon::prelude::*;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &on.gpu {
        return merge_range_gpu(gpu, reg, range, weights, decoded);
    }
    range
        .into_par_iter()
        .map(|i| {
            let spec = &reg.model.tensors[i];
            let mut dense = vec![0f32; spec.shape.iter().product::<u64>() as usize];
            for (j, (_, tensors)) in decoded.iter().enumerate() {
                if weights[j] == 0.0 {
                    continue;
                }
                if let Some(t) = tensors.iter().find(|t| t.name == spec.name) {
                    accumulate(t, &mut dense, weights[j])?;
                }
            }
            Ok((
                format!("t{i:05}"),
                agg_tensor(&spec.name, &spec.shape, &dense)?,
            ))
        })
        .collect()
}

/// `merge_range` with each tensor's accumulator on the GPU (one tensor at a time: the
/// device is parallel within it). Only the dense result comes back, to be written.
#[cfg(feature = "cuda")]
fn merge_range_gpu(
    gpu: &crate::codec::gpu::Gpu,
    reg: &Registry,
    range: Range<usize>,
    weights: &[f32],
    decoded: &[(RangeCheck, Vec<EncodedTensor>)],
) -> Result<Vec<(String, Vec<u8>)>, ExchangeError> {
    use crate::codec::gpu::GpuError;
    let dev = |e: cudarc::driver::DriverError| ExchangeError::from(GpuError::from(e));
    let s = gpu.stream();
    range
        .map(|i| {
            let spec = &reg.model.tensors[i];
            let n = spec.shape.iter().product::<u64>() as usize;
            let mut host = vec![0f32; n];
            if n > 0 {
                let mut dense = s.clone_htod(&host).map_err(dev)?;
                for (j, (_, tensors)) in decoded.iter().enumerate() {
                    if weights[j] == 0.0 {
                        continue;
                    }
                    if let Some(t) = tensors.iter().find(|t| t.name == spec.name) {
                        gpu.accumulate(t, &mut dense, weights[j])?;
                    }
                }
                s.memcpy_dtoh(&dense, &mut host).map_err(dev)?;
            }
            Ok((
                format!("t{i:05}"),
                agg_tensor(&spec.name, &spec.shape, &host)?,
            ))
        })
        .collect()
}

/// What an aggregate carries: agg-v1's merged tensor sections, or agg-v2's signed list.
enum Body {
    Merged(Vec<(String, Vec<u8>)>),
    Listed(AcceptedList),
}

/// Writes the ledger, then signs and puts the aggregate (the commit point).
async fn publish_aggregate(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    w: u64,
    v: &Verdicts,
    body: Body,
) -> Result<Aggregated, ExchangeError> {
    let mut reasons = BTreeMap::new();
    for r in &v.rows {
        if !r.reason.is_empty() {
            *reasons.entry(r.reason.clone()).or_insert(0) += 1;
        }
    }
    let count = |x: Verdict| v.rows.iter().filter(|r| r.verdict == x).count();
    let (accepted, rejected, missing, errors) = (
        count(Verdict::Accepted),
        count(Verdict::Rejected),
        count(Verdict::Missing),
        count(Verdict::Error),
    );
    let ledger =
        ledger_parquet(&v.rows).map_err(|e| ExchangeError::Internal(format!("ledger: {e}")))?;
    let ledger_path = target.path(&layout::ledger(&reg.run, w));
    let ledger_url = target.url_of(&ledger_path);
    target
        .store
        .put(&ledger_path, PutPayload::from(Bytes::from(ledger)))
        .await
        .map_err(|e| StoreError::from_store(&ledger_url, e))?;
    let codec = match &body {
        Body::Merged(_) => AGG_CODEC,
        Body::Listed(_) => AGG_V2_CODEC,
    };
    let mut b = EnvelopeBuilder::new(Kind::Agg, &reg.run)
        .window(w)
        .codec(codec, Default::default())
        .clock_ms(clock(reg).closes(w))
        .meta("accepted", &accepted.to_string())
        .meta("rejected", &rejected.to_string())
        .meta("missing", &missing.to_string())
        .meta("errors", &errors.to_string());
    match body {
        Body::Merged(sections) if accepted > 0 => b = b.sections(sections, Compression::Zstd)?,
        Body::Merged(_) => {}
        Body::Listed(list) => {
            b = b.meta("form", list.form.name());
            let json = serde_json::to_vec(&list)
                .map_err(|e| ExchangeError::Internal(format!("accepted list: {e}")))?;
            b = b.sections(vec![(LIST_SECTION.to_string(), json)], Compression::Zstd)?;
        }
    }
    let signed = b.sign(id)?;
    let path = target.path(&layout::agg(&reg.run, w));
    let object = target.url_of(&path);
    let outcome = store::put_create(target, &path, &signed).await?;
    Ok(Aggregated {
        window: w,
        object,
        ledger: ledger_url,
        accepted,
        rejected,
        missing,
        errors,
        bytes: signed.len(),
        already_published: outcome == PutOutcome::AlreadyIdentical,
        reasons,
        phases: BTreeMap::new(),
    })
}

/// agg-v2's list from the final verdicts: the accepted shards in peer-id order, with the
/// section tables that were checked (the aggregator's copies' for form `shards`).
fn accepted_list(reg: &Registry, w: u64, shards: &[MinerShard], v: &Verdicts) -> AcceptedList {
    // A form `merged` run's empty list still says `merged` (with no merged object): the
    // list's form must be one the run allows, and an empty window has nothing to merge.
    let form = match reg.aggregate.form {
        AggForm::Reference => AggForm::Reference,
        AggForm::Merged if !v.rows.iter().any(|r| r.verdict == Verdict::Accepted) => {
            AggForm::Merged
        }
        _ => AggForm::Shards,
    };
    let accepted = shards
        .iter()
        .zip(&v.rows)
        .zip(&v.weights)
        .filter(|((_, row), _)| row.verdict == Verdict::Accepted)
        .filter_map(|((s, row), &weight)| {
            let peer = PeerId::parse(&s.peer).ok()?;
            Some(AcceptedShard {
                peer: s.peer.clone(),
                object: shard_key(reg, form, w, &peer),
                content: s.content.clone().unwrap_or_default(),
                weight,
                clipped: row.reason == "clipped",
                sections: s.sections().iter().map(ListedSection::from).collect(),
            })
        })
        .collect();
    AcceptedList {
        format: AGG_V2_CODEC.into(),
        window: w,
        form,
        accepted,
        merged: None,
    }
}

/// Elements of `auto`'s sample (a 64 MiB accumulator at most).
const SAMPLE: usize = 1 << 24;

/// The codec of the merged object (form `merged`).
pub const MERGED_CODEC: &str = "agg-merged-v1";

/// Forms `merged` and `auto`: merges the listed shards one tensor at a time (with the
/// readers' own code, so the bytes are what every reader would compute), and signs the
/// merged object: always for `merged`; for `auto` only when a sample tensor, merged alone,
/// is smaller than the shards' bytes for its share of the model, and then only if the whole
/// object is smaller than the shards. Returns the list to sign and the object to put before
/// it. Memory: the largest tensor's accumulator while merging (the sample's: ≤ 64 MiB).
async fn with_merged(
    job: Job<'_>,
    w: u64,
    mut list: AcceptedList,
    sample: Option<Vec<f32>>,
) -> Result<(AcceptedList, Option<SignedEnvelope>), ExchangeError> {
    let reg = job.reg;
    let form = reg.aggregate.form;
    if !matches!(form, AggForm::Merged | AggForm::Auto) || list.accepted.is_empty() {
        return Ok((list, None));
    }
    let all = |_: usize| true;
    let shard_bytes: u64 = list
        .accepted
        .iter()
        .flat_map(|a| &a.sections)
        .map(|s| s.len)
        .sum();
    let numel = |i: usize| reg.model.tensors[i].shape.iter().product::<u64>();
    let total: u64 = (0..reg.model.tensors.len()).map(numel).sum();
    let encode = |i: usize, acc: &[f32]| {
        let spec = &reg.model.tensors[i];
        agg_tensor(&spec.name, &spec.shape, acc)
    };
    if form == AggForm::Auto {
        let Some(big) = sample_tensor(reg) else {
            return Ok((list, None));
        };
        // The sample came with the checks; a split merge's commit, which ran none, fetches
        // the sections holding it.
        let acc = match sample {
            Some(acc) => acc,
            None => {
                let one = |i: usize| i == big;
                let spooled = merge::fetch_listed(reg, job.s3, &list, &one, None).await?;
                spooled.sample(reg, big, SAMPLE)?
            }
        };
        let spec = &reg.model.tensors[big];
        let raw = agg_tensor(&spec.name, &[acc.len() as u64], &acc)?;
        let sample = zstd::bulk::compress(&raw, 3)
            .map_err(|e| ExchangeError::Internal(format!("zstd: {e}")))?
            .len() as u64;
        let numel_big = acc.len() as u64;
        drop(acc);
        let share = shard_bytes as f64 * numel_big as f64 / total.max(1) as f64;
        if sample as f64 >= share {
            return Ok((list, None));
        }
    }
    let spooled = merge::fetch_listed(reg, job.s3, &list, &all, None).await?;
    let dir = tempfile::tempdir().map_err(|e| ExchangeError::Internal(format!("spool: {e}")))?;
    let mut files = Vec::with_capacity(reg.model.tensors.len());
    spooled.merge(reg, &all, |i, acc| {
        let file = dir.path().join(format!("t{i:05}"));
        std::fs::write(&file, encode(i, acc)?)
            .map_err(|e| ExchangeError::Internal(format!("{}: {e}", file.display())))?;
        files.push((format!("t{i:05}"), file));
        Ok(())
    })?;
    let mut b = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(MERGED_CODEC, Default::default())
        .clock_ms(clock(reg).closes(w));
    for (name, file) in &files {
        b = b.section_file(name, file, Compression::Zstd, None)?;
    }
    let signed = b.sign(job.id)?;
    if form == AggForm::Auto && signed.len() >= shard_bytes {
        return Ok((list, None));
    }
    list.form = AggForm::Merged;
    list.merged = Some(MergedObject {
        object: layout::agg_merged(&reg.run, w),
        sections: signed
            .header
            .sections
            .iter()
            .map(ListedSection::from)
            .collect(),
    });
    Ok((list, Some(signed)))
}

/// Puts the merged object if there is one, then the ledger and the list (the commit point).
async fn publish_v2(
    job: Job<'_>,
    target: &Target,
    w: u64,
    v: &Verdicts,
    list: AcceptedList,
    mut phases: Phases,
    sample: Option<Vec<f32>>,
) -> Result<Aggregated, ExchangeError> {
    let t = std::time::Instant::now();
    let (list, merged) = with_merged(job, w, list, sample).await?;
    phases.add("merge", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    if let Some(m) = merged {
        let path = target.path(&layout::agg_merged(&job.reg.run, w));
        store::put_create(target, &path, &m).await?;
    }
    let mut out = publish_aggregate(job.reg, job.id, target, w, v, Body::Listed(list)).await?;
    phases.add("publish", t.elapsed().as_secs_f64());
    tracing::info!(window = w, phases = ?phases.0, "agg-v2 published");
    out.phases = phases.0;
    Ok(out)
}

/// The agg-v2 aggregator for window `w`, tensors `range` (all of them, or one part's): the
/// header pass, the copies (form `shards`), then every shard's sections checked one at a
/// time. No tensor is merged and nothing model-sized is held: readers merge.
async fn check_window_v2(
    job: Job<'_>,
    w: u64,
    range: Range<usize>,
    concurrency: usize,
    budget: Option<Duration>,
) -> Result<
    (
        OpenWindow,
        Vec<RangeCheck>,
        Phases,
        Vec<Option<EncodedTensor>>,
    ),
    ExchangeError,
> {
    let reg = job.reg;
    let mut phases = Phases::default();
    let mut open = open_window(job, Role::Aggregator, w, concurrency, budget).await?;
    // The header pass starts at the close (open_window waits for it first).
    let closed = clock(reg).closes(w);
    let now = crate::window::store_now_ms(&open.target, &layout::clock_probe(&reg.run, &open.me))
        .await
        .unwrap_or(closed);
    phases.add("header", now.saturating_sub(closed) as f64 / 1000.0);
    let t = std::time::Instant::now();
    let keep = sample_tensor(reg).filter(|i| range.contains(i));
    let target = open.target.clone();
    let copy_to = reg.aggregate.form.consolidated().then_some(&target);
    let checked = copy_and_check(
        reg,
        copy_to,
        w,
        &mut open.shards,
        range,
        keep,
        concurrency,
        open.deadline,
    )
    .await;
    phases.add("copy_and_check", t.elapsed().as_secs_f64());
    let (checks, kept): (Vec<RangeCheck>, Vec<Option<EncodedTensor>>) = checked.into_iter().unzip();
    Ok((open, checks, phases, kept))
}

/// The tensor whose merge, as a sample, decides agg-v2's `auto` form: the largest (the
/// lowest index among equals).
fn sample_tensor(reg: &Registry) -> Option<usize> {
    let numel = |i: usize| reg.model.tensors[i].shape.iter().product::<u64>();
    (0..reg.model.tensors.len()).max_by_key(|&i| (numel(i), usize::MAX - i))
}

/// The first `limit` elements of tensor `t` merged from the checked shards' decoded copies
/// (weight × value in peer order): `auto`'s sample, for sizes only.
fn sample_from(
    kept: &[Option<EncodedTensor>],
    weights: &[f32],
    limit: usize,
) -> Result<Vec<f32>, ExchangeError> {
    let n = kept
        .iter()
        .flatten()
        .map(|t| t.numel() as usize)
        .next()
        .unwrap_or(0)
        .min(limit);
    let mut acc = vec![0f32; n];
    for (t, &w) in kept.iter().zip(weights) {
        let Some(t) = t.as_ref().filter(|_| w > 0.0) else {
            continue;
        };
        let (idx, val) = crate::codec::to_sparse(t)?;
        for (k, v) in idx.into_iter().zip(val).filter(|(k, _)| (*k as usize) < n) {
            acc[k as usize] += w * v;
        }
    }
    Ok(acc)
}

/// Seconds per phase of one aggregation.
#[derive(Default)]
struct Phases(BTreeMap<String, f64>);

impl Phases {
    fn add(&mut self, name: &str, secs: f64) {
        *self.0.entry(name.to_string()).or_insert(0.0) += secs;
    }
}

/// Merges window `w` in one process and publishes its ledger and aggregate into the
/// aggregator's store.
pub async fn aggregate_window(
    job: Job<'_>,
    w: u64,
    concurrency: usize,
) -> Result<Aggregated, ExchangeError> {
    aggregate_window_on(job, w, concurrency, &MergeOn::default()).await
}

/// `aggregate_window` with the merge on `on`.
pub async fn aggregate_window_on(
    job: Job<'_>,
    w: u64,
    concurrency: usize,
    on: &MergeOn,
) -> Result<Aggregated, ExchangeError> {
    let Job { reg, id, .. } = job;
    let all = 0..reg.model.tensors.len();
    if reg.aggregate.format == AggFormat::V2 {
        let (open, checks, phases, kept) =
            check_window_v2(job, w, all, concurrency, on.budget).await?;
        let v = finalize(reg, w, &open.shards, &[checks]);
        let list = accepted_list(reg, w, &open.shards, &v);
        let sample = match kept.iter().any(Option::is_some) {
            true => Some(sample_from(&kept, &v.weights, SAMPLE)?),
            false => None,
        };
        drop(kept);
        return publish_v2(job, &open.target, w, &v, list, phases, sample).await;
    }
    let OpenWindow {
        target,
        shards,
        deadline,
        ..
    } = open_window(job, Role::Aggregator, w, concurrency, on.budget).await?;
    let decoded = check_ranges(reg, &shards, all.clone(), concurrency, deadline).await;
    let checks: Vec<RangeCheck> = decoded.iter().map(|(c, _)| c.clone()).collect();
    let v = finalize(reg, w, &shards, &[checks]);
    let sections = merge_range(reg, all, &v.weights, &decoded, on)?;
    drop(decoded);
    publish_aggregate(reg, id, &target, w, &v, Body::Merged(sections)).await
}

/// Tensor indices of part `i` of `k`: contiguous ranges in model order.
pub fn part_range(tensors: usize, i: usize, k: usize) -> Range<usize> {
    (i * tensors / k)..((i + 1) * tensors / k)
}

/// Reads a signed blob the aggregator key wrote (its sections, named), waiting until it
/// exists.
async fn wait_for_blob(
    reg: &Registry,
    target: &Target,
    me: &PeerId,
    key: &str,
    w: u64,
) -> Result<Vec<(String, Vec<u8>)>, ExchangeError> {
    let expect = Expect::in_window(Kind::Blob, *me, &reg.run, w);
    loop {
        match read_signed(target, key, &expect, &agg_limits(reg)).await {
            Ok((env, sections)) => {
                let names = env.sections().iter().map(|s| s.name.clone());
                return Ok(names.zip(sections).collect());
            }
            Err(EnvelopeError::NotFound { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn put_blob(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    key: &str,
    w: u64,
    codec: &str,
    sections: Vec<(String, Vec<u8>)>,
) -> Result<(), ExchangeError> {
    let signed = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(codec, Default::default())
        .clock_ms(clock(reg).closes(w))
        .sections(sections, Compression::Zstd)?
        .sign(id)?;
    store::put_create(target, &target.path(key), &signed).await?;
    Ok(())
}

/// One worker of a split merge (`schemas/round.md`, "Split merge"): checks and merges only the tensors of part `i`
/// of `k`, reading only the sections that hold them. It publishes its range checks, waits
/// for every other worker's, derives the same verdicts as a single process would, and
/// publishes its merged tensors. `aggregate_commit` assembles the aggregate.
/// The merge runs on `on` (the CPU by default; workers may mix devices).
#[allow(clippy::too_many_arguments)]
pub async fn aggregate_part(
    job: Job<'_>,
    w: u64,
    i: usize,
    k: usize,
    concurrency: usize,
    on: &MergeOn,
) -> Result<usize, ExchangeError> {
    let Job { reg, id, .. } = job;
    if k == 0 || i >= k {
        return Err(ExchangeError::Caller(format!(
            "part {i}/{k}: expected 0 <= i < k"
        )));
    }
    let range = part_range(reg.model.tensors.len(), i, k);
    if reg.aggregate.format == AggFormat::V2 {
        // Only checks: the commit lists the accepted shards and readers merge.
        let (open, mine, _, _) =
            check_window_v2(job, w, range.clone(), concurrency, on.budget).await?;
        publish_checks(reg, id, &open.target, w, i, k, &mine).await?;
        return Ok(range.len());
    }
    let OpenWindow {
        me,
        target,
        shards,
        deadline,
    } = open_window(job, Role::Aggregator, w, concurrency, on.budget).await?;
    let decoded = check_ranges(reg, &shards, range.clone(), concurrency, deadline).await;
    let mine: Vec<RangeCheck> = decoded.iter().map(|(c, _)| c.clone()).collect();
    publish_checks(reg, id, &target, w, i, k, &mine).await?;
    let parts = read_checks(reg, &target, &me, w, k).await?;
    let v = finalize(reg, w, &shards, &parts);
    let sections = merge_range(reg, range.clone(), &v.weights, &decoded, on)?;
    put_blob(
        reg,
        id,
        &target,
        &layout::agg_part(&reg.run, w, i, k),
        w,
        "agg-part-v1",
        sections,
    )
    .await?;
    Ok(range.len())
}

/// A worker's range checks, for every other worker and the commit.
#[allow(clippy::too_many_arguments)]
async fn publish_checks(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    w: u64,
    i: usize,
    k: usize,
    mine: &[RangeCheck],
) -> Result<(), ExchangeError> {
    let json = serde_json::to_vec(mine).map_err(|e| ExchangeError::Internal(e.to_string()))?;
    put_blob(
        reg,
        id,
        target,
        &layout::agg_checks(&reg.run, w, i, k),
        w,
        "agg-checks-v1",
        vec![("checks.json".into(), json)],
    )
    .await
}

async fn read_checks(
    reg: &Registry,
    target: &Target,
    me: &PeerId,
    w: u64,
    k: usize,
) -> Result<Vec<Vec<RangeCheck>>, ExchangeError> {
    let mut parts = Vec::with_capacity(k);
    for p in 0..k {
        let key = layout::agg_checks(&reg.run, w, p, k);
        let secs = wait_for_blob(reg, target, me, &key, w).await?;
        let checks: Vec<RangeCheck> = secs
            .first()
            .map(|(_, j)| serde_json::from_slice(j))
            .transpose()
            .map_err(|e| ExchangeError::Rejected {
                object: target.url_of(&target.path(&key)),
                reason: "part_malformed",
                detail: format!("part {p} checks: {e}"),
            })?
            .unwrap_or_default();
        parts.push(checks);
    }
    if parts
        .iter()
        .any(|p| p.len() != reg.with_role(Role::Miner).len())
    {
        return Err(ExchangeError::Conflict {
            object: target.url_of(&target.path(&layout::agg_checks(&reg.run, w, 0, k))),
            detail:
                "a part's checks do not cover every miner (was the registry changed mid-window?)"
                    .into(),
        });
    }
    Ok(parts)
}

/// The final step of a split merge: once every part exists, writes the ledger and the same
/// aggregate, byte for byte, that a single process would.
pub async fn aggregate_commit(
    job: Job<'_>,
    w: u64,
    k: usize,
    concurrency: usize,
) -> Result<Aggregated, ExchangeError> {
    let Job { reg, id, .. } = job;
    let OpenWindow {
        me,
        target,
        mut shards,
        deadline,
    } = open_window(job, Role::Aggregator, w, concurrency, None).await?;
    let parts = read_checks(reg, &target, &me, w, k).await?;
    if reg.aggregate.format == AggFormat::V2 {
        if reg.aggregate.form.consolidated() {
            // The workers copied and checked; list the copies' section tables.
            consolidate(reg, &target, w, &mut shards, false, concurrency, deadline).await;
        }
        let v = finalize(reg, w, &shards, &parts);
        let list = accepted_list(reg, w, &shards, &v);
        return publish_v2(job, &target, w, &v, list, Phases::default(), None).await;
    }
    let v = finalize(reg, w, &shards, &parts);
    let mut sections = Vec::with_capacity(reg.model.tensors.len());
    for p in 0..k {
        let key = layout::agg_part(&reg.run, w, p, k);
        sections.extend(wait_for_blob(reg, &target, &me, &key, w).await?);
    }
    let want: Vec<String> = (0..reg.model.tensors.len())
        .map(|i| format!("t{i:05}"))
        .collect();
    if sections.iter().map(|(n, _)| n).ne(want.iter()) {
        return Err(ExchangeError::Rejected {
            object: target.url_of(&target.path(&layout::agg_part(&reg.run, w, 0, k))),
            reason: "part_malformed",
            detail: "the parts do not cover the model's tensors in order".into(),
        });
    }
    publish_aggregate(reg, id, &target, w, &v, Body::Merged(sections)).await
}

/// A verified aggregate: agg-v1's merged tensors, or agg-v2's list (checked against the
/// registry) that readers merge themselves.
pub enum Fetched {
    /// agg-v1: every tensor, parsed and checked.
    Merged(Vec<AggTensor>),
    /// agg-v2: the accepted shards.
    Listed(AcceptedList),
}

/// Fetches and verifies the aggregate of window `w` (signed by the run's aggregator). The
/// format is the aggregate's own (its header's codec), so windows written before a run
/// moved to agg-v2 stay readable. `NoAggregate` when it is not there (yet).
pub async fn fetch_aggregate(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
) -> Result<Fetched, ExchangeError> {
    let (agg_id, target) = reg.aggregator(s3)?;
    let key = layout::agg(&reg.run, w);
    let object = target.url_of(&target.path(&key));
    let expect = Expect::in_window(Kind::Agg, agg_id, &reg.run, w);
    let (env, sections) = match read_signed(&target, &key, &expect, &agg_limits(reg)).await {
        Ok(x) => x,
        Err(EnvelopeError::NotFound { .. }) => {
            return Err(ExchangeError::NoAggregate { window: w, object });
        }
        Err(e) => {
            return Err(ExchangeError::Aggregate {
                window: w,
                source: e,
            });
        }
    };
    if env.head.header.codec == AGG_V2_CODEC {
        let bad = |reason: &'static str, detail: String| ExchangeError::Rejected {
            object: object.clone(),
            reason,
            detail: format!("window {w}: {detail}"),
        };
        let [only] = sections.as_slice() else {
            return Err(bad(
                "agg_verdict",
                "an agg-v2 aggregate has exactly one section".into(),
            ));
        };
        if env.sections()[0].name != LIST_SECTION {
            return Err(bad(
                "agg_verdict",
                format!("its section is not {LIST_SECTION}"),
            ));
        }
        let list = AcceptedList::parse(only).map_err(|f| bad(f.reason, f.detail))?;
        list.check(reg, w).map_err(|f| bad(f.reason, f.detail))?;
        return Ok(Fetched::Listed(list));
    }
    env.sections()
        .iter()
        .zip(&sections)
        .map(|(entry, s)| {
            read_agg_tensor(s, &reg.model).map_err(|e| ExchangeError::Rejected {
                object: object.clone(),
                reason: e.reason(),
                detail: format!("window {w}: section {}: {e}", entry.name),
            })
        })
        .collect::<Result<_, _>>()
        .map(Fetched::Merged)
}

/// Replays the aggregates of windows `first ..= last` onto `theta` (f32 tensors by name)
/// with the outer optimizer in force for each window (`round.md`, "Outer optimizer"), in
/// window order. Stops at the first missing or invalid aggregate, naming the window; every
/// aggregate is checked whole before it is applied, so `theta` then holds exactly the
/// windows before it. Starts from zero momentum: a run whose optimizer kept momentum before
/// `first` is refused (`optimizer_state_missing`); use [`apply_aggregates_with`].
///
/// agg-v1: `theta` must hold every tensor; memory is the model plus one aggregate. agg-v2:
/// `theta` may hold a subset (one rank's tensors) and only their sections are fetched;
/// memory is the model plus the largest tensor's accumulator (`merge`).
pub async fn apply_aggregates<T: Tensor>(
    reg: &Registry,
    s3: &S3Options,
    theta: &mut BTreeMap<String, T>,
    first: u64,
    last: u64,
) -> Result<usize, ExchangeError> {
    let mut state = OuterState::default();
    apply_aggregates_with(
        reg,
        s3,
        theta,
        &mut state,
        first,
        last,
        &ApplyOptions::default(),
    )
    .await
}

/// Parameters a replay updates in place: owned buffers (the CLI's) or a caller's memory
/// (the Python package's tensors, borrowed as slices), f32 either way.
pub trait Tensor: AsRef<[f32]> + AsMut<[f32]> {}
impl<T: AsRef<[f32]> + AsMut<[f32]> + ?Sized> Tensor for T {}

/// How a replay fetches.
#[derive(Clone, Debug, Default)]
pub struct ApplyOptions<'a> {
    /// agg-v2 sections are taken from this folder (`merge::prefetch`) when they are there
    /// and verify, and from the store otherwise.
    pub cache: Option<&'a std::path::Path>,
    /// How long to wait for each window's aggregate to appear (polling once a second);
    /// `None` fails at once with `NoAggregate`.
    pub wait: Option<Duration>,
}

/// `apply_aggregates` that carries the outer optimizer's momentum in `state` (the buffers
/// after window `first − 1` in, after `last` out) and fetches as `opts` says.
///
/// A window whose aggregate accepted no shard is no outer step: parameters, momentum and
/// everything else stay as they are (the schedule still counts it: rates follow windows).
pub async fn apply_aggregates_with<T: Tensor>(
    reg: &Registry,
    s3: &S3Options,
    theta: &mut BTreeMap<String, T>,
    state: &mut OuterState,
    first: u64,
    last: u64,
    opts: &ApplyOptions<'_>,
) -> Result<usize, ExchangeError> {
    if reg.momentum_before(first) {
        for (name, t) in theta.iter() {
            match state.momentum.get(name) {
                Some(m) if m.len() == t.as_ref().len() => {}
                Some(_) => {
                    return Err(ExchangeError::Caller(format!(
                        "the momentum buffer of {name:?} has another size than the tensor"
                    )));
                }
                None => {
                    return Err(ExchangeError::Refused {
                        reason: "optimizer_state_missing",
                        detail: format!(
                            "the run's outer optimizer kept momentum before window {first}, and no momentum buffer for {name:?} was given (a checkpoint or state file holds it)"
                        ),
                    });
                }
            }
        }
    }
    let mut applied = 0;
    for w in first..=last {
        let fetched = wait_for_aggregate(reg, s3, w, opts.wait).await?;
        let setting = reg.setting_at(w);
        let step = Step {
            outer: setting.outer,
            lr: setting.lr_at(w),
        };
        if step.outer.optimizer.keeps_momentum() {
            // From the first window of a momentum setting on, every tensor has a buffer
            // (zeros until a step moves it), even through empty windows: the state after
            // them is then whole, and a later replay from it is not taken for one that was
            // given no state.
            for (name, t) in theta.iter() {
                state
                    .momentum
                    .entry(name.clone())
                    .or_insert_with(|| vec![0f32; t.as_ref().len()]);
            }
        }
        match fetched {
            Fetched::Merged(tensors) => apply_merged(reg, w, theta, state, &step, &tensors)?,
            Fetched::Listed(list) => {
                apply_listed(reg, s3, w, theta, state, &step, &list, opts.cache).await?
            }
        }
        applied += 1;
    }
    Ok(applied)
}

/// `fetch_aggregate`, polling once a second for up to `wait` while it is not there.
pub async fn wait_for_aggregate(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
    wait: Option<Duration>,
) -> Result<Fetched, ExchangeError> {
    let until = wait.map(|d| tokio::time::Instant::now() + d);
    loop {
        match fetch_aggregate(reg, s3, w).await {
            Err(ExchangeError::NoAggregate { .. })
                if until.is_some_and(|u| tokio::time::Instant::now() < u) =>
            {
                tracing::debug!(window = w, "no aggregate yet; waiting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// One window's outer step: the rule and its rate for that window.
struct Step {
    outer: crate::outer::Outer,
    lr: f32,
}

impl Step {
    /// Applies merged tensor `a` to `dst`, with `name`'s momentum buffer (zeros when new).
    fn apply(&self, state: &mut OuterState, name: &str, dst: &mut [f32], a: &[f32]) {
        if !self.outer.optimizer.keeps_momentum() {
            return crate::outer::step(&self.outer, self.lr, dst, a, &mut []);
        }
        let m = state
            .momentum
            .entry(name.to_string())
            .or_insert_with(|| vec![0f32; dst.len()]);
        crate::outer::step(&self.outer, self.lr, dst, a, m);
    }
}

fn size_checked<T: Tensor>(
    reg: &Registry,
    w: u64,
    theta: &BTreeMap<String, T>,
    name: &str,
) -> Result<(), ExchangeError> {
    let ok = theta.get(name).is_some_and(|d| {
        reg.model.get(name).map(|s| s.shape.iter().product::<u64>())
            == Some(d.as_ref().len() as u64)
    });
    match ok {
        true => Ok(()),
        false => Err(ExchangeError::Caller(format!(
            "window {w}: tensor {name:?} is missing from the base or has another size"
        ))),
    }
}

fn apply_merged<T: Tensor>(
    reg: &Registry,
    w: u64,
    theta: &mut BTreeMap<String, T>,
    state: &mut OuterState,
    step: &Step,
    tensors: &[AggTensor],
) -> Result<(), ExchangeError> {
    for t in tensors {
        size_checked(reg, w, theta, &t.name)?;
    }
    if tensors.is_empty() {
        // No shard accepted: no outer step.
        return Ok(());
    }
    if !step.outer.optimizer.keeps_momentum() {
        // Plain SGD touches only the listed entries (θ − lr·0 = θ elsewhere).
        for t in tensors {
            if let Some(dst) = theta.get_mut(&t.name) {
                // Two roundings, never fused: θ − (lr · a).
                let dst = dst.as_mut();
                for (i, v) in t.entries() {
                    dst[i] -= step.lr * v;
                }
            }
        }
        return Ok(());
    }
    // Momentum moves every element, listed or not: densify one tensor at a time.
    let by_name: HashMap<&str, &AggTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (name, dst) in theta.iter_mut() {
        let dst = dst.as_mut();
        let mut a = vec![0f32; dst.len()];
        if let Some(t) = by_name.get(name.as_str()) {
            for (i, v) in t.entries() {
                a[i] = v;
            }
        }
        step.apply(state, name, dst, &a);
    }
    Ok(())
}

/// agg-v2: fetch (every check, before any parameter changes), then merge and apply one
/// tensor at a time. Plain SGD skips entries whose merged value is zero, as agg-v1's sparse
/// form skips them (a merged zero is always +0.0, and θ − lr·(+0.0) = θ).
#[allow(clippy::too_many_arguments)]
async fn apply_listed<T: Tensor>(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
    theta: &mut BTreeMap<String, T>,
    state: &mut OuterState,
    step: &Step,
    list: &AcceptedList,
    cache: Option<&std::path::Path>,
) -> Result<(), ExchangeError> {
    if list.accepted.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = reg.model.tensors.iter().map(|t| t.name.as_str()).collect();
    for name in names.iter().filter(|n| theta.contains_key(**n)) {
        size_checked(reg, w, theta, name)?;
    }
    let held: Vec<bool> = names.iter().map(|n| theta.contains_key(*n)).collect();
    let want = |i: usize| held[i];
    let spooled = merge::fetch_listed(reg, s3, list, &want, cache).await?;
    spooled.merge(reg, &want, |i, acc| {
        if let Some(dst) = theta.get_mut(names[i]) {
            step.apply(state, names[i], dst.as_mut(), acc);
        }
        Ok(())
    })
}

/// Reads an outer-optimizer state file as `round.md` ("State") requires before any of it is
/// used: a regular file (no link followed, no FIFO waited on) no larger than the model's f32
/// size plus 64 MiB (without a model: any size), every tensor `outer_momentum.<name>` of a
/// model tensor with exactly its shape, and every value finite: NaN momentum would give NaN
/// parameters to a peer that then publishes from them. `optimizer_state_invalid` otherwise.
/// Returns the state, its run, the window it is after, and each buffer's shape (by tensor
/// name, without the prefix), all from the one read that was checked.
pub fn read_state_file(
    path: &std::path::Path,
    model: Option<&ModelSpec>,
) -> Result<StateFile, ExchangeError> {
    let bad = |detail: String| ExchangeError::Rejected {
        object: path.display().to_string(),
        reason: "optimizer_state_invalid",
        detail,
    };
    let max = model.map_or(u64::MAX / 2, |m| {
        m.tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>() * 4)
            .sum::<u64>()
            + (64 << 20)
    });
    let bytes = crate::files::read_regular(path, max).map_err(|e| bad(e.to_string()))?;
    let (state, run, after) =
        crate::outer::state_from_safetensors(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let shapes = header
        .tensors()
        .into_iter()
        .map(|(k, info)| {
            let k = k
                .strip_prefix(crate::outer::MOMENTUM_PREFIX)
                .map(str::to_string)
                .unwrap_or(k);
            (k, info.shape.iter().map(|&d| d as u64).collect())
        })
        .collect();
    if let Some(model) = model {
        for (name, info) in header.tensors() {
            let plain = name
                .strip_prefix(crate::outer::MOMENTUM_PREFIX)
                .unwrap_or(&name);
            let spec = model.tensors.iter().find(|t| t.name == plain);
            let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            match spec {
                Some(t) if t.shape == shape && info.dtype == Dtype::F32 => {}
                Some(t) => {
                    return Err(bad(format!(
                        "tensor {name:?} is {:?} {shape:?}; the model's {plain:?} is F32 {:?}",
                        info.dtype, t.shape
                    )));
                }
                None => return Err(bad(format!("tensor {name:?} is not of the run's model"))),
            }
        }
    }
    for (name, m) in &state.momentum {
        if let Some(i) = m.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "momentum of {name:?} holds {} at element {i}",
                m[i]
            )));
        }
    }
    Ok(StateFile {
        state,
        run,
        after,
        shapes,
    })
}

/// An outer-optimizer state file as [`read_state_file`] checked it.
pub struct StateFile {
    /// The momentum buffers.
    pub state: OuterState,
    /// The run it is of.
    pub run: String,
    /// The last window in it (`None`: before window 0).
    pub after: Option<u64>,
    /// Each buffer's shape, by tensor name.
    pub shapes: BTreeMap<String, Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{InDtype, TensorSpec};
    use crate::outer::state_to_safetensors;

    fn model() -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![2, 3],
                dtype: InDtype::F32,
            }],
        }
    }

    /// A state file of `buffers` (name → shape and values), written as `apply` writes one.
    fn state_file(
        dir: &std::path::Path,
        buffers: &[(&str, Vec<u64>, Vec<f32>)],
    ) -> std::path::PathBuf {
        let mut st = OuterState::default();
        let mut shapes = BTreeMap::new();
        for (n, shape, v) in buffers {
            st.momentum.insert(n.to_string(), v.clone());
            shapes.insert(n.to_string(), shape.clone());
        }
        let path = dir.join(format!(
            "state-{}.safetensors",
            buffers.len() * 7 + shapes.len()
        ));
        let bytes = state_to_safetensors(&st, &shapes, "r", Some(3)).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn reason(r: Result<StateFile, ExchangeError>) -> Option<&'static str> {
        crate::error::Classified::reason(&r.err()?)
    }

    #[test]
    fn state_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let m = model();
        let ok = state_file(dir.path(), &[("w", vec![2, 3], vec![0.5; 6])]);
        let f = read_state_file(&ok, Some(&m)).unwrap();
        assert_eq!((f.run.as_str(), f.after), ("r", Some(3)));
        assert_eq!(f.shapes["w"], vec![2, 3]);
        let bad = "optimizer_state_invalid";
        // NaN momentum would give NaN parameters.
        let nan = dir.path().join("nan");
        std::fs::copy(
            state_file(dir.path(), &[("w", vec![2, 3], vec![f32::NAN; 6])]),
            &nan,
        )
        .unwrap();
        assert_eq!(reason(read_state_file(&nan, Some(&m))), Some(bad));
        // A flattened shape, and a tensor the model does not have.
        let flat = dir.path().join("flat");
        std::fs::copy(
            state_file(dir.path(), &[("w", vec![6], vec![0.0; 6])]),
            &flat,
        )
        .unwrap();
        assert_eq!(reason(read_state_file(&flat, Some(&m))), Some(bad));
        let extra = state_file(
            dir.path(),
            &[("w", vec![2, 3], vec![0.0; 6]), ("x", vec![1], vec![0.0])],
        );
        assert_eq!(reason(read_state_file(&extra, Some(&m))), Some(bad));
        // A link to /dev/zero, and a file larger than the model allows.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(reason(read_state_file(&link, Some(&m))), Some(bad));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; (64 << 20) + 100]).unwrap();
        assert_eq!(reason(read_state_file(&big, Some(&m))), Some(bad));
    }
}
