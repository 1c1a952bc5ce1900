//! `load`: a request/response load generator for echo (and minimal HTTP) servers.
//!
//! One thread and one epoll instance (mio) drive every connection, so the client stays light
//! on CPU next to the server under test. Each connection repeatedly sends one message and
//! reads back exactly that many bytes, checking every byte against what it sent; then the
//! next message goes out. The result is one JSON line on stdout.

use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket, UnixStream};
use mio::{Events, Interest, Poll, Token};
use netload::{Args, Stream, emit, json_str, own_cpu_seconds, raise_nofile_limit, resolve, tls};

const USAGE: &str = "\
usage: load (--tcp HOST:PORT | --unix PATH | --udp HOST:PORT) [options]

  --conns N        concurrent connections (UDP: sockets), each with one request in flight [1]
  --size BYTES     message size [1024]; UDP: at least 8, at most 65507
  --duration S     measure for S seconds (requests in flight at the end still complete) [2]
  --requests N     measure exactly N requests instead (over all connections)
  --warmup S       run S seconds of load before measuring, not counted [0]
  --tls            TLS over TCP (OpenSSL, no certificate verification)
  --http           send `GET / HTTP/1.1` (keep-alive) and read Content-Length responses
                   instead of echo messages
  --sync           after connecting and warming up, print {\"ready\": true} and wait for a line
                   on stdin before measuring
  --hold           after the result, keep the connections open until a line (or EOF) on stdin
  --timeout S      a request without a complete response for S seconds is an error [10]
  --udp-retry S    UDP: a datagram without a reply for S seconds counts as lost and the next
                   one is sent [0.5]

Output: one JSON line: requests, bytes (payload echoed, or response bytes for --http),
seconds, req_per_s, mib_per_s, p50_us, p99_us (latency from first byte sent to last byte
received), errors (connections that failed: wrong echo, closed, reset, timed out), error
(the first one), lost/late (UDP), client_cpu_s (this process, while measuring).
Exit status 1 if errors > 0 or no request completed, 2 on bad usage.";

const SCRATCH: usize = 256 * 1024;
const PATTERN_SLACK: usize = 256;
const SCAN_EVERY: Duration = Duration::from_millis(50);

#[derive(Clone)]
enum Target {
    Tcp(SocketAddr),
    Unix(String),
    Udp(SocketAddr),
}

#[derive(Clone, Copy)]
enum Limit {
    Seconds(f64),
    Requests(u64),
}

struct Config {
    target: Target,
    tls: bool,
    http: bool,
    conns: usize,
    size: usize,
    limit: Limit,
    warmup: f64,
    sync: bool,
    hold: bool,
    timeout: Duration,
    udp_retry: Duration,
}

fn parse_config() -> Result<Config, String> {
    let mut args = Args::from_env();
    let mut target = None;
    let mut cfg = Config {
        target: Target::Unix(String::new()),
        tls: false,
        http: false,
        conns: 1,
        size: 1024,
        limit: Limit::Seconds(2.0),
        warmup: 0.0,
        sync: false,
        hold: false,
        timeout: Duration::from_secs(10),
        udp_retry: Duration::from_millis(500),
    };
    let secs = |v: f64, flag: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("{flag}: bad value {v}"))
        }
    };
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--tcp" => target = Some(Target::Tcp(resolve(&args.value(&flag)?)?)),
            "--udp" => target = Some(Target::Udp(resolve(&args.value(&flag)?)?)),
            "--unix" => target = Some(Target::Unix(args.value(&flag)?)),
            "--tls" => cfg.tls = true,
            "--http" => cfg.http = true,
            "--conns" => cfg.conns = args.parsed(&flag)?,
            "--size" => cfg.size = args.parsed(&flag)?,
            "--duration" => cfg.limit = Limit::Seconds(args.parsed(&flag)?),
            "--requests" => cfg.limit = Limit::Requests(args.parsed(&flag)?),
            "--warmup" => cfg.warmup = args.parsed(&flag)?,
            "--sync" => cfg.sync = true,
            "--hold" => cfg.hold = true,
            "--timeout" => cfg.timeout = secs(args.parsed(&flag)?, &flag)?,
            "--udp-retry" => cfg.udp_retry = secs(args.parsed(&flag)?, &flag)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    cfg.target = target.ok_or("one of --tcp, --unix, --udp is required")?;
    if cfg.conns == 0 {
        return Err("--conns must be at least 1".into());
    }
    if let Limit::Seconds(s) = cfg.limit {
        secs(s, "--duration")?;
    }
    secs(cfg.warmup, "--warmup")?;
    match cfg.target {
        Target::Udp(_) if cfg.tls || cfg.http => return Err("--udp takes no --tls/--http".into()),
        Target::Udp(_) if !(8..=65507).contains(&cfg.size) => {
            return Err("--udp needs 8 <= --size <= 65507".into());
        }
        Target::Unix(_) if cfg.tls => return Err("--tls needs --tcp".into()),
        _ if cfg.size == 0 && !cfg.http => return Err("--size must be at least 1".into()),
        _ => {}
    }
    Ok(cfg)
}

