//! The signed, sectioned container every shardrop object (but plain checkpoint shards) uses.
//!
//! Layout (normative text: `schemas/envelope.md`):
//!
//! ```text
//! [0..8)    magic "SHARDROP"
//! [8..10)   format version, u16 little-endian (1)
//! [10..12)  kind code, u16 little-endian
//! [12..16)  header length H, u32 little-endian
//! [16..16+H)        header: canonical JSON (see `header`)
//! [16+H..16+H+64)   ed25519 signature over bytes [0..16+H)
//! [16+H+64..)       body: the sections, back to back, in table order
//! ```
//!
//! Why this shape: a reader learns everything it needs to decide whether to trust an object
//! from one small ranged GET (prefix + header + signature), and each section carries its own
//! hash and sizes in the signed header, so a worker can fetch and verify one section alone.
//! The signature covers the run, the window or step, the kind and every section hash, so an
//! object copied under another key, window or run fails verification.
//!
//! Sign, store, then read back as a reader must: header first (verified against what the
//! reader expects), sections streamed and hashed.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use shardrop::format::envelope::{
//!     Compression, EnvelopeBuilder, Expect, Kind, Limits, RemoteEnvelope, read_all_sections,
//! };
//! use shardrop::identity::Identity;
//! use shardrop::store::{self, S3Options};
//!
//! let me = Identity::generate();
//! let signed = EnvelopeBuilder::new(Kind::Blob, "run1")
//!     .window(7)
//!     .section("hello.txt", b"hello", Compression::Zstd)?
//!     .sign(&me)?;
//! let target = store::open("memory://envelope-doc", &S3Options::default())?;
//! let path = target.path("runs/run1/blobs/x.blob");
//! store::put_create(&target, &path, &signed).await?;
//!
//! let expect = Expect { signer: Some(me.peer_id()), window: Some(7), ..Default::default() };
//! let limits = Limits::small_object();
//! let env = RemoteEnvelope::open(target.store.as_ref(), &path, "x.blob", &limits, &expect).await?;
//! let sections = read_all_sections(target.store.as_ref(), &env, &limits).await?;
//! assert_eq!(sections, vec![b"hello".to_vec()]);
//!
//! // Another window is refused with a stable reason.
//! let wrong = Expect { window: Some(8), ..Default::default() };
//! let e = RemoteEnvelope::open(target.store.as_ref(), &path, "x.blob", &limits, &wrong).await;
//! assert_eq!(e.unwrap_err().rejection().unwrap().reason.code(), "wrong_window");
//! # Ok(())
//! # }
//! ```

mod header;
mod read;
mod section;
mod write;

pub use header::{Compression, Header, SectionEntry, is_ident};
pub use read::{
    RemoteEnvelope, fetch_head, read_all_sections, read_sections, replaced, stream_section,
    verify_sections,
};
pub(crate) use read::{read_signed, read_whole_consistent};
pub use section::SectionVerifier;
pub use write::{EnvelopeBuilder, SectionData, SignedEnvelope, assemble_raw};

use crate::identity::PeerId;

/// The 8 bytes every envelope starts with.
pub const MAGIC: &[u8; 8] = b"SHARDROP";
/// The envelope format version this build reads and writes.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Bytes before the header: magic, version, kind, header length.
pub const PREFIX_LEN: usize = 16;
/// Bytes of the ed25519 signature that follows the header.
pub(crate) const SIG_LEN: usize = 64;
/// Largest integer a header may hold, so that every JSON reader (JavaScript included) reads
/// it exactly.
pub(crate) const MAX_SAFE_INT: u64 = (1 << 53) - 1;

