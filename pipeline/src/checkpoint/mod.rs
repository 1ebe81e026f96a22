//! Sharded checkpoints in buckets (normative format: `schemas/checkpoint.md`).
//!
//! A checkpoint is plain safetensors shards, the small files of a Hugging Face model folder,
//! an HF `model.safetensors.index.json`, and a signed manifest written last (the commit
//! point): every shard's size, blake3 and the blake3 of each of its 16 MiB chunks, every
//! tensor's dtype, shape, shard, byte range and blake3. Chunk hashes let a pull verify each
//! parallel ranged GET as it lands and resume inside a shard; tensor hashes let a partial
//! pull verify exactly the tensors it fetched.
//!
//! - [`push`]: pack, hash, upload (parallel multipart, create-only: a rerun skips shards
//!   already there with the same bytes), manifest, then `LATEST` by compare-and-swap.
//! - [`pull`]: verify the manifest, fetch and verify, write only inside the target folder.
//! - [`admin`]: list, full remote verification, retention.
//! - [`read_momentum`]: a pulled folder's outer-optimizer momentum, checked like a state file.

pub mod admin;
mod momentum;
mod packing;
pub mod pull;
pub mod push;

pub use momentum::read_momentum;

use std::collections::HashSet;

use crate::format::envelope::EnvelopeError;
use crate::store::StoreError;

/// The manifest JSON's `format`.
pub(crate) const MANIFEST_FORMAT: &str = "shardrop-ckpt-v1";
/// The codec of a manifest envelope.
pub const MANIFEST_CODEC: &str = "ckpt-v1";
/// The codec of the `LATEST` pointer envelope.
pub(crate) const POINTER_CODEC: &str = "latest-v1";
/// Chunk size for shard hashes and ranged GETs.
pub const CHUNK: u64 = 16 << 20;
/// The HF index file name.
pub const HF_INDEX: &str = "model.safetensors.index.json";
/// The verified manifest as a pull writes it next to the model (for `apply --from DIR`).
pub const LOCAL_MANIFEST: &str = "shardrop-manifest.json";

crate::error::reason_codes! {
    /// The checkpoint's reason codes (`schemas/checkpoint.md`, "Reason codes"); envelope
    /// reasons keep theirs.
    pub enum CkptReason {
        /// A manifest whose body is not one.
        ManifestMalformed = "manifest_malformed",
        /// A `LATEST` pointer whose body is not one.
        PointerMalformed = "pointer_malformed",
        /// Bytes that do not match the signed manifest.
        CheckpointMismatch = "checkpoint_mismatch",
    }
}

/// Failures of pushing, pulling and managing checkpoints, by class
/// ([`crate::error::ErrorClass`]).
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    /// The call cannot be done as asked (arguments, a link or folder where a file goes).
    #[error("{0}")]
    Caller(String),
    /// A signed object was read and refused (a manifest or pointer that is not one);
    /// `reason` is its stable code.
    #[error("{object}: {detail}")]
    Rejected {
        object: String,
        reason: &'static str,
        detail: String,
    },
    /// Bytes that do not match the signed manifest, one entry per bad object (a full verify
    /// reports them all). Nothing unverified is kept under its final name.
    #[error("{}", .0.join("; "))]
    Mismatch(Vec<String>),
    /// Another checkpoint already holds the name, or `LATEST` kept moving; nothing was
    /// overwritten.
    #[error("{object}: {detail}")]
    Conflict { object: String, detail: String },
    /// An object the call needs is not there (yet).
    #[error("{object}: {detail}")]
    Missing { object: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The run's registry could not be used (not registered, a registry that breaks a reader
    /// rule): its class and reason code are kept, as every round command reports them.
    #[error(transparent)]
    Registry(#[from] crate::round::registry::RegistryError),
    /// The folder pushed is not the run's model (`model_mismatch`, as a publish of another
    /// model is refused): a checkpoint peers bootstrap from must hold exactly its tensors.
    #[error("{0}")]
    ModelMismatch(String),
    /// A failure of this program (serialising its own output), not of any input.
    #[error("{0}")]
    Internal(String),
}

impl crate::error::Classified for CkptError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            CkptError::Caller(_) => ErrorClass::Caller,
            CkptError::Rejected { .. } | CkptError::Mismatch(_) => ErrorClass::Rejected,
            CkptError::Conflict { .. } => ErrorClass::Conflict,
            CkptError::Missing { .. } => ErrorClass::NotFound,
            CkptError::Io { .. } => ErrorClass::Store,
            CkptError::Store(e) => e.class(),
            CkptError::Envelope(e) => e.class(),
            CkptError::Registry(e) => e.class(),
            CkptError::ModelMismatch(_) => ErrorClass::Refused,
            CkptError::Internal(_) => ErrorClass::Internal,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            CkptError::Rejected { reason, .. } => Some(reason),
            CkptError::Mismatch(_) => Some(CkptReason::CheckpointMismatch.code()),
            CkptError::ModelMismatch(_) => Some(crate::round::RoundReason::ModelMismatch.code()),
            CkptError::Envelope(e) => e.reason(),
            CkptError::Registry(e) => e.reason(),
            _ => None,
        }
    }

    fn object(&self) -> Option<&str> {
        match self {
            CkptError::Rejected { object, .. }
            | CkptError::Conflict { object, .. }
            | CkptError::Missing { object, .. } => Some(object),
            CkptError::Store(e) => e.object(),
            CkptError::Envelope(e) => e.object(),
            CkptError::Registry(e) => e.object(),
            _ => None,
        }
    }
}

