//! Readers: fetch a window's aggregate, verify it whole, and replay aggregates onto
//! parameters with the outer optimizer in force for each window (catch-up and `apply`).
//! agg-v1 aggregates carry the merged tensors; agg-v2 lists are merged by
//! [`crate::round::merge`] first.

use crate::round::RoundReason;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::format::agg_tensor::{AggTensor, agg_limits, read_agg_tensor};
use crate::format::envelope::read_signed;
use crate::format::envelope::{EnvelopeError, Expect, Kind};
use crate::format::layout;
use crate::round::RoundError;
use crate::round::accepted::{AcceptedList, LIST_SECTION};
use crate::round::aggregate::AGG_V2_CODEC;
use crate::round::merge;
use crate::round::outer::OuterState;
use crate::round::registry::Registry;
use crate::store::S3Options;

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
) -> Result<Fetched, RoundError> {
    let (agg_id, target) = reg.aggregator(s3)?;
    let key = layout::agg(&reg.run, w);
    let object = target.url_of(&target.path(&key));
    let expect = Expect::in_window(Kind::Agg, agg_id, &reg.run, w);
    let (env, sections) = match read_signed(&target, &key, &expect, &agg_limits(&reg.model)).await {
        Ok(x) => x,
        Err(EnvelopeError::NotFound { .. }) => {
            return Err(RoundError::NoAggregate { window: w, object });
        }
        Err(e) => {
            return Err(RoundError::Aggregate {
                window: w,
                source: e,
            });
        }
    };
    if env.head.header.codec == AGG_V2_CODEC {
        let bad = |reason: &'static str, detail: String| RoundError::Rejected {
            object: object.clone(),
            reason,
            detail: format!("window {w}: {detail}"),
        };
        let [only] = sections.as_slice() else {
            return Err(bad(
                RoundReason::AggVerdict.code(),
                "an agg-v2 aggregate has exactly one section".into(),
            ));
        };
        if env.sections()[0].name != LIST_SECTION {
            return Err(bad(
                RoundReason::AggVerdict.code(),
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
            read_agg_tensor(s, &reg.model).map_err(|e| RoundError::Rejected {
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
/// `first` is refused (`optimizer_state_missing`); use [`apply_aggregates_opts`].
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
) -> Result<usize, RoundError> {
    let mut state = OuterState::default();
    apply_aggregates_opts(
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
pub async fn apply_aggregates_opts<T: Tensor>(
    reg: &Registry,
    s3: &S3Options,
    theta: &mut BTreeMap<String, T>,
    state: &mut OuterState,
    first: u64,
    last: u64,
    opts: &ApplyOptions<'_>,
) -> Result<usize, RoundError> {
    if reg.momentum_before(first) {
        for (name, t) in theta.iter() {
            match state.momentum.get(name) {
                Some(m) if m.len() == t.as_ref().len() => {}
                Some(_) => {
                    return Err(RoundError::Caller(format!(
                        "the momentum buffer of {name:?} has another size than the tensor"
                    )));
                }
                None => {
                    return Err(RoundError::Refused {
                        reason: RoundReason::OptimizerStateMissing,
                        detail: format!(
                            "the run's outer optimizer kept momentum before window {first}, and no momentum buffer for {name:?} was given. If nothing was applied yet (a peer's first round), replay from the run's start instead (`--from-window genesis` with the run's initial model: momentum starts at zero); otherwise give the state the previous replay wrote (`--optimizer-state PATH`, or a pulled checkpoint's)"
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
) -> Result<Fetched, RoundError> {
    let until = wait.map(|d| tokio::time::Instant::now() + d);
    loop {
        match fetch_aggregate(reg, s3, w).await {
            Err(RoundError::NoAggregate { .. })
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
    outer: crate::round::outer::Outer,
    lr: f32,
}

impl Step {
    /// Applies merged tensor `a` to `dst`, with `name`'s momentum buffer (zeros when new).
    fn apply(&self, state: &mut OuterState, name: &str, dst: &mut [f32], a: &[f32]) {
        if !self.outer.optimizer.keeps_momentum() {
            return crate::round::outer::step(&self.outer, self.lr, dst, a, &mut []);
        }
        let m = state
            .momentum
            .entry(name.to_string())
            .or_insert_with(|| vec![0f32; dst.len()]);
        crate::round::outer::step(&self.outer, self.lr, dst, a, m);
    }
}

/// Which of the run's tensors a replay's parameters must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every model tensor, with its shape; other tensors of the base travel along untouched
    /// (a whole base file: the CLI's `apply`).
    All,
    /// Only model tensors, any of them (one rank's share: the Python package's `apply`).
    Subset,
}

/// Refuses parameters that are not the run's model (`model_mismatch`), before anything is
/// fetched, naming the tensor: for [`Coverage::All`] a model tensor missing or of another
/// shape; for [`Coverage::Subset`] a tensor the model does not have, or of another shape.
/// The one check both faces run.
pub fn check_params<'a>(
    reg: &Registry,
    params: impl IntoIterator<Item = (&'a str, &'a [u64])>,
    coverage: Coverage,
) -> Result<(), RoundError> {
    let refused = |detail: String| RoundError::Refused {
        reason: RoundReason::ModelMismatch,
        detail,
    };
    let params: BTreeMap<&str, &[u64]> = params.into_iter().collect();
    match coverage {
        Coverage::All => {
            for t in &reg.model.tensors {
                match params.get(t.name.as_str()) {
                    Some(shape) if *shape == t.shape.as_slice() => {}
                    got => {
                        return Err(refused(format!(
                            "tensor {:?} {:?} of run {}'s model is {}",
                            t.name,
                            t.shape,
                            reg.run,
                            got.map_or("missing".to_string(), |s| format!("{s:?} here"))
                        )));
                    }
                }
            }
        }
        Coverage::Subset => {
            for (name, shape) in params {
                match reg.model.get(name) {
                    Some(t) if t.shape == shape => {}
                    Some(t) => {
                        return Err(refused(format!(
                            "tensor {name:?} is {shape:?}; run {}'s model has it as {:?}",
                            reg.run, t.shape
                        )));
                    }
                    None => {
                        return Err(refused(format!(
                            "tensor {name:?} {shape:?} is not in run {}'s model",
                            reg.run
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Refuses an outer-optimizer state that does not go with a replay from window `first`
/// (`optimizer_state_window`): the state must be of this run and after window `first − 1`
/// (after nothing, "genesis", for `first` = 0). `state_run` `None` is a fresh state (no
/// momentum yet), which fits any start.
pub fn check_state_window(
    reg: &Registry,
    state_run: Option<&str>,
    state_after: Option<u64>,
    first: u64,
) -> Result<(), RoundError> {
    let Some(run) = state_run else {
        return Ok(());
    };
    let expected = first.checked_sub(1);
    if run == reg.run && state_after == expected {
        return Ok(());
    }
    let name = |w: Option<u64>| w.map_or("genesis".to_string(), |w| format!("window {w}"));
    Err(RoundError::Refused {
        reason: RoundReason::OptimizerStateWindow,
        detail: format!(
            "the optimizer state is run {run:?}'s after {}; this replay starts at window {first} of run {:?} (it needs the state after {})",
            name(state_after),
            reg.run,
            name(expected)
        ),
    })
}

fn size_checked<T: Tensor>(
    reg: &Registry,
    w: u64,
    theta: &BTreeMap<String, T>,
    name: &str,
) -> Result<(), RoundError> {
    let ok = theta.get(name).is_some_and(|d| {
        reg.model.get(name).map(|s| s.shape.iter().product::<u64>())
            == Some(d.as_ref().len() as u64)
    });
    match ok {
        true => Ok(()),
        false => Err(RoundError::Caller(format!(
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
) -> Result<(), RoundError> {
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
) -> Result<(), RoundError> {
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
