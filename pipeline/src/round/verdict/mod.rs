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

mod copy;
mod deadline;
mod duplicate_rule;
mod header;
mod range;
mod weights;
pub(crate) use copy::*;
pub use deadline::*;
use duplicate_rule::duplicates;
pub(crate) use header::*;
pub(crate) use range::*;
pub use weights::*;

use crate::format::envelope::{EnvelopeError, Expect, Kind, Limits, RemoteEnvelope};
use crate::format::layout;
use crate::format::tables::LedgerRow;
pub use crate::format::tables::Verdict;
use crate::round::publish::{COMMIT_CODEC, clock};
use crate::round::registry::Registry;
use crate::store::Target;

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
    pub(crate) fn timed_out() -> Exclusion {
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
pub(crate) struct MinerShard {
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
    pub(crate) fn timed_out(peer: &str) -> MinerShard {
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
    pub(crate) async fn fetch_commit(&mut self, reg: &Registry, w: u64) {
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

/// Final verdicts and merge weights of a window, from the header pass and the range checks.
pub(crate) struct Verdicts {
    pub(crate) rows: Vec<LedgerRow>,
    pub(crate) weights: Vec<f32>,
    /// For shards rejected as duplicates: the peer whose commit came first, if one did.
    pub(crate) duplicate_of: Vec<Option<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

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
        let model = crate::format::codec::ModelSpec { tensors: vec![] };
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
