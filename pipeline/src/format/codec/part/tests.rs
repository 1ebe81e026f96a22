use super::*;
use crate::format::codec::tests::{bytes_as as as_bytes, noise};
use crate::format::codec::{InDtype, IndexEncoding, TensorSpec, ValueFormat, encode_inputs_with};

/// A model with a short last chunk split across ranks (`e`), a large aligned tensor (`w`),
/// a 1-D tensor no split keeps aligned (`n`), a tensor with fewer rows than ranks (`z`)
/// and one in half precision.
fn model() -> ModelSpec {
    let t = |name: &str, shape: &[u64], dtype| TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        dtype,
    };
    ModelSpec {
        tensors: vec![
            t("e.weight", &[7, 128], InDtype::F32),
            t("h.half", &[8, 256], InDtype::F16),
            t("n.bias", &[300], InDtype::F32),
            t("w.big", &[64, 256], InDtype::F32),
            t("z.two", &[2, 256], InDtype::Bf16),
        ],
    }
}

fn opts(values: ValueFormat, indices: IndexEncoding, scales: ScaleMode) -> EncodeOptions {
    EncodeOptions {
        params: CodecParams {
            chunk: 256,
            k: 8,
            values,
            scales,
            indices,
        },
        beta: 0.9,
        // Small, so that the update spans several sections.
        section_bytes: 200,
    }
}

/// torch.chunk's split of `rows` over `world` ranks (what FSDP2 gives each rank).
fn dim0(rows: u64, rank: u64, world: u64) -> (u64, u64) {
    let q = rows.div_ceil(world);
    ((rank * q).min(rows), ((rank + 1) * q).min(rows))
}

/// The update of window `w` as dense bytes per tensor, in each tensor's dtype.
fn update(m: &ModelSpec, w: u64) -> BTreeMap<String, Vec<u8>> {
    m.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.shape.iter().product::<u64>() as usize;
            (
                t.name.clone(),
                as_bytes(&noise(n, w * 10 + i as u64), t.dtype),
            )
        })
        .collect()
}

/// Rank `rank`'s slices: torch.chunk rows where they keep the chunking, otherwise the whole
/// tensor on rank 0 (what the refusal tells a user to do).
fn slices<'a>(
    m: &ModelSpec,
    data: &'a BTreeMap<String, Vec<u8>>,
    p: &CodecParams,
    rank: u64,
    world: u64,
) -> Vec<SliceInput<'a>> {
    let mut out = Vec::new();
    for t in &m.tensors {
        let rows = t.shape[0];
        let aligned = (0..world).all(|r| {
            let (a, b) = dim0(rows, r, world);
            b == a || check_slice(&t.name, &t.shape, a, b - a, p).is_ok()
        });
        let (a, b) = if aligned {
            dim0(rows, rank, world)
        } else if rank == 0 {
            (0, rows)
        } else {
            continue;
        };
        let rl = row_len(&t.shape) as usize * t.dtype.size();
        let mut shape = t.shape.clone();
        shape[0] = b - a;
        let bytes = &data[&t.name][a as usize * rl..b as usize * rl];
        out.push(SliceInput {
            input: OwnedShapeInput {
                name: data
                    .get_key_value(&t.name)
                    .map(|(k, _)| k.as_str())
                    .unwrap_or(""),
                shape,
                dtype: t.dtype,
                data: bytes,
            },
            row0: a,
        });
    }
    out
}

fn whole_inputs<'a>(
    m: &ModelSpec,
    data: &'a BTreeMap<String, Vec<u8>>,
) -> Vec<OwnedShapeInput<'a>> {
    m.tensors
        .iter()
        .map(|t| {
            let (name, d) = data.get_key_value(&t.name).expect("every tensor has data");
            OwnedShapeInput {
                name,
                shape: t.shape.clone(),
                dtype: t.dtype,
                data: d,
            }
        })
        .collect()
}

