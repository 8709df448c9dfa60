//! Names unique per run: 10 hex digits (40 bits) from the pid, a counter
//! and the clock, so parallel and repeated runs do not meet (24 bits were
//! seen to collide once in a thousand draws).

use std::sync::atomic::{AtomicU32, Ordering};

/// A 10-hex-digit token that differs between calls, processes and runs.
pub fn token() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seq = u64::from(SEQ.fetch_add(1, Ordering::Relaxed));
    let pid = u64::from(std::process::id());
    // splitmix64 over the inputs: cheap and well spread.
    let mut x = nanos ^ (pid << 32) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    format!("{:010x}", x & 0xff_ffff_ffff)
}

/// `lxc` + 11 hex digits of a hash of `id`, as Cilium names host devices.
pub fn lxc_name(id: &str) -> String {
    // FNV-1a: stable across runs and versions (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lxc{:011x}", h & 0xfff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_and_fit_device_names() {
        let a: Vec<String> = (0..10000).map(|_| token()).collect();
        let mut b = a.clone();
        b.sort();
        b.dedup();
        assert_eq!(a.len(), b.len());
        assert!(a.iter().all(|t| t.len() == 10));
    }

    #[test]
    fn lxc_names_are_stable_and_fit() {
        assert_eq!(lxc_name("pod-a"), lxc_name("pod-a"));
        assert_ne!(lxc_name("pod-a"), lxc_name("pod-b"));
        assert_eq!(lxc_name("x").len(), 14);
    }
}
