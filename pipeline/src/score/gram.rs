//! The window's pairwise statistics, accumulated slab by slab: what agreement and copy
//! detection need, without a model-sized buffer.
//!
//! Agreement (cosine with the sum of the others) and copy detection (index overlap and value
//! cosine of two miners, containment in a past aggregate) depend on the updates only through
//! inner products and support counts. Those are sums over the model's elements, so they can
//! be accumulated over any partition of it: the validator feeds one slab of one tensor at a
//! time (every miner's entries in that slab, and each past aggregate's merged values there)
//! and keeps only `n × n` numbers. Memory: the slab (`SLAB` elements) and the matrices.
//!
//! Every sum runs in the order the whole-update reference ([`super::reference`]) uses —
//! ascending flat index — so overlaps, similarities and containments are the same bits;
//! agreement is the same within f64 rounding (it is assembled from the matrix instead of a
//! dense sum).

/// Elements per slab: the scratch is 4 bytes per element (16 MiB), whatever the model.
pub const SLAB: usize = 1 << 22;

const NONE: u32 = u32::MAX;

/// The slab length for `miners` miners: `SLAB`, or less where every miner keeping every
/// element could overflow the arena's 32-bit links.
pub fn slab_len(miners: usize) -> usize {
    SLAB.min((NONE as usize - 1) / miners.max(1)).max(1)
}

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
    /// Per slab element: the latest arena entry at that index.
    head: Vec<u32>,
    /// (miner, value, previous entry at the same index).
    arena: Vec<(u32, f32, u32)>,
}

/// What one miner shares with a past aggregate: indices where both are non-zero, the dot
/// product, and the aggregate's squared norm on those indices.
type PastShare = (u64, f64, f64);

/// One miner's entries in a slab: indices relative to the slab's start, ascending.
pub type Entries<'a> = (&'a [u32], &'a [f32]);

impl Gram {
    /// Statistics for `n` miners and the past aggregates of `past` (their windows).
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
        // `head` stays all NONE between slabs (the entries reset it below), so a slab costs
        // its entries, not its length.
        if self.head.len() < len {
            self.head.resize(len, NONE);
        }
        self.arena.clear();
        for (j, e) in miners.iter().enumerate().take(n) {
            let Some((idx, val)) = e else { continue };
            for (&k, &v) in idx.iter().zip(val.iter()) {
                let k = k as usize;
                if v == 0.0 || k >= len {
                    continue;
                }
                self.support[j] += 1;
                self.sumsq[j] += (v as f64).powi(2);
                // Every earlier miner with an entry here: one shared index for the pair.
                let prev = self.head[k];
                let mut e = prev;
                while e != NONE {
                    let (i, vi, prev) = self.arena[e as usize];
                    let at = i as usize * n + j;
                    self.shared[at] += 1;
                    self.dot[at] += vi as f64 * v as f64;
                    e = prev;
                }
                self.head[k] = self.arena.len() as u32;
                self.arena.push((j as u32, v, prev));
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
        }
        for (idx, _) in miners.iter().take(n).flatten() {
            for &k in idx.iter().filter(|&&k| (k as usize) < len) {
                self.head[k as usize] = NONE;
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
    pub fn past_windows(&self) -> impl Iterator<Item = u64> + '_ {
        self.past.iter().map(|(w, _)| *w)
    }

    /// Containment of miner `i`'s indices in past aggregate `p`'s support, and the cosine
    /// with the aggregate restricted to them.
    pub fn to_past(&self, i: usize, p: usize) -> (f64, f64) {
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
    pub fn forget_past(&mut self, p: usize) {
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
