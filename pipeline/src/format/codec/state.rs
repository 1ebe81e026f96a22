//! The miner's error-feedback buffers, kept across windows and restarts.
//!
//! Saved as a plain safetensors file of f32 tensors (atomically: temp file + rename), so a
//! miner that restarts resumes with exactly the residual it had; losing it would silently
//! drop everything not yet sent.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::CodecError;

/// File name inside the state folder.
pub const STATE_FILE: &str = "error-feedback.safetensors";

/// Metadata key holding the last window the state accounts for.
const WINDOW_KEY: &str = "shardrop_window";
/// Prefix of the temporary files a save writes before its rename; a killed save leaves one,
/// which the next lock of the folder removes.
const TMP_PREFIX: &str = ".error-feedback.tmp";
/// The lock file that keeps two publishes from sharing one state folder.
pub(super) const LOCK_FILE: &str = "state.lock";

/// Error-feedback buffers by tensor name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EfState {
    /// One f32 buffer per tensor name, the length of the tensor.
    pub buffers: BTreeMap<String, Vec<f32>>,
    /// The last window whose shard these buffers already account for (set by publish):
    /// a rerun for that window must not encode the same update a second time.
    pub window: Option<u64>,
}

/// An exclusive lock on a state folder, held for one publish; released on drop, which also
/// removes the lock file (a folder at rest holds only its state).
pub struct StateLock {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Removed while still held: a publisher that opened the old file before this and
        // locks it after finds it unlinked (`lock_dir` checks) and tries again.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Locks `dir` for one writer (created if missing) and removes the temporary files of
/// saves that were killed. Refuses when another process holds it.
pub fn lock_dir(dir: &Path) -> Result<StateLock, std::io::Error> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    std::fs::create_dir_all(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(NOFOLLOW)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "{}: locked by another publisher (another process, or another miner in this one, using the same state folder); wait for it to finish, or give each publisher its own state folder",
                        dir.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // The holder before us removes the file as it lets go: the lock counts only on the
        // file still at the path.
        let held = file.metadata()?;
        match std::fs::symlink_metadata(&path) {
            // The same file: inode numbers are unique only within one file system.
            Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => break file,
            Ok(_) | Err(_) => continue,
        }
    };
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(StateLock { file, path })
}

/// State files are never opened through a symbolic link.
const NOFOLLOW: i32 = libc::O_NOFOLLOW;

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
        let bytes = match read_nofollow(&path) {
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
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let window = match header.metadata().as_ref().and_then(|m| m.get(WINDOW_KEY)) {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| bad(format!("{WINDOW_KEY} {v:?}")))?),
        };
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
        Ok(EfState { buffers, window })
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
        let meta = self
            .window
            .map(|w| [(WINDOW_KEY.to_string(), w.to_string())].into());
        let data = safetensors::serialize(views, meta)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // A fresh temporary file (created exclusively, so never through a planted link),
        // synced, then renamed over the state (rename replaces a link, never follows it),
        // then the folder synced: a kill at any point leaves the old state or the new one.
        let mut tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, &data)?;
        tmp.as_file().sync_all()?;
        tmp.persist(dir.join(STATE_FILE)).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

fn read_nofollow(path: &Path) -> Result<Vec<u8>, std::io::Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", path.display()),
        ));
    }
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}
