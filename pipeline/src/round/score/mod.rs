//! The validator: judge every registered miner each window and publish the judgement.
//!
//! A validator sees exactly what the aggregator sees: it runs the same header pass, range
//! checks and verdicts (the shared [`crate::round::verdict`] pipeline: `open_window`, `check_ranges`, `finalize`), so a miner's
//! verdict and reason are the ledger's. On top it measures, per accepted miner:
//! - **agreement**: cosine of the decoded update with the sum of the other eligible miners'
//!   updates (the leave-one-out mean has the same direction);
//! - **copying**: index-set overlap and value cosine against every other miner of the window
//!   and against the last few aggregates; the later publisher of a near-identical pair (by
//!   the store's `last_modified`, then peer id) is the copier;
//! - **usefulness**: evaluation loss before and after applying the update (an [`Evaluator`]).
//!
//! Scores become a rating (an exponential moving average across windows) and the rating
//! becomes weights: non-negative, summing to 1, zero for anyone absent, rejected or copying.
//! The table (`scores/<w>.parquet`) and a signed weights object that binds the table's hash
//! are written create-only; every input is fixed once the window has closed, so a rerun
//! produces the same bytes. Formulas and thresholds: `schemas/scores.md`.

use crate::round::RoundReason;
use std::collections::BTreeMap;

use bytes::Bytes;
use object_store::ObjectStoreExt;

use crate::format::codec::{CodecError, Dense, EncodedTensor, accumulate};
use crate::format::envelope::{Compression, EnvelopeBuilder, Kind};
use crate::format::layout;
use crate::format::tables::{ScoreRow, read_scores, scores_parquet};
use crate::identity::Identity;
use crate::round::RoundError;
use crate::round::evaluate::{EvalError, Evaluator};
use crate::round::publish::clock;
use crate::round::registry::{Job, Registry, Role};
use crate::round::verdict::{MinerShard, Verdict, Verdicts, check_range, finalize, open_window};
use crate::store::{self, PutOutcome, S3Options, StoreError, Target};

pub mod gram;
mod pass;
pub mod reference;

pub use gram::Gram;
use pass::{PastAgg, check_and_measure};

/// The codec of a validator's signed weights object.
pub(crate) const WEIGHTS_CODEC: &str = "weights-v1";

/// When two updates count as copies. Calibrated on the reference task (see
/// `schemas/scores.md` for the measured margins).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CopyThresholds {
    /// Jaccard overlap of two miners' kept index sets.
    pub overlap: f64,
    /// Cosine of their values (with `overlap`: a copy).
    pub similarity: f64,
    /// Share of a miner's kept indices inside a past aggregate's support.
    pub agg_containment: f64,
    /// Cosine with the past aggregate on the miner's support.
    pub agg_similarity: f64,
}

impl Default for CopyThresholds {
    fn default() -> Self {
        CopyThresholds {
            overlap: 0.5,
            similarity: 0.8,
            agg_containment: 0.8,
            agg_similarity: 0.75,
        }
    }
}

/// How a validator scores a window; the defaults are what `shardrop validate` uses.
#[derive(Clone, Debug)]
pub struct ValidateOptions {
    /// Miners fetched at once.
    pub concurrency: usize,
    /// Weight of this window's score in the rating: `r ← (1 − α)·r + α·s`.
    pub alpha: f64,
    /// When a near-copy counts as a copy.
    pub copy: CopyThresholds,
    /// Past aggregates (windows `w−1 ..= w−n`) a miner is compared with.
    pub copy_lookback: u64,
    /// How far back to look for the previous score table (a validator that missed windows
    /// carries ratings over from the newest table it finds).
    pub rating_lookback: u64,
    /// How long after the window's close the reads may take (`verdict::window_deadline`).
    pub budget: Option<std::time::Duration>,
    /// What an evaluator's failure for an eligible miner does (`scores.md` §3).
    pub on_eval_error: OnEvalError,
}

