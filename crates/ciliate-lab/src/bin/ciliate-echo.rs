//! `ciliate-echo`: the small TCP/UDP echo server that runs in every lab pod,
//! and a client to talk to it.
//!
//! ```text
//! ciliate-echo serve [PORT]                 # TCP and UDP echo on PORT (default 7)
//! ciliate-echo tcp IP:PORT MESSAGE          # prints the echoed reply
//! ciliate-echo udp IP:PORT MESSAGE
//! ciliate-echo stream IP:PORT SECONDS       # keeps one TCP connection busy, prints round trips
//! ciliate-echo rr IP:PORT SECONDS           # 1-byte request/response on one connection: "<n>/s"
//! ciliate-echo crr IP:PORT SECONDS          # connect, 1-byte request/response, close: "<n>/s"
//! ```
//! Clients give up after 3 seconds (`CILIATE_ECHO_TIMEOUT_MS`) and exit non-zero.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

/// How long a client waits (connect, reply): 3 s, or
/// `CILIATE_ECHO_TIMEOUT_MS`.
fn timeout() -> Duration {
    std::env::var("CILIATE_ECHO_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_millis)
}

fn serve(port: u16) -> std::io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn tcp_echo(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout())?;
    s.set_read_timeout(Some(timeout()))?;
    s.write_all(msg.as_bytes())?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn udp_echo(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout()))?;
    s.send_to(msg.as_bytes(), addr)?;
    let mut buf = [0u8; 65536];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One connection, request/response for `secs` seconds; fails if any round
/// trip fails. Prints the number of round trips.
fn stream(addr: SocketAddr, secs: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout())?;
    s.set_read_timeout(Some(timeout()))?;
    s.set_nodelay(true)?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        s.write_all(&[b'x'; 64])?;
        s.read_exact(&mut buf)?;
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(format!("{n} round trips"))
}

/// Transactions per second of `f` run back to back for `secs` seconds.
fn rate(secs: u64, mut f: impl FnMut() -> std::io::Result<()>) -> std::io::Result<String> {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        f()?;
        n += 1;
    }
    Ok(format!("{:.0}/s", n as f64 / start.elapsed().as_secs_f64()))
}

fn rr(addr: SocketAddr, secs: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout())?;
    s.set_read_timeout(Some(timeout()))?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    rate(secs, || {
        s.write_all(b"x")?;
        s.read_exact(&mut b)
    })
}

fn crr(addr: SocketAddr, secs: u64) -> std::io::Result<String> {
    let mut b = [0u8; 1];
    rate(secs, || {
        let mut s = TcpStream::connect_timeout(&addr, timeout())?;
        s.set_read_timeout(Some(timeout()))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        s.read_exact(&mut b)
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let addr = |s: &str| s.parse::<SocketAddr>().map_err(|e| format!("bad address {s:?}: {e}"));
    let result = match args.as_slice() {
        ["serve"] => serve(7).map(|()| String::new()).map_err(|e| e.to_string()),
        ["serve", port] => match port.parse() {
            Ok(p) => serve(p).map(|()| String::new()).map_err(|e| e.to_string()),
            Err(e) => Err(format!("bad port {port:?}: {e}")),
        },
        ["tcp", a, msg] => {
            addr(a).and_then(|a| tcp_echo(a, msg).map_err(|e| format!("tcp {a}: {e}")))
        }
        ["udp", a, msg] => {
            addr(a).and_then(|a| udp_echo(a, msg).map_err(|e| format!("udp {a}: {e}")))
        }
        ["stream", a, secs] => match secs.parse() {
            Ok(secs) => {
                addr(a).and_then(|a| stream(a, secs).map_err(|e| format!("stream {a}: {e}")))
            }
            Err(e) => Err(format!("bad duration {secs:?}: {e}")),
        },
        [mode @ ("rr" | "crr"), a, secs] => match secs.parse() {
            Ok(secs) => addr(a).and_then(|a| {
                let r = if *mode == "rr" { rr(a, secs) } else { crr(a, secs) };
                r.map_err(|e| format!("{mode} {a}: {e}"))
            }),
            Err(e) => Err(format!("bad duration {secs:?}: {e}")),
        },
        _ => Err("usage: ciliate-echo serve [PORT] | tcp|udp IP:PORT MESSAGE \
                  | stream|rr|crr IP:PORT SECONDS"
            .into()),
    };
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ciliate-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
