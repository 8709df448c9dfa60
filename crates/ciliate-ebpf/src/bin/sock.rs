//! Socket load balancing on cgroup v2 (Cilium's `bpf_sock`): a process
//! that connects (TCP, connected UDP) or sends (UDP) to a frontend talks to
//! a backend directly, so its packets need no per-packet translation.
//!
//! - connect4 / sendmsg4: frontend → backend (random slot, or Maglev on the
//!   socket cookie), remembered per socket in the socket reverse-NAT map;
//! - recvmsg4 / getpeername4: a backend address the socket was translated
//!   to reads as the frontend again;
//! - sock_release: a connected socket's entry goes with the socket (Cilium
//!   leaves it to the LRU; unconnected UDP sockets still do).
//!
//! Frontends with ClientIP affinity or source ranges are left to the
//! per-packet path, which knows the client's address (a socket does not
//! before it is bound). A frontend without backends refuses the connect
//! (EPERM), as Cilium.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use ciliate_common::lb::{
    LbKey, SVC_F_AFFINITY, SVC_F_MAGLEV, SVC_F_SRC_RANGES, SockRevNatKey, SockRevNatValue,
};
use ciliate_ebpf::{lb, maps::CILIATE_LB4_SOCK_REVNAT};

const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn sock4_release(ctx: SockContext) -> i32 {
    // SAFETY: the socket the kernel passed; plain field reads and a helper
    // cgroup sock programs may call.
    let key = unsafe {
        let sk = &*ctx.sock;
        if sk.family != 2 {
            return ALLOW;
        }
        SockRevNatKey {
            cookie: bpf_get_socket_cookie(ctx.sock.cast()),
            addr: sk.dst_ip4.to_ne_bytes(),
            port: sk.dst_port,
            _pad: 0,
        }
    };
    if key.addr != [0; 4] {
        let _ = CILIATE_LB4_SOCK_REVNAT.remove(key);
    }
    ALLOW
}

/// The socket's cookie, its destination (address and port, network order)
/// and protocol.
#[inline(always)]
fn dest(ctx: &SockAddrContext) -> (u64, [u8; 4], u16, u8) {
    // SAFETY: the context the kernel passed; plain field reads and a
    // helper every sock_addr program may call.
    unsafe {
        let sa = &*ctx.sock_addr;
        let cookie = bpf_get_socket_cookie(ctx.sock_addr.cast());
        (cookie, sa.user_ip4.to_ne_bytes(), sa.user_port as u16, sa.protocol as u8)
    }
}

#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let (cookie, addr, port, proto) = dest(ctx);
    let Some(svc) = lb::frontend_of(addr, port, proto) else { return ALLOW };
    if svc.flags & (SVC_F_AFFINITY | SVC_F_SRC_RANGES) != 0 {
        return ALLOW;
    }
    if svc.count == 0 {
        return REJECT;
    }
    let id = if svc.flags & SVC_F_MAGLEV != 0 {
        lb::maglev_backend(svc.rev_nat_index, cookie)
    } else {
        lb::random_slot(&svc, &LbKey { addr, dport: port, slot: 0, proto, _pad: 0, _pad2: 0 })
    };
    let Some(b) = lb::backend(id) else { return REJECT };
    let key = SockRevNatKey { cookie, addr: b.addr, port: b.port, _pad: 0 };
    let value = SockRevNatValue { addr, port, rev_nat_index: svc.rev_nat_index };
    // Without the entry replies would show the backend; still better than
    // no service at all.
    let _ = CILIATE_LB4_SOCK_REVNAT.insert(key, value, 0);
    // SAFETY: the context's writable fields for this attach type.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(b.addr);
        (*ctx.sock_addr).user_port = u32::from(b.port);
    }
    ALLOW
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    let (cookie, addr, port, _) = dest(ctx);
    let key = SockRevNatKey { cookie, addr, port, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { CILIATE_LB4_SOCK_REVNAT.get(key).copied() } {
        // SAFETY: the context's writable fields for this attach type.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(v.addr);
            (*ctx.sock_addr).user_port = u32::from(v.port);
        }
    }
    ALLOW
}

ciliate_ebpf::program_object!();
