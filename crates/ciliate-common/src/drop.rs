//! Drop reasons: Cilium's numbering (`bpf/lib/common.h`, `DROP_*`), so a drop
//! reads the same in `ciliate monitor`, the flow API and the metrics.
//! Reasons are u8 on the wire; 0 means "forwarded" in the metrics map.

pub const INVALID_SMAC: u8 = 130;
pub const INVALID_DMAC: u8 = 131;
pub const INVALID_SIP: u8 = 132;
pub const POLICY: u8 = 133;
pub const INVALID: u8 = 134;
pub const CT_INVALID_HDR: u8 = 135;
pub const CT_UNKNOWN_PROTO: u8 = 137;
pub const UNKNOWN_L3: u8 = 139;
pub const MISSED_TAIL_CALL: u8 = 140;
pub const WRITE_ERROR: u8 = 141;
pub const UNKNOWN_L4: u8 = 142;
pub const UNKNOWN_ICMP_CODE: u8 = 143;
pub const UNKNOWN_ICMP_TYPE: u8 = 144;
pub const UNKNOWN_TARGET: u8 = 150;
pub const UNROUTABLE: u8 = 151;
pub const CSUM_L3: u8 = 153;
pub const CSUM_L4: u8 = 154;
pub const CT_CREATE_FAILED: u8 = 155;
pub const FRAG_NOSUPPORT: u8 = 157;
pub const NO_SERVICE: u8 = 158;
pub const NO_TUNNEL_ENDPOINT: u8 = 160;
pub const UNKNOWN_CT: u8 = 163;
pub const HOST_UNREACHABLE: u8 = 164;
pub const NO_CONFIG: u8 = 165;
pub const UNSUPPORTED_L2: u8 = 166;
pub const NAT_NO_MAPPING: u8 = 167;
pub const NAT_UNSUPP_PROTO: u8 = 168;
pub const NO_FIB: u8 = 169;
pub const INVALID_IDENTITY: u8 = 171;
pub const UNKNOWN_SENDER: u8 = 172;
pub const FRAG_NOT_FOUND: u8 = 175;
pub const NOT_IN_SRC_RANGE: u8 = 177;
pub const POLICY_DENY: u8 = 181;
pub const INVALID_VNI: u8 = 183;

/// The human text of a drop reason, as Cilium's monitor prints it.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0 => "Success",
        INVALID_SMAC => "Invalid source mac",
        INVALID_DMAC => "Invalid destination mac",
        INVALID_SIP => "Invalid source ip",
        POLICY => "Policy denied",
        INVALID => "Invalid packet",
        CT_INVALID_HDR => "CT: Invalid header",
        CT_UNKNOWN_PROTO => "CT: Unknown L4 protocol",
        UNKNOWN_L3 => "Unknown L3 target address",
        MISSED_TAIL_CALL => "Missed tail call",
        WRITE_ERROR => "Error writing to packet",
        UNKNOWN_L4 => "Unknown L4 protocol",
        UNKNOWN_ICMP_CODE => "Unknown ICMPv4 code",
        UNKNOWN_ICMP_TYPE => "Unknown ICMPv4 type",
        UNKNOWN_TARGET => "Unknown target",
        UNROUTABLE => "Unroutable",
        CSUM_L3 => "Invalid L3 checksum",
        CSUM_L4 => "Invalid L4 checksum",
        CT_CREATE_FAILED => "CT: Map insertion failed",
        FRAG_NOSUPPORT => "Fragmentation needed",
        NO_SERVICE => "Service backend not found",
        NO_TUNNEL_ENDPOINT => "No tunnel/encapsulation endpoint (datapath BUG!)",
        UNKNOWN_CT => "Unknown connection tracking state",
        HOST_UNREACHABLE => "Host is unreachable",
        NO_CONFIG => "No configuration available to perform policy decision",
        UNSUPPORTED_L2 => "Unsupported L2 protocol",
        NAT_NO_MAPPING => "No mapping for NAT masquerade",
        NAT_UNSUPP_PROTO => "Unsupported protocol for NAT masquerade",
        NO_FIB => "No FIB entry found",
        INVALID_IDENTITY => "Invalid identity",
        UNKNOWN_SENDER => "Unknown sender",
        FRAG_NOT_FOUND => "First logical datagram fragment not found",
        NOT_IN_SRC_RANGE => "Not in source range",
        POLICY_DENY => "Policy denied by denylist",
        INVALID_VNI => "Invalid VNI",
        _ => "Unknown reason",
    }
}
