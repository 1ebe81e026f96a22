//! The round's error: every failure of publishing, verdicts, aggregation, replay and
//! scoring, one classified type ([`crate::error::ErrorClass`]). Lower layers' errors
//! (store, envelope, codec) convert into it once, through `From`; the registry's conversion
//! sits beside `RegistryError`.

use crate::format::codec;
use crate::format::envelope::EnvelopeError;
use crate::store::StoreError;

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
    Refused {
        reason: &'static str,
        detail: String,
    },
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
    /// Not (yet) published: callers that replay may wait and retry.
    #[error("window {window}: no aggregate at {object}")]
    NoAggregate { window: u64, object: String },
    /// Reading one window's aggregate failed; the source keeps its class and reason.
    #[error("window {window}: {source}")]
    Aggregate {
        window: u64,
        #[source]
        source: EnvelopeError,
    },
    /// A failure of this program or its device (serialising its own output, a GPU), not of
    /// any input.
    #[error("{0}")]
    Internal(String),
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
            RoundError::Internal(_) => ErrorClass::Internal,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            RoundError::Rejected { reason, .. } | RoundError::Refused { reason, .. } => {
                Some(reason)
            }
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
