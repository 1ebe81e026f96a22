//! Each shard's copy and checks as one pipeline, with its own share of the window's budget (`round.md`, "Window budget").

use std::ops::Range;

use futures::StreamExt;
use tokio::time::Instant;

use crate::format::codec::EncodedTensor;
use crate::format::envelope::{Expect, Kind, RemoteEnvelope};
use crate::format::layout;
pub(super) use crate::format::tables::Verdict;
use crate::identity::PeerId;
use crate::round::registry::Registry;
use crate::store::{self, StoreError, Target};

use super::*;

/// Each shard's share of the window's budget, handed out as a deadline when its pipeline
/// gets a slot: the time left before `deadline`, divided by the rounds of `concurrency`
/// pipelines that the shards not yet started (this one included) still need. A shard that
/// stalls for its whole share leaves every later round its own share, so a slow or stalled
/// miner costs its own time and nobody else's; when nothing stalls, a round that ends early
/// leaves its time to the next (`round.md`, "Window budget").
pub(crate) struct Shares {
    deadline: Instant,
    concurrency: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Shares {
    /// Shares for `n` pipelines run `concurrency` at a time until `deadline`.
    pub(crate) fn new(deadline: Instant, concurrency: usize, n: usize) -> Shares {
        Shares {
            deadline,
            concurrency: concurrency.max(1),
            waiting: std::sync::atomic::AtomicUsize::new(n),
        }
    }

    /// The deadline of the pipeline starting now.
    pub(crate) fn next(&self) -> Instant {
        use std::sync::atomic::Ordering;
        let waiting = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(w.saturating_sub(1))
            })
            .unwrap_or(1)
            .max(1);
        let rounds = waiting.div_ceil(self.concurrency).max(1) as u32;
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        (now + left / rounds).min(self.deadline)
    }
}

