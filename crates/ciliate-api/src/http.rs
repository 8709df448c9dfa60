//! Just enough HTTP/1.1: one request and one response per connection,
//! bodies sized by `Content-Length`. Limits keep a bad peer from making the
//! agent allocate without bound.

use std::io::{BufRead, BufReader, Read, Write};

/// Largest header block and body accepted.
pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP: {0}")]
    Malformed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query string parameters, in order.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Read the head (start line and headers); returns the start line and the
/// content length.
fn read_head(r: &mut impl BufRead) -> Result<(String, usize), HttpError> {
    let mut start = String::new();
    let mut total = r.read_line(&mut start)?;
    if total == 0 {
        return Err(HttpError::Malformed("connection closed before a request".into()));
    }
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        total += n;
        if total > MAX_HEAD {
            return Err(HttpError::Malformed(format!("headers over {MAX_HEAD} bytes")));
        }
        let line = line.trim_end();
        if n == 0 || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v
                .trim()
                .parse()
                .map_err(|_| HttpError::Malformed(format!("content-length {v:?}")))?;
        }
    }
    if len > MAX_BODY {
        return Err(HttpError::Malformed(format!("body of {len} bytes, limit {MAX_BODY}")));
    }
    Ok((start.trim_end().to_owned(), len))
}

fn read_body(r: &mut impl Read, len: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escape a query-string value.
pub fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn read_request(stream: impl Read) -> Result<Request, HttpError> {
    let mut r = BufReader::new(stream);
    let (start, len) = read_head(&mut r)?;
    let mut parts = start.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(format!("request line {start:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed(format!("version {version:?}")));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect();
    let body = read_body(&mut r, len)?;
    Ok(Request { method: method.to_owned(), path: unescape(path), query, body })
}

pub fn write_response(mut w: impl Write, resp: &Response) -> Result<(), HttpError> {
    write!(
        w,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len()
    )?;
    w.write_all(&resp.body)?;
    w.flush()?;
    Ok(())
}

pub fn write_request(
    mut w: impl Write,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<(), HttpError> {
    write!(
        w,
        "{method} {target} HTTP/1.1\r\nHost: ciliate\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()?;
    Ok(())
}

pub fn read_response(stream: impl Read) -> Result<Response, HttpError> {
    let mut r = BufReader::new(stream);
    let (start, len) = read_head(&mut r)?;
    let status = start
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("status line {start:?}")))?;
    let body = read_body(&mut r, len)?;
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips() {
        let mut buf = Vec::new();
        write_request(&mut buf, "PUT", "/v1/endpoint?container-id=a%20b&x=1", b"{\"k\":1}")
            .unwrap();
        let r = read_request(&buf[..]).unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/v1/endpoint"));
        assert_eq!(r.query("container-id"), Some("a b"));
        assert_eq!(r.query("x"), Some("1"));
        assert_eq!(r.body, b"{\"k\":1}");
    }

    #[test]
    fn a_response_round_trips() {
        let mut buf = Vec::new();
        write_response(&mut buf, &Response { status: 404, body: b"{}".to_vec() }).unwrap();
        assert_eq!(
            read_response(&buf[..]).unwrap(),
            Response { status: 404, body: b"{}".to_vec() }
        );
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused() {
        assert!(read_request(&b"GARBAGE\r\n\r\n"[..]).is_err());
        assert!(read_request(&b""[..]).is_err());
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let e = read_request(big.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        let e = read_request(&b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..]).unwrap_err();
        assert!(e.to_string().contains("content-length"));
    }

    #[test]
    fn escaping_round_trips() {
        let s = "k8s:app=web&x y/%";
        let mut buf = Vec::new();
        write_request(&mut buf, "GET", &format!("/p?v={}", escape(s)), b"").unwrap();
        assert_eq!(read_request(&buf[..]).unwrap().query("v"), Some(s));
    }
}
