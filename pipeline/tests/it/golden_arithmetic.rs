//! Golden vectors that pin the codec's arithmetic (`schemas/vectors/gradient-v1/arith/`).
//!
//! The first vectors (`golden_gradient.rs`) were passed by implementations that break ties
//! toward the higher index, fuse multiply-adds, round with `rint`, quantize in f64 or round
//! bf16 halves away from zero. These cases are built so that each of those mistakes changes
//! a committed byte or a committed float, and this test proves it: it carries its own small
//! reference encoder and merger, written from `gradient.md` alone (packed indices, per-chunk
//! scales), checks that the reference reproduces every committed vector, and then that every
//! wrong variant of it does **not**.
//!
//! It also commits what an implementer needs beyond the arithmetic: a weighted merge of
//! several shards (weights ≠ 1), an update split into several sections at the Templar point
//! (C = 4096, k = 64, int2, compact), and a decoder refusal per reason code.
//! `SHARDROP_BLESS=1 cargo test -p shardrop --test it golden_arithmetic::` rewrites them.

use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::format::codec::{
    CodecLimits, CodecParams, Dense, EfState, EncodeOptions, EncodedTensor, InDtype, IndexEncoding,
    ModelSpec, ScaleMode, TensorSpec, ValueFormat, accumulate_section, dense_to_safetensors,
    encode_update, read_section, write_section,
};

use crate::blessed::check;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/gradient-v1/arith")
}

