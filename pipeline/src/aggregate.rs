//! The aggregator's merge and the catch-up replay.
//!
//! For a closed window the aggregator fetches every registered miner's shard (bounded
//! concurrency), verifies each (`exchange::fetch_shard`), drops exact duplicates (the
//! earliest by `last_modified` wins, then the lower peer id), clips outlier norms, and merges
//! the rest as a weighted mean in peer-id order, in f32. It writes the ledger, then publishes
//! the aggregate create-only: the aggregate is the commit point, so no partial aggregate is
//! ever visible, and since every input and the recorded clock are fixed by the window, a
//! rerun (after a crash or not) produces the same bytes.
//!
//! Aggregate body (`agg-v1`): one section per model tensor, `tNNNNN` in model order, each a
//! safetensors file holding the tensor either dense (`NAME`, F32) or sparse (`NAME/idx` U32
//! flat indices ascending, `NAME/val` F32), whichever is smaller.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::codec::{ModelSpec, accumulate};
use crate::envelope::{
    Compression, EnvelopeBuilder, EnvelopeError, Expect, Kind, Limits, RemoteEnvelope,
    read_all_sections,
};
use crate::exchange::{ExchangeError, Shard, clock, fetch_shard};
use crate::identity::{Identity, PeerId};
use crate::layout;
use crate::registry::{Registry, Role};
use crate::store::{self, PutOutcome, S3Options, StoreError};
use crate::tables::{LedgerRow, ledger_parquet};
use crate::window::store_now_ms;

pub const AGG_CODEC: &str = "agg-v1";

/// What one aggregation produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Aggregated {
    pub window: u64,
    pub object: String,
    pub ledger: String,
    pub accepted: usize,
    pub rejected: usize,
    pub missing: usize,
    pub errors: usize,
    pub bytes: u64,
    pub already_published: bool,
    pub reasons: BTreeMap<String, usize>,
}

fn agg_tensor(name: &str, shape: &[u64], dense: &[f32]) -> Result<Vec<u8>, ExchangeError> {
    let nnz = dense.iter().filter(|&&x| x != 0.0).count();
    let bad = |e: safetensors::SafeTensorError| {
        ExchangeError::Refused(format!("aggregate tensor {name}: {e}"))
    };
    let sparse = nnz * 8 < dense.len() * 4;
    let meta = serde_json::json!({"codec": AGG_CODEC, "name": name, "shape": shape, "form": if sparse { "sparse" } else { "dense" }});
    let info: HashMap<String, String> = [("shardrop".to_string(), meta.to_string())].into();
    if sparse {
        let mut idx = Vec::with_capacity(nnz * 4);
        let mut val = Vec::with_capacity(nnz * 4);
        for (i, &x) in dense.iter().enumerate() {
            if x != 0.0 {
                idx.extend_from_slice(&(i as u32).to_le_bytes());
                val.extend_from_slice(&x.to_le_bytes());
            }
        }
        let views = vec![
            (
                format!("{name}/idx"),
                TensorView::new(Dtype::U32, vec![nnz], &idx).map_err(bad)?,
            ),
            (
                format!("{name}/val"),
                TensorView::new(Dtype::F32, vec![nnz], &val).map_err(bad)?,
            ),
        ];
        safetensors::serialize(views, Some(info)).map_err(bad)
    } else {
        let raw: Vec<u8> = dense.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![(
            name.to_string(),
            TensorView::new(
                Dtype::F32,
                shape.iter().map(|&d| d as usize).collect(),
                &raw,
            )
            .map_err(bad)?,
        )];
        safetensors::serialize(views, Some(info)).map_err(bad)
    }
}

