//! Publishing a miner's shard: encode with error feedback, commit, wait, put; idempotent
//! with the error-feedback state. The run's codec header and the content hash that commits
//! and the duplicate rule compare live here too. Readers' checks are in [`crate::round::verdict`].

use crate::round::RoundReason;
use std::collections::BTreeMap;

use crate::format::codec::{
    self, EfState, EncodeOptions, EncodedUpdate, ModelSpec, OwnedShapeInput, SECTION_CODEC,
    model_of, model_of_inputs,
};
use crate::format::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, Limits, RemoteEnvelope,
};
use crate::format::layout;
use crate::identity::{Identity, PeerId};
use crate::round::RoundError;
use crate::round::registry::{Job, Registry, Role};
use crate::round::window::{RunClock, store_now_ms};
use crate::store::{self, PutOutcome, StoreError, Target};

/// The run's codec parameters as envelope header parameters.
pub fn codec_header(reg: &Registry) -> BTreeMap<String, String> {
    let c = &reg.codec;
    [
        ("chunk", c.chunk.to_string()),
        ("k", c.k.to_string()),
        ("values", c.values.name().to_string()),
        ("scales", c.scales.name().to_string()),
        ("indices", c.indices.name().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The codec a shard's header names (the inverse of `codec_header`), if it names one.
pub fn codec_of_header(p: &BTreeMap<String, String>) -> Option<codec::CodecParams> {
    Some(codec::CodecParams {
        chunk: p.get("chunk")?.parse().ok()?,
        k: p.get("k")?.parse().ok()?,
        values: codec::ValueFormat::parse(p.get("values")?)?,
        scales: codec::ScaleMode::parse(p.get("scales")?)?,
        indices: codec::IndexEncoding::parse(p.get("indices")?)?,
    })
}

/// A `grad` envelope for `run`/`w` with the run's codec header and these section payloads
/// (zstd); the caller may set the clock, then signs. The one place a shard's shape is built.
pub fn shard_builder(
    reg: &Registry,
    run: &str,
    w: u64,
    sections: &[(String, Vec<u8>)],
) -> Result<EnvelopeBuilder, EnvelopeError> {
    let mut b = EnvelopeBuilder::new(Kind::Grad, run)
        .window(w)
        .codec(SECTION_CODEC, codec_header(reg));
    for (name, payload) in sections {
        b = b.section(name, payload, Compression::Zstd)?;
    }
    Ok(b)
}

/// How the run encodes window `w`: its codec, that window's error-feedback decay, and the
/// section size every encoder packs by.
pub fn encode_options(reg: &Registry, w: u64) -> EncodeOptions {
    EncodeOptions {
        params: reg.codec,
        beta: reg.setting_at(w).beta,
        section_bytes: reg.section_bytes as usize,
    }
}

/// The run's clock, from its registry.
pub fn clock(reg: &Registry) -> RunClock {
    RunClock::new(reg.genesis_ms, reg.window_secs, reg.grace_secs)
}

/// What `publish` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Published {
    /// The shard's URL.
    pub object: String,
    /// The window it was published for.
    pub window: u64,
    /// Its stored size (from the store, after the put).
    pub bytes: u64,
    /// The dense update's size, for the compression ratio.
    pub dense_bytes: u64,
    /// Values kept by top-k.
    pub kept: u64,
    /// `dense_bytes / bytes`.
    pub ratio: f64,
    /// The store's clock when the publish began, ms.
    pub store_time_ms: u64,
    /// When the shard landed by the store's clock, ms: what timeliness is judged on.
    pub last_modified_ms: u64,
    /// The same shard was already there (a retry after a lost response).
    pub already_published: bool,
}

/// What a miner publishes: its update in the form it holds it, with the error-feedback state
/// it is encoded against (the caller saves the state once `publish` returns).
pub enum Update<'a> {
    /// A safetensors file's bytes (`shardrop publish UPDATE`).
    Safetensors {
        /// The file's bytes.
        bytes: &'a [u8],
        /// The miner's error-feedback state.
        state: &'a mut EfState,
    },
    /// Tensors in memory, borrowed (a training loop's, through the Python package): no copy
    /// of the update and none of the state (the CPU codec encodes from the buffers read-only
    /// and advances them once the shard is stored).
    Tensors {
        /// The update's tensors, any order.
        tensors: &'a [OwnedShapeInput<'a>],
        /// The miner's error-feedback state.
        state: &'a mut EfState,
    },
    /// What a sharded miner's ranks encoded (`encode_rank_part`), one part per rank that
    /// holds any slice (`codec::assemble_parts` checks they cover the model exactly once).
    /// The ranks advanced their buffers as they encoded, so nothing here changes a state,
    /// and a missing window defaults to the parts' own.
    Parts(&'a [codec::EncodedPart]),
}

impl<'a> Update<'a> {
    /// A safetensors file's bytes with the state they are encoded against.
    pub fn file(bytes: &'a [u8], state: &'a mut EfState) -> Self {
        Update::Safetensors { bytes, state }
    }
}

/// A device's whole-update encoder (the GPU codec's), whose bytes and state are the CPU
/// codec's: `encode(update, state, options)`.
pub(crate) type DeviceEncoder<'a> = &'a mut (
            dyn FnMut(&[u8], &mut EfState, &EncodeOptions) -> Result<EncodedUpdate, RoundError>
                + Send
        );

/// How [`publish_opts`] publishes; the default is what [`publish`] does.
#[derive(Default)]
pub struct PublishOptions<'a> {
    /// Encode a [`Update::Safetensors`] update with this instead of the CPU codec (same
    /// bytes); refused for the other forms.
    pub encoder: Option<DeviceEncoder<'a>>,
}