/// What a validator does when its evaluator fails for an eligible miner (`scores.md` §3).
/// Either way the failure is the validator's, never the miner's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnEvalError {
    /// Publish nothing for the window and refuse (`eval_failed`), naming every miner the
    /// evaluator failed for and why: a broken evaluator (a script that does not take
    /// `--scale`, a model that does not load) would otherwise fail for everyone and publish
    /// weights of 0 for honest miners, which a rerun cannot replace. Nothing is stored, so a
    /// rerun with a working evaluator publishes.
    #[default]
    Refuse,
    /// Publish: a failed miner's row records `eval_error`, its score is null, and its rating
    /// and its weight are the ones of its previous table, unchanged; the other eligible
    /// miners share the rest of the weight by rating.
    Carry,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            concurrency: 16,
            alpha: 0.25,
            copy: CopyThresholds::default(),
            copy_lookback: 2,
            rating_lookback: 16,
            budget: None,
            on_eval_error: OnEvalError::Refuse,
        }
    }
}

/// What copy detection found for one miner.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CopyInfo {
    /// The most similar other miner, or `agg:W` for a past aggregate.
    pub nearest: Option<String>,
    /// Index-set overlap with `nearest`.
    pub overlap: Option<f64>,
    /// Value cosine with `nearest`.
    pub similarity: Option<f64>,
    /// Judged a copy of `nearest`.
    pub copier: bool,
}

/// One miner as copy detection sees it: whether it was accepted (only accepted updates are
/// compared) and when its commit to that update landed (`round.md`, "Commit, then shard";
/// `None` without a valid commit). Commit times, not shard times or peer ids, decide who
/// copied whom: a copier can only commit after it has seen the shard, a whole second after
/// its publisher's commit.
pub(crate) struct Candidate<'a> {
    /// The miner.
    pub peer: &'a str,
    /// When its commit landed by the store's clock (`None`: no valid commit), which decides who copied whom.
    pub order: Option<i64>,
    /// Its update is in the comparison (it was accepted).
    pub accepted: bool,
}

/// Pairwise and past-aggregate copy detection from the window's [`Gram`] statistics (miner
/// `k` of `miners` is row `k`). Deterministic: pairs are judged independently, and the later
/// publisher of a near-identical pair is the copier. Every accepted pair is compared exactly
/// (the matrix already holds every pair's overlap).
pub(crate) fn detect_copies(
    miners: &[Candidate],
    gram: &Gram,
    th: &CopyThresholds,
) -> Vec<CopyInfo> {
    let n = miners.len();
    let mut out = vec![CopyInfo::default(); n];
    let mut consider = |k: usize, name: String, ov: f64, cos: f64, copy: bool| {
        let o = &mut out[k];
        let better = match (o.copier, copy) {
            (false, true) => true,
            (true, false) => false,
            _ => o.similarity.is_none_or(|s| cos > s),
        };
        if better {
            *o = CopyInfo {
                nearest: Some(name),
                overlap: Some(ov),
                similarity: Some(cos),
                copier: copy,
            };
        }
    };
    for i in (0..n).filter(|&i| miners[i].accepted) {
        for j in (i + 1..n).filter(|&j| miners[j].accepted) {
            let (ov, cos) = gram.similarity(i, j);
            let copy = ov >= th.overlap && cos >= th.similarity;
            // The strictly earlier commit is the original; without one on either side, or
            // in the same instant, neither can show it came first and both count as copies.
            let order = match (miners[i].order, miners[j].order) {
                (Some(a), Some(b)) if a < b => Some((i, j)),
                (Some(a), Some(b)) if b < a => Some((j, i)),
                (Some(_), None) => Some((i, j)),
                (None, Some(_)) => Some((j, i)),
                _ => None,
            };
            match order {
                Some((first, later)) => {
                    consider(later, miners[first].peer.to_string(), ov, cos, copy);
                    consider(first, miners[later].peer.to_string(), ov, cos, false);
                }
                None => {
                    consider(i, miners[j].peer.to_string(), ov, cos, copy);
                    consider(j, miners[i].peer.to_string(), ov, cos, copy);
                }
            }
        }
    }
    let past: Vec<u64> = gram.past_windows().collect();
    for k in (0..n).filter(|&k| miners[k].accepted) {
        for (p, aw) in past.iter().enumerate() {
            let (c, cos) = gram.to_past(k, p);
            let copy = c >= th.agg_containment && cos >= th.agg_similarity;
            consider(k, format!("agg:{aw}"), c, cos, copy);
        }
    }
    out
}

