//! `echo-server`: the native reference server of the network benchmarks.
//!
//! One thread, one epoll instance (mio, edge-triggered), like a single-threaded asyncio
//! loop: it echoes TCP, Unix-socket and TLS streams and UDP datagrams, or answers minimal
//! HTTP/1.1 keep-alive requests. Its CPU time per request is the machine's floor for a
//! server doing the same work.
//!
//! It prints `{"port": N}` (or `{"path": ...}`) once listening, and runs until stdin reaches
//! end-of-file (or it is killed); then it prints `{"errors": N, ...}` and exits (status 1 if
//! a connection failed for any reason other than the client going away).

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use mio::net::{TcpListener, UdpSocket, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use netload::{Args, Stream, emit, is_disconnect, json_str, raise_nofile_limit, resolve, tls};

const USAGE: &str = "\
usage: echo-server (--tcp HOST:PORT | --unix PATH | --udp HOST:PORT) [--tls CERT KEY] [--http]

  --tcp HOST:PORT   TCP echo (port 0: any free port, printed as {\"port\": N})
  --unix PATH       Unix stream socket echo
  --udp HOST:PORT   UDP echo: every datagram goes back to its sender
  --tls CERT KEY    TLS over TCP (PEM certificate chain and key)
  --http            answer each HTTP/1.1 request head with a fixed 200 response (keep-alive)
                    instead of echoing

Runs until stdin reaches end-of-file, then prints {\"errors\": N, ...} on stdout.";

const LISTENER: Token = Token(usize::MAX - 1);
const STDIN: Token = Token(usize::MAX - 2);
const BUF: usize = 256 * 1024;
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!";

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Udp(UdpSocket),
}

struct Conn {
    stream: Stream,
    pending: Vec<u8>, // bytes not yet written back (the socket was full)
    pending_off: usize,
    head_tail: usize, // --http: how many bytes of "\r\n\r\n" the last chunk ended with
}

struct Server {
    poll: Poll,
    listener: Listener,
    tls: Option<tls::Context>,
    http: bool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    buf: Vec<u8>,
    errors: u64,
    first_error: Option<String>,
    dropped_datagrams: u64,
}

fn parse() -> Result<(Listener, Option<tls::Context>, bool, String), String> {
    let mut args = Args::from_env();
    let mut listener = None;
    let mut tls_ctx = None;
    let mut http = false;
    let mut describe = String::new();
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--tcp" => {
                let addr = resolve(&args.value(&flag)?)?;
                let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
                let port = l.local_addr().map_err(|e| e.to_string())?.port();
                describe = format!("{{\"port\": {port}}}");
                listener = Some(Listener::Tcp(l));
            }
            "--udp" => {
                let addr = resolve(&args.value(&flag)?)?;
                let s = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
                let port = s.local_addr().map_err(|e| e.to_string())?.port();
                describe = format!("{{\"port\": {port}}}");
                listener = Some(Listener::Udp(s));
            }
            "--unix" => {
                let path = args.value(&flag)?;
                let l = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
                describe = format!("{{\"path\": {}}}", json_str(&path));
                listener = Some(Listener::Unix(l));
            }
            "--tls" => {
                let cert = args.value(&flag)?;
                let key = args.value(&flag)?;
                tls_ctx = Some(tls::Context::server(&cert, &key)?);
            }
            "--http" => http = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let listener = listener.ok_or("one of --tcp, --unix, --udp is required")?;
    if tls_ctx.is_some() && !matches!(listener, Listener::Tcp(_)) {
        return Err("--tls needs --tcp".into());
    }
    if http && matches!(listener, Listener::Udp(_)) {
        return Err("--http needs a stream socket".into());
    }
    Ok((listener, tls_ctx, http, describe))
}

/// Counts complete request heads ("\r\n\r\n") in `data`, continuing a match of `tail` bytes
/// left over from the previous chunk; returns (count, new tail).
fn count_heads(data: &[u8], mut tail: usize) -> (usize, usize) {
    const END: &[u8] = b"\r\n\r\n";
    let mut count = 0;
    for &b in data {
        tail = if b == END[tail] {
            tail + 1
        } else if b == b'\r' {
            1
        } else {
            0
        };
        if tail == END.len() {
            count += 1;
            tail = 0;
        }
    }
    (count, tail)
}

impl Server {
    fn error(&mut self, msg: String) {
        self.errors += 1;
        eprintln!("echo-server: {msg}");
        if self.first_error.is_none() {
            self.first_error = Some(msg);
        }
    }

    fn accept(&mut self) {
        loop {
            let accepted = match &self.listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    s
                }),
                Listener::Unix(l) => match l.accept() {
                    Ok((s, _)) => {
                        self.add(Stream::Unix(s));
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Listener::Udp(_) => return,
            };
            match accepted {
                Ok(s) => {
                    let stream = match &self.tls {
                        Some(ctx) => match ctx.session(s.as_raw_fd(), true) {
                            Ok(session) => Stream::Tls(s, session),
                            Err(msg) => {
                                self.error(msg);
                                continue;
                            }
                        },
                        None => Stream::Tcp(s),
                    };
                    self.add(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_disconnect(&e) => {}
                Err(e) => {
                    // EMFILE and the like: report once per burst and wait for the next event.
                    self.error(format!("accept: {e}"));
                    return;
                }
            }
        }
    }

    fn add(&mut self, mut stream: Stream) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(stream.source(), Token(idx), interest)
        {
            self.free.push(idx);
            self.error(format!("epoll register: {e}"));
            return;
        }
        self.conns[idx] = Some(Conn {
            stream,
            pending: Vec::new(),
            pending_off: 0,
            head_tail: 0,
        });
        self.serve(idx);
    }

    fn close(&mut self, idx: usize) {
        if let Some(mut c) = self.conns[idx].take() {
            let _ = self.poll.registry().deregister(c.stream.source());
            self.free.push(idx);
        }
    }

    /// Echoes (or answers) everything readable on one connection, as far as the socket
    /// takes it; unwritten bytes wait for the next writable event (and reading pauses).
    fn serve(&mut self, idx: usize) {
        let result = (|| -> io::Result<bool> {
            let Server {
                conns, buf, http, ..
            } = self;
            let Some(c) = conns[idx].as_mut() else {
                return Ok(true);
            };
            loop {
                while c.pending_off < c.pending.len() {
                    match c.stream.write(&c.pending[c.pending_off..]) {
                        Ok(n) => c.pending_off += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                        Err(e) => return Err(e),
                    }
                }
                c.pending.clear();
                c.pending_off = 0;
                let n = match c.stream.read(buf) {
                    Ok(0) => return Ok(false),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                    Err(e) => return Err(e),
                };
                if *http {
                    let (count, tail) = count_heads(&buf[..n], c.head_tail);
                    c.head_tail = tail;
                    c.pending.reserve(count * RESPONSE.len());
                    for _ in 0..count {
                        c.pending.extend_from_slice(RESPONSE);
                    }
                    continue; // written at the top of the loop
                }
                let mut off = 0;
                while off < n {
                    match c.stream.write(&buf[off..n]) {
                        Ok(w) => off += w,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                c.pending.extend_from_slice(&buf[off..n]);
            }
        })();
        match result {
            Ok(true) => {}
            Ok(false) => self.close(idx),
            Err(e) => {
                if !is_disconnect(&e) {
                    self.error(format!("connection: {e}"));
                }
                self.close(idx);
            }
        }
    }

    fn serve_udp(&mut self) {
        let mut failures = Vec::new();
        let Listener::Udp(sock) = &self.listener else {
            return;
        };
        loop {
            let (n, peer) = match sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    failures.push(format!("recvfrom: {e}"));
                    break;
                }
            };
            match sock.send_to(&self.buf[..n], peer) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dropped_datagrams += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => failures.push(format!("sendto {peer}: {e}")),
            }
        }
        for msg in failures {
            self.error(msg);
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let reg = self.poll.registry();
        match &mut self.listener {
            Listener::Tcp(l) => reg.register(l, LISTENER, Interest::READABLE)?,
            Listener::Unix(l) => reg.register(l, LISTENER, Interest::READABLE)?,
            Listener::Udp(s) => reg.register(s, LISTENER, Interest::READABLE)?,
        }
        // stdin: end-of-file stops the server. Not pollable (e.g. /dev/null): run until killed.
        let stdin_fd = 0;
        let watch_stdin = reg
            .register(&mut SourceFd(&stdin_fd), STDIN, Interest::READABLE)
            .is_ok();
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER if matches!(self.listener, Listener::Udp(_)) => self.serve_udp(),
                    LISTENER => self.accept(),
                    STDIN if watch_stdin => {
                        let mut b = [0u8; 256];
                        match io::stdin().lock().read(&mut b) {
                            Ok(0) | Err(_) => return Ok(()),
                            Ok(_) => {}
                        }
                    }
                    Token(idx) => self.serve(idx),
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let (listener, tls_ctx, http, describe) = match parse() {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("echo-server: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    raise_nofile_limit();
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("echo-server: epoll: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server = Server {
        poll,
        listener,
        tls: tls_ctx,
        http,
        conns: Vec::new(),
        free: Vec::new(),
        buf: vec![0; BUF],
        errors: 0,
        first_error: None,
        dropped_datagrams: 0,
    };
    emit(&describe);
    if let Err(e) = server.run() {
        server.error(format!("epoll: {e}"));
    }
    emit(&format!(
        "{{\"errors\": {}, \"error\": {}, \"dropped_datagrams\": {}}}",
        server.errors,
        server
            .first_error
            .as_deref()
            .map_or_else(|| "null".into(), json_str),
        server.dropped_datagrams
    ));
    if server.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