fn f32_update(tensors: &[(&str, &[f32])]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, v), b)| (*n, TensorView::new(Dtype::F32, vec![v.len()], b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn params(chunk: u32, k: u32, values: ValueFormat, indices: IndexEncoding) -> CodecParams {
    CodecParams {
        chunk,
        k,
        values,
        scales: ScaleMode::Chunk,
        indices,
    }
}

// ---------------------------------------------------------------------------------------
// The reference, from gradient.md alone, with a switch for each mistake it must catch.

#[derive(Clone, Copy, Default, Debug)]
struct Wrong {
    ties_high: bool,
    fma: bool,
    rint: bool,
    round_away: bool,
    f64_quant: bool,
    bf16_away: bool,
    beta_f64: bool,
}

const WRONGS: [(&str, Wrong); 7] = {
    let n = Wrong {
        ties_high: false,
        fma: false,
        rint: false,
        round_away: false,
        f64_quant: false,
        bf16_away: false,
        beta_f64: false,
    };
    [
        (
            "ties to the higher index",
            Wrong {
                ties_high: true,
                ..n
            },
        ),
        ("fused multiply-add", Wrong { fma: true, ..n }),
        ("rint instead of floor(x + 0.5)", Wrong { rint: true, ..n }),
        (
            "round half away instead of floor(x + 0.5)",
            Wrong {
                round_away: true,
                ..n
            },
        ),
        (
            "quantizing in f64",
            Wrong {
                f64_quant: true,
                ..n
            },
        ),
        (
            "bf16 halves rounded away from zero",
            Wrong {
                bf16_away: true,
                ..n
            },
        ),
        (
            "beta taken as the f64 0.9",
            Wrong {
                beta_f64: true,
                ..n
            },
        ),
    ]
};

fn ref_bf16(v: f32, w: Wrong) -> u16 {
    let b = v.to_bits();
    if w.bf16_away {
        return (b.wrapping_add(0x8000) >> 16) as u16;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

fn ref_bf16_ceil(m: f32) -> u16 {
    let b = m.to_bits();
    ((b >> 16) + u32::from(b & 0xFFFF != 0)) as u16
}

fn widen(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn ref_code(v: f32, s: f32, bits: u32, w: Wrong) -> u32 {
    let m = (1u32 << bits) - 1;
    if s == 0.0 {
        return 0;
    }
    let h = m as f32 * 0.5;
    let q = if w.f64_quant {
        (((v as f64 / s as f64) + 1.0) * h as f64 + 0.5).floor()
    } else {
        let x = ((v / s) + 1.0) * h;
        (if w.rint {
            x.round_ties_even()
        } else if w.round_away {
            x.round()
        } else if w.fma {
            (v / s).mul_add(h, h) + 0.5
        } else {
            x + 0.5
        })
        .floor() as f64
    };
    (q.max(0.0) as u32).min(m)
}

fn put_bits(buf: &mut [u8], at: usize, width: u32, v: u32) {
    for b in 0..width as usize {
        if v >> b & 1 == 1 {
            buf[(at + b) / 8] |= 1 << ((at + b) % 8);
        }
    }
}

/// Encodes one f32 tensor (packed indices, per-chunk scales) and advances `e`.
fn ref_encode(u: &[f32], e: &mut [f32], beta: f32, p: &CodecParams, w: Wrong) -> EncodedTensor {
    let c = p.chunk as usize;
    let log2 = p.chunk.ilog2();
    let bits = match p.values {
        ValueFormat::Int2 => 2,
        ValueFormat::Int4 => 4,
        ValueFormat::Int8 => 8,
        ValueFormat::Bf16 => 16,
    };
    let (mut idx, mut val, mut scales) = (Vec::new(), Vec::new(), Vec::new());
    for (uc, ec) in u.chunks(c).zip(e.chunks_mut(c)) {
        for (x, &ui) in ec.iter_mut().zip(uc) {
            *x = if w.beta_f64 {
                (0.9f64 * *x as f64 + ui as f64) as f32
            } else if w.fma {
                beta.mul_add(*x, ui)
            } else {
                (beta * *x) + ui
            };
        }
        let kc = (p.k as usize).min(ec.len());
        let mag = |i: usize| ec[i].to_bits() & 0x7FFF_FFFF;
        let mut order: Vec<usize> = (0..ec.len()).collect();
        order.sort_by(|&a, &b| {
            let by_mag = mag(b).cmp(&mag(a));
            if w.ties_high {
                by_mag.then(b.cmp(&a))
            } else {
                by_mag.then(a.cmp(&b))
            }
        });
        let mut sel = order[..kc].to_vec();
        sel.sort_unstable();
        let max = (0..ec.len()).map(mag).max().unwrap_or(0);
        let scale = ref_bf16_ceil(f32::from_bits(max));
        let s = widen(scale);
        let mut ib = vec![0u8; (kc * log2 as usize).div_ceil(8)];
        let mut vb = vec![
            0u8;
            if bits == 16 {
                2 * kc
            } else {
                (kc * bits).div_ceil(8)
            }
        ];
        for (j, &i) in sel.iter().enumerate() {
            put_bits(&mut ib, j * log2 as usize, log2, i as u32);
            let v = ec[i];
            let d = if bits == 16 {
                let h = ref_bf16(v, w);
                vb[2 * j..2 * j + 2].copy_from_slice(&h.to_le_bytes());
                widen(h)
            } else {
                let q = ref_code(v, s, bits as u32, w);
                put_bits(&mut vb, j * bits, bits as u32, q);
                let m = ((1u32 << bits) - 1) as f32;
                let level = ((2.0 * q as f32) - m) / m;
                if w.fma {
                    // The wrong variant fuses e − s·L[q] into one rounding.
                    ec[i] = (-s).mul_add(level, v);
                    continue;
                }
                s * level
            };
            ec[i] -= d;
        }
        idx.extend(ib);
        val.extend(vb);
        if bits != 16 {
            scales.push(scale);
        }
    }
    EncodedTensor {
        name: String::new(),
        shape: vec![u.len() as u64],
        dtype: InDtype::F32,
        params: *p,
        idx,
        val,
        scales,
    }
}

/// `dense[i] = dense[i] + (w · d)`, shard by shard in order, from decoded sparse values.
fn ref_merge(n: usize, shards: &[(f32, Vec<(usize, f32)>)], wrong: Wrong) -> Vec<f32> {
    let mut acc = vec![0f32; n];
    for (weight, entries) in shards {
        for &(i, d) in entries {
            acc[i] = if wrong.fma {
                weight.mul_add(d, acc[i])
            } else {
                acc[i] + (weight * d)
            };
        }
    }
    acc
}

fn ref_decode(t: &EncodedTensor) -> Vec<(usize, f32)> {
    let c = t.params.chunk as usize;
    let log2 = t.params.chunk.ilog2() as usize;
    let bits = t.params.values.bits() as usize;
    let n = t.numel() as usize;
    let mut out = Vec::new();
    let (mut io, mut vo) = (0, 0);
    for (ci, start) in (0..n).step_by(c).enumerate() {
        let kc = (t.params.k as usize).min(n - start);
        let get = |buf: &[u8], at: usize, width: usize| -> u32 {
            (0..width).fold(0, |a, b| {
                a | (u32::from(buf[(at + b) / 8] >> ((at + b) % 8) & 1) << b)
            })
        };
        let ib = &t.idx[io..io + (kc * log2).div_ceil(8)];
        let vlen = if t.params.values == ValueFormat::Bf16 {
            2 * kc
        } else {
            (kc * bits).div_ceil(8)
        };
        let vb = &t.val[vo..vo + vlen];
        for j in 0..kc {
            let i = get(ib, j * log2, log2) as usize;
            let d = if t.params.values == ValueFormat::Bf16 {
                widen(u16::from_le_bytes([vb[2 * j], vb[2 * j + 1]]))
            } else {
                let m = ((1u32 << bits) - 1) as f32;
                let q = get(vb, j * bits, bits) as f32;
                widen(t.scales[ci]) * (((2.0 * q) - m) / m)
            };
            out.push((start + i, d));
        }
        io += ib.len();
        vo += vlen;
    }
    out
}

// ---------------------------------------------------------------------------------------
// The cases.

/// A step of one case: the update, the committed section and state.
struct Case {
    name: &'static str,
    params: CodecParams,
    beta: f32,
    steps: Vec<Vec<f32>>,
}

/// Values `v` in (−1, 1) where, with scale 1, `wrong` quantizes differently from the spec.
fn disagreeing(bits: u32, wrong: Wrong, want: usize) -> Vec<f32> {
    let m = (1u32 << bits) - 1;
    let h = m as f32 * 0.5;
    let mut found = Vec::new();
    for n in 0..m {
        // Around each decision boundary x = n + 0.5, walk a few hundred ulps either way.
        let v0 = ((n as f32 + 0.5) / h) - 1.0;
        let mut v = f32::from_bits(v0.to_bits().saturating_sub(300));
        for _ in 0..600 {
            if v.abs() < 1.0
                && ref_code(v, 1.0, bits, wrong) != ref_code(v, 1.0, bits, Wrong::default())
            {
                found.push(v);
                if found.len() >= want {
                    return found;
                }
            }
            v = f32::from_bits(v.to_bits() + 1);
        }
    }
    found
}

fn cases() -> Vec<Case> {
    use IndexEncoding::Packed;
    use ValueFormat::*;
    let mut out = Vec::new();
    // Ties: chunk 0 has six values of magnitude 1 (k = 4 keeps the four lowest indices);
    // chunk 1 is all zeros but for ±0 (scale 0, the lowest indices kept); the short last
    // chunk ties at 0.5.
    let mut t = vec![0.001f32; 164];
    for (i, x) in [
        (5, 1.0),
        (9, -1.0),
        (17, 1.0),
        (40, -1.0),
        (41, 1.0),
        (60, 1.0),
    ] {
        t[i] = x;
    }
    for x in &mut t[64..128] {
        *x = 0.0;
    }
    t[70] = -0.0;
    for i in [130, 131, 140, 150, 163] {
        t[i] = if i % 2 == 0 { 0.5 } else { -0.5 };
    }
    out.push(Case {
        name: "ties",
        params: params(64, 4, Int8, Packed),
        beta: 0.5,
        steps: vec![t],
    });
    // Quantization at the decision boundaries, scale exactly 1 (element 0).
    for (name, bits, values) in [
        ("round-int2", 2, Int2),
        ("round-int4", 4, Int4),
        ("round-int8", 8, Int8),
    ] {
        let mut v = vec![1.0f32];
        for (_, w) in WRONGS
            .iter()
            .filter(|(_, w)| w.rint || w.round_away || w.f64_quant || w.fma)
        {
            v.extend(disagreeing(bits, *w, 12));
        }
        v.truncate(64);
        while v.len() < 64 {
            v.push(0.25 - v.len() as f32 / 512.0);
        }
        out.push(Case {
            name,
            params: params(64, 64, values, Packed),
            beta: 0.5,
            steps: vec![v],
        });
    }
    // bf16 values exactly halfway between two bf16 numbers, even and odd below.
    let mut v: Vec<f32> = (0..32u32)
        .map(|i| {
            f32::from_bits(((0x3F00 + i) << 16) | 0x8000) * if i % 3 == 0 { -1.0 } else { 1.0 }
        })
        .collect();
    v.extend((0..32).map(|i| (i as f32 * 0.731).sin() * 0.1));
    out.push(Case {
        name: "bf16-halves",
        params: params(64, 64, Bf16, Packed),
        beta: 0.5,
        steps: vec![v],
    });
    // An inexact beta (0.9) over three steps: error feedback, fused or not, in f32 or f64.
    let wave = |s: u32| -> Vec<f32> {
        (0..192)
            .map(|i| ((i as f32 * 0.377 + s as f32 * 1.3).sin() * (1.0 + (i % 5) as f32)) * 0.01)
            .collect()
    };
    out.push(Case {
        name: "beta-0.9",
        params: params(64, 8, Int4, Packed),
        beta: 0.9,
        steps: vec![wave(1), wave(2), wave(3)],
    });
    out
}

fn encode_case(c: &Case) -> (Vec<Vec<u8>>, Vec<f32>) {
    let opts = EncodeOptions {
        params: c.params,
        beta: c.beta,
        section_bytes: 16 << 20,
    };
    let mut state = EfState::default();
    let mut sections = Vec::new();
    for u in &c.steps {
        let enc = encode_update(&f32_update(&[("w", u)]), &mut state, &opts).unwrap();
        assert_eq!(enc.sections.len(), 1);
        sections.push(enc.sections[0].1.clone());
    }
    let n = c.steps[0].len();
    let e = state.buffer("w", n).unwrap().clone();
    (sections, e)
}

fn f32_file(v: &[f32]) -> Vec<u8> {
    let mut d = Dense::new();
    d.insert("w".into(), (vec![v.len() as u64], v.to_vec()));
    dense_to_safetensors(&d).unwrap()
}

fn read_f32_file(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("w")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// What the reference produces, per step (idx, val, scales) and the final state.
type RefOut = (Vec<(Vec<u8>, Vec<u8>, Vec<u16>)>, Vec<f32>);

fn run_reference(c: &Case, w: Wrong) -> RefOut {
    let n = c.steps[0].len();
    let mut e = vec![0f32; n];
    let steps = c
        .steps
        .iter()
        .map(|u| {
            let t = ref_encode(u, &mut e, c.beta, &c.params, w);
            (t.idx, t.val, t.scales)
        })
        .collect();
    (steps, e)
}

fn committed(c: &Case) -> RefOut {
    let d = dir().join(c.name);
    let steps = (1..=c.steps.len())
        .map(|s| {
            let bytes = std::fs::read(d.join(format!("section-{s}.safetensors"))).unwrap();
            let t = read_section(&bytes, None, &CodecLimits::default())
                .unwrap()
                .remove(0);
            (t.idx, t.val, t.scales)
        })
        .collect();
    (
        steps,
        read_f32_file(&d.join(format!("state-after-{}.safetensors", c.steps.len()))),
    )
}

fn outputs_equal(a: &RefOut, b: &RefOut) -> bool {
    a.0 == b.0 && same_bits(&a.1, &b.1)
}

#[test]
fn arithmetic_vectors_pin_every_rounding_and_tie() {
    let d = dir();
    let mut index = Vec::new();
    let cases = cases();
    for c in &cases {
        let (sections, state) = encode_case(c);
        for (s, (bytes, u)) in sections.iter().zip(&c.steps).enumerate() {
            check(
                &d.join(format!("{}/update-{}.safetensors", c.name, s + 1)),
                &f32_update(&[("w", u)]),
            );
            check(
                &d.join(format!("{}/section-{}.safetensors", c.name, s + 1)),
                bytes,
            );
        }
        check(
            &d.join(format!(
                "{}/state-after-{}.safetensors",
                c.name,
                c.steps.len()
            )),
            &f32_file(&state),
        );
        index.push(serde_json::json!({
            "name": c.name, "params": c.params, "beta": c.beta, "steps": c.steps.len(),
            "files": "update-N.safetensors (tensor w, f32), section-N.safetensors, state-after-LAST.safetensors (tensor w)",
        }));
    }

    // The reference, written from the text alone, reproduces every committed vector...
    for c in &cases {
        assert!(
            outputs_equal(&run_reference(c, Wrong::default()), &committed(c)),
            "{}: the spec's reference disagrees with the committed vector",
            c.name
        );
    }
    // ...and each mistake changes at least one committed byte or float.
    for (what, w) in WRONGS {
        let caught: Vec<&str> = cases
            .iter()
            .filter(|c| !outputs_equal(&run_reference(c, w), &committed(c)))
            .map(|c| c.name)
            .collect();
        assert!(!caught.is_empty(), "no vector catches {what}");
    }

    // A weighted merge of six shards (the three beta-0.9 sections, twice) in shard order.
    let beta = cases.iter().find(|c| c.name == "beta-0.9").unwrap();
    let weights = [0.1f32, 0.25, 1.0 / 3.0, 0.7, 0.3, 0.9];
    let section_of = |s: usize| format!("beta-0.9/section-{}.safetensors", s % 3 + 1);
    let mut dense = Dense::new();
    for (s, w) in weights.iter().enumerate() {
        let bytes = std::fs::read(d.join(section_of(s))).unwrap();
        accumulate_section(&mut dense, &bytes, None, &CodecLimits::default(), *w).unwrap();
    }
    check(
        &d.join("merge/merged.safetensors"),
        &dense_to_safetensors(&dense).unwrap(),
    );
    let merged = read_f32_file(&d.join("merge/merged.safetensors"));
    let shards: Vec<(f32, Vec<(usize, f32)>)> = weights
        .iter()
        .enumerate()
        .map(|(s, &w)| {
            let bytes = std::fs::read(d.join(section_of(s))).unwrap();
            let t = read_section(&bytes, None, &CodecLimits::default())
                .unwrap()
                .remove(0);
            (w, ref_decode(&t))
        })
        .collect();
    let n = beta.steps[0].len();
    assert!(
        same_bits(&ref_merge(n, &shards, Wrong::default()), &merged),
        "reference merge"
    );
    assert!(
        !same_bits(
            &ref_merge(
                n,
                &shards,
                Wrong {
                    fma: true,
                    ..Wrong::default()
                }
            ),
            &merged
        ),
        "no merge vector catches a fused multiply-add"
    );
    index.push(serde_json::json!({
        "name": "merge",
        "sections": (0..weights.len()).map(section_of).collect::<Vec<_>>(),
        "weights_f32_bits": weights.iter().map(|w| format!("{:08x}", w.to_bits())).collect::<Vec<_>>(),
        "result": "merge/merged.safetensors",
        "rule": "dense starts at +0.0; for each shard in order, for each kept element: dense[i] = dense[i] + (weight * value), two roundings",
    }));

    index.push(templar_sections(&d));
    index.extend(refusals(&d));

    let doc = serde_json::to_string_pretty(&serde_json::json!({
        "codec": "topk-v1",
        "about": "vectors that pin the arithmetic (ties, rounding, fused operations, inexact beta, bf16 halves), a weighted merge, several sections at C=4096, and one decoder refusal per reason; see pipeline/tests/it/golden_arithmetic.rs",
        "cases": index,
    }))
    .unwrap()
        + "\n";
    check(&d.join("cases.json"), doc.as_bytes());
}

/// Three tensors at the Templar point (C = 4096, k = 64, int2, compact, per-chunk scales)
/// over two steps, grouped into sections of about 200 payload bytes: pins the grouping
/// rule and the section names.
fn templar_sections(d: &Path) -> serde_json::Value {
    let shapes: [(&str, usize); 3] = [
        ("a.weight", 2 * 4096 + 1000),
        ("b.weight", 4096),
        ("c.bias", 3000),
    ];
    let opts = EncodeOptions {
        params: params(4096, 64, ValueFormat::Int2, IndexEncoding::Compact),
        beta: 0.9,
        section_bytes: 200,
    };
    let mut state = EfState::default();
    let mut steps = Vec::new();
    for step in 1..=2u32 {
        let data: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(t, &(_, n))| {
                (0..n)
                    .map(|i| ((i as f32 * 0.0123 + (t as u32 * 7 + step) as f32).sin()) * 0.02)
                    .collect()
            })
            .collect();
        let named: Vec<(&str, &[f32])> = shapes
            .iter()
            .zip(&data)
            .map(|((n, _), v)| (*n, v.as_slice()))
            .collect();
        let update = f32_update(&named);
        check(
            &d.join(format!("templar/update-{step}.safetensors")),
            &update,
        );
        let enc = encode_update(&update, &mut state, &opts).unwrap();
        let mut names = Vec::new();
        for (name, bytes) in &enc.sections {
            check(
                &d.join(format!("templar/step-{step}-{name}.safetensors")),
                bytes,
            );
            names.push(name.clone());
        }
        assert!(names.len() > 1, "the case must span several sections");
        steps.push(serde_json::json!({"update": format!("templar/update-{step}.safetensors"), "sections": names}));
    }
    serde_json::json!({
        "name": "templar", "params": opts.params, "beta": 0.9, "section_bytes": 200,
        "grouping": "tensors in name order; after adding a tensor, close the section when its payload (index + value bytes + 2 per scale) reaches section_bytes, or at the last tensor",
        "steps": steps,
    })
}

/// One section per decoder refusal, each derived from a valid one, with its reason.
fn refusals(d: &Path) -> Vec<serde_json::Value> {
    // A valid tensor with a short last chunk (100 = 64 + 36), packed indices.
    let u: Vec<f32> = (0..100).map(|i| ((i as f32) * 0.61).sin()).collect();
    let encode = |p: CodecParams| {
        let opts = EncodeOptions {
            params: p,
            beta: 0.5,
            section_bytes: 16 << 20,
        };
        let enc = encode_update(&f32_update(&[("w", &u)]), &mut EfState::default(), &opts).unwrap();
        read_section(&enc.sections[0].1, None, &CodecLimits::default())
            .unwrap()
            .remove(0)
    };
    let packed = encode(params(64, 4, ValueFormat::Int8, IndexEncoding::Packed));
    let compact = encode(params(64, 5, ValueFormat::Int2, IndexEncoding::Compact));
    let bf16 = encode(params(64, 4, ValueFormat::Bf16, IndexEncoding::Packed));
    let model = ModelSpec {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![100],
            dtype: InDtype::F32,
        }],
    };
    let with = |t: &EncodedTensor, f: &dyn Fn(&mut EncodedTensor)| {
        let mut t = t.clone();
        f(&mut t);
        t
    };
    // Packed fields are 6 bits (C = 64): chunk 1 starts at byte 3 (4 × 6 bits).
    let set_index = |t: &mut EncodedTensor, at: usize, v: u32| {
        for b in 0..6 {
            let bit = at + b;
            t.idx[bit / 8] &= !(1 << (bit % 8));
            t.idx[bit / 8] |= (((v >> b) & 1) as u8) << (bit % 8);
        }
    };
    let cases: Vec<(&str, &str, EncodedTensor, bool)> = vec![
        (
            "index-past-short-chunk",
            "index_out_of_range",
            with(&packed, &|t| set_index(t, 24 + 18, 40)),
            false,
        ),
        (
            "indices-swapped",
            "indices_not_increasing",
            with(&packed, &|t| {
                let (a, b) = (t.idx[0] & 0x3F, (t.idx[0] >> 6 | t.idx[1] << 2) & 0x3F);
                set_index(t, 0, u32::from(b));
                set_index(t, 6, u32::from(a));
            }),
            false,
        ),
        (
            "elias-fano-short",
            "index_malformed",
            with(&compact, &|t| {
                // Clear the high bit vector of chunk 0 (l = floor(log2(64 / 5)) = 3: 15 low
                // bits, then 5 + (63 >> 3) + 1 = 13 high bits): it then holds no element.
                for bit in 15..28 {
                    t.idx[bit / 8] &= !(1 << (bit % 8));
                }
            }),
            false,
        ),
        (
            "scale-infinite",
            "non_finite",
            with(&packed, &|t| t.scales[0] = 0x7F80),
            false,
        ),
        (
            "scale-negative-zero",
            "non_finite",
            with(&packed, &|t| t.scales[0] = 0x8000),
            false,
        ),
        (
            "bf16-value-nan",
            "non_finite",
            with(&bf16, &|t| {
                t.val[0] = 0xC0;
                t.val[1] = 0x7F;
            }),
            false,
        ),
        (
            "value-block-short",
            "size_mismatch",
            with(&packed, &|t| {
                t.val.pop();
            }),
            false,
        ),
        (
            "chunk-not-power-of-two",
            "codec_params",
            with(&packed, &|t| t.params.chunk = 96),
            false,
        ),
        (
            "k-over-chunk",
            "k_over_chunk",
            with(&packed, &|t| t.params.k = 65),
            false,
        ),
        (
            "unknown-tensor",
            "unknown_tensor",
            with(&packed, &|t| t.name = "v".into()),
            true,
        ),
        (
            "other-shape",
            "shape_mismatch",
            with(&packed, &|t| t.shape = vec![10, 10]),
            true,
        ),
    ];
    let mut out = Vec::new();
    for (name, reason, t, needs_model) in cases {
        let bytes = write_section(std::slice::from_ref(&t)).unwrap();
        let path = d.join(format!("refuse/{name}.safetensors"));
        check(&path, &bytes);
        let committed = std::fs::read(&path).unwrap();
        let got = read_section(
            &committed,
            needs_model.then_some(&model),
            &CodecLimits::default(),
        )
        .map(|_| "accepted")
        .unwrap_or_else(|e| e.reason());
        assert_eq!(got, reason, "{name}");
        out.push(serde_json::json!({
            "name": format!("refuse/{name}"), "reason": reason,
            "model": if needs_model { serde_json::json!({"w": [100]}) } else { serde_json::Value::Null },
        }));
    }
    // Not safetensors at all, and a codec name the decoder does not know.
    let valid = write_section(std::slice::from_ref(&packed)).unwrap();
    let renamed = {
        let text = valid.clone();
        let at = text.windows(7).position(|w| w == b"topk-v1").unwrap();
        let mut t = text;
        t[at + 6] = b'9';
        t
    };
    for (name, bytes) in [
        ("not-safetensors", b"not a section".to_vec()),
        ("codec-unknown", renamed),
    ] {
        let path = d.join(format!("refuse/{name}.safetensors"));
        check(&path, &bytes);
        let got = read_section(
            &std::fs::read(&path).unwrap(),
            None,
            &CodecLimits::default(),
        )
        .map(|_| "accepted")
        .unwrap_or_else(|e| e.reason());
        assert_eq!(got, "section_malformed", "{name}");
        out.push(serde_json::json!({"name": format!("refuse/{name}"), "reason": "section_malformed", "model": null}));
    }
    out
}