/// One object that does not match the signed manifest, described for the report ("URL:
/// why"); a full verify gathers them into [`CkptError::Mismatch`].
#[derive(Debug)]
pub(crate) struct BadObject(pub(crate) String);

impl std::fmt::Display for BadObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `pull` leaves beside the files it wrote (`LOCAL_MANIFEST`): where they came from,
/// what was selected, and the verified manifest (its `window` is the last window a replay
/// from this checkpoint must skip). Fields in the file's key order.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalManifest {
    /// The signed manifest the files were checked against.
    pub manifest: Manifest,
    /// The manifest's URL.
    pub source: String,
    /// The `--tensors` globs of the pull (all tensors when empty).
    pub tensors: Vec<String>,
    /// The `(rank, size)` tensor-parallel slice of the pull, if any.
    pub tp: Option<(u64, u64)>,
    /// The pull left out the momentum buffers (`--without-momentum`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_momentum: bool,
}

impl LocalManifest {
    /// Reads the local manifest of a pulled folder; `None` when there is none. The folder is
    /// the caller's own (written by a verified pull), so this is a convenience, not a check.
    pub fn read(dir: &std::path::Path) -> Result<Option<LocalManifest>, CkptError> {
        let path = dir.join(LOCAL_MANIFEST);
        // A regular file (no link followed, no FIFO waited on) of bounded size: a manifest
        // decompresses to at most 64 MiB, its pretty form with the source and selection
        // stays well under four times that.
        match crate::files::read_regular(&path, 256 << 20) {
            Ok(b) => {
                let lm: LocalManifest = serde_json::from_slice(&b)
                    .map_err(|e| CkptError::Caller(format!("{}: {e}", path.display())))?;
                // Its names are joined to `dir` by readers: the manifest's own rules.
                lm.manifest
                    .validate()
                    .map_err(|e| CkptError::Caller(format!("{}: {e}", path.display())))?;
                Ok(Some(lm))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }
}

pub(crate) fn io_err(path: &std::path::Path, source: std::io::Error) -> CkptError {
    CkptError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One shard file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardEntry {
    /// Its file name (a safe name, inside the checkpoint's folder).
    pub file: String,
    /// Its size.
    pub size: u64,
    /// blake3 of the whole file.
    pub blake3: String,
    /// blake3 of each `chunk_bytes` piece of the file, in order.
    pub chunks: Vec<String>,
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorEntry {
    /// The tensor's name.
    pub name: String,
    /// safetensors dtype name (`F32`, `BF16`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The index of the shard holding it.
    pub shard: usize,
    /// Absolute byte range inside the shard file.
    pub begin: u64,
    /// End of the byte range (exclusive).
    pub end: u64,
    /// blake3 of the tensor's bytes.
    pub blake3: String,
}

/// A small file of the checkpoint (config, tokenizer).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    /// Its file name.
    pub file: String,
    /// Its size.
    pub size: u64,
    /// blake3 of its bytes.
    pub blake3: String,
}

/// The signed description of one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// `shardrop-ckpt-v1`.
    pub format: String,
    /// The run.
    pub run: String,
    /// The checkpoint's step (also in the signed header).
    pub step: u64,
    /// The last window whose aggregate is in these parameters (catch-up starts after it).
    pub window: Option<u64>,
    /// The previous checkpoint's step, if any.
    pub parent: Option<u64>,
    /// Size of the pieces each shard's `chunks` hash.
    pub chunk_bytes: u64,
    /// The shard files.
    pub shards: Vec<ShardEntry>,
    /// Every tensor, by shard and byte range.
    pub tensors: Vec<TensorEntry>,
    /// The small files.
    pub files: Vec<FileEntry>,
}

/// Ceilings on what a manifest may list. A 72 B model has ~1,000–2,000 tensors and the
/// largest mixture-of-experts checkpoints under 100,000; 2^17 tensors of names up to 512
/// bytes keep a reader's manifest and HF index under ~100 MB whatever a pusher signs.
pub(crate) const MAX_TENSORS: usize = 1 << 17;
/// Most small files a manifest may list.
pub(crate) const MAX_FILES: usize = 1 << 14;
/// Longest tensor name, bytes.
pub(crate) const MAX_TENSOR_NAME: usize = 512;
/// Most dimensions of a tensor.
pub(crate) const MAX_DIMS: usize = 8;

/// Bytes per element of a safetensors dtype name.
pub(crate) fn dtype_size(d: &str) -> Option<u64> {
    Some(match d {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// A file name from a manifest that is safe to create inside the target folder: one plain
/// component, no leading dot, no separators, no control characters.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Manifest {
    /// Everything a reader relies on before fetching a byte: names safe, every tensor inside
    /// its shard with the size its dtype and shape say, no overlaps, chunk lists complete.
    pub fn validate(&self) -> Result<(), CkptError> {
        let bad = |m: String| {
            Err(CkptError::Rejected {
                object: "manifest".into(),
                reason: CkptReason::ManifestMalformed.code(),
                detail: m,
            })
        };
        if self.format != MANIFEST_FORMAT {
            return bad(format!(
                "format {:?}, expected {MANIFEST_FORMAT}",
                self.format
            ));
        }
        // Counts first: everything below allocates in proportion to them, and a reader's
        // memory (and the HF index it writes) must not be the pusher's to choose.
        if self.tensors.len() > MAX_TENSORS
            || self.shards.len() > MAX_FILES
            || self.files.len() > MAX_FILES
        {
            return bad(format!(
                "{} tensors, {} shards, {} files (limits {MAX_TENSORS}, {MAX_FILES}, {MAX_FILES})",
                self.tensors.len(),
                self.shards.len(),
                self.files.len()
            ));
        }
        if let Some(t) = self
            .tensors
            .iter()
            .find(|t| t.name.len() > MAX_TENSOR_NAME || t.shape.len() > MAX_DIMS)
        {
            return bad(format!(
                "tensor name of {} bytes or {} dimensions (limits {MAX_TENSOR_NAME}, {MAX_DIMS})",
                t.name.len(),
                t.shape.len()
            ));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > 1 << 30 {
            return bad(format!("chunk_bytes {}", self.chunk_bytes));
        }
        let mut names = HashSet::new();
        for f in self
            .shards
            .iter()
            .map(|s| &s.file)
            .chain(self.files.iter().map(|f| &f.file))
        {
            if !safe_name(f) || f == HF_INDEX || f == LOCAL_MANIFEST {
                return bad(format!("file name {f:?} is not allowed"));
            }
            if !names.insert(f.as_str()) {
                return bad(format!("file {f:?} listed twice"));
            }
        }
        for s in &self.shards {
            if !s.file.ends_with(".safetensors") {
                return bad(format!("shard {:?} is not a .safetensors file", s.file));
            }
            if s.chunks.len() as u64 != s.size.div_ceil(self.chunk_bytes) {
                return bad(format!(
                    "shard {}: {} chunk hashes for {} bytes",
                    s.file,
                    s.chunks.len(),
                    s.size
                ));
            }
        }
        let mut tnames = HashSet::new();
        let mut ranges: Vec<(usize, u64, u64)> = Vec::new();
        for t in &self.tensors {
            if !tnames.insert(t.name.as_str()) {
                return bad(format!("tensor {:?} listed twice", t.name));
            }
            let Some(shard) = self.shards.get(t.shard) else {
                return bad(format!(
                    "tensor {}: shard {} does not exist",
                    t.name, t.shard
                ));
            };
            let Some(es) = dtype_size(&t.dtype) else {
                return bad(format!("tensor {}: unknown dtype {}", t.name, t.dtype));
            };
            let numel = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(es));
            if t.begin > t.end || t.end > shard.size || numel != Some(t.end - t.begin) {
                return bad(format!(
                    "tensor {}: bytes {}..{} do not fit shard {} ({} bytes) or its dtype and shape",
                    t.name, t.begin, t.end, shard.file, shard.size
                ));
            }
            ranges.push((t.shard, t.begin, t.end));
        }
        ranges.sort_unstable();
        if ranges
            .windows(2)
            .any(|p| p[0].0 == p[1].0 && p[1].1 < p[0].2)
        {
            return bad("two tensors overlap".into());
        }
        Ok(())
    }

    /// Bytes of every shard and small file.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum::<u64>()
            + self.files.iter().map(|f| f.size).sum::<u64>()
    }

    /// The HF index for these tensors (`weight_map`: tensor → file), deterministic. It lists
    /// the model's tensors only: transformers loads every file the map names and would report
    /// the momentum buffers as unexpected weights. `files` are the written files' (name,
    /// size); `total_size` counts the model's, not the momentum shards.
    pub(crate) fn hf_index<'a>(
        &self,
        tensors: &[&TensorEntry],
        files: impl Iterator<Item = (&'a str, u64)>,
    ) -> Vec<u8> {
        let sizes: u64 = files
            .filter(|(name, _)| !name.starts_with(packing::MOMENTUM_SHARD_PREFIX))
            .map(|(_, size)| size)
            .sum();
        let map: std::collections::BTreeMap<&str, &str> = tensors
            .iter()
            .filter(|t| !t.name.starts_with(crate::round::outer::MOMENTUM_PREFIX))
            .map(|t| (t.name.as_str(), self.shards[t.shard].file.as_str()))
            .collect();
        let v = serde_json::json!({"metadata": {"total_size": sizes, "format": "pt"}, "weight_map": map});
        let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// The pointer `LATEST` holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Latest {
    /// The checkpoint's step.
    pub step: u64,
    /// Its manifest's key.
    pub manifest: String,
}

#[cfg(test)]
mod tests;