enum Io {
    Stream(Stream),
    Udp(UdpSocket),
}

struct Conn {
    io: Option<Io>, // None once the connection failed
    busy: bool,
    seq: u64,
    offset: usize, // where the current message starts in the pattern
    sent: usize,
    got: usize,
    started: Instant,
    resp: Vec<u8>, // --http: the response so far
}

#[derive(Default)]
struct PhaseStats {
    issued: u64,
    completed: u64,
    bytes: u64,
    lost: u64,
    late: u64,
    latencies_ns: Vec<u64>,
    seconds: f64,
    client_cpu: f64,
}

struct Phase {
    record: bool,
    deadline: Option<Instant>,
    max_requests: Option<u64>,
    stats: PhaseStats,
}

impl Phase {
    fn may_start(&self, now: Instant) -> bool {
        self.deadline.is_none_or(|d| now < d)
            && self.max_requests.is_none_or(|n| self.stats.issued < n)
    }
}

struct Driver {
    cfg: Config,
    poll: Poll,
    conns: Vec<Conn>,
    busy: usize,
    pattern: Vec<u8>,
    http_request: Vec<u8>,
    scratch: Vec<u8>,
    errors: u64,
    first_error: Option<String>,
}

/// Deterministic pseudo-random bytes (xorshift64*), so a shifted or mixed-up echo shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn connect(cfg: &Config, tls_ctx: Option<&tls::Context>) -> Result<Io, String> {
    match &cfg.target {
        Target::Tcp(addr) => {
            let s =
                std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let s = TcpStream::from_std(s);
            Ok(Io::Stream(match tls_ctx {
                Some(ctx) => {
                    use std::os::fd::AsRawFd;
                    let session = ctx.session(s.as_raw_fd(), false)?;
                    Stream::Tls(s, session)
                }
                None => Stream::Tcp(s),
            }))
        }
        Target::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("connect {path}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(Io::Stream(Stream::Unix(UnixStream::from_std(s))))
        }
        Target::Udp(addr) => {
            let local: SocketAddr = if addr.is_ipv6() {
                "[::]:0".parse()
            } else {
                "0.0.0.0:0".parse()
            }
            .expect("literal address");
            let s = std::net::UdpSocket::bind(local).map_err(|e| e.to_string())?;
            s.connect(addr)
                .map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(Io::Udp(UdpSocket::from_std(s)))
        }
    }
}

