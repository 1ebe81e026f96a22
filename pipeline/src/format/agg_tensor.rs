//! agg-v1's tensor sections (`schemas/round.md`, "Aggregate"): one section per model
//! tensor, `tNNNNN` in model order, each a safetensors file holding the tensor either dense
//! (`NAME`, F32) or sparse (`NAME/idx` U32 flat indices ascending, `NAME/val` F32),
//! whichever is smaller. Written by the aggregator, read by every replay; also the merged
//! object's sections (agg-v2 form `merged`).

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::format::codec::{CodecError, ModelSpec};
use crate::format::envelope::Limits;

/// The aggregate codec this build writes and reads (`schemas/round.md`).
pub const AGG_CODEC: &str = "agg-v1";

/// One tensor as its agg-v1 section, sparse when that is smaller. Fails only if safetensors
/// refuses its own input (a program error).
pub(crate) fn write_agg_tensor(
    name: &str,
    shape: &[u64],
    dense: &[f32],
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let nnz = dense.iter().filter(|&&x| x != 0.0).count();
    let sparse = nnz * 8 < dense.len() * 4;
    let meta = serde_json::json!({"codec": AGG_CODEC, "name": name, "shape": shape, "form": if sparse { "sparse" } else { "dense" }});
    let info: HashMap<String, String> = [("shardrop".to_string(), meta.to_string())].into();
    if sparse {
        let mut idx = Vec::with_capacity(nnz * 4);
        let mut val = Vec::with_capacity(nnz * 4);
        for (i, &x) in dense.iter().enumerate() {
            if x != 0.0 {
                idx.extend_from_slice(&(i as u32).to_le_bytes());
                val.extend_from_slice(&x.to_le_bytes());
            }
        }
        let views = vec![
            (
                format!("{name}/idx"),
                TensorView::new(Dtype::U32, vec![nnz], &idx)?,
            ),
            (
                format!("{name}/val"),
                TensorView::new(Dtype::F32, vec![nnz], &val)?,
            ),
        ];
        safetensors::serialize(views, Some(info))
    } else {
        let raw: Vec<u8> = dense.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![(
            name.to_string(),
            TensorView::new(
                Dtype::F32,
                shape.iter().map(|&d| d as usize).collect(),
                &raw,
            )?,
        )];
        safetensors::serialize(views, Some(info))
    }
}

/// Envelope limits for what an aggregator signs for a window (the aggregate, split-merge
/// parts and checks): at most every model tensor dense in f32, plus headers, plus 64 MiB for
/// per-miner check tables. A reader's memory is then bounded by the model, not by the object.
pub(crate) fn agg_limits(model: &ModelSpec) -> Limits {
    let dense: u64 = model
        .tensors
        .iter()
        .map(|t| {
            let n = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            n.map_or(u64::MAX, |n| n.saturating_mul(4))
                .saturating_add(4096 + 16 * t.name.len() as u64)
        })
        .fold(0u64, u64::saturating_add);
    let cap = dense.saturating_add(64 << 20);
    Limits {
        max_section_raw_len: cap,
        max_raw_len: cap,
        ..Limits::default()
    }
}

/// One tensor of an aggregate, decoded and checked against the model: every value finite,
/// every index inside the tensor, so that callers can use it without further checks.
pub struct AggTensor {
    /// The model tensor it updates.
    pub name: String,
    /// Its values.
    pub values: AggValues,
}

/// The two forms an aggregate tensor travels in (whichever is smaller).
pub enum AggValues {
    /// Every element, in row-major order.
    Dense(Vec<f32>),
    /// Flat indices ascending and their values.
    Sparse(Vec<u32>, Vec<f32>),
}

impl AggTensor {
    /// `(flat index, value)` of every stored entry (zeros included for the dense form).
    pub fn entries(&self) -> Box<dyn Iterator<Item = (usize, f32)> + '_> {
        match &self.values {
            AggValues::Dense(v) => Box::new(v.iter().copied().enumerate()),
            AggValues::Sparse(i, v) => {
                Box::new(i.iter().map(|&i| i as usize).zip(v.iter().copied()))
            }
        }
    }
}

/// Parses one aggregate tensor section; a malformed one is refused with a codec reason
/// (`section_malformed`, `unknown_tensor`, `non_finite`).
pub fn read_agg_tensor(section: &[u8], model: &ModelSpec) -> Result<AggTensor, CodecError> {
    let st = SafeTensors::deserialize(section)
        .map_err(|e| malformed(format!("not safetensors: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(section).map_err(|e| malformed(e.to_string()))?;
    let meta: serde_json::Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("shardrop"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| malformed("no shardrop metadata".into()))?;
    let name = meta["name"]
        .as_str()
        .ok_or_else(|| malformed("no tensor name".into()))?;
    let spec = model.get(name).ok_or_else(|| CodecError::UnknownTensor {
        tensor: name.to_string(),
    })?;
    let numel = spec.shape.iter().product::<u64>();
    let f32s = |b: &[u8]| -> Result<Vec<f32>, CodecError> {
        let v: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        match v.iter().all(|x| x.is_finite()) {
            true => Ok(v),
            false => Err(CodecError::NonFinite {
                tensor: name.to_string(),
                what: "a value".into(),
            }),
        }
    };
    let values = match meta["form"].as_str() {
        Some("dense") => {
            let t = st.tensor(name).map_err(|e| malformed(e.to_string()))?;
            if t.dtype() != Dtype::F32
                || t.shape().iter().map(|&d| d as u64).collect::<Vec<_>>() != spec.shape
            {
                return Err(malformed(format!(
                    "tensor {name}: dense form has the wrong dtype or shape"
                )));
            }
            AggValues::Dense(f32s(t.data())?)
        }
        Some("sparse") => {
            let idx = st
                .tensor(&format!("{name}/idx"))
                .map_err(|e| malformed(e.to_string()))?;
            let val = st
                .tensor(&format!("{name}/val"))
                .map_err(|e| malformed(e.to_string()))?;
            if idx.dtype() != Dtype::U32 || val.dtype() != Dtype::F32 || idx.shape() != val.shape()
            {
                return Err(malformed(format!(
                    "tensor {name}: sparse form has the wrong dtypes or shapes"
                )));
            }
            let ids: Vec<u32> = idx
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(bad) = ids.iter().find(|&&i| i as u64 >= numel) {
                return Err(malformed(format!(
                    "tensor {name}: index {bad} out of range"
                )));
            }
            if ids.windows(2).any(|p| p[0] >= p[1]) {
                return Err(malformed(format!("tensor {name}: indices not increasing")));
            }
            AggValues::Sparse(ids, f32s(val.data())?)
        }
        _ => return Err(malformed(format!("tensor {name}: unknown form"))),
    };
    Ok(AggTensor {
        name: name.to_string(),
        values,
    })
}

fn malformed(detail: String) -> CodecError {
    CodecError::Malformed(detail)
}
