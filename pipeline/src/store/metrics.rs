//! Requests and bytes by operation: what a job actually cost in store calls, for transfer
//! tables and for tests that check a reader fetched only what it needed.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::Result;
use object_store::path::Path;
use serde::Serialize;

use super::hooked::{Op, StoreHooks};

/// Counters for one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpStats {
    /// Requests made.
    pub requests: u64,
    /// Bytes sent (puts) or received (gets).
    pub bytes: u64,
}

/// Counts every request and every byte sent or received, per [`Op`].
#[derive(Debug, Default)]
pub struct Metrics {
    stats: Mutex<BTreeMap<Op, OpStats>>,
    get_bytes: Arc<AtomicU64>,
}

impl Metrics {
    /// A copy of the counters, keyed by operation name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, OpStats> {
        let mut out: BTreeMap<&'static str, OpStats> = self
            .stats
            .lock()
            .map(|m| m.iter().map(|(op, s)| (op.name(), *s)).collect())
            .unwrap_or_default();
        let get = out.entry(Op::Get.name()).or_default();
        get.bytes = self.get_bytes.load(Ordering::Relaxed);
        out
    }

    /// The counts for one kind of request so far.
    pub fn get(&self, op: Op) -> OpStats {
        self.snapshot().get(op.name()).copied().unwrap_or_default()
    }

    fn bump(&self, op: Op, requests: u64, bytes: u64) {
        if let Ok(mut m) = self.stats.lock() {
            let s = m.entry(op).or_default();
            s.requests += requests;
            s.bytes += bytes;
        }
    }
}

#[async_trait]
impl StoreHooks for Metrics {
    async fn before(&self, op: Op, _path: Option<&Path>) -> Result<()> {
        self.bump(op, 1, 0);
        Ok(())
    }

    fn sent(&self, op: Op, bytes: u64) {
        self.bump(op, 0, bytes);
    }

    fn get_stream(
        &self,
        _path: &Path,
        stream: BoxStream<'static, Result<Bytes>>,
    ) -> BoxStream<'static, Result<Bytes>> {
        let counter = Arc::clone(&self.get_bytes);
        stream
            .inspect(move |chunk| {
                if let Ok(c) = chunk {
                    counter.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
            })
            .boxed()
    }
}
