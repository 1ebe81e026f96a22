//! The window's clock for the readers: wait for the close, open the window (the header pass), and when its reads must end.

use std::time::Duration;

use tokio::time::Instant;

use crate::format::layout;
use crate::identity::PeerId;
use crate::round::RoundError;
use crate::round::publish::clock;
use crate::round::registry::{Job, Registry, Role};
use crate::round::window::store_now_ms;
use crate::store::Target;

use super::*;

/// Waits until window `w` has closed by the store's clock (read through `me`'s probe
/// object in `target`); returns the store's time then.
pub async fn wait_for_close(
    reg: &Registry,
    target: &Target,
    me: &PeerId,
    w: u64,
) -> Result<u64, RoundError> {
    let clk = clock(reg);
    loop {
        let now = store_now_ms(target, &layout::clock_probe(&reg.run, me)).await?;
        if now >= clk.closes(w) {
            return Ok(now);
        }
        let wait = (clk.closes(w) - now).min(5_000);
        tracing::info!(
            window = w,
            wait_ms = wait,
            "waiting for the window to close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(wait + 50)).await;
    }
}

/// What every aggregation or validation step starts with: the job's own store, the window
/// closed by the store's clock, and the header pass over every miner.
pub(crate) async fn open_window(
    job: Job<'_>,
    role: Role,
    w: u64,
    concurrency: usize,
    budget: Option<Duration>,
) -> Result<OpenWindow, RoundError> {
    let Job { reg, id, s3 } = job;
    let me = id.peer_id();
    let target = job.own_store(role)?;
    let now = wait_for_close(reg, &target, &me, w).await?;
    let deadline = window_deadline(reg, w, now, budget);
    // The header pass gets the first half of what is left, the sections the rest: a store
    // that never answers must not eat the time the others' sections need.
    let start = Instant::now();
    let heads_by = start + deadline.saturating_duration_since(start) / 2;
    let shards = check_heads(reg, s3, w, concurrency, heads_by).await;
    Ok(OpenWindow {
        me,
        target,
        shards,
        deadline,
    })
}

/// A closed window, its header pass done, and when its reads must end.
pub(crate) struct OpenWindow {
    pub(crate) me: PeerId,
    pub(crate) target: Target,
    pub(crate) shards: Vec<MinerShard>,
    pub(crate) deadline: Instant,
}

/// When a job's reads of window `w` must end: `budget` (default: the run's window length)
/// after the window's close by the store's clock, so a window is decided before the next
/// one closes whatever the miners' stores do (hang, 503, refuse). A job that starts later
/// than that (catching up an old window) gets the whole budget from now. The header pass
/// may take the first half of the time left, the section reads the rest. A miner not read
/// by then is `store_error` (timeout) and the window goes on without it.
pub fn window_deadline(
    reg: &Registry,
    w: u64,
    store_now_ms: u64,
    budget: Option<Duration>,
) -> Instant {
    let budget = budget.unwrap_or(Duration::from_secs(reg.window_secs.max(1)));
    let end = clock(reg).closes(w) + budget.as_millis() as u64;
    let left = match end.checked_sub(store_now_ms) {
        Some(ms) if ms > 0 => Duration::from_millis(ms),
        _ => budget,
    };
    Instant::now() + left
}
