use super::*;
use proptest::prelude::*;

pub(super) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Roughly bell-shaped: sum of three uniforms.
            let u = |s: u64| ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            u(x) + u(x.rotate_left(21)) + u(x.rotate_left(42))
        })
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `v` rounded to `dtype`, little-endian, as a safetensors file holds it.
pub(super) fn bytes_as(v: &[f32], dtype: InDtype) -> Vec<u8> {
    match dtype {
        InDtype::F32 => bytes(v),
        InDtype::Bf16 => v
            .iter()
            .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
            .collect(),
        InDtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

fn params(values: ValueFormat, indices: IndexEncoding, scales: ScaleMode) -> CodecParams {
    CodecParams {
        chunk: 256,
        k: 8,
        values,
        scales,
        indices,
    }
}

fn all_params() -> Vec<CodecParams> {
    let mut v = Vec::new();
    for values in [
        ValueFormat::Bf16,
        ValueFormat::Int8,
        ValueFormat::Int4,
        ValueFormat::Int2,
    ] {
        for indices in [IndexEncoding::Packed, IndexEncoding::Compact] {
            for scales in [ScaleMode::Chunk, ScaleMode::Tensor] {
                v.push(params(values, indices, scales));
            }
        }
    }
    v
}

fn encode(
    update: &[f32],
    shape: &[u64],
    state: &mut [f32],
    beta: f32,
    p: &CodecParams,
) -> EncodedTensor {
    let data = bytes(update);
    encode_tensor(
        &TensorInput {
            name: "w",
            shape,
            dtype: InDtype::F32,
            data: &data,
        },
        state,
        beta,
        p,
    )
    .unwrap()
}

/// Brute-force top-k per chunk: order by (|v| desc, index asc).
fn brute_topk(buf: &[f32], chunk: usize, k: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for (c, ch) in buf.chunks(chunk).enumerate() {
        let mut order: Vec<usize> = (0..ch.len()).collect();
        order.sort_by(|&a, &b| ch[b].abs().total_cmp(&ch[a].abs()).then(a.cmp(&b)));
        let mut sel: Vec<usize> = order[..k.min(ch.len())].to_vec();
        sel.sort();
        out.extend(sel.into_iter().map(|i| (c * chunk + i) as u64));
    }
    out
}

#[test]
fn selection_matches_brute_force_and_values_are_within_bounds() {
    let n = 1000; // 3 full chunks of 256 and a short one of 232
    let update = noise(n, 1);
    for p in all_params() {
        let mut state = vec![0.0f32; n];
        let t = encode(&update, &[n as u64], &mut state, 0.0, &p);
        let (idx, val) = to_sparse(&t).unwrap();
        assert_eq!(idx, brute_topk(&update, 256, 8), "{p:?}");
        for (&i, &v) in idx.iter().zip(&val) {
            let orig = update[i as usize];
            let err = (orig - v).abs();
            let bound = match p.values {
                ValueFormat::Bf16 => orig.abs() / 256.0,
                f => {
                    let m1 = ((1u32 << f.bits()) - 1) as f32;
                    let scale = match p.scales {
                        ScaleMode::Chunk => t.scales[i as usize / 256],
                        ScaleMode::Tensor => t.scales[0],
                    };
                    // Half a level step, plus rounding slack.
                    bf16_to_f32(scale) / m1 * 1.0001
                }
            };
            assert!(err <= bound, "{p:?}: |{orig} - {v}| = {err} > {bound}");
            // Error feedback keeps exactly what was not sent.
            assert_eq!(state[i as usize], orig - v);
        }
    }
}

#[test]
fn ties_go_to_the_lower_index_and_zero_chunks_work() {
    let p = CodecParams {
        chunk: 64,
        k: 5,
        values: ValueFormat::Int2,
        scales: ScaleMode::Chunk,
        indices: IndexEncoding::Compact,
    };
    let mut u = vec![1.0f32; 128];
    u[64..].fill(0.0);
    u[70] = -2.0;
    let mut state = vec![0.0; 128];
    let t = encode(&u, &[2, 64], &mut state, 0.0, &p);
    let (idx, val) = to_sparse(&t).unwrap();
    assert_eq!(idx, vec![0, 1, 2, 3, 4, 64, 65, 66, 67, 70]);
    assert_eq!(val[9], -2.0);
}

#[test]
fn error_feedback_conserves_the_decayed_sum_over_100_steps() {
    let n = 777;
    let beta = 0.9f32;
    for p in [
        params(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk),
        params(ValueFormat::Bf16, IndexEncoding::Packed, ScaleMode::Tensor),
    ] {
        let mut state = vec![0.0f32; n];
        let mut decayed_updates = vec![0.0f64; n];
        let mut decayed_sent = vec![0.0f64; n];
        for step in 0..100 {
            let u = noise(n, 100 + step);
            let t = encode(&u, &[n as u64], &mut state, beta, &p);
            let mut sent = vec![0.0f32; n];
            accumulate(&t, &mut sent, 1.0).unwrap();
            for i in 0..n {
                decayed_updates[i] = beta as f64 * decayed_updates[i] + u[i] as f64;
                decayed_sent[i] = beta as f64 * decayed_sent[i] + sent[i] as f64;
            }
        }
        for i in 0..n {
            let lhs = decayed_sent[i] + state[i] as f64;
            assert!(
                (lhs - decayed_updates[i]).abs() < 1e-3,
                "{p:?} element {i}: {lhs} vs {}",
                decayed_updates[i]
            );
        }
    }
}

#[test]
fn bytes_do_not_depend_on_thread_count() {
    let n = 100_000;
    let u = noise(n, 9);
    let p = CodecParams {
        chunk: 1024,
        k: 16,
        ..CodecParams::default()
    };
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut s = noise(n, 10);
            let t = encode(&u, &[n as u64], &mut s, 0.5, &p);
            (write_section(&[t]).unwrap(), s)
        })
    };
    assert_eq!(run(1), run(4));
}

