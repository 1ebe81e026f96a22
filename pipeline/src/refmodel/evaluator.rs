//! The validator's [`Evaluator`] on the reference task: θ_w rebuilt by replaying the run's
//! aggregates, and each miner's update judged by the loss on the window's batch.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{LinearTask, TENSOR};
use crate::format::codec::Dense;
use crate::round::RoundError;
use crate::round::evaluate::{EvalError, Evaluator, Losses};
use crate::round::outer::OuterState;
use crate::round::registry::Registry;
use crate::round::replay::{ApplyOptions, apply_aggregates_opts};
use crate::store::S3Options;

/// The built-in evaluator on the reference task.
pub struct ReferenceEvaluator {
    task: LinearTask,
    theta: Vec<f32>,
    /// The outer optimizer's momentum that goes with `theta`.
    outer: OuterState,
    /// The last window whose aggregate is in `theta` (`None`: the initial parameters).
    through: Option<u64>,
    /// How long to wait for a missing aggregate of `w − 1` (the aggregator may still be
    /// merging it when the validator starts on `w`).
    wait: Duration,
}

impl ReferenceEvaluator {
    /// An evaluator on `task` that waits up to `wait` for an aggregate it needs to rebuild θ_w.
    pub fn new(task: LinearTask, wait: Duration) -> ReferenceEvaluator {
        let theta = task.init();
        ReferenceEvaluator {
            task,
            theta,
            outer: OuterState::default(),
            through: None,
            wait,
        }
    }

    /// θ_w as prepared (for tests and the demo's cross-checks).
    pub fn theta(&self) -> &[f32] {
        &self.theta
    }
}

#[async_trait::async_trait]
impl Evaluator for ReferenceEvaluator {
    fn name(&self) -> String {
        format!(
            "reference linear {}x{} (eval batch of 64 per window)",
            self.task.d_out, self.task.d_in
        )
    }

    async fn prepare(&mut self, reg: &Registry, s3: &S3Options, w: u64) -> Result<(), EvalError> {
        if !self.task.matches(&reg.model) {
            return Err(EvalError::Unsupported(format!(
                "the run's model is not the reference model ({TENSOR} {}x{})",
                self.task.d_out, self.task.d_in
            )));
        }
        let Some(target) = w.checked_sub(1) else {
            self.theta = self.task.init();
            self.outer = OuterState::default();
            self.through = None;
            return Ok(());
        };
        if self.through.is_some_and(|t| t > target) {
            self.theta = self.task.init();
            self.outer = OuterState::default();
            self.through = None;
        }
        let start = std::time::Instant::now();
        let mut theta: BTreeMap<String, Vec<f32>> =
            [(TENSOR.to_string(), std::mem::take(&mut self.theta))].into();
        let mut next = self.through.map_or(0, |t| t + 1);
        let result = loop {
            if next > target {
                break Ok(());
            }
            let opts = ApplyOptions::default();
            let outer = &mut self.outer;
            match apply_aggregates_opts(reg, s3, &mut theta, outer, next, next, &opts).await {
                Ok(_) => {
                    self.through = Some(next);
                    next += 1;
                }
                Err(RoundError::NoAggregate { .. }) if start.elapsed() < self.wait => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    break Err(EvalError::Model(format!(
                        "cannot rebuild the model of window {w}: {e}"
                    )));
                }
            }
        };
        self.theta = theta.remove(TENSOR).unwrap_or_default();
        if result.is_err() {
            // A partial replay is not θ_w; start over next time.
            self.theta = self.task.init();
            self.outer = OuterState::default();
            self.through = None;
        }
        result
    }

    async fn evaluate(
        &mut self,
        _reg: &Registry,
        w: u64,
        _peer: &str,
        update: &Dense,
        scale: f32,
    ) -> Result<Losses, EvalError> {
        let (_, u) = update
            .get(TENSOR)
            .ok_or_else(|| EvalError::Failed(format!("the update has no {TENSOR}")))?;
        if u.len() != self.theta.len() {
            return Err(EvalError::Failed(format!(
                "{TENSOR} has {} values, not {}",
                u.len(),
                self.theta.len()
            )));
        }
        let batch = self.task.eval_batch(w);
        // The same arithmetic as applying an aggregate: θ − (scale · u), two roundings.
        let after: Vec<f32> = self
            .theta
            .iter()
            .zip(u)
            .map(|(t, v)| t - scale * v)
            .collect();
        Ok(Losses {
            loss_before: self.task.loss(&self.theta, &batch),
            loss_after: self.task.loss(&after, &batch),
        })
    }
}
