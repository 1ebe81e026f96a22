//! One forwarding `ObjectStore` that behaviour plugs into, the way object_store's own
//! throttled and limited stores wrap another store. Metrics, fault injection and the local
//! folder's compare-and-swap are each a small [`StoreHooks`] impl instead of three copies of
//! twelve forwarding methods.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};

/// The kinds of request a store sees, for counting and for choosing faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A single-request put.
    Put,
    /// Starting a multipart upload.
    PutMultipart,
    /// One part of a multipart upload.
    PutPart,
    /// A get, whole or ranged.
    Get,
    /// A head.
    Head,
    /// A listing.
    List,
    /// A delete.
    Delete,
    /// A server-side copy.
    Copy,
    /// A rename.
    Rename,
}

impl Op {
    /// The name in metrics and fault rules.
    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::PutMultipart => "put_multipart",
            Op::PutPart => "put_part",
            Op::Get => "get",
            Op::Head => "head",
            Op::List => "list",
            Op::Delete => "delete",
            Op::Copy => "copy",
            Op::Rename => "rename",
        }
    }
}

/// Behaviour added around a store. Every method has a pass-through default.
#[async_trait]
pub trait StoreHooks: Send + Sync + fmt::Debug + 'static {
    /// Runs before each request; an error fails it without reaching the store.
    async fn before(&self, _op: Op, _path: Option<&Path>) -> Result<()> {
        Ok(())
    }

    /// Sees the bytes of each put or multipart part as it is sent.
    fn sent(&self, _op: Op, _bytes: u64) {}

    /// May wrap the body stream of a GET (to count or cut it).
    fn get_stream(
        &self,
        _path: &Path,
        stream: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        stream
    }

    /// Performs a put; override to change what a put means (compare-and-swap on a folder).
    async fn put(
        &self,
        inner: &dyn ObjectStore,
        path: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        inner.put_opts(path, payload, opts).await
    }
}

/// A store with hooks around every call.
pub struct Hooked<H: StoreHooks> {
    inner: Arc<dyn ObjectStore>,
    hooks: Arc<H>,
}

impl<H: StoreHooks> Hooked<H> {
    /// `inner` with `hooks` around every request.
    pub fn new(inner: Arc<dyn ObjectStore>, hooks: Arc<H>) -> Self {
        Hooked { inner, hooks }
    }

    /// The hooks, to read what they recorded.
    pub fn hooks(&self) -> &Arc<H> {
        &self.hooks
    }
}

impl<H: StoreHooks> fmt::Debug for Hooked<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hooked({:?})", self.hooks)
    }
}

impl<H: StoreHooks> fmt::Display for Hooked<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

#[derive(Debug)]
struct HookedUpload<H: StoreHooks> {
    inner: Box<dyn MultipartUpload>,
    hooks: Arc<H>,
}

#[async_trait]
impl<H: StoreHooks> MultipartUpload for HookedUpload<H> {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let hooks = Arc::clone(&self.hooks);
        let len = data.content_length() as u64;
        let part = self.inner.put_part(data);
        Box::pin(async move {
            hooks.before(Op::PutPart, None).await?;
            hooks.sent(Op::PutPart, len);
            part.await
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl<H: StoreHooks> ObjectStore for Hooked<H> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.hooks.before(Op::Put, Some(location)).await?;
        self.hooks.sent(Op::Put, payload.content_length() as u64);
        self.hooks
            .put(self.inner.as_ref(), location, payload, opts)
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.hooks.before(Op::PutMultipart, Some(location)).await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(HookedUpload {
            inner,
            hooks: Arc::clone(&self.hooks),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        self.hooks.before(op, Some(location)).await?;
        let result = self.inner.get_opts(location, options).await?;
        if op == Op::Head {
            return Ok(result);
        }
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = result;
        let stream = match payload {
            GetResultPayload::Stream(s) => s,
            file @ GetResultPayload::File(..) => GetResult {
                payload: file,
                meta: meta.clone(),
                range: range.clone(),
                attributes: attributes.clone(),
                extensions: extensions.clone(),
            }
            .into_stream(),
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(self.hooks.get_stream(location, stream)),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let hooks = Arc::clone(&self.hooks);
        let checked = locations
            .then(move |p| {
                let hooks = Arc::clone(&hooks);
                async move {
                    let p = p?;
                    hooks.before(Op::Delete, Some(&p)).await?;
                    Ok(p)
                }
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let hooks = Arc::clone(&self.hooks);
        let prefix_owned = prefix.cloned();
        let mut inner = Some(self.inner.list(prefix));
        futures::stream::once(async move { hooks.before(Op::List, prefix_owned.as_ref()).await })
            .flat_map(move |r| match (r, inner.take()) {
                (Ok(()), Some(s)) => s,
                (Ok(()), None) => futures::stream::empty().boxed(),
                (Err(e), _) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.hooks.before(Op::List, prefix).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.hooks.before(Op::Copy, Some(to)).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.hooks.before(Op::Rename, Some(to)).await?;
        self.inner.rename_opts(from, to, options).await
    }
}
