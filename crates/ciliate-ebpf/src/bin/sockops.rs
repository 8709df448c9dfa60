//! Socket-layer acceleration (Cilium's `bpf_sockops` and `bpf_redir`;
//! layout in `ciliate_common::sockops`), on the node's cgroup with
//! `--sockops-enable`:
//!
//! - `ciliate_sockops` (sock_ops): when a TCP connection between two local
//!   endpoints becomes established, its socket goes into the sockhash, but
//!   only if the datapath let the connection in: the client's egress
//!   conntrack entry (its from-container created it after egress policy
//!   allowed the SYN) or the server's ingress entry (created after ingress
//!   policy allowed it) must exist. The handshake, and later the FIN/RST,
//!   still cross the veths: the datapath traces them as always.
//! - `sk_msg_redir` (sk_msg, on the sockhash): a message a socket in the
//!   map sends goes straight into its peer socket's receive queue when the
//!   peer is in the map too; otherwise it takes the normal path.
//!
//! The agent removes a connection's sockets from the map when a policy
//! change would not let it in any more (the next send then takes the
//! normal path, where the datapath decides).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
    },
    macros::{map, sk_msg, sock_ops},
    maps::SockHash,
    programs::{SkMsgContext, SockOpsContext},
};
use ciliate_common::{
    ct::{CtKey4, DIR_EGRESS, DIR_INGRESS},
    endpoint::ENDPOINT_F_HOST,
    sockops::{MAX_ENTRIES, SockKey},
};
use ciliate_ebpf::{lookup::local_endpoint, maps::CILIATE_CT4_TCP};

#[map(name = "ciliate_sock_ops")]
static CILIATE_SOCK_OPS: SockHash<SockKey> = SockHash::pinned(MAX_ENTRIES, 0);

const AF_INET: u32 = 2;
const IPPROTO_TCP: u8 = 6;

/// A socket's key from its addresses (network order, as read) and ports
/// (`local_port` in host order; `remote_port` network order in the upper
/// 16 bits, as both contexts give them).
#[inline(always)]
fn key_of(local_ip4: u32, remote_ip4: u32, local_port: u32, remote_port: u32) -> SockKey {
    SockKey {
        sip: local_ip4.to_ne_bytes(),
        dip: remote_ip4.to_ne_bytes(),
        sport: (local_port as u16).to_be(),
        dport: (remote_port >> 16) as u16,
    }
}

/// Is `ip` a pod of this node (not the host's own addresses)?
#[inline(always)]
fn local_pod(ip: [u8; 4]) -> bool {
    local_endpoint(ip).is_some_and(|e| e.flags & ENDPOINT_F_HOST == 0)
}

#[sock_ops]
pub fn ciliate_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if ctx.family() != AF_INET
        || (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
    {
        return 0;
    }
    let mut key = key_of(ctx.local_ip4(), ctx.remote_ip4(), ctx.local_port(), ctx.remote_port());
    if !local_pod(key.sip) || !local_pod(key.dip) {
        return 0;
    }
    // The conntrack entry the datapath made once policy allowed the
    // connection: the client's egress one, or the server's ingress one
    // (both under the client → server tuple).
    let (client, dir) = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        (key, DIR_EGRESS)
    } else {
        (key.peer(), DIR_INGRESS)
    };
    let ct = CtKey4 {
        saddr: client.sip,
        daddr: client.dip,
        sport: client.sport,
        dport: client.dport,
        proto: IPPROTO_TCP,
        dir,
        _pad: [0; 2],
    };
    // SAFETY: a presence check; nothing is read from the value.
    if unsafe { CILIATE_CT4_TCP.get(ct) }.is_none() {
        return 0;
    }
    // A full map leaves the connection on the normal path.
    // SAFETY: the context's sock_ops, as the helper wants it.
    let _ = CILIATE_SOCK_OPS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
    0
}

#[sk_msg]
pub fn sk_msg_redir(ctx: SkMsgContext) -> u32 {
    // SAFETY: plain reads of the message's socket fields.
    let (family, local_ip4, remote_ip4, local_port, remote_port) = unsafe {
        let m = &*ctx.msg;
        (m.family, m.local_ip4, m.remote_ip4, m.local_port, m.remote_port)
    };
    if family == AF_INET {
        let mut peer = key_of(local_ip4, remote_ip4, local_port, remote_port).peer();
        // Redirected when the peer's socket is in the map; otherwise the
        // message goes the normal way (the helper's verdict is not ours).
        let _ = CILIATE_SOCK_OPS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    }
    SK_PASS
}

ciliate_ebpf::program_object!();
