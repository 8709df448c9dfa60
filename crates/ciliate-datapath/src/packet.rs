//! Packet builders and parsers: Ethernet, ARP, IPv4, TCP, UDP, ICMP echo,
//! with correct IPv4 and L4 checksums. Used by the BPF_PROG_TEST_RUN tests,
//! the lab checks and the benchmarks; [`parse`] reads what a program wrote
//! and says whether its checksums still hold.

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ARPOP_REQUEST: u16 = 1;
pub const ARPOP_REPLY: u16 = 2;

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One's-complement sum of `data` (RFC 1071) added to `initial`, unfolded.
fn sum16(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data`: the value to store in a header whose
/// checksum field is zero in `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

/// The L4 checksum of `segment` (checksum field zeroed) under the IPv4
/// pseudo-header. UDP's "no checksum" 0 is sent as 0xffff, per RFC 768.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let c = !fold(sum16(segment, pseudo_header_sum(src, dst, proto, segment.len())));
    if proto == IPPROTO_UDP && c == 0 { 0xffff } else { c }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
}

impl Ip4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self { src, dst, ttl: 64, id: 1 }
    }
}

/// The transport part of an IPv4 packet.
#[derive(Clone, Copy, Debug)]
pub enum L4<'a> {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &'a [u8],
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    IcmpEcho {
        request: bool,
        id: u16,
        seq: u16,
        payload: &'a [u8],
    },
    /// Any protocol, bytes as given (no checksum computed).
    Raw {
        proto: u8,
        bytes: &'a [u8],
    },
}

impl L4<'_> {
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::IcmpEcho { .. } => IPPROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn encode(&self, ip: &Ip4) -> Vec<u8> {
        let mut s = Vec::new();
        let csum_at = match *self {
            L4::Tcp { sport, dport, seq, ack, flags, payload } => {
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&seq.to_be_bytes());
                s.extend_from_slice(&ack.to_be_bytes());
                s.push(5 << 4); // data offset: 20 bytes, no options
                s.push(flags);
                s.extend_from_slice(&64240u16.to_be_bytes()); // window
                s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                s.extend_from_slice(payload);
                Some(16)
            }
            L4::Udp { sport, dport, payload } => {
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(payload);
                Some(6)
            }
            L4::IcmpEcho { request, id, seq, payload } => {
                s.push(if request { 8 } else { 0 });
                s.push(0);
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(&id.to_be_bytes());
                s.extend_from_slice(&seq.to_be_bytes());
                s.extend_from_slice(payload);
                let c = checksum(&s);
                s[2..4].copy_from_slice(&c.to_be_bytes());
                None
            }
            L4::Raw { bytes, .. } => {
                s.extend_from_slice(bytes);
                None
            }
        };
        if let Some(at) = csum_at {
            let c = l4_checksum(ip.src, ip.dst, self.proto(), &s);
            s[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        s
    }
}

