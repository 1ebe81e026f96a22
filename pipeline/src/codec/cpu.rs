//! The CPU codec: the reference implementation of `schemas/gradient.md`, parallel over
//! chunks with rayon. Chunks are independent and their output blocks sit at fixed offsets,
//! so the bytes do not depend on the thread count.

use rayon::prelude::*;

use super::bits::{self, BitWriter, IndexFault};
use super::quant::{ValueFormat, bf16_ceil, bf16_to_f32, f32_to_bf16, levels, quantize};
use super::{
    CodecError, CodecParams, EncodedTensor, InDtype, IndexEncoding, Layout, ScaleMode, TensorInput,
};

const MAG: u32 = 0x7FFF_FFFF;
const INF_BITS: u32 = 0x7F80_0000;

/// Per-thread working memory, reused across chunks.
#[derive(Default)]
struct Scratch {
    cand: Vec<(u32, u32)>,
    bitmap: Vec<u64>,
    sel: Vec<u32>,
}

/// What the error-feedback pass learned about one chunk.
struct ChunkStats {
    hist: [u32; 256],
    max: u32,
    nonfinite: bool,
}

#[inline]
fn ef_pass<F: Fn(&[u8]) -> f32>(
    state: &mut [f32],
    input: &[u8],
    size: usize,
    beta: f32,
    load: F,
) -> ChunkStats {
    let mut st = ChunkStats {
        hist: [0; 256],
        max: 0,
        nonfinite: false,
    };
    for (s, raw) in state.iter_mut().zip(input.chunks_exact(size)) {
        // Two rounded operations, never fused: the GPU kernels do the same.
        let v = beta * *s + load(raw);
        *s = v;
        let m = v.to_bits() & MAG;
        st.nonfinite |= m >= INF_BITS;
        st.max = st.max.max(m);
        st.hist[(m >> 23) as usize] += 1;
    }
    st
}

