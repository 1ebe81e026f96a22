//! Building and signing envelopes, from memory or from files too large to hold.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{
    Compression, EnvelopeError, FORMAT_VERSION, Header, Kind, Limits, MAGIC, SectionEntry,
};
use crate::identity::Identity;

/// Where a section's stored bytes live until they are uploaded.
#[derive(Debug)]
pub enum SectionData {
    /// In memory.
    Bytes(Bytes),
    /// A file (a spill file for compressed data, or the input itself when stored as-is).
    File {
        /// The open file, read at offsets.
        file: std::fs::File,
        /// Bytes of it that belong to the section.
        len: u64,
    },
}

impl SectionData {
    /// Stored length.
    pub fn len(&self) -> u64 {
        match self {
            SectionData::Bytes(b) => b.len() as u64,
            SectionData::File { len, .. } => *len,
        }
    }

    /// Whether the section is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset` (positional, so parts can be read in parallel).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            SectionData::Bytes(b) => {
                let start = offset as usize;
                let src = b
                    .get(start..start + buf.len())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past end"))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            SectionData::File { file, .. } => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(buf, offset)
            }
        }
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `len` bytes from `input` as one zstd frame. The pledged size makes the output
/// depend only on the bytes and the level, whether they came from memory or a file.
fn zstd_into<W: Write>(mut input: impl Read, len: u64, level: i32, out: W) -> io::Result<W> {
    let mut enc = zstd::stream::write::Encoder::new(out, level)?;
    enc.set_pledged_src_size(Some(len))?;
    enc.include_contentsize(true)?;
    enc.include_checksum(false)?;
    let copied = io::copy(&mut input, &mut enc)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("input changed size while compressing ({copied} != {len})"),
        ));
    }
    enc.finish()
}

/// Collects sections and header fields, then signs.
#[derive(Debug)]
pub struct EnvelopeBuilder {
    kind: Kind,
    run: String,
    window: Option<u64>,
    step: Option<u64>,
    codec: String,
    codec_params: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
    clock_ms: Option<u64>,
    level: i32,
    sections: Vec<(SectionEntry, SectionData)>,
}

impl EnvelopeBuilder {
    /// A builder for an envelope of `kind` in `run`, with no sections yet.
    pub fn new(kind: Kind, run: &str) -> Self {
        EnvelopeBuilder {
            kind,
            run: run.to_string(),
            window: None,
            step: None,
            codec: "raw".to_string(),
            codec_params: BTreeMap::new(),
            meta: BTreeMap::new(),
            clock_ms: None,
            level: 3,
            sections: Vec::new(),
        }
    }

    /// Signs the object for window `w`.
    pub fn window(mut self, w: u64) -> Self {
        self.window = Some(w);
        self
    }

    /// Signs the object for checkpoint step `s`.
    pub fn step(mut self, s: u64) -> Self {
        self.step = Some(s);
        self
    }

    /// The payload codec and its parameters (recorded in the signed header).
    pub fn codec(mut self, name: &str, params: BTreeMap<String, String>) -> Self {
        self.codec = name.to_string();
        self.codec_params = params;
        self
    }

    /// The section table so far (hashes of the stored bytes): what a content hash is taken
    /// over before the header that names it is signed.
    pub fn section_entries(&self) -> impl Iterator<Item = &SectionEntry> {
        self.sections.iter().map(|(e, _)| e)
    }

