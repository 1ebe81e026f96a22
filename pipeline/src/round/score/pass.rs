//! The validator's one pass over a window: every header-valid shard's sections checked in
//! model order (the aggregator's checks, the same verdicts) while the window's [`Gram`]
//! statistics are accumulated slab by slab, with the past aggregates merged alongside.
//!
//! Memory, whatever the model's size: per shard its current section (≤ 16 MiB of payload by
//! the codec's packing), per past agg-v2 aggregate one decoded section per listed shard, and
//! one slab's scratch (`gram::SLAB` elements). At 72 B × 20 peers with two past aggregates:
//! 20 + 2 × 20 sections ≈ 1 GiB at the packing's worst, ≈ 60 × 1.3 MiB (the 72 B model's
//! tensors are smaller than a section's budget) in practice. Disk: the past aggregates'
//! shards, spooled (their agg-v1 form, or agg-v2 `merged`, holds one tensor in memory).

use std::collections::VecDeque;
use std::ops::Range;

use futures::StreamExt;
use rayon::prelude::*;
use tokio::time::Instant;

use super::gram::{self, Entries, Gram};
use crate::format::agg_tensor::{AggTensor, AggValues};
use crate::format::codec::{EncodedTensor, to_sparse_chunks};
use crate::round::RoundError;
use crate::round::merge::{self, Loaded, Spooled};
use crate::round::registry::Registry;
use crate::round::replay::{Fetched, fetch_aggregate};
use crate::round::verdict::{MinerShard, RangeCheck, check_range, pieces};
use crate::store::S3Options;

/// A past aggregate, readable one slab at a time.
pub(crate) struct PastAgg {
    window: u64,
    source: Source,
}

enum Source {
    /// agg-v1: every tensor, by model index (an absent tensor is all zeros).
    V1(Vec<Option<AggTensor>>),
    /// agg-v2: the listed shards (or the merged object), spooled to disk.
    V2(Box<Spooled>, Loaded),
}

impl PastAgg {
    /// Fetches and verifies the aggregate of window `w`.
    pub(crate) async fn open(
        reg: &Registry,
        s3: &S3Options,
        w: u64,
    ) -> Result<PastAgg, RoundError> {
        let source = match fetch_aggregate(reg, s3, w).await? {
            Fetched::Merged(tensors) => {
                let mut by_index: Vec<Option<AggTensor>> =
                    (0..reg.model.tensors.len()).map(|_| None).collect();
                for t in tensors {
                    if let Some(i) = reg.model.tensors.iter().position(|s| s.name == t.name) {
                        by_index[i] = Some(t);
                    }
                }
                Source::V1(by_index)
            }
            Fetched::Listed(list) => {
                let all = |_: usize| true;
                let spooled = merge::fetch_listed(reg, s3, &list, &all, None).await?;
                let loaded = spooled.loaded();
                Source::V2(Box::new(spooled), loaded)
            }
        };
        Ok(PastAgg { window: w, source })
    }

