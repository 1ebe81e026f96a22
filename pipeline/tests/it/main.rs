//! The library's integration tests in one binary (as ripgrep's `tests/tests.rs` and
//! delta-rs's `tests/it/`): one module per concern, sharing `common` (the S3 setup),
//! `blessed` (golden-vector helpers) and `codec_cases`. One binary links once, where 19 did.
//! Run one module with a filter: `cargo test -p shardrop --test it round_s3::`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod blessed;
mod codec_cases;
mod codes;
mod common;

mod agg_v2_s3;
mod architecture;
mod attack_s3;
mod budget_s3;
mod checkpoint_s3;
mod envelope_remote;
mod golden;
mod golden_arithmetic;
mod golden_envelope_edges;
mod golden_gradient;
mod golden_round;
mod gpu_emulated;
#[cfg(feature = "cuda")]
mod gpu_parity;
mod round_s3;
mod s3_retry;
mod store_conformance;
mod streaming_memory;
#[cfg(feature = "refmodel")] // validates the reference model's updates
mod validate_s3;
