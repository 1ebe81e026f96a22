//! Checkpoints from Python: push a folder or files, pull a verified one (tensor globs,
//! tensor-parallel slices) into a folder `safetensors.torch.load_file` reads, list a run's.

use std::path::PathBuf;

use pyo3::prelude::*;
use shardrop::checkpoint::admin::list;
use shardrop::checkpoint::pull::{PullOptions, locate, pull};
use shardrop::checkpoint::push::{PushOptions, push};
use shardrop::identity::{Identity, PeerId};
use shardrop::round::registry::{Job, Registry};
use shardrop::store::S3Options;

use crate::errors::{caller, to_py};
use crate::runtime::{block, block_fn};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ckpt_push, m)?)?;
    m.add_function(wrap_pyfunction!(ckpt_pull, m)?)?;
    m.add_function(wrap_pyfunction!(ckpt_ls, m)?)?;
    Ok(())
}

/// A progress callback for the library: bytes done so far go to `callback(n)` (with the
/// GIL taken for the call); a callback that raises is logged, never fatal.
fn progress(callback: Option<Py<PyAny>>) -> impl Fn(u64) + Sync {
    move |n| {
        if let Some(cb) = &callback {
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (n,)) {
                    tracing::warn!("checkpoint progress callback raised: {e}");
                }
            });
        }
    }
}

fn to_json<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text =
        serde_json::to_string(v).map_err(|e| caller(format!("cannot report the result: {e}")))?;
    py.import("json")?.call_method1("loads", (text,))
}

fn s3_of(endpoint: Option<String>, allow_http: Option<bool>) -> S3Options {
    S3Options {
        endpoint,
        allow_http,
        ..Default::default()
    }
}

/// See `shardrop.ckpt.push`.
#[pyfunction]
#[pyo3(signature = (registry_url, key_path, sources, step, window=None, shard_size=2u64 << 30, concurrency=4, progress_cb=None, endpoint=None, allow_http=None, any_model=false))]
#[allow(clippy::too_many_arguments)]
fn ckpt_push<'py>(
    py: Python<'py>,
    registry_url: String,
    key_path: PathBuf,
    sources: Vec<PathBuf>,
    step: u64,
    window: Option<u64>,
    shard_size: u64,
    concurrency: usize,
    progress_cb: Option<Py<PyAny>>,
    endpoint: Option<String>,
    allow_http: Option<bool>,
    any_model: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let s3 = s3_of(endpoint, allow_http);
    let id = Identity::load(&key_path).map_err(to_py)?;
    let opts = PushOptions {
        step,
        window,
        shard_size,
        concurrency,
        any_model,
    };
    let report = progress(progress_cb);
    let pushed = block_fn(py, || async {
        let (reg, _) = Registry::load(&registry_url, &s3, None).await?;
        push(Job::new(&reg, &id, &s3), &sources, &opts, &report).await
    })?
    .map_err(to_py)?;
    to_json(py, &pushed)
}

/// See `shardrop.ckpt.pull`.
#[pyfunction]
#[pyo3(signature = (what, out, registry_url=None, signer=None, tensors=Vec::new(), tp=None, concurrency=16, progress_cb=None, endpoint=None, allow_http=None, force=false, without_momentum=false))]
#[allow(clippy::too_many_arguments)]
fn ckpt_pull<'py>(
    py: Python<'py>,
    what: String,
    out: PathBuf,
    registry_url: Option<String>,
    signer: Option<String>,
    tensors: Vec<String>,
    tp: Option<(u64, u64)>,
    concurrency: usize,
    progress_cb: Option<Py<PyAny>>,
    endpoint: Option<String>,
    allow_http: Option<bool>,
    force: bool,
    without_momentum: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let s3 = s3_of(endpoint, allow_http);
    let signer = signer
        .map(|s| PeerId::parse(&s).map_err(|e| caller(format!("signer {s:?}: {e}"))))
        .transpose()?;
    if registry_url.is_none() && signer.is_none() {
        return Err(caller(
            "give registry_url (the signer is the run's aggregator) or signer",
        ));
    }
    let opts = PullOptions {
        tensors,
        tp,
        concurrency,
        force,
        without_momentum,
    };
    let report = progress(progress_cb);
    let pulled = block_fn(py, || async {
        let reg = match &registry_url {
            Some(url) => Some(Registry::load(url, &s3, None).await?.0),
            None => None,
        };
        let loc = locate(&what, reg.as_ref(), signer, &s3).await?;
        pull(&loc, &out, &opts, &report).await
    })?
    .map_err(to_py)?;
    to_json(py, &pulled)
}

/// See `shardrop.ckpt.ls`.
#[pyfunction]
#[pyo3(signature = (registry_url, endpoint=None, allow_http=None))]
fn ckpt_ls<'py>(
    py: Python<'py>,
    registry_url: String,
    endpoint: Option<String>,
    allow_http: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let s3 = s3_of(endpoint, allow_http);
    let infos = block(py, async {
        let (reg, _) = Registry::load(&registry_url, &s3, None).await?;
        let (peer, target) = reg.aggregator(&s3)?;
        list(&target, &reg.run, &peer).await
    })?
    .map_err(to_py)?;
    to_json(py, &infos)
}
