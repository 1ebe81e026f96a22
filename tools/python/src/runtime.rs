//! One tokio runtime for the process, and blocking on it with the GIL released while
//! Python's signal handlers still run (Ctrl-C interrupts a long pull or wait).

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;

fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shardrop")
        .build()
        .map_err(|e| crate::errors::caller(format!("cannot start the I/O runtime: {e}")))?;
    Ok(RT.get_or_init(|| rt))
}

/// Runs `fut` to completion without the GIL. Every 100 ms it takes the GIL briefly to run
/// Python's signal handlers: a KeyboardInterrupt drops the future (its I/O is cancelled;
/// nothing half-written is ever visible, as every put is a whole object) and is raised.
pub fn block<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    block_fn(py, move || fut)
}

/// `block` for a future made by `make` on the GIL-free side: the future itself need not be
/// `Send` (some of the library's are not provably so), only what `make` captures.
///
/// A call made from inside another one (a validator's Python `prepare` that replays
/// aggregates while `validate` runs) cannot block on the runtime it is already inside: it
/// runs on a thread of its own with a runtime of its own.
pub fn block_fn<M, F>(py: Python<'_>, make: M) -> PyResult<F::Output>
where
    M: FnOnce() -> F + Send,
    F: Future,
    F::Output: Send,
{
    let drive = move |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut fut = std::pin::pin!(make());
            loop {
                tokio::select! {
                    out = &mut fut => return Ok(out),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    };
    if tokio::runtime::Handle::try_current().is_err() {
        let rt = runtime()?;
        return py.detach(|| drive(rt));
    }
    py.detach(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| crate::errors::caller(format!("cannot start a runtime: {e}")))?;
                drive(&rt)
            })
            .join()
            .unwrap_or_else(|_| Err(crate::errors::caller("a nested shardrop call panicked")))
        })
    })
}
