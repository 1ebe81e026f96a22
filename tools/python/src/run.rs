//! `Run`, `Miner` and `OptimizerState`: a run opened from its registry, a miner publishing
//! from memory, and the outer optimizer's momentum a training loop keeps between windows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};
use shardrop::format::codec::{CodecLimits, EncodedPart, OwnedShapeInput, SliceInput};
use shardrop::identity::{Identity, PeerId};
use shardrop::round::RoundError;
use shardrop::round::publish::{MinerState, Update, publish, wait_for_window};
use shardrop::round::registry::{Job, Registry};
use shardrop::round::replay::{ApplyOptions, apply_aggregates_opts, wait_for_aggregate};
use shardrop::round::replay::{Coverage, check_params, check_state_window};
use shardrop::store::S3Options;

use crate::errors::{caller, io, to_py};
use crate::runtime::block;
use crate::tensors::{Access, import_all};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Run>()?;
    m.add_class::<Miner>()?;
    m.add_class::<OptimizerState>()?;
    m.add_class::<crate::validate::Validator>()?;
    m.add_class::<crate::validate::Shards>()?;
    m.add_class::<crate::validate::Shard>()?;
    Ok(())
}

/// A run, opened from its signed registry. Every call that acts on the run reads the
/// registry again (one small GET), so a setting the operator changed mid-run is in force,
/// and checks it is still signed by the operator it was first opened with.
#[pyclass(module = "shardrop._shardrop")]
pub struct Run {
    url: String,
    s3: S3Options,
    operator: PeerId,
    reg: Registry,
}

impl Run {
    /// The registry as it is now (and `self.reg` refreshed to it).
    fn reload(&mut self, py: Python<'_>) -> PyResult<Registry> {
        let (url, s3, op) = (&self.url, &self.s3, self.operator);
        let (reg, _) = block(py, Registry::load(url, s3, Some(op)))?.map_err(to_py)?;
        self.reg = reg.clone();
        Ok(reg)
    }

    /// Replays windows `first ..= last` onto `params` (f32 CPU tensors, in place).
    fn replay(
        &mut self,
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        first: u64,
        last: u64,
        state: Option<&mut OptimizerState>,
        wait: Option<f64>,
    ) -> PyResult<usize> {
        if first > last {
            return Ok(0);
        }
        let reg = self.reload(py)?;
        let mut held = import_all(params, Access::WriteF32)?;
        check_params(
            &reg,
            held.iter().map(|h| (h.name.as_str(), h.shape.as_slice())),
            Coverage::Subset,
        )
        .map_err(to_py)?;
        let mut fresh = OptimizerState::default();
        let st = state.unwrap_or(&mut fresh);
        check_state_window(&reg, st.run.as_deref(), st.after, first).map_err(to_py)?;
        let mut theta: BTreeMap<String, &mut [f32]> = held
            .iter_mut()
            .map(|h| (h.name.clone(), h.f32_mut()))
            .collect();
        let opts = ApplyOptions {
            cache: None,
            wait: wait.map(Duration::from_secs_f64),
        };
        let s3 = &self.s3;
        let momentum = &mut st.state;
        let applied = block(
            py,
            apply_aggregates_opts(&reg, s3, &mut theta, momentum, first, last, &opts),
        )?
        .map_err(to_py)?;
        st.run = Some(reg.run.clone());
        st.after = Some(last);
        st.shapes = reg
            .model
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        Ok(applied)
    }
}

#[pymethods]
impl Run {
    /// Opens the run whose registry is at `registry_url` (`file:///…`, `s3://bucket/…`),
    /// verifying its signature. `operator` pins the operator's peer id; without it the
    /// operator the registry names is trusted now and pinned for every later read.
    /// S3 settings fall back to the usual `AWS_*` variables.
    #[staticmethod]
    #[pyo3(signature = (registry_url, operator=None, *, endpoint=None, region=None, access_key_id=None, secret_access_key=None, allow_http=None))]
    #[allow(clippy::too_many_arguments)]
    fn open(
        py: Python<'_>,
        registry_url: String,
        operator: Option<String>,
        endpoint: Option<String>,
        region: Option<String>,
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        allow_http: Option<bool>,
    ) -> PyResult<Run> {
        let pinned = operator
            .map(|o| PeerId::parse(&o).map_err(|e| caller(format!("operator {o:?}: {e}"))))
            .transpose()?;
        let s3 = S3Options {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            allow_http,
            ..Default::default()
        };
        let (reg, _) = block(py, Registry::load(&registry_url, &s3, pinned))?.map_err(to_py)?;
        let operator = PeerId::parse(&reg.operator)
            .map_err(|e| caller(format!("{registry_url}: operator {:?}: {e}", reg.operator)))?;
        Ok(Run {
            url: registry_url,
            s3,
            operator,
            reg,
        })
    }

