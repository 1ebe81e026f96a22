//! The verdict pipeline both round jobs share: the aggregator and the validator decide
//! every miner's verdict, reason and weight the same way, from the same checks.
//!
//! 1. `open_window`: wait for the window to close by the store's clock, then the header
//!    pass over every registered miner (`check_heads`, one small ranged GET each, all at
//!    once, within the first half of the window's budget): signature, signer, run, window,
//!    kind, timeliness by `last_modified`, codec, section bounds.
//! 2. `check_ranges`: fetch and validate the sections holding a tensor range (all of
//!    them in one process, one part per worker in a split merge), with each tensor's norm.
//! 3. `finalize`: combine the checks in model order into verdicts, settle duplicates by
//!    the miners' commits, clip by the median norm and weigh.
//!
//! Every failure is an [`Exclusion`]: a [`Verdict`], a stable reason code and a detail
//! naming the object. None of them ends a job.

use crate::format::envelope::Reason;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::format::codec::{self, CodecLimits, EncodedTensor, SECTION_CODEC};
use crate::format::envelope::{EnvelopeError, Expect, Kind, Limits, RemoteEnvelope, read_sections};
use crate::format::layout;
use crate::format::tables::LedgerRow;
pub use crate::format::tables::Verdict;
use crate::identity::PeerId;
use crate::round::RoundError;
use crate::round::publish::{COMMIT_CODEC, clock, codec_header, content_hash};
use crate::round::registry::{Job, Participant, Registry, Role};
use crate::round::window::store_now_ms;
use crate::store::{self, S3Options, StoreError, Target};

crate::error::reason_codes! {
    /// The verdict pipeline's own ledger reasons (`schemas/round.md`, "Verdicts"); a
    /// rejection by the envelope or the codec records theirs.
    pub enum LedgerReason {
        /// No object at the layout key.
        Missing = "missing",
        /// The store could not be read in time: the store's fault, not the miner's.
        StoreError = "store_error",
        /// A registered peer id that is not a valid key.
        BadPeer = "bad_peer",
        /// Stored at or after the deadline plus grace.
        Late = "late",
        /// Stored before the window began.
        Early = "early",
        /// The header's codec or parameters are not the run's.
        CodecMismatch = "codec_mismatch",
        /// Not every model tensor exactly once.
        Incomplete = "incomplete",
        /// The section table is not the run's packing.
        SectionLayout = "section_layout",
        /// The same content as an earlier commitment's.
        Duplicate = "duplicate",
        /// The shard changed after its header was checked.
        Replaced = "replaced",
        /// Accepted with its norm scaled down to the cap.
        Clipped = "clipped",
    }
}

/// Why a shard is not merged: the verdict (`rejected`, `missing`, `error`), a stable reason
/// code and a human detail naming the object.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exclusion {
    /// What became of the shard.
    pub verdict: Verdict,
    /// The stable reason code recorded in the ledger.
    pub reason: String,
    /// A human detail naming the object.
    pub detail: String,
}

impl Exclusion {
    pub(crate) fn new(verdict: Verdict, reason: &str, detail: String) -> Exclusion {
        Exclusion {
            verdict,
            reason: reason.into(),
            detail,
        }
    }

    fn from_envelope(e: &EnvelopeError) -> Exclusion {
        match e.rejection() {
            Some(r) => Exclusion::new(Verdict::Rejected, r.reason.code(), e.to_string()),
            None => Exclusion::store(e),
        }
    }

    /// A store that did not answer within the window's budget.
    pub fn timed_out() -> Exclusion {
        Exclusion::new(
            Verdict::Error,
            LedgerReason::StoreError.code(),
            "timeout: the store did not answer within the window's budget".into(),
        )
    }

    /// A store failure. The ledger gets a stable detail (the full error, with its retry
    /// timings, goes to the log), so that reruns write the same ledger.
    fn store(e: &dyn std::fmt::Display) -> Exclusion {
        tracing::warn!(error = %e, "store error while reading a shard");
        Exclusion::new(
            Verdict::Error,
            LedgerReason::StoreError.code(),
            "the store could not be read (timeout, 5xx or connection error); see the job's log"
                .into(),
        )
    }
}

/// One miner's shard after the header pass: one small ranged GET per miner, the same for
/// every worker of a split merge.
#[derive(Clone, Debug)]
pub struct MinerShard {
    /// The miner's peer id, as the registry lists it.
    pub peer: String,
    /// The shard's URL (empty when its store could not be opened).
    pub object: String,
    /// Whether an object was at the layout key.
    pub found: bool,
    /// Its stored size.
    pub bytes: Option<u64>,
    /// When it landed by the store's clock, in milliseconds (the only time that counts).
    pub last_modified_ms: Option<i64>,
    /// Why the header pass excluded it, if it did.
    pub fault: Option<Exclusion>,
    /// blake3 over the section hashes: equal for byte-identical updates.
    pub content: Option<String>,
    /// When the miner's signed commit to this content landed (the store's time), fetched
    /// only for shards whose content another shard shares.
    pub commit_ms: Option<i64>,
    pub(crate) env: Option<(Target, RemoteEnvelope)>,
}