/// What one validation produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Validated {
    /// The window scored.
    pub window: u64,
    /// The score table's URL.
    pub scores: String,
    /// The signed weights' URL.
    pub weights: String,
    /// What measured usefulness (recorded in the weights object).
    pub evaluator: String,
    /// The table's rows, in peer-id order.
    pub rows: Vec<ScoreRow>,
    /// The same table was already there (a rerun).
    pub already_published: bool,
    /// Seconds per phase: `open` (header pass, past aggregates), `read` (waiting for shard
    /// sections, checked), `statistics` (decoding and the Gram pass), `evaluate`, `publish`.
    pub phases: BTreeMap<String, f64>,
}

/// The newest ratings this validator published before window `w`.
async fn previous_ratings(
    reg: &Registry,
    target: &Target,
    w: u64,
    lookback: u64,
) -> Result<BTreeMap<String, Previous>, RoundError> {
    for v in (w.saturating_sub(lookback)..w).rev() {
        let path = target.path(&layout::scores(&reg.run, v));
        let url = target.url_of(&path);
        match target.store.get(&path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| StoreError::from_store(&url, e))?;
                let rows = read_scores(bytes).map_err(|e| RoundError::Rejected {
                    object: url.to_string(),
                    reason: RoundReason::ScoresMalformed.code(),
                    detail: format!("not a score table: {e}"),
                })?;
                return Ok(rows
                    .into_iter()
                    .map(|r| {
                        let prev = Previous {
                            rating: r.rating,
                            weight: r.weight,
                        };
                        (r.peer, prev)
                    })
                    .collect());
            }
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => return Err(StoreError::from_store(&url, e).into()),
        }
    }
    Ok(BTreeMap::new())
}

/// A miner's rating and weight in this validator's newest earlier table.
#[derive(Clone, Copy, Debug, Default)]
struct Previous {
    rating: f64,
    weight: f64,
}

/// The refusal of a window whose evaluator failed for eligible miners (`OnEvalError::Refuse`):
/// every such miner and its error, and the next step.
fn eval_refused(w: u64, failed: &[(&str, String)], eligible: usize) -> RoundError {
    let list: Vec<String> = failed
        .iter()
        .map(|(peer, e)| match e.is_empty() {
            true => format!("{peer}: no measurement"),
            false => format!("{peer}: {e}"),
        })
        .collect();
    RoundError::Refused {
        reason: RoundReason::EvalFailed,
        detail: format!(
            "window {w}: the evaluator failed for {} of {eligible} eligible miner(s) ({}); nothing was published, since an evaluator's failure is the validator's and must not lower any miner's weight. Fix the evaluator (`shardrop validate --help` gives its arguments, --scale included, and the line it must print) and rerun this window, or publish with their ratings and weights carried over (`--on-eval-error carry`)",
            failed.len(),
            list.join("; ")
        ),
    }
}

/// Dense f32 tensors of an update, for evaluators.
fn dense_of(tensors: &[EncodedTensor]) -> Result<Dense, CodecError> {
    let mut out = Dense::new();
    for t in tensors {
        let mut d = vec![0f32; t.numel() as usize];
        accumulate(t, &mut d, 1.0)?;
        out.insert(t.name.clone(), (t.shape.clone(), d));
    }
    Ok(out)
}

/// Scores window `w` and publishes the table and the signed weights into the validator's
/// store. Any miner's failure (store, format, evaluator) is recorded in its row; the others
/// are still scored.
pub async fn validate_window(
    job: Job<'_>,
    w: u64,
    mut evaluator: Option<&mut dyn Evaluator>,
    opts: &ValidateOptions,
) -> Result<Validated, RoundError> {
    let judged = judge_window(job, w, opts).await?;
    // Usefulness on the evaluator's model.
    let losses = match evaluator.as_deref_mut() {
        Some(ev) => measure(ev, job.reg, job.s3, &judged).await,
        None => vec![Err(EvalError::Failed(String::new())); judged.shards.len()],
    };
    let evaluated = evaluator.map(|e| e.name());
    publish_judged(job, &judged, losses, evaluated, opts).await
}

