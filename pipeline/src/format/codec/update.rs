//! Whole updates: a safetensors file of tensors in, section payloads out, and back to dense.
//!
//! Tensors are taken in name order (the model order every participant agrees on) and packed
//! into sections of about `section_bytes` of payload, each named for its tensor range.

#![warn(missing_docs)]

use std::collections::BTreeMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{
    CodecError, CodecLimits, CodecParams, EfState, EncodedTensor, InDtype, ModelSpec, TensorInput,
    TensorSpec, accumulate, encode_tensor, read_section, section_name, write_section,
};

/// How a miner encodes.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    /// The run's codec parameters.
    pub params: CodecParams,
    /// Error-feedback decay.
    pub beta: f32,
    /// Target payload bytes per section.
    pub section_bytes: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            params: CodecParams::default(),
            beta: 0.9,
            section_bytes: 16 << 20,
        }
    }
}

/// Sizes of an encoded update, for reports and ledgers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UpdateStats {
    /// Tensors encoded.
    pub tensors: usize,
    /// Elements of those tensors.
    pub elements: u64,
    /// Bytes of the dense update as given (its own dtypes).
    pub dense_bytes: u64,
    /// Values kept by top-k.
    pub kept: u64,
    /// Index + value + scale bytes (no container overhead).
    pub payload_bytes: u64,
    /// Section files as written (safetensors, before zstd).
    pub bytes: u64,
}

/// Section payloads in order, with their names.
#[derive(Clone, Debug)]
pub struct EncodedUpdate {
    /// `(name, safetensors payload)` per section, in model order.
    pub sections: Vec<(String, Vec<u8>)>,
    /// What the encoding kept and cost.
    pub stats: UpdateStats,
}

/// The model description (names, shapes, dtypes) of a safetensors file, in name order.
pub fn model_of(bytes: &[u8]) -> Result<ModelSpec, CodecError> {
    Ok(model_of_inputs(&inputs_of(
        &SafeTensors::deserialize(bytes)
            .map_err(|e| CodecError::Malformed(format!("update: {e}")))?,
    )?))
}

/// The tensors of a safetensors file as codec inputs (borrowing its bytes), in name order.
pub(crate) fn inputs_of<'a>(
    st: &'a SafeTensors<'a>,
) -> Result<Vec<OwnedShapeInput<'a>>, CodecError> {
    let mut out: Vec<OwnedShapeInput<'a>> = st
        .iter()
        .map(|(name, v)| {
            let dtype = InDtype::from_safetensors(v.dtype()).ok_or_else(|| {
                CodecError::Malformed(format!(
                    "tensor {name:?} has dtype {:?}; use f32, bf16 or f16",
                    v.dtype()
                ))
            })?;
            Ok(OwnedShapeInput {
                name,
                shape: v.shape().iter().map(|&d| d as u64).collect(),
                dtype,
                data: v.data(),
            })
        })
        .collect::<Result<_, CodecError>>()?;
    out.sort_by(|a, b| a.name.cmp(b.name));
    Ok(out)
}

/// A codec input that owns its shape: what a caller holding tensors in memory (a safetensors
/// file, or a training loop's tensors through the Python package) hands to
/// [`encode_inputs_with`] without copying the data.
#[derive(Clone, Debug)]
pub struct OwnedShapeInput<'a> {
    /// The tensor's name in the model.
    pub name: &'a str,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The dtype of `data`.
    pub dtype: InDtype,
    /// The update's elements, little-endian, row-major.
    pub data: &'a [u8],
}

impl OwnedShapeInput<'_> {
    /// The borrowed form the tensor encoders take.
    pub fn input(&self) -> TensorInput<'_> {
        TensorInput {
            name: self.name,
            shape: &self.shape,
            dtype: self.dtype,
            data: self.data,
        }
    }
}

