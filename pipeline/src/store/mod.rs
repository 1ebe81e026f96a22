//! Store URLs to `ObjectStore`s, and the few store operations with shardrop semantics.
//!
//! Accepted URLs:
//! - `s3://bucket/prefix`: S3, R2, MinIO, any S3-compatible service; endpoint, region and
//!   credentials come from [`S3Options`] or the usual `AWS_*` variables;
//! - `file:///abs/path` or a plain path (relative paths are made absolute): a local folder;
//! - `memory://NAME`: a process-wide in-memory store, for unit tests.
//!
//! Behaviour is added by wrapping (see [`hooked`]): [`metrics::Metrics`] counts requests and
//! bytes, [`local::LocalCas`] gives folders compare-and-swap (the tests' fault injector
//! wraps the same way). Retries and timeouts for S3 are object_store's own client settings
//! (exponential backoff with jitter on 5xx, 429, connection resets and timeouts of safe
//! requests), configured here.
//!
//! Final objects are written once: a retry with the same bytes succeeds, other bytes at the
//! key are refused.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use shardrop::store::{self, PutOutcome, S3Options, StoreError};
//!
//! let target = store::open("memory://store-doc/prefix", &S3Options::default())?;
//! let path = target.path("runs/r/aggs/0000000001.agg");
//! assert_eq!(store::put_create(&target, &path, &b"first"[..]).await?, PutOutcome::Created);
//! assert_eq!(
//!     store::put_create(&target, &path, &b"first"[..]).await?,
//!     PutOutcome::AlreadyIdentical
//! );
//! let other = store::put_create(&target, &path, &b"other"[..]).await;
//! assert!(matches!(other, Err(StoreError::Conflict { .. })));
//! assert_eq!(target.url_of(&path), "memory://store-doc/prefix/runs/r/aggs/0000000001.agg");
//! # Ok(())
//! # }
//! ```

pub mod hooked;
pub mod local;
pub mod metrics;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};

pub use hooked::{Hooked, Op, StoreHooks};

/// Why a store could not be opened or an operation failed; always names the object or URL.
// Each variant's fields are the parts of its message (`#[error]`), documented there.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{object}: not found")]
    NotFound { object: String },
    #[error("{object}: a different object already exists at this key (create-only put refused)")]
    Conflict { object: String },
    #[error("{object}: changed since it was read (compare-and-swap lost)")]
    Precondition { object: String },
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
        source: io::Error,
    },
}

impl crate::error::Classified for StoreError {
    fn class(&self) -> crate::error::ErrorClass {
        use crate::error::ErrorClass;
        match self {
            StoreError::Url { .. } => ErrorClass::Caller,
            StoreError::NotFound { .. } => ErrorClass::NotFound,
            StoreError::Conflict { .. } | StoreError::Precondition { .. } => ErrorClass::Conflict,
            StoreError::Store { .. } | StoreError::Io { .. } => ErrorClass::Store,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        None
    }

    fn object(&self) -> Option<&str> {
        match self {
            StoreError::Url { url, .. } => Some(url),
            StoreError::NotFound { object }
            | StoreError::Conflict { object }
            | StoreError::Precondition { object }
            | StoreError::Store { object, .. }
            | StoreError::Io { object, .. } => Some(object),
        }
    }
}

impl StoreError {
    /// Names the object in a store error, and sorts the cases callers act on (missing, taken, changed) from the rest.
    pub(crate) fn from_store(object: &str, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                object: object.to_string(),
            },
            object_store::Error::AlreadyExists { .. } => StoreError::Conflict {
                object: object.to_string(),
            },
            object_store::Error::Precondition { .. } => StoreError::Precondition {
                object: object.to_string(),
            },
            source => StoreError::Store {
                object: object.to_string(),
                source,
            },
        }
    }
}

