//! Socket-layer acceleration (Cilium's sockops / `cilium_sock_ops`): TCP
//! sockets of connections between two local endpoints go into a sockhash
//! once established, and an sk_msg program hands what one of them sends
//! straight to the other's receive queue, past TCP/IP and both veths.
//!
//! A socket's key is its own view of the connection: its address and port
//! first, the peer's second (ports in network byte order, as in a packet).
//! The peer's socket is found under the same key with the sides swapped.

pub const MAP_NAME: &str = "ciliate_sock_ops";
/// Accelerated sockets a node holds (two per connection).
pub const MAX_ENTRIES: u32 = 65_535;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub sip: [u8; 4],
    pub dip: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 12);

impl SockKey {
    /// The key of the peer's socket.
    pub const fn peer(&self) -> Self {
        Self { sip: self.dip, dip: self.sip, sport: self.dport, dport: self.sport }
    }
}
