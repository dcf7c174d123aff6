//! The metrics endpoint: a minimal HTTP/1.1 responder on its own TCP port. `GET /metrics`
//! gets the page; anything else that parses as a request gets 404, anything that does not
//! gets 400. One request per connection, answered, then closed.
//!
//! It serves plain HTTP (a Prometheus scraper has no vmferry credentials, and the page
//! holds only counts: no VM, host or identity), so bind it to loopback or a management
//! network. What arrives is untrusted: every connection has one deadline for its whole
//! request, a size limit and a thread of its own within a small cap, so a silent,
//! slow or hostile client costs one thread for a bounded time and never blocks a
//! scrape or the daemon. It must never panic or wait without a deadline on what a client
//! sends, and it never serves anything but the rendered page.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a client may take to send its whole request (and we to send the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request taken: a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// At most this many connections are served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 16;
/// Headers parsed at most (more is a 431, as a request too long).
const MAX_HEADERS: usize = 32;

/// What renders the page (the daemon's [`super::Metrics::render`] with its tables).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves the endpoint until the listener fails; each connection on its own thread.
pub fn serve(listener: TcpListener, render: Render, timeout: Duration) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("metrics: accept failed: {e}");
                // A full fd table fails every accept at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!("metrics: too many connections; closing one unanswered");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (render, slot) = (render.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                handle(conn, &*render, timeout);
                slot.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("metrics: cannot start a thread: {e}");
        }
    }
}

/// Answers one connection and closes it.
fn handle(mut conn: TcpStream, render: &(dyn Fn() -> String + Send + Sync), timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let _ = conn.set_write_timeout(Some(timeout));
    let reply = match read_request(&mut conn, deadline) {
        Ok(Request { get, path }) => {
            // The query string does not matter (some scrapers add one).
            let path = path.split('?').next().unwrap_or_default();
            if get && path == "/metrics" {
                Reply::ok(render())
            } else {
                Reply::status(
                    "404 Not Found",
                    "not found: this port serves GET /metrics\n",
                )
            }
        }
        Err(RequestError::Closed) => return,
        Err(RequestError::Timeout) => {
            Reply::status("408 Request Timeout", "the request took too long\n")
        }
        Err(RequestError::TooLarge) => Reply::status(
            "431 Request Header Fields Too Large",
            "the request is too large\n",
        ),
        Err(RequestError::Malformed(why)) => {
            tracing::debug!("metrics: bad request: {why}");
            Reply::status("400 Bad Request", "bad request\n")
        }
    };
    let _ = conn.write_all(&reply.bytes());
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
    // Unread request bytes would make close send a reset, which can destroy the answer
    // before the client reads it: take what is left, briefly.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        match conn.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// The part of a request the responder looks at.
#[derive(Debug)]
struct Request {
    get: bool,
    path: String,
}

#[derive(Debug)]
enum RequestError {
    /// The client closed before sending anything (a port check).
    Closed,
    Timeout,
    TooLarge,
    Malformed(String),
}

/// Reads until the request's head is complete, all within `deadline`.
fn read_request(conn: &mut TcpStream, deadline: Instant) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout);
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = match conn.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(RequestError::Closed),
            Ok(0) => {
                return Err(RequestError::Malformed(
                    "the connection closed mid-request".into(),
                ))
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(RequestError::Timeout)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(Request {
                    get: req.method == Some("GET"),
                    path: req.path.unwrap_or_default().to_string(),
                })
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST => {
                return Err(RequestError::TooLarge)
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        }
    }
}

/// One answer, always closing the connection.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn ok(body: String) -> Reply {
        Reply {
            status: "200 OK",
            content_type: super::CONTENT_TYPE,
            body,
        }
    }

    fn status(status: &'static str, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A responder on a loopback port with `timeout`; its address.
    fn responder(timeout: Duration) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("local addr");
        let render: Render = Arc::new(|| "vmferry_test 1\n# EOF\n".to_string());
        std::thread::spawn(move || serve(l, render, timeout));
        addr
    }

    /// Sends `request`, then reads the whole answer (until the server closes).
    fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        c.write_all(request).expect("send");
        let mut out = String::new();
        c.read_to_string(&mut out)
            .expect("the server answers and closes");
        out
    }

    #[test]
    fn get_metrics_is_answered_with_the_page_and_a_length() {
        let addr = responder(REQUEST_TIMEOUT);
        let out = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Length: 21\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nvmferry_test 1\n# EOF\n"), "{out}");
        let out = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    }

    #[test]
    fn other_paths_and_methods_are_not_found() {
        let addr = responder(REQUEST_TIMEOUT);
        for req in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics/../etc/passwd HTTP/1.1\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ] {
            let out = exchange(addr, req);
            assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
            assert!(!out.contains("vmferry_test"), "{out}");
        }
    }

    #[test]
    fn a_garbage_request_line_gets_400_and_a_closed_connection() {
        let addr = responder(REQUEST_TIMEOUT);
        for req in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
            b"GET\x00/metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/9.9\r\n\r\n",
            b"\r\n\r\n\r\n\r\n\xff\xfe",
        ] {
            let out = exchange(addr, req);
            assert!(
                out.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{req:?}: {out}"
            );
        }
    }

    #[test]
    fn an_endless_request_is_cut_at_the_size_limit() {
        let addr = responder(REQUEST_TIMEOUT);
        let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while req.len() < MAX_REQUEST + 100 {
            req.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let out = exchange(addr, &req);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[test]
    fn a_slow_client_is_cut_off_at_the_deadline() {
        let addr = responder(Duration::from_millis(300));
        let started = Instant::now();
        // Half a request line, then silence; a byte now and then would not help either.
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        c.write_all(b"GET /met").expect("send");
        std::thread::sleep(Duration::from_millis(150));
        let _ = c.write_all(b"ri");
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        let took = started.elapsed();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        assert!(
            took < Duration::from_secs(3),
            "the server held a slow client for {took:?}"
        );
        // A client that connects and says nothing is closed too, without an answer
        // needed; the port still serves the next one.
        let silent = TcpStream::connect(addr).expect("connect");
        let out = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        drop(silent);
    }
}
