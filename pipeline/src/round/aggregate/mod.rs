//! The aggregator: merge a closed window's accepted shards and publish the aggregate.
//!
//! For a closed window the aggregator takes every registered miner's verdict from the
//! shared [`crate::round::verdict`] pipeline (header pass, range checks, duplicates settled
//! by the miners' commits, outlier norms clipped). agg-v1 merges the accepted shards as a
//! weighted mean in peer-id order, in f32 (`weighted.rs`); agg-v2 signs the list of them and
//! leaves the merge to readers (`v2.rs`). It writes the ledger, then publishes the aggregate
//! create-only: the aggregate is the commit point, so no partial aggregate is ever visible,
//! and since every input and the recorded clock are fixed by the window, a rerun (after a
//! crash or not) produces the same bytes. A window may be merged by several workers
//! (`split.rs`; [`aggregate_part`], [`aggregate_commit`]). Readers replay aggregates with [`crate::round::replay`].

mod split;
mod v2;
mod weighted;

pub use split::{aggregate_commit, aggregate_part};
pub use v2::MERGED_CODEC;

use crate::round::verdict::LedgerReason;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};

use crate::format::agg_tensor::AGG_CODEC;
use crate::format::envelope::{Compression, EnvelopeBuilder, Kind};
use crate::format::layout;
use crate::format::tables::ledger_parquet;
use crate::identity::{Identity, PeerId};
use crate::round::RoundError;
use crate::round::accepted::{AcceptedList, AcceptedShard, LIST_SECTION, ListedSection, shard_key};
use crate::round::publish::clock;
use crate::round::registry::{AggForm, AggFormat, Job, Registry, Role};
use crate::round::verdict::{
    MinerShard, OpenWindow, RangeCheck, Verdict, Verdicts, check_ranges, finalize, open_window,
};
use crate::store::{self, PutOutcome, StoreError, Target};
use v2::{SAMPLE, check_window_v2, publish_v2, sample_from};
use weighted::merge_range;

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
    /// Those miners, each with what the store said (`peer: detail`): left out of this
    /// aggregate, which is final. Often the reader's own fault (credentials for that store,
    /// `<PREFIX>AWS_*`), so the CLI prints each on stderr, never only in the ledger.
    pub unread: Vec<String>,
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

/// How an aggregator works; the default is what [`aggregate_window`] does. Neither field
/// changes an aggregate's bytes: the GPU's decode-and-accumulate is bit-identical to the
/// CPU's (a split merge may mix devices), and verdicts do not depend on the order reads end.
#[derive(Clone)]
pub struct AggregateOptions {
    /// Miners' shards read at once (16): memory is this many sections in flight.
    pub concurrency: usize,
    /// The device that merges (the CPU when `None`).
    #[cfg(feature = "cuda")]
    pub gpu: Option<std::sync::Arc<crate::format::codec::gpu::Gpu>>,
    /// How long after the window's close the reads may take (`window_budget`); None: the
    /// run's window length.
    pub budget: Option<Duration>,
}

impl Default for AggregateOptions {
    fn default() -> Self {
        AggregateOptions {
            concurrency: 16,
            #[cfg(feature = "cuda")]
            gpu: None,
            budget: None,
        }
    }
}

impl AggregateOptions {
    /// The same, with reads of a window ending `budget` after its close.
    pub fn with_budget(mut self, budget: Option<Duration>) -> Self {
        self.budget = budget;
        self
    }

    /// The same, reading `n` shards at once.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
}

/// What an aggregate carries: agg-v1's merged tensor sections, or agg-v2's signed list.
pub(super) enum Body {
    Merged(Vec<(String, Vec<u8>)>),
    Listed(AcceptedList),
}

/// Writes the ledger, then signs and puts the aggregate (the commit point).
pub(super) async fn publish_aggregate(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    w: u64,
    v: &Verdicts,
    body: Body,
) -> Result<Aggregated, RoundError> {
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
        ledger_parquet(&v.rows).map_err(|e| RoundError::Internal(format!("ledger: {e}")))?;
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
                .map_err(|e| RoundError::Internal(format!("accepted list: {e}")))?;
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
        unread: v
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Error)
            .map(|r| format!("{}: {}", r.peer, r.detail))
            .collect(),
        bytes: signed.len(),
        already_published: outcome == PutOutcome::AlreadyIdentical,
        reasons,
        phases: BTreeMap::new(),
    })
}

/// agg-v2's list from the final verdicts: the accepted shards in peer-id order, with the
/// section tables that were checked (the aggregator's copies' for form `shards`).
pub(super) fn accepted_list(
    reg: &Registry,
    w: u64,
    shards: &[MinerShard],
    v: &Verdicts,
) -> AcceptedList {
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
                clipped: row.reason == LedgerReason::Clipped.code(),
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

/// Seconds per phase of one aggregation.
#[derive(Default)]
pub(super) struct Phases(BTreeMap<String, f64>);

impl Phases {
    fn add(&mut self, name: &str, secs: f64) {
        *self.0.entry(name.to_string()).or_insert(0.0) += secs;
    }
}

/// Merges window `w` in one process and publishes its ledger and aggregate into the
/// aggregator's store.
pub async fn aggregate_window(job: Job<'_>, w: u64) -> Result<Aggregated, RoundError> {
    aggregate_window_opts(job, w, &AggregateOptions::default()).await
}

/// [`aggregate_window`] as `opts` says.
pub async fn aggregate_window_opts(
    job: Job<'_>,
    w: u64,
    opts: &AggregateOptions,
) -> Result<Aggregated, RoundError> {
    let Job { reg, id, .. } = job;
    let all = 0..reg.model.tensors.len();
    if reg.aggregate.format == AggFormat::V2 {
        let (open, checks, phases, kept) =
            check_window_v2(job, w, all, opts.concurrency, opts.budget).await?;
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
    } = open_window(job, Role::Aggregator, w, opts.concurrency, opts.budget).await?;
    let decoded = check_ranges(reg, &shards, all.clone(), opts.concurrency, deadline).await;
    let checks: Vec<RangeCheck> = decoded.iter().map(|(c, _)| c.clone()).collect();
    let v = finalize(reg, w, &shards, &[checks]);
    let sections = merge_range(reg, all, &v.weights, &decoded, opts)?;
    drop(decoded);
    publish_aggregate(reg, id, &target, w, &v, Body::Merged(sections)).await
}

/// One merged tensor as its agg-v1 section.
pub(crate) fn agg_tensor(name: &str, shape: &[u64], dense: &[f32]) -> Result<Vec<u8>, RoundError> {
    crate::format::agg_tensor::write_agg_tensor(name, shape, dense)
        .map_err(|e| RoundError::Internal(format!("aggregate tensor {name}: {e}")))
}