/// The model description of in-memory inputs, in name order.
pub(crate) fn model_of_inputs(inputs: &[OwnedShapeInput]) -> ModelSpec {
    let mut tensors: Vec<TensorSpec> = inputs
        .iter()
        .map(|t| TensorSpec {
            name: t.name.to_string(),
            shape: t.shape.clone(),
            dtype: t.dtype,
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    ModelSpec { tensors }
}

/// Encodes every tensor of a safetensors update, advancing `state`.
pub fn encode_update(
    bytes: &[u8],
    state: &mut EfState,
    opts: &EncodeOptions,
) -> Result<EncodedUpdate, CodecError> {
    encode_update_with(bytes, state, opts, |input, buf| {
        encode_tensor(input, buf, opts.beta, &opts.params)
    })
}

/// `encode_update` with another tensor encoder (the GPU's): the tensor order, sectioning and
/// statistics stay in one place, so both devices produce the same section files.
pub fn encode_update_with<E: From<CodecError>>(
    bytes: &[u8],
    state: &mut EfState,
    opts: &EncodeOptions,
    encode: impl FnMut(&TensorInput, &mut [f32]) -> Result<EncodedTensor, E>,
) -> Result<EncodedUpdate, E> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CodecError::Malformed(format!("update: {e}")))?;
    encode_inputs_with(&inputs_of(&st)?, state, opts, encode)
}

/// Encodes in-memory tensors (any order; names unique), advancing `state`: the one place
/// that orders tensors and packs sections, whatever holds the update.
pub fn encode_inputs_with<E: From<CodecError>>(
    inputs: &[OwnedShapeInput],
    state: &mut EfState,
    opts: &EncodeOptions,
    mut encode: impl FnMut(&TensorInput, &mut [f32]) -> Result<EncodedTensor, E>,
) -> Result<EncodedUpdate, E> {
    encode_sections(inputs, opts, |t| {
        let numel: u64 = t.shape.iter().product();
        encode(t, state.buffer(t.name, numel as usize)?)
    })
}

/// The tensor order and section packing of every encoder; `encode` turns one tensor into
/// its encoded form with whatever error-feedback buffer it keeps.
fn encode_sections<E: From<CodecError>>(
    inputs: &[OwnedShapeInput],
    opts: &EncodeOptions,
    mut encode: impl FnMut(&TensorInput) -> Result<EncodedTensor, E>,
) -> Result<EncodedUpdate, E> {
    let mut order: Vec<&OwnedShapeInput> = inputs.iter().collect();
    order.sort_by(|a, b| a.name.cmp(b.name));
    if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(CodecError::Malformed(format!("tensor {:?} is given twice", w[0].name)).into());
    }
    pack_sections(
        order
            .iter()
            .map(|t| Ok((encode(&t.input())?, t.data.len() as u64))),
        opts.section_bytes,
    )
}

/// Packs encoded tensors, given in model order with the dense bytes each came from, into
/// sections: the one packing rule of every encoder (`gradient.md` §8, "Sections").
pub(crate) fn pack_sections<E: From<CodecError>>(
    tensors: impl ExactSizeIterator<Item = Result<(EncodedTensor, u64), E>>,
    section_bytes: usize,
) -> Result<EncodedUpdate, E> {
    let mut stats = UpdateStats::default();
    let mut sections = Vec::new();
    let mut pending: Vec<EncodedTensor> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut first = 0usize;
    let n = tensors.len();
    for (i, t) in tensors.enumerate() {
        let (enc, dense) = t?;
        stats.tensors += 1;
        stats.elements += enc.numel();
        stats.dense_bytes += dense;
        stats.kept += enc.kept();
        stats.payload_bytes += enc.payload_bytes();
        pending_bytes += enc.payload_bytes() as usize;
        pending.push(enc);
        if pending_bytes >= section_bytes || i + 1 == n {
            let payload = write_section(&pending)?;
            stats.bytes += payload.len() as u64;
            sections.push((section_name(first, i), payload));
            pending.clear();
            pending_bytes = 0;
            first = i + 1;
        }
    }
    Ok(EncodedUpdate { sections, stats })
}

/// What [`encode_inputs_scratch`] leaves for [`advance_inputs`]: the encoded form of each
/// tensor whose buffer exists (to advance it in place), and the new buffers of tensors that
/// had none (zeros advanced by the encoding: adopted as they are).
#[derive(Debug, Default)]
pub struct Pending {
    sent: BTreeMap<String, EncodedTensor>,
    fresh: BTreeMap<String, Vec<f32>>,
}

