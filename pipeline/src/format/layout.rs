//! Run, window and step to object keys: the only place keys are built, so every job agrees
//! on where things are. Numbers are zero-padded so that listings sort in time order.

use crate::identity::PeerId;

/// The run's registry (operator-signed, replaced by compare-and-swap).
pub fn registry(run: &str) -> String {
    format!("runs/{run}/registry")
}

/// A miner's shard for `window`, in its own store.
pub fn grad(run: &str, window: u64, peer: &PeerId) -> String {
    format!("{}{peer}.grad", grads_dir(run, window))
}

/// The signed commit naming a shard's content, written a second before the shard
/// (`round.md`, "Duplicates").
pub fn grad_commit(run: &str, window: u64, peer: &PeerId) -> String {
    format!("runs/{run}/grads/{window:010}/{peer}.commit")
}

/// The object a participant overwrites to read the store's clock.
pub fn clock_probe(run: &str, peer: &PeerId) -> String {
    format!("runs/{run}/clock/{peer}")
}

/// The folder of every shard of `window` (zero-padded so listings sort by window).
pub(crate) fn grads_dir(run: &str, window: u64) -> String {
    format!("runs/{run}/grads/{window:010}/")
}

/// The aggregate of `window` (the aggregator's commit point for that window).
pub fn agg(run: &str, window: u64) -> String {
    format!("runs/{run}/aggs/{window:010}.agg")
}

/// The aggregator's byte-for-byte copy of miner `peer`'s shard of `window` (agg-v2,
/// form `shards`): readers need only the aggregator's store, and old windows survive miners
/// deleting their shards.
pub fn agg_shard(run: &str, window: u64, peer: &PeerId) -> String {
    format!("runs/{run}/aggs/{window:010}/{peer}.grad")
}

/// The merged tensor of `window` (agg-v2, form `merged`): a signed blob of agg-v1 tensor
/// sections that the window's list names.
pub fn agg_merged(run: &str, window: u64) -> String {
    format!("runs/{run}/aggs/{window:010}/merged")
}

/// A split-merge worker's range checks for window `w` (part `i` of `k`).
pub(crate) fn agg_checks(run: &str, window: u64, i: usize, k: usize) -> String {
    format!("runs/{run}/aggs/{window:010}.checks-{i:04}-of-{k:04}")
}

/// A split-merge worker's merged tensors for window `w` (part `i` of `k`).
pub(crate) fn agg_part(run: &str, window: u64, i: usize, k: usize) -> String {
    format!("runs/{run}/aggs/{window:010}.part-{i:04}-of-{k:04}")
}

/// The aggregator's Parquet ledger of `window`.
pub fn ledger(run: &str, window: u64) -> String {
    format!("runs/{run}/ledger/{window:010}.parquet")
}

/// A validator's Parquet score table of `window`.
pub fn scores(run: &str, window: u64) -> String {
    format!("runs/{run}/scores/{window:010}.parquet")
}

/// The folder of score tables (listed by `scores show --last` and `scores history`).
pub(crate) fn scores_dir(run: &str) -> String {
    format!("runs/{run}/scores/")
}

/// The validator's signed weights for window `w` (it also binds the score table's hash).
pub fn weights(run: &str, window: u64) -> String {
    format!("runs/{run}/weights/{window:010}.weights")
}

/// The folder of checkpoint `step`.
pub fn ckpt_dir(run: &str, step: u64) -> String {
    format!("runs/{run}/ckpt/{step:012}/")
}

/// The signed manifest of checkpoint `step` (its commit point).
pub fn ckpt_manifest(run: &str, step: u64) -> String {
    format!("runs/{run}/ckpt/{step:012}/manifest")
}

/// A shard or the HF index of checkpoint `step`, by its file name in the manifest.
pub fn ckpt_object(run: &str, step: u64, file: &str) -> String {
    format!("runs/{run}/ckpt/{step:012}/{file}")
}

/// A small file of the model folder (config, tokenizer…) that travels with checkpoint `step`.
pub(crate) fn ckpt_file(run: &str, step: u64, name: &str) -> String {
    format!("runs/{run}/ckpt/{step:012}/files/{name}")
}

/// The checkpoint folder of all runs' checkpoints (listed by `ckpt ls` and `gc`).
pub(crate) fn ckpt_root(run: &str) -> String {
    format!("runs/{run}/ckpt/")
}

/// The mutable pointer to the newest checkpoint (compare-and-swap).
pub fn ckpt_latest(run: &str) -> String {
    format!("runs/{run}/ckpt/LATEST")
}

/// The folder of one kind of per-window object (`aggs`, `ledger`, `scores`, `weights`,
/// `grads`, `blobs`), for listings and retention.
pub(crate) fn run_folder(run: &str, folder: &str) -> String {
    format!("runs/{run}/{folder}/")
}

/// Generic signed objects (`shardrop sign`, the demo's first stage).
pub fn blob(run: &str, window: u64, peer: &PeerId) -> String {
    format!("runs/{run}/blobs/{window:010}/{peer}.blob")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn keys_are_padded_and_sort_by_number() {
        let p = Identity::from_seed([1; 32]).peer_id();
        assert_eq!(agg("r", 7), "runs/r/aggs/0000000007.agg");
        assert!(grad("r", 9, &p) < grad("r", 10, &p));
        assert!(ckpt_manifest("r", 99) < ckpt_manifest("r", 100));
        assert!(grad("r", 3, &p).starts_with(&grads_dir("r", 3)));
    }
}
