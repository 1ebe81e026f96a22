//! The training round, bottom to top: the run's clock, the outer optimizer, the registry,
//! a miner's publish, the verdicts both round jobs share, the aggregate (list, merge,
//! publish), the readers' merge and replay, and the validator's scores.

mod error;
pub use error::{RoundError, RoundReason};

pub mod accepted;
pub mod aggregate;
pub mod evaluate;
pub mod merge;
pub mod outer;
pub mod publish;
pub mod registry;
pub mod replay;
pub mod score;
pub mod verdict;
pub mod window;