/// [`encode_inputs_with`] with the CPU codec that leaves `state` as it is: a tensor with a
/// buffer is encoded from it read-only (`encode_tensor_from`: chunk-sized scratch, no copy
/// of the buffer) and a tensor without one into a new buffer; [`advance_inputs`] later (once the shard is
/// stored) advances or adopts them. Same bytes and final state as `encode_inputs_with`.
pub fn encode_inputs_scratch(
    inputs: &[OwnedShapeInput],
    state: &EfState,
    opts: &EncodeOptions,
) -> Result<(EncodedUpdate, Pending), CodecError> {
    let mut pending = Pending::default();
    let encoded = encode_sections(inputs, opts, |input| {
        let n = input.shape.iter().product::<u64>() as usize;
        match state.buffers.get(input.name) {
            Some(b) if b.len() == n => {
                let t = super::encode_tensor_from(input, b, opts.beta, &opts.params)?;
                pending.sent.insert(input.name.to_string(), t.clone());
                Ok(t)
            }
            Some(b) => Err(CodecError::SizeMismatch {
                tensor: input.name.into(),
                what: "error-feedback buffer".into(),
                got: b.len(),
                want: n,
            }),
            None => {
                let mut buf = vec![0f32; n];
                let t = encode_tensor(input, &mut buf, opts.beta, &opts.params)?;
                pending.fresh.insert(input.name.to_string(), buf);
                Ok(t)
            }
        }
    })?;
    Ok((encoded, pending))
}

/// Advances `state` to what [`encode_inputs_scratch`] computed, given the same inputs.
pub fn advance_inputs(
    inputs: &[OwnedShapeInput],
    state: &mut EfState,
    opts: &EncodeOptions,
    pending: Pending,
) -> Result<(), CodecError> {
    let Pending { sent, mut fresh } = pending;
    for t in inputs {
        if let Some(buf) = fresh.remove(t.name) {
            state.buffers.insert(t.name.to_string(), buf);
            continue;
        }
        let enc = sent
            .get(t.name)
            .ok_or_else(|| CodecError::Malformed(format!("tensor {:?} was not encoded", t.name)))?;
        let numel: u64 = t.shape.iter().product();
        let buf = state.buffer(t.name, numel as usize)?;
        super::advance_state(&t.input(), buf, opts.beta, enc)?;
    }
    Ok(())
}

/// The tensor ranges (model indices) of the sections an honest encoder writes for `model`
/// under `params`: the same packing rule as `encode_update_with`, computed from shapes alone,
/// so that a reader can walk a window section by section before it has fetched any shard.
pub(crate) fn section_ranges(
    model: &ModelSpec,
    params: &CodecParams,
    section_bytes: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut first, mut pending) = (0usize, 0u64);
    let n = model.tensors.len();
    for (i, t) in model.tensors.iter().enumerate() {
        let l = super::ChunkLayout::new(t.shape.iter().product(), params);
        pending += (l.idx_len() + l.val_len() + 2 * l.n_scales) as u64;
        if pending >= section_bytes as u64 || i + 1 == n {
            out.push(first..i + 1);
            first = i + 1;
            pending = 0;
        }
    }
    out
}

/// Dense f32 tensors by name, with their shapes.
pub type Dense = BTreeMap<String, (Vec<u64>, Vec<f32>)>;

