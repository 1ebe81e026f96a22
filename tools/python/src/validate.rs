//! A validator in the training process: the library's `validate_window` (the checks, copy
//! detection, agreement, ratings, Parquet table and signed weights `shardrop validate`
//! publishes) with usefulness measured by a Python callable on the caller's own model,
//! instead of a subprocess per miner.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use shardrop::format::codec::Dense;
use shardrop::identity::{Identity, PeerId};
use shardrop::round::evaluate::{EvalError, Evaluator, Losses};
use shardrop::round::registry::{Job, Registry};
use shardrop::round::score::{
    JudgedWindow, OnEvalError, Usefulness, ValidateOptions, judge_window, publish_judged,
    validate_window,
};
use shardrop::store::S3Options;

use crate::errors::{caller, to_py};

/// `on_eval_error="refuse"|"carry"` (`shardrop validate --on-eval-error`).
fn on_eval_error_of(s: &str) -> PyResult<OnEvalError> {
    match s {
        "refuse" => Ok(OnEvalError::Refuse),
        "carry" => Ok(OnEvalError::Carry),
        other => Err(caller(format!(
            "on_eval_error={other:?}: use \"refuse\" (publish nothing when the evaluator fails for an eligible miner) or \"carry\""
        ))),
    }
}
use crate::runtime::{block, block_fn};

/// A validator of a run, signing with its key.
#[pyclass(module = "shardrop._shardrop")]
pub struct Validator {
    pub url: String,
    pub s3: S3Options,
    pub operator: PeerId,
    pub id: Identity,
    /// The last window `shards` judged: what `publish` scores without judging it again
    /// (a second pass over every shard, 28 GB at 20 miners of a 72 B model).
    judged: Option<Arc<JudgedWindow>>,
}

impl Validator {
    pub fn open(url: String, s3: S3Options, operator: PeerId, key: PathBuf) -> PyResult<Self> {
        let id = Identity::load(&key).map_err(to_py)?;
        Ok(Validator {
            url,
            s3,
            operator,
            id,
            judged: None,
        })
    }

    /// The registry, as it is now.
    fn registry(&self, py: Python<'_>) -> PyResult<Registry> {
        let (reg, _) =
            block(py, Registry::load(&self.url, &self.s3, Some(self.operator)))?.map_err(to_py)?;
        Ok(reg)
    }

    /// Window `w` judged: the one `shards` kept, or judged now.
    fn judged(
        &mut self,
        py: Python<'_>,
        reg: &Registry,
        w: u64,
        concurrency: usize,
    ) -> PyResult<Arc<JudgedWindow>> {
        if let Some(j) = self.judged.as_ref().filter(|j| j.window() == w) {
            return Ok(j.clone());
        }
        let opts = ValidateOptions {
            concurrency: concurrency.max(1),
            ..ValidateOptions::default()
        };
        let (id, s3) = (&self.id, &self.s3);
        let j = block_fn(py, || judge_window(Job::new(reg, id, s3), w, &opts))?.map_err(to_py)?;
        let j = Arc::new(j);
        self.judged = Some(j.clone());
        Ok(j)
    }
}

/// Dense tensors as a dict of numpy f32 arrays of their shapes.
fn dense_to_dict<'py>(py: Python<'py>, update: &Dense) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, (shape, v)) in update {
        let dims: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
        d.set_item(name, PyArray1::from_slice(py, v).reshape(dims)?)?;
    }
    Ok(d)
}

/// One registered miner of a judged window, as `Validator.shards` yields it.
#[pyclass(module = "shardrop._shardrop", get_all)]
pub struct Shard {
    /// The miner's peer id.
    peer: String,
    /// accepted, rejected, missing or error (its store could not be read).
    verdict: String,
    /// The stable reason code ("" when accepted as is).
    reason: String,
    /// A human detail naming the object.
    detail: String,
    /// Accepted but judged a copy: scored 0 whatever its usefulness.
    copier: bool,
    /// Accepted and not a copier: its usefulness counts.
    eligible: bool,
    /// The step its update contributes to the aggregate (outer_lr / eligible miners):
    /// measure the loss at θ − scale · update.
    scale: f32,
    /// The decoded update (name → numpy f32 array) of an accepted shard; None otherwise.
    update: Option<Py<PyDict>>,
    /// Why an accepted shard's update could not be read again (it changed since it was
    /// checked, or the window's time ran out); None otherwise.
    error: Option<String>,
}

#[pymethods]
impl Shard {
    fn __repr__(&self) -> String {
        format!(
            "Shard(peer='{}', verdict='{}', reason='{}', eligible={})",
            self.peer,
            self.verdict,
            self.reason,
            if self.eligible { "True" } else { "False" }
        )
    }
}

/// Every registered miner of a judged window, in peer-id order; iterating decodes one
/// accepted miner's update at a time.
#[pyclass(module = "shardrop._shardrop")]
pub struct Shards {
    judged: Arc<JudgedWindow>,
    reg: Registry,
    /// The step every eligible miner gets (one count of the eligible, not one per miner).
    scale: f32,
    next: usize,
}