/// Adds `scale ×` an aggregate tensor section into `theta` (the model's tensor, f32),
/// after checking it against the model.
pub fn apply_agg_tensor(
    section: &[u8],
    model: &ModelSpec,
    theta: &mut BTreeMap<String, Vec<f32>>,
    scale: f32,
) -> Result<(), String> {
    let st = SafeTensors::deserialize(section).map_err(|e| format!("not safetensors: {e}"))?;
    let (_, header) = SafeTensors::read_metadata(section).map_err(|e| e.to_string())?;
    let meta: serde_json::Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("shardrop"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or("no shardrop metadata")?;
    let name = meta["name"].as_str().ok_or("no tensor name")?;
    let spec = model
        .get(name)
        .ok_or_else(|| format!("tensor {name:?} is not in the model"))?;
    let dst = theta
        .get_mut(name)
        .ok_or_else(|| format!("tensor {name:?} missing from the base"))?;
    let f32s = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    // Two roundings, never fused: θ − (lr · a).
    let mut add = |i: usize, v: f32| -> Result<(), String> {
        if !v.is_finite() {
            return Err(format!("tensor {name}: non-finite value"));
        }
        let slot = dst
            .get_mut(i)
            .ok_or_else(|| format!("tensor {name}: index {i} out of range"))?;
        *slot -= scale * v;
        Ok(())
    };
    match meta["form"].as_str() {
        Some("dense") => {
            let t = st.tensor(name).map_err(|e| e.to_string())?;
            if t.dtype() != Dtype::F32
                || t.shape().iter().map(|&d| d as u64).collect::<Vec<_>>() != spec.shape
            {
                return Err(format!(
                    "tensor {name}: dense form has the wrong dtype or shape"
                ));
            }
            for (i, v) in f32s(t.data()).into_iter().enumerate() {
                add(i, v)?;
            }
        }
        Some("sparse") => {
            let idx = st
                .tensor(&format!("{name}/idx"))
                .map_err(|e| e.to_string())?;
            let val = st
                .tensor(&format!("{name}/val"))
                .map_err(|e| e.to_string())?;
            if idx.dtype() != Dtype::U32 || val.dtype() != Dtype::F32 || idx.shape() != val.shape()
            {
                return Err(format!(
                    "tensor {name}: sparse form has the wrong dtypes or shapes"
                ));
            }
            let ids: Vec<u32> = idx
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            for (&i, v) in ids.iter().zip(f32s(val.data())) {
                add(i as usize, v)?;
            }
        }
        _ => return Err(format!("tensor {name}: unknown form")),
    }
    Ok(())
}

/// Merges window `w` and publishes its ledger and aggregate into the aggregator's store.
pub async fn aggregate_window(
    reg: &Registry,
    id: &Identity,
    s3: &S3Options,
    w: u64,
    concurrency: usize,
) -> Result<Aggregated, ExchangeError> {
    let me = id.peer_id();
    let target = crate::exchange::own_store(reg, id, Role::Aggregator, s3)?;
    let clk = clock(reg);
    // Wait until the window has closed by the store's clock.
    loop {
        let now = store_now_ms(&target, &format!("runs/{}/clock/{me}", reg.run)).await?;
        if now >= clk.closes(w) {
            break;
        }
        let wait = (clk.closes(w) - now).min(5_000);
        tracing::info!(
            window = w,
            wait_ms = wait,
            "waiting for the window to close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(wait + 50)).await;
    }
    let miners = reg.with_role(Role::Miner);
    let mut shards: Vec<Shard> =
        futures::stream::iter(miners.iter().map(|m| fetch_shard(reg, m, w, s3)))
            .buffered(concurrency.max(1))
            .collect()
            .await;
    // Exact duplicates: keep the earliest (then the lower peer id); reject the rest.
    let mut first_of: HashMap<String, (i64, String)> = HashMap::new();
    for s in shards.iter().filter(|s| s.fault.is_none()) {
        if let (Some(c), Some(lm)) = (&s.content, s.last_modified_ms) {
            let e = first_of.entry(c.clone()).or_insert((lm, s.peer.clone()));
            if (lm, s.peer.clone()) < *e {
                *e = (lm, s.peer.clone());
            }
        }
    }
    for s in shards.iter_mut() {
        if s.fault.is_none()
            && let Some((_, winner)) = s.content.as_ref().and_then(|c| first_of.get(c))
            && *winner != s.peer
        {
            s.fault = Some((
                "rejected",
                "duplicate".into(),
                format!("the same update as {winner}, published earlier"),
            ));
            s.tensors.clear();
        }
    }
    // Outlier norms: clipped to ratio × median when there are at least 3 shards.
    let mut norms: Vec<f64> = shards
        .iter()
        .filter(|s| s.fault.is_none())
        .filter_map(|s| s.norm)
        .collect();
    norms.sort_by(f64::total_cmp);
    let cap = (norms.len() >= 3).then(|| norms[norms.len() / 2] * reg.limits.clip_norm_ratio);
    let n = norms.len();
    let mut dense: Vec<Vec<f32>> = reg
        .model
        .tensors
        .iter()
        .map(|t| vec![0f32; t.shape.iter().product::<u64>() as usize])
        .collect();
    let mut rows = Vec::with_capacity(shards.len());
    for s in &shards {
        let mut row = LedgerRow {
            window: w,
            peer: s.peer.clone(),
            found: s.found,
            bytes: s.bytes,
            last_modified_ms: s.last_modified_ms,
            verdict: "accepted".into(),
            reason: String::new(),
            detail: String::new(),
            norm: s.norm,
            weight: 0.0,
        };
        if let Some((verdict, reason, detail)) = &s.fault {
            row.verdict = verdict.to_string();
            row.reason = reason.clone();
            row.detail = detail.clone();
            rows.push(row);
            continue;
        }
        let norm = s.norm.unwrap_or(0.0);
        let mut scale = 1.0f64;
        if let Some(cap) = cap
            && norm > cap
        {
            scale = cap / norm;
            row.reason = "clipped".into();
            row.detail = format!(
                "norm {norm:.6e} over {:.1} x median; scaled by {scale:.6}",
                reg.limits.clip_norm_ratio
            );
        }
        let weight = (scale / n as f64) as f32;
        row.weight = weight as f64;
        for (t, d) in s.tensors.iter().zip(dense.iter_mut()) {
            accumulate(t, d, weight)?;
        }
        rows.push(row);
    }
    let mut reasons = BTreeMap::new();
    for r in &rows {
        if !r.reason.is_empty() {
            *reasons.entry(r.reason.clone()).or_insert(0) += 1;
        }
    }
    let count = |v: &str| rows.iter().filter(|r| r.verdict == v).count();
    let (accepted, rejected, missing, errors) = (
        count("accepted"),
        count("rejected"),
        count("missing"),
        count("error"),
    );
    let ledger =
        ledger_parquet(&rows).map_err(|e| ExchangeError::Refused(format!("ledger: {e}")))?;
    let ledger_path = target.path(&layout::ledger(&reg.run, w));
    let ledger_url = target.url_of(&ledger_path);
    target
        .store
        .put(&ledger_path, PutPayload::from(Bytes::from(ledger)))
        .await
        .map_err(|e| StoreError::from_store(&ledger_url, e))?;
    let mut b = EnvelopeBuilder::new(Kind::Agg, &reg.run)
        .window(w)
        .codec(AGG_CODEC, Default::default())
        .clock_ms(clk.closes(w))
        .meta("accepted", &accepted.to_string())
        .meta("rejected", &rejected.to_string())
        .meta("missing", &missing.to_string())
        .meta("errors", &errors.to_string());
    if accepted > 0 {
        use rayon::prelude::*;
        let payloads = reg
            .model
            .tensors
            .par_iter()
            .zip(dense.par_iter())
            .enumerate()
            .map(|(i, (t, d))| Ok((format!("t{i:05}"), agg_tensor(&t.name, &t.shape, d)?)))
            .collect::<Result<Vec<_>, ExchangeError>>()?;
        drop(dense);
        b = b.sections(payloads, Compression::Zstd)?;
    }
    let signed = b.sign(id)?;
    let path = target.path(&layout::agg(&reg.run, w));
    let object = target.url_of(&path);
    let outcome = store::put_create(&target, &path, &signed).await?;
    Ok(Aggregated {
        window: w,
        object,
        ledger: ledger_url,
        accepted,
        rejected,
        missing,
        errors,
        bytes: signed.len(),
        already_published: outcome == PutOutcome::AlreadyIdentical,
        reasons,
    })
}

/// Replays the aggregates of windows `first ..= last` onto `theta` (f32 tensors by name):
/// θ ← θ − outer_lr · aggregate, in window order. Stops at the first missing or invalid
/// aggregate, naming the window. Memory: the model plus one aggregate.
pub async fn apply_aggregates(
    reg: &Registry,
    s3: &S3Options,
    theta: &mut BTreeMap<String, Vec<f32>>,
    first: u64,
    last: u64,
) -> Result<usize, ExchangeError> {
    let aggs = reg.with_role(Role::Aggregator);
    let agg = aggs
        .first()
        .ok_or_else(|| ExchangeError::Refused(format!("run {} has no aggregator", reg.run)))?;
    let agg_id = PeerId::parse(&agg.peer).map_err(|e| ExchangeError::Refused(e.to_string()))?;
    let target = reg.open_store(agg, s3)?;
    let limits = Limits::default();
    let mut applied = 0;
    for w in first..=last {
        let path = target.path(&layout::agg(&reg.run, w));
        let object = target.url_of(&path);
        let expect = Expect {
            signer: Some(agg_id),
            run: Some(reg.run.clone()),
            kind: Some(Kind::Agg),
            window: Some(w),
            step: None,
        };
        let env =
            match RemoteEnvelope::open(target.store.as_ref(), &path, &object, &limits, &expect)
                .await
            {
                Ok(e) => e,
                Err(EnvelopeError::NotFound { .. }) => {
                    return Err(ExchangeError::Refused(format!(
                        "window {w}: no aggregate at {object}"
                    )));
                }
                Err(e) => return Err(ExchangeError::Refused(format!("window {w}: {e}"))),
            };
        let sections = read_all_sections(target.store.as_ref(), &env, &limits)
            .await
            .map_err(|e| ExchangeError::Refused(format!("window {w}: {e}")))?;
        for (entry, s) in env.sections().iter().zip(&sections) {
            apply_agg_tensor(s, &reg.model, theta, reg.outer_lr).map_err(|e| {
                ExchangeError::Refused(format!("window {w}: {object} section {}: {e}", entry.name))
            })?;
        }
        applied += 1;
    }
    Ok(applied)
}
