//! The CPU codec: the reference implementation of `schemas/gradient.md`, parallel over
//! chunks with rayon. Chunks are independent and their output blocks sit at fixed offsets,
//! so the bytes do not depend on the thread count.

#![warn(missing_docs)]

use std::ops::Range;

use rayon::prelude::*;

use super::bits::{self, BitWriter, IndexFault};
use super::quant::{ValueFormat, bf16_ceil, bf16_to_f32, f32_to_bf16, levels, quantize};
use super::{
    ChunkLayout, CodecError, CodecParams, EncodedTensor, InDtype, IndexEncoding, ScaleMode,
    TensorInput,
};

const MAG: u32 = 0x7FFF_FFFF;
const INF_BITS: u32 = 0x7F80_0000;

/// Per-thread working memory, reused across chunks.
#[derive(Default)]
struct Scratch {
    cand: Vec<(u32, u32)>,
    sub: Vec<(u32, u32)>,
    sel: Vec<u32>,
}

/// What the error-feedback pass learned about one chunk.
struct ChunkStats {
    max: u32,
    nonfinite: bool,
}

/// The streaming half: `e = beta·e + u` and the chunk's largest magnitude. Kept free of
/// anything but arithmetic so that it vectorises; it is bound by memory bandwidth.
#[inline(always)]
fn ef_pass<F: Fn(&[u8]) -> f32>(
    state: &mut [f32],
    input: &[u8],
    size: usize,
    beta: f32,
    load: F,
) -> ChunkStats {
    let mut max = 0u32;
    for (s, raw) in state.iter_mut().zip(input.chunks_exact(size)) {
        // Two rounded operations, never fused: the GPU kernels do the same.
        let v = beta * *s + load(raw);
        *s = v;
        max = max.max(v.to_bits() & MAG);
    }
    // Any NaN or infinity has a magnitude at or above the infinity pattern.
    ChunkStats {
        max,
        nonfinite: max >= INF_BITS,
    }
}

#[inline(always)]
fn ef_chunk_generic(state: &mut [f32], input: &[u8], dtype: InDtype, beta: f32) -> ChunkStats {
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

/// The same code compiled for AVX2 (wider vectors for the streaming pass). No FMA is
/// enabled and Rust never contracts `a * b + c`, so results are bit-identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn ef_chunk_avx2(state: &mut [f32], input: &[u8], dtype: InDtype, beta: f32) -> ChunkStats {
    ef_chunk_generic(state, input, dtype, beta)
}

fn ef_chunk(state: &mut [f32], input: &[u8], dtype: InDtype, beta: f32) -> ChunkStats {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { ef_chunk_avx2(state, input, dtype, beta) };
    }
    ef_chunk_generic(state, input, dtype, beta)
}

/// Exponent histogram of the chunk (now in cache), in four interleaved copies so that
/// runs of equal exponents do not serialise on one counter.
fn exponent_histogram(state: &[f32]) -> [u32; 256] {
    let mut h = [[0u32; 256]; 4];
    let mut quads = state.chunks_exact(4);
    for q in &mut quads {
        for (lane, v) in q.iter().enumerate() {
            h[lane][((v.to_bits() & MAG) >> 23) as usize] += 1;
        }
    }
    for v in quads.remainder() {
        h[0][((v.to_bits() & MAG) >> 23) as usize] += 1;
    }
    let mut out = [0u32; 256];
    for (b, o) in out.iter_mut().enumerate() {
        *o = h[0][b] + h[1][b] + h[2][b] + h[3][b];
    }
    out
}

/// The k largest magnitudes of `state` (ties to the lower index), ascending, into `sc.sel`.
///
/// The exponent histogram finds the bucket holding the k-th largest; everything at or above
/// that bucket is collected branch-free in index order; only the threshold bucket is
/// partially ordered to find the pivot (m, i) of the k-th element in (magnitude desc, index
/// asc) order; the selection is then exactly the collected elements that rank before or at
/// the pivot, already ascending.
fn select(state: &[f32], k: usize, sc: &mut Scratch) {
    if !select_sampled(state, k, sc) {
        select_histogram(state, k, sc);
    }
}

