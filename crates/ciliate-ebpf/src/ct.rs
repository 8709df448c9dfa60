//! Connection tracking (layout and conventions: `ciliate_common::ct`).
//! [`tuple`] reads the 5-tuple of an IPv4 packet; [`lookup`] finds the
//! connection in the direction given; [`create`] makes a new one once
//! policy allowed it.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::LruHashMap};
use ciliate_common::{
    ct::{
        CT_ESTABLISHED, CT_NEW, CT_REPLY, CtEntry, CtKey4, DIR_EGRESS, DIR_INGRESS, DIR_SERVICE,
        F_RX_CLOSING, F_SEEN_NON_SYN, F_TX_CLOSING, LIFETIME_CLOSE, LIFETIME_NONTCP, LIFETIME_SYN,
        LIFETIME_TCP,
    },
    drop::{CT_CREATE_FAILED, CT_INVALID_HDR, CT_UNKNOWN_PROTO, FRAG_NOT_FOUND},
    frag::{FragKey, FragPorts},
};

use crate::{
    Drop, drop,
    maps::{CILIATE_CT4_ANY, CILIATE_CT4_TCP, CILIATE_IPV4_FRAG},
    packet::{ETH_HLEN, Ipv4Hdr, Pkt, ptr_at},
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;
const ICMP_ECHOREPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;

/// A packet's connection tuple (`dir` left 0), its TCP flags, and the
/// "port" policy matches (network order): the destination port, or the
/// ICMP type.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub key: CtKey4,
    pub tcp_flags: u8,
    pub policy_port: u16,
    /// Offset of the L4 header in the frame (for NAT rewrites). A later
    /// fragment has none (see [`later_fragment`]).
    pub l4_off: u32,
}

#[repr(C)]
struct Ports {
    sport: u16,
    dport: u16,
}

/// A whole UDP header: a shorter one is no UDP packet (and NAT rewrites
/// its checksum, at byte 6).
#[repr(C)]
struct UdpHead {
    ports: Ports,
    len: u16,
    check: u16,
}

#[repr(C)]
struct TcpHead {
    ports: Ports,
    seq: u32,
    ack: u32,
    off: u8,
    flags: u8,
}

#[repr(C)]
struct IcmpEcho {
    kind: u8,
    code: u8,
    csum: u16,
    id: u16,
}