impl Driver {
    fn new(cfg: Config) -> Result<Driver, String> {
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        let tls_ctx = if cfg.tls {
            Some(tls::Context::client()?)
        } else {
            None
        };
        let host = match &cfg.target {
            Target::Tcp(a) => a.to_string(),
            _ => "localhost".into(),
        };
        let http_request =
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: netload\r\nAccept: */*\r\n\r\n")
                .into_bytes();
        let now = Instant::now();
        let mut conns = Vec::with_capacity(cfg.conns);
        for i in 0..cfg.conns {
            let mut io = connect(&cfg, tls_ctx.as_ref())?;
            let interest = Interest::READABLE | Interest::WRITABLE;
            let reg = poll.registry();
            match &mut io {
                Io::Stream(s) => reg.register(s.source(), Token(i), interest),
                Io::Udp(u) => reg.register(u, Token(i), interest),
            }
            .map_err(|e| format!("epoll register: {e}"))?;
            conns.push(Conn {
                io: Some(io),
                busy: false,
                seq: 0,
                offset: 0,
                sent: 0,
                got: 0,
                started: now,
                resp: Vec::new(),
            });
        }
        Ok(Driver {
            pattern: pattern(cfg.size + PATTERN_SLACK),
            cfg,
            poll,
            conns,
            busy: 0,
            http_request,
            scratch: vec![0; SCRATCH],
            errors: 0,
            first_error: None,
        })
    }

    fn fail(&mut self, i: usize, msg: String) {
        let c = &mut self.conns[i];
        if c.busy {
            c.busy = false;
            self.busy -= 1;
        }
        if let Some(mut io) = c.io.take() {
            let reg = self.poll.registry();
            let _ = match &mut io {
                Io::Stream(s) => reg.deregister(s.source()),
                Io::Udp(u) => reg.deregister(u),
            };
        }
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("connection {i}: {msg}"));
        }
    }

    fn start(&mut self, i: usize, ph: &mut Phase, now: Instant) {
        let c = &mut self.conns[i];
        c.seq += 1;
        c.offset = (i.wrapping_mul(31) + c.seq as usize) % PATTERN_SLACK;
        c.sent = 0;
        c.got = 0;
        c.resp.clear();
        c.started = now;
        if !c.busy {
            c.busy = true;
            self.busy += 1;
        }
        ph.stats.issued += 1;
    }

    /// A response is complete: count it, then start the next request or go idle.
    /// Returns whether a new request was started.
    fn complete(&mut self, i: usize, ph: &mut Phase, bytes: usize) -> bool {
        let now = Instant::now();
        let c = &mut self.conns[i];
        if ph.record {
            ph.stats
                .latencies_ns
                .push((now - c.started).as_nanos() as u64);
        }
        ph.stats.completed += 1;
        ph.stats.bytes += bytes as u64;
        if ph.may_start(now) {
            self.start(i, ph, now);
            true
        } else {
            self.conns[i].busy = false;
            self.busy -= 1;
            false
        }
    }

    fn drive(&mut self, i: usize, ph: &mut Phase) {
        let r = match self.conns[i].io {
            Some(Io::Stream(_)) => self.drive_stream(i, ph),
            Some(Io::Udp(_)) => self.drive_udp(i, ph),
            None => Ok(()),
        };
        if let Err(msg) = r {
            self.fail(i, msg);
        }
    }

    fn drive_stream(&mut self, i: usize, ph: &mut Phase) -> Result<(), String> {
        let size = self.cfg.size;
        loop {
            let Driver {
                conns,
                pattern,
                http_request,
                scratch,
                cfg,
                ..
            } = self;
            let c = &mut conns[i];
            let Some(Io::Stream(s)) = &mut c.io else {
                return Ok(());
            };
            let request: &[u8] = if cfg.http {
                http_request
            } else {
                &pattern[c.offset..c.offset + size]
            };
            while c.busy && c.sent < request.len() {
                match s.write(&request[c.sent..]) {
                    Ok(n) => c.sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            let mut done = None;
            while done.is_none() {
                let n = match s.read(scratch) {
                    Ok(0) if c.busy => {
                        return Err(format!(
                            "server closed the connection after {} of {} bytes",
                            c.got,
                            if cfg.http { c.resp.len() } else { size }
                        ));
                    }
                    Ok(0) => return Err("server closed the connection".into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("recv: {e}")),
                };
                if !c.busy {
                    return Err(format!("{n} unexpected bytes from the server while idle"));
                }
                let data = &scratch[..n];
                if cfg.http {
                    c.resp.extend_from_slice(data);
                    c.got = c.resp.len();
                    if let Some(total) = http_response_len(&c.resp)? {
                        if c.resp.len() > total {
                            return Err(format!(
                                "{} bytes after a {total}-byte response (none requested)",
                                c.resp.len() - total
                            ));
                        }
                        if c.resp.len() == total {
                            done = Some(total);
                        }
                    }
                } else {
                    if c.got + n > size {
                        return Err(format!(
                            "server sent {} bytes for a {size}-byte message",
                            c.got + n
                        ));
                    }
                    let want = &request[c.got..c.got + n];
                    if data != want {
                        let at = data.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                        return Err(format!(
                            "echo mismatch at byte {} of message {} ({size} bytes)",
                            c.got + at,
                            c.seq
                        ));
                    }
                    c.got += n;
                    if c.got == size {
                        if c.sent != size {
                            return Err("echo complete before the message was sent".into());
                        }
                        done = Some(size);
                    }
                }
            }
            match done {
                Some(bytes) if self.complete(i, ph, bytes) => continue, // send the next one now
                _ => return Ok(()),
            }
        }
    }

    fn drive_udp(&mut self, i: usize, ph: &mut Phase) -> Result<(), String> {
        let size = self.cfg.size;
        loop {
            let Driver {
                conns,
                pattern,
                scratch,
                ..
            } = self;
            let c = &mut conns[i];
            let Some(Io::Udp(sock)) = &mut c.io else {
                return Ok(());
            };
            let payload = &pattern[c.offset..c.offset + size - 8];
            if c.busy && c.sent == 0 {
                let buf = &mut scratch[..size];
                buf[..8].copy_from_slice(&c.seq.to_le_bytes());
                buf[8..].copy_from_slice(payload);
                match sock.send(buf) {
                    Ok(n) if n == size => c.sent = size,
                    Ok(n) => return Err(format!("short datagram send: {n} of {size} bytes")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            let mut done = false;
            while !done {
                let n = match sock.recv(scratch) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("recv: {e}")),
                };
                if n < 8 {
                    return Err(format!("{n}-byte datagram (sent {size})"));
                }
                let seq = u64::from_le_bytes(scratch[..8].try_into().expect("8 bytes"));
                if !c.busy || seq < c.seq {
                    ph.stats.late += 1; // the reply to a datagram already counted as lost
                    continue;
                }
                if seq > c.seq || n != size || scratch[8..n] != *payload {
                    return Err(format!(
                        "echo mismatch: datagram {seq} of {n} bytes for {} of {size} bytes",
                        c.seq
                    ));
                }
                done = true;
            }
            if done && self.complete(i, ph, size) {
                continue;
            }
            return Ok(());
        }
    }

    /// Requests without a response for too long: TCP errors, UDP losses (resent).
    fn scan_timeouts(&mut self, ph: &mut Phase, now: Instant) {
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            if !c.busy {
                continue;
            }
            let waited = now - c.started;
            match c.io {
                Some(Io::Udp(_)) if waited > self.cfg.udp_retry => {
                    ph.stats.lost += 1;
                    ph.stats.issued -= 1;
                    if ph.may_start(now) {
                        self.start(i, ph, now);
                        self.drive(i, ph);
                    } else {
                        self.conns[i].busy = false;
                        self.busy -= 1;
                    }
                }
                Some(Io::Stream(_)) if waited > self.cfg.timeout => {
                    let msg = format!(
                        "no complete response within {:.1}s ({} bytes received, {} sent); \
                         server hung?",
                        self.cfg.timeout.as_secs_f64(),
                        c.got,
                        c.sent
                    );
                    self.fail(i, msg);
                }
                _ => {}
            }
        }
    }

    /// Runs load until `limit` is reached, then lets the requests in flight finish.
    fn run(&mut self, limit: Limit, record: bool) -> PhaseStats {
        let t0 = Instant::now();
        let mut ph = Phase {
            record,
            deadline: match limit {
                Limit::Seconds(s) => Some(t0 + Duration::from_secs_f64(s)),
                Limit::Requests(_) => None,
            },
            max_requests: match limit {
                Limit::Requests(n) => Some(n),
                Limit::Seconds(_) => None,
            },
            stats: PhaseStats::default(),
        };
        if record {
            let expect = match limit {
                Limit::Requests(n) => n as usize,
                Limit::Seconds(s) => (s * 20_000.0) as usize,
            };
            ph.stats.latencies_ns.reserve(expect.min(4_000_000));
        }
        for i in 0..self.conns.len() {
            if self.conns[i].io.is_some() && ph.may_start(t0) {
                self.start(i, &mut ph, t0);
                self.drive(i, &mut ph);
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut last_scan = t0;
        while self.busy > 0 {
            if let Err(e) = self.poll.poll(&mut events, Some(SCAN_EVERY))
                && e.kind() != io::ErrorKind::Interrupted
            {
                eprintln!("load: epoll_wait: {e}");
                std::process::exit(1);
            }
            for ev in events.iter() {
                self.drive(ev.token().0, &mut ph);
            }
            let now = Instant::now();
            if now - last_scan >= SCAN_EVERY {
                last_scan = now;
                self.scan_timeouts(&mut ph, now);
            }
        }
        ph.stats.seconds = t0.elapsed().as_secs_f64();
        ph.stats
    }

    fn close(&mut self) {
        for c in &mut self.conns {
            if let Some(Io::Stream(s)) = &mut c.io {
                s.close_tls();
            }
            c.io = None;
        }
    }
}

/// Total length (head + body) of the HTTP response at the start of `buf`, once its head is
/// complete. Only `200` responses with a Content-Length are accepted.
fn http_response_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("HTTP response head longer than 64 KiB".into());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.split(' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code != "200" {
        return Err(format!("HTTP status line {status:?}, expected 200"));
    }
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let len: usize = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            return Ok(Some(end + 4 + len));
        }
    }
    Err("HTTP response without Content-Length".into())
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

fn wait_for_stdin_line() {
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
}

fn result_json(cfg: &Config, st: &mut PhaseStats, errors: u64, error: Option<&str>) -> String {
    st.latencies_ns.sort_unstable();
    let secs = st.seconds.max(1e-9);
    let mode = match cfg.target {
        Target::Tcp(_) => "tcp",
        Target::Unix(_) => "unix",
        Target::Udp(_) => "udp",
    };
    format!(
        "{{\"mode\": \"{mode}\", \"tls\": {}, \"http\": {}, \"conns\": {}, \"size\": {}, \
         \"requests\": {}, \"bytes\": {}, \"seconds\": {:.6}, \"req_per_s\": {:.1}, \
         \"mib_per_s\": {:.3}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"errors\": {errors}, \
         \"lost\": {}, \"late\": {}, \"client_cpu_s\": {:.3}, \"error\": {}}}",
        cfg.tls,
        cfg.http,
        cfg.conns,
        cfg.size,
        st.completed,
        st.bytes,
        st.seconds,
        st.completed as f64 / secs,
        st.bytes as f64 / secs / (1024.0 * 1024.0),
        percentile_us(&st.latencies_ns, 0.50),
        percentile_us(&st.latencies_ns, 0.99),
        st.lost,
        st.late,
        st.client_cpu,
        error.map_or_else(|| "null".into(), json_str),
    )
}

fn main() -> ExitCode {
    let cfg = match parse_config() {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("load: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    raise_nofile_limit();
    let (limit, warmup, sync, hold) = (cfg.limit, cfg.warmup, cfg.sync, cfg.hold);
    let mut driver = match Driver::new(cfg) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("load: {msg}");
            emit(&format!(
                "{{\"requests\": 0, \"errors\": 1, \"error\": {}}}",
                json_str(&msg)
            ));
            return ExitCode::FAILURE;
        }
    };
    let mut warm = PhaseStats::default();
    if warmup > 0.0 {
        warm = driver.run(Limit::Seconds(warmup), false);
    }
    if sync {
        emit(&format!(
            "{{\"ready\": true, \"warmup_requests\": {}}}",
            warm.completed
        ));
        wait_for_stdin_line();
    }
    let cpu_before = own_cpu_seconds();
    let mut stats = if driver.errors == 0 {
        driver.run(limit, true)
    } else {
        PhaseStats::default()
    };
    stats.client_cpu = own_cpu_seconds() - cpu_before;
    let line = result_json(
        &driver.cfg,
        &mut stats,
        driver.errors,
        driver.first_error.as_deref(),
    );
    emit(&line);
    if hold {
        wait_for_stdin_line();
    }
    driver.close();
    if driver.errors > 0 || stats.completed == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