#[pymethods]
impl Shards {
    /// The window.
    #[getter]
    fn window(&self) -> u64 {
        self.judged.window()
    }

    fn __len__(&self) -> usize {
        self.judged.len()
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Shard>> {
        let j = self.next;
        let Some(m) = self.judged.miner(j) else {
            return Ok(None);
        };
        self.next += 1;
        let accepted = m.verdict == shardrop::format::tables::Verdict::Accepted;
        let mut shard = Shard {
            peer: m.peer.to_string(),
            verdict: m.verdict.as_str().to_string(),
            reason: m.reason.to_string(),
            detail: m.detail.to_string(),
            copier: m.copier,
            eligible: m.eligible,
            scale: self.scale,
            update: None,
            error: None,
        };
        if accepted {
            let (judged, reg) = (&self.judged, &self.reg);
            match block_fn(py, || judged.decoded(reg, j))? {
                Ok(d) => shard.update = Some(dense_to_dict(py, &d)?.unbind()),
                Err(e) => shard.error = Some(e.to_string()),
            }
        }
        Ok(Some(shard))
    }

    fn __repr__(&self) -> String {
        format!(
            "Shards(window={}, miners={})",
            self.judged.window(),
            self.judged.len()
        )
    }
}

/// A usefulness value from Python: a number (the usefulness itself) or a pair
/// (loss_before, loss_after).
fn usefulness_of(peer: &str, v: &Bound<'_, PyAny>) -> PyResult<Usefulness> {
    let u = if let Ok((before, after)) = v.extract::<(f64, f64)>() {
        Usefulness::Losses(Losses {
            loss_before: before,
            loss_after: after,
        })
    } else if let Ok(g) = v.extract::<f64>() {
        Usefulness::Gain(g)
    } else {
        return Err(caller(format!(
            "usefulness of {peer}: a number or a (loss_before, loss_after) pair, not a {}",
            v.get_type().name()?
        )));
    };
    let finite = match u {
        Usefulness::Losses(l) => l.loss_before.is_finite() && l.loss_after.is_finite(),
        Usefulness::Gain(g) => g.is_finite(),
    };
    if !finite {
        return Err(caller(format!("usefulness of {peer} is not finite")));
    }
    Ok(u)
}

/// Calls `evaluate(peer, update, scale, window)` and `prepare(window)` in Python.
struct PyEvaluator {
    evaluate: Py<PyAny>,
    prepare: Option<Py<PyAny>>,
    name: String,
}

fn failed(e: PyErr) -> EvalError {
    EvalError::Failed(format!("the Python evaluator raised: {e}"))
}

#[async_trait::async_trait]
impl Evaluator for PyEvaluator {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn prepare(&mut self, _: &Registry, _: &S3Options, w: u64) -> Result<(), EvalError> {
        let Some(p) = &self.prepare else {
            return Ok(());
        };
        Python::attach(|py| p.call1(py, (w,)).map(|_| ()))
            .map_err(|e| EvalError::Model(format!("the Python prepare({w}) raised: {e}")))
    }

    async fn evaluate(
        &mut self,
        _: &Registry,
        w: u64,
        peer: &str,
        update: &Dense,
        scale: f32,
    ) -> Result<Losses, EvalError> {
        Python::attach(|py| {
            let d = dense_to_dict(py, update)?;
            let out = self.evaluate.call1(py, (peer, d, scale, w))?;
            let (before, after): (f64, f64) = out.extract(py)?;
            Ok(Losses {
                loss_before: before,
                loss_after: after,
            })
        })
        .map_err(failed)
    }
}

#[pymethods]
impl Validator {
    /// The validator's peer id.
    #[getter]
    fn peer(&self) -> String {
        self.id.peer_id().to_string()
    }

