use super::reference::{SparseUpdate, agreement, similarity, similarity_to_aggregate};
use super::*;
use crate::format::codec::{CodecLimits, EfState, EncodeOptions, encode_update, read_section};
use crate::refmodel::LinearTask;

fn sparse(pairs: &[(u64, f32)]) -> SparseUpdate {
    SparseUpdate::from_pairs(pairs.to_vec())
}

/// The window's statistics fed the way the validator feeds them: slab by slab (`slab`
/// elements of a model of `len`), each miner's entries and each past aggregate's values.
fn gram_of(
    updates: &[Option<&SparseUpdate>],
    past: &[(u64, SparseUpdate)],
    len: u64,
    slab: u64,
) -> Gram {
    let windows: Vec<u64> = past.iter().map(|(w, _)| *w).collect();
    let mut g = Gram::new(updates.len(), &windows);
    let cut = |u: &SparseUpdate, a: u64, b: u64| {
        let (x, y) = (
            u.idx.partition_point(|&i| i < a),
            u.idx.partition_point(|&i| i < b),
        );
        let idx: Vec<u32> = u.idx[x..y].iter().map(|&i| (i - a) as u32).collect();
        (idx, u.val[x..y].to_vec())
    };
    for a in (0..len).step_by(slab as usize) {
        let b = (a + slab).min(len);
        let entries: Vec<Option<(Vec<u32>, Vec<f32>)>> =
            updates.iter().map(|u| u.map(|u| cut(u, a, b))).collect();
        let views: Vec<Option<gram::Entries>> = entries
            .iter()
            .map(|e| e.as_ref().map(|(i, v)| (&i[..], &v[..])))
            .collect();
        let dense: Vec<Vec<f32>> = past
            .iter()
            .map(|(_, g)| {
                let (idx, val) = cut(g, a, b);
                let mut d = vec![0f32; (b - a) as usize];
                for (i, v) in idx.into_iter().zip(val) {
                    d[i as usize] = v;
                }
                d
            })
            .collect();
        let slabs: Vec<&[f32]> = dense.iter().map(Vec::as_slice).collect();
        g.add((b - a) as usize, &views, &slabs);
    }
    g
}

/// Random sparse updates with shared supports (some values exactly zero, some copies and
/// scaled copies), for comparing the streamed statistics with the whole-update reference.
fn random_window(seed: u64, miners: usize, len: u64) -> Vec<SparseUpdate> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out: Vec<SparseUpdate> = Vec::new();
    for m in 0..miners {
        if m >= 2 && next() % 4 == 0 {
            let src = &out[(next() % m as u64) as usize];
            let s = (next() % 5) as f32 - 2.0;
            let pairs = src.idx.iter().zip(&src.val).map(|(&i, &v)| (i, v * s));
            out.push(SparseUpdate::from_pairs(pairs.collect()));
            continue;
        }
        let mut pairs: Vec<(u64, f32)> = Vec::new();
        for i in 0..len {
            if next() % 7 < 2 {
                let v = match next() % 11 {
                    0 => 0.0,
                    r => (r as f32 - 5.5) * 0.37 + (next() % 1000) as f32 * 1e-4,
                };
                pairs.push((i, v));
            }
        }
        out.push(SparseUpdate::from_pairs(pairs));
    }
    // The reference drops zeros when it builds from tensors; do the same here.
    for u in &mut out {
        let keep: Vec<(u64, f32)> = u
            .idx
            .iter()
            .zip(&u.val)
            .filter(|(_, v)| **v != 0.0)
            .map(|(&i, &v)| (i, v))
            .collect();
        *u = SparseUpdate::from_pairs(keep);
    }
    out
}

