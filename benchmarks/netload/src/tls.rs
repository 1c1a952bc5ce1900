//! TLS through the system's OpenSSL (libssl.so.3), loaded at run time with `dlopen`.
//!
//! Loading it at run time keeps the crate free of build dependencies: the binaries build and
//! run without OpenSSL, and only `--tls` fails (with a clear message) when it is missing.
//! Sessions run on non-blocking sockets; the handshake happens implicitly inside the first
//! `SSL_read`/`SSL_write` (connect or accept state is set up front).

use std::ffi::{CStr, CString, c_char, c_int, c_long, c_ulong, c_void};
use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

const SSL_ERROR_WANT_READ: c_int = 2;
const SSL_ERROR_WANT_WRITE: c_int = 3;
const SSL_ERROR_SYSCALL: c_int = 5;
const SSL_ERROR_ZERO_RETURN: c_int = 6;
const SSL_CTRL_MODE: c_int = 33;
const SSL_MODE_ENABLE_PARTIAL_WRITE: c_long = 0x1;
const SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: c_long = 0x2;
const SSL_FILETYPE_PEM: c_int = 1;
/// A peer closing without close_notify reads as a clean EOF instead of an error.
const SSL_OP_IGNORE_UNEXPECTED_EOF: u64 = 1 << 7;

type Ptr = *mut c_void;

