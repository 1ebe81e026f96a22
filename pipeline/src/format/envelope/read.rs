//! Reading envelopes from a store: the head with one small ranged GET, then sections streamed
//! through hashing and decompression, never buffered whole.

#![warn(missing_docs)]

use std::io::{self, Write};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt};

use super::section::SectionError;
use super::{
    EnvelopeError, Expect, Head, Limits, PREFIX_LEN, SIG_LEN, SectionEntry, SectionVerifier,
};
use crate::identity::PeerId;

/// The first GET asks for this much: enough for the head of nearly every object.
const FIRST_READ: u64 = 64 << 10;

/// Fetches the object's beginning (prefix, header, signature, as far as the object has them)
/// with at most two ranged GETs, never more than the header limit allows.
pub async fn fetch_head(
    store: &dyn ObjectStore,
    path: &Path,
    object: &str,
    limits: &Limits,
) -> Result<(ObjectMeta, Bytes), EnvelopeError> {
    let opts = GetOptions::new().with_range(Some(GetRange::Bounded(0..FIRST_READ)));
    let first = match store.get_opts(path, opts).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(EnvelopeError::NotFound {
                object: object.to_string(),
            });
        }
        Err(e) => {
            // An empty object has no byte 0 to range over; anything else is the store's own
            // error (a 403, a timeout), passed on as it came so an operator sees the cause.
            return match store.head(path).await {
                Ok(meta) if meta.size == 0 => Ok((meta, Bytes::new())),
                _ => Err(EnvelopeError::store(object, e)),
            };
        }
    };
    let meta = first.meta.clone();
    let bytes = first
        .bytes()
        .await
        .map_err(|e| EnvelopeError::store(object, e))?;
    if bytes.len() < PREFIX_LEN {
        return Ok((meta, bytes));
    }
    let header_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if header_len > limits.max_header_len {
        return Ok((meta, bytes));
    }
    let need = (PREFIX_LEN + header_len as usize + SIG_LEN) as u64;
    let have = bytes.len() as u64;
    if need <= have || have >= meta.size {
        return Ok((meta, bytes));
    }
    let mut opts = GetOptions::new().with_range(Some(GetRange::Bounded(have..need.min(meta.size))));
    opts.if_match = meta.e_tag.clone();
    let rest = store
        .get_opts(path, opts)
        .await
        .map_err(|e| EnvelopeError::store(object, e))?
        .bytes()
        .await
        .map_err(|e| EnvelopeError::store(object, e))?;
    let mut all = BytesMut::with_capacity(need as usize);
    all.extend_from_slice(&bytes);
    all.extend_from_slice(&rest);
    Ok((meta, all.freeze()))
}

/// An envelope whose head has been fetched and verified; sections are read on demand.
#[derive(Clone, Debug)]
pub struct RemoteEnvelope {
    /// How the object is named in messages (its URL).
    pub object: String,
    /// Where the object is in its store.
    pub path: Path,
    /// The store's metadata from the header read (size, `last_modified`, ETag): the size is checked against the header's declared length, the ETag pins later section reads.
    pub meta: ObjectMeta,
    /// The parsed, verified prefix and header.
    pub head: Head,
    /// The key that signed it (already checked against the reader's expectation).
    pub signer: PeerId,
}

impl RemoteEnvelope {
    /// Fetches and verifies the head: signature, expectations and the object's real size.
    /// No section byte is read.
    pub async fn open(
        store: &dyn ObjectStore,
        path: &Path,
        object: &str,
        limits: &Limits,
        expect: &Expect,
    ) -> Result<RemoteEnvelope, EnvelopeError> {
        let (meta, bytes) = fetch_head(store, path, object, limits).await?;
        let rejected = |rejection| EnvelopeError::Rejected {
            object: object.to_string(),
            rejection,
        };
        let head = Head::parse(&bytes, limits).map_err(rejected)?;
        let signer = head.verify(meta.size, expect).map_err(rejected)?;
        Ok(RemoteEnvelope {
            object: object.to_string(),
            path: path.clone(),
            meta,
            head,
            signer,
        })
    }

    /// The section table, in body order.
    pub fn sections(&self) -> &[SectionEntry] {
        &self.head.header.sections
    }
}

