//! Range checks: fetch and validate the sections holding a tensor range, with each tensor's squared norm.

use std::collections::BTreeMap;
use std::ops::Range;

use futures::StreamExt;
use tokio::time::Instant;

use crate::format::codec::{self, CodecLimits, EncodedTensor};
use crate::format::envelope::{RemoteEnvelope, read_sections};
pub(super) use crate::format::tables::Verdict;
use crate::round::registry::Registry;
use crate::store::Target;

use super::*;

/// What checking one shard's tensors in a range found: the first failing tensor (by model
/// index) and each tensor's squared norm. Workers of a split merge exchange these.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RangeCheck {
    /// The first failing tensor (model index) and why.
    pub fault: Option<(usize, Exclusion)>,
    /// Each checked tensor's squared norm, by model index.
    pub sumsq: Vec<(usize, f64)>,
}

impl RangeCheck {
    /// The sections of a range were not read within the window's budget.
    pub(crate) fn timed_out(first: usize) -> RangeCheck {
        RangeCheck {
            fault: Some((first, Exclusion::timed_out())),
            sumsq: Vec::new(),
        }
    }
}

/// The tensor range `tAAAAA-BBBBB` a gradient section holds, if its name says.
pub(crate) fn section_range(name: &str) -> Option<(usize, usize)> {
    let (a, b) = name.strip_prefix('t')?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Fetches the sections of a header-valid shard that hold tensors of `range` (model
/// indices), validates them against the model, and returns the check with the decoded
/// tensors of the range in model order.
pub(crate) async fn check_range(
    reg: &Registry,
    shard: &MinerShard,
    range: std::ops::Range<usize>,
) -> (RangeCheck, Vec<EncodedTensor>) {
    let Some((target, env)) = shard.env.as_ref() else {
        return (RangeCheck::default(), Vec::new());
    };
    match checked_range(reg, &shard.object, target, env, range).await {
        Ok(found) => {
            let mut check = RangeCheck::default();
            let mut tensors = Vec::with_capacity(found.len());
            for (i, (t, s)) in found {
                check.sumsq.push((i, s));
                tensors.push(t);
            }
            (check, tensors)
        }
        Err(fault) => (
            RangeCheck {
                fault: Some(fault),
                sumsq: Vec::new(),
            },
            Vec::new(),
        ),
    }
}

/// The steps of `check_range`, in the order `round.md` gives them: fetch the range's
/// sections, decode and validate each against the model, require the run's codec, each
/// tensor once, and every tensor of the range. A refusal is the first failing tensor's
/// model index with its exclusion.
async fn checked_range(
    reg: &Registry,
    object: &str,
    target: &Target,
    env: &RemoteEnvelope,
    range: std::ops::Range<usize>,
) -> Result<BTreeMap<usize, (EncodedTensor, f64)>, (usize, Exclusion)> {
    let selected: Vec<usize> = env
        .sections()
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            section_range(&s.name).is_none_or(|(a, b)| a < range.end && b >= range.start)
        })
        .map(|(i, _)| i)
        .collect();
    let first_of = |i: usize| section_range(&env.sections()[i].name).map_or(0, |(a, _)| a);
    let payloads = read_sections(
        target.store.as_ref(),
        env,
        &selected,
        &shard_limits(reg),
        |_| Ok(Vec::new()),
        &|_| {},
    )
    .await
    .map_err(|e| {
        (
            selected.first().map_or(0, |&i| first_of(i)),
            Exclusion::from_envelope(&e),
        )
    })?;
    let index: BTreeMap<&str, usize> = reg
        .model
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let rejected = |i: usize, reason: &str, detail: String| {
        (i, Exclusion::new(Verdict::Rejected, reason, detail))
    };
    let mut found: BTreeMap<usize, (EncodedTensor, f64)> = BTreeMap::new();
    for (&si, payload) in selected.iter().zip(&payloads) {
        let name = &env.sections()[si].name;
        let decoded =
            codec::read_section_with_norms(payload, Some(&reg.model), &CodecLimits::default())
                .map_err(|e| {
                    rejected(
                        first_of(si),
                        e.reason(),
                        format!("{object}: section {name}: {e}"),
                    )
                })?;
        for (t, s) in decoded {
            let Some(&i) = index.get(t.name.as_str()).filter(|&&i| range.contains(&i)) else {
                continue;
            };
            if t.params != reg.codec {
                let detail = format!("{object}: tensor {} uses {:?}", t.name, t.params);
                return Err(rejected(i, LedgerReason::CodecMismatch.code(), detail));
            }
            if found.insert(i, (t, s)).is_some() {
                let detail = format!(
                    "{object}: tensor {} appears twice",
                    reg.model.tensors[i].name
                );
                return Err(rejected(i, LedgerReason::Incomplete.code(), detail));
            }
        }
    }
    if let Some(missing) = range.clone().find(|i| !found.contains_key(i)) {
        let detail = format!(
            "{object}: tensor {} is missing",
            reg.model.tensors[missing].name
        );
        return Err(rejected(missing, LedgerReason::Incomplete.code(), detail));
    }
    Ok(found)
}

/// Checks every header-valid shard's tensors in `range`, keeping the decoded tensors.
pub(crate) async fn check_ranges(
    reg: &Registry,
    shards: &[MinerShard],
    range: Range<usize>,
    concurrency: usize,
    deadline: Instant,
) -> Vec<(RangeCheck, Vec<EncodedTensor>)> {
    let shares = Shares::new(deadline, concurrency, shards.len());
    let shares = &shares;
    let mut out: Vec<(usize, (RangeCheck, Vec<EncodedTensor>))> =
        futures::stream::iter(shards.iter().enumerate().map(|(j, s)| {
            let range = range.clone();
            async move {
                let until = shares.next();
                let checked = tokio::time::timeout_at(until, check_range(reg, s, range.clone()))
                    .await
                    .unwrap_or_else(|_| (RangeCheck::timed_out(range.start), Vec::new()));
                (j, checked)
            }
        }))
        // Unordered: a stalled shard holds one slot, never the shards behind it.
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(j, _)| *j);
    out.into_iter().map(|(_, c)| c).collect()
}
