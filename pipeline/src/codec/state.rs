//! The miner's error-feedback buffers, kept across windows and restarts.
//!
//! Saved as a plain safetensors file of f32 tensors (atomically: temp file + rename), so a
//! miner that restarts resumes with exactly the residual it had; losing it would silently
//! drop everything not yet sent.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::CodecError;

/// File name inside the state folder.
pub const STATE_FILE: &str = "error-feedback.safetensors";

/// Error-feedback buffers by tensor name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EfState {
    pub buffers: BTreeMap<String, Vec<f32>>,
}

impl EfState {
    /// The buffer for `name`, created as zeros on first use; refuses a length change.
    pub fn buffer(&mut self, name: &str, len: usize) -> Result<&mut Vec<f32>, CodecError> {
        let b = self
            .buffers
            .entry(name.to_string())
            .or_insert_with(|| vec![0.0; len]);
        if b.len() != len {
            return Err(CodecError::ShapeMismatch {
                tensor: name.into(),
                got: vec![len as u64],
                want: vec![b.len() as u64],
            });
        }
        Ok(b)
    }

    /// Loads `dir/error-feedback.safetensors`, or an empty state when there is none yet.
    pub fn load(dir: &Path) -> Result<EfState, std::io::Error> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(EfState::default()),
            Err(e) => return Err(e),
        };
        let bad = |e: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut buffers = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is not f32")));
            }
            buffers.insert(
                name.to_string(),
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            );
        }
        Ok(EfState { buffers })
    }

    /// Writes the state atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), std::io::Error> {
        std::fs::create_dir_all(dir)?;
        let bytes: Vec<Vec<u8>> = self
            .buffers
            .values()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = self
            .buffers
            .iter()
            .zip(&bytes)
            .map(|((name, v), b)| {
                TensorView::new(Dtype::F32, vec![v.len()], b).map(|t| (name.clone(), t))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let data = safetensors::serialize(views, None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, &data)?;
        tmp.as_file().sync_all()?;
        tmp.persist(dir.join(STATE_FILE)).map_err(|e| e.error)?;
        Ok(())
    }
}
