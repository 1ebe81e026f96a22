//! The gradient codec: error feedback, chunked top-k, quantized values, packed or
//! Elias–Fano indices (normative: `schemas/gradient.md`).
//!
//! A miner's update per tensor goes into an error-feedback buffer (`buf = beta·buf + update`);
//! each chunk of `chunk` elements sends its `k` largest magnitudes (ties to the lower index),
//! quantized; what the receiver will decode is subtracted from the buffer, so nothing is lost,
//! only delayed. The codec knows nothing of stores or signatures: it turns tensors into
//! section payloads (plain safetensors files) and back.
//!
//! ```
//! use shardrop::format::codec::{CodecLimits, CodecParams, EfState, EncodeOptions, accumulate_section,
//!     encode_update, Dense};
//! use safetensors::{Dtype, tensor::TensorView};
//!
//! // An update of one f32 tensor of 8192 values, as a training loop would write it.
//! let raw: Vec<u8> = (0..8192).flat_map(|i| ((i as f32 * 0.1).sin()).to_le_bytes()).collect();
//! let update = safetensors::serialize(
//!     [("w", TensorView::new(Dtype::F32, vec![8192], &raw)?)],
//!     None,
//! )?;
//! let mut state = EfState::default();
//! let opts = EncodeOptions { params: CodecParams::default(), ..EncodeOptions::default() };
//! let encoded = encode_update(&update, &mut state, &opts)?;
//! // C = 4096, k = 64: 128 of 8192 values kept; the rest stays in the error feedback.
//! assert_eq!(encoded.stats.kept, 128);
//! assert!(state.buffers["w"].iter().any(|&x| x != 0.0));
//!
//! // A reader decodes the sections, every index and value checked first.
//! let mut dense = Dense::new();
//! for (_, section) in &encoded.sections {
//!     accumulate_section(&mut dense, section, None, &CodecLimits::default(), 1.0)?;
//! }
//! assert_eq!(dense["w"].1.iter().filter(|&&x| x != 0.0).count(), 128);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bits;
mod cpu;
mod format;
#[cfg(feature = "cuda")]
pub mod gpu;
mod part;
mod quant;
mod state;
mod update;

pub(crate) use cpu::to_sparse_chunks;
pub use cpu::{
    NORM_BLOCK, accumulate, advance_state, encode_tensor, encode_tensor_from, sum_of_squares,
    to_sparse, validate,
};
pub use format::{SECTION_CODEC, read_section, section_raw_bound, write_section};
pub(crate) use format::{read_section_with_norms, section_name};
pub use part::{EncodedPart, PartTensor, SliceInput, assemble_parts, encode_part};
pub use quant::{ValueFormat, bf16_to_f32, f32_to_bf16, levels, quantize};
pub use state::{EfState, STATE_FILE, StateLock, lock_dir};
pub use update::{
    Dense, EncodeOptions, EncodedUpdate, OwnedShapeInput, Pending, UpdateStats, accumulate_section,
    advance_inputs, dense_from_safetensors, dense_to_safetensors, encode_inputs_scratch,
    encode_inputs_with, encode_update, encode_update_with, model_of,
};
pub(crate) use update::{dense_to_safetensors_with, inputs_of, model_of_inputs, section_ranges};

use serde::{Deserialize, Serialize};

/// How quantization scales are shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleMode {
    /// One bf16 scale per chunk.
    Chunk,
    /// One bf16 scale for the whole tensor.
    Tensor,
}

impl ScaleMode {
    /// The name in signed headers and metadata (the serde name; never `Debug`, so renaming
    /// a variant cannot silently change a signed format).
    pub fn name(self) -> &'static str {
        match self {
            ScaleMode::Chunk => "chunk",
            ScaleMode::Tensor => "tensor",
        }
    }

    /// The inverse of [`ScaleMode::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [ScaleMode::Chunk, ScaleMode::Tensor]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// How the sorted indices of a chunk are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexEncoding {
    /// log2(chunk) bits each.
    Packed,
    /// Elias–Fano: about 2 + log2(chunk/k) bits each.
    Compact,
}

impl IndexEncoding {
    /// The name in signed headers and metadata (the serde name; never `Debug`).
    pub fn name(self) -> &'static str {
        match self {
            IndexEncoding::Packed => "packed",
            IndexEncoding::Compact => "compact",
        }
    }

    /// The inverse of [`IndexEncoding::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [IndexEncoding::Packed, IndexEncoding::Compact]
            .into_iter()
            .find(|m| m.name() == s)
    }
}