fn section_error(object: &str, e: SectionError) -> EnvelopeError {
    match e {
        SectionError::Rejected(rejection) => EnvelopeError::Rejected {
            object: object.to_string(),
            rejection,
        },
        SectionError::Io(source) => EnvelopeError::Io {
            object: object.to_string(),
            source,
        },
    }
}

/// Streams the chosen sections (indices into the table, ascending) into sinks made by
/// `open_sink`, verifying each. Adjacent sections share one ranged GET; memory use is one
/// network chunk plus the decoder's window, whatever the section sizes.
pub async fn read_sections<W: Write>(
    store: &dyn ObjectStore,
    env: &RemoteEnvelope,
    selected: &[usize],
    limits: &Limits,
    mut open_sink: impl FnMut(&SectionEntry) -> io::Result<W>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<W>, EnvelopeError> {
    let table = env.sections();
    let object = env.object.as_str();
    let body_start = env.head.body_start();
    let mut out = Vec::with_capacity(selected.len());
    let mut i = 0;
    while i < selected.len() {
        // Group a run of consecutive section indices into one GET.
        let mut j = i + 1;
        while j < selected.len() && selected[j] == selected[j - 1] + 1 {
            j += 1;
        }
        let run: Vec<&SectionEntry> = selected[i..j]
            .iter()
            .filter_map(|&k| table.get(k))
            .collect();
        let start = run.first().map_or(0, |e| e.offset);
        let end = run.last().map_or(0, |e| e.offset + e.len);
        let mut idx = 0;
        let mut verifier = match run.first() {
            Some(e) => Some(SectionVerifier::new(
                e,
                limits,
                open_sink(e).map_err(io_err(object))?,
            )),
            None => None,
        };
        let mut left = run.first().map_or(0, |e| e.len);
        if end > start {
            let range = body_start + start..body_start + end;
            // The same version as the verified head, or nothing: an object replaced between
            // the two GETs (LATEST, the registry) must read as `Changed`, never as tampered.
            let mut opts = GetOptions::new().with_range(Some(GetRange::Bounded(range)));
            opts.if_match = env.meta.e_tag.clone();
            let got = store
                .get_opts(&env.path, opts)
                .await
                .map_err(|e| EnvelopeError::store(object, e))?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| EnvelopeError::store(object, e))?;
                progress(chunk.len() as u64);
                let mut rest: &[u8] = &chunk;
                while !rest.is_empty() {
                    // Finish sections that end exactly here (empty ones included).
                    while left == 0 && idx + 1 < run.len() {
                        if let Some(v) = verifier.take() {
                            out.push(v.finish().map_err(|e| section_error(object, e))?);
                        }
                        idx += 1;
                        verifier = Some(SectionVerifier::new(
                            run[idx],
                            limits,
                            open_sink(run[idx]).map_err(io_err(object))?,
                        ));
                        left = run[idx].len;
                    }
                    let n = (left as usize).min(rest.len());
                    if n == 0 {
                        // More bytes than the range asked for: feed the last section, which
                        // will refuse them as a size error.
                        if let Some(v) = verifier.as_mut() {
                            v.update(rest);
                        }
                        break;
                    }
                    if let Some(v) = verifier.as_mut() {
                        v.update(&rest[..n]);
                    }
                    left -= n as u64;
                    rest = &rest[n..];
                }
            }
        }
        // Finish the current section and any (empty or missing) ones after it.
        loop {
            if let Some(v) = verifier.take() {
                out.push(v.finish().map_err(|e| section_error(object, e))?);
            }
            idx += 1;
            if idx >= run.len() {
                break;
            }
            verifier = Some(SectionVerifier::new(
                run[idx],
                limits,
                open_sink(run[idx]).map_err(io_err(object))?,
            ));
        }
        i = j;
    }
    Ok(out)
}

fn io_err(object: &str) -> impl Fn(io::Error) -> EnvelopeError + '_ {
    move |source| EnvelopeError::Io {
        object: object.to_string(),
        source,
    }
}

/// Reads one section by name into `sink`.
pub async fn stream_section<W: Write>(
    store: &dyn ObjectStore,
    env: &RemoteEnvelope,
    name: &str,
    sink: W,
    limits: &Limits,
) -> Result<W, EnvelopeError> {
    let Some(idx) = env.sections().iter().position(|s| s.name == name) else {
        return Err(EnvelopeError::Rejected {
            object: env.object.clone(),
            rejection: super::Rejection::new(
                super::Reason::SectionTable,
                format!("no section named {name:?}"),
            ),
        });
    };
    let mut sink = Some(sink);
    let mut out = read_sections(
        store,
        env,
        &[idx],
        limits,
        |_| {
            sink.take()
                .ok_or_else(|| io::Error::other("sink already used"))
        },
        &|_| {},
    )
    .await?;
    out.pop()
        .ok_or_else(|| EnvelopeError::Build("section reader returned nothing".into()))
}

