//! agg-v2: the header pass and section checks without a merge, the signed list, and the
//! forms `merged` and `auto` (the merged object, and the sample that decides `auto`).

use std::ops::Range;
use std::time::Duration;

use super::{Aggregated, Body, Phases, agg_tensor, publish_aggregate};
use crate::format::codec::EncodedTensor;
use crate::format::envelope::{Compression, EnvelopeBuilder, Kind, SignedEnvelope};
use crate::format::layout;
use crate::round::RoundError;
use crate::round::accepted::{AcceptedList, ListedSection, MergedObject};
use crate::round::merge;
use crate::round::publish::clock;
use crate::round::registry::{AggForm, Job, Registry, Role};
use crate::round::verdict::{OpenWindow, RangeCheck, Verdicts, copy_and_check, open_window};
use crate::store::{self, Target};

/// Elements of `auto`'s sample (a 64 MiB accumulator at most).
pub(super) const SAMPLE: usize = 1 << 24;

/// The codec of the merged object (form `merged`).
pub const MERGED_CODEC: &str = "agg-merged-v1";

/// Forms `merged` and `auto`: merges the listed shards one tensor at a time (with the
/// readers' own code, so the bytes are what every reader would compute), and signs the
/// merged object: always for `merged`; for `auto` only when a sample tensor, merged alone,
/// is smaller than the shards' bytes for its share of the model, and then only if the whole
/// object is smaller than the shards. Returns the list to sign and the object to put before
/// it. Memory: the largest tensor's accumulator while merging (the sample's: ≤ 64 MiB).
pub(super) async fn with_merged(
    job: Job<'_>,
    w: u64,
    mut list: AcceptedList,
    sample: Option<Vec<f32>>,
) -> Result<(AcceptedList, Option<SignedEnvelope>), RoundError> {
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
            .map_err(|e| RoundError::Internal(format!("zstd: {e}")))?
            .len() as u64;
        let numel_big = acc.len() as u64;
        drop(acc);
        let share = shard_bytes as f64 * numel_big as f64 / total.max(1) as f64;
        if sample as f64 >= share {
            return Ok((list, None));
        }
    }
    let spooled = merge::fetch_listed(reg, job.s3, &list, &all, None).await?;
    let dir = tempfile::tempdir().map_err(|e| RoundError::Internal(format!("spool: {e}")))?;
    let mut files = Vec::with_capacity(reg.model.tensors.len());
    spooled.merge(reg, &all, |i, acc| {
        let file = dir.path().join(format!("t{i:05}"));
        std::fs::write(&file, encode(i, acc)?)
            .map_err(|e| RoundError::Internal(format!("{}: {e}", file.display())))?;
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
pub(super) async fn publish_v2(
    job: Job<'_>,
    target: &Target,
    w: u64,
    v: &Verdicts,
    list: AcceptedList,
    mut phases: Phases,
    sample: Option<Vec<f32>>,
) -> Result<Aggregated, RoundError> {
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
pub(super) async fn check_window_v2(
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
    RoundError,
> {
    let reg = job.reg;
    let mut phases = Phases::default();
    let mut open = open_window(job, Role::Aggregator, w, concurrency, budget).await?;
    // The header pass starts at the close (open_window waits for it first).
    let closed = clock(reg).closes(w);
    let now =
        crate::round::window::store_now_ms(&open.target, &layout::clock_probe(&reg.run, &open.me))
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
pub(super) fn sample_tensor(reg: &Registry) -> Option<usize> {
    let numel = |i: usize| reg.model.tensors[i].shape.iter().product::<u64>();
    (0..reg.model.tensors.len()).max_by_key(|&i| (numel(i), usize::MAX - i))
}

/// The first `limit` elements of tensor `t` merged from the checked shards' decoded copies
/// (weight × value in peer order): `auto`'s sample, for sizes only.
pub(super) fn sample_from(
    kept: &[Option<EncodedTensor>],
    weights: &[f32],
    limit: usize,
) -> Result<Vec<f32>, RoundError> {
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
        let (idx, val) = crate::format::codec::to_sparse(t)?;
        for (k, v) in idx.into_iter().zip(val).filter(|(k, _)| (*k as usize) < n) {
            acc[k as usize] += w * v;
        }
    }
    Ok(acc)
}