/// What an object is for. The code sits in the unsigned-looking prefix *and* the name in the
/// signed header; they must agree, so the prefix cannot be edited to change the meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Generic signed files (`shardrop sign`).
    Blob,
    /// A run's participants, operator-signed.
    Registry,
    /// A miner's compressed update for one window.
    Grad,
    /// An aggregator's merged update for one window.
    Agg,
    /// A checkpoint manifest.
    Manifest,
    /// A validator's weights.
    Weights,
    /// A small mutable pointer such as `ckpt/LATEST`.
    Pointer,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 7] = [
        Kind::Blob,
        Kind::Registry,
        Kind::Grad,
        Kind::Agg,
        Kind::Manifest,
        Kind::Weights,
        Kind::Pointer,
    ];

    /// The u16 in the prefix (`envelope.md` §4).
    pub fn code(self) -> u16 {
        match self {
            Kind::Blob => 1,
            Kind::Registry => 2,
            Kind::Grad => 3,
            Kind::Agg => 4,
            Kind::Manifest => 5,
            Kind::Weights => 6,
            Kind::Pointer => 7,
        }
    }

    /// The inverse of [`Kind::code`]; `None` for a code this version does not know.
    pub(crate) fn from_code(code: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name in headers and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Registry => "registry",
            Kind::Grad => "grad",
            Kind::Agg => "agg",
            Kind::Manifest => "manifest",
            Kind::Weights => "weights",
            Kind::Pointer => "pointer",
        }
    }

    /// The inverse of [`Kind::name`].
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Configurable ceilings checked *before* anything is allocated or decompressed in proportion
/// to what an object claims. A peer controls what it uploads, not how much memory we spend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest header read (`over_limit` beyond).
    pub max_header_len: u32,
    /// Most sections.
    pub max_sections: usize,
    /// Largest stored body.
    pub max_body_len: u64,
    /// Largest decompressed section.
    pub max_section_raw_len: u64,
    /// Largest decompressed total.
    pub max_raw_len: u64,
    /// zstd frames may not ask for a window larger than 2^this bytes (decoder memory).
    pub max_zstd_window_log: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_len: 1 << 20,
            max_sections: 4096,
            max_body_len: 64 << 30,
            max_section_raw_len: 16 << 30,
            max_raw_len: 256 << 30,
            max_zstd_window_log: 23,
        }
    }
}

impl Limits {
    /// For small signed objects read whole into memory (registries, pointers, manifests,
    /// weights, split-merge check blobs): 64 MiB decompressed at most, whatever the header
    /// declares, so a hostile or broken one costs a bounded amount of memory.
    pub fn small_object() -> Self {
        Limits {
            max_body_len: 64 << 20,
            max_section_raw_len: 64 << 20,
            max_raw_len: 64 << 20,
            ..Limits::default()
        }
    }
}

crate::error::reason_codes! {
    /// Why an object was refused. The codes are stable: ledgers record them and scripts match on
    /// them.
    pub enum Reason {
        /// Fewer than 16 bytes, or the magic differs.
        NotEnvelope = "not_envelope",
        /// A format version this reader does not know.
        UnsupportedVersion = "unsupported_version",
        /// Not JSON, wrong types, unknown or missing keys, bad strings, unknown kind code.
        HeaderMalformed = "header_malformed",
        /// Valid content in a non-canonical encoding.
        HeaderNotCanonical = "header_not_canonical",
        /// The section table breaks its rules.
        SectionTable = "section_table",
        /// A size or count over the reader's limits.
        OverLimit = "over_limit",
        /// The signature does not verify under the header's signer.
        BadSignature = "bad_signature",
        /// Validly signed by a key the reader did not expect.
        UnexpectedSigner = "unexpected_signer",
        /// Signed for another run.
        WrongRun = "wrong_run",
        /// Signed for another window (a replay, or misplaced).
        WrongWindow = "wrong_window",
        /// Signed for another checkpoint step.
        WrongStep = "wrong_step",
        /// Another kind of object.
        WrongKind = "wrong_kind",
        /// Shorter than declared, or a section stops early.
        Truncated = "truncated",
        /// Longer than declared.
        TrailingBytes = "trailing_bytes",
        /// A section's stored bytes do not hash to the table's hash.
        SectionHashMismatch = "section_hash_mismatch",
        /// A section decodes to more or fewer bytes than declared.
        SectionSize = "section_size",
        /// A correctly hashed section is not a valid zstd stream.
        Decompress = "decompress",
    }
}

/// A refusal: the stable reason plus a human detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// The stable reason.
    pub reason: Reason,
    /// A human detail.
    pub detail: String,
}

impl Rejection {
    /// A rejection for `reason` with `detail`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

pub(crate) fn reject<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection::new(reason, detail))
}