#[test]
fn norms_do_not_depend_on_thread_count() {
    // Enough kept values for several norm blocks, with magnitudes spread so that the order
    // of the additions shows in the last bits.
    let n = 1 << 21;
    let u: Vec<f32> = noise(n, 11)
        .iter()
        .enumerate()
        .map(|(i, x)| x * (1.0 + (i % 977) as f32 * 37.0))
        .collect();
    let p = CodecParams {
        chunk: 1024,
        k: 256,
        values: ValueFormat::Int8,
        ..CodecParams::default()
    };
    let mut s = vec![0.0; n];
    let t = encode(&u, &[n as u64], &mut s, 0.0, &p);
    let norm_on = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| validate(&t).unwrap())
    };
    let one = norm_on(1);
    for threads in [2, 3, 8] {
        assert_eq!(
            one.to_bits(),
            norm_on(threads).to_bits(),
            "{threads} threads"
        );
    }
    // The spec's order, written out: blocks of NORM_BLOCK summed left to right, then the
    // block sums left to right.
    let (_, vals) = to_sparse(&t).unwrap();
    assert!(vals.len() > 4 * NORM_BLOCK);
    let mut total = 0f64;
    for b in vals.chunks(NORM_BLOCK) {
        let mut s = 0f64;
        for &v in b {
            s += f64::from(v) * f64::from(v);
        }
        total += s;
    }
    assert_eq!(one.to_bits(), total.to_bits());
    // And another order gives other bits here, so the test can fail.
    let plain = vals
        .iter()
        .fold(0f64, |a, &v| a + f64::from(v) * f64::from(v));
    assert_ne!(
        plain.to_bits(),
        total.to_bits(),
        "pick data where the order shows"
    );
}