fn ef_chunk(state: &mut [f32], input: &[u8], dtype: InDtype, beta: f32) -> ChunkStats {
    match dtype {
        InDtype::F32 => ef_pass(state, input, 4, beta, |b| {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        InDtype::Bf16 => ef_pass(state, input, 2, beta, |b| {
            bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
        }),
        InDtype::F16 => ef_pass(state, input, 2, beta, |b| {
            half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
    }
}

/// The k largest magnitudes of `state` (ties to the lower index), ascending, into `sc.sel`.
/// A histogram of exponents finds the threshold bucket; only that bucket is ordered.
fn select(state: &[f32], k: usize, hist: &[u32; 256], sc: &mut Scratch) {
    let mut above = 0usize;
    let mut bstar = 0u32;
    for b in (0..256).rev() {
        let h = hist[b] as usize;
        if above + h >= k {
            bstar = b as u32;
            break;
        }
        above += h;
    }
    let need = k - above;
    let words = state.len().div_ceil(64);
    sc.bitmap.clear();
    sc.bitmap.resize(words, 0);
    sc.cand.clear();
    for (i, v) in state.iter().enumerate() {
        let m = v.to_bits() & MAG;
        let e = m >> 23;
        if e > bstar {
            sc.bitmap[i / 64] |= 1 << (i % 64);
        } else if e == bstar {
            sc.cand.push((m, i as u32));
        }
    }
    if sc.cand.len() > need {
        sc.cand
            .select_nth_unstable_by(need - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    for &(_, i) in &sc.cand[..need] {
        sc.bitmap[i as usize / 64] |= 1 << (i % 64);
    }
    sc.sel.clear();
    for (w, &word) in sc.bitmap.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            sc.sel.push((w * 64) as u32 + x.trailing_zeros());
            x &= x - 1;
        }
    }
}

/// Writes one chunk's index and value blocks and subtracts what was sent from the buffer.
#[allow(clippy::too_many_arguments)]
fn emit(
    state: &mut [f32],
    sel: &[u32],
    scale: u16,
    p: &CodecParams,
    lv: &[f32],
    idx_out: &mut [u8],
    val_out: &mut [u8],
    tensor: &str,
) -> Result<(), CodecError> {
    let universe = state.len() as u32;
    bits::write_indices(
        idx_out,
        sel,
        p.indices == IndexEncoding::Compact,
        universe,
        p.chunk.ilog2(),
    );
    if p.values == ValueFormat::Bf16 {
        for (j, &i) in sel.iter().enumerate() {
            let v = state[i as usize];
            let h = f32_to_bf16(v);
            if h & 0x7F80 == 0x7F80 {
                return Err(CodecError::NonFinite {
                    tensor: tensor.into(),
                    what: "a value rounded to bf16".into(),
                });
            }
            val_out[2 * j..2 * j + 2].copy_from_slice(&h.to_le_bytes());
            state[i as usize] = v - bf16_to_f32(h);
        }
        return Ok(());
    }
    let s = bf16_to_f32(scale);
    let b = p.values.bits();
    let mut w = BitWriter::new(val_out);
    for &i in sel {
        let v = state[i as usize];
        let q = quantize(v, s, b);
        w.put(q, b);
        state[i as usize] = v - s * lv[q as usize];
    }
    Ok(())
}

fn non_finite(tensor: &str) -> CodecError {
    CodecError::NonFinite {
        tensor: tensor.into(),
        what: "the update (or error-feedback buffer)".into(),
    }
}

/// Encodes one tensor and advances its error-feedback buffer `state` (same length as the
/// tensor, f32). On error `state` is left part-updated: reload it before trying again.
pub fn encode_tensor(
    input: &TensorInput,
    state: &mut [f32],
    beta: f32,
    p: &CodecParams,
) -> Result<EncodedTensor, CodecError> {
    p.validate()?;
    let n: u64 = input.shape.iter().product();
    let size = input.dtype.size();
    if state.len() as u64 != n || input.data.len() as u64 != n * size as u64 {
        return Err(CodecError::SizeMismatch {
            tensor: input.name.into(),
            what: "update or state".into(),
            got: input.data.len(),
            want: n as usize * size,
        });
    }
    let lay = Layout::new(n, p);
    let mut idx = vec![0u8; lay.idx_len()];
    let mut val = vec![0u8; lay.val_len()];
    let lv = if p.values.scaled() {
        levels(p.values.bits())
    } else {
        Vec::new()
    };
    let c = p.chunk as usize;
    let name = input.name;
    let chunk_mode = p.scales == ScaleMode::Chunk || !p.values.scaled();
    let scales: Vec<u16> = if chunk_mode {
        let per_chunk: Vec<u16> = state
            .par_chunks_mut(c)
            .zip(input.data.par_chunks(c * size))
            .zip(idx.par_chunks_mut(lay.idx_full))
            .zip(val.par_chunks_mut(lay.val_full))
            .map_init(Scratch::default, |sc, (((st, inp), io), vo)| {
                let stats = ef_chunk(st, inp, input.dtype, beta);
                if stats.nonfinite {
                    return Err(non_finite(name));
                }
                let k = (p.k as usize).min(st.len());
                select(st, k, &stats.hist, sc);
                let scale = bf16_ceil(f32::from_bits(stats.max));
                emit(st, &sc.sel, scale, p, &lv, io, vo, name)?;
                Ok(scale)
            })
            .collect::<Result<_, _>>()?;
        if p.values.scaled() {
            per_chunk
        } else {
            Vec::new()
        }
    } else {
        // One scale for the tensor: select everywhere first, then quantize against the max.
        let mut sel_all = vec![0u32; lay.kept() as usize];
        let maxes: Vec<u32> = state
            .par_chunks_mut(c)
            .zip(input.data.par_chunks(c * size))
            .zip(sel_all.par_chunks_mut(lay.k_full as usize))
            .map_init(Scratch::default, |sc, ((st, inp), out)| {
                let stats = ef_chunk(st, inp, input.dtype, beta);
                if stats.nonfinite {
                    return Err(non_finite(name));
                }
                select(st, out.len(), &stats.hist, sc);
                out.copy_from_slice(&sc.sel);
                Ok(stats.max)
            })
            .collect::<Result<_, _>>()?;
        let scale = bf16_ceil(f32::from_bits(maxes.iter().copied().max().unwrap_or(0)));
        state
            .par_chunks_mut(c)
            .zip(sel_all.par_chunks(lay.k_full as usize))
            .zip(idx.par_chunks_mut(lay.idx_full))
            .zip(val.par_chunks_mut(lay.val_full))
            .try_for_each(|(((st, sel), io), vo)| emit(st, sel, scale, p, &lv, io, vo, name))?;
        if lay.n_scales == 1 {
            vec![scale]
        } else {
            Vec::new()
        }
    };
    Ok(EncodedTensor {
        name: input.name.to_string(),
        shape: input.shape.to_vec(),
        dtype: input.dtype,
        params: *p,
        idx,
        val,
        scales,
    })
}

fn index_error(t: &EncodedTensor, chunk: usize, f: IndexFault) -> CodecError {
    let tensor = t.name.clone();
    match f {
        IndexFault::OutOfRange(index) => CodecError::IndexOutOfRange {
            tensor,
            chunk,
            index,
        },
        IndexFault::NotIncreasing(index) => CodecError::IndicesNotIncreasing {
            tensor,
            chunk,
            index,
        },
        IndexFault::Malformed => CodecError::IndexMalformed { tensor, chunk },
    }
}

/// Checks everything about an encoded tensor that does not need the model: parameters,
/// block sizes, scales, every index and every value.
pub fn validate(t: &EncodedTensor) -> Result<(), CodecError> {
    t.params.validate()?;
    let lay = Layout::new(t.numel(), &t.params);
    let size = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(CodecError::SizeMismatch {
                tensor: t.name.clone(),
                what: what.into(),
                got,
                want,
            })
        }
    };
    size("index data", t.idx.len(), lay.idx_len())?;
    size("value data", t.val.len(), lay.val_len())?;
    size("scales", t.scales.len() * 2, lay.n_scales * 2)?;
    if t.scales
        .iter()
        .any(|&s| s & 0x8000 != 0 || s & 0x7F80 == 0x7F80)
    {
        return Err(CodecError::NonFinite {
            tensor: t.name.clone(),
            what: "a scale (or it is negative)".into(),
        });
    }
    let compact = t.params.indices == IndexEncoding::Compact;
    let log2 = t.params.chunk.ilog2();
    let bf16 = t.params.values == ValueFormat::Bf16;
    (0..lay.n_chunks)
        .into_par_iter()
        .try_for_each_init(Vec::new, |buf: &mut Vec<u32>, c| {
            let k = lay.k_of(c) as usize;
            buf.resize(k, 0);
            let io = c * lay.idx_full;
            let block = &t.idx[io..io
                + if c + 1 == lay.n_chunks {
                    lay.idx_last
                } else {
                    lay.idx_full
                }];
            bits::read_indices(block, buf, compact, lay.chunk_len(c), log2)
                .map_err(|f| index_error(t, c, f))?;
            if bf16 {
                let vo = c * lay.val_full;
                for j in 0..k {
                    let h = u16::from_le_bytes([t.val[vo + 2 * j], t.val[vo + 2 * j + 1]]);
                    if h & 0x7F80 == 0x7F80 {
                        return Err(CodecError::NonFinite {
                            tensor: t.name.clone(),
                            what: format!("a value in chunk {c}"),
                        });
                    }
                }
            }
            Ok(())
        })
}

/// Decodes chunk `c` into (local index, value) pairs via `f`. Call only after `validate`.
#[inline]
fn for_each_value(
    t: &EncodedTensor,
    lay: &Layout,
    lv: &[f32],
    c: usize,
    buf: &mut Vec<u32>,
    mut f: impl FnMut(u32, f32),
) {
    let k = lay.k_of(c) as usize;
    buf.resize(k, 0);
    let io = c * lay.idx_full;
    let block = &t.idx[io..io
        + if c + 1 == lay.n_chunks {
            lay.idx_last
        } else {
            lay.idx_full
        }];
    let compact = t.params.indices == IndexEncoding::Compact;
    if bits::read_indices(
        block,
        buf,
        compact,
        lay.chunk_len(c),
        t.params.chunk.ilog2(),
    )
    .is_err()
    {
        return;
    }
    let vo = c * lay.val_full;
    if t.params.values == ValueFormat::Bf16 {
        for (j, &i) in buf.iter().enumerate() {
            f(
                i,
                bf16_to_f32(u16::from_le_bytes([
                    t.val[vo + 2 * j],
                    t.val[vo + 2 * j + 1],
                ])),
            );
        }
        return;
    }
    let s = bf16_to_f32(match t.params.scales {
        ScaleMode::Chunk => t.scales[c],
        ScaleMode::Tensor => t.scales[0],
    });
    let b = t.params.values.bits();
    let vals = &t.val[vo..];
    for (j, &i) in buf.iter().enumerate() {
        f(i, s * lv[bits::get(vals, j * b as usize, b) as usize]);
    }
}

/// Adds `weight × decoded` into `dense` (f32, the tensor's length). The whole tensor is
/// validated first, so a bad tensor leaves `dense` untouched: a rejected shard never
/// poisons a merge.
pub fn accumulate(t: &EncodedTensor, dense: &mut [f32], weight: f32) -> Result<(), CodecError> {
    validate(t)?;
    let lay = Layout::new(t.numel(), &t.params);
    if dense.len() as u64 != lay.n {
        return Err(CodecError::SizeMismatch {
            tensor: t.name.clone(),
            what: "dense accumulator".into(),
            got: dense.len(),
            want: lay.n as usize,
        });
    }
    let lv = if t.params.values.scaled() {
        levels(t.params.values.bits())
    } else {
        Vec::new()
    };
    dense
        .par_chunks_mut(t.params.chunk as usize)
        .enumerate()
        .for_each_init(Vec::new, |buf, (c, out)| {
            // Two rounded operations, never fused (bit parity with the GPU path).
            for_each_value(t, &lay, &lv, c, buf, |i, v| out[i as usize] += weight * v);
        });
    Ok(())
}

/// The sparse form: global indices (ascending) and decoded values.
pub fn to_sparse(t: &EncodedTensor) -> Result<(Vec<u64>, Vec<f32>), CodecError> {
    validate(t)?;
    let lay = Layout::new(t.numel(), &t.params);
    let lv = if t.params.values.scaled() {
        levels(t.params.values.bits())
    } else {
        Vec::new()
    };
    let mut idx = Vec::with_capacity(lay.kept() as usize);
    let mut val = Vec::with_capacity(lay.kept() as usize);
    let mut buf = Vec::new();
    for c in 0..lay.n_chunks {
        let base = c as u64 * t.params.chunk as u64;
        for_each_value(t, &lay, &lv, c, &mut buf, |i, v| {
            idx.push(base + i as u64);
            val.push(v);
        });
    }
    Ok((idx, val))
}