    /// The run's name.
    #[getter]
    fn name(&self) -> String {
        self.reg.run.clone()
    }

    /// The registry's URL.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// The operator's peer id (pinned).
    #[getter]
    fn operator(&self) -> String {
        self.operator.to_string()
    }

    /// The registry's revision when last read.
    #[getter]
    fn revision(&self) -> u64 {
        self.reg.revision
    }

    /// Window length in seconds.
    #[getter]
    fn window_secs(&self) -> u64 {
        self.reg.window_secs
    }

    /// Grace after a window's deadline, seconds.
    #[getter]
    fn grace_secs(&self) -> u64 {
        self.reg.grace_secs
    }

    /// When window 0 starts, ms since the epoch.
    #[getter]
    fn genesis_ms(&self) -> u64 {
        self.reg.genesis_ms
    }

    /// The model: tensor name → (shape, dtype of updates).
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for t in &self.reg.model.tensors {
            d.set_item(&t.name, (t.shape.clone(), t.dtype.name()))?;
        }
        Ok(d)
    }

    /// The window open now by this machine's clock (`None` before genesis). Publishing
    /// judges by the store's clock; `Miner.publish(wait=True)` waits by that one.
    fn window_now(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        shardrop::round::publish::clock(&self.reg).window_at(now)
    }

    /// The outer step in force for `window`, in words ("nesterov lr 0.7 momentum 0.9, …").
    fn setting_at(&self, window: u64) -> String {
        self.reg.setting_at(window).describe()
    }

    /// The outer learning rate applied in `window` (the schedule evaluated).
    fn lr_at(&self, window: u64) -> f32 {
        self.reg.setting_at(window).lr_at(window)
    }

    /// Reads the registry again now (settings, participants); returns its revision.
    fn refresh(&mut self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.reload(py)?.revision)
    }

    /// A miner of this run signing with the key at `key_path`. `state` is a folder where the
    /// error-feedback buffers persist (loaded now, locked against a second publisher, saved
    /// after every publish); without it they live in memory only. `device` is "cpu": CUDA
    /// tensors are refused (see the README). A rank of a sharded miner that only encodes its
    /// slices (`encode_part`) needs no key: only the rank that publishes signs.
    #[pyo3(signature = (key_path=None, state=None, device="cpu"))]
    fn miner(
        &self,
        key_path: Option<PathBuf>,
        state: Option<PathBuf>,
        device: &str,
    ) -> PyResult<Miner> {
        if device != "cpu" {
            return Err(caller(format!(
                "device {device:?}: this package encodes on the CPU only for now (the GPU codec does not yet take device memory from Python); use device=\"cpu\" with CPU tensors"
            )));
        }
        let id = key_path
            .map(|k| Identity::load(&k).map_err(to_py))
            .transpose()?;
        let state = MinerState::open(state).map_err(to_py)?;
        Ok(Miner {
            url: self.url.clone(),
            s3: self.s3.clone(),
            operator: self.operator,
            id,
            state,
        })
    }

    /// The run's validator signing with the key at `key_path` (see `Validator.validate`).
    fn validator(&self, key_path: PathBuf) -> PyResult<crate::validate::Validator> {
        crate::validate::Validator::open(self.url.clone(), self.s3.clone(), self.operator, key_path)
    }

    /// Waits up to `timeout` seconds (None: checks once) for window `window`'s aggregate,
    /// verified. True when it is there; False when it is not (yet). A broken or forged
    /// aggregate raises `Rejected`.
    #[pyo3(signature = (window, timeout=None))]
    fn wait_aggregate(
        &mut self,
        py: Python<'_>,
        window: u64,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let reg = self.reload(py)?;
        let wait = timeout.map(Duration::from_secs_f64);
        match block(py, wait_for_aggregate(&reg, &self.s3, window, wait))? {
            Ok(_) => Ok(true),
            Err(RoundError::NoAggregate { .. }) => Ok(false),
            Err(e) => Err(to_py(e)),
        }
    }

    /// Applies window `window`'s aggregate to `params` in place (a mapping of name to f32
    /// CPU tensor: all the model's tensors, or one rank's subset, whose sections alone are
    /// fetched) with the run's outer optimizer. `optimizer_state` carries the momentum from
    /// window to window (required once the run keeps momentum). `wait`: seconds to wait for
    /// the aggregate. Bit-identical to `shardrop apply`.
    #[pyo3(signature = (params, window, optimizer_state=None, wait=None))]
    fn apply_(
        &mut self,
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        window: u64,
        mut optimizer_state: Option<PyRefMut<'_, OptimizerState>>,
        wait: Option<f64>,
    ) -> PyResult<()> {
        let st = optimizer_state.as_deref_mut();
        self.replay(py, params, window, window, st, wait)?;
        Ok(())
    }

    /// Replays every window after `from_window` (the last one `params` already holds, as
    /// `shardrop apply --from-window`; "genesis" for none) through `through`, in place.
    /// Returns the number of windows applied.
    #[pyo3(signature = (params, from_window, through, optimizer_state=None, wait=None))]
    fn catch_up(
        &mut self,
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        from_window: &Bound<'_, PyAny>,
        through: u64,
        mut optimizer_state: Option<PyRefMut<'_, OptimizerState>>,
        wait: Option<f64>,
    ) -> PyResult<usize> {
        let first = match from_window.extract::<String>() {
            Ok(s) if s == "genesis" => 0,
            Ok(s) => {
                return Err(caller(format!(
                    "from_window {s:?}: a window number or \"genesis\""
                )));
            }
            Err(_) => from_window.extract::<u64>()? + 1,
        };
        let st = optimizer_state.as_deref_mut();
        self.replay(py, params, first, through, st, wait)
    }

    fn __repr__(&self) -> String {
        format!(
            "Run('{}', run='{}', revision={}, tensors={})",
            self.url,
            self.reg.run,
            self.reg.revision,
            self.reg.model.tensors.len()
        )
    }
}