impl MinerShard {
    /// A miner whose store did not answer within the window's budget.
    pub fn timed_out(peer: &str) -> MinerShard {
        MinerShard {
            peer: peer.to_string(),
            object: String::new(),
            found: false,
            bytes: None,
            last_modified_ms: None,
            fault: Some(Exclusion::timed_out()),
            content: None,
            commit_ms: None,
            env: None,
        }
    }

    fn fail(mut self, verdict: Verdict, reason: &str, detail: String) -> MinerShard {
        self.fault = Some(Exclusion::new(verdict, reason, detail));
        self.env = None;
        self
    }

    /// Reads the miner's commit for this shard: its `last_modified` when it is a valid
    /// commit (signed by this miner, this run and window, codec `commit-v2`) whose
    /// commitment is this miner's over the salt the shard reveals and the shard's content,
    /// and it landed inside the window (a commit from before the window opened counts for
    /// nothing: its content was knowable only by guessing it).
    pub async fn fetch_commit(&mut self, reg: &Registry, w: u64) {
        let (Some((target, env)), Some(content)) = (&self.env, &self.content) else {
            return;
        };
        let Some(salt) = env.head.header.meta.get(crate::round::publish::SALT_META) else {
            return;
        };
        let want = crate::round::publish::commitment(&env.signer, salt, content);
        let clk = clock(reg);
        // A whole-second time (HEAD on S3) stands for anywhere in its second: it counts as
        // inside if any of that second is.
        let inside = |ms: i64| {
            let ms = ms.max(0) as u64;
            crate::round::window::end_of_second(ms) >= clk.start(w) && ms < clk.closes(w)
        };
        let key = layout::grad_commit(&reg.run, w, &env.signer);
        let expect = Expect::in_window(Kind::Blob, env.signer, &reg.run, w);
        let path = target.path(&key);
        let url = target.url_of(&path);
        self.commit_ms = match RemoteEnvelope::open(
            target.store.as_ref(),
            &path,
            &url,
            &Limits::small_object(),
            &expect,
        )
        .await
        {
            Ok(c)
                if c.head.header.codec == COMMIT_CODEC
                    && c.head
                        .header
                        .meta
                        .get(crate::round::publish::COMMITMENT_META)
                        == Some(&want)
                    && inside(c.meta.last_modified.timestamp_millis()) =>
            {
                Some(c.meta.last_modified.timestamp_millis())
            }
            Ok(_) => None,
            Err(e) => {
                tracing::info!(object = %url, error = %e, "no valid commit");
                None
            }
        };
    }
}

