//! Shared pieces of the two netload binaries: `load` (the load generator) and `echo-server`
//! (the native reference server). See benchmarks/README.md, "Network benchmarks".

pub mod tls;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};

/// A connected byte stream: TCP, Unix or TLS over TCP, all non-blocking and registered with
/// one mio poll.
pub enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
    Tls(mio::net::TcpStream, tls::Session),
}

impl Stream {
    /// `Ok(0)` is end of stream; `WouldBlock` means wait for the next readiness event.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Stream::Tcp(s) => s.read(buf),
                Stream::Unix(s) => s.read(buf),
                Stream::Tls(_, t) => t.read(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Stream::Tcp(s) => s.write(buf),
                Stream::Unix(s) => s.write(buf),
                Stream::Tls(_, t) => t.write(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    pub fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) | Stream::Tls(s, _) => s,
            Stream::Unix(s) => s,
        }
    }

    /// Sends TLS close_notify if this is a TLS stream (no-op otherwise).
    pub fn close_tls(&mut self) {
        if let Stream::Tls(_, t) = self {
            t.shutdown();
        }
    }
}

/// Whether an I/O error just means the peer went away (not a failure of the server).
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Resolves `HOST:PORT` (`[::1]:PORT` for IPv6) to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr:?} resolves to nothing"))
}

/// Raises the soft limit on open files to the hard limit (1000 idle connections need it).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill in / read from.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// CPU time (user + system, seconds) this process has used so far.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is a valid value to be overwritten by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is valid for writes.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prints one line on stdout and flushes it (the runner reads stdout line by line).
pub fn emit(line: &str) {
    let mut out = io::stdout().lock();
    // A closed stdout only means nobody listens any more; nothing to do about it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Minimal command-line parsing: `--flag` and `--option VALUE` pairs.
pub struct Args {
    args: Vec<String>,
    pos: usize,
}

impl Args {
    pub fn from_env() -> Args {
        Args {
            args: std::env::args().skip(1).collect(),
            pos: 0,
        }
    }

    /// The next option name, or None at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        let a = self.args.get(self.pos)?.clone();
        self.pos += 1;
        Some(a)
    }

    pub fn value(&mut self, flag: &str) -> Result<String, String> {
        let v = self
            .args
            .get(self.pos)
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        self.pos += 1;
        Ok(v)
    }

    pub fn parsed<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, String> {
        let v = self.value(flag)?;
        v.parse().map_err(|_| format!("{flag}: bad value {v:?}"))
    }
}
