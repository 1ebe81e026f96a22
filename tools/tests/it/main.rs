//! The CLI's integration tests in one binary (as ripgrep's `tests/tests.rs`): one module
//! per concern, sharing `common` (running the binary, the S3 setup). Run one module with a
//! filter: `cargo test -p shardrop-tools --test it chaos::`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

mod attack_cli;
mod chaos;
mod ckpt_cli;
mod commands;
mod deploy;
mod exit_codes;
mod first_hour;
mod grad_cli;
mod outer_cli;
mod readme;
mod same_bytes;