/// Parameters of one encoded tensor (the run fixes them; every tensor records them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecParams {
    /// Chunk length C over the flattened tensor (a power of two, 64..=65536).
    pub chunk: u32,
    /// Values kept per chunk (1..=C).
    pub k: u32,
    /// How kept values are stored.
    pub values: ValueFormat,
    /// How scales are shared.
    pub scales: ScaleMode,
    /// How indices are packed.
    pub indices: IndexEncoding,
}

impl Default for CodecParams {
    /// Templar's operating point: C = 4096, k = 64 (1.56 %), 2-bit values.
    fn default() -> Self {
        CodecParams {
            chunk: 4096,
            k: 64,
            values: ValueFormat::Int2,
            scales: ScaleMode::Chunk,
            indices: IndexEncoding::Compact,
        }
    }
}

impl CodecParams {
    /// Refuses parameters no decoder accepts (`codec_params`, `k_over_chunk`).
    pub fn validate(&self) -> Result<(), CodecError> {
        if !self.chunk.is_power_of_two() || !(64..=65536).contains(&self.chunk) {
            return Err(CodecError::Params(format!(
                "chunk {} must be a power of two in 64..=65536",
                self.chunk
            )));
        }
        if self.k == 0 {
            return Err(CodecError::Params("k must be at least 1".into()));
        }
        if self.k > self.chunk {
            return Err(CodecError::KOverChunk {
                k: self.k,
                chunk: self.chunk,
            });
        }
        Ok(())
    }

    /// k for a density (fraction of each chunk kept), at least 1.
    pub fn k_for_density(chunk: u32, density: f64) -> u32 {
        ((density * chunk as f64).round() as u32).clamp(1, chunk)
    }
}

/// Element types an update may come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16, widened exactly.
    Bf16,
    /// IEEE half precision, widened exactly.
    F16,
}

impl InDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            InDtype::F32 => 4,
            InDtype::Bf16 | InDtype::F16 => 2,
        }
    }

    /// The input dtype of a safetensors dtype; `None` for those the codec does not take.
    pub(crate) fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(InDtype::F32),
            safetensors::Dtype::BF16 => Some(InDtype::Bf16),
            safetensors::Dtype::F16 => Some(InDtype::F16),
            _ => None,
        }
    }

    /// The name in section metadata.
    pub fn name(self) -> &'static str {
        match self {
            InDtype::F32 => "f32",
            InDtype::Bf16 => "bf16",
            InDtype::F16 => "f16",
        }
    }
}

/// One tensor of a miner's update: raw little-endian bytes as a safetensors file holds them.
#[derive(Clone, Copy, Debug)]
pub struct TensorInput<'a> {
    /// The tensor's name in the model.
    pub name: &'a str,
    /// Its shape.
    pub shape: &'a [u64],
    /// The dtype of `data`.
    pub dtype: InDtype,
    /// The update's elements, little-endian, row-major.
    pub data: &'a [u8],
}

/// One tensor in compressed form: what a section holds for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTensor {
    /// The tensor's name in the model.
    pub name: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The dtype the update came in.
    pub dtype: InDtype,
    /// The codec it was encoded with.
    pub params: CodecParams,
    /// Index blocks of all chunks, back to back.
    pub idx: Vec<u8>,
    /// Value blocks of all chunks, back to back (bf16 values little-endian).
    pub val: Vec<u8>,
    /// bf16 bit patterns: one per chunk, or one per tensor (empty for bf16 values).
    pub scales: Vec<u16>,
}

impl EncodedTensor {
    /// Elements of the tensor.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Elements sent.
    pub fn kept(&self) -> u64 {
        ChunkLayout::new(self.numel(), &self.params).kept()
    }

    /// Payload bytes (indices + values + scales), without container overhead.
    pub fn payload_bytes(&self) -> u64 {
        (self.idx.len() + self.val.len() + 2 * self.scales.len()) as u64
    }
}

