//! ARP responder of from-container: every ARP request a pod sends is answered
//! with the MAC of the pod's host-side device, as Cilium does (the pod's only
//! neighbour is its gateway, so each pod sees its own gateway MAC).
//!
//! As in Cilium: a request for the pod's own IP (duplicate address detection)
//! and anything that is not a well-formed Ethernet/IPv4 request go to the
//! stack unchanged.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};

use crate::packet::{ArpHdr, ETH_HLEN, ETH_P_IP, EthHdr, ptr_at};

const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// What to do with an ARP frame.
pub enum ArpAction {
    /// Answered in place; the frame must be sent back out of `ifindex`.
    Reply,
    /// Not ours to answer: let the stack have it.
    Pass,
}

/// Turn a valid request into a reply from `mac`, in place.
#[inline(always)]
pub fn respond(ctx: &TcContext, mac: &[u8; 6], own_ip: &[u8; 4]) -> ArpAction {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return ArpAction::Pass;
    };
    let Some(arp) = ptr_at::<ArpHdr>(ctx, ETH_HLEN) else {
        return ArpAction::Pass;
    };
    // SAFETY: both pointers were bounds-checked by ptr_at.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if arp.htype != ARPHRD_ETHER.to_be()
        || arp.ptype != ETH_P_IP.to_be()
        || arp.hlen != 6
        || arp.plen != 4
        || arp.op != ARPOP_REQUEST.to_be()
        // Gratuitous ARP / DAD for the pod's own address: not for us.
        || arp.tpa == arp.spa
        || arp.tpa == *own_ip
    {
        return ArpAction::Pass;
    }
    let requester_mac = arp.sha;
    let requester_ip = arp.spa;
    let target_ip = arp.tpa;
    eth.dst = requester_mac;
    eth.src = *mac;
    arp.op = ARPOP_REPLY.to_be();
    arp.sha = *mac;
    arp.spa = target_ip;
    arp.tha = requester_mac;
    arp.tpa = requester_ip;
    ArpAction::Reply
}

/// Send the (rewritten) frame back out of the device it came in on: on the
/// host side of a veth that delivers it to the pod.
#[inline(always)]
pub fn redirect_back(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; the result is the tc verdict.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