#[test]
fn bf16_and_f16_inputs_match_their_f32_values() {
    let u = noise(500, 3);
    let p = params(ValueFormat::Int4, IndexEncoding::Compact, ScaleMode::Chunk);
    let bf: Vec<u16> = u.iter().map(|&x| f32_to_bf16(x)).collect();
    let bf_as_f32: Vec<f32> = bf.iter().map(|&h| bf16_to_f32(h)).collect();
    let data: Vec<u8> = bf.iter().flat_map(|h| h.to_le_bytes()).collect();
    let mut s1 = vec![0.0; 500];
    let a = encode_tensor(
        &TensorInput {
            name: "w",
            shape: &[500],
            dtype: InDtype::Bf16,
            data: &data,
        },
        &mut s1,
        0.0,
        &p,
    )
    .unwrap();
    let mut s2 = vec![0.0; 500];
    let b = encode(&bf_as_f32, &[500], &mut s2, 0.0, &p);
    assert_eq!((a.idx, a.val, a.scales), (b.idx, b.val, b.scales));
    let h: Vec<half::f16> = u.iter().map(|&x| half::f16::from_f32(x)).collect();
    let data: Vec<u8> = h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let mut s3 = vec![0.0; 500];
    let c = encode_tensor(
        &TensorInput {
            name: "w",
            shape: &[500],
            dtype: InDtype::F16,
            data: &data,
        },
        &mut s3,
        0.0,
        &p,
    )
    .unwrap();
    let mut s4 = vec![0.0; 500];
    let d = encode(
        &h.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
        &[500],
        &mut s4,
        0.0,
        &p,
    );
    assert_eq!(c.val, d.val);
}

#[test]
fn templar_point_fits_in_10_5_bits_per_kept_element() {
    let n = 4096 * 64;
    let u = noise(n, 4);
    let mut s = vec![0.0; n];
    let t = encode(&u, &[n as u64], &mut s, 0.0, &CodecParams::default());
    let bits = t.payload_bytes() as f64 * 8.0 / t.kept() as f64;
    assert!(bits <= 10.5, "{bits} bits per kept element");
    assert_eq!(t.kept(), 64 * 64);
}

fn section_of(p: &CodecParams) -> (Vec<u8>, ModelSpec) {
    let u = noise(600, 5);
    let mut s = vec![0.0; 600];
    let t = encode(&u, &[20, 30], &mut s, 0.0, p);
    let model = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![20, 30],
            dtype: InDtype::F32,
        }],
    };
    (write_section(&[t]).unwrap(), model)
}

fn reason(bytes: &[u8], model: Option<&ModelSpec>) -> &'static str {
    read_section(bytes, model, &CodecLimits::default())
        .unwrap_err()
        .reason()
}

/// Re-serialises a section after `f` edits its tensor.
fn edited(p: &CodecParams, f: impl FnOnce(&mut EncodedTensor)) -> Vec<u8> {
    let (b, _) = section_of(p);
    let mut t = read_section(&b, None, &CodecLimits::default())
        .unwrap()
        .remove(0);
    f(&mut t);
    write_section(&[t]).unwrap()
}