    /// One entry of free signed metadata.
    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }

    /// Fixes the recorded signer clock (golden vectors, reproducible runs); default: now.
    pub fn clock_ms(mut self, ms: u64) -> Self {
        self.clock_ms = Some(ms);
        self
    }

    /// zstd level for sections added after this call.
    pub fn level(mut self, level: i32) -> Self {
        self.level = level;
        self
    }

    fn push(
        &mut self,
        name: &str,
        compression: Compression,
        raw_len: u64,
        hash: String,
        data: SectionData,
    ) {
        self.sections.push((
            SectionEntry {
                compression,
                hash,
                len: data.len(),
                name: name.to_string(),
                offset: 0,
                raw_len,
            },
            data,
        ));
    }

    /// Adds a section from memory.
    pub fn section(
        mut self,
        name: &str,
        raw: &[u8],
        compression: Compression,
    ) -> Result<Self, EnvelopeError> {
        let stored: Vec<u8> = match compression {
            Compression::None => raw.to_vec(),
            Compression::Zstd => zstd_into(raw, raw.len() as u64, self.level, Vec::new())
                .map_err(|e| EnvelopeError::Build(format!("compress section {name:?}: {e}")))?,
        };
        let hash = blake3::hash(&stored).to_hex().to_string();
        self.push(
            name,
            compression,
            raw.len() as u64,
            hash,
            SectionData::Bytes(stored.into()),
        );
        Ok(self)
    }

    /// Adds several sections from memory, compressing them in parallel (large aggregates).
    /// The bytes are the same as adding them one by one.
    pub fn sections(
        mut self,
        items: Vec<(String, Vec<u8>)>,
        compression: Compression,
    ) -> Result<Self, EnvelopeError> {
        use rayon::prelude::*;
        let level = self.level;
        let stored: Vec<(String, u64, Vec<u8>)> = items
            .into_par_iter()
            .map(|(name, raw)| {
                let stored = match compression {
                    Compression::None => raw.clone(),
                    Compression::Zstd => {
                        zstd_into(raw.as_slice(), raw.len() as u64, level, Vec::new()).map_err(
                            |e| EnvelopeError::Build(format!("compress section {name:?}: {e}")),
                        )?
                    }
                };
                Ok((name, raw.len() as u64, stored))
            })
            .collect::<Result<_, EnvelopeError>>()?;
        for (name, raw_len, data) in stored {
            let hash = blake3::hash(&data).to_hex().to_string();
            self.push(
                &name,
                compression,
                raw_len,
                hash,
                SectionData::Bytes(data.into()),
            );
        }
        Ok(self)
    }

    /// Adds a section from a file without holding it in memory: compressed sections spill to
    /// an anonymous temporary file in `spill_dir` (the system's by default).
    pub fn section_file(
        mut self,
        name: &str,
        path: &Path,
        compression: Compression,
        spill_dir: Option<&Path>,
    ) -> Result<Self, EnvelopeError> {
        let io_err = |source| EnvelopeError::Io {
            object: path.display().to_string(),
            source,
        };
        let input = std::fs::File::open(path).map_err(io_err)?;
        let raw_len = input.metadata().map_err(io_err)?.len();
        let (hash, data) = match compression {
            Compression::None => {
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(&input).map_err(io_err)?;
                (
                    hasher.finalize().to_hex().to_string(),
                    SectionData::File {
                        file: input,
                        len: raw_len,
                    },
                )
            }
            Compression::Zstd => {
                let spill = match spill_dir {
                    Some(d) => tempfile::tempfile_in(d),
                    None => tempfile::tempfile(),
                }
                .map_err(io_err)?;
                let out = HashingWriter {
                    inner: io::BufWriter::with_capacity(1 << 20, spill),
                    hasher: blake3::Hasher::new(),
                    len: 0,
                };
                let reader = io::BufReader::with_capacity(1 << 20, input);
                let out = zstd_into(reader, raw_len, self.level, out).map_err(io_err)?;
                let file = out.inner.into_inner().map_err(|e| io_err(e.into_error()))?;
                (
                    out.hasher.finalize().to_hex().to_string(),
                    SectionData::File { file, len: out.len },
                )
            }
        };
        self.push(name, compression, raw_len, hash, data);
        Ok(self)
    }

    /// Lays out the sections, writes the canonical header and signs prefix + header.
    pub fn sign(self, id: &Identity) -> Result<SignedEnvelope, EnvelopeError> {
        let mut offset = 0u64;
        let mut raw_len = 0u64;
        let mut entries = Vec::with_capacity(self.sections.len());
        let mut parts = Vec::with_capacity(self.sections.len());
        for (mut entry, data) in self.sections {
            entry.offset = offset;
            offset += entry.len;
            raw_len += entry.raw_len;
            entries.push(entry);
            parts.push(data);
        }
        let clock_ms = self.clock_ms.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
        let header = Header {
            body_len: offset,
            clock_ms,
            codec: self.codec,
            codec_params: self.codec_params,
            kind: self.kind.name().to_string(),
            meta: self.meta,
            raw_len,
            run: self.run,
            sections: entries,
            signer: id.peer_id().to_string(),
            step: self.step,
            window: self.window,
        };
        header
            .validate(self.kind, &Limits::default())
            .map_err(|r| EnvelopeError::Build(r.to_string()))?;
        let json = header.to_canonical();
        let header_len = u32::try_from(json.len())
            .map_err(|_| EnvelopeError::Build("header over 4 GiB".into()))?;
        let mut head = Vec::with_capacity(16 + json.len() + 64);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&self.kind.code().to_le_bytes());
        head.extend_from_slice(&header_len.to_le_bytes());
        head.extend_from_slice(&json);
        let sig = id.sign(&head);
        head.extend_from_slice(&sig);
        Ok(SignedEnvelope {
            head,
            parts,
            header,
        })
    }
}