/// The header pass for one miner: signature, signer, run, window, kind, sizes, timeliness
/// by the store's `last_modified`, and the codec. No section is fetched.
pub async fn check_head(reg: &Registry, miner: &Participant, w: u64, s3: &S3Options) -> MinerShard {
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
pub async fn precise_last_modified(
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

/// What checking one shard's tensors in a range found: the first failing tensor (by model
/// index) and each tensor's squared norm. Workers of a split merge exchange these.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RangeCheck {
    /// The first failing tensor (model index) and why.
    pub fault: Option<(usize, Exclusion)>,
    /// Each checked tensor's squared norm, by model index.
    pub sumsq: Vec<(usize, f64)>,
}

impl RangeCheck {
    /// The sections of a range were not read within the window's budget.
    pub fn timed_out(first: usize) -> RangeCheck {
        RangeCheck {
            fault: Some((first, Exclusion::timed_out())),
            sumsq: Vec::new(),
        }
    }
}

/// The tensor range `tAAAAA-BBBBB` a gradient section holds, if its name says.
pub(crate) fn section_range(name: &str) -> Option<(usize, usize)> {
    let (a, b) = name.strip_prefix('t')?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Fetches the sections of a header-valid shard that hold tensors of `range` (model
/// indices), validates them against the model, and returns the check with the decoded
/// tensors of the range in model order.
pub async fn check_range(
    reg: &Registry,
    shard: &MinerShard,
    range: std::ops::Range<usize>,
) -> (RangeCheck, Vec<EncodedTensor>) {
    let Some((target, env)) = shard.env.as_ref() else {
        return (RangeCheck::default(), Vec::new());
    };
    match checked_range(reg, &shard.object, target, env, range).await {
        Ok(found) => {
            let mut check = RangeCheck::default();
            let mut tensors = Vec::with_capacity(found.len());
            for (i, (t, s)) in found {
                check.sumsq.push((i, s));
                tensors.push(t);
            }
            (check, tensors)
        }
        Err(fault) => (
            RangeCheck {
                fault: Some(fault),
                sumsq: Vec::new(),
            },
            Vec::new(),
        ),
    }
}

/// The steps of `check_range`, in the order `round.md` gives them: fetch the range's
/// sections, decode and validate each against the model, require the run's codec, each
/// tensor once, and every tensor of the range. A refusal is the first failing tensor's
/// model index with its exclusion.
async fn checked_range(
    reg: &Registry,
    object: &str,
    target: &Target,
    env: &RemoteEnvelope,
    range: std::ops::Range<usize>,
) -> Result<BTreeMap<usize, (EncodedTensor, f64)>, (usize, Exclusion)> {
    let selected: Vec<usize> = env
        .sections()
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            section_range(&s.name).is_none_or(|(a, b)| a < range.end && b >= range.start)
        })
        .map(|(i, _)| i)
        .collect();
    let first_of = |i: usize| section_range(&env.sections()[i].name).map_or(0, |(a, _)| a);
    let payloads = read_sections(
        target.store.as_ref(),
        env,
        &selected,
        &shard_limits(reg),
        |_| Ok(Vec::new()),
        &|_| {},
    )
    .await
    .map_err(|e| {
        (
            selected.first().map_or(0, |&i| first_of(i)),
            Exclusion::from_envelope(&e),
        )
    })?;
    let index: BTreeMap<&str, usize> = reg
        .model
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let rejected = |i: usize, reason: &str, detail: String| {
        (i, Exclusion::new(Verdict::Rejected, reason, detail))
    };
    let mut found: BTreeMap<usize, (EncodedTensor, f64)> = BTreeMap::new();
    for (&si, payload) in selected.iter().zip(&payloads) {
        let name = &env.sections()[si].name;
        let decoded =
            codec::read_section_with_norms(payload, Some(&reg.model), &CodecLimits::default())
                .map_err(|e| {
                    rejected(
                        first_of(si),
                        e.reason(),
                        format!("{object}: section {name}: {e}"),
                    )
                })?;
        for (t, s) in decoded {
            let Some(&i) = index.get(t.name.as_str()).filter(|&&i| range.contains(&i)) else {
                continue;
            };
            if t.params != reg.codec {
                let detail = format!("{object}: tensor {} uses {:?}", t.name, t.params);
                return Err(rejected(i, LedgerReason::CodecMismatch.code(), detail));
            }
            if found.insert(i, (t, s)).is_some() {
                let detail = format!(
                    "{object}: tensor {} appears twice",
                    reg.model.tensors[i].name
                );
                return Err(rejected(i, LedgerReason::Incomplete.code(), detail));
            }
        }
    }
    if let Some(missing) = range.clone().find(|i| !found.contains_key(i)) {
        let detail = format!(
            "{object}: tensor {} is missing",
            reg.model.tensors[missing].name
        );
        return Err(rejected(missing, LedgerReason::Incomplete.code(), detail));
    }
    Ok(found)
}

/// Final verdicts and merge weights of a window, from the header pass and the range checks.
pub(crate) struct Verdicts {
    pub(crate) rows: Vec<LedgerRow>,
    pub(crate) weights: Vec<f32>,
    /// For shards rejected as duplicates: the peer whose commit came first, if one did.
    pub(crate) duplicate_of: Vec<Option<String>>,
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

/// The duplicate rule (`round.md`): among shards that passed every other check, those with
/// byte-identical sections form a group; the one whose commit landed strictly first keeps
/// its place, every other is `duplicate`. When no single commit is strictly first (none, or
/// a tie within the store's resolution) every member is a duplicate: an honest miner's
/// commit precedes its shard by a whole second, so only copiers and shards published
/// without the protocol end there. Returns, per shard, the fault and whose copy it is.
fn duplicates(
    shards: &[MinerShard],
    faults: &[Option<Exclusion>],
) -> Vec<Option<(Exclusion, Option<String>)>> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (j, s) in shards.iter().enumerate() {
        if faults[j].is_none()
            && let Some(c) = &s.content
        {
            groups.entry(c.as_str()).or_default().push(j);
        }
    }
    let mut out = vec![None; shards.len()];
    for members in groups.values().filter(|m| m.len() > 1) {
        let first = members.iter().filter_map(|&j| shards[j].commit_ms).min();
        let winners: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&j| first.is_some() && shards[j].commit_ms == first)
            .collect();
        let winner = (winners.len() == 1).then(|| shards[winners[0]].peer.clone());
        for &j in members {
            if Some(&shards[j].peer) == winner.as_ref() {
                continue;
            }
            let detail = match &winner {
                Some(wp) => format!("the same update as {wp}, whose commit landed first"),
                None => format!(
                    "the same update as {} other shard(s), and no commit landed strictly first",
                    members.len() - 1
                ),
            };
            out[j] = Some((
                Exclusion::new(Verdict::Rejected, LedgerReason::Duplicate.code(), detail),
                winner.clone(),
            ));
        }
    }
    out
}