const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Read the tuple of the IPv4 packet whose header is at `ip`.
/// A first fragment records its ports for the later ones, which take them
/// (`ciliate_common::frag`; `FRAG_NOT_FOUND` when the first was not
/// seen). A cut L4 header: `CT_INVALID_HDR`. Protocols other than TCP, UDP
/// and ICMP: `CT_UNKNOWN_PROTO`, as Cilium.
#[inline(always)]
pub fn tuple(ctx: &impl Pkt, ip: &Ipv4Hdr) -> Result<Tuple, Drop> {
    let frag = u16::from_be(ip.frag_off);
    let mut key = CtKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.proto,
        dir: 0,
        _pad: [0; 2],
    };
    let fkey = || FragKey { daddr: ip.daddr, saddr: ip.saddr, id: ip.id, proto: ip.proto, _pad: 0 };
    // A later fragment takes the first one's ports. They are set in each
    // protocol's arm below, as a whole packet's are, so that the verifier
    // finds the same state after this function either way and walks what
    // follows once, not twice.
    let first = if frag & IP_OFFSET != 0 {
        // SAFETY: copied out at once.
        let ports = unsafe { CILIATE_IPV4_FRAG.get(fkey()).copied() };
        Some(ports.ok_or(drop!(FRAG_NOT_FOUND))?)
    } else {
        None
    };
    let l4 = ETH_HLEN + ip.ihl_bytes();
    let mut tcp_flags = 0;
    let policy_port;
    match ip.proto {
        IPPROTO_TCP => {
            if let Some(p) = first {
                (key.sport, key.dport, policy_port, tcp_flags) =
                    (p.sport, p.dport, p.policy_port, p.tcp_flags);
            } else {
                let h = ptr_at::<TcpHead>(ctx, l4).ok_or(drop!(CT_INVALID_HDR))?;
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &*h };
                key.sport = h.ports.sport;
                key.dport = h.ports.dport;
                policy_port = h.ports.dport;
                tcp_flags = h.flags;
            }
        }
        IPPROTO_UDP => {
            if let Some(p) = first {
                (key.sport, key.dport, policy_port) = (p.sport, p.dport, p.policy_port);
            } else {
                let h = ptr_at::<UdpHead>(ctx, l4).ok_or(drop!(CT_INVALID_HDR))?;
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &(*h).ports };
                key.sport = h.sport;
                key.dport = h.dport;
                policy_port = h.dport;
            }
        }
        IPPROTO_ICMP => {
            if let Some(p) = first {
                (key.sport, key.dport, policy_port) = (p.sport, p.dport, p.policy_port);
            } else {
                let h = ptr_at::<IcmpEcho>(ctx, l4).ok_or(drop!(CT_INVALID_HDR))?;
                // SAFETY: bounds checked by ptr_at.
                let h = unsafe { &*h };
                match h.kind {
                    ICMP_ECHO => key.dport = h.id,
                    ICMP_ECHOREPLY => key.sport = h.id,
                    _ => {}
                }
                // ICMP rules match the ICMP type where other rules match a
                // port.
                policy_port = u16::from(h.kind).to_be();
            }
        }
        _ => return Err(drop!(CT_UNKNOWN_PROTO)),
    }
    if frag & (IP_MF | IP_OFFSET) == IP_MF {
        let ports =
            FragPorts { sport: key.sport, dport: key.dport, policy_port, tcp_flags: 0, _pad: 0 };
        // A full map (LRU: hardly) loses this datagram's later fragments.
        let _ = CILIATE_IPV4_FRAG.insert(fkey(), ports, 0);
    }
    Ok(Tuple { key, tcp_flags, policy_port, l4_off: l4 as u32 })
}

/// Is the packet in `ctx` a later fragment of a datagram (no L4 header:
/// address rewrites leave the L4 checksum, port rewrites only the tuple)?
/// Read from the packet where a rewrite needs it, not carried in
/// [`Tuple`]: a flag there would make the verifier walk every later stage
/// twice.
#[inline(always)]
pub fn later_fragment(ctx: &impl Pkt) -> bool {
    match ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) {
        // SAFETY: bounds checked by ptr_at.
        Some(ip) => u16::from_be(unsafe { (*ip).frag_off }) & IP_OFFSET != 0,
        None => true,
    }
}

/// Seconds of the monotonic clock (expiries, creation times).
#[inline(always)]
pub(crate) fn now_secs() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn lifetime(proto: u8, flags: u16) -> u32 {
    if proto != IPPROTO_TCP {
        LIFETIME_NONTCP
    } else if flags & (F_TX_CLOSING | F_RX_CLOSING) != 0 {
        LIFETIME_CLOSE
    } else if flags & F_SEEN_NON_SYN != 0 {
        LIFETIME_TCP
    } else {
        LIFETIME_SYN
    }
}

#[inline(always)]
fn closing_flags(tcp_flags: u8, mine: u16, both: u16) -> u16 {
    if tcp_flags & TCP_RST != 0 {
        both
    } else if tcp_flags & TCP_FIN != 0 {
        mine
    } else {
        0
    }
}

/// What [`lookup`] or [`create`] found.
#[derive(Clone, Copy)]
pub struct Tracked {
    /// `CT_NEW`, `CT_ESTABLISHED` or `CT_REPLY`.
    pub state: u8,
    /// Worth a trace event under monitor aggregation "medium" (Cilium's
    /// default): a new connection, the first packet of the reply direction,
    /// or a TCP SYN/FIN/RST not seen before in this direction.
    pub report: bool,
    /// The entry's reverse-NAT index (0: none). A reply that finds one is
    /// translated back to that frontend (`lb::rev_nat`).
    pub rev_nat_index: u16,
    /// Established, and the node's policy generation moved since the
    /// connection was last decided: policy must look again, and stamp
    /// `generation` once it let the packet through (`stamp_policy`).
    pub recheck: bool,
    pub generation: u32,
}

