//! Library errors as Python exceptions: every one is a `shardrop.Error`; an object that was
//! read and refused is a `shardrop.Rejected`, a call that breaks a rule of the run is a
//! `shardrop.Refused`; both carry the library's stable reason code (`.reason`), the object
//! it is about when there is one (`.object`) and the failure class (`.kind`).

use std::fmt::Display;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use shardrop::error::{Classified, ErrorClass};

create_exception!(
    shardrop,
    Error,
    PyException,
    "Every shardrop failure. `.kind` is its class (caller, not_found, rejected, refused, conflict, store, internal), `.reason` the stable reason code or None, `.object` the object it is about or None."
);
create_exception!(
    shardrop,
    Rejected,
    Error,
    "An object was read, verified and refused: `.reason` says why (bad_signature, non_finite, ...), `.object` names it."
);
create_exception!(
    shardrop,
    Refused,
    Error,
    "The call breaks a rule of the run: `.reason` is window_closed, window_not_open, state_ahead, model_mismatch, not_registered, optimizer_state_missing, optimizer_state_window, ..."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("Rejected", py.get_type::<Rejected>())?;
    m.add("Refused", py.get_type::<Refused>())?;
    Ok(())
}

/// A shardrop exception of `class` with its attributes set.
pub fn raise(
    class: ErrorClass,
    reason: Option<&str>,
    object: Option<&str>,
    message: String,
) -> PyErr {
    let err = match class {
        ErrorClass::Rejected => Rejected::new_err(message),
        ErrorClass::Refused => Refused::new_err(message),
        _ => Error::new_err(message),
    };
    Python::attach(|py| {
        let v = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail short of memory
        // exhaustion; the exception is raised either way.
        let _ = v.setattr("kind", class.name());
        let _ = v.setattr("reason", reason);
        let _ = v.setattr("object", object);
    });
    err
}

/// Any classified library error.
pub fn to_py<E: Classified + Display>(e: E) -> PyErr {
    raise(e.class(), e.reason(), e.object(), e.to_string())
}

/// A caller mistake found here (a bad argument), as `shardrop.Error` of kind `caller`.
pub fn caller(message: impl Into<String>) -> PyErr {
    raise(ErrorClass::Caller, None, None, message.into())
}

/// A local file problem (state folders, state files), naming the path.
pub fn io(path: &std::path::Path, e: impl Display) -> PyErr {
    raise(
        ErrorClass::Store,
        None,
        Some(&path.display().to_string()),
        format!("{}: {e}", path.display()),
    )
}

/// An optional value as Python's repr shows it (`None`, or the value).
pub fn py_repr<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("None".to_string(), |v| v.to_string())
}