/// A miner: signs with its key, keeps its error-feedback buffers, publishes one shard per
/// window from tensors in memory.
#[pyclass(module = "shardrop._shardrop")]
pub struct Miner {
    url: String,
    s3: S3Options,
    operator: PeerId,
    id: Option<Identity>,
    /// The error-feedback state, its folder and the last part (the library's protocol).
    state: MinerState,
}

/// The miner's key, which publishing needs.
fn key(id: &Option<Identity>) -> PyResult<&Identity> {
    id.as_ref().ok_or_else(|| {
        caller("this miner was opened without a key: only the rank that publishes needs one (run.miner(key_path, ...))")
    })
}

/// What a publish reports, as Python objects (`shardrop publish --json`'s document).
fn report<'py>(
    py: Python<'py>,
    p: &shardrop::round::publish::Published,
    started: std::time::Instant,
) -> PyResult<Bound<'py, PyAny>> {
    let mut json =
        serde_json::to_value(p).map_err(|e| caller(format!("cannot report the publish: {e}")))?;
    json["seconds"] = started.elapsed().as_secs_f64().into();
    json["device"] = "cpu".into();
    py.import("json")?
        .call_method1("loads", (json.to_string(),))
}

#[pymethods]
impl Miner {
    /// The miner's peer id (None for a rank opened without a key).
    #[getter]
    fn peer(&self) -> Option<String> {
        self.id.as_ref().map(|id| id.peer_id().to_string())
    }

    /// The last window the error-feedback state accounts for (None before the first).
    #[getter]
    fn state_window(&self) -> Option<u64> {
        self.state.ef.window
    }

    /// The state folder, if the state persists.
    #[getter]
    fn state_dir(&self) -> Option<PathBuf> {
        self.state.dir().map(PathBuf::from)
    }