/// A signed envelope ready to upload: the head (prefix, header, signature) and the sections'
/// stored bytes in body order.
#[derive(Debug)]
pub struct SignedEnvelope {
    /// Prefix, header and signature.
    pub head: Vec<u8>,
    /// The sections' stored bytes, in body order.
    pub parts: Vec<SectionData>,
    /// The header as signed.
    pub header: Header,
}

impl SignedEnvelope {
    /// Total object length.
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.parts.iter().map(SectionData::len).sum::<u64>()
    }

    /// Whether the envelope is empty (it never is: the head is always there).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole object in memory (only for objects known to be small).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes the whole object (head, then every section) to `w`.
    pub(crate) fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        w.write_all(&self.head)?;
        let mut buf = vec![0u8; 1 << 20];
        for part in &self.parts {
            match part {
                SectionData::Bytes(b) => w.write_all(b)?,
                SectionData::File { len, .. } => {
                    let mut off = 0;
                    while off < *len {
                        let n = (*len - off).min(buf.len() as u64) as usize;
                        part.read_at(off, &mut buf[..n])?;
                        w.write_all(&buf[..n])?;
                        off += n as u64;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the object at `offset`, crossing part boundaries.
    pub(crate) fn read_at(&self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
        let head_len = self.head.len() as u64;
        if offset < head_len {
            let n = ((head_len - offset) as usize).min(buf.len());
            buf[..n].copy_from_slice(&self.head[offset as usize..offset as usize + n]);
            buf = &mut buf[n..];
            offset += n as u64;
        }
        let mut part_start = head_len;
        for part in &self.parts {
            if buf.is_empty() {
                break;
            }
            let part_end = part_start + part.len();
            if offset < part_end {
                let n = ((part_end - offset) as usize).min(buf.len());
                part.read_at(offset - part_start, &mut buf[..n])?;
                buf = &mut buf[n..];
                offset += n as u64;
            }
            part_start = part_end;
        }
        if !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past envelope end",
            ));
        }
        Ok(())
    }
}

/// Signs arbitrary header bytes into an envelope, valid or not. Writers never need this;
/// it exists to build hostile test vectors that carry a *correct* signature, so a verifier's
/// later checks (section table, sizes, decompression) are exercised on their own.
pub fn assemble_raw(kind_code: u16, header: &[u8], body: &[u8], id: &Identity) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + header.len() + 64 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&kind_code.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    let sig = id.sign(&out);
    out.extend_from_slice(&sig);
    out.extend_from_slice(body);
    out
}

/// A signed envelope uploads straight from where its sections are (memory or spill files).
impl crate::store::PutSource for SignedEnvelope {
    fn len(&self) -> u64 {
        SignedEnvelope::len(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        SignedEnvelope::read_at(self, offset, buf)
    }
}