const REPORT_FLAGS: u8 = TCP_SYN | TCP_FIN | TCP_RST;

#[inline(always)]
fn table(proto: u8) -> &'static LruHashMap<CtKey4, CtEntry> {
    if proto == IPPROTO_TCP { &CILIATE_CT4_TCP } else { &CILIATE_CT4_ANY }
}

/// Look the packet up as seen by an endpoint in direction `dir`
/// (`DIR_EGRESS`: leaving it; `DIR_INGRESS`: arriving at it) and account
/// it: `CT_ESTABLISHED` or `CT_REPLY`. `None` for a new connection (also a
/// SYN on a closed one), for which nothing is written: policy decides
/// first, then [`create`].
#[inline(always)]
pub fn lookup(t: &Tuple, dir: u8, len: u32) -> Option<Tracked> {
    let map = table(t.key.proto);
    let proto = t.key.proto;
    let syn_only = t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let non_syn =
        if proto == IPPROTO_TCP && t.tcp_flags & TCP_SYN == 0 { F_SEEN_NON_SYN } else { 0 };
    let both = F_TX_CLOSING | F_RX_CLOSING;
    let now = now_secs();

    let mut fwd = t.key;
    fwd.dir = dir;
    if let Some(e) = map.get_ptr_mut(fwd) {
        // SAFETY: a map value; concurrent updates only race on counters.
        let e = unsafe { &mut *e };
        if syn_only && e.flags & both != 0 {
            // A new SYN on a closed connection: a new connection.
            return None;
        }
        let report = t.tcp_flags & !e.tx_flags_seen & REPORT_FLAGS != 0;
        e.tx_packets += 1;
        e.tx_bytes += u64::from(len);
        e.tx_flags_seen |= t.tcp_flags;
        e.flags |= non_syn | closing_flags(t.tcp_flags, F_TX_CLOSING, both);
        e.expires = now + lifetime(proto, e.flags);
        let generation = crate::maps::policy_gen();
        let recheck = e.policy_gen != generation;
        return Some(Tracked {
            state: CT_ESTABLISHED,
            report,
            rev_nat_index: 0,
            recheck,
            generation,
        });
    }

    let other = if dir == DIR_EGRESS { DIR_INGRESS } else { DIR_EGRESS };
    let rev = t.key.reverse(other);
    let e = map.get_ptr_mut(rev)?;
    // SAFETY: as above.
    let e = unsafe { &mut *e };
    let report = e.rx_packets == 0 || t.tcp_flags & !e.rx_flags_seen & REPORT_FLAGS != 0;
    e.rx_packets += 1;
    e.rx_bytes += u64::from(len);
    e.rx_flags_seen |= t.tcp_flags;
    e.flags |= non_syn | closing_flags(t.tcp_flags, F_RX_CLOSING, both);
    e.expires = now + lifetime(proto, e.flags);
    Some(Tracked {
        state: CT_REPLY,
        report,
        rev_nat_index: e.rev_nat_index,
        recheck: false,
        generation: 0,
    })
}

