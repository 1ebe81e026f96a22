//! Verdicts from the checks: combined in model order, duplicates settled, norms clipped by the median, weights (`round.md`, "Norms, clipping and weights").

use crate::format::tables::LedgerRow;
pub(super) use crate::format::tables::Verdict;
use crate::round::registry::Registry;

use super::*;

/// Combines the header pass and the range checks of all parts (in tensor order) into
/// verdicts and weights. Deterministic: the first failing tensor decides a rejection, and
/// norms are summed per tensor in model order, however the tensors were split.
pub(crate) fn finalize(
    reg: &Registry,
    w: u64,
    shards: &[MinerShard],
    parts: &[Vec<RangeCheck>],
) -> Verdicts {
    let mut rows = Vec::with_capacity(shards.len());
    let mut norms: Vec<Option<f64>> = Vec::with_capacity(shards.len());
    let faults: Vec<Option<Exclusion>> = shards
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let range_fault = parts
                .iter()
                .filter_map(|p| p[j].fault.as_ref())
                .min_by_key(|(i, _)| *i)
                .map(|(_, f)| f.clone());
            s.fault.clone().or(range_fault)
        })
        .collect();
    let dups = duplicates(shards, &faults);
    let duplicate_of: Vec<Option<String>> = dups
        .iter()
        .map(|d| d.as_ref().and_then(|(_, w)| w.clone()))
        .collect();
    for (j, s) in shards.iter().enumerate() {
        let mut row = LedgerRow {
            window: w,
            peer: s.peer.clone(),
            found: s.found,
            bytes: s.bytes,
            last_modified_ms: s.last_modified_ms,
            verdict: Verdict::Accepted,
            reason: String::new(),
            detail: String::new(),
            norm: None,
            weight: 0.0,
        };
        let fault = faults[j]
            .clone()
            .or_else(|| dups[j].as_ref().map(|(f, _)| f.clone()));
        let norm = match &fault {
            Some(f) => {
                row.verdict = f.verdict;
                row.reason = f.reason.clone();
                row.detail = f.detail.clone();
                None
            }
            None => {
                let mut per: Vec<(usize, f64)> = parts
                    .iter()
                    .flat_map(|p| p[j].sumsq.iter().copied())
                    .collect();
                Some(shard_norm(&mut per))
            }
        };
        row.norm = norm;
        norms.push(norm);
        rows.push(row);
    }
    let clip = clip_weights(&norms, reg.limits.clip_norm_ratio);
    let mut weights = vec![0f32; shards.len()];
    for (j, row) in rows.iter_mut().enumerate() {
        let (Some(norm), Some(c)) = (norms[j], clip[j]) else {
            continue;
        };
        if c.clipped {
            row.reason = LedgerReason::Clipped.code().into();
            row.detail = format!(
                "norm {norm:.6e} over {:.1} x median; scaled by {:.6}",
                reg.limits.clip_norm_ratio, c.scale
            );
        }
        weights[j] = c.weight;
        row.weight = f64::from(c.weight);
    }
    Verdicts {
        rows,
        weights,
        duplicate_of,
    }
}

/// One accepted shard's place in the merge, from the outlier rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    /// `cap / norm` when clipped, else 1.
    pub scale: f64,
    /// Whether the norm was over the cap.
    pub clipped: bool,
    /// The merge weight, `f32(scale / n)`.
    pub weight: f32,
}

/// The outlier rule and the weights (`round.md`, "Norms, clipping and weights"): `norms`
/// holds each miner's norm, `None` for every shard not accepted. The median is the upper
/// middle of the sorted accepted norms; with 3 or more, a norm over `ratio × median` is
/// scaled down to it; each weight is the binary64 `scale / n` rounded once to f32 (and the
/// smallest positive f32 where that rounds to 0).
pub fn clip_weights(norms: &[Option<f64>], ratio: f64) -> Vec<Option<Clip>> {
    let mut sorted: Vec<f64> = norms.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let cap = (n >= 3).then(|| sorted[n / 2] * ratio);
    norms
        .iter()
        .map(|norm| {
            let norm = (*norm)?;
            let (scale, clipped) = match cap {
                Some(cap) if norm > cap => (cap / norm, true),
                _ => (1.0, false),
            };
            // A weight that would round to zero (a norm ~1e38 times the cap) is the smallest
            // positive f32 instead: still a clipped weight readers accept, never a 0 that
            // would make the whole list unappliable.
            let weight = match (scale / n as f64) as f32 {
                0.0 => f32::from_bits(1),
                w => w,
            };
            Some(Clip {
                scale,
                clipped,
                weight,
            })
        })
        .collect()
}

/// A shard's norm from its tensors' squared norms (any order of arrival): added left to
/// right in model order from +0, then the square root.
pub fn shard_norm(per_tensor: &mut [(usize, f64)]) -> f64 {
    per_tensor.sort_by_key(|(i, _)| *i);
    per_tensor.iter().fold(0f64, |acc, (_, x)| acc + x).sqrt()
}
