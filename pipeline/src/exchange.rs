//! Publishing a miner's shard, and fetching + verifying one miner's shard with a verdict.
//!
//! Every check a reader makes ends in a stable reason code that goes into the ledger:
//! envelope reasons (`bad_signature`, `unexpected_signer`, `wrong_window`, `truncated`, …),
//! codec reasons (`index_out_of_range`, `non_finite`, `shape_mismatch`, …) and the round's
//! own: `late`, `early`, `over_limit`, `codec_mismatch`, `incomplete`, `duplicate`.

use std::collections::BTreeMap;

use crate::codec::{
    self, CodecLimits, EfState, EncodeOptions, EncodedTensor, SECTION_CODEC, encode_update,
    model_of,
};
use crate::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, Limits, RemoteEnvelope,
    read_all_sections,
};
use crate::identity::{Identity, PeerId};
use crate::layout;
use crate::registry::{Participant, Registry, Role};
use crate::store::{self, PutOutcome, S3Options, StoreError};
use crate::window::{RunClock, store_now_ms};

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("codec: {0}")]
    Codec(#[from] codec::CodecError),
}

/// The run's codec parameters as envelope header parameters.
pub fn codec_header(reg: &Registry) -> BTreeMap<String, String> {
    let c = &reg.codec;
    [
        ("chunk", c.chunk.to_string()),
        ("k", c.k.to_string()),
        ("values", c.values.name().to_string()),
        ("scales", format!("{:?}", c.scales).to_lowercase()),
        ("indices", format!("{:?}", c.indices).to_lowercase()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The store a participant writes to, after checking it is registered in that role.
pub fn own_store(
    reg: &Registry,
    id: &Identity,
    role: Role,
    s3: &S3Options,
) -> Result<crate::store::Target, ExchangeError> {
    let me = id.peer_id();
    let entry = reg.participant(&me, role).ok_or_else(|| {
        ExchangeError::Refused(format!(
            "{me} is not registered as a {} of run {}",
            format!("{role:?}").to_lowercase(),
            reg.run
        ))
    })?;
    Ok(reg.open_store(entry, s3)?)
}

pub fn clock(reg: &Registry) -> RunClock {
    RunClock::new(reg.genesis_ms, reg.window_secs, reg.grace_secs)
}

/// What `publish` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Published {
    pub object: String,
    pub window: u64,
    pub bytes: u64,
    pub dense_bytes: u64,
    pub kept: u64,
    pub ratio: f64,
    pub store_time_ms: u64,
    pub last_modified_ms: u64,
    /// The same shard was already there (a retry after a lost response).
    pub already_published: bool,
}

/// Encodes `update` with the run's codec, signs it and puts it create-only into the miner's
/// own store. Refuses a window that has closed by the store's clock. `state` advances only
/// when the shard is safely stored (the caller saves it then).
pub async fn publish(
    reg: &Registry,
    id: &Identity,
    s3: &S3Options,
    window: Option<u64>,
    update: &[u8],
    state: &mut EfState,
) -> Result<Published, ExchangeError> {
    let me = id.peer_id();
    let target = own_store(reg, id, Role::Miner, s3)?;
    let clk = clock(reg);
    let now = store_now_ms(&target, &format!("runs/{}/clock/{me}", reg.run)).await?;
    let w = match window {
        Some(w) => w,
        None => clk.window_at(now).ok_or_else(|| {
            ExchangeError::Refused(format!(
                "run {} has not started (store clock {now} ms)",
                reg.run
            ))
        })?,
    };
    if now >= clk.closes(w) {
        return Err(ExchangeError::Refused(format!(
            "window {w} closed at {} ms (deadline + grace); the store's clock says {now} ms",
            clk.closes(w)
        )));
    }
    if now < clk.start(w) {
        return Err(ExchangeError::Refused(format!(
            "window {w} starts at {} ms; the store's clock says {now} ms",
            clk.start(w)
        )));
    }
    let model = model_of(update)?;
    for t in &model.tensors {
        match reg.model.get(&t.name) {
            Some(spec) if spec.shape == t.shape => {}
            _ => {
                return Err(ExchangeError::Refused(format!(
                    "update tensor {:?} {:?} is not in the run's model",
                    t.name, t.shape
                )));
            }
        }
    }
    if model.tensors.len() != reg.model.tensors.len() {
        return Err(ExchangeError::Refused(format!(
            "update has {} tensors, the model {}",
            model.tensors.len(),
            reg.model.tensors.len()
        )));
    }
    let mut trial = state.clone();
    let opts = EncodeOptions {
        params: reg.codec,
        beta: reg.beta,
        section_bytes: 16 << 20,
    };
    let encoded = encode_update(update, &mut trial, &opts)?;
    let mut b = EnvelopeBuilder::new(Kind::Grad, &reg.run)
        .window(w)
        .codec(SECTION_CODEC, codec_header(reg))
        .clock_ms(now);
    for (name, payload) in &encoded.sections {
        b = b.section(name, payload, Compression::Zstd)?;
    }
    let signed = b.sign(id)?;
    let path = target.path(&layout::grad(&reg.run, w, &me));
    let object = target.url_of(&path);
    let already = match store::put_create(&target, &path, &signed).await {
        Ok(PutOutcome::Created) => false,
        Ok(PutOutcome::AlreadyIdentical) => true,
        Err(StoreError::Conflict { .. }) => {
            // Our own valid shard for this window is already there: a retry whose first
            // attempt landed (with another signer clock). Never overwrite it.
            let limits = Limits::default();
            let expect = Expect {
                signer: Some(me),
                run: Some(reg.run.clone()),
                kind: Some(Kind::Grad),
                window: Some(w),
                step: None,
            };
            RemoteEnvelope::open(target.store.as_ref(), &path, &object, &limits, &expect)
                .await
                .map_err(|_| {
                    ExchangeError::Refused(format!("{object}: another object is already there"))
                })?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    let meta = object_store::ObjectStoreExt::head(target.store.as_ref(), &path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    *state = trial;
    Ok(Published {
        object,
        window: w,
        bytes: signed.len(),
        dense_bytes: encoded.stats.dense_bytes,
        kept: encoded.stats.kept,
        ratio: encoded.stats.dense_bytes as f64 / signed.len() as f64,
        store_time_ms: now,
        last_modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
        already_published: already,
    })
}

/// One miner's shard as the aggregator (or validator) saw it.
#[derive(Clone, Debug)]
pub struct Shard {
    pub peer: String,
    pub object: String,
    pub found: bool,
    pub bytes: Option<u64>,
    pub last_modified_ms: Option<i64>,
    /// `None` while acceptable; otherwise (verdict, reason, detail).
    pub fault: Option<(&'static str, String, String)>,
    /// Decoded tensors in model order (only when acceptable).
    pub tensors: Vec<EncodedTensor>,
    /// blake3 over the section hashes: equal for byte-identical updates.
    pub content: Option<String>,
    pub norm: Option<f64>,
}

impl Shard {
    fn fail(mut self, verdict: &'static str, reason: &str, detail: String) -> Shard {
        self.fault = Some((verdict, reason.to_string(), detail));
        self.tensors.clear();
        self
    }
}

/// Fetches and fully verifies one miner's shard for window `w`.
pub async fn fetch_shard(reg: &Registry, miner: &Participant, w: u64, s3: &S3Options) -> Shard {
    let mut shard = Shard {
        peer: miner.peer.clone(),
        object: String::new(),
        found: false,
        bytes: None,
        last_modified_ms: None,
        fault: None,
        tensors: Vec::new(),
        content: None,
        norm: None,
    };
    let peer = match PeerId::parse(&miner.peer) {
        Ok(p) => p,
        Err(e) => return shard.fail("rejected", "bad_peer", e.to_string()),
    };
    let target = match reg.open_store(miner, s3) {
        Ok(t) => t,
        Err(e) => return shard.fail("error", "store_error", e.to_string()),
    };
    let path = target.path(&layout::grad(&reg.run, w, &peer));
    shard.object = target.url_of(&path);
    let limits = Limits {
        max_body_len: reg.limits.max_grad_bytes,
        ..Limits::default()
    };
    let expect = Expect {
        signer: Some(peer),
        run: Some(reg.run.clone()),
        kind: Some(Kind::Grad),
        window: Some(w),
        step: None,
    };
    let env = match RemoteEnvelope::open(
        target.store.as_ref(),
        &path,
        &shard.object,
        &limits,
        &expect,
    )
    .await
    {
        Ok(env) => env,
        Err(EnvelopeError::NotFound { .. }) => {
            return shard.fail("missing", "missing", "no shard at the layout key".into());
        }
        Err(e) => {
            shard.found = true;
            return match e.rejection() {
                Some(r) => {
                    let reason = r.reason.code();
                    shard.fail("rejected", reason, e.to_string())
                }
                None => shard.fail("error", "store_error", e.to_string()),
            };
        }
    };
    shard.found = true;
    shard.bytes = Some(env.meta.size);
    let lm = env.meta.last_modified.timestamp_millis();
    shard.last_modified_ms = Some(lm);
    let clk = clock(reg);
    if lm < 0 || lm as u64 >= clk.closes(w) {
        return shard.fail(
            "rejected",
            "late",
            format!(
                "landed at {lm} ms, window {w} closed at {} ms",
                clk.closes(w)
            ),
        );
    }
    if (lm as u64) < clk.start(w) {
        return shard.fail(
            "rejected",
            "early",
            format!(
                "landed at {lm} ms, before window {w} began at {} ms",
                clk.start(w)
            ),
        );
    }
    let h = &env.head.header;
    if h.codec != SECTION_CODEC || h.codec_params != codec_header(reg) {
        return shard.fail(
            "rejected",
            "codec_mismatch",
            format!(
                "codec {} {:?}, the run uses {:?}",
                h.codec,
                h.codec_params,
                codec_header(reg)
            ),
        );
    }
    let payloads = match read_all_sections(target.store.as_ref(), &env, &limits).await {
        Ok(p) => p,
        Err(e) => {
            return match e.rejection() {
                Some(r) => {
                    let reason = r.reason.code();
                    shard.fail("rejected", reason, e.to_string())
                }
                None => shard.fail("error", "store_error", e.to_string()),
            };
        }
    };
    let mut tensors = Vec::new();
    let mut sumsq = 0f64;
    for (entry, payload) in env.sections().iter().zip(&payloads) {
        match codec::read_section_with_norms(payload, Some(&reg.model), &CodecLimits::default()) {
            Ok(ts) => {
                for (t, s) in ts {
                    sumsq += s;
                    tensors.push(t);
                }
            }
            Err(e) => {
                return shard.fail(
                    "rejected",
                    e.reason(),
                    format!("section {}: {e}", entry.name),
                );
            }
        }
    }
    drop(payloads);
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let want: Vec<&str> = reg.model.tensors.iter().map(|t| t.name.as_str()).collect();
    if names != want {
        return shard.fail(
            "rejected",
            "incomplete",
            format!(
                "{} tensors, the model has {} (each exactly once)",
                names.len(),
                want.len()
            ),
        );
    }
    if let Some(t) = tensors.iter().find(|t| t.params != reg.codec) {
        let detail = format!("tensor {} uses {:?}", t.name, t.params);
        return shard.fail("rejected", "codec_mismatch", detail);
    }
    let mut content = blake3::Hasher::new();
    for s in env.sections() {
        content.update(s.hash.as_bytes());
    }
    shard.content = Some(content.finalize().to_hex().to_string());
    shard.norm = Some(sumsq.sqrt());
    shard.tensors = tensors;
    shard
}
