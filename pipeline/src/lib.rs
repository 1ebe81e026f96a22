//! shardrop: exchange signed, compressed gradients and checkpoints through object storage only.
//!
//! Every participant writes only to its own bucket and reads everyone else's without trust:
//! each object is a signed [`envelope`] that is verified before use, and every refusal carries
//! a stable [`envelope::Reason`]. See `schemas/` for the normative formats and the README for
//! the roles.

#![warn(missing_docs)]

pub mod accepted;
pub mod aggregate;
pub mod checkpoint;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod evaluate;
pub mod exchange;
pub mod files;
pub mod identity;
pub mod layout;
pub mod merge;
pub mod numbers;
pub mod outer;
pub mod refmodel;
pub mod registry;
pub mod score;
pub mod store;
pub mod tables;
pub mod verdict;
pub mod window;
