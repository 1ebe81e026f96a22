//! The outer optimizer's momentum state file, checked before any of it is used.

use crate::round::RoundReason;
use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

use crate::format::codec::ModelSpec;
use crate::round::RoundError;
use crate::round::outer::OuterState;

/// Reads an outer-optimizer state file as `round.md` ("State") requires before any of it is
/// used: a regular file (no link followed, no FIFO waited on) no larger than the model's f32
/// size plus 64 MiB (without a model: any size), every tensor `outer_momentum.<name>` of a
/// model tensor with exactly its shape, and every value finite: NaN momentum would give NaN
/// parameters to a peer that then publishes from them. `optimizer_state_invalid` otherwise.
/// Returns the state, its run, the window it is after, and each buffer's shape (by tensor
/// name, without the prefix), all from the one read that was checked. A pulled checkpoint
/// folder is read by [`crate::checkpoint::read_momentum`].
pub fn read_state_file(
    path: &std::path::Path,
    model: Option<&ModelSpec>,
) -> Result<StateFile, RoundError> {
    let object = path.display().to_string();
    let bad = |detail: String| invalid(&object, detail);
    let max = model.map_or(u64::MAX / 2, |m| {
        m.tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>() * 4)
            .sum::<u64>()
            + (64 << 20)
    });
    let bytes = crate::files::read_regular(path, max).map_err(|e| bad(e.to_string()))?;
    let (state, run, after) =
        crate::round::outer::state_from_safetensors(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let buffers: Vec<(String, Dtype, Vec<u64>)> = header
        .tensors()
        .into_iter()
        .map(|(k, info)| {
            (
                k,
                info.dtype,
                info.shape.iter().map(|&d| d as u64).collect(),
            )
        })
        .collect();
    let shapes = check_buffers(&object, &buffers, model)?;
    check_finite(&object, &state)?;
    Ok(StateFile {
        state,
        run,
        after,
        shapes,
    })
}

pub(crate) fn invalid(object: &str, detail: String) -> RoundError {
    RoundError::Rejected {
        object: object.to_string(),
        reason: RoundReason::OptimizerStateInvalid.code(),
        detail,
    }
}

/// Every buffer (`outer_momentum.<name>`, its dtype and shape) is F32 and of a model tensor
/// with exactly its shape (without a model: any). Returns the shapes by plain tensor name.
pub(crate) fn check_buffers(
    object: &str,
    buffers: &[(String, Dtype, Vec<u64>)],
    model: Option<&ModelSpec>,
) -> Result<BTreeMap<String, Vec<u64>>, RoundError> {
    let bad = |detail: String| invalid(object, detail);
    let specs: Option<BTreeMap<&str, &crate::format::codec::TensorSpec>> =
        model.map(|m| m.tensors.iter().map(|t| (t.name.as_str(), t)).collect());
    let mut shapes = BTreeMap::new();
    for (name, dtype, shape) in buffers {
        let plain = name
            .strip_prefix(crate::round::outer::MOMENTUM_PREFIX)
            .unwrap_or(name);
        if let Some(specs) = &specs {
            match specs.get(plain) {
                Some(t) if t.shape == *shape && *dtype == Dtype::F32 => {}
                Some(t) => {
                    return Err(bad(format!(
                        "tensor {name:?} is {dtype:?} {shape:?}; the model's {plain:?} is F32 {:?}",
                        t.shape
                    )));
                }
                None => return Err(bad(format!("tensor {name:?} is not of the run's model"))),
            }
        } else if *dtype != Dtype::F32 {
            return Err(bad(format!("tensor {name:?} is {dtype:?}, not F32")));
        }
        shapes.insert(plain.to_string(), shape.clone());
    }
    Ok(shapes)
}

/// Every momentum value is finite.
pub(crate) fn check_finite(object: &str, state: &OuterState) -> Result<(), RoundError> {
    for (name, m) in &state.momentum {
        if let Some(i) = m.iter().position(|v| !v.is_finite()) {
            return Err(invalid(
                object,
                format!("momentum of {name:?} holds {} at element {i}", m[i]),
            ));
        }
    }
    Ok(())
}

/// An outer-optimizer state (a state file, or a pulled checkpoint's momentum) as checked.
pub struct StateFile {
    /// The momentum buffers.
    pub state: OuterState,
    /// The run it is of.
    pub run: String,
    /// The last window in it (`None`: before window 0).
    pub after: Option<u64>,
    /// Each buffer's shape, by tensor name.
    pub shapes: BTreeMap<String, Vec<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::codec::{InDtype, TensorSpec};
    use crate::round::outer::state_to_safetensors;

    fn model() -> ModelSpec {
        ModelSpec {
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![2, 3],
                dtype: InDtype::F32,
            }],
        }
    }

    /// A state file of `buffers` (name → shape and values), written as `apply` writes one.
    fn state_file(
        dir: &std::path::Path,
        buffers: &[(&str, Vec<u64>, Vec<f32>)],
    ) -> std::path::PathBuf {
        let mut st = OuterState::default();
        let mut shapes = BTreeMap::new();
        for (n, shape, v) in buffers {
            st.momentum.insert(n.to_string(), v.clone());
            shapes.insert(n.to_string(), shape.clone());
        }
        let path = dir.join(format!(
            "state-{}.safetensors",
            buffers.len() * 7 + shapes.len()
        ));
        let bytes = state_to_safetensors(&st, &shapes, "r", Some(3)).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn reason(r: Result<StateFile, RoundError>) -> Option<&'static str> {
        crate::error::Classified::reason(&r.err()?)
    }

    #[test]
    fn state_files_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let m = model();
        let ok = state_file(dir.path(), &[("w", vec![2, 3], vec![0.5; 6])]);
        let f = read_state_file(&ok, Some(&m)).unwrap();
        assert_eq!((f.run.as_str(), f.after), ("r", Some(3)));
        assert_eq!(f.shapes["w"], vec![2, 3]);
        let bad = "optimizer_state_invalid";
        // NaN momentum would give NaN parameters.
        let nan = dir.path().join("nan");
        std::fs::copy(
            state_file(dir.path(), &[("w", vec![2, 3], vec![f32::NAN; 6])]),
            &nan,
        )
        .unwrap();
        assert_eq!(reason(read_state_file(&nan, Some(&m))), Some(bad));
        // A flattened shape, and a tensor the model does not have.
        let flat = dir.path().join("flat");
        std::fs::copy(
            state_file(dir.path(), &[("w", vec![6], vec![0.0; 6])]),
            &flat,
        )
        .unwrap();
        assert_eq!(reason(read_state_file(&flat, Some(&m))), Some(bad));
        let extra = state_file(
            dir.path(),
            &[("w", vec![2, 3], vec![0.0; 6]), ("x", vec![1], vec![0.0])],
        );
        assert_eq!(reason(read_state_file(&extra, Some(&m))), Some(bad));
        // A link to /dev/zero, and a file larger than the model allows.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_eq!(reason(read_state_file(&link, Some(&m))), Some(bad));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; (64 << 20) + 100]).unwrap();
        assert_eq!(reason(read_state_file(&big, Some(&m))), Some(bad));
    }
}
