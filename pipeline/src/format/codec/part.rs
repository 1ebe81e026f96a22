//! Sharded miners: a model split over ranks by dimension-0 slices (FSDP2 / DTensor `Shard(0)`)
//! encodes on every rank and publishes one shard whose bytes equal the unsharded encoding
//! (normative: `schemas/gradient.md` §9).
//!
//! Why this works without moving any dense data: chunks are independent and every full
//! chunk's blocks have the same size, so a slice that starts on a chunk boundary, encoded as
//! a tensor of its own, produces exactly the blocks the whole tensor would have at those
//! chunks. Each rank therefore keeps the error-feedback buffer of its own slice (36 GB / 8
//! per rank of a 72 B model), encodes it, and hands a small *part* (its compressed blocks,
//! ~0.2 GB per rank at 10.25 bits × k/C = 1/64) to the publishing rank, which concatenates
//! the parts in row order and signs. A slice that does not start (or, unless it is the
//! tensor's tail, end) on a chunk boundary would change the chunking, so it is refused.

#![warn(missing_docs)]

use std::collections::BTreeMap;

use super::{
    CodecError, CodecLimits, CodecParams, EfState, EncodeOptions, EncodedTensor, EncodedUpdate,
    ModelSpec, OwnedShapeInput, ScaleMode, encode_tensor, read_section, write_section,
};

/// One rank's slice of a tensor: rows `row0 .. row0 + input.shape[0]` of the model's tensor
/// (the input's shape is the slice's own). A tensor given whole has `row0 = 0` and the
/// model's shape.
#[derive(Clone, Debug)]
pub struct SliceInput<'a> {
    /// The slice's elements, name and shape.
    pub input: OwnedShapeInput<'a>,
    /// The first row of the slice in the whole tensor.
    pub row0: u64,
}

/// One encoded slice: the blocks of chunks `row0·row_len / C ..` of the whole tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartTensor {
    /// The slice encoded as a tensor of its own shape.
    pub tensor: EncodedTensor,
    /// Its first row in the whole tensor.
    pub row0: u64,
}

/// What one rank hands to the publishing rank for one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPart {
    /// The window it was encoded for (its error-feedback decay is that window's).
    pub window: u64,
    /// The slices, in name order.
    pub tensors: Vec<PartTensor>,
    /// Bytes of the dense slices as given (for the shard's compression ratio).
    pub dense_bytes: u64,
}

/// First bytes of a serialized part: a part is not a section and must never be taken for one.
const PART_MAGIC: &[u8; 8] = b"SDPART1\n";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PartHeader {
    window: u64,
    dense_bytes: u64,
    rows: BTreeMap<String, u64>,
}

fn parts_error(detail: String) -> CodecError {
    CodecError::Parts(detail)
}

/// Elements per dimension-0 row of `shape` (1 for a 1-D tensor).
fn row_len(shape: &[u64]) -> u64 {
    shape.iter().skip(1).product()
}

/// Checks that a slice of `rows` rows from `row0` of a tensor of `shape` keeps the tensor's
/// chunking under `p`, with a message that says how to fix it.
fn check_slice(
    name: &str,
    shape: &[u64],
    row0: u64,
    rows: u64,
    p: &CodecParams,
) -> Result<(), CodecError> {
    let total = shape.first().copied().unwrap_or(1);
    // The whole tensor, or no rows of it (FSDP2 gives ranks beyond a short tensor's rows
    // empty slices): nothing to align.
    if (row0 == 0 && rows == total) || (rows == 0 && !shape.is_empty()) {
        return Ok(());
    }
    let misaligned = |why: String| CodecError::SliceMisaligned {
        tensor: name.into(),
        detail: why,
    };
    if shape.is_empty() {
        return Err(misaligned(
            "a scalar cannot be sliced; give it whole".into(),
        ));
    }
    if p.scales == ScaleMode::Tensor && p.values.scaled() {
        return Err(misaligned(format!(
            "rows {row0}..{} of {total}: the run's codec has one scale per tensor, which only the whole tensor determines; give this tensor whole on one rank (DTensor.full_tensor())",
            row0 + rows
        )));
    }
    let c = p.chunk as u64;
    let rl = row_len(shape);
    let (start, end) = (row0 * rl, (row0 + rows) * rl);
    if start % c != 0 || (end % c != 0 && row0 + rows != total) {
        return Err(misaligned(format!(
            "rows {row0}..{} of {total} are elements {start}..{end}, which do not start{} on a multiple of the run's chunk ({c}): a slice encoded alone would chunk differently from the whole tensor. Split on multiples of {} rows, or give this tensor whole on one rank (DTensor.full_tensor())",
            row0 + rows,
            if start % c == 0 { " and end" } else { "" },
            c / gcd(c, rl)
        )));
    }
    Ok(())
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a.max(1) } else { gcd(b, a % b) }
}

