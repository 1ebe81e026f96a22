//! The agg-v2 verdict: the list of a window's accepted shards that the aggregator signs
//! (`schemas/round.md`, "Aggregate, agg-v2").
//!
//! agg-v1 shipped the merged tensor, which at ~20 peers is ~27 % dense and 2.5× larger than
//! the shards themselves. agg-v2 ships the decision instead: which shards, with which
//! weights, byte for byte which sections. Every reader then merges exactly as the aggregator
//! would have (f32, peer order, two roundings), so parameters stay bit-identical while each
//! peer downloads no more than the accepted shards.

use crate::round::RoundReason;
use serde::{Deserialize, Serialize};

use crate::format::envelope::SectionEntry;
use crate::format::layout;
use crate::identity::PeerId;
use crate::round::registry::{AggForm, Registry, Role};

/// The section of an agg-v2 envelope that holds the list.
pub const LIST_SECTION: &str = "accepted.json";

/// The signed list (JSON, the only section of an agg-v2 aggregate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedList {
    /// `agg-v2`.
    pub format: String,
    /// The window.
    pub window: u64,
    /// Where the sections are: the aggregator's copies or the miners' objects.
    pub form: AggForm,
    /// The accepted shards in peer-id order (the merge order).
    pub accepted: Vec<AcceptedShard>,
    /// Form `merged`: the object holding their merged tensor, which readers use instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<MergedObject>,
}

/// The merged tensor of a window (form `merged`): a blob the aggregator signed, one agg-v1
/// tensor section `tNNNNN` per model tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergedObject {
    /// Its key in the aggregator's store (`layout::agg_merged`).
    pub object: String,
    /// Its section table.
    pub sections: Vec<ListedSection>,
}

/// One accepted shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedShard {
    /// The miner's peer id (it signed the shard).
    pub peer: String,
    /// The object's key under its store's root: the aggregator's copy (`shards`) or the
    /// miner's layout key (`reference`).
    pub object: String,
    /// blake3 over the section hashes (the duplicate rule's content hash).
    pub content: String,
    /// Merge weight, f32 as written by the aggregator: clip scale / number accepted. Read
    /// as its decimal rounded once to f32; the text must be the shortest form
    /// ([`AcceptedList::parse`]).
    #[serde(deserialize_with = "crate::numbers::f32_text")]
    pub weight: f32,
    /// Whether the weight was reduced by the outlier rule.
    pub clipped: bool,
    /// The shard's section table, as the miner signed it.
    pub sections: Vec<ListedSection>,
}

/// One section of an accepted shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedSection {
    /// `tAAAAA-BBBBB`.
    pub name: String,
    /// blake3 of the stored (compressed) bytes, lowercase hex.
    pub hash: String,
    /// Stored length.
    pub len: u64,
    /// Decompressed length.
    pub raw_len: u64,
}

impl From<&SectionEntry> for ListedSection {
    fn from(e: &SectionEntry) -> Self {
        ListedSection {
            name: e.name.clone(),
            hash: e.hash.clone(),
            len: e.len,
            raw_len: e.raw_len,
        }
    }
}

/// Why a list is refused: a stable reason code and a detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListFault {
    /// `agg_verdict` (order, peers, keys, form) or `agg_weights`.
    pub reason: &'static str,
    /// What is wrong, naming the entry.
    pub detail: String,
}

fn fault(reason: &'static str, detail: String) -> ListFault {
    ListFault { reason, detail }
}

/// The key an accepted shard of `peer` must be read from under `form`.
pub(crate) fn shard_key(reg: &Registry, form: AggForm, w: u64, peer: &PeerId) -> String {
    match form.consolidated() {
        true => layout::agg_shard(&reg.run, w, peer),
        false => layout::grad(&reg.run, w, peer),
    }
}

/// The weights of a list and nothing else: how [`AcceptedList::parse`] sees each weight's
/// text without a second copy of the list's shape.
#[derive(Deserialize)]
struct WeightsOnly {
    accepted: Vec<WeightOnly>,
}

#[derive(Deserialize)]
struct WeightOnly {
    weight: crate::numbers::F32Text,
}

