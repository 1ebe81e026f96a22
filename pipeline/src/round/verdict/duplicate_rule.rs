//! The duplicate rule (`round.md`, "Duplicates"): among shards of the same content, the earliest commit-v2 commitment inside the window wins.

use std::collections::BTreeMap;

pub(super) use crate::format::tables::Verdict;

use super::*;

/// The duplicate rule (`round.md`): among shards that passed every other check, those with
/// byte-identical sections form a group; the one whose commit landed strictly first keeps
/// its place, every other is `duplicate`. When no single commit is strictly first (none, or
/// a tie within the store's resolution) every member is a duplicate: an honest miner's
/// commit precedes its shard by a whole second, so only copiers and shards published
/// without the protocol end there. Returns, per shard, the fault and whose copy it is.
pub(super) fn duplicates(
    shards: &[MinerShard],
    faults: &[Option<Exclusion>],
) -> Vec<Option<(Exclusion, Option<String>)>> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (j, s) in shards.iter().enumerate() {
        if faults[j].is_none()
            && let Some(c) = &s.content
        {
            groups.entry(c.as_str()).or_default().push(j);
        }
    }
    let mut out = vec![None; shards.len()];
    for members in groups.values().filter(|m| m.len() > 1) {
        let first = members.iter().filter_map(|&j| shards[j].commit_ms).min();
        let winners: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&j| first.is_some() && shards[j].commit_ms == first)
            .collect();
        let winner = (winners.len() == 1).then(|| shards[winners[0]].peer.clone());
        for &j in members {
            if Some(&shards[j].peer) == winner.as_ref() {
                continue;
            }
            let detail = match &winner {
                Some(wp) => format!("the same update as {wp}, whose commit landed first"),
                None => format!(
                    "the same update as {} other shard(s), and no commit landed strictly first",
                    members.len() - 1
                ),
            };
            out[j] = Some((
                Exclusion::new(Verdict::Rejected, LedgerReason::Duplicate.code(), detail),
                winner.clone(),
            ));
        }
    }
    out
}