#[test]
fn streamed_statistics_are_the_whole_update_reference() {
    // Slabs of one element, of a few, of several blocks (2¹⁶ each) and ragged ends.
    for (seed, miners, len, slab) in [
        (1, 6, 997, 64),
        (2, 9, 5000, 1 << 22),
        (3, 2, 300, 1),
        (4, 5, 200_000, 1 << 22),
        (5, 4, 150_000, 70_000),
    ] {
        let ups = random_window(seed, miners, len);
        let past: Vec<(u64, SparseUpdate)> = random_window(seed + 100, 2, len)
            .into_iter()
            .enumerate()
            .map(|(k, u)| (10 - k as u64, u))
            .collect();
        let refs: Vec<Option<&SparseUpdate>> = ups.iter().map(Some).collect();
        let g = gram_of(&refs, &past, len, slab);
        for i in 0..miners {
            // (An empty update's reference norm is −0.0: Rust's f64 sum starts there.)
            assert_eq!(g.norm(i), ups[i].norm, "norm {i}");
            for j in 0..miners {
                if i != j {
                    // Same sums in the same order: the same bits.
                    let (a, b) = (
                        g.similarity(i, j),
                        similarity(&ups[i.min(j)], &ups[i.max(j)]),
                    );
                    assert_eq!(
                        (a.0.to_bits(), a.1.to_bits()),
                        (b.0.to_bits(), b.1.to_bits())
                    );
                }
            }
            for (p, (_, agg)) in past.iter().enumerate() {
                let (a, b) = (g.to_past(i, p), similarity_to_aggregate(&ups[i], agg));
                assert_eq!(
                    (a.0.to_bits(), a.1.to_bits()),
                    (b.0.to_bits(), b.1.to_bits())
                );
            }
        }
        let all = vec![true; miners];
        let mut eligible = all.clone();
        eligible[1] = false;
        for el in [&all, &eligible] {
            let want = agreement(
                len as usize,
                &refs.iter().map(|u| u.cloned()).collect::<Vec<_>>(),
                el,
            );
            let got = g.agreement(&all, el);
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                match (a, b) {
                    (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{k}: {a} vs {b}"),
                    _ => assert_eq!(a, b, "{k}"),
                }
            }
        }
    }
}

#[test]
fn a_forgotten_past_aggregate_leaves_the_others() {
    let ups = random_window(7, 3, 400);
    let past: Vec<(u64, SparseUpdate)> = vec![(5, ups[0].clone()), (4, ups[1].clone())];
    let refs: Vec<Option<&SparseUpdate>> = ups.iter().map(Some).collect();
    let mut g = gram_of(&refs, &past, 400, 100);
    assert_eq!(g.to_past(1, 1).0, 1.0);
    g.forget_past(0);
    assert_eq!(g.past_windows().collect::<Vec<_>>(), [4]);
    assert_eq!(g.to_past(1, 0).0, 1.0, "window 4's numbers stayed with it");
}

#[test]
fn similarity_of_identical_disjoint_and_scaled() {
    let a = sparse(&[(1, 1.0), (5, -2.0), (9, 0.5)]);
    let (ov, cos) = similarity(&a, &a);
    assert_eq!(ov, 1.0);
    assert!((cos - 1.0).abs() < 1e-12);
    let b = sparse(&[(2, 1.0), (6, 1.0)]);
    assert_eq!(similarity(&a, &b), (0.0, 0.0));
    let c = sparse(&[(1, -2.0), (5, 4.0), (9, -1.0)]);
    let (ov, cos) = similarity(&a, &c);
    assert_eq!(ov, 1.0);
    assert!((cos + 1.0).abs() < 1e-12, "opposite direction: {cos}");
    // Half the indices shared.
    let d = sparse(&[(1, 1.0), (5, -2.0), (7, 3.0), (8, 1.0)]);
    assert!((similarity(&a, &d).0 - 2.0 / 5.0).abs() < 1e-12);
    // Containment in an aggregate, cosine on the miner's support only.
    let g = sparse(&[(1, 2.0), (3, 7.0), (5, -4.0), (9, 1.0), (11, -9.0)]);
    let (c, cos) = similarity_to_aggregate(&a, &g);
    assert_eq!(c, 1.0);
    assert!((cos - 1.0).abs() < 1e-12);
}

#[test]
fn agreement_is_leave_one_out() {
    let a = sparse(&[(0, 1.0)]);
    let b = sparse(&[(0, 1.0), (1, 1.0)]);
    let c = sparse(&[(1, -1.0)]);
    let ups = vec![Some(a), Some(b), Some(c), None];
    let got = agreement(2, &ups, &[true, true, true, false]);
    // a vs b + c = (1, 0): cosine 1; b vs a + c = (1, -1): 0; c vs a + b = (2, 1): -1/√5.
    assert!((got[0].unwrap() - 1.0).abs() < 1e-12);
    assert!(got[1].unwrap().abs() < 1e-12);
    assert!((got[2].unwrap() + 1.0 / 5f64.sqrt()).abs() < 1e-12);
    assert_eq!(got[3], None);
    // An ineligible (copying) miner is compared with all eligible ones, and is not in
    // their reference.
    let got = agreement(2, &ups, &[true, false, true, false]);
    assert!((got[0].unwrap() - 0.0).abs() < 1e-12, "a vs c only");
    assert!((got[1].unwrap() - 0.0).abs() < 1e-12, "b vs a + c = (1,-1)");
    // Alone: nothing to agree with.
    assert_eq!(agreement(2, &ups, &[true, false, false, false])[0], None);
    // The streamed statistics give the same numbers.
    let refs: Vec<Option<&SparseUpdate>> = ups.iter().map(|u| u.as_ref()).collect();
    let g = gram_of(&refs, &[], 2, 1);
    let with = [true, true, true, false];
    for el in [
        [true, true, true, false],
        [true, false, true, false],
        [true, false, false, false],
    ] {
        let (a, b) = (g.agreement(&with, &el), agreement(2, &ups, &el));
        for (x, y) in a.iter().zip(&b) {
            match (x, y) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-12),
                _ => assert_eq!(x, y),
            }
        }
    }
}