impl AcceptedList {
    /// Parses a signed list (its `accepted.json` bytes): `agg_verdict` if it is not a list,
    /// `agg_weights` if a weight is not written in its shortest form (one weight, one
    /// signed text: `round.md`, "Numbers").
    pub fn parse(bytes: &[u8]) -> Result<AcceptedList, ListFault> {
        let list: AcceptedList = serde_json::from_slice(bytes).map_err(|e| {
            fault(
                RoundReason::AggVerdict.code(),
                format!("{LIST_SECTION}: {e}"),
            )
        })?;
        let texts: WeightsOnly = serde_json::from_slice(bytes).map_err(|e| {
            fault(
                RoundReason::AggVerdict.code(),
                format!("{LIST_SECTION}: {e}"),
            )
        })?;
        if let Some(i) = texts.accepted.iter().position(|w| !w.weight.shortest) {
            return Err(fault(
                RoundReason::AggWeights.code(),
                format!(
                    "entry {i}'s weight is not written as the shortest decimal of its f32 ({:e})",
                    texts.accepted[i].weight.value
                ),
            ));
        }
        Ok(list)
    }

    /// Checks what a reader can check without fetching a shard: the format, window and form
    /// the registry names; strictly ascending peer ids, each a registered miner, each at its
    /// layout key; and the weights the rule gives (`1/n` in f32, less only when clipped,
    /// and clipping only with at least 3 accepted).
    pub fn check(&self, reg: &Registry, w: u64) -> Result<(), ListFault> {
        // An empty list of a `merged` run names no merged object (there is nothing to
        // merge); any other `merged` list names exactly the window's object.
        let merged_ok = match (&self.merged, self.form) {
            (Some(m), AggForm::Merged) => {
                !self.accepted.is_empty() && m.object == layout::agg_merged(&reg.run, w)
            }
            (None, AggForm::Merged) => self.accepted.is_empty(),
            (None, _) => true,
            (Some(_), _) => false,
        };
        if !merged_ok {
            return Err(fault(
                RoundReason::AggVerdict.code(),
                "the merged object is missing, misplaced, or listed for another form".into(),
            ));
        }
        let fixed = matches!(
            self.form,
            AggForm::Shards | AggForm::Merged | AggForm::Reference
        );
        if self.format != "agg-v2"
            || self.window != w
            || !fixed
            || !reg.aggregate.form.allows(self.form)
        {
            return Err(fault(
                RoundReason::AggVerdict.code(),
                format!(
                    "list says {} window {} form {}; expected agg-v2 window {w} in a run of form {}",
                    self.format,
                    self.window,
                    self.form.name(),
                    reg.aggregate.form.name()
                ),
            ));
        }
        let miners = reg.with_role(Role::Miner);
        let n = self.accepted.len();
        let full = (1.0f64 / n.max(1) as f64) as f32;
        let names = reg.section_names();
        for (i, a) in self.accepted.iter().enumerate() {
            if i > 0 && self.accepted[i - 1].peer >= a.peer {
                return Err(fault(
                    RoundReason::AggVerdict.code(),
                    format!("entry {i} ({}) is not in peer-id order", a.peer),
                ));
            }
            let peer = PeerId::parse(&a.peer)
                .ok()
                .filter(|_| miners.iter().any(|m| m.peer == a.peer))
                .ok_or_else(|| {
                    fault(
                        RoundReason::AggVerdict.code(),
                        format!("entry {i} names {:?}, not a registered miner", a.peer),
                    )
                })?;
            let content =
                crate::round::publish::content_hash_of(a.sections.iter().map(|s| &s.hash));
            if a.content != content {
                return Err(fault(
                    RoundReason::AggVerdict.code(),
                    format!(
                        "entry {i} ({}) names content {:?}, but its sections hash to {content:?}",
                        a.peer, a.content
                    ),
                ));
            }
            if a.sections.len() != names.len()
                || a.sections.iter().zip(&names).any(|(s, n)| &s.name != n)
            {
                return Err(fault(
                    RoundReason::AggVerdict.code(),
                    format!(
                        "entry {i} ({}) lists sections that are not the run's packing at {} bytes",
                        a.peer, reg.section_bytes
                    ),
                ));
            }
            let key = shard_key(reg, self.form, w, &peer);
            if a.object != key {
                return Err(fault(
                    RoundReason::AggVerdict.code(),
                    format!(
                        "entry {i} ({}) points at {:?}, not {key:?}",
                        a.peer, a.object
                    ),
                ));
            }
            let ok = match a.clipped {
                false => a.weight.to_bits() == full.to_bits(),
                // Clipped: (0, f32(1/n)], since a norm just above the cap rounds to f32(1/n).
                true => n >= 3 && a.weight > 0.0 && a.weight <= full,
            };
            if !ok {
                return Err(fault(
                    RoundReason::AggWeights.code(),
                    format!(
                        "entry {i} ({}) has weight {:e}{}; with {n} accepted the rule gives {full:e}{}",
                        a.peer,
                        a.weight,
                        if a.clipped { " (clipped)" } else { "" },
                        if a.clipped {
                            " at most (and more than 0), and clipping needs 3 or more"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::codec::{CodecParams, ModelSpec, TensorSpec};
    use crate::identity::Identity;
    use crate::round::registry::Participant;

    fn run(form: AggForm) -> (Registry, Vec<PeerId>) {
        let op = Identity::generate();
        let model = ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![1024],
                dtype: crate::format::codec::InDtype::F32,
            }],
        };
        let mut reg = Registry::new("r", &op.peer_id(), 0, 10, 5, model, CodecParams::default());
        reg.aggregate.form = form;
        let mut peers: Vec<PeerId> = (0..3).map(|_| Identity::generate().peer_id()).collect();
        peers.sort_by_key(|p| p.to_string());
        for p in &peers {
            reg.participants
                .push(Participant::new(Role::Miner, p, "file:///m".into()));
        }
        (reg, peers)
    }

    fn list(reg: &Registry, peers: &[PeerId], w: u64) -> AcceptedList {
        let sections = |i: usize| {
            vec![ListedSection {
                name: reg.section_names()[0].clone(),
                hash: format!("{i:064x}"),
                len: 10,
                raw_len: 20,
            }]
        };
        AcceptedList {
            format: "agg-v2".into(),
            window: w,
            form: AggForm::Shards,
            accepted: peers
                .iter()
                .enumerate()
                .map(|(i, p)| AcceptedShard {
                    peer: p.to_string(),
                    object: shard_key(reg, AggForm::Shards, w, p),
                    content: crate::round::publish::content_hash_of(
                        sections(i).iter().map(|s| &s.hash),
                    ),
                    weight: (1.0f64 / peers.len() as f64) as f32,
                    clipped: false,
                    sections: sections(i),
                })
                .collect(),
            merged: None,
        }
    }

    #[test]
    fn lists_break_no_rule_a_reader_can_check() {
        let (reg, peers) = run(AggForm::Shards);
        let good = list(&reg, &peers, 4);
        good.check(&reg, 4).unwrap();
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(AcceptedList::parse(&bytes).unwrap(), good);
        // The content must be its sections' hash.
        let mut l = good.clone();
        l.accepted[1].content = "00".repeat(32);
        assert_eq!(l.check(&reg, 4).unwrap_err().reason, "agg_verdict");
        // The sections must be the run's packing.
        let mut l = good.clone();
        l.accepted[0].sections[0].name = "t00000-00001".into();
        l.accepted[0].content =
            crate::round::publish::content_hash_of(l.accepted[0].sections.iter().map(|s| &s.hash));
        let f = l.check(&reg, 4).unwrap_err();
        assert_eq!(f.reason, "agg_verdict");
        assert!(f.detail.contains("packing"), "{}", f.detail);
        // A weight written with more digits than its f32 needs: the same value, refused.
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"weight\":0.33333334"), "{text}");
        let long = text.replacen("\"weight\":0.33333334", "\"weight\":0.333333343", 1);
        let f = AcceptedList::parse(long.as_bytes()).unwrap_err();
        assert_eq!(f.reason, "agg_weights", "{}", f.detail);
        let spelled = text.replacen("\"weight\":0.33333334", "\"weight\":3.3333334e-1", 1);
        assert_eq!(AcceptedList::parse(spelled.as_bytes()).unwrap(), good);
    }

    #[test]
    fn empty_lists_are_valid_in_every_form_and_name_no_merged_object() {
        for form in [
            AggForm::Auto,
            AggForm::Shards,
            AggForm::Merged,
            AggForm::Reference,
        ] {
            let (reg, _) = run(form);
            let used = match form {
                AggForm::Auto => AggForm::Shards,
                f => f,
            };
            let empty = AcceptedList {
                format: "agg-v2".into(),
                window: 2,
                form: used,
                accepted: Vec::new(),
                merged: None,
            };
            empty.check(&reg, 2).unwrap();
            if form == AggForm::Merged {
                let mut with = empty.clone();
                with.merged = Some(MergedObject {
                    object: layout::agg_merged(&reg.run, 2),
                    sections: Vec::new(),
                });
                assert_eq!(with.check(&reg, 2).unwrap_err().reason, "agg_verdict");
            }
        }
    }
}