/// Encodes `update` with the run's codec, signs it and puts it create-only into the miner's
/// own store for `window` (by default the window open now by the store's clock). Refuses a
/// window that has closed by the store's clock. The state advances only when the shard is
/// safely stored (the caller saves it then); a rerun with the state saved after the publish
/// reports the stored shard (`already_published`), and a retry with the state from before
/// finds its own shard stored and keeps the state this encoding left.
pub async fn publish(
    job: Job<'_>,
    window: Option<u64>,
    update: Update<'_>,
) -> Result<Published, RoundError> {
    publish_opts(job, window, update, PublishOptions::default()).await
}

/// [`publish`] as `opts` says.
pub async fn publish_opts(
    job: Job<'_>,
    window: Option<u64>,
    update: Update<'_>,
    opts: PublishOptions<'_>,
) -> Result<Published, RoundError> {
    match (update, opts.encoder) {
        (Update::Safetensors { bytes, state }, Some(device)) => {
            let model = model_of(bytes)?;
            let enc = TrialEncoder {
                encode: Some(|st: &mut EfState, o: &EncodeOptions| device(bytes, st, o)),
                trial: None,
            };
            publish_encoded(job, window, &model, state, enc).await
        }
        (Update::Safetensors { bytes, state }, None) => {
            let file = safetensors::SafeTensors::deserialize(bytes)
                .map_err(|e| codec::CodecError::Malformed(format!("update: {e}")))?;
            publish_tensors(job, window, &codec::inputs_of(&file)?, state).await
        }
        (Update::Tensors { tensors, state }, None) => {
            publish_tensors(job, window, tensors, state).await
        }
        (Update::Parts(parts), None) => publish_parts(job, window, parts).await,
        (_, Some(_)) => Err(RoundError::Caller(
            "a device encoder encodes a safetensors update only; publish tensors or parts with the CPU codec".into(),
        )),
    }
}

/// How `publish_encoded` encodes: against the state as it is, which must not change until the
/// shard is stored; then `advance` brings the state to what the encoding left.
pub(crate) trait UpdateEncoder {
    /// Encodes the update against `state`, leaving it unchanged.
    fn encode(
        &mut self,
        state: &EfState,
        opts: &EncodeOptions,
    ) -> Result<EncodedUpdate, RoundError>;
    /// Advances `state` as the last `encode` would have (called once the shard is stored).
    fn advance(self, state: &mut EfState, opts: &EncodeOptions) -> Result<(), RoundError>;
}

/// An encoder that advances a buffer in place (the file path's, the GPU's), run on a copy of
/// the whole state kept until the shard is stored: simple, at the cost of a second copy of
/// every buffer meanwhile.
struct TrialEncoder<F> {
    encode: Option<F>,
    trial: Option<EfState>,
}

