//! IPAM: /32 pod addresses from the node's pod CIDR. The network address,
//! the router IP (the first address) and the broadcast address are never
//! handed out. Allocations are persisted and survive agent restarts; the
//! same owner asking again gets the same address (a retried CNI ADD).

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("pod CIDR {0} has no room for pods (needs /30 or larger)")]
    TooSmall(String),
    #[error("pod CIDR {cidr}: {reason}")]
    BadCidr { cidr: String, reason: String },
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("{0} is not allocated")]
    NotAllocated(Ipv4Addr),
    #[error("persisting the allocations: {0}")]
    Store(String),
}

impl From<StoreError> for IpamError {
    fn from(e: StoreError) -> Self {
        IpamError::Store(e.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub net: Ipv4Addr,
    pub len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = |reason: &str| IpamError::BadCidr { cidr: s.into(), reason: reason.into() };
        let (net, len) = s.split_once('/').ok_or_else(|| bad("expected ADDRESS/LENGTH"))?;
        let net: Ipv4Addr = net.parse().map_err(|_| bad("not an IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
        if len > 32 {
            return Err(bad("prefix length over 32"));
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        if u32::from(net) & !mask != 0 {
            return Err(bad("host bits set"));
        }
        if len > 30 {
            return Err(IpamError::TooSmall(s.into()));
        }
        Ok(Cidr { net, len })
    }
}

impl Cidr {
    pub fn router(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + 1)
    }
    fn first_pod(&self) -> u32 {
        u32::from(self.net) + 2
    }
    /// Last usable address (before broadcast).
    fn last_pod(&self) -> u32 {
        u32::from(self.net) + (1u32 << (32 - u32::from(self.len))) - 2
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip >= self.first_pod() && ip <= self.last_pod()
    }
    pub fn pod_capacity(&self) -> usize {
        (self.last_pod() - self.first_pod() + 1) as usize
    }
    /// Its `/mask` subnets in order (none when `/mask` does not fit in
    /// it or is narrower than /30): a cluster pool's node CIDRs.
    pub fn blocks(&self, mask: u8) -> impl Iterator<Item = Cidr> + use<> {
        let (base, len) = (u32::from(self.net), self.len);
        let count = if mask < len || mask > 30 { 0 } else { 1u64 << (mask - len) };
        (0..count).map(move |i| Cidr {
            net: Ipv4Addr::from(base + ((i as u32) << (32 - mask))),
            len: mask,
        })
    }
    /// As a policy prefix.
    pub fn prefix(&self) -> crate::policy::Prefix {
        (self.net, self.len)
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    /// address → owner
    allocated: BTreeMap<Ipv4Addr, String>,
}

pub struct Ipam {
    pub cidr: Cidr,
    allocated: BTreeMap<Ipv4Addr, String>,
    path: Option<PathBuf>,
}

impl Ipam {
    /// IPAM over `cidr`, persisted at `path` (or in memory only).
    pub fn open(cidr: Cidr, path: Option<PathBuf>) -> Result<Self, IpamError> {
        let persisted: Persisted = match &path {
            Some(p) => store::load(p)?.unwrap_or_default(),
            None => Persisted::default(),
        };
        // Allocations outside the CIDR (the CIDR changed) are dropped.
        let allocated =
            persisted.allocated.into_iter().filter(|(ip, _)| cidr.contains(*ip)).collect();
        Ok(Self { cidr, allocated, path })
    }

    fn persist(&self) -> Result<(), IpamError> {
        if let Some(p) = &self.path {
            store::save(p, &Persisted { allocated: self.allocated.clone() })?;
        }
        Ok(())
    }

    /// An address for `owner`: its existing one, or the lowest free one.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some((ip, _)) = self.allocated.iter().find(|(_, o)| *o == owner) {
            return Ok(*ip);
        }
        let ip = (self.cidr.first_pod()..=self.cidr.last_pod())
            .map(Ipv4Addr::from)
            .find(|ip| !self.allocated.contains_key(ip))
            .ok_or_else(|| IpamError::Exhausted(self.cidr.to_string()))?;
        self.allocated.insert(ip, owner.to_owned());
        if let Err(e) = self.persist() {
            self.allocated.remove(&ip);
            return Err(e);
        }
        Ok(ip)
    }

    pub fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.allocated.get(&ip).map(String::as_str)
    }

    pub fn release(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        if self.allocated.remove(&ip).is_none() {
            return Err(IpamError::NotAllocated(ip));
        }
        self.persist()
    }

    /// Release whatever `owner` holds; returns it.
    pub fn release_owner(&mut self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let ip = self.allocated.iter().find(|(_, o)| *o == owner).map(|(ip, _)| *ip);
        if let Some(ip) = ip {
            self.release(ip)?;
        }
        Ok(ip)
    }

    pub fn used(&self) -> usize {
        self.allocated.len()
    }

    pub fn free(&self) -> usize {
        self.cidr.pod_capacity() - self.allocated.len()
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&Ipv4Addr, &String)> {
        self.allocated.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_skip_network_router_and_broadcast_and_run_out() {
        let mut ipam = Ipam::open(cidr("10.1.0.0/29"), None).unwrap();
        let got: Vec<_> = (0..5).map(|i| ipam.allocate(&format!("c{i}")).unwrap()).collect();
        assert_eq!(got.first(), Some(&Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(got.last(), Some(&Ipv4Addr::new(10, 1, 0, 6)));
        assert_eq!(ipam.allocate("c9"), Err(IpamError::Exhausted("10.1.0.0/29".into())));
        assert_eq!(ipam.free(), 0);
    }

    #[test]
    fn the_same_owner_gets_the_same_address_and_release_frees_it() {
        let mut ipam = Ipam::open(cidr("10.1.0.0/24"), None).unwrap();
        let a = ipam.allocate("a").unwrap();
        assert_eq!(ipam.allocate("a").unwrap(), a);
        let b = ipam.allocate("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(ipam.release_owner("a").unwrap(), Some(a));
        assert_eq!(ipam.release_owner("a").unwrap(), None);
        assert_eq!(ipam.allocate("c").unwrap(), a, "the lowest free address is reused");
        assert_eq!(
            ipam.release(Ipv4Addr::new(10, 1, 0, 200)),
            Err(IpamError::NotAllocated(Ipv4Addr::new(10, 1, 0, 200)))
        );
    }

    #[test]
    fn allocations_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("ciliate-ipam-{}", std::process::id()));
        let path = dir.join("ipam.json");
        let a = {
            let mut ipam = Ipam::open(cidr("10.1.0.0/24"), Some(path.clone())).unwrap();
            ipam.allocate("x").unwrap();
            ipam.allocate("a").unwrap()
        };
        let mut ipam = Ipam::open(cidr("10.1.0.0/24"), Some(path)).unwrap();
        assert_eq!(ipam.owner(a), Some("a"));
        assert_eq!(ipam.allocate("a").unwrap(), a);
        assert_eq!(ipam.used(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_cidrs_are_refused_with_a_reason() {
        for (s, why) in [
            ("10.1.0.1/24", "host bits"),
            ("10.1.0.0", "ADDRESS/LENGTH"),
            ("10.1.0.0/33", "over 32"),
            ("nonsense/24", "not an IPv4"),
            ("10.1.0.0/31", "no room"),
        ] {
            let e = s.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
