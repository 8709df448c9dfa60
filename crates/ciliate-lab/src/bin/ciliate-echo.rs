//! `ciliate-echo`: the small TCP/UDP echo server that runs in every lab pod,
//! and a client to talk to it.
//!
//! ```text
//! ciliate-echo serve [PORT]                 # TCP and UDP echo on PORT (default 7)
//! ciliate-echo serve PORT NAME              # TCP and UDP: answer every request with NAME
//!                                           # (NAME "@peer": with the client's address)
//! ciliate-echo tcp IP:PORT MESSAGE          # prints the echoed reply
//! ciliate-echo udp IP:PORT MESSAGE
//! ciliate-echo udp-big IP:PORT BYTES        # one datagram of BYTES (fragmented past the MTU):
//!                                           # "BYTES bytes echoed" when it comes back whole
//! ciliate-echo names IP:PORT COUNT          # COUNT TCP connections: "<name> <n>" per answer
//! ciliate-echo stream IP:PORT SECONDS       # keeps one TCP connection busy, prints round trips
//! ciliate-echo rr IP:PORT SECONDS           # 1-byte request/response on one connection: "<n>/s"
//! ciliate-echo crr IP:PORT SECONDS          # connect, 1-byte request/response, close: "<n>/s"
//! ciliate-echo disrupt IP:PORT SECONDS      # one connection, a numbered message every 100 ms:
//!                                           # "sent S answered A late L broken B" (late: > 1 s)
//! ciliate-echo flood IP:PORT SECONDS COUNT  # 18-byte UDP datagrams as fast as one core sends
//!                                           # them, for SECONDS or COUNT datagrams at most:
//!                                           # "sent N in S s: R/s" (64-byte frames on the wire)
//! ```
//! Clients give up after 3 seconds (`CILIATE_ECHO_TIMEOUT_MS`) and exit non-zero.
//! `tcp` and `udp` also fail when the answer does not come from the address
//! they sent to (getpeername, recvfrom): a service must look like itself.

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

/// Answer every TCP connection and UDP datagram on `port` with `name`.
fn serve_name(port: u16, name: String) -> std::io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    let n = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(answer(&n, peer).as_bytes(), peer);
        }
    });
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            if conn.read(&mut buf).is_ok_and(|n| n > 0) {
                let peer = conn.peer_addr().map(|p| answer(&name, p)).unwrap_or_default();
                let _ = conn.write_all(peer.as_bytes());
            }
        });
    }
    Ok(())
}

/// The answer of a name server: its name, or with the name `@peer` the
/// address the request came from (what the server sees of its client).
fn answer(name: &str, peer: SocketAddr) -> String {
    if name == "@peer" { peer.ip().to_string() } else { name.to_owned() }
}

fn not_from(what: &str, got: SocketAddr, want: SocketAddr) -> std::io::Error {
    std::io::Error::other(format!("{what} is {got}, not {want}"))
}

/// `count` connections to a `serve PORT NAME` service: how many answers
/// each name gave.
fn names(addr: SocketAddr, count: u32) -> std::io::Result<String> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..count {
        let mut s = TcpStream::connect_timeout(&addr, timeout())?;
        s.set_read_timeout(Some(timeout()))?;
        s.write_all(b"?")?;
        let mut name = String::new();
        s.read_to_string(&mut name)?;
        *seen.entry(name).or_insert(0u32) += 1;
    }
    Ok(seen.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join("\n"))
}

fn tcp_echo(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout())?;
    let peer = s.peer_addr()?;
    if peer != addr {
        return Err(not_from("the peer", peer, addr));
    }
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
    let (n, from) = s.recv_from(&mut buf)?;
    if from != addr {
        return Err(not_from("the reply's source", from, addr));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One datagram of `bytes` bytes (a pattern) to an echo server; fails
/// unless the same bytes come back from `addr`.
fn udp_big(addr: SocketAddr, bytes: usize) -> std::io::Result<String> {
    let msg: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout()))?;
    s.send_to(&msg, addr)?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf)?;
    if from != addr {
        return Err(not_from("the reply's source", from, addr));
    }
    if buf[..n] != msg[..] {
        return Err(std::io::Error::other(format!("{n} bytes came back, not the {bytes} sent")));
    }
    Ok(format!("{bytes} bytes echoed"))
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

