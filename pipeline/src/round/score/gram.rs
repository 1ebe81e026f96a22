//! The window's pairwise statistics, accumulated slab by slab: what agreement and copy
//! detection need, without a model-sized buffer.
//!
//! Agreement (cosine with the sum of the others) and copy detection (index overlap and value
//! cosine of two miners, containment in a past aggregate) depend on the updates only through
//! inner products and support counts. Those are sums over the model's elements, so they can
//! be accumulated over any partition of it: the validator feeds one slab of one tensor at a
//! time (every miner's entries in that slab, and each past aggregate's merged values there)
//! and keeps only `n × n` numbers. Memory: one block's index table (256 KiB), its entries,
//! and the matrices.
//!
//! Every sum runs in the order the whole-update reference ([`super::reference`]) uses —
//! ascending flat index — so overlaps, similarities and containments are the same bits;
//! agreement is the same within f64 rounding (it is assembled from the matrix instead of a
//! dense sum).

/// Elements per slab: what the caller decodes at once (each miner's entries there).
pub const SLAB: usize = 1 << 22;

/// Elements per block inside a slab: the pairs are found block by block, so the index table
/// (4 bytes per element, 256 KiB) and the block's entries stay in cache. Blocks go in
/// ascending order and each miner's entries in ascending order inside them, so every sum
/// still runs in ascending flat index.
const BLOCK: usize = 1 << 16;

const NONE: u32 = u32::MAX;

/// Inner products and support counts of a window's updates.
pub struct Gram {
    n: usize,
    /// Non-zero entries per miner.
    support: Vec<u64>,
    /// Squared norm per miner.
    sumsq: Vec<f64>,
    /// Shared non-zero indices, `i * n + j` for `i < j`.
    shared: Vec<u64>,
    /// Dot products, `i * n + j` for `i < j`.
    dot: Vec<f64>,
    /// Per past aggregate: its window and, per miner, what it shares with it.
    past: Vec<(u64, Vec<PastShare>)>,
    /// Per element of the current block: the latest arena entry at that index.
    head: Vec<u32>,
    /// (miner, value, previous entry at the same index, index in the block).
    arena: Vec<(u32, f32, u32, u32)>,
}

/// What one miner shares with a past aggregate: indices where both are non-zero, the dot
/// product, and the aggregate's squared norm on those indices.
type PastShare = (u64, f64, f64);

/// One miner's entries in a slab: indices relative to the slab's start, ascending.
pub type Entries<'a> = (&'a [u32], &'a [f32]);

impl Gram {
    /// Statistics for `n` miners and the past aggregates of `past` (their windows). A
    /// block's arena holds at most `n × BLOCK` entries: its 32-bit links allow n < 65,535.
    pub fn new(n: usize, past: &[u64]) -> Gram {
        Gram {
            n,
            support: vec![0; n],
            sumsq: vec![0.0; n],
            shared: vec![0; n * n],
            dot: vec![0.0; n * n],
            past: past.iter().map(|&w| (w, vec![(0, 0.0, 0.0); n])).collect(),
            head: Vec::new(),
            arena: Vec::new(),
        }
    }

