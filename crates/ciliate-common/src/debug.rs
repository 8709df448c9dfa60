//! Debug and capture events: what each subtype number means and what its
//! arguments hold. Where Cilium has the same decision, the number is
//! Cilium's (`bpf/lib/dbg.h`) and user space renders Cilium's text;
//! Ciliate's own decisions are numbered from 128.
//!
//! Addresses travel as the four bytes of the packet in a `u32`
//! (`u32::from_ne_bytes(addr)`), ports and the other numbers in host
//! order.

/// Endpoint ID in `arg1`, the source identity in `arg2`.
pub const DBG_LOCAL_DELIVERY: u8 = 2;
/// Tunnel endpoint address in `arg1`, the source identity (the VNI) in `arg2`.
pub const DBG_ENCAP: u8 = 3;
/// Policy would deny: source identity `arg1`, destination identity `arg2`.
pub const DBG_POLICY_DENIED: u8 = 5;
/// Conntrack verdict: `CT_*` state in `arg1`, reverse-NAT index in `arg2`.
pub const DBG_CT_VERDICT: u8 = 15;
/// Tunnel decap: the VNI (the sender's identity) in `arg1`.
pub const DBG_DECAP: u8 = 16;
/// To the host: `arg1` 1 when policy was skipped.
pub const DBG_TO_HOST: u8 = 19;
/// To the stack: `arg1` 1 when policy was skipped.
pub const DBG_TO_STACK: u8 = 20;
/// Service lookup: frontend address `arg1`, port `arg2`.
pub const DBG_LB4_LOOKUP_FRONTEND: u8 = 30;
/// No service at the address the lookup was for.
pub const DBG_LB4_LOOKUP_FRONTEND_FAIL: u8 = 31;
/// Backend chosen: its address in `arg1`, port in `arg2`.
pub const DBG_LB4_LOOKUP_BACKEND_SLOT_SUCCESS: u8 = 33;
/// No backend: the backend ID looked for in `arg1`.
pub const DBG_LB4_LOOKUP_BACKEND_FAIL: u8 = 35;
/// Reverse NAT: index in `arg1`.
pub const DBG_LB4_REVERSE_NAT_LOOKUP: u8 = 36;
/// Reverse NAT to frontend address `arg1`, port `arg2`.
pub const DBG_LB4_REVERSE_NAT: u8 = 37;
/// A pod reaching itself through its service: from `arg1` to `arg2`.
pub const DBG_LB4_LOOPBACK_SNAT: u8 = 38;
/// Conntrack lookup, first half: source address `arg1`, destination
/// address `arg2`, `arg3` = destination port << 16 | source port.
pub const DBG_CT_LOOKUP4_1: u8 = 48;
/// Conntrack lookup, second half: `arg1` = protocol << 8 | conntrack
/// direction (`ct::DIR_*`: 1 egress, 2 ingress, as the "flags").
pub const DBG_CT_LOOKUP4_2: u8 = 49;
/// Conntrack create: `arg1` = reverse-NAT index, `arg2` the source
/// identity, `arg3` the load-balancer address (0: none).
pub const DBG_CT_CREATED4: u8 = 50;
/// The ipcache mapped address `arg1` to identity `arg2`.
pub const DBG_IP_ID_MAP_SUCCEED4: u8 = 58;
/// No ipcache prefix covers address `arg1` (world).
pub const DBG_IP_ID_MAP_FAILED4: u8 = 56;
/// Identity `arg1` from the mark the stack's packet carried.
pub const DBG_INHERIT_IDENTITY: u8 = 61;

/// Ciliate's: the policy map's answer for endpoint `arg1 >> 16` in
/// direction `arg1 >> 8 & 0xff` (`policy::DIR_*`) with protocol
/// `arg1 & 0xff`: peer identity `arg2`, `arg3` = destination port << 16 |
/// verdict << 8 | match type (`policy::MATCH_*`); verdict 0 not enforced,
/// 1 allowed, 2 denied by a deny rule, 3 no rule allows.
pub const DBG_POLICY_LOOKUP: u8 = 128;
/// Ciliate's: an ARP request for address `arg1` answered.
pub const DBG_ARP_REPLY: u8 = 129;
/// Ciliate's: masquerade (SNAT) from address `arg1` to `arg2`, `arg3` =
/// old port << 16 | new port.
pub const DBG_SNAT: u8 = 130;
/// Ciliate's: reverse SNAT of a reply to address `arg1`, `arg3` = port.
pub const DBG_REV_SNAT: u8 = 131;
/// Ciliate's: the FIB's answer `arg1` (`BPF_FIB_LKUP_RET_*`), out of
/// ifindex `arg2`.
pub const DBG_FIB_LOOKUP: u8 = 132;
/// Ciliate's: a tail call to program `arg1` of the object's call table.
pub const DBG_TAIL_CALL: u8 = 133;
/// Ciliate's: the packet's source `arg1` is not the endpoint's address
/// `arg2`.
pub const DBG_SOURCE_CHECK: u8 = 134;
/// Ciliate's: NodePort DSR: the frontend `arg1`, port `arg2` put in the
/// IPv4 option for the backend's node.
pub const DBG_DSR_OPT: u8 = 135;
/// Ciliate's: NodePort DSR on the backend's node: the option read, the
/// replies to client `arg1` will leave from the frontend.
pub const DBG_DSR_LEARN: u8 = 136;
/// Ciliate's: NodePort DSR: the backend's reply leaves from frontend
/// `arg1`, port `arg2`.
pub const DBG_DSR_REPLY: u8 = 137;

/// Verdicts in [`DBG_POLICY_LOOKUP`].
pub const POLICY_NOT_ENFORCED: u32 = 0;
pub const POLICY_ALLOWED: u32 = 1;
pub const POLICY_DENIED: u32 = 2;
pub const POLICY_NOT_ALLOWED: u32 = 3;

/// Capture points (`CaptureNotify::hdr.subtype`): Cilium's numbers.
/// Delivery to ifindex `arg1`.
pub const CAPTURE_DELIVERY: u8 = 4;
/// A packet to a service frontend, on ifindex `arg1`.
pub const CAPTURE_FROM_LB: u8 = 5;
/// Before and after masquerading, on ifindex `arg1`.
pub const CAPTURE_SNAT_PRE: u8 = 10;
pub const CAPTURE_SNAT_POST: u8 = 11;
/// Ciliate's: a program's first look at the packet, on ifindex `arg1`;
/// `arg2` is the observation point (`trace::FROM_*`).
pub const CAPTURE_FROM: u8 = 64;
/// Ciliate's: the packet as it leaves a program for the stack or a
/// device, ifindex `arg1`; `arg2` is the observation point (`trace::TO_*`).
pub const CAPTURE_TO: u8 = 65;