/// S3 settings; `None` falls back to the `AWS_*` environment variables, then defaults.
#[derive(Clone, Default)]
pub struct S3Options {
    /// S3 endpoint (R2, MinIO, a local server); AWS when `None`.
    pub endpoint: Option<String>,
    /// Region (`us-east-1` when `None`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key (from a file or the environment; never from a flag).
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP (implied by an `http://` endpoint).
    pub allow_http: Option<bool>,
    /// Per-request timeout (default 60 s).
    pub timeout: Option<Duration>,
    /// Retries of transient failures (default 8).
    pub max_retries: Option<usize>,
}

impl fmt::Debug for S3Options {
    // Credentials never reach logs or error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// An opened store plus the prefix all keys are under, and how to name objects in messages.
#[derive(Clone)]
pub struct Target {
    /// The bucket or folder.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside it every key goes under.
    pub prefix: Path,
    /// `scheme://authority` part used to print object URLs (no credentials).
    base: String,
    /// The same store's multipart API, where it has one (S3): large final objects go up
    /// through it with their upload id journaled in the store, so that a rerun after a kill
    /// aborts the orphaned upload (`put_create`).
    multipart: Option<Arc<dyn MultipartStore>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({})", self.url())
    }
}

impl Target {
    /// The key of `rel` under this target's prefix.
    pub fn path(&self, rel: &str) -> Path {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(rel.split('/').filter(|s| !s.is_empty()).map(str::to_string));
        Path::from_iter(parts)
    }

    /// How to print a key of this store (its URL).
    pub fn url_of(&self, path: &Path) -> String {
        format!("{}/{}", self.base, path)
    }

    /// This target's own URL.
    pub fn url(&self) -> String {
        self.url_of(&self.prefix)
    }

    /// Wraps the store (metrics, faults); keeps prefix and naming.
    pub fn wrap<H: StoreHooks>(&self, hooks: Arc<H>) -> Target {
        Target {
            store: Arc::new(Hooked::new(Arc::clone(&self.store), hooks)),
            prefix: self.prefix.clone(),
            base: self.base.clone(),
            // The hooks see every request: uploads take the plain path.
            multipart: None,
        }
    }

    /// A target for a sub-prefix (a peer's area inside a shared bucket, say).
    pub fn join(&self, rel: &str) -> Target {
        Target {
            store: Arc::clone(&self.store),
            prefix: self.path(rel),
            base: self.base.clone(),
            multipart: self.multipart.clone(),
        }
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name)
        .ok()
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn bad_url(url: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Url {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Opens a store URL (see the module docs).
pub fn open(url: &str, s3: &S3Options) -> Result<Target, StoreError> {
    if let Some(rest) = url.strip_prefix("memory://") {
        let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store = memory_stores()
            .lock()
            .map_err(|_| bad_url(url, "memory store registry poisoned"))?
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(InMemory::new()))
            .clone();
        return Ok(Target {
            store,
            prefix: Path::from(prefix),
            base: format!("memory://{name}"),
            multipart: None,
        });
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad_url(url, "no bucket name (expected s3://bucket/prefix)"));
        }
        let store = Arc::new(s3_store(bucket, s3).map_err(|e| bad_url(url, e.to_string()))?);
        return Ok(Target {
            store: store.clone(),
            prefix: Path::from(prefix),
            base: format!("s3://{bucket}"),
            multipart: Some(store),
        });
    }
    let local = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad_url(url, "file URLs must be absolute (file:///path)"));
        }
        std::path::PathBuf::from(rest)
    } else if url.contains("://") {
        return Err(bad_url(
            url,
            "unknown scheme (use s3://, file://, memory:// or a path)",
        ));
    } else {
        std::path::absolute(url).map_err(|e| bad_url(url, e.to_string()))?
    };
    let mut parts = Vec::new();
    for c in local.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            std::path::Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    let fs: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
    Ok(Target {
        store: Arc::new(Hooked::new(fs, Arc::new(local::LocalCas))),
        prefix: Path::from_iter(parts),
        base: "file://".to_string(),
        multipart: None,
    })
}

