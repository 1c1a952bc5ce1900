//! OS errors as Python exceptions that keep their errno (as uvloop's errors.pyx).

use std::io;

use pyo3::PyErr;
use pyo3::exceptions::PyOSError;

/// `OSError(errno, strerror)`: Python picks the subclass (`ConnectionResetError`, ...)
/// and sets `exc.errno`.
pub fn os_error(errno: i32) -> PyErr {
    PyOSError::new_err((
        errno,
        io::Error::from_raw_os_error(errno).to_string_message(),
    ))
}

/// Converts an `io::Error`, keeping its errno when it has one.
pub fn from_io(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => os_error(errno),
        None => PyOSError::new_err(err.to_string()),
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