/// A closed window checked and judged as a validator judges it (verdicts, copies,
/// agreement), waiting for usefulness: what a validator measuring in its own process
/// (the Python package) iterates over before it publishes with [`publish_judged`].
pub struct JudgedWindow {
    w: u64,
    target: Target,
    shards: Vec<MinerShard>,
    verdicts: Verdicts,
    copies: Vec<CopyInfo>,
    eligible: Vec<bool>,
    agree: Vec<Option<f64>>,
    deadline: tokio::time::Instant,
    phases: Laps,
}

/// One registered miner of a judged window.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JudgedMiner<'a> {
    /// Its peer id.
    pub peer: &'a str,
    /// The ledger's verdict.
    pub verdict: Verdict,
    /// The stable reason code (`""` when accepted as is).
    pub reason: &'a str,
    /// A human detail naming the object.
    pub detail: &'a str,
    /// Judged a copy (of `nearest`): accepted, but scored 0 and given no weight.
    pub copier: bool,
    /// Accepted and not a copier: the miners whose usefulness counts.
    pub eligible: bool,
}

impl JudgedWindow {
    /// The window.
    pub fn window(&self) -> u64 {
        self.w
    }

    /// Registered miners, in peer-id order.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the run has no miners.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Miner `j` (peer-id order).
    pub fn miner(&self, j: usize) -> Option<JudgedMiner<'_>> {
        let (s, row) = (self.shards.get(j)?, self.verdicts.rows.get(j)?);
        Some(JudgedMiner {
            peer: &s.peer,
            verdict: row.verdict,
            reason: &row.reason,
            detail: &row.detail,
            copier: self.copies[j].copier,
            eligible: self.eligible[j],
        })
    }

    /// The step one eligible miner's update contributes to the aggregate (`outer_lr / n`
    /// for n eligible miners): where an evaluator measures `loss_after`.
    pub fn scale(&self, reg: &Registry) -> f32 {
        let n = self.eligible.iter().filter(|e| **e).count().max(1);
        reg.setting_at(self.w).lr_at(self.w) / n as f32
    }

    /// Miner `j`'s decoded update, read again from its signed, hash-checked shard (one
    /// model-sized dense update at a time: the caller holds no more than that). A shard
    /// that changed since it was checked, or was not accepted, is an evaluator error.
    pub async fn decoded(&self, reg: &Registry, j: usize) -> Result<Dense, EvalError> {
        let s = self
            .shards
            .get(j)
            .filter(|_| self.verdicts.rows[j].verdict == Verdict::Accepted)
            .ok_or_else(|| {
                EvalError::Failed(format!("miner {j} of window {} was not accepted", self.w))
            })?;
        let all = 0..reg.model.tensors.len();
        match tokio::time::timeout_at(self.deadline, check_range(reg, s, all)).await {
            Err(_) => Err(EvalError::Shard(format!(
                "{}: not read again within the window's budget",
                s.object
            ))),
            Ok((check, tensors)) => match (check.fault, dense_of(&tensors)) {
                (Some((_, f)), _) => Err(EvalError::Shard(format!(
                    "{}: changed since it was checked ({}: {})",
                    s.object, f.reason, f.detail
                ))),
                (None, Ok(d)) => Ok(d),
                (None, Err(e)) => Err(EvalError::Shard(e.to_string())),
            },
        }
    }
}