impl<F> UpdateEncoder for TrialEncoder<F>
where
    F: FnOnce(&mut EfState, &EncodeOptions) -> Result<EncodedUpdate, RoundError>,
{
    fn encode(
        &mut self,
        state: &EfState,
        opts: &EncodeOptions,
    ) -> Result<EncodedUpdate, RoundError> {
        let encode = self
            .encode
            .take()
            .ok_or_else(|| RoundError::Internal("the update was already encoded once".into()))?;
        let mut trial = state.clone();
        let out = encode(&mut trial, opts)?;
        self.trial = Some(trial);
        Ok(out)
    }

    fn advance(self, state: &mut EfState, _: &EncodeOptions) -> Result<(), RoundError> {
        match self.trial {
            Some(t) => {
                *state = t;
                Ok(())
            }
            None => Err(RoundError::Internal(
                "the state was advanced before anything was encoded".into(),
            )),
        }
    }
}

/// The CPU path's encoder: the buffers read, never written, while encoding
/// (`codec::encode_tensor_from`), then advanced in place once the shard is stored
/// (`codec::advance_state`), so a publish holds no second copy of the error-feedback state
/// (36 GB per rank of a 72 B model on 8 GPUs).
struct ScratchEncoder<'a, 'b> {
    inputs: &'a [OwnedShapeInput<'b>],
    pending: Option<codec::Pending>,
}

impl UpdateEncoder for ScratchEncoder<'_, '_> {
    fn encode(
        &mut self,
        state: &EfState,
        opts: &EncodeOptions,
    ) -> Result<EncodedUpdate, RoundError> {
        let (out, pending) = codec::encode_inputs_scratch(self.inputs, state, opts)?;
        self.pending = Some(pending);
        Ok(out)
    }

    fn advance(self, state: &mut EfState, opts: &EncodeOptions) -> Result<(), RoundError> {
        let pending = self.pending.ok_or_else(|| {
            RoundError::Internal("the state was advanced before anything was encoded".into())
        })?;
        Ok(codec::advance_inputs(self.inputs, state, opts, pending)?)
    }
}

/// [`Update::Tensors`] (and a file's tensors, borrowed from its bytes) with the CPU codec.
async fn publish_tensors(
    job: Job<'_>,
    window: Option<u64>,
    inputs: &[OwnedShapeInput<'_>],
    state: &mut EfState,
) -> Result<Published, RoundError> {
    let model = model_of_inputs(inputs);
    let enc = ScratchEncoder {
        inputs,
        pending: None,
    };
    publish_encoded(job, window, &model, state, enc).await
}

/// An update its ranks already encoded (`codec::encode_part`, each rank advancing its own
/// slice buffers as it encoded): the publishing rank holds no error-feedback state for it.
struct AssembledEncoder {
    update: Option<EncodedUpdate>,
}

impl UpdateEncoder for AssembledEncoder {
    fn encode(&mut self, _: &EfState, _: &EncodeOptions) -> Result<EncodedUpdate, RoundError> {
        self.update
            .take()
            .ok_or_else(|| RoundError::Internal("the parts were already published once".into()))
    }

    fn advance(self, _: &mut EfState, _: &EncodeOptions) -> Result<(), RoundError> {
        Ok(())
    }
}

/// One rank of a sharded miner encodes its dimension-0 slices of window `w`'s update with
/// the run's codec (`codec::encode_part`), advancing its own slice buffers in place. A
/// state that already accounts for `w` or a later window is refused (`state_ahead`):
/// encoding the same update twice would count it twice. Keep the part's bytes until the
/// shard is stored: they are what a retry publishes.
pub fn encode_rank_part(
    reg: &Registry,
    w: u64,
    slices: &[codec::SliceInput],
    state: &mut EfState,
) -> Result<codec::EncodedPart, RoundError> {
    if let Some(done) = state.window.filter(|&d| d >= w) {
        return Err(RoundError::Refused {
            reason: RoundReason::StateAhead,
            detail: format!(
                "this rank's error-feedback state already accounts for window {done}; window {w}'s part was encoded before (publish the part kept from then)"
            ),
        });
    }
    let opts = encode_options(reg, w);
    Ok(codec::encode_part(slices, &reg.model, state, &opts, w)?)
}

/// A miner's (or one rank's) error-feedback state and where it persists: the buffers,
/// the folder they are saved in (locked against a second process for as long as this
/// lives), and the last part this rank encoded. The crash protocol of a sharded miner's
/// ranks (`gradient.md` §9) lives here, once: a part is written (fresh file, renamed) before
/// the state that accounts for it, so a rank killed in between re-encodes from the old state,
/// and one killed after finds its part; asking again for that window returns the same bytes.
pub struct MinerState {
    /// The error-feedback buffers.
    pub ef: EfState,
    dir: Option<std::path::PathBuf>,
    kept_part: Option<(u64, Vec<u8>)>,
    _lock: Option<codec::StateLock>,
}

/// Locks an error-feedback state folder for one publisher: held by another (another
/// process, or another miner in this one) is a `conflict`, not a disk failure a retry fixes;
/// the CLI and the Python package both lock through here, so both report it the same way.
pub fn lock_state(dir: &std::path::Path) -> Result<codec::StateLock, RoundError> {
    codec::lock_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => RoundError::Conflict {
            object: dir.display().to_string(),
            detail: e
                .to_string()
                .trim_start_matches(&format!("{}: ", dir.display()))
                .to_string(),
        },
        _ => RoundError::io(dir, e),
    })
}

