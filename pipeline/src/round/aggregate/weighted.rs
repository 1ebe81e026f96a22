//! agg-v1's weighted merge of the checked shards, on the CPU or the GPU, bit-identical.

use std::ops::Range;

use super::{AggregateOptions, agg_tensor};
use crate::format::codec::{EncodedTensor, accumulate};
use crate::round::RoundError;
use crate::round::registry::Registry;
use crate::round::verdict::RangeCheck;

/// Merges the tensors of `range` (weighted, in peer-id order) into aggregate sections.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub(super) fn merge_range(
    reg: &Registry,
    range: Range<usize>,
    weights: &[f32],
    decoded: &[(RangeCheck, Vec<EncodedTensor>)],
    on: &AggregateOptions,
) -> Result<Vec<(String, Vec<u8>)>, RoundError> {
    use rayon::prelude::*;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = &on.gpu {
        return merge_range_gpu(gpu, reg, range, weights, decoded);
    }
    range
        .into_par_iter()
        .map(|i| {
            let spec = &reg.model.tensors[i];
            let mut dense = vec![0f32; spec.shape.iter().product::<u64>() as usize];
            for (j, (_, tensors)) in decoded.iter().enumerate() {
                if weights[j] == 0.0 {
                    continue;
                }
                if let Some(t) = tensors.iter().find(|t| t.name == spec.name) {
                    accumulate(t, &mut dense, weights[j])?;
                }
            }
            Ok((
                format!("t{i:05}"),
                agg_tensor(&spec.name, &spec.shape, &dense)?,
            ))
        })
        .collect()
}

/// `merge_range` with each tensor's accumulator on the GPU (one tensor at a time: the
/// device is parallel within it). Only the dense result comes back, to be written.
#[cfg(feature = "cuda")]
pub(super) fn merge_range_gpu(
    gpu: &crate::format::codec::gpu::Gpu,
    reg: &Registry,
    range: Range<usize>,
    weights: &[f32],
    decoded: &[(RangeCheck, Vec<EncodedTensor>)],
) -> Result<Vec<(String, Vec<u8>)>, RoundError> {
    use crate::format::codec::gpu::GpuError;
    let dev = |e: cudarc::driver::DriverError| RoundError::from(GpuError::from(e));
    let s = gpu.stream();
    range
        .map(|i| {
            let spec = &reg.model.tensors[i];
            let n = spec.shape.iter().product::<u64>() as usize;
            let mut host = vec![0f32; n];
            if n > 0 {
                let mut dense = s.clone_htod(&host).map_err(dev)?;
                for (j, (_, tensors)) in decoded.iter().enumerate() {
                    if weights[j] == 0.0 {
                        continue;
                    }
                    if let Some(t) = tensors.iter().find(|t| t.name == spec.name) {
                        gpu.accumulate(t, &mut dense, weights[j])?;
                    }
                }
                s.memcpy_dtoh(&dense, &mut host).map_err(dev)?;
            }
            Ok((
                format!("t{i:05}"),
                agg_tensor(&spec.name, &spec.shape, &host)?,
            ))
        })
        .collect()
}