/// [`check_ranges`] for agg-v2, each shard as one pipeline: copy it into the aggregator's
/// store (`copy_to`: the consolidated forms), open the copy, then check its tensors of
/// `range` one of its own sections at a time, all within the shard's own share of the
/// budget ([`Shares`]). Pipelines run unordered, up to `concurrency` at once, and the
/// results are put back in peer order afterwards: a miner that trickles its body or stalls
/// costs its own slot and share, while every other shard is copied and checked as soon as
/// it can be (one slow miner among 20 used to hold the whole copy phase to the deadline and
/// leave no time for any check). Memory is `concurrency` × the largest section.
/// Stops at a shard's first failing piece, which holds its lowest failing tensor: the same
/// verdict a split merge with one part per section would reach.
/// `keep`: a tensor index whose decoded form is returned for every shard that holds it (the
/// aggregator's sample for choosing agg-v2's form, at no extra fetch).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy_and_check(
    reg: &Registry,
    copy_to: Option<&Target>,
    w: u64,
    shards: &mut [MinerShard],
    range: Range<usize>,
    keep: Option<usize>,
    concurrency: usize,
    deadline: Instant,
) -> Vec<(RangeCheck, Option<EncodedTensor>)> {
    let busy = shards
        .iter()
        .filter(|s| s.fault.is_none() && s.env.is_some())
        .count();
    let shares = Shares::new(deadline, concurrency, busy);
    let shares = &shares;
    let mut out: Vec<(usize, (RangeCheck, Option<EncodedTensor>))> =
        futures::stream::iter(shards.iter_mut().enumerate().map(|(j, s)| {
            let range = range.clone();
            async move {
                if s.fault.is_some() || s.env.is_none() {
                    return (j, (RangeCheck::default(), None));
                }
                let until = shares.next();
                if let Some(target) = copy_to {
                    let copied =
                        tokio::time::timeout_at(until, s.consolidate(reg, target, w, true)).await;
                    if copied.is_err() {
                        s.fault = Some(Exclusion::timed_out());
                        s.env = None;
                    }
                    if s.fault.is_some() {
                        return (j, (RangeCheck::default(), None));
                    }
                }
                let s = &*s;
                let mut all = RangeCheck::default();
                let mut kept = None;
                for piece in pieces(s, range) {
                    let checked =
                        tokio::time::timeout_at(until, check_range(reg, s, piece.clone())).await;
                    let (c, tensors) = checked
                        .unwrap_or_else(|_| (RangeCheck::timed_out(piece.start), Vec::new()));
                    if let Some(k) = keep.filter(|k| piece.contains(k)) {
                        let name = &reg.model.tensors[k].name;
                        kept = tensors.into_iter().find(|t| &t.name == name);
                    }
                    all.sumsq.extend(c.sumsq);
                    if c.fault.is_some() {
                        all.fault = c.fault;
                        break;
                    }
                }
                (j, (all, kept))
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(j, _)| *j);
    out.into_iter().map(|(_, c)| c).collect()
}

/// `range` cut where the shard's own sections start: pieces that each need one section
/// (of an honest shard), covering the whole range, so a tensor no section holds is still
/// checked (and found missing).
pub(crate) fn pieces(s: &MinerShard, range: Range<usize>) -> Vec<Range<usize>> {
    let mut cuts: Vec<usize> = s
        .env
        .iter()
        .flat_map(|(_, env)| env.sections().iter())
        .filter_map(|x| section_range(&x.name).map(|(a, _)| a))
        .filter(|a| range.contains(a))
        .chain([range.start, range.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|c| c[0]..c[1]).collect()
}

/// agg-v2 with form `shards`: copies every header-valid shard byte for byte into the
/// aggregator's store (`layout::agg_shard`) and points the shard at the copy, so the section
/// checks read exactly the bytes readers will get. A miner that replaces its shard after the
/// header pass cannot slip other bytes past them: a copy whose header differs from the one
/// checked is `replaced`.
pub(crate) async fn consolidate(
    reg: &Registry,
    target: &Target,
    w: u64,
    shards: &mut [MinerShard],
    copy: bool,
    concurrency: usize,
    deadline: Instant,
) {
    futures::stream::iter(
        shards
            .iter_mut()
            .filter(|s| s.fault.is_none() && s.env.is_some()),
    )
    .for_each_concurrent(concurrency.max(1), |s| async move {
        if tokio::time::timeout_at(deadline, s.consolidate(reg, target, w, copy))
            .await
            .is_err()
        {
            s.fault = Some(Exclusion::timed_out());
            s.env = None;
        }
    })
    .await;
}

impl MinerShard {
    /// Copies (unless `copy` is false: the split merge's commit, whose workers copied) and
    /// opens the copy.
    async fn consolidate(&mut self, reg: &Registry, target: &Target, w: u64, copy: bool) {
        let Some((src, env)) = self.env.as_ref() else {
            return;
        };
        let Ok(peer) = PeerId::parse(&self.peer) else {
            return;
        };
        let path = target.path(&layout::agg_shard(&reg.run, w, &peer));
        let copy_url = target.url_of(&path);
        let copied = match copy {
            true => store::copy_object(src, &env.path, env.meta.size, target, &path).await,
            false => Ok(store::PutOutcome::AlreadyIdentical),
        };
        match copied {
            // Other bytes already at our key: an earlier run copied another version; the
            // header comparison below decides.
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => {
                let f = Exclusion::store(&e);
                self.fault = Some(f);
                self.env = None;
                return;
            }
        }
        let expect = Expect::in_window(Kind::Grad, peer, &reg.run, w);
        let opened = RemoteEnvelope::open(
            target.store.as_ref(),
            &path,
            &copy_url,
            &shard_limits(reg),
            &expect,
        )
        .await;
        let fault = match opened {
            Ok(copy) if copy.head.header == env.head.header => {
                self.env = Some((target.clone(), copy));
                return;
            }
            Ok(_) => Exclusion::new(
                Verdict::Rejected,
                LedgerReason::Replaced.code(),
                format!(
                    "{}: the shard changed after its header was checked; the copy {copy_url} holds another version",
                    self.object
                ),
            ),
            Err(e) => Exclusion::from_envelope(&e),
        };
        self.fault = Some(fault);
        self.env = None;
    }

    /// The shard's section table as the header pass (or the consolidated copy) read it.
    pub(crate) fn sections(&self) -> &[crate::format::envelope::SectionEntry] {
        self.env.as_ref().map_or(&[], |(_, e)| e.sections())
    }
}
