//! OS errors as Python exceptions that keep their errno (as uvloop's errors.pyx).

use std::io;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

/// `OSError(errno, strerror)` as its errno's subclass (`ConnectionResetError`, ...), with
/// `exc.errno` set.
///
/// The exception object is made now, by calling `OSError` (whose `__new__` picks the
/// subclass, so checks of the type see it), not left to pyo3 to make when first looked
/// at: that releases and re-takes the GIL, and panics once the interpreter finalizes (a
/// transport written to by a `__del__` during the last collection at exit).
pub fn os_error(py: Python<'_>, errno: i32) -> PyErr {
    let message = io::Error::from_raw_os_error(errno).to_string_message();
    new_os_error(py, (errno, message))
}

/// Converts an `io::Error`, keeping its errno when it has one.
pub fn from_io(py: Python<'_>, err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => os_error(py, errno),
        None => new_os_error(py, (err.to_string(),)),
    }
}

fn new_os_error<'py>(py: Python<'py>, args: impl pyo3::call::PyCallArgs<'py>) -> PyErr {
    match py.get_type::<PyOSError>().call1(args) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

trait StrError {
    fn to_string_message(&self) -> String;
}

impl StrError for io::Error {
    /// `strerror(errno)` without Rust's " (os error N)" suffix.
    fn to_string_message(&self) -> String {
        let s = self.to_string();
        match s.rfind(" (os error ") {
            Some(i) => s[..i].to_string(),
            None => s,
        }
    }
}