    /// Scores window `window` once it has closed (waiting for that by the store's clock) and
    /// publishes the Parquet score table and the signed weights, as `shardrop validate
    /// --window W` does. `evaluate(peer, update, scale, window) -> (loss_before,
    /// loss_after)` measures each accepted miner's usefulness on your own model: `update` is
    /// the miner's decoded update (name → numpy f32 array), `scale` the step it contributes
    /// to the aggregate (θ − scale·update). `prepare(window)` is called first, once, to bring
    /// your model to the window's parameters. Without `evaluate` no usefulness is measured
    /// (what the CLI does for a model it has no evaluator for). Returns the report with its
    /// rows.
    #[pyo3(signature = (window, evaluate=None, prepare=None, name="python", concurrency=16, on_eval_error="refuse"))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn validate<'py>(
        &self,
        py: Python<'py>,
        window: u64,
        evaluate: Option<Py<PyAny>>,
        prepare: Option<Py<PyAny>>,
        name: &str,
        concurrency: usize,
        on_eval_error: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        if evaluate.is_none() && prepare.is_some() {
            return Err(caller(
                "prepare without evaluate has nothing to prepare for",
            ));
        }
        let mut ev = evaluate.map(|evaluate| PyEvaluator {
            evaluate,
            prepare,
            name: name.to_string(),
        });
        let opts = ValidateOptions {
            concurrency: concurrency.max(1),
            on_eval_error: on_eval_error_of(on_eval_error)?,
            ..ValidateOptions::default()
        };
        let (url, s3, op, id) = (&self.url, &self.s3, self.operator, &self.id);
        let v = block_fn(py, || async {
            let (reg, _) = Registry::load(url, s3, Some(op)).await?;
            validate_window(
                Job::new(&reg, id, s3),
                window,
                ev.as_mut().map(|e| e as &mut dyn Evaluator),
                &opts,
            )
            .await
        })?
        .map_err(to_py)?;
        let text = serde_json::to_string(&v)
            .map_err(|e| caller(format!("cannot report the validation: {e}")))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Waits for window `window` to close by the store's clock, then checks every
    /// registered miner's shard as the aggregator does and judges copies and agreement.
    /// Returns the miners (peer-id order) to iterate: each `Shard` has the verdict and
    /// reason and, for accepted ones, the decoded update, decoded as the iteration reaches
    /// it (one model-sized update at a time). Measure what you like on your own model, then
    /// `publish(window, usefulness)`, which scores this judgement without reading the shards
    /// again.
    #[pyo3(signature = (window, concurrency=16))]
    fn shards(&mut self, py: Python<'_>, window: u64, concurrency: usize) -> PyResult<Shards> {
        let reg = self.registry(py)?;
        let judged = self.judged(py, &reg, window, concurrency)?;
        Ok(Shards {
            scale: judged.scale(&reg),
            judged,
            reg,
            next: 0,
        })
    }

    /// Scores window `window` (judged by `shards`, or now) and publishes the Parquet score
    /// table and the signed weights, as `shardrop validate` does. `usefulness` maps peer ids
    /// of eligible miners to what you measured: `(loss_before, loss_after)` (the table
    /// records both; the same values an `--eval-cmd` prints give the same table, byte for
    /// byte) or a number (the usefulness itself; the loss columns stay empty). An eligible
    /// miner left out is an evaluator error: by default (`on_eval_error="refuse"`) nothing
    /// is published and `Refused` (`eval_failed`) names it; with `"carry"` its row gets
    /// `eval_error` and keeps its rating and weight; values for miners that are not
    /// eligible are ignored (they score 0). Without `usefulness` the score is agreement, as
    /// `shardrop validate` without an evaluator. `name` is recorded in the weights as the
    /// evaluator. Returns the report with its rows.
    #[pyo3(signature = (window, usefulness=None, name="python", concurrency=16, on_eval_error="refuse"))]
    fn publish<'py>(
        &mut self,
        py: Python<'py>,
        window: u64,
        usefulness: Option<BTreeMap<String, Bound<'py, PyAny>>>,
        name: &str,
        concurrency: usize,
        on_eval_error: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let reg = self.registry(py)?;
        let judged = self.judged(py, &reg, window, concurrency)?;
        let miners: Vec<(String, bool)> = (0..judged.len())
            .filter_map(|j| judged.miner(j).map(|m| (m.peer.to_string(), m.eligible)))
            .collect();
        let measured = match &usefulness {
            None => vec![Err(EvalError::Failed(String::new())); judged.len()],
            Some(u) => {
                if let Some(p) = u.keys().find(|p| !miners.iter().any(|(m, _)| m == *p)) {
                    return Err(caller(format!(
                        "usefulness names {p}, which is not a miner of run {}",
                        reg.run
                    )));
                }
                let mut out = Vec::with_capacity(miners.len());
                for (p, eligible) in &miners {
                    out.push(match (u.get(p), eligible) {
                        (Some(v), true) => Ok(usefulness_of(p, v)?),
                        (None, true) => Err(EvalError::Failed(format!(
                            "no usefulness given for {p} in window {window}"
                        ))),
                        // Not measured: it scores 0 by the rules, whatever was given.
                        (_, false) => Err(EvalError::Failed(String::new())),
                    });
                }
                out
            }
        };
        let opts = ValidateOptions {
            concurrency: concurrency.max(1),
            on_eval_error: on_eval_error_of(on_eval_error)?,
            ..ValidateOptions::default()
        };
        let evaluator = usefulness.as_ref().map(|_| name.to_string());
        let (id, s3) = (&self.id, &self.s3);
        let v = block_fn(py, || {
            publish_judged(Job::new(&reg, id, s3), &judged, measured, evaluator, &opts)
        })?
        .map_err(to_py)?;
        let text = serde_json::to_string(&v)
            .map_err(|e| caller(format!("cannot report the validation: {e}")))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    fn __repr__(&self) -> String {
        format!("Validator(peer={})", self.id.peer_id())
    }
}
