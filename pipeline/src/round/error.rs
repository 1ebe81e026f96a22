//! The round's error: every failure of publishing, verdicts, aggregation, replay and
//! scoring, one classified type ([`crate::error::ErrorClass`]). Lower layers' errors
//! (store, envelope, codec) convert into it once, through `From`; the registry's conversion
//! sits beside `RegistryError`.

use crate::format::codec;
use crate::format::envelope::EnvelopeError;
use crate::store::StoreError;

crate::error::reason_codes! {
    /// The round's own reason codes for a refused call or a rejected object
    /// (`schemas/round.md`, "Reason codes"); envelope and codec reasons keep theirs.
    pub enum RoundReason {
        /// A publish after its window closed.
        WindowClosed = "window_closed",
        /// A publish before its window opened.
        WindowNotOpen = "window_not_open",
        /// A setting revision from a window that is already open.
        WindowNotFuture = "window_not_future",
        /// The local error-feedback state is ahead of the window published.
        StateAhead = "state_ahead",
        /// An update that is not the run's model.
        ModelMismatch = "model_mismatch",
        /// The caller's key is not registered in the role it acts in.
        NotRegistered = "not_registered",
        /// A replay that needs momentum from before its first window, without a state file.
        OptimizerStateMissing = "optimizer_state_missing",
        /// A state file of another run, or after another window than the replay needs.
        OptimizerStateWindow = "optimizer_state_window",
        /// A state file that breaks `round.md` "State".
        OptimizerStateInvalid = "optimizer_state_invalid",
        /// A registry that breaks a reader rule.
        RegistryInvalid = "registry_invalid",
        /// Settings that break a reader rule.
        SettingsInvalid = "settings_invalid",
        /// A registry revision older than one this machine accepted, or a fork.
        RegistryRollback = "registry_rollback",
        /// Settings in force changed after the fact.
        SettingsRewritten = "settings_rewritten",
        /// An agg-v2 list that breaks its rules.
        AggVerdict = "agg_verdict",
        /// An agg-v2 weight that is not the rule's.
        AggWeights = "agg_weights",
        /// A listed shard, merged object or section is gone.
        AggSourceMissing = "agg_source_missing",
        /// The merged object is not what the listed shards sum to.
        AggMergedMismatch = "agg_merged_mismatch",
        /// A listed object's sections differ from the list.
        AggSectionMismatch = "agg_section_mismatch",
        /// A split merge's part or check blob that is not one.
        PartMalformed = "part_malformed",
        /// A score table that is not one.
        ScoresMalformed = "scores_malformed",
        /// A score table whose bytes are not the ones its envelope signs.
        ScoresHashMismatch = "scores_hash_mismatch",
        /// A weights object that is not one.
        WeightsMalformed = "weights_malformed",
        /// The validator's evaluator failed for an eligible miner: nothing is published for
        /// the window (an evaluator's failure is the validator's, never the miner's).
        EvalFailed = "eval_failed",
    }
}

/// Failures of publishing and of the round's jobs, by class ([`crate::error::ErrorClass`]).
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The call cannot be done as asked: not registered, a window that is closed or not
    /// open, an update that is not the run's model, bad part numbers.
    #[error("{0}")]
    Caller(String),
    /// An object was read and refused; `reason` is its stable code.
    #[error("{object}: {detail}")]
    Rejected {
        object: String,
        reason: &'static str,
        detail: String,
    },
    /// The call breaks a rule of the run; `reason` is its stable code (`window_closed`,
    /// `window_not_open`, `state_ahead`, `optimizer_state_missing`, …).
    #[error("{detail}")]
    Refused { reason: RoundReason, detail: String },
    /// Another object already holds the name, with other content; nothing was overwritten.
    #[error("{object}: {detail}")]
    Conflict { object: String, detail: String },
    /// An object the call needs is not there.
    #[error("{object}: {detail}")]
    Missing { object: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("codec: {0}")]
    Codec(#[from] codec::CodecError),
    /// Not (yet) published: callers that replay may wait and retry; a window that was never
    /// aggregated is published by its aggregator, late (`shardrop aggregate --window W`).
    #[error(
        "window {window}: no aggregate at {object} (not published yet: wait for it, e.g. `--wait SECS`; if the window was never aggregated, its aggregator publishes it with `shardrop aggregate --window {window}`)"
    )]
    NoAggregate { window: u64, object: String },
    /// Reading one window's aggregate failed; the source keeps its class and reason.
    #[error("window {window}: {source}")]
    Aggregate {
        window: u64,
        #[source]
        source: EnvelopeError,
    },
    /// The local disk failed (a spool folder, a state folder, a part file): class `store`,
    /// with the path, as for a store that failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A failure of this program or its device (serialising its own output, a GPU), not of
    /// any input.
    #[error("{0}")]
    Internal(String),
}

impl RoundError {
    /// A local-disk failure at `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> RoundError {
        RoundError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl crate::error::Classified for RoundError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            RoundError::Caller(_) => ErrorClass::Caller,
            RoundError::Rejected { .. } => ErrorClass::Rejected,
            RoundError::Refused { .. } => ErrorClass::Refused,
            RoundError::Conflict { .. } => ErrorClass::Conflict,
            RoundError::Missing { .. } | RoundError::NoAggregate { .. } => ErrorClass::NotFound,
            RoundError::Store(e) => e.class(),
            RoundError::Envelope(e) | RoundError::Aggregate { source: e, .. } => e.class(),
            RoundError::Codec(e) => e.class(),
            RoundError::Io { .. } => ErrorClass::Store,
            RoundError::Internal(_) => ErrorClass::Internal,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            RoundError::Rejected { reason, .. } => Some(reason),
            RoundError::Refused { reason, .. } => Some(reason.code()),
            RoundError::Envelope(e) | RoundError::Aggregate { source: e, .. } => e.reason(),
            RoundError::Codec(e) => crate::error::Classified::reason(e),
            _ => None,
        }
    }

    fn object(&self) -> Option<&str> {
        match self {
            RoundError::Rejected { object, .. }
            | RoundError::Conflict { object, .. }
            | RoundError::Missing { object, .. }
            | RoundError::NoAggregate { object, .. } => Some(object),
            RoundError::Io { path, .. } => Some(path),
            RoundError::Envelope(e) | RoundError::Aggregate { source: e, .. } => e.object(),
            RoundError::Store(e) => e.object(),
            _ => None,
        }
    }
}

/// A GPU codec failure: a codec verdict stays one; a device failure (driver, compile,
/// memory) fails the operation, which the caller may redo on the CPU.
#[cfg(feature = "cuda")]
impl From<crate::format::codec::gpu::GpuError> for RoundError {
    fn from(e: crate::format::codec::gpu::GpuError) -> Self {
        match e {
            crate::format::codec::gpu::GpuError::Codec(c) => RoundError::Codec(c),
            other => RoundError::Internal(format!("GPU: {other}")),
        }
    }
}