/// Block sizes and offsets of one tensor: every chunk's blocks start at computable offsets,
/// which lets chunks be encoded and decoded independently and in parallel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    /// Elements of the tensor.
    pub n: u64,
    /// Chunk length.
    pub chunk: u32,
    /// Chunks, the last possibly short.
    pub n_chunks: usize,
    /// Length of the last chunk.
    pub last_len: u32,
    /// Values kept in a full chunk.
    pub k_full: u32,
    /// Values kept in the last chunk.
    pub k_last: u32,
    /// Index block bytes of a full chunk (the stride between chunks).
    pub idx_full: usize,
    /// Index block bytes of the last chunk.
    pub idx_last: usize,
    /// Value block bytes of a full chunk.
    pub val_full: usize,
    /// Value block bytes of the last chunk.
    pub val_last: usize,
    /// Scales stored (per chunk, one, or none for bf16 values).
    pub n_scales: usize,
}

impl ChunkLayout {
    /// The layout of a tensor of `n` elements under `p`.
    pub fn new(n: u64, p: &CodecParams) -> ChunkLayout {
        let c = p.chunk as u64;
        let n_chunks = n.div_ceil(c) as usize;
        let last_len = if n_chunks == 0 {
            0
        } else {
            (n - (n_chunks as u64 - 1) * c) as u32
        };
        let k_full = p.k.min(p.chunk);
        let k_last = p.k.min(last_len);
        let compact = p.indices == IndexEncoding::Compact;
        let log2 = p.chunk.ilog2();
        let vb = |k: u32| (k as usize * p.values.bits() as usize).div_ceil(8);
        ChunkLayout {
            n,
            chunk: p.chunk,
            n_chunks,
            last_len,
            k_full,
            k_last,
            idx_full: bits::index_block_bytes(compact, k_full, p.chunk, log2),
            idx_last: bits::index_block_bytes(compact, k_last, last_len.max(1), log2),
            val_full: vb(k_full),
            val_last: vb(k_last),
            n_scales: match (p.values.scaled(), p.scales) {
                (false, _) => 0,
                (true, ScaleMode::Chunk) => n_chunks,
                (true, ScaleMode::Tensor) => usize::from(n_chunks > 0),
            },
        }
    }

    fn total(&self, full: usize, last: usize) -> usize {
        if self.n_chunks == 0 {
            0
        } else {
            (self.n_chunks - 1) * full + last
        }
    }

    /// All index bytes of the tensor.
    pub(crate) fn idx_len(&self) -> usize {
        self.total(self.idx_full, self.idx_last)
    }

    /// All value bytes of the tensor.
    pub(crate) fn val_len(&self) -> usize {
        self.total(self.val_full, self.val_last)
    }

    /// Values kept in the whole tensor.
    pub fn kept(&self) -> u64 {
        self.total(self.k_full as usize, self.k_last as usize) as u64
    }

    /// Length of chunk `c`.
    pub(crate) fn chunk_len(&self, c: usize) -> u32 {
        if c + 1 == self.n_chunks {
            self.last_len
        } else {
            self.chunk
        }
    }

    /// Values kept in chunk `c`.
    pub(crate) fn k_of(&self, c: usize) -> u32 {
        if c + 1 == self.n_chunks {
            self.k_last
        } else {
            self.k_full
        }
    }
}

/// Ceilings a decoder enforces before allocating for what a section claims.
#[derive(Clone, Debug)]
pub struct CodecLimits {
    /// Most tensors in one section.
    pub max_tensors: usize,
    /// Most elements in one tensor.
    pub max_elements: u64,
    /// Elements a dense decode (`accumulate_section`) may allocate in all, checked before
    /// each new tensor is allocated: a section's declared shapes cost 4 bytes per element.
    pub max_dense_elements: u64,
}

impl Default for CodecLimits {
    fn default() -> Self {
        CodecLimits {
            max_tensors: 100_000,
            max_elements: 1 << 36,
            max_dense_elements: 1 << 36,
        }
    }
}

/// The model a run trains: decoders refuse tensors it does not have, or of another shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The tensors, in name order.
    pub tensors: Vec<TensorSpec>,
}

/// One tensor of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The dtype miners train it in.
    pub dtype: InDtype,
}

