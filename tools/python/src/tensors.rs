//! Tensors from Python through DLPack (torch, numpy ≥ 1.22, jax, cupy): read in place on the
//! CPU, never copied. A tensor on another device is refused with the reason rather than
//! copied to the host behind the caller's back (a 72 B model does not fit there).

use dlpark::ffi::{DLDataType, DLDeviceType};
use dlpark::python::{ImportedDlpack, from_dlpack};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use shardrop::format::codec::{InDtype, OwnedShapeInput};

use crate::errors::caller;

/// One imported tensor: the DLPack owner keeps the memory alive (and tells the producer when
/// it may be released); `ptr`/`len` locate the bytes, kept as an address so a borrowed view
/// can cross into the GIL-free section.
pub struct Held {
    _owner: ImportedDlpack,
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: InDtype,
    ptr: usize,
    len: usize,
}

impl Held {
    /// The tensor as a codec input, borrowing its memory.
    pub fn input(&self) -> OwnedShapeInput<'_> {
        OwnedShapeInput {
            name: &self.name,
            shape: self.shape.clone(),
            dtype: self.dtype,
            data: self.bytes(),
        }
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` is the compact CPU storage DLPack described, alive as long
        // as `_owner` (so as long as `self`); the caller promised, by handing the tensor
        // over, not to write it during the call.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The tensor as mutable f32 elements (checked f32 at import).
    pub fn f32_mut(&mut self) -> &mut [f32] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `bytes`, and import checked the tensor writable (no READ_ONLY flag),
        // f32 and 4-byte aligned; `&mut self` keeps this the only view from here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, self.len / 4) }
    }
}

fn dtype_of(t: DLDataType) -> Option<InDtype> {
    if t == DLDataType::F32 {
        Some(InDtype::F32)
    } else if t == DLDataType::BF16 {
        Some(InDtype::Bf16)
    } else if t == DLDataType::F16 {
        Some(InDtype::F16)
    } else {
        None
    }
}

/// What the caller will do with the tensor.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read an update (f32, bf16 or f16).
    Read,
    /// Update parameters in place (f32).
    WriteF32,
}

/// A DLPack dtype as torch and numpy name it (`float64`, `int32`, …).
fn dl_name(dt: DLDataType) -> String {
    let kind = match dt.code.0 {
        0 => "int",
        1 => "uint",
        2 => "float",
        4 => "bfloat",
        5 => "complex",
        6 => "bool",
        _ => return format!("a DLPack dtype of code {} and {} bits", dt.code.0, dt.bits),
    };
    match (kind, dt.bits) {
        ("bool", _) => "bool".into(),
        (k, b) => format!("{k}{b}"),
    }
}

/// Imports one tensor named `name`.
pub fn import(obj: &Bound<'_, PyAny>, name: &str, access: Access) -> PyResult<Held> {
    if !obj.hasattr("__dlpack__")? {
        return Err(caller(format!(
            "tensor {name:?}: a {} has no __dlpack__; give a torch tensor, a numpy array (numpy >= 1.22) or another DLPack array",
            obj.get_type().name()?
        )));
    }
    let mut owner = from_dlpack(obj.as_borrowed(), None, None)
        .map_err(|e| caller(format!("tensor {name:?}: DLPack import failed: {e}")))?;
    let bad = |what: String| caller(format!("tensor {name:?}: {what}"));
    let (device, dt, shape, compact, read_only) = {
        let t = owner.validate().map_err(|e| bad(format!("{e}")))?;
        let compact = t.is_compact().map_err(|e| bad(format!("{e}")))?;
        (
            t.device(),
            t.dtype(),
            t.shape().to_vec(),
            compact,
            owner.flags().contains(dlpark::DlpackFlags::READ_ONLY),
        )
    };
    if device.device_type != DLDeviceType::CPU {
        let gpu = device.device_type == DLDeviceType::CUDA;
        return Err(bad(if gpu {
            format!(
                "is on cuda:{}; this build reads CPU tensors only (the GPU codec does not yet take device memory from Python), and a silent copy of the model to the host is never made: move it with .cpu() yourself if that is what you want",
                device.device_id
            )
        } else {
            format!(
                "is on a device of DLPack type {}; only CPU tensors are read",
                device.device_type.0
            )
        }));
    }
    let dtype = dtype_of(dt).ok_or_else(|| {
        bad(match access {
            Access::WriteF32 => format!(
                "is {}; parameters are updated in f32 (every peer's bits must agree): keep an f32 master copy",
                dl_name(dt)
            ),
            Access::Read => format!(
                "is {}; updates are float32, bfloat16 or float16 (convert it with .float())",
                dl_name(dt)
            ),
        })
    })?;
    if access == Access::WriteF32 && dtype != InDtype::F32 {
        return Err(bad(format!(
            "is {}; parameters are updated in f32 (every peer's bits must agree): keep an f32 master copy",
            dtype.name()
        )));
    }
    if !compact {
        return Err(bad(
            "is not contiguous (row-major); call .contiguous() first".into(),
        ));
    }
    if access == Access::WriteF32 && read_only {
        return Err(bad("is read-only; parameters are updated in place".into()));
    }
    let shape: Vec<u64> = shape
        .iter()
        .map(|&d| u64::try_from(d).map_err(|_| bad(format!("has a negative dimension {d}"))))
        .collect::<PyResult<_>>()?;
    let (ptr, len) = match access {
        Access::Read => {
            let t = owner.validate().map_err(|e| bad(format!("{e}")))?;
            // SAFETY: compact CPU storage of `num_bytes` bytes, alive with `owner`.
            let b = unsafe { t.cpu_bytes() }.map_err(|e| bad(format!("{e}")))?;
            (b.as_ptr() as usize, b.len())
        }
        Access::WriteF32 => {
            let t = match &mut owner {
                ImportedDlpack::Legacy(m) => m.validate_mut(),
                ImportedDlpack::Versioned(m) => m.validate_mut(),
            };
            let mut t = t.map_err(|e| bad(format!("{e}")))?;
            // SAFETY: compact CPU storage of `num_bytes` bytes, alive with `owner`.
            let b = unsafe { t.cpu_bytes_mut() }.map_err(|e| bad(format!("{e}")))?;
            (b.as_mut_ptr() as usize, b.len())
        }
    };
    if access == Access::WriteF32 && ptr % 4 != 0 {
        return Err(bad("is not 4-byte aligned".into()));
    }
    Ok(Held {
        _owner: owner,
        name: name.to_string(),
        shape,
        dtype,
        ptr,
        len,
    })
}

/// Imports every tensor of a mapping (a dict, a `state_dict()`, any object with `items()`).
pub fn import_all(tensors: &Bound<'_, PyAny>, access: Access) -> PyResult<Vec<Held>> {
    let items = match tensors.cast::<PyDict>() {
        Ok(d) => d.call_method0("items")?,
        Err(_) => tensors.call_method0("items").map_err(|_| {
            caller("tensors: expected a mapping of name to tensor (a dict or a state_dict())")
        })?,
    };
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let (name, t): (String, Bound<'_, PyAny>) = item?.extract()?;
        out.push(import(&t, &name, access)?);
    }
    if access == Access::WriteF32 {
        refuse_aliases(&out)?;
    }
    Ok(out)
}

/// Tensors written in place must not share memory: two views of one buffer
/// (`{"a": buf.reshape(64, 256), "b": buf[:256]}`) would give the shared part both updates
/// through overlapping `&mut` slices.
fn refuse_aliases(held: &[Held]) -> PyResult<()> {
    let mut spans: Vec<(usize, usize, &str)> = held
        .iter()
        .filter(|h| h.len > 0)
        .map(|h| (h.ptr, h.ptr + h.len, h.name.as_str()))
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(caller(format!(
                "tensors {:?} and {:?} share memory (views of one buffer); each parameter written in place needs its own storage (pass copies, or the tensors a module owns)",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(())
}