/// Checks every header-valid shard's tensors in `range`, keeping the decoded tensors.
pub(crate) async fn check_ranges(
    reg: &Registry,
    shards: &[MinerShard],
    range: Range<usize>,
    concurrency: usize,
    deadline: Instant,
) -> Vec<(RangeCheck, Vec<EncodedTensor>)> {
    let shares = Shares::new(deadline, concurrency, shards.len());
    let shares = &shares;
    let mut out: Vec<(usize, (RangeCheck, Vec<EncodedTensor>))> =
        futures::stream::iter(shards.iter().enumerate().map(|(j, s)| {
            let range = range.clone();
            async move {
                let until = shares.next();
                let checked = tokio::time::timeout_at(until, check_range(reg, s, range.clone()))
                    .await
                    .unwrap_or_else(|_| (RangeCheck::timed_out(range.start), Vec::new()));
                (j, checked)
            }
        }))
        // Unordered: a stalled shard holds one slot, never the shards behind it.
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(j, _)| *j);
    out.into_iter().map(|(_, c)| c).collect()
}

/// Each shard's share of the window's budget, handed out as a deadline when its pipeline
/// gets a slot: the time left before `deadline`, divided by the rounds of `concurrency`
/// pipelines that the shards not yet started (this one included) still need. A shard that
/// stalls for its whole share leaves every later round its own share, so a slow or stalled
/// miner costs its own time and nobody else's; when nothing stalls, a round that ends early
/// leaves its time to the next (`round.md`, "Window budget").
pub(crate) struct Shares {
    deadline: Instant,
    concurrency: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Shares {
    /// Shares for `n` pipelines run `concurrency` at a time until `deadline`.
    pub(crate) fn new(deadline: Instant, concurrency: usize, n: usize) -> Shares {
        Shares {
            deadline,
            concurrency: concurrency.max(1),
            waiting: std::sync::atomic::AtomicUsize::new(n),
        }
    }

    /// The deadline of the pipeline starting now.
    pub(crate) fn next(&self) -> Instant {
        use std::sync::atomic::Ordering;
        let waiting = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(w.saturating_sub(1))
            })
            .unwrap_or(1)
            .max(1);
        let rounds = waiting.div_ceil(self.concurrency).max(1) as u32;
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        (now + left / rounds).min(self.deadline)
    }
}