/// Opens an object URL: the store plus the object's key.
pub fn open_object(url: &str, s3: &S3Options) -> Result<(Target, Path), StoreError> {
    let target = open(url, s3)?;
    if target.prefix.as_ref().is_empty() {
        return Err(bad_url(url, "names a store, not an object"));
    }
    let path = target.prefix.clone();
    Ok((target, path))
}

/// Whether some source of AWS credentials is configured: explicit keys, the environment's
/// keys, or the container / web-identity / profile sources the SDKs read. Without one,
/// object_store would silently ask the cloud instance-metadata address (and report only its
/// 403); shardrop asks it only when `AWS_EC2_METADATA_DISABLED=false` or
/// `SHARDROP_ALLOW_INSTANCE_METADATA=1` says so.
fn credentials_configured(o: &S3Options) -> bool {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    (o.access_key_id.is_some() && o.secret_access_key.is_some())
        || set("AWS_ACCESS_KEY_ID")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || env_flag("SHARDROP_ALLOW_INSTANCE_METADATA") == Some(true)
        || std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("false"))
}

/// An endpoint URL that carries `user:password@` would put a secret into every error and
/// log line that names a request: refused, and never echoed.
fn check_endpoint(endpoint: &str) -> object_store::Result<()> {
    let userinfo = url::Url::parse(endpoint)
        .map(|u| !u.username().is_empty() || u.password().is_some())
        .unwrap_or(endpoint.contains('@'));
    if userinfo {
        return Err(object_store::Error::Generic {
            store: "S3",
            source: "the endpoint URL carries credentials (user:password@); give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead (the URL is not shown)".into(),
        });
    }
    Ok(())
}

fn s3_store(bucket: &str, o: &S3Options) -> object_store::Result<object_store::aws::AmazonS3> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let endpoint = o
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    if let Some(e) = &endpoint {
        check_endpoint(e)?;
    }
    if !credentials_configured(o) {
        return Err(object_store::Error::Generic {
            store: "S3",
            source: "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the registry's <PREFIX>AWS_* variables); to use the cloud instance-metadata service set SHARDROP_ALLOW_INSTANCE_METADATA=1".into(),
        });
    }
    // An explicit http:// endpoint is consent to plain HTTP (local servers, MinIO in compose).
    let allow_http = o
        .allow_http
        .or_else(|| env_flag("AWS_ALLOW_HTTP"))
        .unwrap_or_else(|| {
            endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
        });
    if let Some(e) = &endpoint {
        b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
    }
    let region = o
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_string());
    b = b.with_region(region);
    if let Some(k) = &o.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(s) = &o.secret_access_key {
        b = b.with_secret_access_key(s);
    }
    let client = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(o.timeout.unwrap_or(Duration::from_secs(60)))
        .with_connect_timeout(Duration::from_secs(10));
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: o.max_retries.unwrap_or(8),
        retry_timeout: Duration::from_secs(120),
    };
    b.with_client_options(client).with_retry(retry).build()
}

/// Every object under `dir` (one LIST, paged by the store), naming `dir` in errors.
pub(crate) async fn list_all(
    target: &Target,
    dir: &Path,
) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
    use futures::TryStreamExt;
    let url = target.url_of(dir);
    target
        .store
        .list(Some(dir))
        .try_collect()
        .await
        .map_err(|e| StoreError::from_store(&url, e))
}

