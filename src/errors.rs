//! OS errors as Python exceptions that keep their errno (as uvloop's errors.pyx).

use std::io;

use pyo3::PyErr;
use pyo3::exceptions::PyOSError;

/// `OSError(errno, strerror)` as its errno's subclass (`ConnectionResetError`, ...), with
/// `exc.errno` set.
///
/// The subclass is chosen here, as `OSError.__new__` would: raised lazily as a plain
/// `OSError`, Python 3.10/3.11 normalise it to the subclass's instance but keep
/// `OSError` as the error's type, so checks of the type (`is_instance_of`) missed it.
pub fn os_error(errno: i32) -> PyErr {
    use pyo3::exceptions as e;
    let args = (
        errno,
        io::Error::from_raw_os_error(errno).to_string_message(),
    );
    // CPython's errno -> subclass table (Objects/exceptions.c, _PyExc_InitState).
    match errno {
        libc::EAGAIN | libc::EALREADY | libc::EINPROGRESS => {
            PyErr::new::<e::PyBlockingIOError, _>(args)
        }
        libc::ECHILD => PyErr::new::<e::PyChildProcessError, _>(args),
        libc::EPIPE | libc::ESHUTDOWN => PyErr::new::<e::PyBrokenPipeError, _>(args),
        libc::ECONNABORTED => PyErr::new::<e::PyConnectionAbortedError, _>(args),
        libc::ECONNREFUSED => PyErr::new::<e::PyConnectionRefusedError, _>(args),
        libc::ECONNRESET => PyErr::new::<e::PyConnectionResetError, _>(args),
        libc::EEXIST => PyErr::new::<e::PyFileExistsError, _>(args),
        libc::ENOENT => PyErr::new::<e::PyFileNotFoundError, _>(args),
        libc::EISDIR => PyErr::new::<e::PyIsADirectoryError, _>(args),
        libc::ENOTDIR => PyErr::new::<e::PyNotADirectoryError, _>(args),
        libc::EINTR => PyErr::new::<e::PyInterruptedError, _>(args),
        libc::EACCES | libc::EPERM => PyErr::new::<e::PyPermissionError, _>(args),
        libc::ESRCH => PyErr::new::<e::PyProcessLookupError, _>(args),
        libc::ETIMEDOUT => PyErr::new::<e::PyTimeoutError, _>(args),
        _ => PyOSError::new_err(args),
    }
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