/// Exact top-k among the candidates in `sc.cand` (index order), given that every element
/// outside them ranks below all of the true top k.
fn finish_from_candidates(k: usize, sc: &mut Scratch) {
    let order = |a: &(u32, u32), b: &(u32, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    sc.sub.clear();
    sc.sub.extend_from_slice(&sc.cand);
    let pivot = *sc.sub.select_nth_unstable_by(k - 1, order).1;
    sc.sel.clear();
    sc.sel.extend(
        sc.cand
            .iter()
            .filter(|&&(m, i)| m > pivot.0 || (m == pivot.0 && i <= pivot.1))
            .map(|&(_, i)| i),
    );
}

/// Fast path: a floor estimated from every 16th element, low enough that about twice k
/// elements pass it; only those are collected and ordered. Returns false (and the caller
/// falls back to the histogram) when fewer than k pass, so the result is always exact.
fn select_sampled(state: &[f32], k: usize, sc: &mut Scratch) -> bool {
    const STRIDE: usize = 16;
    let samples = state.len() / STRIDE;
    let rank = (2 * k).div_ceil(STRIDE) + 2;
    if rank >= samples / 2 {
        return false;
    }
    sc.sub.clear();
    sc.sub
        .extend(state.iter().step_by(STRIDE).map(|v| (v.to_bits() & MAG, 0)));
    let floor = sc
        .sub
        .select_nth_unstable_by(rank - 1, |a, b| b.0.cmp(&a.0))
        .1
        .0;
    collect_at_least(state, floor, &mut sc.cand);
    if sc.cand.len() < k {
        return false;
    }
    finish_from_candidates(k, sc);
    true
}

/// Collects (magnitude, index) of every element with magnitude ≥ `floor`, in index order.
/// Blocks of 16 become a bit mask with a compare the compiler vectorises, and only set bits
/// are visited: most blocks hold no candidate.
fn collect_at_least(state: &[f32], floor: u32, out: &mut Vec<(u32, u32)>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { collect_at_least_avx2(state, floor, out) };
    }
    collect_at_least_generic(state, floor, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn collect_at_least_avx2(state: &[f32], floor: u32, out: &mut Vec<(u32, u32)>) {
    collect_at_least_generic(state, floor, out)
}

#[inline(always)]
fn collect_at_least_generic(state: &[f32], floor: u32, out: &mut Vec<(u32, u32)>) {
    out.clear();
    let mut blocks = state.chunks_exact(16);
    let mut base = 0u32;
    for b in &mut blocks {
        let mut mask = 0u32;
        for (j, v) in b.iter().enumerate() {
            mask |= u32::from((v.to_bits() & MAG) >= floor) << j;
        }
        while mask != 0 {
            let j = mask.trailing_zeros();
            mask &= mask - 1;
            out.push((b[j as usize].to_bits() & MAG, base + j));
        }
        base += 16;
    }
    for (j, v) in blocks.remainder().iter().enumerate() {
        let m = v.to_bits() & MAG;
        if m >= floor {
            out.push((m, base + j as u32));
        }
    }
}

/// Exact path for any distribution: the exponent histogram bounds the threshold bucket.
fn select_histogram(state: &[f32], k: usize, sc: &mut Scratch) {
    let hist = exponent_histogram(state);
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
    let floor = bstar << 23;
    sc.cand.clear();
    sc.cand.resize(state.len(), (0, 0));
    let mut len = 0usize;
    for (i, v) in state.iter().enumerate() {
        let m = v.to_bits() & MAG;
        sc.cand[len] = (m, i as u32);
        len += usize::from(m >= floor);
    }
    sc.cand.truncate(len);
    debug_assert!(need >= 1 && sc.cand.len() >= k);
    finish_from_candidates(k, sc);
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
    encode_with(input, State::InPlace(state), beta, p)
}

/// [`encode_tensor`] that leaves `state` as it is: each chunk's `β·e + u` is formed in a
/// chunk-sized scratch (in cache) instead of in the buffer, so a publisher needs no copy of
/// the buffer to encode before the shard is stored; [`advance_state`] brings the buffer to
/// what `encode_tensor` would have left once it is. Same bytes as `encode_tensor`.
pub fn encode_tensor_from(
    input: &TensorInput,
    state: &[f32],
    beta: f32,
    p: &CodecParams,
) -> Result<EncodedTensor, CodecError> {
    encode_with(input, State::ReadOnly(state), beta, p)
}

/// The error-feedback buffer an encoding works on.
enum State<'a> {
    /// Advanced as the encoding goes.
    InPlace(&'a mut [f32]),
    /// Read only; each chunk is worked on in a scratch copy.
    ReadOnly(&'a [f32]),
}

/// Per-thread scratch of the read-only encoding: one chunk of `β·e + u`.
#[derive(Default)]
struct ChunkBuf(Vec<f32>);

impl ChunkBuf {
    /// The chunk `st` copied into the scratch.
    fn of(&mut self, st: &[f32]) -> &mut [f32] {
        self.0.clear();
        self.0.extend_from_slice(st);
        &mut self.0
    }
}

/// One chunk of a chunk-scaled encoding: `e = β·e + u` into `st`, the top k, then its blocks
/// written and the sent values subtracted from `st`. Returns the chunk's scale.
#[allow(clippy::too_many_arguments)]
fn encode_chunk(
    st: &mut [f32],
    inp: &[u8],
    input: &TensorInput,
    beta: f32,
    p: &CodecParams,
    lv: &[f32],
    sc: &mut Scratch,
    io: &mut [u8],
    vo: &mut [u8],
) -> Result<u16, CodecError> {
    let stats = ef_chunk(st, inp, input.dtype, beta);
    if stats.nonfinite {
        return Err(non_finite(input.name));
    }
    let k = (p.k as usize).min(st.len());
    select(st, k, sc);
    let scale = bf16_ceil(f32::from_bits(stats.max));
    emit(st, &sc.sel, scale, p, lv, io, vo, input.name)?;
    Ok(scale)
}

/// The first pass of a tensor-scaled encoding over one chunk: `e = β·e + u` into `st` and
/// the top k into `out`. Returns the chunk's largest magnitude.
fn select_chunk(
    st: &mut [f32],
    inp: &[u8],
    input: &TensorInput,
    beta: f32,
    sc: &mut Scratch,
    out: &mut [u32],
) -> Result<u32, CodecError> {
    let stats = ef_chunk(st, inp, input.dtype, beta);
    if stats.nonfinite {
        return Err(non_finite(input.name));
    }
    select(st, out.len(), sc);
    out.copy_from_slice(&sc.sel);
    Ok(stats.max)
}

/// Runs `f` on every chunk of the state (in place, or on a scratch copy of a read-only
/// state) with that chunk's input bytes and its item of `other`, in parallel; collects the
/// results in chunk order.
fn map_chunks<'a, O, T, F>(
    state: &mut State<'_>,
    c: usize,
    inputs: rayon::slice::Chunks<'a, u8>,
    other: O,
    f: F,
) -> Result<Vec<T>, CodecError>
where
    O: IndexedParallelIterator,
    T: Send,
    F: Fn(&mut Scratch, &mut [f32], &[u8], O::Item) -> Result<T, CodecError> + Sync + Send,
{
    match state {
        State::InPlace(s) => s
            .par_chunks_mut(c)
            .zip(inputs)
            .zip(other)
            .map_init(Scratch::default, |sc, ((st, inp), o)| f(sc, st, inp, o))
            .collect(),
        State::ReadOnly(s) => s
            .par_chunks(c)
            .zip(inputs)
            .zip(other)
            .map_init(
                || (Scratch::default(), ChunkBuf::default()),
                |(sc, buf), ((st, inp), o)| f(sc, buf.of(st), inp, o),
            )
            .collect(),
    }
}

fn encode_with(
    input: &TensorInput,
    mut state: State<'_>,
    beta: f32,
    p: &CodecParams,
) -> Result<EncodedTensor, CodecError> {
    p.validate()?;
    let n: u64 = input.shape.iter().product();
    let size = input.dtype.size();
    let state_len = match &state {
        State::InPlace(s) => s.len(),
        State::ReadOnly(s) => s.len(),
    };
    if state_len as u64 != n || input.data.len() as u64 != n * size as u64 {
        return Err(CodecError::SizeMismatch {
            tensor: input.name.into(),
            what: "update or state".into(),
            got: input.data.len(),
            want: n as usize * size,
        });
    }
    let lay = ChunkLayout::new(n, p);
    let mut idx = vec![0u8; lay.idx_len()];
    let mut val = vec![0u8; lay.val_len()];
    let lv = if p.values.scaled() {
        levels(p.values.bits())
    } else {
        Vec::new()
    };
    let c = p.chunk as usize;
    let name = input.name;
    let inputs = input.data.par_chunks(c * size);
    let chunk_mode = p.scales == ScaleMode::Chunk || !p.values.scaled();
    let scales: Vec<u16> = if chunk_mode {
        let blocks = idx
            .par_chunks_mut(lay.idx_full)
            .zip(val.par_chunks_mut(lay.val_full));
        let per_chunk: Vec<u16> =
            map_chunks(&mut state, c, inputs, blocks, |sc, st, inp, (io, vo)| {
                encode_chunk(st, inp, input, beta, p, &lv, sc, io, vo)
            })?;
        if p.values.scaled() {
            per_chunk
        } else {
            Vec::new()
        }
    } else {
        // One scale for the tensor: select everywhere first, then quantize against the max.
        let mut sel_all = vec![0u32; lay.kept() as usize];
        let sels = sel_all.par_chunks_mut(lay.k_full as usize);
        let maxes: Vec<u32> = map_chunks(&mut state, c, inputs, sels, |sc, st, inp, out| {
            select_chunk(st, inp, input, beta, sc, out)
        })?;
        let scale = bf16_ceil(f32::from_bits(maxes.iter().copied().max().unwrap_or(0)));
        let blocks = sel_all
            .par_chunks(lay.k_full as usize)
            .zip(idx.par_chunks_mut(lay.idx_full))
            .zip(val.par_chunks_mut(lay.val_full));
        match &mut state {
            State::InPlace(s) => s
                .par_chunks_mut(c)
                .zip(blocks)
                .try_for_each(|(st, ((sel, io), vo))| emit(st, sel, scale, p, &lv, io, vo, name))?,
            // The chunk's `β·e + u` again (the same roundings give the same values).
            State::ReadOnly(s) => s
                .par_chunks(c)
                .zip(input.data.par_chunks(c * size))
                .zip(blocks)
                .try_for_each_init(ChunkBuf::default, |buf, ((st, inp), ((sel, io), vo))| {
                    let st = buf.of(st);
                    ef_chunk(st, inp, input.dtype, beta);
                    emit(st, sel, scale, p, &lv, io, vo, name)
                })?,
        }
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

/// Advances `state` exactly as [`encode_tensor`] did when it turned `input` and this same
/// `state` into `enc`: `e = β·e + u` chunk by chunk, then each sent value subtracted at its
/// index (`e − s·level`, the same two roundings `emit` makes). Lets a publisher encode from a
/// scratch copy of one tensor at a time and advance its real buffers only once the shard is
/// stored, instead of holding a second copy of every buffer meanwhile.
pub fn advance_state(
    input: &TensorInput,
    state: &mut [f32],
    beta: f32,
    enc: &EncodedTensor,
) -> Result<(), CodecError> {
    let lay = check_shape(enc)?;
    let size = input.dtype.size();
    if state.len() as u64 != enc.numel() || input.data.len() != state.len() * size {
        return Err(CodecError::SizeMismatch {
            tensor: input.name.into(),
            what: "update or state".into(),
            got: input.data.len(),
            want: state.len() * size,
        });
    }
    let (idx, val) = decode_sparse(enc, &lay)?;
    let c = enc.params.chunk as usize;
    let kf = lay.k_full as usize;
    state
        .par_chunks_mut(c)
        .zip(input.data.par_chunks(c * size))
        .zip(idx.par_chunks(kf.max(1)))
        .zip(val.par_chunks(kf.max(1)))
        .for_each(|(((st, inp), io), vo)| {
            ef_chunk(st, inp, input.dtype, beta);
            for (&i, &v) in io.iter().zip(vo) {
                st[i as usize] -= v;
            }
        });
    Ok(())
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

/// Decodes every chunk into fixed-offset sparse buffers (local index, value), checking
/// each index and value; nothing else is touched. A refusal names the lowest faulty chunk
/// (its index block before its value block), however the chunks were scheduled: ledgers
/// record the detail, and reruns must write the same ledger.
fn decode_sparse(t: &EncodedTensor, lay: &ChunkLayout) -> Result<(Vec<u32>, Vec<f32>), CodecError> {
    decode_range(t, lay, 0..lay.n_chunks)
}

/// `decode_sparse` of the chunks in `chunks` only (indices within each chunk).
fn decode_range(
    t: &EncodedTensor,
    lay: &ChunkLayout,
    chunks: Range<usize>,
) -> Result<(Vec<u32>, Vec<f32>), CodecError> {
    let kept: usize = match chunks.is_empty() {
        true => 0,
        false => (chunks.len() - 1) * lay.k_full as usize + lay.k_of(chunks.end - 1) as usize,
    };
    let mut idx = vec![0u32; kept];
    let mut val = vec![0f32; kept];
    let first = chunks.start;
    match decode_chunks(t, lay, first, &mut idx, &mut val, true) {
        Ok(()) => Ok((idx, val)),
        // The parallel pass stops at whichever fault a thread met first: find the lowest
        // one again in order (only on the refusal path, so the cost does not matter).
        Err(_) => decode_chunks(t, lay, first, &mut idx, &mut val, false).map(|()| (idx, val)),
    }
}

/// The chunk loop of `decode_sparse`, in parallel or strictly in chunk order, from chunk
/// `first` on (as many chunks as `idx` holds).
fn decode_chunks(
    t: &EncodedTensor,
    lay: &ChunkLayout,
    first: usize,
    idx: &mut [u32],
    val: &mut [f32],
    parallel: bool,
) -> Result<(), CodecError> {
    if idx.is_empty() {
        return Ok(());
    }
    let compact = t.params.indices == IndexEncoding::Compact;
    let log2 = t.params.chunk.ilog2();
    let bits = t.params.values.bits();
    let lv = if t.params.values.scaled() {
        levels(bits)
    } else {
        Vec::new()
    };
    let kf = lay.k_full as usize;
    let one = |c: usize, io: &mut [u32], vo: &mut [f32]| -> Result<(), CodecError> {
        let last = c + 1 == lay.n_chunks;
        let ib = c * lay.idx_full;
        let block = &t.idx[ib..ib + if last { lay.idx_last } else { lay.idx_full }];
        bits::read_indices(block, io, compact, lay.chunk_len(c), log2)
            .map_err(|f| index_error(t, c, f))?;
        let vb = &t.val
            [c * lay.val_full..c * lay.val_full + if last { lay.val_last } else { lay.val_full }];
        if t.params.values == ValueFormat::Bf16 {
            for (o, h) in vo.iter_mut().zip(vb.chunks_exact(2)) {
                let h = u16::from_le_bytes([h[0], h[1]]);
                if h & 0x7F80 == 0x7F80 {
                    return Err(CodecError::NonFinite {
                        tensor: t.name.clone(),
                        what: format!("a value in chunk {c}"),
                    });
                }
                *o = bf16_to_f32(h);
            }
            return Ok(());
        }
        let s = bf16_to_f32(match t.params.scales {
            ScaleMode::Chunk => t.scales[c],
            ScaleMode::Tensor => t.scales[0],
        });
        if bits == 2 {
            // Four codes per byte.
            for (j, o) in vo.iter_mut().enumerate() {
                *o = s * lv[((vb[j / 4] >> (2 * (j % 4))) & 3) as usize];
            }
        } else {
            for (j, o) in vo.iter_mut().enumerate() {
                *o = s * lv[bits::get(vb, j * bits as usize, bits) as usize];
            }
        }
        Ok(())
    };
    if parallel {
        idx.par_chunks_mut(kf)
            .zip(val.par_chunks_mut(kf))
            .enumerate()
            .try_for_each(|(c, (io, vo))| one(first + c, io, vo))
    } else {
        idx.chunks_mut(kf)
            .zip(val.chunks_mut(kf))
            .enumerate()
            .try_for_each(|(c, (io, vo))| one(first + c, io, vo))
    }
}

/// `check_shape`, and that the accumulator (of `dense_len` elements) fits the tensor: what
/// every accumulate, on any device, checks before decoding.
pub(crate) fn check_accumulate(
    t: &EncodedTensor,
    dense_len: usize,
) -> Result<ChunkLayout, CodecError> {
    let lay = check_shape(t)?;
    if dense_len as u64 != lay.n {
        return Err(CodecError::SizeMismatch {
            tensor: t.name.clone(),
            what: "dense accumulator".into(),
            got: dense_len,
            want: lay.n as usize,
        });
    }
    Ok(lay)
}

/// Checks the parameters, block sizes and scales: everything that needs no decoding.
pub(crate) fn check_shape(t: &EncodedTensor) -> Result<ChunkLayout, CodecError> {
    t.params.validate()?;
    let lay = ChunkLayout::new(t.numel(), &t.params);
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
    Ok(lay)
}

/// Checks everything about an encoded tensor that does not need the model: parameters,
/// block sizes, scales, every index and every value. Returns the squared L2 norm of the
/// decoded values, a by-product readers use for their norm checks.
pub fn validate(t: &EncodedTensor) -> Result<f64, CodecError> {
    let lay = check_shape(t)?;
    let (_, val) = decode_sparse(t, &lay)?;
    Ok(sum_of_squares(&val))
}

/// Values per block of [`sum_of_squares`]: fixed, so the sum is the same on any number of
/// threads (`gradient.md` §4, "Norms").
pub const NORM_BLOCK: usize = 1 << 16;

/// The squared L2 norm of `val` (a tensor's kept values in ascending flat index) as the
/// spec fixes it: each value widened to f64 and squared; the values split into consecutive
/// blocks of [`NORM_BLOCK`]; each block summed left to right from +0.0; the block sums added
/// left to right from +0.0. Blocks run in parallel but the order of every addition is fixed:
/// rayon's own `sum` splits by the thread count, which changed ledger norms in their last
/// bits between a 1- and a 2-thread aggregator (the clip weight is computed from them).
pub fn sum_of_squares(val: &[f32]) -> f64 {
    let blocks: Vec<f64> = val
        .par_chunks(NORM_BLOCK)
        .map(|b| {
            b.iter()
                .fold(0f64, |acc, &v| acc + f64::from(v) * f64::from(v))
        })
        .collect();
    blocks.iter().fold(0f64, |acc, &b| acc + b)
}

/// Adds `weight × decoded` into `dense` (f32, the tensor's length). The whole tensor is
/// decoded and checked first, so a bad tensor leaves `dense` untouched: a rejected shard
/// never poisons a merge.
pub fn accumulate(t: &EncodedTensor, dense: &mut [f32], weight: f32) -> Result<(), CodecError> {
    accumulate_checked(t, dense, weight)
}

/// `accumulate`, under a name that says why it may be called without a prior `validate`:
/// it decodes and checks the whole tensor before touching `dense`.
fn accumulate_checked(t: &EncodedTensor, dense: &mut [f32], weight: f32) -> Result<(), CodecError> {
    let lay = check_accumulate(t, dense.len())?;
    let (idx, val) = decode_sparse(t, &lay)?;
    let kf = (lay.k_full as usize).max(1);
    dense
        .par_chunks_mut(t.params.chunk as usize)
        .zip(idx.par_chunks(kf).zip(val.par_chunks(kf)))
        .for_each(|(out, (ic, vc))| {
            for (&i, &v) in ic.iter().zip(vc) {
                // Two rounded operations, never fused (bit parity with the GPU path).
                out[i as usize] += weight * v;
            }
        });
    Ok(())
}

/// The sparse form: global indices (ascending) and decoded values.
pub fn to_sparse(t: &EncodedTensor) -> Result<(Vec<u64>, Vec<f32>), CodecError> {
    let lay = check_shape(t)?;
    let (idx, val) = decode_sparse(t, &lay)?;
    let kf = (lay.k_full as usize).max(1);
    let global = idx
        .chunks(kf)
        .enumerate()
        .flat_map(|(c, ic)| {
            let base = c as u64 * t.params.chunk as u64;
            ic.iter().map(move |&i| base + i as u64)
        })
        .collect();
    Ok((global, val))
}

/// [`to_sparse`] of the chunks in `chunks` only, indices counted from the first element of
/// chunk `chunks.start` (ascending): lets a reader walk a large tensor in slabs with memory
/// for one slab, not the tensor. A slab spans at most 2³² elements.
pub(crate) fn to_sparse_chunks(
    t: &EncodedTensor,
    chunks: Range<usize>,
) -> Result<(Vec<u32>, Vec<f32>), CodecError> {
    let lay = check_shape(t)?;
    let chunks = chunks.start.min(lay.n_chunks)..chunks.end.min(lay.n_chunks);
    let chunks = chunks.start..chunks.end.max(chunks.start);
    if chunks.len() as u64 * t.params.chunk as u64 > 1 << 32 {
        return Err(CodecError::Malformed(format!(
            "{}: a slab of {} chunks spans over 2^32 elements",
            t.name,
            chunks.len()
        )));
    }
    let (idx, val) = decode_range(t, &lay, chunks)?;
    let kf = (lay.k_full as usize).max(1);
    let local = idx
        .chunks(kf)
        .enumerate()
        .flat_map(|(c, ic)| {
            let base = (c as u64 * t.params.chunk as u64) as u32;
            ic.iter().map(move |&i| base + i)
        })
        .collect();
    Ok((local, val))
}
