//! The signed header: canonical JSON with a fixed schema.
//!
//! Canonical means one byte string per header: keys in lexicographic order, no whitespace,
//! integers in plain decimal (0..=2^53-1), and strings drawn from printable ASCII without `"`
//! or `\`, so no escaping ever occurs. The parser re-encodes what it read and refuses anything
//! that differs, so a verifier in another language needs no JSON canonicaliser: the signature
//! covers the exact bytes, and canonical form only rules out a second encoding of one header.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{Kind, Limits, MAX_SAFE_INT, Reason, Rejection, reject};

/// How a section's bytes are stored in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// A zstd stream (one or more frames).
    Zstd,
}

/// One row of the section table. Fields are declared in key order: serde writes them so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionEntry {
    /// How the stored bytes are encoded.
    pub compression: Compression,
    /// blake3 of the stored (possibly compressed) bytes, lowercase hex: checkable before
    /// decompressing anything.
    pub hash: String,
    /// Stored length in the body.
    pub len: u64,
    /// Unique within the envelope; a safe file name.
    pub name: String,
    /// Offset from the start of the body.
    pub offset: u64,
    /// Length after decompression.
    pub raw_len: u64,
}

/// The header. Fields are declared in key order so that serde's output is canonical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Total stored length of all sections.
    pub body_len: u64,
    /// The signer's clock in milliseconds since the Unix epoch: recorded, never trusted.
    pub clock_ms: u64,
    /// Payload codec (e.g. `raw`, `topk-v1`) and its parameters.
    pub codec: String,
    /// Codec parameters (a shard's chunk, k, values, scales, indices).
    pub codec_params: BTreeMap<String, String>,
    /// The kind's name; must equal the prefix's kind code.
    pub kind: String,
    /// Free signed metadata (≤ 256 entries).
    pub meta: BTreeMap<String, String>,
    /// Sum of the sections' decompressed lengths.
    pub raw_len: u64,
    /// The run id.
    pub run: String,
    /// The section table, in body order.
    pub sections: Vec<SectionEntry>,
    /// The signer's public key, 64 lowercase hex (its peer id).
    pub signer: String,
    /// Checkpoint step (manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Training window (shards, aggregates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Identifiers (run, codec, section names, map keys): `[A-Za-z0-9._-]`, 1..=128 bytes, not
