//! Decoding the datapath's ring-buffer events (`ciliate_common::event`).

use ciliate_common::event::{
    CaptureNotify, DebugNotify, DropNotify, EventHeader, KIND_CAPTURE, KIND_DEBUG, KIND_DROP,
    KIND_POLICY_VERDICT, KIND_TRACE, PolicyVerdictNotify, TraceNotify,
};

/// One event as user space sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Drop(DropNotify),
    Trace(TraceNotify),
    PolicyVerdict(PolicyVerdictNotify),
    /// A decision the datapath took, while debugging ([`debug_message`]).
    Debug(DebugNotify),
    /// A packet at a point of a program, while debugging.
    Capture(CaptureNotify),
    /// A kind this build does not know, or a record too short for its kind.
    Unknown {
        kind: u8,
        len: usize,
    },
}

fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: length checked; T is a repr(C) integer-only struct, so any
        // bytes are a valid value; read_unaligned has no alignment needs.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

impl Event {
    pub fn decode(bytes: &[u8]) -> Self {
        let Some(hdr) = read::<EventHeader>(bytes) else {
            return Event::Unknown { kind: 0, len: bytes.len() };
        };
        let decoded = match hdr.kind {
            KIND_DROP => read::<DropNotify>(bytes).map(Event::Drop),
            KIND_TRACE => read::<TraceNotify>(bytes).map(Event::Trace),
            KIND_POLICY_VERDICT => read::<PolicyVerdictNotify>(bytes).map(Event::PolicyVerdict),
            KIND_DEBUG => read::<DebugNotify>(bytes).map(Event::Debug),
            KIND_CAPTURE => read::<CaptureNotify>(bytes).map(Event::Capture),
            _ => None,
        };
        decoded.unwrap_or(Event::Unknown { kind: hdr.kind, len: bytes.len() })
    }

    /// The packet bytes the datapath captured with the event.
    pub fn captured(&self) -> &[u8] {
        let (data, n): (&[u8], u16) = match self {
            Event::Drop(d) => (&d.data, d.hdr.len_cap),
            Event::Trace(t) => (&t.data, t.hdr.len_cap),
            Event::PolicyVerdict(v) => (&v.data, v.hdr.len_cap),
            Event::Capture(c) => (&c.data, c.hdr.len_cap),
            Event::Debug(_) | Event::Unknown { .. } => (&[], 0),
        };
        &data[..usize::from(n).min(data.len())]
    }
}

fn ip(arg: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(arg.to_ne_bytes())
}

fn ct_state(state: u32) -> String {
    use ciliate_common::ct;
    match u8::try_from(state).unwrap_or(u8::MAX) {
        ct::CT_NEW => "New".into(),
        ct::CT_ESTABLISHED => "Established".into(),
        ct::CT_REPLY => "Reply".into(),
        ct::CT_RELATED => "Related".into(),
        s => ciliate_common::drop::reason_name(s).to_owned(),
    }
}

