//! The split merge (`schemas/round.md`, "Split merge"): `k` workers each check and merge
//! one contiguous range of tensors, exchange their range checks, and a commit assembles the
//! aggregate a single process would have written, byte for byte.

use crate::round::RoundReason;
use std::ops::Range;

use super::v2::{check_window_v2, publish_v2};
use super::weighted::merge_range;
use super::{AggregateOptions, Aggregated, Body, Phases, accepted_list, publish_aggregate};
use crate::format::agg_tensor::agg_limits;
use crate::format::envelope::read_signed;
use crate::format::envelope::{Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind};
use crate::format::layout;
use crate::identity::{Identity, PeerId};
use crate::round::RoundError;
use crate::round::publish::clock;
use crate::round::registry::{AggFormat, Job, Registry, Role};
use crate::round::verdict::{
    OpenWindow, RangeCheck, check_ranges, consolidate, finalize, open_window,
};
use crate::store::{self, Target};

/// Tensor indices of part `i` of `k`: contiguous ranges in model order.
pub(crate) fn part_range(tensors: usize, i: usize, k: usize) -> Range<usize> {
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
) -> Result<Vec<(String, Vec<u8>)>, RoundError> {
    let expect = Expect::in_window(Kind::Blob, *me, &reg.run, w);
    loop {
        match read_signed(target, key, &expect, &agg_limits(&reg.model)).await {
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
) -> Result<(), RoundError> {
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
pub async fn aggregate_part(
    job: Job<'_>,
    w: u64,
    i: usize,
    k: usize,
    on: &AggregateOptions,
) -> Result<usize, RoundError> {
    let Job { reg, id, .. } = job;
    let concurrency = on.concurrency;
    if k == 0 || i >= k {
        return Err(RoundError::Caller(format!(
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
async fn publish_checks(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    w: u64,
    i: usize,
    k: usize,
    mine: &[RangeCheck],
) -> Result<(), RoundError> {
    let json = serde_json::to_vec(mine).map_err(|e| RoundError::Internal(e.to_string()))?;
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
) -> Result<Vec<Vec<RangeCheck>>, RoundError> {
    let mut parts = Vec::with_capacity(k);
    for p in 0..k {
        let key = layout::agg_checks(&reg.run, w, p, k);
        let secs = wait_for_blob(reg, target, me, &key, w).await?;
        let checks: Vec<RangeCheck> = secs
            .first()
            .map(|(_, j)| serde_json::from_slice(j))
            .transpose()
            .map_err(|e| RoundError::Rejected {
                object: target.url_of(&target.path(&key)),
                reason: RoundReason::PartMalformed.code(),
                detail: format!("part {p} checks: {e}"),
            })?
            .unwrap_or_default();
        parts.push(checks);
    }
    if parts
        .iter()
        .any(|p| p.len() != reg.with_role(Role::Miner).len())
    {
        return Err(RoundError::Conflict {
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
    opts: &AggregateOptions,
) -> Result<Aggregated, RoundError> {
    let Job { reg, id, .. } = job;
    let concurrency = opts.concurrency;
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
        return Err(RoundError::Rejected {
            object: target.url_of(&target.path(&layout::agg_part(&reg.run, w, 0, k))),
            reason: RoundReason::PartMalformed.code(),
            detail: "the parts do not cover the model's tensors in order".into(),
        });
    }
    publish_aggregate(reg, id, &target, w, &v, Body::Merged(sections)).await
}

#[cfg(test)]
mod tests {
    use super::part_range;

    #[test]
    fn parts_cover_every_tensor_once_in_model_order() {
        // (tensors, workers): more workers than tensors leaves some parts empty.
        for (n, k) in [(1, 1), (7, 1), (7, 2), (7, 3), (8, 8), (3, 5), (1000, 7)] {
            let parts: Vec<_> = (0..k).map(|i| part_range(n, i, k)).collect();
            assert_eq!(parts[0].start, 0, "{n}/{k}");
            assert_eq!(parts[k - 1].end, n, "{n}/{k}");
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{n}/{k}: contiguous, disjoint");
            }
            let sizes: Vec<usize> = parts.iter().map(|r| r.len()).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n}/{k}: balanced {sizes:?}");
        }
    }
}