impl ModelSpec {
    /// The tensor named `name`, if the model has it.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Why an update could not be encoded or a section was refused. `reason()` codes are stable
/// and go into ledgers.
// Each variant's fields are the parts of its message (`#[error]`), and its reason code
// (`CodecError::reason`) is in `gradient.md`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("bad codec parameters: {0}")]
    Params(String),
    #[error("k {k} is larger than the chunk size {chunk}")]
    KOverChunk { k: u32, chunk: u32 },
    #[error("tensor {tensor:?}: index {index} out of range in chunk {chunk}")]
    IndexOutOfRange {
        tensor: String,
        chunk: usize,
        index: u32,
    },
    #[error("tensor {tensor:?}: indices not strictly increasing in chunk {chunk} (at {index})")]
    IndicesNotIncreasing {
        tensor: String,
        chunk: usize,
        index: u32,
    },
    #[error("tensor {tensor:?}: malformed index block in chunk {chunk}")]
    IndexMalformed { tensor: String, chunk: usize },
    #[error("tensor {tensor:?}: {what} is NaN or infinite")]
    NonFinite { tensor: String, what: String },
    #[error("tensor {tensor:?} is not in the run's model")]
    UnknownTensor { tensor: String },
    #[error("tensor {tensor:?}: shape {got:?}, the model says {want:?}")]
    ShapeMismatch {
        tensor: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error("over limit: {0}")]
    OverLimit(String),
    #[error("tensor {tensor:?}: {what} is {got} bytes, expected {want}")]
    SizeMismatch {
        tensor: String,
        what: String,
        got: usize,
        want: usize,
    },
    #[error("malformed section: {0}")]
    Malformed(String),
    #[error("tensor {tensor:?}: {detail}")]
    SliceMisaligned { tensor: String, detail: String },
    #[error("parts of a sharded update: {0}")]
    Parts(String),
}

impl crate::error::Classified for CodecError {
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            CodecError::Params(_)
            | CodecError::KOverChunk { .. }
            | CodecError::SliceMisaligned { .. }
            | CodecError::Parts(_) => crate::error::ErrorClass::Caller,
            _ => crate::error::ErrorClass::Rejected,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        Some(CodecError::reason(self))
    }
}

crate::error::reason_codes! {
    /// The codec's reason codes (`gradient.md` §4 "Refusals"): a decoder's verdicts on a
    /// section, and an encoder's refusals of its input (the last two).
    pub enum CodecReason {
        /// Chunk not a power of two in range, or k = 0.
        Params = "codec_params",
        /// k > C.
        KOverChunk = "k_over_chunk",
        /// An array is not exactly the length the layout gives.
        SizeMismatch = "size_mismatch",
        /// An index ≥ its chunk's length.
        IndexOutOfRange = "index_out_of_range",
        /// Indices in a chunk not strictly increasing.
        IndicesNotIncreasing = "indices_not_increasing",
        /// An Elias–Fano block without exactly k_c elements.
        IndexMalformed = "index_malformed",
        /// A NaN, infinite or negative scale, or a NaN or infinite value.
        NonFinite = "non_finite",
        /// A tensor not in the run's model.
        UnknownTensor = "unknown_tensor",
        /// A tensor with another shape than the model's.
        ShapeMismatch = "shape_mismatch",
        /// More tensors or elements than the decoder's limits.
        OverLimit = "over_limit",
        /// Not safetensors, missing or extra arrays, wrong dtypes, bad metadata.
        Malformed = "section_malformed",
        /// Encoder: a rank's slice does not start on a chunk boundary.
        SliceMisaligned = "slice_misaligned",
        /// Encoder: the parts of a sharded update do not fit together.
        PartsMismatch = "parts_mismatch",
    }
}

impl CodecError {
    /// The stable reason code recorded in ledgers (`gradient.md` §4).
    pub fn code(&self) -> CodecReason {
        match self {
            CodecError::Params(_) => CodecReason::Params,
            CodecError::KOverChunk { .. } => CodecReason::KOverChunk,
            CodecError::IndexOutOfRange { .. } => CodecReason::IndexOutOfRange,
            CodecError::IndicesNotIncreasing { .. } => CodecReason::IndicesNotIncreasing,
            CodecError::IndexMalformed { .. } => CodecReason::IndexMalformed,
            CodecError::NonFinite { .. } => CodecReason::NonFinite,
            CodecError::UnknownTensor { .. } => CodecReason::UnknownTensor,
            CodecError::ShapeMismatch { .. } => CodecReason::ShapeMismatch,
            CodecError::OverLimit(_) => CodecReason::OverLimit,
            CodecError::SizeMismatch { .. } => CodecReason::SizeMismatch,
            CodecError::Malformed(_) => CodecReason::Malformed,
            CodecError::SliceMisaligned { .. } => CodecReason::SliceMisaligned,
            CodecError::Parts(_) => CodecReason::PartsMismatch,
        }
    }

    /// [`Self::code`] as its text.
    pub fn reason(&self) -> &'static str {
        self.code().code()
    }
}

#[cfg(test)]
mod tests;
