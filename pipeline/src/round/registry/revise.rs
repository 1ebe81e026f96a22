//! Revisions: edits by compare-and-swap, and setting changes only from windows not yet
//! open by the store's clock (`round.md`, "Registry history").

use super::*;
use crate::format::layout;
use crate::identity::{Identity, PeerId};
use crate::round::RoundReason;
use crate::round::outer::Setting;
use crate::store::{self, S3Options, StoreError};
use object_store::path::Path;

impl Registry {
    /// Loads the registry at `url` (signed by `operator`), lets `edit` change it, and
    /// replaces it by compare-and-swap; a lost race reloads and edits again (up to 8 times),
    /// so two operators' edits never lose one. Returns the stored revision.
    pub async fn revise(
        url: &str,
        s3: &S3Options,
        operator: &Identity,
        mut edit: impl FnMut(&mut Registry) -> Result<(), RegistryError>,
    ) -> Result<Registry, RegistryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Loaded as any reader loads it (its own operator's signature), then the caller
            // must be that operator: another key is refused as unregistered for the role,
            // not reported as a registry signed by the wrong key.
            let (mut reg, etag) = Registry::load(url, s3, None).await?;
            if reg.operator != operator.peer_id().to_string() {
                return Err(RegistryError::Refused {
                    object: url.to_string(),
                    reason: crate::round::RoundReason::NotRegistered,
                    detail: format!(
                        "{} is not the operator of run {} (the operator is {}): only the operator's key edits the registry",
                        operator.peer_id(),
                        reg.run,
                        reg.operator
                    ),
                });
            }
            edit(&mut reg)?;
            match reg.update(url, s3, etag, operator).await {
                Ok(()) => return Ok(reg),
                Err(RegistryError::Store(StoreError::Precondition { .. })) if attempt < 8 => {
                    tracing::info!(attempt, "the registry changed since it was read; retrying");
                }
                Err(RegistryError::Store(StoreError::Precondition { object })) => {
                    return Err(RegistryError::Invalid {
                        object,
                        reason: format!(
                            "lost the compare-and-swap race {attempt} times (other edits keep landing); retry"
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The store's clock where the registry at `url` lives, by a probe object beside it
    /// (`runs/<run>/clock/<peer>` under the same prefix): the clock `set_from` checks
    /// against is the operator's own store's.
    pub async fn clock_at(
        &self,
        url: &str,
        s3: &S3Options,
        peer: &PeerId,
    ) -> Result<u64, RegistryError> {
        let (mut target, path) = store::open_object(url, s3)?;
        let own = layout::registry(&self.run);
        let parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
        let keep = parts.len().saturating_sub(own.split('/').count());
        target.prefix = Path::from_iter(parts.into_iter().take(keep));
        Ok(
            crate::round::window::store_now_ms(&target, &layout::clock_probe(&self.run, peer))
                .await?,
        )
    }

    /// Checks that this revision, stored at `url`, landed before window `w` opened by the
    /// store's clock (its `last_modified`; a whole-second time read as the end of its second).
    /// `run set` reads the clock once, before the compare-and-swap and its retries: a
    /// revision that lands after its window opened is refused loudly (`window_not_future`)
    /// instead of leaving readers that saw the previous revision to refuse it.
    pub async fn landed_before(
        &self,
        url: &str,
        s3: &S3Options,
        w: u64,
    ) -> Result<(), RegistryError> {
        let (target, path) = store::open_object(url, s3)?;
        let object = target.url_of(&path);
        let meta = object_store::ObjectStoreExt::head(target.store.as_ref(), &path)
            .await
            .map_err(|e| StoreError::from_store(&object, e))?;
        let stored = crate::round::window::end_of_second(
            meta.last_modified.timestamp_millis().max(0) as u64,
        );
        let opens =
            crate::round::window::RunClock::new(self.genesis_ms, self.window_secs, self.grace_secs)
                .start(w);
        if stored < opens {
            return Ok(());
        }
        Err(RegistryError::Refused {
            object,
            reason: RoundReason::WindowNotFuture,
            detail: format!(
                "revision {} landed at {stored} ms, after window {w} opened at {opens} ms: readers that saw the previous revision may refuse this one (settings_rewritten); check `shardrop run show` and the readers' logs",
                self.revision
            ),
        })
    }

    /// How long before a window opens `run set` stops accepting it: the revision must land
    /// (compare-and-swap, retries) before the window opens. 5 s, or half a window for
    /// windows shorter than 10 s.
    pub fn set_margin_ms(&self) -> u64 {
        (self.window_secs * 500).min(5_000)
    }

    /// The first window `run set --from-window next` may name at the store's time `now_ms`:
    /// the first that opens more than [`Registry::set_margin_ms`] from now.
    pub fn next_settable(&self, now_ms: u64) -> u64 {
        let clock =
            crate::round::window::RunClock::new(self.genesis_ms, self.window_secs, self.grace_secs);
        clock
            .window_at(now_ms + self.set_margin_ms())
            .map_or(0, |w| w + 1)
    }

    /// Puts `setting` in force from its `from_window` on, which must not have opened yet by
    /// the store's clock `now_ms` (no reader can have applied it: an aggregate exists only
    /// once its window closed). Entries from that window on, never in force, are replaced.
    pub fn set_from(&mut self, setting: Setting, now_ms: u64) -> Result<(), RegistryError> {
        let clock =
            crate::round::window::RunClock::new(self.genesis_ms, self.window_secs, self.grace_secs);
        let w = setting.from_window;
        if clock.start(w) <= now_ms + self.set_margin_ms() {
            return Err(RegistryError::Refused {
                object: format!("run {}", self.run),
                reason: RoundReason::WindowNotFuture,
                detail: format!(
                    "window {w} opens at {} ms (the store's clock says {now_ms} ms); a setting may only change from a window that opens more than {} ms from now, so the revision lands before it does",
                    clock.start(w),
                    self.set_margin_ms()
                ),
            });
        }
        if let Some(p) = setting.problem() {
            return Err(RegistryError::Invalid {
                object: format!("run {}", self.run),
                reason: format!("the setting from window {w}: {p}"),
            });
        }
        if self.settings.is_empty() {
            // Keep the original setting explicit, so the history reads from window 0.
            self.settings.push(self.setting_at(0));
        }
        self.settings.retain(|s| s.from_window < w);
        self.settings.push(setting);
        Ok(())
    }
}