/// A debug event in words: Cilium's text for the decisions Cilium has
/// (`cilium monitor -v`), Ciliate's for its own.
pub fn debug_message(d: &DebugNotify) -> String {
    use ciliate_common::{debug::*, policy};
    let (a1, a2, a3) = (d.arg1, d.arg2, d.arg3);
    match d.hdr.subtype {
        DBG_LOCAL_DELIVERY => {
            format!("Attempting local delivery for container id {a1} from seclabel {a2}")
        }
        DBG_ENCAP => format!("Encapsulating to node {} from seclabel {a2}", ip(a1)),
        DBG_POLICY_DENIED => format!("Policy evaluation would deny packet from {a1} to {a2}"),
        DBG_CT_VERDICT => format!("CT verdict: {}, revnat={a2}", ct_state(a1)),
        DBG_DECAP => format!("Tunnel decap: id={a1} flowlabel={a2:x}"),
        DBG_TO_HOST => format!("Going to host, policy-skip={a1}"),
        DBG_TO_STACK => format!("Going to the stack, policy-skip={a1}"),
        DBG_LB4_LOOKUP_FRONTEND => {
            format!("Frontend service lookup, addr={} key.dport={a2}", ip(a1))
        }
        DBG_LB4_LOOKUP_FRONTEND_FAIL => "Frontend service lookup failed".into(),
        DBG_LB4_LOOKUP_BACKEND_SLOT_SUCCESS => {
            format!("Service backend slot lookup result: target={} port={a2}", ip(a1))
        }
        DBG_LB4_LOOKUP_BACKEND_FAIL => format!("Backend service lookup failed: backend_id={a1}"),
        DBG_LB4_REVERSE_NAT_LOOKUP => format!("Reverse NAT lookup, index={a1}"),
        DBG_LB4_REVERSE_NAT => format!("Performing reverse NAT, address={} port={a2}", ip(a1)),
        DBG_LB4_LOOPBACK_SNAT => format!("Loopback SNAT from={} to={}", ip(a1), ip(a2)),
        DBG_CT_LOOKUP4_1 => format!(
            "Conntrack lookup 1/2: src={}:{} dst={}:{}",
            ip(a1),
            a3 & 0xffff,
            ip(a2),
            a3 >> 16
        ),
        DBG_CT_LOOKUP4_2 => {
            format!("Conntrack lookup 2/2: nexthdr={} flags={}", a1 >> 8, a1 & 0xff)
        }
        DBG_CT_CREATED4 => format!(
            "Conntrack create: proxy-port={} revnat={} src-identity={a2} lb={}",
            a1 >> 16,
            a1 & 0xffff,
            ip(a3)
        ),
        DBG_IP_ID_MAP_SUCCEED4 => format!("Successfully mapped addr={} to identity={a2}", ip(a1)),
        DBG_IP_ID_MAP_FAILED4 => format!("Failed to map addr={} to identity", ip(a1)),
        DBG_INHERIT_IDENTITY => format!("Inheriting identity={a1} from stack"),
        DBG_POLICY_LOOKUP => {
            let dir = if (a1 >> 8) & 0xff == u32::from(policy::DIR_INGRESS) {
                "ingress"
            } else {
                "egress"
            };
            let verdict = match (a3 >> 8) & 0xff {
                POLICY_NOT_ENFORCED => "not enforced".to_owned(),
                POLICY_ALLOWED => format!("allowed ({})", policy::match_name((a3 & 0xff) as u8)),
                POLICY_DENIED => {
                    format!("denied by a deny rule ({})", policy::match_name((a3 & 0xff) as u8))
                }
                _ => "no rule allows it".to_owned(),
            };
            format!(
                "Policy lookup: endpoint {} {dir}, identity {a2}, proto {} dport {}: {verdict}",
                a1 >> 16,
                a1 & 0xff,
                a3 >> 16
            )
        }
        DBG_ARP_REPLY => "ARP request answered with the gateway MAC".into(),
        DBG_SNAT => {
            format!("Masquerade (SNAT) from={}:{} to={}:{}", ip(a1), a3 >> 16, ip(a2), a3 & 0xffff)
        }
        DBG_REV_SNAT => format!("Reverse SNAT to={}:{}", ip(a1), a3 & 0xffff),
        DBG_FIB_LOOKUP => format!("FIB lookup: result={} ifindex={a2}", a1 as i32),
        DBG_TAIL_CALL => format!("Tail call to program {a1}"),
        DBG_SOURCE_CHECK => {
            format!("Source address {} is not the endpoint's {}", ip(a1), ip(a2))
        }
        DBG_DSR_OPT => format!("DSR: frontend {}:{a2} in the IPv4 option", ip(a1)),
        DBG_DSR_LEARN => format!("DSR: option read, replies to {} leave from the frontend", ip(a1)),
        DBG_DSR_REPLY => format!("DSR: reply from frontend {}:{a2}", ip(a1)),
        t => format!("Unknown message type={t} arg1={a1} arg2={a2}"),
    }
}

/// A capture event's point in words, as Cilium's monitor names it.
pub fn capture_message(c: &CaptureNotify) -> String {
    use ciliate_common::debug::*;
    let (a1, a2) = (c.arg1, c.arg2);
    match c.hdr.subtype {
        CAPTURE_DELIVERY => format!("Delivery to ifindex {a1}"),
        CAPTURE_FROM_LB => format!("Incoming packet to load balancer on ifindex {a1}"),
        CAPTURE_SNAT_PRE => format!("Packet going into snat engine on ifindex {a1}"),
        CAPTURE_SNAT_POST => format!("Packet coming from snat engine on ifindex {a1}"),
        CAPTURE_FROM => {
            format!("Packet at {} on ifindex {a1}", ciliate_common::trace::point_name(a2 as u8))
        }
        CAPTURE_TO => {
            format!("Packet {} on ifindex {a1}", ciliate_common::trace::point_name(a2 as u8))
        }
        t => format!("Unknown message type={t} arg1={a1}"),
    }
}