/// Something an upload can read from at any offset (an in-memory body, a signed envelope
/// whose sections spilled to disk).
pub trait PutSource: Sync {
    /// Total length.
    fn len(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Whether there is nothing to upload.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PutSource for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        let src = self
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Objects up to this size go up in one create-only PUT; larger ones in multipart parts.
pub const SINGLE_PUT_MAX: u64 = 32 << 20;
/// Multipart part size.
pub(crate) const PART_SIZE: usize = 16 << 20;
/// Parts in flight at once.
pub const PART_CONCURRENCY: usize = 4;

/// What a create-only put found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Created,
    /// The same bytes were already there: a retry after a lost response.
    AlreadyIdentical,
}

/// Writes a final object exactly once. A retry with the same bytes succeeds; different bytes
/// at the key are refused. Small objects use an atomic create-only PUT (`If-None-Match: *`).
/// Large ones are checked first and then uploaded in parts (aborted on failure); as the only
/// writer of its own bucket, a participant cannot race itself there.
pub async fn put_create(
    target: &Target,
    path: &Path,
    src: &(impl PutSource + ?Sized),
) -> Result<PutOutcome, StoreError> {
    let object = target.url_of(path);
    let len = src.len();
    if len <= SINGLE_PUT_MAX {
        let mut buf = vec![0u8; len as usize];
        src.read_at(0, &mut buf).map_err(|e| io_error(&object, e))?;
        return put_create_small(target, path, Bytes::from(buf), src).await;
    }
    put_create_large(target, path, src).await
}

/// `put_create`'s single create-only PUT of `body` (the bytes of `src`).
async fn put_create_small(
    target: &Target,
    path: &Path,
    body: Bytes,
    src: &(impl PutSource + ?Sized),
) -> Result<PutOutcome, StoreError> {
    let object = target.url_of(path);
    let store = target.store.as_ref();
    {
        // object_store does not retry a PUT whose body write failed (a pooled connection the
        // server had closed): the request may have landed. A create-only PUT is safe to
        // repeat, since a landed first attempt makes the retry find the same bytes.
        let mut attempt = 0;
        loop {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match store
                .put_opts(path, PutPayload::from(body.clone()), opts)
                .await
            {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return same_or_conflict(target, path, src).await;
                }
                Err(object_store::Error::Generic { source, .. }) if attempt < 3 => {
                    // Some servers (s3s-fs) answer a create-only PUT onto an existing key
                    // before reading the body and close the connection: a large body then
                    // fails as a broken pipe instead of "already exists". Look before retrying.
                    match store.head(path).await {
                        Ok(_) => return same_or_conflict(target, path, src).await,
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(StoreError::from_store(&object, e)),
                    }
                    attempt += 1;
                    tracing::warn!(object = %object, error = %source, attempt, "create-only PUT failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => return Err(StoreError::from_store(&object, e)),
            }
        }
    }
}

/// `put_create`'s multipart path, for objects over `SINGLE_PUT_MAX`.
async fn put_create_large(
    target: &Target,
    path: &Path,
    src: &(impl PutSource + ?Sized),
) -> Result<PutOutcome, StoreError> {
    let object = target.url_of(path);
    let store = target.store.as_ref();
    let len = src.len();
    match store.head(path).await {
        Ok(_) => return same_or_conflict(target, path, src).await,
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(StoreError::from_store(&object, e)),
    }
    if let Some(mp) = &target.multipart {
        return put_journaled(target, mp.as_ref(), path, src).await;
    }
    let upload = store
        .put_multipart(path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut buf = vec![0u8; PART_SIZE];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(PART_SIZE as u64) as usize;
        if let Err(e) = src.read_at(off, &mut buf[..n]) {
            let _ = writer.abort().await;
            return Err(io_error(&object, e));
        }
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            let _ = writer.abort().await;
            return Err(StoreError::from_store(&object, e));
        }
        writer.put(Bytes::copy_from_slice(&buf[..n]));
        off += n as u64;
    }
    writer
        .finish()
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    Ok(PutOutcome::Created)
}

/// Copies the first `len` bytes of `src_path` in `src` to `dst_path` in `dst`, create-only,
/// holding at most `PART_CONCURRENCY` parts in memory: how an aggregator consolidates
/// shards of any size. The copy is not trusted for being a copy: callers verify what landed.
pub(crate) async fn copy_object(
    src: &Target,
    src_path: &Path,
    len: u64,
    dst: &Target,
    dst_path: &Path,
) -> Result<PutOutcome, StoreError> {
    let from = src.url_of(src_path);
    let from = &from;
    let get = |r: std::ops::Range<u64>| async move {
        src.store
            .get_range(src_path, r)
            .await
            .map_err(|e| StoreError::from_store(from, e))
    };
    if len <= SINGLE_PUT_MAX {
        // One buffer: the body goes up as it came down.
        let body = get(0..len).await?;
        return put_create_small(dst, dst_path, body.clone(), &body[..]).await;
    }
    let object = dst.url_of(dst_path);
    match dst.store.head(dst_path).await {
        Ok(_) => return Ok(PutOutcome::AlreadyIdentical),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(StoreError::from_store(&object, e)),
    }
    let upload = dst
        .store
        .put_multipart(dst_path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut off = 0u64;
    while off < len {
        let end = (off + PART_SIZE as u64).min(len);
        let part = match get(off..end).await {
            Ok(b) => b,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            let _ = writer.abort().await;
            return Err(StoreError::from_store(&object, e));
        }
        writer.put(part);
        off = end;
    }
    writer
        .finish()
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    Ok(PutOutcome::Created)
}

/// Where the id of an unfinished multipart upload of `path` is journaled: a small sibling
/// object, written before the first part and deleted once the upload is completed or
/// aborted. A process killed in between (SIGKILL runs no cleanup) leaves it behind, and the
/// next upload of the same object, or `abort_orphaned_uploads`, aborts that upload, so no
/// killed push keeps paying for its parts.
pub fn upload_journal(path: &Path) -> Path {
    Path::from(format!("{path}{UPLOAD_JOURNAL_SUFFIX}"))
}

/// Suffix of upload journal objects.
pub(crate) const UPLOAD_JOURNAL_SUFFIX: &str = ".multipart-upload";

/// Aborts the upload a journal names (if the store still has it) and removes the journal.
async fn abort_journaled(target: &Target, mp: &dyn MultipartStore, journal: &Path) {
    let Ok(got) = target.store.get(journal).await else {
        return;
    };
    if let Ok(id) = got.bytes().await {
        let id = String::from_utf8_lossy(&id).trim().to_string();
        let object = Path::from(
            journal
                .as_ref()
                .strip_suffix(UPLOAD_JOURNAL_SUFFIX)
                .unwrap_or(journal.as_ref()),
        );
        match mp.abort_multipart(&object, &id).await {
            Ok(()) => {
                tracing::info!(object = %target.url_of(&object), "aborted an upload a killed run left")
            }
            Err(e) => {
                tracing::info!(object = %target.url_of(&object), error = %e, "no upload left to abort")
            }
        }
    }
    let _ = target.store.delete(journal).await;
}

/// Aborts every journaled, unfinished multipart upload under `prefix` (relative to the
/// target) whose journal is older than `min_age` (younger ones may belong to an upload still
/// running): what killed uploads left. Returns how many it aborted.
pub async fn abort_orphaned_uploads(
    target: &Target,
    prefix: &str,
    min_age: Duration,
) -> Result<usize, StoreError> {
    let Some(mp) = &target.multipart else {
        return Ok(0);
    };
    let under = target.path(prefix);
    let cutoff = chrono::Utc::now() - min_age;
    let journals: Vec<Path> = list_all(target, &under)
        .await?
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(UPLOAD_JOURNAL_SUFFIX))
        .filter(|m| m.last_modified < cutoff)
        .map(|m| m.location)
        .collect();
    for j in &journals {
        abort_journaled(target, mp.as_ref(), j).await;
    }
    Ok(journals.len())
}

/// A multipart upload whose id is journaled in the store while it runs (`upload_journal`).
async fn put_journaled(
    target: &Target,
    mp: &dyn MultipartStore,
    path: &Path,
    src: &(impl PutSource + ?Sized),
) -> Result<PutOutcome, StoreError> {
    let object = target.url_of(path);
    let journal = upload_journal(path);
    abort_journaled(target, mp, &journal).await;
    let id = mp
        .create_multipart(path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    if let Err(e) = target
        .store
        .put(&journal, PutPayload::from(Bytes::from(id.clone())))
        .await
    {
        let _ = mp.abort_multipart(path, &id).await;
        return Err(StoreError::from_store(&object, e));
    }
    let len = src.len();
    let parts = len.div_ceil(PART_SIZE as u64) as usize;
    let uploaded: Result<Vec<object_store::multipart::PartId>, StoreError> =
        futures::stream::iter((0..parts).map(|i| {
            let id = &id;
            let object = &object;
            async move {
                let off = i as u64 * PART_SIZE as u64;
                let n = (len - off).min(PART_SIZE as u64) as usize;
                let mut buf = vec![0u8; n];
                src.read_at(off, &mut buf)
                    .map_err(|e| io_error(object, e))?;
                mp.put_part(path, id, i, PutPayload::from(Bytes::from(buf)))
                    .await
                    .map_err(|e| StoreError::from_store(object, e))
            }
        }))
        .buffered(PART_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect();
    let done = match uploaded {
        Ok(part_ids) => mp
            .complete_multipart(path, &id, part_ids)
            .await
            .map_err(|e| StoreError::from_store(&object, e)),
        Err(e) => Err(e),
    };
    if done.is_err() {
        let _ = mp.abort_multipart(path, &id).await;
    }
    let _ = target.store.delete(&journal).await;
    done.map(|_| PutOutcome::Created)
}

fn io_error(object: &str, source: io::Error) -> StoreError {
    StoreError::Io {
        object: object.to_string(),
        source,
    }
}

/// Compares the stored object with `src`, streaming, without holding either whole.
async fn same_or_conflict(
    target: &Target,
    path: &Path,
    src: &(impl PutSource + ?Sized),
) -> Result<PutOutcome, StoreError> {
    let object = target.url_of(path);
    let got = target
        .store
        .get(path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    if got.meta.size != src.len() {
        return Err(StoreError::Conflict { object });
    }
    let mut stream = got.into_stream();
    let mut off = 0u64;
    let mut mine = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| StoreError::from_store(&object, e))?;
        if off + chunk.len() as u64 > src.len() {
            return Err(StoreError::Conflict { object });
        }
        mine.resize(chunk.len(), 0);
        src.read_at(off, &mut mine)
            .map_err(|e| io_error(&object, e))?;
        if mine != chunk {
            return Err(StoreError::Conflict { object });
        }
        off += chunk.len() as u64;
    }
    if off != src.len() {
        return Err(StoreError::Conflict { object });
    }
    Ok(PutOutcome::AlreadyIdentical)
}

/// Compare-and-swap: replaces the object only if its ETag is still `expected` (or creates it
/// when `expected` is `None`). Returns the new ETag. Used for pointers such as `LATEST`.
pub async fn put_cas(
    target: &Target,
    path: &Path,
    body: Bytes,
    expected: Option<String>,
) -> Result<Option<String>, StoreError> {
    let object = target.url_of(path);
    let mode = match expected {
        None => PutMode::Create,
        Some(e_tag) => PutMode::Update(UpdateVersion {
            e_tag: Some(e_tag),
            version: None,
        }),
    };
    let opts = PutOptions {
        mode,
        ..Default::default()
    };
    let r = target
        .store
        .put_opts(path, PutPayload::from(body), opts)
        .await
        .map_err(|e| match e {
            object_store::Error::AlreadyExists { .. } => StoreError::Precondition {
                object: object.clone(),
            },
            e => StoreError::from_store(&object, e),
        })?;
    Ok(r.e_tag)
}