/// Waits for window `w` to close, then runs the aggregator's checks on every miner and
/// judges copies and agreement among the accepted: everything of a validation but
/// usefulness and publishing.
pub async fn judge_window(
    job: Job<'_>,
    w: u64,
    opts: &ValidateOptions,
) -> Result<JudgedWindow, RoundError> {
    let Job { reg, s3, .. } = job;
    let mut phases = Laps::default();
    let crate::round::verdict::OpenWindow {
        target,
        mut shards,
        deadline,
        ..
    } = open_window(job, Role::Validator, w, opts.concurrency, opts.budget).await?;
    let mut past = Vec::new();
    for aw in (w.saturating_sub(opts.copy_lookback)..w).rev() {
        match PastAgg::open(reg, s3, aw).await {
            Ok(p) => past.push(p),
            Err(e) => tracing::warn!(window = aw, error = %e, "past aggregate not compared"),
        }
    }
    // The aggregator's verdicts, from the same checks, and the window's statistics from
    // the same reads.
    phases.lap("open");
    let measured = check_and_measure(reg, &shards, past, opts.concurrency, deadline).await;
    let (checks, gram) = (measured.checks, measured.gram);
    phases.lap("");
    phases.0.insert("read".into(), measured.read_secs);
    phases
        .0
        .insert("statistics".into(), measured.statistics_secs);
    let verdicts = finalize(reg, w, &shards, &[checks]);
    let accepted: Vec<bool> = verdicts
        .rows
        .iter()
        .map(|r| r.verdict == Verdict::Accepted)
        .collect();
    // Copying, then agreement, among the accepted.
    let copies = find_copies(
        reg,
        w,
        &mut shards,
        &accepted,
        &gram,
        &verdicts,
        opts,
        deadline,
    )
    .await;
    let eligible: Vec<bool> = (0..shards.len())
        .map(|j| accepted[j] && !copies[j].copier)
        .collect();
    let agree = gram.agreement(&accepted, &eligible);
    Ok(JudgedWindow {
        w,
        target,
        shards,
        verdicts,
        copies,
        eligible,
        agree,
        deadline,
        phases,
    })
}

/// What a validator measured of one eligible miner: the losses before and after its update,
/// or (a validator measuring some other way) the usefulness alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Usefulness {
    /// Loss before and after; usefulness is their difference.
    Losses(crate::round::evaluate::Losses),
    /// The usefulness itself (the table's loss columns stay null).
    Gain(f64),
}

impl Usefulness {
    fn gain(&self) -> f64 {
        match self {
            Usefulness::Losses(l) => l.loss_before - l.loss_after,
            Usefulness::Gain(g) => *g,
        }
    }
}

/// Scores a judged window with what was measured of each miner (`measured[j]` for miner
/// `j` in peer-id order: only eligible miners' entries count; an `Err` is recorded as the
/// row's `eval_error`) and publishes the table and the signed weights. `evaluator` names
/// what measured (recorded in the weights); `None`: nothing did, the score is agreement.
pub async fn publish_judged(
    job: Job<'_>,
    judged: &JudgedWindow,
    measured: Vec<Result<Usefulness, EvalError>>,
    evaluator: Option<String>,
    opts: &ValidateOptions,
) -> Result<Validated, RoundError> {
    let Job { reg, id, .. } = job;
    let w = judged.w;
    if measured.len() != judged.shards.len() {
        return Err(RoundError::Internal(format!(
            "{} measurements for {} miners",
            measured.len(),
            judged.shards.len()
        )));
    }
    if evaluator.is_some() && opts.on_eval_error == OnEvalError::Refuse {
        let failed: Vec<(&str, String)> = judged
            .shards
            .iter()
            .zip(&measured)
            .zip(&judged.eligible)
            .filter_map(|((s, m), &eligible)| match (m, eligible) {
                (Err(e), true) if e.is_evaluator() => Some((s.peer.as_str(), e.to_string())),
                _ => None,
            })
            .collect();
        if !failed.is_empty() {
            let eligible = judged.eligible.iter().filter(|&&e| e).count();
            return Err(eval_refused(w, &failed, eligible));
        }
    }
    // Scores, ratings and weights.
    let prev = previous_ratings(reg, &judged.target, w, opts.rating_lookback).await?;
    let j = Judged {
        shards: &judged.shards,
        verdicts: &judged.verdicts,
        copies: &judged.copies,
        eligible: &judged.eligible,
        agree: &judged.agree,
        losses: &measured,
        evaluated: evaluator.is_some(),
    };
    let rows = score_rows(reg, w, &j, &prev, opts.alpha);
    let name = evaluator.unwrap_or_else(|| "none (score = agreement)".to_string());
    // Measuring happened between judging and now (on the caller's side for the Python
    // package, which may publish a judged window more than once).
    let mut phases = judged.phases.clone();
    phases.lap("evaluate");
    let mut done = publish_scores(reg, id, &judged.target, w, name, rows).await?;
    phases.lap("publish");
    done.phases = phases.0;
    Ok(done)
}

/// Seconds per phase of a validation, and when the last one ended.
#[derive(Clone)]
struct Laps(BTreeMap<String, f64>, std::time::Instant);

