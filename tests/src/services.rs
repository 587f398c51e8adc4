//! Tiny real servers for tests, the demo and benchmarks, each bound inside a
//! namespace by the test process: a line-echo TCP server that names itself,
//! and a UDP echo server that does the same.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::Netns;

/// A server thread that stops (and is joined) on Drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
    pub name: String,
}

impl Server {
    /// Connections (TCP) or datagrams (UDP) served so far.
    pub fn served(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP: for every line received, answers `<name> <line>`; a connection stays
/// open until the client closes it. Answers a bare `GET` with an HTTP/1.0 reply.
pub fn tcp_echo(ns: &Netns, addr: SocketAddr, name: &str) -> Server {
    let listener = ns
        .enter(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("{}: bind tcp {addr}: {e}", ns.name()));
    // Blocking accept that wakes every 100 ms to check `stop` (Linux honours
    // SO_RCVTIMEO on accept): no polling delay on the connection path.
    set_recv_timeout(&listener, Duration::from_millis(100));
    spawn_server(addr, name, move |s, a, n| {
        while !s.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    a.fetch_add(1, Ordering::SeqCst);
                    let n = n.clone();
                    let s = s.clone();
                    std::thread::spawn(move || serve_lines(conn, &n, &s));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

/// Runs `serve(stop, served, name)` on a thread owned by the returned Server.
fn spawn_server(
    addr: SocketAddr,
    name: &str,
    serve: impl FnOnce(Arc<AtomicBool>, Arc<AtomicUsize>, String) + Send + 'static,
) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (s, a, n) = (stop.clone(), accepted.clone(), name.to_owned());
    let thread = std::thread::spawn(move || serve(s, a, n));
    Server {
        stop,
        accepted,
        thread: Some(thread),
        addr,
        name: name.to_owned(),
    }
}

fn set_recv_timeout(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid socket fd and a timeval of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_RCVTIMEO on listener: {}",
        std::io::Error::last_os_error()
    );
}

fn serve_lines(conn: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                let reply = if line.starts_with("GET ") {
                    let body = format!("{name}\n");
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    format!("{name} {}", line)
                };
                if writer.write_all(reply.as_bytes()).is_err() {
                    return;
                }
                if line.starts_with("GET ") {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// UDP: answers every datagram with `<name> <datagram>`.
pub fn udp_echo(ns: &Netns, addr: SocketAddr, name: &str) -> Server {
    let socket = ns
        .enter(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("{}: bind udp {addr}: {e}", ns.name()));
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    spawn_server(addr, name, move |s, a, n| {
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::SeqCst) {
            if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                a.fetch_add(1, Ordering::SeqCst);
                let mut reply = format!("{n} ").into_bytes();
                reply.extend_from_slice(&buf[..len]);
                let _ = socket.send_to(&reply, peer);
            }
        }
    })
}

/// One request/response over a fresh connection: returns the server's name.
pub fn tcp_ask(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut conn_w = conn.try_clone()?;
    conn_w.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    line.strip_suffix(" hello\n")
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer {line:?}")))
}

/// An open connection that can be asked again and again.
pub struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    pub fn open(addr: SocketAddr, timeout: Duration) -> std::io::Result<Session> {
        let conn = TcpStream::connect_timeout(&addr, timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        Ok(Session {
            writer: conn.try_clone()?,
            reader: BufReader::new(conn),
        })
    }

    /// Sends `msg` and returns the name of the server that echoed it.
    pub fn ask(&mut self, msg: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        line.strip_suffix(&format!(" {msg}\n"))
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other(format!("unexpected answer {line:?}")))
    }
}

/// One UDP request/response: returns the server's name.
pub fn udp_ask(socket: &UdpSocket, to: SocketAddr, msg: &str) -> std::io::Result<String> {
    socket.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.strip_suffix(&format!(" {msg}"))
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer {text:?}")))
}

/// One HTTP/1.0 GET of `path` from `to` (a fresh connection); the body,
/// trimmed. For `mesh-web` tasks, whose body names who answered. The read
/// waits 3 s for the answer, plus the hold of a `/slow/MS/...` request
/// (mesh-web says nothing until MS have passed: a 3 s read on a 3 s hold
/// raced the server, and lost under load).
pub fn http_get(to: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::Read as _;
    let hold = path
        .strip_prefix("/slow/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(3) + hold))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {out:?}")))
}