/// starting with `.`, so a section name is always a safe file name.
pub fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Free-text values: printable ASCII without `"` and `\`, at most 1024 bytes.
pub(super) fn is_text(s: &str) -> bool {
    s.len() <= 1024
        && s.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

const MAX_MAP_ENTRIES: usize = 256;

impl Header {
    /// The canonical bytes of this header.
    pub fn to_canonical(&self) -> Vec<u8> {
        // Serialising a struct of strings, integers and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates header bytes; `kind` is the prefix's kind, which must agree.
    pub fn parse(kind: Kind, bytes: &[u8], limits: &Limits) -> Result<Header, Rejection> {
        let header: Header = serde_json::from_slice(bytes)
            .map_err(|e| Rejection::new(Reason::HeaderMalformed, format!("header JSON: {e}")))?;
        if header.to_canonical() != bytes {
            return reject(
                Reason::HeaderNotCanonical,
                "header bytes are not the canonical encoding of their content",
            );
        }
        header.validate(kind, limits)?;
        Ok(header)
    }

    /// Every rule but canonical form: used by the parser and by the writer before signing.
    pub fn validate(&self, kind: Kind, limits: &Limits) -> Result<(), Rejection> {
        let malformed = |d: String| Rejection::new(Reason::HeaderMalformed, d);
        if self.kind != kind.name() {
            return Err(malformed(format!(
                "header kind {:?} differs from prefix kind {}",
                self.kind, kind
            )));
        }
        if !is_ident(&self.run) {
            return Err(malformed(format!(
                "run id {:?} is not an identifier",
                self.run
            )));
        }
        if !is_ident(&self.codec) {
            return Err(malformed(format!(
                "codec {:?} is not an identifier",
                self.codec
            )));
        }
        if !is_hex64(&self.signer) {
            return Err(malformed(
                "signer is not 64 lowercase hex characters".into(),
            ));
        }
        for (what, map) in [("codec_params", &self.codec_params), ("meta", &self.meta)] {
            if map.len() > MAX_MAP_ENTRIES {
                return reject(
                    Reason::OverLimit,
                    format!("{what} has {} entries (limit {MAX_MAP_ENTRIES})", map.len()),
                );
            }
            for (k, v) in map {
                if !is_ident(k) || !is_text(v) {
                    return Err(malformed(format!(
                        "{what} entry {k:?} has a bad key or value"
                    )));
                }
            }
        }
        for (what, v) in [
            ("clock_ms", Some(self.clock_ms)),
            ("body_len", Some(self.body_len)),
            ("raw_len", Some(self.raw_len)),
            ("window", self.window),
            ("step", self.step),
        ] {
            if v.is_some_and(|v| v > MAX_SAFE_INT) {
                return Err(malformed(format!("{what} is over 2^53-1")));
            }
        }
        if self.body_len > limits.max_body_len {
            return reject(
                Reason::OverLimit,
                format!(
                    "body_len {} over the limit {}",
                    self.body_len, limits.max_body_len
                ),
            );
        }
        if self.raw_len > limits.max_raw_len {
            return reject(
                Reason::OverLimit,
                format!(
                    "raw_len {} over the limit {}",
                    self.raw_len, limits.max_raw_len
                ),
            );
        }
        self.validate_sections(limits)
    }

    fn validate_sections(&self, limits: &Limits) -> Result<(), Rejection> {
        let table = |d: String| Rejection::new(Reason::SectionTable, d);
        if self.sections.len() > limits.max_sections {
            return reject(
                Reason::OverLimit,
                format!(
                    "{} sections (limit {})",
                    self.sections.len(),
                    limits.max_sections
                ),
            );
        }
        let mut names = HashSet::with_capacity(self.sections.len());
        let mut next_offset: u64 = 0;
        let mut raw_total: u64 = 0;
        for (i, s) in self.sections.iter().enumerate() {
            if !is_ident(&s.name) {
                return Err(table(format!("section {i} has a bad name {:?}", s.name)));
            }
            if !names.insert(s.name.as_str()) {
                return Err(table(format!("section name {:?} appears twice", s.name)));
            }
            if !is_hex64(&s.hash) {
                return Err(table(format!("section {:?} hash is not 64 hex", s.name)));
            }
            if s.offset != next_offset {
                return Err(table(format!(
                    "section {:?} starts at {}, expected {next_offset} (sections must be \
                     contiguous, in table order, without gaps or overlaps)",
                    s.name, s.offset
                )));
            }
            if s.raw_len > limits.max_section_raw_len {
                return reject(
                    Reason::OverLimit,
                    format!(
                        "section {:?} raw_len {} over the limit {}",
                        s.name, s.raw_len, limits.max_section_raw_len
                    ),
                );
            }
            if s.compression == Compression::None && s.len != s.raw_len {
                return Err(table(format!(
                    "uncompressed section {:?} has len {} != raw_len {}",
                    s.name, s.len, s.raw_len
                )));
            }
            next_offset = next_offset
                .checked_add(s.len)
                .filter(|&o| o <= self.body_len)
                .ok_or_else(|| {
                    table(format!(
                        "section {:?} runs past the end of the body",
                        s.name
                    ))
                })?;
            raw_total = raw_total
                .checked_add(s.raw_len)
                .ok_or_else(|| table("raw lengths overflow".into()))?;
        }
        if next_offset != self.body_len {
            return Err(table(format!(
                "sections cover {next_offset} bytes, body_len is {}",
                self.body_len
            )));
        }
        if raw_total != self.raw_len {
            return Err(table(format!(
                "section raw lengths sum to {raw_total}, raw_len is {}",
                self.raw_len
            )));
        }
        Ok(())
    }
}