#[test]
fn sharded_encoding_equals_the_unsharded_one_on_2_and_4_ranks() {
    let m = model();
    for o in [
        opts(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk),
        opts(ValueFormat::Int8, IndexEncoding::Packed, ScaleMode::Chunk),
        opts(ValueFormat::Bf16, IndexEncoding::Compact, ScaleMode::Chunk),
        opts(ValueFormat::Int4, IndexEncoding::Compact, ScaleMode::Tensor),
    ] {
        for world in [1u64, 2, 4] {
            let mut whole_state = EfState::default();
            let mut rank_states = vec![EfState::default(); world as usize];
            let mut split_somewhere = false;
            for w in 0..3 {
                let data = update(&m, w);
                let want =
                    encode_inputs_with(&whole_inputs(&m, &data), &mut whole_state, &o, |i, b| {
                        encode_tensor(i, b, o.beta, &o.params)
                    })
                    .unwrap();
                let mut parts = Vec::new();
                for (rank, st) in rank_states.iter_mut().enumerate() {
                    let s = slices(&m, &data, &o.params, rank as u64, world);
                    split_somewhere |= s.iter().any(|s| s.row0 > 0);
                    let part = encode_part(&s, &m, st, &o, w).unwrap();
                    assert_eq!(st.window, Some(w));
                    // Through bytes, as ranks exchange them.
                    let back =
                        EncodedPart::from_bytes(&part.to_bytes().unwrap(), &CodecLimits::default())
                            .unwrap();
                    assert_eq!(back, part);
                    parts.push(back);
                }
                // Any order of parts gives the same shard.
                parts.reverse();
                let got = assemble_parts(&parts, &m, &o).unwrap();
                assert!(want.sections.len() > 1);
                assert_eq!(
                    got.sections, want.sections,
                    "{:?} world {world} window {w}",
                    o.params
                );
                assert_eq!(got.stats, want.stats);
            }
            assert_eq!(
                split_somewhere,
                world > 1 && o.params.scales == ScaleMode::Chunk
            );
            // The ranks' buffers are the slices of the whole buffers.
            for t in &m.tensors {
                let whole = &whole_state.buffers[&t.name];
                let joined: Vec<f32> = rank_states
                    .iter()
                    .filter_map(|s| s.buffers.get(&t.name))
                    .flatten()
                    .copied()
                    .collect();
                assert_eq!(joined.len(), whole.len(), "{}", t.name);
                assert!(
                    joined
                        .iter()
                        .zip(whole)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn misaligned_slices_are_refused_before_any_state_changes() {
    let m = model();
    let o = opts(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk);
    let data = update(&m, 0);
    let mut s = slices(&m, &data, &o.params, 0, 2);
    // n.bias (300) split in two: 150 elements is not a multiple of the chunk (256).
    let half = &data["n.bias"][..150 * 4];
    s.retain(|s| s.input.name != "n.bias");
    s.push(SliceInput {
        input: OwnedShapeInput {
            name: "n.bias",
            shape: vec![150],
            dtype: InDtype::F32,
            data: half,
        },
        row0: 0,
    });
    let mut st = EfState::default();
    let e = encode_part(&s, &m, &mut st, &o, 0).unwrap_err();
    assert_eq!(e.reason(), "slice_misaligned");
    assert!(
        e.to_string().contains("n.bias") && e.to_string().contains("256"),
        "{e}"
    );
    assert_eq!(st, EfState::default(), "a refused part changes no buffer");
    // A slice starting on a boundary but ending off one, not at the tail.
    let e = check_slice("w", &[64, 256], 0, 1, &o.params);
    assert!(e.is_ok(), "one row of 256 is one chunk");
    let e = check_slice("e", &[7, 128], 1, 2, &o.params).unwrap_err();
    assert_eq!(e.reason(), "slice_misaligned");
    let e = check_slice("e", &[7, 128], 0, 3, &o.params).unwrap_err();
    assert!(e.to_string().contains("2 rows"), "says how to split: {e}");
    assert!(
        check_slice("e", &[7, 128], 6, 1, &o.params).is_ok(),
        "the tail may be short"
    );
    // One scale per tensor: only the whole tensor determines it.
    let t = opts(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Tensor);
    assert_eq!(
        check_slice("w", &[64, 256], 0, 32, &t.params)
            .unwrap_err()
            .reason(),
        "slice_misaligned"
    );
    assert!(check_slice("w", &[64, 256], 0, 64, &t.params).is_ok());
    // Rows beyond the tensor, or other trailing dimensions.
    let mut st = EfState::default();
    let bad_rows = [SliceInput {
        input: OwnedShapeInput {
            name: "w.big",
            shape: vec![8, 256],
            dtype: InDtype::F32,
            data: &data["w.big"][..8 * 256 * 4],
        },
        row0: 60,
    }];
    assert_eq!(
        encode_part(&bad_rows, &m, &mut st, &o, 0)
            .unwrap_err()
            .reason(),
        "shape_mismatch"
    );
}

#[test]
fn gaps_overlaps_and_mixed_windows_are_refused_with_the_tensor_named() {
    let m = model();
    let o = opts(ValueFormat::Int2, IndexEncoding::Compact, ScaleMode::Chunk);
    let data = update(&m, 0);
    let part = |rank: u64, world: u64, w: u64| {
        let mut st = EfState::default();
        encode_part(
            &slices(&m, &data, &o.params, rank, world),
            &m,
            &mut st,
            &o,
            w,
        )
        .unwrap()
    };
    let (p0, p1) = (part(0, 2, 5), part(1, 2, 5));
    assert!(assemble_parts(&[p0.clone(), p1.clone()], &m, &o).is_ok());
    let missing = assemble_parts(std::slice::from_ref(&p0), &m, &o).unwrap_err();
    assert_eq!(missing.reason(), "parts_mismatch");
    assert!(missing.to_string().contains("are in no part"), "{missing}");
    let twice = assemble_parts(&[p0.clone(), p1.clone(), p1.clone()], &m, &o).unwrap_err();
    assert!(twice.to_string().contains("in two parts"), "{twice}");
    let mixed = assemble_parts(&[p0.clone(), part(1, 2, 6)], &m, &o).unwrap_err();
    assert!(mixed.to_string().contains("windows 5 and 6"), "{mixed}");
    assert_eq!(
        assemble_parts(&[], &m, &o).unwrap_err().reason(),
        "parts_mismatch"
    );
    // A part of another codec.
    let other = opts(ValueFormat::Int4, IndexEncoding::Compact, ScaleMode::Chunk);
    let e = assemble_parts(&[p0.clone(), p1.clone()], &m, &other).unwrap_err();
    assert_eq!(e.reason(), "parts_mismatch");
    // A tensor the model does not have.
    let mut extra = p1.clone();
    extra.tensors[0].tensor.name = "ghost".into();
    assert_eq!(
        assemble_parts(&[p0.clone(), extra], &m, &o)
            .unwrap_err()
            .reason(),
        "unknown_tensor"
    );
    // Bytes that are not a part, or a part with a block cut short.
    let lim = CodecLimits::default();
    assert_eq!(
        EncodedPart::from_bytes(b"garbage", &lim)
            .unwrap_err()
            .reason(),
        "parts_mismatch"
    );
    let mut cut = p1.clone();
    cut.tensors[0].tensor.idx.pop();
    assert_eq!(
        EncodedPart::from_bytes(&cut.to_bytes().unwrap(), &lim)
            .unwrap_err()
            .reason(),
        "size_mismatch"
    );
    let b = p1.to_bytes().unwrap();
    assert!(EncodedPart::from_bytes(&b[..b.len() - 3], &lim).is_err());
}