/// Anything that can go wrong reading or writing an envelope, always naming the object.
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("{object}: rejected ({}): {}", .rejection.reason, .rejection.detail)]
    Rejected {
        object: String,
        rejection: Rejection,
    },
    #[error("{object}: not found")]
    NotFound { object: String },
    #[error("{object}: {source}")]
    Store {
        object: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{object}: {source}")]
    Io {
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build envelope: {0}")]
    Build(String),
    /// The object was replaced between the reads of one verification (a mutable object such
    /// as `LATEST` or the registry, mid-update). Not the object's fault: read it again.
    #[error("{object}: changed while it was being read (an update landed); read it again")]
    Changed { object: String },
}

impl crate::error::Classified for EnvelopeError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            EnvelopeError::Rejected { .. } => ErrorClass::Rejected,
            EnvelopeError::NotFound { .. } => ErrorClass::NotFound,
            EnvelopeError::Store { .. } | EnvelopeError::Io { .. } => ErrorClass::Store,
            EnvelopeError::Build(_) => ErrorClass::Caller,
            EnvelopeError::Changed { .. } => ErrorClass::Conflict,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        self.rejection().map(|r| r.reason.code())
    }

    fn object(&self) -> Option<&str> {
        match self {
            EnvelopeError::Rejected { object, .. }
            | EnvelopeError::NotFound { object }
            | EnvelopeError::Store { object, .. }
            | EnvelopeError::Io { object, .. }
            | EnvelopeError::Changed { object } => Some(object),
            EnvelopeError::Build(_) => None,
        }
    }
}

impl EnvelopeError {
    /// The rejection, when the object itself was at fault (as opposed to the store or disk).
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            EnvelopeError::Rejected { rejection, .. } => Some(rejection),
            _ => None,
        }
    }

    pub(crate) fn store(object: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => EnvelopeError::NotFound {
                object: object.to_string(),
            },
            object_store::Error::Precondition { .. } => EnvelopeError::Changed {
                object: object.to_string(),
            },
            source => EnvelopeError::Store {
                object: object.to_string(),
                source,
            },
        }
    }
}

/// What the reader requires of an object beyond a valid signature. Every field left `None`
/// is not checked; callers that act on an object set all that apply.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// The key that must have signed it (any valid signer when `None`).
    pub signer: Option<PeerId>,
    /// The run it must belong to.
    pub run: Option<String>,
    /// Its kind.
    pub kind: Option<Kind>,
    /// Its window.
    pub window: Option<u64>,
    /// Its checkpoint step.
    pub step: Option<u64>,
}

impl Expect {
    /// An object of `kind` that `signer` signed for window `window` of `run`: what every
    /// per-window object of the round is checked against.
    pub(crate) fn in_window(kind: Kind, signer: PeerId, run: &str, window: u64) -> Expect {
        Expect {
            signer: Some(signer),
            run: Some(run.to_string()),
            kind: Some(kind),
            window: Some(window),
            step: None,
        }
    }
}

/// Parsed prefix, header and signature: everything learned from the first ranged GET.
#[derive(Clone, Debug)]
pub struct Head {
    /// The format version (1).
    pub version: u16,
    /// The kind, from the prefix.
    pub kind: Kind,
    /// The parsed, canonical header.
    pub header: Header,
    /// Bytes `[0..16+H)`, exactly what the signature covers.
    pub signed: Vec<u8>,
    /// The Ed25519 signature over `signed`.
    pub signature: [u8; SIG_LEN],
}

/// Reads the 16-byte prefix: (version, kind code, header length). Checked before anything
/// proportional to the header length is allocated.
pub fn parse_prefix(bytes: &[u8], limits: &Limits) -> Result<(u16, Kind, u32), Rejection> {
    if bytes.len() < PREFIX_LEN || &bytes[..8] != MAGIC {
        return reject(
            Reason::NotEnvelope,
            "object does not start with the SHARDROP magic",
        );
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return reject(
            Reason::UnsupportedVersion,
            format!("format version {version}, this build reads {FORMAT_VERSION}"),
        );
    }
    let code = u16::from_le_bytes([bytes[10], bytes[11]]);
    let Some(kind) = Kind::from_code(code) else {
        return reject(Reason::HeaderMalformed, format!("unknown kind code {code}"));
    };
    let header_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if header_len > limits.max_header_len {
        return reject(
            Reason::OverLimit,
            format!(
                "header length {header_len} over the limit {}",
                limits.max_header_len
            ),
        );
    }
    Ok((version, kind, header_len))
}