impl Default for Laps {
    fn default() -> Laps {
        Laps(BTreeMap::new(), std::time::Instant::now())
    }
}

impl Laps {
    /// Ends phase `name` (an empty name only restarts the clock).
    fn lap(&mut self, name: &str) {
        let now = std::time::Instant::now();
        if !name.is_empty() {
            self.0
                .insert(name.to_string(), (now - self.1).as_secs_f64());
        }
        self.1 = now;
    }
}

/// Near-copies among the accepted shards and of recent aggregates (`detect_copies`, who
/// committed first deciding), with the aggregator's exact duplicates marked as copiers of
/// the shard that kept its place.
#[allow(clippy::too_many_arguments)]
async fn find_copies(
    reg: &Registry,
    w: u64,
    shards: &mut [MinerShard],
    accepted: &[bool],
    gram: &Gram,
    verdicts: &Verdicts,
    opts: &ValidateOptions,
    deadline: tokio::time::Instant,
) -> Vec<CopyInfo> {
    // Who committed first decides near-copies too: read the commits of every accepted
    // shard (one small GET each, within the window's budget).
    use futures::StreamExt;
    futures::stream::iter(
        shards
            .iter_mut()
            .zip(accepted)
            .filter(|(s, ok)| **ok && s.commit_ms.is_none())
            .map(|(s, _)| s),
    )
    .for_each_concurrent(opts.concurrency.max(1), |s| async move {
        let _ = tokio::time::timeout_at(deadline, s.fetch_commit(reg, w)).await;
    })
    .await;
    let miners: Vec<Candidate> = shards
        .iter()
        .zip(accepted)
        .map(|(s, &accepted)| Candidate {
            peer: &s.peer,
            order: s.commit_ms,
            accepted,
        })
        .collect();
    let mut copies = detect_copies(&miners, gram, &opts.copy);
    for (winner, c) in verdicts.duplicate_of.iter().zip(copies.iter_mut()) {
        if let Some(winner) = winner {
            *c = CopyInfo {
                nearest: Some(winner.clone()),
                overlap: Some(1.0),
                similarity: Some(1.0),
                copier: true,
            };
        }
    }
    copies
}

/// Each eligible miner's losses before and after its update on the evaluator's model
/// (θ_w, prepared once per window); an evaluator failure is recorded, never the miner's.
/// One miner's dense update at a time, read again from its (signed, hash-checked) shard:
/// the evaluator's input is model-sized, the validator holds no more than that.
async fn measure(
    ev: &mut dyn Evaluator,
    reg: &Registry,
    s3: &S3Options,
    judged: &JudgedWindow,
) -> Vec<Result<Usefulness, EvalError>> {
    let w = judged.w;
    let mut losses = vec![Err(EvalError::Failed(String::new())); judged.shards.len()];
    let prepared = ev.prepare(reg, s3, w).await;
    let scale = judged.scale(reg);
    for (j, s) in judged.shards.iter().enumerate() {
        if !judged.eligible[j] {
            continue;
        }
        losses[j] = match &prepared {
            Err(e) => Err(e.clone()),
            Ok(()) => match judged.decoded(reg, j).await {
                Ok(d) => ev
                    .evaluate(reg, w, &s.peer, &d, scale)
                    .await
                    .map(Usefulness::Losses),
                Err(e) => Err(e),
            },
        };
    }
    losses
}

/// Everything `score_rows` combines, per miner in peer-id order.
struct Judged<'a> {
    shards: &'a [MinerShard],
    verdicts: &'a Verdicts,
    copies: &'a [CopyInfo],
    eligible: &'a [bool],
    agree: &'a [Option<f64>],
    losses: &'a [Result<Usefulness, EvalError>],
    evaluated: bool,
}

