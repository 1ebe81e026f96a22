//! A validator in the training process: the library's `validate_window` (the checks, copy
//! detection, agreement, ratings, Parquet table and signed weights `shardrop validate`
//! publishes) with usefulness measured by a Python callable on the caller's own model,
//! instead of a subprocess per miner.

use std::path::PathBuf;

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use shardrop::codec::Dense;
use shardrop::evaluate::{EvalError, Evaluator, Losses};
use shardrop::identity::{Identity, PeerId};
use shardrop::registry::{Job, Registry};
use shardrop::score::{ValidateOptions, validate_window};
use shardrop::store::S3Options;

use crate::errors::{caller, io, to_py};
use crate::runtime::block_fn;

/// A validator of a run, signing with its key.
#[pyclass(module = "shardrop._shardrop")]
pub struct Validator {
    pub url: String,
    pub s3: S3Options,
    pub operator: PeerId,
    pub id: Identity,
}

impl Validator {
    pub fn open(url: String, s3: S3Options, operator: PeerId, key: PathBuf) -> PyResult<Self> {
        let id = Identity::load(&key).map_err(|e| io(&key, e))?;
        Ok(Validator {
            url,
            s3,
            operator,
            id,
        })
    }
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
            let d = PyDict::new(py);
            for (name, (shape, v)) in update {
                let dims: Vec<usize> = shape.iter().map(|&s| s as usize).collect();
                d.set_item(name, PyArray1::from_slice(py, v).reshape(dims)?)?;
            }
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
    #[pyo3(signature = (window, evaluate=None, prepare=None, name="python", concurrency=16))]
    fn validate<'py>(
        &self,
        py: Python<'py>,
        window: u64,
        evaluate: Option<Py<PyAny>>,
        prepare: Option<Py<PyAny>>,
        name: &str,
        concurrency: usize,
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

    fn __repr__(&self) -> String {
        format!("Validator(peer={})", self.id.peer_id())
    }
}
