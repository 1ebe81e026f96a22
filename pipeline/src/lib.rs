//! shardrop: exchange signed, compressed gradients and checkpoints through object storage only.
//!
//! Every participant writes only to its own bucket and reads everyone else's without trust:
//! each object is a signed [`envelope`](format::envelope) that is verified before use, and
//! every refusal carries a stable reason code ([`Reason`](format::envelope::Reason),
//! [`RoundReason`](round::RoundReason), …). See `schemas/` for the normative formats, the
//! README for the roles and `ARCHITECTURE.md` for the map of this crate.
//!
//! # The layers, bottom to top
//! - base: [`error`] (failure classes; [`classified`] finds any error's), [`numbers`],
//!   [`identity`] (keys), [`files`] (local files never trusted);
//! - [`store`]: URLs to object stores (S3, local folders, `memory://` for tests);
//! - [`format`](mod@format): what bytes mean — the signed [`envelope`](format::envelope), the gradient
//!   [`codec`](format::codec), the Parquet [`tables`](format::tables), object keys
//!   ([`layout`](format::layout));
//! - [`round`]: the training round — the run's [`registry`](round::registry), a miner's
//!   [`publish`](round::publish), the shared [`verdict`](round::verdict) pipeline, the
//!   [`aggregate`](round::aggregate), the readers' [`replay`](round::replay), the
//!   validator's [`score`](round::score);
//! - [`checkpoint`]: sharded safetensors with a signed manifest;
//! - `refmodel` (feature `refmodel`, on by default): the small real model the demo trains
//!   and the validator's built-in evaluator scores; a library user may leave it out.
//!
//! # One round, in memory
//! An operator registers a miner and an aggregator; the miner publishes its update for
//! window 0; once the window closes the aggregator verifies and merges it; a reader replays
//! the aggregate onto its parameters. The same calls run against S3 with `s3://` URLs.
//!
//! ```
//! # async fn round() -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::BTreeMap;
//! use shardrop::format::codec::{self, CodecParams, EfState};
//! use shardrop::identity::Identity;
//! use shardrop::round::aggregate::aggregate_window;
//! use shardrop::round::publish::{Update, clock, publish};
//! use shardrop::round::registry::{Job, Participant, Registry, Role};
//! use shardrop::round::replay::apply_aggregates;
//! use shardrop::round::window::store_now_ms;
//! use shardrop::store::{self, S3Options};
//!
//! let s3 = S3Options::default();
//! let (operator, miner, aggregator) = (Identity::generate(), Identity::generate(), Identity::generate());
//! let bucket = |who: &str| format!("memory://crate-guide/{who}");
//!
//! // A miner's update: f32 tensors as safetensors (a PyTorch state dict's layout).
//! let w: Vec<u8> = (0..4096).flat_map(|i| ((i as f32 * 0.37).sin() * 0.01).to_le_bytes()).collect();
//! let update = safetensors::serialize(
//!     [("w", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 64], &w)?)],
//!     None,
//! )?;
//!
//! // The operator: a run of 4-second windows starting now, the model the update's.
//! let op_store = store::open(&bucket("op"), &s3)?;
//! let now = store_now_ms(&op_store, "clock").await?;
//! let model = codec::model_of(&update)?;
//! let mut reg = Registry::new("guide", &operator.peer_id(), now, 4, 0, model, CodecParams::default());
//! reg.participants.push(Participant::new(Role::Miner, &miner.peer_id(), bucket("miner")));
//! reg.participants.push(Participant::new(Role::Aggregator, &aggregator.peer_id(), bucket("agg")));
//! let url = reg.create(&op_store, &operator).await?;
//! let (reg, _) = Registry::load(&url, &s3, Some(operator.peer_id())).await?;
//!
//! // The miner publishes window 0 (error feedback carried in `state` to the next window).
//! let mut state = EfState::default();
//! let published = publish(Job::new(&reg, &miner, &s3), Some(0), Update::file(&update, &mut state)).await?;
//! assert!(published.ratio > 10.0, "top-k and quantization shrink the update");
//!
//! // The aggregator, once the window has closed by the store's clock.
//! let closes = clock(&reg).closes(0);
//! while store_now_ms(&op_store, "clock").await? < closes {
//!     tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//! }
//! let agg = aggregate_window(Job::new(&reg, &aggregator, &s3), 0).await?;
//! assert_eq!((agg.accepted, agg.rejected), (1, 0));
//!
//! // Any reader: parameters plus the verified aggregate of window 0.
//! let mut theta = BTreeMap::from([("w".to_string(), vec![0f32; 4096])]);
//! assert_eq!(apply_aggregates(&reg, &s3, &mut theta, 0, 0).await?, 1);
//! assert!(theta["w"].iter().any(|&x| x != 0.0));
//! # Ok(())
//! # }
//! # tokio::runtime::Runtime::new().unwrap().block_on(round()).unwrap();
//! ```

#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod error;
pub mod files;
pub mod identity;
pub mod numbers;

pub mod store;

pub mod format;

pub mod round;

pub mod checkpoint;

#[cfg(feature = "refmodel")]
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
    #[cfg(feature = "cuda")]
    first_of!(format::codec::gpu::GpuError);
    None
}