/// "10.0.0.1:52000 -> 10.0.0.2:80 tcp SYN": the packet an event captured,
/// as Cilium's monitor prints it. The capture may be cut short; headers
/// that are there are decoded, checksums are not checked.
pub fn summary(frame: &[u8]) -> String {
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    if frame.len() < 14 {
        return format!("{} bytes (runt frame)", frame.len());
    }
    let ethertype = be16(frame, 12);
    let body = &frame[14..];
    match ethertype {
        0x0806 if body.len() >= 28 => {
            let ip = |at: usize| {
                std::net::Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3])
            };
            let op = if be16(body, 6) == 1 { "request" } else { "reply" };
            format!("ARP {op} {} -> {}", ip(14), ip(24))
        }
        0x0800 if body.len() >= 20 => {
            let src = std::net::Ipv4Addr::new(body[12], body[13], body[14], body[15]);
            let dst = std::net::Ipv4Addr::new(body[16], body[17], body[18], body[19]);
            let ihl = usize::from(body[0] & 0x0f) * 4;
            let l4 = body.get(ihl..).unwrap_or_default();
            match body[9] {
                6 if l4.len() >= 14 => {
                    let flags = l4[13];
                    let names: Vec<&str> =
                        [(0x02, "SYN"), (0x10, "ACK"), (0x04, "RST"), (0x01, "FIN"), (0x08, "PSH")]
                            .iter()
                            .filter(|(bit, _)| flags & bit != 0)
                            .map(|(_, n)| *n)
                            .collect();
                    format!(
                        "{src}:{} -> {dst}:{} tcp {}",
                        be16(l4, 0),
                        be16(l4, 2),
                        names.join(", ")
                    )
                }
                17 if l4.len() >= 4 => {
                    format!("{src}:{} -> {dst}:{} udp", be16(l4, 0), be16(l4, 2))
                }
                1 if !l4.is_empty() => {
                    let kind = match l4[0] {
                        0 => "EchoReply".to_owned(),
                        3 => "DestinationUnreachable".to_owned(),
                        8 => "EchoRequest".to_owned(),
                        11 => "TimeExceeded".to_owned(),
                        t => format!("type {t}"),
                    };
                    format!("{src} -> {dst} ICMPv4 {kind}")
                }
                p => format!("{src} -> {dst} proto {p}"),
            }
        }
        0x86dd => "IPv6 packet".to_owned(),
        t => format!("ethertype {t:#06x}, {} bytes", frame.len()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::summary;
    use crate::packet::{self, Eth, Ip4, L4, tcp_flags};

    #[test]
    fn captured_packets_read_as_cilium_prints_them() {
        let eth = Eth { dst: [1; 6], src: [2; 6] };
        let ip = Ip4::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let syn = L4::Tcp {
            sport: 39276,
            dport: 22,
            seq: 1,
            ack: 0,
            flags: tcp_flags::SYN | tcp_flags::ACK,
            payload: &[0; 400],
        };
        let f = packet::ipv4_frame(&eth, &ip, &syn);
        // Cut like a 128-byte capture.
        assert_eq!(summary(&f[..128]), "10.0.0.1:39276 -> 10.0.0.2:22 tcp SYN, ACK");
        let udp = packet::ipv4_frame(&eth, &ip, &L4::Udp { sport: 5, dport: 53, payload: b"" });
        assert_eq!(summary(&udp), "10.0.0.1:5 -> 10.0.0.2:53 udp");
        let ping = packet::ipv4_frame(
            &eth,
            &ip,
            &L4::IcmpEcho { request: true, id: 1, seq: 1, payload: b"" },
        );
        assert_eq!(summary(&ping), "10.0.0.1 -> 10.0.0.2 ICMPv4 EchoRequest");
        assert_eq!(summary(&[0; 5]), "5 bytes (runt frame)");
    }
}
