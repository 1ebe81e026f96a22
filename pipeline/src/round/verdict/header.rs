//! The header pass: one small ranged GET per miner and every check a header allows (signature, signer, run, window, kind, timeliness by `last_modified`, codec, section bounds and layout).

use crate::format::envelope::Reason;
use std::collections::HashMap;

use futures::StreamExt;
use tokio::time::Instant;

use crate::format::codec::{self, SECTION_CODEC};
use crate::format::envelope::{EnvelopeError, Expect, Kind, Limits, RemoteEnvelope};
use crate::format::layout;
pub(super) use crate::format::tables::Verdict;
use crate::identity::PeerId;
use crate::round::publish::{clock, codec_header, content_hash};
use crate::round::registry::{Participant, Registry, Role};
use crate::store::{S3Options, Target};

use super::*;

/// The header pass for one miner: signature, signer, run, window, kind, sizes, timeliness
/// by the store's `last_modified`, and the codec. No section is fetched.
pub(crate) async fn check_head(
    reg: &Registry,
    miner: &Participant,
    w: u64,
    s3: &S3Options,
) -> MinerShard {
    let mut shard = MinerShard {
        peer: miner.peer.clone(),
        object: String::new(),
        found: false,
        bytes: None,
        last_modified_ms: None,
        fault: None,
        content: None,
        commit_ms: None,
        env: None,
    };
    let peer = match PeerId::parse(&miner.peer) {
        Ok(p) => p,
        Err(e) => {
            return shard.fail(
                Verdict::Rejected,
                LedgerReason::BadPeer.code(),
                e.to_string(),
            );
        }
    };
    let target = match reg.open_store(miner, s3) {
        Ok(t) => t,
        Err(e) => {
            let f = Exclusion::store(&e);
            return shard.fail(f.verdict, &f.reason, f.detail);
        }
    };
    let path = target.path(&layout::grad(&reg.run, w, &peer));
    shard.object = target.url_of(&path);
    let expect = Expect::in_window(Kind::Grad, peer, &reg.run, w);
    let env = match RemoteEnvelope::open(
        target.store.as_ref(),
        &path,
        &shard.object,
        &shard_limits(reg),
        &expect,
    )
    .await
    {
        Ok(env) => env,
        Err(EnvelopeError::NotFound { .. }) => {
            return shard.fail(
                Verdict::Missing,
                LedgerReason::Missing.code(),
                "no shard at the layout key".into(),
            );
        }
        Err(e) => {
            shard.found = e.rejection().is_some();
            let f = Exclusion::from_envelope(&e);
            return shard.fail(f.verdict, &f.reason, f.detail);
        }
    };
    shard.found = true;
    shard.bytes = Some(env.meta.size);
    let clk = clock(reg);
    // HEAD/GET report whole seconds on S3: the true time is within the next second. Only
    // when that second straddles the window's start or close is the LIST (milliseconds)
    // worth its request.
    let coarse = env.meta.last_modified.timestamp_millis();
    let straddles = |edge: u64| (coarse..coarse + 1000).contains(&(edge as i64));
    let lm = if straddles(clk.start(w)) || straddles(clk.closes(w)) {
        precise_last_modified(&target, &path)
            .await
            .unwrap_or(coarse)
    } else {
        coarse
    };
    shard.last_modified_ms = Some(lm);
    if lm < 0 || lm as u64 >= clk.closes(w) {
        return shard.fail(
            Verdict::Rejected,
            LedgerReason::Late.code(),
            format!(
                "landed at {lm} ms, window {w} closed at {} ms",
                clk.closes(w)
            ),
        );
    }
    if (lm as u64) < clk.start(w) {
        return shard.fail(
            Verdict::Rejected,
            LedgerReason::Early.code(),
            format!(
                "landed at {lm} ms, before window {w} began at {} ms",
                clk.start(w)
            ),
        );
    }
    let h = &env.head.header;
    if h.codec != SECTION_CODEC || h.codec_params != codec_header(reg) {
        let detail = format!(
            "codec {} {:?}, the run uses {:?}",
            h.codec,
            h.codec_params,
            codec_header(reg)
        );
        return shard.fail(
            Verdict::Rejected,
            LedgerReason::CodecMismatch.code(),
            detail,
        );
    }
    if let Err(x) = check_section_sizes(reg, &env).and_then(|()| check_section_layout(reg, &env)) {
        let detail = format!("{}: {}", shard.object, x.detail);
        return shard.fail(x.verdict, &x.reason, detail);
    }
    shard.content = Some(content_hash(env.sections().iter()));
    shard.env = Some((target, env));
    shard
}

/// `last_modified` in milliseconds from a LIST of the object's folder. S3's GET and HEAD
/// report `Last-Modified` to the second only, which would make deadlines coarse and leave
/// "who published first" to chance between copies; listings carry milliseconds.
pub(crate) async fn precise_last_modified(
    target: &Target,
    path: &object_store::path::Path,
) -> Option<i64> {
    use futures::TryStreamExt;
    let parent: object_store::path::Path = {
        let parts: Vec<_> = path.parts().collect();
        object_store::path::Path::from_iter(parts[..parts.len().saturating_sub(1)].iter().cloned())
    };
    let mut listing = target.store.list(Some(&parent));
    while let Ok(Some(meta)) = listing.try_next().await {
        if &meta.location == path {
            return Some(meta.last_modified.timestamp_millis());
        }
    }
    None
}

