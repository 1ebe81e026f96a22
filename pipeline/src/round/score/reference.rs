//! The whole-update reference for the validator's statistics: each update as one sparse
//! vector over the model, compared pair by pair, agreement from a dense sum. It holds every
//! update and a model-sized buffer, so the validator does not use it ([`super::gram`]
//! streams the same sums); tests check the two agree, and small tools may use it.

use std::collections::HashMap;

use crate::format::codec::{CodecError, EncodedTensor, ModelSpec, to_sparse};

/// A decoded update as one sparse vector over the whole model (tensors concatenated in
/// model order), indices ascending.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseUpdate {
    /// Flat indices into the concatenated model, ascending.
    pub idx: Vec<u64>,
    /// The decoded values at those indices.
    pub val: Vec<f32>,
    /// The update's L2 norm.
    pub norm: f64,
}

fn offsets(model: &ModelSpec) -> HashMap<&str, u64> {
    let mut off = 0u64;
    model
        .tensors
        .iter()
        .map(|t| {
            let o = off;
            off += t.shape.iter().product::<u64>();
            (t.name.as_str(), o)
        })
        .collect()
}

impl SparseUpdate {
    /// From `(flat index, value)` pairs (sorted here).
    pub fn from_pairs(mut pairs: Vec<(u64, f32)>) -> SparseUpdate {
        pairs.sort_by_key(|p| p.0);
        let norm = pairs
            .iter()
            .map(|(_, v)| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let (idx, val) = pairs.into_iter().unzip();
        SparseUpdate { idx, val, norm }
    }

    /// From a miner's checked tensors (zeros dropped).
    pub fn from_tensors(model: &ModelSpec, tensors: &[EncodedTensor]) -> Result<Self, CodecError> {
        let off = offsets(model);
        let mut pairs = Vec::new();
        for t in tensors {
            let base = off.get(t.name.as_str()).copied().unwrap_or(0);
            let (idx, val) = to_sparse(t)?;
            pairs.extend(
                idx.into_iter()
                    .zip(val)
                    .filter(|(_, v)| *v != 0.0)
                    .map(|(i, v)| (base + i, v)),
            );
        }
        Ok(SparseUpdate::from_pairs(pairs))
    }
}

/// `(shared indices, dot product over them)` of two ascending sparse vectors.
fn intersect(a: &SparseUpdate, b: &SparseUpdate) -> (usize, f64, f64) {
    let (mut i, mut j, mut n, mut dot, mut b_on_a) = (0, 0, 0usize, 0f64, 0f64);
    while i < a.idx.len() && j < b.idx.len() {
        match a.idx[i].cmp(&b.idx[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                dot += a.val[i] as f64 * b.val[j] as f64;
                b_on_a += (b.val[j] as f64).powi(2);
                i += 1;
                j += 1;
            }
        }
    }
    (n, dot, b_on_a.sqrt())
}

/// Jaccard overlap of the index sets and cosine of the values of two miners' updates.
pub fn similarity(a: &SparseUpdate, b: &SparseUpdate) -> (f64, f64) {
    let (n, dot, _) = intersect(a, b);
    let union = a.idx.len() + b.idx.len() - n;
    let jaccard = if union == 0 {
        0.0
    } else {
        n as f64 / union as f64
    };
    let cos = if a.norm > 0.0 && b.norm > 0.0 {
        dot / (a.norm * b.norm)
    } else {
        0.0
    };
    (jaccard, cos)
}

/// Containment of `a`'s indices in the aggregate's support, and the cosine of `a` with the
/// aggregate restricted to `a`'s indices (an aggregate has many more non-zeros than one
/// miner, so the whole-vector cosine would hide a re-encoded copy).
pub fn similarity_to_aggregate(a: &SparseUpdate, g: &SparseUpdate) -> (f64, f64) {
    let (n, dot, g_on_a) = intersect(a, g);
    let containment = if a.idx.is_empty() {
        0.0
    } else {
        n as f64 / a.idx.len() as f64
    };
    let cos = if a.norm > 0.0 && g_on_a > 0.0 {
        dot / (a.norm * g_on_a)
    } else {
        0.0
    };
    (containment, cos)
}

/// Cosine of each accepted update with the sum of the other eligible ones (`None` when
/// there is no other, or the update is not accepted).
pub fn agreement(
    total_len: usize,
    updates: &[Option<SparseUpdate>],
    eligible: &[bool],
) -> Vec<Option<f64>> {
    let mut sum = vec![0f64; total_len];
    for (u, _) in updates.iter().zip(eligible).filter(|(_, e)| **e) {
        if let Some(u) = u {
            for (&i, &v) in u.idx.iter().zip(&u.val) {
                sum[i as usize] += v as f64;
            }
        }
    }
    let sum_sq: f64 = sum.iter().map(|x| x * x).sum();
    let others = eligible.iter().filter(|e| **e).count();
    updates
        .iter()
        .zip(eligible)
        .map(|(u, &e)| {
            let u = u.as_ref()?;
            if others < 1 + e as usize || u.norm == 0.0 {
                return None;
            }
            let dot_s: f64 = u
                .idx
                .iter()
                .zip(&u.val)
                .map(|(&i, &v)| v as f64 * sum[i as usize])
                .sum();
            let uu = u.norm * u.norm;
            let (dot, rest_sq) = if e {
                (dot_s - uu, sum_sq - 2.0 * dot_s + uu)
            } else {
                (dot_s, sum_sq)
            };
            (rest_sq > 0.0).then(|| (dot / (u.norm * rest_sq.max(0.0).sqrt())).clamp(-1.0, 1.0))
        })
        .collect()
}