#[test]
fn each_bad_input_reason_is_produced() {
    let packed = params(ValueFormat::Int2, IndexEncoding::Packed, ScaleMode::Chunk);
    let (good, model) = section_of(&packed);
    let t = read_section(&good, Some(&model), &CodecLimits::default()).unwrap();
    assert_eq!(t.len(), 1);
    // Out of range: the short last chunk (600 = 2x256 + 88) gets an index >= 88.
    let b = edited(&packed, |t| {
        let lay = ChunkLayout::new(600, &t.params);
        let last = 2 * lay.idx_full;
        let mut out = vec![0u8; lay.idx_last];
        bits::write_indices(&mut out, &[1, 2, 3, 4, 5, 6, 7, 100], false, 256, 8);
        t.idx[last..].copy_from_slice(&out);
    });
    assert_eq!(reason(&b, None), "index_out_of_range");
    let b = edited(&packed, |t| {
        let mut out = vec![0u8; 8];
        bits::write_indices(&mut out, &[1, 2, 3, 3, 5, 6, 7, 8], false, 256, 8);
        t.idx[..8].copy_from_slice(&out);
    });
    assert_eq!(reason(&b, None), "indices_not_increasing");
    let b = edited(&packed, |t| t.params.k = 300);
    assert_eq!(reason(&b, None), "k_over_chunk");
    let b = edited(&packed, |t| t.scales[1] = f32_to_bf16(f32::NAN));
    assert_eq!(reason(&b, None), "non_finite");
    let b = edited(
        &params(ValueFormat::Bf16, IndexEncoding::Compact, ScaleMode::Chunk),
        |t| {
            t.val[2..4].copy_from_slice(&0x7F80u16.to_le_bytes());
        },
    );
    assert_eq!(reason(&b, None), "non_finite");
    let other = ModelSpec {
        tensors: vec![TensorSpec {
            name: "v".into(),
            shape: vec![20, 30],
            dtype: InDtype::F32,
        }],
    };
    assert_eq!(reason(&good, Some(&other)), "unknown_tensor");
    let wrong = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![30, 20],
            dtype: InDtype::F32,
        }],
    };
    assert_eq!(reason(&good, Some(&wrong)), "shape_mismatch");
    let tight = CodecLimits {
        max_elements: 100,
        ..CodecLimits::default()
    };
    assert_eq!(
        read_section(&good, None, &tight).unwrap_err().reason(),
        "over_limit"
    );
    let b = edited(&packed, |t| t.shape = vec![1 << 40, 1 << 40]);
    assert_eq!(reason(&b, None), "over_limit");
    let b = edited(&packed, |t| {
        t.idx.pop();
    });
    assert_eq!(reason(&b, None), "size_mismatch");
    assert_eq!(reason(b"not safetensors", None), "section_malformed");
    let compact = params(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk);
    // k=8 of 256: 5 low bits each (bytes 0..5), then 16 high bits (bytes 5..7) of which
    // the last is never set by a valid encoder: setting it claims a ninth element.
    let b = edited(&compact, |t| t.idx[6] |= 0x80);
    assert_eq!(reason(&b, None), "index_malformed");
    // NaN in an update is refused at encode time and names the tensor.
    let mut u = noise(300, 1);
    u[7] = f32::NAN;
    let data = bytes(&u);
    let e = encode_tensor(
        &TensorInput {
            name: "layer.0",
            shape: &[300],
            dtype: InDtype::F32,
            data: &data,
        },
        &mut vec![0.0; 300],
        0.0,
        &packed,
    )
    .unwrap_err();
    assert_eq!(e.reason(), "non_finite");
    assert!(e.to_string().contains("layer.0"));
}