/// Create (or, for a reopened connection, replace) the entry of a new
/// connection opened by `src_identity` in direction `dir`; `rev_nat` is the
/// reverse-NAT index its replies need (0: none); policy let it through at
/// the node's policy generation now.
#[inline(always)]
pub fn create(
    t: &Tuple,
    dir: u8,
    len: u32,
    src_identity: u32,
    rev_nat: u16,
) -> Result<Tracked, Drop> {
    let policy_gen = crate::maps::policy_gen();
    let proto = t.key.proto;
    let non_syn =
        if proto == IPPROTO_TCP && t.tcp_flags & TCP_SYN == 0 { F_SEEN_NON_SYN } else { 0 };
    let flags = non_syn | closing_flags(t.tcp_flags, F_TX_CLOSING, F_TX_CLOSING | F_RX_CLOSING);
    let mut fwd = t.key;
    fwd.dir = dir;
    // Zeroed in place, then the fields that are not 0 (a struct literal's
    // zero fields would become a memset call: `crate::zeroed`).
    let mut slot = core::mem::MaybeUninit::uninit();
    let entry: &mut CtEntry = crate::zeroed(&mut slot);
    entry.tx_packets = 1;
    entry.tx_bytes = u64::from(len);
    entry.expires = now_secs() + lifetime(proto, flags);
    entry.src_identity = src_identity;
    entry.rev_nat_index = rev_nat;
    entry.flags = flags;
    entry.tx_flags_seen = t.tcp_flags;
    entry.policy_gen = policy_gen;
    table(proto).insert(fwd, entry, 0).map_err(|_| drop!(CT_CREATE_FAILED))?;
    Ok(Tracked { state: CT_NEW, report: true, rev_nat_index: 0, recheck: false, generation: 0 })
}

/// Record that policy let the established connection of `t` (opened in
/// direction `dir`) through at generation `generation` (read before it
/// decided: a change landing meanwhile leaves the stamp behind).
#[inline(always)]
pub fn stamp_policy(t: &Tuple, dir: u8, generation: u32) {
    let mut fwd = t.key;
    fwd.dir = dir;
    if let Some(e) = table(t.key.proto).get_ptr_mut(fwd) {
        // SAFETY: a map value; a racing stamp writes the same or a newer
        // generation's decision.
        unsafe { (*e).policy_gen = generation };
    }
}

/// Is the packet `t` (leaving an endpoint) a reply of a connection opened
/// towards that endpoint from outside? Read only: nothing is accounted.
#[inline(always)]
pub fn is_reply_to_inbound(t: &Tuple) -> bool {
    let rev = t.key.reverse(DIR_INGRESS);
    table(t.key.proto).get_ptr(rev).is_some()
}

/// The backend a service flow (tuple `t` naming the frontend) is pinned
/// to, refreshing its entry; `None` for a new flow, or a SYN on a closed
/// one (which chooses again).
#[inline(always)]
pub fn service_backend(t: &Tuple) -> Option<u32> {
    let mut key = t.key;
    key.dir = DIR_SERVICE;
    let e = table(key.proto).get_ptr_mut(key)?;
    // SAFETY: a map value; concurrent updates only race on counters.
    let e = unsafe { &mut *e };
    let both = F_TX_CLOSING | F_RX_CLOSING;
    if t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && e.flags & both != 0 {
        return None;
    }
    if key.proto == IPPROTO_TCP && t.tcp_flags & TCP_SYN == 0 {
        e.flags |= F_SEEN_NON_SYN;
    }
    e.flags |= closing_flags(t.tcp_flags, F_TX_CLOSING, both);
    e.tx_packets += 1;
    e.expires = now_secs() + lifetime(key.proto, e.flags);
    Some(e.backend_id)
}

/// Pin the service flow `t` to `backend_id` of frontend `rev_nat`.
#[inline(always)]
pub fn service_pin(t: &Tuple, backend_id: u32, rev_nat: u16) -> Result<(), Drop> {
    let mut key = t.key;
    key.dir = DIR_SERVICE;
    let flags =
        if key.proto == IPPROTO_TCP && t.tcp_flags & TCP_SYN == 0 { F_SEEN_NON_SYN } else { 0 };
    let mut slot = core::mem::MaybeUninit::uninit();
    let entry: &mut CtEntry = crate::zeroed(&mut slot);
    entry.tx_packets = 1;
    entry.expires = now_secs() + lifetime(key.proto, flags);
    entry.rev_nat_index = rev_nat;
    entry.flags = flags;
    entry.tx_flags_seen = t.tcp_flags;
    entry.backend_id = backend_id;
    table(key.proto).insert(key, entry, 0).map_err(|_| drop!(CT_CREATE_FAILED))
}
