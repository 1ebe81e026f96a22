//! Incremental verification of one section: hash the stored bytes as they arrive and
//! decompress them into a sink that refuses to grow past the declared raw length.
//!
//! The hash is the verdict that matters: when decompression fails *and* the hash is wrong,
//! the object was tampered with and the reason is `section_hash_mismatch`; only a correctly
//! hashed but undecodable section is the signer's own `decompress` fault.

#![warn(missing_docs)]

use std::io::{self, Write};

use super::{Compression, Limits, Reason, Rejection, SectionEntry};

/// Why a section could not be delivered: the object's fault, or the local sink's.
#[derive(Debug)]
pub enum SectionError {
    Rejected(Rejection),
    Io(io::Error),
}

/// A writer that counts and stops at a ceiling, so a decompression bomb ends at the declared
/// size instead of filling memory or disk.
struct Capped<W> {
    inner: W,
    written: u64,
    cap: u64,
    overflowed: bool,
    sink_error: Option<io::Error>,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.cap {
            self.overflowed = true;
            return Err(io::Error::other(
                "section decompresses past its declared size",
            ));
        }
        match self.inner.write_all(buf) {
            Ok(()) => {
                self.written += buf.len() as u64;
                Ok(buf.len())
            }
            Err(e) => {
                let kind = e.kind();
                self.sink_error = Some(e);
                Err(io::Error::new(kind, "sink failed"))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Decode<W: Write> {
    Plain(Capped<W>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Capped<W>>>),
}

/// Feeds a section's stored bytes through hashing and decompression into `W`.
pub struct SectionVerifier<W: Write> {
    entry: SectionEntry,
    hasher: blake3::Hasher,
    received: u64,
    decode: Option<Decode<W>>,
    failure: Option<Rejection>,
    setup_error: Option<io::Error>,
}

impl<W: Write> SectionVerifier<W> {
    /// A verifier for `entry` that writes the decoded bytes into `sink`, within `limits`.
    pub fn new(entry: &SectionEntry, limits: &Limits, sink: W) -> Self {
        let capped = Capped {
            inner: sink,
            written: 0,
            cap: entry.raw_len,
            overflowed: false,
            sink_error: None,
        };
        let mut setup_error = None;
        let decode = match entry.compression {
            Compression::None => Some(Decode::Plain(capped)),
            Compression::Zstd => match zstd::stream::write::Decoder::new(capped) {
                Ok(mut d) => match d.window_log_max(limits.max_zstd_window_log) {
                    Ok(()) => Some(Decode::Zstd(Box::new(d))),
                    Err(e) => {
                        setup_error = Some(e);
                        None
                    }
                },
                Err(e) => {
                    setup_error = Some(e);
                    None
                }
            },
        };
        SectionVerifier {
            entry: entry.clone(),
            hasher: blake3::Hasher::new(),
            received: 0,
            decode,
            failure: None,
            setup_error,
        }
    }

    fn capped(&self) -> Option<&Capped<W>> {
        match self.decode.as_ref()? {
            Decode::Plain(c) => Some(c),
            Decode::Zstd(d) => Some(d.get_ref()),
        }
    }

    /// Consumes the next stored bytes, in order.
    pub fn update(&mut self, chunk: &[u8]) {
        self.received += chunk.len() as u64;
        self.hasher.update(chunk);
        if self.failure.is_some() || self.received > self.entry.len {
            return;
        }
        let result = match self.decode.as_mut() {
            Some(Decode::Plain(c)) => c.write_all(chunk),
            Some(Decode::Zstd(d)) => d.write_all(chunk),
            None => return,
        };
        if let Err(e) = result {
            self.failure = Some(self.classify(e));
        }
    }

    fn classify(&self, e: io::Error) -> Rejection {
        match self.capped() {
            Some(c) if c.overflowed => Rejection::new(
                Reason::SectionSize,
                format!(
                    "section {:?} decompresses beyond its declared raw_len {}",
                    self.entry.name, self.entry.raw_len
                ),
            ),
            _ => Rejection::new(
                Reason::Decompress,
                format!("section {:?}: {e}", self.entry.name),
            ),
        }
    }

    /// Ends the section: checks length, hash, decompression and raw size, and hands back the
    /// sink.
    pub fn finish(mut self) -> Result<W, SectionError> {
        let name = self.entry.name.clone();
        let rejected =
            |reason, detail: String| Err(SectionError::Rejected(Rejection::new(reason, detail)));
        if self.received < self.entry.len {
            return rejected(
                Reason::Truncated,
                format!(
                    "section {name:?}: got {} of {} bytes",
                    self.received, self.entry.len
                ),
            );
        }
        if self.received > self.entry.len {
            return rejected(
                Reason::SectionSize,
                format!(
                    "section {name:?}: got {} bytes, declared {}",
                    self.received, self.entry.len
                ),
            );
        }
        let hash = self.hasher.finalize().to_hex().to_string();
        if hash != self.entry.hash {
            return rejected(
                Reason::SectionHashMismatch,
                format!(
                    "section {name:?}: blake3 {hash}, header says {}",
                    self.entry.hash
                ),
            );
        }
        if let Some(e) = self.setup_error.take() {
            return Err(SectionError::Io(e));
        }
        if let Some(sink_error) = self.decode.as_mut().and_then(|d| match d {
            Decode::Plain(c) => c.sink_error.take(),
            Decode::Zstd(d) => d.get_mut().sink_error.take(),
        }) {
            return Err(SectionError::Io(sink_error));
        }
        if let Some(f) = self.failure.take() {
            return Err(SectionError::Rejected(f));
        }
        let capped = match self.decode.take() {
            Some(Decode::Plain(c)) => c,
            Some(Decode::Zstd(mut d)) => {
                // do_finish also refuses input that stops inside a frame.
                if let Err(e) = d.do_finish() {
                    if let Some(sink_error) = d.get_mut().sink_error.take() {
                        return Err(SectionError::Io(sink_error));
                    }
                    let r = match d.get_ref().overflowed {
                        true => Rejection::new(
                            Reason::SectionSize,
                            format!("section {name:?} decompresses beyond its declared raw_len"),
                        ),
                        false => {
                            Rejection::new(Reason::Decompress, format!("section {name:?}: {e}"))
                        }
                    };
                    return Err(SectionError::Rejected(r));
                }
                d.into_inner()
            }
            None => return rejected(Reason::Decompress, format!("section {name:?}: no decoder")),
        };
        if let Some(e) = capped.sink_error {
            return Err(SectionError::Io(e));
        }
        if capped.written != self.entry.raw_len {
            return rejected(
                Reason::SectionSize,
                format!(
                    "section {name:?} decompresses to {} bytes, declared raw_len {}",
                    capped.written, self.entry.raw_len
                ),
            );
        }
        Ok(capped.inner)
    }
}