#[test]
fn rejected_tensor_leaves_the_accumulator_untouched() {
    let packed = params(ValueFormat::Int2, IndexEncoding::Packed, ScaleMode::Chunk);
    let (good, _) = section_of(&packed);
    let mut t = read_section(&good, None, &CodecLimits::default())
        .unwrap()
        .remove(0);
    let lay = ChunkLayout::new(600, &t.params);
    let mut out = vec![0u8; lay.idx_last];
    bits::write_indices(&mut out, &[1, 2, 3, 4, 5, 6, 7, 100], false, 256, 8);
    let last = 2 * lay.idx_full;
    t.idx[last..].copy_from_slice(&out);
    let mut dense = vec![1.0f32; 600];
    assert!(accumulate(&t, &mut dense, 1.0).is_err());
    assert!(
        dense.iter().all(|&x| x == 1.0),
        "the first two chunks must not have been applied"
    );
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = EfState::default();
    st.buffer("a", 3)
        .unwrap()
        .copy_from_slice(&[1.0, -2.5, 3.25]);
    st.buffer("b", 1).unwrap()[0] = f32::MIN_POSITIVE;
    st.save(dir.path()).unwrap();
    assert_eq!(EfState::load(dir.path()).unwrap(), st);
    assert!(st.buffer("a", 4).is_err());
    assert_eq!(
        EfState::load(&dir.path().join("none")).unwrap(),
        EfState::default()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = read_section(&b, None, &CodecLimits::default());
    }

    #[test]
    fn decoder_never_panics_on_mutated_sections(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), which in 0usize..16) {
        let (mut b, _) = section_of(&all_params()[which]);
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        if let Ok(ts) = read_section(&b, None, &CodecLimits::default()) {
            for t in ts {
                let mut dense = vec![0.0f32; t.numel() as usize];
                let _ = accumulate(&t, &mut dense, 0.5);
            }
        }
    }

    #[test]
    fn any_shape_and_k_roundtrips(n in 1usize..3000, k in 1u32..70, seed in 0u64..1000, which in 0usize..16) {
        let mut p = all_params()[which];
        p.chunk = 64;
        p.k = k.min(64);
        let u = noise(n, seed);
        let mut s = vec![0.0; n];
        let t = encode(&u, &[n as u64], &mut s, 0.0, &p);
        let back = read_section(&write_section(std::slice::from_ref(&t)).unwrap(), None, &CodecLimits::default()).unwrap();
        prop_assert_eq!(&back[0], &t);
        let (idx, _) = to_sparse(&t).unwrap();
        prop_assert_eq!(idx, brute_topk(&u, 64, p.k as usize));
    }

    #[test]
    fn slabs_of_chunks_concatenate_to_the_whole_sparse_form(n in 1usize..3000, k in 1u32..70, slab in 1usize..9, seed in 0u64..1000, which in 0usize..16) {
        let mut p = all_params()[which];
        p.chunk = 64;
        p.k = k.min(64);
        let mut s = vec![0.0; n];
        let t = encode(&noise(n, seed), &[n as u64], &mut s, 0.0, &p);
        let whole = to_sparse(&t).unwrap();
        let chunks = n.div_ceil(64);
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for c in (0..chunks).step_by(slab) {
            let (i, v) = to_sparse_chunks(&t, c..(c + slab).min(chunks)).unwrap();
            idx.extend(i.into_iter().map(|k| k as u64 + c as u64 * 64));
            val.extend(v);
        }
        prop_assert_eq!((idx, val), whole);
        // Empty and past-the-end ranges are empty, not a panic.
        prop_assert_eq!(to_sparse_chunks(&t, chunks..chunks + 3).unwrap(), (vec![], vec![]));
        prop_assert_eq!(to_sparse_chunks(&t, 1..1).unwrap(), (vec![], vec![]));
    }
}

#[test]
fn sampled_and_fallback_selection_agree_with_brute_force() {
    let p = CodecParams {
        chunk: 4096,
        k: 64,
        values: ValueFormat::Int8,
        scales: ScaleMode::Chunk,
        indices: IndexEncoding::Compact,
    };
    // Chunk 0: random (the sampled path). Chunk 1: the sampled positions hold a few huge
    // values and the rest ties, so the sampled floor admits fewer than k (the fallback).
    // Chunk 2: all equal (ties everywhere). Chunk 3: mostly zeros with a few values.
    let mut u = noise(4096, 77);
    let mut c1 = vec![1.0f32; 4096];
    for s in 0..10 {
        c1[s * 16] = 5.0;
    }
    u.extend(c1);
    u.extend(vec![0.25f32; 4096]);
    let mut c3 = vec![0.0f32; 4096];
    for i in (0..4096).step_by(97) {
        c3[i] = -(i as f32);
    }
    u.extend(c3);
    let mut s = vec![0.0; u.len()];
    let t = encode(&u, &[u.len() as u64], &mut s, 0.0, &p);
    let (idx, _) = to_sparse(&t).unwrap();
    assert_eq!(idx, brute_topk(&u, 4096, 64));
}

#[test]
fn names_in_signed_headers_are_the_serde_names() {
    for m in [ScaleMode::Chunk, ScaleMode::Tensor] {
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            format!("\"{}\"", m.name())
        );
        assert_eq!(ScaleMode::parse(m.name()), Some(m));
    }
    for e in [IndexEncoding::Packed, IndexEncoding::Compact] {
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            format!("\"{}\"", e.name())
        );
        assert_eq!(IndexEncoding::parse(e.name()), Some(e));
    }
    for v in [
        ValueFormat::Bf16,
        ValueFormat::Int8,
        ValueFormat::Int4,
        ValueFormat::Int2,
    ] {
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            format!("\"{}\"", v.name())
        );
    }
    assert_eq!(ScaleMode::parse("Chunk"), None);
}