/// The score table's rows (`scores.md`): score from usefulness (relative to the best gain)
/// or, without an evaluator, from agreement; rating as an exponential average; weights as
/// ratings normalised over the eligible miners.
fn score_rows(
    reg: &Registry,
    w: u64,
    j: &Judged<'_>,
    prev: &BTreeMap<String, Previous>,
    alpha: f64,
) -> Vec<ScoreRow> {
    let gain = |k: usize| j.losses[k].as_ref().ok().map(Usefulness::gain);
    let best = (0..j.shards.len())
        .filter_map(gain)
        .fold(0f64, |a, g| a.max(g));
    let clk = clock(reg);
    let mut rows: Vec<ScoreRow> = Vec::with_capacity(j.shards.len());
    for (k, (s, l)) in j.shards.iter().zip(&j.verdicts.rows).enumerate() {
        let score = if !j.eligible[k] {
            Some(0.0)
        } else if !j.evaluated {
            j.agree[k].map(|a| a.max(0.0))
        } else {
            match &j.losses[k] {
                Ok(_) => gain(k).map(|g| if best > 0.0 { g.max(0.0) / best } else { 0.0 }),
                // Its shard was not there to measure as checked: the miner's doing.
                Err(e) if !e.is_evaluator() => Some(0.0),
                Err(_) => None,
            }
        };
        let before = prev.get(&s.peer).map_or(0.0, |p| p.rating);
        let rating = score.map_or(before, |s| (1.0 - alpha) * before + alpha * s);
        let (lb, la, err) = match &j.losses[k] {
            Ok(Usefulness::Losses(x)) => (Some(x.loss_before), Some(x.loss_after), None),
            Ok(Usefulness::Gain(_)) => (None, None, None),
            Err(e) if j.eligible[k] && j.evaluated => (None, None, Some(e.to_string())),
            Err(_) => (None, None, None),
        };
        let c = &j.copies[k];
        rows.push(ScoreRow {
            window: w,
            peer: s.peer.clone(),
            present: s.found,
            last_modified_ms: s.last_modified_ms,
            secs_before_deadline: s
                .last_modified_ms
                .map(|lm| (clk.deadline(w) as f64 - lm as f64) / 1000.0),
            verdict: l.verdict,
            reason: l.reason.clone(),
            detail: l.detail.clone(),
            norm: l.norm,
            agreement: j.agree[k],
            nearest: c.nearest.clone(),
            overlap: c.overlap,
            similarity: c.similarity,
            copier: c.copier,
            loss_before: lb,
            loss_after: la,
            usefulness: gain(k),
            eval_error: err,
            score,
            rating,
            weight: 0.0,
        });
    }
    // A miner the evaluator failed for keeps its previous weight (`OnEvalError::Carry`;
    // a refusing validator never gets here with one); the others share the rest by rating.
    let carried = |k: usize| {
        j.eligible[k] && j.evaluated && j.losses[k].as_ref().is_err_and(EvalError::is_evaluator)
    };
    let mut kept = 0.0;
    for (k, r) in rows.iter_mut().enumerate() {
        if carried(k) {
            r.weight = prev.get(&r.peer).map_or(0.0, |p| p.weight);
            kept += r.weight;
        }
    }
    let total: f64 = rows
        .iter()
        .enumerate()
        .filter(|(k, _)| j.eligible[*k] && !carried(*k))
        .map(|(_, r)| r.rating)
        .sum();
    if total > 0.0 {
        let share = (1.0 - kept).max(0.0);
        for (k, r) in rows.iter_mut().enumerate() {
            if j.eligible[k] && !carried(k) {
                // share is 1 when nothing is carried: weight = rating / total exactly.
                r.weight = share * r.rating / total;
            }
        }
    }
    rows
}