/// An Ethernet frame around any payload.
pub fn ether(eth: &Eth, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&eth.dst);
    f.extend_from_slice(&eth.src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The 20-byte IPv4 header (no options) for `payload_len` bytes of `proto`.
pub fn ipv4_header(ip: &Ip4, proto: u8, payload_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&ip.id.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    h[8] = ip.ttl;
    h[9] = proto;
    h[12..16].copy_from_slice(&ip.src.octets());
    h[16..20].copy_from_slice(&ip.dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// Recompute the IPv4 header checksum of `frame` (Ethernet + IPv4) after a
/// test changed header bytes on purpose (TTL, fragment offset, ...).
pub fn refresh_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// `frame` (Ethernet + IPv4 without options) with IP options `opt` (a
/// multiple of 4 bytes) after its header: length, total length and
/// checksum fixed.
pub fn with_ipv4_options(frame: &[u8], opt: &[u8]) -> Vec<u8> {
    assert!(frame[14] == 0x45 && opt.len().is_multiple_of(4) && opt.len() <= 40);
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(opt);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x45 + (opt.len() / 4) as u8;
    let total = be16(&f[14..], 2) + opt.len() as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    refresh_ipv4_checksum(&mut f);
    f
}

/// NodePort DSR's IPv4 option naming frontend `addr:port` (Cilium's
/// layout: `ciliate_common::lb::DsrOpt`).
pub fn dsr_option(addr: Ipv4Addr, port: u16) -> Vec<u8> {
    use ciliate_common::lb::{DSR_OPT_LEN, DSR_OPT_TYPE};
    let mut o = vec![DSR_OPT_TYPE, DSR_OPT_LEN];
    o.extend_from_slice(&port.to_be_bytes());
    o.extend_from_slice(&addr.octets());
    o
}

/// A complete Ethernet + IPv4 + L4 frame with correct checksums.
pub fn ipv4_frame(eth: &Eth, ip: &Ip4, l4: &L4<'_>) -> Vec<u8> {
    let seg = l4.encode(ip);
    let mut p = ipv4_header(ip, l4.proto(), seg.len()).to_vec();
    p.extend_from_slice(&seg);
    ether(eth, ETH_P_IP, &p)
}

/// `frame` (Ethernet + IPv4 without options) as the fragments a sender
/// with `mtu` would send: IP ID `id`, payloads of `mtu - 20` bytes rounded
/// down to 8, "more fragments" on all but the last.
pub fn fragments(frame: &[u8], mtu: usize, id: u16) -> Vec<Vec<u8>> {
    let (eth, payload) = (&frame[..14], &frame[34..]);
    let step = (mtu - 20) / 8 * 8;
    let chunks: Vec<&[u8]> = payload.chunks(step).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut h: [u8; 20] = frame[14..34].try_into().unwrap();
            h[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&(more | (i * step / 8) as u16).to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            [eth, &h, chunk].concat()
        })
        .collect()
}

/// The datagram `frames` (fragments, in any order) carry, as one frame
/// (Ethernet + IPv4 + L4, "don't fragment" set) with the first fragment's
/// Ethernet and IP header fields, for [`parse`]. An error names a missing
/// piece or a fragment whose header disagrees with the first one.
pub fn reassemble(frames: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let mut parts: Vec<(usize, bool, &[u8])> = Vec::new();
    for f in frames {
        if f.len() < 34 {
            return Err(format!("fragment of {} bytes", f.len()));
        }
        let field = be16(f, 20);
        let total = usize::from(be16(f, 16));
        if f.len() < 14 + total || total < 20 {
            return Err(format!("fragment with total length {total} in {} bytes", f.len()));
        }
        parts.push((usize::from(field & 0x1fff) * 8, field & 0x2000 != 0, &f[34..14 + total]));
    }
    parts.sort_by_key(|p| p.0);
    let first = frames.iter().find(|f| be16(f, 20) & 0x1fff == 0).ok_or("no first fragment")?;
    for f in frames {
        if f[26..34] != first[26..34] || f[18..20] != first[18..20] || f[23] != first[23] {
            return Err("a fragment's addresses, ID or protocol differ from the first's".into());
        }
    }
    let mut payload = Vec::new();
    for (off, _, bytes) in &parts {
        if *off != payload.len() {
            return Err(format!(
                "hole or overlap at byte {} (next fragment at {off})",
                payload.len()
            ));
        }
        payload.extend_from_slice(bytes);
    }
    if parts.last().is_some_and(|p| p.1) {
        return Err("the last fragment says more fragments follow".into());
    }
    let mut h: [u8; 20] = first[14..34].try_into().unwrap();
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    Ok([&first[..14], &h[..], &payload].concat())
}

/// An ARP request from (`mac`, `ip`) for `target`, broadcast.
pub fn arp_request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let eth = Eth { dst: [0xff; 6], src: mac };
    ether(&eth, ETH_P_ARP, &arp_body(ARPOP_REQUEST, mac, ip, [0; 6], target))
}

/// An ARP payload (28 bytes, Ethernet/IPv4).
pub fn arp_body(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub header_csum_ok: bool,
    /// The header's options (empty for a 20-byte header).
    pub options: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Info {
    /// Ports for TCP/UDP; ICMP echo id in `sport`, sequence in `dport`.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags; ICMP type.
    pub flags: u8,
    pub csum_ok: bool,
    pub payload: Vec<u8>,
}

/// What [`parse`] found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub eth: Eth,
    pub ethertype: u16,
    pub arp: Option<Arp>,
    pub ipv4: Option<Ipv4Info>,
    pub l4: Option<L4Info>,
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse a frame; an error names the header that is cut short or malformed.
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    if frame.len() < 14 {
        return Err(format!("ethernet: {} bytes, need 14", frame.len()));
    }
    let mut p = Parsed {
        eth: Eth { dst: frame[0..6].try_into().unwrap(), src: frame[6..12].try_into().unwrap() },
        ethertype: be16(frame, 12),
        arp: None,
        ipv4: None,
        l4: None,
    };
    let body = &frame[14..];
    match p.ethertype {
        ETH_P_ARP => {
            if body.len() < 28 {
                return Err(format!("arp: {} bytes, need 28", body.len()));
            }
            p.arp = Some(Arp {
                op: be16(body, 6),
                sha: body[8..14].try_into().unwrap(),
                spa: ip_at(body, 14),
                tha: body[18..24].try_into().unwrap(),
                tpa: ip_at(body, 24),
            });
        }
        ETH_P_IP => {
            if body.len() < 20 {
                return Err(format!("ipv4: {} bytes, need 20", body.len()));
            }
            let ihl = usize::from(body[0] & 0x0f) * 4;
            let total = usize::from(be16(body, 2));
            if body[0] >> 4 != 4 || ihl < 20 || total < ihl || body.len() < total {
                return Err(format!(
                    "ipv4: bad header (ihl {ihl}, total length {total}, {} bytes)",
                    body.len()
                ));
            }
            let info = Ipv4Info {
                src: ip_at(body, 12),
                dst: ip_at(body, 16),
                proto: body[9],
                ttl: body[8],
                header_csum_ok: fold(sum16(&body[..ihl], 0)) == 0xffff,
                options: body[20..ihl].to_vec(),
            };
            let seg = &body[ihl..total];
            p.l4 = parse_l4(&info, seg)?;
            p.ipv4 = Some(info);
        }
        _ => {}
    }
    Ok(p)
}

fn parse_l4(ip: &Ipv4Info, seg: &[u8]) -> Result<Option<L4Info>, String> {
    let pseudo_ok = |seg: &[u8]| {
        fold(sum16(seg, pseudo_header_sum(ip.src, ip.dst, ip.proto, seg.len()))) == 0xffff
    };
    Ok(Some(match ip.proto {
        IPPROTO_TCP => {
            if seg.len() < 20 {
                return Err(format!("tcp: {} bytes, need 20", seg.len()));
            }
            let off = usize::from(seg[12] >> 4) * 4;
            L4Info {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                flags: seg[13],
                csum_ok: pseudo_ok(seg),
                payload: seg.get(off..).unwrap_or_default().to_vec(),
            }
        }
        IPPROTO_UDP => {
            if seg.len() < 8 {
                return Err(format!("udp: {} bytes, need 8", seg.len()));
            }
            L4Info {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                flags: 0,
                csum_ok: be16(seg, 6) == 0 || pseudo_ok(seg),
                payload: seg[8..].to_vec(),
            }
        }
        IPPROTO_ICMP => {
            if seg.len() < 8 {
                return Err(format!("icmp: {} bytes, need 8", seg.len()));
            }
            L4Info {
                sport: be16(seg, 4),
                dport: be16(seg, 6),
                flags: seg[0],
                csum_ok: fold(sum16(seg, 0)) == 0xffff,
                payload: seg[8..].to_vec(),
            }
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const ETH: Eth = Eth { dst: [2, 0, 0, 0, 0, 2], src: [2, 0, 0, 0, 0, 1] };

    #[test]
    fn ipv4_checksum_matches_a_known_header() {
        // A captured header whose checksum is 0xb861 (field zeroed here).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let ip = Ip4::new(A, B);
        let cases = [
            L4::Tcp {
                sport: 40000,
                dport: 80,
                seq: 7,
                ack: 0,
                flags: tcp_flags::SYN,
                payload: b"",
            },
            L4::Tcp { sport: 1, dport: 2, seq: 1, ack: 2, flags: tcp_flags::ACK, payload: b"odd" },
            L4::Udp { sport: 5353, dport: 53, payload: b"hello" },
            L4::IcmpEcho { request: true, id: 9, seq: 3, payload: b"ping!" },
        ];
        for l4 in cases {
            let f = ipv4_frame(&ETH, &ip, &l4);
            let p = parse(&f).unwrap();
            let info = p.ipv4.unwrap();
            assert!(info.header_csum_ok, "{l4:?}");
            assert_eq!((info.src, info.dst, info.proto), (A, B, l4.proto()));
            assert!(p.l4.unwrap().csum_ok, "{l4:?}");
        }
    }

    #[test]
    fn a_flipped_bit_breaks_the_checksum() {
        let l4 = L4::Udp { sport: 1, dport: 2, payload: b"data" };
        let mut f = ipv4_frame(&ETH, &Ip4::new(A, B), &l4);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(!parse(&f).unwrap().l4.unwrap().csum_ok);
        f[14 + 8] ^= 1; // TTL
        assert!(!parse(&f).unwrap().ipv4.unwrap().header_csum_ok);
    }

    #[test]
    fn arp_request_round_trips() {
        let f = arp_request([2, 0, 0, 0, 0, 1], A, B);
        let arp = parse(&f).unwrap().arp.unwrap();
        assert_eq!((arp.op, arp.spa, arp.tpa), (ARPOP_REQUEST, A, B));
    }

    #[test]
    fn truncated_headers_are_named() {
        let f = ipv4_frame(&ETH, &Ip4::new(A, B), &L4::Udp { sport: 1, dport: 2, payload: b"" });
        assert!(parse(&f[..20]).unwrap_err().starts_with("ipv4"));
        assert!(parse(&f[..5]).unwrap_err().starts_with("ethernet"));
    }
}