/// Decodes sections and adds `weight ×` each tensor into `dense` (created as zeros). A
/// section is validated whole before any of it is added.
pub fn accumulate_section(
    dense: &mut Dense,
    section: &[u8],
    model: Option<&ModelSpec>,
    limits: &CodecLimits,
    weight: f32,
) -> Result<(), CodecError> {
    let tensors = read_section(section, model, limits)?;
    let mut total: u64 = dense.values().map(|(_, v)| v.len() as u64).sum();
    for t in tensors.iter().filter(|t| !dense.contains_key(&t.name)) {
        total = total.saturating_add(t.numel());
        if total > limits.max_dense_elements {
            return Err(CodecError::OverLimit(format!(
                "decoding tensor {:?} would hold {total} dense elements (limit {})",
                t.name, limits.max_dense_elements
            )));
        }
    }
    for t in tensors {
        if !dense.contains_key(&t.name) {
            // Within the limits but perhaps beyond this machine's memory: an error, not the
            // allocator's abort.
            let n = t.numel() as usize;
            let mut zeros: Vec<f32> = Vec::new();
            zeros.try_reserve_exact(n).map_err(|_| {
                CodecError::OverLimit(format!(
                    "tensor {}: cannot allocate {n} f32 elements ({} bytes) on this machine",
                    t.name,
                    n as u64 * 4
                ))
            })?;
            zeros.resize(n, 0.0);
            dense.insert(t.name.clone(), (t.shape.clone(), zeros));
        }
        let Some(entry) = dense.get_mut(&t.name) else {
            continue;
        };
        if entry.0 != t.shape {
            return Err(CodecError::ShapeMismatch {
                tensor: t.name.clone(),
                got: t.shape.clone(),
                want: entry.0.clone(),
            });
        }
        accumulate(&t, &mut entry.1, weight)?;
    }
    Ok(())
}

/// Reads a safetensors file of f32, bf16 or f16 tensors as f32 tensors with their shapes
/// (bf16 and f16 widen exactly).
pub fn dense_from_safetensors(bytes: &[u8]) -> Result<Dense, CodecError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let mut out = Dense::new();
    for (name, v) in st.iter() {
        let dtype = InDtype::from_safetensors(v.dtype()).ok_or_else(|| {
            CodecError::Malformed(format!(
                "tensor {name} is {:?}; use f32, bf16 or f16",
                v.dtype()
            ))
        })?;
        let vals: Vec<f32> = match dtype {
            InDtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            InDtype::Bf16 => v
                .data()
                .chunks_exact(2)
                .map(|c| super::bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            InDtype::F16 => v
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        };
        out.insert(
            name.to_string(),
            (v.shape().iter().map(|&d| d as u64).collect(), vals),
        );
    }
    Ok(out)
}

/// Writes dense tensors as an f32 safetensors file.
pub fn dense_to_safetensors(dense: &Dense) -> Result<Vec<u8>, CodecError> {
    dense_to_safetensors_with(dense, None)
}

/// `dense_to_safetensors` with the file's `__metadata__` (what a state file says it is).
pub(crate) fn dense_to_safetensors_with(
    dense: &Dense,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>, CodecError> {
    let raw: Vec<Vec<u8>> = dense
        .values()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = dense
        .iter()
        .zip(&raw)
        .map(|((name, (shape, _)), b)| {
            TensorView::new(Dtype::F32, shape.iter().map(|&d| d as usize).collect(), b)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    sort_metadata(bytes)
}

/// Rewrites a safetensors file's `__metadata__` object with its keys in byte order. The
/// crate writes them in its `HashMap`'s order, which varies from process to process: two
/// workers saving the same momentum state wrote different bytes in 39 of 40 rounds. The
/// sorted object has the same length (the same entries, permuted), so nothing else moves.
fn sort_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>, CodecError> {
    const KEY: &[u8] = b"{\"__metadata__\":";
    let bad = |d: String| CodecError::Malformed(format!("safetensors metadata: {d}"));
    let len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| bad("no header".into()))? as usize;
    let header_end = 8usize
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header past the end".into()))?;
    if !bytes[8..header_end].starts_with(KEY) {
        // The crate writes `__metadata__` first when there is any: no key means none.
        if bytes[8..header_end]
            .windows(14)
            .any(|w| w == b"\"__metadata__\"")
        {
            return Err(bad("`__metadata__` is not the header's first key".into()));
        }
        return Ok(bytes);
    }
    let start = 8 + KEY.len();
    let mut values = serde_json::Deserializer::from_slice(&bytes[start..header_end])
        .into_iter::<BTreeMap<String, String>>();
    let map = values
        .next()
        .ok_or_else(|| bad("empty".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let end = start + values.byte_offset();
    let sorted = serde_json::to_vec(&map).map_err(|e| bad(e.to_string()))?;
    if sorted.len() != end - start {
        return Err(bad("sorted metadata changed length".into()));
    }
    bytes[start..end].copy_from_slice(&sorted);
    Ok(bytes)
}