async fn publish_scores(
    reg: &Registry,
    id: &Identity,
    target: &Target,
    w: u64,
    evaluator: String,
    rows: Vec<ScoreRow>,
) -> Result<Validated, RoundError> {
    let table = scores_parquet(&rows).map_err(|e| RoundError::Internal(format!("scores: {e}")))?;
    let table_hash = blake3::hash(&table).to_hex().to_string();
    let path = target.path(&layout::scores(&reg.run, w));
    let scores_url = target.url_of(&path);
    let outcome = match store::put_create(target, &path, table.as_slice()).await {
        Ok(o) => o,
        Err(StoreError::Conflict { .. }) => {
            return Err(RoundError::Conflict {
                object: scores_url,
                detail: format!(
                    "window {w} was already scored with different results (is the evaluator deterministic?)"
                ),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let weights: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"peer": r.peer, "weight": r.weight, "rating": r.rating}))
        .collect();
    let body = serde_json::json!({
        "run": reg.run, "window": w, "evaluator": evaluator,
        "scores": layout::scores(&reg.run, w), "scores_blake3": table_hash, "weights": weights,
    });
    let signed = EnvelopeBuilder::new(Kind::Weights, &reg.run)
        .window(w)
        .codec(WEIGHTS_CODEC, Default::default())
        .clock_ms(clock(reg).closes(w))
        .meta("scores_blake3", &table_hash)
        .section(
            "weights.json",
            &body.to_string().into_bytes(),
            Compression::None,
        )?
        .sign(id)?;
    let wpath = target.path(&layout::weights(&reg.run, w));
    let weights_url = target.url_of(&wpath);
    match store::put_create(target, &wpath, &signed).await {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(RoundError::Conflict {
                object: weights_url,
                detail: format!("other weights for window {w} are already published"),
            });
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Validated {
        window: w,
        scores: scores_url,
        weights: weights_url,
        evaluator,
        rows,
        already_published: outcome == PutOutcome::AlreadyIdentical,
        phases: BTreeMap::new(),
    })
}

/// Reads and verifies a validator's weights object, and the score table it binds.
pub async fn read_scored_window(
    reg: &Registry,
    validator: &crate::round::registry::Participant,
    s3: &S3Options,
    w: u64,
) -> Result<(Vec<ScoreRow>, serde_json::Value), RoundError> {
    use crate::format::envelope::{EnvelopeError, Expect};
    let peer = crate::identity::PeerId::parse(&validator.peer)
        .map_err(|e| RoundError::Caller(e.to_string()))?;
    let target = reg.open_store(validator, s3)?;
    let wkey = layout::weights(&reg.run, w);
    let wurl = target.url_of(&target.path(&wkey));
    let expect = Expect {
        signer: Some(peer),
        run: Some(reg.run.clone()),
        kind: Some(Kind::Weights),
        window: Some(w),
        step: None,
    };
    let (_, secs) = match crate::format::envelope::read_signed(
        &target,
        &wkey,
        &expect,
        &crate::format::envelope::Limits::small_object(),
    )
    .await
    {
        Err(EnvelopeError::NotFound { .. }) => {
            return Err(RoundError::Missing {
                object: wurl,
                detail: format!("window {w} has no weights here"),
            });
        }
        r => r?,
    };
    let body: serde_json::Value = secs
        .first()
        .and_then(|s| serde_json::from_slice(s).ok())
        .ok_or_else(|| RoundError::Rejected {
            object: wurl.clone(),
            reason: RoundReason::WeightsMalformed.code(),
            detail: "no weights.json section".into(),
        })?;
    let path = target.path(&layout::scores(&reg.run, w));
    let url = target.url_of(&path);
    let table: Bytes = target
        .store
        .get(&path)
        .await
        .map_err(|e| StoreError::from_store(&url, e))?
        .bytes()
        .await
        .map_err(|e| StoreError::from_store(&url, e))?;
    let hash = blake3::hash(&table).to_hex().to_string();
    if body["scores_blake3"].as_str() != Some(hash.as_str()) {
        return Err(RoundError::Rejected {
            object: url,
            reason: RoundReason::ScoresHashMismatch.code(),
            detail: format!("the table's blake3 {hash} is not the one the signed weights name"),
        });
    }
    let rows = read_scores(table).map_err(|e| RoundError::Rejected {
        object: url.clone(),
        reason: RoundReason::ScoresMalformed.code(),
        detail: format!("not a score table: {e}"),
    })?;
    Ok((rows, body))
}

/// Windows that have a score table under a validator's store, ascending (one LIST).
pub async fn scored_windows(
    reg: &Registry,
    validator: &crate::round::registry::Participant,
    s3: &S3Options,
) -> Result<Vec<u64>, RoundError> {
    let target = reg.open_store(validator, s3)?;
    let metas = store::list_all(&target, &target.path(&layout::scores_dir(&reg.run))).await?;
    let mut ws: Vec<u64> = metas
        .iter()
        .filter_map(|m| {
            m.location
                .filename()?
                .strip_suffix(".parquet")?
                .parse()
                .ok()
        })
        .collect();
    ws.sort_unstable();
    Ok(ws)
}

// The tests score the reference model's updates.
#[cfg(test)]
#[cfg(feature = "refmodel")]
mod tests;
