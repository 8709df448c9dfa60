//! Ciliate's L7 proxy (issue #14): Cilium's HTTP policy rules
//! ([`rules`]) enforced by an HTTP proxy ([`http`]) on the connections
//! the datapath redirects to it.

pub mod http;
pub mod rules;
