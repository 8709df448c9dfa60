//! When the conntrack garbage collector runs next. With `--ct-gc-interval`
//! given, every that many seconds; otherwise the interval adapts to what
//! the sweeps find, as Cilium's does: a sweep that deleted much brings the
//! next one closer (by the share it deleted), one that deleted little
//! pushes it out (×1.5, up to the maximum), and a table near full (90%)
//! is swept again at the minimum interval, before the LRU has to evict
//! live connections to make room.

use std::time::Duration;

use ciliate_datapath::maps::Sweep;

/// Where the dynamic interval starts, its floor and its ceiling (Cilium's
/// `--conntrack-gc-max-interval` default is 12 h).
pub const START: Duration = Duration::from_secs(30);
pub const MIN: Duration = Duration::from_secs(5);
pub const MAX: Duration = Duration::from_secs(12 * 3600);

/// Fill from which a table counts as near full.
pub const NEAR_FULL: f64 = 0.9;

/// The schedule: fixed, or adapting from `START`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Fixed(Duration),
    Dynamic { next: Duration },
}

impl Schedule {
    /// `--ct-gc-interval` seconds when given, else dynamic.
    pub fn new(fixed_secs: Option<u64>) -> Self {
        match fixed_secs {
            Some(s) => Schedule::Fixed(Duration::from_secs(s.max(1))),
            None => Schedule::Dynamic { next: START },
        }
    }

    pub fn next(&self) -> Duration {
        match *self {
            Schedule::Fixed(d) => d,
            Schedule::Dynamic { next } => next,
        }
    }

    /// Take a sweep's result (`max`: the tables' capacities, TCP and
    /// other); the interval until the next sweep.
    pub fn after(&mut self, s: &Sweep, max: (u32, u32)) -> Duration {
        if let Schedule::Dynamic { next } = self {
            *next = adapt(*next, s, max);
        }
        self.next()
    }
}

/// How full the fuller table is after a sweep.
pub fn fill(s: &Sweep, max: (u32, u32)) -> f64 {
    let tcp = s.tcp_alive as f64 / f64::from(max.0.max(1));
    let any = s.any_alive as f64 / f64::from(max.1.max(1));
    tcp.max(any)
}

fn adapt(prev: Duration, s: &Sweep, max: (u32, u32)) -> Duration {
    if fill(s, max) >= NEAR_FULL {
        return MIN;
    }
    let seen = (s.tcp_alive + s.tcp_deleted + s.any_alive + s.any_deleted) as f64;
    let ratio = if seen == 0.0 { 0.0 } else { s.removed() as f64 / seen };
    let next = if ratio >= 0.25 {
        prev.mul_f64(1.0 - ratio)
    } else if ratio < 0.05 {
        prev.mul_f64(1.5)
    } else {
        prev
    };
    next.clamp(MIN, MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(alive: usize, deleted: usize) -> Sweep {
        Sweep { tcp_alive: alive, tcp_deleted: deleted, ..Default::default() }
    }

    #[test]
    fn the_interval_follows_what_sweeps_find() {
        let max = (1000, 1000);
        let mut s = Schedule::new(None);
        assert_eq!(s.next(), START);
        // Little to delete: further out, up to the ceiling.
        assert_eq!(s.after(&sweep(100, 1), max), Duration::from_secs(45));
        for _ in 0..100 {
            s.after(&sweep(100, 0), max);
        }
        assert_eq!(s.next(), MAX);
        // Half deleted: half as long.
        let mut s = Schedule::Dynamic { next: Duration::from_secs(60) };
        assert_eq!(s.after(&sweep(100, 100), max), Duration::from_secs(30));
        // In between: unchanged.
        assert_eq!(s.after(&sweep(90, 10), max), Duration::from_secs(30));
        // Near full: the floor at once, whatever was deleted.
        assert_eq!(s.after(&sweep(950, 0), max), MIN);
        let any_full = Sweep { any_alive: 900, ..Default::default() };
        let mut s = Schedule::Dynamic { next: Duration::from_secs(600) };
        assert_eq!(s.after(&any_full, max), MIN);
        // Never below the floor.
        assert_eq!(s.after(&sweep(1, 999), max), MIN);
        // A fixed interval stays.
        let mut s = Schedule::new(Some(7));
        assert_eq!(s.after(&sweep(999, 0), max), Duration::from_secs(7));
    }
}