    /// The merged values of tensor `i` over `elems` (the elements of chunks `chunks`).
    fn slab(
        &mut self,
        reg: &Registry,
        i: usize,
        chunks: Range<usize>,
        elems: Range<usize>,
    ) -> Result<Vec<f32>, RoundError> {
        match &mut self.source {
            Source::V2(spooled, loaded) => spooled.slab(reg, loaded, i, chunks),
            Source::V1(tensors) => {
                let mut out = vec![0f32; elems.len()];
                match tensors[i].as_ref().map(|t| &t.values) {
                    None => {}
                    Some(AggValues::Dense(v)) => {
                        let got = v.get(elems.clone()).unwrap_or_default();
                        out[..got.len()].copy_from_slice(got);
                    }
                    Some(AggValues::Sparse(idx, val)) => {
                        let a = idx.partition_point(|&k| (k as usize) < elems.start);
                        let b = idx.partition_point(|&k| (k as usize) < elems.end);
                        for (&k, &v) in idx[a..b].iter().zip(&val[a..b]) {
                            out[k as usize - elems.start] = v;
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// One shard's tensors in model order, one of its own sections (a `pieces` piece) at a
/// time, checked as `verdict::check_streamed` checks them.
struct Cursor<'a> {
    shard: &'a MinerShard,
    pieces: VecDeque<Range<usize>>,
    current: VecDeque<(usize, EncodedTensor)>,
    check: RangeCheck,
    done: bool,
}

impl<'a> Cursor<'a> {
    fn new(shard: &'a MinerShard, tensors: usize) -> Cursor<'a> {
        Cursor {
            shard,
            pieces: pieces(shard, 0..tensors).into(),
            current: VecDeque::new(),
            check: RangeCheck::default(),
            done: shard.env.is_none(),
        }
    }

    fn needs(&self, i: usize) -> bool {
        !self.done && self.current.front().is_none_or(|(k, _)| *k != i)
    }

    /// Loads pieces until the current one holds tensor `i`; a failing piece ends the shard
    /// (its first fault is its verdict's, as in `check_streamed`).
    async fn load(&mut self, reg: &Registry, i: usize, deadline: Instant) {
        while self.needs(i) {
            self.current.retain(|(k, _)| *k > i);
            if !self.current.is_empty() {
                return;
            }
            let Some(piece) = self.pieces.pop_front() else {
                self.done = true;
                return;
            };
            let checked =
                tokio::time::timeout_at(deadline, check_range(reg, self.shard, piece.clone()))
                    .await;
            let (c, tensors) =
                checked.unwrap_or_else(|_| (RangeCheck::timed_out(piece.start), Vec::new()));
            self.check.sumsq.extend(c.sumsq);
            if c.fault.is_some() {
                self.check.fault = c.fault;
                self.done = true;
                return;
            }
            self.current = piece.zip(tensors).collect();
        }
    }

    fn take(&mut self, i: usize) -> Option<EncodedTensor> {
        match self.current.front() {
            Some((k, _)) if *k == i => self.current.pop_front().map(|(_, t)| t),
            _ => None,
        }
    }
}

/// What the pass produced.
pub(crate) struct Measured {
    /// Per shard, its check (as `verdict::check_streamed` gives it).
    pub(crate) checks: Vec<RangeCheck>,
    /// The window's statistics.
    pub(crate) gram: Gram,
    /// Seconds spent waiting for sections (fetched and checked).
    pub(crate) read_secs: f64,
    /// Seconds spent decoding slabs and accumulating the statistics.
    pub(crate) statistics_secs: f64,
}

/// Checks every shard of the window (one check per shard, as the aggregator's) and
/// accumulates the statistics of all of them against each other and `past`. A past
/// aggregate that fails mid-way is dropped from the comparison (logged), as one that could
/// not be opened is.
pub(crate) async fn check_and_measure(
    reg: &Registry,
    shards: &[MinerShard],
    mut past: Vec<PastAgg>,
    concurrency: usize,
    deadline: Instant,
) -> Measured {
    let n = reg.model.tensors.len();
    let mut cursors: Vec<Cursor> = shards.iter().map(|s| Cursor::new(s, n)).collect();
    let windows: Vec<u64> = past.iter().map(|p| p.window).collect();
    let mut gram = Gram::new(shards.len(), &windows);
    let c = reg.codec.chunk as usize;
    let per_slab = (gram::SLAB / c).max(1);
    let (mut read_secs, mut statistics_secs) = (0f64, 0f64);
    for i in 0..n {
        let t = std::time::Instant::now();
        futures::stream::iter(cursors.iter_mut().filter(|x| x.needs(i)))
            .for_each_concurrent(concurrency.max(1), |x| x.load(reg, i, deadline))
            .await;
        read_secs += t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let tensors: Vec<Option<EncodedTensor>> = cursors.iter_mut().map(|x| x.take(i)).collect();
        let numel = reg.model.tensors[i].shape.iter().product::<u64>() as usize;
        for start in (0..numel.div_ceil(c)).step_by(per_slab) {
            let chunks = start..(start + per_slab).min(numel.div_ceil(c));
            let elems = start * c..(chunks.end * c).min(numel);
            let entries: Vec<Option<(Vec<u32>, Vec<f32>)>> = tensors
                .par_iter()
                .map(|t| to_sparse_chunks(t.as_ref()?, chunks.clone()).ok())
                .collect();
            let mut slabs = Vec::with_capacity(past.len());
            let mut p = 0;
            while p < past.len() {
                match past[p].slab(reg, i, chunks.clone(), elems.clone()) {
                    Ok(v) => {
                        slabs.push(v);
                        p += 1;
                    }
                    Err(e) => {
                        tracing::warn!(window = past[p].window, error = %e, "past aggregate not compared");
                        past.remove(p);
                        gram.forget_past(p);
                    }
                }
            }
            let views: Vec<Option<Entries>> = entries
                .iter()
                .map(|e| e.as_ref().map(|(i, v)| (&i[..], &v[..])))
                .collect();
            let slabs: Vec<&[f32]> = slabs.iter().map(Vec::as_slice).collect();
            gram.add(elems.len(), &views, &slabs);
        }
        statistics_secs += t.elapsed().as_secs_f64();
    }
    Measured {
        checks: cursors.into_iter().map(|c| c.check).collect(),
        gram,
        read_secs,
        statistics_secs,
    }
}