impl MinerState {
    /// The file in a state folder holding the rank's last part.
    pub(crate) const PART_FILE: &'static str = "last-part.bin";

    /// The state saved in `dir` (locked now; empty buffers in a new folder), or a state in
    /// memory only.
    pub fn open(dir: Option<std::path::PathBuf>) -> Result<MinerState, RoundError> {
        let Some(dir) = dir else {
            return Ok(MinerState {
                ef: EfState::default(),
                dir: None,
                kept_part: None,
                _lock: None,
            });
        };
        let lock = lock_state(&dir)?;
        let ef = EfState::load(&dir).map_err(|e| RoundError::io(&dir, e))?;
        let path = dir.join(Self::PART_FILE);
        let kept_part = match std::fs::read(&path) {
            Ok(bytes) => {
                let part = codec::EncodedPart::from_bytes(&bytes, &codec::CodecLimits::default())
                    .map_err(|e| RoundError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
                (Some(part.window) == ef.window).then_some((part.window, bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(RoundError::io(&path, e)),
        };
        Ok(MinerState {
            ef,
            dir: Some(dir),
            kept_part,
            _lock: Some(lock),
        })
    }

    /// The part of window `w` this state already encoded (and accounts for), if kept: what
    /// a retry of `w` must hand on again, without reading anything.
    pub fn kept_part(&self, w: u64) -> Option<&[u8]> {
        match &self.kept_part {
            Some((kw, bytes)) if *kw == w && self.ef.window == Some(w) => Some(bytes),
            _ => None,
        }
    }

    /// The folder the state persists in, if any.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// Saves the buffers into `dir` (the state's own folder when `None`; nothing to do for
    /// a state in memory).
    pub fn save(&self, dir: Option<&std::path::Path>) -> Result<(), RoundError> {
        match dir.or(self.dir.as_deref()) {
            Some(d) => self.ef.save(d).map_err(|e| RoundError::io(d, e)),
            None => Ok(()),
        }
    }

    /// One rank's part of window `w` ([`encode_rank_part`]), kept and saved by the crash
    /// protocol above; the part of a window this state already encoded is returned again.
    /// The part is kept, not copied: a large rank's share of a shard is hundreds of MB.
    pub fn encode_part(
        &mut self,
        reg: &Registry,
        w: u64,
        slices: &[codec::SliceInput],
    ) -> Result<&[u8], RoundError> {
        if self.kept_part(w).is_some() {
            tracing::info!(
                window = w,
                "this window's part was encoded before: returning it"
            );
        } else {
            let bytes = encode_rank_part(reg, w, slices, &mut self.ef)?.to_bytes()?;
            if let Some(dir) = &self.dir {
                let path = dir.join(Self::PART_FILE);
                crate::files::write_replace_beside(&path, &bytes)
                    .map_err(|e| RoundError::io(&path, e))?;
                self.ef.save(dir).map_err(|e| RoundError::io(dir, e))?;
            }
            self.kept_part = Some((w, bytes));
        }
        self.kept_part(w).ok_or_else(|| {
            RoundError::Internal(format!("window {w}: the part just encoded is not kept"))
        })
    }
}

/// [`Update::Parts`]: the same bytes, checks and report as publishing the whole update.
async fn publish_parts(
    job: Job<'_>,
    window: Option<u64>,
    parts: &[codec::EncodedPart],
) -> Result<Published, RoundError> {
    let reg = job.reg;
    let w = window
        .or_else(|| parts.first().map(|p| p.window))
        .ok_or_else(|| RoundError::Codec(codec::CodecError::Parts("no parts to publish".into())))?;
    if let Some(p) = parts.iter().find(|p| p.window != w) {
        return Err(RoundError::Codec(codec::CodecError::Parts(format!(
            "a part was encoded for window {}, the shard is for window {w}",
            p.window
        ))));
    }
    let opts = encode_options(reg, w);
    let update = codec::assemble_parts(parts, &reg.model, &opts)?;
    let mut none = EfState::default();
    let enc = AssembledEncoder {
        update: Some(update),
    };
    publish_encoded(job, Some(w), &reg.model, &mut none, enc).await
}

/// The publish protocol for an update whose tensors `model` describes and that `encoder`
/// encodes: whatever holds the update, and whichever way its state is kept until the shard
/// is stored.
async fn publish_encoded(
    job: Job<'_>,
    window: Option<u64>,
    model: &ModelSpec,
    state: &mut EfState,
    mut encoder: impl UpdateEncoder,
) -> Result<Published, RoundError> {
    let Job { reg, id, .. } = job;
    let me = id.peer_id();
    let target = job.own_store(Role::Miner)?;
    let clk = clock(reg);
    let now = store_now_ms(&target, &layout::clock_probe(&reg.run, &me)).await?;
    let w = match window {
        Some(w) => w,
        None => clk.window_at(now).ok_or_else(|| RoundError::Refused {
            reason: RoundReason::WindowNotOpen,
            detail: format!("run {} has not started (store clock {now} ms)", reg.run),
        })?,
    };
    window_open(reg, w, now)?;
    let mismatch = |detail: String| RoundError::Refused {
        reason: RoundReason::ModelMismatch,
        detail,
    };
    for t in &model.tensors {
        match reg.model.get(&t.name) {
            Some(spec) if spec.shape == t.shape => {}
            Some(spec) => {
                return Err(mismatch(format!(
                    "update tensor {:?} has shape {:?}; the run's model has {:?}",
                    t.name, t.shape, spec.shape
                )));
            }
            None => {
                return Err(mismatch(format!(
                    "update tensor {:?} {:?} is not in the run's model",
                    t.name, t.shape
                )));
            }
        }
    }
    if let Some(t) = reg
        .model
        .tensors
        .iter()
        .find(|t| model.get(&t.name).is_none())
    {
        return Err(mismatch(format!(
            "the update lacks tensor {:?} {:?} of the run's model ({} of its {} tensors given)",
            t.name,
            t.shape,
            model.tensors.len(),
            reg.model.tensors.len()
        )));
    }
    if let Some(done) = state.window {
        if done == w {
            // This state already accounts for window w: a rerun after a publish that
            // finished (or was killed after saving). Encoding again would count the update
            // twice; report the stored shard instead.
            return already_published(reg, &target, &me, w, now).await;
        }
        if done > w {
            return Err(RoundError::Refused {
                reason: RoundReason::StateAhead,
                detail: format!(
                    "the error-feedback state already accounts for window {done}, later than {w}"
                ),
            });
        }
    }

    let opts = encode_options(reg, w);
    let encoded = encoder.encode(state, &opts)?;
    let builder = shard_builder(reg, &reg.run, w, &encoded.sections)?.clock_ms(now);
    let content = content_hash(builder.section_entries());
    let salt = commit_salt(id, &reg.run, w, &content);
    let signed = builder.meta(SALT_META, &salt).sign(id)?;
    let path = target.path(&layout::grad(&reg.run, w, &me));
    let object = target.url_of(&path);
    let limits = Limits::default();
    let expect = Expect {
        signer: Some(me),
        run: Some(reg.run.clone()),
        kind: Some(Kind::Grad),
        window: Some(w),
        step: None,
    };
    // Our shard may already be stored: a retry whose first attempt landed, or a rerun after
    // a kill between the put and the state save. The same state and update give the same
    // sections (only the signer's clock differs), and then this encoding's state is exactly
    // the one to keep.
    let stored = match RemoteEnvelope::open(target.store.as_ref(), &path, &object, &limits, &expect)
        .await
    {
        Ok(env) => Some(env),
        Err(EnvelopeError::NotFound { .. }) => None,
        Err(e) if e.rejection().is_some() => {
            return Err(RoundError::Conflict {
                object: object.to_string(),
                detail: format!("another object is already there ({e}); the state is unchanged"),
            });
        }
        Err(e) => return Err(e.into()),
    };
    // A stored shard of ours is this publish only if it holds exactly these sections.
    let same_shard =
        |env: &RemoteEnvelope, what: &str| match content_hash(env.sections().iter()) == content {
            true => Ok(true),
            false => Err(RoundError::Conflict {
                object: object.to_string(),
                detail: format!("a different shard for window {w} {what}; the state is unchanged"),
            }),
        };
    let already = match stored {
        Some(env) => same_shard(
            &env,
            "is already published (another update, or another error-feedback state)",
        )?,
        None => {
            let commitment = commitment(&me, &salt, &content);
            commit_then_wait(reg, &target, id, w, &commitment).await?;
            match store::put_create(&target, &path, &signed).await {
                Ok(PutOutcome::Created) => false,
                Ok(PutOutcome::AlreadyIdentical) => true,
                Err(StoreError::Conflict { .. }) => {
                    let env = RemoteEnvelope::open(
                        target.store.as_ref(),
                        &path,
                        &object,
                        &limits,
                        &expect,
                    )
                    .await?;
                    same_shard(&env, "landed meanwhile")?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let meta = object_store::ObjectStoreExt::head(target.store.as_ref(), &path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    encoder.advance(state, &opts)?;
    state.window = Some(w);
    Ok(Published {
        object,
        window: w,
        bytes: meta.size,
        dense_bytes: encoded.stats.dense_bytes,
        kept: encoded.stats.kept,
        ratio: encoded.stats.dense_bytes as f64 / meta.size.max(1) as f64,
        store_time_ms: now,
        last_modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
        already_published: already,
    })
}

/// Whether a shard for window `w` may be published at store time `now`: refused with
/// `window_closed` after its deadline and grace, `window_not_open` before it starts.
fn window_open(reg: &Registry, w: u64, now: u64) -> Result<(), RoundError> {
    let clk = clock(reg);
    // In windows and seconds, with the next step: epoch milliseconds say nothing to a reader.
    let open_now = clk
        .window_at(now)
        .map_or("the run has not started".to_string(), |n| {
            format!("window {n} is open now")
        });
    if now >= clk.closes(w) {
        return Err(RoundError::Refused {
            reason: RoundReason::WindowClosed,
            detail: format!(
                "window {w} closed {:.1} s ago (deadline + grace) by the store's clock; {open_now}: publish into it (leave out the window, or give --window with --wait for a later one)",
                (now - clk.closes(w)) as f64 / 1000.0
            ),
        });
    }
    if now < clk.start(w) {
        return Err(RoundError::Refused {
            reason: RoundReason::WindowNotOpen,
            detail: format!(
                "window {w} opens in {:.1} s by the store's clock ({open_now}); add --wait (Python: wait=True) to wait for it",
                (clk.start(w) - now) as f64 / 1000.0
            ),
        });
    }
    Ok(())
}

/// Waits, by the store's clock as the miner's own store reports it, until window `w` has
/// opened (`None`: until the run's first window has), so that a training loop whose rounds
/// are shorter than windows publishes each round into its own window. Returns the window.
/// A window that has already closed is refused (`window_closed`), never waited for.
pub async fn wait_for_window(job: Job<'_>, window: Option<u64>) -> Result<u64, RoundError> {
    let Job { reg, id, .. } = job;
    let me = id.peer_id();
    let target = job.own_store(Role::Miner)?;
    let clk = clock(reg);
    let probe = layout::clock_probe(&reg.run, &me);
    loop {
        let now = store_now_ms(&target, &probe).await?;
        let w = window.or_else(|| clk.window_at(now)).unwrap_or(0);
        if now >= clk.start(w) {
            window_open(reg, w, now)?;
            return Ok(w);
        }
        let left = clk.start(w) - now;
        tracing::info!(window = w, wait_ms = left, "waiting for the window to open");
        // Re-read the store's clock at least every 5 s: it is the clock that counts.
        tokio::time::sleep(std::time::Duration::from_millis(left.min(5000) + 5)).await;
    }
}

/// blake3 over the section hashes, in order: equal for byte-identical updates whoever
/// signed them (the key of the duplicate rule and of a shard's commit).
pub fn content_hash<'a>(
    sections: impl Iterator<Item = &'a crate::format::envelope::SectionEntry>,
) -> String {
    content_hash_of(sections.map(|s| &s.hash))
}

/// The content hash from the section hashes themselves (lowercase hex text, in table
/// order): blake3 over their concatenated text, not over the raw digests.
pub fn content_hash_of<'a>(hashes: impl Iterator<Item = &'a String>) -> String {
    let mut h = blake3::Hasher::new();
    for hash in hashes {
        h.update(hash.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Codec name of a shard's commit (`round.md`, "Commit, then shard"). v2 commits bind the
/// content without revealing it; a v1 commit (which named the content in clear) no longer
/// counts.
pub const COMMIT_CODEC: &str = "commit-v2";

/// The commit's signed metadata key holding the commitment.
pub const COMMITMENT_META: &str = "commitment";

/// The shard's signed metadata key revealing the commitment's salt.
pub const SALT_META: &str = "commit_salt";

/// The salt of a shard's commitment: the blake3 hash of the miner's ed25519 signature over
/// the run, window and content. Secret until the shard reveals it (only the key can make
/// it), and the same on every rerun of the same publish (the signature is deterministic), so
/// a rerun after a kill puts the same commit and shard.
pub(crate) fn commit_salt(id: &Identity, run: &str, w: u64, content: &str) -> String {
    let msg = format!("shardrop commit salt v1\n{run}\n{w}\n{content}");
    blake3::hash(&id.sign(msg.as_bytes())).to_hex().to_string()
}

/// The commitment a commit names: blake3 over the text `peer ‖ salt ‖ content` (each 64
/// lowercase hex characters), as lowercase hex. It reveals nothing of the content until the
/// shard shows the salt, and it names its signer, so a copier can neither commit to a
/// content it has not seen nor reuse another miner's commitment.
pub fn commitment(peer: &PeerId, salt: &str, content: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(peer.to_string().as_bytes());
    h.update(salt.as_bytes());
    h.update(content.as_bytes());
    h.finalize().to_hex().to_string()
}

/// Puts the signed commit naming the shard's commitment, then waits until the store's clock
/// is a whole second past the commit's own `last_modified`: whoever copies the shard after
/// it becomes visible commits in a later second, so the first publisher of any content is
/// decided by commit times even on stores that report whole seconds.
async fn commit_then_wait(
    reg: &Registry,
    target: &Target,
    id: &Identity,
    w: u64,
    commitment: &str,
) -> Result<(), RoundError> {
    let me = id.peer_id();
    let signed = EnvelopeBuilder::new(Kind::Blob, &reg.run)
        .window(w)
        .codec(COMMIT_CODEC, Default::default())
        .meta(COMMITMENT_META, commitment)
        .sign(id)?;
    let path = target.path(&layout::grad_commit(&reg.run, w, &me));
    let object = target.url_of(&path);
    let bytes = signed
        .to_vec()
        .map_err(|e| RoundError::Internal(format!("{object}: {e}")))?;
    // No shard is stored yet, so any commit already here is a stale one of ours: replace it.
    object_store::ObjectStoreExt::put(
        target.store.as_ref(),
        &path,
        object_store::PutPayload::from(bytes::Bytes::from(bytes)),
    )
    .await
    .map_err(|e| StoreError::from_store(&object, e))?;
    let committed = object_store::ObjectStoreExt::head(target.store.as_ref(), &path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?
        .last_modified
        .timestamp_millis()
        .max(0) as u64;
    let probe = layout::clock_probe(&reg.run, &me);
    let clk = clock(reg);
    loop {
        let now = store_now_ms(target, &probe).await?;
        if now >= clk.closes(w) {
            return Err(RoundError::Refused {
                reason: RoundReason::WindowClosed,
                detail: format!(
                    "window {w} closed at {} ms while committing (the store's clock says {now} ms)",
                    clk.closes(w)
                ),
            });
        }
        if now >= committed + 1000 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(committed + 1050 - now)).await;
    }
}

/// What a rerun reports for a window the state already accounts for: the stored shard.
async fn already_published(
    reg: &Registry,
    target: &Target,
    me: &PeerId,
    w: u64,
    now: u64,
) -> Result<Published, RoundError> {
    let path = target.path(&layout::grad(&reg.run, w, me));
    let object = target.url_of(&path);
    let meta = match object_store::ObjectStoreExt::head(target.store.as_ref(), &path).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(RoundError::Missing {
                object: object.to_string(),
                detail: format!(
                    "the error-feedback state says window {w} was published, but no shard is there"
                ),
            });
        }
        Err(e) => return Err(StoreError::from_store(&object, e).into()),
    };
    let dense_bytes: u64 = reg
        .model
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<u64>() * t.dtype.size() as u64)
        .sum();
    let kept: u64 = reg
        .model
        .tensors
        .iter()
        .map(|t| codec::ChunkLayout::new(t.shape.iter().product(), &reg.codec).kept())
        .sum();
    Ok(Published {
        object,
        window: w,
        bytes: meta.size,
        dense_bytes,
        kept,
        ratio: dense_bytes as f64 / meta.size.max(1) as f64,
        store_time_ms: now,
        last_modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
        already_published: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_header_round_trips_with_fixed_strings() {
        let mut reg = Registry::new(
            "r",
            &Identity::generate().peer_id(),
            0,
            60,
            10,
            codec::ModelSpec::default(),
            codec::CodecParams::default(),
        );
        let h = codec_header(&reg);
        // The signed strings, spelled out: a renamed variant must not change them.
        assert_eq!(h["scales"], "chunk");
        assert_eq!(h["indices"], "compact");
        assert_eq!(h["values"], "int2");
        assert_eq!(codec_of_header(&h), Some(reg.codec));
        reg.codec.scales = codec::ScaleMode::Tensor;
        reg.codec.indices = codec::IndexEncoding::Packed;
        assert_eq!(codec_of_header(&codec_header(&reg)), Some(reg.codec));
    }

    /// Every refusal of `publish` carries its reason code and the class that exits 3.
    #[tokio::test]
    async fn publish_refusals_carry_reason_codes() {
        use crate::error::{Classified, ErrorClass};
        let (op, miner) = (Identity::generate(), Identity::generate());
        let dense = |name: &str| {
            let mut d = codec::Dense::new();
            d.insert(name.to_string(), (vec![4096], vec![0.5f32; 4096]));
            codec::dense_to_safetensors(&d).unwrap()
        };
        let update = dense("w");
        let now = chrono::Utc::now().timestamp_millis() as u64;
        // Windows of 60 s; window 10 is open now.
        let mut reg = Registry::new(
            "codes",
            &op.peer_id(),
            now - 630_000,
            60,
            10,
            model_of(&update).unwrap(),
            codec::CodecParams::default(),
        );
        reg.participants
            .push(crate::round::registry::Participant::new(
                Role::Miner,
                &miner.peer_id(),
                "memory://publish-codes/miner".into(),
            ));
        let s3 = store::S3Options::default();
        let job = Job::new(&reg, &miner, &s3);
        let code = |r: Result<Published, RoundError>| match r {
            Err(e) if e.class() == ErrorClass::Refused => e.reason(),
            other => panic!("not a refusal: {other:?}"),
        };
        let fresh = || EfState::default();
        assert_eq!(
            code(publish(job, Some(3), Update::file(&update, &mut fresh())).await),
            Some("window_closed")
        );
        assert_eq!(
            code(publish(job, Some(1000), Update::file(&update, &mut fresh())).await),
            Some("window_not_open")
        );
        assert_eq!(
            code(publish(job, None, Update::file(&dense("x"), &mut fresh())).await),
            Some("model_mismatch")
        );
        let mut ahead = fresh();
        ahead.window = Some(50);
        assert_eq!(
            code(publish(job, None, Update::file(&update, &mut ahead)).await),
            Some("state_ahead")
        );
        let stranger = Identity::generate();
        assert_eq!(
            code(
                publish(
                    Job::new(&reg, &stranger, &s3),
                    None,
                    Update::file(&update, &mut fresh())
                )
                .await
            ),
            Some("not_registered")
        );
        // Waiting for a window that has already closed is refused, not waited for.
        assert_eq!(
            wait_for_window(job, Some(3))
                .await
                .err()
                .and_then(|e| e.reason()),
            Some("window_closed")
        );
    }
}