/// Envelope limits for a shard: the run's byte cap on the stored body, and what the whole
/// model can decompress to with the run's codec on the raw side (so the header alone, one
/// small GET, already refuses a shard claiming more).
pub(crate) fn shard_limits(reg: &Registry) -> Limits {
    let all = codec::section_raw_bound(&reg.model.tensors, &reg.codec);
    Limits {
        max_body_len: reg.limits.max_grad_bytes,
        max_section_raw_len: all,
        max_raw_len: all,
        ..Limits::default()
    }
}

/// Every section of a shard must be named for a tensor range of the model (`tAAAAA-BBBBB`)
/// and declare no more decompressed bytes than those tensors can take with the run's
/// codec. Checked on the header, before any section byte is fetched or decompressed: a
/// memory bound per shard of what the model implies, whatever the miner declares.
fn check_section_sizes(reg: &Registry, env: &RemoteEnvelope) -> Result<(), Exclusion> {
    let refuse = |detail| Exclusion::new(Verdict::Rejected, Reason::SectionSize.code(), detail);
    let n = reg.model.tensors.len();
    for s in env.sections() {
        let Some((a, b)) = section_range(&s.name).filter(|&(a, b)| a <= b && b < n) else {
            return Err(refuse(format!(
                "section {:?} does not name a tensor range of the model's {n} tensors",
                s.name
            )));
        };
        let bound = codec::section_raw_bound(&reg.model.tensors[a..=b], &reg.codec);
        if s.raw_len > bound {
            return Err(refuse(format!(
                "section {:?} declares {} decompressed bytes; tensors {a}..={b} take at most {bound} with the run's codec",
                s.name, s.raw_len
            )));
        }
    }
    Ok(())
}

/// The shard's sections must be exactly the run's packing (`Registry::section_names`):
/// the same update then always has the same section table and content hash, so the exact
/// duplicate rule cannot be slipped by cutting one update at other tensor boundaries.
fn check_section_layout(reg: &Registry, env: &RemoteEnvelope) -> Result<(), Exclusion> {
    let want = reg.section_names();
    let got: Vec<&str> = env.sections().iter().map(|s| s.name.as_str()).collect();
    if got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g == w) {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(&want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    Err(Exclusion::new(
        Verdict::Rejected,
        LedgerReason::SectionLayout.code(),
        format!(
            "sections are not the run's packing at {} bytes: entry {first} is {:?}, the run's is {:?} ({} sections, the run has {})",
            reg.section_bytes,
            got.get(first).copied().unwrap_or("none"),
            want.get(first).map_or("none", String::as_str),
            got.len(),
            want.len()
        ),
    ))
}

/// The header pass over every registered miner (bounded concurrency, peer-id order). For
/// shards whose content another header-valid shard shares, the miners' commits are read
/// too: `finalize` settles duplicates by them once every check has run.
pub(crate) async fn check_heads(
    reg: &Registry,
    s3: &S3Options,
    w: u64,
    concurrency: usize,
    deadline: Instant,
) -> Vec<MinerShard> {
    let miners = reg.with_role(Role::Miner);
    // Every miner's header at once: each is one small ranged GET (64 KiB at most), and a
    // pool of `concurrency` slots would let a few stores that never answer hold every slot
    // until the deadline while the honest miners queued behind them time out unread.
    let mut shards: Vec<MinerShard> = futures::stream::iter(miners.iter().map(|m| async move {
        match tokio::time::timeout_at(deadline, check_head(reg, m, w, s3)).await {
            Ok(shard) => shard,
            Err(_) => MinerShard::timed_out(&m.peer),
        }
    }))
    .buffered(miners.len().max(concurrency).max(1))
    .collect()
    .await;
    let mut twins: HashMap<String, usize> = HashMap::new();
    for s in shards.iter().filter(|s| s.fault.is_none()) {
        if let Some(c) = &s.content {
            *twins.entry(c.clone()).or_insert(0) += 1;
        }
    }
    let shared =
        |s: &MinerShard| s.fault.is_none() && s.content.as_ref().is_some_and(|c| twins[c] > 1);
    // Every commit at once, like the headers: each is one small object, and a pool would let
    // colluding stores that never answer hold every slot until the deadline, leaving the
    // victim's commit unread (no commit strictly first: a forced tie).
    futures::stream::iter(shards.iter_mut().filter(|s| shared(s)))
        .for_each_concurrent(None, |s| async move {
            // A commit not read in time counts as none: its shard cannot win a tie.
            let _ = tokio::time::timeout_at(deadline, s.fetch_commit(reg, w)).await;
        })
        .await;
    shards
}