/// A long-lived connection as Cilium's conn-disrupt test keeps one: a
/// numbered message every 100 ms for `secs` seconds, each echo checked.
/// A reply later than 1 s is late (a missed message); an error or a wrong
/// reply breaks the connection and ends the run. Prints
/// `sent S answered A late L broken B max_ms M`; fails only when it
/// cannot connect.
fn disrupt(addr: SocketAddr, secs: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let (mut sent, mut answered, mut late, mut broken, mut max) = (0u64, 0u64, 0u64, 0u8, 0u128);
    let mut next = start;
    while Instant::now() < end {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += Duration::from_millis(100);
        let msg = sent.to_be_bytes();
        let t = Instant::now();
        sent += 1;
        let mut back = [0u8; 8];
        if s.write_all(&msg).and_then(|()| s.read_exact(&mut back)).is_err() || back != msg {
            broken = 1;
            break;
        }
        let rtt = t.elapsed();
        max = max.max(rtt.as_millis());
        if rtt > Duration::from_secs(1) {
            late += 1;
        } else {
            answered += 1;
        }
    }
    Ok(format!("sent {sent} answered {answered} late {late} broken {broken} max_ms {max}"))
}

/// Small UDP datagrams to `addr` as fast as this thread sends them, until
/// `secs` seconds pass or `count` were sent (a load generator bounded in
/// time and count). A refused send (ICMP unreachable coming back) is not
/// an error: the load goes on.
fn flood(addr: SocketAddr, secs: u64, count: u64) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    let payload = [0x5au8; 18];
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut sent = 0u64;
    while sent < count {
        // The clock is read once per 1,024 datagrams.
        if sent.is_multiple_of(1024) && Instant::now() >= end {
            break;
        }
        match s.send(&payload) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
    let took = start.elapsed().as_secs_f64();
    Ok(format!("sent {sent} in {took:.2} s: {:.0}/s", sent as f64 / took))
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
        ["serve", port, name] => match port.parse() {
            Ok(p) => {
                serve_name(p, name.to_string()).map(|()| String::new()).map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("bad port {port:?}: {e}")),
        },
        ["names", a, count] => match count.parse() {
            Ok(c) => addr(a).and_then(|a| names(a, c).map_err(|e| format!("names {a}: {e}"))),
            Err(e) => Err(format!("bad count {count:?}: {e}")),
        },
        ["tcp", a, msg] => {
            addr(a).and_then(|a| tcp_echo(a, msg).map_err(|e| format!("tcp {a}: {e}")))
        }
        ["udp", a, msg] => {
            addr(a).and_then(|a| udp_echo(a, msg).map_err(|e| format!("udp {a}: {e}")))
        }
        ["udp-big", a, bytes] => match bytes.parse() {
            Ok(b) if b <= 65507 => {
                addr(a).and_then(|a| udp_big(a, b).map_err(|e| format!("udp-big {a}: {e}")))
            }
            Ok(b) => Err(format!("{b} bytes: a UDP datagram holds at most 65507")),
            Err(e) => Err(format!("bad size {bytes:?}: {e}")),
        },
        ["stream", a, secs] => match secs.parse() {
            Ok(secs) => {
                addr(a).and_then(|a| stream(a, secs).map_err(|e| format!("stream {a}: {e}")))
            }
            Err(e) => Err(format!("bad duration {secs:?}: {e}")),
        },
        ["disrupt", a, secs] => match secs.parse() {
            Ok(secs) => {
                addr(a).and_then(|a| disrupt(a, secs).map_err(|e| format!("disrupt {a}: {e}")))
            }
            Err(e) => Err(format!("bad duration {secs:?}: {e}")),
        },
        ["flood", a, secs, count] => match (secs.parse(), count.parse()) {
            (Ok(secs), Ok(count)) => addr(a)
                .and_then(|a| flood(a, secs, count).map_err(|e| format!("flood {a}: {e}"))),
            _ => Err(format!("bad duration {secs:?} or count {count:?}")),
        },
        [mode @ ("rr" | "crr"), a, secs] => match secs.parse() {
            Ok(secs) => addr(a).and_then(|a| {
                let r = if *mode == "rr" { rr(a, secs) } else { crr(a, secs) };
                r.map_err(|e| format!("{mode} {a}: {e}"))
            }),
            Err(e) => Err(format!("bad duration {secs:?}: {e}")),
        },
        _ => Err("usage: ciliate-echo serve [PORT [NAME]] | tcp|udp IP:PORT MESSAGE \
                  | udp-big IP:PORT BYTES | names IP:PORT COUNT | stream|rr|crr|disrupt IP:PORT SECONDS \
                  | flood IP:PORT SECONDS COUNT"
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