    /// Encodes `update` (a mapping of name to CPU tensor, f32, bf16 or f16: the whole model,
    /// θ_start − θ_end) with the run's codec, signs it and puts it into the miner's own store
    /// for `window` (None: the window open now by the store's clock). `wait=True` first waits
    /// for that window to open, as `shardrop publish --wait`. The tensors are read in place.
    /// The error-feedback state advances only once the shard is stored (and is saved to the
    /// state folder then). Returns what `shardrop publish --json` reports.
    #[pyo3(signature = (update, window=None, wait=false))]
    fn publish<'py>(
        &mut self,
        py: Python<'py>,
        update: &Bound<'py, PyAny>,
        window: Option<u64>,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (reg, _) =
            block(py, Registry::load(&self.url, &self.s3, Some(self.operator)))?.map_err(to_py)?;
        let held = import_all(update, Access::Read)?;
        let inputs: Vec<OwnedShapeInput> = held.iter().map(|h| h.input()).collect();
        let started = std::time::Instant::now();
        let (id, s3, state) = (key(&self.id)?, &self.s3, &mut self.state.ef);
        let before = state.window;
        let res = block(py, async {
            let w = match wait {
                true => Some(wait_for_window(Job::new(&reg, id, s3), window).await?),
                false => window,
            };
            publish(
                Job::new(&reg, id, s3),
                w,
                Update::Tensors {
                    tensors: &inputs,
                    state,
                },
            )
            .await
        })?;
        let p = res.map_err(to_py)?;
        if self.state.ef.window != before {
            let st = &self.state;
            py.detach(|| st.save(None)).map_err(to_py)?;
        }
        report(py, &p, started)
    }

    /// One rank of a sharded miner (parameters split by dimension-0 slices over ranks,
    /// FSDP2 style): encodes this rank's slices of window `window`'s update with the run's
    /// codec and returns the part (bytes) to hand to the publishing rank, which passes every
    /// rank's part to `publish_parts`. `update` maps names to this rank's slices (CPU
    /// tensors, f32, bf16 or f16); `rows[name]` is the first row of that slice in the whole
    /// tensor (`shardrop.dim0_rows` gives FSDP2's split); a tensor not in `rows` is given
    /// whole. Slices must start on a multiple of the run's chunk (and end on one, or at the
    /// tensor's end): others are refused (`slice_misaligned`) with the rows that would work.
    /// The rank's error-feedback buffers (its slices') advance now; the part is kept (and
    /// saved in the state folder), and asking again for the same window returns it.
    #[pyo3(signature = (update, window, rows=None))]
    fn encode_part<'py>(
        &mut self,
        py: Python<'py>,
        update: &Bound<'py, PyAny>,
        window: u64,
        rows: Option<BTreeMap<String, u64>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if let Some(bytes) = self.state.kept_part(window) {
            return Ok(PyBytes::new(py, bytes));
        }
        let (reg, _) =
            block(py, Registry::load(&self.url, &self.s3, Some(self.operator)))?.map_err(to_py)?;
        let held = import_all(update, Access::Read)?;
        let rows = rows.unwrap_or_default();
        if let Some(name) = rows.keys().find(|n| !held.iter().any(|h| &h.name == *n)) {
            return Err(caller(format!(
                "rows names tensor {name:?}, which the update does not hold"
            )));
        }
        let slices: Vec<SliceInput> = held
            .iter()
            .map(|h| SliceInput {
                input: h.input(),
                row0: rows.get(&h.name).copied().unwrap_or(0),
            })
            .collect();
        let state = &mut self.state;
        let bytes = py
            .detach(|| state.encode_part(&reg, window, &slices))
            .map_err(to_py)?;
        Ok(PyBytes::new(py, bytes))
    }

    /// The publishing rank of a sharded miner: checks that `parts` (every rank's
    /// `encode_part` bytes, in any order) cover the run's model exactly once, joins them
    /// and signs and puts the one shard, byte-identical to what `publish` of the whole
    /// update would have stored. `window` defaults to the parts' own; `wait=True` first
    /// waits for it to open. Calling it again with the same parts after a failure is safe.
    /// Returns what `publish` returns.
    #[pyo3(signature = (parts, window=None, wait=false))]
    fn publish_parts<'py>(
        &mut self,
        py: Python<'py>,
        parts: Vec<PyBackedBytes>,
        window: Option<u64>,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let id = key(&self.id)?;
        let (reg, _) =
            block(py, Registry::load(&self.url, &self.s3, Some(self.operator)))?.map_err(to_py)?;
        let started = std::time::Instant::now();
        let decoded = py
            .detach(|| {
                parts
                    .iter()
                    .map(|b| EncodedPart::from_bytes(b, &CodecLimits::default()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(to_py)?;
        let s3 = &self.s3;
        let p = block(py, async {
            let w = match wait {
                true => Some(
                    wait_for_window(
                        Job::new(&reg, id, s3),
                        window.or(decoded.first().map(|p| p.window)),
                    )
                    .await?,
                ),
                false => window,
            };
            publish(Job::new(&reg, id, s3), w, Update::Parts(&decoded)).await
        })?
        .map_err(to_py)?;
        report(py, &p, started)
    }

    /// Writes the error-feedback state to the state folder now (publish does after every
    /// shard); `dir` writes it elsewhere instead.
    #[pyo3(signature = (dir=None))]
    fn save_state(&self, py: Python<'_>, dir: Option<PathBuf>) -> PyResult<()> {
        if dir.is_none() && self.state.dir().is_none() {
            return Err(caller(
                "this miner has no state folder: give dir, or open it with state=…",
            ));
        }
        py.detach(|| self.state.save(dir.as_deref())).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Miner(peer={}, state_window={})",
            self.id
                .as_ref()
                .map_or("None".to_string(), |id| format!("'{}'", id.peer_id())),
            crate::errors::py_repr(self.state.ef.window)
        )
    }
}

/// The outer optimizer's momentum buffers, which a peer keeps between windows like the
/// parameters themselves (and saves with its checkpoints). Empty for plain SGD.
#[pyclass(module = "shardrop._shardrop")]
#[derive(Default)]
pub struct OptimizerState {
    state: shardrop::round::outer::OuterState,
    run: Option<String>,
    after: Option<u64>,
    shapes: BTreeMap<String, Vec<u64>>,
}

#[pymethods]
impl OptimizerState {
    /// A fresh state (zero momentum): for a replay from genesis, or a run without momentum.
    #[new]
    fn new() -> Self {
        OptimizerState::default()
    }

    /// Reads a state file (`shardrop apply --optimizer-state`'s), or the momentum of a
    /// checkpoint folder `shardrop.ckpt.pull` wrote (its `momentum-*.safetensors`; the state
    /// after the checkpoint's window). A folder whose checkpoint holds no momentum gives a
    /// fresh state of that run and window.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<OptimizerState> {
        // One checked read: the shapes come from the same bytes as the buffers.
        let f = py
            .detach(|| {
                if path.is_dir() {
                    shardrop::checkpoint::read_momentum(&path, None)
                } else {
                    shardrop::round::outer::read_state_file(&path, None)
                }
            })
            .map_err(to_py)?;
        let (state, run, after, shapes) = (f.state, f.run, f.after, f.shapes);
        Ok(OptimizerState {
            state,
            run: Some(run),
            after,
            shapes,
        })
    }

    /// Writes the state file (the format `shardrop apply --optimizer-state` reads), atomically.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let Some(run) = &self.run else {
            return Err(caller(
                "this optimizer state has not been used by a replay yet: nothing to save",
            ));
        };
        let bytes = shardrop::round::outer::state_to_safetensors(
            &self.state,
            &self.shapes,
            run,
            self.after,
        )
        .map_err(to_py)?;
        py.detach(|| shardrop::files::write_replace_beside(&path, &bytes))
            .map_err(|e| io(&path, e))
    }

    /// The run it belongs to (None while fresh).
    #[getter]
    fn run(&self) -> Option<String> {
        self.run.clone()
    }

    /// The last window it accounts for (None while fresh).
    #[getter]
    fn after(&self) -> Option<u64> {
        self.after
    }

    /// The tensors that hold a buffer.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.state.momentum.keys().cloned().collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "OptimizerState(run={}, after={}, buffers={})",
            crate::errors::py_repr(self.run.as_ref().map(|r| format!("'{r}'"))),
            crate::errors::py_repr(self.after),
            self.state.momentum.len()
        )
    }
}
