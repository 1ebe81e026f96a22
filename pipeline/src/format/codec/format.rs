//! A section payload: one plain safetensors file holding, for each tensor `NAME`,
//! `NAME/idx` (U8: index blocks), `NAME/val` (U8, or BF16 for bf16 values) and
//! `NAME/scale` (BF16), with the codec parameters, shape and dtype of every tensor in the
//! metadata key `shardrop` (one key, so the file's bytes are deterministic). Any safetensors
//! reader opens it.

#![warn(missing_docs)]

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::{
    CodecError, CodecLimits, CodecParams, EncodedTensor, InDtype, ModelSpec, ValueFormat, validate,
};

/// Codec name recorded in sections and envelope headers.
pub const SECTION_CODEC: &str = "topk-v1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorMeta {
    name: String,
    shape: Vec<u64>,
    dtype: InDtype,
    #[serde(flatten)]
    params: CodecParams,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SectionMeta {
    codec: String,
    tensors: Vec<TensorMeta>,
}

/// Section name for tensors `first..=last` of the model order: a worker that merges a
/// tensor range knows which sections to fetch without reading any.
pub(crate) fn section_name(first: usize, last: usize) -> String {
    format!("t{first:05}-{last:05}")
}

/// Serialises encoded tensors into one section payload.
pub fn write_section(tensors: &[EncodedTensor]) -> Result<Vec<u8>, CodecError> {
    let meta = SectionMeta {
        codec: SECTION_CODEC.to_string(),
        tensors: tensors
            .iter()
            .map(|t| TensorMeta {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype,
                params: t.params,
            })
            .collect(),
    };
    let meta_json =
        serde_json::to_string(&meta).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let scales: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.scales.iter().flat_map(|s| s.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len() * 3);
    let bad = |e: safetensors::SafeTensorError| CodecError::Malformed(e.to_string());
    for (t, sc) in tensors.iter().zip(&scales) {
        views.push((
            format!("{}/idx", t.name),
            TensorView::new(Dtype::U8, vec![t.idx.len()], &t.idx).map_err(bad)?,
        ));
        let val = if t.params.values == ValueFormat::Bf16 {
            TensorView::new(Dtype::BF16, vec![t.val.len() / 2], &t.val)
        } else {
            TensorView::new(Dtype::U8, vec![t.val.len()], &t.val)
        };
        views.push((format!("{}/val", t.name), val.map_err(bad)?));
        views.push((
            format!("{}/scale", t.name),
            TensorView::new(Dtype::BF16, vec![t.scales.len()], sc).map_err(bad)?,
        ));
    }
    let info: HashMap<String, String> = [("shardrop".to_string(), meta_json)].into();
    safetensors::serialize(views, Some(info)).map_err(bad)
}

/// Parses and fully validates a section payload: structure, limits, the model (when given),
/// and every index and value. Returns the tensors in the section's order.
pub fn read_section(
    bytes: &[u8],
    model: Option<&ModelSpec>,
    limits: &CodecLimits,
) -> Result<Vec<EncodedTensor>, CodecError> {
    Ok(read_section_with_norms(bytes, model, limits)?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// `read_section`, also returning each tensor's squared L2 norm (computed while validating,
/// so a reader's norm check costs no second decode).
pub(crate) fn read_section_with_norms(
    bytes: &[u8],
    model: Option<&ModelSpec>,
    limits: &CodecLimits,
) -> Result<Vec<(EncodedTensor, f64)>, CodecError> {
    let malformed = |what: String| CodecError::Malformed(what);
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| malformed(format!("not a safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| malformed(e.to_string()))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("shardrop"))
        .ok_or_else(|| malformed("no shardrop metadata".into()))?;
    let meta: SectionMeta =
        serde_json::from_str(meta_json).map_err(|e| malformed(format!("metadata: {e}")))?;
    if meta.codec != SECTION_CODEC {
        return Err(malformed(format!(
            "codec {:?}, expected {SECTION_CODEC}",
            meta.codec
        )));
    }
    if meta.tensors.len() > limits.max_tensors {
        return Err(CodecError::OverLimit(format!(
            "{} tensors (limit {})",
            meta.tensors.len(),
            limits.max_tensors
        )));
    }
    if st.len() != meta.tensors.len() * 3 {
        return Err(malformed(format!(
            "{} arrays for {} tensors",
            st.len(),
            meta.tensors.len()
        )));
    }
    let mut out = Vec::with_capacity(meta.tensors.len());
    for tm in meta.tensors {
        let numel = tm.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        match numel {
            Some(n) if n <= limits.max_elements => {}
            _ => {
                return Err(CodecError::OverLimit(format!(
                    "tensor {:?} shape {:?}",
                    tm.name, tm.shape
                )));
            }
        }
        tm.params.validate()?;
        if let Some(model) = model {
            let spec = model
                .get(&tm.name)
                .ok_or_else(|| CodecError::UnknownTensor {
                    tensor: tm.name.clone(),
                })?;
            if spec.shape != tm.shape {
                return Err(CodecError::ShapeMismatch {
                    tensor: tm.name.clone(),
                    got: tm.shape.clone(),
                    want: spec.shape.clone(),
                });
            }
        }
        let get = |suffix: &str, dtypes: &[Dtype]| -> Result<Vec<u8>, CodecError> {
            let v = st
                .tensor(&format!("{}/{suffix}", tm.name))
                .map_err(|_| malformed(format!("tensor {:?} has no {suffix} array", tm.name)))?;
            if !dtypes.contains(&v.dtype()) || v.shape().len() != 1 {
                return Err(malformed(format!(
                    "tensor {:?}: {suffix} array has dtype {:?} shape {:?}",
                    tm.name,
                    v.dtype(),
                    v.shape()
                )));
            }
            Ok(v.data().to_vec())
        };
        let val_dtype = if tm.params.values == ValueFormat::Bf16 {
            Dtype::BF16
        } else {
            Dtype::U8
        };
        let scale_bytes = get("scale", &[Dtype::BF16])?;
        let t = EncodedTensor {
            idx: get("idx", &[Dtype::U8])?,
            val: get("val", &[val_dtype])?,
            scales: scale_bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            name: tm.name,
            shape: tm.shape,
            dtype: tm.dtype,
            params: tm.params,
        };
        let sumsq = validate(&t)?;
        out.push((t, sumsq));
    }
    Ok(out)
}

/// The most bytes a section holding `tensors` can decompress to with codec `params`: the
/// exact block sizes of every tensor (`ChunkLayout`) plus a generous allowance for the
/// safetensors header (three arrays and one metadata entry per tensor, JSON-escaped twice).
/// Readers refuse a section declaring more *before* decompressing it, so a few kilobytes of
/// zstd can no longer claim gigabytes (a decompression bomb).
pub fn section_raw_bound<'a>(
    tensors: impl IntoIterator<Item = &'a super::TensorSpec>,
    params: &CodecParams,
) -> u64 {
    const PER_SECTION: u64 = 4096;
    const PER_TENSOR: u64 = 1024;
    let mut total = PER_SECTION;
    for t in tensors {
        let n = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let Some(n) = n else { return u64::MAX };
        let l = super::ChunkLayout::new(n, params);
        let data = l.idx_len() as u64 + l.val_len() as u64 + 2 * l.n_scales as u64;
        let meta = PER_TENSOR + 24 * t.name.len() as u64 + 24 * t.shape.len() as u64;
        total = total.saturating_add(data).saturating_add(meta);
    }
    total
}