/// Encodes one rank's slices, advancing `state` in place (its buffers are the slices',
/// keyed by tensor name). Every slice is checked against `model` (name, trailing
/// dimensions, rows in range) and for chunk alignment before anything is encoded, so a
/// refused part leaves `state` unchanged.
pub fn encode_part(
    slices: &[SliceInput],
    model: &ModelSpec,
    state: &mut EfState,
    opts: &EncodeOptions,
    window: u64,
) -> Result<EncodedPart, CodecError> {
    opts.params.validate()?;
    let mut order: Vec<&SliceInput> = slices.iter().collect();
    order.sort_by(|a, b| a.input.name.cmp(b.input.name));
    if let Some(w) = order
        .windows(2)
        .find(|w| w[0].input.name == w[1].input.name)
    {
        return Err(CodecError::Malformed(format!(
            "tensor {:?} is given twice",
            w[0].input.name
        )));
    }
    for s in &order {
        let t = &s.input;
        let spec = model.get(t.name).ok_or_else(|| CodecError::UnknownTensor {
            tensor: t.name.into(),
        })?;
        let rows = t.shape.first().copied().unwrap_or(1);
        let fits = t.shape.len() == spec.shape.len()
            && t.shape.get(1..) == spec.shape.get(1..)
            && s.row0
                .checked_add(rows)
                .is_some_and(|end| end <= spec.shape.first().copied().unwrap_or(1));
        if !fits {
            return Err(CodecError::ShapeMismatch {
                tensor: t.name.into(),
                got: t.shape.clone(),
                want: spec.shape.clone(),
            });
        }
        check_slice(t.name, &spec.shape, s.row0, rows, &opts.params)?;
        let numel: u64 = t.shape.iter().product();
        if t.data.len() as u64 != numel * t.dtype.size() as u64 {
            return Err(CodecError::SizeMismatch {
                tensor: t.name.into(),
                what: "slice".into(),
                got: t.data.len(),
                want: (numel * t.dtype.size() as u64) as usize,
            });
        }
        if let Some(b) = state.buffers.get(t.name)
            && b.len() as u64 != numel
        {
            return Err(CodecError::SizeMismatch {
                tensor: t.name.into(),
                what: "error-feedback buffer (this rank held another slice before)".into(),
                got: b.len(),
                want: numel as usize,
            });
        }
    }
    let mut tensors = Vec::with_capacity(order.len());
    let mut dense_bytes = 0u64;
    for s in order {
        let t = s.input.input();
        let numel: u64 = t.shape.iter().product();
        if numel == 0 {
            continue;
        }
        let buf = state.buffer(t.name, numel as usize)?;
        let tensor = encode_tensor(&t, buf, opts.beta, &opts.params)?;
        dense_bytes += t.data.len() as u64;
        tensors.push(PartTensor {
            tensor,
            row0: s.row0,
        });
    }
    state.window = Some(window);
    Ok(EncodedPart {
        window,
        tensors,
        dense_bytes,
    })
}

