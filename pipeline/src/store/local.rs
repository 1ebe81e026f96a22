//! Compare-and-swap for local folders.
//!
//! object_store's `LocalFileSystem` does create-only puts atomically (hard link) but has no
//! `PutMode::Update`. The `LATEST` checkpoint pointer needs one on every backend, so this
//! hook serialises updates with an advisory lock on the object's folder, checks the current
//! ETag under the lock, and then replaces the file atomically (write + rename).

#![warn(missing_docs)]

use async_trait::async_trait;
use object_store::path::Path;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult, Result,
};

use super::hooked::StoreHooks;

/// Hooks for a `LocalFileSystem` rooted at `/`.
#[derive(Debug, Default)]
pub struct LocalCas;

fn generic(e: impl std::fmt::Display) -> object_store::Error {
    object_store::Error::Generic {
        store: "local",
        source: e.to_string().into(),
    }
}

#[async_trait]
impl StoreHooks for LocalCas {
    async fn put(
        &self,
        inner: &dyn ObjectStore,
        path: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let PutMode::Update(version) = &opts.mode else {
            return inner.put_opts(path, payload, opts).await;
        };
        let dir = std::path::Path::new("/").join(path.as_ref());
        let dir = dir
            .parent()
            .map(|d| d.to_path_buf())
            .unwrap_or_else(|| "/".into());
        let lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let f = std::fs::File::open(&dir)?;
            f.lock()?;
            Ok(f)
        })
        .await
        .map_err(generic)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => object_store::Error::NotFound {
                path: path.to_string(),
                source: e.into(),
            },
            _ => generic(e),
        })?;
        let current = inner.head(path).await?;
        let result = if current.e_tag != version.e_tag {
            Err(object_store::Error::Precondition {
                path: path.to_string(),
                source: format!("e_tag {:?} is not {:?}", current.e_tag, version.e_tag).into(),
            })
        } else {
            let mut opts = opts.clone();
            opts.mode = PutMode::Overwrite;
            inner.put_opts(path, payload, opts).await
        };
        drop(lock);
        result
    }
}