/// Declares `Api`, the table of the OpenSSL functions we call, and `resolve_api`, which fills
/// it in from `dlsym`.
macro_rules! openssl_api {
    ($($field:ident = $sym:literal: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        struct Api {
            $($field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        fn resolve_api(sym: impl Fn(&str) -> Result<Ptr, String>) -> Result<Api, String> {
            Ok(Api {
                $($field: {
                    let p = sym($sym)?;
                    // SAFETY: the symbol is the OpenSSL 3 function of this C signature.
                    unsafe {
                        std::mem::transmute::<Ptr, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                    }
                },)*
            })
        }
    };
}

openssl_api! {
    tls_client_method = "TLS_client_method": fn() -> *const c_void;
    tls_server_method = "TLS_server_method": fn() -> *const c_void;
    ctx_new = "SSL_CTX_new": fn(*const c_void) -> Ptr;
    ctx_ctrl = "SSL_CTX_ctrl": fn(Ptr, c_int, c_long, Ptr) -> c_long;
    ctx_set_options = "SSL_CTX_set_options": fn(Ptr, u64) -> u64;
    ctx_use_chain_file = "SSL_CTX_use_certificate_chain_file": fn(Ptr, *const c_char) -> c_int;
    ctx_use_key_file = "SSL_CTX_use_PrivateKey_file": fn(Ptr, *const c_char, c_int) -> c_int;
    ssl_new = "SSL_new": fn(Ptr) -> Ptr;
    ssl_free = "SSL_free": fn(Ptr);
    ssl_set_fd = "SSL_set_fd": fn(Ptr, c_int) -> c_int;
    ssl_set_connect_state = "SSL_set_connect_state": fn(Ptr);
    ssl_set_accept_state = "SSL_set_accept_state": fn(Ptr);
    ssl_read = "SSL_read": fn(Ptr, Ptr, c_int) -> c_int;
    ssl_write = "SSL_write": fn(Ptr, *const c_void, c_int) -> c_int;
    ssl_get_error = "SSL_get_error": fn(Ptr, c_int) -> c_int;
    ssl_shutdown = "SSL_shutdown": fn(Ptr) -> c_int;
    err_get_error = "ERR_get_error": fn() -> c_ulong;
    err_error_string_n = "ERR_error_string_n": fn(c_ulong, *mut c_char, usize);
}

// SAFETY: the table only holds function pointers into a library that is never unloaded.
unsafe impl Send for Api {}
// SAFETY: as above; the functions themselves are thread-safe in OpenSSL 3.
unsafe impl Sync for Api {}

fn load_api() -> Result<Api, String> {
    let mut handle: Ptr = std::ptr::null_mut();
    for name in ["libssl.so.3", "libssl.so"] {
        let cname = CString::new(name).expect("no NUL in library name");
        // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
        handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
    }
    if handle.is_null() {
        return Err("cannot load OpenSSL (libssl.so.3): TLS unavailable".into());
    }
    let sym = |name: &str| -> Result<Ptr, String> {
        let cname = CString::new(name).expect("no NUL in symbol name");
        // SAFETY: handle is a live dlopen handle, cname a valid C string.
        let p = unsafe { libc::dlsym(handle, cname.as_ptr()) };
        if p.is_null() {
            Err(format!("OpenSSL lacks {name}"))
        } else {
            Ok(p)
        }
    };
    resolve_api(sym)
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load_api).as_ref().map_err(Clone::clone)
}

/// Drains OpenSSL's error queue into one message.
fn take_errors(api: &Api) -> String {
    let mut parts = Vec::new();
    loop {
        // SAFETY: plain OpenSSL call on this thread's error queue.
        let code = unsafe { (api.err_get_error)() };
        if code == 0 {
            break;
        }
        let mut buf = [0 as c_char; 256];
        // SAFETY: buf is writable for its full length, which is passed along.
        unsafe { (api.err_error_string_n)(code, buf.as_mut_ptr(), buf.len()) };
        // SAFETY: ERR_error_string_n always NUL-terminates within the given length.
        parts.push(
            unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
    }
    if parts.is_empty() {
        "unknown TLS error".into()
    } else {
        parts.join("; ")
    }
}

/// An `SSL_CTX`: client (no certificate verification: the benchmark uses a throwaway
/// self-signed certificate) or server (certificate chain and key from PEM files). One per
/// process, never freed.
pub struct Context {
    api: &'static Api,
    ctx: Ptr,
}

impl Context {
    pub fn client() -> Result<Context, String> {
        let api = api()?;
        // SAFETY: TLS_client_method returns a static method table.
        let ctx = unsafe { (api.ctx_new)((api.tls_client_method)()) };
        Self::finish(api, ctx)
    }

    pub fn server(cert: &str, key: &str) -> Result<Context, String> {
        let api = api()?;
        // SAFETY: TLS_server_method returns a static method table.
        let ctx = unsafe { (api.ctx_new)((api.tls_server_method)()) };
        let this = Self::finish(api, ctx)?;
        let c_cert = CString::new(cert).map_err(|e| e.to_string())?;
        let c_key = CString::new(key).map_err(|e| e.to_string())?;
        // SAFETY: ctx is a live SSL_CTX, the paths valid C strings.
        let ok = unsafe {
            (api.ctx_use_chain_file)(this.ctx, c_cert.as_ptr()) == 1
                && (api.ctx_use_key_file)(this.ctx, c_key.as_ptr(), SSL_FILETYPE_PEM) == 1
        };
        if !ok {
            return Err(format!("cannot load {cert} / {key}: {}", take_errors(api)));
        }
        Ok(this)
    }

    fn finish(api: &'static Api, ctx: Ptr) -> Result<Context, String> {
        if ctx.is_null() {
            return Err(format!("SSL_CTX_new failed: {}", take_errors(api)));
        }
        let mode = SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER;
        // SAFETY: ctx is a live SSL_CTX; SSL_CTX_set_mode is this ctrl call.
        unsafe {
            (api.ctx_ctrl)(ctx, SSL_CTRL_MODE, mode, std::ptr::null_mut());
            (api.ctx_set_options)(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
        }
        Ok(Context { api, ctx })
    }

    /// A session on a connected, non-blocking socket (which must outlive it).
    pub fn session(&self, fd: RawFd, server: bool) -> Result<Session, String> {
        let api = self.api;
        // SAFETY: ctx is a live SSL_CTX.
        let ssl = unsafe { (api.ssl_new)(self.ctx) };
        if ssl.is_null() {
            return Err(format!("SSL_new failed: {}", take_errors(api)));
        }
        let session = Session { api, ssl };
        // SAFETY: ssl is a live SSL; fd an open socket.
        unsafe {
            if (api.ssl_set_fd)(ssl, fd) != 1 {
                return Err(format!("SSL_set_fd failed: {}", take_errors(api)));
            }
            if server {
                (api.ssl_set_accept_state)(ssl);
            } else {
                (api.ssl_set_connect_state)(ssl);
            }
        }
        Ok(session)
    }
}

/// One TLS session (an `SSL`), freed on drop.
pub struct Session {
    api: &'static Api,
    ssl: Ptr,
}

impl Session {
    fn error(&self, ret: c_int) -> io::Error {
        // SAFETY: ssl is live and ret is what the last SSL_read/SSL_write returned.
        let code = unsafe { (self.api.ssl_get_error)(self.ssl, ret) };
        match code {
            SSL_ERROR_WANT_READ | SSL_ERROR_WANT_WRITE => io::ErrorKind::WouldBlock.into(),
            SSL_ERROR_ZERO_RETURN => io::ErrorKind::UnexpectedEof.into(),
            SSL_ERROR_SYSCALL => {
                let os = io::Error::last_os_error();
                let detail = take_errors(self.api);
                if os.raw_os_error().unwrap_or(0) != 0 {
                    os
                } else {
                    io::Error::other(format!("TLS: {detail}"))
                }
            }
            _ => io::Error::other(format!("TLS: {}", take_errors(self.api))),
        }
    }

    /// Like `Read::read`: `Ok(0)` is the end of the stream, `WouldBlock` means wait for the
    /// socket (either direction: the handshake may need to write).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(c_int::MAX as usize) as c_int;
        // SAFETY: buf is writable for len bytes.
        let ret = unsafe { (self.api.ssl_read)(self.ssl, buf.as_mut_ptr().cast(), len) };
        if ret > 0 {
            return Ok(ret as usize);
        }
        match self.error(ret) {
            e if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            e => Err(e),
        }
    }

    /// Like `Write::write` (partial writes allowed).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = buf.len().min(c_int::MAX as usize) as c_int;
        // SAFETY: buf is readable for len bytes.
        let ret = unsafe { (self.api.ssl_write)(self.ssl, buf.as_ptr().cast(), len) };
        if ret > 0 {
            Ok(ret as usize)
        } else {
            Err(self.error(ret))
        }
    }

    /// Sends close_notify (without waiting for the peer's), so the peer sees a clean close.
    pub fn shutdown(&mut self) {
        // SAFETY: ssl is live; a failure here is irrelevant (we are closing anyway).
        unsafe { (self.api.ssl_shutdown)(self.ssl) };
        take_errors(self.api);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: ssl is live and owned by this session.
        unsafe { (self.api.ssl_free)(self.ssl) };
    }
}