#[test]
fn a_refusal_names_the_lowest_faulty_chunk_every_time() {
    let p = CodecParams {
        chunk: 64,
        k: 4,
        values: ValueFormat::Int8,
        scales: ScaleMode::Chunk,
        indices: IndexEncoding::Packed,
    };
    let n = 64 * 64;
    let data: Vec<u8> = (0..n)
        .flat_map(|i| (i as f32 * 0.3).sin().to_le_bytes())
        .collect();
    let shape = [n as u64];
    let mut state = vec![0f32; n];
    let input = TensorInput {
        name: "t",
        shape: &shape,
        dtype: InDtype::F32,
        data: &data,
    };
    let mut t = encode_tensor(&input, &mut state, 0.9, &p).unwrap();
    // Four 6-bit fields per chunk, 3 bytes: all ones reads 63, 63, … (not increasing).
    for c in [63usize, 40, 9] {
        t.idx[c * 3..c * 3 + 3].fill(0xFF);
    }
    for _ in 0..50 {
        match validate(&t) {
            Err(CodecError::IndicesNotIncreasing { chunk: 9, .. }) => {}
            other => panic!("expected chunk 9 to be named, got {other:?}"),
        }
    }
}

#[test]
fn dense_files_round_trip_and_half_precision_widens_exactly() {
    use safetensors::{Dtype, tensor::TensorView};
    let mut d = Dense::new();
    d.insert("a".into(), (vec![2, 2], vec![1.5, -0.25, 3.0, 0.0]));
    let bytes = dense_to_safetensors(&d).unwrap();
    assert_eq!(dense_from_safetensors(&bytes).unwrap(), d);
    let b = bytes_as(&[1.0, -2.5], InDtype::Bf16);
    let h = bytes_as(&[0.5, 65504.0], InDtype::F16);
    let st = safetensors::serialize(
        vec![
            ("b", TensorView::new(Dtype::BF16, vec![2], &b).unwrap()),
            ("h", TensorView::new(Dtype::F16, vec![2], &h).unwrap()),
        ],
        None,
    )
    .unwrap();
    let got = dense_from_safetensors(&st).unwrap();
    assert_eq!(got["b"], (vec![2], vec![1.0, -2.5]));
    assert_eq!(got["h"], (vec![2], vec![0.5, 65504.0]));
    let i32s = safetensors::serialize(
        vec![(
            "i",
            TensorView::new(Dtype::I32, vec![1], &[0u8; 4]).unwrap(),
        )],
        None,
    )
    .unwrap();
    assert_eq!(
        dense_from_safetensors(&i32s).unwrap_err().reason(),
        "section_malformed"
    );
}

#[test]
fn section_ranges_match_what_the_encoder_writes() {
    for p in all_params() {
        let mut dense = Dense::new();
        for (i, n) in [3000usize, 17, 9000, 256, 4100, 1, 700].iter().enumerate() {
            dense.insert(format!("t{i}"), (vec![*n as u64], noise(*n, i as u64)));
        }
        let update = dense_to_safetensors(&dense).unwrap();
        let model = model_of(&update).unwrap();
        for section_bytes in [1usize, 200, 700, 1 << 20] {
            let opts = EncodeOptions {
                params: p,
                beta: 0.9,
                section_bytes,
            };
            let enc = encode_update(&update, &mut EfState::default(), &opts).unwrap();
            let names: Vec<String> = enc.sections.iter().map(|(n, _)| n.clone()).collect();
            let planned: Vec<String> = section_ranges(&model, &p, section_bytes)
                .into_iter()
                .map(|r| section_name(r.start, r.end - 1))
                .collect();
            assert_eq!(names, planned, "{p:?} at {section_bytes} bytes");
        }
    }
}

