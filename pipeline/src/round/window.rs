//! The run clock. Window `w` covers `[genesis + w·len, genesis + (w+1)·len)`; a shard for `w`
//! counts if the **store's** `last_modified` is before the window's end plus the grace. The
//! signer's clock is recorded but never trusted, and a participant learns the time from the
//! store itself (a probe object it writes and reads back), never from its local clock alone.

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};

use crate::store::{StoreError, Target};

/// Window arithmetic in milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunClock {
    /// When window 0 starts, ms since the epoch by the store's clock.
    pub genesis_ms: u64,
    /// Window length.
    pub window_ms: u64,
    /// How long after a window's deadline shards still count (stores and uploads are slow).
    pub grace_ms: u64,
}

impl RunClock {
    /// The clock of a run (seconds, as the registry gives them).
    pub fn new(genesis_ms: u64, window_secs: u64, grace_secs: u64) -> Self {
        RunClock {
            genesis_ms,
            window_ms: window_secs * 1000,
            grace_ms: grace_secs * 1000,
        }
    }

    /// The window containing `t`, or `None` before genesis.
    pub fn window_at(&self, t_ms: u64) -> Option<u64> {
        t_ms.checked_sub(self.genesis_ms)
            .map(|d| d / self.window_ms)
    }

    /// When window `w` starts (its shards may land from then on).
    pub fn start(&self, w: u64) -> u64 {
        self.genesis_ms + w * self.window_ms
    }

    /// The end of window `w`: the deadline.
    pub fn deadline(&self, w: u64) -> u64 {
        self.start(w + 1)
    }

    /// The last instant (exclusive) a shard for `w` may land: deadline + grace.
    pub fn closes(&self, w: u64) -> u64 {
        self.deadline(w) + self.grace_ms
    }

    /// The newest window whose grace has passed at `t`.
    pub fn newest_closed(&self, t_ms: u64) -> Option<u64> {
        let since = t_ms.checked_sub(self.genesis_ms + self.grace_ms)?;
        (since / self.window_ms).checked_sub(1)
    }
}

/// The store's current time: write a small probe object and read its `last_modified`.
pub async fn store_now_ms(target: &Target, probe_key: &str) -> Result<u64, StoreError> {
    let path = target.path(probe_key);
    let object = target.url_of(&path);
    target
        .store
        .put(
            &path,
            PutPayload::from(Bytes::from_static(b"clock probe\n")),
        )
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    let meta = target
        .store
        .head(&path)
        .await
        .map_err(|e| StoreError::from_store(&object, e))?;
    Ok(meta.last_modified.timestamp_millis().max(0) as u64)
}

/// The latest instant a store time may stand for: a whole-second time (S3's HEAD gives
/// `Last-Modified` to the second) is read as the end of its second, any finer one as itself.
/// Rules that must not count a time as earlier than it may have been use it.
pub(crate) fn end_of_second(ms: u64) -> u64 {
    if ms.is_multiple_of(1000) {
        ms + 999
    } else {
        ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_deadlines() {
        let c = RunClock::new(1_000_000, 60, 10);
        assert_eq!(c.window_at(999_999), None);
        assert_eq!(c.window_at(1_000_000), Some(0));
        assert_eq!(c.window_at(1_059_999), Some(0));
        assert_eq!(c.window_at(1_060_000), Some(1));
        assert_eq!(c.deadline(0), 1_060_000);
        assert_eq!(c.closes(0), 1_070_000);
        assert_eq!(c.newest_closed(1_069_999), None);
        assert_eq!(c.newest_closed(1_070_000), Some(0));
        assert_eq!(c.newest_closed(1_129_999), Some(0));
        assert_eq!(c.newest_closed(1_130_000), Some(1));
    }
}