impl Head {
    /// Parses prefix, header and signature from the first bytes of an object. `bytes` may be
    /// the whole object or only its beginning.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Head, Rejection> {
        let (version, kind, header_len) = parse_prefix(bytes, limits)?;
        let header_end = PREFIX_LEN + header_len as usize;
        if bytes.len() < header_end + SIG_LEN {
            return reject(
                Reason::Truncated,
                format!(
                    "object ends at byte {} inside the header or signature (needs {})",
                    bytes.len(),
                    header_end + SIG_LEN
                ),
            );
        }
        let header = Header::parse(kind, &bytes[PREFIX_LEN..header_end], limits)?;
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(&bytes[header_end..header_end + SIG_LEN]);
        Ok(Head {
            version,
            kind,
            header,
            signed: bytes[..header_end].to_vec(),
            signature,
        })
    }

    /// Offset of the first body byte within the object.
    pub fn body_start(&self) -> u64 {
        (self.signed.len() + SIG_LEN) as u64
    }

    /// Total object length the header declares.
    pub(crate) fn declared_len(&self) -> u64 {
        self.body_start() + self.header.body_len
    }

    /// The header's signer as a peer id (a malformed key is `header_malformed`).
    pub fn signer(&self) -> Result<PeerId, Rejection> {
        PeerId::parse(&self.header.signer)
            .map_err(|e| Rejection::new(Reason::HeaderMalformed, e.to_string()))
    }

    /// Checks the signature, then what the caller expects, then the object's real length.
    pub fn verify(&self, object_len: u64, expect: &Expect) -> Result<PeerId, Rejection> {
        let signer = self.signer()?;
        if !signer.verify(&self.signed, &self.signature) {
            return reject(
                Reason::BadSignature,
                format!("signature does not verify for signer {signer}"),
            );
        }
        if let Some(want) = &expect.signer
            && *want != signer
        {
            return reject(
                Reason::UnexpectedSigner,
                format!("signed by {signer}, expected {want}"),
            );
        }
        let h = &self.header;
        if let Some(run) = &expect.run
            && *run != h.run
        {
            return reject(
                Reason::WrongRun,
                format!("run {:?}, expected {run:?}", h.run),
            );
        }
        if let Some(kind) = expect.kind
            && kind != self.kind
        {
            return reject(
                Reason::WrongKind,
                format!("kind {}, expected {kind}", self.kind),
            );
        }
        if let Some(w) = expect.window
            && h.window != Some(w)
        {
            return reject(
                Reason::WrongWindow,
                format!("window {}, expected {w}", show_opt(h.window)),
            );
        }
        if let Some(s) = expect.step
            && h.step != Some(s)
        {
            return reject(
                Reason::WrongStep,
                format!("step {}, expected {s}", show_opt(h.step)),
            );
        }
        let declared = self.declared_len();
        if object_len < declared {
            return reject(
                Reason::Truncated,
                format!("object is {object_len} bytes, header declares {declared}"),
            );
        }
        if object_len > declared {
            return reject(
                Reason::TrailingBytes,
                format!("object is {object_len} bytes, header declares {declared}"),
            );
        }
        Ok(signer)
    }

    /// The section entry named `name`, if there is one.
    pub fn section(&self, name: &str) -> Option<&SectionEntry> {
        self.header.sections.iter().find(|s| s.name == name)
    }
}

fn show_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// A fully verified in-memory envelope with its decompressed sections.
#[derive(Clone, Debug)]
pub struct Opened {
    /// The verified head.
    pub head: Head,
    /// Who signed it.
    pub signer: PeerId,
    /// Every section, decompressed and verified, in body order.
    pub sections: Vec<(String, Vec<u8>)>,
}

impl Opened {
    /// The decompressed bytes of section `name`.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }
}

/// Verifies a whole envelope held in memory (small objects, tests, golden vectors).
pub fn open_bytes(bytes: &[u8], limits: &Limits, expect: &Expect) -> Result<Opened, Rejection> {
    let head = Head::parse(bytes, limits)?;
    let signer = head.verify(bytes.len() as u64, expect)?;
    let body = &bytes[head.body_start() as usize..];
    let mut sections = Vec::with_capacity(head.header.sections.len());
    for entry in &head.header.sections {
        let start = entry.offset as usize;
        let data = &body[start..start + entry.len as usize];
        let mut v = SectionVerifier::new(entry, limits, Vec::new());
        v.update(data);
        let out = v.finish().map_err(|e| match e {
            section::SectionError::Rejected(r) => r,
            section::SectionError::Io(e) => Rejection::new(Reason::Decompress, e.to_string()),
        })?;
        sections.push((entry.name.clone(), out));
    }
    Ok(Opened {
        head,
        signer,
        sections,
    })
}

#[cfg(test)]
mod tests;