impl EncodedPart {
    /// The part as bytes to hand to the publishing rank (through `torch.distributed`, a
    /// file, anything): `SDPART1\n`, the header's length (u64 LE), the JSON header (window,
    /// dense bytes, first row of every slice), then one section payload of the slices.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        let header = PartHeader {
            window: self.window,
            dense_bytes: self.dense_bytes,
            rows: self
                .tensors
                .iter()
                .map(|t| (t.tensor.name.clone(), t.row0))
                .collect(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| CodecError::Malformed(e.to_string()))?;
        let tensors: Vec<EncodedTensor> = self.tensors.iter().map(|t| t.tensor.clone()).collect();
        let section = write_section(&tensors)?;
        let mut out = Vec::with_capacity(16 + json.len() + section.len());
        out.extend_from_slice(PART_MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&section);
        Ok(out)
    }

    /// Reads a part, checking every block as a decoder would (the bytes crossed a process
    /// boundary the codec does not control).
    pub fn from_bytes(bytes: &[u8], limits: &CodecLimits) -> Result<EncodedPart, CodecError> {
        let bad = |what: &str| CodecError::Parts(format!("not a shardrop part: {what}"));
        let rest = bytes
            .strip_prefix(PART_MAGIC.as_slice())
            .ok_or_else(|| bad("no SDPART1 magic"))?;
        let (len, rest) = rest.split_at_checked(8).ok_or_else(|| bad("truncated"))?;
        let len = u64::from_le_bytes(len.try_into().map_err(|_| bad("truncated"))?);
        let len = usize::try_from(len).map_err(|_| bad("header length"))?;
        let (json, section) = rest
            .split_at_checked(len)
            .ok_or_else(|| bad("truncated header"))?;
        let header: PartHeader =
            serde_json::from_slice(json).map_err(|e| bad(&format!("header: {e}")))?;
        let tensors = read_section(section, None, limits)?;
        if tensors.len() != header.rows.len() {
            return Err(bad("the header and the section name different tensors"));
        }
        let tensors = tensors
            .into_iter()
            .map(|t| {
                let row0 = *header
                    .rows
                    .get(&t.name)
                    .ok_or_else(|| bad(&format!("tensor {:?} has no first row", t.name)))?;
                Ok(PartTensor { tensor: t, row0 })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        Ok(EncodedPart {
            window: header.window,
            tensors,
            dense_bytes: header.dense_bytes,
        })
    }
}

/// Concatenates the parts of every rank into the whole update, in model order and packed
/// into sections as an unsharded encoder packs them. Refuses parts of different windows,
/// a tensor of the model that no part covers, rows covered twice or not at all, and slices
/// that disagree on codec or dtype; every refusal names the tensor.
pub fn assemble_parts(
    parts: &[EncodedPart],
    model: &ModelSpec,
    opts: &EncodeOptions,
) -> Result<EncodedUpdate, CodecError> {
    let window = parts
        .first()
        .ok_or_else(|| parts_error("no parts to assemble".into()))?
        .window;
    if let Some(p) = parts.iter().find(|p| p.window != window) {
        return Err(parts_error(format!(
            "parts of windows {window} and {} cannot make one shard",
            p.window
        )));
    }
    let mut pieces: BTreeMap<&str, Vec<&PartTensor>> = BTreeMap::new();
    for t in parts.iter().flat_map(|p| &p.tensors) {
        if model.get(&t.tensor.name).is_none() {
            return Err(CodecError::UnknownTensor {
                tensor: t.tensor.name.clone(),
            });
        }
        pieces.entry(&t.tensor.name).or_default().push(t);
    }
    let dense_bytes = parts.iter().map(|p| p.dense_bytes).sum();
    let whole = model.tensors.iter().map(|spec| {
        let mut ps = pieces.remove(spec.name.as_str()).unwrap_or_default();
        ps.sort_by_key(|p| p.row0);
        assemble_tensor(spec, &ps, &opts.params).map(|t| (t, 0))
    });
    let mut update = super::update::pack_sections(whole, opts.section_bytes)?;
    update.stats.dense_bytes = dense_bytes;
    Ok(update)
}

/// One tensor from its slices, sorted by first row.
fn assemble_tensor(
    spec: &super::TensorSpec,
    pieces: &[&PartTensor],
    params: &CodecParams,
) -> Result<EncodedTensor, CodecError> {
    let (name, shape) = (spec.name.as_str(), spec.shape.as_slice());
    let total = shape.first().copied().unwrap_or(1);
    let mut out = EncodedTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype: pieces.first().map_or(spec.dtype, |p| p.tensor.dtype),
        params: pieces.first().map_or(*params, |p| p.tensor.params),
        idx: Vec::new(),
        val: Vec::new(),
        scales: Vec::new(),
    };
    if pieces.is_empty() {
        // Only a tensor without elements has nothing to send (a slice of no rows is
        // skipped by `encode_part`).
        if shape.iter().product::<u64>() == 0 {
            return Ok(out);
        }
        return Err(parts_error(format!("no part holds tensor {name:?}")));
    }
    let mut next = 0u64;
    if out.params != *params {
        return Err(parts_error(format!(
            "tensor {name:?} was encoded with codec {:?}, the run's is {params:?}",
            out.params
        )));
    }
    for p in pieces {
        let t = &p.tensor;
        let rows = t.shape.first().copied().unwrap_or(1);
        if p.row0 != next {
            return Err(parts_error(format!(
                "tensor {name:?}: rows {next}..{} {}",
                p.row0.max(next),
                if p.row0 > next {
                    "are in no part"
                } else {
                    "are in two parts"
                }
            )));
        }
        if t.dtype != out.dtype || t.params != out.params {
            return Err(parts_error(format!(
                "tensor {name:?}: the slices disagree on dtype or codec"
            )));
        }
        if t.shape.len() != shape.len() || t.shape.get(1..) != shape.get(1..) {
            return Err(CodecError::ShapeMismatch {
                tensor: name.into(),
                got: t.shape.clone(),
                want: shape.to_vec(),
            });
        }
        check_slice(name, shape, p.row0, rows, params)?;
        out.idx.extend_from_slice(&t.idx);
        out.val.extend_from_slice(&t.val);
        out.scales.extend_from_slice(&t.scales);
        next = p.row0 + rows;
    }
    if next != total {
        return Err(parts_error(format!(
            "tensor {name:?}: rows {next}..{total} are in no part"
        )));
    }
    // The concatenation must be exactly the whole tensor's layout.
    super::cpu::check_shape(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