/// Full verification: every section is fetched, hashed and decompressed into nothing.
pub async fn verify_sections(
    store: &dyn ObjectStore,
    env: &RemoteEnvelope,
    limits: &Limits,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), EnvelopeError> {
    let all: Vec<usize> = (0..env.sections().len()).collect();
    read_sections(store, env, &all, limits, |_| Ok(io::sink()), progress).await?;
    Ok(())
}

/// Whether the object at `env.path` is no longer the version `env` was opened from (its
/// ETag moved): a failed verification of a mutable object is then a torn read, to be
/// retried, not a verdict. Stores that answer If-Match never need this; it covers those
/// that ignore it.
pub async fn replaced(store: &dyn ObjectStore, env: &RemoteEnvelope) -> bool {
    match (&env.meta.e_tag, store.head(&env.path).await) {
        (Some(old), Ok(now)) => now.e_tag.as_ref() != Some(old),
        (_, Err(object_store::Error::NotFound { .. })) => true,
        _ => false,
    }
}

/// Every section, verified, into memory: for objects whose size the caller has already
/// bounded (shards under the run's limit, aggregates, registries).
pub async fn read_all_sections(
    store: &dyn ObjectStore,
    env: &RemoteEnvelope,
    limits: &Limits,
) -> Result<Vec<Vec<u8>>, EnvelopeError> {
    let all: Vec<usize> = (0..env.sections().len()).collect();
    read_sections(store, env, &all, limits, |_| Ok(Vec::new()), &|_| {}).await
}

/// Opens and reads a whole envelope that may be replaced while it is read (`LATEST`, the
/// registry): a read that overlaps an update is retried from the head, up to 5 times, and
/// a verification failure counts as a rejection only when the object did not change
/// meanwhile and a second read fails too. Immutable objects take the same path at no cost
/// (a HEAD and one more read, only on failure).
pub(crate) async fn read_whole_consistent(
    store: &dyn ObjectStore,
    path: &Path,
    object: &str,
    limits: &Limits,
    expect: &Expect,
) -> Result<(RemoteEnvelope, Vec<Vec<u8>>), EnvelopeError> {
    const ATTEMPTS: usize = 5;
    // A store may serve a read that overlaps a replacement under the old ETag (s3s-fs does:
    // it writes in place), so one verification failure is read again from the head before
    // it counts as a rejection; an object that fails twice the same way is bad.
    let mut rejected_once = false;
    for attempt in 1..=ATTEMPTS {
        let torn = |e: &EnvelopeError| matches!(e, EnvelopeError::Changed { .. });
        let env = match RemoteEnvelope::open(store, path, object, limits, expect).await {
            Ok(env) => env,
            Err(e) if torn(&e) && attempt < ATTEMPTS => continue,
            Err(e) => return Err(e),
        };
        match read_all_sections(store, &env, limits).await {
            Ok(sections) => return Ok((env, sections)),
            Err(e) if attempt < ATTEMPTS && torn(&e) => {}
            Err(e)
                if e.rejection().is_some()
                    && (replaced(store, &env).await
                        || !std::mem::replace(&mut rejected_once, true)) =>
            {
                if attempt == ATTEMPTS {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
        tracing::info!(
            object,
            attempt,
            "object changed while being read; reading it again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
    }
    Err(EnvelopeError::Changed {
        object: object.to_string(),
    })
}

/// Opens the envelope at `key` of `target`, verifies it against `expect` and reads every
/// section: the common case of a signed object read whole (aggregates, manifests,
/// pointers, weights, blobs), within `limits` (which bound the memory it takes).
pub(crate) async fn read_signed(
    target: &crate::store::Target,
    key: &str,
    expect: &Expect,
    limits: &Limits,
) -> Result<(RemoteEnvelope, Vec<Vec<u8>>), EnvelopeError> {
    let path = target.path(key);
    let url = target.url_of(&path);
    read_whole_consistent(target.store.as_ref(), &path, &url, limits, expect).await
}
