//! The `shardrop` Python package's native part: a thin face over the `shardrop` library, so
//! a PyTorch training loop publishes, applies, validates and checkpoints on its own tensors,
//! in memory. Everything that decides anything lives in the library, shared with the CLI;
//! this crate converts tensors (DLPack), errors (reason codes) and blocking (the GIL is
//! released during I/O and compute, Ctrl-C interrupts waits).

mod ckpt;
mod errors;
mod run;
mod runtime;
mod tensors;
mod validate;

use pyo3::prelude::*;

/// The extension module, imported as `shardrop._shardrop` by the Python package.
#[pymodule]
fn _shardrop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Library events (tracing) reach Python's `logging` under the "shardrop" logger.
    let _ = pyo3_log::try_init();
    errors::register(m)?;
    run::register(m)?;
    ckpt::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
