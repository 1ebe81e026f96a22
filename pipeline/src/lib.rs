//! shardrop: exchange signed, compressed gradients and checkpoints through object storage only.
//!
//! Every participant writes only to its own bucket and reads everyone else's without trust:
//! each object is a signed [`envelope`](format::envelope) that is verified before use, and every refusal carries
//! a stable [`Reason`](format::envelope::Reason). See `schemas/` for the normative formats and the README for
//! the roles.

#![warn(missing_docs)]

pub mod error;
pub mod files;
pub mod identity;
pub mod numbers;

pub mod store;

pub mod format;

pub mod round;

pub mod checkpoint;

pub mod refmodel;

/// The library error `e` is, as [`error::Classified`]: its class, reason code and object.
/// The one place every error type of the library is known, so a face (the CLI walking an
/// error's chain, the Python package) classifies any failure the same way; `None` for an
/// error that is not the library's.
pub fn classified<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a dyn error::Classified> {
    macro_rules! first_of {
        ($($t:ty),+) => {
            $(if let Some(x) = e.downcast_ref::<$t>() {
                return Some(x);
            })+
        };
    }
    first_of!(
        round::RoundError,
        checkpoint::CkptError,
        round::registry::RegistryError,
        format::envelope::EnvelopeError,
        format::codec::CodecError,
        store::StoreError,
        identity::IdentityError
    );
    None
}