    /// Adds one slab of `len` elements: each miner's entries there (`None`: it has none, or
    /// is out of the comparison) and each past aggregate's merged values there (`len` long,
    /// in the order `new` was given them). Zero values count as absent, as in the sparse
    /// reference.
    pub fn add(&mut self, len: usize, miners: &[Option<Entries<'_>>], past: &[&[f32]]) {
        let n = self.n;
        if self.head.len() < BLOCK {
            self.head.resize(BLOCK, NONE);
        }
        // Where each miner's entries of the current block start.
        let mut pos = vec![0usize; n];
        for b0 in (0..len).step_by(BLOCK) {
            let b1 = (b0 + BLOCK).min(len);
            self.arena.clear();
            for (j, e) in miners.iter().enumerate().take(n) {
                let Some((idx, val)) = e else { continue };
                while let (Some(&k), Some(&v)) = (idx.get(pos[j]), val.get(pos[j])) {
                    let k = k as usize;
                    if k >= b1 {
                        break;
                    }
                    pos[j] += 1;
                    if v != 0.0 && k >= b0 {
                        self.entry(j, k, b0, v, past);
                    }
                }
            }
            // `head` is all NONE again for the next block.
            for &(_, _, _, k) in &self.arena {
                self.head[k as usize] = NONE;
            }
        }
    }

    /// Miner `j`'s value `v` at slab index `k` (block starting at `b0`).
    fn entry(&mut self, j: usize, k: usize, b0: usize, v: f32, past: &[&[f32]]) {
        let n = self.n;
        self.support[j] += 1;
        self.sumsq[j] += (v as f64).powi(2);
        // Every earlier miner with an entry here: one shared index for the pair.
        let h = k - b0;
        let prev = self.head[h];
        let mut e = prev;
        while e != NONE {
            let (i, vi, prev, _) = self.arena[e as usize];
            let at = i as usize * n + j;
            self.shared[at] += 1;
            self.dot[at] += vi as f64 * v as f64;
            e = prev;
        }
        self.head[h] = self.arena.len() as u32;
        self.arena.push((j as u32, v, prev, h as u32));
        for ((_, per), g) in self.past.iter_mut().zip(past) {
            let g = g.get(k).copied().unwrap_or(0.0);
            if g != 0.0 {
                let s = &mut per[j];
                s.0 += 1;
                s.1 += v as f64 * g as f64;
                s.2 += (g as f64).powi(2);
            }
        }
    }

    /// Miner `i`'s norm.
    pub fn norm(&self, i: usize) -> f64 {
        self.sumsq[i].sqrt()
    }

    /// Jaccard overlap of two miners' index sets and cosine of their values.
    pub fn similarity(&self, i: usize, j: usize) -> (f64, f64) {
        let (a, b) = (i.min(j), i.max(j));
        let (n, dot) = (self.shared[a * self.n + b], self.dot[a * self.n + b]);
        let union = self.support[a] + self.support[b] - n;
        let jaccard = if union == 0 {
            0.0
        } else {
            n as f64 / union as f64
        };
        let (na, nb) = (self.norm(a), self.norm(b));
        let cos = if na > 0.0 && nb > 0.0 {
            dot / (na * nb)
        } else {
            0.0
        };
        (jaccard, cos)
    }

    /// The past aggregates compared (their windows, in `new`'s order).
    pub(crate) fn past_windows(&self) -> impl Iterator<Item = u64> + '_ {
        self.past.iter().map(|(w, _)| *w)
    }

    /// Containment of miner `i`'s indices in past aggregate `p`'s support, and the cosine
    /// with the aggregate restricted to them.
    pub(crate) fn to_past(&self, i: usize, p: usize) -> (f64, f64) {
        let (n, dot, g_sq) = self.past[p].1[i];
        let containment = if self.support[i] == 0 {
            0.0
        } else {
            n as f64 / self.support[i] as f64
        };
        let (na, ng) = (self.norm(i), g_sq.sqrt());
        let cos = if na > 0.0 && ng > 0.0 {
            dot / (na * ng)
        } else {
            0.0
        };
        (containment, cos)
    }

    /// Drops past aggregate `p` (it could not be read whole).
    pub(crate) fn forget_past(&mut self, p: usize) {
        self.past.remove(p);
    }

    /// Cosine of each miner in `with` with the sum of the eligible others (`None` when
    /// there is no other, or the miner is not in `with`).
    pub fn agreement(&self, with: &[bool], eligible: &[bool]) -> Vec<Option<f64>> {
        let n = self.n;
        let g = |i: usize, j: usize| match i.cmp(&j) {
            std::cmp::Ordering::Equal => self.sumsq[i],
            std::cmp::Ordering::Less => self.dot[i * n + j],
            std::cmp::Ordering::Greater => self.dot[j * n + i],
        };
        let e: Vec<usize> = (0..n).filter(|&j| eligible[j]).collect();
        // |Σ eligible|² from the matrix.
        let mut sum_sq = 0f64;
        for (x, &j) in e.iter().enumerate() {
            sum_sq += g(j, j);
            for &k in &e[x + 1..] {
                sum_sq += 2.0 * g(j, k);
            }
        }
        (0..n)
            .map(|i| {
                let norm = self.norm(i);
                if !with[i] || e.len() < 1 + eligible[i] as usize || norm == 0.0 {
                    return None;
                }
                let dot_s: f64 = e.iter().map(|&j| g(i, j)).sum();
                let uu = self.sumsq[i];
                let (dot, rest_sq) = if eligible[i] {
                    (dot_s - uu, sum_sq - 2.0 * dot_s + uu)
                } else {
                    (dot_s, sum_sq)
                };
                (rest_sq > 0.0).then(|| (dot / (norm * rest_sq.max(0.0).sqrt())).clamp(-1.0, 1.0))
            })
            .collect()
    }
}
