//! The outer optimizer's momentum of a pulled checkpoint folder, read with the checks a state
//! file gets (`round::outer::read_state_file`).
//!
//! A checkpoint keeps the buffers in shards of their own (`momentum-<nnnnn>.safetensors`,
//! `schemas/checkpoint.md` §2) so a model loader never meets them; a replay needs them, so
//! `apply --from DIR` and `OptimizerState.load(DIR)` read them here. Checkpoints pushed before
//! that layout mixed them into the model's shards; they are found there just the same.

use std::os::unix::fs::FileExt;
use std::path::Path;

use safetensors::Dtype;

use super::{LOCAL_MANIFEST, LocalManifest};
use crate::format::codec::ModelSpec;
use crate::round::RoundError;
use crate::round::outer::state_file::{check_buffers, check_finite, invalid};
use crate::round::outer::{MOMENTUM_PREFIX, OuterState, StateFile};

/// The momentum buffers of the checkpoint pulled into `dir`: run and window from its local
/// manifest (`after` = the checkpoint's window), every buffer the manifest lists (those the
/// pull selected) read from its file, F32 of a model tensor's shape (with `model`) and
/// finite, else `optimizer_state_invalid`. No buffer at all when the checkpoint holds no
/// momentum (a run without it, or a pull `--without-momentum`:
/// [`LocalManifest::without_momentum`]).
pub fn read_momentum(dir: &Path, model: Option<&ModelSpec>) -> Result<StateFile, RoundError> {
    let object = dir.display().to_string();
    let bad = |detail: String| invalid(&object, detail);
    let lm = LocalManifest::read(dir)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| {
            bad(format!(
                "no {LOCAL_MANIFEST}: not a folder `shardrop ckpt pull` wrote (give a state file, or pull the checkpoint)"
            ))
        })?;
    let m = &lm.manifest;
    let opts = super::pull::PullOptions {
        tensors: lm.tensors.clone(),
        tp: lm.tp,
        without_momentum: lm.without_momentum,
        ..Default::default()
    };
    let selected = super::pull::select(m, &opts, &lm.source).map_err(|e| bad(e.to_string()))?;
    let wanted: Vec<&super::TensorEntry> = selected
        .iter()
        .map(|&i| &m.tensors[i])
        .filter(|t| t.name.starts_with(MOMENTUM_PREFIX))
        .collect();
    let mut buffers = Vec::with_capacity(wanted.len());
    let mut state = OuterState::default();
    for (k, shard) in m.shards.iter().enumerate() {
        let here: Vec<&&super::TensorEntry> = wanted.iter().filter(|t| t.shard == k).collect();
        if here.is_empty() {
            continue;
        }
        let path = dir.join(&shard.file);
        let in_file = |e: String| invalid(&path.display().to_string(), e);
        // No larger than the shard the manifest signed (a subset pull's file is smaller).
        let (file, _) = crate::files::open_regular(&path, shard.size)
            .map_err(|e| in_file(format!("{e} (pull the checkpoint again)")))?;
        let header =
            super::packing::read_header(&path, &file, 0).map_err(|e| in_file(e.to_string()))?;
        for t in here {
            let Some(src) = header.iter().find(|h| h.name == t.name) else {
                return Err(in_file(format!(
                    "holds no tensor {:?}, which the checkpoint lists (pull it again)",
                    t.name
                )));
            };
            if src.dtype != "F32" {
                return Err(in_file(format!(
                    "tensor {:?} is {}; momentum buffers are F32",
                    t.name, src.dtype
                )));
            }
            buffers.push((t.name.clone(), Dtype::F32, src.shape.clone()));
            let mut raw = vec![0u8; src.len as usize];
            file.read_exact_at(&mut raw, src.offset)
                .map_err(|e| in_file(e.to_string()))?;
            // The bytes the signed manifest lists (a folder another pull half-replaced holds
            // a file of another checkpoint under the same name); a tensor-parallel slice was
            // checked whole when it was cut and is not the listed tensor any more.
            if lm.tp.is_none()
                && (src.shape != t.shape || blake3::hash(&raw).to_hex().as_str() != t.blake3)
            {
                return Err(in_file(format!(
                    "tensor {:?} is not the one {LOCAL_MANIFEST} lists (another checkpoint's file, or changed since the pull): pull the checkpoint again",
                    t.name
                )));
            }
            let values = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            state
                .momentum
                .insert(t.name[MOMENTUM_PREFIX.len()..].to_string(), values);
        }
    }
    let shapes = check_buffers(&object, &buffers, model)?;
    check_finite(&object, &state)?;
    Ok(StateFile {
        state,
        run: m.run.clone(),
        after: m.window,
        shapes,
    })
}