fn encode(task: &LinearTask, update: &[f32], state: &mut EfState) -> Vec<EncodedTensor> {
    let opts = EncodeOptions {
        params: crate::refmodel::codec_params(),
        beta: 0.9,
        section_bytes: 1 << 20,
    };
    let enc = encode_update(&task.to_safetensors(update).unwrap(), state, &opts).unwrap();
    enc.sections
        .iter()
        .flat_map(|(_, s)| read_section(s, None, &CodecLimits::default()).unwrap())
        .collect()
}

fn decoded(task: &LinearTask, tensors: &[EncodedTensor]) -> (SparseUpdate, Vec<f32>) {
    let mut d = vec![0f32; task.d_in * task.d_out];
    for t in tensors {
        accumulate(t, &mut d, 1.0).unwrap();
    }
    (
        SparseUpdate::from_tensors(&task.model_spec(), tensors).unwrap(),
        d,
    )
}

struct Seen {
    pair: (f64, f64),
    agg: (f64, f64),
    copy_pair: (f64, f64),
    copy_agg: (f64, f64),
    flags_on_honest: usize,
    copies_caught: usize,
    copies: usize,
}

/// Honest miners train the reference task on their own slices of the same distribution
/// (similar data), with error feedback, for several windows; a copier re-encodes one
/// miner's decoded update through its own codec state, another re-encodes the previous
/// aggregate. Returns what detection saw.
fn simulate(windows: u64, honest: usize) -> Seen {
    let task = LinearTask::standard();
    let th = CopyThresholds::default();
    let mut theta = task.init();
    let mut states = vec![EfState::default(); honest];
    let (mut copier_state, mut agg_copier_state) = (EfState::default(), EfState::default());
    let mut past: Vec<(u64, SparseUpdate)> = Vec::new();
    let mut prev_agg: Option<Vec<f32>> = None;
    let mut seen = Seen {
        pair: (0.0, -1.0),
        agg: (0.0, -1.0),
        copy_pair: (1.0, 1.0),
        copy_agg: (1.0, 1.0),
        flags_on_honest: 0,
        copies_caught: 0,
        copies: 0,
    };
    for w in 0..windows {
        let mut ups = Vec::new();
        let mut dense = Vec::new();
        for (i, st) in states.iter_mut().enumerate() {
            let g = task.pseudo_gradient(&theta, i as u64, w, 20);
            let (u, d) = decoded(&task, &encode(&task, &g, st));
            ups.push(u);
            dense.push(d);
        }
        // Copier: the decoded update of miner 0, re-encoded with its own state.
        let (copy, _) = decoded(&task, &encode(&task, &dense[0], &mut copier_state));
        ups.push(copy);
        // Aggregate copier: re-encodes the previous aggregate (from window 1 on).
        let agg_copy = prev_agg
            .as_ref()
            .map(|a| decoded(&task, &encode(&task, a, &mut agg_copier_state)).0);
        if let Some(u) = &agg_copy {
            ups.push(u.clone());
        }
        let peers: Vec<String> = (0..ups.len()).map(|i| format!("p{i:02}")).collect();
        let miners: Vec<Candidate> = (0..ups.len())
            .map(|i| Candidate {
                peer: &peers[i],
                order: Some(i as i64),
                accepted: true,
            })
            .collect();
        let refs: Vec<Option<&SparseUpdate>> = ups.iter().map(Some).collect();
        let gram = gram_of(&refs, &past, theta.len() as u64, 1000);
        let found = detect_copies(&miners, &gram, &th);
        for i in 0..honest {
            seen.flags_on_honest += found[i].copier as usize;
            for j in i + 1..honest {
                let (ov, cos) = similarity(&ups[i], &ups[j]);
                seen.pair = (seen.pair.0.max(ov), seen.pair.1.max(cos));
            }
            for (_, g) in &past {
                let (c, cos) = similarity_to_aggregate(&ups[i], g);
                seen.agg = (seen.agg.0.max(c), seen.agg.1.max(cos));
            }
        }
        let (ov, cos) = similarity(&ups[honest], &ups[0]);
        seen.copy_pair = (seen.copy_pair.0.min(ov), seen.copy_pair.1.min(cos));
        seen.copies += 1;
        seen.copies_caught +=
            (found[honest].copier && found[honest].nearest.as_deref() == Some("p00")) as usize;
        if agg_copy.is_some() {
            let (c, cos) = similarity_to_aggregate(&ups[honest + 1], &past[0].1);
            seen.copy_agg = (seen.copy_agg.0.min(c), seen.copy_agg.1.min(cos));
            seen.copies += 1;
            seen.copies_caught += (found[honest + 1].copier
                && found[honest + 1].nearest.as_deref() == Some(&format!("agg:{}", w - 1)))
                as usize;
        }
        // The aggregate: the honest miners' mean.
        let mut agg = vec![0f32; theta.len()];
        for d in &dense {
            for (a, x) in agg.iter_mut().zip(d) {
                *a += x / honest as f32;
            }
        }
        for (t, a) in theta.iter_mut().zip(&agg) {
            *t -= a;
        }
        let pairs: Vec<(u64, f32)> = agg
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, v)| (i as u64, *v))
            .collect();
        past.insert(0, (w, SparseUpdate::from_pairs(pairs)));
        past.truncate(2);
        prev_agg = Some(agg);
    }
    seen
}