/// [`check_ranges`] for agg-v2, each shard as one pipeline: copy it into the aggregator's
/// store (`copy_to`: the consolidated forms), open the copy, then check its tensors of
/// `range` one of its own sections at a time, all within the shard's own share of the
/// budget ([`Shares`]). Pipelines run unordered, up to `concurrency` at once, and the
/// results are put back in peer order afterwards: a miner that trickles its body or stalls
/// costs its own slot and share, while every other shard is copied and checked as soon as
/// it can be (one slow miner among 20 used to hold the whole copy phase to the deadline and
/// leave no time for any check). Memory is `concurrency` × the largest section.
/// Stops at a shard's first failing piece, which holds its lowest failing tensor: the same
/// verdict a split merge with one part per section would reach.
/// `keep`: a tensor index whose decoded form is returned for every shard that holds it (the
/// aggregator's sample for choosing agg-v2's form, at no extra fetch).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy_and_check(
    reg: &Registry,
    copy_to: Option<&Target>,
    w: u64,
    shards: &mut [MinerShard],
    range: Range<usize>,
    keep: Option<usize>,
    concurrency: usize,
    deadline: Instant,
) -> Vec<(RangeCheck, Option<EncodedTensor>)> {
    let busy = shards
        .iter()
        .filter(|s| s.fault.is_none() && s.env.is_some())
        .count();
    let shares = Shares::new(deadline, concurrency, busy);
    let shares = &shares;
    let mut out: Vec<(usize, (RangeCheck, Option<EncodedTensor>))> =
        futures::stream::iter(shards.iter_mut().enumerate().map(|(j, s)| {
            let range = range.clone();
            async move {
                if s.fault.is_some() || s.env.is_none() {
                    return (j, (RangeCheck::default(), None));
                }
                let until = shares.next();
                if let Some(target) = copy_to {
                    let copied =
                        tokio::time::timeout_at(until, s.consolidate(reg, target, w, true)).await;
                    if copied.is_err() {
                        s.fault = Some(Exclusion::timed_out());
                        s.env = None;
                    }
                    if s.fault.is_some() {
                        return (j, (RangeCheck::default(), None));
                    }
                }
                let s = &*s;
                let mut all = RangeCheck::default();
                let mut kept = None;
                for piece in pieces(s, range) {
                    let checked =
                        tokio::time::timeout_at(until, check_range(reg, s, piece.clone())).await;
                    let (c, tensors) = checked
                        .unwrap_or_else(|_| (RangeCheck::timed_out(piece.start), Vec::new()));
                    if let Some(k) = keep.filter(|k| piece.contains(k)) {
                        let name = &reg.model.tensors[k].name;
                        kept = tensors.into_iter().find(|t| &t.name == name);
                    }
                    all.sumsq.extend(c.sumsq);
                    if c.fault.is_some() {
                        all.fault = c.fault;
                        break;
                    }
                }
                (j, (all, kept))
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(j, _)| *j);
    out.into_iter().map(|(_, c)| c).collect()
}

/// `range` cut where the shard's own sections start: pieces that each need one section
/// (of an honest shard), covering the whole range, so a tensor no section holds is still
/// checked (and found missing).
pub(crate) fn pieces(s: &MinerShard, range: Range<usize>) -> Vec<Range<usize>> {
    let mut cuts: Vec<usize> = s
        .env
        .iter()
        .flat_map(|(_, env)| env.sections().iter())
        .filter_map(|x| section_range(&x.name).map(|(a, _)| a))
        .filter(|a| range.contains(a))
        .chain([range.start, range.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|c| c[0]..c[1]).collect()
}

/// agg-v2 with form `shards`: copies every header-valid shard byte for byte into the
/// aggregator's store (`layout::agg_shard`) and points the shard at the copy, so the section
/// checks read exactly the bytes readers will get. A miner that replaces its shard after the
/// header pass cannot slip other bytes past them: a copy whose header differs from the one
/// checked is `replaced`.
pub(crate) async fn consolidate(
    reg: &Registry,
    target: &Target,
    w: u64,
    shards: &mut [MinerShard],
    copy: bool,
    concurrency: usize,
    deadline: Instant,
) {
    futures::stream::iter(
        shards
            .iter_mut()
            .filter(|s| s.fault.is_none() && s.env.is_some()),
    )
    .for_each_concurrent(concurrency.max(1), |s| async move {
        if tokio::time::timeout_at(deadline, s.consolidate(reg, target, w, copy))
            .await
            .is_err()
        {
            s.fault = Some(Exclusion::timed_out());
            s.env = None;
        }
    })
    .await;
}

impl MinerShard {
    /// Copies (unless `copy` is false: the split merge's commit, whose workers copied) and
    /// opens the copy.
    async fn consolidate(&mut self, reg: &Registry, target: &Target, w: u64, copy: bool) {
        let Some((src, env)) = self.env.as_ref() else {
            return;
        };
        let Ok(peer) = PeerId::parse(&self.peer) else {
            return;
        };
        let path = target.path(&layout::agg_shard(&reg.run, w, &peer));
        let copy_url = target.url_of(&path);
        let copied = match copy {
            true => store::copy_object(src, &env.path, env.meta.size, target, &path).await,
            false => Ok(store::PutOutcome::AlreadyIdentical),
        };
        match copied {
            // Other bytes already at our key: an earlier run copied another version; the
            // header comparison below decides.
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => {
                let f = Exclusion::store(&e);
                self.fault = Some(f);
                self.env = None;
                return;
            }
        }
        let expect = Expect::in_window(Kind::Grad, peer, &reg.run, w);
        let opened = RemoteEnvelope::open(
            target.store.as_ref(),
            &path,
            &copy_url,
            &shard_limits(reg),
            &expect,
        )
        .await;
        let fault = match opened {
            Ok(copy) if copy.head.header == env.head.header => {
                self.env = Some((target.clone(), copy));
                return;
            }
            Ok(_) => Exclusion::new(
                Verdict::Rejected,
                LedgerReason::Replaced.code(),
                format!(
                    "{}: the shard changed after its header was checked; the copy {copy_url} holds another version",
                    self.object
                ),
            ),
            Err(e) => Exclusion::from_envelope(&e),
        };
        self.fault = Some(fault);
        self.env = None;
    }

    /// The shard's section table as the header pass (or the consolidated copy) read it.
    pub(crate) fn sections(&self) -> &[crate::format::envelope::SectionEntry] {
        self.env.as_ref().map_or(&[], |(_, e)| e.sections())
    }
}

/// Combines the header pass and the range checks of all parts (in tensor order) into
/// verdicts and weights. Deterministic: the first failing tensor decides a rejection, and
/// norms are summed per tensor in model order, however the tensors were split.
pub(crate) fn finalize(
    reg: &Registry,
    w: u64,
    shards: &[MinerShard],
    parts: &[Vec<RangeCheck>],
) -> Verdicts {
    let mut rows = Vec::with_capacity(shards.len());
    let mut norms: Vec<Option<f64>> = Vec::with_capacity(shards.len());
    let faults: Vec<Option<Exclusion>> = shards
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let range_fault = parts
                .iter()
                .filter_map(|p| p[j].fault.as_ref())
                .min_by_key(|(i, _)| *i)
                .map(|(_, f)| f.clone());
            s.fault.clone().or(range_fault)
        })
        .collect();
    let dups = duplicates(shards, &faults);
    let duplicate_of: Vec<Option<String>> = dups
        .iter()
        .map(|d| d.as_ref().and_then(|(_, w)| w.clone()))
        .collect();
    for (j, s) in shards.iter().enumerate() {
        let mut row = LedgerRow {
            window: w,
            peer: s.peer.clone(),
            found: s.found,
            bytes: s.bytes,
            last_modified_ms: s.last_modified_ms,
            verdict: Verdict::Accepted,
            reason: String::new(),
            detail: String::new(),
            norm: None,
            weight: 0.0,
        };
        let fault = faults[j]
            .clone()
            .or_else(|| dups[j].as_ref().map(|(f, _)| f.clone()));
        let norm = match &fault {
            Some(f) => {
                row.verdict = f.verdict;
                row.reason = f.reason.clone();
                row.detail = f.detail.clone();
                None
            }
            None => {
                let mut per: Vec<(usize, f64)> = parts
                    .iter()
                    .flat_map(|p| p[j].sumsq.iter().copied())
                    .collect();
                Some(shard_norm(&mut per))
            }
        };
        row.norm = norm;
        norms.push(norm);
        rows.push(row);
    }
    let clip = clip_weights(&norms, reg.limits.clip_norm_ratio);
    let mut weights = vec![0f32; shards.len()];
    for (j, row) in rows.iter_mut().enumerate() {
        let (Some(norm), Some(c)) = (norms[j], clip[j]) else {
            continue;
        };
        if c.clipped {
            row.reason = "clipped".into();
            row.detail = format!(
                "norm {norm:.6e} over {:.1} x median; scaled by {:.6}",
                reg.limits.clip_norm_ratio, c.scale
            );
        }
        weights[j] = c.weight;
        row.weight = f64::from(c.weight);
    }
    Verdicts {
        rows,
        weights,
        duplicate_of,
    }
}

/// One accepted shard's place in the merge, from the outlier rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    /// `cap / norm` when clipped, else 1.
    pub scale: f64,
    /// Whether the norm was over the cap.
    pub clipped: bool,
    /// The merge weight, `f32(scale / n)`.
    pub weight: f32,
}

/// The outlier rule and the weights (`round.md`, "Norms, clipping and weights"): `norms`
/// holds each miner's norm, `None` for every shard not accepted. The median is the upper
/// middle of the sorted accepted norms; with 3 or more, a norm over `ratio × median` is
/// scaled down to it; each weight is the binary64 `scale / n` rounded once to f32 (and the
/// smallest positive f32 where that rounds to 0).
pub fn clip_weights(norms: &[Option<f64>], ratio: f64) -> Vec<Option<Clip>> {
    let mut sorted: Vec<f64> = norms.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let cap = (n >= 3).then(|| sorted[n / 2] * ratio);
    norms
        .iter()
        .map(|norm| {
            let norm = (*norm)?;
            let (scale, clipped) = match cap {
                Some(cap) if norm > cap => (cap / norm, true),
                _ => (1.0, false),
            };
            // A weight that would round to zero (a norm ~1e38 times the cap) is the smallest
            // positive f32 instead: still a clipped weight readers accept, never a 0 that
            // would make the whole list unappliable.
            let weight = match (scale / n as f64) as f32 {
                0.0 => f32::from_bits(1),
                w => w,
            };
            Some(Clip {
                scale,
                clipped,
                weight,
            })
        })
        .collect()
}

/// A shard's norm from its tensors' squared norms (any order of arrival): added left to
/// right in model order from +0, then the square root.
pub fn shard_norm(per_tensor: &mut [(usize, f64)]) -> f64 {
    per_tensor.sort_by_key(|(i, _)| *i);
    per_tensor.iter().fold(0f64, |acc, (_, x)| acc + x).sqrt()
}

/// Waits until window `w` has closed by the store's clock (read through `me`'s probe
/// object in `target`); returns the store's time then.
pub async fn wait_for_close(
    reg: &Registry,
    target: &Target,
    me: &PeerId,
    w: u64,
) -> Result<u64, RoundError> {
    let clk = clock(reg);
    loop {
        let now = store_now_ms(target, &layout::clock_probe(&reg.run, me)).await?;
        if now >= clk.closes(w) {
            return Ok(now);
        }
        let wait = (clk.closes(w) - now).min(5_000);
        tracing::info!(
            window = w,
            wait_ms = wait,
            "waiting for the window to close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(wait + 50)).await;
    }
}

/// What every aggregation or validation step starts with: the job's own store, the window
/// closed by the store's clock, and the header pass over every miner.
pub(crate) async fn open_window(
    job: Job<'_>,
    role: Role,
    w: u64,
    concurrency: usize,
    budget: Option<Duration>,
) -> Result<OpenWindow, RoundError> {
    let Job { reg, id, s3 } = job;
    let me = id.peer_id();
    let target = job.own_store(role)?;
    let now = wait_for_close(reg, &target, &me, w).await?;
    let deadline = window_deadline(reg, w, now, budget);
    // The header pass gets the first half of what is left, the sections the rest: a store
    // that never answers must not eat the time the others' sections need.
    let start = Instant::now();
    let heads_by = start + deadline.saturating_duration_since(start) / 2;
    let shards = check_heads(reg, s3, w, concurrency, heads_by).await;
    Ok(OpenWindow {
        me,
        target,
        shards,
        deadline,
    })
}

/// A closed window, its header pass done, and when its reads must end.
pub(crate) struct OpenWindow {
    pub(crate) me: PeerId,
    pub(crate) target: Target,
    pub(crate) shards: Vec<MinerShard>,
    pub(crate) deadline: Instant,
}

/// When a job's reads of window `w` must end: `budget` (default: the run's window length)
/// after the window's close by the store's clock, so a window is decided before the next
/// one closes whatever the miners' stores do (hang, 503, refuse). A job that starts later
/// than that (catching up an old window) gets the whole budget from now. The header pass
/// may take the first half of the time left, the section reads the rest. A miner not read
/// by then is `store_error` (timeout) and the window goes on without it.
pub fn window_deadline(
    reg: &Registry,
    w: u64,
    store_now_ms: u64,
    budget: Option<Duration>,
) -> Instant {
    let budget = budget.unwrap_or(Duration::from_secs(reg.window_secs.max(1)));
    let end = clock(reg).closes(w) + budget.as_millis() as u64;
    let left = match end.checked_sub(store_now_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms),
        _ => budget,
    };
    Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header-valid shard of `content` whose commit landed at `commit_ms`.
    fn shard(peer: &str, content: &str, commit_ms: Option<i64>) -> MinerShard {
        MinerShard {
            content: Some(content.into()),
            commit_ms,
            fault: None,
            ..MinerShard::timed_out(peer)
        }
    }

    #[test]
    fn the_duplicate_rule_table() {
        // (shards, faults by index, who must be `duplicate`, the winner named in details)
        type Case = (
            Vec<MinerShard>,
            Vec<usize>,
            Vec<usize>,
            Option<&'static str>,
        );
        let cases: Vec<(&str, Case)> = vec![
            (
                "the strictly earliest commit keeps its place",
                (
                    vec![shard("a", "x", Some(2000)), shard("b", "x", Some(1000))],
                    vec![],
                    vec![0],
                    Some("b"),
                ),
            ),
            (
                "a tie rejects every member, whatever the peer ids",
                (
                    vec![shard("a", "x", Some(1000)), shard("b", "x", Some(1000))],
                    vec![],
                    vec![0, 1],
                    None,
                ),
            ),
            (
                "no commit: every member is a duplicate",
                (
                    vec![shard("a", "x", None), shard("b", "x", None)],
                    vec![],
                    vec![0, 1],
                    None,
                ),
            ),
            (
                "a member without a commit loses to one with",
                (
                    vec![shard("a", "x", None), shard("b", "x", Some(5000))],
                    vec![],
                    vec![0],
                    Some("b"),
                ),
            ),
            (
                "a shard rejected for another reason takes no part",
                (
                    vec![shard("a", "x", Some(1000)), shard("b", "x", Some(2000))],
                    vec![0],
                    vec![],
                    None,
                ),
            ),
            (
                "other contents are not duplicates",
                (
                    vec![shard("a", "x", None), shard("b", "y", None)],
                    vec![],
                    vec![],
                    None,
                ),
            ),
        ];
        for (what, (shards, faulty, dup, winner)) in cases {
            let faults: Vec<Option<Exclusion>> = (0..shards.len())
                .map(|j| {
                    faulty
                        .contains(&j)
                        .then(|| Exclusion::new(Verdict::Rejected, "non_finite", String::new()))
                })
                .collect();
            let got = duplicates(&shards, &faults);
            let is_dup: Vec<usize> = (0..shards.len()).filter(|&j| got[j].is_some()).collect();
            assert_eq!(is_dup, dup, "{what}");
            for j in dup {
                let (f, w) = got[j].as_ref().unwrap();
                assert_eq!(f.reason, "duplicate", "{what}");
                assert_eq!(w.as_deref(), winner, "{what}");
            }
        }
    }

    #[test]
    fn budget_shares_leave_every_round_its_time() {
        let deadline = Instant::now() + Duration::from_secs(100);
        // 32 shards, 16 slots: the first 16 get half the time left, the next 16 the rest.
        let shares = Shares::new(deadline, 16, 32);
        let first = shares.next();
        let left = deadline.saturating_duration_since(Instant::now());
        let given = first.saturating_duration_since(Instant::now());
        assert!(
            given <= left / 2 + Duration::from_millis(50),
            "{given:?} of {left:?}"
        );
        for _ in 0..15 {
            shares.next();
        }
        // The 17th starts the last round: everything that is left.
        let last = shares.next();
        assert!(deadline.saturating_duration_since(last) < Duration::from_millis(50));
        // Fewer shards than slots: each may use all the time left.
        let all = Shares::new(deadline, 16, 4).next();
        assert!(deadline.saturating_duration_since(all) < Duration::from_millis(50));
    }

    #[test]
    fn clipped_weights_never_round_to_zero_and_the_median_is_the_upper_middle() {
        // Norms 1, 1, 1e300: the median is 1, the outlier's scale 3e-300 / 3 underflows.
        let c = clip_weights(&[Some(1.0), Some(1.0), Some(1e300), None], 3.0);
        assert_eq!(c[3], None);
        let out = c[2].unwrap();
        assert!(out.clipped);
        assert_eq!(out.weight.to_bits(), 1, "the smallest positive f32");
        assert_eq!(c[0].unwrap().weight, (1.0f64 / 3.0) as f32);
        // Even n: the upper middle (3.0 of 1, 2, 3, 4) sets the cap 9; 10 is clipped to it.
        let c = clip_weights(&[Some(1.0), Some(2.0), Some(3.0), Some(10.0)], 3.0);
        assert!(c[3].unwrap().clipped);
        assert_eq!(c[3].unwrap().weight, ((9.0f64 / 10.0) / 4.0) as f32);
        assert!(!c[2].unwrap().clipped);
    }

    #[test]
    fn clipping_needs_three_accepted_shards() {
        // (norms, which are clipped): two shards are never clipped, however far apart; from
        // three, a norm above ratio × median is; rows without a norm (refused) count for
        // nothing.
        let cases: [(&[Option<f64>], &[bool]); 4] = [
            (&[Some(1.0), Some(1e6)], &[false, false]),
            (&[Some(1.0), Some(1e6), None, None], &[false, false]),
            (&[Some(1.0), Some(2.0), Some(1e6)], &[false, false, true]),
            (&[Some(1.0), Some(2.0), Some(6.0)], &[false, false, false]),
        ];
        for (norms, clipped) in cases {
            let c = clip_weights(norms, 3.0);
            let got: Vec<bool> = c.iter().flatten().map(|c| c.clipped).collect();
            assert_eq!(got, clipped, "{norms:?}");
            let n = norms.iter().flatten().count();
            for (x, norm) in c.iter().zip(norms) {
                assert_eq!(x.is_some(), norm.is_some());
                if let Some(x) = x.filter(|x| !x.clipped) {
                    assert_eq!(x.weight, (1.0 / n as f64) as f32, "{norms:?}");
                }
            }
        }
    }

    #[test]
    fn reads_end_one_budget_after_the_close() {
        let op = crate::identity::Identity::generate();
        let model = codec::ModelSpec { tensors: vec![] };
        let reg = Registry::new("r", &op.peer_id(), 0, 10, 5, model, Default::default());
        let budget = Some(Duration::from_secs(4));
        let close = clock(&reg).closes(3);
        // Before the close: the reads end at close + budget, wherever the clock is now.
        for now in [close - 5_000, close - 1, close] {
            let left = window_deadline(&reg, 3, now, budget) - Instant::now();
            let want = Duration::from_millis(close + 4_000 - now);
            assert!(
                left <= want && want - left < Duration::from_millis(500),
                "{now}"
            );
        }
        // After the end (a job started late): a whole budget from now, not none.
        let left = window_deadline(&reg, 3, close + 60_000, budget) - Instant::now();
        assert!(left > Duration::from_millis(3_500) && left <= Duration::from_secs(4));
        // No budget given: the window's length.
        let left = window_deadline(&reg, 3, close, None) - Instant::now();
        assert!(left > Duration::from_millis(9_500) && left <= Duration::from_secs(10));
    }
}