#[test]
fn advancing_a_state_from_the_encoding_equals_encoding_in_place() {
    // Every value format, index encoding and scale mode, in f32, bf16 and f16, with a
    // short last chunk and a state that already holds residuals.
    let n = 256 * 5 + 37;
    for p in all_params() {
        for dtype in [InDtype::F32, InDtype::Bf16, InDtype::F16] {
            let u = noise(n, 7);
            let data = bytes_as(&u, dtype);
            let shape = [n as u64];
            let input = TensorInput {
                name: "t",
                shape: &shape,
                dtype,
                data: &data,
            };
            let start = noise(n, 11);
            let mut in_place = start.clone();
            let enc = encode_tensor(&input, &mut in_place, 0.9, &p).unwrap();
            let mut advanced = start.clone();
            advance_state(&input, &mut advanced, 0.9, &enc).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&advanced), bits(&in_place), "{p:?} {dtype:?}");
            assert_ne!(bits(&advanced), bits(&start));
        }
    }
}

#[test]
fn scratch_encoding_gives_the_same_sections_and_state() {
    let shapes: [(&str, Vec<u64>); 3] = [("a", vec![40, 33]), ("b", vec![300]), ("c", vec![7])];
    let datas: Vec<Vec<u8>> = (0..3).map(|i| bytes(&noise(1320, i))).collect();
    let inputs: Vec<OwnedShapeInput> = shapes
        .iter()
        .zip(&datas)
        .map(|((name, shape), d)| OwnedShapeInput {
            name,
            shape: shape.clone(),
            dtype: InDtype::F32,
            data: &d[..shape.iter().product::<u64>() as usize * 4],
        })
        .collect();
    let opts = EncodeOptions {
        params: params(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk),
        beta: 0.9,
        section_bytes: 64,
    };
    // A first window (no buffers yet: adopted), then one with residuals (advanced); the
    // second adds a tensor the state has no buffer for.
    let mut state = EfState::default();
    let (got, pending) = encode_inputs_scratch(&inputs[..2], &state, &opts).unwrap();
    let mut in_place = EfState::default();
    let want = encode_inputs_with(&inputs[..2], &mut in_place, &opts, |i, b| {
        encode_tensor(i, b, opts.beta, &opts.params)
    })
    .unwrap();
    assert_eq!(got.sections, want.sections);
    assert!(state.buffers.is_empty());
    advance_inputs(&inputs[..2], &mut state, &opts, pending).unwrap();
    assert_eq!(state, in_place);
    let before = state.clone();
    let mut in_place = state.clone();
    let want = encode_inputs_with(&inputs, &mut in_place, &opts, |i, b| {
        encode_tensor(i, b, opts.beta, &opts.params)
    })
    .unwrap();
    let (got, sent) = encode_inputs_scratch(&inputs, &state, &opts).unwrap();
    assert_eq!(state, before, "encoding from scratch left the state alone");
    assert_eq!(got.sections, want.sections);
    assert!(got.sections.len() > 1);
    advance_inputs(&inputs, &mut state, &opts, sent).unwrap();
    assert_eq!(state, in_place);
}

#[test]
fn read_only_encoding_gives_the_same_bytes_and_leaves_the_state_alone() {
    // Every value format, index encoding and scale mode; a short last chunk; a state that
    // already holds residuals (so β·e matters).
    for p in all_params() {
        for dtype in [InDtype::F32, InDtype::Bf16, InDtype::F16] {
            let n = 5 * 256 + 77;
            let data = bytes_as(&noise(n, 7), dtype);
            let input = TensorInput {
                name: "w",
                shape: &[n as u64],
                dtype,
                data: &data,
            };
            let start: Vec<f32> = noise(n, 8).iter().map(|x| x * 0.3).collect();
            let mut in_place = start.clone();
            let want = encode_tensor(&input, &mut in_place, 0.9, &p).unwrap();
            let got = encode_tensor_from(&input, &start, 0.9, &p).unwrap();
            assert_eq!(got, want, "{p:?} {dtype:?}");
            let mut advanced = start.clone();
            advance_state(&input, &mut advanced, 0.9, &got).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&advanced), bits(&in_place), "{p:?} {dtype:?}");
        }
    }
}
