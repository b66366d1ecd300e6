//! `portcullis healthcheck`: asks a running gateway's admin listener whether it is ready, for container health
//! checks in images that carry no curl.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("{0:?} is not an http:// URL with a host")]
    BadUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("no answer: {0}")]
    Exchange(#[from] std::io::Error),
    #[error("the answer is not HTTP")]
    NotHttp,
    #[error("answered {0}")]
    Status(u16),
}

/// GETs `url` (plain http, as the admin listener serves) within `timeout`; Ok when it answers 200.
pub fn probe(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let bad = || HealthcheckError::BadUrl(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    let port = authority.port_u16().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let addrs = (authority.host().trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|source| HealthcheckError::Connect { addr: authority.to_string(), source })?;
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining(deadline)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| HealthcheckError::Connect {
        addr: authority.to_string(),
        source: last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    })?;
    stream.set_write_timeout(Some(remaining(deadline)))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: portcullis-healthcheck\r\nConnection: close\r\n\r\n")?;
    // The status line is all that is needed: 12 bytes, "HTTP/1.1 200".
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        stream.set_read_timeout(Some(remaining(deadline)))?;
        match stream.read(&mut head[got..])? {
            0 => return Err(HealthcheckError::NotHttp),
            n => got += n,
        }
    }
    if !head.starts_with(b"HTTP/1.") || head[8] != b' ' {
        return Err(HealthcheckError::NotHttp);
    }
    let status = std::str::from_utf8(&head[9..12]).ok().and_then(|s| s.parse::<u16>().ok()).ok_or(HealthcheckError::NotHttp)?;
    if status == 200 {
        Ok(())
    } else {
        Err(HealthcheckError::Status(status))
    }
}

/// Time left before `deadline`; never zero, which the socket timeouts refuse.
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}
