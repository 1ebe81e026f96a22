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