#[test]
fn copies_are_caught_and_honest_miners_on_similar_data_are_not() {
    let s = simulate(12, 8);
    eprintln!(
        "honest pairs: max overlap {:.3}, max cosine {:.3}; honest vs past aggregates: max containment {:.3}, max cosine {:.3}",
        s.pair.0, s.pair.1, s.agg.0, s.agg.1
    );
    eprintln!(
        "re-encoded copy of a miner: min overlap {:.3}, min cosine {:.3}; of the previous aggregate: min containment {:.3}, min cosine {:.3}",
        s.copy_pair.0, s.copy_pair.1, s.copy_agg.0, s.copy_agg.1
    );
    assert_eq!(s.flags_on_honest, 0, "an honest miner was flagged");
    assert_eq!(s.copies_caught, s.copies, "a copy went unnoticed");
}

#[test]
fn the_later_publisher_is_the_copier() {
    let a = sparse(&[(1, 1.0), (5, -2.0), (9, 0.5)]);
    let b = a.clone();
    let miners = [
        Candidate {
            peer: "early",
            order: Some(2_000),
            accepted: true,
        },
        Candidate {
            peer: "late",
            order: Some(1_000),
            accepted: true,
        },
        Candidate {
            peer: "absent",
            order: None,
            accepted: false,
        },
    ];
    let gram = gram_of(&[Some(&b), Some(&a), None], &[], 10, 4);
    let found = detect_copies(&miners, &gram, &CopyThresholds::default());
    // "late" committed at 1000 ms, before "early": "early" is the copier.
    assert!(found[0].copier);
    assert_eq!(found[0].nearest.as_deref(), Some("late"));
    assert!(!found[1].copier);
    assert_eq!(found[1].nearest.as_deref(), Some("early"));
    assert_eq!(found[2], CopyInfo::default());
}

#[test]
fn peer_ids_never_decide_who_copied() {
    let a = sparse(&[(1, 1.0), (5, -2.0), (9, 0.5)]);
    let b = a.clone();
    // The same second (a 1-second store), whatever the ids: both are copies of each other.
    for (x, y) in [("aaa", "zzz"), ("zzz", "aaa")] {
        let tie = [
            Candidate {
                peer: x,
                order: Some(5_000),
                accepted: true,
            },
            Candidate {
                peer: y,
                order: Some(5_000),
                accepted: true,
            },
        ];
        let gram = gram_of(&[Some(&a), Some(&b)], &[], 10, 4);
        let found = detect_copies(&tie, &gram, &CopyThresholds::default());
        assert!(found[0].copier && found[1].copier, "{x} vs {y}");
    }
    // Without a commit, a shard cannot be first against one that has a commit.
    let uncommitted = [
        Candidate {
            peer: "aaa",
            order: None,
            accepted: true,
        },
        Candidate {
            peer: "zzz",
            order: Some(9_000),
            accepted: true,
        },
    ];
    let gram = gram_of(&[Some(&a), Some(&b)], &[], 10, 4);
    let found = detect_copies(&uncommitted, &gram, &CopyThresholds::default());
    assert!(found[0].copier && !found[1].copier);
}
